"""The agent as a drop-in for kube-proxy, in the node namespace against the API double.

kubeadm's and kind's generated kube-proxy ConfigMaps (tests/upstream_configmaps.py) are given
to the agent unchanged, mounted where kubeadm's DaemonSet mounts them, with the command line
kubeadm gives kube-proxy (tests/kube_proxy_node.py); the API double serves HTTPS and wants the
service account's token, which kubeconfig.conf names. The host-wide conntrack settings are
files of the test; the per-namespace conntrack timeouts are the node namespace's own.

IPVS mode needs ip_vs, which this host's kernel may lack: the IPVS ConfigMaps run the same way
inside the VM (tests/ipvs/test_dropin_ipvs.py, booted by tests/test_ipvs_vm.py).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from kube_proxy_node import (
    ConfigMapMounts,
    check_generated_configmap,
    host_sysctls,
    node_sysctl,
    scraped_families,
    start_with_configmap,
    web_lab,
)

from pykubeproxy.sandbox.lab import Lab

pytestmark = [
    pytest.mark.e2e,
    pytest.mark.skipif(
        os.geteuid() != 0 or shutil.which("unshare") is None, reason="needs root and unshare"
    ),
]


@pytest.fixture
def lab() -> Iterator[Lab]:
    with web_lab() as lab:
        yield lab


def start(lab: Lab, tmp_path: Path, tool: str) -> ConfigMapMounts:
    """The agent with `tool`'s iptables-mode ConfigMap, once the web Service's rules are in."""

    def programmed() -> bool:
        return "default/web:p cluster IP" in lab.nat_rules()

    return start_with_configmap(lab, tmp_path, tool, "iptables", programmed)


@pytest.mark.parametrize("tool", ["kubeadm", "kind"])
def test_generated_configmap_runs_unchanged(lab: Lab, tmp_path: Path, tool: str) -> None:
    before = host_sysctls()
    mounted = start(lab, tmp_path, tool)
    check_generated_configmap(lab, mounted, tool, "iptables", before)
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
    seen = scraped_families(lab, "iptables")
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
