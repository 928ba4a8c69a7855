"""IPVS mode's rendered state against kube-proxy's IPVS proxier.

Upstream has no full-text golden for IPVS mode: its tests (pkg/proxy/ipvs/proxier_test.go)
check the virtual and real servers, the ipset entries, and per chain the list of (jump
target, matched set) of the rules. The expectations below are those of the upstream test
named in each test's docstring, carried over case by case, and `chain_targets` compares the
way upstream's ``checkIptables`` does (a chain's nat rules, then its filter rules). Where a
test checks more than an upstream test does (the full restore text, a rule's arguments),
the expectation is derived from upstream's ``writeIptablesRules`` and says so.
"""

from __future__ import annotations

from collections.abc import Iterable
from ipaddress import ip_address, ip_network
from typing import Any

import objects as o
import pytest

from pykubeproxy.changes import EndpointsChangeTracker, ServiceChangeTracker
from pykubeproxy.iptables.render import RenderConfig, Renderer
from pykubeproxy.iptables.ruleset import TableState, restore_text
from pykubeproxy.ipvs.backend import IpvsBackend
from pykubeproxy.ipvs.netlink import KernelRefused
from pykubeproxy.ipvs.render import IpvsConfig, Rendered, render
from pykubeproxy.ipvs.state import IpvsState, RealServer, ServiceOptions, VirtualServer
from pykubeproxy.metrics import Metrics
from pykubeproxy.model import IPAddress, NamespacedName, NodeFacts, Protocol
from pykubeproxy.ownership import is_owned

NODE_IP = ip_address("100.101.102.103")
TEST_NODE = NodeFacts("test-node")  # upstream's testNodeName; upstream's fake has no node IP

# Derived from upstream's writeIptablesRules for TestNodePortIPv4's first case (one TCP
# NodePort Service, an endpoint on another node): upstream's order and comments, with the
# mark written as iptables-save shows it (0x4000, not Go's %#08x 0x00004000).
EXPECTED = """\
*nat
:KUBE-SERVICES - [0:0]
:KUBE-POSTROUTING - [0:0]
:KUBE-NODE-PORT - [0:0]
:KUBE-LOAD-BALANCER - [0:0]
:KUBE-MARK-MASQ - [0:0]
-A KUBE-SERVICES -s 127.0.0.0/8 -j RETURN
-A KUBE-SERVICES -m comment --comment "Kubernetes service cluster ip + port for masquerade purpose" -m set --match-set KUBE-CLUSTER-IP src,dst -j KUBE-MARK-MASQ
-A KUBE-SERVICES -m addrtype --dst-type LOCAL -j KUBE-NODE-PORT
-A KUBE-SERVICES -m set --match-set KUBE-CLUSTER-IP dst,dst -j ACCEPT
-A KUBE-POSTROUTING -m mark ! --mark 0x4000/0x4000 -j RETURN
-A KUBE-POSTROUTING -j MARK --xor-mark 0x4000
-A KUBE-POSTROUTING -m comment --comment "kubernetes service traffic requiring SNAT" -j MASQUERADE --random-fully
-A KUBE-NODE-PORT -p tcp -m comment --comment "Kubernetes nodeport TCP port for masquerade purpose" -m set --match-set KUBE-NODE-PORT-TCP dst -j KUBE-MARK-MASQ
-A KUBE-LOAD-BALANCER -j KUBE-MARK-MASQ
-A KUBE-MARK-MASQ -j MARK --or-mark 0x4000
COMMIT
*filter
:KUBE-FORWARD - [0:0]
:KUBE-NODE-PORT - [0:0]
:KUBE-PROXY-FIREWALL - [0:0]
:KUBE-SOURCE-RANGES-FIREWALL - [0:0]
:KUBE-IPVS-FILTER - [0:0]
:KUBE-IPVS-OUT-FILTER - [0:0]
-A KUBE-FORWARD -m comment --comment "kubernetes forwarding rules" -m mark --mark 0x4000/0x4000 -j ACCEPT
-A KUBE-FORWARD -m comment --comment "kubernetes forwarding conntrack rule" -m conntrack --ctstate RELATED,ESTABLISHED -j ACCEPT
-A KUBE-NODE-PORT -m comment --comment "Kubernetes health check node port" -m set --match-set KUBE-HEALTH-CHECK-NODE-PORT dst -j ACCEPT
-A KUBE-SOURCE-RANGES-FIREWALL -j DROP
-A KUBE-IPVS-FILTER -m set --match-set KUBE-LOAD-BALANCER dst,dst -j RETURN
-A KUBE-IPVS-FILTER -m set --match-set KUBE-CLUSTER-IP dst,dst -j RETURN
-A KUBE-IPVS-FILTER -m set --match-set KUBE-EXTERNAL-IP dst,dst -j RETURN
-A KUBE-IPVS-FILTER -m set --match-set KUBE-EXTERNAL-IP-LOCAL dst,dst -j RETURN
-A KUBE-IPVS-FILTER -m set --match-set KUBE-HEALTH-CHECK-NODE-PORT dst -j RETURN
-A KUBE-IPVS-FILTER -m conntrack --ctstate NEW -m set --match-set KUBE-IPVS-IPS dst -j REJECT
COMMIT
"""

ServicesAndEndpoints = tuple[ServiceChangeTracker, EndpointsChangeTracker]


def trackers(*objects: dict[str, Any]) -> ServicesAndEndpoints:
    services, endpoints = ServiceChangeTracker(), EndpointsChangeTracker()
    for obj in objects:
        meta = obj["metadata"]
        if obj["kind"] == "Service":
            services.update(NamespacedName(meta["namespace"], meta["name"]), obj)
        else:
            owner = meta["labels"]["kubernetes.io/service-name"]
            endpoints.update(NamespacedName(meta["namespace"], owner), meta["name"], obj)
    services.apply()
    endpoints.apply()
    return services, endpoints


def endpoints(
    namespace: str, service: str, port: dict[str, Any], *eps: tuple[str, str | None, str]
) -> dict[str, Any]:
    """A slice of (address, node, conditions) endpoints; conditions is a word per flag set:
    "ready", "serving", "terminating" ("" for none)."""
    eps_slice = o.endpoint_slice(namespace, service, [], [port])
    for address, node, conditions in eps:
        flags = conditions.split()
        endpoint: dict[str, Any] = {
            "addresses": [address],
            "conditions": {name: name in flags for name in ("ready", "serving", "terminating")},
        }
        if node is not None:
            endpoint["nodeName"] = node
        eps_slice["endpoints"].append(endpoint)
    return eps_slice


READY = "ready serving"
TERMINATING = "serving terminating"  # ready false, serving true, terminating true
GONE = "terminating"  # not serving


def rendered(
    objects: ServicesAndEndpoints,
    node: NodeFacts = TEST_NODE,
    node_ips: Iterable[str] = (),
    cfg: IpvsConfig | None = None,
) -> Rendered:
    svcs, eps = objects
    ips = tuple(ip_address(ip) for ip in node_ips)
    return render(
        svcs.service_map, eps.endpoints_map, cfg or IpvsConfig(), node, ips, frozenset(ips)
    )


def vs(address: str, port: int, protocol: Protocol = Protocol.TCP) -> VirtualServer:
    return VirtualServer(ip_address(address), port, protocol)


def real(state: IpvsState, server: VirtualServer) -> list[str]:
    return sorted(str(rs) for rs in state.real_servers[server])


def rs(*addresses: str) -> set[RealServer]:
    found = set()
    for address in addresses:
        ip, _, port = address.rpartition(":")
        found.add(RealServer(ip_address(ip), int(port)))
    return found


def chain_targets(result: Rendered, chain: str) -> list[tuple[str, str]]:
    """(jump target, matched set) of a chain's rules, nat then filter: upstream's
    checkIptables."""
    found = []
    for table in (result.nat, result.filter):
        for rule in table.chains.get(chain, []):
            match_set = rule[rule.index("--match-set") + 1] if "--match-set" in rule else ""
            found.append((rule[rule.index("-j") + 1], match_set))
    return found


# KUBE-SERVICES of upstream's NodePort tests (no LB, no external IP).
CLUSTER_IP_SERVICES = [
    ("RETURN", ""),
    ("KUBE-MARK-MASQ", "KUBE-CLUSTER-IP"),
    ("KUBE-NODE-PORT", ""),
    ("ACCEPT", "KUBE-CLUSTER-IP"),
]


def node_port_service(protocol: str = "TCP", **spec: Any) -> dict[str, Any]:
    return o.service("ns1", "svc1", "10.20.30.41", [o.port("p80", 80, protocol, nodePort=3001)],
                     type="NodePort", **spec)  # fmt: skip


# --- the whole text -------------------------------------------------------------------------


def test_node_port_service_restore_text() -> None:
    """TestNodePortIPv4, first case (its IPv4 part), and the text derived above."""
    objects = trackers(
        node_port_service(),
        endpoints("ns1", "svc1", o.port("p80", 80), ("10.180.0.1", None, READY)),
    )
    result = rendered(objects, node_ips=[str(NODE_IP)])
    assert restore_text(result.tables) == EXPECTED
    cluster, node_port = vs("10.20.30.41", 80), vs(str(NODE_IP), 3001)
    assert result.state.services == {cluster: ServiceOptions(), node_port: ServiceOptions()}
    assert result.state.real_servers == {
        cluster: rs("10.180.0.1:80"),
        node_port: rs("10.180.0.1:80"),
    }
    assert result.state.addresses == {ip_address("10.20.30.41")}
    non_empty = {name: entries for name, entries in result.state.ipsets.items() if entries}
    assert non_empty == {
        "KUBE-CLUSTER-IP": {"10.20.30.41,tcp:80"},
        "KUBE-NODE-PORT-TCP": {"3001"},
        "KUBE-IPVS-IPS": {"10.20.30.41"},
    }
    assert len(result.state.ipsets) == 17
    assert result.state.names[node_port] == "ns1/svc1:p80"


def test_no_invalid_drop_in_ipvs_mode() -> None:
    """Upstream's IPVS proxier writes no INVALID drop in KUBE-FORWARD (iptables mode does)."""
    result = rendered(trackers())
    assert [rule[-1] for rule in result.filter.chains["KUBE-FORWARD"]] == ["ACCEPT", "ACCEPT"]


# --- NodePorts ------------------------------------------------------------------------------


def test_udp_node_port() -> None:
    """TestNodePortIPv4 "1 UDP service with node port, has endpoints"."""
    objects = trackers(
        node_port_service("UDP"),
        endpoints("ns1", "svc1", o.port("p80", 80, "UDP"), ("10.180.0.1", None, READY)),
    )
    result = rendered(objects, node_ips=[str(NODE_IP)])
    state = result.state
    assert set(state.services) == {
        vs("10.20.30.41", 80, Protocol.UDP),
        vs(str(NODE_IP), 3001, Protocol.UDP),
    }
    assert all(real(state, server) == ["10.180.0.1:80"] for server in state.services)
    assert state.ipsets["KUBE-NODE-PORT-UDP"] == {"3001"}
    assert chain_targets(result, "KUBE-NODE-PORT") == [
        ("KUBE-MARK-MASQ", "KUBE-NODE-PORT-UDP"),
        ("ACCEPT", "KUBE-HEALTH-CHECK-NODE-PORT"),
    ]
    assert chain_targets(result, "KUBE-SERVICES") == CLUSTER_IP_SERVICES


def test_node_port_without_endpoints_keeps_its_virtual_servers() -> None:
    """TestNodePortIPv4 "service has node port but no endpoints": the virtual servers stay,
    with no real server (no REJECT rule: IPVS itself answers with port unreachable)."""
    state = rendered(trackers(node_port_service()), node_ips=[str(NODE_IP)]).state
    assert state.real_servers == {vs("10.20.30.41", 80): set(), vs(str(NODE_IP), 3001): set()}


def test_sctp_node_port_on_several_node_ips() -> None:
    """TestNodePortIPv4 "node port service with protocol sctp on a node with multiple
    nodeIPs": one virtual server and one hash entry per node IP."""
    node_ips = ["100.101.102.103", "100.101.102.104", "100.101.102.105"]
    objects = trackers(
        node_port_service("SCTP"),
        endpoints("ns1", "svc1", o.port("p80", 80, "SCTP"), ("10.180.0.1", None, READY)),
    )
    state = rendered(objects, node_ips=node_ips).state
    assert set(state.services) == {
        vs("10.20.30.41", 80, Protocol.SCTP),
        *(vs(ip, 3001, Protocol.SCTP) for ip in node_ips),
    }
    assert all(real(state, server) == ["10.180.0.1:80"] for server in state.services)
    assert state.ipsets["KUBE-NODE-PORT-SCTP-HASH"] == {f"{ip},sctp:3001" for ip in node_ips}


def test_sctp_node_port_with_local_policy() -> None:
    """TestNodePortIPv4 "node port service with protocol sctp and externalTrafficPolicy
    local": the NodePort uses the local endpoint only, the ClusterIP both."""
    objects = trackers(
        node_port_service("SCTP", externalTrafficPolicy="Local"),
        endpoints(
            "ns1",
            "svc1",
            o.port("p80", 80, "SCTP"),
            ("10.180.0.1", "test-node", READY),
            ("10.180.1.1", "other-node", READY),
        ),
    )
    result = rendered(objects, node_ips=[str(NODE_IP)])
    state = result.state
    assert real(state, vs("10.20.30.41", 80, Protocol.SCTP)) == ["10.180.0.1:80", "10.180.1.1:80"]
    assert real(state, vs(str(NODE_IP), 3001, Protocol.SCTP)) == ["10.180.0.1:80"]
    entry = {f"{NODE_IP},sctp:3001"}
    assert state.ipsets["KUBE-NODE-PORT-SCTP-HASH"] == entry
    assert state.ipsets["KUBE-NODE-PORT-LOCAL-SCTP-HASH"] == entry
    assert chain_targets(result, "KUBE-NODE-PORT") == [
        ("RETURN", "KUBE-NODE-PORT-LOCAL-SCTP-HASH"),
        ("KUBE-MARK-MASQ", "KUBE-NODE-PORT-SCTP-HASH"),
        ("ACCEPT", "KUBE-HEALTH-CHECK-NODE-PORT"),
    ]


def test_only_local_node_ports() -> None:
    """TestOnlyLocalNodePorts: with NodePorts limited to 100.101.102.0/24 (the backend
    passes the matching node IPs), two virtual servers, the NodePort one with only the
    local endpoint; both NodePort sets hold the port."""
    objects = trackers(
        node_port_service(externalTrafficPolicy="Local"),
        endpoints(
            "ns1",
            "svc1",
            o.port("p80", 80),
            ("10.180.0.1", "test-node", READY),
            ("10.180.1.1", "other-node", READY),
        ),
    )
    result = rendered(objects, node_ips=[str(NODE_IP)])
    assert len(result.state.services) == 2
    assert real(result.state, vs(str(NODE_IP), 3001)) == ["10.180.0.1:80"]
    assert result.state.ipsets["KUBE-NODE-PORT-TCP"] == {"3001"}
    assert result.state.ipsets["KUBE-NODE-PORT-LOCAL-TCP"] == {"3001"}
    assert chain_targets(result, "KUBE-SERVICES") == CLUSTER_IP_SERVICES
    assert chain_targets(result, "KUBE-NODE-PORT") == [
        ("RETURN", "KUBE-NODE-PORT-LOCAL-TCP"),
        ("KUBE-MARK-MASQ", "KUBE-NODE-PORT-TCP"),
        ("ACCEPT", "KUBE-HEALTH-CHECK-NODE-PORT"),
    ]


# --- health check node ports ----------------------------------------------------------------


def lb_service(name: str, **spec: Any) -> dict[str, Any]:
    return o.service("ns1", name, "10.20.30.41", [o.port("p80", 80, nodePort=3000)],
                     type="LoadBalancer", **spec)  # fmt: skip


def test_health_check_node_ports() -> None:
    """TestHealthCheckNodePort: only the ports of Local-policy Services go to the set."""
    objects = trackers(
        lb_service("valid-svc1", externalTrafficPolicy="Local", healthCheckNodePort=30000),
        lb_service("valid-svc2", externalTrafficPolicy="Local", healthCheckNodePort=30001),
        lb_service("invalid-svc3", externalTrafficPolicy="Cluster", healthCheckNodePort=30002),
    )
    result = rendered(objects, node_ips=[str(NODE_IP)])
    assert result.state.ipsets["KUBE-HEALTH-CHECK-NODE-PORT"] == {"30000", "30001"}
    assert chain_targets(result, "KUBE-NODE-PORT") == [
        ("RETURN", "KUBE-NODE-PORT-LOCAL-TCP"),
        ("KUBE-MARK-MASQ", "KUBE-NODE-PORT-TCP"),
        ("ACCEPT", "KUBE-HEALTH-CHECK-NODE-PORT"),
    ]
    assert ("RETURN", "KUBE-HEALTH-CHECK-NODE-PORT") in chain_targets(result, "KUBE-IPVS-FILTER")


def test_health_check_node_port_follows_the_service() -> None:
    """TestHealthCheckNodePortE2E (its Service has no NodePort): the set holds the current
    port, and nothing once the Service is gone."""

    def service(health_check_port: int) -> dict[str, Any]:
        spec = {"externalTrafficPolicy": "Local", "healthCheckNodePort": health_check_port}
        return o.service("ns1", "svc1", "172.20.1.1", [o.port("", 80)], type="LoadBalancer", **spec)

    first = rendered(trackers(service(30000))).state
    assert first.ipsets["KUBE-HEALTH-CHECK-NODE-PORT"] == {"30000"}
    moved = rendered(trackers(service(30001))).state
    assert moved.ipsets["KUBE-HEALTH-CHECK-NODE-PORT"] == {"30001"}
    assert rendered(trackers()).state.ipsets["KUBE-HEALTH-CHECK-NODE-PORT"] == set()


# --- load balancers -------------------------------------------------------------------------


def lb(source_ranges: list[str] | None = None, **spec: Any) -> dict[str, Any]:
    if source_ranges is not None:
        spec["loadBalancerSourceRanges"] = source_ranges
    spec.setdefault("status", {"loadBalancer": {"ingress": [{"ip": "1.2.3.4"}]}})
    return o.service("ns1", "svc1", "10.20.30.41", [o.port("p80", 80, nodePort=3001)],
                     type="LoadBalancer", **spec)  # fmt: skip


def lb_endpoints(*eps: tuple[str, str | None, str]) -> dict[str, Any]:
    return endpoints("ns1", "svc1", o.port("p80", 80), *eps)


def test_load_balancer() -> None:
    """TestLoadBalancer: the LB IP in KUBE-LOAD-BALANCER, KUBE-SERVICES jumping there."""
    result = rendered(trackers(lb(), lb_endpoints(("10.180.0.1", None, READY))))
    assert real(result.state, vs("1.2.3.4", 80)) == ["10.180.0.1:80"]
    assert result.state.ipsets["KUBE-LOAD-BALANCER"] == {"1.2.3.4,tcp:80"}
    assert chain_targets(result, "KUBE-SERVICES") == [
        ("RETURN", ""),
        ("KUBE-LOAD-BALANCER", "KUBE-LOAD-BALANCER"),
        ("KUBE-MARK-MASQ", "KUBE-CLUSTER-IP"),
        ("KUBE-NODE-PORT", ""),
        ("ACCEPT", "KUBE-CLUSTER-IP"),
        ("ACCEPT", "KUBE-LOAD-BALANCER"),
    ]
    assert chain_targets(result, "KUBE-LOAD-BALANCER") == [("KUBE-MARK-MASQ", "")]


def test_load_balancer_source_ranges() -> None:
    """TestLoadBalancerSourceRanges (node IP unset, so not in the range); the
    KUBE-IPVS-OUT-FILTER drop, which that test does not check, is derived from upstream's
    writeIptablesRules: the node may not reach an LB whose ranges leave it out."""
    objects = trackers(lb(["10.0.0.0/8"]), lb_endpoints(("10.180.0.1", None, READY)))
    result = rendered(objects)
    assert len(result.state.services) == 2
    assert real(result.state, vs("1.2.3.4", 80)) == ["10.180.0.1:80"]
    non_empty = {name: entries for name, entries in result.state.ipsets.items() if entries}
    assert {k: v for k, v in non_empty.items() if "LOAD-BALANCER" in k} == {
        "KUBE-LOAD-BALANCER": {"1.2.3.4,tcp:80"},
        "KUBE-LOAD-BALANCER-FW": {"1.2.3.4,tcp:80"},
        "KUBE-LOAD-BALANCER-SOURCE-CIDR": {"1.2.3.4,tcp:80,10.0.0.0/8"},
    }
    assert chain_targets(result, "KUBE-PROXY-FIREWALL") == [
        ("KUBE-SOURCE-RANGES-FIREWALL", "KUBE-LOAD-BALANCER-FW")
    ]
    assert chain_targets(result, "KUBE-SOURCE-RANGES-FIREWALL") == [
        ("RETURN", "KUBE-LOAD-BALANCER-SOURCE-CIDR"),
        ("DROP", ""),
    ]
    assert result.filter.chains["KUBE-IPVS-OUT-FILTER"] == [
        ("-s", "1.2.3.4", "-m", "ipvs", "--vaddr", "1.2.3.4", "--vproto", "tcp",
         "--vport", "80", "-j", "DROP"),
    ]  # fmt: skip


def test_source_range_holding_the_node_ip_admits_the_lb_ip() -> None:
    """Upstream's syncProxyRules: a range holding the node's IP puts lbIP,proto:port,lbIP
    in KUBE-LOAD-BALANCER-SOURCE-IP (IPVS answers the node from the LB IP) and writes no
    KUBE-IPVS-OUT-FILTER drop."""
    objects = trackers(lb(["10.0.0.0/8", "192.168.0.0/24"]))
    node = NodeFacts("test-node", ip=ip_address("192.168.0.2"))
    result = rendered(objects, node)
    assert result.state.ipsets["KUBE-LOAD-BALANCER-SOURCE-IP"] == {"1.2.3.4,tcp:80,1.2.3.4"}
    assert result.filter.chains["KUBE-IPVS-OUT-FILTER"] == []
    assert chain_targets(result, "KUBE-SOURCE-RANGES-FIREWALL") == [
        ("RETURN", "KUBE-LOAD-BALANCER-SOURCE-CIDR"),
        ("RETURN", "KUBE-LOAD-BALANCER-SOURCE-IP"),
        ("DROP", ""),
    ]


def test_only_local_load_balancing() -> None:
    """TestOnlyLocalLoadBalancing: the LB virtual server gets the local endpoint only, the
    LB IP is in KUBE-LOAD-BALANCER-LOCAL, whose rule returns before the masquerade."""
    objects = trackers(
        lb(externalTrafficPolicy="Local"),
        lb_endpoints(("10.180.0.1", "test-node", READY), ("10.180.1.1", "other-node", READY)),
    )
    result = rendered(objects)
    assert len(result.state.services) == 2  # no node IP: no NodePort virtual server
    assert real(result.state, vs("1.2.3.4", 80)) == ["10.180.0.1:80"]
    assert result.state.ipsets["KUBE-LOAD-BALANCER"] == {"1.2.3.4,tcp:80"}
    assert result.state.ipsets["KUBE-LOAD-BALANCER-LOCAL"] == {"1.2.3.4,tcp:80"}
    assert chain_targets(result, "KUBE-LOAD-BALANCER") == [
        ("RETURN", "KUBE-LOAD-BALANCER-LOCAL"),
        ("KUBE-MARK-MASQ", ""),
    ]


@pytest.mark.parametrize(("ip_mode", "virtual_servers"), [("Proxy", 1), ("VIP", 2), (None, 2)])
def test_load_balancer_ingress_in_proxy_mode(ip_mode: str | None, virtual_servers: int) -> None:
    """TestLoadBalancerIngressRouteTypeProxy (LoadBalancerIPMode on, as it is GA): an
    ingress in ipMode Proxy gets no virtual server."""
    ingress: dict[str, Any] = {"ip": "1.2.3.4", **({"ipMode": ip_mode} if ip_mode else {})}
    svc = lb(status={"loadBalancer": {"ingress": [ingress]}})
    state = rendered(trackers(svc, lb_endpoints(("10.180.0.1", None, READY)))).state
    assert len(state.services) == virtual_servers


def test_accept_ipvs_traffic_order() -> None:
    """TestAcceptIPVSTraffic: KUBE-SERVICES with a ClusterIP+externalIP, an LB and a
    NodePort Service (one TCP port each, NodePort 80)."""
    services = []
    for kind, cluster_ip, name in (("ClusterIP", "10.20.30.40", "svc1"),
                                   ("LoadBalancer", "10.20.30.41", "svc2"),
                                   ("NodePort", "10.20.30.42", "svc3")):  # fmt: skip
        spec: dict[str, Any] = {"type": kind}
        if kind == "LoadBalancer":
            spec["status"] = {"loadBalancer": {"ingress": [{"ip": "1.2.3.4"}]}}
        if kind == "ClusterIP":
            spec["externalIPs"] = ["5.6.7.8"]
        services.append(
            o.service("ns1", name, cluster_ip, [o.port("p80", 80, nodePort=80)], **spec)
        )
    result = rendered(trackers(*services))
    assert chain_targets(result, "KUBE-SERVICES") == [
        ("RETURN", ""),
        ("KUBE-LOAD-BALANCER", "KUBE-LOAD-BALANCER"),
        ("KUBE-MARK-MASQ", "KUBE-CLUSTER-IP"),
        ("KUBE-MARK-MASQ", "KUBE-EXTERNAL-IP"),
        ("ACCEPT", "KUBE-EXTERNAL-IP"),
        ("ACCEPT", "KUBE-EXTERNAL-IP"),
        ("KUBE-NODE-PORT", ""),
        ("ACCEPT", "KUBE-CLUSTER-IP"),
        ("ACCEPT", "KUBE-LOAD-BALANCER"),
    ]


# --- external IPs and affinity --------------------------------------------------------------


def test_external_ips_without_endpoints() -> None:
    """TestExternalIPsNoEndpoint: two virtual servers, the external one without real
    servers."""
    svc = o.service("ns1", "svc1", "10.20.30.41", [o.port("p80", 80)], externalIPs=["50.60.70.81"])
    state = rendered(trackers(svc)).state
    assert len(state.services) == 2
    assert state.real_servers[vs("50.60.70.81", 80)] == set()


def test_only_local_external_ips() -> None:
    """TestOnlyLocalExternalIPs (its IPv4 addresses): every external IP's virtual server
    has the one local endpoint; the addresses go to KUBE-EXTERNAL-IP-LOCAL."""
    external = {"externalIPs": ["50.60.70.81", "127.0.0.1"], "externalTrafficPolicy": "Local"}
    svc = o.service("ns1", "svc1", "10.20.30.41", [o.port("p80", 80)], type="NodePort", **external)
    eps = endpoints("ns1", "svc1", o.port("p80", 80), ("10.180.0.1", "test-node", READY),
                    ("10.180.1.1", "other-node", READY))  # fmt: skip
    state = rendered(trackers(svc, eps)).state
    assert len(state.services) == 3
    for address in ("50.60.70.81", "127.0.0.1"):
        assert real(state, vs(address, 80)) == ["10.180.0.1:80"]
    assert state.ipsets["KUBE-EXTERNAL-IP-LOCAL"] == {"50.60.70.81,tcp:80", "127.0.0.1,tcp:80"}
    assert state.ipsets["KUBE-EXTERNAL-IP"] == set()


def test_session_affinity_is_the_persistence_timeout() -> None:
    """TestSessionAffinity: every virtual server of a ClientIP Service is persistent for the
    default 10800 s."""
    svc = node_port_service(externalIPs=["50.60.70.81"], sessionAffinity="ClientIP")
    state = rendered(trackers(svc), node_ips=[str(NODE_IP)]).state
    assert len(state.services) == 3
    assert set(state.services.values()) == {ServiceOptions("rr", 10800)}


# --- endpoint choice ------------------------------------------------------------------------


def policy_service(
    internal: str = "Cluster", external: str = "", node_port: int = 30000, **spec: Any
) -> dict[str, Any]:
    """TestNoEndpointsMetric's Service (port p80, NodePort 30000 even as a ClusterIP type,
    which makes it externally accessible); the others have an unnamed port and no NodePort."""
    if external:
        spec.update(type="NodePort", externalTrafficPolicy=external)
    port = o.port("p80", 80, nodePort=node_port) if node_port else o.port("", 80)
    return o.service("ns1", "svc1", "172.20.1.1", [port], internalTrafficPolicy=internal, **spec)


def ready_on(*nodes: str, port_name: str = "p80") -> dict[str, Any]:
    eps = [(f"10.0.1.{i + 1}", node, READY) for i, node in enumerate(nodes)]
    return endpoints("ns1", "svc1", o.port(port_name, 80), *eps)


@pytest.mark.parametrize(
    ("policy", "nodes", "loop_back", "real_servers"),
    [
        (
            "Cluster",
            ("test-node", "node1", "node2"),
            1,
            ["10.0.1.1:80", "10.0.1.2:80", "10.0.1.3:80"],
        ),
        ("Cluster", ("node0", "node1", "node2"), 0, ["10.0.1.1:80", "10.0.1.2:80", "10.0.1.3:80"]),
        ("Local", ("test-node", "node1", "node2"), 1, ["10.0.1.1:80"]),
        ("Local", ("node0", "node1", "node2"), 0, []),
    ],
)
def test_internal_traffic_policy(
    policy: str, nodes: tuple[str, ...], loop_back: int, real_servers: list[str]
) -> None:
    """TestTestInternalTrafficPolicyE2E: with no local endpoint, a Local-policy ClusterIP
    Service keeps its virtual server with no real server (its cluster-wide set is empty);
    with the slice deleted, every case has no real server and no hairpin entry."""
    svc = policy_service(policy, node_port=0)
    state = rendered(trackers(svc, ready_on(*nodes, port_name=""))).state
    assert len(state.ipsets["KUBE-LOOP-BACK"]) == loop_back
    assert real(state, vs("172.20.1.1", 80)) == real_servers
    state = rendered(trackers(svc)).state
    assert state.ipsets["KUBE-LOOP-BACK"] == set()
    assert state.real_servers == {vs("172.20.1.1", 80): set()}


def conditions_case(external: str) -> ServicesAndEndpoints:
    """The Service and slice of upstream's Test_EndpointSliceReadyAndTerminating* cases."""
    svc = policy_service("Cluster", external, node_port=0, externalIPs=["1.2.3.4"])
    return trackers(svc, endpoints("ns1", "svc1", o.port("", 80),
        ("10.0.1.1", "test-node", "ready serving"), ("10.0.1.2", "test-node", "ready serving"),
        ("10.0.1.3", "test-node", TERMINATING), ("10.0.1.4", "test-node", GONE),
        ("10.0.1.5", "another-node", "ready serving")))  # fmt: skip


def only_terminating_case(external: str) -> ServicesAndEndpoints:
    """The Service and slice of upstream's Test_EndpointSliceOnlyReadyAndTerminating*."""
    svc = policy_service("Cluster", external, node_port=0, externalIPs=["1.2.3.4"])
    return trackers(svc, endpoints("ns1", "svc1", o.port("", 80),
        ("10.0.1.1", "test-node", TERMINATING), ("10.0.1.2", "test-node", TERMINATING),
        ("10.0.1.3", "test-node", GONE), ("10.0.1.4", "another-node", TERMINATING),
        ("10.0.1.5", "another-node", "" if external == "Cluster" else READY)))  # fmt: skip


@pytest.mark.parametrize(
    ("case", "external", "loop_back", "cluster_ip", "external_ip"),
    [  # Test_EndpointSliceReadyAndTerminatingCluster, ...Local, then the OnlyReady ones
        (conditions_case, "Cluster", 4, ["10.0.1.1:80", "10.0.1.2:80", "10.0.1.5:80"],
         ["10.0.1.1:80", "10.0.1.2:80", "10.0.1.5:80"]),
        (conditions_case, "Local", 4, ["10.0.1.1:80", "10.0.1.2:80", "10.0.1.5:80"],
         ["10.0.1.1:80", "10.0.1.2:80"]),
        (only_terminating_case, "Cluster", 3, ["10.0.1.1:80", "10.0.1.2:80", "10.0.1.4:80"],
         ["10.0.1.1:80", "10.0.1.2:80", "10.0.1.4:80"]),
        (only_terminating_case, "Local", 3, ["10.0.1.5:80"], ["10.0.1.1:80", "10.0.1.2:80"]),
    ],
)  # fmt: skip
def test_ready_and_terminating_endpoints(
    case: Any, external: str, loop_back: int, cluster_ip: list[str], external_ip: list[str]
) -> None:
    """Upstream's Test_EndpointSlice*ReadyAndTerminating* cases: ready endpoints win, the
    terminating-but-serving ones are the fallback of each set on its own, every local
    endpoint (serving or not) gets a hairpin entry."""
    state = rendered(case(external)).state
    assert len(state.ipsets["KUBE-LOOP-BACK"]) == loop_back
    assert real(state, vs("172.20.1.1", 80)) == cluster_ip
    assert real(state, vs("1.2.3.4", 80)) == external_ip


def test_not_ready_endpoints_are_ignored() -> None:
    """TestEndpointSliceE2E: three ready endpoints are real servers, the not-ready one is
    not; only the local one is in KUBE-LOOP-BACK."""
    svc = o.service("ns1", "svc1", "172.20.1.1", [o.port("", 80)])
    eps = endpoints("ns1", "svc1", o.port("", 80), ("10.0.1.1", "test-node", READY),
                    ("10.0.1.2", "node2", READY), ("10.0.1.3", "node3", READY),
                    ("10.0.1.4", "node3", ""))  # fmt: skip
    state = rendered(trackers(svc, eps)).state
    assert state.ipsets["KUBE-LOOP-BACK"] == {"10.0.1.1,tcp:80,10.0.1.1"}
    assert real(state, vs("172.20.1.1", 80)) == ["10.0.1.1:80", "10.0.1.2:80", "10.0.1.3:80"]


def test_local_policy_without_local_endpoints_falls_back_to_the_cluster() -> None:
    """Upstream's syncEndpoint (PR 97081): an external virtual server of a Local-policy
    Service with no endpoint on this node gets the cluster-wide endpoints, so the node's
    own pods still reach it; the ClusterIP (policy Cluster) is unaffected."""
    objects = trackers(policy_service("Cluster", "Local"), ready_on("node0", "node1"))
    state = rendered(objects, node_ips=[str(NODE_IP)]).state
    both = ["10.0.1.1:80", "10.0.1.2:80"]
    assert real(state, vs(str(NODE_IP), 30000)) == both
    assert real(state, vs("172.20.1.1", 80)) == both


def test_topology_hints_narrow_the_cluster_endpoints() -> None:
    """Hints reach IPVS mode through CategorizeEndpoints, as upstream's syncEndpoint calls
    it: every ready endpoint has a zone hint and one is for this node's zone."""
    eps = ready_on("node0", "node1", "node2")
    for endpoint, zone in zip(eps["endpoints"], ("a", "b", "a"), strict=True):
        endpoint["hints"] = {"forZones": [{"name": zone}]}
    state = rendered(trackers(policy_service(), eps), NodeFacts("test-node", zone="a")).state
    assert real(state, vs("172.20.1.1", 80)) == ["10.0.1.1:80", "10.0.1.3:80"]


@pytest.mark.parametrize(
    ("internal", "external", "nodes", "expected"),
    [
        ("Local", "", ("test-node", "node1", "node2"), {"internal": 0, "external": 0}),
        ("Cluster", "Local", ("test-node", "node1", "node2"), {"internal": 0, "external": 0}),
        ("Local", "Local", ("test-node", "node1", "node2"), {"internal": 0, "external": 0}),
        ("Local", "", ("node0", "node1", "node2"), {"internal": 1, "external": 0}),
        ("Cluster", "Local", ("node0", "node1", "node2"), {"internal": 0, "external": 1}),
        ("Local", "Local", ("node0", "node1", "node2"), {"internal": 1, "external": 1}),
        ("Local", "Local", (), {"internal": 0, "external": 0}),
    ],
)
def test_no_local_endpoints_metric(
    internal: str, external: str, nodes: tuple[str, ...], expected: dict[str, int]
) -> None:
    """TestNoEndpointsMetric (node IP 10.0.0.1): a Service counts once per policy, when it
    has endpoints but none on this node."""
    objects = trackers(policy_service(internal, external), ready_on(*nodes))
    assert rendered(objects, node_ips=["10.0.0.1"]).no_local_endpoints == expected


# --- the backend ----------------------------------------------------------------------------


class FakeIpvs:
    def __init__(self, error: Exception | None = None) -> None:
        self.error = error
        self.applied: list[IpvsState] = []
        self.drained = 0

    def apply(self, state: IpvsState, full: bool = True) -> None:
        self.applied.append(state)
        if self.error is not None:
            raise self.error

    def drain(self) -> None:
        self.drained += 1

    def draining(self) -> dict[tuple[VirtualServer, RealServer], float]:
        return {}


class FakeIptables:
    def __init__(self) -> None:
        self.applied: list[list[TableState]] = []

    def apply(self, tables: list[TableState]) -> None:
        self.applied.append(tables)


def backend(ipvs: FakeIpvs, iptables: FakeIptables, metrics: Metrics) -> IpvsBackend:
    addresses: list[IPAddress] = [NODE_IP, ip_address("127.0.0.1")]
    return IpvsBackend(IpvsConfig(), ipvs, iptables, metrics, lambda: addresses,
                       (ip_network("100.101.102.0/24"),))  # fmt: skip


def gauge(metrics: Metrics, name: str, **labels: str) -> float | None:
    return metrics.registry.get_sample_value(name, labels)


def test_backend_sets_the_no_local_endpoints_metric() -> None:
    metrics, ipvs = Metrics(mode="ipvs"), FakeIpvs()
    svcs, eps = trackers(policy_service("Local", "Local"), ready_on("node0"))
    backend(ipvs, FakeIptables(), metrics).sync(
        svcs.service_map, eps.endpoints_map, None, TEST_NODE
    )
    name = "kubeproxy_sync_proxy_rules_no_local_endpoints_total"
    assert gauge(metrics, name, ip_family="IPv4", traffic_policy="internal") == 1
    assert gauge(metrics, name, ip_family="IPv4", traffic_policy="external") == 1
    assert vs(str(NODE_IP), 30000) in ipvs.applied[0].services  # NodePorts on the node IP only
    assert len(ipvs.applied[0].services) == 2


def test_a_refused_service_still_lets_the_rest_through() -> None:
    """One bad Service never blocks the others: the iptables half, draining and metrics
    follow, and the sync still fails."""
    metrics, iptables = Metrics(mode="ipvs"), FakeIptables()
    ipvs = FakeIpvs(KernelRefused("IPVS sync: 1 kernel errors: Service ns1/svc1:p80: ..."))
    svcs, eps = trackers(policy_service(), ready_on("node0"))
    with pytest.raises(KernelRefused, match="ns1/svc1"):
        backend(ipvs, iptables, metrics).sync(svcs.service_map, eps.endpoints_map, None, TEST_NODE)
    assert len(iptables.applied) == 1 and ipvs.drained == 1
    assert gauge(metrics, "pykubeproxy_ipvs_virtual_servers") == 2  # ClusterIP and NodePort


def test_an_unusable_kernel_stops_the_sync() -> None:
    """Anything but a per-Service refusal (no ip_vs, no kube-ipvs0) stops before the
    iptables half, whose rules would name sets that may not exist (upstream returns)."""
    iptables = FakeIptables()
    ipvs = FakeIpvs(RuntimeError("IPVS sync failed: no ip_vs"))
    svcs, eps = trackers(policy_service())
    with pytest.raises(RuntimeError, match="no ip_vs"):
        backend(ipvs, iptables, Metrics()).sync(
            svcs.service_map, eps.endpoints_map, None, TEST_NODE
        )
    assert iptables.applied == []


def test_ownership_covers_both_modes_chains_but_not_kubelets() -> None:
    """The iptables applier deletes owned chains a sync does not write: every chain either
    mode writes must be owned (so a mode switch leaves nothing behind), kubelet's not."""
    svcs, eps = trackers(lb(["10.0.0.0/8"]), lb_endpoints(("10.180.0.1", None, READY)))
    for table in rendered((svcs, eps)).tables:
        assert all(is_owned(chain) for chain in table.chains)
    iptables_mode = Renderer(RenderConfig()).render(svcs.service_map, eps.endpoints_map)
    for table in iptables_mode.tables:
        assert all(is_owned(chain) for chain in table.chains)
    assert not any(map(is_owned, ("KUBE-FIREWALL", "KUBE-KUBELET-CANARY", "INPUT", "DOCKER")))
