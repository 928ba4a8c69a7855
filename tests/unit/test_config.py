"""Flags and KubeProxyConfiguration: names, defaults, precedence and clear errors."""

from __future__ import annotations

from pathlib import Path

import pytest

from pykubeproxy.config import ConfigError, load, parse_duration

CONFIG = """\
apiVersion: kubeproxy.config.k8s.io/v1alpha1
kind: KubeProxyConfiguration
mode: iptables
clusterCIDR: 10.244.0.0/16
hostnameOverride: node-a
clientConnection:
  kubeconfig: /etc/kube/config
  qps: 5
iptables:
  masqueradeAll: true
  masqueradeBit: 15
  syncPeriod: 1m
  minSyncPeriod: 500ms
nodePortAddresses: [198.18.0.0/24]
metricsBindAddress: 0.0.0.0:10249
conntrack: {maxPerCore: 32768}
"""


@pytest.mark.parametrize(
    ("text", "seconds"),
    [("500ms", 0.5), ("1s", 1), ("30s", 30), ("1m", 60), ("1m30s", 90), ("1h", 3600), ("0", 0)],
)
def test_go_durations(text: str, seconds: float) -> None:
    assert parse_duration(text) == pytest.approx(seconds)


@pytest.mark.parametrize("text", ["", "30", "1x", "s", "1m 30s", "-1s"])
def test_bad_durations(text: str) -> None:
    with pytest.raises(ConfigError, match="invalid duration"):
        parse_duration(text)


def test_defaults_are_kube_proxys() -> None:
    cfg = load([])
    assert (cfg.mode, cfg.masquerade_bit, cfg.sync_period, cfg.min_sync_period) == (
        "iptables",
        14,
        30.0,
        1.0,
    )
    assert (cfg.metrics_bind_address, cfg.healthz_bind_address) == (
        "127.0.0.1:10249",
        "0.0.0.0:10256",
    )
    assert not cfg.masquerade_all and cfg.localhost_nodeports and not cfg.cleanup


def test_flags() -> None:
    cfg = load(
        [
            "--proxy-mode",
            "iptables",
            "--kubeconfig",
            "/k",
            "--master",
            "http://x:1",
            "--hostname-override",
            "n1",
            "--cluster-cidr",
            "10.244.0.0/16",
            "--masquerade-all",
            "--iptables-masquerade-bit",
            "3",
            "--iptables-sync-period",
            "10s",
            "--iptables-min-sync-period",
            "100ms",
            "--nodeport-addresses",
            "198.18.0.0/24",
            "--metrics-bind-address",
            ":9999",
            "--healthz-bind-address",
            "127.0.0.1:1",
            "-v",
            "4",
            "--cleanup",
        ]
    )
    assert cfg.masquerade_all and cfg.cleanup and cfg.masquerade_bit == 3
    assert (cfg.sync_period, cfg.min_sync_period, cfg.verbosity) == (10, 0.1, 4)
    assert cfg.nodeport_addresses == ["198.18.0.0/24"]


def test_config_file_then_flags_override(tmp_path: Path) -> None:
    path = tmp_path / "config.yaml"
    path.write_text(CONFIG)
    cfg = load(["--config", str(path)])
    assert cfg.kubeconfig == "/etc/kube/config" and cfg.hostname_override == "node-a"
    assert cfg.masquerade_all and cfg.masquerade_bit == 15
    assert (cfg.sync_period, cfg.min_sync_period) == (60, 0.5)
    assert cfg.nodeport_addresses == ["198.18.0.0/24"]
    cfg = load(["--config", str(path), "--iptables-sync-period", "5s", "--masquerade-all=false"])
    assert cfg.sync_period == 5 and not cfg.masquerade_all


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--proxy-mode", "userspace"], "invalid choice"),
        (["--iptables-masquerade-bit", "32"], "0-31"),
        (["--iptables-sync-period", "soon"], "invalid duration"),
        (["--iptables-min-sync-period", "1m"], "must not exceed"),
        (["--cluster-cidr", "10.244.0.0/33"], "not a CIDR"),
        (["--nodeport-addresses", "nope"], "not a CIDR"),
        (["--metrics-bind-address", "localhost"], "host:port"),
        (["--healthz-bind-address", "0.0.0.0:70000"], "host:port"),
        (["--no-such-flag"], "unrecognized"),
    ],
)
def test_bad_flags_stop_with_one_line(argv: list[str], message: str) -> None:
    with pytest.raises(ConfigError, match=message) as err:
        load(argv)
    assert "\n" not in str(err.value)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("kind: KubeProxyConfiguration\n", "expected apiVersion"),
        (
            "apiVersion: kubeproxy.config.k8s.io/v1alpha1\nkind: KubeProxyConfiguration\n"
            "iptables: {masqueradeBitt: 3}\n",
            "unknown field 'iptables.masqueradeBitt'",
        ),
        (
            "apiVersion: kubeproxy.config.k8s.io/v1alpha1\nkind: KubeProxyConfiguration\n"
            "iptables: {masqueradeBit: three}\n",
            "is not a int",
        ),
        (
            "apiVersion: kubeproxy.config.k8s.io/v1alpha1\nkind: KubeProxyConfiguration\n"
            "iptables: {syncPeriod: 30}\n",
            "invalid duration",
        ),
        ("- not a mapping\n", "not a KubeProxyConfiguration"),
    ],
)
def test_bad_config_files(tmp_path: Path, text: str, message: str) -> None:
    path = tmp_path / "config.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=message):
        load(["--config", str(path)])


def test_missing_config_file() -> None:
    with pytest.raises(ConfigError, match="--config /nonexistent"):
        load(["--config", "/nonexistent"])


def test_ipvs_flags_and_file_fields(tmp_path: Path) -> None:
    cfg = load(["--proxy-mode", "ipvs", "--ipvs-scheduler", "wrr", "--ipvs-strict-arp",
                "--ipvs-exclude-cidrs", "192.0.2.0/24,198.51.100.0/24",
                "--ipvs-min-sync-period", "2s"])  # fmt: skip
    assert cfg.sync_periods() == (30.0, 2.0)
    assert cfg.ipvs_scheduler == "wrr" and cfg.ipvs_strict_arp
    assert [str(c) for c in cfg.exclude_cidrs()] == ["192.0.2.0/24", "198.51.100.0/24"]
    assert load([]).sync_periods() == (30.0, 1.0)
    path = tmp_path / "config.yaml"
    path.write_text(
        "apiVersion: kubeproxy.config.k8s.io/v1alpha1\nkind: KubeProxyConfiguration\n"
        "mode: ipvs\nipvs: {syncPeriod: 10s, minSyncPeriod: 0s, scheduler: lc,\n"
        "  strictARP: true, excludeCIDRs: [10.0.0.0/8], tcpTimeout: 0s}\n"
    )
    cfg = load(["--config", str(path)])
    assert (cfg.mode, cfg.sync_periods(), cfg.ipvs_scheduler) == ("ipvs", (10.0, 0.0), "lc")
    with pytest.raises(ConfigError, match="--ipvs-sync-period must be greater than 0"):
        load(["--proxy-mode", "ipvs", "--ipvs-sync-period", "0s"])
    with pytest.raises(ConfigError, match="--ipvs-exclude-cidrs"):
        load(["--ipvs-exclude-cidrs", "nope"])
