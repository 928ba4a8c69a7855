"""`explain` and `render` in IPVS mode, against the kernel and real packets (inside the VM).

A one-node cluster of network namespaces gets IPVS mode's state for a Service with three
endpoints and a NodePort and for one without endpoints, written by the agent's IPVS backend
(its renderer, pyroute2 IPVS applier and python-iptables applier, after its sysctls).
``pykubeproxy explain`` inside the node reads its IPVS services, ipsets and IPVS-mode
iptables rules, and its predictions (real servers, masquerade and the source the pod sees,
refusal) must be what connections do (tests/crosscheck.py); ``explain -f`` offline must
predict the same. ``render -f --proxy-mode ipvs``'s output must be what the backend made: the same
virtual and real servers as ``ipvsadm-save -n``, the same kube-ipvs0 addresses and ipset
members, and, restored into an empty namespace after its ipsets, the same iptables tables.
"""

from __future__ import annotations

import functools
import json
import re
from collections.abc import Iterator
from ipaddress import ip_address, ip_network
from typing import Any

import crosscheck
import pytest

from pykubeproxy import config as config_module
from pykubeproxy.changes import EndpointsChangeTracker, ServiceChangeTracker
from pykubeproxy.config import ProxyConfig
from pykubeproxy.convert import object_name, slice_service
from pykubeproxy.explain import explain_packet, json_output, rendered_view
from pykubeproxy.iptables.applier import IptcApplier
from pykubeproxy.ipvs.applier import IpvsApplier
from pykubeproxy.ipvs.backend import IpvsBackend
from pykubeproxy.ipvs.render import IpvsConfig
from pykubeproxy.ipvs.state import DUMMY_DEVICE
from pykubeproxy.ipvs.sysctls import set_sysctls
from pykubeproxy.metrics import Metrics
from pykubeproxy.model import NodeFacts
from pykubeproxy.nodeinfo import local_addresses
from pykubeproxy.render_cmd import RenderedNode, Snapshot, cluster_model, render_node, render_text
from pykubeproxy.sandbox.lab import NODE_NAME, endpoint_slice, service
from pykubeproxy.sandbox.netns import Cluster, NetNS

pytestmark = pytest.mark.ipvs
WEB_IP, EMPTY_IP, NODE_PORT, TARGET = "10.96.0.10", "10.96.0.99", 30080, 8080
SLOW = 240.0  # seconds: emulated CPU


def ipvsadm_save(ns: NetNS) -> list[str]:
    """The IPVS table as ``ipvsadm-save -n`` (``ipvsadm -Sn``) prints it, sorted."""
    return sorted(line for line in str(ns.exec(["ipvsadm", "-Sn"]).stdout).splitlines()
                  if line.startswith(("-A", "-a")))  # fmt: skip


def cluster_objects(cluster: Cluster) -> list[dict[str, Any]]:
    pods = [cluster.pods[f"web-{i}"].ip for i in range(3)]
    return [
        {"apiVersion": "v1", "kind": "Node", "metadata": {"name": NODE_NAME}},
        service("web", WEB_IP, 80, TARGET, node_port=NODE_PORT),
        endpoint_slice("web", pods, TARGET),
        service("empty", EMPTY_IP, 80, TARGET),
    ]


def sync(cluster: Cluster, items: list[dict[str, Any]]) -> None:
    """The agent's IPVS mode: its sysctls, then one full sync of its backend."""
    services, endpoints = ServiceChangeTracker(), EndpointsChangeTracker()
    for obj in items:
        if obj["kind"] == "Service":
            services.update(object_name(obj), obj)
        elif obj["kind"] == "EndpointSlice":
            owner = slice_service(obj)
            assert owner is not None
            endpoints.update(owner, obj["metadata"]["name"], obj)
    services.apply()
    endpoints.apply()
    cfg = IpvsConfig(cluster_cidr=(ip_network(cluster.cluster_cidr),))
    addresses = functools.partial(local_addresses, DUMMY_DEVICE)
    backend = IpvsBackend(cfg, IpvsApplier(), IptcApplier(), Metrics(mode="ipvs"), addresses)
    maps = services.service_map, endpoints.endpoints_map

    def write() -> None:
        set_sysctls(strict_arp=False)
        backend.sync(*maps, None, NodeFacts(NODE_NAME))

    cluster.node.run_inside(write, timeout=SLOW)


@pytest.fixture(scope="module")
def cluster() -> Iterator[Cluster]:
    with Cluster() as c:
        for i in range(3):
            c.add_pod(f"web-{i}").serve_tcp(TARGET)
        sync(c, cluster_objects(c))
        yield c


@pytest.fixture(scope="module")
def offline(cluster: Cluster) -> RenderedNode:
    """What ``render``/``explain -f --proxy-mode ipvs --cluster-cidr ...`` compute from the
    same objects (in this process: each command costs minutes under emulation), with the
    node's addresses (eth0, cbr0) given as ``--node-address``."""
    snapshot = Snapshot()
    snapshot.add({"apiVersion": "v1", "kind": "List", "items": cluster_objects(cluster)})
    addresses = (ip_address(cluster.node_ip), ip_address(cluster.gateway_ip))
    return render_node(cluster_model(snapshot, NODE_NAME, addresses), config(cluster))


def config(cluster: Cluster) -> ProxyConfig:
    return config_module.load(["--proxy-mode", "ipvs", "--cluster-cidr", cluster.cluster_cidr])


@pytest.mark.parametrize(
    ("client", "ip", "port", "kinds"),
    [
        ("pod:web-1", WEB_IP, 80, {"kept", "masquerade"}),  # to itself: KUBE-LOOP-BACK
        ("node", WEB_IP, 80, {"masquerade"}),  # from outside the cluster CIDR
        ("client", "node", NODE_PORT, {"masquerade"}),
        ("pod:web-0", EMPTY_IP, 80, {"REJECT"}),  # a virtual server without real servers
        ("pod:web-0", WEB_IP, 81, {"REJECT"}),  # KUBE-IPVS-FILTER: a port it does not serve
    ],
)
def test_explain_predicts_what_ipvs_does(
    cluster: Cluster, offline: RenderedNode, client: str, ip: str, port: int, kinds: set[str]
) -> None:
    source = cluster.pods[client[4:]] if client.startswith("pod:") else (
        cluster.node if client == "node" else cluster.client
    )  # fmt: skip
    ip = cluster.node_ip if ip == "node" else ip
    live = crosscheck.check(cluster.node, source, ip, port, cluster.pods, TARGET)
    assert {outcome[-1] for outcome in live} == kinds
    view = rendered_view(offline, "offline", ip_network(cluster.cluster_cidr))
    explained = explain_packet(view, ip_address(ip), port, "tcp", source=ip_address(source.ip))
    assert crosscheck.predicted(json.loads(json_output([explained], view))) == live


def sections(text: str) -> dict[str, list[str]]:
    """render's IPVS-mode output, split at its ``# ...`` section headers."""
    found: dict[str, list[str]] = {}
    current = found.setdefault("", [])
    for line in text.splitlines():
        if line.startswith("# "):
            current = found.setdefault(line.split()[1], [])
        else:
            current.append(line)
    return found


def tables(save: str) -> dict[str, list[str]]:
    found: dict[str, list[str]] = {}
    for line in save.splitlines():
        if line.startswith("*"):
            current = found.setdefault(line[1:], [])
        elif not line.startswith("#"):
            current.append(re.sub(r" \[\d+:\d+\]$", "", line))
    return {name: found.get(name, []) for name in ("nat", "filter")}


def set_members(ns: NetNS) -> list[str]:
    saved = str(ns.exec(["ipset", "save"]).stdout).splitlines()
    return sorted(line for line in saved if line.startswith("add KUBE-"))


def test_render_is_what_the_backend_made(cluster: Cluster, offline: RenderedNode) -> None:
    parts = sections(render_text(offline, config(cluster)))
    node = cluster.node
    assert sorted(parts["IPVS"]) == ipvsadm_save(node)
    # web: its ClusterIP and a NodePort on each node address (eth0, cbr0), 3 real servers
    # each; empty: a ClusterIP without real servers.
    assert len(parts["IPVS"]) == 3 * (1 + 3) + 1
    with NetNS("render") as empty:
        empty.exec(["ipset", "restore"], input="\n".join(parts["ipsets"]) + "\n")
        assert set_members(empty) == set_members(node)
        empty.exec(["iptables-legacy-restore"], input="\n".join(parts["iptables"]) + "\n")
        rendered = tables(str(empty.exec(["iptables-legacy-save"]).stdout))
    assert rendered == tables(str(node.exec(["iptables-legacy-save"]).stdout))
    addresses = str(node.exec(["ip", "-4", "-o", "addr", "show", "kube-ipvs0"]).stdout)
    bound = sorted(re.findall(r"inet (\S+)", addresses))
    assert sorted(line.split()[2] for line in parts["kube-ipvs0"]) == bound
