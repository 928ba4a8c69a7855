"""The agent process in iptables mode, end to end: from exec and from API writes to the kernel.

bench_iptables.py times the applier alone; this times what an operator sees. The
`pykubeproxy` process starts in a sandbox node (pykubeproxy.sandbox.lab) against the API server
double, which already stores 1,000 or 10,000 ClusterIP Services x 5 endpoints (every third a
NodePort), and then Services and EndpointSlices are written. "In the kernel" is read from the
kernel, never from the agent: a probe process in the node namespace reads the nat table in a
loop the way iptables-legacy-save does (getsockopt IPT_SO_GET_ENTRIES, without the text), at a
fraction of iptables-legacy-save's CPU, and notes when the KUBE-SEP chains and each DNAT
destination first show. Each endpoint change moves one endpoint of one Service to a new pod IP,
so the rule to wait for is the DNAT to that IP (in a new KUBE-SEP chain).

Next to the agent, iptables-legacy-restore of the same rules: the agent's own rules, saved from
the node, into a fresh namespace; and for each endpoint change, ``--noflush`` of what
kube-proxy's partial sync writes, taken from the node's rules after the change. Those run in
namespaces created here (``pkpb-agent-*``) and deleted afterwards, also on failure; the root
namespace is never touched.

    python bench/bench_agent.py [--sizes 10,1000,10000] [--json out.json]   # as root
"""

from __future__ import annotations

import argparse
import bisect
import ctypes
import errno
import json
import math
import os
import random
import re
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

# bench/ is not a package: run as a script, its directory is sys.path[0].
from bench_iptables import cluster, machine, netns, restore

from pykubeproxy.iptables.ruleset import OWNED_CHAINS
from pykubeproxy.model import EndpointsMap, ServicePortMap
from pykubeproxy.sandbox.apiserver import ApiServerDouble
from pykubeproxy.sandbox.lab import Lab, endpoint_slice, service
from pykubeproxy.sandbox.netns import NetNS

SEED = 20240601  # which Services change, in which order: the same in every run


def log(message: str) -> None:
    """Progress on stderr: a 10,000-Service run takes several minutes."""
    print(f"[bench-agent] {message}", file=sys.stderr, flush=True)


# --- probe: runs inside the node namespace ----------------------------------------------------

IPT_SO_GET_INFO = 64  # IPT_BASE_CTL, linux/netfilter_ipv4/ip_tables.h
IPT_SO_GET_ENTRIES = 65
GETINFO_SIZE = 84  # struct ipt_getinfo; its last field is the size of the entries
ENTRIES_OFFSET = 40  # struct ipt_get_entries: name[32], size, then the 8-aligned entries
# A DNAT target as the kernel stores it: name[29], revision, then revision 0's
# nf_nat_ipv4_multi_range_compat (rangesize, flags, min_ip, ...) or revision 1 and 2's
# nf_nat_range (flags, min_addr, ...).
DNAT_TARGET = re.compile(rb"DNAT\x00{25}([\x00-\x02])(.{12})", re.DOTALL)
# A user chain's name is stored once, in its head entry; jumps to it hold an offset.
SEP_CHAIN = re.compile(rb"KUBE-SEP-")
_libc = ctypes.CDLL(None, use_errno=True)


class NatTable:
    """This namespace's nat table as the kernel hands it to iptables-legacy-save."""

    def __init__(self) -> None:
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_RAW)
        self.buf = ctypes.create_string_buffer(ENTRIES_OFFSET)

    def _get(self, option: int, buf: ctypes.Array[ctypes.c_char], size: int) -> None:
        length = ctypes.c_uint(size)
        fd = self.sock.fileno()
        if _libc.getsockopt(fd, socket.IPPROTO_IP, option, buf, ctypes.byref(length)) != 0:
            code = ctypes.get_errno()
            raise OSError(code, os.strerror(code))

    def read(self) -> memoryview:
        """The entries; read again when the table is replaced between the two calls."""
        while True:
            info = ctypes.create_string_buffer(b"nat", GETINFO_SIZE)
            self._get(IPT_SO_GET_INFO, info, GETINFO_SIZE)
            size: int = struct.unpack_from("=I", info, GETINFO_SIZE - 4)[0]
            if len(self.buf) < ENTRIES_OFFSET + size:
                self.buf = ctypes.create_string_buffer(ENTRIES_OFFSET + size + size // 4)
            # The kernel writes a match or target name up to its NUL only: without this, the
            # rest of the name field would hold whatever an earlier read left there.
            ctypes.memset(self.buf, 0, ENTRIES_OFFSET + size)
            struct.pack_into("=32sI", self.buf, 0, b"nat", size)
            try:
                self._get(IPT_SO_GET_ENTRIES, self.buf, ENTRIES_OFFSET + size)
            except OSError as err:
                if err.errno == errno.EAGAIN:
                    continue
                raise
            return memoryview(self.buf)[ENTRIES_OFFSET : ENTRIES_OFFSET + size]


def probe(pause: float) -> None:
    """One JSON line per read: when it returned, KUBE-SEP chains, DNAT IPs new since the last."""
    table = NatTable()
    known: set[bytes] = set()
    while True:
        started = time.monotonic()
        entries = table.read()
        done = time.monotonic()
        seps = len(SEP_CHAIN.findall(entries))
        ips = {
            bytes(data[8:12] if bytes(rev) == b"\0" else data[4:8])
            for rev, data in DNAT_TARGET.findall(entries)
        }
        entries.release()
        new = [socket.inet_ntoa(ip) for ip in ips - known]
        known = ips
        line = {"t": done, "read": done - started, "seps": seps, "dnat": len(ips), "new": new}
        print(json.dumps(line), flush=True)
        time.sleep(pause)


# --- parent: the probe's reports --------------------------------------------------------------


@dataclass
class Read:
    when: float  # time.monotonic() as the read returned: the same clock in every process
    took: float
    seps: int


class Probe:
    """The probe process and what it reported: every read, and when each DNAT IP first showed."""

    def __init__(self, node: NetNS, pause: float) -> None:
        self.cond = threading.Condition()
        self.reads: list[Read] = []
        self.first_seen: dict[str, float] = {}
        self.ended = False
        argv = [sys.executable, __file__, "--probe", str(pause)]
        self.proc = node.popen(argv, stdout=subprocess.PIPE, text=True)
        self.started = time.monotonic()
        self.cpu = 0.0
        self.wall = 0.0
        self._thread = threading.Thread(target=self._follow, name="probe", daemon=True)
        self._thread.start()

    def _follow(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            report = json.loads(line)
            with self.cond:
                self.reads.append(Read(report["t"], report["read"], report["seps"]))
                for ip in report["new"]:
                    self.first_seen.setdefault(ip, report["t"])
                self.cond.notify_all()
        with self.cond:
            self.ended = True
            self.cond.notify_all()

    def slack(self, seen: list[float]) -> float:
        """Mean time from the read before to each read that first showed a rule: how late
        those latencies may be."""
        with self.cond:
            times = [r.when for r in self.reads]
        before = [bisect.bisect_left(times, t) - 1 for t in seen]
        gaps = [t - times[i] for t, i in zip(seen, before, strict=True) if i >= 0]
        return sum(gaps) / len(gaps) if gaps else math.nan

    def stop(self) -> None:
        self.cpu = cpu_seconds(self.proc.pid)
        self.wall = time.monotonic() - self.started
        self.proc.terminate()
        self.proc.wait(timeout=10)
        self._thread.join(timeout=10)


# --- the Services in the API double -----------------------------------------------------------


@dataclass
class Workload:
    """cluster()'s Services as API objects, and the writes that change them."""

    server: ApiServerDouble
    keys: list[tuple[str, str]]  # (namespace, name) of each Service
    cluster_ips: list[str]
    ips: list[list[str]]  # each Service's endpoint IPs, as last written
    target_port: int
    next_pod_ip: int
    next_cluster_ip: int
    order: list[int]  # the order in which Services change; no repeat before all changed
    live: set[str] = field(default_factory=set)  # endpoint IPs written by move() still in use
    moves: int = 0
    added: int = 0

    @classmethod
    def populate(
        cls, server: ApiServerDouble, services: ServicePortMap, endpoints: EndpointsMap
    ) -> Workload:
        names = list(services)
        target_port = endpoints[names[0]][0].port
        work = cls(
            server,
            [(n.service.namespace, n.service.name) for n in names],
            [str(services[n].cluster_ip) for n in names],
            [[str(ep.ip) for ep in endpoints[n]] for n in names],
            target_port,
            int(max(ep.ip for eps in endpoints.values() for ep in eps)) + 1,
            int(max(svc.cluster_ip for svc in services.values())) + 1,
            random.Random(SEED).sample(range(len(names)), len(names)),
        )
        for i, name in enumerate(names):
            svc = services[name]
            namespace, svc_name = work.keys[i]
            server.create(
                "services",
                service(
                    svc_name,
                    work.cluster_ips[i],
                    svc.port,
                    target_port,
                    namespace=namespace,
                    node_port=svc.node_port,
                ),
            )
            server.create("endpointslices", work._slice(i))
        return work

    def _slice(self, i: int) -> dict[str, Any]:
        namespace, name = self.keys[i]
        return endpoint_slice(name, self.ips[i], self.target_port, namespace=namespace)

    def _pod_ip(self) -> str:
        self.next_pod_ip += 1
        return socket.inet_ntoa((self.next_pod_ip - 1).to_bytes(4, "big"))

    def move(self) -> tuple[int, str, float]:
        """Move one endpoint of the next Service to a new pod IP: (Service, new IP, written at)."""
        i = self.order[self.moves % len(self.order)]
        slot = self.moves % len(self.ips[i])
        self.moves += 1
        ip = self._pod_ip()
        self.live.discard(self.ips[i][slot])
        self.live.add(ip)
        self.ips[i][slot] = ip
        written = time.monotonic()
        self.server.update("endpointslices", self._slice(i))
        return i, ip, written

    def add_service(self) -> tuple[list[str], float]:
        """A new ClusterIP Service with 5 endpoints: (its endpoint IPs, written at)."""
        i = len(self.keys)
        self.added += 1
        self.keys.append(("bench-new", f"new-{self.added}"))
        self.cluster_ips.append(socket.inet_ntoa(self.next_cluster_ip.to_bytes(4, "big")))
        self.next_cluster_ip += 1
        self.ips.append([self._pod_ip() for _ in self.ips[0]])
        namespace, name = self.keys[i]
        obj = service(name, self.cluster_ips[i], 80, self.target_port, namespace=namespace)
        written = time.monotonic()
        self.server.create("services", obj)
        self.server.create("endpointslices", self._slice(i))
        return self.ips[i], written


# --- iptables-legacy-save text ----------------------------------------------------------------

Chains = dict[str, dict[str, list[str]]]  # table -> user-defined chain -> its "-A" lines


def save(ns: str) -> str:
    argv = ["ip", "netns", "exec", ns, "iptables-legacy-save"]
    return subprocess.run(argv, capture_output=True, text=True, check=True, timeout=600).stdout


def user_chains(saved: str) -> Chains:
    tables: Chains = {}
    chains: dict[str, list[str]] = {}
    for line in saved.splitlines():
        if line.startswith("*"):
            chains = tables.setdefault(line[1:], {})
        elif line.startswith(":"):
            name, policy = line[1:].split()[:2]
            if policy == "-":
                chains[name] = []
        elif line.startswith("-A "):
            chain = line.split(maxsplit=2)[1]
            if chain in chains:
                chains[chain].append(line)
    return tables


def service_chains(nat: dict[str, list[str]], cluster_ip: str) -> set[str]:
    """A Service's nat chains: KUBE-SVC/SVL/EXT/FW share one hash, KUBE-SEPs are their targets."""
    rule = next(r for r in nat["KUBE-SERVICES"] if f" -d {cluster_ip}/32 " in r)
    suffix = rule.rpartition("-j ")[2].split()[0].rpartition("-")[2]
    own = {f"KUBE-{kind}-{suffix}" for kind in ("SVC", "SVL", "EXT", "FW")} & nat.keys()
    return own | {sep for c in own for r in nat[c] for sep in re.findall(r"-j (KUBE-SEP-\S+)", r)}


def partial_restore(before: Chains, after: Chains, cluster_ip: str) -> str:
    """iptables-restore --noflush input for one changed Service, as kube-proxy's partial sync.

    The filter table's and nat's own top-level chains, and the Service's chains, are written
    whole (declaring a chain flushes it); chains that are gone are declared, so emptied, then
    deleted (-X takes empty chains only). Any other chain that differs would be written too,
    so restoring this keeps a copy equal to the node.
    """
    changed = service_chains(after["nat"], cluster_ip)
    lines: list[str] = []
    for table in ("filter", "nat"):
        new, old = after.get(table, {}), before.get(table, {})
        written = [c for c in new if c in OWNED_CHAINS or c in changed or new[c] != old.get(c)]
        gone = [chain for chain in old if chain not in new]
        lines += [f"*{table}", *(f":{chain} - [0:0]" for chain in written + gone)]
        lines += [rule for chain in written for rule in new[chain]]
        lines += [f"-X {chain}" for chain in gone]
        lines.append("COMMIT")
    return "\n".join(lines) + "\n"


def normalized(saved: str) -> dict[str, list[str]]:
    """Saved rules by table, without chain counters, to compare two namespaces (which list
    their tables in the order they were first used)."""
    tables: dict[str, list[str]] = {}
    lines: list[str] = []
    for line in saved.splitlines():
        if line.startswith("*"):
            lines = tables.setdefault(line[1:], [])
        elif not line.startswith("#"):
            lines.append(re.sub(r" \[\d+:\d+\]$", "", line))
    return tables


# --- the agent, seen from /proc and its log ---------------------------------------------------


def cpu_seconds(pid: int) -> float:
    """utime + stime of a process (fields 14 and 15 of /proc/<pid>/stat)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def peak_rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"no VmHWM for pid {pid}")


KLOG = re.compile(r"^[IWEF](\d{4} \d\d:\d\d:\d\d)\.(\d{6}) +\d+ \S+\] (.*)$")
LISTED = re.compile(r"^(\w+): listed \d+ objects")
FULL_SYNC = re.compile(r"^full sync: \d+ services, \d+ changed, ([\d.]+)s")


def log_events(text: str) -> list[tuple[float, str]]:
    """(wall time, message) of each klog line of the agent."""
    year = time.localtime().tm_year
    events = []
    for line in text.splitlines():
        if match := KLOG.match(line):
            stamp = time.mktime(time.strptime(f"{year}{match[1]}", "%Y%m%d %H:%M:%S"))
            events.append((stamp + int(match[2]) / 1e6, match[3]))
    return events


def percentile(values: list[float], q: float) -> float:
    """Nearest-rank percentile."""
    ordered = sorted(values)
    return ordered[max(0, math.ceil(q * len(ordered)) - 1)] if ordered else math.nan


def sync_stats(metrics: dict[str, float], kind: str = "") -> tuple[float, float]:
    """(count, sum) of the agent's sync duration histogram: every sync, "full" or "partial"."""
    name = f"kubeproxy_sync_{kind}{'_' if kind else ''}proxy_rules_duration_seconds"
    return metrics.get(f"{name}_count", 0.0), metrics.get(f"{name}_sum", 0.0)


# --- one size ---------------------------------------------------------------------------------


class AgentRun:
    """One agent in one sandbox node, measured phase by phase into `out`."""

    def __init__(self, lab: Lab, ref: str, tmp: Path, args: argparse.Namespace) -> None:
        self.lab = lab
        self.ref = ref
        self.tmp = tmp
        self.args = args
        self.out: dict[str, Any] = {}
        self.node = lab.cluster.node.name
        self.probe: Probe | None = None
        self.pid = 0
        self.exec_wall = 0.0
        self.saved = ""  # the node's iptables-legacy-save after the start

    def wait(self, what: str, done: Callable[[], bool], required: bool = True) -> bool:
        """Wait for what the probe reports, while the agent runs, up to --timeout."""
        assert self.probe is not None
        deadline = time.monotonic() + self.args.timeout
        with self.probe.cond:
            while not done():
                left = deadline - time.monotonic()
                agent = self.lab.agent
                gone = self.pid != 0 and (agent is None or agent.poll() is not None)
                if left <= 0 or self.probe.ended or gone:
                    if not required:
                        return False
                    tail = "\n".join(self.lab.agent_log().splitlines()[-20:])
                    raise RuntimeError(f"gave up waiting for {what}; agent log:\n{tail}")
                self.probe.cond.wait(min(left, 1.0))
        return True

    def seen(self, ip: str) -> float:
        assert self.probe is not None
        first_seen = self.probe.first_seen
        self.wait(f"{ip} in the kernel", lambda: ip in first_seen)
        return first_seen[ip]

    def start(self, services: ServicePortMap, endpoints: EndpointsMap) -> Workload:
        """Row 1: exec -> every KUBE-SEP chain in the kernel; the same rules restored."""
        log(f"{len(services):,} Services: writing them to the API double")
        work = Workload.populate(self.lab.server, services, endpoints)
        probe = self.probe = Probe(self.lab.cluster.node, self.args.poll)
        self.wait("the probe's first read", lambda: bool(probe.reads))
        log("starting the agent")
        self.exec_wall, started = time.time(), time.monotonic()
        agent = self.lab.start_agent()
        self.pid = agent.pid
        argv = self._agent_argv()
        flags = argv[argv.index("pykubeproxy") + 1 :]
        flags[flags.index("--kubeconfig") + 1] = "<API double>"
        self.out["agent_flags"] = flags
        expected = sum(len(eps) for eps in endpoints.values())
        self.wait(f"{expected:,} KUBE-SEP chains", lambda: probe.reads[-1].seps >= expected)
        done = next(r.when for r in probe.reads if r.seps >= expected)
        self.out["start_s"] = done - started
        self.out["start_cpu_s"] = cpu_seconds(self.pid)  # noticed a probe read later
        self.out["start_slack_s"] = probe.slack([done])
        self.out["rss_after_start_mib"] = peak_rss_mib(self.pid)
        log(f"all {expected:,} KUBE-SEP chains in the kernel after {done - started:.2f}s")

        # The probe watches nat; the sync commits filter and mangle after it.
        self.wait("the first sync to end", self.lab.synced)
        saved = save(self.node)
        self.out["rules"] = sum(line.startswith("-A ") for line in saved.splitlines())
        full = self.tmp / "full.rules"
        full.write_text(saved)
        self.out["restore_full_s"] = restore(self.ref, full)
        self.saved = saved
        return work

    def _agent_argv(self) -> list[str]:
        """The agent's command line: `ip netns exec` execs it, so the pid is the agent's."""
        deadline = time.monotonic() + 10.0
        while time.monotonic() < deadline:
            argv = Path(f"/proc/{self.pid}/cmdline").read_bytes().decode().split("\0")[:-1]
            if "pykubeproxy" in argv:
                return argv
            time.sleep(0.01)
        raise RuntimeError(f"pid {self.pid} is not the agent: {argv}")

    def start_log(self) -> None:
        """When the agent says it listed each kind and finished its first full sync (it logs
        the sync after its follow-up work, so this is read at the end)."""
        for wall, message in log_events(self.lab.agent_log()):
            if match := LISTED.match(message):
                self.out.setdefault(f"listed_{match[1]}_at_s", wall - self.exec_wall)
            elif match := FULL_SYNC.match(message):
                self.out.setdefault("first_full_sync_s", float(match[1]))
                self.out.setdefault("first_full_sync_end_at_s", wall - self.exec_wall)

    def changes(self, work: Workload) -> None:
        """Row 2: one endpoint change at a time; the changed chains restored with --noflush."""
        log(f"{self.args.changes} endpoint changes, one at a time")
        assert self.probe is not None
        before_text = self.saved
        before = user_chains(before_text)
        delta = self.tmp / "delta.rules"
        latencies, restores, seen = [], [], []
        metrics = self.lab.metrics()
        for _ in range(self.args.changes):
            i, ip, written = work.move()
            seen.append(self.seen(ip))
            latencies.append(seen[-1] - written)
            after_text = save(self.node)
            after = user_chains(after_text)
            delta.write_text(partial_restore(before, after, work.cluster_ips[i]))
            restores.append(restore(self.ref, delta, "--noflush"))
            before, before_text = after, after_text
        self.out["change_slack_s"] = self.probe.slack(seen)
        self.out["change_s"] = latencies
        self.out["restore_delta_s"] = restores
        self.out["restore_delta_rules"] = delta.read_text().count("\n-A ")
        reference, node = normalized(save(self.ref)), normalized(before_text)
        self.out["reference_matches"] = reference == node
        self.out["reference_differences"] = [
            f"{table}: {sorted(set(reference.get(table, [])) ^ set(lines))[:4]}"
            for table, lines in node.items()
            if reference.get(table) != lines
        ]
        count0, sum0 = sync_stats(metrics, "partial")
        count1, sum1 = sync_stats(self.lab.metrics(), "partial")
        if count1 > count0:
            self.out["agent_partial_sync_s"] = (sum1 - sum0) / (count1 - count0)
            self.out["agent_partial_syncs"] = int(count1 - count0)

    def new_services(self, work: Workload) -> None:
        """Row 3: a Service and its EndpointSlice written -> its 5 DNAT rules in the kernel."""
        log(f"{self.args.changes} new Services, one at a time")
        assert self.probe is not None
        latencies, seen = [], []
        for _ in range(self.args.changes):
            ips, written = work.add_service()
            seen.append(max(self.seen(ip) for ip in ips))
            latencies.append(seen[-1] - written)
        self.out["new_service_s"] = latencies
        self.out["new_service_slack_s"] = self.probe.slack(seen)

    def load(self, work: Workload, seconds: float) -> None:
        """Row 4: endpoint changes at a steady rate; each one's latency to the kernel."""
        assert self.probe is not None
        rate = self.args.rate
        log(f"{rate:g} endpoint changes/s for {seconds:g}s")
        writes = []
        started = time.monotonic()
        for k in range(round(rate * seconds)):
            delay = started + k / rate - time.monotonic()
            if delay > 0:
                time.sleep(delay)
            writes.append(work.move())
        last_write = writes[-1][2]
        first_seen, live = self.probe.first_seen, work.live
        self.wait(
            "every change of the load run",
            lambda: all(ip in first_seen or ip not in live for _, ip, _ in writes),
            required=False,
        )
        seen = [(first_seen[ip], t) for _, ip, t in writes if ip in first_seen]
        latencies = [arrived - t for arrived, t in seen]
        unseen = [ip for _, ip, _ in writes if ip not in first_seen]
        self.out["load"] = {
            "seconds": seconds,
            "written": len(writes),
            "rate": (len(writes) - 1) / (last_write - started) if len(writes) > 1 else 0.0,
            "p50_s": percentile(latencies, 0.5),
            "p99_s": percentile(latencies, 0.99),
            "max_s": max(latencies, default=math.nan),
            "missed": sum(ip in live for ip in unseen),
            "superseded": sum(ip not in live for ip in unseen),
            "slack_s": self.probe.slack([arrived for arrived, _ in seen]),
        }

    def idle(self, window: float) -> None:
        """Rows 5 and 6: CPU over an idle window with the probe stopped, then peak RSS."""
        assert self.probe is not None
        self.probe.stop()
        self.out["probe_cpu_share"] = self.probe.cpu / self.probe.wall
        last = self.probe.reads[-20:]
        self.out["probe_read_s"] = sum(r.took for r in last) / len(last)
        time.sleep(2.0)  # the last sync's follow-up work (conntrack, health) ends
        log(f"idle for {window:g}s")
        metrics = self.lab.metrics()
        cpu0, started = cpu_seconds(self.pid), time.monotonic()
        time.sleep(window)
        cpu1, ended = cpu_seconds(self.pid), time.monotonic()
        after = self.lab.metrics()
        self.out["idle_s"] = ended - started
        self.out["idle_cpu_s"] = cpu1 - cpu0
        for key, kind in (("idle_syncs", ""), ("idle_full_syncs", "full")):
            self.out[key] = int(sync_stats(after, kind)[0] - sync_stats(metrics, kind)[0])
        self.out["rss_peak_mib"] = peak_rss_mib(self.pid)


def measure(size: int, args: argparse.Namespace) -> dict[str, Any]:
    services, endpoints = cluster(size)
    seconds = args.load_seconds or (60.0 if size >= 10_000 else 30.0)
    idle = args.idle or (600.0 if size >= 10_000 else 60.0)
    with (
        Lab() as lab,
        netns(f"{size}-ref", "pkpb-agent") as ref,
        tempfile.TemporaryDirectory(prefix="pkpb-agent-") as tmp,
    ):
        run = AgentRun(lab, ref, Path(tmp), args)
        work = run.start(services, endpoints)
        run.changes(work)
        run.new_services(work)
        run.load(work, seconds)
        run.idle(idle)
        run.start_log()
        return {"services": size, **run.out}


# --- the table --------------------------------------------------------------------------------


def secs(x: float) -> str:
    return f"{x:.3f}" if x < 10 else f"{x:.1f}"


def ratio(a: float, b: float) -> str:
    return f"{a / b:.1f}x"


def rows(results: list[dict[str, Any]], args: argparse.Namespace) -> list[list[str]]:
    def p50(r: dict[str, Any], key: str) -> float:
        return percentile(r[key], 0.5)

    cells: list[tuple[str, Callable[[dict[str, Any]], str]]] = [
        ("1. agent start (exec) -> every KUBE-SEP chain in the kernel, s",
         lambda r: secs(r["start_s"])),
        ("   iptables-legacy-restore of the same rules, fresh netns, s",
         lambda r: secs(r["restore_full_s"])),
        ("   agent / restore", lambda r: ratio(r["start_s"], r["restore_full_s"])),
        ("   of which the agent's first sync (its log), s",
         lambda r: secs(r.get("first_full_sync_s", math.nan))),
        ("   agent CPU by then (user + system), s", lambda r: secs(r["start_cpu_s"])),
        ("2. one endpoint change -> new rule in the kernel, p50 / max, s",
         lambda r: f"{secs(p50(r, 'change_s'))} / {secs(max(r['change_s']))}"),
        ("   iptables-legacy-restore --noflush of the changed chains, p50 / max, s",
         lambda r: f"{secs(p50(r, 'restore_delta_s'))} / {secs(max(r['restore_delta_s']))}"),
        ("   agent / restore (p50)",
         lambda r: ratio(p50(r, "change_s"), p50(r, "restore_delta_s"))),
        ("3. new Service (Service + EndpointSlice) -> rules in the kernel, p50 / max, s",
         lambda r: f"{secs(p50(r, 'new_service_s'))} / {secs(max(r['new_service_s']))}"),
        (f"4. {args.rate:g} endpoint changes/s -> kernel, p50 / p99 / max, s",
         lambda r: " / ".join(secs(r["load"][k]) for k in ("p50_s", "p99_s", "max_s"))),
        ("   load duration, s (changes written, not seen)",
         lambda r: f"{r['load']['seconds']:g} ({r['load']['written']}, {r['load']['missed']})"),
        ("5. agent peak RSS (VmHWM), MiB", lambda r: f"{r['rss_peak_mib']:.0f}"),
        ("6. agent CPU while idle, s over the window (% of one core)",
         lambda r: f"{r['idle_cpu_s']:.2f} over {r['idle_s']:.0f} s "
                   f"({100 * r['idle_cpu_s'] / r['idle_s']:.1f} %)"),
    ]  # fmt: skip
    header = ["", *(f"{r['services']:,} Services" for r in results)]
    return [header, *([label, *(cell(r) for r in results)] for label, cell in cells)]


def notes(results: list[dict[str, Any]], args: argparse.Namespace, when: str) -> list[str]:
    flags = " ".join(results[0]["agent_flags"])
    lines = [
        f"agent: `python -m pykubeproxy {flags}`: the sandbox Lab's flags "
        "(--iptables-min-sync-period 100ms is the Lab's; the agent's default is 1s), "
        "everything else at the agent's defaults (iptables mode, --iptables-sync-period 30s); "
        "the API server double runs in this benchmark's process and sends watch bookmarks "
        "every second",
        "in the kernel: a probe process in the node namespace reads the nat table in a loop "
        f"(getsockopt IPT_SO_GET_ENTRIES, {args.poll:g} s pause between reads); a latency ends "
        "as the first read that shows the chain or DNAT rule returns, so it may be late by up "
        "to the time since the read before (slack, below)",
        "restore references include starting `ip netns exec`; the --noflush delta is what "
        "kube-proxy's partial sync writes: filter's and nat's top-level chains, the changed "
        "Service's KUBE-SVC/KUBE-EXT/KUBE-SEP chains, and -X of the old KUBE-SEP chain, taken "
        "from the node's iptables-legacy-save after each change and restored into a copy of the "
        "node's rules",
    ]
    for r in results:
        load = r["load"]
        agent_says = (
            f"agent log: Services listed at +{r.get('listed_Service_at_s', math.nan):.1f}s, "
            f"EndpointSlices at +{r.get('listed_EndpointSlice_at_s', math.nan):.1f}s, first full "
            f"sync {r.get('first_full_sync_s', math.nan):.2f}s, ended at "
            f"+{r.get('first_full_sync_end_at_s', math.nan):.1f}s"
        )
        partial = (
            f"; mean partial sync by the agent's metrics during row 2: "
            f"{r['agent_partial_sync_s']:.3f}s over {r['agent_partial_syncs']} syncs"
            if "agent_partial_sync_s" in r
            else ""
        )
        lines.append(
            f"{r['services']:,} Services: {r['rules']:,} rules in iptables-legacy-save; "
            f"{agent_says}{partial}; peak RSS after start {r['rss_after_start_mib']:.0f} MiB; "
            f"mean slack {r['start_slack_s']:.3f}s (row 1), {r['change_slack_s']:.3f}s "
            f"(row 2), {r['new_service_slack_s']:.3f}s (row 3), {load['slack_s']:.3f}s (row 4), "
            f"one read of the full table {r['probe_read_s']:.3f}s, probe "
            f"CPU {100 * r['probe_cpu_share']:.0f} % of a core; load written at "
            f"{load['rate']:.1f}/s, {load['superseded']} superseded before seen; "
            f"{r['idle_syncs']} syncs ({r['idle_full_syncs']} full) in the idle window; the "
            "restored copy "
            f"{'matched' if r['reference_matches'] else 'did NOT match'} the node's rules"
            f"{''.join(f' ({d})' for d in r['reference_differences'])}; "
            f"delta {r['restore_delta_rules']} rules"
        )
    lines += [f"{when}", machine()]
    return lines


def warm_file_cache() -> None:
    """Import what the agent imports once, untimed: each size then starts as on a node where
    the agent ran before. (The first start after a boot also reads its packages from disk:
    4 s at 10 Services in one run.)"""
    subprocess.run([sys.executable, "-c", "import pykubeproxy.cli, pykubeproxy.kube"], check=True)


def bench(args: argparse.Namespace) -> None:
    warm_file_cache()
    results = [measure(int(size), args) for size in args.sizes.split(",")]
    when = f"date: {datetime.now(UTC):%Y-%m-%d %H:%M} UTC"
    table = rows(results, args)
    print("| " + " | ".join(table[0]) + " |")
    print("|" + "|".join("---" for _ in table[0]) + "|")
    for row in table[1:]:
        print("| " + " | ".join(row) + " |")
    print()
    footnotes = notes(results, args, when)
    for line in footnotes:
        print(f"- {line}")
    if args.json:
        doc = {"rows": table, "notes": footnotes, "results": results}
        Path(args.json).write_text(json.dumps(doc, indent=2) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", default="10,1000,10000", help="comma-separated Service counts")
    parser.add_argument("--changes", type=int, default=10, help="single changes, new Services")
    parser.add_argument("--rate", type=float, default=20.0, help="load: endpoint changes/s")
    parser.add_argument(
        "--load-seconds", type=float, help="load duration (default 30 s, 60 s from 10,000)"
    )
    parser.add_argument(
        "--idle", type=float, help="idle window (default 60 s, 600 s from 10,000), seconds"
    )
    parser.add_argument("--poll", type=float, default=0.05, help="pause between kernel reads")
    parser.add_argument("--timeout", type=float, default=600.0, help="longest wait, seconds")
    parser.add_argument("--json", help="also write the table and raw numbers here")
    parser.add_argument("--probe", type=float, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.probe is not None:
        probe(args.probe)
        return
    if os.geteuid() != 0:
        sys.exit("the benchmark needs root (it creates network namespaces)")
    bench(args)


if __name__ == "__main__":
    main()
