"""The /metrics scrape of each mode against upstream's table (tests/upstream_metrics.py).

Every metric the agent records is recorded once, the metrics page is scraped as Prometheus
would scrape it, and the families (names, types, label names, buckets) must be the table's
for that mode: nothing missing, nothing of upstream's name space added. pykubeproxy's own
metrics carry the ``pykubeproxy_`` prefix.
"""

from __future__ import annotations

from dataclasses import dataclass

import pytest
from prometheus_client.parser import text_string_to_metric_families
from upstream_metrics import UPSTREAM_METRICS, expected

from pykubeproxy.health import ProxyHealth
from pykubeproxy.iptables.ruleset import TableState
from pykubeproxy.metrics import CountingApplier, Metrics


@dataclass(frozen=True)
class Scraped:
    type: str
    labels: tuple[str, ...]
    buckets: tuple[float, ...] | None


def scrape(text: str) -> dict[str, Scraped]:
    """The exposed families by exposed name (counters with _total, as Go's client names them)."""
    families = {}
    for family in text_string_to_metric_families(text):
        name = family.name + ("_total" if family.type == "counter" else "")
        labels = sorted({k for s in family.samples for k in s.labels} - {"le"})
        buckets = sorted(
            float(s.labels["le"]) for s in family.samples
            if s.name.endswith("_bucket") and s.labels["le"] != "+Inf"
        )  # fmt: skip
        families[name] = Scraped(
            family.type, tuple(labels), tuple(buckets) if family.type == "histogram" else None
        )
    return families


class Applier:
    def apply(self, tables: list[TableState]) -> None:
        pass


def record_everything(metrics: Metrics) -> None:
    """Each metric the proxier, backends, health server and reconciler record, once."""
    metrics.sync_duration.observe(0.01)
    metrics.full_sync_duration.observe(0.01)
    metrics.partial_sync_duration.observe(0.01)
    metrics.last_sync.set(1.0)
    metrics.last_queued.set(1.0)
    metrics.network_programming.observe(1.0)
    metrics.service_changes.inc()
    metrics.service_changes_pending.set(0)
    metrics.endpoint_changes.inc()
    metrics.endpoint_changes_pending.set(0)
    metrics.restore_failures.inc()
    metrics.partial_restore_failures.inc()
    metrics.count_rules({"filter": 3, "nat": 10})
    nat = TableState("nat", chains={"KUBE-SERVICES": [("-j", "RETURN")]}, kept_rules=4)
    CountingApplier(Applier(), metrics).apply([nat, TableState("filter"), TableState("mangle")])
    metrics.set_no_local_endpoints({"internal": 0, "external": 1})
    metrics.reconciled(deleted=2, seconds=0.003, table_read=True)
    metrics.ipvs_virtual_servers.set(1)
    metrics.ipvs_real_servers.set(1)
    health = ProxyHealth(60.0, metrics)
    health.healthz()
    health.livez()


@pytest.mark.parametrize("mode", ["iptables", "ipvs"])
def test_scrape_matches_upstreams_table(mode: str) -> None:
    metrics = Metrics(mode=mode)
    record_everything(metrics)
    families = scrape(metrics.exposition()[2].decode())
    upstream = {name: f for name, f in families.items() if name.startswith("kubeproxy_")}
    table = expected(mode)
    assert sorted(upstream) == sorted(table)
    for name, metric in table.items():
        assert upstream[name] == Scraped(metric.type, metric.labels, metric.buckets), name
    own = {name for name in families if name.startswith("pykubeproxy_")}
    assert own == ({"pykubeproxy_ipvs_virtual_servers", "pykubeproxy_ipvs_real_servers"}
                   if mode == "ipvs" else set())  # fmt: skip
    prefixes = ("kubeproxy_", "pykubeproxy_", "process_", "python_")
    assert all(name.startswith(prefixes) for name in families)


def test_rules_written_count_only_the_written_chains() -> None:
    metrics = Metrics()
    nat = TableState("nat", chains={"A": [("-j", "B"), ("-j", "C")]}, kept=set("K"), kept_rules=7)
    CountingApplier(Applier(), metrics).apply([nat])
    metrics.count_rules({"nat": nat.rule_count()})
    sample = metrics.registry.get_sample_value
    labels = {"ip_family": "IPv4", "table": "nat"}
    assert sample("kubeproxy_sync_proxy_rules_iptables_last", labels) == 2
    assert sample("kubeproxy_sync_proxy_rules_iptables_total", labels) == 9


def test_an_unread_conntrack_table_records_nothing() -> None:
    metrics = Metrics()
    metrics.reconciled(deleted=0, seconds=0.5, table_read=False)
    sample = metrics.registry.get_sample_value
    v4 = {"ip_family": "IPv4"}
    assert sample("kubeproxy_conntrack_reconciler_sync_duration_seconds_count", v4) is None
    assert sample("kubeproxy_conntrack_reconciler_deleted_entries_total", v4) is None


def test_table_is_consistent() -> None:
    names = [m.name for m in UPSTREAM_METRICS]
    assert len(names) == len(set(names))
    for metric in UPSTREAM_METRICS:
        assert (metric.type == "histogram") == (metric.buckets is not None), metric.name
        assert metric.type != "counter" or metric.name.endswith("_total"), metric.name
        assert list(metric.labels) == sorted(metric.labels), metric.name
