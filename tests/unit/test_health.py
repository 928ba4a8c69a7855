"""kube-proxy's healthz/livez semantics and JSON, with an injected clock."""

from __future__ import annotations

import json
import re

from pykubeproxy.health import ProxyHealth
from pykubeproxy.metrics import Metrics

GO_TIME = re.compile(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d(\.\d+)? \+0000 UTC m=\+\d+\.\d{9}$")


class Clock:
    def __init__(self) -> None:
        self.now = 1_700_000_000.0

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
    assert metrics.registry.get_sample_value("kubeproxy_healthz_total", {"code": "503"}) == 1


def test_json_matches_kube_proxy() -> None:
    health, _, _ = make()
    doc = json.loads(health.healthz()[2])
    assert list(doc) == ["lastUpdated", "currentTime", "nodeEligible"]
    assert GO_TIME.match(doc["lastUpdated"]) and GO_TIME.match(doc["currentTime"])
    assert list(json.loads(health.livez()[2])) == ["lastUpdated", "currentTime"]


def test_node_being_deleted_is_not_eligible() -> None:
    health, _, _ = make()
    health.node_eligible = False
    status, _, body = health.healthz()
    assert status == 503 and json.loads(body)["nodeEligible"] is False
    assert health.livez()[0] == 200
