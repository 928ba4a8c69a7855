"""`pykubeproxy explain` on rendered rules (offline): outcomes, shares, both proxy modes.

The kernel and end-to-end tests check the same predictions against real packets
(tests/kernel/test_explain_crosscheck.py, tests/e2e/test_explain_three_nodes.py); these
pin down the parts no packet can show: the probabilities, the Service form's addresses,
"may match" for rules the tracer does not understand, and the text and JSON output.
"""

from __future__ import annotations

import json
from ipaddress import ip_address, ip_network
from pathlib import Path
from typing import Any

import objects as o
import pytest
import test_upstream_flows as upstream_flows_test
import upstream_flows

from pykubeproxy import config as config_module
from pykubeproxy.cli import main as cli_main
from pykubeproxy.explain import (
    ExplainError,
    Explanation,
    NodeView,
    explain_packet,
    explain_service,
    frontends,
    json_output,
    model_frontends,
    rendered_view,
    rule_frontends,
    text_output,
)
from pykubeproxy.iptables.trace import NodeState, parse
from pykubeproxy.render_cmd import Snapshot, cluster_model, render_node

NODE_IP = "198.18.0.2"
CIDR = "10.244.0.0/16"
EXTERNAL, BLOCKED = "198.19.0.10", "198.51.100.100"


def ready(service: str, ips: dict[str, str], port: int = 8080, proto: str = "TCP") -> Any:
    obj = o.endpoint_slice("default", service, list(ips), [o.port("p", port, proto)])
    for endpoint in obj["endpoints"]:
        endpoint["nodeName"] = ips[endpoint["addresses"][0]]
    return obj


def objects() -> list[dict[str, Any]]:
    here = {"10.244.0.2": "node-1", "10.244.0.3": "node-1", "10.244.0.4": "node-1"}
    nodeport = o.port("p", 80, targetPort=8080, nodePort=30080)
    return [
        {"kind": "Node", "metadata": {"name": "node-1"}, "spec": {"podCIDR": "10.244.0.0/24"},
         "status": {"addresses": [{"type": "InternalIP", "address": NODE_IP}]}},
        o.service("default", "web", "10.96.0.10", [nodeport], type="NodePort",
                  externalIPs=["203.0.113.10"]),
        ready("web", here),
        o.service("default", "empty", "10.96.0.99", [o.port("p", 80)]),
        o.service("default", "lb", "10.96.0.30", [o.port("p", 80, nodePort=30030)],
                  type="LoadBalancer", externalTrafficPolicy="Local", healthCheckNodePort=32100,
                  loadBalancerSourceRanges=["198.19.0.0/25"],
                  status={"loadBalancer": {"ingress": [{"ip": "203.0.113.20"}]}}),
        ready("lb", {"10.244.0.5": "node-1", "10.244.1.5": "node-2"}),
        o.service("default", "dns", "10.96.0.53", [o.port("p", 53, "UDP")]),
        ready("dns", {"10.244.1.9": "node-2"}, 5353, "UDP"),
    ]  # fmt: skip


def view(mode: str = "iptables", items: list[dict[str, Any]] | None = None) -> NodeView:
    snapshot = Snapshot()
    snapshot.add({"kind": "List", "items": items or objects()})
    cfg = config_module.load(["--cluster-cidr", CIDR, "--proxy-mode", mode])
    rendered = render_node(cluster_model(snapshot, "", ()), cfg)
    return rendered_view(rendered, "test", ip_network(CIDR))


def outcomes(explanation: Explanation) -> dict[str, tuple[float, bool]]:
    (scenario,) = explanation.scenarios()
    assert scenario.assumptions == ()
    return {o.output: (round(o.probability, 4), o.masquerade) for o in scenario.outcomes}


def explain(v: NodeView, dest: str, port: int, source: str | None = None, **kw: Any) -> Any:
    src = ip_address(source) if source else None
    return explain_packet(v, ip_address(dest), port, kw.pop("protocol", "tcp"), source=src, **kw)


@pytest.mark.parametrize("mode", ["iptables", "ipvs"])
def test_three_endpoints_share_the_connections_evenly(mode: str) -> None:
    e = explain(view(mode), "10.96.0.10", 80, origin="pod")
    third = round(1 / 3, 4)
    assert outcomes(e) == {f"10.244.0.{n}:8080": (third, False) for n in (2, 3, 4)}
    assert e.service == "default/web:p" and e.kind == "cluster IP"
    assert str(e.packet.source) == "10.244.0.254"  # a pod of this node's pod CIDR


@pytest.mark.parametrize("mode", ["iptables", "ipvs"])
def test_outside_traffic_and_the_node_are_masqueraded(mode: str) -> None:
    v = view(mode)
    for dest, port in (("203.0.113.10", 80), (NODE_IP, 30080)):
        assert all(masq for _, masq in outcomes(explain(v, dest, port, EXTERNAL)).values())
    node = explain(v, "10.96.0.10", 80, origin="node")
    assert node.origin == "node" and len(outcomes(node)) == 3
    assert all(masq for _, masq in outcomes(node).values())


@pytest.mark.parametrize("mode", ["iptables", "ipvs"])
def test_no_endpoints_is_refused(mode: str) -> None:
    assert outcomes(explain(view(mode), "10.96.0.99", 80, origin="pod")) == {"REJECT": (1.0, False)}


def test_source_ranges_and_local_policy() -> None:
    v = view()
    allowed = explain(v, "203.0.113.20", 80, EXTERNAL)
    assert outcomes(allowed) == {"10.244.0.5:8080": (1.0, False)}  # Local: kept, here only
    assert outcomes(explain(v, "203.0.113.20", 80, BLOCKED)) == {"DROP": (1.0, False)}
    from_pod = outcomes(explain(v, NODE_IP, 30030, origin="pod"))
    assert from_pod == {"10.244.0.5:8080": (0.5, False), "10.244.1.5:8080": (0.5, False)}


def test_ipvs_mode_explains_virtual_services_and_its_filters() -> None:
    v = view("ipvs")
    e = explain(v, "10.96.0.10", 80, origin="pod")
    ipvs_steps = [s for s in e.result.matches if s.table == "ipvs"]
    assert [s.chain for s in ipvs_steps] == ["10.96.0.10:80/TCP"] * 3
    assert {p.virtual_service for p in e.result.paths} == {"10.96.0.10:80/TCP"}
    # A port the VIP does not serve: KUBE-IPVS-FILTER rejects it.
    wrong_port = explain(v, "10.96.0.10", 81, origin="pod")
    assert outcomes(wrong_port) == {"REJECT": (1.0, False)}
    assert wrong_port.result.matches[-1].chain == "KUBE-IPVS-FILTER"
    assert outcomes(explain(v, "203.0.113.20", 80, BLOCKED)) == {"DROP": (1.0, False)}
    # Local policy: IPVS mode sends outside clients to local real servers, client kept.
    assert outcomes(explain(v, NODE_IP, 30030, EXTERNAL)) == {"10.244.0.5:8080": (1.0, False)}


def test_the_service_form_covers_every_address() -> None:
    v = view()
    explained = explain_service(v, "default/lb", ["pod", "external"])
    tried = [(str(e.packet.destination), e.packet.port, e.origin, e.note) for e in explained]
    assert tried == [
        ("10.96.0.30", 80, "pod", ""),
        ("10.96.0.30", 80, "external", ""),
        (NODE_IP, 30030, "pod", ""),
        (NODE_IP, 30030, "external", ""),
        ("203.0.113.20", 80, "pod", ""),
        ("203.0.113.20", 80, "external", "inside the source ranges"),
        ("203.0.113.20", 80, "external", "outside the source ranges"),
    ]
    assert [e.result.output for e in explained[-2:]] == ["10.244.0.5:8080", "DROP"]
    assert {e.service for e in explain_service(v, "default/web:80", ["pod"])} == {"default/web:p"}
    with pytest.raises(ExplainError, match="no Service default/nope"):
        explain_service(v, "default/nope", ["pod"])


def test_live_rules_name_the_same_addresses_as_the_model() -> None:
    """Without the model (a live iptables node), the rules' comments give the addresses."""
    v = view()
    assert v.services is not None
    from_model = {(f.service, f.ip, f.port, f.protocol, f.source_ranges)
                  for f in model_frontends(v.services, v.nodeport_ips)}  # fmt: skip
    from_rules = {(f.service, f.ip, f.port, f.protocol, f.source_ranges)
                  for f in rule_frontends(v.ruleset, v.nodeport_ips)}  # fmt: skip
    assert from_rules == from_model


def test_ipvs_kernel_state_names_no_service() -> None:
    v = view("ipvs")
    v.services = None
    assert frontends(v) == []
    with pytest.raises(ExplainError, match="give the cluster's objects with -f"):
        explain_service(v, "default/web", ["pod"])


def test_a_rule_it_does_not_understand_may_match() -> None:
    v = view()
    v.ruleset = parse("*filter\n-I FORWARD -i eth9 -j DROP\nCOMMIT\n", v.ruleset)
    e = explain(v, "10.96.0.53", 53, origin="pod", protocol="udp")
    scenarios = {s.assumptions: {o.output for o in s.outcomes} for s in e.scenarios()}
    assert sorted(scenarios.values(), key=sorted) == [{"10.244.1.9:5353"}, {"DROP"}]
    assert all("-i eth9" in a[0] for a in scenarios)
    text = text_output([e], v, rules=True)
    assert "may match (not understood here; both ways were followed):" in text
    assert "├─ if -i eth9" in text


def test_text_and_json_output() -> None:
    v = view()
    e = explain(v, "10.96.0.10", 80, origin="pod")
    text = text_output([e], v, rules=True)
    assert "   33.3%  10.244.0.2:8080, source kept" in text
    assert "└─ then, on every branch:" in text  # the shared filter/POSTROUTING rules, once
    assert text.count("filter FORWARD #1:") == 1
    document = json.loads(json_output([e], v))
    (explained,) = document["explanations"]
    assert explained["packet"] == {
        "protocol": "tcp",
        "source": "10.244.0.254",
        "destination": "10.96.0.10",
        "port": 80,
        "from": "pod",
    }
    shares = [o["probability"] for o in explained["scenarios"][0]["outcomes"]]
    assert sum(shares) == pytest.approx(1.0) and len(explained["paths"]) == 3


def test_the_command_reads_files_and_agent_flags(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (tmp_path / "cluster.json").write_text(json.dumps({"kind": "List", "items": objects()}))
    argv = ["explain", "10.96.0.99:80", "-f", str(tmp_path), "--cluster-cidr", CIDR,
            "-o", "json"]  # fmt: skip
    assert cli_main(argv) == 0
    document = json.loads(capsys.readouterr().out)
    assert document["explanations"][0]["scenarios"][0]["outcomes"][0]["verdict"] == "REJECT"
    assert cli_main(["explain", "10.96.0.99", "-f", str(tmp_path)]) == 2
    assert "give the port too" in capsys.readouterr().err


@pytest.mark.parametrize(("case", "flow"), upstream_flows_test.PARAMS)
def test_upstream_packet_flows_through_explain(case: Any, flow: Any) -> None:
    """Upstream's packet-flow expectations (see test_upstream_flows.py) hold for explain's
    answer too, and each one's shares add up to all connections."""
    local = frozenset(ip_address(a) for a in upstream_flows.TRACER_LOCAL_IPS)
    v = NodeView("iptables", upstream_flows_test.render(case), local, NodeState(), "upstream",
                 None, None)  # fmt: skip
    e = explain(v, flow.destination, flow.port, flow.source, protocol=flow.protocol.lower())
    assert (e.result.output, e.result.masquerade) == (flow.output, flow.masq)
    (scenario,) = e.scenarios()
    assert sum(o.probability for o in scenario.outcomes) == pytest.approx(1.0)
