"""The namespace harness itself, proven with real packets and no iptables rules of ours.

Everything runs inside namespaces the harness creates; the root namespace is only read, and
a module fixture asserts at the end that its sysctls, links and routes did not change.
"""

from __future__ import annotations

import errno
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from pykubeproxy.sandbox.netns import (
    Cluster,
    NetNS,
    TrafficTimeout,
    cleanup_stale,
    list_namespaces,
    spread,
)

pytestmark = [
    pytest.mark.kernel,
    pytest.mark.skipif(
        os.geteuid() != 0 or shutil.which("ip") is None, reason="needs root and iproute2"
    ),
]

ROOT = Path(__file__).resolve().parents[2]
MINE = f"pkp-{os.getpid()}-"
TCP, UDP, NODE_TCP = 8080, 5353, 9000
BRNF = "/proc/sys/net/bridge/bridge-nf-call-iptables"


def root_state() -> dict[str, str]:
    """What must never change in the root namespace (read only)."""
    files = ["/proc/sys/net/ipv4/ip_forward", BRNF, "/proc/sys/net/ipv4/conf/all/send_redirects"]
    state = {f: Path(f).read_text() for f in files if Path(f).exists()}
    for what in (["link"], ["route"], ["-4", "addr"]):
        state[" ".join(what)] = subprocess.run(
            ["ip", "-o", *what], capture_output=True, text=True, check=True
        ).stdout
    return state


def root_veths() -> set[str]:
    out = subprocess.run(
        ["ip", "-o", "link", "show", "type", "veth"], capture_output=True, text=True, check=True
    ).stdout
    return {line.split(":")[1].strip().split("@")[0] for line in out.splitlines()}


@pytest.fixture(scope="module", autouse=True)
def root_untouched() -> Iterator[None]:
    before = root_state()
    yield
    assert root_state() == before
    assert not list_namespaces(MINE)


@pytest.fixture(scope="module")
def cluster() -> Iterator[Cluster]:
    with Cluster() as c:
        for name in ("a", "b"):
            pod = c.add_pod(name)
            pod.serve_tcp(TCP)
            pod.serve_udp(UDP)
        c.node.serve_tcp(NODE_TCP)
        yield c


def test_pod_to_pod_over_bridge(cluster: Cluster) -> None:
    a, b = cluster.pods["a"], cluster.pods["b"]
    assert a.tcp_request(b.ip, TCP) == "b"
    assert a.udp_request(b.ip, UDP) == "b"
    assert b.tcp_request(a.ip, TCP) == "a"
    assert {("tcp", a.ip), ("udp", a.ip)} <= {(s.proto, s.src_ip) for s in b.seen_sources}


def test_node_and_pods_reach_each_other(cluster: Cluster) -> None:
    a = cluster.pods["a"]
    assert cluster.node.tcp_request(a.ip, TCP) == "a"
    assert cluster.node.udp_request(a.ip, UDP) == "a"
    assert a.tcp_request(cluster.node_ip, NODE_TCP) == "node"
    assert a.ip in cluster.node.seen_ips(NODE_TCP)


def test_client_reaches_node_ip(cluster: Cluster) -> None:
    assert cluster.client.ip == "198.18.0.3"
    assert cluster.client.tcp_request(cluster.node_ip, NODE_TCP) == "node"
    assert cluster.client.ip in cluster.node.seen_ips(NODE_TCP)


def test_client_reaches_pod_ips_routed_via_node(cluster: Cluster) -> None:
    """By design: the client routes everything via the node, which forwards (flat L3)."""
    b = cluster.pods["b"]
    assert cluster.client.tcp_request(b.ip, TCP) == "b"
    assert cluster.client.ip in b.seen_ips(TCP)  # not masqueraded: no rules exist yet


def test_second_client(cluster: Cluster) -> None:
    other = cluster.add_client("other")
    assert other.ip == "198.18.0.4"
    assert other.tcp_request(cluster.node_ip, NODE_TCP) == "node"
    assert other.tcp_request(cluster.pods["a"].ip, TCP) == "a"


def test_service_ips_go_nowhere_without_rules(cluster: Cluster) -> None:
    with pytest.raises(TrafficTimeout):
        cluster.node.tcp_request("10.96.0.10", 80, timeout=0.3)
    with pytest.raises(TrafficTimeout):
        cluster.pods["a"].udp_request("10.96.0.10", 53, timeout=0.3)


def test_refused_is_distinct_from_timeout(cluster: Cluster) -> None:
    a, b = cluster.pods["a"], cluster.pods["b"]
    with pytest.raises(ConnectionRefusedError):
        a.tcp_request(b.ip, 1)
    with pytest.raises(ConnectionRefusedError):
        a.udp_request(b.ip, 1)
    with pytest.raises(TrafficTimeout):
        a.tcp_request("10.244.0.250", TCP, timeout=0.3)  # nobody owns it


def test_persistent_connection_and_spread(cluster: Cluster) -> None:
    a, b = cluster.pods["a"], cluster.pods["b"]
    with a.open_tcp(b.ip, TCP) as conn:
        assert conn.ask() == "b"
        assert conn.ask("again") == "b"
    assert spread(lambda: a.tcp_request(b.ip, TCP), 5) == {"b": 5}


def test_pod_ports_have_hairpin(cluster: Cluster) -> None:
    a = cluster.pods["a"]
    out = cluster.node.exec(["ip", "-d", "link", "show", a.host_veth]).stdout
    assert "master cbr0" in out
    assert "hairpin on" in out


def test_socket_is_created_inside_the_namespace(cluster: Cluster) -> None:
    a, b = cluster.pods["a"], cluster.pods["b"]
    own_ns = os.readlink("/proc/thread-self/ns/net")
    with a.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind((a.ip, 0))
    for sock in (
        b.socket(socket.AF_INET, socket.SOCK_DGRAM),
        socket.socket(type=socket.SOCK_DGRAM),
    ):
        with sock, pytest.raises(OSError) as err:
            sock.bind((a.ip, 0))
        assert err.value.errno == errno.EADDRNOTAVAIL
    assert os.readlink("/proc/thread-self/ns/net") == own_ns


def test_sysctl_is_per_namespace(cluster: Cluster) -> None:
    root = Path("/proc/sys/net/ipv4/ip_forward").read_text().strip()
    assert cluster.node.sysctl("net.ipv4.ip_forward") == "1"
    assert cluster.pods["a"].sysctl("net/ipv4/ip_forward") == "0"
    assert Path("/proc/sys/net/ipv4/ip_forward").read_text().strip() == root


def forward_packets(node: NetNS, comment: str) -> int:
    out = node.exec(["iptables-legacy-save", "-c", "-t", "filter"]).stdout
    match = re.search(rf"^\[(\d+):\d+\] -A FORWARD .*{comment}", out, re.M)
    assert match, out
    return int(match.group(1))


@pytest.mark.skipif(shutil.which("iptables-legacy") is None, reason="needs iptables-legacy")
def test_bridged_pod_traffic_traverses_node_iptables() -> None:
    """br_netfilter must hand bridged pod<->pod frames to the node's iptables/conntrack.

    Also proves the switch is per namespace: turning it off in the node namespace stops the
    counting there and leaves the root namespace's value alone.
    """
    root_value = Path(BRNF).read_text()
    with Cluster() as c:
        a, b = c.add_pod("a"), c.add_pod("b")
        b.serve_tcp(TCP)
        ipt = ["iptables-legacy", "-w", "5"]
        rule = ["FORWARD", "-s", a.ip, "-d", b.ip, "-p", "tcp", "--dport", str(TCP)]
        rule += ["-m", "comment", "--comment", "pkp-probe", "-j", "ACCEPT"]
        c.node.exec([*ipt, "-I", *rule])
        assert c.node.sysctl("net.bridge.bridge-nf-call-iptables") == "1"
        assert a.tcp_request(b.ip, TCP) == "b"
        assert forward_packets(c.node, "pkp-probe") >= 3  # SYN, ACK, data, ...

        c.node.sysctl("net.bridge.bridge-nf-call-iptables", 0)
        c.node.exec([*ipt, "-Z", "FORWARD"])
        assert a.tcp_request(b.ip, TCP) == "b"
        assert forward_packets(c.node, "pkp-probe") == 0
        assert Path(BRNF).read_text() == root_value

        c.node.sysctl("net.bridge.bridge-nf-call-iptables", 1)
        c.node.exec([*ipt, "-D", *rule])


def test_remove_pod_removes_its_veth() -> None:
    with Cluster() as c:
        pod = c.add_pod("gone")
        c.remove_pod("gone")
        assert pod.name not in list_namespaces()
        shown = c.node.exec(["ip", "link", "show", pod.host_veth], check=False)
        assert shown.returncode != 0
        assert "gone" not in c.pods
        assert c.add_pod("gone").ip != pod.ip  # IPs are not reused


def test_teardown_leaves_nothing() -> None:
    veths = root_veths()
    with Cluster() as c:
        a, b = c.add_pod("a"), c.add_pod("b")
        b.serve_tcp(TCP)
        conn = a.open_tcp(b.ip, TCP)
        assert conn.ask() == "b"
        sleeper = c.node.popen(["sleep", "30"])
        names = [ns.name for ns in c.namespaces()]
        assert set(names) <= set(list_namespaces(MINE))
    assert not set(names) & set(list_namespaces())
    assert sleeper.poll() is not None
    assert root_veths() == veths


def test_failing_body_still_tears_down() -> None:
    names: set[str] = set()
    with pytest.raises(RuntimeError, match="boom"), Cluster() as c:
        c.add_pod("a").serve_tcp(TCP)
        names = {ns.name for ns in c.namespaces()}
        raise RuntimeError("boom")
    assert len(names) == 4
    assert not names & set(list_namespaces())


def run_child(body: str) -> subprocess.Popen[str]:
    code = "from pykubeproxy.sandbox.netns import *\nimport os, subprocess\n" + textwrap.dedent(
        body
    )
    return subprocess.Popen(
        [sys.executable, "-c", code], cwd=ROOT, stdout=subprocess.PIPE, text=True
    )


def child_namespaces(pid: int) -> list[str]:
    return list_namespaces(f"pkp-{pid}-")


def test_atexit_cleans_up_an_unclosed_cluster() -> None:
    child = run_child("""
        c = Cluster().start()
        c.add_pod("a")
        print(len(list_namespaces(f"pkp-{os.getpid()}-")))
    """)
    out, _ = child.communicate(timeout=20)
    assert child.returncode == 0 and out.strip() == "4"
    assert not child_namespaces(child.pid)


def test_sigterm_cleans_up() -> None:
    child = run_child("""
        import time
        with Cluster() as c:
            c.add_pod("a")
            print("ready", flush=True)
            time.sleep(20)
    """)
    assert child.stdout is not None
    assert child.stdout.readline().strip() == "ready"
    assert len(child_namespaces(child.pid)) == 4
    child.send_signal(signal.SIGTERM)
    assert child.wait(timeout=10) == 128 + signal.SIGTERM
    assert not child_namespaces(child.pid)


def test_cleanup_stale_after_a_crash() -> None:
    child = run_child("""
        c = Cluster().start()
        c.add_pod("a")
        sleeper = c.node.popen(["sleep", "30"], stdout=subprocess.DEVNULL)
        print(sleeper.pid, flush=True)
        os._exit(0)  # no atexit, no context manager: a crash
    """)
    try:
        out, _ = child.communicate(timeout=20)
        orphan = int(out)
        leftovers = child_namespaces(child.pid)
        assert len(leftovers) == 4
    finally:
        removed = cleanup_stale()
    assert set(leftovers) <= set(removed)
    assert not child_namespaces(child.pid)
    assert not any(n.startswith(MINE) for n in removed)  # live owners are left alone
    deadline = time.monotonic() + 3
    while alive(orphan) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not alive(orphan)


def alive(pid: int) -> bool:
    """Running and not a zombie waiting for init to reap it."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (FileNotFoundError, ProcessLookupError):
        return False
