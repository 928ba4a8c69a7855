"""The iptables proxy mode: render kube-proxy's tables, hand them to the applier."""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable
from typing import Protocol

from pykubeproxy.iptables.render import Renderer
from pykubeproxy.iptables.ruleset import CANARY, TableState
from pykubeproxy.metrics import Metrics
from pykubeproxy.model import (
    EndpointsMap,
    IPAddress,
    IPNetwork,
    NodeFacts,
    ServicePortMap,
    ServicePortName,
)


class Applier(Protocol):
    def apply(self, tables: list[TableState]) -> None: ...


log = logging.getLogger(__name__)


class IptablesBackend:
    """kube-proxy's iptables mode, as a `Backend` of the proxier.

    `after_first_sync` runs once, after the first successful sync: starting in
    iptables mode removes IPVS mode's leftovers once no rule refers to them.
    With `nodeport_cidrs`, NodePorts answer only on the node addresses inside
    them, looked up again at every sync (addresses come and go), as upstream.
    """

    def __init__(
        self,
        renderer: Renderer,
        applier: Applier,
        metrics: Metrics,
        after_first_sync: Callable[[], None] | None = None,
        nodeport_cidrs: tuple[IPNetwork, ...] = (),
        node_addresses: Callable[[], list[IPAddress]] = list,
    ) -> None:
        self.renderer = renderer
        self.applier = applier
        self.metrics = metrics
        self._after_first_sync = after_first_sync
        self.nodeport_cidrs = nodeport_cidrs
        self.node_addresses = node_addresses

    def sync(
        self,
        services: ServicePortMap,
        endpoints: EndpointsMap,
        rewrite: set[ServicePortName] | None,
        node: NodeFacts,
    ) -> None:
        if self.nodeport_cidrs:
            ips = (ip for ip in self.node_addresses() if any(ip in c for c in self.nodeport_cidrs))
            node = dataclasses.replace(node, nodeport_ips=tuple(ips))
        rendered = self.renderer.render(services, endpoints, rewrite, node)
        # kube-proxy's canary lives in mangle too
        mangle = TableState("mangle", chains={CANARY: []}, partial=rewrite is not None)
        self.applier.apply([*rendered.tables, mangle])
        self.metrics.count_rules({t.name: t.rule_count() for t in rendered.tables})
        self.metrics.set_no_local_endpoints(rendered.no_local_endpoints)
        if self._after_first_sync is not None:
            cleanup, self._after_first_sync = self._after_first_sync, None
            try:
                cleanup()
            except Exception as err:  # leftovers of another mode must not stop this one
                log.warning("cannot remove IPVS mode's leftovers: %s", err)
