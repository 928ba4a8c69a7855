"""`pykubeproxy`: parse settings, wire the pieces together, run until SIGTERM.

SIGTERM and SIGINT stop the agent promptly and leave the installed rules in
place (as kube-proxy does); only ``--cleanup`` removes them.
"""

from __future__ import annotations

import functools
import logging
import signal
import socket
import sys
import threading
import time
from ipaddress import IPv4Address
from pathlib import Path
from types import FrameType

from pykubeproxy import config as config_module
from pykubeproxy import kube
from pykubeproxy.config import ConfigError, ProxyConfig
from pykubeproxy.health import ProxyHealth
from pykubeproxy.iptables.backend import IptablesBackend
from pykubeproxy.iptables.render import RenderConfig, Renderer
from pykubeproxy.metrics import Metrics
from pykubeproxy.model import IPAddress
from pykubeproxy.nodeinfo import local_addresses, sysctl_read, sysctl_write
from pykubeproxy.proxier import Proxier
from pykubeproxy.runner import BoundedFrequencyRunner
from pykubeproxy.web import serve

log = logging.getLogger("pykubeproxy")


class KlogFormatter(logging.Formatter):
    """klog's line format (``I1124 05:30:00.123456 1234 file.py:42] msg``) operators know."""

    def format(self, record: logging.LogRecord) -> str:
        stamp = time.strftime("%m%d %H:%M:%S", time.localtime(record.created))
        micros = int(record.created % 1 * 1_000_000)
        location = f"{Path(record.pathname).name}:{record.lineno}"
        line = (
            f"{record.levelname[0]}{stamp}.{micros:06d} {record.process:>7} {location}] "
            f"{record.getMessage()}"
        )
        if record.exc_info:
            line += "\n" + self.formatException(record.exc_info)
        return line


def setup_logging(verbosity: int) -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(KlogFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(logging.DEBUG if verbosity >= 4 else logging.INFO)
    if verbosity < 6:
        logging.getLogger("urllib3").setLevel(logging.WARNING)
        logging.getLogger("kubernetes").setLevel(logging.WARNING)


def node_name(cfg: ProxyConfig) -> str:
    return (cfg.hostname_override or socket.gethostname()).strip().lower()


def nodeport_ips(cfg: ProxyConfig) -> tuple[IPAddress, ...] | None:
    """None for "every local address", else the node IPs inside --nodeport-addresses."""
    cidrs = cfg.nodeport_cidrs()
    if not cidrs or any(c.prefixlen == 0 for c in cidrs):
        return None
    return tuple(ip for ip in local_addresses() if any(ip in c for c in cidrs))


def prepare_node(cfg: ProxyConfig) -> None:
    """kube-proxy's sysctls and checks for iptables mode, each logged."""
    if cfg.localhost_nodeports:
        sysctl_write("net/ipv4/conf/all/route_localnet", "1")
    if sysctl_read("net/bridge/bridge-nf-call-iptables") == "0":
        log.warning(
            "net.bridge.bridge-nf-call-iptables is 0: Service traffic between pods on "
            "one bridge will not be un-NATed; set it to 1"
        )


def run(cfg: ProxyConfig) -> int:
    from pykubeproxy.iptables import applier as iptables_applier

    if cfg.mode == "ipvs":
        log.error(
            "--proxy-mode ipvs is not implemented yet (it is planned, see the README); "
            "use --proxy-mode iptables"
        )
        return 1
    applier = iptables_applier.IptcApplier()
    if cfg.cleanup:
        applier.cleanup()
        log.info("removed every chain and rule of pykubeproxy")
        return 0
    for line in iptables_applier.backend_report():
        log.warning("%s", line)

    name = node_name(cfg)
    metrics = Metrics()
    health = ProxyHealth(timeout=2 * cfg.sync_period, metrics=metrics)
    renderer = Renderer(
        RenderConfig(
            cluster_cidr=tuple(
                c for c in cfg.cluster_cidrs() if isinstance(c.network_address, IPv4Address)
            ),
            masquerade_all=cfg.masquerade_all,
            masquerade_bit=cfg.masquerade_bit,
            nodeport_ips=nodeport_ips(cfg),
            localhost_nodeports=cfg.localhost_nodeports,
        )
    )
    if not cfg.cluster_cidr and not cfg.masquerade_all:
        log.warning(
            "neither --cluster-cidr nor --masquerade-all is set: off-cluster traffic to "
            "Service IPs is not masqueraded"
        )
    prepare_node(cfg)
    backend = IptablesBackend(renderer, applier, metrics)
    proxier = Proxier(backend, metrics, health, cfg.sync_period, cfg.min_sync_period)
    runner = BoundedFrequencyRunner(proxier.sync, cfg.min_sync_period, cfg.sync_period)
    proxier.runner = runner

    serve(cfg.healthz_bind_address, health.routes(), "healthz")
    serve(cfg.metrics_bind_address, metrics.routes(), "metrics")

    stop = threading.Event()

    def on_signal(signum: int, frame: FrameType | None) -> None:
        log.info("received %s; leaving the rules in place and exiting", signal.Signals(signum).name)
        stop.set()
        runner.stop()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)

    client = kube.api_client(cfg.kubeconfig, cfg.master)
    log.info("pykubeproxy starting: mode=iptables node=%s api=%s", name, client.configuration.host)
    for kind, handler in (
        (kube.services_kind(), proxier.on_service),
        (kube.endpoint_slices_kind(), proxier.on_endpoint_slice),
        (kube.node_kind(name), proxier.on_node),
    ):
        kube.Reflector(
            client, kind, handler, functools.partial(proxier.on_synced, kind.name), stop
        ).start()
    runner.loop()
    return 0


def main(argv: list[str] | None = None) -> int:
    try:
        cfg = config_module.load(sys.argv[1:] if argv is None else argv)
    except ConfigError as err:
        print(f"pykubeproxy: error: {err}", file=sys.stderr)
        return 1
    setup_logging(cfg.verbosity)
    try:
        return run(cfg)
    except Exception as err:  # a startup failure: one line, non-zero exit
        log.error("cannot start: %s", err, exc_info=cfg.verbosity >= 4)
        return 1
    finally:
        logging.shutdown()


if __name__ == "__main__":
    raise SystemExit(main())
