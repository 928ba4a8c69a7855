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
from collections.abc import Callable
from ipaddress import IPv4Address
from pathlib import Path
from types import FrameType

from pykubeproxy import config as config_module
from pykubeproxy.backend import Backend
from pykubeproxy.config import ConfigError, ProxyConfig
from pykubeproxy.health import ProxyHealth
from pykubeproxy.healthcheck import ServiceHealthServer
from pykubeproxy.iptables.backend import Applier, IptablesBackend
from pykubeproxy.iptables.render import LocalDetector, RenderConfig, Renderer, sample_rules
from pykubeproxy.ipvs.backend import IpvsBackend
from pykubeproxy.ipvs.render import IpvsConfig
from pykubeproxy.ipvs.state import DUMMY_DEVICE
from pykubeproxy.metrics import Metrics
from pykubeproxy.model import IPNetwork
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
        logging.getLogger("pyroute2").setLevel(logging.WARNING)


def node_name(cfg: ProxyConfig) -> str:
    return (cfg.hostname_override or socket.gethostname()).strip().lower()


def localhost_nodeports(cfg: ProxyConfig) -> bool:
    """--iptables-localhost-nodeports, off when --nodeport-addresses leaves out 127.0.0.1."""
    cidrs = ipv4_cidrs(cfg.nodeport_cidrs())
    loopback = IPv4Address("127.0.0.1")
    return cfg.localhost_nodeports and (not cidrs or any(loopback in c for c in cidrs))


def nodeport_ips_of(cfg: ProxyConfig) -> Callable[[], list[str]] | None:
    """The node addresses health-check ports listen on; None for every address."""
    cidrs = nodeport_cidrs(cfg)
    if not cidrs:
        return None
    return lambda: [str(ip) for ip in local_addresses() if any(ip in c for c in cidrs)]


def nodeport_cidrs(cfg: ProxyConfig) -> tuple[IPNetwork, ...]:
    """The IPv4 CIDRs NodePorts are limited to; none (every address) when one is 0.0.0.0/0."""
    cidrs = ipv4_cidrs(cfg.nodeport_cidrs())
    return () if any(c.prefixlen == 0 for c in cidrs) else cidrs


def prepare_node(cfg: ProxyConfig) -> None:
    """kube-proxy's sysctls and checks for iptables mode, each logged."""
    if localhost_nodeports(cfg):
        sysctl_write("net/ipv4/conf/all/route_localnet", "1")
    if sysctl_read("net/bridge/bridge-nf-call-iptables") == "0":
        log.warning(
            "net.bridge.bridge-nf-call-iptables is 0: Service traffic between pods on "
            "one bridge will not be un-NATed; set it to 1"
        )


def ipv4_cidrs(cidrs: tuple[IPNetwork, ...]) -> tuple[IPNetwork, ...]:
    """The IPv4 part of a CIDR list: the agent proxies IPv4 (dual-stack comes later)."""
    return tuple(c for c in cidrs if isinstance(c.network_address, IPv4Address))


def remove_ipvs_leftovers() -> None:
    """IPVS mode's services, kube-ipvs0 and ipsets; harmless where the kernel has no ip_vs."""
    from pykubeproxy.ipvs.applier import IpvsApplier

    IpvsApplier().cleanup()


def iptables_backend(cfg: ProxyConfig, iptables: Applier, metrics: Metrics) -> Backend:
    prepare_node(cfg)
    cluster_cidr = ipv4_cidrs(cfg.cluster_cidrs())
    liberal = sysctl_read("net/netfilter/nf_conntrack_tcp_be_liberal") not in (None, "0")
    if liberal:
        log.info("nf_conntrack_tcp_be_liberal is set: no DROP rule for INVALID packets")
    renderer = Renderer(
        RenderConfig(
            local_detector=LocalDetector.by_cidr(cluster_cidr[0]) if cluster_cidr else None,
            masquerade_all=cfg.masquerade_all,
            masquerade_bit=cfg.masquerade_bit,
            localhost_nodeports=localhost_nodeports(cfg),
            conntrack_tcp_liberal=liberal,
        )
    )
    return IptablesBackend(
        renderer,
        iptables,
        metrics,
        after_first_sync=remove_ipvs_leftovers,
        nodeport_cidrs=nodeport_cidrs(cfg),
        node_addresses=local_addresses,
    )


def ipvs_backend(cfg: ProxyConfig, iptables: Applier, metrics: Metrics, node: str) -> Backend:
    from pykubeproxy.ipvs.applier import IpvsApplier, set_sysctls

    set_sysctls(strict_arp=cfg.ipvs_strict_arp)
    scheduler = cfg.ipvs_scheduler or "rr"
    if not cfg.ipvs_scheduler:
        log.info("IPVS scheduler not specified, use rr by default")
    ipvs = IpvsApplier(exclude_cidrs=cfg.exclude_cidrs())
    ipvs.check_scheduler(scheduler)
    ipvs_cfg = IpvsConfig(
        node_name=node,
        scheduler=scheduler,
        cluster_cidr=ipv4_cidrs(cfg.cluster_cidrs()),
        masquerade_all=cfg.masquerade_all,
        masquerade_bit=cfg.masquerade_bit,
    )
    return IpvsBackend(
        ipvs_cfg,
        ipvs,
        iptables,
        metrics,
        node_addresses=functools.partial(local_addresses, DUMMY_DEVICE),
        nodeport_cidrs=ipv4_cidrs(cfg.nodeport_cidrs()),
    )


def run(cfg: ProxyConfig) -> int:
    from pykubeproxy.iptables import applier as iptables_applier

    iptables = iptables_applier.IptcApplier(samples=sample_rules)
    if cfg.cleanup:
        iptables.cleanup()
        remove_ipvs_leftovers()
        log.info("removed every chain, rule, IPVS service, ipset and device of pykubeproxy")
        return 0
    for line in iptables_applier.backend_report():
        log.warning("%s", line)

    name = node_name(cfg)
    metrics = Metrics()
    sync_period, min_sync_period = cfg.sync_periods()
    health = ProxyHealth(timeout=2 * sync_period, metrics=metrics)
    if not cfg.cluster_cidr and not cfg.masquerade_all:
        log.warning(
            "neither --cluster-cidr nor --masquerade-all is set: off-cluster traffic to "
            "Service IPs is not masqueraded"
        )
    if cfg.mode == "ipvs":
        backend = ipvs_backend(cfg, iptables, metrics, name)
    else:
        backend = iptables_backend(cfg, iptables, metrics)
    health_checks = ServiceHealthServer(
        node_ips=nodeport_ips_of(cfg), proxy_healthy=lambda: health.is_healthy()[0]
    )
    proxier = Proxier(
        backend,
        metrics,
        health,
        sync_period,
        min_sync_period,
        name,
        health_checks=health_checks,
    )
    runner = BoundedFrequencyRunner(proxier.sync, min_sync_period, sync_period)
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

    from pykubeproxy import kube  # the kubernetes client is slow to import: after the handlers

    client = kube.api_client(cfg.kubeconfig, cfg.master)
    log.info(
        "pykubeproxy starting: mode=%s node=%s api=%s", cfg.mode, name, client.configuration.host
    )
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


def _exit_before_start(signum: int, frame: FrameType | None) -> None:
    """Until the agent runs, a stop request just exits (as PID 1, unhandled ones are ignored)."""
    raise SystemExit(0)


def main(argv: list[str] | None = None) -> int:
    signal.signal(signal.SIGTERM, _exit_before_start)
    signal.signal(signal.SIGINT, _exit_before_start)
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
