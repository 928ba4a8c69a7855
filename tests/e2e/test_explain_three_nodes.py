"""`explain` and `render` against three nodes running the real agent.

The Service shapes of tests/e2e/test_three_nodes.py that only mean something with more than
one node (traffic policies Local, topology hints, load balancer source ranges reached
through a routed load balancer, terminating endpoints, affinity, no endpoints) are built
again here; for each, ``pykubeproxy explain`` runs on the node that handles the connection
(the client pod's node, or the node an outside client sends to), reading that node's kernel,
and its predicted outcome set must be what real connections do (tests/crosscheck.py).
``render`` for a node, from the API's objects as ``kubectl get -o json`` lists them, must
read back as that node's agent left its tables.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import crosscheck
import pytest

from pykubeproxy.sandbox.multinode import CLUSTER_CIDR, MultiNodeCluster, service
from pykubeproxy.sandbox.netns import Host, NetNS

pytestmark = [
    pytest.mark.e2e,
    pytest.mark.skipif(os.geteuid() != 0 or shutil.which("ip") is None, reason="needs root"),
]

PORT, TARGET = 80, 8080
EVERY_WEB = ("web-1", "web-2", "web-3")


@pytest.fixture(scope="module")
def mc() -> Iterator[MultiNodeCluster]:
    with MultiNodeCluster() as cluster:
        for node in cluster.nodes.values():
            cluster.add_pod(node.label, f"web-{node.index}").serve_tcp(TARGET)
            cluster.add_pod(node.label, f"cli-{node.index}")
        cluster.start_agents()
        yield cluster


def publish(mc: MultiNodeCluster, name: str, ip: str, endpoints: list[Any], **spec: Any) -> None:
    """A Service and its slice, then wait until every agent has applied them."""
    mc.apply("services", service(name, ip, port=PORT, target_port=TARGET, **spec))
    mc.set_endpoints(name, endpoints, TARGET)
    mc.wait_synced()


def check(mc: MultiNodeCluster, node: str, client: Host, ip: str, port: int) -> set[str]:
    """explain on `node` against `client`'s connections; the pods (or verdict) reached."""
    found = crosscheck.check(mc.nodes[node], client, ip, port, mc.pods, TARGET)
    by_ip = {f"{pod.ip}:{TARGET}": name for name, pod in mc.pods.items()}
    return {by_ip.get(outcome[0], outcome[0]) for outcome in found}


def test_external_policy_local(mc: MultiNodeCluster) -> None:
    lb = "203.0.113.21"
    publish(mc, "local", "10.96.1.1", [mc.endpoint("web-1"), mc.endpoint("web-2")],
            node_port=30101, load_balancer_ip=lb, externalTrafficPolicy="Local",
            healthCheckNodePort=32101)  # fmt: skip
    outside, node3 = mc.clients["ext-a"], mc.nodes["node-3"]
    for node, local in (("node-1", {"web-1"}), ("node-2", {"web-2"}), ("node-3", {"DROP"})):
        assert check(mc, node, outside, mc.nodes[node].ip, 30101) == local, node
    both = {"web-1", "web-2"}
    assert check(mc, "node-3", mc.pods["cli-3"], node3.ip, 30101) == both  # short-circuit
    assert check(mc, "node-3", mc.pods["cli-3"], lb, PORT) == both
    assert check(mc, "node-3", node3, lb, PORT) == both  # the node's own, masqueraded


def test_internal_policy_local(mc: MultiNodeCluster) -> None:
    publish(mc, "itp", "10.96.1.2", [mc.endpoint("web-1"), mc.endpoint("web-2")],
            internalTrafficPolicy="Local")  # fmt: skip
    assert check(mc, "node-1", mc.pods["cli-1"], "10.96.1.2", PORT) == {"web-1"}
    assert check(mc, "node-3", mc.pods["cli-3"], "10.96.1.2", PORT) == {"DROP"}


def test_zone_hints(mc: MultiNodeCluster) -> None:
    hinted = [mc.endpoint(pod, hinted=True) for pod in EVERY_WEB]
    publish(mc, "zoned", "10.96.1.3", hinted, trafficDistribution="PreferClose")
    for node, pod, zone in (
        ("node-1", "cli-1", {"web-1", "web-2"}),
        ("node-3", "cli-3", {"web-3"}),
    ):
        mc.converge(f"{node} to follow the hints", lambda node=node, pod=pod: check(
            mc, node, mc.pods[pod], "10.96.1.3", PORT), zone, timeout=20)  # fmt: skip


def test_load_balancer_source_ranges(mc: MultiNodeCluster) -> None:
    lb, every = "203.0.113.24", [mc.endpoint(pod) for pod in EVERY_WEB]
    publish(mc, "ranged", "10.96.1.4", every, node_port=30104, load_balancer_ip=lb,
            loadBalancerSourceRanges=["198.19.0.0/25"])  # fmt: skip
    mc.route_load_balancer(lb, ["node-2"])
    assert check(mc, "node-2", mc.clients["ext-a"], lb, PORT) == set(EVERY_WEB)
    assert check(mc, "node-2", mc.clients["ext-b"], lb, PORT) == {"DROP"}
    assert check(mc, "node-1", mc.clients["ext-b"], mc.nodes["node-1"].ip, 30104) == set(EVERY_WEB)


def test_terminating_fallback_and_no_endpoints(mc: MultiNodeCluster) -> None:
    serving = [mc.endpoint(pod, ready=False, serving=True, terminating=True) for pod in EVERY_WEB]
    publish(mc, "ending", "10.96.1.5", serving, node_port=30105)
    assert check(mc, "node-1", mc.pods["cli-1"], "10.96.1.5", PORT) == set(EVERY_WEB)
    publish(mc, "ending", "10.96.1.5", [], node_port=30105)
    assert check(mc, "node-1", mc.pods["cli-1"], "10.96.1.5", PORT) == {"REJECT"}
    assert check(mc, "node-3", mc.clients["ext-a"], mc.nodes["node-3"].ip, 30105) == {"REJECT"}


def test_affinity(mc: MultiNodeCluster) -> None:
    publish(mc, "sticky", "10.96.1.6", [mc.endpoint(pod) for pod in EVERY_WEB],
            sessionAffinity="ClientIP")  # fmt: skip
    pod, node = mc.pods["cli-2"], mc.nodes["node-2"]
    first = crosscheck.predicted_sources(crosscheck.explain(node, "10.96.1.6", PORT, pod.ip))
    assert len(first) == 3
    reached = crosscheck.observed(pod, "10.96.1.6", PORT, mc.pods, TARGET, n=1)
    assert reached <= first
    after = crosscheck.check(node, pod, "10.96.1.6", PORT, mc.pods, TARGET)
    assert {o[0] for o in after} == {o[0] for o in reached}


def kubectl_get(mc: MultiNodeCluster, path: Path) -> None:
    """What ``kubectl get svc,endpointslices,nodes -A -o json`` prints, from the API double."""
    kinds = {"services": "Service", "endpointslices": "EndpointSlice", "nodes": "Node"}
    items = [{**obj, "kind": kind} for plural, kind in kinds.items() for obj in mc.api.list(plural)]
    path.write_text(json.dumps({"apiVersion": "v1", "kind": "List", "items": items}))


def tables(save: str) -> dict[str, list[str]]:
    """nat, filter and mangle of iptables-save text, without comments and counters."""
    found: dict[str, list[str]] = {}
    for line in save.splitlines():
        if line.startswith("*"):
            current = found.setdefault(line[1:], [])
        elif not line.startswith("#"):
            current.append(re.sub(r" \[\d+:\d+\]$", "", line))
    return {name: found.get(name, []) for name in ("nat", "filter", "mangle")}


def test_render_is_what_each_agent_wrote(mc: MultiNodeCluster, tmp_path: Path) -> None:
    """Every Service the tests above left, rendered per node, reads back as that node's
    agent left its tables (Local policies and zone hints make each node's rules differ)."""
    mc.wait_synced()
    snapshot = tmp_path / "cluster.json"
    kubectl_get(mc, snapshot)
    for name, node in mc.nodes.items():
        argv = [sys.executable, "-m", "pykubeproxy", "render", "-f", str(snapshot), "--node",
                name, "--cluster-cidr", CLUSTER_CIDR]  # fmt: skip
        text = subprocess.run(argv, check=True, capture_output=True, text=True).stdout
        with NetNS("render") as empty:
            empty.exec(["iptables-legacy-restore"], input=text)
            rendered = tables(str(empty.exec(["iptables-legacy-save"]).stdout))
        assert rendered == tables(str(node.exec(["iptables-legacy-save"]).stdout)), name
