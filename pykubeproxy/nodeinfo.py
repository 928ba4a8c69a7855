"""Facts about this node the agent needs: its addresses and sysctls.

Addresses come from `ip -json addr` (iproute2 is on every node) so that only
the backend appliers link netlink libraries.
"""

from __future__ import annotations

import json
import logging
import subprocess
from ipaddress import ip_address
from pathlib import Path

from pykubeproxy.model import IPAddress

log = logging.getLogger(__name__)
SYSCTL_ROOT = Path("/proc/sys")


def local_addresses(except_device: str = "") -> list[IPAddress]:
    """Every address on this network namespace's interfaces (but `except_device`'s)."""
    out = subprocess.run(
        ["ip", "-json", "addr", "show"], check=True, capture_output=True, text=True, timeout=10
    ).stdout
    return [
        ip_address(info["local"])
        for link in json.loads(out)
        if link.get("ifname") != except_device
        for info in link.get("addr_info", [])
        if "local" in info
    ]


def sysctl_read(key: str) -> str | None:
    try:
        return (SYSCTL_ROOT / key).read_text().strip()
    except OSError:
        return None


def sysctl_write(key: str, value: str) -> None:
    """Set a sysctl if it differs, logging what changed (or why it could not)."""
    current = sysctl_read(key)
    if current == value:
        return
    try:
        (SYSCTL_ROOT / key).write_text(value)
        log.info("set sysctl %s=%s (was %s)", key.replace("/", "."), value, current)
    except OSError as err:
        log.warning("cannot set sysctl %s=%s: %s", key.replace("/", "."), value, err)
