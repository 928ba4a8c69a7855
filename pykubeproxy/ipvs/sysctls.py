"""The sysctls IPVS mode needs, set at start as upstream's NewProxier sets them
(pkg/proxy/ipvs/proxier.go): each written only when it differs, and logged."""

from __future__ import annotations

import logging
import os
from pathlib import Path

log = logging.getLogger(__name__)

PROC_SYS = Path("/proc/sys")


def _kernel_version() -> tuple[int, int]:
    major, minor = os.uname().release.split(".")[:2]
    return int(major), int("".join(c for c in minor if c.isdigit()) or 0)


def set_sysctls(strict_arp: bool, proc: Path = PROC_SYS) -> None:
    """kube-proxy's IPVS-mode sysctls.

    A failure on a ``net/ipv4/vs`` one is fatal, as in kube-proxy (IPVS mode would not work
    right without them); the others are logged.
    """
    wanted = [("net/ipv4/vs/conntrack", 1)]
    if (4, 1) <= _kernel_version() < (5, 9):
        wanted.append(("net/ipv4/vs/conn_reuse_mode", 0))  # fixed in 5.9 (kubernetes#93297)
    wanted += [
        ("net/ipv4/vs/expire_nodest_conn", 1),
        ("net/ipv4/vs/expire_quiescent_template", 1),
        ("net/ipv4/ip_forward", 1),
    ]
    if strict_arp:
        wanted += [("net/ipv4/conf/all/arp_ignore", 1), ("net/ipv4/conf/all/arp_announce", 2)]
    for name, value in wanted:
        path = proc / name
        try:
            before = path.read_text().strip()
            if before != str(value):
                path.write_text(f"{value}\n")
                log.info("Changed sysctl %s: before %s, after %s", name, before, value)
            else:
                log.debug("sysctl %s is %s already", name, before)
        except OSError as err:
            log.error("can't set sysctl %s to %d: %s", name, value, err)
            if name.startswith("net/ipv4/vs/"):
                raise OSError(f"can't set sysctl {name} to {value}: {err}") from err
