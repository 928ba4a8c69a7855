"""Make the kernel's IPVS services, kube-ipvs0 and kube-proxy's ipsets match an `IpvsState`.

The orchestration of IPVS mode's kernel work; the netlink edge is in netlink.py, the
ipsets in ipsets.py, graceful termination in graceful.py. Every sync works by difference:
the kernel is read first, and only what differs is written, so a sync with nothing to do
writes nothing (`IpvsApplier.changes`).

One bad Service never blocks the others (upstream's syncProxyRules logs a failed virtual
or real server and goes on): a refusal is logged with the Service and the address, every
other write is still made, and `apply` raises `IpvsError` at its end so the sync counts as
failed and is retried.

Ownership. Unlike kube-proxy, which deletes every IPVS service of its address family that the
current sync did not produce, the agent leaves other software's services alone. A virtual
service is the agent's when, read from the kernel *before* the sync changes anything:

(a) its address is bound on kube-ipvs0 (or is to be: an address of the desired state); or
(b) it is a NodePort service: its port is in KUBE-NODE-PORT-TCP/-UDP (SCTP: its
    ``ip,sctp:port`` is in KUBE-NODE-PORT-SCTP-HASH) and its address is a local address of
    the node; or
(c) it is in the desired state, or was in the last state this object applied; or
(d) its ``ip,proto:port`` is in KUBE-CLUSTER-IP, KUBE-EXTERNAL-IP(-LOCAL) or
    KUBE-LOAD-BALANCER: these sets hold every non-NodePort service the agent made, including
    an external or load-balancer IP that is a node address (so not bound on kube-ipvs0).

A service whose address is in ``exclude_cidrs`` is never removed, drained or counted through
rules (a), (b) and (d) (``--ipvs-exclude-cidrs``: "should not touch when cleaning up"); one
the desired state asks for is still created and kept in sync, as kube-proxy does.

kube-ipvs0 stays DOWN, as kube-proxy leaves it: the kernel installs the ``local`` route of
an address on a down dummy device, and on Debian's 6.1 kernel ClusterIPs answer both
node-local and forwarded TCP/UDP traffic with the device down (checked in the VM tests).
"""

from __future__ import annotations

import errno
import logging
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from ipaddress import IPv4Network, IPv6Network, ip_address, ip_network
from typing import Any

from pykubeproxy.ipvs import ipsets
from pykubeproxy.ipvs.graceful import DEFAULT_DRAIN_TIMEOUT, GracefulTermination
from pykubeproxy.ipvs.ipsets import KernelSet, Member
from pykubeproxy.ipvs.netlink import (
    GONE,
    MASQ,
    PROTOCOLS,
    IpvsError,
    Kernel,
    KernelDest,
    KernelRefused,
    KernelService,
    NetlinkError,
    Problems,
    bind,
    dest_msg,
    ensure_device,
    failing,
    module_loaded,
    service_msg,
    service_options,
    unbind,
)
from pykubeproxy.ipvs.state import (
    CLUSTER_IP,
    DUMMY_DEVICE,
    EXTERNAL_IP,
    EXTERNAL_IP_LOCAL,
    LOAD_BALANCER,
    NODE_PORT_SCTP,
    NODE_PORT_TCP,
    NODE_PORT_UDP,
    IpvsState,
    RealServer,
    ServiceOptions,
    VirtualServer,
)
from pykubeproxy.model import IPAddress, Protocol

__all__ = ["IpvsApplier", "IpvsError", "KernelRefused"]

log = logging.getLogger(__name__)

PROBE_ADDRESS = ip_address("198.51.100.0")  # TEST-NET-2, kube-proxy's scheduler probe
PROBE_PORTS = range(20000, 20010)
# Sets whose ``ip,proto:port`` members are the agent's non-NodePort virtual services (rule d).
SERVICE_SETS = (CLUSTER_IP, EXTERNAL_IP, EXTERNAL_IP_LOCAL, LOAD_BALANCER)
NODE_PORT_BITMAPS = {Protocol.TCP: NODE_PORT_TCP, Protocol.UDP: NODE_PORT_UDP}

Network = IPv4Network | IPv6Network


@dataclass
class _Claims:
    """What marks a virtual service as the agent's, read before a sync changes anything."""

    bound: set[IPAddress]
    local: set[IPAddress]
    node_ports: set[tuple[Protocol, int]]
    sctp_node_ports: set[tuple[IPAddress, int]]
    services: set[VirtualServer]

    @classmethod
    def read(cls, kernel: Kernel, sets: dict[str, KernelSet], index: int | None) -> _Claims:
        def members(name: str) -> set[Member]:
            found = sets.get(name)
            return found.members if found is not None else set()

        def ip_ports(name: str) -> Iterator[tuple[IPAddress, Protocol, int]]:
            for m in members(name):
                if m.ip is not None and m.port is not None and m.proto in PROTOCOLS:
                    yield m.ip, PROTOCOLS[m.proto], m.port

        return cls(
            bound=kernel.addresses(index) if index is not None else set(),
            local=kernel.addresses(),
            node_ports={
                (proto, m.port)
                for proto, spec in NODE_PORT_BITMAPS.items()
                for m in members(spec.name)
                if m.port is not None
            },
            sctp_node_ports={
                (ip, port)
                for ip, proto, port in ip_ports(NODE_PORT_SCTP.name)
                if proto is Protocol.SCTP
            },
            services={
                VirtualServer(ip, port, proto)
                for spec in SERVICE_SETS
                for ip, proto, port in ip_ports(spec.name)
            },
        )

    def claim(self, vs: VirtualServer) -> bool:
        """Rules (a), (b) and (d) of the module docstring."""
        if vs.address in self.bound or vs in self.services:
            return True
        if vs.protocol is Protocol.SCTP:
            return (vs.address, vs.port) in self.sctp_node_ports and vs.address in self.local
        return (vs.protocol, vs.port) in self.node_ports and vs.address in self.local


class IpvsApplier:
    """Applies an `IpvsState` to IPVS, kube-ipvs0 and ipsets; drains removed real servers."""

    def __init__(
        self,
        exclude_cidrs: Iterable[Network | str] = (),
        drain_timeout: float = DEFAULT_DRAIN_TIMEOUT,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.exclude_cidrs = tuple(ip_network(c) for c in exclude_cidrs)
        self.graceful = GracefulTermination(drain_timeout, clock)
        # Kernel writes of the last apply() (and of drain() since), e.g. "add service ...".
        self.changes: list[str] = []
        # What the last apply() that had no error made: (options, real servers) per service.
        self._applied: dict[VirtualServer, tuple[ServiceOptions, frozenset[RealServer]]] = {}
        self._lock = threading.RLock()

    def excluded(self, address: IPAddress) -> bool:
        return any(address in cidr for cidr in self.exclude_cidrs)

    def draining(self) -> dict[tuple[VirtualServer, RealServer], float]:
        """Real servers at weight 0 waiting for their connections to end, with deadlines."""
        with self._lock:
            return self.graceful.draining()

    def _owned(self, vs: VirtualServer, claims: _Claims) -> bool:
        return vs in self._applied or (claims.claim(vs) and not self.excluded(vs.address))

    def _write(self, what: str, fn: Callable[..., object], *args: Any, **kwargs: Any) -> None:
        """One kernel write, fn(*args, **kwargs), logged and recorded in `changes`."""
        log.debug("IPVS applier: %s", what)
        fn(*args, **kwargs)
        self.changes.append(what)

    # --- apply --------------------------------------------------------------------------------

    def apply(self, state: IpvsState, full: bool = True) -> None:
        """Make the kernel match state; raises IpvsError after applying all it could.

        With `full` false (a partial sync), the real servers of a service that this
        object made exactly as wanted last time, and that has none draining, are not
        read back: on a large node that read is most of a sync's cost. Full syncs
        (at start, periodically, after a failure) read everything.
        """
        wanted_sets = ipsets.parse_sets(state)
        with self._lock, Kernel() as kernel, failing("IPVS sync"):
            self.changes = []
            problems = Problems("IPVS sync")
            sets = ipsets.read_sets(kernel)
            index = ensure_device(kernel, self._write)
            claims = _Claims.read(kernel, sets, index)
            bound = set(claims.bound)
            claims.bound |= state.addresses  # rule (a) now, not only from the next sync on
            ipsets.sync_sets(kernel, self._write, sets, wanted_sets, problems)
            current = kernel.services()
            draining = self.graceful.services()
            for vs, opts in sorted(state.services.items()):
                wanted = frozenset(state.real_servers.get(vs, ()))
                if (
                    not full
                    and vs in current
                    and vs not in draining
                    and (self._applied.get(vs) == (opts, wanted))
                ):
                    continue
                self._sync_service(kernel, vs, opts, current.get(vs), state, problems)
            bind(kernel, self._write, index, state.addresses - bound, problems)
            for vs in sorted(current.keys() - state.services.keys()):
                if self._owned(vs, claims) and not self.excluded(vs.address):
                    self._delete_service(kernel, vs, problems)
            unbind(kernel, self._write, index, bound - state.addresses, problems)
            self._applied = (
                {}
                if problems
                else {
                    vs: (opts, frozenset(state.real_servers.get(vs, ())))
                    for vs, opts in state.services.items()
                }
            )
            self.graceful.clear_flows()
            if self.changes:
                log.info("IPVS sync: %d kernel changes", len(self.changes))
            problems.raise_any()

    def _sync_service(
        self,
        kernel: Kernel,
        vs: VirtualServer,
        opts: ServiceOptions,
        current: KernelService | None,
        state: IpvsState,
        problems: Problems,
    ) -> None:
        """One virtual server and its real servers, as upstream's syncService and
        syncEndpoint: a refusal is reported with the Service's name and skips the rest of
        this virtual server only."""
        service = state.names.get(vs, "?")
        try:
            wanted = service_options(opts)
            if current is None:
                self._write(f"add service {vs}", kernel.ipvs.service, "add",
                            service=service_msg(vs, opts))  # fmt: skip
                dests: dict[RealServer, KernelDest] = {}
            else:
                if (current.scheduler, current.flags, current.timeout) != wanted:
                    # "set" edits in place: connections and stats stay ("update" would delete).
                    scheduler, flags, timeout = wanted
                    what = (
                        f"set service {vs} scheduler {scheduler} flags {flags:#x} timeout {timeout}"
                    )
                    self._write(what, kernel.ipvs.service, "set", service=service_msg(vs, opts))
                dests = kernel.dests(vs)
        except NetlinkError as err:
            problems.add(f"Service {service}: virtual server {vs}: {err}")
            return
        self._sync_dests(kernel, vs, state.real_servers.get(vs, set()), dests, service, problems)

    def _sync_dests(
        self,
        kernel: Kernel,
        vs: VirtualServer,
        wanted: set[RealServer],
        current: dict[RealServer, KernelDest],
        service: str,
        problems: Problems,
    ) -> None:
        svc = service_msg(vs)
        for rs in sorted(wanted):
            self.graceful.keep(vs, rs)
            dest = current.get(rs)
            try:
                if dest is None:
                    self._write(f"add {vs} -> {rs}", kernel.ipvs.dest, "add", service=svc,
                                dest=dest_msg(rs))  # fmt: skip
                elif (dest.weight, dest.fwd_method) != (1, MASQ):
                    self._write(f"set {vs} -> {rs} weight 1", kernel.ipvs.dest, "set",
                                service=svc, dest=dest_msg(rs))  # fmt: skip
            except NetlinkError as err:
                problems.add(f"Service {service}: real server {vs} -> {rs}: {err}")
        for rs in sorted(current.keys() - wanted):
            try:
                self.graceful.retire(kernel, self._write, vs, current[rs])
            except NetlinkError as err:
                problems.add(f"Service {service}: remove real server {vs} -> {rs}: {err}")

    def _delete_service(self, kernel: Kernel, vs: VirtualServer, problems: Problems) -> None:
        try:
            self._write(f"delete service {vs}", kernel.ipvs.service, "del",
                        service=service_msg(vs))  # fmt: skip
        except NetlinkError as err:
            if err.code not in GONE:
                problems.add(f"delete virtual server {vs}: {err}")
                return
        self.graceful.service_deleted(vs)

    # --- drain --------------------------------------------------------------------------------

    def drain(self) -> None:
        """Delete the draining real servers whose connections ended or whose time is up."""
        with self._lock:
            if not self.graceful.draining():
                return
            problems = Problems("IPVS drain")
            with Kernel() as kernel, failing("IPVS drain"):
                self.graceful.drain(kernel, self._write, problems)
            self.graceful.clear_flows()
            problems.raise_any()

    # --- other entry points -------------------------------------------------------------------

    def counts(self) -> tuple[int, int]:
        """(virtual services, real servers) the agent owns; (0, 0) where there is no ip_vs."""
        with self._lock, Kernel() as kernel, failing("IPVS counts"):
            if not module_loaded("ip_vs"):
                return 0, 0
            owned = self._owned_services(kernel)
            return len(owned), sum(len(kernel.dests(vs)) for vs in owned)

    def _owned_services(self, kernel: Kernel) -> list[VirtualServer]:
        """The kernel's virtual services the agent owns (module docstring)."""
        sets = ipsets.read_sets(kernel) if module_loaded("ip_set") else {}
        claims = _Claims.read(kernel, sets, kernel.device())
        return [vs for vs in sorted(kernel.services()) if self._owned(vs, claims)]

    def check_scheduler(self, name: str) -> None:
        """Raise ValueError unless IPVS works here with this scheduler.

        As kube-proxy: fine if a service already uses it, else a probe service on
        198.51.100.0 (TEST-NET-2) is created with it and deleted. The kernel loads
        ``ip_vs_<name>`` on demand, so neither the module list nor /proc/net/ip_vs (which
        shows only schedulers in use) can answer; creating a service can.
        """
        with self._lock, Kernel() as kernel:
            try:
                services = kernel.services()
            except NetlinkError as err:
                raise ValueError(f"IPVS is not available in this kernel: {err}") from err
            if any(svc.scheduler == name for svc in services.values()):
                return
            free = [
                p
                for p in PROBE_PORTS
                if VirtualServer(PROBE_ADDRESS, p, Protocol.TCP) not in services
            ]
            if not free:
                raise ValueError(f"cannot probe IPVS scheduler {name!r}: probe addresses in use")
            probe = VirtualServer(PROBE_ADDRESS, free[0], Protocol.TCP)
            try:
                kernel.ipvs.service("add", service=service_msg(probe, ServiceOptions(name)))
            except NetlinkError as err:
                if err.code == errno.ENOENT:
                    raise ValueError(
                        f"IPVS scheduler {name!r} is not available in this kernel "
                        f"(no ip_vs_{name} module)"
                    ) from err
                raise ValueError(f"cannot use IPVS scheduler {name!r}: {err}") from err
            try:
                found = kernel.services().get(probe)
            finally:
                kernel.ipvs.service("del", service=service_msg(probe))
            if found is None or found.scheduler != name:
                raise ValueError(f"IPVS did not keep a service with scheduler {name!r}")

    def cleanup(self) -> None:
        """Remove the agent's services, kube-ipvs0 and the 17 ipsets, logging what fails.

        Never raises, and does nothing on a kernel without ip_vs or ipsets (it asks nothing
        that would load them). Run the iptables cleanup first: a set an iptables rule still
        uses cannot be destroyed, and is reported instead.
        """
        with self._lock, Kernel() as kernel:
            for what, step in (
                ("IPVS services", self._cleanup_services),
                (DUMMY_DEVICE, self._cleanup_device),
                ("ipsets", self._cleanup_sets),
            ):
                try:
                    step(kernel)
                except (NetlinkError, OSError) as err:
                    log.warning("cleanup: cannot remove the %s: %s", what, err)
            self._applied.clear()
            self.graceful.clear_flows()
            self.graceful.clear()

    def _cleanup_services(self, kernel: Kernel) -> None:
        if not module_loaded("ip_vs"):
            return
        problems = Problems("cleanup")
        for vs in self._owned_services(kernel):
            if not self.excluded(vs.address):
                self._delete_service(kernel, vs, problems)

    @staticmethod
    def _cleanup_device(kernel: Kernel) -> None:
        index = kernel.device()
        if index is not None:
            kernel.ipr.link("del", index=index)
            log.info("cleanup: deleted %s", DUMMY_DEVICE)

    @staticmethod
    def _cleanup_sets(kernel: Kernel) -> None:
        if module_loaded("ip_set"):
            ipsets.destroy_sets(kernel)
