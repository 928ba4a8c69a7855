"""The iptables proxy mode: render kube-proxy's tables, hand them to the applier."""

from __future__ import annotations

from typing import Protocol

from pykubeproxy.iptables.render import Renderer
from pykubeproxy.iptables.ruleset import CANARY, TableState
from pykubeproxy.metrics import Metrics
from pykubeproxy.model import EndpointsMap, ServicePortMap, ServicePortName


class Applier(Protocol):
    def apply(self, tables: list[TableState]) -> None: ...


class IptablesBackend:
    """kube-proxy's iptables mode, as a `Backend` of the proxier."""

    def __init__(self, renderer: Renderer, applier: Applier, metrics: Metrics) -> None:
        self.renderer = renderer
        self.applier = applier
        self.metrics = metrics

    def sync(
        self,
        services: ServicePortMap,
        endpoints: EndpointsMap,
        rewrite: set[ServicePortName] | None,
    ) -> None:
        nat, filt = self.renderer.render(services, endpoints, rewrite)
        mangle = TableState("mangle", chains={CANARY: []})  # kube-proxy's canary lives here too
        self.applier.apply([nat, filt, mangle])
        for table in (nat, filt):
            self.metrics.rules_total.labels(table.name).set(table.rule_count())
