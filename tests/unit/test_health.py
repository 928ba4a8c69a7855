"""kube-proxy's healthz/livez semantics and JSON (proxy_health.go, v1.34), with a fake clock."""

from __future__ import annotations

import json

from pykubeproxy.health import ProxyHealth, go_json_time
from pykubeproxy.metrics import Metrics


class Clock:
    def __init__(self) -> None:
        self.now = 1_700_000_000.25

    def __call__(self) -> float:
        return self.now


def make() -> tuple[ProxyHealth, Clock, Metrics]:
    clock, metrics = Clock(), Metrics()
    return ProxyHealth(timeout=60.0, metrics=metrics, clock=clock), clock, metrics


def test_healthy_until_a_queued_update_is_older_than_the_timeout() -> None:
    health, clock, metrics = make()
    assert health.healthz()[0] == 200
    health.queued_update()
    clock.now += 59
    assert health.healthz()[0] == 200
    clock.now += 1
    status, content_type, _ = health.healthz()
    assert (status, content_type) == (503, "application/json")
    assert health.livez()[0] == 503
    health.updated()
    assert health.livez()[0] == 200
    samples = metrics.registry.get_sample_value
    assert samples("kubeproxy_proxy_healthz_total", {"code": "503"}) == 1
    assert samples("kubeproxy_proxy_healthz_total", {"code": "200"}) == 2
    assert samples("kubeproxy_proxy_livez_total", {"code": "503"}) == 1


def test_json_is_upstreams_per_family_form() -> None:
    """Keys in upstream's ProxyHealth order; lastUpdated is now while healthy."""
    health, clock, _ = make()
    started = clock.now
    clock.now += 10
    doc = json.loads(health.healthz()[2])
    assert doc == {
        "lastUpdated": "2023-11-14T22:13:30.25Z",
        "currentTime": "2023-11-14T22:13:30.25Z",
        "nodeEligible": True,
        "healthy": True,
        "status": {"IPv4": {"lastUpdated": go_json_time(started), "healthy": True}},
    }
    livez = json.loads(health.livez()[2])
    assert list(livez) == ["lastUpdated", "currentTime", "healthy", "status"]
    assert b" " not in health.livez()[2]  # Go's encoder writes no spaces


def test_stale_family_reports_its_last_update() -> None:
    health, clock, _ = make()
    health.updated()
    updated = clock.now
    health.queued_update()
    clock.now += 120
    doc = json.loads(health.livez()[2])
    assert doc["healthy"] is False and doc["lastUpdated"] == go_json_time(updated)
    assert doc["status"]["IPv4"] == {"lastUpdated": go_json_time(updated), "healthy": False}


def test_go_json_time() -> None:
    assert go_json_time(0) == "1970-01-01T00:00:00Z"
    assert go_json_time(1.5) == "1970-01-01T00:00:01.5Z"
    assert go_json_time(1_700_000_000.123456) == "2023-11-14T22:13:20.123456Z"


def test_node_being_deleted_is_not_eligible() -> None:
    health, _, _ = make()
    health.node_eligible = False
    status, _, body = health.healthz()
    doc = json.loads(body)
    assert status == 503 and doc["nodeEligible"] is False and doc["healthy"] is True
    assert health.livez()[0] == 200
