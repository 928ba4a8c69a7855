"""Golden tests: rendered rules against kube-proxy's own expected iptables-restore text.

`EXPECTED` is upstream's `TestOverallIPTablesRules` expectation (kubernetes/kubernetes
pkg/proxy/iptables/proxier_test.go, the version with nfacct counters and localhost
NodePort counting rules), unedited, for the same Services, EndpointSlices and proxier
settings (node "test-node" at 192.168.0.2, cluster CIDR 10.0.0.0/8 as the local-traffic
detector, no --random-fully as upstream's fake iptables has none).

Where upstream's test fake differs from a real node, `as_on_this_node` says how, once:
- upstream's fake has nfacct counters; pykubeproxy exports no nfacct-based metrics and
  writes what upstream writes on a node without them: no `-m nfacct` match on the
  INVALID drop, and no localhost-NodePort rule that exists only to count;
- the KUBE-PROXY-CANARY chains, which upstream creates outside its restore, are in the
  agent's transaction.
"""

from __future__ import annotations

from ipaddress import ip_address, ip_network

import objects as o

from pykubeproxy.changes import EndpointsChangeTracker, ServiceChangeTracker
from pykubeproxy.iptables.render import (
    LocalDetector,
    RenderConfig,
    Rendered,
    Renderer,
    endpoint_chain,
    probability,
    service_chain,
)
from pykubeproxy.iptables.ruleset import CANARY, restore_text
from pykubeproxy.model import Endpoint, NamespacedName, NodeFacts, Protocol, ServicePortName

TEST_NODE = NodeFacts("test-node", ip=ip_address("192.168.0.2"))
UPSTREAM_TEST_CONFIG = RenderConfig(
    local_detector=LocalDetector.by_cidr(ip_network("10.0.0.0/8")), random_fully=False
)

EXPECTED = """
*filter
:KUBE-NODEPORTS - [0:0]
:KUBE-SERVICES - [0:0]
:KUBE-EXTERNAL-SERVICES - [0:0]
:KUBE-FIREWALL - [0:0]
:KUBE-FORWARD - [0:0]
:KUBE-PROXY-FIREWALL - [0:0]
-A KUBE-NODEPORTS -m comment --comment "ns2/svc2:p80 health check node port" -m tcp -p tcp --dport 30000 -j ACCEPT
-A KUBE-SERVICES -m comment --comment "ns6/svc6:p80 has no endpoints" -m tcp -p tcp -d 172.30.0.46 --dport 80 -j REJECT
-A KUBE-EXTERNAL-SERVICES -m comment --comment "ns2/svc2:p80 has no local endpoints" -m tcp -p tcp -d 192.168.99.22 --dport 80 -j DROP
-A KUBE-EXTERNAL-SERVICES -m comment --comment "ns2/svc2:p80 has no local endpoints" -m tcp -p tcp -d 1.2.3.4 --dport 80 -j DROP
-A KUBE-EXTERNAL-SERVICES -m comment --comment "ns2/svc2:p80 has no local endpoints" -m addrtype --dst-type LOCAL -m tcp -p tcp --dport 3001 -j DROP
-A KUBE-FIREWALL -m comment --comment "block incoming localnet connections" -d 127.0.0.0/8 ! -s 127.0.0.0/8 -m conntrack ! --ctstate RELATED,ESTABLISHED,DNAT -j DROP
-A KUBE-FORWARD -m conntrack --ctstate INVALID -m nfacct --nfacct-name ct_state_invalid_dropped_pkts -j DROP
-A KUBE-FORWARD -m comment --comment "kubernetes forwarding rules" -m mark --mark 0x4000/0x4000 -j ACCEPT
-A KUBE-FORWARD -m comment --comment "kubernetes forwarding conntrack rule" -m conntrack --ctstate RELATED,ESTABLISHED -j ACCEPT
-A KUBE-PROXY-FIREWALL -m comment --comment "ns5/svc5:p80 traffic not accepted by KUBE-FW-NUKIZ6OKUXPJNT4C" -m tcp -p tcp -d 5.6.7.8 --dport 80 -j DROP
COMMIT
*nat
:KUBE-NODEPORTS - [0:0]
:KUBE-SERVICES - [0:0]
:KUBE-EXT-4SW47YFZTEDKD3PK - [0:0]
:KUBE-EXT-GNZBNJ2PO5MGZ6GT - [0:0]
:KUBE-EXT-NUKIZ6OKUXPJNT4C - [0:0]
:KUBE-EXT-X27LE4BHSL4DOUIK - [0:0]
:KUBE-FW-NUKIZ6OKUXPJNT4C - [0:0]
:KUBE-MARK-MASQ - [0:0]
:KUBE-POSTROUTING - [0:0]
:KUBE-SEP-C6EBXVWJJZMIWKLZ - [0:0]
:KUBE-SEP-I77PXRDZVX7PMWMN - [0:0]
:KUBE-SEP-OYPFS5VJICHGATKP - [0:0]
:KUBE-SEP-RS4RBKLTHTF2IUXJ - [0:0]
:KUBE-SEP-SXIVWICOYRO3J4NJ - [0:0]
:KUBE-SEP-UKSFD7AGPMPPLUHC - [0:0]
:KUBE-SVC-4SW47YFZTEDKD3PK - [0:0]
:KUBE-SVC-GNZBNJ2PO5MGZ6GT - [0:0]
:KUBE-SVC-NUKIZ6OKUXPJNT4C - [0:0]
:KUBE-SVC-X27LE4BHSL4DOUIK - [0:0]
:KUBE-SVC-XPGD46QRK7WJZT7O - [0:0]
-A KUBE-NODEPORTS -m comment --comment ns2/svc2:p80 -m tcp -p tcp -d 127.0.0.0/8 --dport 3001 -m nfacct --nfacct-name localhost_nps_accepted_pkts -j KUBE-EXT-GNZBNJ2PO5MGZ6GT
-A KUBE-NODEPORTS -m comment --comment ns2/svc2:p80 -m tcp -p tcp --dport 3001 -j KUBE-EXT-GNZBNJ2PO5MGZ6GT
-A KUBE-NODEPORTS -m comment --comment ns3/svc3:p80 -m tcp -p tcp -d 127.0.0.0/8 --dport 3003 -m nfacct --nfacct-name localhost_nps_accepted_pkts -j KUBE-EXT-X27LE4BHSL4DOUIK
-A KUBE-NODEPORTS -m comment --comment ns3/svc3:p80 -m tcp -p tcp --dport 3003 -j KUBE-EXT-X27LE4BHSL4DOUIK
-A KUBE-NODEPORTS -m comment --comment ns5/svc5:p80 -m tcp -p tcp -d 127.0.0.0/8 --dport 3002 -m nfacct --nfacct-name localhost_nps_accepted_pkts -j KUBE-EXT-NUKIZ6OKUXPJNT4C
-A KUBE-NODEPORTS -m comment --comment ns5/svc5:p80 -m tcp -p tcp --dport 3002 -j KUBE-EXT-NUKIZ6OKUXPJNT4C
-A KUBE-SERVICES -m comment --comment "ns1/svc1:p80 cluster IP" -m tcp -p tcp -d 172.30.0.41 --dport 80 -j KUBE-SVC-XPGD46QRK7WJZT7O
-A KUBE-SERVICES -m comment --comment "ns2/svc2:p80 cluster IP" -m tcp -p tcp -d 172.30.0.42 --dport 80 -j KUBE-SVC-GNZBNJ2PO5MGZ6GT
-A KUBE-SERVICES -m comment --comment "ns2/svc2:p80 external IP" -m tcp -p tcp -d 192.168.99.22 --dport 80 -j KUBE-EXT-GNZBNJ2PO5MGZ6GT
-A KUBE-SERVICES -m comment --comment "ns2/svc2:p80 loadbalancer IP" -m tcp -p tcp -d 1.2.3.4 --dport 80 -j KUBE-EXT-GNZBNJ2PO5MGZ6GT
-A KUBE-SERVICES -m comment --comment "ns3/svc3:p80 cluster IP" -m tcp -p tcp -d 172.30.0.43 --dport 80 -j KUBE-SVC-X27LE4BHSL4DOUIK
-A KUBE-SERVICES -m comment --comment "ns4/svc4:p80 cluster IP" -m tcp -p tcp -d 172.30.0.44 --dport 80 -j KUBE-SVC-4SW47YFZTEDKD3PK
-A KUBE-SERVICES -m comment --comment "ns4/svc4:p80 external IP" -m tcp -p tcp -d 192.168.99.33 --dport 80 -j KUBE-EXT-4SW47YFZTEDKD3PK
-A KUBE-SERVICES -m comment --comment "ns5/svc5:p80 cluster IP" -m tcp -p tcp -d 172.30.0.45 --dport 80 -j KUBE-SVC-NUKIZ6OKUXPJNT4C
-A KUBE-SERVICES -m comment --comment "ns5/svc5:p80 loadbalancer IP" -m tcp -p tcp -d 5.6.7.8 --dport 80 -j KUBE-FW-NUKIZ6OKUXPJNT4C
-A KUBE-SERVICES -m comment --comment "kubernetes service nodeports; NOTE: this must be the last rule in this chain" -m addrtype --dst-type LOCAL -j KUBE-NODEPORTS
-A KUBE-EXT-4SW47YFZTEDKD3PK -m comment --comment "masquerade traffic for ns4/svc4:p80 external destinations" -j KUBE-MARK-MASQ
-A KUBE-EXT-4SW47YFZTEDKD3PK -j KUBE-SVC-4SW47YFZTEDKD3PK
-A KUBE-EXT-GNZBNJ2PO5MGZ6GT -m comment --comment "pod traffic for ns2/svc2:p80 external destinations" -s 10.0.0.0/8 -j KUBE-SVC-GNZBNJ2PO5MGZ6GT
-A KUBE-EXT-GNZBNJ2PO5MGZ6GT -m comment --comment "masquerade LOCAL traffic for ns2/svc2:p80 external destinations" -m addrtype --src-type LOCAL -j KUBE-MARK-MASQ
-A KUBE-EXT-GNZBNJ2PO5MGZ6GT -m comment --comment "route LOCAL traffic for ns2/svc2:p80 external destinations" -m addrtype --src-type LOCAL -j KUBE-SVC-GNZBNJ2PO5MGZ6GT
-A KUBE-EXT-NUKIZ6OKUXPJNT4C -m comment --comment "masquerade traffic for ns5/svc5:p80 external destinations" -j KUBE-MARK-MASQ
-A KUBE-EXT-NUKIZ6OKUXPJNT4C -j KUBE-SVC-NUKIZ6OKUXPJNT4C
-A KUBE-EXT-X27LE4BHSL4DOUIK -m comment --comment "masquerade traffic for ns3/svc3:p80 external destinations" -j KUBE-MARK-MASQ
-A KUBE-EXT-X27LE4BHSL4DOUIK -j KUBE-SVC-X27LE4BHSL4DOUIK
-A KUBE-FW-NUKIZ6OKUXPJNT4C -m comment --comment "ns5/svc5:p80 loadbalancer IP" -s 203.0.113.0/25 -j KUBE-EXT-NUKIZ6OKUXPJNT4C
-A KUBE-FW-NUKIZ6OKUXPJNT4C -m comment --comment "other traffic to ns5/svc5:p80 will be dropped by KUBE-PROXY-FIREWALL"
-A KUBE-MARK-MASQ -j MARK --or-mark 0x4000
-A KUBE-POSTROUTING -m mark ! --mark 0x4000/0x4000 -j RETURN
-A KUBE-POSTROUTING -j MARK --xor-mark 0x4000
-A KUBE-POSTROUTING -m comment --comment "kubernetes service traffic requiring SNAT" -j MASQUERADE
-A KUBE-SEP-C6EBXVWJJZMIWKLZ -m comment --comment ns4/svc4:p80 -s 10.180.0.5 -j KUBE-MARK-MASQ
-A KUBE-SEP-C6EBXVWJJZMIWKLZ -m comment --comment ns4/svc4:p80 -m tcp -p tcp -j DNAT --to-destination 10.180.0.5:80
-A KUBE-SEP-I77PXRDZVX7PMWMN -m comment --comment ns5/svc5:p80 -s 10.180.0.3 -j KUBE-MARK-MASQ
-A KUBE-SEP-I77PXRDZVX7PMWMN -m comment --comment ns5/svc5:p80 -m recent --name KUBE-SEP-I77PXRDZVX7PMWMN --set -m tcp -p tcp -j DNAT --to-destination 10.180.0.3:80
-A KUBE-SEP-OYPFS5VJICHGATKP -m comment --comment ns3/svc3:p80 -s 10.180.0.3 -j KUBE-MARK-MASQ
-A KUBE-SEP-OYPFS5VJICHGATKP -m comment --comment ns3/svc3:p80 -m tcp -p tcp -j DNAT --to-destination 10.180.0.3:80
-A KUBE-SEP-RS4RBKLTHTF2IUXJ -m comment --comment ns2/svc2:p80 -s 10.180.0.2 -j KUBE-MARK-MASQ
-A KUBE-SEP-RS4RBKLTHTF2IUXJ -m comment --comment ns2/svc2:p80 -m tcp -p tcp -j DNAT --to-destination 10.180.0.2:80
-A KUBE-SEP-SXIVWICOYRO3J4NJ -m comment --comment ns1/svc1:p80 -s 10.180.0.1 -j KUBE-MARK-MASQ
-A KUBE-SEP-SXIVWICOYRO3J4NJ -m comment --comment ns1/svc1:p80 -m tcp -p tcp -j DNAT --to-destination 10.180.0.1:80
-A KUBE-SEP-UKSFD7AGPMPPLUHC -m comment --comment ns4/svc4:p80 -s 10.180.0.4 -j KUBE-MARK-MASQ
-A KUBE-SEP-UKSFD7AGPMPPLUHC -m comment --comment ns4/svc4:p80 -m tcp -p tcp -j DNAT --to-destination 10.180.0.4:80
-A KUBE-SVC-4SW47YFZTEDKD3PK -m comment --comment "ns4/svc4:p80 cluster IP" -m tcp -p tcp -d 172.30.0.44 --dport 80 ! -s 10.0.0.0/8 -j KUBE-MARK-MASQ
-A KUBE-SVC-4SW47YFZTEDKD3PK -m comment --comment "ns4/svc4:p80 -> 10.180.0.4:80" -m statistic --mode random --probability 0.5000000000 -j KUBE-SEP-UKSFD7AGPMPPLUHC
-A KUBE-SVC-4SW47YFZTEDKD3PK -m comment --comment "ns4/svc4:p80 -> 10.180.0.5:80" -j KUBE-SEP-C6EBXVWJJZMIWKLZ
-A KUBE-SVC-GNZBNJ2PO5MGZ6GT -m comment --comment "ns2/svc2:p80 cluster IP" -m tcp -p tcp -d 172.30.0.42 --dport 80 ! -s 10.0.0.0/8 -j KUBE-MARK-MASQ
-A KUBE-SVC-GNZBNJ2PO5MGZ6GT -m comment --comment "ns2/svc2:p80 -> 10.180.0.2:80" -j KUBE-SEP-RS4RBKLTHTF2IUXJ
-A KUBE-SVC-NUKIZ6OKUXPJNT4C -m comment --comment "ns5/svc5:p80 cluster IP" -m tcp -p tcp -d 172.30.0.45 --dport 80 ! -s 10.0.0.0/8 -j KUBE-MARK-MASQ
-A KUBE-SVC-NUKIZ6OKUXPJNT4C -m comment --comment "ns5/svc5:p80 -> 10.180.0.3:80" -m recent --name KUBE-SEP-I77PXRDZVX7PMWMN --rcheck --seconds 10800 --reap -j KUBE-SEP-I77PXRDZVX7PMWMN
-A KUBE-SVC-NUKIZ6OKUXPJNT4C -m comment --comment "ns5/svc5:p80 -> 10.180.0.3:80" -j KUBE-SEP-I77PXRDZVX7PMWMN
-A KUBE-SVC-X27LE4BHSL4DOUIK -m comment --comment "ns3/svc3:p80 cluster IP" -m tcp -p tcp -d 172.30.0.43 --dport 80 ! -s 10.0.0.0/8 -j KUBE-MARK-MASQ
-A KUBE-SVC-X27LE4BHSL4DOUIK -m comment --comment "ns3/svc3:p80 -> 10.180.0.3:80" -j KUBE-SEP-OYPFS5VJICHGATKP
-A KUBE-SVC-XPGD46QRK7WJZT7O -m comment --comment "ns1/svc1:p80 cluster IP" -m tcp -p tcp -d 172.30.0.41 --dport 80 ! -s 10.0.0.0/8 -j KUBE-MARK-MASQ
-A KUBE-SVC-XPGD46QRK7WJZT7O -m comment --comment "ns1/svc1:p80 -> 10.180.0.1:80" -j KUBE-SEP-SXIVWICOYRO3J4NJ
COMMIT
"""

NFACCT = ("-m", "nfacct", "--nfacct-name")


def as_on_this_node(text: str) -> str:
    """Upstream's expected text as upstream writes it on a node without nfacct counters
    (the one deliberate difference from upstream's test fake; see the module docstring)."""
    lines = []
    for line in text.splitlines():
        if "localhost_nps_accepted_pkts" in line:
            continue  # written only to count, when the counter exists
        words = line.split(" ")
        for i in range(len(words) - len(NFACCT)):
            if tuple(words[i : i + len(NFACCT)]) == NFACCT:
                del words[i : i + len(NFACCT) + 1]
                break
        lines.append(" ".join(words))
    return "\n".join(lines)


def parse_restore(text: str) -> dict[str, tuple[set[str], dict[str, list[str]]]]:
    """{table: (declared chains, {chain: rule lines in order})}; chain order is free."""
    tables: dict[str, tuple[set[str], dict[str, list[str]]]] = {}
    for line in text.strip().splitlines():
        if line.startswith("*"):
            declared: set[str] = set()
            rules: dict[str, list[str]] = {}
            tables[line[1:]] = (declared, rules)
        elif line.startswith(":"):
            declared.add(line[1:].split()[0])
        elif line.startswith("-A "):
            rules.setdefault(line.split()[1], []).append(line)
    return tables


def overall_cluster() -> tuple[ServiceChangeTracker, EndpointsChangeTracker]:
    """upstream TestOverallIPTablesRules' Services and EndpointSlices."""
    p80 = [o.port("p80", 80)]
    services = [
        o.service("ns1", "svc1", "172.30.0.41", p80),
        o.service(
            "ns2",
            "svc2",
            "172.30.0.42",
            [o.port("p80", 80, nodePort=3001)],
            type="LoadBalancer",
            externalTrafficPolicy="Local",
            externalIPs=["192.168.99.22"],
            healthCheckNodePort=30000,
            status={"loadBalancer": {"ingress": [{"ip": "1.2.3.4"}]}},
        ),
        o.service(
            "ns3", "svc3", "172.30.0.43", [o.port("p80", 80, nodePort=3003)], type="NodePort"
        ),
        o.service(
            "ns4", "svc4", "172.30.0.44", p80, type="NodePort", externalIPs=["192.168.99.33"]
        ),
        o.service(
            "ns5",
            "svc5",
            "172.30.0.45",
            [o.port("p80", 80, nodePort=3002)],
            type="LoadBalancer",
            externalTrafficPolicy="Cluster",
            healthCheckNodePort=30000,
            loadBalancerSourceRanges=[" 203.0.113.0/25"],
            sessionAffinity="ClientIP",
            sessionAffinityConfig={"clientIP": {"timeoutSeconds": 10800}},
            status={"loadBalancer": {"ingress": [{"ip": "5.6.7.8"}]}},
        ),
        o.service("ns6", "svc6", "172.30.0.46", p80),
    ]
    svc4_slice = o.endpoint_slice("ns4", "svc4", ["10.180.0.4", "10.180.0.5"], p80)
    svc4_slice["endpoints"][1]["nodeName"] = TEST_NODE.name
    slices = [
        o.endpoint_slice("ns1", "svc1", ["10.180.0.1"], p80),
        o.endpoint_slice("ns2", "svc2", ["10.180.0.2"], p80),
        o.endpoint_slice("ns3", "svc3", ["10.180.0.3"], p80),
        svc4_slice,
        o.endpoint_slice("ns5", "svc5", ["10.180.0.3"], p80),
    ]
    svc_tracker, ep_tracker = ServiceChangeTracker(), EndpointsChangeTracker()
    for svc in services:
        meta = svc["metadata"]
        svc_tracker.update(NamespacedName(meta["namespace"], meta["name"]), svc)
    for eps in slices:
        meta = eps["metadata"]
        service = NamespacedName(meta["namespace"], meta["labels"]["kubernetes.io/service-name"])
        ep_tracker.update(service, meta["name"], eps)
    svc_tracker.apply()
    ep_tracker.apply()
    return svc_tracker, ep_tracker


def render_overall(
    cfg: RenderConfig = UPSTREAM_TEST_CONFIG, node: NodeFacts = TEST_NODE
) -> Rendered:
    svcs, eps = overall_cluster()
    return Renderer(cfg).render(svcs.service_map, eps.endpoints_map, node=node)


def test_overall_rules_match_kube_proxy() -> None:
    rendered = render_overall()
    got = parse_restore(restore_text([rendered.filter, rendered.nat]))
    for declared, _ in got.values():
        declared.discard(CANARY)
    want = parse_restore(as_on_this_node(EXPECTED))
    assert got.keys() == want.keys()
    for table in want:
        assert got[table][0] == want[table][0], table
        assert got[table][1] == want[table][1], table


def test_no_local_endpoints_are_counted() -> None:
    assert render_overall().no_local_endpoints == {"internal": 0, "external": 1}


def test_known_hashes() -> None:
    name = ServicePortName(NamespacedName("ns1", "svc1"), "p80", Protocol.TCP)
    assert service_chain(name) == "KUBE-SVC-XPGD46QRK7WJZT7O"
    endpoint = Endpoint(ip_address("10.180.0.1"), 80)
    assert endpoint_chain(name, endpoint) == "KUBE-SEP-SXIVWICOYRO3J4NJ"


def test_probabilities_have_ten_decimals() -> None:
    assert [probability(n) for n in (5, 4, 3, 2)] == [
        "0.2000000000",
        "0.2500000000",
        "0.3333333333",
        "0.5000000000",
    ]


def test_every_jump_target_exists() -> None:
    builtin = {"ACCEPT", "DROP", "REJECT", "RETURN", "DNAT", "MARK", "MASQUERADE"}
    for table in render_overall().tables:
        for rules in table.chains.values():
            for rule in rules:
                if "-j" not in rule:
                    continue  # KUBE-FW's last rule only says where the rest goes
                target = rule[rule.index("-j") + 1]
                assert target in builtin or target in table.chains, (table.name, rule)


def test_masquerade_all_and_random_fully() -> None:
    nat = render_overall(RenderConfig(masquerade_all=True)).nat
    svc1 = nat.chains["KUBE-SVC-XPGD46QRK7WJZT7O"]
    assert svc1[0][-2:] == ("-j", "KUBE-MARK-MASQ") and "! " not in " ".join(svc1[0])
    assert nat.chains["KUBE-POSTROUTING"][-1][-2:] == ("MASQUERADE", "--random-fully")


def test_nodeport_addresses_and_mark_bit() -> None:
    node = NodeFacts(nodeport_ips=(ip_address("198.18.0.2"),))
    rendered = render_overall(RenderConfig(masquerade_bit=5), node)
    nat, filt = rendered.nat, rendered.filter
    assert nat.chains["KUBE-SERVICES"][-1][-4:] == ("-d", "198.18.0.2", "-j", "KUBE-NODEPORTS")
    assert nat.chains["KUBE-MARK-MASQ"] == [("-j", "MARK", "--or-mark", "0x20")]
    assert filt.chains["KUBE-FORWARD"][1][4:8] == ("-m", "mark", "--mark", "0x20/0x20")


def test_partial_render_keeps_other_services_chains() -> None:
    svcs, eps = overall_cluster()
    renderer = Renderer(UPSTREAM_TEST_CONFIG)
    changed = {n for n in svcs.service_map if n.service == NamespacedName("ns4", "svc4")}
    nat = renderer.render(svcs.service_map, eps.endpoints_map, rewrite=changed).nat
    assert "KUBE-SVC-4SW47YFZTEDKD3PK" in nat.chains
    assert "KUBE-SVC-XPGD46QRK7WJZT7O" in nat.kept
    assert "KUBE-SVC-XPGD46QRK7WJZT7O" not in nat.chains
    full_nat = renderer.render(svcs.service_map, eps.endpoints_map).nat
    assert nat.rule_count() == full_nat.rule_count()
