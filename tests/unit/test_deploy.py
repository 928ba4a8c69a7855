"""deploy/: what `kubectl apply -k` would send, checked offline.

The kustomizations are rendered by kustomize itself, as built into kubectl (`kubectl
kustomize`; the machine image's kubectl 1.32 carries kustomize v5.5, while Debian's
kubernetes-client 1.20 is too old for `labels:` and PyPI has no kustomize for Python 3.11),
so what is tested is what an operator applies. Every rendered object must pass the
Kubernetes OpenAPI schema in strict mode (`kubernetes-validate`: unknown fields fail). The
ServiceMonitor (a CRD) and the kind Cluster have no schema there and are checked by
structure. Then the DaemonSet must agree with the agent: its command parses with the
agent's own flag and config loader, the ports and probe paths are the ones the agent
serves, the ClusterRole grants exactly the requests the agent makes (its reflectors and its
start-up Event), recorded from `pykubeproxy.kube` itself, and the agent reaches the API
server through kubeadm's kubeconfig.conf, whose endpoint is set in one file. The kubeadm
overlay mounts kubeadm's own ConfigMap (tests/upstream_configmaps.py), which must load.
"""

from __future__ import annotations

import copy
import functools
import inspect
import os
import re
import shutil
import subprocess
import threading
from importlib.metadata import entry_points
from pathlib import Path
from typing import Any, get_type_hints
from urllib.parse import parse_qs, urlsplit

import kubernetes
import kubernetes_validate  # type: ignore[import-untyped]
import pytest
import yaml
from upstream_configmaps import KUBEADM_IPTABLES, configmap

from pykubeproxy import kube
from pykubeproxy.config import load
from pykubeproxy.health import ProxyHealth
from pykubeproxy.metrics import Metrics
from pykubeproxy.web import parse_bind_address

DEPLOY = Path(__file__).resolve().parents[2] / "deploy"
KUBERNETES_VERSION = "1.34"  # the schemas checked against; kubernetes-validate ships them
NAMESPACE = "kube-system"
NAME_LABEL = {"app.kubernetes.io/name": "pykubeproxy"}
UPSTREAM_LABEL = {"k8s-app": "kube-proxy"}  # kubeadm's kube-proxy DaemonSet and pods
MOUNT = "/var/lib/kube-proxy"  # where kubeadm mounts kube-proxy's ConfigMap
# kustomization directory -> the proxy mode its ConfigMap must give
VARIANTS = {".": "iptables", "overlays/ipvs": "ipvs"}

Obj = dict[str, Any]


@functools.cache
def kustomize(directory: Path) -> tuple[Obj, ...]:
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        if os.environ.get("CI"):
            pytest.fail("kubectl (for `kubectl kustomize`) is not installed")
        pytest.skip("kubectl (for `kubectl kustomize`) is not installed")
    done = subprocess.run(
        [kubectl, "kustomize", str(directory)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    return tuple(doc for doc in yaml.safe_load_all(done.stdout) if doc)


def read_yaml(path: Path) -> list[Obj]:
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc]


def the(objs: tuple[Obj, ...] | list[Obj], kind: str) -> Obj:
    [obj] = [o for o in objs if o["kind"] == kind]
    return obj


def container(daemonset: Obj) -> Obj:
    containers: list[Obj] = daemonset["spec"]["template"]["spec"]["containers"]
    [c] = containers
    return c


def port_number(c: Obj, name: str) -> int:
    [port] = [p["containerPort"] for p in c["ports"] if p["name"] == name]
    return int(port)


def probe_port(c: Obj, probe: str) -> int:
    port = c[probe]["httpGet"]["port"]
    return port_number(c, port) if isinstance(port, str) else int(port)


def selects(selector: dict[str, str], labels: dict[str, str]) -> bool:
    return selector.items() <= labels.items()


@pytest.fixture(params=sorted(VARIANTS))
def variant(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
def rendered(variant: str) -> tuple[Obj, ...]:
    return kustomize(DEPLOY / variant)


@pytest.fixture
def base() -> tuple[Obj, ...]:
    return kustomize(DEPLOY)


# --- the rendered objects and the schemas


def test_renders_the_agents_objects_and_nothing_else(rendered: tuple[Obj, ...]) -> None:
    kinds = sorted(
        (o["kind"], re.sub(r"-[a-z0-9]{10}$", "-<hash>", o["metadata"]["name"])) for o in rendered
    )
    assert kinds == [
        ("ClusterRole", "pykubeproxy"),
        ("ClusterRoleBinding", "pykubeproxy"),
        ("ConfigMap", "pykubeproxy-<hash>"),
        ("DaemonSet", "pykubeproxy"),
        ("ServiceAccount", "pykubeproxy"),
    ]
    for obj in rendered:
        assert selects(NAME_LABEL, obj["metadata"]["labels"]), obj["kind"]
        if not obj["kind"].startswith("Cluster"):
            assert obj["metadata"]["namespace"] == NAMESPACE, obj["kind"]
    daemonset = the(rendered, "DaemonSet")
    assert container(daemonset)["image"] == "pykubeproxy:dev"
    # Upstream's label, so that what selects kube-proxy's pods selects these.
    assert selects(UPSTREAM_LABEL, daemonset["metadata"]["labels"])
    assert selects(UPSTREAM_LABEL, daemonset["spec"]["template"]["metadata"]["labels"])
    assert not selects(daemonset["spec"]["selector"]["matchLabels"], UPSTREAM_LABEL)
    # The generated ConfigMap's hashed name reaches the volume that mounts it.
    [volume] = [v for v in daemonset["spec"]["template"]["spec"]["volumes"] if "configMap" in v]
    assert volume["configMap"]["name"] == the(rendered, "ConfigMap")["metadata"]["name"]


def test_every_object_passes_the_strict_schema(rendered: tuple[Obj, ...]) -> None:
    for obj in rendered:
        kubernetes_validate.validate(obj, KUBERNETES_VERSION, strict=True)


def test_strict_schema_catches_a_misspelled_field(base: tuple[Obj, ...]) -> None:
    daemonset = copy.deepcopy(the(base, "DaemonSet"))
    pod = daemonset["spec"]["template"]["spec"]
    pod["hostNetwrok"] = pod.pop("hostNetwork")
    with pytest.raises(kubernetes_validate.ValidationError, match="hostNetwrok"):
        kubernetes_validate.validate(daemonset, KUBERNETES_VERSION, strict=True)


def test_image_is_overridable_with_kustomize_images(tmp_path: Path) -> None:
    (tmp_path / "kustomization.yaml").write_text(
        yaml.safe_dump(
            {
                "resources": [os.path.relpath(DEPLOY, tmp_path)],  # kustomize: relative only
                "images": [{"name": "pykubeproxy", "newName": "registry.test/pkp", "newTag": "v1"}],
            }
        )
    )
    daemonset = the(kustomize(tmp_path), "DaemonSet")
    assert container(daemonset)["image"] == "registry.test/pkp:v1"


# --- the DaemonSet agrees with the agent


def agent_argv(daemonset: Obj, config_file: Path, node: str) -> list[str]:
    """The container's arguments as kubelet would expand them, the config file swapped for a
    local copy (after checking that the ConfigMap is mounted where --config points)."""
    c = container(daemonset)
    program, *args = c["command"]
    assert program in {e.name for e in entry_points(group="console_scripts")}
    [node_env] = [e for e in c["env"] if e["name"] == "NODE_NAME"]
    assert node_env["valueFrom"]["fieldRef"]["fieldPath"] == "spec.nodeName"
    [mount] = [m for m in c["volumeMounts"] if m["name"] == "config"]
    assert mount["mountPath"] == MOUNT
    mounted = f"{mount['mountPath']}/config.conf"
    assert f"--config={mounted}" in args
    return [arg.replace("$(NODE_NAME)", node).replace(mounted, str(config_file)) for arg in args]


def kubeconfig_server(text: str) -> str:
    """The server of a kubeconfig.conf, after checking it uses the pod's service account."""
    doc = yaml.safe_load(text)
    [cluster] = doc["clusters"]
    [user] = doc["users"]
    account = "/var/run/secrets/kubernetes.io/serviceaccount"
    assert cluster["cluster"]["certificate-authority"] == f"{account}/ca.crt"
    assert user["user"] == {"tokenFile": f"{account}/token"}
    return str(cluster["cluster"]["server"])


def test_command_and_config_load_with_the_agents_loader(
    variant: str, rendered: tuple[Obj, ...], tmp_path: Path
) -> None:
    config_file = tmp_path / "config.conf"
    config_file.write_text(the(rendered, "ConfigMap")["data"]["config.conf"])
    daemonset = the(rendered, "DaemonSet")
    cfg = load(agent_argv(daemonset, config_file, "kind-worker"))

    assert cfg.mode == VARIANTS[variant] and not cfg.notices
    assert cfg.hostname_override == "kind-worker"
    # kubeconfig.conf of the same ConfigMap: the control-plane endpoint, never in-cluster.
    assert cfg.kubeconfig == f"{MOUNT}/kubeconfig.conf" and cfg.master == ""
    data = the(rendered, "ConfigMap")["data"]
    assert kubeconfig_server(data["kubeconfig.conf"]) == api_server_env(DEPLOY)
    assert cfg.conntrack.max_per_core == 0  # kind nodes cannot set the host's table size
    cluster = the(read_yaml(DEPLOY / "kind" / "cluster.yaml"), "Cluster")
    assert cfg.cluster_cidr == cluster["networking"]["podSubnet"]
    c = container(daemonset)
    # Metrics on every address (scraped from outside the node), health for kubelet.
    assert parse_bind_address(cfg.metrics_bind_address) == ("0.0.0.0", port_number(c, "metrics"))
    assert parse_bind_address(cfg.healthz_bind_address) == ("0.0.0.0", port_number(c, "healthz"))
    assert probe_port(c, "livenessProbe") == probe_port(c, "readinessProbe")
    assert probe_port(c, "livenessProbe") == port_number(c, "healthz")
    annotations = daemonset["spec"]["template"]["metadata"]["annotations"]
    assert int(annotations["prometheus.io/port"]) == port_number(c, "metrics")


def api_server_env(deploy: Path) -> str:
    lines = (deploy / "base" / "api-server.env").read_text().splitlines()
    [server] = [line.partition("=")[2] for line in lines if line.startswith("server=")]
    return server


def test_the_endpoint_is_set_in_one_place(tmp_path: Path) -> None:
    """Writing api-server.env (as docs/kind.md does from `kind get kubeconfig --internal`)
    changes kubeconfig.conf in every variant, and the ConfigMap's name, so pods roll."""
    copy = tmp_path / "deploy"
    shutil.copytree(DEPLOY, copy)
    server = "https://my-cluster-control-plane:6443"
    (copy / "base" / "api-server.env").write_text(f"server={server}\n")
    for variant in VARIANTS:
        changed = the(kustomize(copy / variant), "ConfigMap")
        assert kubeconfig_server(changed["data"]["kubeconfig.conf"]) == server
        assert changed["metadata"]["name"] != the(kustomize(DEPLOY / variant), "ConfigMap")[
            "metadata"
        ]["name"]
    rendered = "".join(yaml.safe_dump_all(kustomize(DEPLOY / v)) for v in VARIANTS)
    assert "control-plane:" not in rendered  # no cluster's endpoint is built in


def test_kubeadm_overlay_mounts_kubeadms_configmap(tmp_path: Path) -> None:
    rendered = kustomize(DEPLOY / "overlays" / "kubeadm")
    assert "ConfigMap" not in {o["kind"] for o in rendered}
    daemonset = the(rendered, "DaemonSet")
    volumes = daemonset["spec"]["template"]["spec"]["volumes"]
    [volume] = [v for v in volumes if v["name"] == "config"]
    assert volume["configMap"] == {"name": "kube-proxy"}
    kubeadms = configmap(KUBEADM_IPTABLES, "https://192.0.2.1:6443")
    kubernetes_validate.validate(kubeadms, KUBERNETES_VERSION, strict=True)
    config_file = tmp_path / "config.conf"
    config_file.write_text(kubeadms["data"]["config.conf"])
    cfg = load(agent_argv(daemonset, config_file, "node-a"))
    assert cfg.mode == "iptables" and cfg.kubeconfig == f"{MOUNT}/kubeconfig.conf"
    assert kubeconfig_server(kubeadms["data"]["kubeconfig.conf"]) == "https://192.0.2.1:6443"
    for obj in rendered:
        kubernetes_validate.validate(obj, KUBERNETES_VERSION, strict=True)


def test_probes_are_the_agents_routes(base: tuple[Obj, ...]) -> None:
    c = container(the(base, "DaemonSet"))
    health = ProxyHealth(timeout=60, metrics=Metrics())
    routes = health.routes()
    live, ready = (
        routes[c[probe]["httpGet"]["path"]] for probe in ("livenessProbe", "readinessProbe")
    )
    health.node_eligible = False  # the node is being deleted
    assert live()[0] == 200  # so kubelet does not restart the agent over it
    assert ready()[0] == 503


def test_overlay_config_is_the_bases_but_for_mode() -> None:
    def without_mode(path: Path) -> Obj:
        doc: Obj = yaml.safe_load(path.read_text())
        doc.pop("mode")
        return doc

    assert without_mode(DEPLOY / "overlays" / "ipvs" / "config.conf") == without_mode(
        DEPLOY / "base" / "config.conf"
    )


class _Sent(Exception):
    """Raised by the recording API client in place of sending a request."""


def watched_kinds() -> list[kube.Kind]:
    """Every Kind that pykubeproxy.kube defines (each function there returning a Kind)."""
    kinds = []
    for _, function in inspect.getmembers(kube, inspect.isfunction):
        if function.__module__ == kube.__name__ and get_type_hints(function)["return"] is kube.Kind:
            kinds.append(function(*("node-a" for _ in inspect.signature(function).parameters)))
    return kinds


def rbac_request(method: str, url: str) -> tuple[str, str, str]:
    """(API group, resource, verb) that RBAC checks for one request."""
    parts = urlsplit(url)
    segments = parts.path.strip("/").split("/")
    # /api/v1/... is the core group ""; /apis/<group>/<version>/...
    group, rest = ("", segments[2:]) if segments[0] == "api" else (segments[1], segments[3:])
    if rest[0] == "namespaces" and len(rest) > 2:
        rest = rest[2:]
    if method == "POST":
        return group, rest[0], "create"
    assert method == "GET", (method, url)
    if len(rest) > 1:
        return group, rest[0], "get"
    watching = parse_qs(parts.query).get("watch") == ["true"]
    return group, rest[0], "watch" if watching else "list"


def agent_requests(monkeypatch: pytest.MonkeyPatch) -> set[tuple[str, str, str]]:
    """What the agent asks the API server for: each kind's list and watch, the Node read at
    start, and the Event it posts."""
    client = kubernetes.client.ApiClient(kubernetes.client.Configuration(host="http://api.test"))
    sent: list[tuple[str, str]] = []

    def call_api(method: str, url: str, *args: Any, **kwargs: Any) -> Any:
        sent.append((method, url))
        raise _Sent

    monkeypatch.setattr(client, "call_api", call_api)
    for kind in watched_kinds():
        reflector = kube.Reflector(
            client, kind, lambda key, obj: None, lambda: None, threading.Event()
        )
        for request in (reflector.list, reflector.watch):
            with pytest.raises(_Sent):
                request()
    for start_up in (
        functools.partial(kube.post_event, client, kube.starting_event("node-a")),
        functools.partial(kube.get_node, client, "node-a"),
    ):
        with pytest.raises(_Sent):
            start_up()
    return {rbac_request(method, url) for method, url in sent}


def test_cluster_role_grants_exactly_what_the_agent_requests(
    base: tuple[Obj, ...], monkeypatch: pytest.MonkeyPatch
) -> None:
    assert {k.name for k in watched_kinds()} >= {"Service", "EndpointSlice", "Node"}
    assert ("events.k8s.io", "events", "create") in agent_requests(monkeypatch)
    granted = {
        (group, resource, verb)
        for rule in the(base, "ClusterRole")["rules"]
        for group in rule["apiGroups"]
        for resource in rule["resources"]
        for verb in rule["verbs"]
    }
    assert granted == agent_requests(monkeypatch)
    binding = the(base, "ClusterRoleBinding")
    account = the(base, "ServiceAccount")["metadata"]
    assert binding["roleRef"]["name"] == the(base, "ClusterRole")["metadata"]["name"]
    assert binding["subjects"] == [
        {"kind": "ServiceAccount", "name": account["name"], "namespace": account["namespace"]}
    ]
    pod = the(base, "DaemonSet")["spec"]["template"]["spec"]
    assert pod["serviceAccountName"] == account["name"]


def test_rbac_request_mapping() -> None:
    assert rbac_request("GET", "http://h/api/v1/nodes?fieldSelector=x") == ("", "nodes", "list")
    assert rbac_request("GET", "http://h/api/v1/nodes/n1") == ("", "nodes", "get")
    assert rbac_request(
        "GET", "http://h/apis/discovery.k8s.io/v1/namespaces/ns/endpointslices?watch=true"
    ) == ("discovery.k8s.io", "endpointslices", "watch")
    assert rbac_request("POST", "http://h/apis/events.k8s.io/v1/namespaces/default/events") == (
        "events.k8s.io",
        "events",
        "create",
    )


# --- outside the main kustomization: the monitoring example and the kind cluster


def test_service_monitor_scrapes_the_agents_metrics_port(base: tuple[Obj, ...]) -> None:
    objs = read_yaml(DEPLOY / "monitoring" / "servicemonitor.yaml")
    service, monitor = the(objs, "Service"), the(objs, "ServiceMonitor")
    kubernetes_validate.validate(service, KUBERNETES_VERSION, strict=True)
    daemonset = the(base, "DaemonSet")
    pod_labels = daemonset["spec"]["template"]["metadata"]["labels"]
    assert service["spec"]["clusterIP"] == "None"
    assert selects(service["spec"]["selector"], pod_labels)
    [port] = service["spec"]["ports"]
    assert port["port"] == port_number(container(daemonset), port["targetPort"])

    assert monitor["apiVersion"] == "monitoring.coreos.com/v1"
    spec = monitor["spec"]
    assert set(spec) == {"selector", "namespaceSelector", "endpoints"}
    assert selects(spec["selector"]["matchLabels"], service["metadata"]["labels"])
    assert spec["namespaceSelector"] == {"matchNames": [service["metadata"]["namespace"]]}
    [endpoint] = spec["endpoints"]
    assert endpoint["port"] == port["name"]
    assert endpoint["path"] in Metrics().routes()


def test_kind_cluster_runs_without_kube_proxy(base: tuple[Obj, ...]) -> None:
    cluster = the(read_yaml(DEPLOY / "kind" / "cluster.yaml"), "Cluster")
    assert cluster["apiVersion"] == "kind.x-k8s.io/v1alpha4"
    assert cluster["networking"]["kubeProxyMode"] == "none"
    assert [node["role"] for node in cluster["nodes"]] == ["control-plane", "worker"]
    # The agent reaches the API server through kubeconfig.conf, not the in-cluster Service.
    env = {e["name"] for e in container(the(base, "DaemonSet"))["env"]}
    assert env == {"NODE_NAME"}
