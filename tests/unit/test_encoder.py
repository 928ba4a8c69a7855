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
import json
import logging
import os
import random
import shutil
import string
import subprocess
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from ipaddress import IPv4Address, ip_network
from pathlib import Path
from typing import Any

import iptc
import pytest

from pykubeproxy.iptables import applier as applier_module
from pykubeproxy.iptables import encoder as encoder_module
from pykubeproxy.iptables import iptc_rules as iptc_rules_module
from pykubeproxy.iptables.applier import LEARN_AFTER, IptcApplier
from pykubeproxy.iptables.encoder import (
    SHAPES_VERSION,
    EntryEncoder,
    Key,
    python_iptables_entry,
    split,
)
from pykubeproxy.iptables.iptc_rules import resolving_chains
from pykubeproxy.iptables.render import (
    LocalDetector,
    RenderConfig,
    Renderer,
    sample_rules,
)
from pykubeproxy.iptables.ruleset import Argv, TableState
from pykubeproxy.iptables.shapes import SHIPPED_SHAPES
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


# --- saved shapes: a file from another start is checked before it is used ------------------


@pytest.fixture(scope="module")
def shapes_file(encoder: EntryEncoder, tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("shapes") / "rule-shapes.json"
    encoder.save(path)
    return path


class CountingBuilds:
    """A python-iptables builder (the encoder's reference by default), counting per shape."""

    def __init__(self, build: Callable[[Argv], Any] = python_iptables_entry) -> None:
        self.build = build
        self.per_shape: Counter[Key] = Counter()

    def __call__(self, argv: Argv) -> Any:
        self.per_shape[split(argv)[0]] += 1
        return self.build(argv)


def tampered(source: Path, target: Path, argv: Argv, change: str) -> Path:
    """A copy of `source` with the shape of `argv` changed: a template byte, or a codec name."""
    document = json.loads(source.read_text())
    (record,) = [r for r in document["shapes"] if tuple(r["rule"]) == split(argv)[0]]
    if change == "template":
        template = bytearray.fromhex(record["template"])
        covered = {o + i for spots in record["spots"] for _, o in spots for i in range(16)}
        offset = min(set(range(len(template))) - covered)  # a byte no value overwrites
        template[offset] ^= 0x01
        record["template"] = template.hex()
    else:
        record["codecs"][-1] = "port"
    target.write_text(json.dumps(document))
    return target


def test_saved_shapes_give_python_iptables_bytes_after_one_build_each(shapes_file: Path) -> None:
    builds = CountingBuilds()
    loaded = EntryEncoder.from_file(shapes_file, build=builds)
    assert loaded is not None and loaded.shapes == 0  # nothing is built or trusted yet
    rules = list(dict.fromkeys(rendered("cluster-cidr", 12)))
    for argv in rules:
        assert loaded.encode(argv) == reference(argv), argv
    used = {split(argv)[0] for argv in rules}
    assert builds.per_shape.keys() == used
    assert set(builds.per_shape.values()) == {1}
    assert loaded.fallbacks == 0 and loaded.learned == 0 and loaded.shapes == len(used)


def test_the_shipped_shapes_are_this_python_iptables_own() -> None:
    """Stale after a change to the rules or to python-iptables: then run
    `python -m pykubeproxy.iptables.shapes` (as nobody: see its docstring)."""
    loaded = EntryEncoder.from_file(SHIPPED_SHAPES)
    assert loaded is not None
    samples = list(sample_rules())
    for argv in samples:
        assert loaded.encode(argv) == reference(argv), argv
    assert loaded.learned == 0 and loaded.fallbacks == 0
    assert loaded.shapes == len({split(argv)[0] for argv in samples})


@pytest.mark.parametrize("change", ["template", "codec"])
def test_a_tampered_saved_shape_is_learned_afresh(
    shapes_file: Path, tmp_path: Path, change: str, caplog: pytest.LogCaptureFixture
) -> None:
    rules = list(dict.fromkeys(rendered("default", 12)))
    dnat = next(argv for argv in rules if "--to-destination" in argv)
    path = tampered(shapes_file, tmp_path / "rule-shapes.json", dnat, change)
    builds = CountingBuilds()
    with caplog.at_level(logging.DEBUG, "pykubeproxy.iptables.encoder"):
        loaded = EntryEncoder.from_file(path, build=builds)
        assert loaded is not None
        for argv in rules:
            assert loaded.encode(argv) == reference(argv), argv
    assert len(caplog.records) == 1 and caplog.records[0].levelno == logging.INFO
    assert loaded.fallbacks == 0 and loaded.learned == 1 and not loaded.disabled
    relearned = split(dnat)[0]
    assert builds.per_shape[relearned] > 2  # learning: one build per variable, and checks
    assert {n for key, n in builds.per_shape.items() if key != relearned} == {1}


def test_a_value_the_saved_shape_cannot_spell_leaves_it_unchecked(shapes_file: Path) -> None:
    builds = CountingBuilds()
    loaded = EntryEncoder.from_file(shapes_file, build=builds)
    assert loaded is not None
    argv: Argv = ("-m", "comment", "--comment", "ns/svc:p", "-m", "tcp", "-p", "tcp",
                  "-j", "DNAT", "--to-destination", "10.244.1.9:080")  # fmt: skip
    assert loaded.encode(argv) is None and not builds.per_shape  # python-iptables' job
    canonical = (*argv[:-1], "10.244.1.9:80")
    assert loaded.encode(canonical) == reference(canonical)
    assert sum(builds.per_shape.values()) == 1


@pytest.mark.parametrize(
    "content",
    [
        None,  # missing
        b"",
        b"\xff\xfe garbage",
        b"{not json",
        b"[]",
        json.dumps({"format": "pykubeproxy rule shapes", "version": 0, "shapes": []}).encode(),
        json.dumps({"format": "something else", "version": SHAPES_VERSION, "shapes": []}).encode(),
        json.dumps({"format": "pykubeproxy rule shapes", "version": SHAPES_VERSION}).encode(),
        "directory",
    ],
)
def test_an_unusable_shapes_file_is_no_file(
    tmp_path: Path, shapes_file: Path, content: bytes | str | None, caplog: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / "rule-shapes.json"
    if content == "directory":
        path.mkdir()
    elif isinstance(content, bytes):
        path.write_bytes(content)
    with caplog.at_level(logging.DEBUG, "pykubeproxy.iptables.encoder"):
        assert EntryEncoder.from_file(path) is None
        assert IptcApplier(shapes=str(path)).encoder is None
    assert len(caplog.records) == 2 and {r.levelno for r in caplog.records} <= {10, 20}


def test_a_broken_saved_shape_is_left_out(tmp_path: Path, shapes_file: Path) -> None:
    document = json.loads(shapes_file.read_text())
    count = len(document["shapes"])
    document["shapes"][0]["spots"] = [[[0, 10**6]]] * len(document["shapes"][0]["codecs"])
    document["shapes"][1] = {"rule": 5}
    path = tmp_path / "rule-shapes.json"
    path.write_text(json.dumps(document))
    loaded = encoder_module.read_shapes(path)
    assert loaded is not None and len(loaded) == count - 2


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


@pytest.mark.kernel
@pytest.mark.skipif(not ROOT, reason="needs root and network namespaces")
def test_first_apply_with_saved_shapes_builds_once_per_shape(
    tmp_path: Path, shapes_file: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The agent's first sync with the image's file: no learning, one build per shape used."""
    services, endpoints = cluster(10)
    cfg, node = CONFIGS["cluster-cidr"]
    tables = Renderer(cfg).render(services, endpoints, node=node).tables
    checks = CountingBuilds(encoder_module.build_rule)  # the encoder's python-iptables builds
    slow = CountingBuilds(applier_module.built_entry)  # the applier's own
    monkeypatch.setattr(encoder_module, "build_rule", checks)
    monkeypatch.setattr(applier_module, "built_entry", slow)
    lock = str(tmp_path / "lock")
    fast = IptcApplier(lock, samples=sample_rules, learn_after=LEARN_AFTER, shapes=str(shapes_file))
    assert fast.encoder is not None  # from the file at once, not after LEARN_AFTER rules
    fast_text = save(tables, fast)
    assert not slow.per_shape
    used = {split(argv)[0] for argv in rules_of(tables)}
    assert checks.per_shape.keys() == used and set(checks.per_shape.values()) == {1}
    assert fast.encoder.fallbacks == 0 and fast.encoder.learned == 0
    assert fast_text == save(tables, IptcApplier(str(tmp_path / "lock")))
    assert fast_text.count("\n-A ") > 100


def test_checking_a_shape_opens_no_table(monkeypatch: pytest.MonkeyPatch) -> None:
    """While the encoder answers python-iptables' chain question itself, no table is read:
    after a commit of 180,000 rules, reading nat back cost a quarter of a second per check."""
    asked: list[str] = []

    def available(name: str) -> bool:
        asked.append(name)
        return False

    monkeypatch.setattr(iptc_rules_module, "is_table_available", available)
    assert reference(("-m", "comment", "--comment", "ns/svc:p", "-j", "KUBE-SVC-ABCDEF")) != b""
    assert asked == []
