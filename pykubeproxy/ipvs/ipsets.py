"""kube-proxy's ipsets over netlink: members as values, sets synced by difference.

Upstream (pkg/proxy/ipvs/ipset.go, ``syncIPSetEntries``) creates every set at each sync
(creation of an existing one is harmless), then deletes the members the sync no longer
wants before adding the new ones; sets are never flushed or destroyed while the proxy runs.

pyroute2's netlink ipset API is used instead of the ``ipset`` CLI: it creates all five set
types kube-proxy uses with its options, lists members as structured attributes (so a
desired ``ip,tcp:80,10.0.0.1/32`` and the kernel's ``...,10.0.0.1`` compare equal instead of
churning every sync), needs no ipset binary, runs in the calling thread's namespace like the
other sockets, and in the test VM listed 5000 members in 1.7 s where ``ipset save`` took 37 s.
"""

from __future__ import annotations

import errno
import logging
from dataclasses import dataclass, field
from ipaddress import ip_address, ip_network
from socket import AF_INET, AF_INET6
from typing import Any

from pyroute2.ipset import PortEntry
from pyroute2.netlink.exceptions import NetlinkError
from pyroute2.netlink.nfnetlink.ipset import IPSET_ERR_BUSY, IPSET_ERR_EXIST

from pykubeproxy.ipvs.netlink import PROTOCOL_NUMBERS, PROTOCOLS, Kernel, Problems, Write
from pykubeproxy.ipvs.state import IPSETS, IpsetSpec, IpvsState
from pykubeproxy.model import IPAddress, Protocol

log = logging.getLogger(__name__)


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


def create_options(spec: IpsetSpec) -> dict[str, Any]:
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
class KernelSet:
    """A kube-proxy set as the kernel holds it."""

    type: str
    members: set[Member] = field(default_factory=set)


def read_set(kernel: Kernel, name: str) -> KernelSet | None:
    """One set with its members, None if it does not exist."""
    found: KernelSet | None = None
    try:
        for msg in kernel.ipset.list(name):
            if found is None:
                found = KernelSet(type=msg.get_attr("IPSET_ATTR_TYPENAME"))
            adt = msg.get_attr("IPSET_ATTR_ADT")
            if adt is not None:
                found.members.update(map(_kernel_member, adt.get_attrs("IPSET_ATTR_DATA")))
    except NetlinkError as err:
        if err.code != errno.ENOENT:
            raise
        return None
    return found


def read_sets(kernel: Kernel) -> dict[str, KernelSet]:
    """kube-proxy's sets that exist, with their members."""
    found = ((spec.name, read_set(kernel, spec.name)) for spec in IPSETS)
    return {name: current for name, current in found if current is not None}


def parse_sets(state: IpvsState) -> dict[str, set[Member]]:
    """The desired members, parsed up front: a bad state fails before any kernel write."""
    types = {spec.name: spec.type for spec in IPSETS}
    unknown = state.ipsets.keys() - types.keys()
    if unknown:
        raise ValueError(f"not kube-proxy ipsets: {', '.join(sorted(unknown))}")
    return {
        name: {parse_member(types[name], entry) for entry in entries}
        for name, entries in state.ipsets.items()
    }


def sync_sets(
    kernel: Kernel,
    write: Write,
    sets: dict[str, KernelSet],
    wanted: dict[str, set[Member]],
    problems: Problems,
) -> None:
    """Create missing sets, then delete stale members before adding new ones."""
    for spec in IPSETS:
        current = sets.get(spec.name)
        try:
            if current is None:
                write(f"create ipset {spec.name}", kernel.ipset.create, spec.name,
                      **create_options(spec))  # fmt: skip
                current = sets[spec.name] = KernelSet(type=spec.type)
            elif current.type != spec.type:
                problems.add(f"ipset {spec.name} is a {current.type}, not a {spec.type}")
                continue
        except NetlinkError as err:
            problems.add(f"create ipset {spec.name}: {err}")
            continue
        want = wanted.get(spec.name, set())
        for verb, members in (("del", current.members - want), ("add", want - current.members)):
            for member in sorted(members, key=Member.text):
                _write_member(kernel, write, spec, verb, member, problems)


def _write_member(
    kernel: Kernel, write: Write, spec: IpsetSpec, verb: str, member: Member, problems: Problems
) -> None:
    call = kernel.ipset.add if verb == "add" else kernel.ipset.delete
    try:
        write(f"{verb} {spec.name} {member.text()}", call, spec.name, exclusive=False,
              **member.pyroute2_args(spec.type))  # fmt: skip
    except NetlinkError as err:
        if err.code != IPSET_ERR_EXIST:  # already added / already gone
            problems.add(f"{verb} {spec.name} {member.text()}: {err}")


def destroy_sets(kernel: Kernel) -> None:
    """Destroy the 17 sets, logging what cannot go: a set an iptables rule still uses is
    busy (upstream destroys them only after its iptables cleanup for that reason)."""
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
            "cleanup: ipsets still referenced (by iptables rules?) were kept: %s", ", ".join(busy)
        )
