"""The real `pykubeproxy` process against the API server double, proven by traffic.

Each test gets a Lab: a node namespace running the agent, the API double on
127.0.0.1:6443 inside it, pod namespaces that answer with their names and an
outside client. Objects are changed through the double's store, exactly as
controllers would change them through the API.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from pykubeproxy.sandbox.lab import Lab, endpoint_slice, service
from pykubeproxy.sandbox.netns import TrafficTimeout, spread

pytestmark = [
    pytest.mark.e2e,
    pytest.mark.skipif(os.geteuid() != 0 or shutil.which("ip") is None, reason="needs root"),
]

WEB_IP, NODE_PORT, TARGET = "10.96.0.10", 30080, 8080


@pytest.fixture
def lab() -> Iterator[Lab]:
    with Lab() as lab:
        for name in ("web-0", "web-1", "web-2"):
            lab.cluster.add_pod(name).serve_tcp(TARGET)
        yield lab


def pod_ips(lab: Lab, *names: str) -> list[str]:
    return [lab.cluster.pods[name].ip for name in names]


def web(lab: Lab, *names: str) -> None:
    """Create or update the web Service's slice to the given pods."""
    eps = endpoint_slice("web", pod_ips(lab, *names), TARGET)
    if any(e["metadata"]["name"] == "web-x1" for e in lab.server.list("endpointslices")):
        lab.server.update("endpointslices", eps)
    else:
        lab.server.create("endpointslices", eps)


def filter_rules(lab: Lab) -> str:
    return str(lab.cluster.node.exec(["iptables-legacy-save", "-t", "filter"]).stdout)


def reached(lab: Lab, n: int = 30) -> set[str]:
    return set(spread(lambda: lab.cluster.client.tcp_request(lab.cluster.node_ip, NODE_PORT), n))


def converge(lab: Lab, want: set[str], what: str) -> None:
    def done() -> bool:
        try:
            return reached(lab, 20) == want
        except OSError:  # refused or timed out: not there yet
            return False

    lab.wait_for(what, done)


def started(lab: Lab) -> Lab:
    lab.server.create("services", service("web", WEB_IP, 80, TARGET, node_port=NODE_PORT))
    web(lab, "web-0", "web-1", "web-2")
    lab.start_agent()
    lab.wait_for("the web Service's rules", lambda: "default/web:p cluster IP" in lab.nat_rules())
    return lab


def test_create_scale_and_delete_services(lab: Lab) -> None:
    started(lab)
    assert reached(lab, 40) == {"web-0", "web-1", "web-2"}
    assert set(spread(lambda: lab.cluster.pods["web-0"].tcp_request(WEB_IP, 80), 40)) == {
        "web-0",
        "web-1",
        "web-2",
    }
    web(lab, "web-2")
    converge(lab, {"web-2"}, "scale down to web-2")
    web(lab, "web-0", "web-1")
    converge(lab, {"web-0", "web-1"}, "scale to web-0 and web-1")
    lab.server.delete("endpointslices", "default", "web-x1")
    lab.wait_for("REJECT without endpoints", lambda: "has no endpoints" in filter_rules(lab))
    with pytest.raises(ConnectionRefusedError):
        lab.cluster.client.tcp_request(lab.cluster.node_ip, NODE_PORT)
    lab.server.delete("services", "default", "web")
    lab.wait_for("the Service's rules to go", lambda: WEB_IP not in filter_rules(lab))
    with pytest.raises(TrafficTimeout):
        lab.cluster.node.tcp_request(WEB_IP, 80, timeout=0.5)
    metrics = lab.metrics()
    assert metrics["kubeproxy_sync_proxy_rules_service_changes_total"] >= 2
    assert metrics["kubeproxy_sync_proxy_rules_endpoint_changes_total"] >= 4
    assert metrics["kubeproxy_sync_partial_proxy_rules_duration_seconds_count"] >= 1


def test_watches_use_selectors_bookmarks_and_resource_versions(lab: Lab) -> None:
    started(lab)
    web(lab, "web-1")
    converge(lab, {"web-1"}, "an update through the watch")
    watches = [r for r in lab.server.requests if r.query.get("watch") in ("true", "True")]
    kinds = {r.path for r in watches}
    assert "/api/v1/services" in kinds and "/apis/discovery.k8s.io/v1/endpointslices" in kinds
    for request in watches:
        assert request.query.get("allowWatchBookmarks") in ("true", "True")
        assert request.query.get("resourceVersion")
        if request.path != "/api/v1/nodes":
            assert request.query["labelSelector"] == (
                "!service.kubernetes.io/headless,!service.kubernetes.io/service-proxy-name"
            )
    node_lists = [r for r in lab.server.requests if r.path == "/api/v1/nodes"]
    assert all(r.query.get("fieldSelector") == "metadata.name=node-1" for r in node_lists)
    # The first list of each kind may come from the server's cache: one response, no paging.
    lists = [r for r in lab.server.requests if "watch" not in r.query]
    for path in kinds:
        assert next(r for r in lists if r.path == path).query.get("resourceVersion") == "0"


def test_kill_and_restart_never_breaks_connections(lab: Lab) -> None:
    started(lab)
    failures: list[str] = []
    successes = 0
    stop = threading.Event()

    def keep_connecting() -> None:
        nonlocal successes
        while not stop.is_set():
            try:
                lab.cluster.client.tcp_request(lab.cluster.node_ip, NODE_PORT, timeout=1)
                successes += 1
            except OSError as err:
                failures.append(repr(err))
            time.sleep(0.02)

    thread = threading.Thread(target=keep_connecting, daemon=True)
    thread.start()
    try:
        time.sleep(0.5)
        assert lab.stop_agent(signal.SIGKILL) == -signal.SIGKILL
        time.sleep(1.0)
        lab.start_agent()
        lab.wait_for("the restarted agent to sync", lambda: lab.healthz()[0] == 200)
        time.sleep(1.0)
    finally:
        stop.set()
        thread.join(5)
    assert failures == [] and successes > 50


def test_converges_after_dropped_watches_and_compacted_history(lab: Lab) -> None:
    lab.server.create("services", service("gone", "10.96.0.12", 80, TARGET))
    started(lab)
    lab.wait_for("the gone Service", lambda: "default/gone:p has no endpoints" in filter_rules(lab))
    lab.server.pause()
    lab.server.drop_watches()
    web(lab, "web-0")  # changed while the agent cannot see it
    lab.server.delete("services", "default", "gone")
    lab.server.create("services", service("other", "10.96.0.11", 80, TARGET))
    lab.server.compact()
    assert reached(lab) == {"web-0", "web-1", "web-2"}  # installed rules stay meanwhile
    lab.server.resume()
    converge(lab, {"web-0"}, "convergence after a 410")
    lab.wait_for(
        "the Service created meanwhile",
        lambda: "default/other:p has no endpoints" in filter_rules(lab),
    )
    assert "10.96.0.12" not in filter_rules(lab)  # deleted while disconnected
    assert "re-listing" in lab.agent_log()
    # After a 410 the cache is no fresher than the watch was: the re-list reads the latest state.
    service_lists = [
        r for r in lab.server.requests if r.path == "/api/v1/services" and "watch" not in r.query
    ]
    assert "resourceVersion" not in service_lists[-1].query
    lab.server.drop_watches()
    web(lab, "web-1", "web-2")
    converge(lab, {"web-1", "web-2"}, "convergence after dropped watches")


def test_api_server_down_keeps_rules_and_recovers(lab: Lab) -> None:
    started(lab)
    lab.stop_agent(signal.SIGKILL)
    lab.server.set_failure(503, retry_after=1)
    lab.start_agent()
    lab.wait_for("the agent to see the outage", lambda: "unavailable" in lab.agent_log())
    assert reached(lab) == {"web-0", "web-1", "web-2"}
    lab.server.set_failure(None)
    lab.wait_for("the agent to sync", lambda: lab.healthz()[0] == 200)
    web(lab, "web-1")
    converge(lab, {"web-1"}, "updates after the outage")


def test_bad_objects_are_logged_and_skipped(lab: Lab) -> None:
    bad = service("bad", "10.96.0.300", 80, TARGET)
    lab.server.create("services", bad)
    ports = service("ports", "10.96.0.12", 80, TARGET)
    ports["spec"]["ports"] = [
        {"name": "zero", "port": 0},
        {"name": "icmp", "port": 7, "protocol": "ICMP"},
        {"name": "ok", "port": 81},
    ]
    lab.server.create("services", ports)
    lab.server.create(
        "endpointslices", endpoint_slice("ports", ["10.244.0.999"], TARGET, name="ports-x1")
    )
    lab.server.create("endpointslices", endpoint_slice("nosuch", pod_ips(lab, "web-0"), TARGET))
    started(lab)
    assert reached(lab) == {"web-0", "web-1", "web-2"}
    orphan = "EndpointSlices of Service default/nosuch ignored"
    lab.wait_for("the orphan slice's log line", lambda: orphan in lab.agent_log())
    log = lab.agent_log()
    assert "Service default/bad" in log and "not an IP address" in log
    assert "Service default/ports" in log and "unknown protocol" in log
    assert "EndpointSlice default/ports-x1" in log
    assert "default/ports:ok has no endpoints" in filter_rules(lab)
    assert lab.healthz()[0] == 200 and lab.agent is not None and lab.agent.poll() is None


def test_health_metrics_and_node_deletion(lab: Lab) -> None:
    started(lab)
    stamp = (datetime.now(UTC) - timedelta(seconds=2)).strftime("%Y-%m-%dT%H:%M:%SZ")
    eps = endpoint_slice("web", pod_ips(lab, "web-0"), TARGET)
    eps["metadata"]["annotations"] = {"endpoints.kubernetes.io/last-change-trigger-time": stamp}
    lab.server.update("endpointslices", eps)
    converge(lab, {"web-0"}, "the annotated change")
    metrics = lab.metrics()
    assert metrics["kubeproxy_network_programming_duration_seconds_count"] >= 1
    assert metrics["kubeproxy_sync_proxy_rules_last_timestamp_seconds"] > time.time() - 60
    assert metrics['kubeproxy_sync_proxy_rules_iptables_total{ip_family="IPv4",table="nat"}'] > 0
    assert any(name.startswith("process_resident_memory_bytes") for name in metrics)
    status, body = lab.healthz()
    assert status == 200 and body["nodeEligible"] is True
    lab.server.patch(
        "nodes", None, "node-1", {"metadata": {"deletionTimestamp": "2026-11-24T00:00:00Z"}}
    )
    lab.wait_for("healthz to fail", lambda: not_eligible(lab))
    assert lab.fetch("http://127.0.0.1:10256/livez")[0] == 200


def not_eligible(lab: Lab) -> bool:
    status, body = lab.healthz()
    return status == 503 and body["nodeEligible"] is False


def test_sigterm_exits_promptly_and_cleanup_removes_everything(lab: Lab) -> None:
    started(lab)
    started_at = time.monotonic()
    assert lab.stop_agent(signal.SIGTERM) == 0
    assert time.monotonic() - started_at < 2
    assert "KUBE-SVC-" in lab.nat_rules()  # SIGTERM leaves the rules
    done = lab.cluster.node.exec([sys.executable, "-m", "pykubeproxy", "--cleanup"])
    assert done.returncode == 0
    everything = str(lab.cluster.node.exec(["iptables-legacy-save"]).stdout)
    ours = [line for line in everything.splitlines() if "KUBE-" in line]
    assert all("KUBE-FIREWALL" in line for line in ours), ours  # kubelet's shared chain stays


def test_a_bad_flag_stops_at_start_with_one_line() -> None:
    done = subprocess.run(
        [sys.executable, "-m", "pykubeproxy", "--iptables-sync-period", "soon"],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert done.returncode == 1
    assert done.stderr.strip().count("\n") == 0 and "invalid duration" in done.stderr


def test_udp_flows_follow_endpoint_changes(lab: Lab) -> None:
    """A client that keeps its source port must not stay on a removed endpoint."""
    for name in ("web-0", "web-1"):
        lab.cluster.pods[name].serve_udp(5353)
    lab.server.create("services", service("dns", "10.96.0.53", 53, 5353, protocol="UDP"))
    lab.server.create(
        "endpointslices", endpoint_slice("dns", pod_ips(lab, "web-0"), 5353, protocol="UDP")
    )
    started(lab)
    client = lab.cluster.pods["web-2"]
    with client.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.settimeout(2)
        sock.connect(("10.96.0.53", 53))

        def ask() -> str:
            sock.send(b"ping\n")
            return sock.recv(100).decode().strip()

        assert ask() == "web-0"
        lab.server.update(
            "endpointslices", endpoint_slice("dns", pod_ips(lab, "web-1"), 5353, protocol="UDP")
        )
        lab.wait_for("the same UDP flow to move to web-1", lambda: ask() == "web-1")


def test_says_so_when_the_node_rules_live_in_nf_tables(lab: Lab) -> None:
    lab.cluster.node.exec(["nft", "add", "table", "ip", "filter"])
    started(lab)
    assert "rules live in nf_tables (ip filter)" in lab.agent_log()


def test_nodeport_addresses_limit_where_nodeports_answer(lab: Lab) -> None:
    lab.agent_args = ("--nodeport-addresses", "198.18.0.0/24")
    started(lab)
    assert "-d 198.18.0.2/32 -m comment --comment" in lab.nat_rules()
    assert reached(lab) == {"web-0", "web-1", "web-2"}
    with pytest.raises(ConnectionRefusedError):  # not NATed: nothing listens there
        lab.cluster.pods["web-0"].tcp_request(lab.cluster.gateway_ip, NODE_PORT, timeout=2)


def test_flushed_chains_are_restored_within_a_sync_period(lab: Lab) -> None:
    lab.agent_args = ("--iptables-sync-period", "2s")
    started(lab)
    for chain in ("KUBE-SERVICES", "KUBE-NODEPORTS"):
        lab.cluster.node.exec(["iptables-legacy", "-t", "nat", "-F", chain])
    with pytest.raises(ConnectionRefusedError):  # nothing NATs it: the node itself answers
        lab.cluster.client.tcp_request(lab.cluster.node_ip, NODE_PORT, timeout=1)
    converge(lab, {"web-0", "web-1", "web-2"}, "the periodic full sync to repair the flush")
    lab.cluster.node.exec(
        [
            "iptables-legacy",
            "-t",
            "nat",
            "-D",
            "PREROUTING",
            "-m",
            "comment",
            "--comment",
            "kubernetes service portals",
            "-j",
            "KUBE-SERVICES",
        ]
    )
    converge(lab, {"web-0", "web-1", "web-2"}, "the jump rule to come back")


def test_console_script_is_installed() -> None:
    script = Path(sys.executable).parent / "pykubeproxy"
    done = subprocess.run([str(script), "--help"], capture_output=True, text=True, timeout=30)
    assert done.returncode == 0 and "--iptables-sync-period" in done.stdout
