"""The netlink edge of IPVS mode: IPVS records, the kube-ipvs0 dummy device, its addresses.

What upstream keeps in pkg/proxy/ipvs/util (IPVS services and destinations over netlink)
and pkg/proxy/ipvs/netlink_linux.go (the dummy device and the addresses bound to it). The
ipsets have their own module (ipsets.py); they share the `Kernel` sockets defined here.

Messages are packed and read by hand over wire.py's sockets (why: wire.py), with the
attribute numbers of the kernel's uapi headers; the unit tests check them against
pyroute2's message classes. A `Kernel` lives for one public call of the applier: its
sockets are opened in the calling thread and closed before the call returns, so everything
happens in the caller's network namespace. Modifying a service or real server in place is
IPVS_CMD_SET_*, which keeps its connections and counters.
"""

from __future__ import annotations

import errno
import logging
import struct
from collections.abc import Callable, Collection, Iterable, Iterator, Mapping
from contextlib import contextmanager
from ipaddress import IPv4Address, IPv6Address
from pathlib import Path
from socket import AF_INET, AF_INET6, AF_UNSPEC, IPPROTO_TCP, IPPROTO_UDP
from types import TracebackType
from typing import NamedTuple, Self

from pyroute2.netlink.exceptions import NetlinkError as NetlinkError

from pykubeproxy.ipvs.state import DUMMY_DEVICE, RealServer, ServiceOptions, VirtualServer
from pykubeproxy.ipvs.wire import (
    BE16,
    NETLINK_NETFILTER,
    NETLINK_ROUTE,
    NLM_F_ACK,
    NLM_F_CREATE,
    NLM_F_DUMP,
    NLM_F_EXCL,
    U16,
    U32,
    Channel,
    GenericChannel,
    Memo,
    asciiz,
    attr,
    attrs,
    error,
    nested,
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
PROTOCOL_NAMES = {proto.value.upper(): proto for proto in PROTOCOL_NUMBERS}
PROC_IP_VS = "/proc/thread-self/net/ip_vs"
MASQ = 0  # IP_VS_CONN_F_MASQ: kube-proxy's forwarding method
FORWARDING = {"Masq": MASQ, "Local": 1, "Tunnel": 2, "Route": 3}  # IP_VS_CONN_F_* by name
F_PERSISTENT = 0x1  # IP_VS_SVC_F_PERSISTENT
F_HASHED = 0x2  # IP_VS_SVC_F_HASHED: set by the kernel on every service
F_SCHED_MH_PORT = 0x10  # IP_VS_SVC_F_SCHED2: kube-proxy's FlagSourceHash, set with "mh"
GONE = (errno.ENOENT, errno.ESRCH)  # what IPVS answers about a missing service or dest
SYSFS_MODULES = Path("/sys/module")


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


class KernelService(NamedTuple):
    """A kernel virtual service: its identity and the options a sync may change in place.
    (The kernel's records are NamedTuples: a sync reads thousands, and they build fast.)"""

    vs: VirtualServer
    scheduler: str
    flags: int  # without IP_VS_SVC_F_HASHED
    timeout: int


class KernelDest(NamedTuple):
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


# IPVS generic netlink (include/uapi/linux/ip_vs.h): commands and attributes.
IPVS_CMD_NEW_SERVICE, IPVS_CMD_SET_SERVICE, IPVS_CMD_DEL_SERVICE, IPVS_CMD_GET_SERVICE = 1, 2, 3, 4
IPVS_CMD_NEW_DEST, IPVS_CMD_SET_DEST, IPVS_CMD_DEL_DEST, IPVS_CMD_GET_DEST = 5, 6, 7, 8
IPVS_CMD_ATTR_SERVICE, IPVS_CMD_ATTR_DEST = 1, 2
SVC_AF, SVC_PROTOCOL, SVC_ADDR, SVC_PORT, SVC_FWMARK = 1, 2, 3, 4, 5
SVC_SCHED_NAME, SVC_FLAGS, SVC_TIMEOUT, SVC_NETMASK = 6, 7, 8, 9
DEST_ADDR, DEST_PORT, DEST_FWD_METHOD, DEST_WEIGHT, DEST_U_THRESH, DEST_L_THRESH = 1, 2, 3, 4, 5, 6
DEST_ACTIVE_CONNS, DEST_INACT_CONNS, DEST_ADDR_FAMILY = 7, 8, 11
GENL_VERSION = 1
FLAGS = struct.Struct("=II")  # struct ip_vs_flags: flags, mask
# rtnetlink (include/uapi/linux/rtnetlink.h, if_addr.h, if_link.h)
RTM_NEWLINK, RTM_DELLINK, RTM_GETLINK = 16, 17, 18
RTM_NEWADDR, RTM_DELADDR, RTM_GETADDR = 20, 21, 22
IFA_ADDRESS, IFA_LOCAL = 1, 2
IFLA_IFNAME, IFLA_LINKINFO, IFLA_INFO_KIND = 3, 18, 1
IFADDRMSG = struct.Struct("=BBBBI")  # family, prefixlen, flags, scope, index
IFINFOMSG = struct.Struct("=BxHiII")  # family, type, index, flags, change


def _family(ip: IPAddress) -> int:
    return AF_INET if ip.version == 4 else AF_INET6


def _genl(cmd: int) -> bytes:
    return struct.pack("=BBH", cmd, GENL_VERSION, 0)


def service_key(vs: VirtualServer) -> bytes:
    """The attributes that name a virtual service (all a delete or a dump of its dests needs)."""
    return (
        attr(SVC_AF, U16.pack(_family(vs.address)))
        + attr(SVC_PROTOCOL, U16.pack(PROTOCOL_NUMBERS[vs.protocol]))
        + attr(SVC_ADDR, vs.address.packed)
        + attr(SVC_PORT, BE16.pack(vs.port))
    )


def service_attrs(vs: VirtualServer, opts: ServiceOptions | None = None) -> bytes:
    """IPVS_CMD_ATTR_SERVICE in full, as "add" and "set" need it: every flag is as kube-proxy
    sets it (mask 0xffff); an IPv4 netmask is /32, an IPv6 one the prefix length 128."""
    scheduler, flags, timeout = service_options(opts or ServiceOptions())
    netmask = b"\xff" * 4 if vs.address.version == 4 else U32.pack(128)
    return nested(
        IPVS_CMD_ATTR_SERVICE,
        service_key(vs),
        asciiz(SVC_SCHED_NAME, scheduler),
        attr(SVC_FLAGS, FLAGS.pack(flags, 0xFFFF)),
        attr(SVC_TIMEOUT, U32.pack(timeout)),
        attr(SVC_NETMASK, netmask),
    )


def dest_attrs(rs: RealServer, weight: int = 1) -> bytes:
    """IPVS_CMD_ATTR_DEST in full: masquerading, no connection thresholds."""
    return nested(
        IPVS_CMD_ATTR_DEST,
        attr(DEST_ADDR, rs.address.packed),
        attr(DEST_PORT, BE16.pack(rs.port)),
        attr(DEST_FWD_METHOD, U32.pack(MASQ)),
        attr(DEST_WEIGHT, U32.pack(weight)),
        attr(DEST_U_THRESH, U32.pack(0)),
        attr(DEST_L_THRESH, U32.pack(0)),
        attr(DEST_ADDR_FAMILY, U16.pack(_family(rs.address))),
    )


def nested_service_key(vs: VirtualServer) -> bytes:
    """IPVS_CMD_ATTR_SERVICE with the key only: a delete, a get, a dump of real servers."""
    return nested(IPVS_CMD_ATTR_SERVICE, service_key(vs))


def dest_body(vs: VirtualServer, rs: RealServer, weight: int = 1) -> bytes:
    """The attributes of a real server command: its service's key and the real server."""
    return nested_service_key(vs) + dest_attrs(rs, weight)


def _address(data: bytes, family: int) -> IPAddress:
    """An address attribute: IPVS sends a 16-byte union nf_inet_addr, IPv4 in front."""
    return IPv4Address(data[:4]) if family == AF_INET else IPv6Address(data[:16])


def parse_service(body: bytes) -> KernelService | None:
    """A service from a reply; None for fwmark services and unknown protocols."""
    svc = attrs(attrs(body, 4).get(IPVS_CMD_ATTR_SERVICE, b""))
    proto = PROTOCOLS.get(U16.unpack_from(svc.get(SVC_PROTOCOL, b"\0\0"))[0])
    if SVC_ADDR not in svc or proto is None or any(svc.get(SVC_FWMARK, b"")):
        return None
    family = U16.unpack_from(svc[SVC_AF])[0] if SVC_AF in svc else AF_INET
    flags = FLAGS.unpack_from(svc[SVC_FLAGS])[0] if SVC_FLAGS in svc else 0
    address = _address(svc[SVC_ADDR], family)
    return KernelService(
        vs=VirtualServer(address, BE16.unpack_from(svc[SVC_PORT])[0], proto),
        scheduler=svc.get(SVC_SCHED_NAME, b"").split(b"\0", 1)[0].decode(),
        flags=flags & ~F_HASHED,
        timeout=U32.unpack_from(svc[SVC_TIMEOUT])[0] if SVC_TIMEOUT in svc else 0,
    )


def _parse_dest(body: bytes, family: int) -> KernelDest:
    dest = attrs(attrs(body, 4)[IPVS_CMD_ATTR_DEST])
    if DEST_ADDR_FAMILY in dest:
        family = U16.unpack_from(dest[DEST_ADDR_FAMILY])[0]

    def u32(kind: int) -> int:
        return int(U32.unpack_from(dest[kind])[0]) if kind in dest else 0

    return KernelDest(
        rs=RealServer(_address(dest[DEST_ADDR], family), BE16.unpack_from(dest[DEST_PORT])[0]),
        weight=u32(DEST_WEIGHT),
        fwd_method=u32(DEST_FWD_METHOD),
        connections=u32(DEST_ACTIVE_CONNS) + u32(DEST_INACT_CONNS),
    )


def _proc_text(ip: IPAddress, port: int) -> str:
    """An address and port as /proc/net/ip_vs prints them (``%08X:%04X``, ``[%pI6]:%04X``)."""
    if ip.version == 4:
        return f"{int(ip):08X}:{port:04X}"
    return f"[{ip.exploded}]:{port:04X}"


def _proc_endpoint(text: str) -> tuple[IPAddress, int]:
    """The address and port of a `_proc_text`."""
    address, port = text.rsplit(":", 1)
    if address.startswith("["):
        return IPv6Address(address[1:-1]), int(port, 16)
    return IPv4Address(int(address, 16)), int(port, 16)


class ProcDests(Mapping[RealServer, KernelDest]):
    """One virtual service's real servers as /proc/net/ip_vs lists them (``-> 0AF40002:1F90
    Masq 1 0 0``: forwarding, weight, active and inactive connections), each parsed only
    when looked up: a sync looks up the real servers it wants, and printing one of those as
    the kernel does costs less than parsing every line into objects."""

    def __init__(self) -> None:
        self.lines: dict[str, str] = {}  # "0AF40002:1F90" -> "Masq 1 0 0"

    def __getitem__(self, rs: RealServer) -> KernelDest:
        forwarding, weight, active, inactive = self.lines[_proc_text(rs.address, rs.port)].split()
        connections = int(active) + int(inactive)
        return KernelDest(rs, int(weight), FORWARDING.get(forwarding, MASQ), connections)

    def __iter__(self) -> Iterator[RealServer]:
        return (RealServer(*_proc_endpoint(text)) for text in self.lines)

    def exactly(self, wanted: Collection[RealServer]) -> bool:
        """True if these are the wanted real servers and no others, each masqueraded at
        weight 1: what a sync would leave as it is. Compared as text, without objects: an
        agent's first full sync over a kernel it programmed before checks every one."""
        lines = self.lines
        if len(lines) != len(wanted):
            return False
        for rs in wanted:
            line = lines.get(_proc_text(rs.address, rs.port))
            if line is None:
                return False
            forwarding, weight, *_ = line.split(None, 2)
            if weight != "1" or FORWARDING.get(forwarding) != MASQ:
                return False
        return True

    def __len__(self) -> int:
        return len(self.lines)


class ProcTable:
    """/proc/net/ip_vs (ip_vs_info_seq_show in the kernel's ip_vs_ctl.c): a line per virtual
    service (``TCP  0A600001:0050 rr``), then one per real server; fwmark services are left
    out."""

    def __init__(self, text: str) -> None:
        self.services: dict[str, ProcDests] = {}
        dests: ProcDests | None = None
        for line in text.splitlines()[3:]:  # after the three header lines
            words = line.split(None, 2)
            if len(words) < 2:
                continue
            if words[0] == "->":
                if dests is not None and len(words) == 3:
                    dests.lines[words[1]] = words[2]
            elif words[0] in PROTOCOL_NAMES:
                dests = self.services[f"{words[0]} {words[1]}"] = ProcDests()
            else:
                dests = None

    def get(self, vs: VirtualServer) -> ProcDests:
        """The real servers of one virtual service (none if the file does not list it)."""
        key = f"{vs.protocol.value.upper()} {_proc_text(vs.address, vs.port)}"
        return self.services.get(key) or ProcDests()


class KernelAddress(NamedTuple):
    """An address of some device of the namespace."""

    ifindex: int
    ip: IPAddress
    prefixlen: int


def parse_address(body: bytes) -> KernelAddress | None:
    family, prefixlen, _, _, index = IFADDRMSG.unpack_from(body)
    found = attrs(body, IFADDRMSG.size)
    data = found.get(IFA_LOCAL) or found.get(IFA_ADDRESS)
    if data is None or family not in (AF_INET, AF_INET6):
        return None
    return KernelAddress(index, _address(data, family), prefixlen)


# What a refused write does with the refusal.
Refused = Callable[[NetlinkError], None]


def refusal(problems: Problems, what: str, ignore: Collection[int] = ()) -> Refused:
    """Report a refusal as `what: error`, unless its code is one of `ignore`."""

    def refused(err: NetlinkError) -> None:
        if err.code not in ignore:
            problems.add(f"{what}: {err}")

    return refused


class Kernel:
    """The netlink sockets of one public call, opened on first use in the calling thread.

    Writes are queued (`write_ipvs`, `write_address`; ipsets.py has its own) and sent when
    `flush` is called or a read on the same socket needs them done first; each write that
    the kernel took is logged and appended to `written`.
    """

    def __init__(self, written: list[str] | None = None) -> None:
        self.written = written if written is not None else []
        self._ipvs: GenericChannel | None = None
        self._rtnl: Channel | None = None
        self._nfnl: Channel | None = None

    @property
    def ipvs(self) -> GenericChannel:
        if self._ipvs is None:
            self._ipvs = GenericChannel("IPVS")
        return self._ipvs

    @property
    def rtnl(self) -> Channel:
        if self._rtnl is None:
            self._rtnl = Channel(NETLINK_ROUTE)
        return self._rtnl

    @property
    def nfnl(self) -> Channel:
        if self._nfnl is None:
            self._nfnl = Channel(NETLINK_NETFILTER)
        return self._nfnl

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self, et: type[BaseException] | None, ev: BaseException | None, tb: TracebackType | None
    ) -> None:
        for channel in (self._ipvs, self._rtnl, self._nfnl):
            if channel is not None:
                channel.close()

    def write(
        self, channel: Channel, what: str, kind: int, flags: int, payload: bytes, refused: Refused
    ) -> None:
        """Queue one write on channel."""

        def done(code: int) -> None:
            if code:
                refused(error(code))
            else:
                log.debug("IPVS applier: %s", what)
                self.written.append(what)

        channel.queue(kind, flags, payload, done)

    def flush(self) -> None:
        """Send every queued write; refusals reach their `Refused` before this returns."""
        for channel in (self._nfnl, self._ipvs, self._rtnl):
            if channel is not None:
                channel.flush()

    # IPVS

    def write_ipvs(self, what: str, cmd: int, body: bytes, refused: Refused) -> None:
        self.write(self.ipvs, what, self.ipvs.family, 0, _genl(cmd) + body, refused)

    def call_ipvs(self, cmd: int, body: bytes) -> None:
        """One IPVS command, answered at once (raises NetlinkError if refused)."""
        self.ipvs.request(self.ipvs.family, NLM_F_ACK, _genl(cmd) + body)

    def services(
        self, memo: Memo[bytes, KernelService | None] | None = None
    ) -> dict[VirtualServer, KernelService]:
        """Every virtual service, in one dump."""
        replies = self.ipvs.request(self.ipvs.family, NLM_F_DUMP, _genl(IPVS_CMD_GET_SERVICE))
        found = memo(replies) if memo else map(parse_service, replies)
        return {svc.vs: svc for svc in found if svc is not None}

    def service(self, vs: VirtualServer) -> KernelService | None:
        """One virtual service, None if the kernel has none such."""
        ask = _genl(IPVS_CMD_GET_SERVICE) + nested_service_key(vs)
        try:
            replies = self.ipvs.request(self.ipvs.family, 0, ask)
        except NetlinkError as err:
            if err.code in GONE:
                return None
            raise
        return next((svc for svc in map(parse_service, replies) if svc is not None), None)

    def real_servers(self) -> ProcTable:
        """The real servers of every virtual service, in one read of /proc/net/ip_vs (this
        thread's namespace's): IPVS's netlink dumps the real servers of one service at a
        time, and this file lists them all with what a sync compares."""
        return ProcTable(Path(PROC_IP_VS).read_text())

    def dests(self, vs: VirtualServer) -> dict[RealServer, KernelDest]:
        """The real servers of one virtual service (none if there is no such service)."""
        ask = _genl(IPVS_CMD_GET_DEST) + nested_service_key(vs)
        replies = self.ipvs.request(self.ipvs.family, NLM_F_DUMP, ask)
        found = (_parse_dest(body, _family(vs.address)) for body in replies)
        return {dest.rs: dest for dest in found}

    # kube-ipvs0 and addresses

    def device(self) -> int | None:
        """kube-ipvs0's index, None if there is no such device."""
        ask = IFINFOMSG.pack(AF_UNSPEC, 0, 0, 0, 0) + asciiz(IFLA_IFNAME, DUMMY_DEVICE)
        try:
            (reply,) = self.rtnl.request(RTM_GETLINK, 0, ask)
        except NetlinkError as err:
            if err.code == errno.ENODEV:
                return None
            raise
        return int(IFINFOMSG.unpack_from(reply)[2])

    def addresses(
        self, memo: Memo[bytes, KernelAddress | None] | None = None
    ) -> list[KernelAddress]:
        """Every address of every device, in one dump (IPv6 link-local left out)."""
        replies = self.rtnl.request(RTM_GETADDR, NLM_F_DUMP, IFADDRMSG.pack(AF_UNSPEC, 0, 0, 0, 0))
        found = memo(replies) if memo else map(parse_address, replies)
        return [a for a in found if a is not None and (not a.ip.is_link_local or a.ip.version == 4)]

    def write_address(
        self, what: str, kind: int, index: int, ip: IPAddress, prefixlen: int, refused: Refused
    ) -> None:
        """Queue RTM_NEWADDR (a new host address: it fails with EEXIST if bound) or RTM_DELADDR."""
        flags = NLM_F_CREATE | NLM_F_EXCL if kind == RTM_NEWADDR else 0
        body = (
            IFADDRMSG.pack(_family(ip), prefixlen, 0, 0, index)
            + attr(IFA_LOCAL, ip.packed)
            + attr(IFA_ADDRESS, ip.packed)
        )
        self.write(self.rtnl, what, kind, flags, body, refused)

    def create_device(self) -> None:
        """Create kube-ipvs0, a dummy device (left down)."""
        body = (
            IFINFOMSG.pack(AF_UNSPEC, 0, 0, 0, 0)
            + asciiz(IFLA_IFNAME, DUMMY_DEVICE)
            + nested(IFLA_LINKINFO, asciiz(IFLA_INFO_KIND, "dummy"))
        )
        self.rtnl.request(RTM_NEWLINK, NLM_F_ACK | NLM_F_CREATE | NLM_F_EXCL, body)

    def delete_device(self, index: int) -> None:
        self.rtnl.request(RTM_DELLINK, NLM_F_ACK, IFINFOMSG.pack(AF_UNSPEC, 0, index, 0, 0))


def ensure_device(kernel: Kernel) -> int:
    """kube-ipvs0's index, creating the dummy device (left down, as upstream) if missing."""
    index = kernel.device()
    if index is None:
        try:
            kernel.create_device()
            kernel.written.append(f"add device {DUMMY_DEVICE}")
        except NetlinkError as err:
            if err.code != errno.EEXIST:
                raise IpvsError(f"cannot create {DUMMY_DEVICE}: {err}") from err
        index = kernel.device()
        if index is None:
            raise IpvsError(f"{DUMMY_DEVICE} vanished right after its creation")
    return index


def bind(kernel: Kernel, index: int, addresses: Iterable[IPAddress], problems: Problems) -> None:
    """Queue adding each address to kube-ipvs0 as a host address (/32, /128)."""
    for ip in sorted(addresses, key=str):
        what = f"bind {ip} to {DUMMY_DEVICE}"
        kernel.write_address(what, RTM_NEWADDR, index, ip, ip.max_prefixlen,
                             refusal(problems, what, ignore=(errno.EEXIST,)))  # fmt: skip


def unbind(
    kernel: Kernel,
    index: int,
    addresses: Iterable[IPAddress],
    prefixes: dict[IPAddress, int],
    problems: Problems,
) -> None:
    """Queue removing each address from kube-ipvs0, with the prefix length it was bound with
    (`prefixes`, from a read; a host prefix otherwise)."""
    for ip in sorted(addresses, key=str):
        what = f"unbind {ip} from {DUMMY_DEVICE}"
        refused = refusal(problems, what, ignore=(errno.EADDRNOTAVAIL, errno.ENXIO))
        prefixlen = prefixes.get(ip, ip.max_prefixlen)
        kernel.write_address(what, RTM_DELADDR, index, ip, prefixlen, refused)


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
