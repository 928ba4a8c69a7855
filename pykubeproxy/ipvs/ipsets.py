"""kube-proxy's ipsets over netlink: members as values, sets synced by difference.

Upstream (pkg/proxy/ipvs/ipset.go, ``syncIPSetEntries``) creates every set at each sync
(creation of an existing one is harmless), then deletes the members the sync no longer
wants before adding the new ones; sets are never flushed or destroyed while the proxy runs.

Netlink is used instead of the ``ipset`` CLI (nfnetlink, packed by hand over wire.py's
sockets): members are read as structured attributes (so a desired ``ip,tcp:80,10.0.0.1/32``
and the kernel's ``...,10.0.0.1`` compare equal instead of churning every sync), no ipset
binary is needed, everything runs in the calling thread's namespace like the other sockets,
and member writes go out in batches. A full sync reads each set with one ``list`` dump; a
partial sync reads nothing and writes the difference between the members the last sync
wanted and those this one wants.
"""

from __future__ import annotations

import errno
import logging
import struct
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from ipaddress import IPv4Address, IPv6Address, ip_network
from socket import AF_INET, AF_INET6, inet_pton
from typing import NamedTuple

from pykubeproxy.ipvs.netlink import (
    PROTOCOL_NUMBERS,
    PROTOCOLS,
    Kernel,
    NetlinkError,
    Problems,
    refusal,
)
from pykubeproxy.ipvs.state import IPSETS, IpsetSpec, IpvsState
from pykubeproxy.ipvs.wire import (
    ATTR,
    BE16,
    BE32,
    NLA_F_NET_BYTEORDER,
    NLA_TYPE_MASK,
    NLM_F_ACK,
    NLM_F_DUMP,
    NLM_F_EXCL,
    Memo,
    asciiz,
    attr,
    attrs,
    nested,
    repeated,
)
from pykubeproxy.model import IPAddress, Protocol

log = logging.getLogger(__name__)

# include/uapi/linux/netfilter/ipset/ip_set.h
NFNL_SUBSYS_IPSET = 6
IPSET_PROTOCOL = 6  # accepted by every kernel since 2.6.39 (the newest speak 6 and 7)
IPSET_CMD_CREATE, IPSET_CMD_DESTROY, IPSET_CMD_LIST = 2, 3, 7
IPSET_CMD_ADD, IPSET_CMD_DEL, IPSET_CMD_TYPE = 9, 10, 13
ATTR_PROTOCOL, ATTR_SETNAME, ATTR_TYPENAME, ATTR_REVISION, ATTR_FAMILY = 1, 2, 3, 4, 5
ATTR_DATA, ATTR_ADT = 7, 8
# in IPSET_ATTR_DATA
ATTR_IP, ATTR_PORT, ATTR_PORT_TO, ATTR_PROTO = 1, 4, 5, 7
ATTR_HASHSIZE, ATTR_MAXELEM, ATTR_IP2, ATTR_CIDR2 = 18, 19, 20, 21
IPADDR_IPV4, IPADDR_IPV6 = 1, 2
IPSET_ERR_BUSY = 4100
IPSET_ERR_EXIST = 4103
NFGENMSG = struct.Struct(">BBH")  # family, version, resource id


def _message(cmd: int, *parts: bytes) -> tuple[int, bytes]:
    """(netlink type, payload) of an ipset command."""
    body = NFGENMSG.pack(AF_INET, 0, 0) + attr(ATTR_PROTOCOL, bytes([IPSET_PROTOCOL]))
    return NFNL_SUBSYS_IPSET << 8 | cmd, body + b"".join(parts)


def _name(name: str) -> bytes:
    return asciiz(ATTR_SETNAME, name)


def _ip(kind: int, ip: IPAddress) -> bytes:
    family = IPADDR_IPV4 if ip.version == 4 else IPADDR_IPV6
    return nested(kind, attr(family | NLA_F_NET_BYTEORDER, ip.packed))


def _be(kind: int, data: bytes) -> bytes:
    return attr(kind | NLA_F_NET_BYTEORDER, data)


class Member(NamedTuple):
    """One ipset member in structured form: desired text and kernel listings compare exactly
    (a NamedTuple: a sync reads and compares thousands)."""

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

    def data(self, set_type: str) -> bytes:
        """The member as the IPSET_ATTR_DATA of an add or a delete in a set of that type."""
        if self.ip is None:
            return nested(ATTR_DATA, _be(ATTR_PORT, BE16.pack(self.port or 0)))
        parts = [_ip(ATTR_IP, self.ip)]
        if self.port is not None:
            parts += (_be(ATTR_PORT, BE16.pack(self.port)),
                      _be(ATTR_PROTO, bytes([self.proto or 0])))  # fmt: skip
        if self.ip2 is not None:
            parts.append(_ip(ATTR_IP2, self.ip2))
            if set_type.endswith("net"):
                cidr = self.ip2.max_prefixlen if self.cidr2 is None else self.cidr2
                parts.append(_be(ATTR_CIDR2, bytes([cidr])))
        return nested(ATTR_DATA, *parts)


def _parse_ip(text: str) -> IPAddress:
    """An address in text, as ``ipaddress.ip_address`` reads it but parsed in C: a sync
    after a restart parses every member it wants."""
    for family, kind in ((AF_INET, IPv4Address), (AF_INET6, IPv6Address)):
        try:
            return kind(inet_pton(family, text))
        except OSError:
            continue
    raise ValueError(f"{text!r} is not an IP address")


def parse_member(set_type: str, text: str) -> Member:
    """A desired member of a set of kube-proxy's types (`Entry.String()` forms)."""
    try:
        if set_type == "bitmap:port":
            return Member(port=int(text.rsplit(":", 1)[-1]))
        parts = text.split(",")
        if set_type == "hash:ip" and len(parts) == 1:
            return Member(ip=_parse_ip(parts[0]))
        if set_type in ("hash:ip,port", "hash:ip,port,ip", "hash:ip,port,net"):
            name, _, port = parts[1].rpartition(":")
            proto = PROTOCOL_NUMBERS[Protocol(name or "tcp")]
            member = Member(ip=_parse_ip(parts[0]), proto=proto, port=int(port))
            if set_type == "hash:ip,port" and len(parts) == 2:
                return member
            if set_type == "hash:ip,port,ip" and len(parts) == 3:
                return Member(member.ip, proto, member.port, ip2=_parse_ip(parts[2]))
            if set_type == "hash:ip,port,net" and len(parts) == 3:
                net = ip_network(parts[2], strict=False)
                return Member(member.ip, proto, member.port, net.network_address, net.prefixlen)
    except (ValueError, IndexError):
        pass
    raise ValueError(f"{text!r} is not a member of a {set_type} set")


def _address(data: bytes | None) -> IPAddress | None:
    """An address nested in IPSET_ATTR_IP / IPSET_ATTR_IP2 (its one attribute)."""
    if data is None or len(data) < 4:
        return None
    kind = ATTR.unpack_from(data)[1] & NLA_TYPE_MASK
    if kind == IPADDR_IPV4:
        return IPv4Address(data[4:8])
    return IPv6Address(data[4:20]) if kind == IPADDR_IPV6 else None


def kernel_member(data: bytes) -> Member:
    """A member from an IPSET_ATTR_DATA attribute of a kernel listing."""
    found = attrs(data)
    port, proto, cidr2 = found.get(ATTR_PORT), found.get(ATTR_PROTO), found.get(ATTR_CIDR2)
    return Member(
        ip=_address(found.get(ATTR_IP)),
        proto=proto[0] if proto else None,
        port=BE16.unpack(port[:2])[0] if port else None,
        ip2=_address(found.get(ATTR_IP2)),
        cidr2=cidr2[0] if cidr2 else None,
    )


def create_data(spec: IpsetSpec) -> bytes:
    """IPSET_ATTR_DATA of a create: kube-proxy's `ipset create` options (`create_args`)."""
    args = spec.create_args()
    options = dict(zip(args[::2], args[1::2], strict=True))
    parts = []
    if "range" in options:
        low, high = options["range"].split("-")
        parts += [_be(ATTR_PORT, BE16.pack(int(low))), _be(ATTR_PORT_TO, BE16.pack(int(high)))]
    for key, kind in (("hashsize", ATTR_HASHSIZE), ("maxelem", ATTR_MAXELEM)):
        if key in options:
            parts.append(_be(kind, BE32.pack(int(options[key]))))
    return nested(ATTR_DATA, *parts)


def _family(spec: IpsetSpec) -> int:
    return AF_INET6 if "inet6" in spec.create_args() else AF_INET


@dataclass
class KernelSet:
    """A kube-proxy set as the kernel holds it."""

    type: str
    members: set[Member] = field(default_factory=set)


def read_set(
    kernel: Kernel, name: str, memo: Memo[bytes, Member] | None = None
) -> KernelSet | None:
    """One set with its members (one dump), None if it does not exist."""
    kind, body = _message(IPSET_CMD_LIST, _name(name))
    try:
        replies = kernel.nfnl.request(kind, NLM_F_DUMP, body)
    except NetlinkError as err:
        if err.code != errno.ENOENT:
            raise
        return None
    found: KernelSet | None = None
    for reply in replies:
        top = attrs(reply, NFGENMSG.size)
        if found is None:
            found = KernelSet(type=top.get(ATTR_TYPENAME, b"").split(b"\0", 1)[0].decode())
        if ATTR_ADT in top:
            listed = repeated(top[ATTR_ADT], ATTR_DATA)
            found.members.update(memo(listed) if memo else map(kernel_member, listed))
    return found


def read_sets(
    kernel: Kernel, memos: Mapping[str, Memo[bytes, Member]] | None = None
) -> dict[str, KernelSet]:
    """kube-proxy's sets that exist, with their members (`memos`: one per set)."""
    memos = memos or {}
    found = ((spec.name, read_set(kernel, spec.name, memos.get(spec.name))) for spec in IPSETS)
    return {name: current for name, current in found if current is not None}


# The members a sync wants: set name -> the desired text of each member -> the member.
Wanted = dict[str, dict[str, Member]]


def parse_sets(state: IpvsState, known: Wanted | None = None) -> Wanted:
    """The desired members, parsed up front: a bad state fails before any kernel write.
    Texts that `known` (what the last sync wanted) holds are not parsed again."""
    types = {spec.name: spec.type for spec in IPSETS}
    unknown = state.ipsets.keys() - types.keys()
    if unknown:
        raise ValueError(f"not kube-proxy ipsets: {', '.join(sorted(unknown))}")
    known = known or {}
    wanted = {}
    for name, entries in state.ipsets.items():
        before = known.get(name, {})
        wanted[name] = {
            text: before.get(text) or parse_member(types[name], text) for text in entries
        }
    return wanted


def sync_sets(
    kernel: Kernel, sets: dict[str, KernelSet], wanted: Wanted, problems: Problems
) -> None:
    """Create missing sets, then delete stale members before adding new ones (queued)."""
    revisions: dict[str, int] = {}
    for spec in IPSETS:
        current = sets.get(spec.name)
        try:
            if current is None:
                _create(kernel, spec, revisions)
                current = sets[spec.name] = KernelSet(type=spec.type)
            elif current.type != spec.type:
                problems.add(f"ipset {spec.name} is a {current.type}, not a {spec.type}")
                continue
        except NetlinkError as err:
            problems.add(f"create ipset {spec.name}: {err}")
            continue
        want = set(wanted.get(spec.name, {}).values())
        _write_members(kernel, spec, current.members - want, want - current.members, problems)


def sync_changes(kernel: Kernel, before: Wanted, wanted: Wanted, problems: Problems) -> None:
    """What a partial sync writes: the members that left or joined the wanted ones since the
    last sync (which made the kernel hold exactly `before`), compared as text (queued)."""
    for spec in IPSETS:
        old, new = before.get(spec.name, {}), wanted.get(spec.name, {})
        stale = [old[text] for text in old.keys() - new.keys()]
        fresh = [new[text] for text in new.keys() - old.keys()]
        _write_members(kernel, spec, stale, fresh, problems)


def _create(kernel: Kernel, spec: IpsetSpec, revisions: dict[str, int]) -> None:
    """Create one set with the newest revision of its type that the kernel has (asked once
    per type); an existing one with the same options is fine."""
    family = bytes([_family(spec)])
    if spec.type not in revisions:
        kind, ask = _message(IPSET_CMD_TYPE, asciiz(ATTR_TYPENAME, spec.type),
                             attr(ATTR_FAMILY, family))  # fmt: skip
        (reply,) = kernel.nfnl.request(kind, 0, ask)
        revisions[spec.type] = attrs(reply, NFGENMSG.size)[ATTR_REVISION][0]
    revision = bytes([revisions[spec.type]])
    kind, body = _message(IPSET_CMD_CREATE, _name(spec.name), asciiz(ATTR_TYPENAME, spec.type),
                          attr(ATTR_REVISION, revision), attr(ATTR_FAMILY, family),
                          create_data(spec))  # fmt: skip
    kernel.nfnl.request(kind, NLM_F_ACK, body)
    kernel.written.append(f"create ipset {spec.name}")


def _write_members(
    kernel: Kernel,
    spec: IpsetSpec,
    stale: Iterable[Member],
    fresh: Iterable[Member],
    problems: Problems,
) -> None:
    for verb, cmd, members in (("del", IPSET_CMD_DEL, stale), ("add", IPSET_CMD_ADD, fresh)):
        for member in sorted(members, key=Member.text):
            what = f"{verb} {spec.name} {member.text()}"
            kind, body = _message(cmd, _name(spec.name), member.data(spec.type))
            # Without NLM_F_EXCL, adding a member already there or deleting one already
            # gone is no error.
            kernel.write(kernel.nfnl, what, kind, 0, body,
                         refusal(problems, what, ignore=(IPSET_ERR_EXIST,)))  # fmt: skip


def destroy_sets(kernel: Kernel) -> None:
    """Destroy the 17 sets, logging what cannot go: a set an iptables rule still uses is
    busy (upstream destroys them only after its iptables cleanup for that reason)."""
    busy = []
    for spec in IPSETS:
        try:
            kind, body = _message(IPSET_CMD_DESTROY, _name(spec.name))
            # NLM_F_EXCL: without it the kernel destroys a missing set "successfully"
            # (`ipset -exist destroy`), and every start would log 17 destroyed sets.
            kernel.nfnl.request(kind, NLM_F_ACK | NLM_F_EXCL, body)
            log.info("cleanup: destroyed ipset %s", spec.name)
        except NetlinkError as err:
            if err.code == IPSET_ERR_BUSY:
                busy.append(spec.name)
            elif err.code != errno.ENOENT:
                log.warning("cleanup: cannot destroy ipset %s: %s", spec.name, err)
    if busy:
        log.warning(
            "cleanup: ipsets still referenced (by iptables rules?) were kept: %s", ", ".join(busy)
        )
