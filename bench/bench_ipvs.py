"""How long the IPVS backend takes to sync, against ipvsadm --restore of the same table.

The IPVS applier writes virtual and real servers, kube-ipvs0 addresses and kube-proxy's ipsets
through pyroute2 netlink, one message per object, after reading the kernel first; the usual
command-line way is ``ipvsadm --restore``. This measures both on the same rendered state at
1,000 ClusterIP Services x 5 endpoints: the first full sync, a no-op re-sync, a one-endpoint
change, and the matching ``ipvsadm --restore`` runs (plus ``ipset restore`` and ``ip -batch``
for the ipsets and addresses the applier also writes), so the README can say what IPVS mode
costs next to the tool kube-proxy users know.

This machine's kernel may lack ip_vs, so the measurements run in one VM on Debian's kernel
(`pykubeproxy.sandbox.vm`): the host boots it once and runs this file with ``--inside``, which
works in network namespaces it creates and deletes (``pkp-*``), never in the guest's root
namespace. Without KVM the VM is emulated (TCG), so absolute times are ~30x those of hardware;
only ratios measured in the same run mean anything, and the table says which it was.

    python bench/bench_ipvs.py [--services 1000] [--timeout 900]   # as root, on the host
"""

from __future__ import annotations

import argparse
import json
import os
import platform
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
from pykubeproxy.ipvs.state import DUMMY_DEVICE, IPSETS, IpvsState, RealServer, VirtualServer
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


def kernel_counts(ns: NetNS) -> tuple[int, int]:
    """(virtual servers, real servers) in ns, as ipvsadm lists them."""
    lines = ns.exec(["ipvsadm", "-Ln"], timeout=600).stdout.splitlines()
    virtual = sum(1 for line in lines if line.startswith(("TCP", "UDP", "SCTP")))
    real = [line for line in lines if line.strip().startswith("->")]
    return virtual, sum(1 for line in real if "RemoteAddress" not in line)


def inside(size: int) -> dict[str, Any]:
    """Every measurement, in two fresh namespaces of this (guest) kernel."""
    out: dict[str, Any] = {"services": size, "kernel": platform.release()}
    services, endpoints = cluster(size)

    def desired() -> IpvsState:
        # No node IPs: the builder's NodePorts add no virtual server, only ClusterIPs do.
        return render(services, endpoints, CONFIG, NodeFacts(), (), frozenset()).state

    out["render"], state = timed(desired)
    out["virtual"] = len(state.services)
    out["real"] = sum(len(rs) for rs in state.real_servers.values())
    log(f"{out['virtual']} virtual / {out['real']} real servers rendered in {out['render']:.2f} s")

    with NetNS("ipvs-bench") as ns, tempfile.TemporaryDirectory(prefix="pkpb-ipvs-") as tmp:

        def inside_ns(fn: Callable[[], _T]) -> tuple[float, _T]:
            return ns.run_inside(lambda: timed(fn), timeout=INSIDE_TIMEOUT)

        applier = IpvsApplier()
        out["full"], _ = inside_ns(lambda: applier.apply(state))
        out["full_writes"] = len(applier.changes)
        out["rss_peak"], out["rss"] = rss_mib()
        log(f"first full sync: {out['full']:.1f} s, {out['full_writes']} kernel writes")
        if kernel_counts(ns) != (out["virtual"], out["real"]):
            raise RuntimeError(f"after the full sync ipvsadm -Ln shows {kernel_counts(ns)}")

        out["noop"], _ = inside_ns(lambda: applier.apply(desired()))
        out["noop_writes"] = len(applier.changes)
        log(f"no-op sync: {out['noop']:.1f} s, {out['noop_writes']} kernel writes")

        changed = sorted(services, key=str)[size // 2]
        old = endpoints[changed]
        moved = Endpoint(IPv4Address(int(old[0].ip) + 0x100000), old[0].port)  # a new pod IP
        endpoints = {**endpoints, changed: (moved, *old[1:])}  # desired() sees this one now

        def change() -> IpvsState:  # as the agent's partial sync does it
            new = desired()
            applier.apply(new, full=False)
            return new

        out["change"], after = inside_ns(change)
        out["change_writes"] = len(applier.changes)
        out["change_real"] = sum(
            len(state.real_servers[vs] ^ after.real_servers[vs]) for vs in after.services
        )
        out["change_log"] = applier.changes
        delta = ipvsadm_delta(state, after, applier.draining())
        log(f"one-endpoint change: {out['change']:.2f} s: {'; '.join(applier.changes)}")

        tables = list(render_tables(after, CONFIG))
        out["rules"] = sum(len(rules) for table in tables for rules in table.chains.values())
        iptc = IptcApplier(str(Path(tmp) / "xtables.lock"))
        out["iptables"], _ = inside_ns(lambda: iptc.apply(tables))
        out["iptables_again"], _ = inside_ns(lambda: iptc.apply(tables))
        log(
            f"iptables half: {out['rules']} rules, {out['iptables']:.2f} s, "
            f"again {out['iptables_again']:.2f} s"
        )

        with NetNS("ipvsadm-ref") as ref:
            work = Path(tmp)
            rules = ipvsadm_rules(state)
            out["ref_full"] = restore(ref, ["ipvsadm", "--restore"], rules, work)
            if kernel_counts(ref) != (out["virtual"], out["real"]):
                raise RuntimeError(f"after ipvsadm --restore: {kernel_counts(ref)}")
            out["ref_delta"] = restore(ref, ["ipvsadm", "--restore"], delta, work)
            out["ref_delta_lines"] = delta.count("\n")
            sets, addresses = ipset_rules(state), ip_batch(state)
            out["ref_ipset"] = restore(ref, ["ipset", "restore"], sets, work)
            out["ref_ip"] = restore(ref, ["ip", "-batch", "-"], addresses, work)
            out["ref_lines"] = sum(text.count("\n") for text in (rules, sets, addresses))
            out["ipvsadm"] = ref.exec(["ipvsadm", "--version"]).stdout.strip()
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

    def cells(self) -> list[str]:
        def num(n: int | str) -> str:
            return f"{n:,}" if isinstance(n, int) else n

        return [self.case, num(self.services), num(self.virtual), num(self.real),
                f"{self.seconds:.3f}", num(self.writes)]  # fmt: skip


def table(r: dict[str, Any]) -> list[Row]:
    n, vs, rs = r["services"], r["virtual"], r["real"]
    cli = r["ref_full"] + r["ref_ipset"] + r["ref_ip"]
    return [
        Row("render (pure)", n, vs, rs, r["render"]),
        Row("IPVS applier, first full sync (ipsets + kube-ipvs0 + IPVS)", n, vs, rs, r["full"],
            r["full_writes"]),
        Row("IPVS applier, no-op sync (render + read kernel)", n, vs, rs, r["noop"],
            r["noop_writes"]),
        Row("IPVS applier, one-endpoint change, partial sync", n, 1, r["change_real"],
            r["change"], r["change_writes"]),
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
    header = ["case", "services", "virtual servers", "real servers", "seconds", "kernel writes"]
    print("| " + " | ".join(header) + " |")
    print("|" + "|".join("---" for _ in header) + "|")
    for row in table(r):
        print("| " + " | ".join(row.cells()) + " |")
    cli = r["ref_full"] + r["ref_ipset"] + r["ref_ip"]
    print()
    print(f"- {vm}")
    print(
        f"- ratio, first full sync: IPVS applier / ipvsadm --restore = "
        f"{r['full'] / r['ref_full']:.1f}x; / (ipvsadm + ipset restore + ip -batch) = "
        f"{r['full'] / cli:.1f}x; one-endpoint change / ipvsadm --restore delta = "
        f"{r['change'] / r['ref_delta']:.1f}x"
    )
    print(f"- one-endpoint change wrote: {'; '.join(r['change_log'])}")
    print(
        f"- RSS of the guest process after the first full sync: VmRSS {r['rss']:.0f} MiB, "
        f"ru_maxrss {r['rss_peak']:.0f} MiB"
    )
    print(
        "- kernel writes = netlink writes of the applier; for the CLI rows, input lines. "
        "The ClusterIP Services come from bench_iptables.cluster(); with no node IPs its "
        "NodePorts add no virtual server. CLI times include starting the process."
    )
    print(f"- host {machine()}; guest Linux {r['kernel']}, {r['ipvsadm']}")


def host(size: int, timeout: float) -> int:
    command = [sys.executable, str(Path(__file__).resolve()), "--inside", "--services", str(size)]
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
    parser.add_argument("--inside", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if os.geteuid() != 0:
        sys.exit("the benchmark needs root (it boots a VM and creates network namespaces)")
    if args.inside:
        if not in_vm():
            sys.exit("--inside runs in the VM this script boots (PYKUBEPROXY_IN_VM=1)")
        start = time.monotonic()
        result = inside(args.services)
        log(f"done in {time.monotonic() - start:.0f} s")
        print(RESULT + json.dumps(result), flush=True)
        return
    sys.exit(host(args.services, args.timeout))


if __name__ == "__main__":
    main()
