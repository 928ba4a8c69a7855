"""Flags and KubeProxyConfiguration: decoding, defaulting, precedence and validation, as upstream.

The kubeadm and kind ConfigMaps (tests/upstream_configmaps.py) are loaded unchanged.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml
from upstream_configmaps import CONFIG_CONFS

from pykubeproxy import kubeproxyconfig as kpc
from pykubeproxy.config import ConfigError, ProxyConfig, load, parse_duration, requested_version
from pykubeproxy.startup import unimplemented


def write(tmp_path: Path, text: str) -> str:
    path = tmp_path / "config.conf"
    path.write_text(text)
    return str(path)


def from_file(tmp_path: Path, text: str, *flags: str) -> ProxyConfig:
    return load(["--config", write(tmp_path, text), *flags])


HEADER = "apiVersion: kubeproxy.config.k8s.io/v1alpha1\nkind: KubeProxyConfiguration\n"


# --- durations


@pytest.mark.parametrize(
    ("text", "seconds"),
    [("500ms", 0.5), ("1s", 1), ("30s", 30), ("1m", 60), ("1m30s", 90), ("1h", 3600), ("0", 0),
     ("-1s", -1), ("1.5h", 5400), ("300µs", 0.0003), ("+2s", 2)],
)  # fmt: skip
def test_go_durations(text: str, seconds: float) -> None:
    assert parse_duration(text) == pytest.approx(seconds)


@pytest.mark.parametrize("text", ["", "30", "1x", "s", "1m 30s", "--1s"])
def test_bad_durations(text: str) -> None:
    with pytest.raises(ConfigError, match="invalid duration"):
        parse_duration(text)


@pytest.mark.parametrize(
    ("seconds", "text"),
    [(0, "0s"), (30, "30s"), (60, "1m0s"), (90, "1m30s"), (900, "15m0s"), (3600, "1h0m0s"),
     (86400, "24h0m0s"), (1.5, "1.5s"), (0.25, "250ms"), (0.0015, "1.5ms"), (-1, "-1s")],
)  # fmt: skip
def test_durations_print_as_go_prints_them(seconds: float, text: str) -> None:
    """Go's time.Duration.String(), the form upstream writes durations in."""
    assert kpc.format_duration(seconds) == text


# --- defaults


def test_defaults_are_upstreams() -> None:
    """SetDefaults_KubeProxyConfiguration, then the Linux platform defaults."""
    cfg = load([])
    doc = cfg.document
    assert (cfg.mode, cfg.detect_local_mode) == ("iptables", "ClusterCIDR")
    assert cfg.bind_address == "0.0.0.0"
    assert (cfg.metrics_bind_address, cfg.healthz_bind_address) == (
        "127.0.0.1:10249",
        "0.0.0.0:10256",
    )
    assert cfg.sync_periods() == (30.0, 1.0)
    assert (cfg.ipvs_sync_period, cfg.ipvs_min_sync_period) == (30.0, 0.0)
    assert (cfg.masquerade_bit, cfg.masquerade_all, cfg.localhost_nodeports) == (14, False, True)
    assert cfg.oom_score_adj == -999 and doc["configSyncPeriod"] == 900.0
    assert doc["conntrack"] == {
        "maxPerCore": 32768,
        "min": 131072,
        "tcpEstablishedTimeout": 86400.0,
        "tcpCloseWaitTimeout": 3600.0,
        "tcpBeLiberal": False,
        "udpTimeout": 0.0,
        "udpStreamTimeout": 0.0,
    }
    assert doc["clientConnection"] == {
        "kubeconfig": "",
        "acceptContentTypes": "",
        "contentType": "application/vnd.kubernetes.protobuf",
        "qps": 5.0,
        "burst": 10,
    }
    assert (doc["logging"]["format"], doc["logging"]["flushFrequency"]) == ("text", 5.0)
    assert doc["featureGates"] == {} and not cfg.cleanup and not cfg.notices


def test_an_ipv6_bind_address_moves_the_default_servers(tmp_path: Path) -> None:
    cfg = from_file(tmp_path, HEADER + "bindAddress: fd00::1\n")
    assert (cfg.healthz_bind_address, cfg.metrics_bind_address) == ("[::]:10256", "[::1]:10249")
    # Flags apply to the defaulted settings, so upstream keeps the IPv4 servers there.
    cfg = load(["--bind-address", "fd00::1"])
    assert (cfg.healthz_bind_address, cfg.metrics_bind_address) == (
        "0.0.0.0:10256",
        "127.0.0.1:10249",
    )


# --- kubeadm's and kind's ConfigMaps, unchanged


@pytest.mark.parametrize(("tool", "mode"), sorted(CONFIG_CONFS))
def test_generated_configmaps_load_unchanged(tmp_path: Path, tool: str, mode: str) -> None:
    cfg = from_file(tmp_path, CONFIG_CONFS[tool, mode])
    assert cfg.mode == mode and not cfg.notices
    assert cfg.kubeconfig == "/var/lib/kube-proxy/kubeconfig.conf"
    # kubeadm writes zeros; upstream's defaulting turns them into these.
    assert (cfg.metrics_bind_address, cfg.healthz_bind_address) == (
        "127.0.0.1:10249",
        "0.0.0.0:10256",
    )
    assert cfg.sync_periods() == ((30.0, 1.0) if mode == "iptables" else (30.0, 0.0))
    assert cfg.masquerade_bit == 14 and cfg.localhost_nodeports and cfg.oom_score_adj == -999
    assert cfg.conntrack.min == 131072 and cfg.conntrack.tcp_established_timeout == 86400
    if tool == "kind":
        assert cfg.cluster_cidr == "10.244.0.0/16" and cfg.conntrack.max_per_core == 0
        assert cfg.min_sync_period == 1.0
    else:
        assert cfg.cluster_cidr == "" and cfg.conntrack.max_per_core == 32768
    assert unimplemented(cfg) == []


def test_written_config_loads_back_the_same(tmp_path: Path) -> None:
    """--write-config-to's output is a complete config that loads to the same settings."""
    cfg = load(["--write-config-to", "/unused", "--proxy-mode", "ipvs", "--cluster-cidr",
                "10.0.0.0/8", "--conntrack-max-per-core", "0",
                "--feature-gates", "A=true"])  # fmt: skip
    text = kpc.to_yaml(cfg.document)
    written = yaml.safe_load(text)
    assert list(written) == sorted(written)  # every key, sorted, as upstream's encoder
    assert written["ipvs"]["syncPeriod"] == "30s" and written["configSyncPeriod"] == "15m0s"
    assert written["featureGates"] == {"A": True} and "windowsRunAsService" not in written
    again = from_file(tmp_path, text)
    assert again.document == cfg.document


def test_configz_is_the_internal_configuration() -> None:
    """Upstream's /configz shows the internal type: Go field names, the mode's sync period."""
    internal = kpc.internal(load(["--proxy-mode", "ipvs", "--cluster-cidr", "10.0.0.0/8,fd00::/64",
                                  "--ipvs-sync-period", "10s"]).document)  # fmt: skip
    assert internal["Mode"] == "ipvs"
    assert (internal["SyncPeriod"], internal["MinSyncPeriod"]) == ("10s", "0s")
    assert internal["DetectLocal"]["ClusterCIDRs"] == ["10.0.0.0/8", "fd00::/64"]
    assert internal["Linux"]["Conntrack"]["MaxPerCore"] == 32768
    assert internal["Linux"]["OOMScoreAdj"] == -999
    assert internal["ClientConnection"]["QPS"] == 5.0


# --- precedence


def test_flags_without_a_config_file() -> None:
    cfg = load([
        "--proxy-mode", "iptables", "--kubeconfig", "/k", "--master", "http://x:1",
        "--hostname-override", "N1", "--cluster-cidr", "10.244.0.0/16", "--masquerade-all",
        "--iptables-masquerade-bit", "3", "--iptables-sync-period", "10s",
        "--iptables-min-sync-period", "100ms", "--nodeport-addresses", "198.18.0.0/24",
        "--nodeport-addresses", "10.0.0.0/8,192.0.2.0/24", "--metrics-bind-address", "0.0.0.0",
        "--healthz-bind-address", "127.0.0.1:1", "-v", "4", "--cleanup",
        "--conntrack-max-per-core=0", "--conntrack-tcp-be-liberal", "--oom-score-adj", "-500",
        "--kube-api-qps", "20", "--kube-api-burst", "40", "--logging-format", "json",
    ])  # fmt: skip
    assert cfg.masquerade_all and cfg.cleanup and cfg.masquerade_bit == 3
    assert cfg.hostname_override == "n1" and cfg.master == "http://x:1"
    assert (cfg.sync_period, cfg.min_sync_period, cfg.verbosity) == (10, 0.1, 4)
    assert cfg.nodeport_addresses == ["198.18.0.0/24", "10.0.0.0/8", "192.0.2.0/24"]
    assert cfg.metrics_bind_address == "0.0.0.0:10249"  # a bare IP gets the default port
    assert cfg.healthz_bind_address == "127.0.0.1:1"
    assert cfg.conntrack.max_per_core == 0 and cfg.conntrack.tcp_be_liberal
    assert cfg.oom_score_adj == -500 and cfg.logging_format == "json"
    assert (cfg.get("clientConnection.qps"), cfg.get("clientConnection.burst")) == (20.0, 40)


def test_empty_bind_addresses_turn_the_servers_off() -> None:
    cfg = load(["--metrics-bind-address", "", "--healthz-bind-address", ""])
    assert (cfg.metrics_bind_address, cfg.healthz_bind_address) == ("", "")
    # The deprecated ports: 0 turns a server off; a port completes a bare-IP address only.
    cfg = load(["--metrics-port", "0", "--healthz-port", "9999"])
    assert (cfg.metrics_bind_address, cfg.healthz_bind_address) == ("", "0.0.0.0:10256")
    cfg = load(["--healthz-bind-address", "0.0.0.0", "--healthz-port", "9999"])
    assert cfg.healthz_bind_address == "0.0.0.0:9999"
    assert any("--healthz-port has been deprecated" in n for n in cfg.notices)


def test_with_config_the_file_wins_and_ignored_flags_are_named(tmp_path: Path) -> None:
    """Upstream: flags mapping to the configuration are ignored with --config; the hostname
    override, --master and the logging flags still apply."""
    text = HEADER + "clusterCIDR: 10.244.0.0/16\nhostnameOverride: from-file\n"
    text += "iptables: {syncPeriod: 1m, minSyncPeriod: 500ms}\nlogging: {verbosity: 2}\n"
    cfg = from_file(tmp_path, text, "--cluster-cidr", "10.0.0.0/8", "--iptables-sync-period",
                    "5s", "--master", "https://api:6443", "-v", "5",
                    "--metrics-port", "1")  # fmt: skip
    assert cfg.cluster_cidr == "10.244.0.0/16" and cfg.sync_periods() == (60, 0.5)
    assert cfg.master == "https://api:6443" and cfg.verbosity == 5
    assert cfg.hostname_override == "from-file"
    assert cfg.metrics_bind_address == "127.0.0.1:10249"
    [ignored] = [n for n in cfg.notices if n.startswith("flags ignored")]
    assert ignored.endswith("--cluster-cidr, --iptables-sync-period, --metrics-port")
    assert from_file(tmp_path, text, "--hostname-override", "Node-B").hostname_override == "node-b"


def test_hostname_override_of_spaces_is_an_error() -> None:
    with pytest.raises(ConfigError, match="--hostname-override is blank"):
        load(["--hostname-override", "  "])
    assert load(["--hostname-override", ""]).hostname_override == ""  # unset, as upstream


def test_feature_gates_merge_and_are_reported_as_unimplemented() -> None:
    cfg = load(["--feature-gates", "A=true,B=false", "--feature-gates", "C=true"])
    assert cfg.get("featureGates") == {"A": True, "B": False, "C": True}
    assert unimplemented(cfg) == ["featureGates.A=true", "featureGates.B=false",
                                  "featureGates.C=true"]  # fmt: skip
    assert "enableProfiling=true (/debug/pprof)" in unimplemented(load(["--profiling"]))
    with pytest.raises(ConfigError, match="feature-gates"):
        load(["--feature-gates", "A=maybe"])


def test_version_is_answered_before_anything_else() -> None:
    assert requested_version(["--config", "/nonexistent", "--version"]) == "true"
    assert requested_version(["--version=raw"]) == "raw"
    assert requested_version(["--version=false"]) is None and requested_version([]) is None


# --- lenient decoding and errors


def test_unknown_and_duplicate_fields_are_dropped_with_one_notice(tmp_path: Path) -> None:
    """Strict decoding fails, lenient decoding takes the file: upstream logs and goes on."""
    text = HEADER + "udpIdleTimeout: 250ms\nmode: ipvs\nmode: iptables\niptables: {bogus: 1}\n"
    cfg = from_file(tmp_path, text)
    assert cfg.mode == "iptables"
    [notice] = cfg.notices
    assert "lenient decoding" in notice and "'udpIdleTimeout'" in notice
    assert "'iptables.bogus'" in notice and "duplicate field 'mode'" in notice


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("kind: KubeProxyConfiguration\n", "expected apiVersion"),
        (HEADER + "iptables: {masqueradeBit: three}\n", "masqueradeBit: 'three' is not a 32-bit"),
        (HEADER + "iptables: {masqueradeBit: true}\n", "is not a 32-bit integer"),
        (HEADER + "iptables: {syncPeriod: 30}\n", "is not a duration string"),
        (HEADER + "iptables: {syncPeriod: soon}\n", "invalid duration"),
        (HEADER + "iptables: [1]\n", "iptables: \\[1\\] is not an object"),
        (HEADER + "featureGates: {A: yes please}\n", "true or false"),
        (HEADER + "nodePortAddresses: 10.0.0.0/8\n", "is not a list of strings"),
        (HEADER + "clusterCIDR: [a: b\n", "config.conf"),
        ("- not a mapping\n", "not a KubeProxyConfiguration"),
    ],
)
def test_bad_config_files(tmp_path: Path, text: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message) as err:
        from_file(tmp_path, text)
    assert "\n" not in str(err.value)


def test_missing_config_file() -> None:
    with pytest.raises(ConfigError, match="--config /nonexistent"):
        load(["--config", "/nonexistent"])


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--proxy-mode", "userspace"], "'userspace' is not a proxy mode; this build has: ipt"),
        (["--proxy-mode", "nftables"], "'nftables' is not implemented by pykubeproxy; this bui"),
        (["--iptables-masquerade-bit", "32"], r"\[0, 31\]"),
        (["--iptables-sync-period", "soon"], "invalid duration"),
        (["--iptables-sync-period", "0s"], "iptables.syncPeriod: must be greater than 0"),
        (["--iptables-min-sync-period", "1m"], "must be greater than or equal to iptables.min"),
        (["--proxy-mode", "ipvs", "--ipvs-sync-period", "0s"], "ipvs.syncPeriod: must be"),
        (["--proxy-mode", "ipvs", "--ipvs-tcp-timeout", "-1s"], "ipvs.tcpTimeout"),
        (["--proxy-mode", "ipvs", "--ipvs-exclude-cidrs", "nope"], "must be a valid CIDR"),
        (["--cluster-cidr", "10.244.0.0/33"], "must be a valid CIDR block"),
        (["--cluster-cidr", "10.0.0.0/8,10.1.0.0/16"], "dual-stack pair"),
        (["--nodeport-addresses", "nope"], "'nope' must be a valid CIDR"),
        (["--nodeport-addresses", "primary,10.0.0.0/8"], "can't use both 'primary' and CIDRs"),
        (["--metrics-bind-address", "localhost"], "valid IP or IP:port"),
        (["--healthz-bind-address", "0.0.0.0:70000"], "valid IP or IP:port"),
        (["--bind-address", "node-a"], "not a valid IP address"),
        (["--detect-local-mode", "Magic"], "detectLocalMode: 'Magic' is not one of"),
        (["--detect-local-mode", "BridgeInterface"], "bridgeInterface: must not be empty"),
        (["--oom-score-adj", "-1001"], r"oomScoreAdj: -1001 is not in \[-1000, 1000\]"),
        (["--conntrack-min", "-1"], "conntrack.min: must be greater than or equal to 0"),
        (["--config-sync-period", "0s"], "configSyncPeriod: must be greater than 0"),
        (["--kube-api-burst", "-1"], "clientConnection.burst: must not be negative"),
        (["--show-hidden-metrics-for-version", "1.20"], "have the value '1.33'"),
        (["--logging-format", "xml"], "logging.format: 'xml' is not one of text, json"),
        (["--proxy-port-range", "9-1"], "must be a valid port range"),
        (["--masquerade-all=maybe"], "is not a boolean"),
        (["--no-such-flag"], "unrecognized"),
    ],
)
def test_bad_flags_stop_with_one_line(argv: list[str], message: str) -> None:
    with pytest.raises(ConfigError, match=message) as err:
        load(argv)
    assert "\n" not in str(err.value)


def test_every_problem_is_named_in_the_one_line() -> None:
    with pytest.raises(ConfigError) as err:
        load(["--iptables-masquerade-bit", "40", "--oom-score-adj", "2000"])
    assert "iptables.masqueradeBit" in str(err.value) and "oomScoreAdj" in str(err.value)


def test_accepted_values() -> None:
    """Values upstream's validation takes that are easy to get wrong."""
    accepted: list[list[str]] = [
        ["--nodeport-addresses", "primary"],
        ["--cluster-cidr", "10.244.0.0/16,fd00:10:244::/56"],
        ["--show-hidden-metrics-for-version", "1.33"],
        ["--detect-local-mode", "InterfaceNamePrefix", "--pod-interface-name-prefix", "veth"],
        ["--proxy-port-range", "30000-32767"],
        ["--bind-address", "010.000.000.001"],  # leading zeros, read as upstream's parser does
        ["--masquerade-all=false", "--ipvs-strict-arp=true"],
        ["--v=3", "--vmodule", "proxier=4"],
    ]
    for argv in accepted:
        load(argv)


def test_ipvs_settings(tmp_path: Path) -> None:
    cfg = load(["--proxy-mode", "ipvs", "--ipvs-scheduler", "wrr", "--ipvs-strict-arp",
                "--ipvs-exclude-cidrs", "192.0.2.0/24,198.51.100.0/24",
                "--ipvs-min-sync-period", "2s", "--ipvs-tcp-timeout", "15m",
                "--ipvs-udp-timeout", "300s"])  # fmt: skip
    assert cfg.sync_periods() == (30.0, 2.0)
    assert cfg.ipvs_scheduler == "wrr" and cfg.ipvs_strict_arp
    assert [str(c) for c in cfg.exclude_cidrs()] == ["192.0.2.0/24", "198.51.100.0/24"]
    assert cfg.ipvs_timeouts == (900.0, 0.0, 300.0)
    text = HEADER + "mode: ipvs\nipvs: {syncPeriod: 10s, scheduler: lc, tcpFinTimeout: 2m}\n"
    cfg = from_file(tmp_path, text)
    assert (cfg.mode, cfg.sync_periods(), cfg.ipvs_scheduler) == ("ipvs", (10.0, 0.0), "lc")
    assert cfg.ipvs_timeouts == (0.0, 120.0, 0.0)


def test_unimplemented_logging_and_content_types_are_named() -> None:
    cfg = load(["--vmodule", "a=1", "--log-json-split-stream", "--kube-api-content-type",
                "application/yaml"])  # fmt: skip
    found = unimplemented(cfg)
    assert "logging.vmodule" in found and "logging.options.json.splitStream=true" in found
    assert "clientConnection.contentType=application/yaml (requests are JSON)" in found


def doc_of(**values: Any) -> kpc.Doc:
    doc = kpc.defaults()
    for dotted, value in values.items():
        kpc.put(doc, dotted.replace("__", "."), value)
    return doc


def test_defaulting_keeps_what_is_set() -> None:
    """Only empty and zero values are defaulted (a set value, or 0 for a pointer, stays)."""
    doc = kpc.empty()
    doc["conntrack"]["maxPerCore"] = 0
    doc["iptables"]["masqueradeBit"] = 0
    doc["metricsBindAddress"] = "0.0.0.0"
    kpc.set_defaults(doc)
    assert doc["conntrack"]["maxPerCore"] == 0 and doc["iptables"]["masqueradeBit"] == 0
    assert doc["metricsBindAddress"] == "0.0.0.0:10249"
    assert kpc.validate(doc_of(mode="iptables")) == []
