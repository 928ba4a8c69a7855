"""Golden tests: rendered rules against kube-proxy's own expected iptables-restore text.

The expected text is kube-proxy's TestOverallIPTablesRules output (proxier_test.go),
limited to what this agent implements so far: Services with Local traffic policy
or loadBalancerSourceRanges, health-check node ports and nfacct counters are left
out. Hashes, comments, order and probabilities are upstream's, byte for byte.
"""

from __future__ import annotations

from ipaddress import ip_address, ip_network

import objects as o

from pykubeproxy.changes import EndpointsChangeTracker, ServiceChangeTracker
from pykubeproxy.iptables.render import (
    RenderConfig,
    Renderer,
    endpoint_chain,
    probability,
    service_chain,
)
from pykubeproxy.iptables.ruleset import TableState, restore_text
from pykubeproxy.model import Endpoint, NamespacedName, Protocol, ServicePortName

CLUSTER_CIDR = (ip_network("10.0.0.0/8"),)

EXPECTED = """
*filter
:KUBE-NODEPORTS - [0:0]
:KUBE-SERVICES - [0:0]
:KUBE-EXTERNAL-SERVICES - [0:0]
:KUBE-FIREWALL - [0:0]
:KUBE-FORWARD - [0:0]
:KUBE-PROXY-FIREWALL - [0:0]
:KUBE-PROXY-CANARY - [0:0]
-A KUBE-SERVICES -m comment --comment "ns6/svc6:p80 has no endpoints" -m tcp -p tcp -d 172.30.0.46 --dport 80 -j REJECT
-A KUBE-FIREWALL -m comment --comment "block incoming localnet connections" -d 127.0.0.0/8 ! -s 127.0.0.0/8 -m conntrack ! --ctstate RELATED,ESTABLISHED,DNAT -j DROP
-A KUBE-FORWARD -m conntrack --ctstate INVALID -j DROP
-A KUBE-FORWARD -m comment --comment "kubernetes forwarding rules" -m mark --mark 0x4000/0x4000 -j ACCEPT
-A KUBE-FORWARD -m comment --comment "kubernetes forwarding conntrack rule" -m conntrack --ctstate RELATED,ESTABLISHED -j ACCEPT
COMMIT
*nat
:KUBE-NODEPORTS - [0:0]
:KUBE-SERVICES - [0:0]
:KUBE-EXT-4SW47YFZTEDKD3PK - [0:0]
:KUBE-EXT-NUKIZ6OKUXPJNT4C - [0:0]
:KUBE-EXT-X27LE4BHSL4DOUIK - [0:0]
:KUBE-MARK-MASQ - [0:0]
:KUBE-POSTROUTING - [0:0]
:KUBE-PROXY-CANARY - [0:0]
:KUBE-SEP-C6EBXVWJJZMIWKLZ - [0:0]
:KUBE-SEP-I77PXRDZVX7PMWMN - [0:0]
:KUBE-SEP-OYPFS5VJICHGATKP - [0:0]
:KUBE-SEP-SXIVWICOYRO3J4NJ - [0:0]
:KUBE-SEP-UKSFD7AGPMPPLUHC - [0:0]
:KUBE-SVC-4SW47YFZTEDKD3PK - [0:0]
:KUBE-SVC-NUKIZ6OKUXPJNT4C - [0:0]
:KUBE-SVC-X27LE4BHSL4DOUIK - [0:0]
:KUBE-SVC-XPGD46QRK7WJZT7O - [0:0]
-A KUBE-NODEPORTS -m comment --comment ns3/svc3:p80 -m tcp -p tcp --dport 3003 -j KUBE-EXT-X27LE4BHSL4DOUIK
-A KUBE-NODEPORTS -m comment --comment ns5/svc5:p80 -m tcp -p tcp --dport 3002 -j KUBE-EXT-NUKIZ6OKUXPJNT4C
-A KUBE-SERVICES -m comment --comment "ns1/svc1:p80 cluster IP" -m tcp -p tcp -d 172.30.0.41 --dport 80 -j KUBE-SVC-XPGD46QRK7WJZT7O
-A KUBE-SERVICES -m comment --comment "ns3/svc3:p80 cluster IP" -m tcp -p tcp -d 172.30.0.43 --dport 80 -j KUBE-SVC-X27LE4BHSL4DOUIK
-A KUBE-SERVICES -m comment --comment "ns4/svc4:p80 cluster IP" -m tcp -p tcp -d 172.30.0.44 --dport 80 -j KUBE-SVC-4SW47YFZTEDKD3PK
-A KUBE-SERVICES -m comment --comment "ns4/svc4:p80 external IP" -m tcp -p tcp -d 192.168.99.33 --dport 80 -j KUBE-EXT-4SW47YFZTEDKD3PK
-A KUBE-SERVICES -m comment --comment "ns5/svc5:p80 cluster IP" -m tcp -p tcp -d 172.30.0.45 --dport 80 -j KUBE-SVC-NUKIZ6OKUXPJNT4C
-A KUBE-SERVICES -m comment --comment "ns5/svc5:p80 loadbalancer IP" -m tcp -p tcp -d 5.6.7.8 --dport 80 -j KUBE-EXT-NUKIZ6OKUXPJNT4C
-A KUBE-SERVICES -m comment --comment "kubernetes service nodeports; NOTE: this must be the last rule in this chain" -m addrtype --dst-type LOCAL -j KUBE-NODEPORTS
-A KUBE-EXT-4SW47YFZTEDKD3PK -m comment --comment "masquerade traffic for ns4/svc4:p80 external destinations" -j KUBE-MARK-MASQ
-A KUBE-EXT-4SW47YFZTEDKD3PK -j KUBE-SVC-4SW47YFZTEDKD3PK
-A KUBE-EXT-NUKIZ6OKUXPJNT4C -m comment --comment "masquerade traffic for ns5/svc5:p80 external destinations" -j KUBE-MARK-MASQ
-A KUBE-EXT-NUKIZ6OKUXPJNT4C -j KUBE-SVC-NUKIZ6OKUXPJNT4C
-A KUBE-EXT-X27LE4BHSL4DOUIK -m comment --comment "masquerade traffic for ns3/svc3:p80 external destinations" -j KUBE-MARK-MASQ
-A KUBE-EXT-X27LE4BHSL4DOUIK -j KUBE-SVC-X27LE4BHSL4DOUIK
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
-A KUBE-SEP-SXIVWICOYRO3J4NJ -m comment --comment ns1/svc1:p80 -s 10.180.0.1 -j KUBE-MARK-MASQ
-A KUBE-SEP-SXIVWICOYRO3J4NJ -m comment --comment ns1/svc1:p80 -m tcp -p tcp -j DNAT --to-destination 10.180.0.1:80
-A KUBE-SEP-UKSFD7AGPMPPLUHC -m comment --comment ns4/svc4:p80 -s 10.180.0.4 -j KUBE-MARK-MASQ
-A KUBE-SEP-UKSFD7AGPMPPLUHC -m comment --comment ns4/svc4:p80 -m tcp -p tcp -j DNAT --to-destination 10.180.0.4:80
-A KUBE-SVC-4SW47YFZTEDKD3PK -m comment --comment "ns4/svc4:p80 cluster IP" -m tcp -p tcp -d 172.30.0.44 --dport 80 ! -s 10.0.0.0/8 -j KUBE-MARK-MASQ
-A KUBE-SVC-4SW47YFZTEDKD3PK -m comment --comment "ns4/svc4:p80 -> 10.180.0.4:80" -m statistic --mode random --probability 0.5000000000 -j KUBE-SEP-UKSFD7AGPMPPLUHC
-A KUBE-SVC-4SW47YFZTEDKD3PK -m comment --comment "ns4/svc4:p80 -> 10.180.0.5:80" -j KUBE-SEP-C6EBXVWJJZMIWKLZ
-A KUBE-SVC-NUKIZ6OKUXPJNT4C -m comment --comment "ns5/svc5:p80 cluster IP" -m tcp -p tcp -d 172.30.0.45 --dport 80 ! -s 10.0.0.0/8 -j KUBE-MARK-MASQ
-A KUBE-SVC-NUKIZ6OKUXPJNT4C -m comment --comment "ns5/svc5:p80 -> 10.180.0.3:80" -m recent --name KUBE-SEP-I77PXRDZVX7PMWMN --rcheck --seconds 10800 --reap -j KUBE-SEP-I77PXRDZVX7PMWMN
-A KUBE-SVC-NUKIZ6OKUXPJNT4C -m comment --comment "ns5/svc5:p80 -> 10.180.0.3:80" -j KUBE-SEP-I77PXRDZVX7PMWMN
-A KUBE-SVC-X27LE4BHSL4DOUIK -m comment --comment "ns3/svc3:p80 cluster IP" -m tcp -p tcp -d 172.30.0.43 --dport 80 ! -s 10.0.0.0/8 -j KUBE-MARK-MASQ
-A KUBE-SVC-X27LE4BHSL4DOUIK -m comment --comment "ns3/svc3:p80 -> 10.180.0.3:80" -j KUBE-SEP-OYPFS5VJICHGATKP
-A KUBE-SVC-XPGD46QRK7WJZT7O -m comment --comment "ns1/svc1:p80 cluster IP" -m tcp -p tcp -d 172.30.0.41 --dport 80 ! -s 10.0.0.0/8 -j KUBE-MARK-MASQ
-A KUBE-SVC-XPGD46QRK7WJZT7O -m comment --comment "ns1/svc1:p80 -> 10.180.0.1:80" -j KUBE-SEP-SXIVWICOYRO3J4NJ
COMMIT
"""


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
    p80 = [o.port("p80", 80)]
    services = [
        o.service("ns1", "svc1", "172.30.0.41", p80),
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
            sessionAffinity="ClientIP",
            sessionAffinityConfig={"clientIP": {"timeoutSeconds": 10800}},
            status={"loadBalancer": {"ingress": [{"ip": "5.6.7.8"}]}},
        ),
        o.service("ns6", "svc6", "172.30.0.46", p80),
    ]
    slices = [
        o.endpoint_slice("ns1", "svc1", ["10.180.0.1"], p80),
        o.endpoint_slice("ns3", "svc3", ["10.180.0.3"], p80),
        o.endpoint_slice("ns4", "svc4", ["10.180.0.4", "10.180.0.5"], p80),
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


def render_overall(**cfg: object) -> tuple[TableState, TableState]:
    svcs, eps = overall_cluster()
    config = RenderConfig(cluster_cidr=CLUSTER_CIDR, random_fully=False)
    config = RenderConfig(**{**config.__dict__, **cfg})
    return Renderer(config).render(svcs.service_map, eps.endpoints_map)


def test_overall_rules_match_kube_proxy() -> None:
    nat, filt = render_overall()
    got = parse_restore(restore_text([filt, nat]))
    want = parse_restore(EXPECTED)
    assert got.keys() == want.keys()
    for table in want:
        assert got[table][0] == want[table][0], table
        assert got[table][1] == want[table][1], table


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
    nat, filt = render_overall()
    builtin = {"ACCEPT", "DROP", "REJECT", "RETURN", "DNAT", "MARK", "MASQUERADE"}
    for table in (nat, filt):
        for rules in table.chains.values():
            for rule in rules:
                target = rule[rule.index("-j") + 1]
                assert target in builtin or target in table.chains, (table.name, rule)


def test_masquerade_all_and_random_fully() -> None:
    nat, _ = render_overall(masquerade_all=True, random_fully=True)
    svc1 = nat.chains["KUBE-SVC-XPGD46QRK7WJZT7O"]
    assert svc1[0][-2:] == ("-j", "KUBE-MARK-MASQ") and "! " not in " ".join(svc1[0])
    assert nat.chains["KUBE-POSTROUTING"][-1][-2:] == ("MASQUERADE", "--random-fully")


def test_nodeport_addresses_and_mark_bit() -> None:
    nat, filt = render_overall(nodeport_ips=(ip_address("198.18.0.2"),), masquerade_bit=5)
    assert nat.chains["KUBE-SERVICES"][-1][-4:] == ("-d", "198.18.0.2", "-j", "KUBE-NODEPORTS")
    assert nat.chains["KUBE-MARK-MASQ"] == [("-j", "MARK", "--or-mark", "0x20")]
    assert filt.chains["KUBE-FORWARD"][1][4:8] == ("-m", "mark", "--mark", "0x20/0x20")


def test_partial_render_keeps_other_services_chains() -> None:
    svcs, eps = overall_cluster()
    renderer = Renderer(RenderConfig(cluster_cidr=CLUSTER_CIDR))
    changed = {n for n in svcs.service_map if n.service == NamespacedName("ns4", "svc4")}
    nat, _ = renderer.render(svcs.service_map, eps.endpoints_map, rewrite=changed)
    assert "KUBE-SVC-4SW47YFZTEDKD3PK" in nat.chains
    assert "KUBE-SVC-XPGD46QRK7WJZT7O" in nat.kept
    assert "KUBE-SVC-XPGD46QRK7WJZT7O" not in nat.chains
    full_nat, _ = renderer.render(svcs.service_map, eps.endpoints_map)
    assert nat.rule_count() == full_nat.rule_count()
