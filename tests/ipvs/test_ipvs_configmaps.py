"""kubeadm's and kind's generated kube-proxy ConfigMaps for IPVS mode, run unchanged (in the VM).

The agent reads the ConfigMap where kubeadm's DaemonSet mounts it, with kubeadm's command line
for kube-proxy (tests/kube_proxy_node.py), and reaches the API double over TLS with the
service account's token that kubeconfig.conf names. The host-wide conntrack files are left as
they are: the agent's write of nf_conntrack_max from the node namespace is refused by the
kernel (one warning), and this is the VM's kernel anyway.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from kube_proxy_node import CONFIG_FLAG, TOKEN, ConfigMapMounts
from upstream_configmaps import CONFIG_CONFS

from pykubeproxy.sandbox.lab import Lab, endpoint_slice, service
from pykubeproxy.sandbox.netns import spread

pytestmark = [
    pytest.mark.ipvs,
    pytest.mark.skipif(os.environ.get("PYKUBEPROXY_IN_VM") != "1", reason="runs in the VM"),
]
WEB_IP, TARGET = "10.96.0.10", 8080
SLOW = 240.0  # seconds: emulated CPU


@pytest.mark.parametrize("tool", ["kubeadm", "kind"])
def test_generated_ipvs_configmap_runs_unchanged(tool: str, tmp_path: Path) -> None:
    with Lab(api_tls=True, api_token=TOKEN) as lab:
        lab.cluster.add_pod("web-0").serve_tcp(TARGET)
        lab.server.create("services", service("web", WEB_IP, 80, TARGET))
        pod_ip = lab.cluster.pods["web-0"].ip
        lab.server.create("endpointslices", endpoint_slice("web", [pod_ip], TARGET))
        mounts = ConfigMapMounts(lab, tmp_path, CONFIG_CONFS[tool, "ipvs"], host_wide=False)
        lab.start_agent(CONFIG_FLAG, kubeconfig=False, wrapper=mounts.wrapper)

        def table() -> str:
            return str(lab.cluster.node.exec(["ipvsadm", "-Ln"]).stdout)

        lab.wait_for("the IPVS service", lambda: f"TCP  {WEB_IP}:80 rr" in table(), SLOW)
        lab.wait_for("the end of a sync", lab.synced, SLOW)
        assert set(spread(lambda: lab.cluster.node.tcp_request(WEB_IP, 80), 5)) == {"web-0"}
        assert lab.fetch("http://127.0.0.1:10249/proxyMode") == (200, "ipvs")
        status, body = lab.fetch("http://127.0.0.1:10249/configz")
        assert status == 200
        config = json.loads(body)["kubeproxy.config.k8s.io"]
        assert (config["Mode"], config["SyncPeriod"], config["MinSyncPeriod"]) == (
            "ipvs",
            "30s",
            "0s",
        )
        cidrs = ["10.244.0.0/16"] if tool == "kind" else None
        assert config["DetectLocal"]["ClusterCIDRs"] == cidrs
        lab.wait_for(
            "the Starting Event",
            lambda: any(e.get("reason") == "Starting" for e in lab.server.list("events")),
            SLOW,
        )
        assert "lenient decoding" not in lab.agent_log()
        assert lab.stop_agent() == 0
