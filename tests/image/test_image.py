"""The container image, built here and run the way a node runs it, against the API double.

A private dockerd (own socket, exec-root and pidfile; ``--iptables=false --ip6tables=false
--ip-forward=false --bridge=none``, so the machine's netfilter, interfaces and sysctls stay as
they are, which the module checks) builds ``pykubeproxy:dev`` with ``make image`` on a Debian
base made by ``scripts/make-base-image`` (debootstrap; no Docker Hub). Then the agent runs as
the container's PID 1 with only NET_ADMIN and NET_RAW, in the network namespace of a holder
container (``--network none``) where the test also binds the API double. The holder outlives
the agent, so the rules can be read after the agent has gone.

Needs root, docker.io and debootstrap (``scripts/install-system-deps``): skipped without
them, except in CI (``CI`` set), where that fails. The first run takes a minute or two
(debootstrap ~30 s, image build ~45 s on 2 cores), later ones ~25 s, thanks to a cache
(``PKP_IMAGE_CACHE``, default ``/var/cache/pykubeproxy-image-test``; CI may keep it between
runs, ``rm -rf`` reclaims it):

* ``base-<hash of scripts/make-base-image>.tar``: the debootstrapped root filesystem, remade
  only when the script changes;
* ``docker/``: the daemon's data-root, which keeps the imported base and the Dockerfile's apt
  layers. The test removes its containers, older base images and dangling images each run;
  ``pykubeproxy:dev`` and ``pykubeproxy-base:bookworm-<hash>`` stay, as the build cache.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from pykubeproxy.sandbox.apiserver import ApiServerDouble, listening_socket_in
from pykubeproxy.sandbox.lab import API_PORT, NODE_NAME, endpoint_slice, service

pytestmark = [
    pytest.mark.image,
    pytest.mark.skipif(os.geteuid() != 0, reason="needs root (dockerd, debootstrap)"),
]

REPO = Path(__file__).resolve().parents[2]
BASE_SCRIPT = REPO / "scripts" / "make-base-image"
CACHE = Path(os.environ.get("PKP_IMAGE_CACHE", "/var/cache/pykubeproxy-image-test"))
IMAGE = "pykubeproxy:dev"
BASE_REPOSITORY = "pykubeproxy-base"
# Short, fixed paths: containerd's sockets live under the exec-root, and unix socket paths
# are limited to 108 bytes.
SOCKET = Path("/run/pkp-docker.sock")
EXEC_ROOT = Path("/run/pkp-docker")
PIDFILE = Path("/run/pkp-docker.pid")
TRUST_KEY = Path("/etc/docker/key.json")  # dockerd 20.10 makes one if there is none
LABEL = "pykubeproxy-image-test"
TOKEN = "image-test-token"
STOP_WITHIN = 2.0  # seconds from `docker stop` to a stopped agent


def tools() -> dict[str, str]:
    """Paths of the programs this module needs: a missing one skips, or fails in CI."""
    found = {name: shutil.which(name) for name in ("dockerd", "docker", "debootstrap", "nsenter")}
    missing = sorted(name for name, path in found.items() if path is None)
    if missing:
        message = f"{', '.join(missing)} missing (scripts/install-system-deps installs them)"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    return {name: str(path) for name, path in found.items()}


def root_network() -> dict[str, str]:
    """What our dockerd must leave alone in the root namespace (read only)."""
    commands = {
        "links": ["ip", "-o", "link"],
        "routes": ["ip", "-o", "route"],
        "iptables": ["iptables-legacy-save"],
        "nftables": ["nft", "list", "ruleset"],
    }
    state = {
        name: subprocess.run(argv, capture_output=True, text=True, check=False).stdout
        for name, argv in commands.items()
    }
    state["iptables"] = re.sub(r"(?m)^#.*\n", "", state["iptables"])  # dated comments
    # A built-in chain's packet counters move with any traffic the node sees, loopback
    # included, once its legacy table exists in the root namespace: they are not rules.
    state["iptables"] = re.sub(r"(?m)^(:\S+ \S+) \[\d+:\d+\]$", r"\1", state["iptables"])
    state["ip_forward"] = Path("/proc/sys/net/ipv4/ip_forward").read_text()
    return state


def mounts_under(directory: Path) -> list[str]:
    lines = Path("/proc/self/mountinfo").read_text().splitlines()
    targets = (line.split()[4] for line in lines)
    return [t for t in targets if t == str(directory) or t.startswith(f"{directory}/")]


class Docker:
    """A dockerd of our own, and its CLI (which never writes to ~/.docker)."""

    def __init__(self, paths: dict[str, str], workdir: Path) -> None:
        self.paths = paths
        self.workdir = workdir
        self.log_path = workdir / "dockerd.log"
        self.env = {
            **os.environ,
            "DOCKER_HOST": f"unix://{SOCKET}",
            "DOCKER_CONFIG": str(workdir / "cli"),
            # The classic builder: `--network host` works with it everywhere, whereas a newer
            # CLI with buildx would need the daemon to grant BuildKit's network.host.
            "DOCKER_BUILDKIT": "0",
        }
        self.process: subprocess.Popen[bytes] | None = None
        self.made_trust_key = False

    def start(self) -> None:
        if SOCKET.exists() or PIDFILE.exists():
            pytest.fail(
                f"{SOCKET} or {PIDFILE} exists: another image test's dockerd is running, or a "
                f"crashed one left them (then stop its pid from {PIDFILE} and remove both)"
            )
        self.made_trust_key = not TRUST_KEY.exists()
        (CACHE / "docker").mkdir(parents=True, exist_ok=True)
        argv = [
            self.paths["dockerd"],
            "--iptables=false",
            "--ip6tables=false",
            "--ip-forward=false",
            "--ip-masq=false",
            "--bridge=none",
            f"--data-root={CACHE / 'docker'}",
            f"--exec-root={EXEC_ROOT}",
            f"--pidfile={PIDFILE}",
            f"--host=unix://{SOCKET}",
            f"--config-file={self.workdir / 'daemon.json'}",  # not /etc/docker/daemon.json
        ]
        (self.workdir / "daemon.json").write_text("{}\n")
        with open(self.log_path, "wb") as log:
            # Own session: stop() can end dockerd and the containerd it starts, together.
            self.process = subprocess.Popen(
                argv, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
            )
        deadline = time.monotonic() + 60
        while self("version", check=False, timeout=10).returncode != 0:
            if self.process.poll() is not None or time.monotonic() > deadline:
                raise AssertionError(f"dockerd did not start:\n{self.log_tail()}")
            time.sleep(0.5)

    def __call__(
        self, *args: str, check: bool = True, timeout: float = 120
    ) -> subprocess.CompletedProcess[str]:
        done = subprocess.run(
            [self.paths["docker"], *args],
            env=self.env,
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )
        if check and done.returncode != 0:
            raise AssertionError(f"docker {' '.join(args)}: {done.stderr.strip()}")
        return done

    def remove_test_containers(self) -> None:
        """Ours only (by label), also those of a crashed earlier run."""
        ids = self("ps", "-aq", "--filter", f"label={LABEL}").stdout.split()
        if ids:
            self("rm", "-f", *ids)

    def stop(self) -> None:
        """Containers first, then the daemon (politely, then its whole session)."""
        if self.process is None:
            return
        try:
            if self.process.poll() is None:
                self.remove_test_containers()
                self("image", "prune", "-f")
        finally:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait(timeout=10)
            self.process = None
            self.remove_leftovers()

    def remove_leftovers(self) -> None:
        """What a stopped dockerd leaves: its exec-root, where the root network namespace
        stays bound (netns/default), and a trust key it made."""
        for target in sorted(mounts_under(EXEC_ROOT), reverse=True):
            subprocess.run(["umount", "--lazy", target], check=False)
        if not mounts_under(EXEC_ROOT):  # never delete through a mount
            shutil.rmtree(EXEC_ROOT, ignore_errors=True)
        SOCKET.unlink(missing_ok=True)
        PIDFILE.unlink(missing_ok=True)
        if self.made_trust_key:
            TRUST_KEY.unlink(missing_ok=True)

    def log_tail(self, lines: int = 30) -> str:
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])


@pytest.fixture(scope="module")
def docker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Docker]:
    paths = tools()
    before = root_network()
    daemon = Docker(paths, tmp_path_factory.mktemp("docker"))
    try:
        daemon.start()
        daemon.remove_test_containers()
        yield daemon
    finally:
        daemon.stop()
    assert root_network() == before, "the root network namespace changed"


def base_image(docker: Docker) -> str:
    """The debootstrapped base, from the cache when the script has not changed since."""
    key = hashlib.sha256(BASE_SCRIPT.read_bytes()).hexdigest()[:16]
    tag = f"{BASE_REPOSITORY}:bookworm-{key}"
    tarball = CACHE / f"base-{key}.tar"
    if not tarball.exists():
        partial = tarball.with_suffix(".partial")
        done = subprocess.run(
            [str(BASE_SCRIPT), "--output", str(partial)],
            capture_output=True,
            text=True,
            timeout=900,
        )
        assert done.returncode == 0, f"make-base-image failed:\n{done.stderr[-3000:]}"
        for stale in CACHE.glob("base-*.tar"):
            stale.unlink()
        partial.rename(tarball)
    if docker("image", "inspect", tag, check=False).returncode != 0:
        docker("import", str(tarball), tag, timeout=300)
    listed = docker("images", BASE_REPOSITORY, "--format", "{{.Repository}}:{{.Tag}}").stdout
    stale_tags = [t for t in listed.split() if t != tag]
    if stale_tags:
        docker("rmi", *stale_tags)
    return tag


@pytest.fixture(scope="module")
def image(docker: Docker) -> str:
    """pykubeproxy:dev, built by `make image` (this interpreter builds the wheelhouse)."""
    base = base_image(docker)
    done = subprocess.run(
        [
            "make",
            "-C",
            str(REPO),
            "image",
            f"IMAGE_PY={sys.executable}",
            f"DOCKER={docker.paths['docker']}",
            f"BASE_IMAGE={base}",
            f"IMAGE={IMAGE}",
        ],
        env=docker.env,
        capture_output=True,
        text=True,
        timeout=1200,
    )
    assert done.returncode == 0, f"make image failed:\n{(done.stdout + done.stderr)[-4000:]}"
    return IMAGE


def normalized(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def locked_versions() -> dict[str, str]:
    """requirements.lock's pins, but pip's: the build runs pip, the image does not hold it."""
    pins = {}
    for line in (REPO / "requirements.lock").read_text().splitlines():
        name, sep, version = line.partition("==")
        if sep and not line.startswith("#"):
            pins[normalized(name)] = version
    del pins["pip"]
    return pins


INSPECT_IMAGE = """
import importlib.metadata, importlib.util, json, shutil, subprocess, sys, iptc
tools = ["pykubeproxy", "iptables-legacy-save", "nft", "ip", "ipset", "ipvsadm", "conntrack",
         "modprobe", "pip"]
print(json.dumps({
    "python": sys.version_info[:2],
    "missing": [tool for tool in tools if not shutil.which(tool)],
    "iptables": subprocess.run(["iptables", "--version"], capture_output=True, text=True).stdout,
    "packages": {d.metadata["Name"]: d.version for d in importlib.metadata.distributions()},
    "sandbox": importlib.util.find_spec("pykubeproxy.sandbox") is not None,
}))
"""


def test_image_holds_the_agent_its_tools_and_exactly_the_locked_packages(
    docker: Docker, image: str
) -> None:
    done = docker(
        "run", "--rm", "--network=none", "--entrypoint=python3", image, "-c", INSPECT_IMAGE
    )
    found = json.loads(done.stdout)
    assert found["python"] == [3, 11]
    assert found["missing"] == ["pip"]  # every tool, and no installer
    assert "legacy" in found["iptables"]
    installed = {normalized(name): version for name, version in found["packages"].items()}
    assert installed.pop("pykubeproxy") == "0.1.0"
    assert installed == locked_versions()
    assert found["sandbox"] is False  # the tests' API double, netns and VM code stay out


def host_pid(docker: Docker, container: str) -> int:
    """The host pid of the container's PID 1."""
    return int(docker("inspect", "--format", "{{.State.Pid}}", container).stdout)


def nat_rules(pid: int) -> str:
    """iptables-legacy-save -t nat in the network namespace of a (host) pid."""
    return subprocess.run(
        ["nsenter", f"--net=/proc/{pid}/ns/net", "iptables-legacy-save", "-t", "nat"],
        capture_output=True,
        text=True,
        check=True,
        timeout=30,
    ).stdout


def api_socket_in(pid: int) -> socket.socket:
    """The API double's listening socket, made inside the network namespace of a pid."""
    fd = os.open(f"/proc/{pid}/ns/net", os.O_RDONLY | os.O_CLOEXEC)
    try:
        return listening_socket_in(fd, socket.AF_INET, ("127.0.0.1", API_PORT))
    finally:
        os.close(fd)


def test_agent_runs_as_pid_1_programs_rules_and_leaves_them_on_sigterm(
    docker: Docker, image: str, tmp_path: Path
) -> None:
    holder, agent = f"pkp-holder-{os.getpid()}", f"pkp-agent-{os.getpid()}"
    run = ["run", "--detach", f"--label={LABEL}"]
    docker(*run, f"--name={holder}", "--network=none", "--entrypoint=sleep", image, "infinity")
    netns = host_pid(docker, holder)
    with ApiServerDouble(sock=api_socket_in(netns), tls=True, token=TOKEN) as api:
        kubeconfig = api.write_kubeconfig(tmp_path / "kubeconfig")
        api.create("nodes", {"metadata": {"name": NODE_NAME}})
        api.create("services", service("web", "10.96.0.10", 80, 8080))
        api.create("endpointslices", endpoint_slice("web", ["10.244.0.2"], 8080))
        # Only what the netfilter work needs. The DaemonSet is privileged for route_localnet
        # (/proc/sys is read-only here), so localhost NodePorts are off.
        capabilities = ["--cap-drop=ALL", "--cap-add=NET_ADMIN", "--cap-add=NET_RAW"]
        mount = f"--volume={kubeconfig}:/etc/pykubeproxy/kubeconfig:ro"
        flags = [
            "--kubeconfig=/etc/pykubeproxy/kubeconfig",
            f"--hostname-override={NODE_NAME}",
            "--iptables-localhost-nodeports=false",
            "--iptables-min-sync-period=100ms",
        ]
        docker(*run, f"--name={agent}", f"--network=container:{holder}", *capabilities, mount,
               image, *flags)  # fmt: skip

        pid = host_pid(docker, agent)
        ns_pids = Path(f"/proc/{pid}/status").read_text().split("NSpid:")[1].split("\n")[0]
        assert ns_pids.split()[-1] == "1", "the agent is not the container's PID 1"
        assert b"pykubeproxy" in Path(f"/proc/{pid}/cmdline").read_bytes()
        deadline = time.monotonic() + 60
        while "KUBE-SVC-" not in nat_rules(netns):
            if time.monotonic() > deadline:
                logs = docker("logs", "--tail=20", agent).stderr
                pytest.fail(f"no Service rules within a minute; agent log:\n{logs}")
            time.sleep(0.2)
        assert {(r.method, r.path) for r in api.requests} >= {
            ("GET", "/api/v1/services"),
            ("GET", "/apis/discovery.k8s.io/v1/endpointslices"),
            ("GET", "/api/v1/nodes"),
        }

        started = time.monotonic()
        docker("stop", "--time=5", agent)
        took = time.monotonic() - started
        exit_code = docker("inspect", "--format", "{{.State.ExitCode}}", agent).stdout.strip()
        logs = docker("logs", agent).stderr
        assert exit_code == "0", logs
        assert took < STOP_WITHIN, f"the agent took {took:.1f}s to stop"
        assert "received SIGTERM; leaving the rules in place" in logs
        rules = nat_rules(netns)
        assert '"default/web:p cluster IP"' in rules and "KUBE-SVC-" in rules
    docker("rm", "--force", agent, holder)
