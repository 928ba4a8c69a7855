"""Flags and the --config file, with kube-proxy's names, defaults, precedence and checks.

As upstream (cmd/kube-proxy/app/options.go, ``AddFlags`` and ``Complete``):

- without ``--config``, the settings are the defaults with the flags applied on top, and
  ``--healthz-port``/``--metrics-port`` complete a bare-IP bind address;
- with ``--config``, the file is the whole configuration: every flag that maps to a
  configuration field is ignored (a log line names them), except ``--hostname-override``,
  ``--master`` and the logging flags (``-v``, ``--logging-format``, ...), which win over the
  file. ``--cleanup``, ``--init-only``, ``--write-config-to`` and ``--version`` are actions,
  not settings, and work either way.

Every value is checked before the agent touches anything; a bad one stops it at start with
one line. `load` returns a `ProxyConfig`: the effective document (what ``/configz`` and
``--write-config-to`` show) and the typed settings the agent reads.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from dataclasses import dataclass, field
from ipaddress import IPv4Network, IPv6Network
from pathlib import Path
from typing import Any

from pykubeproxy import kubeproxyconfig as kpc
from pykubeproxy.kubeproxyconfig import ConfigError, parse_duration

__all__ = [
    "ConfigError",
    "Conntrack",
    "ProxyConfig",
    "build_parser",
    "load",
    "parse_cidrs",
    "parse_duration",
    "requested_version",
]


def parse_cidrs(values: list[str], what: str) -> tuple[IPv4Network | IPv6Network, ...]:
    """CIDRs from a list of (comma-separated) strings, read as upstream reads them."""
    cidrs = []
    for value in values:
        for part in value.split(","):
            if not part.strip():
                continue
            try:
                cidrs.append(kpc.parse_cidr(part.strip()))
            except ValueError:
                raise ConfigError(f"{what}: {part.strip()!r} is not a CIDR") from None
    return tuple(cidrs)


@dataclass(frozen=True)
class Conntrack:
    """The conntrack sysctls kube-proxy sets at start (cmd/kube-proxy/app/server_linux.go)."""

    max_per_core: int | None
    min: int | None
    tcp_established_timeout: float | None
    tcp_close_wait_timeout: float | None
    tcp_be_liberal: bool
    udp_timeout: float
    udp_stream_timeout: float


@dataclass
class ProxyConfig:
    """The agent's settings: the effective KubeProxyConfiguration and the command's actions."""

    document: kpc.Doc = field(default_factory=kpc.defaults)
    master: str = ""
    config_file: str = ""
    cleanup: bool = False
    init_only: bool = False
    write_config_to: str = ""
    # Lines to log once logging is set up (ignored flags, dropped fields, ...).
    notices: list[str] = field(default_factory=list)

    def get(self, dotted: str) -> Any:
        return kpc.get(self.document, dotted)

    @property
    def mode(self) -> str:
        return str(self.get("mode"))

    @property
    def kubeconfig(self) -> str:
        return str(self.get("clientConnection.kubeconfig"))

    @property
    def hostname_override(self) -> str:
        return str(self.get("hostnameOverride"))

    @property
    def cluster_cidr(self) -> str:
        return str(self.get("clusterCIDR"))

    @property
    def masquerade_all(self) -> bool:
        return bool(self.get("iptables.masqueradeAll"))

    @property
    def masquerade_bit(self) -> int:
        return int(self.get("iptables.masqueradeBit"))

    @property
    def localhost_nodeports(self) -> bool:
        return bool(self.get("iptables.localhostNodePorts"))

    @property
    def sync_period(self) -> float:
        return float(self.get("iptables.syncPeriod"))

    @property
    def min_sync_period(self) -> float:
        return float(self.get("iptables.minSyncPeriod"))

    @property
    def nodeport_addresses(self) -> list[str]:
        return list(self.get("nodePortAddresses") or [])

    @property
    def ipvs_sync_period(self) -> float:
        return float(self.get("ipvs.syncPeriod"))

    @property
    def ipvs_min_sync_period(self) -> float:
        return float(self.get("ipvs.minSyncPeriod"))

    @property
    def ipvs_scheduler(self) -> str:
        return str(self.get("ipvs.scheduler"))

    @property
    def ipvs_strict_arp(self) -> bool:
        return bool(self.get("ipvs.strictARP"))

    @property
    def ipvs_exclude_cidrs(self) -> list[str]:
        return list(self.get("ipvs.excludeCIDRs") or [])

    @property
    def ipvs_timeouts(self) -> tuple[float, float, float]:
        """(tcp, tcpfin, udp) IPVS timeouts in seconds; 0 leaves the kernel's value."""
        ipvs = self.get("ipvs")
        return ipvs["tcpTimeout"], ipvs["tcpFinTimeout"], ipvs["udpTimeout"]

    @property
    def metrics_bind_address(self) -> str:
        return str(self.get("metricsBindAddress"))

    @property
    def healthz_bind_address(self) -> str:
        return str(self.get("healthzBindAddress"))

    @property
    def bind_address(self) -> str:
        return str(self.get("bindAddress"))

    @property
    def bind_address_hard_fail(self) -> bool:
        return bool(self.get("bindAddressHardFail"))

    @property
    def detect_local_mode(self) -> str:
        return str(self.get("detectLocalMode"))

    @property
    def oom_score_adj(self) -> int | None:
        value = self.get("oomScoreAdj")
        return None if value is None else int(value)

    @property
    def verbosity(self) -> int:
        return int(self.get("logging.verbosity"))

    @property
    def logging_format(self) -> str:
        return str(self.get("logging.format"))

    @property
    def conntrack(self) -> Conntrack:
        c = self.get("conntrack")
        return Conntrack(
            c["maxPerCore"],
            c["min"],
            c["tcpEstablishedTimeout"],
            c["tcpCloseWaitTimeout"],
            c["tcpBeLiberal"],
            c["udpTimeout"],
            c["udpStreamTimeout"],
        )

    def cluster_cidrs(self) -> tuple[IPv4Network | IPv6Network, ...]:
        return parse_cidrs([self.cluster_cidr], "clusterCIDR")

    def nodeport_cidrs(self) -> tuple[IPv4Network | IPv6Network, ...]:
        """The nodePortAddresses CIDRs ('primary' is resolved into CIDRs at start)."""
        addresses = [a for a in self.nodeport_addresses if a != kpc.NODEPORT_ADDRESSES_PRIMARY]
        return parse_cidrs(addresses, "nodePortAddresses")

    def exclude_cidrs(self) -> tuple[IPv4Network | IPv6Network, ...]:
        return parse_cidrs(self.ipvs_exclude_cidrs, "ipvs.excludeCIDRs")

    def sync_periods(self) -> tuple[float, float]:
        """(sync period, min sync period) of the mode in use, as kube-proxy picks them."""
        if self.mode == "ipvs":
            return self.ipvs_sync_period, self.ipvs_min_sync_period
        return self.sync_period, self.min_sync_period

    def validate(self) -> None:
        problems = kpc.validate(self.document)
        if problems:
            raise ConfigError("invalid configuration: " + "; ".join(problems))


# --- flags --------------------------------------------------------------------------------


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> Any:  # one clear line, exit 1 like kube-proxy
        raise ConfigError(message)


def _argtype(convert: Callable[[str], Any]) -> Callable[[str], Any]:
    """A converter whose ConfigError/ValueError becomes argparse's one-line error."""

    def parse(text: str) -> Any:
        try:
            return convert(text)
        except (ConfigError, ValueError) as err:
            raise argparse.ArgumentTypeError(str(err) or repr(text)) from None

    parse.__name__ = getattr(convert, "__name__", "value")
    return parse


def _bool(text: str) -> bool:
    """Go's strconv.ParseBool, which pflag uses."""
    if text in ("1", "t", "T", "true", "TRUE", "True"):
        return True
    if text in ("0", "f", "F", "false", "FALSE", "False"):
        return False
    raise ValueError(f"{text!r} is not a boolean")


def _int32(text: str) -> int:
    value = int(text, 0)
    if not -(2**31) <= value < 2**31:
        raise ValueError(f"{text!r} is out of range")
    return value


def _ip_flag(text: str) -> str:
    """upstream's IPVar: a valid IP."""
    if kpc.parse_ip(text) is None:
        raise ValueError(f"{text!r} is not a valid IP address")
    return text


def _ip_port_flag(text: str) -> str:
    """upstream's IPPortVar: empty (off), an IP, or IP:port."""
    if not text.strip():
        return ""
    if kpc.parse_ip(text) is not None:
        return text
    if kpc.host_port_error(text) is not None:
        raise ValueError(f"{text!r} is not a valid IP or IP:port")
    return text


def _csv(text: str) -> list[str]:
    return [part.strip() for part in text.split(",") if part.strip()]


def _gates(text: str) -> dict[str, bool]:
    """``Name=true,Other=false``, as upstream's MapStringBool reads --feature-gates."""
    gates = {}
    for item in _csv(text):
        name, sep, value = item.partition("=")
        if not sep:
            raise ValueError(f"missing bool value for {name}")
        gates[name.strip()] = _bool(value.strip())
    return gates


def _vmodule(text: str) -> list[dict[str, Any]]:
    items = []
    for item in _csv(text):
        pattern, sep, level = item.partition("=")
        if not sep or not level.isdigit():
            raise ValueError(f"{item!r} is not pattern=N")
        items.append({"filePattern": pattern, "verbosity": int(level)})
    return items


# flag -> (document path, converter, kind, help). kind: "value", "bool", "list"
# (comma-separated, repeatable), "map" (merged), "logging" (a logging setting: it wins over
# --config, as upstream's copyLogsFromFlags makes it). Boolean flags take an optional value
# (``--masquerade-all``, ``--masquerade-all=false``), as pflag's do.
_CONFIG_FLAGS: dict[str, tuple[str, Callable[[str], Any], str, str]] = {
    "--feature-gates": ("featureGates", _gates, "map", "Name=true|false,... (see the README)"),
    "--kubeconfig": ("clientConnection.kubeconfig", str, "value", "kubeconfig file"),
    "--kube-api-content-type": ("clientConnection.contentType", str, "value", "request type"),
    "--kube-api-burst": ("clientConnection.burst", _int32, "value", "API request burst"),
    "--kube-api-qps": ("clientConnection.qps", float, "value", "API requests per second"),
    "--bind-address": ("bindAddress", _ip_flag, "value", "the node's primary IP"),
    "--healthz-bind-address": ("healthzBindAddress", _ip_port_flag, "value", "empty: off"),
    "--metrics-bind-address": ("metricsBindAddress", _ip_port_flag, "value", "empty: off"),
    "--bind-address-hard-fail": ("bindAddressHardFail", _bool, "bool", "bind failure is fatal"),
    "--profiling": ("enableProfiling", _bool, "bool", "not implemented (warns)"),
    "--show-hidden-metrics-for-version": ("showHiddenMetricsForVersion", str, "value", ""),
    "--proxy-mode": ("mode", str, "value", "iptables (default) or ipvs"),
    "--iptables-masquerade-bit": ("iptables.masqueradeBit", _int32, "value", "0-31"),
    "--masquerade-all": ("iptables.masqueradeAll", _bool, "bool", "SNAT all Service traffic"),
    "--iptables-localhost-nodeports": ("iptables.localhostNodePorts", _bool, "bool", ""),
    "--iptables-sync-period": ("iptables.syncPeriod", parse_duration, "value", "default 30s"),
    "--iptables-min-sync-period": ("iptables.minSyncPeriod", parse_duration, "value", ""),
    "--ipvs-sync-period": ("ipvs.syncPeriod", parse_duration, "value", "default 30s"),
    "--ipvs-min-sync-period": ("ipvs.minSyncPeriod", parse_duration, "value", "default 0s"),
    "--ipvs-scheduler": ("ipvs.scheduler", str, "value", "default rr"),
    "--ipvs-exclude-cidrs": ("ipvs.excludeCIDRs", _csv, "list", "CIDRs left alone"),
    "--ipvs-strict-arp": ("ipvs.strictARP", _bool, "bool", "arp_ignore=1, arp_announce=2"),
    "--ipvs-tcp-timeout": ("ipvs.tcpTimeout", parse_duration, "value", "0: as is"),
    "--ipvs-tcpfin-timeout": ("ipvs.tcpFinTimeout", parse_duration, "value", "0: as is"),
    "--ipvs-udp-timeout": ("ipvs.udpTimeout", parse_duration, "value", "0: as is"),
    "--detect-local-mode": ("detectLocalMode", str, "value", "ClusterCIDR (default), ..."),
    "--pod-bridge-interface": ("detectLocal.bridgeInterface", str, "value", ""),
    "--pod-interface-name-prefix": ("detectLocal.interfaceNamePrefix", str, "value", ""),
    "--cluster-cidr": ("clusterCIDR", str, "value", "pod CIDR(s)"),
    "--nodeport-addresses": ("nodePortAddresses", _csv, "list", "CIDRs or 'primary'"),
    "--oom-score-adj": ("oomScoreAdj", _int32, "value", "default -999"),
    "--conntrack-max-per-core": ("conntrack.maxPerCore", _int32, "value", "0: as is"),
    "--conntrack-min": ("conntrack.min", _int32, "value", "default 131072"),
    "--conntrack-tcp-timeout-established": (
        "conntrack.tcpEstablishedTimeout", parse_duration, "value", "0: as is"),
    "--conntrack-tcp-timeout-close-wait": (
        "conntrack.tcpCloseWaitTimeout", parse_duration, "value", "0: as is"),
    "--conntrack-tcp-be-liberal": ("conntrack.tcpBeLiberal", _bool, "bool", ""),
    "--conntrack-udp-timeout": ("conntrack.udpTimeout", parse_duration, "value", "0: as is"),
    "--conntrack-udp-timeout-stream": (
        "conntrack.udpStreamTimeout", parse_duration, "value", "0: as is"),
    "--config-sync-period": ("configSyncPeriod", parse_duration, "value", "default 15m"),
    "--proxy-port-range": ("portRange", str, "value", "deprecated, no effect"),
    "-v": ("logging.verbosity", int, "logging", "log verbosity"),
    "--vmodule": ("logging.vmodule", _vmodule, "logging", "not implemented (warns)"),
    "--logging-format": ("logging.format", str, "logging", "text (default) or json"),
    "--log-flush-frequency": ("logging.flushFrequency", parse_duration, "logging", ""),
    "--log-json-split-stream": ("logging.options.json.splitStream", _bool, "logging", ""),
    "--log-json-info-buffer-size": ("logging.options.json.infoBufferSize", str, "logging", ""),
    "--log-text-split-stream": ("logging.options.text.splitStream", _bool, "logging", ""),
    "--log-text-info-buffer-size": ("logging.options.text.infoBufferSize", str, "logging", ""),
}  # fmt: skip
# Deprecated flags upstream still accepts, with the message pflag prints for them.
_DEPRECATED = {
    "--healthz-port": "use --healthz-bind-address instead",
    "--metrics-port": "use --metrics-bind-address instead",
    "--proxy-port-range": "it has no effect",
}


def _dest(flag: str) -> str:
    return "verbosity" if flag == "-v" else flag.lstrip("-").replace("-", "_")


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="pykubeproxy", description="kube-proxy's job, in Python.",
                argument_default=argparse.SUPPRESS)  # fmt: skip
    add = p.add_argument
    add("--config", dest="config_file", help="KubeProxyConfiguration file (flags then ignored)")
    add("--write-config-to", help="write the effective configuration to this file and exit")
    add("--cleanup", type=_argtype(_bool), nargs="?", const=True, help="remove rules, exit")
    add("--init-only", type=_argtype(_bool), nargs="?", const=True,
        help="apply the start-up sysctls and exit")  # fmt: skip
    add("--master", help="API server address, overrides the kubeconfig's")
    add("--hostname-override", help="this node's name, if not the hostname")
    add("--version", nargs="?", const="true", help="print the version and exit")
    add("--healthz-port", type=_argtype(_int32), help="deprecated; 0 turns /healthz off")
    add("--metrics-port", type=_argtype(_int32), help="deprecated; 0 turns /metrics off")
    for flag, (_, convert, kind, text) in _CONFIG_FLAGS.items():
        names = (flag, "--v") if flag == "-v" else (flag,)
        options: dict[str, Any] = {"dest": _dest(flag), "type": _argtype(convert), "help": text}
        if convert is _bool:
            options.update(nargs="?", const=True)
        elif kind in ("list", "map"):
            options["action"] = "append"
        add(*names, **options)
    return p


def _set_flags(doc: kpc.Doc, flags: dict[str, Any], logging_only: bool) -> None:
    for flag, (path, _, kind, _) in _CONFIG_FLAGS.items():
        if _dest(flag) not in flags or (logging_only and kind != "logging"):
            continue
        value = flags[_dest(flag)]
        if kind == "list":
            value = [item for chunk in value for item in chunk]
        elif kind == "map":
            value = {**(kpc.get(doc, path) or {}), **{k: v for m in value for k, v in m.items()}}
        kpc.put(doc, path, value)


def _read(path: str) -> kpc.Decoded:
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as err:
        raise ConfigError(f"--config {path}: {err.strerror or err}") from None
    try:
        return kpc.decode(text)
    except ConfigError as err:
        raise ConfigError(f"--config {path}: {err}") from None


def _joined(argv: list[str], parser: argparse.ArgumentParser) -> list[str]:
    """``--flag value`` as ``--flag=value`` for flags that take a value: pflag takes the next
    argument as the value even when it starts with a dash (``--ipvs-tcp-timeout -1s``)."""
    takes_value = {
        name
        for action in parser._actions
        if action.nargs is None and action.option_strings
        for name in action.option_strings
    }
    joined: list[str] = []
    args = iter(argv)
    for arg in args:
        if arg in takes_value and arg.startswith("--"):
            joined.append(f"{arg}={next(args, '')}")
        else:
            joined.append(arg)
    return joined


def load(argv: list[str]) -> ProxyConfig:
    """The settings from flags and the --config file, with upstream's precedence; validated."""
    parser = build_parser()
    flags = vars(parser.parse_args(_joined(argv, parser)))
    cfg = ProxyConfig(
        master=flags.get("master", ""),
        config_file=flags.get("config_file", ""),
        cleanup=bool(flags.get("cleanup", False)),
        init_only=bool(flags.get("init_only", False)),
        write_config_to=flags.get("write_config_to", ""),
    )
    notices = cfg.notices
    for flag, why in _DEPRECATED.items():
        if _dest(flag) in flags:
            notices.append(f"flag {flag} has been deprecated, {why}")
    if cfg.config_file:
        decoded = _read(cfg.config_file)
        doc = decoded.doc
        if decoded.dropped or decoded.duplicated:
            what = [f"unknown field {f!r}" for f in decoded.dropped]
            what += [f"duplicate field {f!r} (the last one counts)" for f in decoded.duplicated]
            notices.append(
                f"--config {cfg.config_file}: read with lenient decoding (strict decoding "
                f"refused it), ignoring: {', '.join(what)}"
            )
        kpc.set_defaults(doc)
        settings = [flag for flag, spec in _CONFIG_FLAGS.items() if spec[2] != "logging"]
        ignored = sorted(
            flag for flag in (*settings, "--healthz-port", "--metrics-port") if _dest(flag) in flags
        )
        if ignored:
            notices.append(
                f"flags ignored because --config is given (the file's values apply): "
                f"{', '.join(ignored)}"
            )
        _set_flags(doc, flags, logging_only=True)
    else:
        doc = kpc.defaults()
        _set_flags(doc, flags, logging_only=False)
        if not cfg.write_config_to:
            for key, dest, port in (
                ("healthzBindAddress", "healthz_port", kpc.PROXY_HEALTHZ_PORT),
                ("metricsBindAddress", "metrics_port", kpc.PROXY_STATUS_PORT),
            ):
                port = flags.get(dest, port)
                doc[key] = "" if port == 0 else kpc.append_port_if_needed(doc[key], port)
    kpc.platform_defaults(doc)
    override = flags.get("hostname_override", "")
    if override:
        if not override.strip():
            raise ConfigError("--hostname-override is blank")
        doc["hostnameOverride"] = override.strip().lower()
    cfg.document = doc
    cfg.validate()
    return cfg


def requested_version(argv: list[str]) -> str | None:
    """The --version request ("true", "raw", ...), or None: checked before anything else, as
    upstream's verflag prints and exits before reading any configuration."""
    for arg in argv:
        if arg == "--version":
            return "true"
        if arg.startswith("--version="):
            value = arg.partition("=")[2]
            return None if value.lower() in ("false", "0") else value
    return None
