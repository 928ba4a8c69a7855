"""The agent as a drop-in for kube-proxy, in the node namespace against the API double.

kubeadm's and kind's generated kube-proxy ConfigMaps (tests/upstream_configmaps.py) are given
to the agent unchanged, mounted where kubeadm's DaemonSet mounts them, with the command line
kubeadm gives kube-proxy (tests/kube_proxy_node.py); the API double serves HTTPS and wants the
service account's token, which kubeconfig.conf names. The host-wide conntrack settings are
files of the test; the per-namespace conntrack timeouts are the node namespace's own.

IPVS mode needs ip_vs, which this host's kernel lacks: the IPVS ConfigMaps are loaded by the
unit tests (tests/unit/test_config.py).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from kube_proxy_node import CONFIG_FLAG, HASHSIZE, NETFILTER, TOKEN, ConfigMapMounts
from prometheus_client.parser import text_string_to_metric_families
from upstream_configmaps import CONFIG_CONFS
from upstream_metrics import expected

from pykubeproxy.sandbox.lab import Lab, endpoint_slice, service

pytestmark = [
    pytest.mark.e2e,
    pytest.mark.skipif(
        os.geteuid() != 0 or shutil.which("unshare") is None, reason="needs root and unshare"
    ),
]

WEB_IP, NODE_PORT, TARGET = "10.96.0.10", 30080, 8080


@pytest.fixture
def lab() -> Iterator[Lab]:
    with Lab(api_tls=True, api_token=TOKEN) as lab:
        for name in ("web-0", "web-1"):
            lab.cluster.add_pod(name).serve_tcp(TARGET)
        pods = [lab.cluster.pods[name].ip for name in ("web-0", "web-1")]
        lab.server.create("services", service("web", WEB_IP, 80, TARGET, node_port=NODE_PORT))
        lab.server.create("endpointslices", endpoint_slice("web", pods, TARGET))
        yield lab


def host_sysctls() -> dict[str, str]:
    """The root namespace's conntrack settings, to prove they stay as they were."""
    values = {p.name: p.read_text() for p in NETFILTER.glob("nf_conntrack_*") if p.is_file()}
    return {**values, "hashsize": HASHSIZE.read_text()}


def start(lab: Lab, tmp_path: Path, tool: str) -> ConfigMapMounts:
    mounted = ConfigMapMounts(lab, tmp_path, CONFIG_CONFS[tool, "iptables"])
    lab.start_agent(CONFIG_FLAG, kubeconfig=False, wrapper=mounted.wrapper)
    lab.wait_for("the web Service's rules", lambda: "default/web:p cluster IP" in lab.nat_rules())
    lab.wait_for("the end of a sync", lab.synced)
    return mounted


def node_sysctl(lab: Lab, name: str) -> str:
    return str(lab.cluster.node.exec(["cat", str(NETFILTER / name)]).stdout).strip()


def configz(lab: Lab) -> dict[str, Any]:
    status, body = lab.fetch("http://127.0.0.1:10249/configz")
    assert status == 200
    internal: dict[str, Any] = json.loads(body)["kubeproxy.config.k8s.io"]
    return internal


@pytest.mark.parametrize("tool", ["kubeadm", "kind"])
def test_generated_configmap_runs_unchanged(lab: Lab, tmp_path: Path, tool: str) -> None:
    before = host_sysctls()
    mounted = start(lab, tmp_path, tool)
    replies = {lab.cluster.client.tcp_request(lab.cluster.node_ip, NODE_PORT) for _ in range(20)}
    assert replies == {"web-0", "web-1"}

    # kubeadm's zero values took upstream's defaults; kind's values took effect.
    assert lab.fetch("http://127.0.0.1:10249/proxyMode") == (200, "iptables")
    config = configz(lab)
    assert (config["Mode"], config["SyncPeriod"]) == ("iptables", "30s")
    assert config["MinSyncPeriod"] == "1s"  # kind's value; kubeadm's 0s defaulted
    assert config["ClientConnection"]["Kubeconfig"] == "/var/lib/kube-proxy/kubeconfig.conf"
    assert (config["MetricsBindAddress"], config["HealthzBindAddress"]) == (
        "127.0.0.1:10249",
        "0.0.0.0:10256",
    )
    assert config["HostnameOverride"] == "node-1"
    log = lab.agent_log()
    assert "lenient decoding" not in log and "not implement" not in log
    [ignored] = [line for line in log.splitlines() if "flags ignored" in line]
    assert ignored.endswith("--cluster-cidr, --iptables-min-sync-period")

    # The per-namespace timeouts are the node's; the host-wide table size went to the
    # test's file (kubeadm's maxPerCore default) or was left alone (kind's maxPerCore: 0).
    assert node_sysctl(lab, "nf_conntrack_tcp_timeout_established") == "86400"
    assert node_sysctl(lab, "nf_conntrack_tcp_timeout_close_wait") == "3600"
    wanted_max = max(32768 * (os.cpu_count() or 1), 131072)
    host_max = before["nf_conntrack_max"].strip()
    if tool == "kind":
        assert config["DetectLocal"]["ClusterCIDRs"] == ["10.244.0.0/16"]
        assert "! -s 10.244.0.0/16" in lab.nat_rules()  # kind's clusterCIDR detects pods
        assert mounted.conntrack_max.read_text().strip() == host_max
        assert mounted.hashsize.read_text() == "1024\n" and "nf_conntrack_max" not in log
    else:
        assert config["DetectLocal"]["ClusterCIDRs"] is None
        assert mounted.conntrack_max.read_text().strip() == str(wanted_max)
        assert mounted.hashsize.read_text().strip() == str(wanted_max // 4)
    assert host_sysctls() == before

    # The start-up Event, as upstream's birthCry.
    def starting() -> list[dict[str, Any]]:
        return [e for e in lab.server.list("events") if e.get("reason") == "Starting"]

    lab.wait_for("the Starting Event", lambda: bool(starting()))
    [event] = starting()
    assert event["involvedObject"]["name"] == "node-1" and event["action"] == "StartKubeProxy"
    assert lab.stop_agent() == 0


def test_an_updated_config_file_stops_the_agent(lab: Lab, tmp_path: Path) -> None:
    """As kube-proxy: a changed --config file ends the process (kubelet starts it again)."""
    mounted = start(lab, tmp_path, "kind")
    config = mounted.configmap / "config.conf"
    config.write_text(config.read_text().replace("mode: iptables", "mode: ipvs"))
    agent = lab.agent
    assert agent is not None
    assert agent.wait(30) == 1
    assert "configuration file /var/lib/kube-proxy/config.conf changed" in lab.agent_log()
    assert "default/web:p cluster IP" in lab.nat_rules()  # the rules stay for the next agent


def test_metrics_match_upstreams_table(lab: Lab, tmp_path: Path) -> None:
    """A scrape of the running agent: every family of upstream's name space is upstream's,
    with upstream's type, labels and buckets; the ones a sync records are all there."""
    start(lab, tmp_path, "kubeadm")
    assert lab.healthz()[0] == 200 and lab.fetch("http://127.0.0.1:10256/livez")[0] == 200
    status, text = lab.fetch("http://127.0.0.1:10249/metrics")
    assert status == 200
    table = expected("iptables")
    seen = set()
    for family in text_string_to_metric_families(text):
        name = family.name + ("_total" if family.type == "counter" else "")
        if not name.startswith("kubeproxy_") or not family.samples:
            continue
        metric = table[name]
        labels = {k for s in family.samples for k in s.labels} - {"le"}
        assert (family.type, labels) == (metric.type, set(metric.labels)), name
        if metric.buckets is not None:
            les = {float(s.labels["le"]) for s in family.samples if "le" in s.labels}
            assert les == {*metric.buckets, float("inf")}, name
        seen.add(name)
    recorded_by_a_sync = {
        "kubeproxy_sync_proxy_rules_duration_seconds",
        "kubeproxy_sync_full_proxy_rules_duration_seconds",
        "kubeproxy_sync_proxy_rules_last_timestamp_seconds",
        "kubeproxy_sync_proxy_rules_last_queued_timestamp_seconds",
        "kubeproxy_sync_proxy_rules_service_changes_total",
        "kubeproxy_sync_proxy_rules_endpoint_changes_total",
        "kubeproxy_sync_proxy_rules_iptables_total",
        "kubeproxy_sync_proxy_rules_iptables_last",
        "kubeproxy_sync_proxy_rules_no_local_endpoints_total",
        "kubeproxy_proxy_healthz_total",
        "kubeproxy_proxy_livez_total",
    }
    assert recorded_by_a_sync <= seen


def test_flags_alone_never_change_the_hosts_conntrack_settings(lab: Lab) -> None:
    """Upstream's defaults ask for a table size; in the node namespace the kernel refuses
    it, which is one warning, and the node's own timeouts are set."""
    before = host_sysctls()
    lab.start_agent()
    lab.wait_for("the end of a sync", lab.synced)
    assert host_sysctls() == before
    assert node_sysctl(lab, "nf_conntrack_tcp_timeout_close_wait") == "3600"
    wanted_max = max(32768 * (os.cpu_count() or 1), 131072)
    if str(wanted_max) != before["nf_conntrack_max"].strip():
        assert "cannot set net.netfilter.nf_conntrack_max" in lab.agent_log()


def test_init_only_applies_the_start_up_sysctls_and_exits(lab: Lab) -> None:
    before = host_sysctls()
    done = lab.cluster.node.exec(
        [sys.executable, "-m", "pykubeproxy", "--init-only", "--hostname-override", "node-1",
         "--conntrack-max-per-core=0", "--conntrack-tcp-timeout-close-wait=2h",
         "--conntrack-udp-timeout=45s"],
        check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert "--init-only: the start-up sysctls are applied" in str(done.stderr)
    assert node_sysctl(lab, "nf_conntrack_tcp_timeout_close_wait") == "7200"
    assert node_sysctl(lab, "nf_conntrack_udp_timeout") == "45"
    route_localnet = lab.cluster.node.exec(["cat", "/proc/sys/net/ipv4/conf/all/route_localnet"])
    assert str(route_localnet.stdout).strip() == "1"
    assert host_sysctls() == before
    assert "KUBE-SERVICES" not in lab.nat_rules()  # nothing else was done


def test_write_config_to_and_version(tmp_path: Path) -> None:
    """The actions that run without a node: as kube-proxy, they print or write, and exit."""
    out = tmp_path / "written.yaml"
    done = subprocess.run(
        [sys.executable, "-m", "pykubeproxy", "--write-config-to", str(out), "--proxy-mode",
         "ipvs"], capture_output=True, text=True, check=False, timeout=60,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert "mode: ipvs" in out.read_text()
    version = subprocess.run([sys.executable, "-m", "pykubeproxy", "--version"],
                             capture_output=True, text=True, check=True, timeout=60)  # fmt: skip
    assert version.stdout.startswith("pykubeproxy v")
