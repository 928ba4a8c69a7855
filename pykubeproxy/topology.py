"""Which endpoints of a Service port this node sends traffic to (pure).

The rules follow upstream kube-proxy's `CategorizeEndpoints` (pkg/proxy/topology.go):

- Cluster traffic policy uses the ready endpoints, narrowed by topology hints when
  every ready endpoint carries one kind of hint and at least one is meant for this
  node (node hints first, then zone hints against the Node's
  ``topology.kubernetes.io/zone`` label); otherwise hints are ignored.
- Local traffic policy uses this node's ready endpoints.
- Each set falls back, on its own, to serving-and-terminating endpoints when it has
  no ready one, so a rolling update never leaves a window with no backend.
- Endpoints that are neither ready nor serving-and-terminating never get traffic.

`spec.trafficDistribution` (PreferClose, PreferSameZone, PreferSameNode) reaches a
proxy only through these hints: the EndpointSlice controller writes them, and
kube-proxy reads the hints, not the Service field.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from enum import Enum

from pykubeproxy.model import Endpoint, EndpointsMap, IPAddress, NamespacedName, ServicePort


class TopologyMode(Enum):
    ANY = ""
    SAME_NODE = "PreferSameNode"
    SAME_ZONE = "PreferSameZone"


@dataclass(frozen=True)
class Categorized:
    """The endpoint sets one Service port uses on this node.

    `reachable` is every endpoint some rule of this node may send to (the endpoint
    chains to create); `has_any` says whether the Service has a usable endpoint
    anywhere in the cluster, even when none is reachable from here.
    """

    cluster: tuple[Endpoint, ...]
    local: tuple[Endpoint, ...]
    reachable: tuple[Endpoint, ...]
    has_any: bool


def topology_mode(endpoints: tuple[Endpoint, ...], node_name: str, zone: str) -> TopologyMode:
    """Which hints apply: all ready endpoints must carry them, one must be for us."""
    ready = [ep for ep in endpoints if ep.ready]
    if not ready:
        return TopologyMode.ANY
    if all(ep.node_hints for ep in ready) and any(node_name in ep.node_hints for ep in ready):
        return TopologyMode.SAME_NODE
    if all(ep.zone_hints for ep in ready) and any(zone in ep.zone_hints for ep in ready):
        return TopologyMode.SAME_ZONE
    return TopologyMode.ANY


def _for_topology(ep: Endpoint, mode: TopologyMode, node_name: str, zone: str) -> bool:
    if mode is TopologyMode.SAME_NODE:
        return node_name in ep.node_hints
    if mode is TopologyMode.SAME_ZONE:
        return zone in ep.zone_hints
    return True


Endpoints = tuple[Endpoint, ...]


def _pick(endpoints: Endpoints, keep: Callable[[Endpoint], bool]) -> Endpoints:
    return tuple(ep for ep in endpoints if keep(ep))


def categorize(
    endpoints: tuple[Endpoint, ...], svc: ServicePort, node_name: str, zone: str = ""
) -> Categorized:
    """Split a port's endpoints into the cluster-wide and node-local sets it uses."""

    def is_local(ep: Endpoint) -> bool:
        return bool(node_name) and ep.node_name == node_name

    cluster: tuple[Endpoint, ...] = ()
    mode = TopologyMode.ANY
    if svc.uses_cluster_endpoints:
        mode = topology_mode(endpoints, node_name, zone)
        cluster = _pick(endpoints, lambda ep: ep.ready and _for_topology(ep, mode, node_name, zone))
        if not cluster:
            cluster = _pick(endpoints, lambda ep: ep.serving_terminating)
    if not svc.uses_local_endpoints:
        return Categorized(cluster, (), cluster, bool(cluster))

    has_any = bool(cluster) or any(ep.ready or ep.serving_terminating for ep in endpoints)
    local = _pick(endpoints, lambda ep: is_local(ep) and ep.ready)
    local_terminating = not local
    if not local:
        local = _pick(endpoints, lambda ep: is_local(ep) and ep.serving_terminating)
    if not svc.uses_cluster_endpoints:
        return Categorized((), local, local, has_any)
    if mode is TopologyMode.ANY and not local_terminating:
        # Every ready endpoint is in `cluster`, so the local ready ones are too.
        return Categorized(cluster, local, cluster, has_any)
    merged = {ep.address: ep for ep in (*cluster, *local)}
    reachable = tuple(merged[address] for address in sorted(merged))
    return Categorized(cluster, local, reachable, has_any)


def local_ready_endpoints(endpoints: EndpointsMap, node_name: str) -> dict[NamespacedName, int]:
    """Per Service, how many distinct ready endpoint IPs run on this node.

    What the health-check node ports report (upstream's LocalReadyEndpoints): an IP
    serving two ports counts once, and terminating endpoints do not count, so a node
    whose pods are all shutting down fails its load balancer's health check.
    """
    ips: dict[NamespacedName, set[IPAddress]] = {}
    for name, eps in endpoints.items():
        for ep in eps:
            if ep.ready and node_name and ep.node_name == node_name:
                ips.setdefault(name.service, set()).add(ep.ip)
    return {service: len(found) for service, found in ips.items()}
