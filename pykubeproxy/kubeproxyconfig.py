"""kube-proxy's KubeProxyConfiguration (kubeproxy.config.k8s.io/v1alpha1), as upstream reads it.

The document is kept as plain data: a dict shaped like the v1alpha1 object, every field
present, with Python values (durations in seconds, unset pointers as None). The steps
follow upstream v1.34:

- `decode`: the file's text, strictly first; what strict decoding refuses but lenient
  decoding takes (unknown or duplicated fields) is dropped with one warning naming it, as
  ``loadConfig`` in cmd/kube-proxy/app/options.go does. Wrong types are errors.
- `set_defaults`: ``SetDefaults_KubeProxyConfiguration``
  (pkg/proxy/apis/config/v1alpha1/defaults.go): empty and zero values become the defaults,
  so kubeadm's ``mode: ""``, ``syncPeriod: 0s`` and ``metricsBindAddress: ""`` mean
  iptables, 30s and 127.0.0.1:10249.
- `platform_defaults`: ``platformApplyDefaults`` (cmd/kube-proxy/app/server_linux.go).
- `validate`: ``Validate`` (pkg/proxy/apis/config/validation/validation.go).

`to_yaml` writes the document the way upstream's ``--write-config-to`` does (sorted keys,
every field), and `internal` gives the shape upstream's ``/configz`` serves (the internal
type, whose fields carry Go names).
"""

from __future__ import annotations

import copy
import re
from collections.abc import Mapping
from dataclasses import dataclass
from ipaddress import IPv4Address, IPv6Address, ip_address, ip_network
from typing import Any

import yaml

API_VERSION = "kubeproxy.config.k8s.io/v1alpha1"
KIND = "KubeProxyConfiguration"
# The upstream release whose configuration, flags and metrics this agent follows.
KUBE_VERSION = (1, 34)
# The proxy modes this build implements; upstream also has nftables.
MODES = ("iptables", "ipvs")
LOCAL_MODES = ("ClusterCIDR", "NodeCIDR", "BridgeInterface", "InterfaceNamePrefix")
NODEPORT_ADDRESSES_PRIMARY = "primary"
LOG_FORMATS = ("text", "json")

Doc = dict[str, Any]


class ConfigError(ValueError):
    """A setting that cannot be used; the message names it, on one line."""


# --- Go durations -------------------------------------------------------------------------

_DURATION_UNITS = {
    "ns": 1e-9,
    "us": 1e-6,
    "µs": 1e-6,
    "μs": 1e-6,
    "ms": 1e-3,
    "s": 1.0,
    "m": 60.0,
    "h": 3600.0,
}
_DURATION_PART = re.compile(r"(\d+(?:\.\d*)?|\.\d+)(ns|us|µs|μs|ms|s|m|h)")


def parse_duration(text: object) -> float:
    """A Go duration (``500ms``, ``1m30s``, ``-1s``) in seconds, as time.ParseDuration reads it."""
    if not isinstance(text, str):
        raise ConfigError(f"invalid duration {text!r} (use Go form, e.g. 500ms, 30s, 1m)")
    body = text.strip()
    sign = -1.0 if body.startswith("-") else 1.0
    body = body[1:] if body[:1] in "+-" else body
    if body == "0":
        return 0.0
    position, total = 0, 0.0
    for match in _DURATION_PART.finditer(body):
        if match.start() != position:
            break
        total += float(match.group(1)) * _DURATION_UNITS[match.group(2)]
        position = match.end()
    if position != len(body) or not body:
        raise ConfigError(f"invalid duration {text!r} (use Go form, e.g. 500ms, 30s, 1m)")
    return sign * total


def _fraction(value: int, digits: int) -> tuple[int, str]:
    """Go's fmtFrac: the whole part of value / 10**digits and its fraction, zeros trimmed."""
    whole, rest = divmod(value, 10**digits)
    fraction = f"{rest:0{digits}d}".rstrip("0")
    return whole, f".{fraction}" if fraction else ""


def format_duration(seconds: float) -> str:
    """A duration as Go's time.Duration.String() prints it (``30s``, ``1m0s``, ``24h0m0s``)."""
    nanos = round(seconds * 1e9)
    if nanos == 0:
        return "0s"
    sign, value = ("-" if nanos < 0 else ""), abs(nanos)
    if value < 1_000:
        return f"{sign}{value}ns"
    if value < 1_000_000:
        whole, fraction = _fraction(value, 3)
        return f"{sign}{whole}{fraction}µs"
    if value < 1_000_000_000:
        whole, fraction = _fraction(value, 6)
        return f"{sign}{whole}{fraction}ms"
    whole_seconds, fraction = _fraction(value, 9)
    text = f"{whole_seconds % 60}{fraction}s"
    minutes = whole_seconds // 60
    if minutes:
        text = f"{minutes % 60}m{text}"
        if minutes // 60:
            text = f"{minutes // 60}h{text}"
    return sign + text


# --- the v1alpha1 schema ------------------------------------------------------------------


@dataclass(frozen=True)
class Field:
    """One leaf of the document: how a YAML value becomes the field's Python value.

    `nullable` fields are Go pointers (null stays None, "unset"); a null for any other field
    leaves its zero value, as Go's JSON decoder does.
    """

    kind: str
    zero: Any = None
    nullable: bool = False


STRING = Field("string", "")
BOOL = Field("bool", False)
INT32 = Field("int32", 0)
INT32_PTR = Field("int32", None, nullable=True)
BOOL_PTR = Field("bool", None, nullable=True)
UINT32 = Field("uint32", 0)
FLOAT = Field("float", 0.0)
DURATION = Field("duration", 0.0)
DURATION_PTR = Field("duration", None, nullable=True)
STRINGS = Field("strings", None, nullable=True)
BOOL_MAP = Field("bool_map", None, nullable=True)
# component-base's TimeOrMetaDuration (a number of nanoseconds or a duration string) and
# QuantityValue (a Kubernetes quantity), kept as written.
FLUSH_FREQUENCY = Field("flush", 0.0)
QUANTITY = Field("quantity", "")
VMODULE = Field("vmodule", None, nullable=True)

Schema = Mapping[str, "Field | Schema"]

SCHEMA: Schema = {
    "apiVersion": STRING,
    "kind": STRING,
    "featureGates": BOOL_MAP,
    "clientConnection": {
        "kubeconfig": STRING,
        "acceptContentTypes": STRING,
        "contentType": STRING,
        "qps": FLOAT,
        "burst": INT32,
    },
    "logging": {
        "format": STRING,
        "flushFrequency": FLUSH_FREQUENCY,
        "verbosity": UINT32,
        "vmodule": VMODULE,
        "options": {
            "text": {"splitStream": BOOL, "infoBufferSize": QUANTITY},
            "json": {"splitStream": BOOL, "infoBufferSize": QUANTITY},
        },
    },
    "hostnameOverride": STRING,
    "bindAddress": STRING,
    "healthzBindAddress": STRING,
    "metricsBindAddress": STRING,
    "bindAddressHardFail": BOOL,
    "enableProfiling": BOOL,
    "showHiddenMetricsForVersion": STRING,
    "mode": STRING,
    "iptables": {
        "masqueradeBit": INT32_PTR,
        "masqueradeAll": BOOL,
        "localhostNodePorts": BOOL_PTR,
        "syncPeriod": DURATION,
        "minSyncPeriod": DURATION,
    },
    "ipvs": {
        "syncPeriod": DURATION,
        "minSyncPeriod": DURATION,
        "scheduler": STRING,
        "excludeCIDRs": STRINGS,
        "strictARP": BOOL,
        "tcpTimeout": DURATION,
        "tcpFinTimeout": DURATION,
        "udpTimeout": DURATION,
    },
    "nftables": {
        "masqueradeBit": INT32_PTR,
        "masqueradeAll": BOOL,
        "syncPeriod": DURATION,
        "minSyncPeriod": DURATION,
    },
    "winkernel": {
        "networkName": STRING,
        "sourceVip": STRING,
        "enableDSR": BOOL,
        "rootHnsEndpointName": STRING,
        "forwardHealthCheckVip": BOOL,
    },
    "detectLocalMode": STRING,
    "detectLocal": {"bridgeInterface": STRING, "interfaceNamePrefix": STRING},
    "clusterCIDR": STRING,
    "nodePortAddresses": STRINGS,
    "oomScoreAdj": INT32_PTR,
    "conntrack": {
        "maxPerCore": INT32_PTR,
        "min": INT32_PTR,
        "tcpEstablishedTimeout": DURATION_PTR,
        "tcpCloseWaitTimeout": DURATION_PTR,
        "tcpBeLiberal": BOOL,
        "udpTimeout": DURATION,
        "udpStreamTimeout": DURATION,
    },
    "configSyncPeriod": DURATION,
    "portRange": STRING,
    "windowsRunAsService": BOOL,
}


def empty(schema: Schema = SCHEMA) -> Doc:
    """The document with every field at its zero value (Go's zero struct)."""
    return {
        key: empty(spec) if isinstance(spec, Mapping) else copy.copy(spec.zero)
        for key, spec in schema.items()
    }


def get(doc: Mapping[str, Any], dotted: str) -> Any:
    """The value at a dotted path (``iptables.syncPeriod``)."""
    value: Any = doc
    for key in dotted.split("."):
        value = value[key]
    return value


def put(doc: Doc, dotted: str, value: Any) -> None:
    *parents, last = dotted.split(".")
    target = doc
    for key in parents:
        target = target[key]
    target[last] = value


# --- decoding -----------------------------------------------------------------------------


class _Loader(yaml.SafeLoader):
    """A YAML loader that records duplicated keys (strict decoding refuses them)."""

    duplicates: list[str]


def _construct_mapping(loader: _Loader, node: yaml.MappingNode) -> dict[Any, Any]:
    seen: set[Any] = set()
    for key_node, _ in node.value:
        key = loader.construct_object(key_node)
        if key in seen:
            loader.duplicates.append(str(key))
        seen.add(key)
    return dict(loader.construct_mapping(node))


_Loader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_mapping)


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _convert(spec: Field, value: Any) -> Any:
    """One YAML value as the field's Python value; raises ConfigError naming the problem."""
    if value is None:
        return copy.copy(spec.zero)
    kind = spec.kind
    if kind == "string" and isinstance(value, str):
        return value
    if kind == "bool" and isinstance(value, bool):
        return value
    if kind == "int32" and _is_int(value) and -(2**31) <= value < 2**31:
        return value
    if kind == "uint32" and _is_int(value) and 0 <= value < 2**32:
        return value
    if kind == "float" and (_is_int(value) or isinstance(value, float)):
        return float(value)
    if kind == "duration" and isinstance(value, str):
        return parse_duration(value)
    if kind == "flush":
        return value / 1e9 if _is_int(value) else parse_duration(value)
    if kind == "quantity" and (isinstance(value, str) or _is_int(value)):
        return str(value)
    if kind == "strings" and isinstance(value, list) and all(isinstance(v, str) for v in value):
        return list(value)
    if kind == "bool_map" and isinstance(value, dict):
        if all(isinstance(k, str) and isinstance(v, bool) for k, v in value.items()):
            return dict(value)
        raise ConfigError("feature gate values must be true or false")
    if kind == "vmodule" and isinstance(value, list):
        items = []
        for item in value:
            if not isinstance(item, dict) or not isinstance(item.get("filePattern"), str):
                raise ConfigError(f"{item!r} is not a {{filePattern, verbosity}} entry")
            items.append(
                {"filePattern": item["filePattern"], "verbosity": item.get("verbosity", 0)}
            )
        return items
    expected = {
        "string": "a string",
        "bool": "true or false",
        "int32": "a 32-bit integer",
        "uint32": "a non-negative integer",
        "float": "a number",
        "duration": "a duration string (e.g. 30s)",
        "strings": "a list of strings",
        "bool_map": "a map of names to true/false",
        "flush": "a duration",
        "quantity": "a quantity",
        "vmodule": "a list",
    }[kind]
    raise ConfigError(f"{value!r} is not {expected}")


def _decode_object(
    raw: Mapping[Any, Any], schema: Schema, prefix: str, target: Doc, unknown: list[str]
) -> None:
    for key, value in raw.items():
        dotted = f"{prefix}{key}"
        spec = schema.get(key) if isinstance(key, str) else None
        if spec is None:
            unknown.append(dotted)
        elif isinstance(spec, Mapping):
            if value is None:
                continue
            if not isinstance(value, Mapping):
                raise ConfigError(f"{dotted}: {value!r} is not an object")
            _decode_object(value, spec, f"{dotted}.", target[key], unknown)
        else:
            try:
                target[key] = _convert(spec, value)
            except ConfigError as err:
                raise ConfigError(f"{dotted}: {err}") from None


@dataclass(frozen=True)
class Decoded:
    """A decoded file: the document, and what strict decoding would have refused."""

    doc: Doc
    dropped: tuple[str, ...]  # unknown fields, ignored as upstream's lenient decoding does
    duplicated: tuple[str, ...]  # keys given twice (the last one counts)


def decode(text: str) -> Decoded:
    """A KubeProxyConfiguration from YAML or JSON text (zero values where fields are absent)."""
    loader = _Loader(text)
    loader.duplicates = []
    try:
        raw = loader.get_single_data()
    except yaml.YAMLError as err:
        raise ConfigError(" ".join(str(err).split())) from None
    finally:
        loader.dispose()
    if not isinstance(raw, Mapping):
        raise ConfigError(f"not a {KIND} object")
    if raw.get("kind") != KIND or raw.get("apiVersion") != API_VERSION:
        raise ConfigError(
            f"apiVersion {raw.get('apiVersion')!r} kind {raw.get('kind')!r}: expected "
            f"apiVersion {API_VERSION} kind {KIND}"
        )
    doc, unknown = empty(), list[str]()
    _decode_object(raw, SCHEMA, "", doc, unknown)
    return Decoded(doc, tuple(unknown), tuple(loader.duplicates))


# --- defaulting ---------------------------------------------------------------------------

PROXY_HEALTHZ_PORT = 10256
PROXY_STATUS_PORT = 10249
DEFAULT_OOM_SCORE_ADJ = -999


def parse_ip(text: str) -> IPv4Address | IPv6Address | None:
    """An IP as upstream's sloppy parser reads it (IPv4 octets with leading zeros allowed)."""
    try:
        return ip_address(text)
    except ValueError:
        pass
    parts = text.split(".")
    if len(parts) == 4 and all(p.isdigit() and int(p) < 256 for p in parts):
        return IPv4Address(".".join(str(int(p)) for p in parts))
    return None


def append_port_if_needed(address: str, port: int) -> str:
    """upstream's AppendPortIfNeeded: a bare IP gets the port; anything else is left as is."""
    if _split_host_port(address) is not None:
        return address
    ip = parse_ip(address)
    if ip is None:
        return address
    return f"{address}:{port}" if ip.version == 4 else f"[{address}]:{port}"


def _split_host_port(address: str) -> tuple[str, str] | None:
    """Go's net.SplitHostPort, or None when the text is not host:port."""
    if address.startswith("["):
        end = address.find("]")
        if end < 0 or address[end + 1 : end + 2] != ":":
            return None
        return address[1:end], address[end + 2 :]
    host, sep, port = address.rpartition(":")
    if not sep or ":" in host:
        return None
    return host, port


def set_defaults(doc: Doc) -> None:
    """upstream's SetDefaults_KubeProxyConfiguration, in place."""
    if not doc["bindAddress"]:
        doc["bindAddress"] = "0.0.0.0"
    bind_ip = parse_ip(doc["bindAddress"])
    healthz_host, metrics_host = (
        ("0.0.0.0", "127.0.0.1")
        if bind_ip is not None and bind_ip.version == 4
        else ("[::]", "[::1]")
    )
    for key, host, port in (
        ("healthzBindAddress", healthz_host, PROXY_HEALTHZ_PORT),
        ("metricsBindAddress", metrics_host, PROXY_STATUS_PORT),
    ):
        doc[key] = append_port_if_needed(doc[key], port) if doc[key] else f"{host}:{port}"
    if doc["oomScoreAdj"] is None:
        doc["oomScoreAdj"] = DEFAULT_OOM_SCORE_ADJ
    iptables, nft, ipvs = doc["iptables"], doc["nftables"], doc["ipvs"]
    for section in (iptables, nft):
        if section["masqueradeBit"] is None:
            section["masqueradeBit"] = 14
        if not section["syncPeriod"]:
            section["syncPeriod"] = 30.0
        if not section["minSyncPeriod"]:
            section["minSyncPeriod"] = 1.0
    if iptables["localhostNodePorts"] is None:
        iptables["localhostNodePorts"] = True
    if not ipvs["syncPeriod"]:
        ipvs["syncPeriod"] = 30.0
    conntrack = doc["conntrack"]
    for key, value in (
        ("maxPerCore", 32 * 1024),
        ("min", 128 * 1024),
        ("tcpEstablishedTimeout", 24 * 3600.0),
        ("tcpCloseWaitTimeout", 3600.0),
    ):
        if conntrack[key] is None:
            conntrack[key] = value
    if not doc["configSyncPeriod"]:
        doc["configSyncPeriod"] = 15 * 60.0
    client = doc["clientConnection"]
    if not client["contentType"]:
        client["contentType"] = "application/vnd.kubernetes.protobuf"
    if not client["qps"]:
        client["qps"] = 5.0
    if not client["burst"]:
        client["burst"] = 10
    if doc["featureGates"] is None:
        doc["featureGates"] = {}
    logging = doc["logging"]  # component-base's SetRecommendedLoggingConfiguration
    if not logging["format"]:
        logging["format"] = "text"
    if not logging["flushFrequency"]:
        logging["flushFrequency"] = 5.0
    for options in logging["options"].values():
        if not options["infoBufferSize"]:
            options["infoBufferSize"] = "0"


def platform_defaults(doc: Doc) -> None:
    """upstream's platformApplyDefaults for Linux: an empty mode is iptables, an empty
    detect-local mode is ClusterCIDR (and nftables mode serves NodePorts on the primary IP)."""
    if not doc["mode"]:
        doc["mode"] = "iptables"
    if doc["mode"] == "nftables" and not doc["nodePortAddresses"]:
        doc["nodePortAddresses"] = [NODEPORT_ADDRESSES_PRIMARY]
    if not doc["detectLocalMode"]:
        doc["detectLocalMode"] = "ClusterCIDR"


def defaults() -> Doc:
    """What upstream starts from before flags: the empty document, defaulted."""
    doc = empty()
    doc["apiVersion"], doc["kind"] = API_VERSION, KIND
    set_defaults(doc)
    return doc


# --- validation ---------------------------------------------------------------------------


def parse_cidr(text: str) -> Any:
    """A CIDR, read as upstream's sloppy parser reads it; raises ValueError."""
    address, sep, prefix = text.partition("/")
    ip = parse_ip(address)
    if not sep or ip is None or not prefix.isdigit():
        raise ValueError(text)
    return ip_network(f"{ip}/{int(prefix)}", strict=False)


def host_port_error(address: str) -> str | None:
    """upstream's validateHostPort: an IP and a port in 1-65535."""
    parts = _split_host_port(address)
    if parts is None:
        return "must be IP:port"
    host, port = parts
    if parse_ip(host) is None:
        return f"{host!r} must be a valid IP"
    if not port.isdigit() or not 1 <= int(port) <= 65535:
        return f"{port!r} must be a valid port"
    return None


def _port_range_error(text: str) -> str | None:
    """apimachinery's ParsePortRange: empty, ``N``, ``N-M`` or ``N+offset``."""
    if not text:
        return None
    match = re.fullmatch(r"(\d+)(?:([-+])(\d+))?", text.strip())
    if match is None:
        return "must be a valid port range (e.g. 300-2000)"
    low = int(match.group(1))
    high = low if match.group(2) is None else int(match.group(3))
    if match.group(2) == "+":
        high = low + high
    if not 0 <= low <= high <= 65535:
        return "must be a valid port range (e.g. 300-2000)"
    return None


def _cidrs_error(values: list[str]) -> str | None:
    for value in values:
        try:
            parse_cidr(value)
        except ValueError:
            return f"{value!r} must be a valid CIDR"
    return None


def previous_minor() -> str:
    major, minor = KUBE_VERSION
    return f"{major}.{minor - 1}"


def validate(doc: Doc) -> list[str]:
    """upstream's Validate: every problem, each as `field: reason` (empty when valid)."""
    problems: list[str] = []

    def check(condition: bool, where: str, reason: str) -> None:
        if not condition:
            problems.append(f"{where}: {reason}")

    mode = doc["mode"]
    what = "is not implemented by pykubeproxy" if mode == "nftables" else "is not a proxy mode"
    check(mode in MODES, "mode", f"{mode!r} {what}; this build has: {', '.join(MODES)}")
    bit = doc["iptables"]["masqueradeBit"]
    check(bit is None or 0 <= bit <= 31, "iptables.masqueradeBit", f"{bit} is not in [0, 31]")
    section = "ipvs" if mode == "ipvs" else "iptables"
    sync, min_sync = doc[section]["syncPeriod"], doc[section]["minSyncPeriod"]
    check(sync > 0, f"{section}.syncPeriod", "must be greater than 0")
    check(min_sync >= 0, f"{section}.minSyncPeriod", "must be greater than or equal to 0")
    check(
        min_sync <= sync,
        f"{section}.syncPeriod",
        f"must be greater than or equal to {section}.minSyncPeriod",
    )
    if mode == "ipvs":
        for key in ("tcpTimeout", "tcpFinTimeout", "udpTimeout"):
            check(doc["ipvs"][key] >= 0, f"ipvs.{key}", "must be greater than or equal to 0")
        error = _cidrs_error(doc["ipvs"]["excludeCIDRs"] or [])
        check(error is None, "ipvs.excludeCIDRs", str(error))
    conntrack = doc["conntrack"]
    for key in ("maxPerCore", "min"):
        value = conntrack[key]
        check(value is None or value >= 0, f"conntrack.{key}", "must be greater than or equal to 0")
    for key in ("tcpEstablishedTimeout", "tcpCloseWaitTimeout", "udpTimeout", "udpStreamTimeout"):
        value = conntrack[key]
        check(value is None or value >= 0, f"conntrack.{key}", "must be greater than or equal to 0")
    oom = doc["oomScoreAdj"]
    check(oom is None or -1000 <= oom <= 1000, "oomScoreAdj", f"{oom} is not in [-1000, 1000]")
    check(doc["clientConnection"]["burst"] >= 0, "clientConnection.burst", "must not be negative")
    check(doc["configSyncPeriod"] > 0, "configSyncPeriod", "must be greater than 0")
    check(
        parse_ip(doc["bindAddress"]) is not None,
        "bindAddress",
        f"{doc['bindAddress']!r} is not a valid textual representation of an IP address",
    )
    for key in ("healthzBindAddress", "metricsBindAddress"):
        if doc[key]:  # empty: that server is off
            error = host_port_error(doc[key])
            check(error is None, key, f"{doc[key]!r} {error}")
    error = _port_range_error(doc["portRange"])
    check(error is None, "portRange", f"{doc['portRange']!r} {error}")
    addresses = doc["nodePortAddresses"] or []
    if NODEPORT_ADDRESSES_PRIMARY in addresses:
        check(
            addresses == [NODEPORT_ADDRESSES_PRIMARY],
            "nodePortAddresses",
            "can't use both 'primary' and CIDRs",
        )
    else:
        error = _cidrs_error(addresses)
        check(error is None, "nodePortAddresses", str(error))
    hidden = doc["showHiddenMetricsForVersion"]
    check(
        hidden in ("", previous_minor()),
        "showHiddenMetricsForVersion",
        f"{hidden!r}: must be omitted or have the value {previous_minor()!r}; only the previous "
        "minor version is allowed",
    )
    local_mode = doc["detectLocalMode"]
    check(
        local_mode in ("", *LOCAL_MODES),
        "detectLocalMode",
        f"{local_mode!r} is not one of {', '.join(LOCAL_MODES)}",
    )
    detect = doc["detectLocal"]
    if local_mode == "BridgeInterface":
        check(bool(detect["bridgeInterface"]), "detectLocal.bridgeInterface", "must not be empty")
    if local_mode == "InterfaceNamePrefix":
        check(
            bool(detect["interfaceNamePrefix"]),
            "detectLocal.interfaceNamePrefix",
            "must not be empty",
        )
    if local_mode == "ClusterCIDR" and doc["clusterCIDR"]:
        error = _cluster_cidr_error(doc["clusterCIDR"].split(","))
        check(error is None, "clusterCIDR", f"{doc['clusterCIDR']!r} {error}")
    logging = doc["logging"]
    check(
        logging["format"] in LOG_FORMATS,
        "logging.format",
        f"{logging['format']!r} is not one of {', '.join(LOG_FORMATS)}",
    )
    return problems


def _cluster_cidr_error(values: list[str]) -> str | None:
    """upstream's validateDualStackCIDRStrings: one CIDR or a pair of different families."""
    if len(values) > 2:
        return "must be a single CIDR or a dual-stack pair of CIDRs"
    try:
        cidrs = [parse_cidr(v) for v in values]
    except ValueError as err:
        return f"{str(err)!r} must be a valid CIDR block"
    if len(cidrs) == 2 and cidrs[0].version == cidrs[1].version:
        return "must be a single CIDR or a dual-stack pair of CIDRs"
    return None


# --- writing ------------------------------------------------------------------------------


def _wire(spec: Field, value: Any) -> Any:
    """A field's value as upstream serialises it (durations as Go strings)."""
    if spec.kind == "duration" and value is not None:
        return format_duration(value)
    if spec.kind == "flush":
        return format_duration(value)
    return copy.deepcopy(value)


def _to_wire(doc: Mapping[str, Any], schema: Schema) -> Doc:
    return {
        key: _to_wire(doc[key], spec) if isinstance(spec, Mapping) else _wire(spec, doc[key])
        for key, spec in schema.items()
    }


# Fields upstream marks omitempty that are left out when empty.
_OMIT_EMPTY = ("featureGates", "windowsRunAsService", "logging.vmodule",
               "logging.options.text.splitStream", "logging.options.json.splitStream")  # fmt: skip


def wire(doc: Doc) -> Doc:
    """The document as upstream serialises a v1alpha1 object (omitempty fields left out)."""
    out = _to_wire(doc, SCHEMA)
    for dotted in _OMIT_EMPTY:
        *parents, last = dotted.split(".")
        parent = get(out, ".".join(parents)) if parents else out
        if not parent[last]:
            del parent[last]
    return out


def to_yaml(doc: Doc) -> str:
    """What ``--write-config-to`` writes: every field, keys sorted, as upstream's encoder."""
    return yaml.safe_dump(wire(doc), sort_keys=True, default_flow_style=False, allow_unicode=True)


def internal(doc: Doc) -> Doc:
    """The internal configuration, in the field names upstream's /configz shows.

    upstream's conversion (pkg/proxy/apis/config/v1alpha1/conversion.go) keeps one sync
    period pair (the mode's), moves conntrack, masqueradeAll and oomScoreAdj under Linux
    and splits clusterCIDR into DetectLocal.ClusterCIDRs; the internal type's fields have
    no JSON names, so they appear as Go names.
    """
    w = wire(doc)
    section = {"ipvs": "ipvs", "nftables": "nftables"}.get(doc["mode"], "iptables")
    conntrack = w["conntrack"]
    client = w["clientConnection"]
    winkernel = w["winkernel"]
    return {
        "Linux": {
            "Conntrack": {
                "MaxPerCore": conntrack["maxPerCore"],
                "Min": conntrack["min"],
                "TCPEstablishedTimeout": conntrack["tcpEstablishedTimeout"],
                "TCPCloseWaitTimeout": conntrack["tcpCloseWaitTimeout"],
                "TCPBeLiberal": conntrack["tcpBeLiberal"],
                "UDPTimeout": conntrack["udpTimeout"],
                "UDPStreamTimeout": conntrack["udpStreamTimeout"],
            },
            "MasqueradeAll": w["nftables" if section == "nftables" else "iptables"][
                "masqueradeAll"
            ],
            "OOMScoreAdj": w["oomScoreAdj"],
        },
        "Windows": {"RunAsService": doc["windowsRunAsService"]},
        "FeatureGates": doc["featureGates"] or {},
        "ClientConnection": {
            "Kubeconfig": client["kubeconfig"],
            "AcceptContentTypes": client["acceptContentTypes"],
            "ContentType": client["contentType"],
            "QPS": client["qps"],
            "Burst": client["burst"],
        },
        "Logging": w["logging"],
        "HostnameOverride": w["hostnameOverride"],
        "BindAddress": w["bindAddress"],
        "HealthzBindAddress": w["healthzBindAddress"],
        "MetricsBindAddress": w["metricsBindAddress"],
        "BindAddressHardFail": w["bindAddressHardFail"],
        "EnableProfiling": w["enableProfiling"],
        "ShowHiddenMetricsForVersion": w["showHiddenMetricsForVersion"],
        "Mode": w["mode"],
        "IPTables": {
            "MasqueradeBit": w["iptables"]["masqueradeBit"],
            "LocalhostNodePorts": w["iptables"]["localhostNodePorts"],
        },
        "IPVS": {
            "Scheduler": w["ipvs"]["scheduler"],
            "ExcludeCIDRs": w["ipvs"]["excludeCIDRs"],
            "StrictARP": w["ipvs"]["strictARP"],
            "TCPTimeout": w["ipvs"]["tcpTimeout"],
            "TCPFinTimeout": w["ipvs"]["tcpFinTimeout"],
            "UDPTimeout": w["ipvs"]["udpTimeout"],
        },
        "Winkernel": {
            "NetworkName": winkernel["networkName"],
            "SourceVip": winkernel["sourceVip"],
            "EnableDSR": winkernel["enableDSR"],
            "RootHnsEndpointName": winkernel["rootHnsEndpointName"],
            "ForwardHealthCheckVip": winkernel["forwardHealthCheckVip"],
        },
        "NFTables": {"MasqueradeBit": w["nftables"]["masqueradeBit"]},
        "DetectLocalMode": w["detectLocalMode"],
        "DetectLocal": {
            "BridgeInterface": w["detectLocal"]["bridgeInterface"],
            "ClusterCIDRs": w["clusterCIDR"].split(",") if w["clusterCIDR"] else None,
            "InterfaceNamePrefix": w["detectLocal"]["interfaceNamePrefix"],
        },
        "NodePortAddresses": w["nodePortAddresses"],
        "SyncPeriod": w[section]["syncPeriod"],
        "MinSyncPeriod": w[section]["minSyncPeriod"],
        "ConfigSyncPeriod": w["configSyncPeriod"],
    }
