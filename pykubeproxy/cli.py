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
from collections.abc import Callable
from ipaddress import IPv4Address
from pathlib import Path
from types import FrameType
from typing import Any

from pykubeproxy import config as config_module
from pykubeproxy import conntrack_limits, startup
from pykubeproxy import kubeproxyconfig as kpc
from pykubeproxy.backend import Backend
from pykubeproxy.config import ConfigError, ProxyConfig
from pykubeproxy.health import ProxyHealth
from pykubeproxy.healthcheck import ServiceHealthServer
from pykubeproxy.iptables.backend import Applier, IptablesBackend
from pykubeproxy.iptables.render import RenderConfig, Renderer, sample_rules
from pykubeproxy.ipvs.backend import IpvsBackend
from pykubeproxy.ipvs.render import IpvsConfig
from pykubeproxy.ipvs.state import DUMMY_DEVICE
from pykubeproxy.logs import setup_logging
from pykubeproxy.metrics import CountingApplier, Metrics
from pykubeproxy.model import IPNetwork
from pykubeproxy.nodeinfo import local_addresses, sysctl_read, sysctl_write
from pykubeproxy.proxier import HOURLY, Proxier
from pykubeproxy.runner import BoundedFrequencyRunner
from pykubeproxy.web import serve

log = logging.getLogger("pykubeproxy")


def node_name(cfg: ProxyConfig) -> str:
    return startup.node_name(cfg, socket.gethostname())


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


def conntrack_tcp_liberal() -> bool:
    """nf_conntrack_tcp_be_liberal is set: upstream then writes no INVALID-drop rule."""
    liberal = sysctl_read("net/netfilter/nf_conntrack_tcp_be_liberal") not in (None, "0")
    if liberal:
        log.info("nf_conntrack_tcp_be_liberal is set: no DROP rule for INVALID packets")
    return liberal


def iptables_backend(
    cfg: ProxyConfig, iptables: Applier, metrics: Metrics, pod_cidrs: tuple[IPNetwork, ...] = ()
) -> Backend:
    prepare_node(cfg)
    renderer = Renderer(
        RenderConfig(
            local_detector=startup.local_detector(cfg, pod_cidrs),
            masquerade_all=cfg.masquerade_all,
            masquerade_bit=cfg.masquerade_bit,
            localhost_nodeports=localhost_nodeports(cfg),
            conntrack_tcp_liberal=conntrack_tcp_liberal(),
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


def ipvs_backend(
    cfg: ProxyConfig, iptables: Applier, metrics: Metrics, pod_cidrs: tuple[IPNetwork, ...] = ()
) -> Backend:
    from pykubeproxy.ipvs.applier import IpvsApplier

    prepare_ipvs_node(cfg)
    scheduler = cfg.ipvs_scheduler or "rr"
    if not cfg.ipvs_scheduler:
        log.info("IPVS scheduler not specified, use rr by default")
    ipvs = IpvsApplier(exclude_cidrs=cfg.exclude_cidrs())
    ipvs.check_scheduler(scheduler)
    ipvs_cfg = IpvsConfig(
        scheduler=scheduler,
        cluster_cidr=startup.ipvs_local_cidrs(cfg, pod_cidrs),
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


def prepare_ipvs_node(cfg: ProxyConfig) -> None:
    """IPVS mode's sysctls and connection timeouts (upstream's NewProxier does both)."""
    from pykubeproxy.ipvs.sysctls import set_sysctls
    from pykubeproxy.ipvs.timeouts import set_timeouts

    set_sysctls(strict_arp=cfg.ipvs_strict_arp)
    set_timeouts(*cfg.ipvs_timeouts)


def init_node(cfg: ProxyConfig) -> None:
    """The privileged start-up steps (what --init-only does): conntrack sysctls, then the
    proxy mode's sysctls."""
    conntrack_limits.setup(cfg.conntrack)
    if cfg.mode == "ipvs":
        prepare_ipvs_node(cfg)
    else:
        prepare_node(cfg)


def post_events(kube: Any, client: Any, events: list[dict[str, Any]], limiter: Any) -> None:
    """Post Events in the background; a failure (e.g. no RBAC for events) is one warning."""

    def post() -> None:
        for event in events:
            try:
                kube.post_event(client, event, limiter)
                log.info("posted Event %s/%s: %s", event["metadata"]["namespace"],
                         event["metadata"]["name"], event["reason"])  # fmt: skip
            except Exception as err:
                log.warning("cannot post Event %s: %s", event["reason"], err)

    threading.Thread(target=post, name="events", daemon=True).start()


def run(cfg: ProxyConfig) -> int:
    from pykubeproxy.iptables import applier as iptables_applier
    from pykubeproxy.iptables import shapes

    iptables = iptables_applier.IptcApplier(
        samples=sample_rules,
        learn_after=iptables_applier.LEARN_AFTER,
        shapes=str(shapes.SHIPPED_SHAPES),
    )
    if cfg.cleanup:
        iptables.cleanup()
        remove_ipvs_leftovers()
        log.info("removed every chain, rule, IPVS service, ipset and device of pykubeproxy")
        return 0
    for line in iptables_applier.backend_report():
        log.warning("%s", line)
    if cfg.init_only:
        init_node(cfg)
        log.info("--init-only: the start-up sysctls are applied; exiting")
        return 0
    for line in startup.bad_config(cfg):
        log.warning("%s", line)

    name = node_name(cfg)
    metrics = Metrics(mode=cfg.mode)
    sync_period, min_sync_period = cfg.sync_periods()
    health = ProxyHealth(timeout=2 * sync_period, metrics=metrics)
    from pykubeproxy import kube  # slow to import; a stop request meanwhile just exits

    client = kube.api_client(cfg.kubeconfig, cfg.master)
    limiter = kube.RateLimiter(cfg.get("clientConnection.qps"), cfg.get("clientConnection.burst"))
    node = startup.NodeStart(startup.bind_ip(cfg))
    if startup.needs_node(cfg):
        node = startup.read_node(
            cfg, name, lambda: kube.get_node(client, name, limiter), threading.Event()
        )
    if cfg.nodeport_addresses == [kpc.NODEPORT_ADDRESSES_PRIMARY]:
        cfg.document["nodePortAddresses"] = startup.primary_nodeport_cidrs(node.ip)
        log.info("nodePortAddresses primary: %s", cfg.nodeport_addresses or "every address")
    conntrack = conntrack_limits.setup(cfg.conntrack)
    startup.set_oom_score_adj(cfg.oom_score_adj)
    if cfg.detect_local_mode == "ClusterCIDR" and not cfg.cluster_cidr and not cfg.masquerade_all:
        log.warning(
            "neither --cluster-cidr nor --masquerade-all is set: off-cluster traffic to "
            "Service IPs is not masqueraded"
        )
    counting = CountingApplier(iptables, metrics)
    if cfg.mode == "ipvs":
        backend = ipvs_backend(cfg, counting, metrics, node.pod_cidrs)
    else:
        backend = iptables_backend(cfg, counting, metrics, node.pod_cidrs)
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
        conntrack=startup.counted_reconcile(metrics),
        health_checks=health_checks,
        node_ip=startup.bind_ip(cfg),
        full_sync_period=None if cfg.mode == "ipvs" else HOURLY,
    )
    runner = BoundedFrequencyRunner(proxier.sync, min_sync_period, sync_period)
    proxier.runner = runner

    hard_fail = cfg.bind_address_hard_fail
    serve(cfg.healthz_bind_address, health.routes(), "healthz", hard_fail=hard_fail)
    metrics_routes = {**metrics.routes(), **startup.status_routes(cfg)}
    serve(cfg.metrics_bind_address, metrics_routes, "metrics", hard_fail=hard_fail)

    stop = threading.Event()
    exit_code = 0

    def on_signal(signum: int, frame: FrameType | None) -> None:
        log.info("received %s; leaving the rules in place and exiting", signal.Signals(signum).name)
        stop.set()
        runner.stop()

    def on_config_change() -> None:
        nonlocal exit_code
        log.error("the configuration file %s changed; exiting to start again", cfg.config_file)
        exit_code = 1
        stop.set()
        runner.stop()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)

    log.info(
        "pykubeproxy starting: mode=%s node=%s api=%s", cfg.mode, name, client.configuration.host
    )
    node_handler: startup.NodeHandler = proxier.on_node
    if cfg.detect_local_mode == "NodeCIDR":
        node_handler = startup.exit_on_pod_cidr_change(node_handler, node.pod_cidrs)
    for kind, handler in (
        (kube.services_kind(), proxier.on_service),
        (kube.endpoint_slices_kind(), proxier.on_endpoint_slice),
        (kube.node_kind(name), node_handler),
    ):
        kube.Reflector(
            client, kind, handler, functools.partial(proxier.on_synced, kind.name), stop, limiter
        ).start()
    events = [kube.starting_event(name)]
    if conntrack.read_only_sysfs:
        events.append(kube.read_only_sysfs_event(name))
    post_events(kube, client, events, limiter)
    if cfg.config_file:
        startup.watch_config_file(cfg.config_file, on_config_change, stop)
    runner.loop()
    return exit_code


def _exit_before_start(signum: int, frame: FrameType | None) -> None:
    """Until the agent runs, a stop request just exits (as PID 1, unhandled ones are ignored)."""
    raise SystemExit(0)


def main(argv: list[str] | None = None) -> int:
    signal.signal(signal.SIGTERM, _exit_before_start)
    signal.signal(signal.SIGINT, _exit_before_start)
    args = sys.argv[1:] if argv is None else argv
    if args[:1] in (["explain"], ["render"]):  # offline / read-only tools, not the agent
        from pykubeproxy import explain, render_cmd

        return (explain.main if args[0] == "explain" else render_cmd.main)(args[1:])
    if config_module.requested_version(args) is not None:
        print(startup.version_text())
        return 0
    try:
        cfg = config_module.load(args)
    except ConfigError as err:
        print(f"pykubeproxy: error: {err}", file=sys.stderr)
        return 1
    setup_logging(cfg.verbosity, cfg.logging_format)
    for notice in cfg.notices:
        log.warning("%s", notice)
    if missing := startup.unimplemented(cfg):
        log.warning("settings pykubeproxy does not implement, ignored: %s", ", ".join(missing))
    try:
        if cfg.write_config_to:
            Path(cfg.write_config_to).write_text(kpc.to_yaml(cfg.document))
            log.info("Wrote configuration to %s", cfg.write_config_to)
            return 0
        return run(cfg)
    except Exception as err:  # a startup failure: one line, non-zero exit
        log.error("cannot start: %s", err, exc_info=cfg.verbosity >= 4)
        return 1
    finally:
        logging.shutdown()


if __name__ == "__main__":
    raise SystemExit(main())
