"""Partial syncs write only what changed while the kernel's table is as the agent left it.

The applier remembers its last commit and the table's size right after it; these tests
check, in a namespace of their own, that a partial sync with nothing new touches nothing,
that a changed Service costs only its own chains, and that any other writer's change to the
table makes the next sync check and rewrite everything it was asked to, as before.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from ipaddress import IPv4Address
from typing import Any

import iptc
import pytest

from pykubeproxy.backend import KeptChainMissing
from pykubeproxy.iptables.applier import IptcApplier
from pykubeproxy.iptables.render import RenderConfig, Renderer
from pykubeproxy.iptables.ruleset import TableState
from pykubeproxy.model import (
    Endpoint,
    EndpointsMap,
    NamespacedName,
    Protocol,
    ServicePort,
    ServicePortMap,
    ServicePortName,
)
from pykubeproxy.sandbox.netns import NetNS

pytestmark = [
    pytest.mark.kernel,
    pytest.mark.skipif(os.geteuid() != 0, reason="needs root and network namespaces"),
]


def cluster(count: int) -> tuple[ServicePortMap, EndpointsMap]:
    services: ServicePortMap = {}
    endpoints: EndpointsMap = {}
    for i in range(count):
        name = ServicePortName(NamespacedName("default", f"svc-{i}"), "p", Protocol.TCP)
        services[name] = ServicePort(name, IPv4Address(0x0A600000 + i + 1), 80)
        endpoints[name] = (Endpoint(IPv4Address(0x0AF40000 + 2 * i + 2), 8080),)
    return services, endpoints


class Node:
    """A namespace, the applier and renderer the agent would use, and the kernel's view."""

    def __init__(self, ns: NetNS, lock_path: str) -> None:
        self.ns = ns
        self.applier = IptcApplier(lock_path)
        self.renderer = Renderer(RenderConfig())
        self.commits: list[str] = []

    def sync(self, services: ServicePortMap, endpoints: EndpointsMap, **kw: Any) -> None:
        tables = self.renderer.render(services, endpoints, **kw).tables
        self.ns.run_inside(lambda: self.apply(tables))

    def apply(self, tables: list[TableState]) -> None:
        commit = iptc.Table.commit

        def counted(table: Any) -> None:
            self.commits.append(table.name)
            commit(table)

        iptc.Table.commit = counted
        try:
            self.applier.apply(tables)
        finally:
            iptc.Table.commit = commit

    def save(self) -> str:
        return "\n".join(
            line
            for line in str(self.ns.exec(["iptables-legacy-save", "-t", "nat"]).stdout).splitlines()
            if line.startswith(("-A", ":KUBE"))
        )


@pytest.fixture
def node(tmp_path: Any) -> Iterator[Node]:
    with NetNS("applier-mem") as ns:
        yield Node(ns, str(tmp_path / "xtables.lock"))


def test_a_partial_sync_with_nothing_new_leaves_the_kernel_alone(node: Node) -> None:
    services, endpoints = cluster(20)
    node.sync(services, endpoints)
    saved = node.save()
    node.commits.clear()
    node.sync(services, endpoints, rewrite=set())
    assert node.commits == [] and node.save() == saved


def test_a_changed_service_is_what_a_full_sync_would_write(node: Node) -> None:
    services, endpoints = cluster(20)
    node.sync(services, endpoints)
    changed = next(iter(services))
    moved = {**endpoints, changed: (Endpoint(IPv4Address("10.250.0.9"), 8080),)}
    node.commits.clear()
    node.sync(services, moved, rewrite={changed})
    assert node.commits == ["nat"]  # filter and mangle hold nothing new
    partial = node.save()
    assert "10.250.0.9:8080" in partial
    fresh = Node(node.ns, node.applier.lock_path)
    fresh.sync(services, moved)  # a full sync of the same state over it
    assert fresh.save() == partial


def test_another_writers_change_makes_the_next_sync_check_everything(node: Node) -> None:
    services, endpoints = cluster(20)
    node.sync(services, endpoints)
    node.ns.exec(["iptables-legacy", "-t", "nat", "-F", "KUBE-SERVICES"])
    node.sync(services, endpoints, rewrite=set())  # nothing changed in the API: still repaired
    assert node.save().count("-A KUBE-SERVICES") == 21  # 20 Services and the NodePorts jump
    kept = next(line.split()[1] for line in node.save().splitlines() if "-A KUBE-SEP-" in line)
    node.ns.exec(["iptables-legacy", "-t", "nat", "-F", kept])
    with pytest.raises(KeptChainMissing):
        node.sync(services, endpoints, rewrite=set())
