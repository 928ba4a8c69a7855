"""Make the kernel's IPVS services, kube-ipvs0 and kube-proxy's ipsets match an `IpvsState`.

The only module of IPVS mode that talks to the kernel (pyroute2 netlink, plus the conntrack
CLI for UDP/SCTP flows). Every sync works by difference: the kernel is read first, and only
what differs is written, so a sync with nothing to do writes nothing (`IpvsApplier.changes`).

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

Graceful termination. A removed TCP real server first gets weight 0 (no new connections) and
is deleted once ActiveConn + InactiveConn reaches 0, or after ``drain_timeout`` seconds
(kube-proxy has no bound; we want nothing to linger forever). `drain` re-checks them; the
draining list lives in memory, and a real server found at weight 0 on one of our services
and not wanted (a previous process was draining it) joins it. UDP and SCTP real servers are
deleted at once and their conntrack flows cleared, so clients move on at their next packet
(since Linux 5.10 IPVS flushes a deleted real server's connections itself when
expire_nodest_conn=1; ``conntrack -D`` covers older kernels and the sysctl left at 0).

kube-ipvs0 stays DOWN, as kube-proxy leaves it: the kernel installs the ``local`` route of
an address on a down dummy device, and on Debian's 6.1 kernel ClusterIPs answer both
node-local and forwarded TCP/UDP traffic with the device down (checked in the VM tests).

ipsets go through pyroute2's netlink ipset API, not the ``ipset`` CLI: it creates all five
set types kube-proxy uses with its options, lists members as structured attributes (so a
desired ``ip,tcp:80,10.0.0.1/32`` and the kernel's ``...,10.0.0.1`` compare equal instead of
churning every sync), needs no ipset binary, runs in the calling thread's namespace like the
other sockets, and in the test VM listed 5000 members in 1.7 s where ``ipset save`` took 37 s.

Namespaces and pyroute2 0.9 quirks: a pyroute2 object keeps one netlink socket per thread,
opened on first use, so its namespace is that of the thread *using* it. Each public call
opens its sockets and closes them before returning: everything (the conntrack CLI included)
happens in the network namespace of the calling thread. ``IPVS.service("update")`` and
``dest("update")`` send IPVS_CMD_DEL_*: modify with "set". ``IPVSDest`` defaults to
``fwd_method=3`` (direct routing) and ``from_message`` drops fields (timeout, flags,
fwd_method keep their defaults), so messages are built with every field and read raw.
"""

from __future__ import annotations

import errno
import logging
import os
import subprocess
import threading
import time
from collections import defaultdict
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from ipaddress import IPv4Network, IPv6Network, ip_address, ip_network
from pathlib import Path
from socket import AF_INET, AF_INET6, IPPROTO_TCP, IPPROTO_UDP
from types import TracebackType
from typing import Any, Self

from pyroute2 import IPVS, IPRoute, IPVSDest, IPVSService
from pyroute2.ipset import IPSet, PortEntry
from pyroute2.netlink.exceptions import NetlinkError
from pyroute2.netlink.nfnetlink.ipset import IPSET_ERR_BUSY, IPSET_ERR_EXIST

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
    IpsetSpec,
    IpvsState,
    RealServer,
    ServiceOptions,
    VirtualServer,
)
from pykubeproxy.model import IPAddress, Protocol

log = logging.getLogger(__name__)

IPPROTO_SCTP = 132
PROTOCOL_NUMBERS = {
    Protocol.TCP: IPPROTO_TCP,
    Protocol.UDP: IPPROTO_UDP,
    Protocol.SCTP: IPPROTO_SCTP,
}
PROTOCOLS = {number: proto for proto, number in PROTOCOL_NUMBERS.items()}
MASQ = 0  # IP_VS_CONN_F_MASQ: kube-proxy's forwarding method
F_PERSISTENT = 0x1  # IP_VS_SVC_F_PERSISTENT
F_HASHED = 0x2  # IP_VS_SVC_F_HASHED: set by the kernel on every service
F_SCHED_MH_PORT = 0x10  # IP_VS_SVC_F_SCHED2: kube-proxy's FlagSourceHash, set with "mh"
PROBE_ADDRESS = ip_address("198.51.100.0")  # TEST-NET-2, kube-proxy's scheduler probe
PROBE_PORTS = range(20000, 20010)
DEFAULT_DRAIN_TIMEOUT = 900.0
# Sets whose ``ip,proto:port`` members are the agent's non-NodePort virtual services (rule d).
SERVICE_SETS = (CLUSTER_IP, EXTERNAL_IP, EXTERNAL_IP_LOCAL, LOAD_BALANCER)
NODE_PORT_BITMAPS = {Protocol.TCP: NODE_PORT_TCP, Protocol.UDP: NODE_PORT_UDP}
GONE = (errno.ENOENT, errno.ESRCH)  # what IPVS answers about a missing service or dest
SYSFS_MODULES = Path("/sys/module")
PROC_SYS = Path("/proc/sys")

Network = IPv4Network | IPv6Network


class IpvsError(RuntimeError):
    """The kernel refused part of a sync; everything else was applied."""


# --- ipset members ----------------------------------------------------------------------------


@dataclass(frozen=True)
class Member:
    """One ipset member in structured form: desired text and kernel listings compare exactly."""

    ip: IPAddress | None = None
    proto: int | None = None
    port: int | None = None
    ip2: IPAddress | None = None  # the second ip, or the net's address
    cidr2: int | None = None  # the net's prefix length (hash:ip,port,net)

    def text(self) -> str:
        """The member as ``ipset list`` prints it (a host-sized net without its /32)."""
        if self.ip is None:
            return str(self.port)
        parts = [str(self.ip)]
        if self.port is not None:
            proto = PROTOCOLS.get(self.proto) if self.proto is not None else None
            name = proto.value if proto is not None else str(self.proto)
            parts.append(f"{name}:{self.port}")
        if self.ip2 is not None:
            host = self.cidr2 in (None, self.ip2.max_prefixlen)
            parts.append(str(self.ip2) if host else f"{self.ip2}/{self.cidr2}")
        return ",".join(parts)

    def pyroute2_args(self, set_type: str) -> dict[str, Any]:
        """The entry, etype and family keywords of pyroute2's IPSet.add/delete."""
        etype = set_type.split(":", 1)[1]
        if self.ip is None:
            return {"entry": self.port, "etype": etype}
        entry: list[Any] = [str(self.ip)]
        if self.port is not None:
            entry.append(PortEntry(self.port, protocol=self.proto))
        if self.ip2 is not None:
            entry.append(f"{self.ip2}/{self.cidr2}" if etype.endswith("net") else str(self.ip2))
        family = AF_INET if self.ip.version == 4 else AF_INET6
        return {"entry": tuple(entry), "etype": etype, "family": family}


def parse_member(set_type: str, text: str) -> Member:
    """A desired member of a set of kube-proxy's types (`Entry.String()` forms)."""
    try:
        if set_type == "bitmap:port":
            return Member(port=int(text.rsplit(":", 1)[-1]))
        parts = text.split(",")
        if set_type == "hash:ip" and len(parts) == 1:
            return Member(ip=ip_address(parts[0]))
        if set_type in ("hash:ip,port", "hash:ip,port,ip", "hash:ip,port,net"):
            name, _, port = parts[1].rpartition(":")
            proto = PROTOCOL_NUMBERS[Protocol(name or "tcp")]
            member = Member(ip=ip_address(parts[0]), proto=proto, port=int(port))
            if set_type == "hash:ip,port" and len(parts) == 2:
                return member
            if set_type == "hash:ip,port,ip" and len(parts) == 3:
                return Member(member.ip, proto, member.port, ip2=ip_address(parts[2]))
            if set_type == "hash:ip,port,net" and len(parts) == 3:
                net = ip_network(parts[2], strict=False)
                return Member(member.ip, proto, member.port, net.network_address, net.prefixlen)
    except (ValueError, IndexError):
        pass
    raise ValueError(f"{text!r} is not a member of a {set_type} set")


def _kernel_member(data: Any) -> Member:
    """A member from an IPSET_ATTR_DATA attribute of a kernel listing."""

    def address(attr: str) -> IPAddress | None:
        nested = data.get_attr(attr)
        if nested is None:
            return None
        value = nested.get_attr("IPSET_ATTR_IPADDR_IPV4") or nested.get_attr(
            "IPSET_ATTR_IPADDR_IPV6"
        )
        return ip_address(value)

    return Member(
        ip=address("IPSET_ATTR_IP_FROM"),
        proto=data.get_attr("IPSET_ATTR_PROTO"),
        port=data.get_attr("IPSET_ATTR_PORT_FROM"),
        ip2=address("IPSET_ATTR_IP2"),
        cidr2=data.get_attr("IPSET_ATTR_CIDR2"),
    )


def _create_options(spec: IpsetSpec) -> dict[str, Any]:
    """pyroute2 IPSet.create keywords for kube-proxy's `ipset create` arguments."""
    args = spec.create_args()
    options = dict(zip(args[::2], args[1::2], strict=True))
    kwargs: dict[str, Any] = {"stype": spec.type, "exclusive": False}
    if "range" in options:
        low, high = options["range"].split("-")
        kwargs["bitmap_ports_range"] = (int(low), int(high))
    if "family" in options:
        kwargs["family"] = AF_INET6 if options["family"] == "inet6" else AF_INET
    for key in ("hashsize", "maxelem"):
        if key in options:
            kwargs[key] = int(options[key])
    return kwargs


@dataclass
class _Set:
    """A kube-proxy set as the kernel holds it."""

    type: str
    members: set[Member] = field(default_factory=set)


# --- IPVS records -----------------------------------------------------------------------------


@dataclass(frozen=True)
class _Service:
    """A kernel virtual service: its identity and the options a sync may change in place."""

    vs: VirtualServer
    scheduler: str
    flags: int  # without IP_VS_SVC_F_HASHED
    timeout: int


@dataclass(frozen=True)
class _Dest:
    """A kernel real server of one virtual service."""

    rs: RealServer
    weight: int
    fwd_method: int
    connections: int  # ActiveConn + InactiveConn


def _service_options(scheduler: str, persistence_timeout: int | None) -> tuple[str, int, int]:
    """(scheduler, flags, timeout) as kube-proxy sets them on a virtual service."""
    flags = F_PERSISTENT if persistence_timeout is not None else 0
    if scheduler == "mh":
        flags |= F_SCHED_MH_PORT
    return scheduler, flags, persistence_timeout or 0


def _service_msg(vs: VirtualServer, opts: ServiceOptions | None = None) -> Any:
    """A complete service record: "add" and "set" need every field, "del" only the key."""
    opts = opts or ServiceOptions()
    scheduler, flags, timeout = _service_options(opts.scheduler, opts.persistence_timeout)
    return IPVSService(
        addr=str(vs.address),
        port=vs.port,
        protocol=PROTOCOL_NUMBERS[vs.protocol],
        sched_name=scheduler,
        flags={"flags": flags, "mask": 0xFFFF},  # ours: every flag is as kube-proxy sets it
        timeout=timeout,
    )


def _dest_msg(rs: RealServer, weight: int = 1) -> Any:
    return IPVSDest(addr=str(rs.address), port=rs.port, fwd_method=MASQ, weight=weight)


def _parse_service(msg: Any) -> _Service | None:
    """A service from a dump message; None for fwmark services and unknown protocols."""
    attrs = msg.get_attr("IPVS_CMD_ATTR_SERVICE")
    addr = attrs.get_attr("IPVS_SVC_ATTR_ADDR")
    proto = PROTOCOLS.get(attrs.get_attr("IPVS_SVC_ATTR_PROTOCOL"))
    if addr is None or proto is None or attrs.get_attr("IPVS_SVC_ATTR_FWMARK"):
        return None
    flags = attrs.get_attr("IPVS_SVC_ATTR_FLAGS") or {}
    return _Service(
        vs=VirtualServer(ip_address(addr), attrs.get_attr("IPVS_SVC_ATTR_PORT"), proto),
        scheduler=attrs.get_attr("IPVS_SVC_ATTR_SCHED_NAME") or "",
        flags=flags.get("flags", 0) & ~F_HASHED,
        timeout=attrs.get_attr("IPVS_SVC_ATTR_TIMEOUT") or 0,
    )


def _parse_dest(msg: Any) -> _Dest:
    attrs = msg.get_attr("IPVS_CMD_ATTR_DEST")
    active = attrs.get_attr("IPVS_DEST_ATTR_ACTIVE_CONNS") or 0
    inactive = attrs.get_attr("IPVS_DEST_ATTR_INACT_CONNS") or 0
    return _Dest(
        rs=RealServer(
            ip_address(attrs.get_attr("IPVS_DEST_ATTR_ADDR")),
            attrs.get_attr("IPVS_DEST_ATTR_PORT"),
        ),
        weight=attrs.get_attr("IPVS_DEST_ATTR_WEIGHT"),
        fwd_method=attrs.get_attr("IPVS_DEST_ATTR_FWD_METHOD"),
        connections=active + inactive,
    )


# --- the kernel, per call ---------------------------------------------------------------------


class _Kernel:
    """The netlink sockets of one public call, opened on first use in the calling thread."""

    def __init__(self) -> None:
        self._ipvs: Any = None
        self._ipr: Any = None
        self._ipset: Any = None

    @property
    def ipvs(self) -> Any:
        if self._ipvs is None:
            self._ipvs = IPVS()
        return self._ipvs

    @property
    def ipr(self) -> Any:
        if self._ipr is None:
            self._ipr = IPRoute()
        return self._ipr

    @property
    def ipset(self) -> Any:
        if self._ipset is None:
            self._ipset = IPSet()
        return self._ipset

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self, et: type[BaseException] | None, ev: BaseException | None, tb: TracebackType | None
    ) -> None:
        for sock in (self._ipvs, self._ipr, self._ipset):
            if sock is not None:
                sock.close()

    # IPVS

    def services(self) -> dict[VirtualServer, _Service]:
        found = (_parse_service(msg) for msg in self.ipvs.service("dump"))
        return {svc.vs: svc for svc in found if svc is not None}

    def dests(self, vs: VirtualServer) -> dict[RealServer, _Dest]:
        found = (_parse_dest(msg) for msg in self.ipvs.dest("dump", service=_service_msg(vs)))
        return {dest.rs: dest for dest in found}

    # kube-ipvs0 and addresses

    def device(self) -> int | None:
        found = self.ipr.link_lookup(ifname=DUMMY_DEVICE)
        return int(found[0]) if found else None

    def addresses(self, index: int | None = None) -> set[IPAddress]:
        """Local addresses of one device, or of every device (IPv6 link-local left out)."""
        msgs = self.ipr.get_addr(index=index) if index is not None else self.ipr.get_addr()
        found = set()
        for msg in msgs:
            ip = ip_address(msg.get_attr("IFA_LOCAL") or msg.get_attr("IFA_ADDRESS"))
            if not ip.is_link_local or ip.version == 4:
                found.add(ip)
        return found

    # ipsets

    def read_set(self, name: str) -> _Set | None:
        """One set with its members, None if it does not exist."""
        found: _Set | None = None
        try:
            for msg in self.ipset.list(name):
                if found is None:
                    found = _Set(type=msg.get_attr("IPSET_ATTR_TYPENAME"))
                adt = msg.get_attr("IPSET_ATTR_ADT")
                if adt is not None:
                    found.members.update(map(_kernel_member, adt.get_attrs("IPSET_ATTR_DATA")))
        except NetlinkError as err:
            if err.code != errno.ENOENT:
                raise
            return None
        return found


@contextmanager
def _failing(what: str) -> Iterator[None]:
    """Report a netlink error nobody expected (e.g. no ip_vs) as an IpvsError."""
    try:
        yield
    except NetlinkError as err:
        raise IpvsError(f"{what} failed: {err}") from err


def _module_loaded(name: str) -> bool:
    """Whether a kernel module is loaded or built in, without loading it by asking."""
    return (SYSFS_MODULES / name).exists()


# --- ownership --------------------------------------------------------------------------------


@dataclass
class _Claims:
    """What marks a virtual service as the agent's, read before a sync changes anything."""

    bound: set[IPAddress]
    local: set[IPAddress]
    node_ports: set[tuple[Protocol, int]]
    sctp_node_ports: set[tuple[IPAddress, int]]
    services: set[VirtualServer]

    @classmethod
    def read(cls, kernel: _Kernel, sets: dict[str, _Set], index: int | None) -> _Claims:
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


# --- the applier ------------------------------------------------------------------------------


class IpvsApplier:
    """Applies an `IpvsState` to IPVS, kube-ipvs0 and ipsets; drains removed real servers."""

    def __init__(
        self,
        exclude_cidrs: Iterable[Network | str] = (),
        drain_timeout: float = DEFAULT_DRAIN_TIMEOUT,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.exclude_cidrs = tuple(ip_network(c) for c in exclude_cidrs)
        self.drain_timeout = drain_timeout
        self.clock = clock
        # Kernel writes of the last apply() (and of drain() since), e.g. "add service ...".
        self.changes: list[str] = []
        # What the last apply() that had no error made: (options, real servers) per service.
        self._applied: dict[VirtualServer, tuple[ServiceOptions, frozenset[RealServer]]] = {}
        self._draining: dict[tuple[VirtualServer, RealServer], float] = {}  # -> deadline
        self._lock = threading.RLock()

    def excluded(self, address: IPAddress) -> bool:
        return any(address in cidr for cidr in self.exclude_cidrs)

    def draining(self) -> dict[tuple[VirtualServer, RealServer], float]:
        """Real servers at weight 0 waiting for their connections to end, with deadlines."""
        with self._lock:
            return dict(self._draining)

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
        wanted_sets = _parse_sets(state)
        with self._lock, _Kernel() as kernel, _failing("IPVS sync"):
            self.changes = []
            errors: list[str] = []
            sets = _read_sets(kernel)
            index = self._ensure_device(kernel)
            claims = _Claims.read(kernel, sets, index)
            bound = set(claims.bound)
            claims.bound |= state.addresses  # rule (a) now, not only from the next sync on
            self._sync_sets(kernel, sets, wanted_sets, errors)
            current = kernel.services()
            draining = {vs for vs, _ in self._draining}
            for vs, opts in sorted(state.services.items()):
                wanted = frozenset(state.real_servers.get(vs, ()))
                if (
                    not full
                    and vs in current
                    and vs not in draining
                    and (self._applied.get(vs) == (opts, wanted))
                ):
                    continue
                try:
                    self._sync_service(kernel, vs, opts, current.get(vs), state, errors)
                except NetlinkError as err:
                    errors.append(f"service {vs}: {err}")
            self._bind(kernel, index, state.addresses - bound, errors)
            for vs in sorted(current.keys() - state.services.keys()):
                if self._owned(vs, claims) and not self.excluded(vs.address):
                    self._delete_service(kernel, vs, errors)
            self._unbind(kernel, index, bound - state.addresses, errors)
            self._applied = (
                {}
                if errors
                else {
                    vs: (opts, frozenset(state.real_servers.get(vs, ())))
                    for vs, opts in state.services.items()
                }
            )
            if self.changes:
                log.info("IPVS sync: %d kernel changes", len(self.changes))
            if errors:
                raise IpvsError("; ".join(errors))

    def _ensure_device(self, kernel: _Kernel) -> int:
        index = kernel.device()
        if index is None:
            try:
                self._write(
                    f"add device {DUMMY_DEVICE}",
                    kernel.ipr.link,
                    "add",
                    ifname=DUMMY_DEVICE,
                    kind="dummy",
                )
            except NetlinkError as err:
                if err.code != errno.EEXIST:
                    raise IpvsError(f"cannot create {DUMMY_DEVICE}: {err}") from err
            index = kernel.device()
            if index is None:
                raise IpvsError(f"{DUMMY_DEVICE} vanished right after its creation")
        return index

    def _bind(
        self, kernel: _Kernel, index: int, addresses: set[IPAddress], errors: list[str]
    ) -> None:
        for ip in sorted(addresses, key=str):
            try:
                self._write(
                    f"bind {ip} to {DUMMY_DEVICE}",
                    kernel.ipr.addr,
                    "add",
                    index=index,
                    address=str(ip),
                    prefixlen=ip.max_prefixlen,
                )
            except NetlinkError as err:
                if err.code != errno.EEXIST:
                    errors.append(f"bind {ip}: {err}")

    def _unbind(
        self, kernel: _Kernel, index: int, addresses: set[IPAddress], errors: list[str]
    ) -> None:
        prefixes = {
            ip_address(m.get_attr("IFA_LOCAL") or m.get_attr("IFA_ADDRESS")): m["prefixlen"]
            for m in kernel.ipr.get_addr(index=index)
        }
        for ip in sorted(addresses, key=str):
            try:
                self._write(
                    f"unbind {ip} from {DUMMY_DEVICE}",
                    kernel.ipr.addr,
                    "del",
                    index=index,
                    address=str(ip),
                    prefixlen=prefixes.get(ip, ip.max_prefixlen),
                )
            except NetlinkError as err:
                if err.code not in (errno.EADDRNOTAVAIL, errno.ENXIO):
                    errors.append(f"unbind {ip}: {err}")

    def _sync_sets(
        self,
        kernel: _Kernel,
        sets: dict[str, _Set],
        wanted: dict[str, set[Member]],
        errors: list[str],
    ) -> None:
        """Create missing sets, then delete stale members before adding new ones."""
        for spec in IPSETS:
            current = sets.get(spec.name)
            try:
                if current is None:
                    self._write(
                        f"create ipset {spec.name}",
                        kernel.ipset.create,
                        spec.name,
                        **_create_options(spec),
                    )
                    current = sets[spec.name] = _Set(type=spec.type)
                elif current.type != spec.type:
                    errors.append(f"ipset {spec.name} is a {current.type}, not a {spec.type}")
                    continue
            except NetlinkError as err:
                errors.append(f"create ipset {spec.name}: {err}")
                continue
            want = wanted.get(spec.name, set())
            for verb, members in (("del", current.members - want), ("add", want - current.members)):
                for member in sorted(members, key=Member.text):
                    self._set_member(kernel, spec, verb, member, errors)

    def _set_member(
        self, kernel: _Kernel, spec: IpsetSpec, verb: str, member: Member, errors: list[str]
    ) -> None:
        call = kernel.ipset.add if verb == "add" else kernel.ipset.delete
        args = member.pyroute2_args(spec.type)
        try:
            self._write(
                f"{verb} {spec.name} {member.text()}", call, spec.name, exclusive=False, **args
            )
        except NetlinkError as err:
            if err.code != IPSET_ERR_EXIST:  # already added / already gone
                errors.append(f"{verb} {spec.name} {member.text()}: {err}")

    def _sync_service(
        self,
        kernel: _Kernel,
        vs: VirtualServer,
        opts: ServiceOptions,
        current: _Service | None,
        state: IpvsState,
        errors: list[str],
    ) -> None:
        wanted = _service_options(opts.scheduler, opts.persistence_timeout)
        msg = _service_msg(vs, opts)
        dests: dict[RealServer, _Dest] = {}
        if current is None:
            self._write(f"add service {vs}", kernel.ipvs.service, "add", service=msg)
        else:
            if (current.scheduler, current.flags, current.timeout) != wanted:
                # "set" edits in place: connections and stats stay ("update" would delete).
                scheduler, flags, timeout = wanted
                self._write(
                    f"set service {vs} scheduler {scheduler} flags {flags:#x} timeout {timeout}",
                    kernel.ipvs.service,
                    "set",
                    service=msg,
                )
            dests = kernel.dests(vs)
        self._sync_dests(kernel, vs, state.real_servers.get(vs, set()), dests, errors)

    def _sync_dests(
        self,
        kernel: _Kernel,
        vs: VirtualServer,
        wanted: set[RealServer],
        current: dict[RealServer, _Dest],
        errors: list[str],
    ) -> None:
        svc = _service_msg(vs)
        for rs in sorted(wanted):
            self._draining.pop((vs, rs), None)
            dest = current.get(rs)
            try:
                if dest is None:
                    self._write(
                        f"add {vs} -> {rs}",
                        kernel.ipvs.dest,
                        "add",
                        service=svc,
                        dest=_dest_msg(rs),
                    )
                elif (dest.weight, dest.fwd_method) != (1, MASQ):
                    self._write(
                        f"set {vs} -> {rs} weight 1",
                        kernel.ipvs.dest,
                        "set",
                        service=svc,
                        dest=_dest_msg(rs),
                    )
            except NetlinkError as err:
                errors.append(f"{vs} -> {rs}: {err}")
        for rs in sorted(current.keys() - wanted):
            try:
                self._retire(kernel, vs, current[rs])
            except NetlinkError as err:
                errors.append(f"remove {vs} -> {rs}: {err}")

    def _retire(self, kernel: _Kernel, vs: VirtualServer, dest: _Dest) -> None:
        """Remove an unwanted real server: at once if it can go, else weight 0 and drain."""
        key = (vs, dest.rs)
        if vs.protocol is not Protocol.TCP or dest.connections == 0:
            self._delete_dest(kernel, vs, dest.rs)
            return
        if dest.weight != 0:
            self._write(
                f"set {vs} -> {dest.rs} weight 0 (draining {dest.connections} connections)",
                kernel.ipvs.dest,
                "set",
                service=_service_msg(vs),
                dest=_dest_msg(dest.rs, 0),
            )
        self._draining.setdefault(key, self.clock() + self.drain_timeout)

    def _delete_dest(self, kernel: _Kernel, vs: VirtualServer, rs: RealServer) -> None:
        self._draining.pop((vs, rs), None)
        try:
            self._write(
                f"delete {vs} -> {rs}",
                kernel.ipvs.dest,
                "del",
                service=_service_msg(vs),
                dest=_dest_msg(rs),
            )
        except NetlinkError as err:
            if err.code not in GONE:
                raise
        if vs.protocol is not Protocol.TCP:
            clear_conntrack(vs, rs.address)

    def _delete_service(self, kernel: _Kernel, vs: VirtualServer, errors: list[str]) -> None:
        for key in [key for key in self._draining if key[0] == vs]:
            del self._draining[key]
        try:
            self._write(
                f"delete service {vs}", kernel.ipvs.service, "del", service=_service_msg(vs)
            )
        except NetlinkError as err:
            if err.code not in GONE:
                errors.append(f"delete service {vs}: {err}")
                return
        if vs.protocol is not Protocol.TCP:
            clear_conntrack(vs)

    # --- drain --------------------------------------------------------------------------------

    def drain(self) -> None:
        """Delete the draining real servers whose connections ended or whose time is up."""
        with self._lock:
            if not self._draining:
                return
            by_service: dict[VirtualServer, list[RealServer]] = defaultdict(list)
            for vs, rs in self._draining:
                by_service[vs].append(rs)
            errors: list[str] = []
            now = self.clock()
            with _Kernel() as kernel, _failing("IPVS drain"):
                for vs, servers in sorted(by_service.items()):
                    try:
                        dests = kernel.dests(vs)
                    except NetlinkError as err:
                        if err.code not in GONE:
                            errors.append(f"list {vs}: {err}")
                            continue
                        dests = {}
                    for rs in sorted(servers):
                        self._drain_one(kernel, vs, rs, dests.get(rs), now, errors)
            if errors:
                raise IpvsError("; ".join(errors))

    def _drain_one(
        self,
        kernel: _Kernel,
        vs: VirtualServer,
        rs: RealServer,
        dest: _Dest | None,
        now: float,
        errors: list[str],
    ) -> None:
        if dest is None:
            self._draining.pop((vs, rs), None)  # gone already (or its service)
            return
        if dest.connections and now < self._draining[(vs, rs)]:
            return
        if dest.connections:
            log.warning(
                "real server %s of %s still has %d connections after %.0fs of draining; "
                "deleting it",
                rs,
                vs,
                dest.connections,
                self.drain_timeout,
            )
        try:
            self._delete_dest(kernel, vs, rs)
        except NetlinkError as err:
            errors.append(f"delete {vs} -> {rs}: {err}")

    # --- other entry points -------------------------------------------------------------------

    def counts(self) -> tuple[int, int]:
        """(virtual services, real servers) the agent owns; (0, 0) where there is no ip_vs."""
        with self._lock, _Kernel() as kernel, _failing("IPVS counts"):
            if not _module_loaded("ip_vs"):
                return 0, 0
            owned = self._owned_services(kernel)
            return len(owned), sum(len(kernel.dests(vs)) for vs in owned)

    def _owned_services(self, kernel: _Kernel) -> list[VirtualServer]:
        """The kernel's virtual services the agent owns (module docstring)."""
        sets = _read_sets(kernel) if _module_loaded("ip_set") else {}
        claims = _Claims.read(kernel, sets, kernel.device())
        return [vs for vs in sorted(kernel.services()) if self._owned(vs, claims)]

    def check_scheduler(self, name: str) -> None:
        """Raise ValueError unless IPVS works here with this scheduler.

        As kube-proxy: fine if a service already uses it, else a probe service on
        198.51.100.0 (TEST-NET-2) is created with it and deleted. The kernel loads
        ``ip_vs_<name>`` on demand, so neither the module list nor /proc/net/ip_vs (which
        shows only schedulers in use) can answer; creating a service can.
        """
        with self._lock, _Kernel() as kernel:
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
                kernel.ipvs.service("add", service=_service_msg(probe, ServiceOptions(name)))
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
                kernel.ipvs.service("del", service=_service_msg(probe))
            if found is None or found.scheduler != name:
                raise ValueError(f"IPVS did not keep a service with scheduler {name!r}")

    def cleanup(self) -> None:
        """Remove the agent's services, kube-ipvs0 and the 17 ipsets, logging what fails.

        Never raises, and does nothing on a kernel without ip_vs or ipsets (it asks nothing
        that would load them). Run the iptables cleanup first: a set an iptables rule still
        uses cannot be destroyed, and is reported instead.
        """
        with self._lock, _Kernel() as kernel:
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
            self._draining.clear()

    def _cleanup_services(self, kernel: _Kernel) -> None:
        if not _module_loaded("ip_vs"):
            return
        errors: list[str] = []
        for vs in self._owned_services(kernel):
            if not self.excluded(vs.address):
                self._delete_service(kernel, vs, errors)
        for error in errors:
            log.warning("cleanup: %s", error)

    @staticmethod
    def _cleanup_device(kernel: _Kernel) -> None:
        index = kernel.device()
        if index is not None:
            kernel.ipr.link("del", index=index)
            log.info("cleanup: deleted %s", DUMMY_DEVICE)

    @staticmethod
    def _cleanup_sets(kernel: _Kernel) -> None:
        if not _module_loaded("ip_set"):
            return
        busy = []
        for spec in IPSETS:
            try:
                kernel.ipset.destroy(spec.name)
                log.info("cleanup: destroyed ipset %s", spec.name)
            except NetlinkError as err:
                if err.code == IPSET_ERR_BUSY:
                    busy.append(spec.name)
                elif err.code != errno.ENOENT:
                    log.warning("cleanup: cannot destroy ipset %s: %s", spec.name, err)
        if busy:
            log.warning(
                "cleanup: ipsets still referenced (by iptables rules?) were kept: %s",
                ", ".join(busy),
            )


def _read_sets(kernel: _Kernel) -> dict[str, _Set]:
    """kube-proxy's sets that exist, with their members."""
    found = ((spec.name, kernel.read_set(spec.name)) for spec in IPSETS)
    return {name: current for name, current in found if current is not None}


def _parse_sets(state: IpvsState) -> dict[str, set[Member]]:
    """The desired members, parsed up front: a bad state fails before any kernel write."""
    types = {spec.name: spec.type for spec in IPSETS}
    unknown = state.ipsets.keys() - types.keys()
    if unknown:
        raise ValueError(f"not kube-proxy ipsets: {', '.join(sorted(unknown))}")
    return {
        name: {parse_member(types[name], entry) for entry in entries}
        for name, entries in state.ipsets.items()
    }


def clear_conntrack(vs: VirtualServer, real_server: IPAddress | None = None) -> None:
    """Forget the flows of a UDP/SCTP service (or of one of its real servers).

    Without this, a client that keeps its source port keeps matching its old flow. "No flow
    matched" exits 1 and is the normal case.
    """
    argv = ["conntrack", "-D", "-p", vs.protocol.value, "--orig-dst", str(vs.address)]
    argv += ["--orig-port-dst", str(vs.port)]
    if real_server is not None:
        argv += ["--dst-nat", str(real_server)]
    try:
        done = subprocess.run(argv, capture_output=True, text=True, timeout=10, check=False)
    except (OSError, subprocess.TimeoutExpired) as err:
        log.warning("cannot clear conntrack flows (%s): %s", " ".join(argv[1:]), err)
        return
    if done.returncode not in (0, 1):
        log.warning("%s failed: %s", " ".join(argv), done.stderr.strip())


# --- sysctls ----------------------------------------------------------------------------------


def _kernel_version() -> tuple[int, int]:
    major, minor = os.uname().release.split(".")[:2]
    return int(major), int("".join(c for c in minor if c.isdigit()) or 0)


def set_sysctls(strict_arp: bool, proc: Path = PROC_SYS) -> None:
    """kube-proxy's IPVS-mode sysctls, each written only if it differs and logged.

    A failure on a ``net/ipv4/vs`` one is fatal, as in kube-proxy (IPVS mode would not work
    right without them); the others are logged.
    """
    wanted = [("net/ipv4/vs/conntrack", 1)]
    if (4, 1) <= _kernel_version() < (5, 9):
        wanted.append(("net/ipv4/vs/conn_reuse_mode", 0))  # fixed in 5.9 (kubernetes#93297)
    wanted += [
        ("net/ipv4/vs/expire_nodest_conn", 1),
        ("net/ipv4/vs/expire_quiescent_template", 1),
        ("net/ipv4/ip_forward", 1),
    ]
    if strict_arp:
        wanted += [("net/ipv4/conf/all/arp_ignore", 1), ("net/ipv4/conf/all/arp_announce", 2)]
    for name, value in wanted:
        path = proc / name
        try:
            before = path.read_text().strip()
            if before != str(value):
                path.write_text(f"{value}\n")
                log.info("Changed sysctl %s: before %s, after %s", name, before, value)
            else:
                log.debug("sysctl %s is %s already", name, before)
        except OSError as err:
            log.error("can't set sysctl %s to %d: %s", name, value, err)
            if name.startswith("net/ipv4/vs/"):
                raise OSError(f"can't set sysctl {name} to {value}: {err}") from err
