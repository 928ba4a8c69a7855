"""The iptables proxy mode: render kube-proxy's tables, hand them to the applier."""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Protocol

from pykubeproxy.iptables.render import Renderer
from pykubeproxy.iptables.ruleset import CANARY, TableState
from pykubeproxy.metrics import Metrics
from pykubeproxy.model import EndpointsMap, ServicePortMap, ServicePortName


class Applier(Protocol):
    def apply(self, tables: list[TableState]) -> None: ...


log = logging.getLogger(__name__)


class IptablesBackend:
    """kube-proxy's iptables mode, as a `Backend` of the proxier.

    `after_first_sync` runs once, after the first successful sync: starting in
    iptables mode removes IPVS mode's leftovers once no rule refers to them.
    """

    def __init__(
        self,
        renderer: Renderer,
        applier: Applier,
        metrics: Metrics,
        after_first_sync: Callable[[], None] | None = None,
    ) -> None:
        self.renderer = renderer
        self.applier = applier
        self.metrics = metrics
        self._after_first_sync = after_first_sync

    def sync(
        self,
        services: ServicePortMap,
        endpoints: EndpointsMap,
        rewrite: set[ServicePortName] | None,
    ) -> None:
        nat, filt = self.renderer.render(services, endpoints, rewrite)
        mangle = TableState("mangle", chains={CANARY: []})  # kube-proxy's canary lives here too
        self.applier.apply([nat, filt, mangle])
        self.metrics.count_rules([nat, filt])
        if self._after_first_sync is not None:
            cleanup, self._after_first_sync = self._after_first_sync, None
            try:
                cleanup()
            except Exception as err:  # leftovers of another mode must not stop this one
                log.warning("cannot remove IPVS mode's leftovers: %s", err)
