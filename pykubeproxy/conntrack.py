"""Forget conntrack flows that would keep UDP/SCTP traffic on the wrong endpoint.

A UDP "connection" lives in conntrack as long as packets keep coming, so a
client that keeps its source port keeps reaching a removed endpoint (or, for a
Service that had no endpoints, keeps being dropped) long after the rules
changed. As kube-proxy does, flows to removed endpoints are deleted after each
sync, and so are flows to Services that just got their first endpoint. TCP is
left alone: its connections end on their own, and DNAT applies to new ones.
"""

from __future__ import annotations

import logging
import subprocess

from pykubeproxy.changes import EndpointsUpdate
from pykubeproxy.model import Protocol, ServicePort, ServicePortMap

log = logging.getLogger(__name__)

Argv = list[str]


def _destinations(svc: ServicePort) -> list[Argv]:
    """conntrack matches for every way the Service port is reached."""
    proto = ["-p", svc.protocol.value]
    matches = [
        [*proto, "--orig-dst", str(ip), "--orig-port-dst", str(svc.port)]
        for ip in (svc.cluster_ip, *svc.external_ips, *svc.load_balancer_ips)
    ]
    if svc.node_port:
        matches.append([*proto, "--orig-port-dst", str(svc.node_port)])
    return matches


def stale_flows(update: EndpointsUpdate, services: ServicePortMap) -> list[Argv]:
    """The `conntrack -D` arguments that a sync's endpoint changes call for (pure)."""
    commands: list[Argv] = []
    for name in sorted(update.stale_endpoints.keys() | update.newly_served, key=str):
        svc = services.get(name)
        if svc is None or svc.protocol is Protocol.TCP:
            continue
        for match in _destinations(svc):
            if name in update.newly_served:
                commands.append(["-D", *match])
            commands.extend(
                ["-D", *match, "--dst-nat", str(ip)]
                for ip in sorted(update.stale_endpoints.get(name, ()), key=str)
            )
    return commands


def delete_flows(commands: list[Argv]) -> None:
    """Run `conntrack -D` for each; "no such flow" is the normal case, not an error."""
    for argv in commands:
        try:
            done = subprocess.run(
                ["conntrack", *argv], capture_output=True, text=True, timeout=10, check=False
            )
        except (OSError, subprocess.TimeoutExpired) as err:
            log.warning("cannot clear conntrack entries (%s): %s", " ".join(argv), err)
            return
        if done.returncode not in (0, 1):
            log.warning("conntrack %s failed: %s", " ".join(argv), done.stderr.strip())
