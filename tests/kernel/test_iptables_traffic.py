"""Rendered rules applied to a real kernel, proven with real TCP and UDP packets.

A one-node cluster of network namespaces (see pykubeproxy.sandbox.netns): the
applier runs inside the node namespace, pods answer with their names, and the
client sits outside on the node's LAN. Nothing here touches the root namespace.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from ipaddress import ip_network
from typing import Any

import objects as o
import pytest

from pykubeproxy.backend import KeptChainMissing
from pykubeproxy.changes import EndpointsChangeTracker, ServiceChangeTracker
from pykubeproxy.iptables.applier import IptcApplier
from pykubeproxy.iptables.render import LocalDetector, RenderConfig, Renderer
from pykubeproxy.iptables.ruleset import TableState
from pykubeproxy.model import NamespacedName
from pykubeproxy.sandbox.netns import Cluster, spread

pytestmark = [
    pytest.mark.kernel,
    pytest.mark.skipif(os.geteuid() != 0 or shutil.which("ip") is None, reason="needs root"),
]

TCP_PORT, UDP_PORT = 8080, 5353
WEB_IP, DNS_IP, EMPTY_IP, SELF_IP = "10.96.0.10", "10.96.0.53", "10.96.0.99", "10.96.0.20"
EXTERNAL_IP = "203.0.113.10"  # routed to the node by the client's default route
WEB_NODEPORT, EMPTY_NODEPORT = 30080, 30099
FOREIGN = [
    ["-t", "nat", "-A", "POSTROUTING", "-s", "192.0.2.0/24", "-j", "MASQUERADE"],
    ["-t", "filter", "-N", "FOREIGN"],
    ["-t", "filter", "-A", "FOREIGN", "-p", "tcp", "--dport", "22", "-j", "ACCEPT"],
    ["-t", "filter", "-I", "INPUT", "-j", "FOREIGN"],
    [
        "-t",
        "mangle",
        "-A",
        "PREROUTING",
        "-p",
        "udp",
        "--dport",
        "4789",
        "-j",
        "MARK",
        "--set-mark",
        "7",
    ],
    ["-t", "nat", "-N", "KUBE-KUBELET-CANARY"],
]


class Node:
    """The agent's pure pipeline plus the applier, driven by API objects."""

    def __init__(self, cluster: Cluster) -> None:
        self.cluster = cluster
        self.services = ServiceChangeTracker()
        self.endpoints = EndpointsChangeTracker()
        detector = LocalDetector.by_cidr(ip_network(cluster.cluster_cidr))
        self.renderer = Renderer(RenderConfig(local_detector=detector))
        self.applier = IptcApplier()

    def service(
        self, obj: dict[str, Any] | None, name: str = "", namespace: str = "default"
    ) -> None:
        meta = obj["metadata"] if obj else {"namespace": namespace, "name": name}
        self.services.update(NamespacedName(meta["namespace"], meta["name"]), obj)

    def slice(self, obj: dict[str, Any]) -> None:
        meta = obj["metadata"]
        svc = NamespacedName(meta["namespace"], meta["labels"]["kubernetes.io/service-name"])
        self.endpoints.update(svc, meta["name"], obj)

    def render(self, partial: bool = False) -> list[TableState]:
        changed = self.services.apply() | self.endpoints.apply().changed
        rewrite = (
            {n for n in self.services.service_map if n.service in changed} if partial else None
        )
        rendered = self.renderer.render(
            self.services.service_map, self.endpoints.endpoints_map, rewrite
        )
        return rendered.tables

    def sync(self, partial: bool = False) -> None:
        tables = self.render(partial)
        self.cluster.node.run_inside(lambda: self.applier.apply(tables))

    def save(self) -> str:
        return str(self.cluster.node.exec(["iptables-legacy-save"]).stdout)


def foreign_lines(save: str) -> dict[str, list[str]]:
    """Per table, the save output without our rules, counters and comments."""
    tables: dict[str, list[str]] = {}
    for line in save.splitlines():
        if line.startswith("*"):
            current = tables.setdefault(line[1:], [])
        elif not line.startswith("#") and "KUBE-" not in line.replace("KUBE-KUBELET-CANARY", ""):
            current.append(line.split(" [")[0])
    return tables


@pytest.fixture(scope="module")
def cluster() -> Iterator[Cluster]:
    with Cluster() as c:
        for name in ("a", "b", "c"):
            pod = c.add_pod(name)
            pod.serve_tcp(TCP_PORT)
            pod.serve_udp(UDP_PORT)
        for rule in FOREIGN:
            c.node.exec(["iptables-legacy", *rule])
        yield c


@pytest.fixture
def node(cluster: Cluster) -> Iterator[Node]:
    before = foreign_lines(Node(cluster).save())
    node = Node(cluster)
    pods = [cluster.pods[p].ip for p in ("a", "b", "c")]
    node.service(
        o.service(
            "default",
            "web",
            WEB_IP,
            [o.port("http", 80, targetPort=TCP_PORT, nodePort=WEB_NODEPORT)],
            type="NodePort",
            externalIPs=[EXTERNAL_IP],
        )
    )
    node.slice(o.endpoint_slice("default", "web", pods, [o.port("http", TCP_PORT)]))
    node.service(o.service("default", "dns", DNS_IP, [o.port("dns", 53, "UDP")]))
    node.slice(o.endpoint_slice("default", "dns", pods, [o.port("dns", UDP_PORT, "UDP")]))
    node.service(
        o.service(
            "default",
            "empty",
            EMPTY_IP,
            [o.port("http", 80, nodePort=EMPTY_NODEPORT)],
            type="NodePort",
        )
    )
    node.service(o.service("default", "self", SELF_IP, [o.port("http", 80)]))
    node.slice(o.endpoint_slice("default", "self", [pods[0]], [o.port("http", TCP_PORT)]))
    node.sync()
    yield node
    cluster.node.run_inside(node.applier.cleanup)
    after = foreign_lines(node.save())
    assert {table: after[table] for table in before} == before


def test_cluster_ip_from_the_node_reaches_every_endpoint(cluster: Cluster, node: Node) -> None:
    seen = spread(lambda: cluster.node.tcp_request(WEB_IP, 80), 60)
    assert set(seen) == {"a", "b", "c"}


def test_cluster_ip_from_a_pod_keeps_the_pod_source(cluster: Cluster, node: Node) -> None:
    seen = spread(lambda: cluster.pods["b"].tcp_request(WEB_IP, 80), 40)
    assert set(seen) == {"a", "b", "c"}
    assert cluster.pods["b"].ip in cluster.pods["a"].seen_ips(TCP_PORT)


def test_udp_cluster_ip(cluster: Cluster, node: Node) -> None:
    seen = spread(lambda: cluster.pods["c"].udp_request(DNS_IP, 53), 40)
    assert set(seen) == {"a", "b", "c"}


def test_nodeport_and_external_ip_from_outside(cluster: Cluster, node: Node) -> None:
    client = cluster.client
    assert set(spread(lambda: client.tcp_request(cluster.node_ip, WEB_NODEPORT), 40)) == {
        "a",
        "b",
        "c",
    }
    assert set(spread(lambda: client.tcp_request(EXTERNAL_IP, 80), 40)) == {"a", "b", "c"}
    # External traffic is masqueraded (cluster traffic policy): pods never see the client.
    assert all(client.ip not in cluster.pods[p].seen_ips() for p in ("a", "b", "c"))


def test_service_without_endpoints_is_rejected_at_once(cluster: Cluster, node: Node) -> None:
    with pytest.raises(ConnectionRefusedError):
        cluster.pods["a"].tcp_request(EMPTY_IP, 80, timeout=2)
    with pytest.raises(ConnectionRefusedError):
        cluster.node.tcp_request(EMPTY_IP, 80, timeout=2)
    with pytest.raises(ConnectionRefusedError):
        cluster.client.tcp_request(cluster.node_ip, EMPTY_NODEPORT, timeout=2)


def test_hairpin_pod_reaches_itself_through_its_service(cluster: Cluster, node: Node) -> None:
    pod = cluster.pods["a"]
    assert pod.tcp_request(SELF_IP, 80) == "a"
    # The hairpin mark makes the node masquerade, so the reply comes back through it.
    assert cluster.gateway_ip in pod.seen_ips(TCP_PORT)


def test_traffic_follows_endpoint_changes_in_partial_syncs(cluster: Cluster, node: Node) -> None:
    pods = cluster.pods
    node.slice(o.endpoint_slice("default", "web", [pods["c"].ip], [o.port("http", TCP_PORT)]))
    node.sync(partial=True)
    assert set(spread(lambda: cluster.node.tcp_request(WEB_IP, 80), 20)) == {"c"}
    # Another Service's chains were left alone and still work.
    assert set(spread(lambda: pods["a"].udp_request(DNS_IP, 53), 30)) == {"a", "b", "c"}
    node.service(None, "web")
    node.sync(partial=True)
    assert "KUBE-SVC" in node.save() and WEB_IP not in node.save()


def test_partial_sync_refuses_when_our_chains_were_flushed(cluster: Cluster, node: Node) -> None:
    nat = cluster.node.exec(["iptables-legacy-save", "-t", "nat"]).stdout
    for line in nat.splitlines():  # someone flushes every chain of ours
        if line.startswith(":KUBE-") and "KUBELET" not in line:
            cluster.node.exec(["iptables-legacy", "-t", "nat", "-F", line[1:].split()[0]])
    node.slice(
        o.endpoint_slice("default", "web", [cluster.pods["b"].ip], [o.port("http", TCP_PORT)])
    )
    tables = node.render(partial=True)
    with pytest.raises(KeptChainMissing):
        cluster.node.run_inside(lambda: node.applier.apply(tables))
    node.sync()
    assert set(spread(lambda: cluster.pods["c"].udp_request(DNS_IP, 53), 30)) == {"a", "b", "c"}


def test_cleanup_leaves_nothing_of_ours(cluster: Cluster, node: Node) -> None:
    """Everything goes but what kubelet shares: KUBE-FIREWALL, its rule and its jumps."""
    cluster.node.run_inside(node.applier.cleanup)
    save = node.save()
    kubelets = [line for line in save.splitlines() if "KUBE-" in line]
    assert kubelets == [
        ":KUBE-FIREWALL - [0:0]",
        "-A INPUT -j KUBE-FIREWALL",
        "-A OUTPUT -j KUBE-FIREWALL",
        '-A KUBE-FIREWALL ! -s 127.0.0.0/8 -d 127.0.0.0/8 -m comment --comment "block incoming '
        'localnet connections" -m conntrack ! --ctstate RELATED,ESTABLISHED,DNAT -j DROP',
        ":KUBE-KUBELET-CANARY - [0:0]",
    ]
    assert "-A FOREIGN -p tcp -m tcp --dport 22 -j ACCEPT" in save


def test_kubelets_firewall_chain_is_shared_never_rewritten(cluster: Cluster, node: Node) -> None:
    """kubelet's own rules in KUBE-FIREWALL survive syncs; ours is added once, not again."""
    kubelet_rule = ["-A", "KUBE-FIREWALL", "-m", "comment", "--comment", "kubelet-rule"]
    cluster.node.exec(["iptables-legacy", "-t", "filter", *kubelet_rule, "-j", "DROP"])
    node.sync()
    node.sync()
    chain = [line for line in node.save().splitlines() if line.startswith("-A KUBE-FIREWALL")]
    assert len(chain) == 2 and "localnet" in chain[0] and "kubelet-rule" in chain[1], chain
    jumps = [line for line in node.save().splitlines() if line.endswith("-j KUBE-FIREWALL")]
    assert jumps == ["-A INPUT -j KUBE-FIREWALL", "-A OUTPUT -j KUBE-FIREWALL"]


def test_jumps_from_builtin_chains_are_in_upstreams_order(cluster: Cluster, node: Node) -> None:
    """Each jump is prepended in turn, as upstream's EnsureRule(Prepend): the load balancer
    firewall, then health checks, then external portals (kubelet's KUBE-FIREWALL jump is
    shared: where an earlier test left it, it stays)."""
    save = node.save().splitlines()
    targets = [line.split()[-1] for line in save if line.startswith("-A INPUT -")]
    ours = [t for t in targets if t.startswith("KUBE-") and t != "KUBE-FIREWALL"]
    assert ours == ["KUBE-PROXY-FIREWALL", "KUBE-NODEPORTS", "KUBE-EXTERNAL-SERVICES"]
