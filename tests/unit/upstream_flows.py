"""Upstream kube-proxy's packet-flow expectations, with the objects they run against.

Transcribed from kubernetes/kubernetes pkg/proxy/iptables/proxier_test.go (the
v1.32-or-later version also used by tests/unit/test_trace.py). For every test
there that syncs Services and EndpointSlices and then calls `runPacketFlowTests`,
this holds the raw API objects (as `makeTestService` / `makeTestEndpointSlice`
build them), the proxier settings of upstream's `NewFakeProxier` with the test's
overrides, and the expected flows. A test that changes its objects between two
runs (deleting a slice or the Service) becomes one case per stage.

Upstream's tests of this version set no node labels or topology hints, and no
session-affinity flows exist (the tracer cannot see affinity).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from typing import Any

TEST_NODE_NAME = "test-node"
TEST_NODE_IP = "192.168.0.2"
TEST_NODE_IP_ALT = "192.168.1.2"
TEST_EXTERNAL_IP = "192.168.99.11"
TEST_NODE_IPV6 = "2001:db8::1"
TEST_NODE_IPV6_ALT = "2001:db8:1::2"
TEST_EXTERNAL_CLIENT = "203.0.113.2"
TEST_EXTERNAL_CLIENT_BLOCKED = "203.0.113.130"
TEST_NODE_IPS = (
    TEST_NODE_IP,
    TEST_NODE_IP_ALT,
    TEST_EXTERNAL_IP,
    TEST_NODE_IPV6,
    TEST_NODE_IPV6_ALT,
)
# The addresses upstream's tracer takes as local (addrtype LOCAL).
TRACER_LOCAL_IPS = ("127.0.0.1", "::1", *TEST_NODE_IPS)
# The fake node's interfaces in NewFakeProxier (lo and eth0), for --nodeport-addresses.
NODE_INTERFACE_ADDRESSES = (
    "127.0.0.1/8",
    "::1/128",
    "192.168.0.2/24",
    "192.168.1.2/24",
    "192.168.99.11/24",
    "2001:db8::1/64",
    "2001:db8:1::2/64",
)


@dataclass(frozen=True)
class Flow:
    """One `packetFlowTest`: a new connection and where upstream expects it to end."""

    name: str
    source: str
    destination: str
    port: int
    output: str
    masq: bool = False
    protocol: str = "TCP"


@dataclass(frozen=True)
class Settings:
    """NewFakeProxier's settings (IPv4 unless `family` says otherwise)."""

    family: str = "IPv4"
    node_name: str = TEST_NODE_NAME
    node_ip: str = TEST_NODE_IP
    # The local-traffic detector's pod CIDR; None for upstream's no-op detector.
    cluster_cidr: str | None = "10.0.0.0/8"
    masquerade_all: bool = False
    masquerade_mark: str = "0x4000"
    # --nodeport-addresses CIDRs; empty means every local address.
    node_port_addresses: tuple[str, ...] = ()
    localhost_nodeports: bool = True
    node_labels: Mapping[str, str] = field(default_factory=dict)


IPV6 = Settings(family="IPv6", node_ip=TEST_NODE_IPV6, cluster_cidr="fd00:10::/64")


@dataclass(frozen=True)
class Case:
    test: str
    services: tuple[dict[str, Any], ...]
    slices: tuple[dict[str, Any], ...]
    flows: tuple[Flow, ...]
    settings: Settings = Settings()


def service(
    namespace: str, name: str, spec: dict[str, Any], ingress: tuple[str, ...] = ()
) -> dict[str, Any]:
    status = {"loadBalancer": {"ingress": [{"ip": ip} for ip in ingress]}} if ingress else {}
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {"namespace": namespace, "name": name, "annotations": {}},
        "spec": spec,
        "status": status,
    }


def port(name: str, number: int, protocol: str = "TCP", **extra: Any) -> dict[str, Any]:
    return {"name": name, "port": number, "protocol": protocol, **extra}


def endpoint(
    ip: str,
    node: str | None = None,
    ready: bool | None = None,
    serving: bool | None = None,
    terminating: bool | None = None,
) -> dict[str, Any]:
    """An Endpoint; conditions left out stay unset (nil), as in upstream's tests."""
    conditions = {"ready": ready, "serving": serving, "terminating": terminating}
    result: dict[str, Any] = {
        "addresses": [ip],
        "conditions": {k: v for k, v in conditions.items() if v is not None},
    }
    if node is not None:
        result["nodeName"] = node
    return result


def endpoint_slice(
    namespace: str,
    service_name: str,
    endpoints: list[dict[str, Any]],
    ports: list[dict[str, Any]],
    address_type: str = "IPv4",
) -> dict[str, Any]:
    return {
        "apiVersion": "discovery.k8s.io/v1",
        "kind": "EndpointSlice",
        "metadata": {
            "namespace": namespace,
            "name": f"{service_name}-1",
            "labels": {"kubernetes.io/service-name": service_name},
        },
        "addressType": address_type,
        "endpoints": endpoints,
        "ports": ports,
    }


P80 = [port("p80", 80)]

# TestOverallIPTablesRules: its six Services. Upstream runs no flows on them; these are
# TestTracePacket's flows, whose static rules were written for the same Services.
OVERALL = Case(
    "TestOverallIPTablesRules (flows of TestTracePacket)",
    services=(
        service("ns1", "svc1", {"clusterIP": "172.30.0.41", "ports": P80}),
        service(
            "ns2",
            "svc2",
            {
                "type": "LoadBalancer",
                "externalTrafficPolicy": "Local",
                "clusterIP": "172.30.0.42",
                "ports": [port("p80", 80, nodePort=3001)],
                "externalIPs": ["192.168.99.22"],
                "healthCheckNodePort": 30000,
            },
            ingress=("1.2.3.4",),
        ),
        service(
            "ns3",
            "svc3",
            {
                "type": "NodePort",
                "clusterIP": "172.30.0.43",
                "ports": [port("p80", 80, nodePort=3003)],
            },
        ),
        service(
            "ns4",
            "svc4",
            {
                "type": "NodePort",
                "clusterIP": "172.30.0.44",
                "externalIPs": ["192.168.99.33"],
                "ports": [port("p80", 80, targetPort=80)],
            },
        ),
        service(
            "ns5",
            "svc5",
            {
                "type": "LoadBalancer",
                "externalTrafficPolicy": "Cluster",
                "clusterIP": "172.30.0.45",
                "ports": [port("p80", 80, nodePort=3002)],
                "healthCheckNodePort": 30000,
                "loadBalancerSourceRanges": [" 203.0.113.0/25"],
                "sessionAffinity": "ClientIP",
                "sessionAffinityConfig": {"clientIP": {"timeoutSeconds": 10800}},
            },
            ingress=("5.6.7.8",),
        ),
        service(
            "ns6",
            "svc6",
            {
                "type": "ClusterIP",
                "clusterIP": "172.30.0.46",
                "ports": [port("p80", 80, targetPort=80)],
            },
        ),
    ),
    slices=(
        endpoint_slice("ns1", "svc1", [endpoint("10.180.0.1")], P80),
        endpoint_slice("ns2", "svc2", [endpoint("10.180.0.2")], P80),
        endpoint_slice("ns3", "svc3", [endpoint("10.180.0.3")], P80),
        endpoint_slice(
            "ns4", "svc4", [endpoint("10.180.0.4"), endpoint("10.180.0.5", TEST_NODE_NAME)], P80
        ),
        endpoint_slice("ns5", "svc5", [endpoint("10.180.0.3")], P80),
    ),
    flows=(
        Flow("no match", "10.0.0.2", "10.0.0.3", 80, ""),
        Flow("single endpoint", "10.0.0.2", "172.30.0.41", 80, "10.180.0.1:80"),
        Flow("multiple endpoints", "10.0.0.2", "172.30.0.44", 80, "10.180.0.4:80, 10.180.0.5:80"),
        Flow("LOCAL, KUBE-MARK-MASQ", TEST_NODE_IP, "192.168.99.22", 80, "10.180.0.2:80", True),
        Flow("DROP", TEST_EXTERNAL_CLIENT, "192.168.99.22", 80, "DROP"),
        Flow("ACCEPT (NodePortHealthCheck)", TEST_NODE_IP, TEST_NODE_IP, 30000, "ACCEPT"),
        Flow("REJECT", "10.0.0.2", "172.30.0.46", 80, "REJECT"),
    ),
)

# TestNoEndpointsReject
NO_ENDPOINTS_REJECT = Case(
    "TestNoEndpointsReject",
    services=(
        service(
            "ns1",
            "svc1",
            {
                "type": "LoadBalancer",
                "clusterIP": "172.30.0.41",
                "externalIPs": ["192.168.99.11"],
                "ports": [port("p80", 80, nodePort=3001)],
            },
            ingress=("1.2.3.4",),
        ),
    ),
    slices=(),
    flows=(
        Flow("pod to cluster IP with no endpoints", "10.0.0.2", "172.30.0.41", 80, "REJECT"),
        Flow(
            "external to external IP with no endpoints",
            TEST_EXTERNAL_CLIENT,
            "192.168.99.11",
            80,
            "REJECT",
        ),
        Flow("pod to NodePort with no endpoints", "10.0.0.2", TEST_NODE_IP, 3001, "REJECT"),
        Flow(
            "external to NodePort with no endpoints",
            TEST_EXTERNAL_CLIENT,
            TEST_NODE_IP,
            3001,
            "REJECT",
        ),
        Flow("pod to LoadBalancer IP with no endpoints", "10.0.0.2", "1.2.3.4", 80, "REJECT"),
        Flow(
            "external to LoadBalancer IP with no endpoints",
            TEST_EXTERNAL_CLIENT,
            "1.2.3.4",
            80,
            "REJECT",
        ),
    ),
)

# TestClusterIPGeneral
CLUSTER_IP_GENERAL = Case(
    "TestClusterIPGeneral",
    services=(
        service("ns1", "svc1", {"clusterIP": "172.30.0.41", "ports": [port("http", 80)]}),
        service(
            "ns2",
            "svc2",
            {
                "clusterIP": "172.30.0.42",
                "ports": [
                    port("http", 80),
                    port("https", 443, targetPort=8443),
                    port("dns-udp", 53, "UDP"),
                    port("dns-tcp", 53, targetPort=5353),
                    port("dns-sctp", 53, "SCTP"),
                ],
            },
        ),
    ),
    slices=(
        endpoint_slice("ns1", "svc1", [endpoint("10.180.0.1", TEST_NODE_NAME)], [port("http", 80)]),
        endpoint_slice(
            "ns2",
            "svc2",
            [endpoint("10.180.0.1", TEST_NODE_NAME), endpoint("10.180.2.1", "node2")],
            [
                port("http", 80),
                port("https", 8443),
                port("dns-udp", 53, "UDP"),
                port("dns-tcp", 5353),
                port("dns-sctp", 53, "SCTP"),
            ],
        ),
    ),
    flows=(
        Flow("simple clusterIP", "10.180.0.2", "172.30.0.41", 80, "10.180.0.1:80"),
        Flow("hairpin to cluster IP", "10.180.0.1", "172.30.0.41", 80, "10.180.0.1:80", True),
        Flow("clusterIP with multiple endpoints", "10.180.0.2", "172.30.0.42", 80, "10.180.0.1:80, 10.180.2.1:80"),
        Flow("clusterIP with TargetPort", "10.180.0.2", "172.30.0.42", 443, "10.180.0.1:8443, 10.180.2.1:8443"),
        Flow("clusterIP with TCP, UDP, and SCTP on same port (TCP)", "10.180.0.2", "172.30.0.42", 53, "10.180.0.1:5353, 10.180.2.1:5353", protocol="TCP"),
        Flow("clusterIP with TCP, UDP, and SCTP on same port (UDP)", "10.180.0.2", "172.30.0.42", 53, "10.180.0.1:53, 10.180.2.1:53", protocol="UDP"),
        Flow("clusterIP with TCP, UDP, and SCTP on same port (SCTP)", "10.180.0.2", "172.30.0.42", 53, "10.180.0.1:53, 10.180.2.1:53", protocol="SCTP"),
        Flow("TCP-only port does not match UDP traffic", "10.180.0.2", "172.30.0.42", 80, "", protocol="UDP"),
        Flow("svc1 does not accept svc2's ports", "10.180.0.2", "172.30.0.41", 443, ""),
    ),
)  # fmt: skip

# TestLoadBalancer
_LB_EP = "10.180.0.1:80"
LOAD_BALANCER = Case(
    "TestLoadBalancer",
    services=(
        service(
            "ns1",
            "svc1",
            {
                "type": "LoadBalancer",
                "clusterIP": "172.30.0.41",
                "ports": [port("p80", 80, nodePort=3001)],
                "loadBalancerSourceRanges": ["192.168.0.0/24", " 203.0.113.0/25"],
            },
            ingress=("1.2.3.4", "5.6.7.8"),
        ),
    ),
    slices=(endpoint_slice("ns1", "svc1", [endpoint("10.180.0.1")], P80),),
    flows=(
        Flow("pod to cluster IP", "10.0.0.2", "172.30.0.41", 80, _LB_EP),
        Flow("external to nodePort", TEST_EXTERNAL_CLIENT, TEST_NODE_IP, 3001, _LB_EP, True),
        Flow("nodePort bypasses LoadBalancerSourceRanges", TEST_EXTERNAL_CLIENT_BLOCKED, TEST_NODE_IP, 3001, _LB_EP, True),
        Flow("accepted external to LB1", TEST_EXTERNAL_CLIENT, "1.2.3.4", 80, _LB_EP, True),
        Flow("accepted external to LB2", TEST_EXTERNAL_CLIENT, "5.6.7.8", 80, _LB_EP, True),
        Flow("blocked external to LB1", TEST_EXTERNAL_CLIENT_BLOCKED, "1.2.3.4", 80, "DROP"),
        Flow("blocked external to LB2", TEST_EXTERNAL_CLIENT_BLOCKED, "5.6.7.8", 80, "DROP"),
        Flow("pod to LB1 (blocked by LoadBalancerSourceRanges)", "10.0.0.2", "1.2.3.4", 80, "DROP"),
        Flow("pod to LB2 (blocked by LoadBalancerSourceRanges)", "10.0.0.2", "5.6.7.8", 80, "DROP"),
        Flow("node to LB1 (allowed by LoadBalancerSourceRanges)", TEST_NODE_IP, "1.2.3.4", 80, _LB_EP, True),
        Flow("node to LB2 (allowed by LoadBalancerSourceRanges)", TEST_NODE_IP, "5.6.7.8", 80, _LB_EP, True),
        Flow("same node to LB1, SNATted to LB1 (implicitly allowed)", "1.2.3.4", "1.2.3.4", 80, _LB_EP, True),
        Flow("same node to LB2, SNATted to LB2 (implicitly allowed)", "5.6.7.8", "5.6.7.8", 80, _LB_EP, True),
    ),
)  # fmt: skip


def _node_ports_case(
    name: str,
    ipv6: bool,
    localhost_nodeports: bool,
    node_port_addresses: tuple[str, ...],
    allow_alt_node_ip: bool,
) -> Case:
    """TestNodePorts: one subtest, with the flows its conditions select."""
    if ipv6:
        settings, family = IPV6, "IPv6"
        svc_ip, ep1, ep2 = "fd00:172:30::41", "fd00:10:180::1", "fd00:10:180::2:1"
        pod, external, node, alt, localhost = (
            "fd00:10::2",
            "2600:5200::1",
            TEST_NODE_IPV6,
            TEST_NODE_IPV6_ALT,
            "::1",
        )
        output = f"[{ep1}]:80, [{ep2}]:80"
    else:
        settings, family = Settings(), "IPv4"
        svc_ip, ep1, ep2 = "172.30.0.41", "10.180.0.1", "10.180.2.1"
        pod, external, node, alt, localhost = (
            "10.0.0.2",
            TEST_EXTERNAL_CLIENT,
            TEST_NODE_IP,
            TEST_NODE_IP_ALT,
            "127.0.0.1",
        )
        output = f"{ep1}:80, {ep2}:80"
    flows = [
        Flow("pod to cluster IP", pod, svc_ip, 80, output),
        Flow("external to nodePort", external, node, 3001, output, True),
        Flow("node to nodePort", node, node, 3001, output, True),
    ]
    if not ipv6 and localhost_nodeports:
        flows.append(
            Flow("localhost to nodePort gets masqueraded", localhost, localhost, 3001, output, True)
        )
    else:
        flows.append(Flow("localhost to nodePort is ignored", localhost, localhost, 3001, ""))
    if allow_alt_node_ip:
        flows.append(
            Flow("external to nodePort on secondary IP", external, alt, 3001, output, True)
        )
    else:
        flows.append(Flow("secondary nodeIP ignores NodePorts", external, alt, 3001, ""))
    return Case(
        f"TestNodePorts/{name}",
        services=(
            service(
                "ns1",
                "svc1",
                {"type": "NodePort", "clusterIP": svc_ip, "ports": [port("p80", 80, nodePort=3001)]},
            ),
        ),
        slices=(endpoint_slice("ns1", "svc1", [endpoint(ep1), endpoint(ep2, TEST_NODE_NAME)], P80, family),),
        flows=tuple(flows),
        settings=replace(settings, localhost_nodeports=localhost_nodeports, node_port_addresses=node_port_addresses),
    )  # fmt: skip


_MULTIPLE = ("192.168.0.0/24", "192.168.1.0/24", "2001:db8::/64")
NODE_PORTS = (
    _node_ports_case("ipv4, localhost-nodeports enabled", False, True, (), True),
    _node_ports_case("ipv4, localhost-nodeports disabled", False, False, (), True),
    _node_ports_case(
        "ipv4, localhost-nodeports disabled, localhost in nodeport-addresses",
        False,
        False,
        ("192.168.0.0/24", "127.0.0.1/32"),
        False,
    ),
    _node_ports_case("ipv4, localhost-nodeports enabled, multiple nodeport-addresses", False, False, _MULTIPLE, True),
    _node_ports_case("ipv6, localhost-nodeports enabled", True, True, (), True),
    _node_ports_case("ipv6, localhost-nodeports disabled", True, False, (), True),
    _node_ports_case("ipv6, localhost-nodeports disabled, multiple nodeport-addresses", True, False, _MULTIPLE, False),
)  # fmt: skip

# TestHealthCheckNodePort: before and after the Service is deleted.
_HCNP_SETTINGS = Settings(node_port_addresses=("127.0.0.0/8",))
HEALTH_CHECK_NODE_PORT = (
    Case(
        "TestHealthCheckNodePort",
        services=(
            service(
                "ns1",
                "svc1",
                {
                    "type": "LoadBalancer",
                    "clusterIP": "172.30.0.42",
                    "ports": [port("p80", 80, nodePort=3001)],
                    "healthCheckNodePort": 30000,
                    "externalTrafficPolicy": "Local",
                },
            ),
        ),
        slices=(),
        flows=(Flow("firewall accepts HealthCheckNodePort", "1.2.3.4", TEST_NODE_IP, 30000, "ACCEPT"),),
        settings=_HCNP_SETTINGS,
    ),
    Case(
        "TestHealthCheckNodePort (Service deleted)",
        services=(),
        slices=(),
        flows=(Flow("HealthCheckNodePort no longer has any rule", "1.2.3.4", TEST_NODE_IP, 30000, ""),),
        settings=_HCNP_SETTINGS,
    ),
)  # fmt: skip


def _traffic_policy_service(policy: str, health_check: bool) -> dict[str, Any]:
    spec: dict[str, Any] = {
        "type": "LoadBalancer",
        "externalTrafficPolicy": policy,
        "clusterIP": "172.30.0.41",
        "externalIPs": ["192.168.99.11"],
        "ports": [port("p80", 80, nodePort=3001, targetPort=80)],
    }
    if health_check:
        spec["healthCheckNodePort"] = 30000
    return service("ns1", "svc1", spec, ingress=("1.2.3.4",))


_BOTH = "10.180.0.1:80, 10.180.2.1:80"
_ETP_SLICE = endpoint_slice(
    "ns1", "svc1", [endpoint("10.180.0.1"), endpoint("10.180.2.1", TEST_NODE_NAME)], P80
)

# TestExternalTrafficPolicyLocal
EXTERNAL_TRAFFIC_POLICY_LOCAL = Case(
    "TestExternalTrafficPolicyLocal",
    services=(_traffic_policy_service("Local", health_check=True),),
    slices=(_ETP_SLICE,),
    flows=(
        Flow("pod to cluster IP hits both endpoints, unmasqueraded", "10.0.0.2", "172.30.0.41", 80, _BOTH),
        Flow("pod to external IP hits both endpoints, unmasqueraded", "10.0.0.2", "192.168.99.11", 80, _BOTH),
        Flow("external to external IP hits only local endpoint, unmasqueraded", TEST_EXTERNAL_CLIENT, "192.168.99.11", 80, "10.180.2.1:80"),
        Flow("pod to LB IP hits only both endpoints, unmasqueraded", "10.0.0.2", "1.2.3.4", 80, _BOTH),
        Flow("external to LB IP hits only local endpoint, unmasqueraded", TEST_EXTERNAL_CLIENT, "1.2.3.4", 80, "10.180.2.1:80"),
        Flow("pod to NodePort hits both endpoints, unmasqueraded", "10.0.0.2", TEST_NODE_IP, 3001, _BOTH),
        Flow("external to NodePort hits only local endpoint, unmasqueraded", TEST_EXTERNAL_CLIENT, TEST_NODE_IP, 3001, "10.180.2.1:80"),
    ),
)  # fmt: skip

# TestExternalTrafficPolicyCluster
EXTERNAL_TRAFFIC_POLICY_CLUSTER = Case(
    "TestExternalTrafficPolicyCluster",
    services=(_traffic_policy_service("Cluster", health_check=False),),
    slices=(_ETP_SLICE,),
    flows=(
        Flow("pod to cluster IP hits both endpoints, unmasqueraded", "10.0.0.2", "172.30.0.41", 80, _BOTH),
        Flow("pod to external IP hits both endpoints, masqueraded", "10.0.0.2", "192.168.99.11", 80, _BOTH, True),
        Flow("external to external IP hits both endpoints, masqueraded", TEST_EXTERNAL_CLIENT, "192.168.99.11", 80, _BOTH, True),
        Flow("pod to LB IP hits both endpoints, masqueraded", "10.0.0.2", "1.2.3.4", 80, _BOTH, True),
        Flow("external to LB IP hits both endpoints, masqueraded", TEST_EXTERNAL_CLIENT, "1.2.3.4", 80, _BOTH, True),
        Flow("pod to NodePort hits both endpoints, masqueraded", "10.0.0.2", TEST_NODE_IP, 3001, _BOTH, True),
        Flow("external to NodePort hits both endpoints, masqueraded", TEST_EXTERNAL_CLIENT, TEST_NODE_IP, 3001, _BOTH, True),
    ),
)  # fmt: skip


def _policy_slice(endpoints: list[dict[str, Any]]) -> dict[str, Any]:
    """The unnamed-port slice of TestInternalTrafficPolicy / TestTerminatingEndpoints*."""
    return endpoint_slice("ns1", "svc1", endpoints, [port("", 80)])


def _internal_traffic_policy(
    name: str, policy: str, nodes: tuple[str, str, str], flow: Flow
) -> tuple[Case, Case]:
    """TestInternalTrafficPolicy: one subtest, then its run after the slice is deleted."""
    svc = service(
        "ns1",
        "svc1",
        {
            "clusterIP": "172.30.1.1",
            "selector": {"foo": "bar"},
            "ports": [port("", 80)],
            "internalTrafficPolicy": policy,
        },
    )
    ips = ("10.0.1.1", "10.0.1.2", "10.0.1.3")
    eps = [endpoint(ip, node, ready=True) for ip, node in zip(ips, nodes, strict=True)]
    deleted = Flow("endpoints deleted", "10.0.0.2", "172.30.1.1", 80, "REJECT")
    test = f"TestInternalTrafficPolicy/{name}"
    return (
        Case(test, (svc,), (_policy_slice(eps),), (flow,)),
        Case(f"{test} (endpoints deleted)", (svc,), (), (deleted,)),
    )


_POD_TO_CIP = ("10.0.0.2", "172.30.1.1", 80)
INTERNAL_TRAFFIC_POLICY = (
    *_internal_traffic_policy(
        "internalTrafficPolicy is cluster", "Cluster", (TEST_NODE_NAME, "node1", "node2"),
        Flow("pod to ClusterIP hits all endpoints", *_POD_TO_CIP, "10.0.1.1:80, 10.0.1.2:80, 10.0.1.3:80"),
    ),
    *_internal_traffic_policy(
        "internalTrafficPolicy is local and there is one local endpoint", "Local",
        (TEST_NODE_NAME, "node1", "node2"),
        Flow("pod to ClusterIP hits only local endpoint", *_POD_TO_CIP, "10.0.1.1:80"),
    ),
    *_internal_traffic_policy(
        "internalTrafficPolicy is local and there are multiple local endpoints", "Local",
        (TEST_NODE_NAME, TEST_NODE_NAME, "node2"),
        Flow("pod to ClusterIP hits all local endpoints", *_POD_TO_CIP, "10.0.1.1:80, 10.0.1.2:80"),
    ),
    *_internal_traffic_policy(
        "internalTrafficPolicy is local and there are no local endpoints", "Local",
        ("node0", "node1", "node2"),
        Flow("no endpoints", *_POD_TO_CIP, "DROP"),
    ),
)  # fmt: skip


def _terminating_service(policy: str) -> dict[str, Any]:
    return service(
        "ns1",
        "svc1",
        {
            "clusterIP": "172.30.1.1",
            "type": "LoadBalancer",
            "externalTrafficPolicy": policy,
            "ports": [port("", 80, targetPort=80)],
            "healthCheckNodePort": 30000,
        },
        ingress=("1.2.3.4",),
    )


def _ready(ip: str, node: str) -> dict[str, Any]:
    return endpoint(ip, node, ready=True, serving=True, terminating=False)


def _serving_terminating(ip: str, node: str) -> dict[str, Any]:
    return endpoint(ip, node, ready=False, serving=True, terminating=True)


def _terminating(ip: str, node: str) -> dict[str, Any]:
    """Terminating and no longer serving: never used."""
    return endpoint(ip, node, ready=False, serving=False, terminating=True)


def _terminating_cases(
    test: str, policy: str, subtests: list[tuple[str, list[dict[str, Any]], tuple[Flow, ...]]]
) -> tuple[Case, ...]:
    """TestTerminatingEndpointsTrafficPolicy*: each subtest, then the run after its slice
    is deleted (the same for every subtest, so it is kept once)."""
    svc = _terminating_service(policy)
    deleted = (
        Flow("pod to clusterIP after endpoints deleted", *_POD_TO_CIP, "REJECT"),
        Flow("external to LB after endpoints deleted", *_EXTERNAL_TO_LB, "REJECT"),
    )
    return (
        *(Case(f"{test}/{name}", (svc,), (_policy_slice(eps),), flows) for name, eps, flows in subtests),
        Case(f"{test} (endpoints deleted)", (svc,), (), deleted),
    )  # fmt: skip


_EXTERNAL_TO_LB = (TEST_EXTERNAL_CLIENT, "1.2.3.4", 80)

# TestTerminatingEndpointsTrafficPolicyLocal
TERMINATING_ENDPOINTS_LOCAL = _terminating_cases(
    "TestTerminatingEndpointsTrafficPolicyLocal",
    "Local",
    [
        (
            "ready endpoints exist",
            [
                _ready("10.0.1.1", TEST_NODE_NAME),
                _ready("10.0.1.2", TEST_NODE_NAME),
                _serving_terminating("10.0.1.3", TEST_NODE_NAME),
                _terminating("10.0.1.4", TEST_NODE_NAME),
                _ready("10.0.1.5", "node-1"),
            ],
            (
                Flow("pod to clusterIP", *_POD_TO_CIP, "10.0.1.1:80, 10.0.1.2:80, 10.0.1.5:80"),
                Flow("external to LB", *_EXTERNAL_TO_LB, "10.0.1.1:80, 10.0.1.2:80"),
            ),
        ),
        (
            "only terminating endpoints exist",
            [
                _serving_terminating("10.0.1.2", TEST_NODE_NAME),
                _serving_terminating("10.0.1.3", TEST_NODE_NAME),
                _terminating("10.0.1.4", TEST_NODE_NAME),
                _ready("10.0.1.5", "node-1"),
            ],
            (
                Flow("pod to clusterIP", *_POD_TO_CIP, "10.0.1.5:80"),
                Flow("external to LB", *_EXTERNAL_TO_LB, "10.0.1.2:80, 10.0.1.3:80"),
            ),
        ),
        (
            "terminating endpoints on remote node",
            [_serving_terminating("10.0.1.5", "node-1")],
            (
                Flow("pod to clusterIP", *_POD_TO_CIP, "10.0.1.5:80"),
                Flow("external to LB, no locally-usable endpoints", *_EXTERNAL_TO_LB, "DROP"),
            ),
        ),
        (
            "no usable endpoints on any node",
            [_terminating("10.0.1.5", TEST_NODE_NAME), _terminating("10.0.1.5", "node-1")],
            (
                Flow("pod to clusterIP, no usable endpoints", *_POD_TO_CIP, "REJECT"),
                Flow("external to LB, no usable endpoints", *_EXTERNAL_TO_LB, "REJECT"),
            ),
        ),
    ],
)

# TestTerminatingEndpointsTrafficPolicyCluster
TERMINATING_ENDPOINTS_CLUSTER = _terminating_cases(
    "TestTerminatingEndpointsTrafficPolicyCluster",
    "Cluster",
    [
        (
            "ready endpoints exist",
            [
                _ready("10.0.1.1", TEST_NODE_NAME),
                _ready("10.0.1.2", TEST_NODE_NAME),
                _serving_terminating("10.0.1.3", "another-node"),
                _terminating("10.0.1.4", "another-node"),
                _ready("10.0.1.5", "another-node"),
            ],
            (
                Flow("pod to clusterIP", *_POD_TO_CIP, "10.0.1.1:80, 10.0.1.2:80, 10.0.1.5:80"),
                Flow(
                    "external to LB",
                    *_EXTERNAL_TO_LB,
                    "10.0.1.1:80, 10.0.1.2:80, 10.0.1.5:80",
                    True,
                ),
            ),
        ),
        (
            "only terminating endpoints exist",
            [
                _serving_terminating("10.0.1.2", TEST_NODE_NAME),
                _serving_terminating("10.0.1.3", TEST_NODE_NAME),
                _terminating("10.0.1.4", "another-node"),
                _serving_terminating("10.0.1.5", "another-node"),
            ],
            (
                Flow("pod to clusterIP", *_POD_TO_CIP, "10.0.1.2:80, 10.0.1.3:80, 10.0.1.5:80"),
                Flow(
                    "external to LB",
                    *_EXTERNAL_TO_LB,
                    "10.0.1.2:80, 10.0.1.3:80, 10.0.1.5:80",
                    True,
                ),
            ),
        ),
        (
            "terminating endpoints on remote node",
            [_serving_terminating("10.0.1.5", "node-1")],
            (
                Flow("pod to clusterIP", *_POD_TO_CIP, "10.0.1.5:80"),
                Flow("external to LB", *_EXTERNAL_TO_LB, "10.0.1.5:80", True),
            ),
        ),
        (
            "no usable endpoints on any node",
            [_terminating("10.0.1.5", TEST_NODE_NAME), _terminating("10.0.1.5", "node-1")],
            (
                Flow("pod to clusterIP", *_POD_TO_CIP, "REJECT"),
                Flow("external to LB", *_EXTERNAL_TO_LB, "REJECT"),
            ),
        ),
    ],
)

# TestInternalExternalMasquerade: three LoadBalancers (plain, eTP:Local, iTP:Local), each
# with a local and a remote endpoint; the same flows under four proxier settings.
_IEM_SERVICES = tuple(
    service(
        f"ns{n}",
        f"svc{n}",
        {
            "type": "LoadBalancer",
            "clusterIP": f"172.30.0.4{n}",
            "ports": [port("p80", 80, nodePort=3000 + n)],
            "healthCheckNodePort": 30000 + n,
            **extra,
        },
        ingress=(lb,),
    )
    for n, lb, extra in (
        (1, "1.2.3.4", {}),
        (2, "5.6.7.8", {"externalTrafficPolicy": "Local"}),
        (3, "9.10.11.12", {"internalTrafficPolicy": "Local"}),
    )
)
_IEM_SLICES = tuple(
    endpoint_slice(
        f"ns{n}", f"svc{n}", [endpoint(f"10.180.0.{n}", TEST_NODE_NAME), endpoint(f"10.180.1.{n}", "remote")], P80
    )
    for n in (1, 2, 3)
)  # fmt: skip
_S1, _S2, _S3 = (
    "10.180.0.1:80, 10.180.1.1:80",
    "10.180.0.2:80, 10.180.1.2:80",
    "10.180.0.3:80, 10.180.1.3:80",
)
_IEM_FLOWS = (
    Flow("pod to ClusterIP", "10.0.0.2", "172.30.0.41", 80, _S1, False),
    Flow("pod to NodePort", "10.0.0.2", TEST_NODE_IP, 3001, _S1, True),
    Flow("pod to LB", "10.0.0.2", "1.2.3.4", 80, _S1, True),
    Flow("node to ClusterIP", TEST_NODE_IP, "172.30.0.41", 80, _S1, True),
    Flow("node to NodePort", TEST_NODE_IP, TEST_NODE_IP, 3001, _S1, True),
    Flow("localhost to NodePort", "127.0.0.1", "127.0.0.1", 3001, _S1, True),
    Flow("node to LB", TEST_NODE_IP, "1.2.3.4", 80, _S1, True),
    Flow("external to ClusterIP", TEST_EXTERNAL_CLIENT, "172.30.0.41", 80, _S1, True),
    Flow("external to NodePort", TEST_EXTERNAL_CLIENT, TEST_NODE_IP, 3001, _S1, True),
    Flow("external to LB", TEST_EXTERNAL_CLIENT, "1.2.3.4", 80, _S1, True),
    Flow("pod to ClusterIP with eTP:Local", "10.0.0.2", "172.30.0.42", 80, _S2, False),
    Flow("pod to NodePort with eTP:Local", "10.0.0.2", TEST_NODE_IP, 3002, _S2, False),
    Flow("pod to LB with eTP:Local", "10.0.0.2", "5.6.7.8", 80, _S2, False),
    Flow("node to ClusterIP with eTP:Local", TEST_NODE_IP, "172.30.0.42", 80, _S2, True),
    # (Upstream's case uses svc1's NodePort 3001 here, and expects svc1's endpoints.)
    Flow("node to NodePort with eTP:Local", TEST_NODE_IP, TEST_NODE_IP, 3001, _S1, True),
    Flow("localhost to NodePort with eTP:Local", "127.0.0.1", "127.0.0.1", 3002, _S2, True),
    Flow("node to LB with eTP:Local", TEST_NODE_IP, "5.6.7.8", 80, _S2, True),
    Flow("external to ClusterIP with eTP:Local", TEST_EXTERNAL_CLIENT, "172.30.0.42", 80, _S2, True),
    Flow("external to NodePort with eTP:Local", TEST_EXTERNAL_CLIENT, TEST_NODE_IP, 3002, "10.180.0.2:80", False),
    Flow("external to LB with eTP:Local", TEST_EXTERNAL_CLIENT, "5.6.7.8", 80, "10.180.0.2:80", False),
    Flow("pod to ClusterIP with iTP:Local", "10.0.0.2", "172.30.0.43", 80, "10.180.0.3:80", False),
    Flow("pod to NodePort with iTP:Local", "10.0.0.2", TEST_NODE_IP, 3003, _S3, True),
    Flow("pod to LB with iTP:Local", "10.0.0.2", "9.10.11.12", 80, _S3, True),
    Flow("node to ClusterIP with iTP:Local", TEST_NODE_IP, "172.30.0.43", 80, "10.180.0.3:80", True),
    Flow("node to NodePort with iTP:Local", TEST_NODE_IP, TEST_NODE_IP, 3003, _S3, True),
    Flow("localhost to NodePort with iTP:Local", "127.0.0.1", "127.0.0.1", 3003, _S3, True),
    Flow("node to LB with iTP:Local", TEST_NODE_IP, "9.10.11.12", 80, _S3, True),
    Flow("external to ClusterIP with iTP:Local", TEST_EXTERNAL_CLIENT, "172.30.0.43", 80, "10.180.0.3:80", True),
    Flow("external to NodePort with iTP:Local", TEST_EXTERNAL_CLIENT, TEST_NODE_IP, 3003, _S3, True),
    Flow("external to LB with iTP:Local", TEST_EXTERNAL_CLIENT, "9.10.11.12", 80, _S3, True),
)  # fmt: skip
# Per-setting overrides of the flows above: name -> (output or None, masq or None).
_NO_SHORT_CIRCUIT = {
    "pod to NodePort with eTP:Local": ("10.180.0.2:80", None),
    "pod to LB with eTP:Local": ("10.180.0.2:80", None),
}
_NO_DETECTOR = {
    **_NO_SHORT_CIRCUIT,
    "node to ClusterIP": (None, False),
    "node to ClusterIP with eTP:Local": (None, False),
    "node to ClusterIP with iTP:Local": (None, False),
    "external to ClusterIP": (None, False),
    "external to ClusterIP with eTP:Local": (None, False),
    "external to ClusterIP with iTP:Local": (None, False),
}
_MASQUERADE_ALL = {
    "pod to ClusterIP": (None, True),
    "pod to ClusterIP with eTP:Local": (None, True),
    "pod to ClusterIP with iTP:Local": (None, True),
}


def _with_overrides(overrides: Mapping[str, tuple[str | None, bool | None]]) -> tuple[Flow, ...]:
    def apply(flow: Flow) -> Flow:
        output, masq = overrides.get(flow.name, (None, None))
        return replace(
            flow,
            output=flow.output if output is None else output,
            masq=flow.masq if masq is None else masq,
        )

    return tuple(apply(flow) for flow in _IEM_FLOWS)


INTERNAL_EXTERNAL_MASQUERADE = tuple(
    Case(f"TestInternalExternalMasquerade/{name}", _IEM_SERVICES, _IEM_SLICES, flows, settings)
    for name, flows, settings in (
        ("base", _IEM_FLOWS, Settings()),
        ("no LocalTrafficDetector", _with_overrides(_NO_DETECTOR), Settings(cluster_cidr=None)),
        ("masqueradeAll", _with_overrides(_MASQUERADE_ALL), Settings(masquerade_all=True)),
        (
            "masqueradeAll, no LocalTrafficDetector",
            _with_overrides({**_MASQUERADE_ALL, **_NO_SHORT_CIRCUIT}),
            Settings(masquerade_all=True, cluster_cidr=None),
        ),
    )
)  # fmt: skip

CASES: tuple[Case, ...] = (
    OVERALL,
    NO_ENDPOINTS_REJECT,
    CLUSTER_IP_GENERAL,
    LOAD_BALANCER,
    *NODE_PORTS,
    *HEALTH_CHECK_NODE_PORT,
    EXTERNAL_TRAFFIC_POLICY_LOCAL,
    EXTERNAL_TRAFFIC_POLICY_CLUSTER,
    *INTERNAL_TRAFFIC_POLICY,
    *TERMINATING_ENDPOINTS_LOCAL,
    *TERMINATING_ENDPOINTS_CLUSTER,
    *INTERNAL_EXTERNAL_MASQUERADE,
)
