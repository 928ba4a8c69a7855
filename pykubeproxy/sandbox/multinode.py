"""A three-node cluster built from network namespaces, one real agent per node.

Traffic policies, topology hints, health check node ports and load balancer source ranges
only mean something when there is more than one node: "local" needs an elsewhere. This
module builds that, entirely inside namespaces it creates (nothing in the root namespace
changes), with one :class:`~pykubeproxy.sandbox.apiserver.ApiServerDouble` that every
node's ``python -m pykubeproxy`` watches::

     external network 198.19.0.0/24 (bridge ext0 in the router)
     ext-a 198.19.0.10 ---+                       +--- ext-b 198.19.0.200
                          |                       |
                 +--------+-----------------------+--------+
                 | router   ext0 198.19.0.1/24             |
                 |          lan0 198.18.0.1/24             |   API double on
                 |          ip_forward=1                   |   198.18.0.1:6443
                 |  routes: 10.244.N.0/24 via node-N       |
                 |          LB IPs via chosen nodes (ECMP) |
                 +--------+------------+------------+------+
         node LAN         |            |            |      198.18.0.0/24 (bridge lan0)
               +----------+--+  +------+------+  +--+----------+
               | node-1 .11  |  | node-2 .12  |  | node-3 .13  |   eth0, default via .1
               | zone-a      |  | zone-a      |  | zone-b      |   Node label
               | cbr0        |  | cbr0        |  | cbr0        |   topology.kubernetes.io/zone
               | 10.244.1.1  |  | 10.244.2.1  |  | 10.244.3.1  |
               |  pods .2 .3 |  |  pods ...   |  |  pods ...   |   each pod: netns + veth,
               +-------------+  +-------------+  +-------------+   hairpin on

Addresses follow the one-node :class:`~pykubeproxy.sandbox.netns.Cluster` (docs/decisions.md,
"Test network"): the node LAN is 198.18.0.0/24 and the external network 198.19.0.0/24, the
two halves of RFC 2544's benchmarking block; node-N is 198.18.0.(10+N) with pod CIDR
10.244.N.0/24 inside the cluster CIDR 10.244.0.0/16; Services live in 10.96.0.0/12 and load
balancer IPs are taken from 203.0.113.0/24 (TEST-NET-3).

Routing: a flat routed network without overlay, like host-gw or a VPC route table. Every
node has a route to every other node's pod CIDR via that node's LAN address, so pods reach
pods across nodes with their own source addresses; the router has the same routes, so the
external network could reach pod IPs directly too. Nodes default-route to the router.

Load balancer: :meth:`MultiNodeCluster.route_load_balancer` makes the router route a LB IP
to one or more nodes (ECMP with several), keeping the destination: a VIP-preserving cloud
load balancer, the kind ``ipMode: VIP`` describes, and the only kind
``loadBalancerSourceRanges`` can work with, since the client's address reaches the node.
The router hashes on addresses only (the kernel default), so one client always lands on the
same node.

The API double's listening socket is created in the router namespace on 198.18.0.1, which
every node reaches over the LAN, so a single store serves all agents, as one API server does.

"All agents have synced": :meth:`MultiNodeCluster.wait_synced` writes a barrier (a Service
and its EndpointSlice that the harness owns, changed on every call) and waits until every
node's ruleset shows the new barrier. Each watch delivers events in resourceVersion order
and a sync applies everything received before it, so a ruleset showing the barrier also
holds every Service and EndpointSlice written before it. Node changes are not covered (the
agents watch only their own Node); wait for their effect by traffic instead. In IPVS mode a
sync programs IPVS (with the ipsets and kube-ipvs0) before its iptables rules, so a virtual
server alone would show a sync half done: there the barrier is also a load balancer whose
source range leaves the nodes out, which gives it IPVS mode's one per-Service iptables rule
(KUBE-IPVS-OUT-FILTER, filter table, written last), and that rule must show it too.

Teardown: a context manager, plus :mod:`~pykubeproxy.sandbox.netns`'s atexit hook and
``pkp-<pid>-...`` names that :func:`~pykubeproxy.sandbox.netns.cleanup_stale` understands.
The proxy mode is an argument (``mode="ipvs"`` runs the same cluster where ``ip_vs`` exists).
"""

from __future__ import annotations

import contextlib
import json
import re
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any, NamedTuple, Self

from pykubeproxy.sandbox import lab
from pykubeproxy.sandbox.apiserver import ApiError, ApiServerDouble
from pykubeproxy.sandbox.lab import http_get
from pykubeproxy.sandbox.netns import (
    Cluster,
    Host,
    NetNS,
    Pod,
    TrafficTimeout,
    exit_on_sigterm,
    ip_cmd,
    setup_node,
)

__all__ = [
    "CLUSTER_CIDR",
    "DEFAULT_NODES",
    "REFUSED",
    "TIMEOUT",
    "ZONE_LABEL",
    "MultiNodeCluster",
    "Node",
    "NodeSpec",
    "Reply",
    "endpoint_slice",
    "http_get",
    "service",
]

Obj = dict[str, Any]

ZONE_LABEL = "topology.kubernetes.io/zone"
CLUSTER_CIDR = "10.244.0.0/16"
LAN_PREFIX = 24
ROUTER_LAN_IP = "198.18.0.1"
ROUTER_EXTERNAL_IP = "198.19.0.1"
EXTERNAL_CLIENTS = {"ext-a": "198.19.0.10", "ext-b": "198.19.0.200"}
API_PORT = 6443
METRICS_URL = "http://127.0.0.1:10249/metrics"
HEALTHZ_URL = "http://127.0.0.1:10256/healthz"
BRIDGE = "cbr0"

# What probe() returns instead of a backend's name.
REFUSED = "refused"
TIMEOUT = "timeout"
DROP_TIMEOUT = 1.5  # seconds without an answer that count as "dropped"

# The barrier Service: its endpoint and (IPVS mode) LB IP and source range are TEST-NET-1,
# and never see traffic.
BARRIER_NAME = "sync-barrier"
BARRIER_IP = "10.96.255.254"
BARRIER_ENDPOINT = "192.0.2.1"
BARRIER_LB_IP = "192.0.2.2"
BARRIER_SOURCE_RANGE = "192.0.2.0/32"


@dataclass(frozen=True)
class NodeSpec:
    name: str
    zone: str


DEFAULT_NODES = (
    NodeSpec("node-1", "zone-a"),
    NodeSpec("node-2", "zone-a"),
    NodeSpec("node-3", "zone-b"),
)


class Reply(NamedTuple):
    """Who answered a request, and the source address that backend saw (SNAT or not)."""

    backend: str
    source: str


# --------------------------------------------------------------------------- API objects


def service(
    name: str,
    cluster_ip: str,
    *,
    port: int = 80,
    target_port: int = 8080,
    load_balancer_ip: str | None = None,
    **spec: Any,
) -> Obj:
    """A Service as a user (and, for the ingress status, a cloud controller) would write it.

    The one-node Lab's Service, made a LoadBalancer when given a LB IP; other spec fields
    pass through with their API names (externalTrafficPolicy, healthCheckNodePort,
    loadBalancerSourceRanges, sessionAffinity, trafficDistribution...).
    """
    if load_balancer_ip:
        spec.setdefault("type", "LoadBalancer")
    obj = lab.service(name, cluster_ip, port, target_port, **spec)
    if load_balancer_ip:
        obj["status"] = {"loadBalancer": {"ingress": [{"ip": load_balancer_ip, "ipMode": "VIP"}]}}
    return obj


def endpoint_slice(service_name: str, endpoints: Sequence[Obj], port: int, **kw: Any) -> Obj:
    """An EndpointSlice as the EndpointSlice controller would write it, endpoints given whole
    (conditions, nodeName, hints)."""
    return {**lab.endpoint_slice(service_name, [], port, **kw), "endpoints": list(endpoints)}


# --------------------------------------------------------------------------- HTTP


# --------------------------------------------------------------------------- nodes


class Node(Host):
    """A node namespace: eth0 on the node LAN, cbr0 for its pods, and its own agent."""

    def __init__(self, spec: NodeSpec, index: int, log_dir: Path) -> None:
        super().__init__(spec.name, f"198.18.0.{10 + index}")
        self.index = index
        self.zone = spec.zone
        self.pod_cidr = f"10.244.{index}.0/24"
        self.gateway_ip = f"10.244.{index}.1"
        self.pods: dict[str, Pod] = {}
        self.agent: subprocess.Popen[bytes] | None = None
        self.log_path = log_dir / f"{spec.name}.log"
        self._next_pod = 2

    def setup(self) -> None:
        """Forwarding, the pod bridge and br_netfilter, as the one-node Cluster's node has."""
        mac = f"02:00:0a:f4:{self.index:02x}:01"
        setup_node(self, BRIDGE, mac, f"{self.gateway_ip}/24")

    def next_pod_ip(self) -> str:
        """The next free 10.244.N.M (never reused, so no stale ARP or conntrack)."""
        if self._next_pod > 254:
            raise RuntimeError(f"pod CIDR of {self.label} exhausted")
        ip = f"10.244.{self.index}.{self._next_pod}"
        self._next_pod += 1
        return ip

    def object(self) -> Obj:
        """This node's Node object, as the kubelet registers it."""
        return {
            "apiVersion": "v1",
            "kind": "Node",
            "metadata": {
                "name": self.label,
                "labels": {"kubernetes.io/hostname": self.label, ZONE_LABEL: self.zone},
            },
            "spec": {"podCIDR": self.pod_cidr, "podCIDRs": [self.pod_cidr]},
            "status": {
                "addresses": [
                    {"type": "InternalIP", "address": self.ip},
                    {"type": "Hostname", "address": self.label},
                ]
            },
        }

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""


# --------------------------------------------------------------------------- the cluster


class MultiNodeCluster:
    """Router, nodes, pods, external clients, one API double and one agent per node.

    Use as ``with MultiNodeCluster() as mc:``; then add pods, write objects, call
    :meth:`start_agents` and :meth:`wait_synced`, and send traffic with :meth:`request`,
    :meth:`replies` or :meth:`probe` from any namespace (a pod, a node or a client).
    ``mode`` is the agent's ``--proxy-mode``; ``agent_args`` go to every agent.
    """

    def __init__(
        self,
        nodes: Sequence[NodeSpec] = DEFAULT_NODES,
        *,
        mode: str = "iptables",
        agent_args: Sequence[str] = (),
        sync_timeout: float = 60.0,
    ) -> None:
        self.node_specs = tuple(nodes)
        self.mode = mode
        self.agent_args = tuple(agent_args)
        self.sync_timeout = sync_timeout
        self.nodes: dict[str, Node] = {}
        self.pods: dict[str, Pod] = {}
        self.clients: dict[str, Host] = {}
        self._router: NetNS | None = None
        self._api: ApiServerDouble | None = None
        self._barrier = 0
        self._tmp = tempfile.TemporaryDirectory(prefix="pkp-multinode-")
        self.log_dir = Path(self._tmp.name)
        self.kubeconfig = self.log_dir / "kubeconfig"

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(
        self, et: type[BaseException] | None, ev: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    @property
    def router(self) -> NetNS:
        if self._router is None:
            raise RuntimeError("cluster not started")
        return self._router

    @property
    def api(self) -> ApiServerDouble:
        if self._api is None:
            raise RuntimeError("cluster not started")
        return self._api

    # --- building -------------------------------------------------------------------------

    def start(self) -> Self:
        """Build router, nodes and clients and start the API double; undo all on failure."""
        exit_on_sigterm()
        try:
            self._build_router()
            for index, spec in enumerate(self.node_specs, start=1):
                self._add_node(spec, index)
            self._route_pod_cidrs()
            for name, ip in EXTERNAL_CLIENTS.items():
                self.add_client(name, ip)
            sock = self.router.socket()
            sock.bind((ROUTER_LAN_IP, API_PORT))
            self._api = ApiServerDouble(sock=sock).start()
            self.api.write_kubeconfig(self.kubeconfig)
            for node in self.nodes.values():
                self.api.create("nodes", node.object())
            self._write_barrier()
        except BaseException:
            self.close()
            raise
        return self

    def _build_router(self) -> None:
        router = self._router = NetNS("router")
        router.sysctl("net.ipv4.ip_forward", 1)
        for bridge, address in (("lan0", ROUTER_LAN_IP), ("ext0", ROUTER_EXTERNAL_IP)):
            ip_cmd(router, "link", "add", bridge, "type", "bridge")
            ip_cmd(router, "addr", "add", f"{address}/{LAN_PREFIX}", "dev", bridge)
            ip_cmd(router, "link", "set", bridge, "up")
        # The router only switches and routes: frames crossing its bridges need no netfilter.
        with contextlib.suppress(FileNotFoundError):
            router.sysctl("net.bridge.bridge-nf-call-iptables", 0)

    def _add_node(self, spec: NodeSpec, index: int) -> None:
        node = Node(spec, index, self.log_dir)
        self.nodes[spec.name] = node
        node.setup()
        Cluster.plug(self.router, "lan0", f"ln{node.octet}", node, LAN_PREFIX, ROUTER_LAN_IP)

    def _route_pod_cidrs(self) -> None:
        """Every pod CIDR via its node, on the other nodes and on the router (no overlay)."""
        for owner in self.nodes.values():
            for ns in (self.router, *self.nodes.values()):
                if ns is not owner:
                    ip_cmd(ns, "route", "add", owner.pod_cidr, "via", owner.ip)

    def add_client(self, name: str, ip: str) -> Host:
        """A machine on the external network (198.19.0.0/24), default route via the router."""
        if name in self.clients:
            raise ValueError(f"client {name!r} exists")
        client = Host(name, ip)
        try:
            Cluster.plug(
                self.router, "ext0", f"ex{client.octet}", client, LAN_PREFIX, ROUTER_EXTERNAL_IP
            )
        except BaseException:
            client.delete()
            raise
        self.clients[name] = client
        return client

    def add_pod(self, node: str, name: str) -> Pod:
        """A pod on ``node``'s cbr0; its servers answer with ``name``, unique cluster-wide."""
        if name in self.pods:
            raise ValueError(f"pod {name!r} exists")
        owner = self.nodes[node]
        pod = Pod(name, owner.next_pod_ip())
        try:
            Cluster.plug(owner, BRIDGE, pod.host_veth, pod, 24, owner.gateway_ip, "hairpin", "on")
        except BaseException:
            pod.delete()
            raise
        self.pods[name] = owner.pods[name] = pod
        return pod

    def remove_pod(self, name: str) -> None:
        """Delete the pod's veth (synchronously, unlike namespace teardown), then the pod."""
        owner = self.node_of(name)
        pod = self.pods.pop(name)
        del owner.pods[name]
        ip_cmd(owner, "link", "delete", pod.host_veth)
        pod.delete()

    def node_of(self, pod: str) -> Node:
        return next(node for node in self.nodes.values() if pod in node.pods)

    def route_load_balancer(self, ip: str, nodes: Iterable[str] | None = None) -> None:
        """Route a load balancer IP from the router to these nodes (default: all), keeping
        the destination address, like a VIP-preserving cloud load balancer."""
        hops = [self.nodes[name].ip for name in (self.nodes if nodes is None else nodes)]
        if not hops:
            raise ValueError("a load balancer needs at least one node")
        nexthops = [word for hop in hops for word in ("nexthop", "via", hop)]
        ip_cmd(self.router, "route", "replace", f"{ip}/32", *nexthops)

    # --- API objects ----------------------------------------------------------------------

    def apply(self, kind: str, obj: Obj) -> Obj:
        """Create the object, or replace it if it exists (what ``kubectl apply`` amounts to)."""
        try:
            return self.api.create(kind, obj)
        except ApiError as err:
            if err.code != 409:
                raise
            return self.api.update(kind, obj)

    def endpoint(
        self,
        pod: str,
        *,
        ready: bool = True,
        serving: bool | None = None,
        terminating: bool = False,
        hinted: bool = False,
    ) -> Obj:
        """An EndpointSlice endpoint for a pod, with its node and zone as the controller fills
        them; ``hinted`` adds a hint for the pod's zone (what ``PreferClose`` leads to).
        ``serving`` defaults to ``ready``, as for a pod that is not terminating."""
        node = self.node_of(pod)
        conditions = {
            "ready": ready,
            "serving": ready if serving is None else serving,
            "terminating": terminating,
        }
        endpoint: Obj = {
            "addresses": [self.pods[pod].ip],
            "conditions": conditions,
            "nodeName": node.label,
            "zone": node.zone,
        }
        if hinted:
            endpoint["hints"] = {"forZones": [{"name": node.zone}]}
        return endpoint

    def set_endpoints(
        self, service_name: str, endpoints: Sequence[Obj], port: int, protocol: str = "TCP"
    ) -> None:
        """Write the Service's (single) EndpointSlice with these endpoints."""
        self.apply(
            "endpointslices", endpoint_slice(service_name, endpoints, port, protocol=protocol)
        )

    def set_zone(self, node: str, zone: str) -> None:
        """Relabel a Node's zone, as an operator (or a cloud's node controller) would."""
        self.api.patch("nodes", None, node, {"metadata": {"labels": {ZONE_LABEL: zone}}})
        self.nodes[node].zone = zone

    # --- agents ---------------------------------------------------------------------------

    def start_agents(self, *extra: str) -> None:
        """Start every node's agent (in parallel: they are separate processes)."""
        for name in self.nodes:
            self.start_agent(name, *extra)

    def start_agent(self, node: str, *extra: str) -> subprocess.Popen[bytes]:
        """``python -m pykubeproxy`` inside the node namespace; output in the node's log."""
        owner = self.nodes[node]
        argv = [
            sys.executable,
            "-m",
            "pykubeproxy",
            "--kubeconfig",
            str(self.kubeconfig),
            "--hostname-override",
            owner.label,
            "--cluster-cidr",
            CLUSTER_CIDR,
            "--proxy-mode",
            self.mode,
            "--iptables-min-sync-period",
            "100ms",
            *self.agent_args,
            *extra,
        ]
        with open(owner.log_path, "ab") as log:  # the child keeps its own descriptor
            owner.agent = owner.popen(argv, stdout=log, stderr=subprocess.STDOUT)
        return owner.agent

    def stop_agent(self, node: str, sig: int = signal.SIGTERM, timeout: float = 10.0) -> int:
        """Signal a node's agent and wait for it; returns its exit code."""
        owner = self.nodes[node]
        if owner.agent is None:
            raise RuntimeError(f"no agent runs on {node}")
        owner.agent.send_signal(sig)
        code = owner.agent.wait(timeout)
        owner.agent = None
        return code

    def rules(self, node: str) -> str:
        """The node's proxy state as text: iptables (and the IPVS table in ipvs mode)."""
        owner = self.nodes[node]
        text = str(owner.exec(["iptables-legacy-save"]).stdout)
        if self.mode == "ipvs":
            text += str(owner.exec(["ipvsadm", "-Ln"]).stdout)
        return text

    def metrics(self, node: str) -> dict[str, float]:
        """A node's agent's Prometheus samples, keyed by their exposition line name."""
        status, text = http_get(self.nodes[node], METRICS_URL)
        return lab.samples(text) if status == 200 else {}

    def healthz(self, node: str) -> tuple[int, Obj]:
        status, body = http_get(self.nodes[node], HEALTHZ_URL)
        return status, json.loads(body) if status else {}

    def wait_synced(self, timeout: float | None = None) -> None:
        """Return once every agent has applied all Services and EndpointSlices written so far.

        See the module docstring: a barrier object pair is bumped, and every node's ruleset
        must show the new barrier.
        """
        generation = self._write_barrier()
        service_rule = re.compile(
            rf"{re.escape(BARRIER_IP)}(?:/32 .*--dport |:){_barrier_port(generation)}\b"
        )
        endpoint_rule = re.compile(
            rf"{re.escape(BARRIER_ENDPOINT)}:{_barrier_target(generation)}\b"
        )
        shown = [service_rule, endpoint_rule]
        if self.mode == "ipvs":
            lb = rf"--vaddr {re.escape(BARRIER_LB_IP)}(?:/32)?\s"
            port = rf"--vport {_barrier_port(generation)}\s"
            shown.append(re.compile(rf"^-A KUBE-IPVS-OUT-FILTER (?=.*{lb})(?=.*{port})", re.M))
        waiting = set(self.nodes)

        def all_applied() -> bool:
            for name in sorted(waiting):
                rules = self.rules(name)
                if all(pattern.search(rules) for pattern in shown):
                    waiting.discard(name)
            return not waiting

        self.wait_for(
            f"the agents to apply every change (barrier {generation}; waiting for {waiting})",
            all_applied,
            timeout,
        )

    def _write_barrier(self) -> int:
        self._barrier += 1
        generation = self._barrier
        ipvs_lb: Obj = {}
        if self.mode == "ipvs":
            ipvs_lb = {
                "load_balancer_ip": BARRIER_LB_IP,
                "loadBalancerSourceRanges": [BARRIER_SOURCE_RANGE],
            }
        barrier = service(
            BARRIER_NAME,
            BARRIER_IP,
            port=_barrier_port(generation),
            target_port=_barrier_target(generation),
            **ipvs_lb,
        )
        self.apply("services", barrier)
        endpoint = {"addresses": [BARRIER_ENDPOINT], "conditions": {"ready": True}}
        self.set_endpoints(BARRIER_NAME, [endpoint], _barrier_target(generation))
        return generation

    def wait_for(
        self, what: str, predicate: Callable[[], bool], timeout: float | None = None
    ) -> None:
        """Poll ``predicate`` until true; fail with every agent's log tail if it never is, or
        at once if an agent has exited."""
        deadline = time.monotonic() + (self.sync_timeout if timeout is None else timeout)
        while time.monotonic() < deadline:
            if predicate():
                return
            dead = [n.label for n in self.nodes.values() if n.agent and n.agent.poll() is not None]
            if dead:
                raise AssertionError(
                    f"agent exited on {dead} while waiting for {what}\n" + self.log_tails()
                )
            time.sleep(0.1)
        raise AssertionError(f"timed out waiting for {what}\n{self.log_tails()}")

    def converge(
        self, what: str, observe: Callable[[], object], want: object, timeout: float | None = None
    ) -> None:
        """Poll ``observe()`` (e.g. the set of backends a client reaches) until it equals
        ``want``; a failure shows the last observation. Errors such as a refused or timed-out
        connection count as "not yet"."""
        last: list[object] = [None]

        def matches() -> bool:
            try:
                last[0] = observe()
            except OSError as err:
                last[0] = f"{type(err).__name__}: {err}"
            return last[0] == want

        try:
            self.wait_for(what, matches, timeout)
        except AssertionError as err:
            raise AssertionError(f"last saw {last[0]!r}, wanted {want!r}; {err}") from None

    def log_tails(self, lines: int = 20) -> str:
        return "\n".join(
            f"--- {node.label} agent log (last {lines} lines):\n"
            + "\n".join(node.log().splitlines()[-lines:])
            for node in self.nodes.values()
        )

    # --- traffic --------------------------------------------------------------------------

    def request(
        self, src: NetNS, ip: str, port: int, *, udp: bool = False, timeout: float = 2.0
    ) -> Reply:
        """One request from ``src``; which pod answered and the source address it saw.

        The source is the pod server's newest record of a peer since the request started,
        so do not run other traffic to the same pods at the same time.
        """
        before = {name: len(pod.seen_sources) for name, pod in self.pods.items()}
        send = src.udp_request if udp else src.tcp_request
        answer = send(ip, port, timeout)
        pod = self.pods.get(answer)
        if pod is None:
            raise AssertionError(f"{ip}:{port} answered {answer!r}, which is no pod")
        proto = "udp" if udp else "tcp"
        seen = [s for s in pod.seen_sources[before.get(answer, 0) :] if s.proto == proto]
        if not seen:
            raise AssertionError(f"{answer} answered but recorded no {proto} peer")
        return Reply(answer, seen[-1].src_ip)

    def replies(
        self, src: NetNS, ip: str, port: int, n: int = 30, *, udp: bool = False
    ) -> list[Reply]:
        """``n`` requests in a row (new connections or, for UDP, new sockets each)."""
        return [self.request(src, ip, port, udp=udp) for _ in range(n)]

    def backends(self, src: NetNS, ip: str, port: int, n: int = 30) -> set[str]:
        """The set of pods that answered ``n`` TCP connections."""
        return {reply.backend for reply in self.replies(src, ip, port, n)}

    @staticmethod
    def probe(src: NetNS, ip: str, port: int, timeout: float = DROP_TIMEOUT) -> str:
        """One TCP request: the answering pod's name, REFUSED or TIMEOUT.

        REFUSED (an ICMP port unreachable or a RST, at once) is what a REJECT rule causes;
        TIMEOUT (nothing within ``timeout``) is what a DROP rule causes.
        """
        try:
            return src.tcp_request(ip, port, timeout)
        except ConnectionRefusedError:
            return REFUSED
        except TrafficTimeout:
            return TIMEOUT
        except OSError as err:
            return f"{type(err).__name__}: {err}"

    # --- teardown -------------------------------------------------------------------------

    def namespaces(self) -> list[NetNS]:
        """Everything this cluster created, leaves first."""
        found: list[NetNS | None] = [*self.pods.values(), *self.clients.values()]
        found += [*self.nodes.values(), self._router]
        return [ns for ns in found if ns is not None]

    def close(self) -> None:
        """Kill the agents, stop the API double, delete every namespace; safe to repeat."""
        try:
            for node in self.nodes.values():
                if node.agent is not None and node.agent.poll() is None:
                    with contextlib.suppress(OSError, subprocess.SubprocessError):
                        self.stop_agent(node.label, signal.SIGKILL)
            if self._api is not None:
                self._api.stop()
        finally:
            for ns in self.namespaces():
                ns.delete()
            self.pods.clear()
            self.clients.clear()
            self.nodes.clear()
            self._router = self._api = None
            self._tmp.cleanup()


def _barrier_port(generation: int) -> int:
    return 1000 + generation


def _barrier_target(generation: int) -> int:
    return 20000 + generation
