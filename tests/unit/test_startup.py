"""Start-up steps as upstream takes them: conntrack sysctls, the Event, the Node's IP and pod
CIDRs, local-traffic detection, IPVS timeouts, log formats, the servers and the CLI's actions.

Sysctl writes go to files under a temporary directory (conntrack_limits.Paths), never to
the machine's /proc/sys.
"""

from __future__ import annotations

import json
import logging
import socket
import threading
import time
import urllib.request
from collections.abc import Iterator
from ipaddress import ip_address, ip_network
from pathlib import Path
from typing import Any

import kubernetes
import pytest
import yaml

from pykubeproxy import cli, kube
from pykubeproxy import kubeproxyconfig as kpc
from pykubeproxy.config import ConfigError, load
from pykubeproxy.conntrack import ReconcileResult
from pykubeproxy.conntrack_limits import Paths, conntrack_max, setup, wanted
from pykubeproxy.ipvs.timeouts import set_config_message
from pykubeproxy.logs import JsonFormatter, KlogFormatter
from pykubeproxy.metrics import Metrics
from pykubeproxy.sandbox.apiserver import ApiServerDouble
from pykubeproxy.startup import (
    counted_reconcile,
    exit_on_pod_cidr_change,
    ipvs_local_cidrs,
    local_detector,
    node_name,
    pod_cidrs_of,
    primary_nodeport_cidrs,
    read_node,
    set_oom_score_adj,
    status_routes,
    watch_config_file,
)
from pykubeproxy.web import serve

# --- conntrack sysctls


def sysctl_dir(tmp_path: Path, **values: int) -> Paths:
    netfilter = tmp_path / "netfilter"
    netfilter.mkdir()
    for name, value in values.items():
        (netfilter / name).write_text(f"{value}\n")
    (tmp_path / "hashsize").write_text("65536\n")
    (tmp_path / "mounts").write_text("sysfs /sys sysfs rw,nosuid 0 0\n")
    return Paths(netfilter, tmp_path / "hashsize", tmp_path / "mounts")


def test_conntrack_max_is_per_core_with_a_floor() -> None:
    """upstream's getConntrackMax."""
    settings = load([]).conntrack
    assert conntrack_max(settings, cpus=2) == 131072  # 2 x 32768 is below the 128Ki floor
    assert conntrack_max(settings, cpus=8) == 262144
    assert conntrack_max(load(["--conntrack-max-per-core=0"]).conntrack, cpus=8) == 0


def test_kubeadm_defaults_write_what_differs(tmp_path: Path) -> None:
    paths = sysctl_dir(
        tmp_path,
        nf_conntrack_max=262144,
        nf_conntrack_tcp_timeout_established=86400,
        nf_conntrack_tcp_timeout_close_wait=60,
    )
    outcome = setup(load([]).conntrack, cpus=2, paths=paths)
    # The established timeout already has the value: not written. The hash table is big enough.
    assert outcome.written == {
        "nf_conntrack_max": 131072,
        "nf_conntrack_tcp_timeout_close_wait": 3600,
    }
    assert (paths.netfilter / "nf_conntrack_max").read_text() == "131072"
    assert paths.hashsize.read_text() == "65536\n" and not outcome.failed


def test_hash_table_grows_to_a_quarter_of_the_limit(tmp_path: Path) -> None:
    paths = sysctl_dir(tmp_path, nf_conntrack_max=0)
    outcome = setup(load(["--conntrack-max-per-core=131072"]).conntrack, cpus=4, paths=paths)
    assert outcome.written["nf_conntrack_max"] == 524288
    assert outcome.written["hashsize"] == 131072 and paths.hashsize.read_text() == "131072"
    paths.mounts.write_text("proc /proc proc rw 0 0\nsysfs /sys sysfs ro,nosuid 0 0\n")
    (paths.netfilter / "nf_conntrack_max").write_text("0")
    paths.hashsize.write_text("1024")
    outcome = setup(load(["--conntrack-max-per-core=131072"]).conntrack, cpus=4, paths=paths)
    assert outcome.read_only_sysfs and paths.hashsize.read_text() == "1024"


def test_all_the_conntrack_settings_and_what_zero_means(tmp_path: Path) -> None:
    settings = load(["--conntrack-max-per-core=0", "--conntrack-tcp-timeout-established=0",
                     "--conntrack-tcp-timeout-close-wait=30s", "--conntrack-tcp-be-liberal",
                     "--conntrack-udp-timeout=1m",
                     "--conntrack-udp-timeout-stream=0s"]).conntrack  # fmt: skip
    assert wanted(settings, cpus=2) == [
        ("nf_conntrack_tcp_timeout_close_wait", 30),
        ("nf_conntrack_tcp_be_liberal", 1),
        ("nf_conntrack_udp_timeout", 60),
    ]
    nothing = load(["--conntrack-max-per-core=0", "--conntrack-tcp-timeout-established=0",
                    "--conntrack-tcp-timeout-close-wait=0"]).conntrack  # fmt: skip
    assert wanted(nothing, cpus=2) == []


def test_a_failed_write_is_a_warning_and_the_rest_goes_on(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    paths = sysctl_dir(tmp_path, nf_conntrack_tcp_timeout_close_wait=60)
    (paths.netfilter / "nf_conntrack_max").mkdir()  # writing it fails, like a read-only sysctl
    outcome = setup(load([]).conntrack, cpus=2, paths=paths)
    assert set(outcome.failed) == {"nf_conntrack_max"}
    assert outcome.written["nf_conntrack_tcp_timeout_close_wait"] == 3600
    assert "conntrack.maxPerCore: 0 leaves it alone" in caplog.text


# --- events, through the API double


@pytest.fixture
def api() -> Iterator[tuple[ApiServerDouble, Any]]:
    with ApiServerDouble() as server:
        configuration = kubernetes.client.Configuration(host=server.url)
        with kubernetes.client.ApiClient(configuration) as client:
            yield server, client


def test_starting_event_is_upstreams(api: tuple[ApiServerDouble, Any]) -> None:
    """reason Starting, action StartKubeProxy, about the Node, as upstream's birthCry."""
    server, client = api
    kube.post_event(client, kube.starting_event("node-a"))
    [stored] = server.list("events")  # stored in the core shape, as the real server does
    assert stored["metadata"]["namespace"] == "default"
    assert stored["metadata"]["name"].startswith("node-a.")
    assert (stored["reason"], stored["action"], stored["type"]) == ("Starting", "StartKubeProxy",
                                                                   "Normal")  # fmt: skip
    assert stored["involvedObject"] == {"kind": "Node", "name": "node-a", "uid": "node-a"}
    assert stored["reportingComponent"] == "kube-proxy"
    assert stored["reportingInstance"] == f"kube-proxy-{socket.gethostname()}"
    assert [r.method for r in server.requests] == ["POST"]
    assert server.requests[0].path == "/apis/events.k8s.io/v1/namespaces/default/events"


def test_node_lookup_lists_by_name(api: tuple[ApiServerDouble, Any]) -> None:
    server, client = api
    assert kube.get_node(client, "node-a") is None
    server.create("nodes", {"metadata": {"name": "node-a"}})
    server.create("nodes", {"metadata": {"name": "node-b"}})
    node = kube.get_node(client, "node-a")
    assert node is not None and node["metadata"]["name"] == "node-a"
    assert {r.query.get("fieldSelector") for r in server.requests} == {"metadata.name=node-a"}


def test_rate_limiter_is_a_token_bucket() -> None:
    now, slept = [0.0], []
    limiter = kube.RateLimiter(2.0, 3, clock=lambda: now[0], sleep=slept.append)
    for _ in range(3):
        limiter.wait()
    assert slept == []  # the burst
    limiter.wait()
    assert slept == [0.5]  # then qps
    now[0] = 10.0
    limiter.wait()
    assert slept == [0.5]
    kube.RateLimiter(0, 1, sleep=slept.append).wait()  # qps 0: no limit


# --- the Node's IP, pod CIDRs and the local-traffic detector

NODE = {
    "metadata": {"name": "node-a"},
    "spec": {"podCIDR": "10.244.1.0/24", "podCIDRs": ["10.244.1.0/24", "fd00:1::/64"]},
    "status": {"addresses": [{"type": "InternalIP", "address": "192.0.2.10"}]},
}


def test_read_node_prefers_the_bind_address() -> None:
    cfg = load(["--nodeport-addresses", "primary"])
    assert read_node(cfg, "node-a", lambda: NODE, threading.Event()).ip == ip_address("192.0.2.10")
    cfg = load(["--nodeport-addresses", "primary", "--bind-address", "198.51.100.7"])
    assert read_node(cfg, "node-a", lambda: NODE, threading.Event()).ip == ip_address(
        "198.51.100.7"
    )


def test_read_node_waits_for_the_pod_cidr(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("pykubeproxy.startup.random.uniform", lambda a, b: 0.0)
    answers = [None, {**NODE, "spec": {}}, NODE]
    cfg = load(["--detect-local-mode", "NodeCIDR"])
    start = read_node(cfg, "node-a", lambda: answers.pop(0), threading.Event())
    assert start.pod_cidrs == (ip_network("10.244.1.0/24"), ip_network("fd00:1::/64"))


def test_pod_cidrs_of() -> None:
    assert pod_cidrs_of({"spec": {"podCIDR": "10.1.0.0/24"}}) == (ip_network("10.1.0.0/24"),)
    deleting = {**NODE, "metadata": {"deletionTimestamp": "2026-01-01T00:00:00Z"}}
    assert pod_cidrs_of(deleting) == () and pod_cidrs_of(None) == ()


def test_a_changed_pod_cidr_stops_the_agent() -> None:
    seen: list[str] = []
    exits: list[int] = []
    handler = exit_on_pod_cidr_change(
        lambda key, obj: seen.append(key), pod_cidrs_of(NODE), exits.append
    )
    handler("/node-a", NODE)
    handler("/node-a", {**NODE, "spec": {}})  # no pod CIDRs (yet): nothing to compare
    assert exits == [] and seen == ["/node-a", "/node-a"]
    handler("/node-a", {**NODE, "spec": {"podCIDRs": ["10.244.9.0/24"]}})
    assert exits == [1]


def test_primary_nodeport_addresses() -> None:
    assert primary_nodeport_cidrs(ip_address("192.0.2.10")) == ["192.0.2.10/32"]
    assert primary_nodeport_cidrs(ip_address("fd00::1")) == ["fd00::1/128"]
    assert primary_nodeport_cidrs(ip_address("127.0.0.1")) == []  # unknown: every address
    assert primary_nodeport_cidrs(None) == []


@pytest.mark.parametrize(
    ("argv", "if_local"),
    [
        (["--cluster-cidr", "fd00::/48,10.244.0.0/16"], ("-s", "10.244.0.0/16")),
        (["--detect-local-mode", "NodeCIDR"], ("-s", "10.244.1.0/24")),
        (["--detect-local-mode", "BridgeInterface", "--pod-bridge-interface", "cbr0"],
         ("-i", "cbr0")),
        (["--detect-local-mode", "InterfaceNamePrefix", "--pod-interface-name-prefix", "veth"],
         ("-i", "veth+")),
    ],
)  # fmt: skip
def test_local_detectors_are_upstreams(argv: list[str], if_local: tuple[str, ...]) -> None:
    detector = local_detector(load(argv), pod_cidrs_of(NODE))
    assert detector is not None
    assert (detector.if_local, detector.if_not_local) == (if_local, ("!", *if_local))
    assert local_detector(load([]), ()) is None


def test_ipvs_mode_detects_by_cidr_only() -> None:
    assert ipvs_local_cidrs(load(["--cluster-cidr", "10.0.0.0/8"]), ()) == (
        ip_network("10.0.0.0/8"),
    )
    with pytest.raises(ConfigError, match="BridgeInterface is not implemented in ipvs mode"):
        ipvs_local_cidrs(load(["--detect-local-mode", "BridgeInterface",
                               "--pod-bridge-interface", "cbr0"]), ())  # fmt: skip


def test_a_changed_config_file_is_noticed(tmp_path: Path) -> None:
    """upstream exits when its --config file changes; kubelet starts it with the new one."""
    path = tmp_path / "config.conf"
    path.write_text("a")
    changed, stop = threading.Event(), threading.Event()
    thread = watch_config_file(str(path), changed.set, stop, interval=0.01)
    assert not changed.wait(0.1)
    path.write_text("b")
    assert changed.wait(5)
    thread.join(5)
    stop.set()


def test_node_name() -> None:
    assert node_name(load([]), " Host-A ") == "host-a"
    with pytest.raises(ConfigError, match="the node name is empty"):
        node_name(load([]), "  ")


def test_oom_score_adj(tmp_path: Path) -> None:
    target = tmp_path / "oom_score_adj"
    set_oom_score_adj(-999, target)
    assert target.read_text() == "-999"
    set_oom_score_adj(5, tmp_path / "missing" / "oom_score_adj")  # logged, not raised


def test_counted_reconcile_records_upstreams_metrics() -> None:
    class Reconciler:
        def reconcile(self, services: Any, endpoints: Any) -> ReconcileResult:
            return ReconcileResult(deleted=3, seconds=0.01)

    metrics = Metrics()
    counted_reconcile(metrics, Reconciler())({}, {})  # type: ignore[arg-type]
    sample = metrics.registry.get_sample_value
    v4 = {"ip_family": "IPv4"}
    assert sample("kubeproxy_conntrack_reconciler_deleted_entries_total", v4) == 3
    assert sample("kubeproxy_conntrack_reconciler_sync_duration_seconds_count", v4) == 1


# --- /proxyMode, /configz and the servers


def test_status_routes() -> None:
    routes = status_routes(load(["--proxy-mode", "ipvs"]))
    assert routes["/proxyMode"]() == (200, "text/plain; charset=utf-8", b"ipvs")
    status, content_type, body = routes["/configz"]()
    assert (status, content_type) == (200, "application/json")
    assert json.loads(body)["kubeproxy.config.k8s.io"]["Mode"] == "ipvs"


def test_servers_empty_address_hard_fail_and_retry(monkeypatch: pytest.MonkeyPatch) -> None:
    """Empty: no server. A taken port: fatal with bindAddressHardFail, else retried."""
    assert serve("", {}, "metrics") is None
    monkeypatch.setattr("pykubeproxy.web.RETRY_INTERVAL", 0.05)
    taken = socket.socket()
    taken.bind(("127.0.0.1", 0))
    taken.listen()
    port = taken.getsockname()[1]
    with pytest.raises(OSError, match="starting metrics server on"):
        serve(f"127.0.0.1:{port}", {}, "metrics", hard_fail=True)
    server = serve(f"127.0.0.1:{port}", {"/x": lambda: (200, "text/plain", b"x")}, "metrics",
                   hard_fail=False)  # fmt: skip
    assert server is not None and server.http is None
    taken.close()
    try:
        deadline = time.monotonic() + 10
        while server.http is None and time.monotonic() < deadline:
            time.sleep(0.02)
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/x", timeout=5) as answer:
            assert answer.read() == b"x"
    finally:
        server.close()


# --- IPVS timeouts


def test_ipvs_timeouts_message() -> None:
    """IPVS_CMD_SET_CONFIG with the timeouts above 0, in seconds (as ipvsadm --set)."""
    msg = set_config_message(900, 0, 300.5)
    assert (msg["cmd"], msg["version"]) == (12, 1)
    assert msg["attrs"] == [("IPVS_CMD_ATTR_TIMEOUT_TCP", 900), ("IPVS_CMD_ATTR_TIMEOUT_UDP", 300)]
    msg["header"]["type"] = 0x20
    msg.encode()
    # genl header (cmd 12, version 1), then u32 attributes 4 (tcp) and 6 (udp)
    assert bytes(msg.data[16:]).hex() == "0c010000" + "0800040084030000" + "080006002c010000"
    assert set_config_message(0, 0, 0)["attrs"] == []


# --- logs


def record(level: int, message: str) -> logging.LogRecord:
    return logging.LogRecord("pykubeproxy", level, "/x/cli.py", 42, message, None, None)


def test_json_log_lines_have_component_bases_keys() -> None:
    line = json.loads(JsonFormatter().format(record(logging.INFO, "hello")))
    assert list(line) == ["ts", "caller", "msg", "v"] and line["caller"] == "cli.py:42"
    assert line["v"] == 0 and line["ts"] > 1e12  # milliseconds
    assert "v" not in json.loads(JsonFormatter().format(record(logging.ERROR, "bad")))
    assert KlogFormatter().format(record(logging.WARNING, "careful")).startswith("W")


# --- the command's actions


def test_version_is_printed_before_the_configuration_is_read(
    capsys: pytest.CaptureFixture[str],
) -> None:
    assert cli.main(["--version", "--config", "/nonexistent"]) == 0
    assert capsys.readouterr().out.startswith("pykubeproxy v")


def test_write_config_to_writes_the_effective_configuration(tmp_path: Path) -> None:
    target = tmp_path / "out.yaml"
    assert cli.main(["--write-config-to", str(target), "--proxy-mode", "ipvs"]) == 0
    written = yaml.safe_load(target.read_text())
    assert written["apiVersion"] == kpc.API_VERSION and written["mode"] == "ipvs"
    assert written["metricsBindAddress"] == "127.0.0.1:10249"


def test_a_bad_setting_is_one_line_and_exit_1(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["--proxy-mode", "nftables"]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "this build has: iptables, ipvs" in err
