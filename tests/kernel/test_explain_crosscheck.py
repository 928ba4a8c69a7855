"""`explain` and `render` proven against the kernel, for every Service shape the kernel tests
build.

A one-node cluster of network namespaces (pykubeproxy.sandbox.netns) gets the agent's
rules for Services of each shape (ClusterIP, UDP, NodePort, externalIP, no endpoints,
hairpin, session affinity, externalTrafficPolicy Local with and without a local endpoint,
internalTrafficPolicy Local, a load balancer IP with source ranges), written by the agent's
iptables backend (its renderer and python-iptables applier). Then:

* for every probe, ``pykubeproxy explain`` run inside the node (reading its kernel) predicts
  an outcome set (endpoints with masquerade or not, REJECT, DROP) and real connections from
  the probe's client must do exactly that (tests/crosscheck.py);
* ``explain -f`` on the same objects, offline, predicts the same;
* ``pykubeproxy render -f`` on the same objects, restored into a fresh namespace with
  iptables-legacy-restore, reads back exactly as the node's tables do.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from collections.abc import Iterator
from ipaddress import ip_network
from typing import Any

import crosscheck
import objects as o
import pytest

from pykubeproxy.changes import EndpointsChangeTracker, ServiceChangeTracker
from pykubeproxy.iptables.applier import IptcApplier
from pykubeproxy.iptables.backend import IptablesBackend
from pykubeproxy.iptables.render import LocalDetector, RenderConfig, Renderer
from pykubeproxy.metrics import Metrics
from pykubeproxy.model import NamespacedName, NodeFacts
from pykubeproxy.sandbox.netns import Cluster, Host, NetNS

pytestmark = [
    pytest.mark.kernel,
    pytest.mark.skipif(os.geteuid() != 0 or shutil.which("ip") is None, reason="needs root"),
]

NODE, ELSEWHERE = "node-1", "node-2"
TCP, UDP = 8080, 5353
EXTERNAL_IP, LOCAL_LB, RANGED_LB = "203.0.113.10", "203.0.113.40", "203.0.113.60"


def slice_for(name: str, pods: dict[str, str], port: dict[str, Any]) -> dict[str, Any]:
    """An EndpointSlice whose endpoints name their node (pod IP -> node)."""
    obj = o.endpoint_slice("default", name, list(pods), [port])
    for endpoint in obj["endpoints"]:
        endpoint["nodeName"] = pods[endpoint["addresses"][0]]
    return obj


def cluster_objects(cluster: Cluster) -> list[dict[str, Any]]:
    """One Service of each shape, with its EndpointSlice, and the Node."""
    a, b, c = (cluster.pods[p].ip for p in "abc")
    here = {a: NODE, b: NODE, c: NODE}
    http, lb = o.port("p", 80, targetPort=TCP), {"type": "LoadBalancer"}

    def nodeport(number: int) -> dict[str, Any]:
        return o.port("p", 80, targetPort=TCP, nodePort=number)

    def ingress(ip: str) -> dict[str, Any]:
        return {"loadBalancer": {"ingress": [{"ip": ip}]}}

    tcp, udp = o.port("p", TCP), o.port("p", UDP, "UDP")
    return [
        {"apiVersion": "v1", "kind": "Node", "metadata": {"name": NODE},
         "status": {"addresses": [{"type": "InternalIP", "address": cluster.node_ip}]}},
        o.service("default", "web", "10.96.0.10", [nodeport(30080)], type="NodePort",
                  externalIPs=[EXTERNAL_IP]),
        slice_for("web", here, tcp),
        o.service("default", "dns", "10.96.0.53", [o.port("p", 53, "UDP")]),
        slice_for("dns", here, udp),
        o.service("default", "empty", "10.96.0.99", [nodeport(30099)], type="NodePort"),
        o.service("default", "self", "10.96.0.20", [http]),
        slice_for("self", {a: NODE}, tcp),
        o.service("default", "sticky", "10.96.0.30", [http], sessionAffinity="ClientIP"),
        slice_for("sticky", here, tcp),
        o.service("default", "local", "10.96.0.40", [nodeport(30040)], **lb,
                  externalTrafficPolicy="Local", healthCheckNodePort=32040,
                  status=ingress(LOCAL_LB)),
        slice_for("local", {a: NODE, b: ELSEWHERE}, tcp),
        o.service("default", "nolocal", "10.96.0.50", [nodeport(30050)], type="NodePort",
                  externalTrafficPolicy="Local", internalTrafficPolicy="Local"),
        slice_for("nolocal", {b: ELSEWHERE}, tcp),
        o.service("default", "ranged", "10.96.0.60", [nodeport(30060)], **lb,
                  loadBalancerSourceRanges=[f"{cluster.client.ip}/32"],
                  status=ingress(RANGED_LB)),
        slice_for("ranged", here, tcp),
    ]  # fmt: skip


def apply_objects(cluster: Cluster, items: list[dict[str, Any]]) -> None:
    """The agent's pipeline: change trackers, then its iptables backend (renderer and
    python-iptables applier), as it syncs with --cluster-cidr."""
    services, endpoints = ServiceChangeTracker(), EndpointsChangeTracker()
    for obj in items:
        meta = obj["metadata"]
        if obj["kind"] == "Service":
            services.update(NamespacedName(meta["namespace"], meta["name"]), obj)
        elif obj["kind"] == "EndpointSlice":
            owner = NamespacedName(meta["namespace"], meta["labels"]["kubernetes.io/service-name"])
            endpoints.update(owner, meta["name"], obj)
    services.apply()
    endpoints.apply()
    detector = LocalDetector.by_cidr(ip_network(cluster.cluster_cidr))
    renderer = Renderer(RenderConfig(local_detector=detector))
    backend = IptablesBackend(renderer, IptcApplier(), Metrics())
    maps = services.service_map, endpoints.endpoints_map
    cluster.node.run_inside(lambda: backend.sync(*maps, None, NodeFacts(NODE)))


@pytest.fixture(scope="module")
def cluster() -> Iterator[Cluster]:
    with Cluster() as c:
        for name in "abc":
            pod = c.add_pod(name)
            pod.serve_tcp(TCP)
            pod.serve_udp(UDP)
        c.add_client("client2")
        apply_objects(c, cluster_objects(c))
        yield c
        c.node.run_inside(IptcApplier().cleanup)


@pytest.fixture(scope="module")
def offline(cluster: Cluster, tmp_path_factory: pytest.TempPathFactory) -> list[str]:
    """explain/render flags for the same objects, offline: a kubectl-style List file, the
    node, the agent's flags, and cbr0's address (the node's too)."""
    snapshot = tmp_path_factory.mktemp("explain") / "cluster.json"
    items = cluster_objects(cluster)
    snapshot.write_text(json.dumps({"apiVersion": "v1", "kind": "List", "items": items}))
    return ["-f", str(snapshot), "--node", NODE, "--cluster-cidr", cluster.cluster_cidr,
            "--node-address", cluster.gateway_ip]  # fmt: skip


def client_of(cluster: Cluster, name: str) -> Host:
    if name.startswith("pod:"):
        return cluster.pods[name[4:]]
    return cluster.node if name == "node" else cluster.clients[name]


NODE_IP = Cluster.node_ip
KEPT, MASQ, REJECT, DROP = {"kept"}, {"masquerade"}, {"REJECT"}, {"DROP"}
# (client, destination, port, udp, what the outcomes say) for every Service shape above.
PROBES = [
    ("node", "10.96.0.10", 80, False, MASQ),  # from outside the cluster CIDR
    ("pod:b", "10.96.0.10", 80, False, KEPT | MASQ),  # to itself: hairpin, masqueraded
    ("client", NODE_IP, 30080, False, MASQ),
    ("client", EXTERNAL_IP, 80, False, MASQ),
    ("pod:c", "10.96.0.53", 53, True, KEPT | MASQ),
    ("pod:a", "10.96.0.99", 80, False, REJECT),  # no endpoints
    ("node", "10.96.0.99", 80, False, REJECT),
    ("client", NODE_IP, 30099, False, REJECT),
    ("pod:a", "10.96.0.20", 80, False, MASQ),  # its only endpoint is itself
    ("client", NODE_IP, 30040, False, KEPT),  # Local: the local endpoint, client kept
    ("client", LOCAL_LB, 80, False, KEPT),
    ("pod:c", LOCAL_LB, 80, False, KEPT),  # pods: short-circuited to every endpoint
    ("node", LOCAL_LB, 80, False, MASQ),  # the node: the same, masqueraded
    ("client", NODE_IP, 30050, False, DROP),  # Local without a local endpoint
    ("pod:a", "10.96.0.50", 80, False, DROP),  # internalTrafficPolicy Local, none here
    ("pod:a", NODE_IP, 30050, False, KEPT),
    ("client", RANGED_LB, 80, False, MASQ),  # inside loadBalancerSourceRanges
    ("client2", RANGED_LB, 80, False, DROP),  # outside them
    ("client2", NODE_IP, 30060, False, MASQ),  # node ports ignore source ranges
]


@pytest.mark.parametrize(("client", "ip", "port", "udp", "kinds"), PROBES,
                         ids=[f"{p[0]}->{p[1]}:{p[2]}" for p in PROBES])  # fmt: skip
def test_explain_predicts_what_packets_do(
    cluster: Cluster, offline: list[str], client: str, ip: str, port: int, udp: bool,
    kinds: set[str],
) -> None:  # fmt: skip
    source = client_of(cluster, client)
    target = UDP if udp else TCP
    live = crosscheck.check(cluster.node, source, ip, port, cluster.pods, target, udp=udp)
    assert {outcome[-1] for outcome in live} == kinds
    protocol = "udp" if udp else "tcp"
    document = crosscheck.explain(cluster.node, ip, port, source.ip, protocol, *offline)
    assert crosscheck.predicted(document) == live  # the rendered rules say the same, offline


def test_affinity_is_read_from_the_kernel(cluster: Cluster) -> None:
    """A new client may reach every endpoint; once it has, explain reads its xt_recent entry
    and names the one endpoint its connections keep going to."""
    pod = cluster.pods["b"]
    first = crosscheck.predicted_sources(crosscheck.explain(cluster.node, "10.96.0.30", 80, pod.ip))
    assert len(first) == 3
    reached = crosscheck.observed(pod, "10.96.0.30", 80, cluster.pods, TCP, n=1)
    assert reached <= first
    after = crosscheck.check(cluster.node, pod, "10.96.0.30", 80, cluster.pods, TCP)
    assert {o[0] for o in after} == {o[0] for o in reached}


def normalized(save: str) -> dict[str, list[str]]:
    """The nat, filter and mangle tables of iptables-save text, without counters."""
    tables: dict[str, list[str]] = {}
    for line in save.splitlines():
        if line.startswith("*"):
            rules = tables.setdefault(line[1:], [])
        elif not line.startswith("#"):
            rules.append(re.sub(r" \[\d+:\d+\]$", "", line))
    return {name: tables.get(name, []) for name in ("nat", "filter", "mangle")}


def test_render_is_what_the_agent_wrote(cluster: Cluster, offline: list[str]) -> None:
    """``render -f`` restored into an empty namespace reads back as the node's tables."""
    argv = [sys.executable, "-m", "pykubeproxy", "render", *offline]
    text = subprocess.run(argv, check=True, capture_output=True, text=True, timeout=60).stdout
    with NetNS("render") as empty:
        empty.exec(["iptables-legacy-restore"], input=text)
        rendered = normalized(str(empty.exec(["iptables-legacy-save"]).stdout))
    kernel = normalized(str(cluster.node.exec(["iptables-legacy-save"]).stdout))
    assert rendered == kernel
    assert sum("KUBE-SEP-" in line for line in kernel["nat"]) > 20
