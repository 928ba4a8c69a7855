"""The agent as a drop-in for kube-proxy in IPVS mode, inside the VM.

tests/e2e/test_dropin.py's check for IPVS mode: kubeadm's and kind's generated ConfigMaps
with ``mode: ipvs`` (tests/upstream_configmaps.py) are given to the agent unchanged, mounted
as kubeadm's DaemonSet mounts them, and the same checks run (tests/kube_proxy_node.py).
Then what IPVS mode itself shows: the Service's virtual and real servers and kube-ipvs0
address, traffic through them (a pod reaching itself too, by KUBE-LOOP-BACK), and the
ConfigMap's ``ipvs`` section taking effect: the empty scheduler as upstream's ``rr``, the
zero timeouts leaving the kernel's own, ``strictARP: false`` leaving ARP alone, the sysctls
IPVS mode sets; and the metrics of upstream's IPVS mode, no other. Python runs emulated in
the VM, so each ConfigMap gets one agent start, which covers all of it.
"""

from __future__ import annotations

import signal
from collections.abc import Iterator
from pathlib import Path

import pytest
from kube_proxy_node import (
    NODE_PORT,
    PODS,
    TARGET,
    WEB_IP,
    check_generated_configmap,
    host_sysctls,
    scraped_families,
    start_with_configmap,
    web_lab,
)

from pykubeproxy.sandbox.lab import Lab

pytestmark = pytest.mark.ipvs

SLOW = 300.0  # seconds: the agent starts and syncs on an emulated CPU
# The families an IPVS-mode sync and one /healthz and /livez request record.
RECORDED = {
    "kubeproxy_sync_proxy_rules_duration_seconds",
    "kubeproxy_sync_proxy_rules_last_timestamp_seconds",
    "kubeproxy_sync_proxy_rules_last_queued_timestamp_seconds",
    "kubeproxy_sync_proxy_rules_service_changes_total",
    "kubeproxy_sync_proxy_rules_endpoint_changes_total",
    "kubeproxy_sync_proxy_rules_no_local_endpoints_total",
    "kubeproxy_proxy_healthz_total",
    "kubeproxy_proxy_livez_total",
}


@pytest.fixture
def lab() -> Iterator[Lab]:
    with web_lab() as lab:
        yield lab


def ipvsadm(lab: Lab, *args: str) -> str:
    return str(lab.cluster.node.exec(["ipvsadm", "-Ln", *args]).stdout)


def virtual_servers(lab: Lab) -> dict[str, tuple[str, set[str]]]:
    """``ipvsadm -Ln`` as {"TCP ip:port": (scheduler, {real server ip:port})}."""
    table: dict[str, tuple[str, set[str]]] = {}
    servers: set[str] = set()
    for line in ipvsadm(lab).splitlines():
        match line.split():
            case ["TCP" | "UDP" | "SCTP" as protocol, address, scheduler, *_]:
                servers = set()
                table[f"{protocol} {address}"] = (scheduler, servers)
            case ["->", real, "Masq", *_]:
                servers.add(real)
    return table


@pytest.mark.parametrize("tool", ["kubeadm", "kind"])
def test_generated_ipvs_configmap_runs_unchanged(lab: Lab, tmp_path: Path, tool: str) -> None:
    before = host_sysctls()
    mounted = start_with_configmap(
        lab, tmp_path, tool, "ipvs", lambda: f"TCP  {WEB_IP}:80 " in ipvsadm(lab), SLOW
    )
    config = check_generated_configmap(lab, mounted, tool, "ipvs", before)

    # The Service as IPVS serves it: the ClusterIP (bound on kube-ipvs0) and the node port on
    # each node address, every one with both pods as NAT ("Masq") real servers.
    node = lab.cluster.node
    pods = {f"{lab.cluster.pods[name].ip}:{TARGET}" for name in PODS}
    node_ports = (lab.cluster.node_ip, lab.cluster.gateway_ip)
    wanted = {f"TCP {WEB_IP}:80", *(f"TCP {ip}:{NODE_PORT}" for ip in node_ports)}
    table = virtual_servers(lab)
    assert {name: table.get(name, ("", set()))[1] for name in wanted} == dict.fromkeys(wanted, pods)
    assert f"{WEB_IP}/32" in str(node.exec(["ip", "-4", "addr", "show", "kube-ipvs0"]).stdout)
    pod = lab.cluster.pods[PODS[0]]
    assert {pod.tcp_request(WEB_IP, 80) for _ in range(10)} == set(PODS)  # itself included

    # The ipvs section: all zero values, which upstream's IPVS proxier reads as follows.
    assert config["IPVS"] == {
        "Scheduler": "",
        "ExcludeCIDRs": None,
        "StrictARP": False,
        "TCPTimeout": "0s",
        "TCPFinTimeout": "0s",
        "UDPTimeout": "0s",
    }
    assert {scheduler for scheduler, _ in table.values()} == {"rr"}  # no scheduler: rr
    # No timeout set: the node's IPVS keeps the kernel's (tcp 15 min, tcpfin 2 min, udp 5 min).
    assert "Timeout (tcp tcpfin udp): 900 120 300" in ipvsadm(lab, "--timeout")
    assert node.sysctl("net.ipv4.conf.all.arp_ignore") == "0"  # strictARP false: ARP as is
    assert node.sysctl("net.ipv4.conf.all.arp_announce") == "0"
    for name in ("conntrack", "expire_nodest_conn", "expire_quiescent_template"):
        assert node.sysctl(f"net.ipv4.vs.{name}") == "1", name  # what IPVS mode needs
    if tool == "kubeadm":  # no clusterCIDR: the node's own Service traffic is masqueraded
        assert "--match-set KUBE-CLUSTER-IP src,dst -j KUBE-MARK-MASQ" in lab.nat_rules()

    assert lab.healthz()[0] == 200 and lab.fetch("http://127.0.0.1:10256/livez")[0] == 200
    seen = scraped_families(lab, "ipvs")
    assert seen >= RECORDED, RECORDED - seen
    assert lab.stop_agent(signal.SIGTERM, timeout=60.0) == 0
