"""The netlink edge of IPVS mode: IPVS records, the kube-ipvs0 dummy device, its addresses.

What upstream keeps in pkg/proxy/ipvs/util (IPVS services and destinations over netlink)
and pkg/proxy/ipvs/netlink_linux.go (the dummy device and the addresses bound to it). The
ipsets have their own module (ipsets.py); they share the `Kernel` sockets defined here.

Namespaces and pyroute2 0.9 quirks: a pyroute2 object keeps one netlink socket per thread,
opened on first use, so its namespace is that of the thread *using* it. A `Kernel` lives
for one public call of the applier: its sockets are opened in the calling thread and closed
before the call returns, so everything happens in the caller's network namespace.
``IPVS.service("update")`` and ``dest("update")`` send IPVS_CMD_DEL_*: modify with "set".
``IPVSDest`` defaults to ``fwd_method=3`` (direct routing) and ``from_message`` drops fields
(timeout, flags, fwd_method keep their defaults), so messages are built with every field and
read raw.
"""

from __future__ import annotations

import errno
import logging
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from ipaddress import ip_address
from pathlib import Path
from socket import IPPROTO_TCP, IPPROTO_UDP
from types import TracebackType
from typing import Any, Self

from pyroute2 import IPVS, IPRoute, IPVSDest, IPVSService
from pyroute2.ipset import IPSet
from pyroute2.netlink.exceptions import NetlinkError as NetlinkError

from pykubeproxy.ipvs.state import DUMMY_DEVICE, RealServer, ServiceOptions, VirtualServer
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
GONE = (errno.ENOENT, errno.ESRCH)  # what IPVS answers about a missing service or dest
SYSFS_MODULES = Path("/sys/module")

# One kernel write: fn(*args, **kwargs), described for the log and the applier's `changes`.
Write = Callable[..., None]


class IpvsError(RuntimeError):
    """The kernel could not be made to match the state."""


class KernelRefused(IpvsError):
    """The kernel refused some virtual servers, real servers, addresses or set members;
    everything else was applied."""


class Problems:
    """The kernel refusals of one call, each logged when it happens.

    A refusal concerns one virtual server, real server, address or set member; the call
    goes on with the rest and ends by raising one `KernelRefused` that names them all, so
    the sync counts as failed (and is retried) while every other Service is in place.
    """

    def __init__(self, what: str) -> None:
        self.what = what
        self.messages: list[str] = []

    def add(self, message: str) -> None:
        log.error("%s: %s", self.what, message)
        self.messages.append(message)

    def __bool__(self) -> bool:
        return bool(self.messages)

    def raise_any(self) -> None:
        if self.messages:
            count = len(self.messages)
            raise KernelRefused(f"{self.what}: {count} kernel errors: {'; '.join(self.messages)}")


@dataclass(frozen=True)
class KernelService:
    """A kernel virtual service: its identity and the options a sync may change in place."""

    vs: VirtualServer
    scheduler: str
    flags: int  # without IP_VS_SVC_F_HASHED
    timeout: int


@dataclass(frozen=True)
class KernelDest:
    """A kernel real server of one virtual service."""

    rs: RealServer
    weight: int
    fwd_method: int
    connections: int  # ActiveConn + InactiveConn


def service_options(opts: ServiceOptions) -> tuple[str, int, int]:
    """(scheduler, flags, timeout) as kube-proxy sets them on a virtual service: ClientIP
    affinity makes it persistent for the affinity timeout (upstream's syncProxyRules)."""
    flags = F_PERSISTENT if opts.persistence_timeout is not None else 0
    if opts.scheduler == "mh":
        flags |= F_SCHED_MH_PORT
    return opts.scheduler, flags, opts.persistence_timeout or 0


def service_msg(vs: VirtualServer, opts: ServiceOptions | None = None) -> Any:
    """A complete service record: "add" and "set" need every field, "del" only the key."""
    scheduler, flags, timeout = service_options(opts or ServiceOptions())
    return IPVSService(
        addr=str(vs.address),
        port=vs.port,
        protocol=PROTOCOL_NUMBERS[vs.protocol],
        sched_name=scheduler,
        flags={"flags": flags, "mask": 0xFFFF},  # ours: every flag is as kube-proxy sets it
        timeout=timeout,
    )


def dest_msg(rs: RealServer, weight: int = 1) -> Any:
    return IPVSDest(addr=str(rs.address), port=rs.port, fwd_method=MASQ, weight=weight)


def _parse_service(msg: Any) -> KernelService | None:
    """A service from a dump message; None for fwmark services and unknown protocols."""
    attrs = msg.get_attr("IPVS_CMD_ATTR_SERVICE")
    addr = attrs.get_attr("IPVS_SVC_ATTR_ADDR")
    proto = PROTOCOLS.get(attrs.get_attr("IPVS_SVC_ATTR_PROTOCOL"))
    if addr is None or proto is None or attrs.get_attr("IPVS_SVC_ATTR_FWMARK"):
        return None
    flags = attrs.get_attr("IPVS_SVC_ATTR_FLAGS") or {}
    return KernelService(
        vs=VirtualServer(ip_address(addr), attrs.get_attr("IPVS_SVC_ATTR_PORT"), proto),
        scheduler=attrs.get_attr("IPVS_SVC_ATTR_SCHED_NAME") or "",
        flags=flags.get("flags", 0) & ~F_HASHED,
        timeout=attrs.get_attr("IPVS_SVC_ATTR_TIMEOUT") or 0,
    )


def _parse_dest(msg: Any) -> KernelDest:
    attrs = msg.get_attr("IPVS_CMD_ATTR_DEST")
    active = attrs.get_attr("IPVS_DEST_ATTR_ACTIVE_CONNS") or 0
    inactive = attrs.get_attr("IPVS_DEST_ATTR_INACT_CONNS") or 0
    return KernelDest(
        rs=RealServer(
            ip_address(attrs.get_attr("IPVS_DEST_ATTR_ADDR")),
            attrs.get_attr("IPVS_DEST_ATTR_PORT"),
        ),
        weight=attrs.get_attr("IPVS_DEST_ATTR_WEIGHT"),
        fwd_method=attrs.get_attr("IPVS_DEST_ATTR_FWD_METHOD"),
        connections=active + inactive,
    )


class Kernel:
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

    def services(self) -> dict[VirtualServer, KernelService]:
        found = (_parse_service(msg) for msg in self.ipvs.service("dump"))
        return {svc.vs: svc for svc in found if svc is not None}

    def dests(self, vs: VirtualServer) -> dict[RealServer, KernelDest]:
        found = (_parse_dest(msg) for msg in self.ipvs.dest("dump", service=service_msg(vs)))
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


def ensure_device(kernel: Kernel, write: Write) -> int:
    """kube-ipvs0's index, creating the dummy device (left down, as upstream) if missing."""
    index = kernel.device()
    if index is None:
        try:
            write(f"add device {DUMMY_DEVICE}", kernel.ipr.link, "add", ifname=DUMMY_DEVICE,
                  kind="dummy")  # fmt: skip
        except NetlinkError as err:
            if err.code != errno.EEXIST:
                raise IpvsError(f"cannot create {DUMMY_DEVICE}: {err}") from err
        index = kernel.device()
        if index is None:
            raise IpvsError(f"{DUMMY_DEVICE} vanished right after its creation")
    return index


def bind(
    kernel: Kernel, write: Write, index: int, addresses: set[IPAddress], problems: Problems
) -> None:
    """Add each address to kube-ipvs0 as a host address (/32, /128)."""
    for ip in sorted(addresses, key=str):
        try:
            write(f"bind {ip} to {DUMMY_DEVICE}", kernel.ipr.addr, "add", index=index,
                  address=str(ip), prefixlen=ip.max_prefixlen)  # fmt: skip
        except NetlinkError as err:
            if err.code != errno.EEXIST:
                problems.add(f"bind {ip} to {DUMMY_DEVICE}: {err}")


def unbind(
    kernel: Kernel, write: Write, index: int, addresses: set[IPAddress], problems: Problems
) -> None:
    """Remove each address from kube-ipvs0, with the prefix length it was bound with."""
    prefixes = {
        ip_address(m.get_attr("IFA_LOCAL") or m.get_attr("IFA_ADDRESS")): m["prefixlen"]
        for m in kernel.ipr.get_addr(index=index)
    }
    for ip in sorted(addresses, key=str):
        try:
            write(f"unbind {ip} from {DUMMY_DEVICE}", kernel.ipr.addr, "del", index=index,
                  address=str(ip), prefixlen=prefixes.get(ip, ip.max_prefixlen))  # fmt: skip
        except NetlinkError as err:
            if err.code not in (errno.EADDRNOTAVAIL, errno.ENXIO):
                problems.add(f"unbind {ip} from {DUMMY_DEVICE}: {err}")


@contextmanager
def failing(what: str) -> Iterator[None]:
    """Report a netlink error nobody expected (e.g. no ip_vs) as an IpvsError."""
    try:
        yield
    except NetlinkError as err:
        raise IpvsError(f"{what} failed: {err}") from err


def module_loaded(name: str) -> bool:
    """Whether a kernel module is loaded or built in, without loading it by asking."""
    return (SYSFS_MODULES / name).exists()
