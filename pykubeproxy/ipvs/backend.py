"""The IPVS proxy mode, as a `Backend` of the proxier.

Every sync renders the whole state, like kube-proxy's IPVS proxier: it is small
(one virtual server per Service IP:port, a few ipsets, a fixed list of iptables
rules) and the IPVS applier changes only what differs; a partial sync spares it
reading back the services that did not change. Order matters: the ipsets must
exist before iptables rules that match them are committed.
"""

from __future__ import annotations

from collections.abc import Callable
from ipaddress import IPv4Address
from typing import Protocol

from pykubeproxy.iptables.backend import Applier
from pykubeproxy.ipvs.netlink import KernelRefused
from pykubeproxy.ipvs.render import IpvsConfig, render
from pykubeproxy.ipvs.state import IpvsState, RealServer, VirtualServer
from pykubeproxy.metrics import Metrics
from pykubeproxy.model import (
    EndpointsMap,
    IPAddress,
    IPNetwork,
    NodeFacts,
    ServicePortMap,
    ServicePortName,
)


class IpvsKernel(Protocol):
    """What the backend needs of the IPVS applier (pyroute2)."""

    def apply(self, state: IpvsState, full: bool = True) -> None: ...
    def drain(self) -> None: ...
    def draining(self) -> dict[tuple[VirtualServer, RealServer], float]: ...


class IpvsBackend:
    """kube-proxy's IPVS mode: IPVS services, kube-ipvs0, ipsets and a few iptables rules."""

    def __init__(
        self,
        cfg: IpvsConfig,
        ipvs: IpvsKernel,
        iptables: Applier,
        metrics: Metrics,
        node_addresses: Callable[[], list[IPAddress]],
        nodeport_cidrs: tuple[IPNetwork, ...] = (),
    ) -> None:
        self.cfg = cfg
        self.ipvs = ipvs
        self.iptables = iptables
        self.metrics = metrics
        self.node_addresses = node_addresses
        self.nodeport_cidrs = nodeport_cidrs

    def sync(
        self,
        services: ServicePortMap,
        endpoints: EndpointsMap,
        rewrite: set[ServicePortName] | None,
        node: NodeFacts,
    ) -> None:
        """Render everything; on a partial sync (`rewrite` set) unchanged services are not
        read back from the kernel.

        A virtual or real server the kernel refuses fails the sync (KernelRefused, raised
        at the end) but stops nothing else: the iptables half, draining and the metrics
        still follow, as upstream goes on past a Service it could not program.
        """
        addresses = frozenset(
            ip for ip in self.node_addresses() if isinstance(ip, IPv4Address) and not ip.is_loopback
        )
        node_ips = tuple(sorted(
            ip for ip in addresses
            if not self.nodeport_cidrs or any(ip in cidr for cidr in self.nodeport_cidrs)
        ))  # fmt: skip
        rendered = render(services, endpoints, self.cfg, node, node_ips, addresses)
        refused: KernelRefused | None = None
        try:
            self.ipvs.apply(rendered.state, full=rewrite is None)
        except KernelRefused as err:
            refused = err
        self.iptables.apply(rendered.tables)
        self.ipvs.drain()
        state = rendered.state
        self.metrics.ipvs_virtual_servers.set(len(state.services))
        real = sum(len(servers) for servers in state.real_servers.values())
        self.metrics.ipvs_real_servers.set(real + len(self.ipvs.draining()))
        self.metrics.count_rules({t.name: t.rule_count() for t in rendered.tables})
        self.metrics.set_no_local_endpoints(rendered.no_local_endpoints)
        if refused is not None:
            raise refused
