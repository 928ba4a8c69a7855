"""A one-node "cluster" built from network namespaces, for tests that need real packets.

kube-proxy's job only shows with real traffic through real netfilter: DNAT on the way in,
conntrack un-DNAT on the way back, masquerade, hairpin. This module builds the smallest
topology where all of that happens, entirely inside namespaces it creates, so the root
namespace of the machine (its iptables, routes, interfaces, sysctls) is never touched::

    client ns "client"          lan ns "lan"              node ns "node"
   +--------------------+    +----------------+    +-----------------------------------+
   | eth0 198.18.0.3/24 |----| ln3       ln2  |----| eth0 198.18.0.2/24 (the node IP)  |
   | default via .0.2   |    |   (ports of)   |    | default via 198.18.0.3            |
   +--------------------+    |  bridge lan0   |    | ip_forward=1                      |
   more clients .4, .5 ------| ln4 ...        |    | bridge-nf-call-iptables=1         |
                             +----------------+    |                                   |
                                                   | cbr0 10.244.0.1/24 (bridge)       |
                                                   |   +-- vp2 (hairpin on) --+        |
                                                   |   +-- vp3 (hairpin on) --|---+    |
                                                   +--------------------------|---|----+
                        pod ns "a"                                            |   |
                       +------------------------+                             |   |
                       | eth0 10.244.0.2/24     |-----------------------------+   |
                       | default via 10.244.0.1 |       pod ns "b"                |
                       +------------------------+      +------------------------+ |
                                                       | eth0 10.244.0.3/24     |-+
                                                       | default via 10.244.0.1 |
                                                       +------------------------+

Addresses: the lan is 198.18.0.0/24 (RFC 2544 benchmarking space, never routed publicly),
pods get 10.244.0.N/24 (N = 2, 3, ...), Services are expected in 10.96.0.0/12.

Routing design: the client's default route goes to the node and the node forwards, so the
client *can* reach pod IPs directly (a flat routed network, like a cloud VPC route per node).
The node's default route points at the first client, so ClusterIPs are routable from the
node's own processes (they leave via eth0 unless iptables OUTPUT DNAT catches them; the
client does not forward, so un-NATed Service traffic is silently dropped there).

br_netfilter: on this kernel (>= 5.3) ``/proc/sys/net/bridge/*`` is per network namespace,
so ``bridge-nf-call-iptables=1`` is written inside the node namespace only. The per-bridge
``nf_call_iptables`` option is the fallback on kernels where the sysctl is global.

Everything is torn down by context managers, an atexit hook (SIGTERM is turned into
SystemExit while a Cluster is open, if nobody else handles it) and :func:`cleanup_stale`,
which removes namespaces of dead processes: every namespace is named
``pkp-<pid>-<seq>-<label>``, and a namespace whose ``<pid>`` no longer exists is stale.
"""

from __future__ import annotations

import atexit
import contextlib
import ctypes
import ipaddress
import itertools
import os
import re
import select
import signal
import socket
import subprocess
import threading
import time
import weakref
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from types import FrameType, TracebackType
from typing import Any, NamedTuple, Self, TypeVar

__all__ = [
    "PREFIX",
    "Cluster",
    "CommandError",
    "Host",
    "NetNS",
    "Pod",
    "Seen",
    "TcpConn",
    "TrafficTimeout",
    "cleanup_stale",
    "exit_on_sigterm",
    "ip_cmd",
    "list_namespaces",
    "setup_node",
    "spread",
]

PREFIX = "pkp-"
NETNS_DIR = Path("/run/netns")
CLONE_NEWNET = 0x40000000
_POLL = 0.05  # how often server threads look at their stop flag
_MAX_LINE = 4096
_LABEL_RE = re.compile(r"^[a-z0-9]([a-z0-9-]{0,30}[a-z0-9])?$")
_STALE_RE = re.compile(rf"^{PREFIX}(\d+)-")

_T = TypeVar("_T")
_libc = ctypes.CDLL(None, use_errno=True)
_seq = itertools.count(1)
_live: dict[str, NetNS] = {}
_live_lock = threading.Lock()


class CommandError(subprocess.CalledProcessError):
    """A failed command whose message includes its stderr, so test failures explain themselves."""

    def __str__(self) -> str:
        err = self.stderr.decode() if isinstance(self.stderr, bytes) else self.stderr
        return f"{super().__str__()}: {(err or '').strip()}"


class TrafficTimeout(TimeoutError):
    """No connection or no reply within the deadline (distinct from ConnectionRefusedError)."""


class Seen(NamedTuple):
    """One connection or datagram as a server saw it: tells tests whether SNAT happened."""

    proto: str
    port: int
    src_ip: str
    src_port: int


def _run(argv: list[str], **kw: Any) -> subprocess.CompletedProcess[Any]:
    """subprocess.run with safe defaults: bounded, captured, and failing loudly."""
    check = kw.pop("check", True)
    opts: dict[str, Any] = {"text": True, "timeout": 30.0}
    if not {"stdout", "stderr", "capture_output"} & kw.keys():
        opts["capture_output"] = True
    opts.update(kw)
    proc = subprocess.run(argv, check=False, **opts)
    if check and proc.returncode != 0:
        raise CommandError(proc.returncode, argv, proc.stdout, proc.stderr)
    return proc


def ip_cmd(ns: NetNS, *args: str) -> None:
    """Run `ip -n <ns> ...`: iproute2 enters the namespace itself, nothing runs in the root."""
    _run(["ip", "-n", ns.name, *args])


def _terminate(proc: subprocess.Popen[Any]) -> None:
    """Stop a child we started: politely, then firmly, with bounded waits."""
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=3.0)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=3.0)


class NetNS:
    """A named network namespace owned by this process, deleted on delete()/exit.

    ``name`` is the kernel name (``pkp-<pid>-<seq>-<label>``); ``label`` is the short human
    name, which is also what the servers of this namespace answer with.
    """

    def __init__(self, label: str) -> None:
        if not _LABEL_RE.match(label):
            raise ValueError(f"bad namespace label {label!r}: use [a-z0-9-], at most 32 chars")
        self.label = label
        self.name = f"{PREFIX}{os.getpid()}-{next(_seq)}-{label}"
        self.seen_sources: list[Seen] = []
        self._servers: list[_Server] = []
        self._procs: list[subprocess.Popen[Any]] = []
        self._sockets: weakref.WeakSet[socket.socket] = weakref.WeakSet()
        self._deleted = False
        _run(["ip", "netns", "add", self.name])
        with _live_lock:
            _live[self.name] = self
        try:
            ip_cmd(self, "link", "set", "lo", "up")
        except BaseException:
            self.delete()
            raise

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.name!r})"

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self, et: type[BaseException] | None, ev: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.delete()

    @property
    def path(self) -> Path:
        return NETNS_DIR / self.name

    # --- running things inside -------------------------------------------------------------

    def exec(self, argv: list[str], **kw: Any) -> subprocess.CompletedProcess[Any]:
        """Run a command inside; defaults: check, capture text output, 30 s timeout."""
        return _run(["ip", "netns", "exec", self.name, *argv], **kw)

    def popen(self, argv: list[str], **kw: Any) -> subprocess.Popen[Any]:
        """Start a long-running process inside (e.g. the agent); it is stopped on delete()."""
        proc: subprocess.Popen[Any] = subprocess.Popen(
            ["ip", "netns", "exec", self.name, *argv], **kw
        )
        self._procs.append(proc)
        return proc

    def run_inside(self, fn: Callable[[], _T], timeout: float = 10.0) -> _T:
        """Call fn in a short-lived thread that has entered this namespace.

        setns(CLONE_NEWNET) only changes the calling thread, and the thread exits right after,
        so no thread of this process ever stays in (or leaks back from) another namespace.
        Sockets and /proc/sys/net files opened by fn belong to this namespace for good.
        """
        out: list[_T] = []
        err: list[BaseException] = []

        def body() -> None:
            try:
                fd = os.open(self.path, os.O_RDONLY | os.O_CLOEXEC)
                try:
                    if _libc.setns(fd, CLONE_NEWNET) != 0:
                        no = ctypes.get_errno()
                        raise OSError(no, f"setns({self.name}): {os.strerror(no)}")
                finally:
                    os.close(fd)
                out.append(fn())
            except BaseException as exc:
                err.append(exc)

        thread = threading.Thread(target=body, name=f"setns-{self.label}", daemon=True)
        thread.start()
        thread.join(timeout)
        if thread.is_alive():
            raise TimeoutError(f"work inside {self.name} took longer than {timeout}s")
        if err:
            raise err[0]
        return out[0]

    def socket(self, family: int = socket.AF_INET, type: int = socket.SOCK_STREAM) -> socket.socket:
        """A socket created inside this namespace (it stays there); closed on delete()."""
        sock = self.run_inside(lambda: socket.socket(family, type))
        self._sockets.add(sock)
        return sock

    def sysctl(self, key: str, value: str | int | None = None) -> str:
        """Read (and first write, if value is given) a sysctl of this namespace only."""
        path = Path("/proc/sys") / (key if "/" in key else key.replace(".", "/"))

        def access() -> str:
            if value is not None:
                path.write_text(f"{value}\n")
            return path.read_text().strip()

        return self.run_inside(access)

    # --- traffic ----------------------------------------------------------------------------

    def serve_tcp(self, port: int = 0, bind: str = "0.0.0.0") -> int:
        """Answer every line on every connection with ``<label>\\n``; returns the bound port."""
        return self._serve("tcp", port, bind)

    def serve_udp(self, port: int = 0, bind: str = "0.0.0.0") -> int:
        """Answer every datagram with ``<label>\\n``; returns the bound port."""
        return self._serve("udp", port, bind)

    def _serve(self, proto: str, port: int, bind: str) -> int:
        server = _Server(self, proto, port, bind)
        self._servers.append(server)
        return server.port

    def seen_ips(self, port: int | None = None) -> set[str]:
        """Source IPs seen by this namespace's servers (optionally on one port only)."""
        return {s.src_ip for s in list(self.seen_sources) if port in (None, s.port)}

    def open_tcp(self, ip: str, port: int, timeout: float = 2.0) -> TcpConn:
        """A connection from inside this namespace that can be asked again later."""
        sock = self.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.settimeout(timeout)
        try:
            sock.connect((ip, port))
        except TimeoutError:
            sock.close()
            raise TrafficTimeout(f"tcp connect to {ip}:{port} timed out after {timeout}s") from None
        except BaseException:
            sock.close()
            raise
        return TcpConn(sock, f"{ip}:{port}", timeout)

    def tcp_request(self, ip: str, port: int, timeout: float = 2.0) -> str:
        """Connect, send one line, return the reply line (raises TrafficTimeout or OSError)."""
        with self.open_tcp(ip, port, timeout) as conn:
            return conn.ask()

    def udp_request(
        self, ip: str, port: int, timeout: float = 2.0, source_port: int | None = None
    ) -> str:
        """Send one datagram, return the reply.

        The socket is connected, so an ICMP port-unreachable raises ConnectionRefusedError and
        a reply from any other address than ip:port (i.e. a missing un-DNAT) is ignored.
        source_port pins the flow's source: a load balancer keeps a UDP "connection" per
        source port, so a randomly reused ephemeral port would reach the same backend again.
        """
        with self.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
            sock.settimeout(timeout)
            if source_port is not None:
                sock.bind(("0.0.0.0", source_port))
            sock.connect((ip, port))
            sock.send(b"ping\n")
            try:
                return sock.recv(_MAX_LINE).decode().strip()
            except TimeoutError:
                raise TrafficTimeout(f"no udp reply from {ip}:{port} in {timeout}s") from None

    # --- teardown ---------------------------------------------------------------------------

    def delete(self) -> None:
        """Stop servers and children, close sockets, delete the namespace. Idempotent."""
        if self._deleted:
            return
        self._deleted = True
        with _live_lock:
            _live.pop(self.name, None)
        for server in self._servers:
            server.stop()
        for proc in self._procs:
            with contextlib.suppress(OSError, subprocess.SubprocessError):
                _terminate(proc)
        # An open socket would keep the namespace (and its veth) alive after `ip netns del`.
        for sock in list(self._sockets):
            sock.close()
        _run(["ip", "netns", "delete", self.name], check=False)


class Host(NetNS):
    """A namespace with one interface, ``eth0``, holding ``ip``."""

    def __init__(self, label: str, ip: str) -> None:
        super().__init__(label)
        self.ip = ip

    @property
    def octet(self) -> str:
        """Last byte of ip: makes short (<= 15 chars) per-host interface names."""
        return self.ip.rsplit(".", 1)[1]


class Pod(Host):
    """A pod: ``eth0`` in its own namespace, peer ``host_veth`` plugged into the node's cbr0."""

    def __init__(self, label: str, ip: str) -> None:
        super().__init__(label, ip)
        self.host_veth = f"vp{self.octet}"


class TcpConn:
    """A persistent TCP connection: ask() again later to see whether it still works."""

    def __init__(self, sock: socket.socket, dest: str, timeout: float) -> None:
        self._sock = sock
        self._buf = b""
        self.dest = dest
        self.timeout = timeout

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self, et: type[BaseException] | None, ev: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def ask(self, line: str = "ping") -> str:
        """Send a line and return the reply line, within ``timeout`` seconds."""
        self._sock.sendall(line.encode() + b"\n")
        deadline = time.monotonic() + self.timeout
        while b"\n" not in self._buf:
            left = deadline - time.monotonic()
            if left <= 0 or len(self._buf) > _MAX_LINE:
                raise TrafficTimeout(f"no tcp reply from {self.dest} in {self.timeout}s")
            self._sock.settimeout(left)
            try:
                data = self._sock.recv(_MAX_LINE)
            except TimeoutError:
                continue
            if not data:
                raise ConnectionResetError(f"{self.dest} closed the connection without a reply")
            self._buf += data
        reply, _, self._buf = self._buf.partition(b"\n")
        return reply.decode().strip()

    def close(self) -> None:
        self._sock.close()


class _Server:
    """A TCP or UDP responder on a socket inside a namespace, run by daemon threads."""

    def __init__(self, owner: NetNS, proto: str, port: int, bind: str) -> None:
        kind = socket.SOCK_STREAM if proto == "tcp" else socket.SOCK_DGRAM
        self.owner = owner
        self.proto = proto
        self.reply = f"{owner.label}\n".encode()
        self.sock = owner.socket(socket.AF_INET, kind)
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        try:
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            self.sock.bind((bind, port))
            if proto == "tcp":
                self.sock.listen(128)
        except BaseException:
            self.sock.close()
            raise
        self.port: int = self.sock.getsockname()[1]
        if proto == "tcp":
            self._spawn(self._accept_loop)
        else:
            self._spawn(self._udp_loop)

    def _spawn(self, target: Callable[..., None], *args: Any) -> None:
        self._threads = [t for t in self._threads if t.is_alive()]
        name = f"{self.proto}-{self.owner.label}:{self.port}"
        thread = threading.Thread(target=target, args=args, name=name, daemon=True)
        self._threads.append(thread)
        thread.start()

    def _readable(self, sock: socket.socket) -> bool:
        """Wait briefly for input, so loops re-check the stop flag every _POLL seconds."""
        return bool(select.select([sock], [], [], _POLL)[0])

    def _record(self, peer: tuple[str, int]) -> None:
        self.owner.seen_sources.append(Seen(self.proto, self.port, peer[0], peer[1]))

    def _accept_loop(self) -> None:
        while not self._stop.is_set():
            if self._readable(self.sock):
                with contextlib.suppress(OSError):
                    conn, peer = self.sock.accept()
                    self._record(peer)
                    self._spawn(self._tcp_conn, conn)

    def _tcp_conn(self, conn: socket.socket) -> None:
        buf = b""
        with conn, contextlib.suppress(OSError):
            while not self._stop.is_set():
                if not self._readable(conn):
                    continue
                data = conn.recv(_MAX_LINE)
                if not data:
                    return
                buf += data
                lines = buf.count(b"\n")
                buf = buf.rpartition(b"\n")[2]
                conn.sendall(self.reply * lines)

    def _udp_loop(self) -> None:
        while not self._stop.is_set():
            if self._readable(self.sock):
                with contextlib.suppress(OSError):
                    _, peer = self.sock.recvfrom(65535)
                    self._record(peer)
                    self.sock.sendto(self.reply, peer)

    def stop(self) -> None:
        """Stop the loops (each notices within _POLL), then close the socket."""
        self._stop.set()
        for thread in self._threads:
            thread.join(timeout=2.0)
        self.sock.close()


class Cluster:
    """One node, its pods and outside clients; build with ``with Cluster() as c:``."""

    node_ip = "198.18.0.2"
    lan_prefix = 24
    gateway_ip = "10.244.0.1"
    pod_cidr = "10.244.0.0/24"
    cluster_cidr = "10.244.0.0/16"
    service_cidr = "10.96.0.0/12"
    bridge = "cbr0"
    bridge_mac = "02:00:0a:f4:00:01"  # fixed: a bridge takes its lowest port MAC otherwise

    def __init__(self) -> None:
        self.pods: dict[str, Pod] = {}
        self.clients: dict[str, Host] = {}
        self._lan: NetNS | None = None
        self._node: Host | None = None
        self._next_pod = 2
        self._next_client = 3

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(
        self, et: type[BaseException] | None, ev: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    @property
    def node(self) -> Host:
        if self._node is None:
            raise RuntimeError("cluster not started")
        return self._node

    @property
    def lan(self) -> NetNS:
        if self._lan is None:
            raise RuntimeError("cluster not started")
        return self._lan

    @property
    def client(self) -> Host:
        """The first outside client (198.18.0.3), the node's default gateway."""
        return self.clients["client"]

    def start(self) -> Self:
        """Build lan, node and the first client; on any failure remove what was built."""
        exit_on_sigterm()
        try:
            self._lan = NetNS("lan")
            ip_cmd(self._lan, "link", "add", "lan0", "type", "bridge")
            ip_cmd(self._lan, "link", "set", "lan0", "up")
            first_client = self.lan_ip(self._next_client)
            self._node = Host("node", self.node_ip)
            self._setup_node()
            node = self._node
            self.plug(self.lan, "lan0", f"ln{node.octet}", node, self.lan_prefix, first_client)
            self.add_client("client")
        except BaseException:
            self.close()
            raise
        return self

    def lan_ip(self, n: int) -> str:
        return str(ipaddress.ip_network(f"{self.node_ip}/{self.lan_prefix}", False)[n])

    def _setup_node(self) -> None:
        setup_node(self.node, self.bridge, self.bridge_mac, f"{self.gateway_ip}/24")

    @staticmethod
    def plug(
        sw: NetNS, bridge: str, port: str, host: Host, prefix: int, gateway: str, *port_opts: str
    ) -> None:
        """Wire host's eth0 to a new port of a bridge in namespace sw.

        The veth is created directly in its two namespaces, never in the root one.
        """
        ip_cmd(sw, "link", "add", port, "type", "veth", "peer", "name", "eth0", "netns", host.name)
        ip_cmd(sw, "link", "set", port, "master", bridge)
        if port_opts:
            ip_cmd(sw, "link", "set", port, "type", "bridge_slave", *port_opts)
        ip_cmd(sw, "link", "set", port, "up")
        ip_cmd(host, "addr", "add", f"{host.ip}/{prefix}", "dev", "eth0")
        ip_cmd(host, "link", "set", "eth0", "up")
        ip_cmd(host, "route", "add", "default", "via", gateway)

    def add_client(self, name: str) -> Host:
        """Another outside machine on the lan (198.18.0.3, .4, ...), default route via node."""
        if name in self.clients:
            raise ValueError(f"client {name!r} exists")
        client = Host(name, self.lan_ip(self._next_client))
        self._next_client += 1
        try:
            self.plug(self.lan, "lan0", f"ln{client.octet}", client, self.lan_prefix, self.node_ip)
        except BaseException:
            client.delete()
            raise
        self.clients[name] = client
        return client

    def add_pod(self, name: str) -> Pod:
        """A pod on cbr0 with the next free 10.244.0.N (never reused, so no stale ARP)."""
        if name in self.pods:
            raise ValueError(f"pod {name!r} exists")
        if self._next_pod > 254:
            raise RuntimeError("pod CIDR exhausted")
        pod = Pod(name, f"10.244.0.{self._next_pod}")
        self._next_pod += 1
        try:
            self.plug(
                self.node, self.bridge, pod.host_veth, pod, 24, self.gateway_ip, "hairpin", "on"
            )
        except BaseException:
            pod.delete()
            raise
        self.pods[name] = pod
        return pod

    def remove_pod(self, name: str) -> None:
        """Delete the pod's veth, then its namespace.

        The veth goes first and explicitly: namespace teardown in the kernel is asynchronous,
        and tests want the endpoint gone the moment this returns.
        """
        pod = self.pods.pop(name)
        ip_cmd(self.node, "link", "delete", pod.host_veth)
        pod.delete()

    def namespaces(self) -> list[NetNS]:
        found: list[NetNS | None] = [*self.pods.values(), *self.clients.values()]
        found += [self._node, self._lan]
        return [ns for ns in found if ns is not None]

    def close(self) -> None:
        """Tear everything down; safe to call twice and after a partial start()."""
        for ns in self.namespaces():
            ns.delete()
        self.pods.clear()
        self.clients.clear()
        self._node = self._lan = None


def setup_node(node: NetNS, bridge: str, mac: str, gateway: str) -> None:
    """Make a namespace a node: forwarding, a pod bridge at `gateway`, br_netfilter.

    Pod -> ClusterIP -> pod on the same bridge leaves by the interface it came in on;
    ICMP redirects would then tell pods to bypass the node (and its DNAT), so they are
    off. The bridge gets a fixed MAC (it would take its lowest port's otherwise).
    Bridged pod<->pod frames must traverse the node's iptables (and conntrack) so that
    replies of Service traffic between two pods get un-DNATed: the sysctl is per
    namespace since Linux 5.3; older kernels only have it in the root namespace, where we
    must not write, so the per-bridge option is used instead.
    """
    node.sysctl("net.ipv4.ip_forward", 1)
    for dev in ("all", "default"):
        node.sysctl(f"net.ipv4.conf.{dev}.send_redirects", 0)
    ip_cmd(node, "link", "add", bridge, "address", mac, "type", "bridge")
    try:
        node.sysctl("net.bridge.bridge-nf-call-iptables", 1)
    except FileNotFoundError:
        if not Path("/proc/sys/net/bridge").exists():
            raise RuntimeError("br_netfilter is not loaded (modprobe br_netfilter)") from None
        ip_cmd(node, "link", "set", bridge, "type", "bridge", "nf_call_iptables", "1")
    ip_cmd(node, "addr", "add", gateway, "dev", bridge)
    ip_cmd(node, "link", "set", bridge, "up")


def spread(fn: Callable[[], str], n: int) -> Counter[str]:
    """Call fn n times and count the answers, e.g. to see load balancing across pods."""
    return Counter(fn() for _ in range(n))


def list_namespaces(prefix: str = PREFIX) -> list[str]:
    """Names of the named namespaces (as in `ip netns list`) starting with prefix."""
    if not NETNS_DIR.is_dir():
        return []
    return sorted(p.name for p in NETNS_DIR.iterdir() if p.name.startswith(prefix))


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def cleanup_stale() -> list[str]:
    """Delete ``pkp-<pid>-...`` namespaces whose creating process is gone; returns their names.

    Rule: the pid in the name is the creator. If it no longer exists the namespace is a
    leftover of a crashed run; processes still inside it (e.g. an orphaned agent) are killed.
    A recycled pid only delays the cleanup until that process ends.
    """
    removed = []
    for name in list_namespaces():
        match = _STALE_RE.match(name)
        if match is None or _pid_alive(int(match.group(1))):
            continue
        pids = _run(["ip", "netns", "pids", name], check=False).stdout.split()
        for pid in pids:
            with contextlib.suppress(OSError, ValueError):
                os.kill(int(pid), signal.SIGKILL)
        _run(["ip", "netns", "delete", name], check=False)
        removed.append(name)
    return removed


def _cleanup_live() -> None:
    """atexit: delete whatever this process still owns."""
    with _live_lock:
        owned = list(_live.values())
    for ns in owned:
        with contextlib.suppress(Exception):
            ns.delete()


def exit_on_sigterm() -> None:
    """Turn SIGTERM into SystemExit so context managers and atexit still clean up.

    Only if nobody installed a handler and we are in the main thread (signal.signal rule).
    """
    if threading.current_thread() is not threading.main_thread():
        return
    if signal.getsignal(signal.SIGTERM) is not signal.SIG_DFL:
        return

    def handler(signum: int, frame: FrameType | None) -> None:
        raise SystemExit(128 + signum)

    signal.signal(signal.SIGTERM, handler)


atexit.register(_cleanup_live)
