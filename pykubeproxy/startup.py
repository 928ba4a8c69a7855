"""What kube-proxy does at start besides programming rules, and what it reports about itself.

Each step is upstream's (cmd/kube-proxy/app/server.go and server_linux.go, v1.34): the
node's primary IP (``detectNodeIPs``: ``bindAddress`` when set, else the Node's), the
``primary`` keyword of nodePortAddresses, the local-traffic detector of ``detectLocalMode``,
the OOM score, the ``/proxyMode`` and ``/configz`` pages, ``--version``, and the warnings
upstream logs about a configuration (``checkBadConfig``). Settings upstream has that this
agent does not implement are named in one warning line (`unimplemented`).
"""

from __future__ import annotations

import json
import logging
import os
import random
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from importlib.metadata import PackageNotFoundError, version
from ipaddress import IPv4Address
from pathlib import Path
from typing import Any

from pykubeproxy import kubeproxyconfig as kpc
from pykubeproxy.config import ConfigError, ProxyConfig
from pykubeproxy.conntrack import ConntrackReconciler
from pykubeproxy.convert import node_facts
from pykubeproxy.iptables.render import LocalDetector
from pykubeproxy.metrics import Metrics
from pykubeproxy.model import EndpointsMap, IPAddress, IPNetwork, ServicePortMap
from pykubeproxy.web import Routes

log = logging.getLogger(__name__)

JSON_CONTENT_TYPES = ("application/json", "application/vnd.kubernetes.protobuf")
NODE_IP_BACKOFF = (1.0, 2.0, 4.0, 8.0, 16.0)  # upstream's getNodeIPs: 6 tries, doubling
POD_CIDR_WAIT = 300.0  # upstream's timeoutForNodePodCIDR
OOM_SCORE_ADJ = Path("/proc/self/oom_score_adj")


def version_text() -> str:
    """What --version prints."""
    try:
        own = version("pykubeproxy")
    except PackageNotFoundError:
        own = "unknown"
    major, minor = kpc.KUBE_VERSION
    return f"pykubeproxy v{own} (kube-proxy v{major}.{minor} configuration, flags and metrics)"


def unimplemented(cfg: ProxyConfig) -> list[str]:
    """Settings that ask for something this agent does not do, as `name=value`."""
    gates = cfg.get("featureGates").items()
    found = [f"featureGates.{name}={str(on).lower()}" for name, on in gates]
    if cfg.get("enableProfiling"):
        found.append("enableProfiling=true (/debug/pprof)")
    if cfg.get("logging.vmodule"):
        found.append("logging.vmodule")
    for fmt in ("text", "json"):
        options = cfg.get(f"logging.options.{fmt}")
        if options["splitStream"]:
            found.append(f"logging.options.{fmt}.splitStream=true")
        if options["infoBufferSize"] not in ("0", ""):
            found.append(f"logging.options.{fmt}.infoBufferSize={options['infoBufferSize']}")
    content_type = cfg.get("clientConnection.contentType")
    if content_type not in JSON_CONTENT_TYPES:
        found.append(f"clientConnection.contentType={content_type} (requests are JSON)")
    accept = cfg.get("clientConnection.acceptContentTypes")
    if accept and "application/json" not in accept:
        found.append(f"clientConnection.acceptContentTypes={accept} (answers are JSON)")
    return found


def bad_config(cfg: ProxyConfig) -> list[str]:
    """upstream's checkBadConfig warnings (logged, not fatal)."""
    if not cfg.nodeport_addresses:
        return [
            "nodePortAddresses is unset: NodePorts answer on every local address; "
            "`--nodeport-addresses primary` limits them to the node's IP"
        ]
    return []


def node_name(cfg: ProxyConfig, hostname: str) -> str:
    """upstream's GetHostname: the override, else the hostname; trimmed, lower case."""
    name = (cfg.hostname_override or hostname).strip().lower()
    if not name:
        raise ConfigError("the node name is empty (hostnameOverride or the hostname)")
    return name


def set_oom_score_adj(value: int | None, path: Path = OOM_SCORE_ADJ) -> None:
    """Apply oomScoreAdj to this process; a failure is logged, as upstream does."""
    if value is None:
        return
    try:
        path.write_text(str(value))
        log.info("oom_score_adj set to %d", value)
    except OSError as err:
        log.warning("cannot set oom_score_adj to %d: %s", value, err.strerror or err)


def status_routes(cfg: ProxyConfig) -> Routes:
    """The metrics server's /proxyMode (plain text) and /configz (the effective config)."""
    mode = cfg.mode.encode()
    configz = json.dumps({"kubeproxy.config.k8s.io": kpc.internal(cfg.document)},
                         separators=(",", ":")).encode()  # fmt: skip
    return {
        "/proxyMode": lambda: (200, "text/plain; charset=utf-8", mode),
        "/configz": lambda: (200, "application/json", configz),
    }


@dataclass(frozen=True)
class NodeStart:
    """What the start-up learns from this node's Node object."""

    ip: IPAddress | None  # the primary IP (bindAddress wins)
    pod_cidrs: tuple[IPNetwork, ...] = ()


def needs_node(cfg: ProxyConfig) -> bool:
    """Whether the start-up must read the Node before building the proxier."""
    return cfg.nodeport_addresses == [kpc.NODEPORT_ADDRESSES_PRIMARY] or (
        cfg.detect_local_mode == "NodeCIDR"
    )


def bind_ip(cfg: ProxyConfig) -> IPAddress | None:
    """bindAddress, unless it is the unspecified address (then the Node's IP counts)."""
    ip = kpc.parse_ip(cfg.bind_address)
    return None if ip is None or ip.is_unspecified else ip


def read_node(
    cfg: ProxyConfig,
    name: str,
    get_node: Callable[[], dict[str, Any] | None],
    stop: threading.Event,
) -> NodeStart:
    """The Node's primary IP and pod CIDRs, read as upstream does at start.

    The IP is retried with upstream's backoff (about a minute) and then given up on; the pod
    CIDRs (detectLocalMode NodeCIDR) are waited for up to 5 minutes, as upstream waits for
    the Node to be allocated one, and their absence is fatal.
    """
    node: dict[str, Any] | None = None
    delays = list(NODE_IP_BACKOFF)
    while not stop.is_set():
        try:
            node = get_node()
        except Exception as err:
            log.warning("cannot read Node %s: %s", name, err)
        if (node is not None and node_facts(node, name).ip is not None) or not delays:
            break
        stop.wait(delays.pop(0) * random.uniform(1.0, 1.2))
    facts_ip = node_facts(node, name).ip if node is not None else None
    if facts_ip is not None:
        log.info("node IP from the Node object: %s", facts_ip)
    ip = bind_ip(cfg) or facts_ip
    if ip is None:
        log.info("cannot determine this node's IP; set --bind-address if NodePorts need it")
    pod_cidrs: tuple[IPNetwork, ...] = ()
    if cfg.detect_local_mode == "NodeCIDR":
        deadline = time.monotonic() + POD_CIDR_WAIT
        log.info("waiting for Node %s to be given pod CIDRs (detectLocalMode NodeCIDR)", name)
        while not (pod_cidrs := pod_cidrs_of(node)) and not stop.is_set():
            if time.monotonic() >= deadline:
                raise RuntimeError(
                    f"timeout waiting for PodCIDR allocation of node {name} "
                    "(detect-local-mode NodeCIDR)"
                )
            stop.wait(1.0)
            try:
                node = get_node()
            except Exception as err:
                log.warning("cannot read Node %s: %s", name, err)
        log.info("pod CIDRs of this node: %s", ",".join(str(c) for c in pod_cidrs))
    return NodeStart(ip, pod_cidrs)


def pod_cidrs_of(node: dict[str, Any] | None) -> tuple[IPNetwork, ...]:
    """spec.podCIDRs (or spec.podCIDR) of a Node that is not being deleted."""
    if not node or (node.get("metadata") or {}).get("deletionTimestamp"):
        return ()
    spec = node.get("spec") or {}
    texts = spec.get("podCIDRs") or ([spec["podCIDR"]] if spec.get("podCIDR") else [])
    cidrs = []
    for text in texts:
        try:
            cidrs.append(kpc.parse_cidr(str(text)))
        except ValueError:
            log.warning("Node podCIDR %r is not a CIDR; ignored", text)
    return tuple(cidrs)


def watch_config_file(
    path: str, on_change: Callable[[], None], stop: threading.Event, interval: float = 2.0
) -> threading.Thread:
    """Call `on_change` once when the file's content changes (upstream's config watcher:
    kube-proxy exits when its --config file is updated, and kubelet starts it again with the
    new one). A ConfigMap volume replaces the file's link, so the content is compared."""

    def read() -> bytes | None:
        try:
            return Path(path).read_bytes()
        except OSError:
            return None

    first = read()

    def watch() -> None:
        while not stop.wait(interval):
            if read() != first:
                on_change()
                return

    thread = threading.Thread(target=watch, name="config-watch", daemon=True)
    thread.start()
    return thread


NodeHandler = Callable[[str, dict[str, Any] | None], None]


def exit_on_pod_cidr_change(
    handler: NodeHandler,
    pod_cidrs: tuple[IPNetwork, ...],
    exit_process: Callable[[int], None] = os._exit,
) -> NodeHandler:
    """upstream's NodePodCIDRHandler (detectLocalMode NodeCIDR): the rules were made for the
    pod CIDRs read at start, so a Node whose pod CIDRs change stops the agent, and the
    restarted agent reads the new ones."""

    def on_node(key: str, obj: dict[str, Any] | None) -> None:
        current = pod_cidrs_of(obj)
        if current and current != pod_cidrs:
            log.error(
                "the Node's pod CIDRs changed from %s to %s; exiting to start again with them",
                ",".join(map(str, pod_cidrs)), ",".join(map(str, current)),
            )  # fmt: skip
            logging.shutdown()
            exit_process(1)
        handler(key, obj)

    return on_node


def primary_nodeport_cidrs(ip: IPAddress | None) -> list[str]:
    """nodePortAddresses 'primary' made concrete: the node IP, unless it is unknown or
    loopback (then NodePorts are accepted on every local address, as upstream's are)."""
    if ip is None or ip.is_loopback:
        return []
    return [f"{ip}/{ip.max_prefixlen}"]


def _first_ipv4(cidrs: tuple[IPNetwork, ...]) -> IPNetwork | None:
    return next((c for c in cidrs if isinstance(c.network_address, IPv4Address)), None)


def local_detector(cfg: ProxyConfig, pod_cidrs: tuple[IPNetwork, ...]) -> LocalDetector | None:
    """upstream's getLocalDetectors for IPv4: what tells pod traffic from other traffic."""
    mode = cfg.detect_local_mode
    if mode == "BridgeInterface":
        bridge = str(cfg.get("detectLocal.bridgeInterface"))
        return LocalDetector(("-i", bridge), ("!", "-i", bridge))
    if mode == "InterfaceNamePrefix":
        prefix = str(cfg.get("detectLocal.interfaceNamePrefix")) + "+"
        return LocalDetector(("-i", prefix), ("!", "-i", prefix))
    cidr = _first_ipv4(pod_cidrs if mode == "NodeCIDR" else cfg.cluster_cidrs())
    if cidr is None:
        log.info(
            "detectLocalMode %s without an IPv4 %s: pod traffic is not told apart from "
            "other traffic", mode, "pod CIDR on the Node" if mode == "NodeCIDR" else "clusterCIDR",
        )  # fmt: skip
        return None
    return LocalDetector.by_cidr(cidr)


def ipvs_local_cidrs(cfg: ProxyConfig, pod_cidrs: tuple[IPNetwork, ...]) -> tuple[IPNetwork, ...]:
    """The CIDRs IPVS mode tells pod traffic by (its rules match source CIDRs only)."""
    mode = cfg.detect_local_mode
    if mode not in ("ClusterCIDR", "NodeCIDR"):
        raise ConfigError(
            f"detectLocalMode {mode} is not implemented in ipvs mode by pykubeproxy "
            "(ClusterCIDR and NodeCIDR are)"
        )
    cidr = _first_ipv4(pod_cidrs if mode == "NodeCIDR" else cfg.cluster_cidrs())
    return (cidr,) if cidr is not None else ()


Reconcile = Callable[[ServicePortMap, EndpointsMap], object]


def counted_reconcile(metrics: Metrics, reconciler: ConntrackReconciler | None = None) -> Reconcile:
    """The conntrack reconciler, recording upstream's conntrack reconciler metrics."""
    reconciler = reconciler or ConntrackReconciler()

    def reconcile(services: ServicePortMap, endpoints: EndpointsMap) -> object:
        result = reconciler.reconcile(services, endpoints)
        metrics.reconciled(result.deleted, result.seconds, result.table_read)
        return result

    return reconcile
