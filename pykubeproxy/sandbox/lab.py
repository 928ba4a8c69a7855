"""A whole sandbox node: netns cluster, API server double, and the real agent process.

The end-to-end tests and `make demo` both use this: the API double listens on
127.0.0.1:6443 *inside* the node namespace (its socket is created there), the
`pykubeproxy` process runs inside the node namespace against it, and pods and
clients are namespaces that answer with their names. Nothing touches the root
namespace, and `close()` removes everything, rules included.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from types import TracebackType
from typing import Any, Self

from pykubeproxy.sandbox.apiserver import ApiServerDouble
from pykubeproxy.sandbox.netns import Cluster, NetNS

NODE_NAME = "node-1"
API_PORT = 6443
METRICS_URL = "http://127.0.0.1:10249/metrics"
HEALTHZ_URL = "http://127.0.0.1:10256/healthz"


def service(
    name: str,
    cluster_ip: str,
    port: int,
    target_port: int,
    *,
    namespace: str = "default",
    protocol: str = "TCP",
    node_port: int = 0,
    **spec: Any,
) -> dict[str, Any]:
    """A Service object as a user would create it."""
    ports: dict[str, Any] = {
        "name": "p",
        "port": port,
        "targetPort": target_port,
        "protocol": protocol,
    }
    if node_port:
        ports["nodePort"] = node_port
        spec.setdefault("type", "NodePort")
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {"namespace": namespace, "name": name},
        "spec": {"type": "ClusterIP", "clusterIP": cluster_ip, "ports": [ports], **spec},
    }


def endpoint_slice(
    service_name: str,
    ips: list[str],
    port: int,
    *,
    namespace: str = "default",
    protocol: str = "TCP",
    name: str | None = None,
) -> dict[str, Any]:
    """An EndpointSlice as the EndpointSlice controller would write it."""
    return {
        "apiVersion": "discovery.k8s.io/v1",
        "kind": "EndpointSlice",
        "metadata": {
            "namespace": namespace,
            "name": name or f"{service_name}-x1",
            "labels": {"kubernetes.io/service-name": service_name},
        },
        "addressType": "IPv4",
        "endpoints": [
            {"addresses": [ip], "conditions": {"ready": True}, "nodeName": NODE_NAME} for ip in ips
        ],
        "ports": [{"name": "p", "port": port, "protocol": protocol}],
    }


def http_get(ns: NetNS, url: str, timeout: float = 5.0) -> tuple[int, str]:
    """GET a URL from inside a namespace; status 0 (and the error) when nothing answers."""
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))

    def get() -> tuple[int, str]:
        try:
            with opener.open(url, timeout=timeout) as response:
                return response.status, response.read().decode()
        except urllib.error.HTTPError as err:
            return err.code, err.read().decode()
        except OSError as err:
            return 0, str(err)

    return ns.run_inside(get, timeout=timeout + 5.0)


def samples(text: str) -> dict[str, float]:
    """Prometheus exposition text as {sample line name with labels: value}.

    A sample name with a single series is also found by its bare name: most of kube-proxy's
    metrics carry just ``ip_family``, and this agent has one family.
    """
    found: dict[str, float] = {}
    series: dict[str, list[float]] = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, _, value = line.rpartition(" ")
            found[name] = float(value)
            series.setdefault(name.partition("{")[0], []).append(float(value))
    for bare, values in series.items():
        if len(values) == 1:
            found.setdefault(bare, values[0])
    return found


class Lab:
    """Cluster + API double + agent; use as a context manager.

    ``api_tls`` and ``api_token`` make the double serve HTTPS with a throwaway CA and demand
    that bearer token (the kubeconfig carries both), as a real API server does.
    """

    def __init__(
        self,
        agent_args: tuple[str, ...] = (),
        *,
        api_tls: bool = False,
        api_token: str | None = None,
    ) -> None:
        self.cluster = Cluster()
        self.agent_args = agent_args
        self.api_tls = api_tls
        self.api_token = api_token
        self.api: ApiServerDouble | None = None
        self.agent: subprocess.Popen[bytes] | None = None
        self._tmp = tempfile.TemporaryDirectory(prefix="pkp-lab-")
        self.kubeconfig = Path(self._tmp.name) / "kubeconfig"
        self.log_path = Path(self._tmp.name) / "agent.log"

    def __enter__(self) -> Self:
        try:
            self.cluster.start()
            sock = self.cluster.node.socket()
            sock.bind(("127.0.0.1", API_PORT))
            self.api = ApiServerDouble(sock=sock, tls=self.api_tls, token=self.api_token).start()
            self.api.write_kubeconfig(self.kubeconfig)
            self.api.create("nodes", {"metadata": {"name": NODE_NAME}})
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(
        self, et: type[BaseException] | None, ev: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    @property
    def server(self) -> ApiServerDouble:
        assert self.api is not None
        return self.api

    def start_agent(
        self,
        *extra: str,
        kubeconfig: bool = True,
        env: Mapping[str, str] | None = None,
        wrapper: Sequence[str] = (),
    ) -> subprocess.Popen[bytes]:
        """Start `python -m pykubeproxy` inside the node namespace (log in self.log_path).

        For the in-cluster configuration: ``kubeconfig=False`` leaves out --kubeconfig, ``env``
        adds variables (KUBERNETES_SERVICE_HOST ...), and ``wrapper`` is a command prefix that
        ends by exec'ing its arguments, e.g. one that mounts the service-account files in a
        mount namespace of the agent's own.
        """
        argv = [
            *wrapper,
            sys.executable,
            "-m",
            "pykubeproxy",
            *(("--kubeconfig", str(self.kubeconfig)) if kubeconfig else ()),
            "--hostname-override",
            NODE_NAME,
            "--cluster-cidr",
            self.cluster.cluster_cidr,
            "--iptables-min-sync-period",
            "100ms",
            *self.agent_args,
            *extra,
        ]
        log = open(self.log_path, "ab")  # noqa: SIM115 - the child owns it
        self.agent = self.cluster.node.popen(
            argv,
            stdout=log,
            stderr=subprocess.STDOUT,
            env={**os.environ, **env} if env is not None else None,
        )
        log.close()
        return self.agent

    def stop_agent(self, sig: int = signal.SIGTERM, timeout: float = 10.0) -> int:
        """Signal the agent and wait for it; returns its exit code."""
        assert self.agent is not None
        self.agent.send_signal(sig)
        code = self.agent.wait(timeout)
        self.agent = None
        return code

    def agent_log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def nat_rules(self) -> str:
        return str(self.cluster.node.exec(["iptables-legacy-save", "-t", "nat"]).stdout)

    def fetch(self, url: str) -> tuple[int, str]:
        """GET a URL from inside the node namespace; status 0 when nothing listens."""
        return http_get(self.cluster.node, url)

    def metrics(self) -> dict[str, float]:
        """The agent's Prometheus samples, keyed by their exposition line name."""
        status, text = self.fetch(METRICS_URL)
        return samples(text) if status == 200 else {}

    def healthz(self) -> tuple[int, dict[str, Any]]:
        status, body = self.fetch(HEALTHZ_URL)
        return status, json.loads(body) if status else {}

    def synced(self) -> bool:
        """Whether the agent has finished a sync (its last-sync timestamp is set)."""
        return self.metrics().get("kubeproxy_sync_proxy_rules_last_timestamp_seconds", 0) > 0

    def wait_for(self, what: str, predicate: Callable[[], bool], timeout: float = 20.0) -> None:
        """Poll `predicate` until true; fail with the agent's log tail if it never is."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if predicate():
                return
            if self.agent is not None and self.agent.poll() is not None:
                break
            time.sleep(0.1)
        tail = "\n".join(self.agent_log().splitlines()[-30:])
        raise AssertionError(f"timed out waiting for {what}; agent log:\n{tail}")

    def close(self) -> None:
        if self.agent is not None and self.agent.poll() is None:
            self.stop_agent(signal.SIGKILL)
        if self.api is not None:
            self.api.stop()
        self.cluster.close()
        self._tmp.cleanup()
