"""The fast entry encoder writes python-iptables' exact bytes, or steps aside.

The reference is the slow path itself: `build_rule` + `final_check()` + the rule
buffer. python-iptables needs neither root nor the kernel to build a rule, except
to tell whether ``-j NAME`` names a chain (it asks every table); unit tests answer
that with `resolving_chains`, the kernel tests ask a real table. As root, the whole
module runs inside a private network namespace, so no python-iptables call can
reach the root namespace's tables.
"""

from __future__ import annotations

import ctypes
import logging
import os
import random
import shutil
import string
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from ipaddress import IPv4Address, ip_network
from pathlib import Path

import iptc
import pytest

from pykubeproxy.iptables.applier import IptcApplier
from pykubeproxy.iptables.encoder import (
    EntryEncoder,
    python_iptables_entry,
    resolving_chains,
    split,
)
from pykubeproxy.iptables.render import (
    LocalDetector,
    RenderConfig,
    Renderer,
    sample_rules,
)
from pykubeproxy.iptables.ruleset import Argv, TableState
from pykubeproxy.model import (
    Endpoint,
    EndpointsMap,
    NamespacedName,
    NodeFacts,
    Protocol,
    ServicePort,
    ServicePortMap,
    ServicePortName,
)

ROOT = os.geteuid() == 0 and shutil.which("ip") is not None
CLONE_NEWNET = 0x40000000
_libc = ctypes.CDLL(None, use_errno=True)

NODE = NodeFacts("node-a", ip=IPv4Address("203.0.113.200"))
CONFIGS = {
    "default": (RenderConfig(), NODE),
    "cluster-cidr": (
        RenderConfig(local_detector=LocalDetector.by_cidr(ip_network("10.244.0.0/16"))),
        NODE,
    ),
    "other-cidr": (
        RenderConfig(local_detector=LocalDetector.by_cidr(ip_network("100.64.0.0/10"))),
        NodeFacts("node-a"),
    ),
    "masquerade-all": (RenderConfig(masquerade_all=True, random_fully=False), NODE),
    "nodeport-ips": (
        RenderConfig(localhost_nodeports=False, masquerade_bit=5, conntrack_tcp_liberal=True),
        NodeFacts("node-a", nodeport_ips=(IPv4Address("127.0.0.1"), IPv4Address("192.168.7.2"))),
    ),
    "no-localhost": (RenderConfig(localhost_nodeports=False), NODE),
}


def _setns(fd: int) -> None:
    if _libc.setns(fd, CLONE_NEWNET) != 0:
        raise OSError(ctypes.get_errno(), "setns failed")


@contextmanager
def private_netns(label: str) -> Iterator[str]:
    """Move this thread into a new network namespace, and back, deleting it."""
    name = f"pkpb-{label}-{os.getpid()}"
    subprocess.run(["ip", "netns", "add", name], check=True)
    home = os.open("/proc/thread-self/ns/net", os.O_RDONLY)
    try:
        fd = os.open(f"/run/netns/{name}", os.O_RDONLY)
        try:
            _setns(fd)
        finally:
            os.close(fd)
        yield name
    finally:
        _setns(home)
        os.close(home)
        subprocess.run(["ip", "netns", "delete", name], check=False)


@pytest.fixture(scope="module", autouse=True)
def isolated() -> Iterator[None]:
    if not ROOT:  # unprivileged python-iptables cannot open any table
        yield
        return
    with private_netns("unit"):
        yield


@pytest.fixture(scope="module")
def encoder() -> EntryEncoder:
    return EntryEncoder(sample_rules())


def cluster(count: int, seed: int = 1) -> tuple[ServicePortMap, EndpointsMap]:
    """Services of every kind: ClusterIP, NodePort, external and LB IPs, affinity, 0..7 pods."""
    rng = random.Random(seed)
    services: ServicePortMap = {}
    endpoints: EndpointsMap = {}
    for i in range(count):
        proto = (Protocol.TCP, Protocol.UDP, Protocol.SCTP)[i % 3]
        port_name = ("http", "", "grpc-web", "dns")[i % 4]
        name = ServicePortName(NamespacedName(f"team-{i % 7}", f"api-{i}"), port_name, proto)
        # 0 ClusterIP, 1 NodePort, 2 externalIP, 3 LoadBalancer, 4 affinity,
        # 5 LoadBalancer with Local policies, source ranges and a health check port
        kind = i % 6
        extra = (IPv4Address(f"203.0.113.{i % 250 + 1}"),)
        local = kind == 5
        services[name] = ServicePort(
            name,
            IPv4Address(f"10.96.{i // 250}.{i % 250 + 1}"),
            rng.choice((53, 80, 443, 8080, rng.randint(1, 65535))),
            node_port=30000 + i if kind in (1, 3, 5) else 0,
            external_ips=extra if kind == 2 else (),
            load_balancer_ips=extra if kind in (3, 5) else (),
            load_balancer_source_ranges=(ip_network(f"198.51.{i % 250}.0/24"),) if local else (),
            session_affinity_seconds=rng.choice((10800, 60)) if kind == 4 else None,
            external_policy_local=local,
            internal_policy_local=local and i % 4 == 1,
            health_check_node_port=31000 + i if local else 0,
        )
        pods = i % 8  # 0 (no endpoints) .. 7
        endpoints[name] = tuple(
            Endpoint(
                IPv4Address(f"10.244.{i % 250}.{p + 2}"),
                rng.randint(1, 65535),
                node_name=rng.choice(("node-a", "node-b")),
            )
            for p in range(pods)
        )
    return services, endpoints


def rules_of(tables: list[TableState]) -> list[Argv]:
    out: list[Argv] = []
    for table in tables:
        out += [jump.argv for jump in table.jumps]
        for rules in (*table.chains.values(), *table.ensured.values()):
            out += rules
    return out


def render(config: str, count: int) -> list[TableState]:
    cfg, node = CONFIGS[config]
    return Renderer(cfg).render(*cluster(count), node=node).tables


def rendered(config: str, count: int = 40) -> list[Argv]:
    return rules_of(render(config, count))


def reference(argv: Argv) -> bytes:
    """python-iptables' bytes, with every ``-j KUBE-…`` resolved as a chain."""
    with resolving_chains([a for a in argv if a.startswith("KUBE-")]):
        return python_iptables_entry(argv)


@pytest.mark.parametrize("config", CONFIGS)
def test_every_rendered_rule_is_fast_and_exact(encoder: EntryEncoder, config: str) -> None:
    rules = rendered(config)
    fallbacks = encoder.fallbacks
    for argv in dict.fromkeys(rules):
        assert encoder.encode(argv) == reference(argv), argv
    assert encoder.fallbacks == fallbacks, "a rendered rule fell back to python-iptables"
    assert not encoder.disabled


def test_sample_rules_cover_every_default_shape(encoder: EntryEncoder) -> None:
    learned = {split(argv)[0] for argv in sample_rules()}
    for config in ("default", "cluster-cidr", "masquerade-all", "no-localhost"):
        assert {split(argv)[0] for argv in rendered(config)} <= learned


def random_value(kind: str, rng: random.Random) -> str:
    """Values drawn independently of the encoder's own generators."""
    ip = str(IPv4Address(rng.getrandbits(32)))
    port = str(rng.choice((1, 65535, rng.randint(1, 65535))))
    if kind == "addr":
        return rng.choice((ip, f"{ip}/{rng.randint(0, 32)}"))
    if kind == "port":
        return port
    if kind == "comment":
        chars = string.ascii_letters + string.digits + ' "\\/:;.,->#$%&()*+=?@[]^_`{|}~'
        text = "".join(rng.choices(chars, k=rng.randint(1, 255))).lstrip("-!") or "x"
        return text[:-1] + "'" if rng.random() < 0.1 else text  # slow path: it mangles quotes
    if kind in ("chain", "recent-name"):
        chain = rng.choice(("SVC", "SEP", "EXT", "FW", "SVL", "MARK-MASQ"))
        return f"KUBE-{chain}-" + "".join(rng.choices("ABCDEFGHIJKLMNOPQRSTUVWXYZ234567", k=16))
    if kind == "seconds":
        return str(rng.choice((1, 10800, 86400, rng.randint(1, 2**31 - 1))))
    if kind == "probability":
        return f"{1 / rng.randint(2, 7):.10f}" if rng.random() < 0.5 else f"{rng.random():.10f}"
    if kind == "ip-port":
        return f"{ip}:{port}"
    raise AssertionError(kind)


def test_random_values_match_python_iptables(encoder: EntryEncoder) -> None:
    rng = random.Random(7)
    shapes = {split(argv)[0] for argv in sample_rules()}
    fast = slow = 0
    for key in sorted(shapes):
        for _ in range(40):
            argv = tuple(random_value(a[1:], rng) if a.startswith("\0") else a for a in key)
            entry = encoder.encode(argv)
            try:
                expected = reference(argv)
            except Exception:  # python-iptables refuses it: the encoder must have stepped aside
                assert entry is None, argv
                continue
            if entry is None:
                slow += 1
                assert "'" in argv[argv.index("--comment") + 1], argv  # the one known gap
            else:
                fast += 1
                assert entry == expected, argv
    assert fast > 4 * slow > 0


@pytest.mark.parametrize(
    ("option", "value"),
    [
        ("--dport", "080"),  # xtables reads a leading zero as octal
        ("--dport", "0x50"),
        ("--dport", "0"),
        ("--dport", "65536"),
        ("-d", "10.1"),
        ("-d", "10.0.0.1/33"),
        ("-d", "fd00::1"),
        ("-d", "10.0.0.0/255.0.0.0"),
        ("--comment", "it's"),  # python-iptables stores it as it\'s
        ("--comment", "-leading dash"),
        ("--comment", "x" * 256),
        ("--comment", "tab\there"),
        ("--comment", "caf\u00e9"),
        ("-j", "KUBE-" + "X" * 24),  # longer than a chain name can be
    ],
)
def test_non_canonical_values_fall_back(encoder: EntryEncoder, option: str, value: str) -> None:
    base: Argv = (
        "-m", "comment", "--comment", "ns/svc:http cluster IP", "-m", "tcp", "-p", "tcp",
        "-d", "10.96.0.1", "--dport", "80", "-j", "KUBE-SVC-ABCDEFGHIJKLMNOP",
    )  # fmt: skip
    argv = list(base)
    argv[argv.index(option) + 1] = value
    assert encoder.encode(tuple(argv)) is None


@pytest.mark.parametrize(
    ("option", "value"),
    [("--probability", "1e-1"), ("--probability", "1.5"), ("--probability", ".5")],
)
def test_non_canonical_probability_falls_back(
    encoder: EntryEncoder, option: str, value: str
) -> None:
    argv = ("-m", "comment", "--comment", "x", "-m", "statistic", "--mode", "random",
            option, value, "-j", "KUBE-SEP-ABCDEFGHIJKLMNOP")  # fmt: skip
    assert encoder.encode(argv) is None


def test_probability_is_libxt_statistic_rounding(encoder: EntryEncoder) -> None:
    for n in range(2, 200):
        argv = ("-m", "comment", "--comment", "x", "-m", "statistic", "--mode", "random",
                "--probability", f"{1 / n:.10f}", "-j", "KUBE-SEP-ABCDEFGHIJKLMNOP")  # fmt: skip
        assert encoder.encode(argv) == reference(argv)


def test_self_check_disables_a_shape_that_does_not_match(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A builder whose port layout depends on the value (as a wrong guess would)."""
    samples = {str(0x1234 + s) for s in range(8)} | {str(0x5678 + s) for s in range(8)}

    def odd_ports(argv: Argv) -> bytes:
        entry = python_iptables_entry(argv)
        if "--dport" in argv and argv[argv.index("--dport") + 1] not in samples:
            entry = entry[:-1] + bytes([entry[-1] ^ 0xFF])
        return entry

    with caplog.at_level(logging.WARNING, "pykubeproxy.iptables.encoder"):
        encoder = EntryEncoder(sample_rules(), build=odd_ports)
    disabled = encoder.disabled
    assert disabled and all("--dport" in shape for shape in disabled)
    assert len(caplog.records) == len(disabled)
    rules = rendered("default", 12)
    with caplog.at_level(logging.WARNING, "pykubeproxy.iptables.encoder"):
        entries = [encoder.encode(argv) for argv in rules]
    assert len(caplog.records) == len(disabled)  # warned once per shape, at construction
    for argv, entry in zip(rules, entries, strict=True):
        assert (entry is None) == ("--dport" in argv)
        if entry is not None:
            assert entry == reference(argv)


def test_new_shapes_are_learned_and_checked_on_first_use() -> None:
    encoder = EntryEncoder(samples=[])
    argv: Argv = ("-m", "comment", "--comment", "new shape", "-s", "10.1.0.0/16",
                  "-m", "udp", "-p", "udp", "--dport", "4789", "-j", "KUBE-NEW-CHAIN")  # fmt: skip
    assert encoder.shapes == 0
    assert encoder.encode(argv) == reference(argv)
    assert encoder.shapes == 1
    other = (*argv[:5], "192.0.2.0/24", *argv[6:11], "8472", "-j", "KUBE-OTHER")
    assert encoder.encode(other) == reference(other)
    assert encoder.shapes == 1


def test_learning_stops_at_max_shapes(caplog: pytest.LogCaptureFixture) -> None:
    encoder = EntryEncoder(samples=[], max_shapes=1)
    first: Argv = ("-m", "comment", "--comment", "one", "-j", "KUBE-A")
    second: Argv = ("-m", "comment", "--comment", "two", "-j", "MARK", "--set-xmark", "0x1/0x1")
    with caplog.at_level(logging.WARNING, "pykubeproxy.iptables.encoder"):
        assert encoder.encode(first) == reference(first)
        assert encoder.encode(second) is None
        assert encoder.encode(second) is None
    assert encoder.shapes == 1 and encoder.fallbacks == 2
    assert len(caplog.records) == 1


def test_applier_entries_come_from_the_encoder() -> None:
    argv: Argv = ("-m", "comment", "--comment", "ns/svc:p", "-m", "tcp", "-p", "tcp",
                  "-j", "DNAT", "--to-destination", "10.244.1.9:8080")  # fmt: skip
    fast, slow = IptcApplier(samples=sample_rules), IptcApplier()
    entry = fast._entry(argv)
    assert isinstance(entry, bytes) and fast._entry(argv) == entry
    assert fast.encoder is not None and fast.encoder.encoded == 2  # encoded, not cached
    assert bytes(slow._entry(argv)) == entry
    assert slow.encoder is None


# --- kernel: the genuine slow path, and what the kernel ends up holding --------------------


@pytest.mark.parametrize("config", ["cluster-cidr", "masquerade-all"])
@pytest.mark.kernel
@pytest.mark.skipif(not ROOT, reason="needs root and network namespaces")
def test_bytes_equal_python_iptables_with_real_chains(encoder: EntryEncoder, config: str) -> None:
    """No stand-in: python-iptables resolves jumps against a real (uncommitted) nat table."""
    nat_state, filter_state = render(config, 40)
    with private_netns("bytes"):
        nat = iptc.Table("nat", autocommit=False)
        nat.refresh()
        try:
            for chain in {**nat_state.chains, **filter_state.chains, **filter_state.ensured}:
                nat.create_chain(chain)
            for argv in rules_of([nat_state, filter_state]):
                assert encoder.encode(argv) == python_iptables_entry(argv), argv
        finally:
            nat.refresh()  # autocommit is off: the chains are dropped, never committed


def save(tables: list[TableState], applier: IptcApplier) -> str:
    with private_netns("apply"):
        applier.apply(tables)
        out = subprocess.run(
            ["iptables-legacy-save"], capture_output=True, text=True, check=True
        ).stdout
    return "\n".join(line for line in out.splitlines() if not line.startswith("#"))


@pytest.mark.kernel
@pytest.mark.skipif(not ROOT, reason="needs root and network namespaces")
def test_kernel_holds_the_same_rules_either_way(tmp_path: Path) -> None:
    services, endpoints = cluster(60)
    cfg, node = CONFIGS["cluster-cidr"]
    tables = Renderer(cfg).render(services, endpoints, node=node).tables
    fast = IptcApplier(str(tmp_path / "lock"), samples=sample_rules)
    fast_text = save(tables, fast)
    slow_text = save(tables, IptcApplier(str(tmp_path / "lock")))
    assert fast.encoder is not None
    assert fast.encoder.fallbacks == 0
    assert fast.encoder.encoded >= len(set(rules_of(tables)))  # no cache: repeats re-encode
    assert fast_text == slow_text
    assert fast_text.count("\n-A ") > 800
