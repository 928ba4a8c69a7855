"""The agent configured as in a Pod: no --kubeconfig, only the in-cluster service account.

kube-proxy's DaemonSet gives the agent KUBERNETES_SERVICE_HOST/PORT and the service-account
files under /var/run/secrets/kubernetes.io/serviceaccount; `kubernetes`' in-cluster loader
reads exactly those. Here the API double serves HTTPS with its own CA and demands a bearer
token, and the agent's process gets the files through a mount namespace of its own: the
host has no /var/run/secrets, and making one would change the host's filesystem, so the
agent gets a private /run (/var/run links there) holding just the service account. Its
xtables lock is then private too, which is harmless: nothing else writes the node namespace.
"""

from __future__ import annotations

import os
import shutil
import ssl
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from pykubeproxy.sandbox.lab import API_PORT, Lab, endpoint_slice, service

pytestmark = [
    pytest.mark.e2e,
    pytest.mark.skipif(
        os.geteuid() != 0 or shutil.which("unshare") is None, reason="needs root and unshare"
    ),
]

TOKEN = "in-cluster-token"
SERVICE_ACCOUNT = Path("secrets/kubernetes.io/serviceaccount")  # under /run (= /var/run)
# Runs in the agent's new mount namespace, then becomes the agent: $0 is the private /run.
PRIVATE_RUN = 'mount --bind "$0" /run && exec "$@"'


@pytest.fixture
def lab() -> Iterator[Lab]:
    with Lab(api_tls=True, api_token=TOKEN) as lab:
        yield lab


def private_run(lab: Lab, directory: Path) -> list[str]:
    """Fill `directory` as the Pod's /run would be, and return the wrapper that mounts it."""
    assert lab.server.ca_cert_path is not None
    account = directory / SERVICE_ACCOUNT
    account.mkdir(parents=True)
    (account / "token").write_text(TOKEN)
    (account / "namespace").write_text("kube-system")
    shutil.copy(lab.server.ca_cert_path, account / "ca.crt")
    unshare = ["unshare", "--mount", "--propagation=private", "--"]
    return [*unshare, "sh", "-c", PRIVATE_RUN, str(directory)]


def get_status(lab: Lab, authorization: str) -> int:
    """HTTP status of a Service list with this Authorization header, from the node namespace."""
    assert lab.server.ca_cert_path is not None
    context = ssl.create_default_context(cafile=str(lab.server.ca_cert_path))
    request = urllib.request.Request(
        f"https://127.0.0.1:{API_PORT}/api/v1/services",
        headers={"Authorization": authorization},
    )

    def get() -> int:
        try:
            with urllib.request.urlopen(request, timeout=5, context=context) as response:
                return int(response.status)
        except urllib.error.HTTPError as err:
            return err.code

    return lab.cluster.node.run_inside(get)


def test_agent_uses_the_service_account_and_the_service_host_from_the_environment(
    lab: Lab, tmp_path: Path
) -> None:
    assert get_status(lab, "Bearer not-the-token") == 401
    assert get_status(lab, f"Bearer {TOKEN}") == 200
    # kubernetes' in-cluster loader sends "bearer <token>"; the real API server takes the
    # scheme in any case (RFC 7235), the double must too.
    assert get_status(lab, f"bearer {TOKEN}") == 200
    lab.server.create("services", service("web", "10.96.0.10", 80, 8080))
    lab.server.create("endpointslices", endpoint_slice("web", ["10.244.0.2"], 8080))
    listed_before = len(lab.server.requests)
    host_token = Path("/run", SERVICE_ACCOUNT, "token")
    host_had_token = host_token.exists()  # true in a Pod (a CI runner may be one)

    lab.start_agent(
        kubeconfig=False,
        env={"KUBERNETES_SERVICE_HOST": "127.0.0.1", "KUBERNETES_SERVICE_PORT": str(API_PORT)},
        wrapper=private_run(lab, tmp_path / "run"),
    )
    lab.wait_for("the web Service's rules", lambda: "default/web:p cluster IP" in lab.nat_rules())

    assert f"api=https://127.0.0.1:{API_PORT}" in lab.agent_log()
    assert "Unauthorized" not in lab.agent_log()
    agent_requests = {(r.method, r.path) for r in lab.server.requests[listed_before:]}
    assert agent_requests >= {
        ("GET", "/api/v1/services"),
        ("GET", "/apis/discovery.k8s.io/v1/endpointslices"),
        ("GET", "/api/v1/nodes"),
    }
    assert host_token.exists() == host_had_token, "the service account leaked to the host"
    assert lab.stop_agent() == 0
