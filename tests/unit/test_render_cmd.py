"""`pykubeproxy render`: kubectl's JSON in, what the agent would write out, no kernel.

That the output is what the agent writes is proven on a kernel in
tests/kernel/test_explain_crosscheck.py (restored and read back); here, that it is what the
agent's own backend hands its applier, and how inputs, nodes and --diff behave.
"""

from __future__ import annotations

import io
import json
from ipaddress import ip_address, ip_network
from pathlib import Path
from typing import Any

import objects as o
import pytest
import yaml

from pykubeproxy import config as config_module
from pykubeproxy.cli import main as cli_main
from pykubeproxy.iptables.backend import IptablesBackend
from pykubeproxy.iptables.render import LocalDetector, RenderConfig, Renderer
from pykubeproxy.iptables.ruleset import TableState
from pykubeproxy.metrics import Metrics
from pykubeproxy.model import NodeFacts
from pykubeproxy.render_cmd import (
    InputError,
    Snapshot,
    cluster_model,
    load_snapshot,
    render_node,
    render_text,
)

CIDR = "10.244.0.0/16"


def node(name: str, ip: str) -> dict[str, Any]:
    return {"kind": "Node", "metadata": {"name": name},
            "status": {"addresses": [{"type": "InternalIP", "address": ip}]}}  # fmt: skip


def web(endpoints: list[str]) -> list[dict[str, Any]]:
    service = o.service("default", "web", "10.96.0.10",
                        [o.port("p", 80, targetPort=8080, nodePort=30080)], type="NodePort",
                        sessionAffinity="ClientIP")  # fmt: skip
    return [service, o.endpoint_slice("default", "web", endpoints, [o.port("p", 8080)])]


def as_list(items: list[dict[str, Any]]) -> dict[str, Any]:
    return {"apiVersion": "v1", "kind": "List", "items": items}


def write(path: Path, items: list[dict[str, Any]]) -> str:
    path.write_text(json.dumps(as_list(items)))
    return str(path)


class Recorder:
    """An applier that keeps what it is given."""

    def __init__(self) -> None:
        self.tables: list[TableState] = []

    def apply(self, tables: list[TableState]) -> None:
        self.tables = tables


def test_the_tables_are_what_the_agents_backend_applies() -> None:
    items = [node("node-1", "198.18.0.2"), *web(["10.244.0.2", "10.244.0.3"])]
    snapshot = Snapshot()
    snapshot.add(as_list(items))
    cluster = cluster_model(snapshot, "node-1", ())
    cfg = config_module.load(["--cluster-cidr", CIDR])
    rendered = render_node(cluster, cfg)
    recorder = Recorder()
    renderer = Renderer(RenderConfig(local_detector=LocalDetector.by_cidr(ip_network(CIDR))))
    backend = IptablesBackend(renderer, recorder, Metrics())
    backend.sync(cluster.services, cluster.endpoints, None, cluster.node)
    assert rendered.tables == recorder.tables
    assert [t.name for t in rendered.tables] == ["nat", "filter", "mangle"]


def test_inputs_lists_typed_lists_directories_yaml_and_stdin(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    service, endpoints = web(["10.244.0.2"])
    typed = {"kind": "ServiceList", "items": [{k: v for k, v in service.items() if k != "kind"}]}
    (tmp_path / "services.json").write_text(json.dumps(typed))
    (tmp_path / "slices.yaml").write_text(yaml.safe_dump_all([endpoints, {"kind": "Pod"}]))
    (tmp_path / "notes.txt").write_text("not read")
    monkeypatch.setattr("sys.stdin", io.StringIO(json.dumps(node("node-1", "198.18.0.2"))))
    snapshot = load_snapshot([str(tmp_path), "-"])
    assert {kind: len(found) for kind, found in snapshot.objects.items()} == {
        "Service": 1, "EndpointSlice": 1, "Node": 1,
    }  # fmt: skip
    assert snapshot.ignored == 1
    cluster = cluster_model(snapshot, "", (ip_address("10.244.0.1"),))
    assert cluster.node == NodeFacts("node-1", "", ip_address("198.18.0.2"))
    assert [str(a) for a in cluster.addresses] == ["198.18.0.2", "10.244.0.1", "127.0.0.1"]


def test_which_node(tmp_path: Path) -> None:
    two = Snapshot()
    two.add(as_list([node("node-1", "198.18.0.2"), node("node-2", "198.18.0.3")]))
    with pytest.raises(InputError, match="2 Nodes in the input: name one with --node"):
        cluster_model(two, "", ())
    with pytest.raises(InputError, match="no Node 'node-9'"):
        cluster_model(two, "node-9", ())
    assert cluster_model(two, "node-2", ()).node.ip == ip_address("198.18.0.3")
    assert cluster_model(Snapshot(), "", ()).node == NodeFacts()


def test_ipvs_state_in_the_reference_tools_forms(tmp_path: Path) -> None:
    path = write(tmp_path / "c.json", [node("node-1", "198.18.0.2"), *web(["10.244.0.2"])])
    cfg = config_module.load(["--proxy-mode", "ipvs", "--cluster-cidr", CIDR])
    snapshot = load_snapshot([path])
    text = render_text(render_node(cluster_model(snapshot, "", ()), cfg), cfg)
    assert "-A -t 10.96.0.10:80 -s rr -p 10800\n-a -t 10.96.0.10:80 -r 10.244.0.2:8080 -m -w 1" in (
        text
    )
    assert "-A -t 198.18.0.2:30080 -s rr -p 10800" in text
    assert "address add 10.96.0.10/32 dev kube-ipvs0" in text
    assert "add KUBE-NODE-PORT-TCP 30080" in text
    assert "*nat\n" in text and "-A KUBE-SERVICES -s 127.0.0.0/8 -j RETURN" in text


def test_render_and_diff_commands(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    before = write(tmp_path / "before.json", web(["10.244.0.2", "10.244.0.3"]))
    after = write(tmp_path / "after.json", web(["10.244.0.2"]))
    assert cli_main(["render", "-f", before, "--cluster-cidr", CIDR]) == 0
    out = capsys.readouterr().out
    assert out.startswith("# pykubeproxy render: node (none), iptables mode, 1 Services")
    assert '-I PREROUTING -m comment --comment "kubernetes service portals"' in out
    assert cli_main(["render", "--diff", "-f", before, "-f", before]) == 0
    assert capsys.readouterr().out == "no changes\n"
    assert cli_main(["render", "--diff", "-f", before, "-f", after]) == 1
    diff = capsys.readouterr().out
    assert diff.startswith(f"--- {before}\n+++ {after}\n")
    removed = [line for line in diff.splitlines() if line.startswith("--A KUBE-SEP-")]
    assert removed and all("10.244.0.3" in line for line in removed)
    assert cli_main(["render", "--diff", "-f", before]) == 2
    assert cli_main(["render", "-f", before, "--proxy-mode", "nope"]) == 2
    assert "error:" in capsys.readouterr().err
