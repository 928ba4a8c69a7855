"""kube-proxy v1.34's metrics, in one table: name, type, labels, buckets, the modes that have them.

From pkg/proxy/metrics/metrics.go (the definitions and ``RegisterMetrics(mode)``) and the
v1.34 metrics reference: per-family metrics carry ``ip_family``; histogram buckets are
``ExponentialBuckets(0.001, 2, 15)`` for syncs and the conntrack reconciler, and for network
programming component-base's ``MergeBuckets`` (which starts with 0) of 0.25s steps to 0.5s,
1s steps to 59s, 5s steps to 115s and 30s steps to 5 minutes. Label names are listed sorted,
as Go's client prints them. Tests compare a scrape of /metrics with this table.
"""

from __future__ import annotations

from dataclasses import dataclass

ALL_MODES = frozenset({"iptables", "ipvs", "nftables"})
IPTABLES = frozenset({"iptables"})


def _exponential(start: float, factor: float, count: int) -> tuple[float, ...]:
    return tuple(start * factor**i for i in range(count))


SYNC_BUCKETS = _exponential(0.001, 2, 15)
NETWORK_PROGRAMMING_BUCKETS = (
    0.0,
    0.25,
    0.5,
    *range(1, 60),
    *range(60, 120, 5),
    *range(120, 301, 30),
)


@dataclass(frozen=True)
class Metric:
    name: str  # as exposed (counters with _total)
    type: str
    labels: tuple[str, ...] = ()
    buckets: tuple[float, ...] | None = None
    modes: frozenset[str] = ALL_MODES


FAMILY = ("ip_family",)

UPSTREAM_METRICS = (
    Metric("kubeproxy_sync_proxy_rules_duration_seconds", "histogram", FAMILY, SYNC_BUCKETS),
    Metric("kubeproxy_sync_full_proxy_rules_duration_seconds", "histogram", FAMILY,
           SYNC_BUCKETS, IPTABLES),
    Metric("kubeproxy_sync_partial_proxy_rules_duration_seconds", "histogram", FAMILY,
           SYNC_BUCKETS, IPTABLES),
    Metric("kubeproxy_sync_proxy_rules_last_timestamp_seconds", "gauge", FAMILY),
    Metric("kubeproxy_sync_proxy_rules_last_queued_timestamp_seconds", "gauge", FAMILY),
    Metric("kubeproxy_network_programming_duration_seconds", "histogram", FAMILY,
           NETWORK_PROGRAMMING_BUCKETS),
    Metric("kubeproxy_sync_proxy_rules_endpoint_changes_pending", "gauge"),
    Metric("kubeproxy_sync_proxy_rules_endpoint_changes_total", "counter"),
    Metric("kubeproxy_sync_proxy_rules_service_changes_pending", "gauge"),
    Metric("kubeproxy_sync_proxy_rules_service_changes_total", "counter"),
    Metric("kubeproxy_sync_proxy_rules_iptables_restore_failures_total", "counter", FAMILY,
           modes=frozenset({"iptables", "ipvs"})),
    Metric("kubeproxy_sync_proxy_rules_iptables_partial_restore_failures_total", "counter",
           FAMILY, modes=IPTABLES),
    Metric("kubeproxy_sync_proxy_rules_iptables_total", "gauge", ("ip_family", "table"),
           modes=IPTABLES),
    Metric("kubeproxy_sync_proxy_rules_iptables_last", "gauge", ("ip_family", "table"),
           modes=IPTABLES),
    Metric("kubeproxy_sync_proxy_rules_nftables_sync_failures_total", "counter", FAMILY,
           modes=frozenset({"nftables"})),
    Metric("kubeproxy_sync_proxy_rules_nftables_cleanup_failures_total", "counter", FAMILY,
           modes=frozenset({"nftables"})),
    Metric("kubeproxy_sync_proxy_rules_no_local_endpoints_total", "gauge",
           ("ip_family", "traffic_policy")),
    Metric("kubeproxy_proxy_healthz_total", "counter", ("code",)),
    Metric("kubeproxy_proxy_livez_total", "counter", ("code",)),
    Metric("kubeproxy_conntrack_reconciler_sync_duration_seconds", "histogram", FAMILY,
           SYNC_BUCKETS),
    Metric("kubeproxy_conntrack_reconciler_deleted_entries_total", "counter", FAMILY),
    # Custom collectors reading nfacct counters of upstream's iptables rules.
    Metric("kubeproxy_iptables_ct_state_invalid_dropped_packets_total", "counter",
           modes=IPTABLES),
    Metric("kubeproxy_iptables_localhost_nodeports_accepted_packets_total", "counter",
           modes=IPTABLES),
)  # fmt: skip

# Upstream metrics pykubeproxy does not export, and why (docs/decisions.md says the same).
NOT_EXPORTED = {
    "kubeproxy_iptables_ct_state_invalid_dropped_packets_total": "no nfacct counters",
    "kubeproxy_iptables_localhost_nodeports_accepted_packets_total": "no nfacct counters",
}


def expected(mode: str) -> dict[str, Metric]:
    """The metrics a pykubeproxy agent in `mode` exports, by name."""
    return {
        m.name: m for m in UPSTREAM_METRICS if mode in m.modes and m.name not in NOT_EXPORTED
    }
