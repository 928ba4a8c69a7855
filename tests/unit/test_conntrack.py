"""Which conntrack flows are stale (pure), transcribed from kube-proxy's cleanup_test.go.

The cases, addresses and expectations come from kubernetes/kubernetes
pkg/proxy/conntrack/cleanup_test.go (the version that compares endpoint IP and port:
TestCleanStaleEntries, TestPerformanceCleanStaleEntries, TestServiceWithoutEndpoints). As
there, the Service and EndpointSlice go through the change trackers to build the maps.
Upstream leaves a flow's original source unset, and its destination address for NodePort
flows; a Flow needs them, so they get CLIENT_IP/CLIENT_PORT and NODE_IP, none of which is a
Service address.
"""

from __future__ import annotations

import errno
import logging
import random
from collections import Counter
from ipaddress import ip_address
from typing import Any

import objects as o
import pytest
from pyroute2.netlink.exceptions import NetlinkError

from pykubeproxy import conntrack
from pykubeproxy.changes import EndpointsChangeTracker, ServiceChangeTracker
from pykubeproxy.conntrack import (
    ConntrackReconciler,
    Flow,
    frontends,
    reconcile_needed,
    stale_flows,
)
from pykubeproxy.model import (
    Endpoint,
    EndpointsMap,
    NamespacedName,
    Protocol,
    ServicePort,
    ServicePortMap,
    ServicePortName,
)

SERVICE = NamespacedName("test", "cleanup-test")

CLUSTER_IP = "172.30.1.1"
EXTERNAL_IP = "192.168.99.100"
LOAD_BALANCER_IP = "1.2.3.4"

SERVING_ENDPOINT_IP = "10.240.0.4"
NON_SERVING_ENDPOINT_IP = "10.240.1.5"
DELETED_ENDPOINT_IP = "10.240.2.6"

OLD_ENDPOINT_PORT = 8080  # the endpoint changed its port but kept its IP
ENDPOINT_PORT = 9090
SERVICE_PORT = 8000
SERVICE_NODE_PORT = 32000
NON_SERVICE_PORT = 3000  # flows not owned by kube-proxy, never cleaned up

CLIENT_IP, CLIENT_PORT, NODE_IP = "192.0.2.7", 40000, "192.0.2.1"

PROTOCOLS = (Protocol.TCP, Protocol.UDP, Protocol.SCTP)


def entry(
    orig_dst: str | None,
    orig_port_dst: int,
    reply_src: str,
    reply_port_src: int,
    protocol: Protocol,
) -> Flow:
    """generateConntrackEntry: orig_dst None stands for a NodePort flow (any address)."""
    return Flow(
        protocol=protocol,
        orig_src=ip_address(CLIENT_IP),
        orig_src_port=CLIENT_PORT,
        orig_dst=ip_address(orig_dst or NODE_IP),
        orig_dst_port=orig_port_dst,
        reply_src=ip_address(reply_src),
        reply_src_port=reply_port_src,
    )


def maps(
    ports: list[dict[str, Any]], slice_service: str = SERVICE.name
) -> tuple[ServicePortMap, EndpointsMap]:
    """The Service of the upstream tests and a slice (of slice_service) with its endpoints."""
    services = ServiceChangeTracker()
    services.update(
        SERVICE,
        o.service(
            SERVICE.namespace,
            SERVICE.name,
            CLUSTER_IP,
            ports,
            externalIPs=[EXTERNAL_IP],
            status={"loadBalancer": {"ingress": [{"ip": LOAD_BALANCER_IP}]}},
        ),
    )
    services.apply()
    eps = o.endpoint_slice(
        SERVICE.namespace,
        slice_service,
        [],
        [o.port(p["name"], ENDPOINT_PORT, p["protocol"]) for p in ports],
        slice_name=f"{SERVICE.name}-0",
    )
    eps["endpoints"] = [
        {"addresses": [SERVING_ENDPOINT_IP], "conditions": {"serving": True}},
        {"addresses": [NON_SERVING_ENDPOINT_IP], "conditions": {"serving": False}},
    ]
    endpoints = EndpointsChangeTracker()
    endpoints.update(NamespacedName(SERVICE.namespace, slice_service), eps["metadata"]["name"], eps)
    endpoints.apply()
    return services.service_map, endpoints.endpoints_map


def test_clean_stale_entries() -> None:
    """TestCleanStaleEntries."""
    services, endpoints = maps(
        [
            o.port("test-tcp", SERVICE_PORT, "TCP"),
            o.port("test-udp", SERVICE_PORT, "UDP", nodePort=SERVICE_NODE_PORT),
            o.port("test-sctp", SERVICE_PORT, "SCTP", nodePort=SERVICE_NODE_PORT),
        ]
    )
    # Sanity checks of the maps, as upstream makes them.
    assert len(services) == 3
    assert {str(p.cluster_ip) for p in services.values()} == {CLUSTER_IP}
    assert len(endpoints) == 3
    for port_endpoints in endpoints.values():
        assert [(str(e.ip), e.serving) for e in port_endpoints] == [
            (SERVING_ENDPOINT_IP, True),
            (NON_SERVING_ENDPOINT_IP, False),
        ]

    before: list[Flow] = []
    after: list[Flow] = []
    # The serving endpoint's old port: these 3 go.
    for orig_dst in (CLUSTER_IP, LOAD_BALANCER_IP, EXTERNAL_IP):
        before.append(
            entry(orig_dst, SERVICE_PORT, SERVING_ENDPOINT_IP, OLD_ENDPOINT_PORT, Protocol.UDP)
        )
    # 3 endpoints * 3 protocols * (3 frontends * 2 ports + 1 NodePort) = 63 flows.
    for dnat_dst in (SERVING_ENDPOINT_IP, NON_SERVING_ENDPOINT_IP, DELETED_ENDPOINT_IP):
        for protocol in PROTOCOLS:
            for orig_dst in (CLUSTER_IP, LOAD_BALANCER_IP, EXTERNAL_IP):
                for port in (SERVICE_PORT, NON_SERVICE_PORT):
                    flow = entry(orig_dst, port, dnat_dst, ENDPOINT_PORT, protocol)
                    before.append(flow)
                    if not (
                        protocol is Protocol.UDP
                        and port == SERVICE_PORT
                        and dnat_dst != SERVING_ENDPOINT_IP
                    ):
                        after.append(flow)
            flow = entry(None, SERVICE_NODE_PORT, dnat_dst, ENDPOINT_PORT, protocol)
            before.append(flow)
            if not (protocol is Protocol.UDP and dnat_dst != SERVING_ENDPOINT_IP):
                after.append(flow)
    # 6 flows that were never DNATed (cached while the Service had no endpoints): the reply
    # comes from the frontend itself. Those to the Service port go.
    for ip in (CLUSTER_IP, LOAD_BALANCER_IP, EXTERNAL_IP):
        for port in (SERVICE_PORT, NON_SERVICE_PORT):
            flow = Flow(
                protocol=Protocol.UDP,
                orig_src=ip_address(CLIENT_IP),
                orig_src_port=CLIENT_PORT,
                orig_dst=ip_address(ip),
                orig_dst_port=port,
                reply_src=ip_address(ip),
                reply_src_port=0,
            )
            before.append(flow)
            if port != SERVICE_PORT:
                after.append(flow)

    assert (len(before), len(after)) == (72, 58)
    stale = stale_flows(services, endpoints, before)
    assert Counter(stale) == Counter(before) - Counter(after)
    assert len(stale) == len(before) - len(after)  # the deleted-entries metric


def test_performance_clean_stale_entries() -> None:
    """TestPerformanceCleanStaleEntries, with 50k seeded random ports instead of 1M."""
    services, endpoints = maps([o.port("test-udp", SERVICE_PORT, "UDP")])
    flows = [
        entry(EXTERNAL_IP, SERVICE_PORT, SERVING_ENDPOINT_IP, ENDPOINT_PORT, Protocol.UDP),
        entry(EXTERNAL_IP, SERVICE_PORT, DELETED_ENDPOINT_IP, ENDPOINT_PORT, Protocol.UDP),
    ]
    expected_entries, expected_deleted = 1, 1
    rng = random.Random(8000)
    for _ in range(50_000):
        port = rng.randrange(65535)
        if port == SERVICE_PORT:
            expected_deleted += 1
        else:
            expected_entries += 1
        flows.append(entry(EXTERNAL_IP, port, DELETED_ENDPOINT_IP, ENDPOINT_PORT, Protocol.UDP))
    stale = stale_flows(services, endpoints, flows)
    assert len(stale) == expected_deleted
    assert len(flows) - len(stale) == expected_entries


def test_service_without_endpoints() -> None:
    """TestServiceWithoutEndpoints: the slice belongs to another Service, nothing goes."""
    services, endpoints = maps(
        [o.port("test-udp", SERVICE_PORT, "UDP")], slice_service="non-existing-service"
    )
    flows = [
        entry(EXTERNAL_IP, SERVICE_PORT, SERVING_ENDPOINT_IP, ENDPOINT_PORT, Protocol.UDP),
        entry(EXTERNAL_IP, SERVICE_PORT, DELETED_ENDPOINT_IP, ENDPOINT_PORT, Protocol.UDP),
    ]
    assert stale_flows(services, endpoints, flows) == []


def test_serving_decides_not_ready_or_terminating() -> None:
    """Upstream counts serving endpoints only, ignoring ready and terminating (cleanup.go)."""
    services, _ = maps([o.port("test-udp", SERVICE_PORT, "UDP")])
    (name,) = services
    endpoints: EndpointsMap = {
        name: (
            Endpoint(ip_address(SERVING_ENDPOINT_IP), ENDPOINT_PORT, ready=False, terminating=True),
            Endpoint(ip_address(NON_SERVING_ENDPOINT_IP), ENDPOINT_PORT, ready=True, serving=False),
        )
    }
    terminating = entry(CLUSTER_IP, SERVICE_PORT, SERVING_ENDPOINT_IP, ENDPOINT_PORT, Protocol.UDP)
    not_serving = entry(
        CLUSTER_IP, SERVICE_PORT, NON_SERVING_ENDPOINT_IP, ENDPOINT_PORT, Protocol.UDP
    )
    assert stale_flows(services, endpoints, [terminating, not_serving]) == [not_serving]


def test_reconcile_needed_only_for_udp_ports() -> None:
    """Upstream's ConntrackCleanupRequired: some changed Service port is UDP."""
    tcp, udp = (
        ServicePortName(SERVICE, "p", protocol) for protocol in (Protocol.TCP, Protocol.UDP)
    )
    assert reconcile_needed([tcp, udp])
    assert not reconcile_needed([tcp])
    assert not reconcile_needed([])


def test_netlink_errors_are_one_warning(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """No conntrack netlink or no permission: a warning and an empty result, no exception."""

    class Refused:
        def __init__(self, **kwargs: Any) -> None:
            raise NetlinkError(errno.EPERM, "Operation not permitted")

    monkeypatch.setattr(conntrack, "NFCTSocket", Refused)
    with caplog.at_level(logging.WARNING, logger="pykubeproxy.conntrack"):
        result = ConntrackReconciler().reconcile({}, {})
    assert (result.deleted, result.table_read) == (0, False)
    assert len(caplog.records) == 1
    assert "Operation not permitted" in caplog.records[0].getMessage()


def test_flows_to_a_deleted_service_go() -> None:
    """Beyond upstream: a Service port that is gone leaves no flow behind, DNATed or not."""
    name = ServicePortName(SERVICE, "dns", Protocol.UDP)
    svc = ServicePort(name, ip_address(CLUSTER_IP), SERVICE_PORT, node_port=SERVICE_NODE_PORT)
    flows = [
        entry(CLUSTER_IP, SERVICE_PORT, SERVING_ENDPOINT_IP, ENDPOINT_PORT, Protocol.UDP),
        entry(None, SERVICE_NODE_PORT, SERVING_ENDPOINT_IP, ENDPOINT_PORT, Protocol.UDP),
        entry(CLUSTER_IP, SERVICE_PORT, CLUSTER_IP, SERVICE_PORT, Protocol.UDP),
        entry(EXTERNAL_IP, SERVICE_PORT, SERVING_ENDPOINT_IP, ENDPOINT_PORT, Protocol.UDP),
    ]
    assert stale_flows({}, {}, flows, frontends({name: svc})) == flows[:3]
