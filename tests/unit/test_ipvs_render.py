"""IPVS mode's rendered state against kube-proxy's ipvs proxier (docs/kube-proxy-ipvs-facts.md)."""

from __future__ import annotations

from ipaddress import ip_address, ip_network

import objects as o

from pykubeproxy.changes import EndpointsChangeTracker, ServiceChangeTracker
from pykubeproxy.iptables.ruleset import restore_text
from pykubeproxy.ipvs.render import IpvsConfig, render_state, render_tables
from pykubeproxy.ipvs.state import RealServer, ServiceOptions, VirtualServer
from pykubeproxy.model import NamespacedName, Protocol

NODE_IP = ip_address("100.101.102.103")

# kube-proxy's writeIptablesRules output for this Service (facts doc, section 10), with the
# mark written as iptables-save shows it (0x4000, not Go's %#08x form 0x00004000).
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


def trackers(*objects: dict) -> tuple[ServiceChangeTracker, EndpointsChangeTracker]:  # type: ignore[type-arg]
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


def node_port_service(
    node_name: str | None = None,
) -> tuple[ServiceChangeTracker, EndpointsChangeTracker]:
    eps = o.endpoint_slice("ns1", "svc1", ["10.180.0.1"], [o.port("p80", 80)])
    if node_name:
        eps["endpoints"][0]["nodeName"] = node_name
    return trackers(
        o.service(
            "ns1", "svc1", "10.20.30.41", [o.port("p80", 80, nodePort=3001)], type="NodePort"
        ),
        eps,
    )


def test_node_port_service_matches_kube_proxy() -> None:
    svcs, eps = node_port_service()
    cfg = IpvsConfig(node_name="node-1")
    state = render_state(svcs.service_map, eps.endpoints_map, cfg, (NODE_IP,), frozenset({NODE_IP}))
    assert restore_text(list(render_tables(state, cfg))) == EXPECTED
    cluster = VirtualServer(ip_address("10.20.30.41"), 80, Protocol.TCP)
    node_port = VirtualServer(NODE_IP, 3001, Protocol.TCP)
    assert state.services == {cluster: ServiceOptions("rr"), node_port: ServiceOptions("rr")}
    real = {RealServer(ip_address("10.180.0.1"), 80)}
    assert state.real_servers == {cluster: real, node_port: real}
    assert state.addresses == {ip_address("10.20.30.41")}
    non_empty = {name: entries for name, entries in state.ipsets.items() if entries}
    assert non_empty == {
        "KUBE-CLUSTER-IP": {"10.20.30.41,tcp:80"},
        "KUBE-NODE-PORT-TCP": {"3001"},
        "KUBE-IPVS-IPS": {"10.20.30.41"},
    }
    assert len(state.ipsets) == 17


def test_local_endpoints_get_the_hairpin_set_and_rule() -> None:
    svcs, eps = node_port_service(node_name="node-1")
    cfg = IpvsConfig(node_name="node-1", cluster_cidr=(ip_network("10.0.0.0/8"),))
    state = render_state(svcs.service_map, eps.endpoints_map, cfg, (NODE_IP,), frozenset())
    assert state.ipsets["KUBE-LOOP-BACK"] == {"10.180.0.1,tcp:80,10.180.0.1"}
    nat, _ = render_tables(state, cfg)
    assert nat.chains["KUBE-POSTROUTING"][0] == (
        "-m",
        "comment",
        "--comment",
        "Kubernetes endpoints dst ip:port, source ip for solving hairpin purpose",
        "-m",
        "set",
        "--match-set",
        "KUBE-LOOP-BACK",
        "dst,dst,src",
        "-j",
        "MASQUERADE",
    )
    assert nat.chains["KUBE-SERVICES"][1][-5:] == ("!", "-s", "10.0.0.0/8", "-j", "KUBE-MARK-MASQ")


def test_external_lb_affinity_and_kube_services_order() -> None:
    svcs, eps = trackers(
        o.service(
            "ns",
            "lb",
            "10.96.0.5",
            [o.port("http", 80, "UDP", nodePort=30005)],
            type="LoadBalancer",
            externalIPs=["203.0.113.9", "100.101.102.103"],
            sessionAffinity="ClientIP",
            status={"loadBalancer": {"ingress": [{"ip": "198.51.100.20"}]}},
        ),
        o.endpoint_slice("ns", "lb", ["10.244.0.2", "10.244.0.3"], [o.port("http", 53, "UDP")]),
    )
    cfg = IpvsConfig(scheduler="wrr", masquerade_all=True)
    state = render_state(svcs.service_map, eps.endpoints_map, cfg, (NODE_IP,), frozenset({NODE_IP}))
    assert state.addresses == {ip_address(a) for a in ("10.96.0.5", "203.0.113.9", "198.51.100.20")}
    assert set(state.services.values()) == {ServiceOptions("wrr", 10800)}
    assert len(state.services) == 5  # cluster IP, 2 external IPs, LB IP, node port
    assert state.ipsets["KUBE-EXTERNAL-IP"] == {"203.0.113.9,udp:80", "100.101.102.103,udp:80"}
    assert state.ipsets["KUBE-LOAD-BALANCER"] == {"198.51.100.20,udp:80"}
    assert state.ipsets["KUBE-NODE-PORT-UDP"] == {"30005"}
    nat, _ = render_tables(state, cfg)
    targets = [
        (rule[-1], rule[rule.index("--match-set") + 1] if "--match-set" in rule else "")
        for rule in nat.chains["KUBE-SERVICES"]
    ]
    assert targets == [  # upstream TestAcceptIPVSTraffic order
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
