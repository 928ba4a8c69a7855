"""The IPVS applier against a real kernel, proven with real packets (inside the VM).

The applier runs inside the node namespace of a `Cluster` (pods a, b, c answering TCP 8080
and UDP 5353), through ``run_inside``: its netlink sockets (conntrack's included) then
belong to that namespace. Most tests install no iptables rule: those paths work on IPVS
alone (an outside client to a ClusterIP or NodePort is DNATed by IPVS and its replies are
un-NATed on their way back through the node; the node's own connections to a ClusterIP
leave from the ClusterIP itself). The source-range test adds IPVS mode's iptables half,
rendered from a Service. Pod-to-Service traffic (hairpin, and replies bridged straight
back to the calling pod) needs kube-proxy's masquerade rules and is left to the agent tests.
"""

from __future__ import annotations

import functools
import itertools
import logging
import socket
import struct
import time
from collections import Counter
from collections.abc import Callable, Iterator
from ipaddress import ip_address, ip_network
from typing import Any, TypeVar

import pytest

from pykubeproxy.iptables.applier import IptcApplier
from pykubeproxy.ipvs.applier import IpvsApplier, KernelRefused
from pykubeproxy.ipvs.render import IpvsConfig, Rendered, render
from pykubeproxy.ipvs.state import (
    CLUSTER_IP,
    DUMMY_DEVICE,
    IPVS_IPS,
    LOAD_BALANCER_SOURCE_CIDR,
    LOOP_BACK,
    NODE_PORT_SCTP,
    NODE_PORT_TCP,
    NODE_PORT_UDP,
    IpvsState,
    RealServer,
    ServiceOptions,
    VirtualServer,
)
from pykubeproxy.ipvs.sysctls import set_sysctls
from pykubeproxy.model import (
    Endpoint,
    EndpointsMap,
    NamespacedName,
    NodeFacts,
    Protocol,
    ServicePort,
    ServicePortMap,
    ServicePortName,
)
from pykubeproxy.sandbox.netns import Cluster, Host, Pod, spread

pytestmark = pytest.mark.ipvs

_T = TypeVar("_T")

SERVICE_IP = ip_address("10.96.0.10")
NODE_IP = ip_address(Cluster.node_ip)
TCP_PORT, UDP_PORT = 80, 53
TCP_TARGET, UDP_TARGET = 8080, 5353
TCP_NODE_PORT, UDP_NODE_PORT = 30080, 30053
CLUSTER_TCP = VirtualServer(SERVICE_IP, TCP_PORT, Protocol.TCP)
CLUSTER_UDP = VirtualServer(SERVICE_IP, UDP_PORT, Protocol.UDP)
NODE_TCP = VirtualServer(NODE_IP, TCP_NODE_PORT, Protocol.TCP)
NODE_UDP = VirtualServer(NODE_IP, UDP_NODE_PORT, Protocol.UDP)
# below the ephemeral range (32768-60999): no other socket in the VM holds one, and each
# test takes fresh ones, since the kernel remembers a UDP flow across tests too
UNUSED_SOURCE_PORTS = itertools.count(20000)
SLOW = 120.0  # seconds for work inside the node: QEMU without KVM is ~30x slower


@pytest.fixture(scope="module")
def cluster() -> Iterator[Cluster]:
    with Cluster() as c:
        for name in ("a", "b", "c"):
            pod = c.add_pod(name)
            pod.serve_tcp(TCP_TARGET)
            pod.serve_udp(UDP_TARGET)
        c.node.run_inside(lambda: set_sysctls(strict_arp=False))
        yield c


def inside(cluster: Cluster, fn: Callable[[], _T]) -> _T:
    return cluster.node.run_inside(fn, timeout=SLOW)


def sh(cluster: Cluster, *argv: str) -> str:
    return str(cluster.node.exec(list(argv), timeout=SLOW).stdout)


@pytest.fixture
def applier(cluster: Cluster) -> Iterator[IpvsApplier]:
    """An applier; afterwards the node has no IPVS service, kube-ipvs0, ipset or rule left."""
    yield IpvsApplier()
    node = cluster.node
    for table in ("nat", "filter"):
        node.exec(["iptables-legacy", "-t", table, "-F"], check=False)
        node.exec(["iptables-legacy", "-t", table, "-X"], check=False)
    node.exec(["ipvsadm", "-C"])
    node.exec(["ip", "link", "del", DUMMY_DEVICE], check=False)
    node.exec(["ipset", "destroy"])
    node.exec(["conntrack", "-F"], check=False)


def pods(cluster: Cluster, *names: str) -> list[Pod]:
    return [cluster.pods[n] for n in names or ("a", "b", "c")]


def web_state(
    backends: list[Pod],
    scheduler: str = "rr",
    persistence: int | None = None,
) -> IpvsState:
    """One Service "web": ClusterIP 10.96.0.10 with 80/TCP and 53/UDP, NodePorts on the node IP.

    Its ipsets are what kube-proxy writes for it, plus a load-balancer source range whose
    host-sized net (/32) the kernel lists without its prefix.
    """
    opts = ServiceOptions(scheduler, persistence)
    state = IpvsState(addresses={SERVICE_IP})
    for vs, target in ((CLUSTER_TCP, TCP_TARGET), (NODE_TCP, TCP_TARGET),
                       (CLUSTER_UDP, UDP_TARGET), (NODE_UDP, UDP_TARGET)):  # fmt: skip
        state.services[vs] = opts
        state.real_servers[vs] = {RealServer(ip_address(p.ip), target) for p in backends}
    state.ipsets[CLUSTER_IP.name] = {f"{SERVICE_IP},tcp:{TCP_PORT}", f"{SERVICE_IP},udp:{UDP_PORT}"}
    state.ipsets[NODE_PORT_TCP.name] = {str(TCP_NODE_PORT)}
    state.ipsets[NODE_PORT_UDP.name] = {str(UDP_NODE_PORT)}
    state.ipsets[IPVS_IPS.name] = {str(SERVICE_IP)}
    state.ipsets[LOOP_BACK.name] = {f"{p.ip},tcp:{TCP_TARGET},{p.ip}" for p in backends}
    state.ipsets[LOAD_BALANCER_SOURCE_CIDR.name] = {
        "1.2.3.4,tcp:80,10.0.0.0/8",
        "1.2.3.4,tcp:80,198.18.0.2/32",
    }
    return state


def ipvsadm(cluster: Cluster) -> dict[str, list[str]]:
    """``ipvsadm -Ln`` as {"TCP 10.96.0.10:80 rr": ["10.244.0.2:8080 Masq 1 0 0", ...]}."""
    table: dict[str, list[str]] = {}
    current: list[str] = []
    for line in sh(cluster, "ipvsadm", "-Ln").splitlines()[3:]:
        words = " ".join(line.split())
        if words.startswith("-> "):
            current.append(words[3:])
        else:
            current = table[words] = []
    return table


def dests(cluster: Cluster, vs: VirtualServer) -> dict[str, tuple[int, int, int]]:
    """Real servers of one service: {ip: (weight, active, inactive)}."""
    for head, lines in ipvsadm(cluster).items():
        if head.split()[:2] == [vs.protocol.value.upper(), f"{vs.address}:{vs.port}"]:
            found = {}
            for line in lines:
                addr, _, weight, active, inactive = line.split()
                found[addr.split(":")[0]] = (int(weight), int(active), int(inactive))
            return found
    raise AssertionError(f"no {vs} in ipvsadm -Ln")


def members(cluster: Cluster, name: str) -> set[str]:
    out = sh(cluster, "ipset", "list", name)
    return set(out.split("Members:\n", 1)[1].split())


def labels(backends: list[Pod]) -> set[str]:
    return {p.label for p in backends}


# --- apply ------------------------------------------------------------------------------------


def test_apply_creates_everything_and_is_idempotent(cluster: Cluster, applier: IpvsApplier) -> None:
    state = web_state(pods(cluster))
    inside(cluster, lambda: applier.apply(state))
    first = list(applier.changes)

    table = ipvsadm(cluster)
    ips = sorted(p.ip for p in pods(cluster))
    assert table == {
        f"TCP {SERVICE_IP}:{TCP_PORT} rr": [f"{ip}:{TCP_TARGET} Masq 1 0 0" for ip in ips],
        f"TCP {NODE_IP}:{TCP_NODE_PORT} rr": [f"{ip}:{TCP_TARGET} Masq 1 0 0" for ip in ips],
        f"UDP {SERVICE_IP}:{UDP_PORT} rr": [f"{ip}:{UDP_TARGET} Masq 1 0 0" for ip in ips],
        f"UDP {NODE_IP}:{UDP_NODE_PORT} rr": [f"{ip}:{UDP_TARGET} Masq 1 0 0" for ip in ips],
    }
    link = sh(cluster, "ip", "-br", "addr", "show", "dev", DUMMY_DEVICE).split()
    assert link[:3] == [DUMMY_DEVICE, "DOWN", f"{SERVICE_IP}/32"], link  # left down
    assert "dummy" in sh(cluster, "ip", "-d", "link", "show", DUMMY_DEVICE)
    assert (
        len([n for n in sh(cluster, "ipset", "list", "-n").split() if n.startswith("KUBE-")]) == 17
    )
    assert members(cluster, NODE_PORT_TCP.name) == {str(TCP_NODE_PORT)}
    assert members(cluster, LOAD_BALANCER_SOURCE_CIDR.name) == {
        "1.2.3.4,tcp:80,10.0.0.0/8",
        "1.2.3.4,tcp:80,198.18.0.2",  # the kernel's form of .../32
    }
    assert f"create ipset {CLUSTER_IP.name}" in first
    assert inside(cluster, applier.counts) == (4, 12)

    inside(cluster, lambda: applier.apply(state))
    assert applier.changes == []  # nothing churns, not even the /32 member


def test_traffic_reaches_every_real_server_evenly(cluster: Cluster, applier: IpvsApplier) -> None:
    inside(cluster, lambda: applier.apply(web_state(pods(cluster))))
    client, node = cluster.client, cluster.node
    vip, nip = str(SERVICE_IP), str(NODE_IP)

    def tcp(host: Host, ip: str, port: int) -> Callable[[], str]:
        return lambda: host.tcp_request(ip, port)

    def udp(host: Host, ip: str, port: int) -> Callable[[], str]:
        # IPVS keeps a UDP flow per source port for minutes: a reused ephemeral port (about a
        # 1-in-60 chance over 30 requests) would reach the same real server twice.
        return lambda: host.udp_request(ip, port, source_port=next(UNUSED_SOURCE_PORTS))

    # forwarded: outside client -> ClusterIP / NodePort
    assert spread(tcp(client, vip, TCP_PORT), 30) == {"a": 10, "b": 10, "c": 10}
    assert spread(udp(client, vip, UDP_PORT), 30) == {"a": 10, "b": 10, "c": 10}
    assert spread(tcp(client, nip, TCP_NODE_PORT), 6) == {"a": 2, "b": 2, "c": 2}
    assert spread(udp(client, nip, UDP_NODE_PORT), 6) == {"a": 2, "b": 2, "c": 2}
    # local: the node's own processes -> ClusterIP (kube-ipvs0 is down)
    assert spread(tcp(node, vip, TCP_PORT), 6) == {"a": 2, "b": 2, "c": 2}
    assert spread(udp(node, vip, UDP_PORT), 6) == {"a": 2, "b": 2, "c": 2}


def test_persistent_service_sticks(cluster: Cluster, applier: IpvsApplier) -> None:
    inside(cluster, lambda: applier.apply(web_state(pods(cluster), persistence=60)))
    assert f"TCP {SERVICE_IP}:{TCP_PORT} rr persistent 60" in ipvsadm(cluster)
    seen = spread(lambda: cluster.client.tcp_request(str(SERVICE_IP), TCP_PORT), 9)
    assert len(seen) == 1 and sum(seen.values()) == 9, seen


def conns_stat(cluster: Cluster) -> int:
    """The service's cumulative connection counter (reset if it were recreated)."""
    out = sh(cluster, "ipvsadm", "-Ln", "--stats", "-t", f"{SERVICE_IP}:{TCP_PORT}")
    line = next(line for line in out.splitlines() if line.startswith("TCP"))
    return int(line.split()[2])  # TCP 10.96.0.10:80 <Conns> <InPkts> ...


def test_modify_keeps_service_connections_and_stats(cluster: Cluster, applier: IpvsApplier) -> None:
    inside(cluster, lambda: applier.apply(web_state(pods(cluster))))
    with cluster.client.open_tcp(str(SERVICE_IP), TCP_PORT, timeout=5) as conn:
        served = conn.ask()
        deadline = time.monotonic() + 20
        while conns_stat(cluster) == 0 and time.monotonic() < deadline:
            time.sleep(0.5)  # the kernel folds per-cpu stats in every 2 s
        before = conns_stat(cluster)
        assert before >= 1

        inside(cluster, lambda: applier.apply(web_state(pods(cluster), "wrr", 30)))
        assert f"set service {CLUSTER_TCP} scheduler wrr flags 0x1 timeout 30" in applier.changes
        assert not [c for c in applier.changes if "add service" in c or "delete service" in c]
        assert f"TCP {SERVICE_IP}:{TCP_PORT} wrr persistent 30" in ipvsadm(cluster)
        assert conns_stat(cluster) >= before
        assert conn.ask() == served

        inside(cluster, lambda: applier.apply(web_state(pods(cluster), "rr")))
        assert f"TCP {SERVICE_IP}:{TCP_PORT} rr" in ipvsadm(cluster)
        assert conns_stat(cluster) >= before
        assert conn.ask() == served
        assert dests(cluster, CLUSTER_TCP)[cluster.pods[served].ip][1] == 1  # ActiveConn


def test_partial_syncs_trust_the_last_and_full_syncs_repair(
    cluster: Cluster, applier: IpvsApplier
) -> None:
    """A partial sync writes only what changed since the last sync, from memory; a full sync
    reads the kernel and repairs what was done behind the agent's back."""
    state = web_state(pods(cluster))
    inside(cluster, lambda: applier.apply(state))
    a, c = cluster.pods["a"].ip, cluster.pods["c"].ip
    sh(cluster, "ipvsadm", "-D", "-t", f"{SERVICE_IP}:{TCP_PORT}")
    sh(cluster, "ipvsadm", "-d", "-u", f"{SERVICE_IP}:{UDP_PORT}", "-r", f"{a}:{UDP_TARGET}")
    sh(cluster, "ipset", "del", CLUSTER_IP.name, f"{SERVICE_IP},udp:{UDP_PORT}")
    sh(cluster, "ip", "addr", "del", f"{SERVICE_IP}/32", "dev", DUMMY_DEVICE)

    inside(cluster, lambda: applier.apply(state, full=False))
    assert applier.changes == []  # nothing changed: nothing read, nothing written
    state.real_servers[NODE_TCP] = {rs for rs in state.real_servers[NODE_TCP]
                                    if str(rs.address) != c}  # fmt: skip
    inside(cluster, lambda: applier.apply(state, full=False))
    assert applier.changes == [f"delete {NODE_TCP} -> {c}:{TCP_TARGET}"]

    inside(cluster, lambda: applier.apply(state))
    assert sorted(applier.changes) == sorted([
        f"add KUBE-CLUSTER-IP {SERVICE_IP},udp:{UDP_PORT}",
        f"add service {CLUSTER_TCP}",
        *(f"add {CLUSTER_TCP} -> {p.ip}:{TCP_TARGET}" for p in pods(cluster)),
        f"add {CLUSTER_UDP} -> {a}:{UDP_TARGET}",
        f"bind {SERVICE_IP} to {DUMMY_DEVICE}",
    ])  # fmt: skip
    assert len(ipvsadm(cluster)) == 4
    assert dests(cluster, CLUSTER_UDP).keys() == {p.ip for p in pods(cluster)}
    assert f"{SERVICE_IP},udp:{UDP_PORT}" in members(cluster, CLUSTER_IP.name)
    assert f"{SERVICE_IP}/32" in sh(cluster, "ip", "-br", "addr", "show", "dev", DUMMY_DEVICE)
    inside(cluster, lambda: applier.apply(state))
    assert applier.changes == []


class RawConn:
    """A client TCP connection that can end with a RST (SO_LINGER 0).

    After a FIN, IPVS keeps the connection in TIME_WAIT (InActConn) for two minutes; after a
    RST only for its CLOSE timeout (10 s), so a drained real server empties quickly.
    """

    def __init__(self, host: Host, ip: str, port: int) -> None:
        self.sock = host.socket()
        self.sock.settimeout(5)
        self.sock.connect((ip, port))

    def ask(self) -> str:
        self.sock.sendall(b"ping\n")
        return self.sock.recv(100).decode().strip()

    def reset(self) -> None:
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        self.sock.close()


def test_scale_down_drains_tcp_and_a_new_process_keeps_draining(
    cluster: Cluster, applier: IpvsApplier
) -> None:
    everyone = pods(cluster)
    inside(cluster, lambda: applier.apply(web_state(everyone)))
    conn = RawConn(cluster.client, str(SERVICE_IP), TCP_PORT)
    try:
        served = cluster.pods[conn.ask()]
        rest = [p for p in everyone if p is not served]
        inside(cluster, lambda: applier.apply(web_state(rest)))

        assert dests(cluster, CLUSTER_TCP)[served.ip] == (0, 1, 0)  # weight 0, 1 active
        assert served.ip not in dests(cluster, NODE_TCP)  # no connection: deleted at once
        assert served.ip not in dests(cluster, CLUSTER_UDP)  # UDP: deleted at once
        assert conn.ask() == served.label  # the established connection still works
        new = spread(lambda: cluster.client.tcp_request(str(SERVICE_IP), TCP_PORT), 4)
        assert set(new) == labels(rest)
        inside(cluster, applier.drain)
        assert served.ip in dests(cluster, CLUSTER_TCP)  # still connected: kept

        key = (CLUSTER_TCP, RealServer(ip_address(served.ip), TCP_TARGET))
        assert key in applier.draining()
        inside(cluster, lambda: applier.apply(web_state(everyone)))  # scaled up again
        assert dests(cluster, CLUSTER_TCP)[served.ip] == (1, 1, 0)  # weight 1 restored
        assert applier.draining() == {}
        inside(cluster, lambda: applier.apply(web_state(rest)))
        assert dests(cluster, CLUSTER_TCP)[served.ip] == (0, 1, 0)

        restarted = IpvsApplier()  # a new process finds it at weight 0 and not wanted
        inside(cluster, lambda: restarted.apply(web_state(rest)))
        assert restarted.changes == []
        assert key in restarted.draining()
        assert conn.ask() == served.label
    finally:
        conn.reset()
    deadline = time.monotonic() + 60
    while served.ip in dests(cluster, CLUSTER_TCP):
        assert time.monotonic() < deadline, "the drained real server was never deleted"
        time.sleep(1)
        inside(cluster, restarted.drain)
    assert restarted.draining() == {}
    assert dests(cluster, CLUSTER_TCP).keys() == {p.ip for p in rest}


@pytest.mark.usefixtures("applier")
def test_drain_timeout_bounds_draining(cluster: Cluster) -> None:
    now = [0.0]
    applier = IpvsApplier(drain_timeout=900, clock=lambda: now[0])
    try:
        inside(cluster, lambda: applier.apply(web_state(pods(cluster))))
        conn = RawConn(cluster.client, str(SERVICE_IP), TCP_PORT)
        served = cluster.pods[conn.ask()]
        rest = [p for p in pods(cluster) if p is not served]
        inside(cluster, lambda: applier.apply(web_state(rest)))
        now[0] = 899.0
        inside(cluster, applier.drain)
        assert dests(cluster, CLUSTER_TCP)[served.ip][:2] == (0, 1)
        now[0] = 900.0
        inside(cluster, applier.drain)  # active connection, but its time is up
        assert served.ip not in dests(cluster, CLUSTER_TCP)
        assert applier.draining() == {}
        conn.reset()
    finally:
        inside(cluster, applier.cleanup)


def test_udp_real_server_goes_at_once_with_its_flows(
    cluster: Cluster, applier: IpvsApplier
) -> None:
    # Netfilter tracks a namespace's flows only once a rule there needs conntrack (on a node,
    # kube-proxy's KUBE-FORWARD rule does); IPVS then keeps the flows' NAT up to date.
    sh(cluster, "iptables-legacy", "-A", "FORWARD", "-m", "conntrack", "--ctstate",
       "RELATED,ESTABLISHED", "-j", "ACCEPT")  # fmt: skip
    everyone = pods(cluster)
    inside(cluster, lambda: applier.apply(web_state(everyone)))
    sock = cluster.client.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.settimeout(2)
    sock.connect((str(SERVICE_IP), UDP_PORT))

    def ask() -> str:
        sock.send(b"ping\n")
        return sock.recv(100).decode().strip()

    served = cluster.pods[ask()]
    assert ask() == served.label  # same source port: the same IPVS connection
    flows = ["conntrack", "-L", "-p", "udp", "--orig-dst", str(SERVICE_IP)]
    assert served.ip in sh(cluster, *flows)

    rest = [p for p in everyone if p is not served]
    inside(cluster, lambda: applier.apply(web_state(rest)))
    assert served.ip not in dests(cluster, CLUSTER_UDP)
    # Gone at once: the applier deletes the flows over conntrack netlink, and since Linux 5.10
    # IPVS itself flushes the connections (and their conntrack flows) of a deleted real server
    # when expire_nodest_conn=1.
    assert served.ip not in sh(cluster, *flows, "--dst-nat", served.ip)

    replies = []
    for _ in range(3):  # older kernels drop the first datagram of the old flow
        try:
            replies.append(ask())
            break
        except TimeoutError:
            continue
    assert replies and replies[0] in labels(rest), replies
    sock.close()


# --- Service semantics, from the model ---------------------------------------------------------

LB_IP = "203.0.113.50"
HEALTH_CHECK_PORT = 32080
NODE = NodeFacts("node", ip=NODE_IP)


def service_of(
    cluster: Cluster, local: set[str], **fields: Any
) -> tuple[ServicePortMap, EndpointsMap]:
    """Service "web" (ClusterIP 10.96.0.10:80/TCP -> 8080) with pods a, b, c as endpoints,
    the `local` ones on this node, the others on another."""
    name = ServicePortName(NamespacedName("default", "web"), "http", Protocol.TCP)
    svc = ServicePort(name, SERVICE_IP, TCP_PORT, **fields)
    eps = tuple(
        Endpoint(ip_address(pod.ip), TCP_TARGET, node_name="node" if label in local else "other")
        for label, pod in sorted(cluster.pods.items())
    )
    return {name: svc}, {name: eps}


def rendered(cluster: Cluster, local: set[str], **fields: Any) -> Rendered:
    services, endpoints = service_of(cluster, local, **fields)
    return render(services, endpoints, IpvsConfig(), NODE, (NODE_IP,), frozenset({NODE_IP}))


def test_local_policy_uses_this_nodes_endpoints(cluster: Cluster, applier: IpvsApplier) -> None:
    """externalTrafficPolicy Local: NodePort and LB virtual servers get the local pod only,
    the ClusterIP all three; the ETP-Local sets and the health-check set are filled."""
    result = rendered(
        cluster, {"a"}, node_port=TCP_NODE_PORT, load_balancer_ips=(ip_address(LB_IP),),
        external_policy_local=True, health_check_node_port=HEALTH_CHECK_PORT,
    )  # fmt: skip
    inside(cluster, lambda: applier.apply(result.state))
    a = cluster.pods["a"].ip
    assert dests(cluster, NODE_TCP).keys() == {a}
    assert dests(cluster, VirtualServer(ip_address(LB_IP), TCP_PORT, Protocol.TCP)).keys() == {a}
    assert dests(cluster, CLUSTER_TCP).keys() == {p.ip for p in pods(cluster)}
    assert members(cluster, "KUBE-NODE-PORT-LOCAL-TCP") == {str(TCP_NODE_PORT)}
    assert members(cluster, "KUBE-LOAD-BALANCER-LOCAL") == {f"{LB_IP},tcp:{TCP_PORT}"}
    assert members(cluster, "KUBE-HEALTH-CHECK-NODE-PORT") == {str(HEALTH_CHECK_PORT)}
    served = spread(lambda: cluster.client.tcp_request(str(NODE_IP), TCP_NODE_PORT), 4)
    assert served == {"a": 4}

    no_local = rendered(
        cluster, set(), node_port=TCP_NODE_PORT, external_policy_local=True
    )  # upstream's fallback: the cluster-wide endpoints, and the metric counts it
    inside(cluster, lambda: applier.apply(no_local.state))
    assert dests(cluster, NODE_TCP).keys() == {p.ip for p in pods(cluster)}
    assert no_local.no_local_endpoints == {"internal": 0, "external": 1}


def test_source_ranges_admit_only_their_clients(cluster: Cluster, applier: IpvsApplier) -> None:
    """loadBalancerSourceRanges with IPVS mode's iptables half in place: the client in the
    range reaches the LB IP, another client is dropped; the node's IP is not in the range,
    so KUBE-IPVS-OUT-FILTER drops the node's own traffic to it (an ``-m ipvs`` rule)."""
    outsider = cluster.clients.get("outsider") or cluster.add_client("outsider")
    result = rendered(
        cluster, set(), load_balancer_ips=(ip_address(LB_IP),),
        load_balancer_source_ranges=(ip_network(f"{cluster.client.ip}/32"),),
    )  # fmt: skip
    inside(cluster, lambda: applier.apply(result.state))
    assert members(cluster, "KUBE-LOAD-BALANCER-FW") == {f"{LB_IP},tcp:{TCP_PORT}"}
    assert members(cluster, "KUBE-LOAD-BALANCER-SOURCE-CIDR") == {
        f"{LB_IP},tcp:{TCP_PORT},{cluster.client.ip}"  # the kernel's form of a /32
    }
    assert members(cluster, "KUBE-LOAD-BALANCER-SOURCE-IP") == set()
    iptables = IptcApplier()
    inside(cluster, lambda: iptables.apply(result.tables))
    save = sh(cluster, "iptables-legacy-save", "-t", "filter").splitlines()
    out_filter = [line.split() for line in save if line.startswith("-A KUBE-IPVS-OUT-FILTER")]
    assert len(out_filter) == 1, save
    assert {"-m", "ipvs", "--vaddr", "DROP", f"{LB_IP}/32"} <= set(out_filter[0]), save

    served = spread(lambda: cluster.client.tcp_request(LB_IP, TCP_PORT), 3)
    assert set(served) <= labels(pods(cluster)) and sum(served.values()) == 3
    with pytest.raises(OSError):
        outsider.tcp_request(LB_IP, TCP_PORT, timeout=5)


def test_a_refused_virtual_server_blocks_no_other(
    cluster: Cluster, applier: IpvsApplier, caplog: pytest.LogCaptureFixture
) -> None:
    """One Service the kernel refuses (a scheduler it lacks) is logged with its name and
    address; every other virtual server is made, and the sync still fails."""
    state = web_state(pods(cluster))
    bad = VirtualServer(ip_address("10.96.0.99"), TCP_PORT, Protocol.TCP)
    state.services[bad] = ServiceOptions("nope")
    state.real_servers[bad] = {RealServer(ip_address(cluster.pods["a"].ip), TCP_TARGET)}
    state.names[bad] = "default/broken:http"
    with caplog.at_level(logging.ERROR), pytest.raises(KernelRefused, match="default/broken"):
        inside(cluster, lambda: applier.apply(state))
    assert any(
        "Service default/broken:http: virtual server 10.96.0.99:80/TCP" in r.getMessage()
        for r in caplog.records
    )
    table = ipvsadm(cluster)
    assert len(table) == 4 and all(len(real) == 3 for real in table.values())
    assert spread(lambda: cluster.client.tcp_request(str(SERVICE_IP), TCP_PORT), 3)

    del state.services[bad], state.real_servers[bad]
    inside(cluster, lambda: applier.apply(state))  # the next sync, without it, succeeds


# --- ownership --------------------------------------------------------------------------------

FOREIGN_REMOTE = "192.0.2.50:80"  # not a node address
FOREIGN_LOCAL = f"{NODE_IP}:9999"  # a node address, but not a NodePort
EXCLUDED = "10.96.100.1"  # bound on kube-ipvs0 (rule a), but in exclude_cidrs


def add_foreign(cluster: Cluster) -> None:
    for vs in (FOREIGN_REMOTE, FOREIGN_LOCAL, f"{EXCLUDED}:80"):
        sh(cluster, "ipvsadm", "-A", "-t", vs, "-s", "wlc")
        sh(cluster, "ipvsadm", "-a", "-t", vs, "-r", "10.244.0.2:8080", "-m", "-w", "5")


def foreign(cluster: Cluster) -> dict[str, list[str]]:
    marks = (FOREIGN_REMOTE, FOREIGN_LOCAL, EXCLUDED)
    return {h: d for h, d in ipvsadm(cluster).items() if any(m in h for m in marks)}


def test_foreign_and_excluded_services_survive_apply_and_cleanup(
    cluster: Cluster, applier: IpvsApplier
) -> None:
    add_foreign(cluster)
    before = foreign(cluster)
    assert len(before) == 3
    state = web_state(pods(cluster))
    state.addresses.add(ip_address(EXCLUDED))
    excluding = IpvsApplier(exclude_cidrs=["10.96.100.0/24"])

    inside(cluster, lambda: excluding.apply(state))
    table = ipvsadm(cluster)
    assert {k: v for k, v in table.items() if k in before} == before
    assert len(table) == 4 + 3
    assert inside(cluster, excluding.counts) == (4, 12)

    inside(cluster, excluding.cleanup)
    assert ipvsadm(cluster) == before
    assert DUMMY_DEVICE not in sh(cluster, "ip", "-br", "link")
    assert sh(cluster, "ipset", "list", "-n").split() == []

    # without the exclusion, a service on an address kube-ipvs0 holds is the agent's (rule a)
    inside(cluster, lambda: applier.apply(state))
    assert set(foreign(cluster)) == {f"TCP {FOREIGN_REMOTE} wlc", f"TCP {FOREIGN_LOCAL} wlc"}


def test_a_new_process_removes_the_services_of_the_old_one(
    cluster: Cluster, applier: IpvsApplier
) -> None:
    add_foreign(cluster)
    state = web_state(pods(cluster))
    node_sctp = VirtualServer(NODE_IP, 30132, Protocol.SCTP)  # a NodePort by rule (b) too
    state.services[node_sctp] = ServiceOptions()
    state.real_servers[node_sctp] = {RealServer(ip_address(cluster.pods["a"].ip), 9999)}
    state.ipsets[NODE_PORT_SCTP.name] = {f"{NODE_IP},sctp:30132"}
    inside(cluster, lambda: applier.apply(state))
    assert f"SCTP {NODE_IP}:30132 rr" in ipvsadm(cluster)
    before = foreign(cluster)
    assert len(before) == 3

    restarted = IpvsApplier()
    assert inside(cluster, restarted.counts) == (5, 13)
    inside(cluster, lambda: restarted.apply(IpvsState()))
    assert ipvsadm(cluster) == before  # NodePorts by rule (b), ClusterIPs by (a) and (d)
    assert sh(cluster, "ip", "-br", "addr", "show", "dev", DUMMY_DEVICE).split()[2:] == []
    assert members(cluster, CLUSTER_IP.name) == set()
    assert inside(cluster, restarted.counts) == (0, 0)


def test_cleanup_reports_a_set_still_referenced(
    cluster: Cluster, applier: IpvsApplier, caplog: pytest.LogCaptureFixture
) -> None:
    inside(cluster, lambda: applier.apply(web_state(pods(cluster))))
    rule = ["-m", "set", "--match-set", CLUSTER_IP.name, "dst,dst", "-j", "ACCEPT"]
    sh(cluster, "iptables-legacy", "-A", "INPUT", *rule)
    with caplog.at_level(logging.WARNING):
        inside(cluster, applier.cleanup)
    assert CLUSTER_IP.name in caplog.text
    assert sh(cluster, "ipset", "list", "-n").split() == [CLUSTER_IP.name]
    assert ipvsadm(cluster) == {}

    sh(cluster, "iptables-legacy", "-D", "INPUT", *rule)
    inside(cluster, applier.cleanup)
    assert sh(cluster, "ipset", "list", "-n").split() == []


# --- scheduler check and sysctls ----------------------------------------------------------------


def test_check_scheduler(cluster: Cluster, applier: IpvsApplier) -> None:
    for name in ("rr", "wrr", "sh", "mh"):
        inside(cluster, functools.partial(applier.check_scheduler, name))
    with pytest.raises(ValueError, match="'nope' is not available"):
        inside(cluster, lambda: applier.check_scheduler("nope"))
    assert ipvsadm(cluster) == {}  # no probe left behind


def test_set_sysctls_writes_only_what_differs(
    cluster: Cluster, caplog: pytest.LogCaptureFixture
) -> None:
    node = cluster.node
    node.sysctl("net.ipv4.vs.expire_nodest_conn", 0)
    with caplog.at_level(logging.INFO, logger="pykubeproxy.ipvs.sysctls"):
        inside(cluster, lambda: set_sysctls(strict_arp=True))
    changed = Counter(r.getMessage().split()[2].rstrip(":") for r in caplog.records)
    assert changed == {
        "net/ipv4/vs/expire_nodest_conn": 1,
        "net/ipv4/conf/all/arp_ignore": 1,
        "net/ipv4/conf/all/arp_announce": 1,
    }
    for key, value in (("net.ipv4.vs.conntrack", "1"), ("net.ipv4.vs.expire_nodest_conn", "1"),
                       ("net.ipv4.vs.expire_quiescent_template", "1"),
                       ("net.ipv4.ip_forward", "1"), ("net.ipv4.conf.all.arp_ignore", "1"),
                       ("net.ipv4.conf.all.arp_announce", "2")):  # fmt: skip
        assert node.sysctl(key) == value
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="pykubeproxy.ipvs.sysctls"):
        inside(cluster, lambda: set_sysctls(strict_arp=True))
    assert caplog.records == []
    node.sysctl("net.ipv4.conf.all.arp_ignore", 0)
    node.sysctl("net.ipv4.conf.all.arp_announce", 0)
