"""Switching between iptables and IPVS mode leaves no rules of the other mode behind.

Only the iptables half of IPVS mode (and its ipsets) is exercised here: this
host's kernel has ipsets but no ip_vs; the IPVS half runs in the VM tests.
"""

from __future__ import annotations

import logging
import os
import shutil
from collections.abc import Iterator
from ipaddress import ip_address

import objects as o
import pytest

from pykubeproxy.changes import EndpointsChangeTracker, ServiceChangeTracker
from pykubeproxy.iptables.applier import IptcApplier
from pykubeproxy.iptables.render import RenderConfig, Renderer
from pykubeproxy.ipvs import ipsets
from pykubeproxy.ipvs.netlink import Kernel
from pykubeproxy.ipvs.render import IpvsConfig, render
from pykubeproxy.ipvs.state import IPSETS
from pykubeproxy.model import NamespacedName, NodeFacts
from pykubeproxy.sandbox.netns import NetNS

pytestmark = [
    pytest.mark.kernel,
    pytest.mark.skipif(os.geteuid() != 0 or shutil.which("ipset") is None, reason="needs root"),
]
NODE_IP = ip_address("198.18.0.2")


@pytest.fixture
def node() -> Iterator[NetNS]:
    with NetNS("switch") as ns:
        yield ns


def cluster() -> tuple[ServiceChangeTracker, EndpointsChangeTracker]:
    services, endpoints = ServiceChangeTracker(), EndpointsChangeTracker()
    web = NamespacedName("default", "web")
    services.update(
        web,
        o.service(
            "default", "web", "10.96.0.10", [o.port("http", 80, nodePort=30080)], type="NodePort"
        ),
    )
    endpoints.update(
        web, "web-1", o.endpoint_slice("default", "web", ["10.244.0.2"], [o.port("http", 8080)])
    )
    services.apply()
    endpoints.apply()
    return services, endpoints


def kube_lines(node: NetNS) -> list[str]:
    save = str(node.exec(["iptables-legacy-save"]).stdout)
    return [line for line in save.splitlines() if "KUBE-" in line]


def test_iptables_to_ipvs_and_back(node: NetNS) -> None:
    services, endpoints = cluster()
    applier = IptcApplier()
    iptables_tables = (
        Renderer(RenderConfig()).render(services.service_map, endpoints.endpoints_map).tables
    )
    node.run_inside(lambda: applier.apply(iptables_tables))
    assert any("KUBE-SVC-" in line for line in kube_lines(node))

    ipvs = render(
        services.service_map,
        endpoints.endpoints_map,
        IpvsConfig(),
        NodeFacts("node-1"),
        (NODE_IP,),
        frozenset({NODE_IP}),
    )
    for spec in IPSETS:  # what the IPVS applier does first
        node.exec(["ipset", "create", spec.name, spec.type, *spec.create_args(), "-exist"])
        for entry in ipvs.state.ipsets[spec.name]:
            node.exec(["ipset", "add", spec.name, entry, "-exist"])
    ipvs_tables = ipvs.tables
    node.run_inside(lambda: applier.apply(ipvs_tables))
    lines = kube_lines(node)
    assert not any(
        name in line
        for line in lines
        for name in (
            "KUBE-SVC-",
            "KUBE-SEP-",
            "KUBE-NODEPORTS",
            "KUBE-EXTERNAL-SERVICES",
            "kubernetes load balancer firewall",
        )
    )
    assert (
        '-A INPUT -m comment --comment "kubernetes ipvs access filter" -j KUBE-IPVS-FILTER' in lines
    )
    # upstream's order at the top of INPUT; kubelet's KUBE-FIREWALL jump stays below
    input_jumps = [line.split()[-1] for line in lines if line.startswith("-A INPUT")]
    assert input_jumps[:3] == ["KUBE-IPVS-FILTER", "KUBE-PROXY-FIREWALL", "KUBE-NODE-PORT"]
    assert any("--match-set KUBE-CLUSTER-IP dst,dst -j ACCEPT" in line for line in lines)

    node.run_inside(lambda: applier.apply(iptables_tables))
    lines = kube_lines(node)
    assert any("KUBE-SVC-" in line for line in lines)
    assert not any(
        "KUBE-IPVS" in line or "match-set" in line or "KUBE-NODE-PORT " in line for line in lines
    )
    for spec in IPSETS:  # no rule references the sets any more: they can go
        node.exec(["ipset", "destroy", spec.name])
    node.run_inside(applier.cleanup)
    assert [line for line in kube_lines(node) if "KUBE-FIREWALL" not in line] == []


def test_leftover_cleanup_destroys_and_reports_only_existing_sets(
    node: NetNS, caplog: pytest.LogCaptureFixture
) -> None:
    """What iptables mode's start does about IPVS mode's sets: only those that exist go,
    only they are logged, and a set of anyone else's stays."""
    ours = [IPSETS[1], IPSETS[-1]]
    for spec in ours:
        node.exec(["ipset", "create", spec.name, spec.type, *spec.create_args()])
    node.exec(["ipset", "create", "OTHER-SET", "hash:ip"])

    def destroy() -> None:
        with Kernel() as kernel:
            ipsets.destroy_sets(kernel)

    with caplog.at_level(logging.INFO, logger="pykubeproxy.ipvs.ipsets"):
        node.run_inside(destroy)
    assert [r.getMessage() for r in caplog.records] == [
        f"cleanup: destroyed ipset {spec.name}" for spec in ours
    ]
    assert node.exec(["ipset", "list", "-n"]).stdout.split() == ["OTHER-SET"]
