"""kube-proxy's Prometheus metrics: upstream's names, types, labels and buckets.

The reference is pkg/proxy/metrics/metrics.go of kube-proxy v1.34 (`RegisterMetrics`): the
metrics every mode has, plus the iptables ones in iptables mode and only the restore-failure
counter in ipvs mode. Series of per-family metrics carry ``ip_family`` (this agent programs
IPv4) and appear when first recorded, as a Go vector's ``WithLabelValues`` makes them.
Metrics pykubeproxy adds of its own carry a ``pykubeproxy_`` prefix, never upstream's.

Metrics live in a registry per agent (not the global one) so tests can build several agents
in one process; the process collector adds the ``process_*`` series a Go binary exports.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Protocol

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    PlatformCollector,
    ProcessCollector,
    disable_created_metrics,
    generate_latest,
)

from pykubeproxy.iptables.ruleset import TableState
from pykubeproxy.web import Response, Routes

disable_created_metrics()  # type: ignore[no-untyped-call]

IP_FAMILY = "IPv4"
# Help texts as component-base prints them for alpha metrics.
ALPHA = "[ALPHA] "


def _exponential(start: float, factor: float, count: int) -> list[float]:
    return [start * factor**i for i in range(count)]


def _linear(start: float, width: float, count: int) -> list[float]:
    return [start + width * i for i in range(count)]


SYNC_BUCKETS = _exponential(0.001, 2, 15)
# component-base's MergeBuckets starts its result with a 0 bucket.
NETWORK_PROGRAMMING_BUCKETS = [
    0.0,
    *_linear(0.25, 0.25, 2),
    *_linear(1, 1, 59),
    *_linear(60, 5, 12),
    *_linear(120, 30, 7),
]


class FamilyHistogram:
    """A histogram vector used with this agent's IP family only."""

    def __init__(self, vector: Histogram, family: str) -> None:
        self.vector, self.family = vector, family

    def observe(self, amount: float) -> None:
        self.vector.labels(self.family).observe(amount)


class FamilyCounter:
    def __init__(self, vector: Counter, family: str) -> None:
        self.vector, self.family = vector, family

    def inc(self, amount: float = 1) -> None:
        self.vector.labels(self.family).inc(amount)


class FamilyGauge:
    def __init__(self, vector: Gauge, family: str) -> None:
        self.vector, self.family = vector, family

    def set(self, value: float) -> None:
        self.vector.labels(self.family).set(value)


class Metrics:
    """Every kube-proxy metric of one proxy mode (`mode`: iptables or ipvs)."""

    def __init__(
        self,
        registry: CollectorRegistry | None = None,
        mode: str = "iptables",
        ip_family: str = IP_FAMILY,
    ) -> None:
        self.registry = registry or CollectorRegistry()
        self.mode = mode
        ProcessCollector(registry=self.registry)
        PlatformCollector(registry=self.registry)
        reg = self.registry
        # Registered only in the mode upstream registers them in; elsewhere they record
        # into the void, so the proxier and backends need not know the mode.
        iptables_reg = reg if mode == "iptables" else None
        restore_reg = reg if mode in ("iptables", "ipvs") else None
        ipvs_reg = reg if mode == "ipvs" else None
        family = ["ip_family"]

        def histogram(name: str, text: str, buckets: list[float], into: CollectorRegistry | None
                      ) -> FamilyHistogram:  # fmt: skip
            vector = Histogram(name, ALPHA + text, family, buckets=buckets, registry=into)
            return FamilyHistogram(vector, ip_family)

        def gauge(name: str, text: str, into: CollectorRegistry | None = reg) -> FamilyGauge:
            return FamilyGauge(Gauge(name, ALPHA + text, family, registry=into), ip_family)

        def counter(name: str, text: str, into: CollectorRegistry | None) -> FamilyCounter:
            return FamilyCounter(Counter(name, ALPHA + text, family, registry=into), ip_family)

        self.ip_family = ip_family
        self.sync_duration = histogram(
            "kubeproxy_sync_proxy_rules_duration_seconds",
            "SyncProxyRules latency in seconds",
            SYNC_BUCKETS,
            reg,
        )
        self.full_sync_duration = histogram(
            "kubeproxy_sync_full_proxy_rules_duration_seconds",
            "SyncProxyRules latency in seconds for full resyncs",
            SYNC_BUCKETS,
            iptables_reg,
        )
        self.partial_sync_duration = histogram(
            "kubeproxy_sync_partial_proxy_rules_duration_seconds",
            "SyncProxyRules latency in seconds for partial resyncs",
            SYNC_BUCKETS,
            iptables_reg,
        )
        self.last_sync = gauge(
            "kubeproxy_sync_proxy_rules_last_timestamp_seconds",
            "The last time proxy rules were successfully synced",
        )
        self.last_queued = gauge(
            "kubeproxy_sync_proxy_rules_last_queued_timestamp_seconds",
            "The last time a sync of proxy rules was queued",
        )
        self.network_programming = histogram(
            "kubeproxy_network_programming_duration_seconds",
            "In Cluster Network Programming Latency in seconds",
            NETWORK_PROGRAMMING_BUCKETS,
            reg,
        )
        self.service_changes = Counter(
            "kubeproxy_sync_proxy_rules_service_changes",
            ALPHA + "Cumulative proxy rules Service changes",
            registry=reg,
        )
        self.service_changes_pending = Gauge(
            "kubeproxy_sync_proxy_rules_service_changes_pending",
            ALPHA + "Pending proxy rules Service changes",
            registry=reg,
        )
        self.endpoint_changes = Counter(
            "kubeproxy_sync_proxy_rules_endpoint_changes",
            ALPHA + "Cumulative proxy rules Endpoint changes",
            registry=reg,
        )
        self.endpoint_changes_pending = Gauge(
            "kubeproxy_sync_proxy_rules_endpoint_changes_pending",
            ALPHA + "Pending proxy rules Endpoint changes",
            registry=reg,
        )
        self.rules_total = Gauge(
            "kubeproxy_sync_proxy_rules_iptables_total",
            ALPHA + "Total number of iptables rules owned by kube-proxy",
            ["ip_family", "table"],
            registry=iptables_reg,
        )
        self.rules_last = Gauge(
            "kubeproxy_sync_proxy_rules_iptables_last",
            ALPHA + "Number of iptables rules written by kube-proxy in last sync",
            ["ip_family", "table"],
            registry=iptables_reg,
        )
        self.restore_failures = counter(
            "kubeproxy_sync_proxy_rules_iptables_restore_failures",
            "Cumulative proxy iptables restore failures",
            restore_reg,
        )
        self.partial_restore_failures = counter(
            "kubeproxy_sync_proxy_rules_iptables_partial_restore_failures",
            "Cumulative proxy iptables partial restore failures",
            iptables_reg,
        )
        self.no_local_endpoints = Gauge(
            "kubeproxy_sync_proxy_rules_no_local_endpoints_total",
            ALPHA + "Number of services with a Local traffic policy and no endpoints",
            ["ip_family", "traffic_policy"],
            registry=reg,
        )
        self.conntrack_reconcile_duration = histogram(
            "kubeproxy_conntrack_reconciler_sync_duration_seconds",
            "ReconcileConntrackFlowsLatency latency in seconds",
            SYNC_BUCKETS,
            reg,
        )
        self.conntrack_deleted = counter(
            "kubeproxy_conntrack_reconciler_deleted_entries",
            "Cumulative conntrack flows deleted by conntrack reconciler",
            reg,
        )
        self.healthz = Counter(
            "kubeproxy_proxy_healthz",
            ALPHA + "Cumulative proxy healthz HTTP status",
            ["code"],
            registry=reg,
        )
        self.livez = Counter(
            "kubeproxy_proxy_livez",
            ALPHA + "Cumulative proxy livez HTTP status",
            ["code"],
            registry=reg,
        )
        # pykubeproxy's own, not upstream's (upstream has no IPVS gauges).
        self.ipvs_virtual_servers = Gauge(
            "pykubeproxy_ipvs_virtual_servers",
            "IPVS virtual servers programmed by the agent (ipvs mode)",
            registry=ipvs_reg,
        )
        self.ipvs_real_servers = Gauge(
            "pykubeproxy_ipvs_real_servers",
            "IPVS real servers programmed by the agent, draining ones included (ipvs mode)",
            registry=ipvs_reg,
        )

    def count_rules(self, per_table: Mapping[str, int]) -> None:
        """kubeproxy_sync_proxy_rules_iptables_total, per table, after a sync."""
        for table, count in per_table.items():
            self.rules_total.labels(self.ip_family, table).set(count)

    def count_written(self, per_table: Mapping[str, int]) -> None:
        """kubeproxy_sync_proxy_rules_iptables_last: rules written by the last sync."""
        for table, count in per_table.items():
            self.rules_last.labels(self.ip_family, table).set(count)

    def set_no_local_endpoints(self, per_policy: Mapping[str, int]) -> None:
        """Services with a Local traffic policy and no endpoint on this node, per policy."""
        for policy, count in per_policy.items():
            self.no_local_endpoints.labels(self.ip_family, policy).set(count)

    def reconciled(self, deleted: int, seconds: float, table_read: bool) -> None:
        """One conntrack reconcile. An unread table records nothing, not even a 0 deleted
        (upstream's CleanStaleEntries returns before both when listing the flows fails)."""
        if not table_read:
            return
        self.conntrack_reconcile_duration.observe(seconds)
        self.conntrack_deleted.inc(deleted)

    def exposition(self) -> Response:
        return 200, CONTENT_TYPE_LATEST, generate_latest(self.registry)

    def routes(self) -> Routes:
        """What upstream's metrics server answers besides /proxyMode and /configz."""
        return {"/metrics": self.exposition, "/healthz": lambda: (200, "text/plain", b"ok")}


class Applier(Protocol):
    def apply(self, tables: list[TableState]) -> None: ...


# Upstream counts the rules of these tables in kubeproxy_sync_proxy_rules_iptables_last.
COUNTED_TABLES = ("filter", "nat")


class CountingApplier:
    """An iptables applier that records how many rules each applied sync wrote.

    Upstream's count is the number of rules in the restore input: the rules of the chains
    written in this sync, not those of the chains a partial sync keeps.
    """

    def __init__(self, applier: Applier, metrics: Metrics) -> None:
        self.applier, self.metrics = applier, metrics

    def apply(self, tables: list[TableState]) -> None:
        self.applier.apply(tables)
        self.metrics.count_written(written_rules(tables))


def written_rules(tables: Iterable[TableState]) -> dict[str, int]:
    return {t.name: t.rule_count() - t.kept_rules for t in tables if t.name in COUNTED_TABLES}
