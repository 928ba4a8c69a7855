"""Change trackers: pending changes per Service, merged slices, cancelling updates."""

from __future__ import annotations

from datetime import UTC, datetime

import objects as o

from pykubeproxy.changes import EndpointsChangeTracker, ServiceChangeTracker
from pykubeproxy.model import NamespacedName

WEB = NamespacedName("ns", "web")


def test_service_change_and_revert_cancel_out() -> None:
    tracker = ServiceChangeTracker()
    v1 = o.service("ns", "web", "10.96.0.10", [o.port("http", 80)])
    assert tracker.update(WEB, v1)
    assert tracker.apply() == {WEB}
    v2 = o.service("ns", "web", "10.96.0.10", [o.port("http", 81)])
    assert tracker.update(WEB, v2)
    assert not tracker.update(WEB, v1)  # back to what is applied: nothing pending
    assert tracker.apply() == set()
    assert tracker.update(WEB, None) and tracker.apply() == {WEB}
    assert tracker.service_map == {}


def test_slices_of_one_service_are_merged_and_sorted() -> None:
    tracker = EndpointsChangeTracker()
    ports = [o.port("http", 8080)]
    tracker.update(
        WEB,
        "web-1",
        o.endpoint_slice("ns", "web", ["10.244.0.9", "10.244.0.10"], ports, slice_name="web-1"),
    )
    tracker.update(
        WEB,
        "web-2",
        o.endpoint_slice("ns", "web", ["10.244.0.2", "10.244.0.9"], ports, slice_name="web-2"),
    )
    assert tracker.apply().changed == {WEB}
    (endpoints,) = tracker.endpoints_map.values()
    assert [e.address for e in endpoints] == [
        "10.244.0.10:8080",
        "10.244.0.2:8080",
        "10.244.0.9:8080",
    ]  # kube-proxy's string order
    tracker.update(WEB, "web-1", None)
    tracker.apply()
    (endpoints,) = tracker.endpoints_map.values()
    assert [e.address for e in endpoints] == ["10.244.0.2:8080", "10.244.0.9:8080"]


def test_trigger_times_are_returned_once() -> None:
    tracker = EndpointsChangeTracker()
    eps = o.endpoint_slice(
        "ns",
        "web",
        ["10.244.0.2"],
        [o.port("http", 80)],
        annotations={"endpoints.kubernetes.io/last-change-trigger-time": "2026-11-24T05:00:00Z"},
    )
    tracker.update(WEB, "web-abcde", eps)
    assert tracker.apply().trigger_times == [datetime(2026, 11, 24, 5, tzinfo=UTC)]
    assert tracker.apply().trigger_times == []


def test_changed_ports_name_every_port_before_and_after() -> None:
    tracker = EndpointsChangeTracker()
    dns, http = [o.port("dns", 53, "UDP")], [o.port("http", 80)]
    tracker.update(WEB, "web-abcde", o.endpoint_slice("ns", "web", ["10.244.0.2"], dns))
    assert {p.port for p in tracker.apply().changed_ports} == {"dns"}
    tracker.update(WEB, "web-abcde", o.endpoint_slice("ns", "web", ["10.244.0.2"], http))
    assert {p.port for p in tracker.apply().changed_ports} == {"dns", "http"}
    assert tracker.apply().changed_ports == set()
