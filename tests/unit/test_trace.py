"""The packet tracer against upstream kube-proxy's own rules and packet-flow expectations.

Golden data copied unedited from kubernetes/kubernetes
pkg/proxy/iptables/proxier_test.go, a v1.32-or-later version (it has nfacct counters
and tests LoadBalancerIPMode against emulated version 1.31):

- `TestTracePacket`: upstream's tracer self-test, its static rules and flows.
- `TestOverallIPTablesRules`: its expected iptables-restore text. Upstream runs no
  packet flows on it; the flows of `TestTracePacket` are run instead, since that
  test's static rules were written for the same six Services (they hold for both).
- `TestBadIPs`: its expected text, with a few flows of ours (marked as such).
"""

from __future__ import annotations

from ipaddress import ip_address

import pytest
from upstream_goldens import BAD_IPS_EXPECTED, OVERALL_EXPECTED

from pykubeproxy.iptables.trace import (
    IpSet,
    NodeState,
    Packet,
    RealServer,
    Ruleset,
    TraceError,
    TraceResult,
    VirtualService,
    parse,
    trace,
)

TEST_NODE_IP = "192.168.0.2"
TEST_EXTERNAL_CLIENT = "203.0.113.2"
TEST_EXTERNAL_CLIENT_BLOCKED = "203.0.113.130"
TEST_NODE_IPS = (TEST_NODE_IP, "192.168.1.2", "192.168.99.11", "2001:db8::1", "2001:db8:1::2")
# Upstream's tracer treats exactly these as local (addrtype LOCAL): loopback plus the node IPs.
LOCAL = ("127.0.0.1", "::1", *TEST_NODE_IPS)

# Where upstream's fake differs from a real node: kube-proxy installs the jumps from the
# built-in chains with EnsureRule (prepending each, so they end up in reverse order),
# not in its iptables-restore input, and upstream's fake iptables keeps them next to the
# restored text. A real node has them too, so they are added here as the proxier would.
BUILTIN_JUMPS = """
*filter
-I INPUT -m conntrack --ctstate NEW -m comment --comment "kubernetes externally-visible service portals" -j KUBE-EXTERNAL-SERVICES
-I FORWARD -m conntrack --ctstate NEW -m comment --comment "kubernetes externally-visible service portals" -j KUBE-EXTERNAL-SERVICES
-I INPUT -m comment --comment "kubernetes health check service ports" -j KUBE-NODEPORTS
-I FORWARD -m conntrack --ctstate NEW -m comment --comment "kubernetes service portals" -j KUBE-SERVICES
-I OUTPUT -m conntrack --ctstate NEW -m comment --comment "kubernetes service portals" -j KUBE-SERVICES
-I FORWARD -m comment --comment "kubernetes forwarding rules" -j KUBE-FORWARD
-I INPUT -m conntrack --ctstate NEW -m comment --comment "kubernetes load balancer firewall" -j KUBE-PROXY-FIREWALL
-I OUTPUT -m conntrack --ctstate NEW -m comment --comment "kubernetes load balancer firewall" -j KUBE-PROXY-FIREWALL
-I FORWARD -m conntrack --ctstate NEW -m comment --comment "kubernetes load balancer firewall" -j KUBE-PROXY-FIREWALL
-I INPUT -j KUBE-FIREWALL
-I OUTPUT -j KUBE-FIREWALL
COMMIT
*nat
-I OUTPUT -m comment --comment "kubernetes service portals" -j KUBE-SERVICES
-I PREROUTING -m comment --comment "kubernetes service portals" -j KUBE-SERVICES
-I POSTROUTING -m comment --comment "kubernetes postrouting rules" -j KUBE-POSTROUTING
COMMIT
"""

# TestTracePacket: the static rules.
TRACE_PACKET_RULES = """
*filter
:INPUT - [0:0]
:FORWARD - [0:0]
:OUTPUT - [0:0]
:KUBE-EXTERNAL-SERVICES - [0:0]
:KUBE-FIREWALL - [0:0]
:KUBE-FORWARD - [0:0]
:KUBE-NODEPORTS - [0:0]
:KUBE-SERVICES - [0:0]
:KUBE-PROXY-FIREWALL - [0:0]
-A INPUT -m comment --comment kubernetes health check service ports -j KUBE-NODEPORTS
-A INPUT -m conntrack --ctstate NEW -m comment --comment kubernetes externally-visible service portals -j KUBE-EXTERNAL-SERVICES
-A FORWARD -m comment --comment kubernetes forwarding rules -j KUBE-FORWARD
-A FORWARD -m conntrack --ctstate NEW -m comment --comment kubernetes service portals -j KUBE-SERVICES
-A FORWARD -m conntrack --ctstate NEW -m comment --comment kubernetes externally-visible service portals -j KUBE-EXTERNAL-SERVICES
-A OUTPUT -m conntrack --ctstate NEW -m comment --comment kubernetes service portals -j KUBE-SERVICES
-A KUBE-NODEPORTS -m comment --comment "ns2/svc2:p80 health check node port" -m tcp -p tcp --dport 30000 -j ACCEPT
-A KUBE-SERVICES -m comment --comment "ns6/svc6:p80 has no endpoints" -m tcp -p tcp -d 172.30.0.46 --dport 80 -j REJECT
-A KUBE-EXTERNAL-SERVICES -m comment --comment "ns2/svc2:p80 has no local endpoints" -m tcp -p tcp -d 192.168.99.22 --dport 80 -j DROP
-A KUBE-EXTERNAL-SERVICES -m comment --comment "ns2/svc2:p80 has no local endpoints" -m tcp -p tcp -d 1.2.3.4 --dport 80 -j DROP
-A KUBE-EXTERNAL-SERVICES -m comment --comment "ns2/svc2:p80 has no local endpoints" -m addrtype --dst-type LOCAL -m tcp -p tcp --dport 3001 -j DROP
-A KUBE-FIREWALL -m comment --comment "block incoming localnet connections" -d 127.0.0.0/8 ! -s 127.0.0.0/8 -m conntrack ! --ctstate RELATED,ESTABLISHED,DNAT -j DROP
-A KUBE-FORWARD -m conntrack --ctstate INVALID -j DROP
-A KUBE-FORWARD -m comment --comment "kubernetes forwarding rules" -m mark --mark 0x4000/0x4000 -j ACCEPT
-A KUBE-FORWARD -m comment --comment "kubernetes forwarding conntrack rule" -m conntrack --ctstate RELATED,ESTABLISHED -j ACCEPT
-A KUBE-PROXY-FIREWALL -m comment --comment "ns5/svc5:p80 traffic not accepted by KUBE-FW-NUKIZ6OKUXPJNT4C" -m tcp -p tcp -d 5.6.7.8 --dport 80 -j DROP
COMMIT
*nat
:PREROUTING - [0:0]
:INPUT - [0:0]
:OUTPUT - [0:0]
:POSTROUTING - [0:0]
:KUBE-EXT-4SW47YFZTEDKD3PK - [0:0]
:KUBE-EXT-GNZBNJ2PO5MGZ6GT - [0:0]
:KUBE-EXT-NUKIZ6OKUXPJNT4C - [0:0]
:KUBE-EXT-X27LE4BHSL4DOUIK - [0:0]
:KUBE-FW-NUKIZ6OKUXPJNT4C - [0:0]
:KUBE-MARK-MASQ - [0:0]
:KUBE-NODEPORTS - [0:0]
:KUBE-POSTROUTING - [0:0]
:KUBE-SEP-C6EBXVWJJZMIWKLZ - [0:0]
:KUBE-SEP-I77PXRDZVX7PMWMN - [0:0]
:KUBE-SEP-OYPFS5VJICHGATKP - [0:0]
:KUBE-SEP-RS4RBKLTHTF2IUXJ - [0:0]
:KUBE-SEP-SXIVWICOYRO3J4NJ - [0:0]
:KUBE-SEP-UKSFD7AGPMPPLUHC - [0:0]
:KUBE-SERVICES - [0:0]
:KUBE-SVC-4SW47YFZTEDKD3PK - [0:0]
:KUBE-SVC-GNZBNJ2PO5MGZ6GT - [0:0]
:KUBE-SVC-NUKIZ6OKUXPJNT4C - [0:0]
:KUBE-SVC-X27LE4BHSL4DOUIK - [0:0]
:KUBE-SVC-XPGD46QRK7WJZT7O - [0:0]
-A PREROUTING -m comment --comment kubernetes service portals -j KUBE-SERVICES
-A OUTPUT -m comment --comment kubernetes service portals -j KUBE-SERVICES
-A POSTROUTING -m comment --comment kubernetes postrouting rules -j KUBE-POSTROUTING
-A KUBE-POSTROUTING -m mark ! --mark 0x4000/0x4000 -j RETURN
-A KUBE-POSTROUTING -j MARK --xor-mark 0x4000
-A KUBE-POSTROUTING -m comment --comment "kubernetes service traffic requiring SNAT" -j MASQUERADE
-A KUBE-MARK-MASQ -j MARK --or-mark 0x4000
-A KUBE-NODEPORTS -m comment --comment ns2/svc2:p80 -m tcp -p tcp --dport 3001 -j KUBE-EXT-GNZBNJ2PO5MGZ6GT
-A KUBE-NODEPORTS -m comment --comment ns3/svc3:p80 -m tcp -p tcp --dport 3003 -j KUBE-EXT-X27LE4BHSL4DOUIK
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
-A KUBE-SEP-C6EBXVWJJZMIWKLZ -m comment --comment ns4/svc4:p80 -s 10.180.0.5 -j KUBE-MARK-MASQ
-A KUBE-SEP-C6EBXVWJJZMIWKLZ -m comment --comment ns4/svc4:p80 -m tcp -p tcp -j DNAT --to-destination 10.180.0.5:80
-A KUBE-SEP-I77PXRDZVX7PMWMN -m comment --comment ns5/svc5:p80 -s 10.180.0.3 -j KUBE-MARK-MASQ
-A KUBE-SEP-I77PXRDZVX7PMWMN -m comment --comment ns5/svc5:p80 -m tcp -p tcp -j DNAT --to-destination 10.180.0.3:80
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
-A KUBE-SVC-NUKIZ6OKUXPJNT4C -m comment --comment "ns5/svc5:p80 -> 10.180.0.3:80" -j KUBE-SEP-I77PXRDZVX7PMWMN
-A KUBE-SVC-X27LE4BHSL4DOUIK -m comment --comment "ns3/svc3:p80 cluster IP" -m tcp -p tcp -d 172.30.0.43 --dport 80 ! -s 10.0.0.0/8 -j KUBE-MARK-MASQ
-A KUBE-SVC-X27LE4BHSL4DOUIK -m comment --comment "ns3/svc3:p80 -> 10.180.0.3:80" -j KUBE-SEP-OYPFS5VJICHGATKP
-A KUBE-SVC-XPGD46QRK7WJZT7O -m comment --comment "ns1/svc1:p80 cluster IP" -m tcp -p tcp -d 172.30.0.41 --dport 80 ! -s 10.0.0.0/8 -j KUBE-MARK-MASQ
-A KUBE-SVC-XPGD46QRK7WJZT7O -m comment --comment "ns1/svc1:p80 -> 10.180.0.1:80" -j KUBE-SEP-SXIVWICOYRO3J4NJ
COMMIT
"""

# TestTracePacket: the flows (name, sourceIP, destIP, destPort, output, masq).
TRACE_PACKET_FLOWS = [
    ("no match", "10.0.0.2", "10.0.0.3", 80, "", False),
    ("single endpoint", "10.0.0.2", "172.30.0.41", 80, "10.180.0.1:80", False),
    ("multiple endpoints", "10.0.0.2", "172.30.0.44", 80, "10.180.0.4:80, 10.180.0.5:80", False),
    ("LOCAL, KUBE-MARK-MASQ", TEST_NODE_IP, "192.168.99.22", 80, "10.180.0.2:80", True),
    ("DROP", TEST_EXTERNAL_CLIENT, "192.168.99.22", 80, "DROP", False),
    ("ACCEPT (NodePortHealthCheck)", TEST_NODE_IP, TEST_NODE_IP, 30000, "ACCEPT", False),
    ("REJECT", "10.0.0.2", "172.30.0.46", 80, "REJECT", False),
]

# TestOverallIPTablesRules: the expected iptables-restore text.

# TestBadIPs: the expected iptables-restore text.

# Ours, not upstream's: what TestBadIPs' Service (LB 1.2.3.4 with source range
# 203.0.113.0/25, external IP 192.168.99.22, NodePort 3001) does with traffic.
BAD_IPS_FLOWS = [
    ("allowed external to LB", TEST_EXTERNAL_CLIENT, "1.2.3.4", 80, "10.180.0.1:80", True),
    ("blocked external to LB", TEST_EXTERNAL_CLIENT_BLOCKED, "1.2.3.4", 80, "DROP", False),
    ("external to external IP", TEST_EXTERNAL_CLIENT, "192.168.99.22", 80, "10.180.0.1:80", True),
    ("localhost to NodePort", "127.0.0.1", "127.0.0.1", 3001, "10.180.0.1:80", True),
    ("pod to cluster IP", "10.0.0.2", "172.30.0.41", 80, "10.180.0.1:80", False),
]

Flow = tuple[str, str, str, int, str, bool]


def check_flow(ruleset: Ruleset, flow: Flow) -> None:
    name, source, destination, port, output, masq = flow
    result = trace(ruleset, Packet(ip_address(source), ip_address(destination), port), LOCAL)
    matched = "\n".join(f"{s.table}/{s.chain}#{s.number}: {s.rule}" for s in result.matches)
    assert (result.output, result.masquerade) == (output, masq), f"{name}; matched:\n{matched}"
    assert result.assumptions == ()


@pytest.mark.parametrize("flow", TRACE_PACKET_FLOWS, ids=[f[0] for f in TRACE_PACKET_FLOWS])
def test_trace_packet(flow: Flow) -> None:
    check_flow(parse(TRACE_PACKET_RULES), flow)


@pytest.mark.parametrize("flow", TRACE_PACKET_FLOWS, ids=[f[0] for f in TRACE_PACKET_FLOWS])
def test_overall_iptables_rules(flow: Flow) -> None:
    check_flow(parse(BUILTIN_JUMPS, parse(OVERALL_EXPECTED)), flow)


@pytest.mark.parametrize("flow", BAD_IPS_FLOWS, ids=[f[0] for f in BAD_IPS_FLOWS])
def test_bad_ips(flow: Flow) -> None:
    check_flow(parse(BUILTIN_JUMPS, parse(BAD_IPS_EXPECTED)), flow)


def overall() -> Ruleset:
    return parse(BUILTIN_JUMPS, parse(OVERALL_EXPECTED))


def test_matches_name_each_rule_in_order() -> None:
    result = trace(overall(), Packet(ip_address("10.0.0.2"), ip_address("172.30.0.41"), 80), LOCAL)
    assert [(s.table, s.chain, s.number) for s in result.matches] == [
        ("nat", "PREROUTING", 1),
        ("nat", "KUBE-SERVICES", 1),
        ("nat", "KUBE-SVC-XPGD46QRK7WJZT7O", 2),
        ("nat", "KUBE-SEP-SXIVWICOYRO3J4NJ", 2),
        *[("filter", "FORWARD", n) for n in (1, 2, 3, 4)],  # jumps into chains that return
        ("nat", "POSTROUTING", 1),
        ("nat", "KUBE-POSTROUTING", 1),
    ]
    assert result.matches[3].rule.endswith("-j DNAT --to-destination 10.180.0.1:80")


def test_affinity_and_source_ranges() -> None:
    """svc5: a new client has no affinity entry; a blocked source is dropped by the firewall."""
    ruleset = overall()
    allowed = trace(ruleset, Packet(ip_address("203.0.113.2"), ip_address("5.6.7.8"), 80), LOCAL)
    assert (allowed.output, allowed.masquerade) == ("10.180.0.3:80", True)
    rules = [s.rule for s in allowed.matches]
    assert not any("--rcheck" in r for r in rules) and any("--set" in r for r in rules)
    blocked = trace(ruleset, Packet(ip_address("203.0.113.130"), ip_address("5.6.7.8"), 80), LOCAL)
    assert blocked.output == "DROP"
    assert blocked.matches[-1].chain == "KUBE-PROXY-FIREWALL"


def test_unknown_match_forks_and_is_reported() -> None:
    ruleset = parse("""
*nat
:KUBE-SERVICES - [0:0]
-A PREROUTING -j KUBE-SERVICES
-A KUBE-SERVICES -m set --match-set blocked src -j RETURN
-A KUBE-SERVICES -i eth0 -d 10.96.0.1 -j DNAT --to-destination 10.1.0.1:443
COMMIT
""")
    result = trace(ruleset, Packet(ip_address("10.0.0.2"), ip_address("10.96.0.1"), 443), ())
    assert result.output == "10.1.0.1:443"
    assert {p.output for p in result.paths} == {"", "10.1.0.1:443"}
    assert any(
        "--match-set blocked src" in a and "assumed to match" in a for a in result.assumptions
    )
    assert any("-i eth0" in a for a in result.assumptions)


def test_statistic_branches_sort_by_address_and_ipv6() -> None:
    ruleset = parse("""
*nat
-A OUTPUT -m statistic --mode random --probability 0.3333333333 -j DNAT --to-destination [fd00::10]:8080
-A OUTPUT -m statistic --mode random --probability 0.5000000000 -j DNAT --to-destination [fd00::9]:8080
-A OUTPUT -j DNAT --to-destination [fd00::a]:8080
COMMIT
""")
    result = trace(ruleset, Packet(ip_address("::1"), ip_address("fd00:1::1"), 80), {"::1"})
    assert result.output == "[fd00::9]:8080, [fd00::a]:8080, [fd00::10]:8080"
    assert result.assumptions == ()


def test_marks_goto_and_policies() -> None:
    ruleset = parse("""
*filter
:FORWARD DROP [0:0]
:CHECK - [0:0]
:MARKED - [0:0]
-A FORWARD -j MARK --set-xmark 0x100/0xff00
-A FORWARD -g CHECK
-A FORWARD -j ACCEPT
-A CHECK -m mark --mark 0x100/0x100 -j MARKED
-A MARKED -p udp -j REJECT --reject-with icmp-port-unreachable
COMMIT
""")
    tcp = trace(ruleset, Packet(ip_address("10.0.0.2"), ip_address("10.0.0.3"), 53), ())
    assert tcp.paths[0].verdict == "DROP"  # goto: CHECK's return skips FORWARD's ACCEPT
    udp = trace(ruleset, Packet(ip_address("10.0.0.2"), ip_address("10.0.0.3"), 53, "udp"), ())
    assert udp.output == "REJECT"


def test_insert_positions_and_deleted_chains() -> None:
    ruleset = parse("""
*filter
:A - [0:0]
:B - [0:0]
-A INPUT -j A
-I INPUT -j B
-I INPUT 2 -p tcp
-X A
COMMIT
""")
    chain = ruleset.chain("filter", "INPUT")
    assert chain is not None
    assert [r.target for r in chain.rules] == ["B", None, "A"]
    assert ruleset.chain("filter", "A") is None


@pytest.mark.parametrize(
    "text",
    [
        "-A INPUT -j ACCEPT\n",
        "*filter\n-A NOPE -j ACCEPT\nCOMMIT\n",
        '*filter\n-A INPUT -m comment --comment "unterminated\nCOMMIT\n',
    ],
)
def test_bad_text_is_an_error(text: str) -> None:
    with pytest.raises(TraceError):
        parse(text)


def test_statistic_branches_carry_their_probability() -> None:
    """Three endpoints behind 1/3 then 1/2 then no dice: each reached a third of the time;
    nth mode counts 1/N, a negated probability its complement."""
    ruleset = parse("""
*nat
-A OUTPUT -m statistic --mode random --probability 0.33333333349 -j DNAT --to-destination 10.1.0.1:80
-A OUTPUT -m statistic --mode random --probability 0.50000000000 -j DNAT --to-destination 10.1.0.2:80
-A OUTPUT -j DNAT --to-destination 10.1.0.3:80
-A POSTROUTING -m statistic --mode nth --every 4 --packet 0 -j MASQUERADE
-A POSTROUTING -m statistic --mode random ! --probability 0.25 -j MASQUERADE
COMMIT
""")
    result = trace(ruleset, Packet(ip_address("10.0.0.1"), ip_address("10.96.0.1"), 80), {"10.0.0.1"})
    shares: dict[str, float] = {}
    for path in result.paths:
        shares[path.output] = shares.get(path.output, 0.0) + path.probability
    assert {k: round(v, 6) for k, v in shares.items()} == {
        "10.1.0.1:80": 0.333333, "10.1.0.2:80": 0.333333, "10.1.0.3:80": 0.333333
    }
    masqueraded = sum(p.probability for p in result.paths if p.masquerade)
    assert masqueraded == pytest.approx(1 / 4 + 3 / 4 * 3 / 4)


IPVS_RULES = """
*nat
:KUBE-SERVICES - [0:0]
:KUBE-POSTROUTING - [0:0]
-A PREROUTING -j KUBE-SERVICES
-A OUTPUT -j KUBE-SERVICES
-A POSTROUTING -j KUBE-POSTROUTING
-A KUBE-SERVICES -m set --match-set KUBE-CLUSTER-IP dst,dst ! -s 10.244.0.0/16 -j MARK --or-mark 0x4000
-A KUBE-SERVICES -m physdev ! --physdev-is-in -m set --match-set KUBE-EXTERNAL-IP dst,dst -j MARK --or-mark 0x4000
-A KUBE-POSTROUTING -m set --match-set KUBE-LOOP-BACK dst,dst,src -j MASQUERADE
-A KUBE-POSTROUTING -m mark --mark 0x4000/0x4000 -j MASQUERADE
COMMIT
*filter
:KUBE-IPVS-FILTER - [0:0]
:KUBE-IPVS-OUT-FILTER - [0:0]
-A INPUT -j KUBE-IPVS-FILTER
-A OUTPUT -j KUBE-IPVS-OUT-FILTER
-A KUBE-IPVS-FILTER -m set --match-set KUBE-CLUSTER-IP dst,dst -j RETURN
-A KUBE-IPVS-FILTER -m set --match-set KUBE-EXTERNAL-IP dst,dst -j RETURN
-A KUBE-IPVS-FILTER -m set --match-set KUBE-NODE-PORT-TCP dst -j RETURN
-A KUBE-IPVS-FILTER -m conntrack --ctstate NEW -m set --match-set KUBE-IPVS-IPS dst -j REJECT
-A KUBE-IPVS-OUT-FILTER -s 203.0.113.5 -m ipvs --vaddr 203.0.113.5 --vproto 6 --vport 80 -j DROP
COMMIT
"""
IPVS_LOCAL = ("10.96.0.10", "203.0.113.5", "198.18.0.2", "127.0.0.1")


def ipvs_node(weights: tuple[int, ...] = (1, 1)) -> NodeState:
    servers = tuple(RealServer(f"10.244.0.{n + 2}:8080", w) for n, w in enumerate(weights))
    return NodeState(
        ipsets={
            "KUBE-CLUSTER-IP": IpSet("hash:ip,port", frozenset({"10.96.0.10,tcp:80"})),
            "KUBE-EXTERNAL-IP": IpSet("hash:ip,port", frozenset({"203.0.113.5,tcp:80"})),
            "KUBE-NODE-PORT-TCP": IpSet("bitmap:port", frozenset({"30080"})),
            "KUBE-LOOP-BACK": IpSet("hash:ip,port,ip", frozenset({"10.244.0.2,tcp:8080,10.244.0.2"})),
            "KUBE-IPVS-IPS": IpSet("hash:ip", frozenset({"10.96.0.10", "203.0.113.5"})),
        },
        virtual_services={
            (ip_address(vip), port, "tcp"): VirtualService("rr", servers)
            for vip, port in (("10.96.0.10", 80), ("203.0.113.5", 80), ("198.18.0.2", 30080))
        },
    )


def ipvs_trace(source: str, dest: str, port: int, node: NodeState, bridged: bool | None = None) -> TraceResult:
    packet = Packet(ip_address(source), ip_address(dest), port, bridged=bridged)
    return trace(parse(IPVS_RULES), packet, IPVS_LOCAL, node)


def test_ipvs_picks_real_servers_by_weight_after_filter_input() -> None:
    result = ipvs_trace("10.244.0.9", "10.96.0.10", 80, ipvs_node((1, 3)))
    assert {p.output: p.probability for p in result.paths} == {"10.244.0.2:8080": 0.25, "10.244.0.3:8080": 0.75}
    assert [(s.table, s.chain) for s in result.paths[0].steps][:4] == [
        ("nat", "PREROUTING"), ("filter", "INPUT"), ("filter", "KUBE-IPVS-FILTER"), ("ipvs", "10.96.0.10:80/TCP"),
    ]
    assert result.assumptions == () and not result.masquerade
    hairpin = ipvs_trace("10.244.0.2", "10.96.0.10", 80, ipvs_node((1, 0)))  # weight 0: draining
    assert (hairpin.output, hairpin.masquerade) == ("10.244.0.2:8080", True)
    empty = ipvs_trace("10.244.0.9", "10.96.0.10", 80, ipvs_node(()))
    assert empty.output == "REJECT" and empty.paths[0].steps[-1].table == "ipvs"


def test_ipvs_filters_sets_physdev_and_the_ipvs_match() -> None:
    node = ipvs_node()
    assert ipvs_trace("10.244.0.9", "10.96.0.10", 81, node).output == "REJECT"  # port not served
    assert ipvs_trace("198.19.0.9", "198.18.0.2", 30080, node).output == "10.244.0.2:8080, 10.244.0.3:8080"
    # The node reaching a VIP: from the cluster-IP outside the pod CIDR, so masqueraded.
    assert ipvs_trace("198.18.0.2", "10.96.0.10", 80, node).masquerade
    # The node reaching the LB IP from the LB IP: KUBE-IPVS-OUT-FILTER drops it (-m ipvs).
    assert ipvs_trace("203.0.113.5", "203.0.113.5", 80, node).output == "DROP"
    # External IPs: masqueraded unless the packet came over the bridge (physdev).
    assert ipvs_trace("198.19.0.9", "203.0.113.5", 80, node, bridged=False).masquerade
    assert not ipvs_trace("10.244.0.9", "203.0.113.5", 80, node, bridged=True).masquerade
    unknown = ipvs_trace("198.19.0.9", "203.0.113.5", 80, node)
    assert any("--physdev-is-in" in a for a in unknown.assumptions)
    without_sets = trace(parse(IPVS_RULES), Packet(ip_address("10.244.0.9"), ip_address("10.96.0.10"), 80),
                         IPVS_LOCAL, NodeState(virtual_services=node.virtual_services))  # fmt: skip
    assert any("--match-set KUBE-CLUSTER-IP" in a for a in without_sets.assumptions)


def test_affinity_entries_send_a_known_client_to_its_endpoint() -> None:
    ruleset = parse("""
*nat
:KUBE-SVC - [0:0]
:KUBE-SEP-A - [0:0]
:KUBE-SEP-B - [0:0]
-A PREROUTING -j KUBE-SVC
-A KUBE-SVC -m recent --name KUBE-SEP-A --rcheck --seconds 10800 --reap --mask 255.255.255.255 --rsource -j KUBE-SEP-A
-A KUBE-SVC -m recent --name KUBE-SEP-B --rcheck --seconds 10800 --reap --mask 255.255.255.255 --rsource -j KUBE-SEP-B
-A KUBE-SVC -m statistic --mode random --probability 0.5 -j KUBE-SEP-A
-A KUBE-SVC -j KUBE-SEP-B
-A KUBE-SEP-A -m recent --set --name KUBE-SEP-A --mask 255.255.255.255 --rsource -j DNAT --to-destination 10.1.0.1:80
-A KUBE-SEP-B -m recent --set --name KUBE-SEP-B --mask 255.255.255.255 --rsource -j DNAT --to-destination 10.1.0.2:80
COMMIT
""")
    packet = Packet(ip_address("10.0.0.7"), ip_address("10.96.0.1"), 80)
    assert trace(ruleset, packet, ()).output == "10.1.0.1:80, 10.1.0.2:80"
    known = NodeState(recent={"KUBE-SEP-B": frozenset({ip_address("10.0.0.7")})})
    assert trace(ruleset, packet, (), known).output == "10.1.0.2:80"
