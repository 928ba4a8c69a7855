"""kube-proxy's Prometheus metrics, same names and buckets, on prometheus-client.

Metrics live in a registry per agent (not the global one) so tests can build
several agents in one process; the process collector adds the usual
``process_*`` series that kube-proxy's Go runtime would export.
"""

from __future__ import annotations

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

from pykubeproxy.web import Response, Routes

disable_created_metrics()  # type: ignore[no-untyped-call]


def _exponential(start: float, factor: float, count: int) -> list[float]:
    return [start * factor**i for i in range(count)]


def _linear(start: float, width: float, count: int) -> list[float]:
    return [start + width * i for i in range(count)]


SYNC_BUCKETS = _exponential(0.001, 2, 15)
NETWORK_PROGRAMMING_BUCKETS = (
    _linear(0.25, 0.25, 2) + _linear(1, 1, 59) + _linear(60, 5, 12) + _linear(120, 30, 7)
)


class Metrics:
    """Every kube-proxy metric the agent exports."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        ProcessCollector(registry=self.registry)
        PlatformCollector(registry=self.registry)
        reg = self.registry
        self.sync_duration = Histogram(
            "kubeproxy_sync_proxy_rules_duration_seconds",
            "SyncProxyRules latency in seconds",
            buckets=SYNC_BUCKETS,
            registry=reg,
        )
        self.full_sync_duration = Histogram(
            "kubeproxy_sync_full_proxy_rules_duration_seconds",
            "SyncProxyRules latency in seconds for full resyncs",
            buckets=SYNC_BUCKETS,
            registry=reg,
        )
        self.partial_sync_duration = Histogram(
            "kubeproxy_sync_partial_proxy_rules_duration_seconds",
            "SyncProxyRules latency in seconds for partial resyncs",
            buckets=SYNC_BUCKETS,
            registry=reg,
        )
        self.last_sync = Gauge(
            "kubeproxy_sync_proxy_rules_last_timestamp_seconds",
            "The last time proxy rules were successfully synced",
            registry=reg,
        )
        self.last_queued = Gauge(
            "kubeproxy_sync_proxy_rules_last_queued_timestamp_seconds",
            "The last time a sync of proxy rules was queued",
            registry=reg,
        )
        self.network_programming = Histogram(
            "kubeproxy_network_programming_duration_seconds",
            "In Cluster Network Programming Latency in seconds",
            buckets=NETWORK_PROGRAMMING_BUCKETS,
            registry=reg,
        )
        self.service_changes = Counter(
            "kubeproxy_sync_proxy_rules_service_changes",
            "Cumulative proxy rules Service changes",
            registry=reg,
        )
        self.service_changes_pending = Gauge(
            "kubeproxy_sync_proxy_rules_service_changes_pending",
            "Pending proxy rules Service changes",
            registry=reg,
        )
        self.endpoint_changes = Counter(
            "kubeproxy_sync_proxy_rules_endpoint_changes",
            "Cumulative proxy rules Endpoint changes",
            registry=reg,
        )
        self.endpoint_changes_pending = Gauge(
            "kubeproxy_sync_proxy_rules_endpoint_changes_pending",
            "Pending proxy rules Endpoint changes",
            registry=reg,
        )
        self.rules_total = Gauge(
            "kubeproxy_sync_proxy_rules_iptables_total",
            "Total number of iptables rules owned by kube-proxy",
            ["table"],
            registry=reg,
        )
        self.restore_failures = Counter(
            "kubeproxy_sync_proxy_rules_iptables_restore_failures",
            "Cumulative proxy iptables restore failures",
            registry=reg,
        )
        self.partial_restore_failures = Counter(
            "kubeproxy_sync_proxy_rules_iptables_partial_restore_failures",
            "Cumulative proxy iptables partial restore failures",
            registry=reg,
        )
        self.no_local_endpoints = Gauge(
            "kubeproxy_sync_proxy_rules_no_local_endpoints_total",
            "Number of services with a Local traffic policy and no endpoints",
            ["traffic_policy"],
            registry=reg,
        )
        self.ipvs_virtual_servers = Gauge(
            "kubeproxy_ipvs_virtual_servers",
            "IPVS virtual servers programmed by the agent (ipvs mode)",
            registry=reg,
        )
        self.ipvs_real_servers = Gauge(
            "kubeproxy_ipvs_real_servers",
            "IPVS real servers programmed by the agent, draining ones included (ipvs mode)",
            registry=reg,
        )
        self.healthz = Counter(
            "kubeproxy_healthz", "Cumulative proxy healthz HTTP status", ["code"], registry=reg
        )
        self.livez = Counter(
            "kubeproxy_livez", "Cumulative proxy livez HTTP status", ["code"], registry=reg
        )

    def count_rules(self, per_table: dict[str, int]) -> None:
        """kubeproxy_sync_proxy_rules_iptables_total, per table, after a sync."""
        for table, count in per_table.items():
            self.rules_total.labels(table).set(count)

    def set_no_local_endpoints(self, per_policy: dict[str, int]) -> None:
        """Services with a Local traffic policy and no endpoint on this node, per policy."""
        for policy, count in per_policy.items():
            self.no_local_endpoints.labels(policy).set(count)

    def exposition(self) -> Response:
        return 200, CONTENT_TYPE_LATEST, generate_latest(self.registry)

    def routes(self) -> Routes:
        return {"/metrics": self.exposition, "/healthz": lambda: (200, "text/plain", b"ok")}
