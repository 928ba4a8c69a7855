"""The agent process in IPVS mode, against the API double, on a kernel with ip_vs.

Runs only inside the VM (see pykubeproxy/sandbox/vm.py and tests/test_ipvs_vm.py):
the same Lab as the iptables end-to-end tests, with ``--proxy-mode ipvs``.
Python runs emulated there, so the waits are long; nothing here is timed.
"""

from __future__ import annotations

import os
import signal
import sys

import pytest

from pykubeproxy.sandbox.lab import Lab, endpoint_slice, service
from pykubeproxy.sandbox.netns import spread

pytestmark = [
    pytest.mark.ipvs,
    pytest.mark.skipif(os.environ.get("PYKUBEPROXY_IN_VM") != "1", reason="runs in the VM"),
]
WEB_IP, NODE_PORT, TARGET = "10.96.0.10", 30080, 8080
SLOW = 240.0  # seconds: emulated CPU


def ipvsadm(lab: Lab) -> str:
    return str(lab.cluster.node.exec(["ipvsadm", "-Ln"]).stdout)


def test_agent_programs_ipvs_as_services_come_and_go() -> None:
    with Lab(agent_args=("--proxy-mode", "ipvs", "--ipvs-sync-period", "5s")) as lab:
        pods = [lab.cluster.add_pod(f"web-{i}") for i in range(3)]
        for pod in pods:
            pod.serve_tcp(TARGET)
        lab.server.create("services", service("web", WEB_IP, 80, TARGET, node_port=NODE_PORT))
        lab.server.create("endpointslices", endpoint_slice("web", [p.ip for p in pods], TARGET))
        lab.start_agent()
        # ClusterIP + a NodePort on each node address (the node IP and cbr0's gateway IP)
        lab.wait_for("the IPVS services", lambda: ipvsadm(lab).count("Masq") == 9, SLOW)
        # ...and the end of that sync: the iptables half (hairpin masquerade) comes after IPVS.
        lab.wait_for("the first whole sync", lab.synced, SLOW)
        table = ipvsadm(lab)
        assert f"TCP  {WEB_IP}:80 rr" in table
        assert f"TCP  {lab.cluster.node_ip}:{NODE_PORT} rr" in table
        addresses = str(lab.cluster.node.exec(["ip", "-4", "addr", "show", "kube-ipvs0"]).stdout)
        assert f"{WEB_IP}/32" in addresses

        from_pod = spread(lambda: pods[0].tcp_request(WEB_IP, 80), 30)
        assert from_pod == {"web-0": 10, "web-1": 10, "web-2": 10}  # rr from one client
        from_node = spread(lambda: lab.cluster.node.tcp_request(WEB_IP, 80), 30)
        assert set(from_node) == {"web-0", "web-1", "web-2"}
        outside = spread(lambda: lab.cluster.client.tcp_request(lab.cluster.node_ip, NODE_PORT), 9)
        assert set(outside) == {"web-0", "web-1", "web-2"}
        metrics = lab.metrics()
        assert metrics["pykubeproxy_ipvs_virtual_servers"] == 3
        assert metrics["pykubeproxy_ipvs_real_servers"] == 9

        # A partial sync: only this Service's real servers change (web-2 drains at weight 0).
        lab.server.update("endpointslices", endpoint_slice("web", [p.ip for p in pods[:2]], TARGET))
        lab.wait_for(
            "web-2 out of rotation",
            lambda: (
                set(spread(lambda: lab.cluster.client.tcp_request(WEB_IP, 80), 6))
                == {"web-0", "web-1"}
            ),
            SLOW,
        )

        lab.server.delete("services", "default", "web")
        lab.wait_for("the IPVS services to go", lambda: WEB_IP not in ipvsadm(lab), SLOW)
        addresses = str(lab.cluster.node.exec(["ip", "-4", "addr", "show", "kube-ipvs0"]).stdout)
        assert WEB_IP not in addresses

        assert lab.stop_agent(signal.SIGTERM) == 0
        lab.cluster.node.exec([sys.executable, "-m", "pykubeproxy", "--cleanup"], timeout=SLOW)
        assert not [line for line in ipvsadm(lab).splitlines() if line.startswith(("TCP", "UDP"))]
        assert "KUBE-" not in str(lab.cluster.node.exec(["ipset", "list", "-n"]).stdout)
        links = str(lab.cluster.node.exec(["ip", "link", "show"]).stdout)
        assert "kube-ipvs0" not in links
        assert "KUBE-" not in str(lab.cluster.node.exec(["iptables-legacy-save"]).stdout)
