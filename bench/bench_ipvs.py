"""How long the IPVS backend takes to sync, against ipvsadm --restore of the same table.

The IPVS applier writes virtual and real servers, kube-ipvs0 addresses and kube-proxy's ipsets
over netlink in batches, a full sync after reading the kernel, a partial sync from what the
last sync made; the usual command-line way is ``ipvsadm --restore``. This measures both on
the same rendered state at 1,000 ClusterIP Services x 5 endpoints: the first full sync, full
syncs with nothing to do (by a new applier, then periodic), a one-endpoint change, a full sync
that repairs damage done with the CLI tools, and the matching ``ipvsadm --restore`` runs (plus
``ipset restore`` and ``ip -batch`` for the ipsets and addresses the applier also writes), so
the README can say what IPVS mode costs next to the tool kube-proxy users know. The table's
last column gives each target's ratio.

This machine's kernel may lack ip_vs, so the measurements run in one VM on Debian's kernel
(`pykubeproxy.sandbox.vm`): the host boots it once and runs this file with ``--inside``, which
works in network namespaces it creates and deletes (``pkp-*``), never in the guest's root
namespace. Without KVM the VM is emulated (TCG), so absolute times are ~30x those of hardware;
only ratios measured in the same run mean anything, and the table says which it was.

    python bench/bench_ipvs.py [--services 1000] [--repeat 3] [--profile 25]  # as root, on the host
"""

from __future__ import annotations

import argparse
import cProfile
import gc
import io
import json
import os
import platform
import pstats
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from ipaddress import IPv4Address, ip_network
from pathlib import Path
from typing import Any, TypeVar

# bench/ is not a package: run as a script, its directory is sys.path[0].
from bench_iptables import cluster, machine, rss_mib, timed

from pykubeproxy.iptables.applier import IptcApplier
from pykubeproxy.ipvs.applier import IpvsApplier
from pykubeproxy.ipvs.render import IpvsConfig, render, render_tables
from pykubeproxy.ipvs.state import (
    CLUSTER_IP,
    DUMMY_DEVICE,
    IPSETS,
    IpvsState,
    RealServer,
    VirtualServer,
)
from pykubeproxy.model import Endpoint, NodeFacts
from pykubeproxy.sandbox.netns import NetNS
from pykubeproxy.sandbox.vm import VmUnavailable, in_vm, run_in_vm

ROOT = Path(__file__).resolve().parent.parent
CONFIG = IpvsConfig(cluster_cidr=(ip_network("10.244.0.0/16"),))
RESULT = "@@bench-ipvs-result "  # prefixes the guest's one JSON line
INSIDE_TIMEOUT = 1800.0  # per applier call; the VM's own timeout is the real bound
_T = TypeVar("_T")


def log(message: str) -> None:
    """Progress on stderr (streamed from the guest): TCG runs take minutes."""
    print(f"[bench-ipvs] {message}", file=sys.stderr, flush=True)


# --- the CLI reference: the same state as ipvsadm / ipset / ip input ------------------------


def _proto(vs: VirtualServer) -> str:
    return {"tcp": "-t", "udp": "-u", "sctp": "--sctp-service"}[vs.protocol.value]


def ipvsadm_rules(state: IpvsState) -> str:
    """The virtual and real servers as ``ipvsadm -S`` lines (masquerading, weight 1)."""
    lines: list[str] = []
    for vs, opts in sorted(state.services.items()):
        target = f"{_proto(vs)} {vs.address}:{vs.port}"
        persistent = f" -p {opts.persistence_timeout}" if opts.persistence_timeout else ""
        lines.append(f"-A {target} -s {opts.scheduler}{persistent}")
        lines += [f"-a {target} -r {rs} -m -w 1" for rs in sorted(state.real_servers[vs])]
    return "\n".join(lines) + "\n"


def ipvsadm_delta(
    before: IpvsState, after: IpvsState, draining: Iterable[tuple[VirtualServer, RealServer]]
) -> str:
    """The real-server changes between two states with the same services, as the applier
    made them: a draining removal is an edit to weight 0, any other a delete."""
    drained = set(draining)
    lines: list[str] = []
    for vs in sorted(after.services):
        old, new = before.real_servers[vs], after.real_servers[vs]
        target = f"{_proto(vs)} {vs.address}:{vs.port}"
        for rs in sorted(old - new):
            verb = f"-e {target} -r {rs} -m -w 0" if (vs, rs) in drained else f"-d {target} -r {rs}"
            lines.append(verb)
        lines += [f"-a {target} -r {rs} -m -w 1" for rs in sorted(new - old)]
    return "\n".join(lines) + "\n"


def ipset_rules(state: IpvsState) -> str:
    """The 17 sets and their members as ``ipset restore`` input."""
    lines: list[str] = []
    for spec in IPSETS:
        lines.append(" ".join(["create", spec.name, spec.type, *spec.create_args()]))
        lines += [f"add {spec.name} {entry}" for entry in sorted(state.ipsets.get(spec.name, ()))]
    return "\n".join(lines) + "\n"


def ip_batch(state: IpvsState) -> str:
    """kube-ipvs0 and its addresses as ``ip -batch`` input."""
    lines = [f"link add {DUMMY_DEVICE} type dummy"]
    lines += [f"addr add {ip}/{ip.max_prefixlen} dev {DUMMY_DEVICE}" for ip in state.addresses]
    return "\n".join(lines) + "\n"


def restore(ns: NetNS, argv: list[str], text: str, workdir: Path) -> float:
    """Seconds for ``argv`` reading ``text`` on stdin inside ns (process start included)."""
    path = workdir / f"{argv[0]}.in"
    path.write_text(text)
    with path.open() as rules:
        seconds, _ = timed(
            lambda: subprocess.run(
                ["ip", "netns", "exec", ns.name, *argv], stdin=rules, check=True, timeout=600
            )
        )
    return seconds


# --- inside the VM ------------------------------------------------------------------------


# What `damage` does behind the applier's back: each needs one write of the next full sync.
DAMAGE = ("delete a virtual server", "delete a real server", "delete an ipset member",
          "delete a kube-ipvs0 address")  # fmt: skip


def damage(ns: NetNS, state: IpvsState) -> int:
    """DAMAGE, done with the CLI tools to the services at the start of `state`; returns how
    many writes undo it (the deleted virtual server comes back with its real servers)."""
    first, second = sorted(state.services)[:2]
    (rs, *_) = sorted(state.real_servers[second])
    member = sorted(state.ipsets[CLUSTER_IP.name])[-1]
    ip = sorted(state.addresses)[-1]
    for argv in (
        ["ipvsadm", "-D", _proto(first), f"{first.address}:{first.port}"],
        ["ipvsadm", "-d", _proto(second), f"{second.address}:{second.port}", "-r", str(rs)],
        ["ipset", "del", CLUSTER_IP.name, member],
        ["ip", "addr", "del", f"{ip}/{ip.max_prefixlen}", "dev", DUMMY_DEVICE],
    ):
        ns.exec(argv, timeout=600)
    return 1 + len(state.real_servers[first]) + 3


def kernel_counts(ns: NetNS) -> tuple[int, int]:
    """(virtual servers, real servers) in ns, as ipvsadm lists them."""
    lines = ns.exec(["ipvsadm", "-Ln"], timeout=600).stdout.splitlines()
    virtual = sum(1 for line in lines if line.startswith(("TCP", "UDP", "SCTP")))
    real = [line for line in lines if line.strip().startswith("->")]
    return virtual, sum(1 for line in real if "RemoteAddress" not in line)


def profiled(case: str, fn: Callable[[], _T], top: int) -> Callable[[], _T]:
    """fn, which prints its cProfile (the `top` functions by own time) when `top` is set."""
    if not top:
        return fn

    def run() -> _T:
        profile = cProfile.Profile()
        try:
            return profile.runcall(fn)
        finally:
            text = io.StringIO()
            stats = pstats.Stats(profile, stream=text)
            stats.sort_stats("cumulative").print_stats("pykubeproxy", top)
            stats.sort_stats("tottime").print_stats(top)
            log(f"profile of {case}:\n{text.getvalue()}")

    return run


def inside(size: int, top: int = 0, repeat: int = 3) -> dict[str, Any]:
    """Every measurement, in fresh namespaces of this (guest) kernel. The first full sync,
    the full syncs with nothing to do and the three CLI tools' full loads are each the best
    of `repeat` runs (the emulated VM shares two cores with other work); `top` > 0 prints
    the cProfile of each applier case (the times then include the profiler's overhead): the
    project's functions by cumulative time, then all by own time."""
    out: dict[str, Any] = {"services": size, "kernel": platform.release(), "repeat": repeat}
    services, endpoints = cluster(size)

    def desired() -> IpvsState:
        # No node IPs: the builder's NodePorts add no virtual server, only ClusterIPs do.
        return render(services, endpoints, CONFIG, NodeFacts(), (), frozenset()).state

    out["render"], state = timed(desired)
    out["virtual"] = len(state.services)
    out["real"] = sum(len(rs) for rs in state.real_servers.values())
    log(f"{out['virtual']} virtual / {out['real']} real servers rendered in {out['render']:.2f} s")

    def timed_in(where: NetNS, fn: Callable[[], _T], case: str = "") -> tuple[float, _T]:
        """fn timed in a namespace, after a full garbage collection: a collection that
        earlier work (such as rendering the state) left due would otherwise land in it."""
        run = profiled(case, fn, top) if case else fn
        gc.collect()
        return where.run_inside(lambda: timed(run), timeout=INSIDE_TIMEOUT)

    def best(case: str, runs: Callable[[str], float]) -> float:
        """The best of `repeat` runs; only the last is profiled."""
        return min(runs(case if i == repeat - 1 else "") for i in range(repeat))

    with tempfile.TemporaryDirectory(prefix="pkpb-ipvs-") as tmp:
        firsts = []
        for _ in range(repeat - 1):
            with NetNS("ipvs-first") as scratch:
                firsts.append(timed_in(scratch, lambda: IpvsApplier().apply(state))[0])
        with NetNS("ipvs-bench") as ns:
            applier = IpvsApplier()
            first, _ = timed_in(ns, lambda: applier.apply(state), "first full sync")
            out["full"] = min([*firsts, first])
            out["full_writes"] = len(applier.changes)
            out["rss_peak"], out["rss"] = rss_mib()
            log(f"first full sync: {out['full']:.1f} s, {out['full_writes']} kernel writes")
            if kernel_counts(ns) != (out["virtual"], out["real"]):
                raise RuntimeError(f"after the full sync ipvsadm -Ln shows {kernel_counts(ns)}")

            again = desired()  # rendered again, untimed: only the applier is measured
            appliers: list[IpvsApplier] = []

            def fresh(case: str) -> float:
                """A full sync by an applier that has parsed nothing yet (a new process)."""
                appliers.append(IpvsApplier())
                return timed_in(ns, lambda: appliers[-1].apply(again), case)[0]

            out["noop"] = best("no-op full sync", fresh)
            applier = appliers[-1]
            out["noop_writes"] = len(applier.changes)
            out["noop2"] = best(
                "no-op full sync, records seen before",
                lambda case: timed_in(ns, lambda: applier.apply(again), case)[0],
            )
            out["noop2_writes"] = len(applier.changes)
            log(f"no-op syncs: {out['noop']:.2f} s, then {out['noop2']:.2f} s, "
                f"{out['noop_writes'] + out['noop2_writes']} kernel writes")  # fmt: skip

            changed = sorted(services, key=str)[size // 2]
            old = endpoints[changed]
            moved = Endpoint(IPv4Address(int(old[0].ip) + 0x100000), old[0].port)  # new pod IP
            endpoints = {**endpoints, changed: (moved, *old[1:])}  # desired() sees this one now
            after = desired()
            out["change"], _ = timed_in(
                ns, lambda: applier.apply(after, full=False), "one-endpoint change, partial sync"
            )
            out["change_writes"] = len(applier.changes)
            out["change_real"] = sum(
                len(state.real_servers[vs] ^ after.real_servers[vs]) for vs in after.services
            )
            out["change_log"] = applier.changes
            delta = ipvsadm_delta(state, after, applier.draining())
            log(f"one-endpoint change: {out['change']:.3f} s: {'; '.join(applier.changes)}")

            repairs = damage(ns, after)
            out["repair"], _ = timed_in(
                ns, lambda: applier.apply(after), "full sync repairing damage"
            )
            out["repair_log"] = applier.changes
            log(f"repair: {out['repair']:.2f} s: {'; '.join(applier.changes)}")
            counts = kernel_counts(ns)
            if len(applier.changes) != repairs or counts != (out["virtual"], out["real"]):
                raise RuntimeError(f"the full sync did not repair the damage: {applier.changes}")

            tables = list(render_tables(after, CONFIG))
            out["rules"] = sum(len(rules) for table in tables for rules in table.chains.values())
            iptc = IptcApplier(str(Path(tmp) / "xtables.lock"))
            out["iptables"], _ = timed_in(ns, lambda: iptc.apply(tables))
            out["iptables_again"], _ = timed_in(ns, lambda: iptc.apply(tables))
            log(
                f"iptables half: {out['rules']} rules, {out['iptables']:.2f} s, "
                f"again {out['iptables_again']:.2f} s"
            )

        work = Path(tmp)
        rules, sets, addresses = ipvsadm_rules(state), ipset_rules(state), ip_batch(state)
        loads: dict[str, list[float]] = {"ref_full": [], "ref_ipset": [], "ref_ip": []}
        for attempt in range(repeat):
            with NetNS("ipvsadm-ref") as ref:
                loads["ref_full"].append(restore(ref, ["ipvsadm", "--restore"], rules, work))
                if kernel_counts(ref) != (out["virtual"], out["real"]):
                    raise RuntimeError(f"after ipvsadm --restore: {kernel_counts(ref)}")
                if attempt == repeat - 1:
                    out["ref_delta"] = restore(ref, ["ipvsadm", "--restore"], delta, work)
                    out["ipvsadm"] = ref.exec(["ipvsadm", "--version"]).stdout.strip()
                loads["ref_ipset"].append(restore(ref, ["ipset", "restore"], sets, work))
                loads["ref_ip"].append(restore(ref, ["ip", "-batch", "-"], addresses, work))
        out.update({key: min(times) for key, times in loads.items()})
        out["ref_delta_lines"] = delta.count("\n")
        out["ref_lines"] = sum(text.count("\n") for text in (rules, sets, addresses))
        log(f"ipvsadm --restore: {out['ref_full']:.2f} s full, {out['ref_delta']:.3f} s delta")
    return out


# --- on the host: boot the VM, print the table ----------------------------------------------


@dataclass
class Row:
    case: str
    services: int
    virtual: int | str
    real: int | str
    seconds: float
    writes: int | str = ""
    ratio: str = ""

    def cells(self) -> list[str]:
        def num(n: int | str) -> str:
            return f"{n:,}" if isinstance(n, int) else n

        return [self.case, num(self.services), num(self.virtual), num(self.real),
                f"{self.seconds:.3f}", num(self.writes), self.ratio]  # fmt: skip


def table(r: dict[str, Any]) -> list[Row]:
    n, vs, rs = r["services"], r["virtual"], r["real"]
    cli = r["ref_full"] + r["ref_ipset"] + r["ref_ip"]
    return [
        Row("render (pure)", n, vs, rs, r["render"]),
        Row("IPVS applier, first full sync (ipsets + kube-ipvs0 + IPVS)", n, vs, rs, r["full"],
            r["full_writes"], f"{r['full'] / cli:.2f}x the three batch tools (target <= 1.5x)"),
        Row("IPVS applier, full sync with nothing to do, nothing parsed before (a new "
            "process)", n, vs, rs, r["noop"], r["noop_writes"],
            f"{r['noop'] / r['full']:.2f}x the first sync (target <= 0.25x)"),
        Row("IPVS applier, full sync with nothing to do, records seen before looked up "
            "(periodic)", n, vs, rs, r["noop2"], r["noop2_writes"],
            f"{r['noop2'] / r['full']:.2f}x the first sync (target <= 0.25x)"),
        Row("IPVS applier, one-endpoint change, partial sync", n, 1, r["change_real"],
            r["change"], r["change_writes"],
            f"{r['change'] / r['ref_delta']:.1f}x ipvsadm --restore of the delta (target <= 3x)"),
        Row(f"IPVS applier, full sync after damage ({'; '.join(DAMAGE)})", n, vs, rs,
            r["repair"], len(r["repair_log"])),
        Row("ipvsadm --restore, full table", n, vs, rs, r["ref_full"], vs + rs),
        Row("ipvsadm --restore, one-change delta", n, 1, r["change_real"], r["ref_delta"],
            r["ref_delta_lines"]),
        Row("ipvsadm --restore + ipset restore + ip -batch (all the applier writes)", n, vs, rs,
            cli, r["ref_lines"]),
        Row(f"iptables half, first IptcApplier.apply ({r['rules']} rules, builds the encoder)",
            n, "", "", r["iptables"]),
        Row("iptables half, second IptcApplier.apply (same rules)", n, "", "",
            r["iptables_again"]),
    ]  # fmt: skip


def report(r: dict[str, Any], vm: str) -> None:
    header = ["case", "services", "virtual servers", "real servers", "seconds", "kernel writes",
              "ratio"]  # fmt: skip
    print("| " + " | ".join(header) + " |")
    print("|" + "|".join("---" for _ in header) + "|")
    for row in table(r):
        print("| " + " | ".join(row.cells()) + " |")
    cli = r["ref_full"] + r["ref_ipset"] + r["ref_ip"]
    print()
    print(f"- {vm}")
    print(
        f"- first full sync / ipvsadm --restore alone = {r['full'] / r['ref_full']:.1f}x; "
        f"render + partial sync / ipvsadm --restore of the delta = "
        f"{(r['render'] + r['change']) / r['ref_delta']:.1f}x"
    )
    print(f"- one-endpoint change wrote: {'; '.join(r['change_log'])}")
    print(f"- the full sync after damage wrote: {'; '.join(r['repair_log'])}")
    print(
        f"- RSS of the guest process after the first full sync: VmRSS {r['rss']:.0f} MiB, "
        f"ru_maxrss {r['rss_peak']:.0f} MiB"
    )
    print(
        "- kernel writes = netlink writes of the applier; for the CLI rows, input lines. "
        "The applier rows time IpvsApplier.apply on a state rendered beforehand (render has "
        f"its own row; {cli / max(r['ref_lines'], 1) * 1e6:.0f} us per CLI line). The first "
        "sync, the syncs with nothing to do and the CLI full loads are the best of "
        f"{r['repeat']} runs, each after a full garbage collection. "
        "The ClusterIP Services come from bench_iptables.cluster(); with no node IPs its "
        "NodePorts add no virtual server. CLI times include starting the process."
    )
    print(f"- host {machine()}; guest Linux {r['kernel']}, {r['ipvsadm']}")


def host(size: int, timeout: float, top: int, repeat: int) -> int:
    command = [sys.executable, str(Path(__file__).resolve()), "--inside", "--services", str(size),
               "--profile", str(top), "--repeat", str(repeat)]  # fmt: skip
    try:
        result = run_in_vm(command, timeout=timeout, cwd=str(ROOT), stream=sys.stderr)
    except VmUnavailable as exc:
        print(f"bench_ipvs: the VM could not start: {exc}", file=sys.stderr)
        return 125
    lines = [line for line in result.output.splitlines() if line.startswith(RESULT)]
    if not result.ok or not lines:
        why = "timed out" if result.timed_out else f"exit status {result.returncode}"
        print(f"bench_ipvs: the guest run failed ({why} after {result.seconds:.0f} s, "
              f"{result.accel})", file=sys.stderr)  # fmt: skip
        return result.returncode or 1
    accel = (
        "KVM"
        if result.accel == "kvm"
        else "emulated (TCG, no KVM): absolute numbers are ~30x slower than hardware, "
        "only the ratio to ipvsadm --restore is meaningful"
    )
    vm = (
        f"VM {accel}; boot {result.boot_seconds:.0f} s, whole bench {result.seconds:.0f} s, "
        f"1 vCPU, QEMU peak RSS {result.max_rss_mib:.0f} MiB"
    )
    report(json.loads(lines[-1].removeprefix(RESULT)), vm)
    return 0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--services", type=int, default=1000, help="ClusterIP Services (x 5)")
    parser.add_argument("--timeout", type=float, default=900.0, help="VM seconds, boot included")
    parser.add_argument(
        "--profile", type=int, default=0, metavar="N",
        help="print the cProfile of each applier case (its N costliest functions) on stderr",
    )  # fmt: skip
    parser.add_argument("--repeat", type=int, default=3, help="runs per case; the best counts")
    parser.add_argument("--inside", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if os.geteuid() != 0:
        sys.exit("the benchmark needs root (it boots a VM and creates network namespaces)")
    if args.inside:
        if not in_vm():
            sys.exit("--inside runs in the VM this script boots (PYKUBEPROXY_IN_VM=1)")
        start = time.monotonic()
        result = inside(args.services, args.profile, args.repeat)
        log(f"done in {time.monotonic() - start:.0f} s")
        print(RESULT + json.dumps(result), flush=True)
        return
    sys.exit(host(args.services, args.timeout, args.profile, args.repeat))


if __name__ == "__main__":
    main()
