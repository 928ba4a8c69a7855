"""IPVS mode's hand-packed netlink against pyroute2's message classes, and its batching
against this host's kernel (rtnetlink and ipsets in a throwaway namespace; IPVS itself is
tested in the VM, tests/ipvs)."""

from __future__ import annotations

import errno
import os
import shutil
from collections.abc import Iterator
from ipaddress import IPv4Address, ip_address
from pathlib import Path
from typing import Any

import pytest
from pyroute2 import IPVSService
from pyroute2.ipset import AsyncIPSet, PortEntry
from pyroute2.netlink.generic.ipvs import ipvsmsg
from pyroute2.netlink.nfnetlink.ipset import ipset_msg

from pykubeproxy.ipvs import ipsets, netlink, wire
from pykubeproxy.ipvs.ipsets import parse_member
from pykubeproxy.ipvs.netlink import Kernel, NetlinkError, Problems
from pykubeproxy.ipvs.state import IPSETS, IpvsState, RealServer, ServiceOptions, VirtualServer
from pykubeproxy.model import Protocol
from pykubeproxy.sandbox.netns import NetNS

ROOT = os.geteuid() == 0 and shutil.which("ip") is not None
VS = VirtualServer(ip_address("10.96.0.10"), 80, Protocol.TCP)
RS = RealServer(ip_address("10.244.0.2"), 8080)


def message(kind: int, body: bytes) -> bytes:
    return wire.HEADER.pack(wire.HEADER.size + len(body), kind, wire.NLM_F_REQUEST, 1, 0) + body


def tree(data: bytes) -> list[tuple[int, Any]]:
    """Attributes with their flags, nested ones opened, in a canonical order."""
    found = []
    start = 0
    while start + 4 <= len(data):
        length, kind = wire.ATTR.unpack_from(data, start)
        value = data[start + 4 : start + length]
        found.append((kind, tree(value) if kind & wire.NLA_F_NESTED else value))
        start += (length + 3) & ~3
    return sorted(found, key=repr)


def test_attribute_numbers_are_pyroute2s() -> None:
    def numbers(nla_map: Any) -> dict[str, int]:
        return {entry[0]: i for i, entry in enumerate(nla_map)}

    svc, dest = numbers(ipvsmsg.service.nla_map), numbers(ipvsmsg.dest.nla_map)
    for name in ("AF", "PROTOCOL", "ADDR", "PORT", "FWMARK", "SCHED_NAME", "FLAGS", "TIMEOUT",
                 "NETMASK"):  # fmt: skip
        assert getattr(netlink, f"SVC_{name}") == svc[f"IPVS_SVC_ATTR_{name}"], name
    for name in ("ADDR", "PORT", "FWD_METHOD", "WEIGHT", "U_THRESH", "L_THRESH", "ACTIVE_CONNS",
                 "INACT_CONNS", "ADDR_FAMILY"):  # fmt: skip
        assert getattr(netlink, f"DEST_{name}") == dest[f"IPVS_DEST_ATTR_{name}"], name
    top = numbers(ipset_msg.nla_map)
    for name in ("PROTOCOL", "SETNAME", "TYPENAME", "REVISION", "FAMILY", "DATA", "ADT"):
        assert getattr(ipsets, f"ATTR_{name}") == top[f"IPSET_ATTR_{name}"], name
    data = {name: number for number, name, *_ in ipset_msg.cadt_data.nla_map}
    data |= {name: number for number, name, *_ in ipset_msg.ipset_generic.adt_data.nla_map}
    for name in ("IP", "PORT", "PORT_TO", "PROTO", "HASHSIZE", "MAXELEM", "IP2", "CIDR2"):
        assert getattr(ipsets, f"ATTR_{name}") == data[f"IPSET_ATTR_{name}"], name


def decoded(body: bytes) -> Any:
    msg = ipvsmsg(message(42, body))
    msg.decode()
    return msg


def test_ipvs_requests_decode_as_pyroute2_reads_them() -> None:
    body = netlink._genl(netlink.IPVS_CMD_NEW_SERVICE)
    msg = decoded(body + netlink.service_attrs(VS, ServiceOptions("mh", 30)))
    assert msg["cmd"] == netlink.IPVS_CMD_NEW_SERVICE
    assert dict(msg.get_attr("IPVS_CMD_ATTR_SERVICE")["attrs"]) == {
        "IPVS_SVC_ATTR_AF": 2, "IPVS_SVC_ATTR_PROTOCOL": 6, "IPVS_SVC_ATTR_ADDR": "10.96.0.10",
        "IPVS_SVC_ATTR_PORT": 80, "IPVS_SVC_ATTR_SCHED_NAME": "mh",
        "IPVS_SVC_ATTR_FLAGS": {"flags": 0x11, "mask": 0xFFFF},  # persistent, mh port hashing
        "IPVS_SVC_ATTR_TIMEOUT": 30, "IPVS_SVC_ATTR_NETMASK": "255.255.255.255",
    }  # fmt: skip
    msg = decoded(netlink._genl(netlink.IPVS_CMD_SET_DEST) + netlink.dest_body(VS, RS, 0))
    assert dict(msg.get_attr("IPVS_CMD_ATTR_SERVICE")["attrs"]) == {
        "IPVS_SVC_ATTR_AF": 2, "IPVS_SVC_ATTR_PROTOCOL": 6, "IPVS_SVC_ATTR_ADDR": "10.96.0.10",
        "IPVS_SVC_ATTR_PORT": 80,
    }  # fmt: skip
    assert dict(msg.get_attr("IPVS_CMD_ATTR_DEST")["attrs"]) == {
        "IPVS_DEST_ATTR_ADDR": "10.244.0.2", "IPVS_DEST_ATTR_PORT": 8080,
        "IPVS_DEST_ATTR_FWD_METHOD": 0, "IPVS_DEST_ATTR_WEIGHT": 0, "IPVS_DEST_ATTR_U_THRESH": 0,
        "IPVS_DEST_ATTR_L_THRESH": 0, "IPVS_DEST_ATTR_ADDR_FAMILY": 2,
    }  # fmt: skip


def encoded(attrs: list[tuple[str, Any]]) -> bytes:
    """The payload of a message pyroute2 encodes (what the kernel would send)."""
    msg = ipvsmsg()
    msg["cmd"], msg["version"], msg["attrs"] = 1, 1, attrs
    msg["header"]["type"] = 42
    msg.encode()
    return bytes(msg.data)[wire.HEADER.size :]


def test_ipvs_replies_parse() -> None:
    service = IPVSService(addr="10.96.0.10", port=80, protocol=6, sched_name="rr", timeout=30,
                          flags={"flags": 0x3, "mask": 0xFFFF})  # fmt: skip
    assert netlink.parse_service(encoded([("IPVS_CMD_ATTR_SERVICE", service.dump_nla())])) == (
        netlink.KernelService(VS, "rr", 0x1, 30)  # IP_VS_SVC_F_HASHED left out
    )
    fwmark = IPVSService(fwmark=7, sched_name="rr")
    assert netlink.parse_service(encoded([("IPVS_CMD_ATTR_SERVICE", fwmark.dump_nla())])) is None
    dest = [("IPVS_DEST_ATTR_ADDR_FAMILY", 2), ("IPVS_DEST_ATTR_ADDR", "10.244.0.2"),
            ("IPVS_DEST_ATTR_PORT", 8080), ("IPVS_DEST_ATTR_FWD_METHOD", 0),
            ("IPVS_DEST_ATTR_WEIGHT", 0), ("IPVS_DEST_ATTR_ACTIVE_CONNS", 2),
            ("IPVS_DEST_ATTR_INACT_CONNS", 3)]  # fmt: skip
    assert netlink._parse_dest(encoded([("IPVS_CMD_ATTR_DEST", {"attrs": dest})]), 2) == (
        netlink.KernelDest(RS, weight=0, fwd_method=0, connections=5)
    )


PROC_IP_VS = """\
IP Virtual Server version 1.2.1 (size=4096)
Prot LocalAddress:Port Scheduler Flags
  -> RemoteAddress:Port Forward Weight ActiveConn InActConn
TCP  0A60000A:0050 rr persistent 30 FFFFFFFF
  -> 0AF40002:1F90      Masq    1      2          3
  -> 0AF40003:1F90      Route   0      0          0
FWM  00000007 rr
  -> 0AF40004:0000      Masq    1      0          0
UDP  [fd00:0000:0000:0000:0000:0000:0000:000a]:0035 sh
  -> [fd00:0000:0000:0000:0000:0000:0001:0002]:14E9      Masq    1      0          0
SCTP  0A60000B:0050 rr
"""


def test_proc_ip_vs_lists_every_real_server() -> None:
    udp = VirtualServer(ip_address("fd00::a"), 53, Protocol.UDP)
    sctp = VirtualServer(ip_address("10.96.0.11"), 80, Protocol.SCTP)
    v6 = RealServer(ip_address("fd00::1:2"), 5353)
    routed = RealServer(ip_address("10.244.0.3"), 8080)
    table = netlink.ProcTable(PROC_IP_VS)
    assert dict(table.get(VS)) == {
        RS: netlink.KernelDest(RS, 1, netlink.MASQ, 5),
        routed: netlink.KernelDest(routed, 0, 3, 0),
    }
    assert dict(table.get(udp)) == {v6: netlink.KernelDest(v6, 1, netlink.MASQ, 0)}
    assert dict(table.get(sctp)) == {}
    assert len(table.services) == 3  # the fwmark service is left out
    assert table.get(VirtualServer(ip_address("10.96.0.10"), 80, Protocol.UDP)).get(RS) is None


def test_proc_ip_vs_holds_exactly_the_wanted_real_servers() -> None:
    """What lets a full sync skip a virtual server without parsing its real servers."""
    udp = VirtualServer(ip_address("fd00::a"), 53, Protocol.UDP)
    v6 = RealServer(ip_address("fd00::1:2"), 5353)
    routed = RealServer(ip_address("10.244.0.3"), 8080)
    table = netlink.ProcTable(PROC_IP_VS)
    assert table.get(udp).exactly({v6})
    assert not table.get(udp).exactly(set())  # one too many
    assert not table.get(udp).exactly({v6, RS})  # one missing
    assert not table.get(VS).exactly({RS, routed})  # routed, at weight 0
    masqueraded = PROC_IP_VS.replace("Route   0", "Masq    1")
    assert netlink.ProcTable(masqueraded).get(VS).exactly({RS, routed})
    heavier = masqueraded.replace("Masq    1      2", "Masq    10     2")
    assert not netlink.ProcTable(heavier).get(VS).exactly({RS, routed})


MEMBERS = [
    ("hash:ip", "10.96.0.10", "10.96.0.10", "ip"),
    ("hash:ip,port", "10.96.0.10,udp:53", ("10.96.0.10", PortEntry(53, 17)), "ip,port"),
    ("hash:ip,port,ip", "10.0.1.1,tcp:80,10.0.1.2",
     ("10.0.1.1", PortEntry(80, 6), "10.0.1.2"), "ip,port,ip"),
    ("hash:ip,port,net", "1.2.3.4,tcp:80,10.0.0.0/8",
     ("1.2.3.4", PortEntry(80, 6), "10.0.0.0/8"), "ip,port,net"),
    ("bitmap:port", "30080", 30080, "port"),
]  # fmt: skip


@pytest.mark.parametrize(("set_type", "text", "entry", "etype"), MEMBERS)
def test_members_encode_as_pyroute2_encodes_them(
    set_type: str, text: str, entry: Any, etype: str
) -> None:
    member = parse_member(set_type, text)
    kind, body = ipsets._message(ipsets.IPSET_CMD_ADD, ipsets._name("S"), member.data(set_type))
    msg = ipset_msg()
    data = AsyncIPSet._entry_to_data_attrs(AsyncIPSet, entry, etype, "IPSET_ATTR_IPADDR_IPV4")
    msg["attrs"] = [["IPSET_ATTR_PROTOCOL", ipsets.IPSET_PROTOCOL], ["IPSET_ATTR_SETNAME", "S"],
                    ["IPSET_ATTR_DATA", {"attrs": data}]]  # fmt: skip
    msg["header"]["type"], msg["nfgen_family"] = kind, 2
    msg.encode()
    theirs = bytes(msg.data)[wire.HEADER.size :]
    assert body[: ipsets.NFGENMSG.size] == theirs[: ipsets.NFGENMSG.size]
    assert tree(body[ipsets.NFGENMSG.size :]) == tree(theirs[ipsets.NFGENMSG.size :])
    # and a kernel listing of it reads back as the same member
    assert ipsets.kernel_member(member.data(set_type)[4:]) == member


@pytest.fixture
def netns() -> Iterator[NetNS]:
    with NetNS("ipvs-wire") as ns:
        yield ns


@pytest.mark.kernel
@pytest.mark.skipif(not ROOT, reason="needs root and iproute2")
def test_batched_writes_match_each_refusal_to_its_write(netns: NetNS) -> None:
    """More writes than one chunk, some refused: each refusal reaches its own write."""
    ips = [IPv4Address(0x0A600000 + i) for i in range(1, 3 * wire.CHUNK + 7)]
    bound = ips[::10]
    for ip in bound:
        netns.exec(["ip", "addr", "add", f"{ip}/32", "dev", "lo"])

    def body() -> tuple[list[str], list[str]]:
        problems = Problems("test")
        with Kernel() as kernel:
            netlink.bind(kernel, 1, ips, problems)  # EEXIST is ignored: count them instead
            refused: list[str] = []
            for ip in ips:

                def refuse(err: NetlinkError, ip: IPv4Address = ip) -> None:
                    refused.append(f"{ip} {err.code}")

                kernel.write_address(f"{ip}", netlink.RTM_NEWADDR, 1, ip, 32, refuse)
            kernel.flush()
            return kernel.written, refused

    written, refused = netns.run_inside(body, timeout=30)
    assert sorted(written) == sorted(f"bind {ip} to kube-ipvs0" for ip in ips if ip not in bound)
    assert sorted(refused) == sorted(f"{ip} {errno.EEXIST}" for ip in ips)
    shown = str(netns.exec(["ip", "-4", "-o", "addr", "show", "dev", "lo"]).stdout)
    assert len(shown.splitlines()) == len(ips) + 1  # and 127.0.0.1


@pytest.mark.kernel
@pytest.mark.skipif(
    not ROOT or not Path("/sys/module/ip_set").exists(), reason="needs root and ipsets"
)
def test_ipsets_sync_by_difference(netns: NetNS) -> None:
    state = IpvsState()
    for set_type, text, *_ in MEMBERS:
        spec = next(s for s in IPSETS if s.type == set_type)
        state.ipsets[spec.name] = {text}
    state.ipsets["KUBE-CLUSTER-IP"] |= {f"{IPv4Address(0x0A600100 + i)},tcp:80" for i in range(300)}
    wanted = ipsets.parse_sets(state)

    def sync(before: ipsets.Wanted | None, now: ipsets.Wanted) -> tuple[list[str], set[str]]:
        problems = Problems("test")
        with Kernel() as kernel:
            if before is None:
                ipsets.sync_sets(kernel, ipsets.read_sets(kernel), now, problems)
            else:
                ipsets.sync_changes(kernel, before, now, problems)
            kernel.flush()
            found = ipsets.read_sets(kernel)
        problems.raise_any()
        members = {f"{n} {m.text()}" for n, s in found.items() for m in s.members}
        return kernel.written, members

    def texts(now: ipsets.Wanted) -> set[str]:
        return {f"{n} {m.text()}" for n, members in now.items() for m in members.values()}

    written, found = netns.run_inside(lambda: sync(None, wanted), timeout=60)
    assert found == texts(wanted)
    assert len(written) == len(IPSETS) + len(found)  # every set created, every member added
    again, _ = netns.run_inside(lambda: sync(None, wanted), timeout=60)
    assert again == []
    state.ipsets["KUBE-CLUSTER-IP"] ^= {"10.96.1.0,tcp:80", "10.96.9.0,tcp:80"}
    changed = ipsets.parse_sets(state, wanted)
    kept = "10.96.1.1,tcp:80"
    assert changed["KUBE-CLUSTER-IP"][kept] is wanted["KUBE-CLUSTER-IP"][kept]  # parsed once
    written, found = netns.run_inside(lambda: sync(wanted, changed), timeout=60)
    assert written == [
        "del KUBE-CLUSTER-IP 10.96.1.0,tcp:80",
        "add KUBE-CLUSTER-IP 10.96.9.0,tcp:80",
    ]
    assert found == texts(changed)


def test_a_memo_parses_each_record_once_and_keeps_one_reads_worth() -> None:
    parsed: list[str] = []

    def parse(raw: str) -> int:
        parsed.append(raw)
        return len(raw)

    memo = wire.Memo(parse)
    assert memo(["a", "bb", "a"]) == [1, 2, 1]
    assert memo(["bb", "ccc"]) == [2, 3]
    assert memo(["a"]) == [1]  # forgotten by the read before
    assert parsed == ["a", "bb", "ccc", "a"]
