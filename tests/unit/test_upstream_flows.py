"""Upstream kube-proxy's packet-flow tests, run against our rendered rules.

Each case of `upstream_flows` is rendered the way the agent would render it
(change trackers → Renderer → iptables-restore text with the built-in chain
jumps) and every expected flow is traced through the result.
"""

from __future__ import annotations

from ipaddress import IPv4Address, IPv6Address, ip_address, ip_interface, ip_network

import pytest
import upstream_flows as upstream

from pykubeproxy.changes import EndpointsChangeTracker, ServiceChangeTracker
from pykubeproxy.iptables.render import LocalDetector, RenderConfig, Renderer
from pykubeproxy.iptables.ruleset import restore_text
from pykubeproxy.iptables.trace import Packet, Ruleset, parse, trace
from pykubeproxy.model import IPAddress, NamespacedName, NodeFacts


def node_port_ips(settings: upstream.Settings) -> tuple[IPAddress, ...] | None:
    """The fake node's addresses that --nodeport-addresses selects (None: all local ones)."""
    version = 6 if settings.family == "IPv6" else 4
    cidrs = [ip_network(c) for c in settings.node_port_addresses]
    cidrs = [c for c in cidrs if c.version == version]
    if not cidrs:
        return None
    addresses = [ip_interface(a).ip for a in upstream.NODE_INTERFACE_ADDRESSES]
    return tuple(a for a in addresses if any(a in c for c in cidrs))


def render_config(settings: upstream.Settings) -> RenderConfig:
    """Upstream's proxier settings as a RenderConfig."""
    cidr = settings.cluster_cidr
    return RenderConfig(
        local_detector=LocalDetector.by_cidr(ip_network(cidr)) if cidr else None,
        masquerade_all=settings.masquerade_all,
        masquerade_bit=int(settings.masquerade_mark, 16).bit_length() - 1,
        localhost_nodeports=settings.localhost_nodeports,
        ipv6=settings.family == "IPv6",
    )


def node_facts(settings: upstream.Settings) -> NodeFacts:
    return NodeFacts(
        name=settings.node_name,
        zone=settings.node_labels.get("topology.kubernetes.io/zone", ""),
        ip=ip_address(settings.node_ip),
        nodeport_ips=node_port_ips(settings),
    )


def render(case: upstream.Case) -> Ruleset:
    family = IPv6Address if case.settings.family == "IPv6" else IPv4Address
    services, endpoints = ServiceChangeTracker(family), EndpointsChangeTracker(family)
    for svc in case.services:
        meta = svc["metadata"]
        services.update(NamespacedName(meta["namespace"], meta["name"]), svc)
    for eps in case.slices:
        meta = eps["metadata"]
        owner = NamespacedName(meta["namespace"], meta["labels"]["kubernetes.io/service-name"])
        endpoints.update(owner, meta["name"], eps)
    services.apply()
    endpoints.apply()
    renderer = Renderer(render_config(case.settings))
    rendered = renderer.render(
        services.service_map, endpoints.endpoints_map, node=node_facts(case.settings)
    )
    return parse(restore_text(rendered.tables, with_jumps=True))


PARAMS = [
    pytest.param(
        case,
        flow,
        id=f"{case.test}::{flow.name}",
    )
    for case in upstream.CASES
    for flow in case.flows
]


@pytest.mark.parametrize(("case", "flow"), PARAMS)
def test_upstream_flow(case: upstream.Case, flow: upstream.Flow) -> None:
    packet = Packet(
        ip_address(flow.source), ip_address(flow.destination), flow.port, flow.protocol.lower()
    )
    result = trace(render(case), packet, upstream.TRACER_LOCAL_IPS)
    matched = "\n".join(f"  {s.table}/{s.chain}#{s.number}: {s.rule}" for s in result.matches)
    assert (result.output, result.masquerade) == (flow.output, flow.masq), f"matched:\n{matched}"
    assert result.assumptions == ()
