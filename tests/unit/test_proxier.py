"""The proxier's sync decisions, with a recording applier and a fake clock."""

from __future__ import annotations

import gc
from typing import Any

import objects as o
import pytest

from pykubeproxy.backend import KeptChainMissing
from pykubeproxy.health import ProxyHealth
from pykubeproxy.iptables.backend import IptablesBackend
from pykubeproxy.iptables.render import RenderConfig, Renderer, service_chain
from pykubeproxy.iptables.ruleset import TableState
from pykubeproxy.metrics import Metrics
from pykubeproxy.model import NamespacedName, Protocol, ServicePortName
from pykubeproxy.proxier import HOURLY, Proxier


class Applier:
    def __init__(self) -> None:
        self.calls: list[list[TableState]] = []
        self.fail_with: list[Exception] = []

    def apply(self, tables: list[TableState]) -> None:
        self.calls.append(tables)
        if self.fail_with:
            raise self.fail_with.pop(0)


class Runner:
    def __init__(self) -> None:
        self.runs = 0
        self.retries: list[float] = []

    def run(self) -> None:
        self.runs += 1

    def retry_after(self, delay: float) -> None:
        self.retries.append(delay)


class Clock:
    now = 0.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def setup() -> tuple[Proxier, Applier, Runner, Clock]:
    applier, runner, clock, metrics = Applier(), Runner(), Clock(), Metrics()
    proxier = Proxier(
        IptablesBackend(Renderer(RenderConfig()), applier, metrics),
        metrics,
        ProxyHealth(60, metrics),
        sync_period=30,
        min_sync_period=1,
        clock=clock,
        conntrack=lambda services, endpoints: None,
    )
    proxier.runner = runner
    return proxier, applier, runner, clock


def add_web(proxier: Proxier, name: str = "web", ip: str = "10.96.0.10") -> None:
    proxier.on_service(f"ns/{name}", o.service("ns", name, ip, [o.port("http", 80)]))
    proxier.on_endpoint_slice(
        f"ns/{name}-abcde", o.endpoint_slice("ns", name, ["10.244.0.2"], [o.port("http", 8080)])
    )


def chain(service: str) -> str:
    return service_chain(ServicePortName(NamespacedName("ns", service), "http", Protocol.TCP))


def nat(call: list[TableState]) -> TableState:
    return next(t for t in call if t.name == "nat")


V4 = {"ip_family": "IPv4"}  # the label of kube-proxy's per-family metrics


def sample(proxier: Proxier, name: str, labels: dict[str, str] | None = None) -> Any:
    return proxier.metrics.registry.get_sample_value(name, labels or {})


def test_no_sync_until_services_and_slices_are_listed(setup: Any) -> None:
    proxier, applier, runner, _ = setup
    add_web(proxier)
    proxier.sync()
    assert applier.calls == [] and runner.runs == 2
    proxier.on_synced("Service")
    proxier.sync()
    assert applier.calls == []
    proxier.on_synced("EndpointSlice")
    proxier.sync()
    assert len(applier.calls) == 1 and not nat(applier.calls[0]).kept


def two_services_synced(proxier: Proxier) -> None:
    """Both kinds listed, web and api present, one full sync done."""
    proxier.on_synced("Service")
    proxier.on_synced("EndpointSlice")
    add_web(proxier, "web")
    add_web(proxier, "api", "10.96.0.11")
    proxier.sync()


def test_partial_then_periodic_full(setup: Any) -> None:
    proxier, applier, _, clock = setup
    two_services_synced(proxier)
    clock.now = 5
    proxier.on_endpoint_slice(
        "ns/web-abcde", o.endpoint_slice("ns", "web", ["10.244.0.3"], [o.port("http", 8080)])
    )
    proxier.sync()
    partial = nat(applier.calls[-1])
    assert chain("api") in partial.kept and chain("web") in partial.chains
    assert sample(proxier, "kubeproxy_sync_partial_proxy_rules_duration_seconds_count", V4) == 1
    clock.now = 31
    proxier.sync()
    assert not nat(applier.calls[-1]).kept
    assert sample(proxier, "kubeproxy_sync_full_proxy_rules_duration_seconds_count", V4) == 2
    assert sample(proxier, "kubeproxy_sync_proxy_rules_iptables_total", {**V4, "table": "nat"}) > 0
    assert sample(proxier, "kubeproxy_sync_proxy_rules_endpoint_changes_total") == 3


def test_iptables_mode_rewrites_everything_hourly_and_only_changes_between(
    setup: Any,
) -> None:
    proxier, applier, _, clock = setup
    proxier.full_sync_period = HOURLY
    two_services_synced(proxier)
    clock.now = 31  # a periodic sync with nothing changed keeps every Service's chains
    proxier.sync()
    assert {chain("web"), chain("api")} <= nat(applier.calls[-1]).kept
    clock.now = HOURLY + 1
    proxier.sync()
    assert not nat(applier.calls[-1]).kept


def test_missing_kept_chain_falls_back_to_full(setup: Any) -> None:
    proxier, applier, _, clock = setup
    two_services_synced(proxier)
    clock.now = 5
    add_web(proxier, "db", "10.96.0.12")
    applier.fail_with = [KeptChainMissing("flushed")]
    proxier.sync()
    assert nat(applier.calls[-2]).kept and not nat(applier.calls[-1]).kept
    failures = "kubeproxy_sync_proxy_rules_iptables_partial_restore_failures_total"
    assert sample(proxier, failures, V4) == 1


def test_failed_sync_retries_with_backoff_and_a_full_sync(setup: Any) -> None:
    proxier, applier, runner, clock = setup
    proxier.on_synced("Service")
    proxier.on_synced("EndpointSlice")
    add_web(proxier)
    applier.fail_with = [RuntimeError("commit refused"), RuntimeError("commit refused")]
    proxier.sync()
    proxier.sync()
    assert runner.retries == [2, 4]
    assert sample(proxier, "kubeproxy_sync_proxy_rules_iptables_restore_failures_total", V4) == 2
    clock.now = 2
    proxier.sync()
    assert not nat(applier.calls[-1]).kept
    assert proxier.health.livez()[0] == 200


def test_node_deletion_makes_healthz_fail(setup: Any) -> None:
    proxier, _, _, _ = setup
    proxier.on_node(
        "/n1", {"metadata": {"name": "n1", "deletionTimestamp": "2026-11-24T00:00:00Z"}}
    )
    assert proxier.health.healthz()[0] == 503
    proxier.on_node("/n1", {"metadata": {"name": "n1"}})
    assert proxier.health.healthz()[0] == 200


def test_a_sync_runs_with_the_cyclic_collector_paused(
    setup: tuple[Proxier, Applier, Runner, Clock], monkeypatch: pytest.MonkeyPatch
) -> None:
    proxier, applier, _, _ = setup
    add_web(proxier)
    proxier.on_synced("Service")
    proxier.on_synced("EndpointSlice")
    seen: list[bool] = []
    record = applier.apply

    def apply(tables: list[TableState]) -> None:
        seen.append(gc.isenabled())
        record(tables)

    monkeypatch.setattr(applier, "apply", apply)
    gc.enable()
    proxier.sync()
    assert seen == [False]
    assert gc.isenabled()
