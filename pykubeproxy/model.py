"""The typed model every backend works from.

Raw API objects are translated into these frozen values once, at the edge
(`convert`), so that the change trackers, the renderers and the tests deal only
with validated, hashable data. The shape mirrors kube-proxy's: a Service is
split into one `ServicePort` per port, keyed by `ServicePortName`
(``ns/name:port``), and its endpoints are the merged EndpointSlices of that
Service, filtered to the port.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from functools import cached_property
from ipaddress import IPv4Address, IPv4Network, IPv6Address, IPv6Network

IPAddress = IPv4Address | IPv6Address
IPNetwork = IPv4Network | IPv6Network


class Protocol(enum.StrEnum):
    """Service protocols; the value is the lowercase form iptables takes."""

    TCP = "tcp"
    UDP = "udp"
    SCTP = "sctp"


@dataclass(frozen=True, order=True)
class NamespacedName:
    namespace: str
    name: str

    def __str__(self) -> str:
        return self.text

    @cached_property
    def text(self) -> str:
        """``namespace/name``, made once: rule comments and chain hashes use it often."""
        return f"{self.namespace}/{self.name}"


@dataclass(frozen=True, order=True)
class ServicePortName:
    """kube-proxy's ServicePortName: the string form is hashed into chain names."""

    service: NamespacedName
    port: str
    protocol: Protocol

    def __str__(self) -> str:
        return self.text

    @cached_property
    def text(self) -> str:
        """``namespace/name:port``, made once: rule comments and chain hashes use it often."""
        if self.port:
            return f"{self.service}:{self.port}"
        return str(self.service)


@dataclass(frozen=True)
class ServicePort:
    """One port of one Service, with everything the rules need to know."""

    name: ServicePortName
    cluster_ip: IPAddress
    port: int
    node_port: int = 0
    external_ips: tuple[IPAddress, ...] = ()
    load_balancer_ips: tuple[IPAddress, ...] = ()
    load_balancer_source_ranges: tuple[IPNetwork, ...] = ()
    session_affinity_seconds: int | None = None
    external_policy_local: bool = False
    internal_policy_local: bool = False
    health_check_node_port: int = 0

    @property
    def protocol(self) -> Protocol:
        return self.name.protocol

    @property
    def externally_accessible(self) -> bool:
        return bool(self.node_port or self.external_ips or self.load_balancer_ips)

    @property
    def uses_cluster_endpoints(self) -> bool:
        """Some traffic to this port may go to any node's endpoints: a Cluster policy, or
        any external access (with a Local external policy, traffic from pods and from
        the node to external addresses is still short-circuited to all endpoints)."""
        return not self.internal_policy_local or self.externally_accessible

    @property
    def uses_local_endpoints(self) -> bool:
        """Some traffic to this port may only go to this node's endpoints."""
        return self.internal_policy_local or (
            self.external_policy_local and self.externally_accessible
        )


@dataclass(frozen=True, order=True, slots=True)
class Endpoint:
    """One backend address of a ServicePort, with the EndpointSlice conditions.

    Slotted: a large cluster holds a few hundred thousand of these (each slice's
    and each Service port's), and an instance dict would double their memory.
    """

    ip: IPAddress
    port: int
    ready: bool = True
    serving: bool = True
    terminating: bool = False
    node_name: str | None = None
    # Topology hints of the EndpointSlice controller (hints.forZones / hints.forNodes).
    zone_hints: frozenset[str] = frozenset()
    node_hints: frozenset[str] = frozenset()
    # The address as rules write it: made once, used by every sync.
    ip_text: str = field(init=False, compare=False, repr=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "ip_text", str(self.ip))

    @property
    def address(self) -> str:
        """``ip:port`` as kube-proxy writes it (IPv6 in brackets)."""
        if isinstance(self.ip, IPv6Address):
            return f"[{self.ip_text}]:{self.port}"
        return f"{self.ip_text}:{self.port}"

    def with_port(self, port: int) -> Endpoint:
        """This endpoint on one of its slice's ports (faster than dataclasses.replace)."""
        return Endpoint(
            self.ip,
            port,
            self.ready,
            self.serving,
            self.terminating,
            self.node_name,
            self.zone_hints,
            self.node_hints,
        )

    @property
    def serving_terminating(self) -> bool:
        """Terminating but still answering: the fallback when nothing is ready."""
        return self.serving and self.terminating


@dataclass(frozen=True)
class NodeFacts:
    """What the rules need to know about this node; may change while the agent runs."""

    name: str = ""
    zone: str = ""
    # The node's primary IP: a source range that holds it also admits the LB IPs as source.
    ip: IPAddress | None = None
    # None: NodePorts on every local address (addrtype LOCAL); else these node IPs only.
    nodeport_ips: tuple[IPAddress, ...] | None = None


ServicePortMap = dict[ServicePortName, ServicePort]
EndpointsMap = dict[ServicePortName, tuple[Endpoint, ...]]
