"""Service behaviours that need more than one node, proven by what backends actually see.

Three nodes (node-1 and node-2 in zone-a, node-3 in zone-b), each running the real agent
against one API double, pods that answer with their names and record their peers, and two
clients on an external network behind a router (see pykubeproxy/sandbox/multinode.py).
Each case starts with one pod ``web-N`` (serving on TARGET) and one pod ``cli-N`` (a client)
on every node N, and no ``web`` Service; the case plays the Service's user and the
EndpointSlice controller. :class:`ThreeNodeCases` holds the cases; a test module subclasses
it and provides the ``mc`` fixture in its proxy mode (tests/e2e/test_three_nodes.py for
iptables mode, tests/ipvs/test_three_nodes_ipvs.py for IPVS mode, inside the VM).

The expected outcomes are upstream kube-proxy's. iptables mode:

* pkg/proxy/iptables/proxier.go, syncProxyRules: external traffic (node ports, load
  balancer and external IPs) is masqueraded under the Cluster policy and keeps the client's
  address under the Local policy. With Local, traffic from pods (the cluster CIDR) and from
  the node itself skips the policy and goes to all endpoints, as if it had left for the load
  balancer and come back; the node's own traffic is masqueraded, a pod's is not. A Service
  without any usable endpoint gets REJECT rules; a Local policy without local endpoints
  gets DROP rules instead, so clients time out. Load balancer IPs with source ranges only
  accept those sources (the rest is dropped); node ports are never subject to them.
* pkg/proxy/topology.go, CategorizeEndpoints: only ready endpoints serve, unless none is
  ready, then serving-and-terminating ones do; zone hints are followed when every ready
  endpoint has one and one of them names the node's zone (from its Node label).
* pkg/proxy/healthcheck/service_health.go: the health check node port answers 200 while the
  node has local ready endpoints, 503 otherwise, with a JSON body naming the Service and the
  count.

IPVS mode (pkg/proxy/ipvs/proxier.go, docs/kube-proxy-ipvs-facts.md) is the same except:

* No REJECT or DROP rules. A Service without endpoints keeps its virtual servers without
  real servers, and IPVS itself refuses connections (ICMP port unreachable): refused at
  once, as with REJECT.
* A Local policy without local endpoints falls back to the endpoints the Service uses
  cluster-wide (syncEndpoint, upstream PR 97081); a Service that accepts outside traffic
  uses them all, a ClusterIP-only one with internalTrafficPolicy Local none, so its virtual
  server has no real server and refuses. Pods thus reach the remote endpoints, unmasqueraded;
  an outside client's connection is forwarded to one too, keeping the client's address, and
  the endpoint's reply goes back by its own node, never completing the connection: the
  client times out, as with DROP.
* A node's own connection to a Local load balancer IP is neither short-circuited nor
  masqueraded (KUBE-LOAD-BALANCER-LOCAL returns before KUBE-MARK-MASQ): it leaves from the LB
  IP itself, bound on kube-ipvs0, so only a local endpoint can answer it; a remote
  endpoint's reply stays on that endpoint's node, which binds the LB IP too.
"""

from __future__ import annotations

import json
import threading
import time
from functools import partial
from typing import Any, TypeVar

from pykubeproxy.sandbox.multinode import (
    REFUSED,
    TIMEOUT,
    MultiNodeCluster,
    Node,
    Reply,
    http_get,
    service,
)
from pykubeproxy.sandbox.netns import Host, NetNS, ip_cmd

WEB, WEB_IP, PORT, TARGET, NODE_PORT = "web", "10.96.0.10", 80, 8080, 30080
LB_IP = "203.0.113.10"
HEALTH_PORT = 32100
ALLOWED = "198.19.0.0/25"  # holds ext-a (198.19.0.10), not ext-b (198.19.0.200)
EVERY_WEB = {"web-1", "web-2", "web-3"}
LAST_SYNC = "kubeproxy_sync_proxy_rules_last_timestamp_seconds"
SERVICE_NAME_LABEL = "kubernetes.io/service-name"

_T = TypeVar("_T")


def populate(mc: MultiNodeCluster) -> None:
    """Add whichever of the pods every case starts with is missing: ``web-N`` serving on
    TARGET and the client ``cli-N`` on each node N (a new pod gets a new IP)."""
    for node in mc.nodes.values():
        if f"web-{node.index}" not in mc.pods:
            mc.add_pod(node.label, f"web-{node.index}").serve_tcp(TARGET)
        if f"cli-{node.index}" not in mc.pods:
            mc.add_pod(node.label, f"cli-{node.index}")


def reset(mc: MultiNodeCluster) -> None:
    """Make a cluster whose agents keep running look as :func:`populate` left it: no web
    Service or slice, only the starting pods, the Nodes' own zones, no load balancer route.
    The next case's first sync wait covers the agents' side."""
    for obj in mc.api.list("services", "default"):
        if obj["metadata"]["name"] == WEB:
            mc.api.delete("services", "default", WEB)
    for obj in mc.api.list("endpointslices", "default"):
        if obj["metadata"].get("labels", {}).get(SERVICE_NAME_LABEL) == WEB:
            mc.api.delete("endpointslices", "default", obj["metadata"]["name"])
    starting = {f"{kind}-{node.index}" for node in mc.nodes.values() for kind in ("web", "cli")}
    for name in sorted(set(mc.pods) - starting):
        mc.remove_pod(name)
    populate(mc)
    for spec in mc.node_specs:
        if mc.nodes[spec.name].zone != spec.zone:
            mc.set_zone(spec.name, spec.zone)
    ip_cmd(mc.router, "route", "flush", "exact", f"{LB_IP}/32")


def per_mode(mc: MultiNodeCluster, *, iptables: _T, ipvs: _T) -> _T:
    """Upstream's outcome in the cluster's proxy mode, where the two modes differ."""
    return {"iptables": iptables, "ipvs": ipvs}[mc.mode]


def ready(mc: MultiNodeCluster, *pods: str) -> list[dict[str, Any]]:
    return [mc.endpoint(pod) for pod in pods]


def web(mc: MultiNodeCluster, endpoints: list[dict[str, Any]], **spec: Any) -> None:
    """Write the web Service and its slice, then wait until every agent has applied them."""
    mc.apply("services", service(WEB, WEB_IP, port=PORT, target_port=TARGET, **spec))
    mc.set_endpoints(WEB, endpoints, TARGET)
    mc.wait_synced()


def backends(replies: list[Reply]) -> set[str]:
    return {reply.backend for reply in replies}


def sources(replies: list[Reply]) -> set[str]:
    return {reply.source for reply in replies}


def masqueraded_source(mc: MultiNodeCluster, entry: Node, backend: str) -> str:
    """The address MASQUERADE picks on ``entry``: the interface toward the backend's pod."""
    return entry.gateway_ip if mc.node_of(backend) is entry else entry.ip


def health_check(client: NetNS, node: Node) -> tuple[int, dict[str, Any] | str]:
    status, body = http_get(client, f"http://{node.ip}:{HEALTH_PORT}/", timeout=2.0)
    try:
        return status, json.loads(body)
    except ValueError:
        return status, body


def ipvs_forwarded(node: Node, client: Host, port: int) -> set[str]:
    """Where ``node``'s IPVS sent ``client``'s unanswered connections to its node port: the
    real servers of its half-open (SYN_RECV) entries in ``ipvsadm -Lnc``."""
    found = set()
    for line in str(node.exec(["ipvsadm", "-Lnc"]).stdout).splitlines():
        match line.split():  # protocol, expiry, state, source, virtual, real server
            case [_, _, "SYN_RECV", source, virtual, real] if (
                source.startswith(f"{client.ip}:") and virtual == f"{node.ip}:{port}"
            ):
                found.add(real.rpartition(":")[0])
    return found


class ThreeNodeCases:
    """The cases. A subclass named ``Test...`` runs them; its module provides ``mc``."""

    def test_cluster_ip_and_node_port_reach_pods_on_every_node(self, mc: MultiNodeCluster) -> None:
        web(mc, ready(mc, "web-1", "web-2", "web-3"), node_port=NODE_PORT)
        # One agent per node, each syncing on its own (the metric is set just after the commit).
        mc.wait_for(
            "every agent's last-sync metric",
            lambda: all(mc.metrics(name).get(LAST_SYNC, 0) > 0 for name in mc.nodes),
        )
        assert {mc.healthz(name)[0] for name in mc.nodes} == {200}
        pod = mc.pods["cli-1"]
        from_pod = mc.replies(pod, WEB_IP, PORT)
        assert backends(from_pod) == EVERY_WEB
        assert sources(from_pod) == {pod.ip}  # pod to pod, even across nodes: never SNAT
        client = mc.clients["ext-a"]
        for node in mc.nodes.values():
            replies = mc.replies(client, node.ip, NODE_PORT)
            assert backends(replies) == EVERY_WEB, node.label
            for reply in replies:  # Cluster policy: masqueraded on the node the client chose
                assert reply.source == masqueraded_source(mc, node, reply.backend), reply

    def test_external_local_node_port_keeps_the_client_address(self, mc: MultiNodeCluster) -> None:
        web(mc, ready(mc, "web-1", "web-2"), node_port=NODE_PORT, externalTrafficPolicy="Local")
        client = mc.clients["ext-a"]
        for node, local in (("node-1", "web-1"), ("node-2", "web-2")):
            replies = mc.replies(client, mc.nodes[node].ip, NODE_PORT, 15)
            assert set(replies) == {Reply(local, client.ip)}, node

    def test_external_local_node_port_without_local_endpoints_times_out(
        self, mc: MultiNodeCluster
    ) -> None:
        web(mc, ready(mc, "web-1", "web-2"), node_port=NODE_PORT, externalTrafficPolicy="Local")
        client, node = mc.clients["ext-a"], mc.nodes["node-3"]
        assert mc.probe(client, node.ip, NODE_PORT) == TIMEOUT
        if mc.mode == "ipvs":  # not dropped: sent on to a remote endpoint (see the docstring)
            remote = {mc.pods["web-1"].ip, mc.pods["web-2"].ip}
            forwarded = ipvs_forwarded(node, client, NODE_PORT)
            assert forwarded and forwarded <= remote, forwarded

    def test_pods_and_nodes_reach_external_local_services_cluster_wide(
        self, mc: MultiNodeCluster
    ) -> None:
        web(
            mc,
            ready(mc, "web-1", "web-2"),
            node_port=NODE_PORT,
            load_balancer_ip=LB_IP,
            externalTrafficPolicy="Local",
            healthCheckNodePort=HEALTH_PORT,
        )
        node = mc.nodes["node-3"]  # no local endpoint here
        pod = mc.pods["cli-3"]
        for ip, port in ((node.ip, NODE_PORT), (LB_IP, PORT)):
            replies = mc.replies(pod, ip, port)
            assert backends(replies) == {"web-1", "web-2"}, ip
            assert sources(replies) == {pod.ip}, ip  # every endpoint, not masqueraded
        if mc.mode == "ipvs":  # the node sends from the LB IP (see the docstring)
            assert mc.probe(node, LB_IP, PORT) == TIMEOUT
            replies = mc.replies(mc.nodes["node-1"], LB_IP, PORT, 10)
            assert set(replies) == {Reply("web-1", LB_IP)}
        else:
            replies = mc.replies(node, LB_IP, PORT)
            assert backends(replies) == {"web-1", "web-2"}
            assert sources(replies) == {node.ip}  # the node's own traffic is masqueraded

    def test_health_check_node_port_reports_local_endpoints(self, mc: MultiNodeCluster) -> None:
        mc.add_pod("node-1", "web-1b").serve_tcp(TARGET)
        web(
            mc,
            ready(mc, "web-1", "web-1b", "web-2"),
            node_port=NODE_PORT,
            load_balancer_ip=LB_IP,
            externalTrafficPolicy="Local",
            healthCheckNodePort=HEALTH_PORT,
        )
        client = mc.clients["ext-a"]

        def answer(count: int) -> tuple[int, dict[str, Any]]:
            body = {
                "service": {"namespace": "default", "name": WEB},
                "localEndpoints": count,
                "serviceProxyHealthy": True,
            }
            return (200 if count else 503), body

        want = {"node-1": answer(2), "node-2": answer(1), "node-3": answer(0)}
        mc.converge(
            "the health check node ports",
            lambda: {name: health_check(client, node) for name, node in mc.nodes.items()},
            want,
        )
        # A load balancer sends only to the nodes that pass; they keep the client's address.
        mc.route_load_balancer(LB_IP, ["node-1", "node-2"])
        for name in ("ext-a", "ext-b"):
            outside = mc.clients[name]
            replies = mc.replies(outside, LB_IP, PORT, 15)
            assert sources(replies) == {outside.ip}, name
            entered = {mc.node_of(reply.backend).label for reply in replies}
            assert len(entered) == 1, (name, replies)  # the router hashes a client to one node

    def test_internal_local_reaches_only_this_nodes_endpoints(self, mc: MultiNodeCluster) -> None:
        web(mc, ready(mc, "web-1", "web-2"), internalTrafficPolicy="Local")
        pod = mc.pods["cli-1"]
        replies = mc.replies(pod, WEB_IP, PORT)
        assert set(replies) == {Reply("web-1", pod.ip)}
        assert mc.backends(mc.pods["cli-2"], WEB_IP, PORT) == {"web-2"}
        # IPVS: a virtual server without real servers (see the docstring), not a DROP rule.
        nowhere = per_mode(mc, iptables=TIMEOUT, ipvs=REFUSED)
        assert mc.probe(mc.pods["cli-3"], WEB_IP, PORT) == nowhere

    def test_serving_terminating_endpoints_get_traffic_when_none_is_ready(
        self, mc: MultiNodeCluster
    ) -> None:
        def terminating(serving: bool) -> list[dict[str, Any]]:
            return [
                mc.endpoint(pod, ready=False, serving=serving, terminating=True)
                for pod in sorted(EVERY_WEB)
            ]

        web(mc, terminating(serving=True), node_port=NODE_PORT)
        assert mc.backends(mc.pods["cli-1"], WEB_IP, PORT) == EVERY_WEB
        assert mc.backends(mc.clients["ext-a"], mc.nodes["node-2"].ip, NODE_PORT) == EVERY_WEB
        mc.set_endpoints(WEB, terminating(serving=False), TARGET)
        mc.wait_synced()
        assert mc.probe(mc.pods["cli-1"], WEB_IP, PORT) == REFUSED  # nothing serves any more

    def test_rolling_update_never_fails_a_connection(self, mc: MultiNodeCluster) -> None:
        old, new = sorted(EVERY_WEB), ["new-1", "new-2", "new-3"]
        for name in new:
            mc.add_pod(f"node-{name[-1]}", name).serve_tcp(TARGET)
        web(mc, ready(mc, *old), node_port=NODE_PORT)
        failures: list[str] = []
        answered: list[str] = []
        stop = threading.Event()

        def keep_connecting(src: NetNS, ip: str, port: int) -> None:
            while not stop.is_set():
                try:
                    answered.append(src.tcp_request(ip, port, timeout=1.0))
                except OSError as err:
                    failures.append(f"{src.label} -> {ip}:{port}: {err!r}")
                time.sleep(0.01)

        clients = [
            threading.Thread(target=keep_connecting, args=args, daemon=True)
            for args in (
                (mc.pods["cli-1"], WEB_IP, PORT),
                (mc.clients["ext-a"], mc.nodes["node-2"].ip, NODE_PORT),
            )
        ]
        for thread in clients:
            thread.start()
        slice_now = {pod: mc.endpoint(pod) for pod in old}

        def publish() -> None:
            mc.set_endpoints(WEB, list(slice_now.values()), TARGET)
            mc.wait_synced()

        try:
            for old_pod, new_pod in zip(old, new, strict=True):
                slice_now[new_pod] = mc.endpoint(new_pod)  # surge: the new pod is ready
                publish()
                slice_now[old_pod] = mc.endpoint(
                    old_pod, ready=False, serving=True, terminating=True
                )
                publish()
                del slice_now[old_pod]
                publish()
                mc.remove_pod(old_pod)  # its grace period is over
        finally:
            stop.set()
            for thread in clients:
                thread.join(5)
        assert failures == []
        assert len(answered) > 50 and set(answered) <= EVERY_WEB | set(new)
        assert mc.backends(mc.pods["cli-1"], WEB_IP, PORT) == set(new)

    def test_zone_hints_keep_traffic_in_the_zone(self, mc: MultiNodeCluster) -> None:
        hinted = [mc.endpoint(pod, hinted=True) for pod in sorted(EVERY_WEB)]
        web(mc, hinted, node_port=NODE_PORT, trafficDistribution="PreferClose")
        zone_a = {"web-1", "web-2"}
        # An agent learns its zone from its Node, which it may see after its first sync (as
        # upstream's may): wait for each node's traffic to settle before asserting.
        for pod, zone in (("cli-1", zone_a), ("cli-2", zone_a), ("cli-3", {"web-3"})):
            reached = partial(mc.backends, mc.pods[pod], WEB_IP, PORT)
            mc.converge(f"{pod} to reach only its zone", reached, zone)
        assert mc.backends(mc.clients["ext-a"], mc.nodes["node-3"].ip, NODE_PORT) == {"web-3"}

        mc.set_zone("node-1", "zone-b")
        mc.converge(
            "node-1 to follow its new zone label",
            partial(mc.backends, mc.pods["cli-1"], WEB_IP, PORT),
            {"web-3"},
        )
        assert mc.backends(mc.pods["cli-2"], WEB_IP, PORT) == zone_a

        # One ready endpoint without a hint: hints are ignored, every endpoint serves.
        mc.set_endpoints(WEB, [*hinted[:2], mc.endpoint("web-3")], TARGET)
        mc.wait_synced()
        assert mc.backends(mc.pods["cli-2"], WEB_IP, PORT) == EVERY_WEB

    def test_load_balancer_source_ranges_admit_only_their_clients(
        self, mc: MultiNodeCluster
    ) -> None:
        web(
            mc,
            ready(mc, "web-1", "web-2", "web-3"),
            node_port=NODE_PORT,
            load_balancer_ip=LB_IP,
            loadBalancerSourceRanges=[ALLOWED],
        )
        mc.route_load_balancer(LB_IP)
        inside, outside = mc.clients["ext-a"], mc.clients["ext-b"]
        assert mc.probe(inside, LB_IP, PORT) in EVERY_WEB
        assert mc.probe(outside, LB_IP, PORT) == TIMEOUT
        for node in mc.nodes.values():  # node ports ignore the source ranges
            assert mc.probe(outside, node.ip, NODE_PORT) in EVERY_WEB, node.label

    def test_session_affinity_sticks_each_client_to_one_backend(self, mc: MultiNodeCluster) -> None:
        web(
            mc,
            ready(mc, "web-1", "web-2", "web-3"),
            node_port=NODE_PORT,
            sessionAffinity="ClientIP",
            sessionAffinityConfig={"clientIP": {"timeoutSeconds": 60}},
        )
        node_2 = mc.nodes["node-2"].ip
        for src, ip, port in (
            (mc.pods["cli-1"], WEB_IP, PORT),
            (mc.pods["cli-3"], WEB_IP, PORT),
            (mc.clients["ext-a"], node_2, NODE_PORT),
            (mc.clients["ext-b"], node_2, NODE_PORT),
        ):
            assert len(mc.backends(src, ip, port, 15)) == 1, (src.label, ip)

    def test_no_endpoints_is_rejected_at_once(self, mc: MultiNodeCluster) -> None:
        web(mc, [], node_port=NODE_PORT)
        for src, ip, port in (
            (mc.pods["cli-1"], WEB_IP, PORT),
            (mc.clients["ext-a"], mc.nodes["node-3"].ip, NODE_PORT),
        ):
            started = time.monotonic()
            assert mc.probe(src, ip, port) == REFUSED, (src.label, ip)
            assert time.monotonic() - started < 0.5

    def test_no_local_endpoints_is_not_no_endpoints(self, mc: MultiNodeCluster) -> None:
        web(
            mc,
            ready(mc, "web-1"),
            node_port=NODE_PORT,
            externalTrafficPolicy="Local",
            internalTrafficPolicy="Local",
        )
        to_node_port = (mc.clients["ext-a"], mc.nodes["node-3"].ip, NODE_PORT)
        to_cluster_ip = (mc.pods["cli-3"], WEB_IP, PORT)
        # IPVS: no DROP; both fall back to web-1, which the pod reaches (see the docstring).
        no_local = per_mode(mc, iptables=[TIMEOUT, TIMEOUT], ipvs=[TIMEOUT, "web-1"])
        assert [mc.probe(*to) for to in (to_node_port, to_cluster_ip)] == no_local
        mc.set_endpoints(WEB, [], TARGET)
        mc.wait_synced()
        assert [mc.probe(*to) for to in (to_node_port, to_cluster_ip)] == [REFUSED, REFUSED]
