"""Flags and KubeProxyConfiguration, with kube-proxy's names, defaults and checks.

The settings come from three layers: built-in defaults, then the
``--config`` file (kubeproxy.config.k8s.io/v1alpha1 KubeProxyConfiguration),
then flags given on the command line. Every value is validated before the
agent touches anything, so a bad value stops it at start with one line.
"""

from __future__ import annotations

import argparse
import re
from dataclasses import dataclass, field, fields
from ipaddress import IPv4Network, IPv6Network, ip_network
from typing import Any

import yaml

from pykubeproxy.web import parse_bind_address

CONFIG_API_VERSION = "kubeproxy.config.k8s.io/v1alpha1"
CONFIG_KIND = "KubeProxyConfiguration"
MODES = ("iptables", "ipvs")

_DURATION_UNITS = {"ns": 1e-9, "us": 1e-6, "µs": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0, "h": 3600.0}
_DURATION_PART = re.compile(r"(\d+(?:\.\d*)?|\.\d+)(ns|us|µs|ms|s|m|h)")


class ConfigError(ValueError):
    """A setting that cannot be used; the message names it."""


def parse_duration(text: object) -> float:
    """A Go duration (``500ms``, ``1m30s``) in seconds."""
    if not isinstance(text, str):
        raise ConfigError(f"invalid duration {text!r} (use Go form, e.g. 500ms, 30s, 1m)")
    text = text.strip()
    if text == "0":
        return 0.0
    position, total = 0, 0.0
    for match in _DURATION_PART.finditer(text):
        if match.start() != position:
            break
        total += float(match.group(1)) * _DURATION_UNITS[match.group(2)]
        position = match.end()
    if position != len(text) or not text:
        raise ConfigError(f"invalid duration {text!r} (use Go form, e.g. 500ms, 30s, 1m)")
    return total


def parse_cidrs(values: list[str], what: str) -> tuple[IPv4Network | IPv6Network, ...]:
    cidrs = []
    for value in values:
        for part in value.split(","):
            if not part.strip():
                continue
            try:
                cidrs.append(ip_network(part.strip(), strict=False))
            except ValueError:
                raise ConfigError(f"{what}: {part.strip()!r} is not a CIDR") from None
    return tuple(cidrs)


@dataclass
class ProxyConfig:
    """The agent's settings, named after KubeProxyConfiguration's fields."""

    mode: str = "iptables"
    kubeconfig: str = ""
    master: str = ""
    hostname_override: str = ""
    cluster_cidr: str = ""
    masquerade_all: bool = False
    masquerade_bit: int = 14
    localhost_nodeports: bool = True
    sync_period: float = 30.0
    min_sync_period: float = 1.0
    nodeport_addresses: list[str] = field(default_factory=list)
    ipvs_sync_period: float = 30.0
    ipvs_min_sync_period: float = 0.0
    ipvs_scheduler: str = ""
    ipvs_strict_arp: bool = False
    ipvs_exclude_cidrs: list[str] = field(default_factory=list)
    metrics_bind_address: str = "127.0.0.1:10249"
    healthz_bind_address: str = "0.0.0.0:10256"
    cleanup: bool = False
    verbosity: int = 0
    config_file: str = ""

    def cluster_cidrs(self) -> tuple[IPv4Network | IPv6Network, ...]:
        return parse_cidrs([self.cluster_cidr], "--cluster-cidr")

    def nodeport_cidrs(self) -> tuple[IPv4Network | IPv6Network, ...]:
        return parse_cidrs(self.nodeport_addresses, "--nodeport-addresses")

    def exclude_cidrs(self) -> tuple[IPv4Network | IPv6Network, ...]:
        return parse_cidrs(self.ipvs_exclude_cidrs, "--ipvs-exclude-cidrs")

    def sync_periods(self) -> tuple[float, float]:
        """(sync period, min sync period) of the mode in use, as kube-proxy picks them."""
        if self.mode == "ipvs":
            return self.ipvs_sync_period, self.ipvs_min_sync_period
        return self.sync_period, self.min_sync_period

    def validate(self) -> None:
        if self.mode not in MODES:
            raise ConfigError(f"--proxy-mode: {self.mode!r} is not one of {', '.join(MODES)}")
        if not 0 <= self.masquerade_bit <= 31:
            raise ConfigError(f"--iptables-masquerade-bit: {self.masquerade_bit} is not in 0-31")
        sync, min_sync = self.sync_periods()
        if sync <= 0:
            raise ConfigError(f"--{self.mode}-sync-period must be greater than 0")
        if min_sync < 0:
            raise ConfigError(f"--{self.mode}-min-sync-period must not be negative")
        if min_sync > sync:
            raise ConfigError(
                f"--{self.mode}-min-sync-period must not exceed --{self.mode}-sync-period"
            )
        cluster = self.cluster_cidrs()
        if len(cluster) > 2 or len({c.version for c in cluster}) < len(cluster):
            # Upstream's validation: one CIDR, or a dual-stack pair (one per family).
            raise ConfigError(
                f"--cluster-cidr {self.cluster_cidr!r}: at most one CIDR per IP family"
            )
        self.nodeport_cidrs()
        self.exclude_cidrs()
        for flag, value in (
            ("--metrics-bind-address", self.metrics_bind_address),
            ("--healthz-bind-address", self.healthz_bind_address),
        ):
            try:
                parse_bind_address(value)
            except ValueError as err:
                raise ConfigError(f"{flag}: {err}") from None


# KubeProxyConfiguration field path -> (ProxyConfig attribute, converter)
_FILE_FIELDS: dict[tuple[str, ...], tuple[str, Any]] = {
    ("mode",): ("mode", str),
    ("clientConnection", "kubeconfig"): ("kubeconfig", str),
    ("hostnameOverride",): ("hostname_override", str),
    ("clusterCIDR",): ("cluster_cidr", str),
    ("iptables", "masqueradeAll"): ("masquerade_all", bool),
    ("iptables", "masqueradeBit"): ("masquerade_bit", int),
    ("iptables", "localhostNodePorts"): ("localhost_nodeports", bool),
    ("iptables", "syncPeriod"): ("sync_period", parse_duration),
    ("iptables", "minSyncPeriod"): ("min_sync_period", parse_duration),
    ("nodePortAddresses",): ("nodeport_addresses", list),
    ("metricsBindAddress",): ("metrics_bind_address", str),
    ("healthzBindAddress",): ("healthz_bind_address", str),
    ("ipvs", "syncPeriod"): ("ipvs_sync_period", parse_duration),
    ("ipvs", "minSyncPeriod"): ("ipvs_min_sync_period", parse_duration),
    ("ipvs", "scheduler"): ("ipvs_scheduler", str),
    ("ipvs", "strictARP"): ("ipvs_strict_arp", bool),
    ("ipvs", "excludeCIDRs"): ("ipvs_exclude_cidrs", list),
}
# Fields kube-proxy accepts that this agent reads but does not act on (yet).
_ACCEPTED_FIELDS = {
    ("apiVersion",),
    ("kind",),
    ("bindAddress",),
    ("bindAddressHardFail",),
    ("enableProfiling",),
    ("showHiddenMetricsForVersion",),
    ("oomScoreAdj",),
    ("configSyncPeriod",),
    ("portRange",),
    ("featureGates",),
    ("conntrack",),
    ("logging",),
    ("detectLocalMode",),
    ("detectLocal",),
    ("clientConnection", "acceptContentTypes"),
    ("clientConnection", "contentType"),
    ("clientConnection", "qps"),
    ("clientConnection", "burst"),
    ("ipvs", "tcpTimeout"),
    ("ipvs", "tcpFinTimeout"),
    ("ipvs", "udpTimeout"),
    ("nftables",),
    ("winkernel",),
}


def _walk(doc: Any, prefix: tuple[str, ...] = ()) -> list[tuple[tuple[str, ...], Any]]:
    """Leaf fields of the document, descending only into known sections."""
    leaves = []
    for key, value in doc.items():
        path = (*prefix, str(key))
        if isinstance(value, dict) and path in {("clientConnection",), ("iptables",), ("ipvs",)}:
            leaves += _walk(value, path)
        else:
            leaves.append((path, value))
    return leaves


def load_config_file(path: str) -> dict[str, Any]:
    """ProxyConfig attributes set by a KubeProxyConfiguration file."""
    try:
        with open(path, encoding="utf-8") as handle:
            doc = yaml.safe_load(handle)
    except (OSError, yaml.YAMLError) as err:
        raise ConfigError(f"--config {path}: {err}") from None
    if not isinstance(doc, dict):
        raise ConfigError(f"--config {path}: not a KubeProxyConfiguration object")
    if doc.get("apiVersion") != CONFIG_API_VERSION or doc.get("kind") != CONFIG_KIND:
        raise ConfigError(
            f"--config {path}: expected apiVersion {CONFIG_API_VERSION} kind {CONFIG_KIND}"
        )
    values: dict[str, Any] = {}
    for path_, value in _walk(doc):
        dotted = ".".join(path_)
        if path_ in _FILE_FIELDS:
            attr, convert = _FILE_FIELDS[path_]
            if value is None:
                continue
            if convert in (bool, int, list) and not isinstance(value, convert):
                raise ConfigError(
                    f"--config {path}: {dotted}: {value!r} is not a {convert.__name__}"
                )
            try:
                values[attr] = convert(value)
            except ConfigError as err:
                raise ConfigError(f"--config {path}: {dotted}: {err}") from None
        elif path_ not in _ACCEPTED_FIELDS:
            raise ConfigError(f"--config {path}: unknown field {dotted!r}")
    return values


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> Any:  # one clear line, exit 1 like kube-proxy
        raise ConfigError(message)


def _bool(text: str) -> bool:
    if text.lower() in ("true", "1", "yes"):
        return True
    if text.lower() in ("false", "0", "no"):
        return False
    raise argparse.ArgumentTypeError(f"{text!r} is not a boolean")


def _duration(text: str) -> float:
    try:
        return parse_duration(text)
    except ConfigError as err:
        raise argparse.ArgumentTypeError(str(err)) from None


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(
        prog="pykubeproxy",
        description="kube-proxy's job, in Python.",
        argument_default=argparse.SUPPRESS,
    )
    add = p.add_argument
    add("--config", dest="config_file", help="KubeProxyConfiguration file; flags override it")
    add("--proxy-mode", dest="mode", choices=MODES, help="iptables (default) or ipvs")
    add("--kubeconfig", help="kubeconfig file; in-cluster config when absent")
    add("--master", help="API server address, overrides the kubeconfig's")
    add("--hostname-override", help="this node's name, if not the hostname")
    add("--cluster-cidr", help="pod CIDR(s); traffic from outside it is masqueraded")
    add("--masquerade-all", type=_bool, nargs="?", const=True, help="SNAT all Service traffic")
    add(
        "--iptables-masquerade-bit",
        dest="masquerade_bit",
        type=int,
        help="fwmark bit for packets to SNAT (0-31, default 14)",
    )
    add(
        "--iptables-localhost-nodeports",
        dest="localhost_nodeports",
        type=_bool,
        help="accept NodePort connections on 127.0.0.1 (default true)",
    )
    add(
        "--iptables-sync-period",
        dest="sync_period",
        type=_duration,
        help="full resync interval (default 30s)",
    )
    add(
        "--iptables-min-sync-period",
        dest="min_sync_period",
        type=_duration,
        help="minimum interval between syncs (default 1s)",
    )
    add(
        "--nodeport-addresses",
        action="append",
        help="CIDRs of node addresses that accept NodePorts (default all)",
    )
    add(
        "--ipvs-sync-period",
        dest="ipvs_sync_period",
        type=_duration,
        help="ipvs mode: full resync interval (default 30s)",
    )
    add(
        "--ipvs-min-sync-period",
        dest="ipvs_min_sync_period",
        type=_duration,
        help="ipvs mode: minimum interval between syncs (default 0s)",
    )
    add(
        "--ipvs-scheduler",
        dest="ipvs_scheduler",
        help="ipvs mode: IPVS scheduler (default rr), checked against the kernel at start",
    )
    add(
        "--ipvs-strict-arp",
        dest="ipvs_strict_arp",
        type=_bool,
        nargs="?",
        const=True,
        help="ipvs mode: set arp_ignore=1 and arp_announce=2",
    )
    add(
        "--ipvs-exclude-cidrs",
        dest="ipvs_exclude_cidrs",
        action="append",
        help="ipvs mode: CIDRs whose IPVS services the agent never touches",
    )
    add("--metrics-bind-address", help="metrics server address (default 127.0.0.1:10249)")
    add("--healthz-bind-address", help="health server address (default 0.0.0.0:10256)")
    add("--cleanup", type=_bool, nargs="?", const=True, help="remove the agent's rules and exit")
    add("-v", "--v", dest="verbosity", type=int, help="log verbosity (0-10)")
    return p


def load(argv: list[str]) -> ProxyConfig:
    """Defaults, then the --config file, then flags; validated."""
    flags = vars(build_parser().parse_args(argv))
    config = ProxyConfig()
    if "config_file" in flags:
        for name, value in load_config_file(flags["config_file"]).items():
            setattr(config, name, value)
    known = {f.name for f in fields(ProxyConfig)}
    for name, value in flags.items():
        assert name in known, name
        setattr(config, name, value)
    config.validate()
    return config
