"""The desired IPVS-mode state as plain data: what the IPVS applier makes true.

Rendered from the model by `ipvs/render.py`; applied by `ipvs/applier.py`
(pyroute2: IPVS, the kube-ipvs0 dummy device, ipsets). The iptables half of
IPVS mode is ordinary `TableState` data for the iptables applier.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from pykubeproxy.model import IPAddress, Protocol

DUMMY_DEVICE = "kube-ipvs0"


@dataclass(frozen=True)
class IpsetSpec:
    """One of kube-proxy's ipsets: name, type, create options and comment."""

    name: str
    type: str
    comment: str

    def create_args(self) -> list[str]:
        """`ipset create` arguments after the name and type, as kube-proxy passes them."""
        if self.type == "bitmap:port":
            return ["range", "0-65535"]
        return ["family", "inet", "hashsize", "1024", "maxelem", "65536"]


def _set(name: str, type_: str, comment: str) -> IpsetSpec:
    return IpsetSpec(name, type_, comment)


# kube-proxy's ipsetInfo, in its order (also the order they are destroyed in).
LOOP_BACK = _set(
    "KUBE-LOOP-BACK",
    "hash:ip,port,ip",
    "Kubernetes endpoints dst ip:port, source ip for solving hairpin purpose",
)
CLUSTER_IP = _set(
    "KUBE-CLUSTER-IP", "hash:ip,port", "Kubernetes service cluster ip + port for masquerade purpose"
)
EXTERNAL_IP = _set(
    "KUBE-EXTERNAL-IP",
    "hash:ip,port",
    "Kubernetes service external ip + port for masquerade and filter purpose",
)
EXTERNAL_IP_LOCAL = _set(
    "KUBE-EXTERNAL-IP-LOCAL",
    "hash:ip,port",
    "Kubernetes service external ip + port with externalTrafficPolicy=local",
)
LOAD_BALANCER = _set("KUBE-LOAD-BALANCER", "hash:ip,port", "Kubernetes service lb portal")
LOAD_BALANCER_FW = _set(
    "KUBE-LOAD-BALANCER-FW",
    "hash:ip,port",
    "Kubernetes service load balancer ip + port for load balancer with sourceRange",
)
LOAD_BALANCER_LOCAL = _set(
    "KUBE-LOAD-BALANCER-LOCAL",
    "hash:ip,port",
    "Kubernetes service load balancer ip + port with externalTrafficPolicy=local",
)
LOAD_BALANCER_SOURCE_IP = _set(
    "KUBE-LOAD-BALANCER-SOURCE-IP",
    "hash:ip,port,ip",
    "Kubernetes service load balancer ip + port + source IP for packet filter purpose",
)
LOAD_BALANCER_SOURCE_CIDR = _set(
    "KUBE-LOAD-BALANCER-SOURCE-CIDR",
    "hash:ip,port,net",
    "Kubernetes service load balancer ip + port + source cidr for packet filter purpose",
)
NODE_PORT_TCP = _set(
    "KUBE-NODE-PORT-TCP", "bitmap:port", "Kubernetes nodeport TCP port for masquerade purpose"
)
NODE_PORT_LOCAL_TCP = _set(
    "KUBE-NODE-PORT-LOCAL-TCP",
    "bitmap:port",
    "Kubernetes nodeport TCP port with externalTrafficPolicy=local",
)
NODE_PORT_UDP = _set(
    "KUBE-NODE-PORT-UDP", "bitmap:port", "Kubernetes nodeport UDP port for masquerade purpose"
)
NODE_PORT_LOCAL_UDP = _set(
    "KUBE-NODE-PORT-LOCAL-UDP",
    "bitmap:port",
    "Kubernetes nodeport UDP port with externalTrafficPolicy=local",
)
NODE_PORT_SCTP = _set(
    "KUBE-NODE-PORT-SCTP-HASH",
    "hash:ip,port",
    "Kubernetes nodeport SCTP port for masquerade purpose with type 'hash ip:port'",
)
NODE_PORT_LOCAL_SCTP = _set(
    "KUBE-NODE-PORT-LOCAL-SCTP-HASH",
    "hash:ip,port",
    "Kubernetes nodeport SCTP port with externalTrafficPolicy=local with type 'hash ip:port'",
)
HEALTH_CHECK_NODE_PORT = _set(
    "KUBE-HEALTH-CHECK-NODE-PORT", "bitmap:port", "Kubernetes health check node port"
)
IPVS_IPS = _set("KUBE-IPVS-IPS", "hash:ip", "Addresses on the ipvs interface")

IPSETS: tuple[IpsetSpec, ...] = (
    LOOP_BACK, CLUSTER_IP, EXTERNAL_IP, EXTERNAL_IP_LOCAL, LOAD_BALANCER, LOAD_BALANCER_FW,
    LOAD_BALANCER_LOCAL, LOAD_BALANCER_SOURCE_IP, LOAD_BALANCER_SOURCE_CIDR, NODE_PORT_TCP,
    NODE_PORT_LOCAL_TCP, NODE_PORT_UDP, NODE_PORT_LOCAL_UDP, NODE_PORT_SCTP,
    NODE_PORT_LOCAL_SCTP, HEALTH_CHECK_NODE_PORT, IPVS_IPS,
)  # fmt: skip


@dataclass(frozen=True, order=True)
class VirtualServer:
    """An IPVS service's identity (kube-proxy's ``ip:port/PROTO``)."""

    address: IPAddress
    port: int
    protocol: Protocol

    def __str__(self) -> str:
        return f"{self.address}:{self.port}/{self.protocol.value.upper()}"


@dataclass(frozen=True)
class ServiceOptions:
    """What may change on an existing IPVS service (modified in place)."""

    scheduler: str = "rr"
    persistence_timeout: int | None = None  # ClientIP affinity: persistent, this many seconds


@dataclass(frozen=True, order=True)
class RealServer:
    address: IPAddress
    port: int

    def __str__(self) -> str:
        return f"{self.address}:{self.port}"


@dataclass
class IpvsState:
    """Everything the IPVS applier owns, as it should be after a sync."""

    addresses: set[IPAddress] = field(default_factory=set)  # bound to kube-ipvs0 as /32
    services: dict[VirtualServer, ServiceOptions] = field(default_factory=dict)
    real_servers: dict[VirtualServer, set[RealServer]] = field(default_factory=dict)
    ipsets: dict[str, set[str]] = field(
        default_factory=lambda: {spec.name: set() for spec in IPSETS}
    )
    # The Service port each virtual server serves: what a kernel error is reported against.
    names: dict[VirtualServer, str] = field(default_factory=dict)
