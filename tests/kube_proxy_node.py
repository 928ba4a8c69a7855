"""The agent in the Lab as kubeadm's kube-proxy DaemonSet runs it: ConfigMap and account.

The agent gets a mount namespace of its own (a wrapper that ends by exec'ing it): the
ConfigMap's config.conf and kubeconfig.conf at /var/lib/kube-proxy (a private /var/lib), the
service account's token and CA under a private /run (/var/run links there), and the host-wide
nf_conntrack_max and conntrack hashsize replaced by files of the test, so that what the agent
decides to write there is seen and the host's values are never touched.
"""

from __future__ import annotations

import shutil
from pathlib import Path

from upstream_configmaps import configmap

from pykubeproxy.sandbox.lab import Lab

TOKEN = "kube-proxy-token"
CONFIG_FLAG = "--config=/var/lib/kube-proxy/config.conf"  # kubeadm's kube-proxy command
NETFILTER = Path("/proc/sys/net/netfilter")
HASHSIZE = Path("/sys/module/nf_conntrack/parameters/hashsize")


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
