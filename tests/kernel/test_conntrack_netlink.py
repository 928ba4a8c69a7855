"""The conntrack reconciler against a real conntrack table, with real UDP flows.

A one-node cluster of network namespaces (pykubeproxy.sandbox.netns): hand-written DNAT
rules in the node namespace stand in for the agent's Service rules, the client outside
sends UDP, and the reconciler runs inside the node namespace, whose conntrack table is the
one the flows are in. Flows are checked with ``conntrack -L`` in that namespace, not with
the code under test. Nothing here touches the root namespace.
"""

from __future__ import annotations

import os
import shutil
import socket
from collections.abc import Iterator
from contextlib import closing
from ipaddress import ip_address

import pytest

from pykubeproxy.conntrack import ConntrackReconciler, ReconcileResult
from pykubeproxy.model import (
    Endpoint,
    EndpointsMap,
    NamespacedName,
    Protocol,
    ServicePort,
    ServicePortMap,
    ServicePortName,
)
from pykubeproxy.sandbox.netns import Cluster, Host, NetNS, Pod, TrafficTimeout

pytestmark = [
    pytest.mark.kernel,
    pytest.mark.skipif(
        os.geteuid() != 0
        or not all(shutil.which(tool) for tool in ("ip", "iptables-legacy", "conntrack")),
        reason="needs root, iproute2, iptables-legacy and conntrack",
    ),
]

DNS_IP, OTHER_IP, EMPTY_IP = "10.96.0.53", "10.96.0.54", "10.96.0.99"
SERVICE_PORT, NODE_PORT, POD_PORT = 53, 30053, 5353
# Clients that keep their source port keep their conntrack flow: these sockets do.
CLUSTER_IP_CLIENT_PORT, NODE_PORT_CLIENT_PORT = 40053, 40054


@pytest.fixture
def cluster() -> Iterator[Cluster]:
    with Cluster() as c:
        for name in ("a", "b"):
            c.add_pod(name).serve_udp(POD_PORT)
        yield c


def dnat(node: NetNS, rules: list[tuple[str | None, int, Pod]]) -> None:
    """Make the node's PREROUTING DNAT (destination IP or any, port) to these pods."""
    node.exec(["iptables-legacy", "-t", "nat", "-F", "PREROUTING"])
    for ip, port, pod in rules:
        match = [*(["-d", ip] if ip else []), "-p", "udp", "--dport", str(port)]
        target = ["-j", "DNAT", "--to-destination", f"{pod.ip}:{POD_PORT}"]
        node.exec(["iptables-legacy", "-t", "nat", "-A", "PREROUTING", *match, *target])


def udp_service(name: str, ip: str, node_port: int = 0) -> ServicePort:
    return ServicePort(
        name=ServicePortName(NamespacedName("default", name), "dns", Protocol.UDP),
        cluster_ip=ip_address(ip),
        port=SERVICE_PORT,
        node_port=node_port,
    )


def serving(*pods: Pod) -> tuple[Endpoint, ...]:
    return tuple(Endpoint(ip_address(pod.ip), POD_PORT) for pod in pods)


def reconcile(node: NetNS, services: list[ServicePort], endpoints: EndpointsMap) -> int:
    """Run the reconciler inside the node namespace; the number of flows it deleted."""
    service_map: ServicePortMap = {svc.name: svc for svc in services}
    result: ReconcileResult = node.run_inside(
        lambda: ConntrackReconciler().reconcile(service_map, endpoints)
    )
    assert result.table_read
    return result.deleted


def udp_flows(node: NetNS) -> set[tuple[str, str]]:
    """(original destination, reply source), as ip:port, of each UDP flow of the namespace."""
    flows = set()
    for line in node.exec(["conntrack", "-L", "-p", "udp"]).stdout.splitlines():
        fields: dict[str, list[str]] = {}
        for token in line.split():
            key, eq, value = token.partition("=")
            if eq:
                fields.setdefault(key, []).append(value)
        orig_dst = f"{fields['dst'][0]}:{fields['dport'][0]}"
        flows.add((orig_dst, f"{fields['src'][1]}:{fields['sport'][1]}"))
    return flows


def fixed_port_socket(client: Host, source_port: int, ip: str, port: int) -> socket.socket:
    """A UDP socket of the client, always from source_port, talking to ip:port only."""
    sock = client.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.settimeout(2.0)
    sock.bind(("0.0.0.0", source_port))
    sock.connect((ip, port))
    return sock


def ask(sock: socket.socket) -> str:
    sock.send(b"ping\n")
    try:
        return sock.recv(4096).decode().strip()
    except TimeoutError:
        raise TrafficTimeout(f"no udp reply on {sock.getsockname()}") from None


def test_flows_to_a_removed_endpoint_go_and_the_others_stay(cluster: Cluster) -> None:
    node, client = cluster.node, cluster.client
    a, b = cluster.pods["a"], cluster.pods["b"]
    dnat(node, [(DNS_IP, SERVICE_PORT, a), (None, NODE_PORT, a), (OTHER_IP, SERVICE_PORT, b)])
    with (
        closing(
            fixed_port_socket(client, CLUSTER_IP_CLIENT_PORT, DNS_IP, SERVICE_PORT)
        ) as to_cluster_ip,
        closing(
            fixed_port_socket(client, NODE_PORT_CLIENT_PORT, cluster.node_ip, NODE_PORT)
        ) as to_node_port,
    ):
        assert ask(to_cluster_ip) == "a"
        assert ask(to_node_port) == "a"
        assert client.udp_request(OTHER_IP, SERVICE_PORT) == "b"  # a serving endpoint's flow
        assert client.udp_request(b.ip, POD_PORT) == "b"  # not Service traffic at all
        kept = {
            (f"{OTHER_IP}:{SERVICE_PORT}", f"{b.ip}:{POD_PORT}"),
            (f"{b.ip}:{POD_PORT}", f"{b.ip}:{POD_PORT}"),
        }
        stale = {
            (f"{DNS_IP}:{SERVICE_PORT}", f"{a.ip}:{POD_PORT}"),
            (f"{cluster.node_ip}:{NODE_PORT}", f"{a.ip}:{POD_PORT}"),
        }
        assert udp_flows(node) == kept | stale

        # Endpoint a leaves the Service and the rules follow, but the flows do not.
        dnat(node, [(DNS_IP, SERVICE_PORT, b), (None, NODE_PORT, b), (OTHER_IP, SERVICE_PORT, b)])
        assert ask(to_cluster_ip) == "a"
        assert ask(to_node_port) == "a"

        dns, other = udp_service("dns", DNS_IP, NODE_PORT), udp_service("other", OTHER_IP)
        endpoints = {dns.name: serving(b), other.name: serving(b)}
        assert reconcile(node, [dns, other], endpoints) == 2
        assert udp_flows(node) == kept
        assert ask(to_cluster_ip) == "b"
        assert ask(to_node_port) == "b"
        assert reconcile(node, [dns, other], endpoints) == 0  # nothing stale any more


def test_a_flow_cached_without_endpoints_goes_once_the_service_has_one(cluster: Cluster) -> None:
    node, client = cluster.node, cluster.client
    a, b = cluster.pods["a"], cluster.pods["b"]
    # Another Service's rule: a namespace tracks flows only once some rule needs conntrack.
    dnat(node, [(OTHER_IP, SERVICE_PORT, b)])
    empty = udp_service("empty", EMPTY_IP)
    with closing(fixed_port_socket(client, CLUSTER_IP_CLIENT_PORT, EMPTY_IP, SERVICE_PORT)) as sock:
        # No rule yet: the node forwards the datagram by its default route, and caches it.
        with pytest.raises(TrafficTimeout):
            ask(sock)
        never_nated = (f"{EMPTY_IP}:{SERVICE_PORT}", f"{EMPTY_IP}:{SERVICE_PORT}")
        assert udp_flows(node) == {never_nated}

        # A Service without (serving) endpoints, as after a restart: its flows are left alone.
        not_serving = (Endpoint(ip_address(a.ip), POD_PORT, ready=False, serving=False),)
        assert reconcile(node, [empty], {}) == 0
        assert reconcile(node, [empty], {empty.name: not_serving}) == 0
        assert udp_flows(node) == {never_nated}

        dnat(node, [(OTHER_IP, SERVICE_PORT, b), (EMPTY_IP, SERVICE_PORT, a)])
        with pytest.raises(TrafficTimeout):
            ask(sock)  # the cached flow still bypasses the new rule
        assert reconcile(node, [empty], {empty.name: serving(a)}) == 1
        assert udp_flows(node) == set()
        assert ask(sock) == "a"


def test_flows_of_a_deleted_service_go(cluster: Cluster) -> None:
    """Beyond upstream: once a UDP Service is gone, no flow keeps reaching its old endpoint."""
    node, client = cluster.node, cluster.client
    a, b = cluster.pods["a"], cluster.pods["b"]
    dnat(node, [(DNS_IP, SERVICE_PORT, a), (OTHER_IP, SERVICE_PORT, b)])
    dns, other = udp_service("dns", DNS_IP), udp_service("other", OTHER_IP)
    reconciler = ConntrackReconciler()
    with closing(fixed_port_socket(client, CLUSTER_IP_CLIENT_PORT, DNS_IP, SERVICE_PORT)) as sock:
        assert ask(sock) == "a"
        assert client.udp_request(OTHER_IP, SERVICE_PORT) == "b"
        both = {dns.name: dns, other.name: other}
        endpoints = {dns.name: serving(a), other.name: serving(b)}
        assert node.run_inside(lambda: reconciler.reconcile(both, endpoints)).deleted == 0

        del both[dns.name], endpoints[dns.name]  # the Service is deleted, and its rules
        dnat(node, [(OTHER_IP, SERVICE_PORT, b)])
        assert node.run_inside(lambda: reconciler.reconcile(both, endpoints)).deleted == 1
        assert udp_flows(node) == {(f"{OTHER_IP}:{SERVICE_PORT}", f"{b.ip}:{POD_PORT}")}
