"""Golden tests: rendered rules against kube-proxy's own expected iptables-restore text.

`OVERALL_EXPECTED` (upstream_goldens.py) is upstream's `TestOverallIPTablesRules` expectation (kubernetes/kubernetes
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
from upstream_goldens import BAD_IPS_EXPECTED, OVERALL_EXPECTED

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


def assert_upstream_text(rendered: Rendered, expected: str) -> None:
    """Same chains declared, same rules in each chain, in order (chain order is free)."""
    got = parse_restore(restore_text([rendered.filter, rendered.nat]))
    for declared, _ in got.values():
        declared.discard(CANARY)
    want = parse_restore(as_on_this_node(expected))
    assert got.keys() == want.keys()
    for table in want:
        assert got[table][0] == want[table][0], table
        assert got[table][1] == want[table][1], table


def test_overall_rules_match_kube_proxy() -> None:
    assert_upstream_text(render_overall(), OVERALL_EXPECTED)


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


def test_bad_ips_render_as_upstream() -> None:
    """upstream TestBadIPs' expected text, for a Service whose every address field holds
    a legacy spelling (IPv4 octets with leading zeros, blanks around a CIDR), which old
    objects can still carry and upstream reads as decimal."""
    svc = o.service(
        "ns1",
        "svc1",
        "172.30.0.041",
        [o.port("p80", 80, nodePort=3001)],
        type="LoadBalancer",
        externalIPs=["192.168.099.022"],
        healthCheckNodePort=30000,
        loadBalancerSourceRanges=[" 203.0.113.000/25"],
        status={"loadBalancer": {"ingress": [{"ip": "1.2.003.004"}]}},
    )
    eps = o.endpoint_slice("ns1", "svc1", ["10.180.00.001"], [o.port("p80", 80)])
    services, endpoints = ServiceChangeTracker(), EndpointsChangeTracker()
    services.update(NamespacedName("ns1", "svc1"), svc)
    endpoints.update(NamespacedName("ns1", "svc1"), "svc1-abcde", eps)
    services.apply()
    endpoints.apply()
    rendered = Renderer(UPSTREAM_TEST_CONFIG).render(
        services.service_map, endpoints.endpoints_map, node=TEST_NODE
    )
    assert_upstream_text(rendered, BAD_IPS_EXPECTED)
