"""The conntrack sysctls kube-proxy sets at start: table size and timeouts.

As upstream's ``setupConntrack`` (cmd/kube-proxy/app/server_linux.go) and its
``realConntracker`` (cmd/kube-proxy/app/conntrack.go):

- ``nf_conntrack_max`` is ``maxPerCore`` times the CPUs, but at least ``min``; ``maxPerCore: 0``
  leaves it alone. When it is set, the conntrack hash table is grown to a quarter of it
  (``/sys/module/nf_conntrack/parameters/hashsize``) if it is smaller, unless /sys is
  mounted read-only, which is reported as a warning Event instead;
- ``nf_conntrack_tcp_timeout_established`` and ``..._close_wait`` (when above 0),
  ``nf_conntrack_tcp_be_liberal`` (when asked for), ``nf_conntrack_udp_timeout`` and
  ``..._udp_timeout_stream`` (when above 0), in whole seconds;
- each value is written only if the current one differs, and every write is logged.

Where this differs: upstream stops at the first write that fails; pykubeproxy logs one
warning for it and goes on (rules can be programmed without these limits). The table size
and hash size are host-wide: the kernel lets only the host's network namespace change
them, so in any other namespace (kind's nodes, for one) the write fails with that warning,
where upstream would exit. The timeouts belong to the agent's network namespace.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path

from pykubeproxy.config import Conntrack

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Paths:
    """Where the sysctls live; tests point these at files of their own."""

    netfilter: Path = Path("/proc/sys/net/netfilter")
    hashsize: Path = Path("/sys/module/nf_conntrack/parameters/hashsize")
    mounts: Path = Path("/proc/mounts")


@dataclass(frozen=True)
class Outcome:
    """What the setup did: the sysctls written, the ones that failed, a read-only /sys."""

    written: dict[str, int]
    failed: dict[str, str]
    read_only_sysfs: bool = False


def conntrack_max(settings: Conntrack, cpus: int) -> int:
    """upstream's getConntrackMax: 0 when maxPerCore leaves the limit alone."""
    per_core = settings.max_per_core or 0
    if per_core <= 0:
        return 0
    floor = settings.min or 0
    return max(per_core * cpus, floor)


def wanted(settings: Conntrack, cpus: int) -> list[tuple[str, int]]:
    """The netfilter sysctls the settings ask for, in upstream's order (name, value)."""
    values: list[tuple[str, int]] = []
    if (limit := conntrack_max(settings, cpus)) > 0:
        values.append(("nf_conntrack_max", limit))
    for name, seconds in (
        ("nf_conntrack_tcp_timeout_established", settings.tcp_established_timeout),
        ("nf_conntrack_tcp_timeout_close_wait", settings.tcp_close_wait_timeout),
    ):
        if seconds is not None and seconds > 0:
            values.append((name, int(seconds)))
    if settings.tcp_be_liberal:
        values.append(("nf_conntrack_tcp_be_liberal", 1))
    for name, seconds in (
        ("nf_conntrack_udp_timeout", settings.udp_timeout),
        ("nf_conntrack_udp_timeout_stream", settings.udp_stream_timeout),
    ):
        if seconds > 0:
            values.append((name, int(seconds)))
    return values


def _read_int(path: Path) -> int:
    """The file's integer; 0 when unreadable, as upstream's ignored read error gives."""
    try:
        return int(path.read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return 0


def _sysfs_writable(mounts: Path) -> bool:
    """Whether the first sysfs mount is read-write (upstream's isSysFSWritable)."""
    try:
        lines = mounts.read_text().splitlines()
    except OSError:
        return False
    for line in lines:
        fields = line.split()
        if len(fields) >= 4 and fields[2] == "sysfs":
            return fields[3].split(",")[0] == "rw"
    return False


def setup(settings: Conntrack, cpus: int | None = None, paths: Paths = Paths()) -> Outcome:
    """Write the conntrack sysctls that differ; never raises (failures are in the outcome)."""
    cpus = cpus or os.cpu_count() or 1
    written: dict[str, int] = {}
    failed: dict[str, str] = {}
    read_only = False
    for name, value in wanted(settings, cpus):
        path = paths.netfilter / name
        current = _read_int(path)
        if current == value:
            log.debug("sysctl net.netfilter.%s is already %d", name, value)
            continue
        log.info("setting net.netfilter.%s=%d (was %d)", name, value, current)
        try:
            path.write_text(str(value))
        except OSError as err:
            failed[name] = err.strerror or str(err)
            log.warning(
                "cannot set net.netfilter.%s=%d: %s%s", name, value, failed[name],
                " (the host's limit can only be set from the host's network namespace; "
                "conntrack.maxPerCore: 0 leaves it alone)" if name == "nf_conntrack_max" else "",
            )  # fmt: skip
            continue
        written[name] = value
        if name == "nf_conntrack_max":
            read_only = _grow_hashsize(value, paths, written, failed)
    return Outcome(written, failed, read_only)


def _grow_hashsize(limit: int, paths: Paths, written: dict[str, int],
                   failed: dict[str, str]) -> bool:  # fmt: skip
    """Grow the hash table to limit/4 if smaller; returns whether /sys was read-only."""
    size = _read_int(paths.hashsize)
    if size >= limit // 4:
        return False
    if not _sysfs_writable(paths.mounts):
        log.warning("/sys is read-only: conntrack hashsize stays %d (wanted %d)", size, limit // 4)
        return True
    log.info("growing the conntrack hash table to %d (was %d)", limit // 4, size)
    try:
        paths.hashsize.write_text(str(limit // 4))
        written["hashsize"] = limit // 4
    except OSError as err:
        failed["hashsize"] = err.strerror or str(err)
        log.warning("cannot set conntrack hashsize=%d: %s", limit // 4, failed["hashsize"])
    return False
