"""The IPVS applier on this host: its pure parts, and harmless where the kernel has no ip_vs.

The iptables-mode agent calls `IpvsApplier.cleanup()` at start to remove IPVS leftovers, so
cleanup() and counts() must do nothing (and log nothing) on a kernel without ip_vs. They run
in a throwaway network namespace; the rest of the applier is tested in the VM (tests/ipvs).
"""

from __future__ import annotations

import logging
import os
import shutil
from collections.abc import Iterator
from ipaddress import ip_address
from pathlib import Path
from typing import Any

import pytest

from pykubeproxy import conntrack
from pykubeproxy.ipvs import ipsets, sysctls, wire
from pykubeproxy.ipvs.applier import IpvsApplier
from pykubeproxy.ipvs.graceful import GracefulTermination
from pykubeproxy.ipvs.ipsets import parse_member
from pykubeproxy.ipvs.netlink import KernelRefused, Problems
from pykubeproxy.ipvs.state import IPSETS, IpvsState, RealServer, VirtualServer
from pykubeproxy.ipvs.sysctls import set_sysctls
from pykubeproxy.model import Protocol
from pykubeproxy.sandbox.netns import NetNS

ROOT = os.geteuid() == 0 and shutil.which("ip") is not None
NO_IPVS = not Path("/sys/module/ip_vs").exists()


@pytest.mark.parametrize(
    ("set_type", "text", "shown"),
    [
        ("hash:ip", "10.96.0.10", "10.96.0.10"),
        ("hash:ip,port", "10.96.0.10,tcp:80", "10.96.0.10,tcp:80"),
        ("hash:ip,port", "100.101.102.103,sctp:30001", "100.101.102.103,sctp:30001"),
        ("hash:ip,port,ip", "10.0.1.1,tcp:80,10.0.1.1", "10.0.1.1,tcp:80,10.0.1.1"),
        ("hash:ip,port,net", "1.2.3.4,udp:80,10.0.0.0/8", "1.2.3.4,udp:80,10.0.0.0/8"),
        ("hash:ip,port,net", "1.2.3.4,tcp:80,10.0.0.1/32", "1.2.3.4,tcp:80,10.0.0.1"),
        ("hash:ip,port,net", "1.2.3.4,tcp:80,10.0.0.1/8", "1.2.3.4,tcp:80,10.0.0.0/8"),
        ("bitmap:port", "30000", "30000"),
    ],
)
def test_members_print_as_ipset_lists_them(set_type: str, text: str, shown: str) -> None:
    member = parse_member(set_type, text)
    assert member.text() == shown
    assert parse_member(set_type, shown) == member  # the kernel's form compares equal


@pytest.mark.parametrize(
    ("set_type", "text"),
    [("hash:ip", "10.0.0.1,tcp:80"), ("hash:ip,port", "10.0.0.1"), ("bitmap:port", "x"),
     ("hash:ip,port", "10.0.0.1,icmp:80"), ("hash:ip,port,ip", "10.0.0.1,tcp:80")],
)  # fmt: skip
def test_bad_members_are_rejected(set_type: str, text: str) -> None:
    with pytest.raises(ValueError, match="is not a member"):
        parse_member(set_type, text)


def test_create_options_are_kube_proxys() -> None:
    def options(set_type: str) -> dict[int, bytes]:
        spec = next(spec for spec in IPSETS if spec.type == set_type)
        return wire.attrs(ipsets.create_data(spec)[4:])

    assert options("bitmap:port") == {ipsets.ATTR_PORT: b"\0\0", ipsets.ATTR_PORT_TO: b"\xff\xff"}
    assert options("hash:ip,port") == {
        ipsets.ATTR_HASHSIZE: (1024).to_bytes(4, "big"),
        ipsets.ATTR_MAXELEM: (65536).to_bytes(4, "big"),
    }


def test_a_bad_state_fails_before_touching_the_kernel() -> None:
    with pytest.raises(ValueError, match="not kube-proxy ipsets: KUBE-NOPE"):
        IpvsApplier().apply(IpvsState(ipsets={"KUBE-NOPE": set()}))
    with pytest.raises(ValueError, match="is not a member"):
        IpvsApplier().apply(IpvsState(ipsets={"KUBE-CLUSTER-IP": {"10.0.0.1"}}))


def test_exclude_cidrs() -> None:
    applier = IpvsApplier(exclude_cidrs=["10.96.100.0/24"])
    assert applier.excluded(ip_address("10.96.100.7"))
    assert not applier.excluded(ip_address("10.96.0.10"))


def test_set_sysctls_writes_what_differs(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(sysctls, "_kernel_version", lambda: (6, 1))  # conn_reuse_mode left as is
    values = {"net/ipv4/vs/conntrack": "0", "net/ipv4/vs/expire_nodest_conn": "1",
              "net/ipv4/vs/expire_quiescent_template": "0", "net/ipv4/ip_forward": "1",
              "net/ipv4/vs/conn_reuse_mode": "1"}  # fmt: skip
    for name, value in values.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(f"{value}\n")
    with caplog.at_level(logging.INFO, logger=sysctls.__name__):
        set_sysctls(strict_arp=False, proc=tmp_path)
    assert (tmp_path / "net/ipv4/vs/conntrack").read_text() == "1\n"
    assert (tmp_path / "net/ipv4/vs/expire_quiescent_template").read_text() == "1\n"
    assert len(caplog.records) == 2, caplog.text
    assert "before 0, after 1" in caplog.text
    assert not (tmp_path / "net/ipv4/conf").exists()  # strict ARP off: untouched


def test_set_sysctls_fails_without_ipvs_sysctls(tmp_path: Path) -> None:
    (tmp_path / "net/ipv4").mkdir(parents=True)
    with pytest.raises(OSError, match="net/ipv4/vs/conntrack"):
        set_sysctls(strict_arp=True, proc=tmp_path)


def flow(protocol: Protocol, dst: str, port: int, reply_src: str) -> conntrack.Flow:
    client = ip_address("198.18.0.1")
    return conntrack.Flow(protocol, client, 40000, ip_address(dst), port, ip_address(reply_src), 53)


class FakeKernel:
    """The IPVS writes of a Kernel, recorded."""

    def __init__(self) -> None:
        self.written: list[str] = []

    def write_ipvs(self, what: str, cmd: int, body: bytes, refused: Any) -> None:
        self.written.append(what)


def test_removed_udp_real_servers_lose_their_flows_in_one_dump(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Instead of a `conntrack -D` per removed UDP/SCTP real server, one netlink dump picks
    the flows whose original destination is the virtual server and whose reply comes from
    a removed real server (or any, for a removed virtual server)."""
    udp = VirtualServer(ip_address("10.96.0.10"), 53, Protocol.UDP)
    sctp = VirtualServer(ip_address("10.96.0.11"), 99, Protocol.SCTP)
    tcp = VirtualServer(ip_address("10.96.0.12"), 80, Protocol.TCP)
    graceful, kernel = GracefulTermination(), FakeKernel()
    for vs in (udp, tcp):
        rs = RealServer(ip_address("10.244.0.2"), 5353)
        graceful.delete(kernel, vs, rs, lambda err: None)  # type: ignore[arg-type]
    graceful.service_deleted(sctp)
    flows = [
        flow(Protocol.UDP, "10.96.0.10", 53, "10.244.0.2"),  # removed real server
        flow(Protocol.UDP, "10.96.0.10", 53, "10.244.0.3"),  # one that stays
        flow(Protocol.UDP, "10.96.0.12", 80, "10.244.0.2"),  # not the same virtual server
        flow(Protocol.SCTP, "10.96.0.11", 99, "10.244.0.9"),  # its virtual server went
    ]
    calls: list[tuple[list[conntrack.Flow], frozenset[Protocol]]] = []

    def delete_flows(pick: Any, protocols: Any, family: Any, why: str) -> int:
        picked = list(pick(flows))
        calls.append((picked, protocols))
        return len(picked)

    monkeypatch.setattr(conntrack, "delete_flows", delete_flows)
    graceful.clear_flows()
    assert calls == [([flows[0], flows[3]], frozenset({Protocol.UDP, Protocol.SCTP}))]
    assert kernel.written == [
        "delete 10.96.0.10:53/UDP -> 10.244.0.2:5353",
        "delete 10.96.0.12:80/TCP -> 10.244.0.2:5353",
    ]
    graceful.clear_flows()  # nothing new removed: no dump
    assert len(calls) == 1


def test_problems_are_logged_one_by_one_and_raised_together(
    caplog: pytest.LogCaptureFixture,
) -> None:
    problems = Problems("IPVS sync")
    problems.raise_any()  # none: nothing raised
    with caplog.at_level(logging.ERROR):
        problems.add("Service ns/a:http: virtual server 10.96.0.1:80/TCP: refused")
        problems.add("Service ns/b:dns: real server 10.96.0.2:53/UDP -> 10.244.0.2:53: refused")
    assert [r.getMessage().split(": ")[1] for r in caplog.records] == [
        "Service ns/a:http",
        "Service ns/b:dns",
    ]
    with pytest.raises(KernelRefused, match=r"2 kernel errors: Service ns/a.*Service ns/b"):
        problems.raise_any()


@pytest.fixture
def netns() -> Iterator[NetNS]:
    with NetNS("ipvs-host") as ns:
        yield ns


@pytest.mark.kernel
@pytest.mark.skipif(not ROOT, reason="needs root and iproute2")
def test_cleanup_and_counts_are_harmless_without_ipvs(
    netns: NetNS, caplog: pytest.LogCaptureFixture
) -> None:
    applier = IpvsApplier()
    with caplog.at_level(logging.WARNING):
        netns.run_inside(applier.cleanup, timeout=30)
        assert netns.run_inside(applier.counts, timeout=30) == (0, 0)
    assert caplog.records == []
    links = str(netns.exec(["ip", "-br", "link"]).stdout).split()
    assert links[0] == "lo" and "kube-ipvs0" not in links
    if shutil.which("ipset"):
        assert str(netns.exec(["ipset", "list", "-n"]).stdout) == ""


@pytest.mark.kernel
@pytest.mark.skipif(not ROOT or not NO_IPVS, reason="needs root and a kernel without ip_vs")
def test_check_scheduler_says_ipvs_is_missing(netns: NetNS) -> None:
    with pytest.raises(ValueError, match="IPVS is not available in this kernel"):
        netns.run_inside(lambda: IpvsApplier().check_scheduler("rr"), timeout=30)
