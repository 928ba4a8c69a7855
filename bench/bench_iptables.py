"""How long the iptables backend takes to sync, against iptables-legacy-restore.

The agent applies rules with python-iptables (libiptc); kube-proxy pipes text into
iptables-restore. This measures both on the same rendered rules, so the README can
say what a first full sync, a periodic full sync and a one-endpoint change cost at 1,000 and
10,000 Services, and what the fast entry encoder buys over python-iptables' parser.

Every measurement runs in a network namespace created here (``pkpb-bench-*``) and
deleted afterwards, also on failure; the root namespace is never touched. The
python-iptables cases run in a worker process started inside the namespace (``ip
netns exec``), one per case, so Table handles, caches and RSS belong to that case.

    python bench/bench_iptables.py [--sizes 1000,10000]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from ipaddress import IPv4Address, ip_network
from pathlib import Path
from typing import Any

from pykubeproxy.iptables.applier import IptcApplier
from pykubeproxy.iptables.encoder import EntryEncoder
from pykubeproxy.iptables.iptc_rules import iptc
from pykubeproxy.iptables.render import LocalDetector, RenderConfig, Renderer, sample_rules
from pykubeproxy.iptables.ruleset import Argv, TableState, restore_text
from pykubeproxy.model import (
    Endpoint,
    EndpointsMap,
    NamespacedName,
    Protocol,
    ServicePort,
    ServicePortMap,
    ServicePortName,
)

ENDPOINTS = 5
CONFIG = RenderConfig(local_detector=LocalDetector.by_cidr(ip_network("10.244.0.0/16")))
FLOOR_CHAIN = "KUBE-BENCH-FLOOR"
WORDS = ("api", "web", "auth", "cart", "search", "billing", "media", "mail", "queue", "cache")


def cluster(count: int) -> tuple[ServicePortMap, EndpointsMap]:
    """ClusterIP Services with 5 ready endpoints each; every third is a NodePort."""
    services: ServicePortMap = {}
    endpoints: EndpointsMap = {}
    for i in range(count):
        ns = NamespacedName(f"team-{i % 97}", f"{WORDS[i % len(WORDS)]}-{i}")
        name = ServicePortName(ns, "http", Protocol.TCP)
        services[name] = ServicePort(
            name,
            IPv4Address(0x0A600000 + i + 1),  # 10.96.0.0/12
            80,
            node_port=30000 + i // 3 if i % 3 == 0 else 0,
        )
        base = 0x0AF40000 + ENDPOINTS * i + 2  # 10.244.0.0/16 and up
        endpoints[name] = tuple(Endpoint(IPv4Address(base + e), 8080) for e in range(ENDPOINTS))
    return services, endpoints


def written(tables: list[TableState]) -> int:
    """Rules a sync writes (a partial sync keeps unchanged Services' chains)."""
    return sum(len(rules) for table in tables for rules in table.chains.values())


def distinct_rules(tables: list[TableState]) -> list[Argv]:
    rules: dict[Argv, None] = {}
    for table in tables:
        rules.update(dict.fromkeys(jump.argv for jump in table.jumps))
        for chain_rules in table.chains.values():
            rules.update(dict.fromkeys(chain_rules))
    return list(rules)


def timed(fn: Callable[[], Any]) -> tuple[float, Any]:
    start = time.perf_counter()
    result = fn()
    return time.perf_counter() - start, result


def rss_mib() -> tuple[float, float]:
    """Peak (ru_maxrss) and current (VmRSS) resident memory of this process, MiB."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    status = Path("/proc/self/status").read_text()
    line = next(x for x in status.splitlines() if x.startswith("VmRSS:"))
    return peak, int(line.split()[1]) / 1024


# --- worker: runs inside a namespace --------------------------------------------------------


def worker(size: int, fast: bool, outdir: Path) -> dict[str, Any]:
    """The python-iptables cases for one size; also writes the restore reference files."""
    services, endpoints = cluster(size)
    out: dict[str, Any] = {}
    out["render"], tables = timed(lambda: Renderer(CONFIG).render(services, endpoints).tables)
    out["rules"] = written(tables)
    del tables  # the agent holds one rendering, not two

    applier = IptcApplier(str(outdir / "xtables.lock"), samples=sample_rules if fast else None)
    renderer = Renderer(CONFIG)
    start = time.perf_counter()
    full = renderer.render(services, endpoints).tables
    out["rss_rendered"] = rss_mib()[1]
    applier.apply(full)
    out["cold"] = time.perf_counter() - start
    out["rss_peak"], out["rss"] = rss_mib()
    if not fast:
        return out
    assert applier.encoder is not None
    out["fallbacks"] = applier.encoder.fallbacks
    out["warm"], _ = timed(lambda: applier.apply(renderer.render(services, endpoints).tables))

    changed = sorted(services, key=str)[size // 2]
    old = endpoints[changed]
    moved = Endpoint(IPv4Address(int(old[0].ip) + 0x100000), old[0].port)  # a new pod IP
    endpoints = {**endpoints, changed: (moved, *old[1:])}
    start = time.perf_counter()
    partial = renderer.render(services, endpoints, rewrite={changed}).tables
    applier.apply(partial)
    out["partial"] = time.perf_counter() - start
    out["partial_rules"] = written(partial)

    out["self_check"], encoder = timed(lambda: EntryEncoder(sample_rules()))
    rules = distinct_rules(full)
    encode_time, _ = timed(lambda: [encoder.encode(argv) for argv in rules])
    out["encode_us"] = encode_time / len(rules) * 1e6
    out["shapes"] = encoder.shapes
    (outdir / "full.rules").write_text(restore_text(full))
    (outdir / "delta.rules").write_text(restore_text(partial))
    out["floor_read"], out["floor_commit"] = libiptc_floor()
    return out


def libiptc_floor() -> tuple[float, float]:
    """What any libiptc writer pays for any change to the nat table at this size, however
    little it changes: reading the table whole (IPT_SO_GET_ENTRIES, then libiptc's parse)
    and replacing it whole (IPT_SO_SET_REPLACE). The change is one empty chain, removed
    again afterwards."""
    table = iptc.Table(iptc.Table.NAT)
    table.autocommit = False
    read, _ = timed(table.refresh)
    table.create_chain(FLOOR_CHAIN)
    commit, _ = timed(table.commit)
    table.refresh()
    table.delete_chain(FLOOR_CHAIN)
    table.commit()
    return read, commit


# --- parent: namespaces, restore reference, table -------------------------------------------


@contextmanager
def netns(label: str, prefix: str = "pkpb-bench") -> Iterator[str]:
    name = f"{prefix}-{os.getpid()}-{label}"
    subprocess.run(["ip", "netns", "add", name], check=True)
    try:
        yield name
    finally:
        subprocess.run(["ip", "netns", "delete", name], check=False)


def run_worker(size: int, fast: bool, outdir: Path) -> dict[str, Any]:
    label = f"{size}-{'fast' if fast else 'slow'}"
    with netns(label) as ns:
        argv = [sys.executable, __file__, "--worker", str(size), "--out", str(outdir)]
        proc = subprocess.run(
            ["ip", "netns", "exec", ns, *argv, *([] if fast else ["--slow"])],
            capture_output=True,
            text=True,
            check=False,
        )
    if proc.returncode != 0:
        raise RuntimeError(f"worker {label} failed:\n{proc.stderr}")
    result: dict[str, Any] = json.loads(proc.stdout.splitlines()[-1])
    return result


def restore(ns: str, path: Path, *flags: str) -> float:
    with path.open() as rules:
        seconds, _ = timed(
            lambda: subprocess.run(
                ["ip", "netns", "exec", ns, "iptables-legacy-restore", *flags],
                stdin=rules,
                check=True,
            )
        )
    return seconds


@dataclass
class Row:
    case: str
    services: int
    rules: int
    seconds: float
    per_rule: bool = True

    def cells(self) -> list[str]:
        us = f"{self.seconds / self.rules * 1e6:.1f}" if self.per_rule and self.rules else ""
        return [self.case, f"{self.services:,}", f"{self.rules:,}", f"{self.seconds:.3f}", us]


def machine() -> str:
    cpu = "unknown CPU"
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            cpu = line.split(":", 1)[1].strip()
            break
    python = platform.python_version()
    return f"machine: nproc {os.cpu_count()}, {cpu}, Linux {platform.release()}, Python {python}"


def bench(sizes: list[int]) -> None:
    rows: list[Row] = []
    notes: list[str] = []
    for size in sizes:
        with tempfile.TemporaryDirectory(prefix="pkpb-bench-") as tmp:
            r = run_worker(size, True, Path(tmp))
            with netns(f"{size}-restore") as ns:
                r["restore"] = restore(ns, Path(tmp) / "full.rules")
                r["restore_delta"] = restore(ns, Path(tmp) / "delta.rules", "--noflush")
        n, d = r["rules"], r["partial_rules"]
        rows += [
            Row("render only", size, n, r["render"]),
            Row("first full sync (render + encode + apply)", size, n, r["cold"]),
            Row("periodic full sync (render memoised + encode + apply)", size, n, r["warm"]),
            Row("one-endpoint change, partial sync*", size, d, r["partial"]),
            Row("iptables-legacy-restore, full", size, n, r["restore"]),
            Row(
                "iptables-legacy-restore --noflush, one-change delta*", size, d, r["restore_delta"]
            ),
            Row("libiptc alone: read the nat table", size, n, r["floor_read"], per_rule=False),
            Row(
                "libiptc alone: commit it with one empty chain more",
                size,
                n,
                r["floor_commit"],
                per_rule=False,
            ),
        ]
        notes.append(
            f"{size:,} Services: encoder {r['encode_us']:.1f} µs/rule "
            f"({r['shapes']} shapes, self-check {r['self_check']:.2f} s, "
            f"{r['fallbacks']} fallbacks); RSS after the first full sync: "
            f"ru_maxrss {r['rss_peak']:.0f} MiB, VmRSS {r['rss']:.0f} MiB "
            f"(VmRSS before apply, rendered rules only: {r['rss_rendered']:.0f} MiB); "
            f"libiptc's read + commit, which any change through libiptc pays, is "
            f"{(r['floor_read'] + r['floor_commit']) / r['restore_delta']:.2f}x the --noflush "
            f"delta, the commit alone {r['floor_commit'] / r['restore_delta']:.2f}x"
        )
    if 1000 in sizes:
        with tempfile.TemporaryDirectory(prefix="pkpb-bench-") as tmp:
            r = run_worker(1000, False, Path(tmp))
        rows.append(
            Row("first full sync, python-iptables only (no encoder)", 1000, r["rules"], r["cold"])
        )
        notes.append(
            f"1,000 Services without the encoder: RSS ru_maxrss {r['rss_peak']:.0f} MiB, "
            f"VmRSS {r['rss']:.0f} MiB"
        )
    header = ["case", "services", "rules", "seconds", "µs/rule"]
    print("| " + " | ".join(header) + " |")
    print("|" + "|".join("---" for _ in header) + "|")
    for row in rows:
        print("| " + " | ".join(row.cells()) + " |")
    print()
    print("\\* rules = rules written; the other Services' chains are kept as they are")
    for note in notes:
        print(f"- {note}")
    print(f"- {machine()}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", default="1000,10000", help="comma-separated Service counts")
    parser.add_argument("--worker", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--out", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--slow", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker is not None:
        print(json.dumps(worker(args.worker, not args.slow, args.out)))
        return
    if os.geteuid() != 0:
        sys.exit("the benchmark needs root (it creates network namespaces)")
    bench([int(size) for size in args.sizes.split(",")])


if __name__ == "__main__":
    main()
