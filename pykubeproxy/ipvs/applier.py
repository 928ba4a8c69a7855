"""Make the kernel's IPVS services, kube-ipvs0 and kube-proxy's ipsets match an `IpvsState`.

The orchestration of IPVS mode's kernel work; the netlink edge is in netlink.py (over
wire.py's raw sockets), the ipsets in ipsets.py, graceful termination in graceful.py. Every
sync works by difference, so a sync with nothing to do writes nothing
(`IpvsApplier.changes`). A full sync reads the kernel first, in a few dumps (each ipset,
all addresses, all virtual services) and one read of /proc/net/ip_vs (all real servers),
which is how damage done behind the agent's back is repaired; a partial sync trusts what the last
sync that met no refusal made (kept in memory) and reads and writes only what changed since.
Writes are queued and sent in batches, their refusals matched to them afterwards.

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
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from ipaddress import IPv4Network, IPv6Network, ip_address, ip_network

from pykubeproxy.ipvs import ipsets
from pykubeproxy.ipvs.graceful import DEFAULT_DRAIN_TIMEOUT, GracefulTermination
from pykubeproxy.ipvs.ipsets import KernelSet, Member
from pykubeproxy.ipvs.netlink import (
    GONE,
    IPVS_CMD_DEL_SERVICE,
    IPVS_CMD_NEW_DEST,
    IPVS_CMD_NEW_SERVICE,
    IPVS_CMD_SET_DEST,
    IPVS_CMD_SET_SERVICE,
    MASQ,
    PROTOCOLS,
    IpvsError,
    Kernel,
    KernelAddress,
    KernelDest,
    KernelRefused,
    KernelService,
    NetlinkError,
    Problems,
    bind,
    dest_body,
    ensure_device,
    failing,
    module_loaded,
    nested_service_key,
    parse_address,
    parse_service,
    service_attrs,
    service_options,
    unbind,
)
from pykubeproxy.ipvs.state import (
    CLUSTER_IP,
    DUMMY_DEVICE,
    EXTERNAL_IP,
    EXTERNAL_IP_LOCAL,
    IPSETS,
    LOAD_BALANCER,
    NODE_PORT_SCTP,
    NODE_PORT_TCP,
    NODE_PORT_UDP,
    IpvsState,
    RealServer,
    ServiceOptions,
    VirtualServer,
)
from pykubeproxy.ipvs.wire import Memo
from pykubeproxy.model import IPAddress, Protocol

__all__ = ["IpvsApplier", "IpvsError", "KernelRefused"]

log = logging.getLogger(__name__)

PROBE_ADDRESS = ip_address("198.51.100.0")  # TEST-NET-2, kube-proxy's scheduler probe
PROBE_PORTS = range(20000, 20010)
# Sets whose ``ip,proto:port`` members are the agent's non-NodePort virtual services (rule d).
SERVICE_SETS = (CLUSTER_IP, EXTERNAL_IP, EXTERNAL_IP_LOCAL, LOAD_BALANCER)
NODE_PORT_BITMAPS = {Protocol.TCP: NODE_PORT_TCP, Protocol.UDP: NODE_PORT_UDP}

Network = IPv4Network | IPv6Network
# A virtual service as a sync made it: its options and real servers.
Made = tuple[ServiceOptions, frozenset[RealServer]]


@dataclass
class _Claims:
    """What marks a virtual service as the agent's, read before a sync changes anything."""

    bound: set[IPAddress]
    local: set[IPAddress]
    node_ports: set[tuple[Protocol, int]]
    sctp_node_ports: set[tuple[IPAddress, int]]
    services: set[VirtualServer]

    @classmethod
    def read(
        cls, addresses: list[KernelAddress], sets: dict[str, KernelSet], index: int | None
    ) -> _Claims:
        def members(name: str) -> set[Member]:
            found = sets.get(name)
            return found.members if found is not None else set()

        def ip_ports(name: str) -> Iterator[tuple[IPAddress, Protocol, int]]:
            for m in members(name):
                if m.ip is not None and m.port is not None and m.proto in PROTOCOLS:
                    yield m.ip, PROTOCOLS[m.proto], m.port

        return cls(
            bound={a.ip for a in addresses if a.ifindex == index},
            local={a.ip for a in addresses},
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


@dataclass
class _Memos:
    """The kernel records a full sync parsed, kept for the next one (wire.Memo)."""

    services: Memo[bytes, KernelService | None] = field(default_factory=lambda: Memo(parse_service))
    addresses: Memo[bytes, KernelAddress | None] = field(
        default_factory=lambda: Memo(parse_address)
    )
    members: dict[str, Memo[bytes, Member]] = field(
        default_factory=lambda: {spec.name: Memo(ipsets.kernel_member) for spec in IPSETS}
    )


@dataclass
class _Applied:
    """What the last sync that met no refusal made: the kernel as a partial sync trusts it."""

    index: int  # kube-ipvs0
    addresses: frozenset[IPAddress]  # bound to kube-ipvs0
    sets: ipsets.Wanted  # the members of kube-proxy's sets
    services: dict[VirtualServer, Made]


class _Refusals:
    """Reports the refusals of one virtual server's writes, which reach it in order: once
    the virtual server itself was refused, those of its real servers follow from that and
    are not reported (upstream skips the rest of a virtual server it could not program)."""

    def __init__(self, problems: Problems, service: str, vs: VirtualServer) -> None:
        self.problems = problems
        self.service_name = service
        self.vs = vs
        self.failed = False

    def service(self, err: NetlinkError) -> None:
        self.failed = True
        self.problems.add(f"Service {self.service_name}: virtual server {self.vs}: {err}")

    def real_server(self, rs: RealServer, doing: str = "") -> Callable[[NetlinkError], None]:
        def refused(err: NetlinkError) -> None:
            if not self.failed:
                self.problems.add(
                    f"Service {self.service_name}: {doing}real server {self.vs} -> {rs}: {err}"
                )

        return refused


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
        self._last: _Applied | None = None
        self._memos = _Memos()
        # Virtual services the last full sync found as wanted: what they were wanted as, and
        # their lines of /proc/net/ip_vs then. While both stay the same, so do their real
        # servers, and the next full sync need not look each one up (else it compares the
        # lines with the wanted real servers as text, `ProcDests.exactly`).
        self._matched: dict[VirtualServer, tuple[Made, dict[str, str]]] = {}
        self._lock = threading.RLock()

    def excluded(self, address: IPAddress) -> bool:
        return any(address in cidr for cidr in self.exclude_cidrs)

    def draining(self) -> dict[tuple[VirtualServer, RealServer], float]:
        """Real servers at weight 0 waiting for their connections to end, with deadlines."""
        with self._lock:
            return self.graceful.draining()

    def _owned(
        self, vs: VirtualServer, claims: _Claims, applied: dict[VirtualServer, Made]
    ) -> bool:
        return vs in applied or (claims.claim(vs) and not self.excluded(vs.address))

    # --- apply --------------------------------------------------------------------------------

    def apply(self, state: IpvsState, full: bool = True) -> None:
        """Make the kernel match state; raises IpvsError after applying all it could.

        A full sync (at start, periodically, after a failure) reads the kernel back (module
        docstring), then writes what differs. A partial sync (`full` false) trusts what the
        last sync made, if that one met no refusal: it reads only the virtual services whose
        options or real servers changed (or that drain real servers), and writes only the
        difference; without such a last sync it is a full sync. Writes go to the kernel in
        batches.
        """
        with self._lock:
            last = self._last
            wanted = ipsets.parse_sets(state, last.sets if last else None)
            made, changed = _compare(state, last.services if last else {})
            self._last = None  # trusted again only once this sync met no refusal
            self.changes = []
            problems = Problems("IPVS sync")
            with Kernel(self.changes) as kernel, failing("IPVS sync"):
                if full or last is None:
                    index = self._full(kernel, state, wanted, made, last, problems)
                else:
                    index = last.index
                    self._partial(kernel, state, wanted, last, changed, problems)
            if not problems:
                self._last = _Applied(index, frozenset(state.addresses), wanted, made)
            self.graceful.clear_flows()
            if self.changes:
                log.info("IPVS sync: %d kernel changes", len(self.changes))
            problems.raise_any()

    def _full(
        self,
        kernel: Kernel,
        state: IpvsState,
        wanted: ipsets.Wanted,
        made: dict[VirtualServer, Made],
        last: _Applied | None,
        problems: Problems,
    ) -> int:
        memos = self._memos
        sets = ipsets.read_sets(kernel, memos.members)
        index = ensure_device(kernel)
        addresses = kernel.addresses(memos.addresses)
        bound = {a.ip for a in addresses if a.ifindex == index}
        prefixes = {a.ip: a.prefixlen for a in addresses if a.ifindex == index}
        ipsets.sync_sets(kernel, sets, wanted, problems)  # `sets` keeps what it read
        kernel.flush()
        current = kernel.services(memos.services)
        table = kernel.real_servers()
        matched, self._matched = self._matched, {}
        draining = self.graceful.services()
        for vs, opts in sorted(state.services.items()):
            service, dests, seen = current.get(vs), table.get(vs), matched.get(vs)
            holds = (
                service is not None
                and (service.scheduler, service.flags, service.timeout) == service_options(opts)
                and (
                    (seen is not None and seen[0] is made[vs] and seen[1] == dests.lines)
                    or (vs not in draining and dests.exactly(made[vs][1]))
                )
            )
            if holds or self._sync_service(kernel, vs, opts, service, dests, state, problems):
                self._matched[vs] = (made[vs], dests.lines)
        kernel.flush()
        bind(kernel, index, state.addresses - bound, problems)
        kernel.flush()
        stale = current.keys() - state.services.keys()
        if stale:
            claims = _Claims.read(addresses, sets, index)
            claims.bound |= state.addresses  # rule (a) now, not only from the next sync on
            applied = last.services if last else {}
            for vs in sorted(stale):
                if self._owned(vs, claims, applied) and not self.excluded(vs.address):
                    self._delete_service(kernel, vs, problems)
            kernel.flush()
        unbind(kernel, index, bound - state.addresses, prefixes, problems)
        kernel.flush()
        return index

    def _partial(
        self,
        kernel: Kernel,
        state: IpvsState,
        wanted: ipsets.Wanted,
        last: _Applied,
        changed: list[VirtualServer],
        problems: Problems,
    ) -> None:
        ipsets.sync_changes(kernel, last.sets, wanted, problems)
        kernel.flush()
        draining = self.graceful.services() & state.services.keys()
        for vs in sorted(draining.union(changed)):
            try:
                current = kernel.service(vs)
                dests = kernel.dests(vs) if current is not None else {}
            except NetlinkError as err:
                problems.add(f"Service {state.names.get(vs, '?')}: virtual server {vs}: {err}")
                continue
            self._sync_service(kernel, vs, state.services[vs], current, dests, state, problems)
        kernel.flush()
        bind(kernel, last.index, state.addresses - last.addresses, problems)
        kernel.flush()
        for vs in sorted(last.services.keys() - state.services.keys()):
            if not self.excluded(vs.address):
                self._delete_service(kernel, vs, problems)
        kernel.flush()
        unbind(kernel, last.index, last.addresses - state.addresses, {}, problems)
        kernel.flush()

    def _sync_service(
        self,
        kernel: Kernel,
        vs: VirtualServer,
        opts: ServiceOptions,
        current: KernelService | None,
        dests: Mapping[RealServer, KernelDest],
        state: IpvsState,
        problems: Problems,
    ) -> bool:
        """One virtual server and its real servers, as upstream's syncService and
        syncEndpoint (queued writes; `current` and `dests` are what the kernel holds).
        True if the kernel held them as wanted: nothing written, nothing draining."""
        refusals = _Refusals(problems, state.names.get(vs, "?"), vs)
        matched = current is not None
        if current is None:
            kernel.write_ipvs(f"add service {vs}", IPVS_CMD_NEW_SERVICE,
                              service_attrs(vs, opts), refusals.service)  # fmt: skip
        else:
            wanted = service_options(opts)
            if (current.scheduler, current.flags, current.timeout) != wanted:
                # "set" edits in place: connections and stats stay ("update" would delete).
                scheduler, flags, timeout = wanted
                what = f"set service {vs} scheduler {scheduler} flags {flags:#x} timeout {timeout}"
                kernel.write_ipvs(what, IPVS_CMD_SET_SERVICE, service_attrs(vs, opts),
                                  refusals.service)  # fmt: skip
                matched = False
        real_servers = state.real_servers.get(vs, set())
        return self._sync_dests(kernel, vs, real_servers, dests, refusals) and matched

    def _sync_dests(
        self,
        kernel: Kernel,
        vs: VirtualServer,
        wanted: set[RealServer],
        current: Mapping[RealServer, KernelDest],
        refusals: _Refusals,
    ) -> bool:
        """Queue what makes the real servers of vs as wanted; True if nothing was."""
        missing, reset, kept = [], [], 0
        for rs in wanted:
            self.graceful.keep(vs, rs)
            dest = current.get(rs)
            if dest is None:
                missing.append(rs)
            else:
                kept += 1
                if dest.weight != 1 or dest.fwd_method != MASQ:
                    reset.append(rs)
        for rs in sorted(missing):
            kernel.write_ipvs(f"add {vs} -> {rs}", IPVS_CMD_NEW_DEST, dest_body(vs, rs),
                              refusals.real_server(rs))  # fmt: skip
        for rs in sorted(reset):
            kernel.write_ipvs(f"set {vs} -> {rs} weight 1", IPVS_CMD_SET_DEST, dest_body(vs, rs),
                              refusals.real_server(rs))  # fmt: skip
        if kept < len(current):
            for rs in sorted(current.keys() - wanted):
                refused = refusals.real_server(rs, "remove ")
                self.graceful.retire(kernel, vs, current[rs], refused)
            return False
        return not missing and not reset

    def _delete_service(self, kernel: Kernel, vs: VirtualServer, problems: Problems) -> None:
        """Queue deleting a virtual service (one already gone is fine); nothing of it drains
        any more."""

        def refused(err: NetlinkError) -> None:
            if err.code not in GONE:
                problems.add(f"delete virtual server {vs}: {err}")

        kernel.write_ipvs(f"delete service {vs}", IPVS_CMD_DEL_SERVICE, nested_service_key(vs),
                          refused)  # fmt: skip
        self.graceful.service_deleted(vs)

    # --- drain --------------------------------------------------------------------------------

    def drain(self) -> None:
        """Delete the draining real servers whose connections ended or whose time is up."""
        with self._lock:
            if not self.graceful.draining():
                return
            problems = Problems("IPVS drain")
            with Kernel(self.changes) as kernel, failing("IPVS drain"):
                self.graceful.drain(kernel, problems)
                kernel.flush()
            self.graceful.clear_flows()
            problems.raise_any()

    # --- other entry points -------------------------------------------------------------------

    def counts(self) -> tuple[int, int]:
        """(virtual services, real servers) the agent owns; (0, 0) where there is no ip_vs."""
        with self._lock, Kernel() as kernel, failing("IPVS counts"):
            if not module_loaded("ip_vs"):
                return 0, 0
            owned = self._owned_services(kernel)
            table = kernel.real_servers()
            return len(owned), sum(len(table.get(vs)) for vs in owned)

    def _owned_services(self, kernel: Kernel) -> list[VirtualServer]:
        """The kernel's virtual services the agent owns (module docstring)."""
        sets = ipsets.read_sets(kernel) if module_loaded("ip_set") else {}
        claims = _Claims.read(kernel.addresses(), sets, kernel.device())
        applied = self._last.services if self._last else {}
        return [vs for vs in sorted(kernel.services()) if self._owned(vs, claims, applied)]

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
                kernel.call_ipvs(IPVS_CMD_NEW_SERVICE, service_attrs(probe, ServiceOptions(name)))
            except NetlinkError as err:
                if err.code == errno.ENOENT:
                    raise ValueError(
                        f"IPVS scheduler {name!r} is not available in this kernel "
                        f"(no ip_vs_{name} module)"
                    ) from err
                raise ValueError(f"cannot use IPVS scheduler {name!r}: {err}") from err
            try:
                found = kernel.service(probe)
            finally:
                kernel.call_ipvs(IPVS_CMD_DEL_SERVICE, nested_service_key(probe))
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
            self._last = None
            self._matched.clear()
            self.graceful.clear_flows()
            self.graceful.clear()

    def _cleanup_services(self, kernel: Kernel) -> None:
        if not module_loaded("ip_vs"):
            return
        problems = Problems("cleanup")
        for vs in self._owned_services(kernel):
            if not self.excluded(vs.address):
                self._delete_service(kernel, vs, problems)
        kernel.flush()

    @staticmethod
    def _cleanup_device(kernel: Kernel) -> None:
        index = kernel.device()
        if index is not None:
            kernel.delete_device(index)
            log.info("cleanup: deleted %s", DUMMY_DEVICE)

    @staticmethod
    def _cleanup_sets(kernel: Kernel) -> None:
        if module_loaded("ip_set"):
            ipsets.destroy_sets(kernel)


def _compare(
    state: IpvsState, before: dict[VirtualServer, Made]
) -> tuple[dict[VirtualServer, Made], list[VirtualServer]]:
    """What a sync of state makes of each virtual service, and those that differ from
    `before` (what the last sync made); an unchanged one keeps its old record."""
    made: dict[VirtualServer, Made] = {}
    changed = []
    for vs, opts in state.services.items():
        real_servers = state.real_servers.get(vs, set())
        old = before.get(vs)
        if old is not None and old[0] == opts and old[1] == real_servers:
            made[vs] = old
        else:
            made[vs] = (opts, frozenset(real_servers))
            changed.append(vs)
    return made, changed
