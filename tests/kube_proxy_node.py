"""The agent in the Lab as kubeadm's kube-proxy DaemonSet runs it: ConfigMap and account.

The agent gets a mount namespace of its own (a wrapper that ends by exec'ing it): the
ConfigMap's config.conf and kubeconfig.conf at /var/lib/kube-proxy (a private /var/lib), the
service account's token and CA under a private /run (/var/run links there), and the host-wide
nf_conntrack_max and conntrack hashsize replaced by files of the test, so that what the agent
decides to write there is seen and the host's values are never touched.

The checks that kubeadm's and kind's generated ConfigMaps work unchanged are here too, for
both proxy modes: tests/e2e/test_dropin.py (iptables) and tests/ipvs/test_dropin_ipvs.py
(IPVS, inside the VM) run them.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from prometheus_client.parser import text_string_to_metric_families
from upstream_configmaps import CONFIG_CONFS, configmap
from upstream_metrics import expected

from pykubeproxy.sandbox.lab import Lab, endpoint_slice, service

TOKEN = "kube-proxy-token"
CONFIG_FLAG = "--config=/var/lib/kube-proxy/config.conf"  # kubeadm's kube-proxy command
NETFILTER = Path("/proc/sys/net/netfilter")
HASHSIZE = Path("/sys/module/nf_conntrack/parameters/hashsize")
WEB_IP, NODE_PORT, TARGET = "10.96.0.10", 30080, 8080
PODS = ("web-0", "web-1")


class ConfigMapMounts:
    """The files the agent's mount namespace shows in place of the host's, and the wrapper
    command (for Lab.start_agent) that mounts them. The Lab must serve TLS with `TOKEN`."""

    def __init__(self, lab: Lab, root: Path, config_conf: str) -> None:
        assert lab.server.ca_cert_path is not None
        account = root / "run" / "secrets" / "kubernetes.io" / "serviceaccount"
        account.mkdir(parents=True)
        (account / "token").write_text(TOKEN)
        (account / "namespace").write_text("kube-system")
        shutil.copy(lab.server.ca_cert_path, account / "ca.crt")
        self.configmap = root / "var-lib" / "kube-proxy"
        self.configmap.mkdir(parents=True)
        for key, text in configmap(config_conf, lab.server.url)["data"].items():
            (self.configmap / key).write_text(text)
        self.conntrack_max = root / "nf_conntrack_max"
        self.conntrack_max.write_text((NETFILTER / "nf_conntrack_max").read_text())
        self.hashsize = root / "hashsize"
        self.hashsize.write_text("1024\n")  # small: a new table size grows it
        mounts = [
            (root / "run", Path("/run")),
            (root / "var-lib", Path("/var/lib")),
            (self.conntrack_max, NETFILTER / "nf_conntrack_max"),
            (self.hashsize, HASHSIZE),
        ]
        script = " && ".join(f'mount --bind "${i}" {target}' for i, (_, target) in
                             enumerate(mounts, 1))  # fmt: skip
        script += f' && shift {len(mounts)} && exec "$@"'
        unshare = ["unshare", "--mount", "--propagation=private", "--"]
        self.wrapper = [*unshare, "sh", "-c", script, "sh", *(str(s) for s, _ in mounts)]


@contextlib.contextmanager
def web_lab() -> Iterator[Lab]:
    """A Lab serving TLS with `TOKEN`, pods ``web-0`` and ``web-1`` behind the Service
    ``web`` (WEB_IP, node port NODE_PORT); no agent yet."""
    with Lab(api_tls=True, api_token=TOKEN) as lab:
        for name in PODS:
            lab.cluster.add_pod(name).serve_tcp(TARGET)
        pods = [lab.cluster.pods[name].ip for name in PODS]
        lab.server.create("services", service("web", WEB_IP, 80, TARGET, node_port=NODE_PORT))
        lab.server.create("endpointslices", endpoint_slice("web", pods, TARGET))
        yield lab


def start_with_configmap(
    lab: Lab,
    root: Path,
    tool: str,
    mode: str,
    programmed: Callable[[], bool],
    timeout: float = 20.0,
) -> ConfigMapMounts:
    """Start the agent as kube-proxy with `tool`'s generated ConfigMap for `mode`, unchanged;
    return once `programmed` (the web Service is in the kernel) and a sync has ended."""
    mounted = ConfigMapMounts(lab, root, CONFIG_CONFS[tool, mode])
    lab.start_agent(CONFIG_FLAG, kubeconfig=False, wrapper=mounted.wrapper)
    lab.wait_for("the web Service in the kernel", programmed, timeout)
    lab.wait_for("the end of a sync", lab.synced, timeout)
    return mounted


def host_sysctls() -> dict[str, str]:
    """The root namespace's conntrack settings, to prove they stay as they were."""
    values = {p.name: p.read_text() for p in NETFILTER.glob("nf_conntrack_*") if p.is_file()}
    return {**values, "hashsize": HASHSIZE.read_text()}


def node_sysctl(lab: Lab, name: str) -> str:
    return str(lab.cluster.node.exec(["cat", str(NETFILTER / name)]).stdout).strip()


def configz(lab: Lab) -> dict[str, Any]:
    status, body = lab.fetch("http://127.0.0.1:10249/configz")
    assert status == 200
    internal: dict[str, Any] = json.loads(body)["kubeproxy.config.k8s.io"]
    return internal


def check_generated_configmap(
    lab: Lab, mounted: ConfigMapMounts, tool: str, mode: str, host_before: dict[str, str]
) -> dict[str, Any]:
    """What every mode's agent shows when run with `tool`'s generated ConfigMap unchanged:
    the Service works, the values took effect (kubeadm's zero values as upstream's defaults),
    the host-wide conntrack settings are untouched. Returns the agent's /configz."""
    replies = {lab.cluster.client.tcp_request(lab.cluster.node_ip, NODE_PORT) for _ in range(20)}
    assert replies == set(PODS)

    assert lab.fetch("http://127.0.0.1:10249/proxyMode") == (200, mode)
    config = configz(lab)
    assert (config["Mode"], config["SyncPeriod"]) == (mode, "30s")  # the mode's section's
    # iptables: kind's 1s (kubeadm's 0s defaults to 1s); ipvs: 0s, upstream's default there.
    assert config["MinSyncPeriod"] == {"iptables": "1s", "ipvs": "0s"}[mode]
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
    host_max = host_before["nf_conntrack_max"].strip()
    if tool == "kind":
        assert config["DetectLocal"]["ClusterCIDRs"] == ["10.244.0.0/16"]
        assert "! -s 10.244.0.0/16" in lab.nat_rules()  # kind's clusterCIDR detects pods
        assert mounted.conntrack_max.read_text().strip() == host_max
        assert mounted.hashsize.read_text() == "1024\n" and "nf_conntrack_max" not in log
    else:
        assert config["DetectLocal"]["ClusterCIDRs"] is None
        assert mounted.conntrack_max.read_text().strip() == str(wanted_max)
        assert mounted.hashsize.read_text().strip() == str(wanted_max // 4)
    assert host_sysctls() == host_before

    # The start-up Event, as upstream's birthCry.
    def starting() -> list[dict[str, Any]]:
        return [e for e in lab.server.list("events") if e.get("reason") == "Starting"]

    lab.wait_for("the Starting Event", lambda: bool(starting()))
    [event] = starting()
    assert event["involvedObject"]["name"] == "node-1" and event["action"] == "StartKubeProxy"
    return config


def scraped_families(lab: Lab, mode: str) -> set[str]:
    """Scrape the agent's /metrics: every family of upstream's name space that has samples
    must be one upstream's `mode` registers, with upstream's type, labels and buckets.
    Returns the names of those families."""
    status, text = lab.fetch("http://127.0.0.1:10249/metrics")
    assert status == 200
    table = expected(mode)
    seen = set()
    for family in text_string_to_metric_families(text):
        name = family.name + ("_total" if family.type == "counter" else "")
        if not name.startswith("kubeproxy_") or not family.samples:
            continue
        assert name in table, f"{name}: not a metric of upstream's {mode} mode"
        metric = table[name]
        labels = {k for s in family.samples for k in s.labels} - {"le"}
        assert (family.type, labels) == (metric.type, set(metric.labels)), name
        if metric.buckets is not None:
            les = {float(s.labels["le"]) for s in family.samples if "le" in s.labels}
            assert les == {*metric.buckets, float("inf")}, name
        seen.add(name)
    return seen
