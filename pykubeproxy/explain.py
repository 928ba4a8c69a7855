"""`pykubeproxy explain`: what this node's rules do with one new connection, rule by rule.

The rules come from the kernel (see explain_kernel.py: the iptables tables with foreign
rules, the node's addresses, ipset members, affinity entries, IPVS services) or, with
``-f``, from what the agent would render for a cluster snapshot (render_cmd.py). Either
way the packet goes through `iptables.trace`, which follows every branch: the result is
the set of paths with their probabilities, each with every rule it matched, the DNAT
destination (or IPVS real server), whether it is masqueraded and the final verdict.
Everything here is pure; only `main` reaches for the kernel, through explain_kernel.

``explain svc NAMESPACE/NAME[:PORT]`` finds every address the Service answers on (from the
model with ``-f``, from the rules' comments otherwise) and explains a connection to each
from a pod of this node and from outside (from inside and outside the source ranges of a
load balancer IP that has them).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import re
import sys
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from ipaddress import IPv4Address, ip_address, ip_network
from typing import Any

from pykubeproxy.config import ConfigError, ProxyConfig
from pykubeproxy.iptables.trace import (
    IpSet,
    NodeState,
    Packet,
    Path,
    RealServer,
    Rule,
    Ruleset,
    Step,
    TraceError,
    TraceResult,
    VirtualService,
    output_order,
    parse,
    split_destination,
    trace,
)
from pykubeproxy.ipvs.state import IPSETS
from pykubeproxy.model import IPAddress, IPNetwork, ServicePortMap
from pykubeproxy.render_cmd import (
    InputError,
    RenderedNode,
    add_input_options,
    load_cluster,
    render_node,
)
from pykubeproxy.render_cmd import parse as parse_args

ORIGINS = ("pod", "external", "node")
PROTOCOLS = ("tcp", "udp", "sctp")
# Outside clients, when none is given: documentation addresses (RFC 5737).
EXTERNAL_SOURCES = (IPv4Address("198.51.100.100"), IPv4Address("192.0.2.100"))
SERVICE_NAME = re.compile(r"^[a-z0-9][-a-z0-9.]*/[a-z0-9][-a-z0-9.]*(:[-a-z0-9]+)?$")
KIND_SUFFIXES = {"cluster IP": "cluster IP", "external IP": "external IP",
                 "loadbalancer IP": "load balancer IP"}  # fmt: skip
KINDS = ("cluster IP", "node port", "external IP", "external or LB IP", "load balancer IP")
NO_ENDPOINTS = ("has no endpoints", "has no local endpoints")


class ExplainError(ValueError):
    """The question cannot be answered as asked (no port, unknown Service, no source)."""


@dataclass(frozen=True)
class Frontend:
    """One address a Service port answers on."""

    service: str  # "default/web:p"
    kind: str  # cluster IP, node port, external IP, load balancer IP
    ip: IPAddress
    port: int
    protocol: str
    source_ranges: tuple[IPNetwork, ...] = ()


@dataclass
class NodeView:
    """One node's rules and the kernel state they read, live or rendered."""

    mode: str  # iptables or ipvs
    ruleset: Ruleset
    local: frozenset[IPAddress]
    state: NodeState
    origin: str  # where the rules come from, for the reader
    node_ip: IPAddress | None
    pod_cidr: IPNetwork | None  # the node's pod CIDR, else the cluster CIDR: where pods are
    # The model and NodePort addresses, when rendered from a snapshot.
    services: ServicePortMap | None = None
    nodeport_ips: tuple[IPAddress, ...] = ()
    warnings: tuple[str, ...] = ()
    # The kernel's choice of source address for a connection this node opens (live only).
    route_source: Callable[[IPAddress], IPAddress | None] | None = None

    def is_local(self, ip: IPAddress) -> bool:
        return ip in self.local or ip.is_loopback

    def node_source(self, destination: IPAddress) -> IPAddress:
        """The source the node itself sends from: the route's, or the destination itself
        when that is local (the kernel picks it), else the node's primary address."""
        if self.route_source is not None:
            found = self.route_source(destination)
            if found is not None:
                return found
        if self.is_local(destination):
            return destination
        if self.node_ip is None:
            raise ExplainError("the node's address is unknown: give --source")
        return self.node_ip


@dataclass(frozen=True)
class Outcome:
    """Where a share of new connections ends up."""

    output: str  # "ip:port", or a verdict, or "" (no Service rule matched)
    verdict: str
    probability: float
    masquerade: bool
    virtual_service: str | None = None
    # The source address the endpoint sees: the client's, or the one MASQUERADE picks
    # (None when that is unknown: rendered rules say nothing about routes).
    source: str | None = None


@dataclass(frozen=True)
class Scenario:
    """The outcomes under one set of assumptions about rules the tracer cannot evaluate."""

    assumptions: tuple[str, ...]
    outcomes: tuple[Outcome, ...]


@dataclass(frozen=True)
class Explanation:
    packet: Packet
    origin: str  # pod, external, node
    result: TraceResult
    service: str | None = None
    kind: str | None = None
    note: str = ""  # why this source (e.g. "inside loadBalancerSourceRanges")
    # Endpoint -> the address MASQUERADE gives connections to it (when the node's routes
    # are known).
    snat: Mapping[str, str] = field(default_factory=dict)

    def outcome(self, path: Path, probability: float | None = None) -> Outcome:
        """A path's outcome; masquerading only counts for a connection that goes through."""
        masquerade = path.masquerade and path.verdict == "ACCEPT"
        source = self.snat.get(path.output) if masquerade else str(self.packet.source)
        chance = path.probability if probability is None else probability
        return Outcome(path.output, path.verdict, chance, masquerade, path.virtual_service,
                       source)  # fmt: skip

    def scenarios(self) -> list[Scenario]:
        """Outcomes with their probabilities, per set of assumptions (one when exact)."""
        groups: dict[tuple[str, ...], dict[Outcome, float]] = {}
        for path in self.result.paths:
            shares = groups.setdefault(path.assumptions, {})
            key = self.outcome(path, probability=0.0)
            shares[key] = shares.get(key, 0.0) + path.probability
        return [
            Scenario(assumptions, tuple(sorted(
                (dataclasses.replace(outcome, probability=chance)
                 for outcome, chance in shares.items()),
                key=lambda o: output_order(o.output),
            )))
            for assumptions, shares in groups.items()
        ]  # fmt: skip


# --------------------------------------------------------------------------- sources


def rendered_view(rendered: RenderedNode, origin: str, cluster_cidr: IPNetwork | None) -> NodeView:
    """A node as the agent would leave it: its rendered rules and IPVS state."""
    cluster = rendered.cluster
    local = set(cluster.addresses)
    state = NodeState()
    ipvs = rendered.ipvs
    if ipvs is not None:
        local |= ipvs.addresses
        types = {spec.name: spec.type for spec in IPSETS}
        state = NodeState(
            ipsets={name: IpSet(types[name], frozenset(members))
                    for name, members in ipvs.ipsets.items()},
            virtual_services={
                (vs.address, vs.port, vs.protocol.value): VirtualService(
                    opts.scheduler,
                    tuple(RealServer(str(rs)) for rs in sorted(ipvs.real_servers.get(vs, ()))),
                    opts.persistence_timeout,
                )
                for vs, opts in ipvs.services.items()
            },
        )  # fmt: skip
    return NodeView(
        mode=rendered.mode,
        ruleset=parse(rendered.iptables_text()),
        local=frozenset(local),
        state=state,
        origin=origin,
        node_ip=cluster.node.ip or next((a for a in cluster.addresses if not a.is_loopback), None),
        pod_cidr=next(iter(cluster.pod_cidrs), cluster_cidr),
        services=cluster.services,
        nodeport_ips=rendered.nodeport_ips,
    )


def pod_cidr_of(ruleset: Ruleset) -> IPNetwork | None:
    """The CIDR the rules tell pods by: ``! -s CIDR -j KUBE-MARK-MASQ`` (both modes)."""
    for _, _, rule in ruleset.rules("nat"):
        if rule.target != "KUBE-MARK-MASQ":
            continue
        for match in rule.matches:
            if match.option in ("-s", "--source") and match.negated:
                network = ip_network(match.values[0], strict=False)
                if network.num_addresses > 1:
                    return network
    return None


# --------------------------------------------------------------------------- frontends


def model_frontends(services: ServicePortMap, nodeport_ips: Sequence[IPAddress]) -> list[Frontend]:
    """Every address of every Service port of the model."""
    found = []
    for svc in sorted(services.values(), key=lambda s: str(s.name)):
        name, proto = str(svc.name), svc.protocol.value
        found.append(Frontend(name, "cluster IP", svc.cluster_ip, svc.port, proto))
        if svc.node_port:
            found += [Frontend(name, "node port", ip, svc.node_port, proto) for ip in nodeport_ips]
        found += [Frontend(name, "external IP", ip, svc.port, proto) for ip in svc.external_ips]
        found += [
            Frontend(name, "load balancer IP", ip, svc.port, proto,
                     svc.load_balancer_source_ranges)
            for ip in svc.load_balancer_ips
        ]  # fmt: skip
    return found


def _comment(rule: Rule) -> str:
    return next((m.values[0] for m in rule.matches if m.option == "--comment" and m.values), "")


def _value(rule: Rule, *options: str) -> str | None:
    found = (m for m in rule.matches if m.option in options and not m.negated and m.values)
    return next((m.values[0] for m in found), None)


def rule_frontends(ruleset: Ruleset, nodeport_ips: Sequence[IPAddress]) -> list[Frontend]:
    """Every Service address iptables mode's rules name in their comments.

    nat KUBE-SERVICES says "NAME cluster IP" (external IP, loadbalancer IP), KUBE-NODEPORTS
    says "NAME" with the node port; a Service without (local) endpoints only has filter
    rules saying "NAME has no endpoints" (KUBE-SERVICES for the cluster IP,
    KUBE-EXTERNAL-SERVICES for the others). A LB IP's source ranges are the ``-s`` rules
    of the KUBE-FW chain its rule jumps to.
    """
    found: dict[tuple[str, IPAddress, int, str], Frontend] = {}

    def add(name: str, kind: str, ip: IPAddress, rule: Rule, port_option: str = "--dport",
            ranges: tuple[IPNetwork, ...] = ()) -> None:  # fmt: skip
        port, proto = _value(rule, port_option), _value(rule, "-p", "--protocol")
        if port is not None and proto is not None:
            key = (name, ip, int(port), proto)
            found.setdefault(key, Frontend(name, kind, ip, int(port), proto, ranges))

    for table, chains in (("nat", ("KUBE-SERVICES", "KUBE-NODEPORTS")),
                          ("filter", ("KUBE-SERVICES", "KUBE-EXTERNAL-SERVICES"))):  # fmt: skip
        for chain, _, rule in ruleset.rules(table):
            name, _, suffix = _comment(rule).partition(" ")
            if chain not in chains or not SERVICE_NAME.match(name):
                continue
            destination = _value(rule, "-d", "--destination")
            if destination is None:  # a node port: every NodePort address
                for ip in nodeport_ips:
                    add(name, "node port", ip, rule)
                continue
            ip = ip_network(destination, strict=False).network_address
            if suffix in KIND_SUFFIXES:
                ranges = _source_ranges(ruleset, rule.target or "")
                add(name, KIND_SUFFIXES[suffix], ip, rule, ranges=ranges)
            elif suffix in NO_ENDPOINTS:
                kind = "cluster IP" if chain == "KUBE-SERVICES" else "external or LB IP"
                add(name, kind, ip, rule)
    return sorted(found.values(), key=lambda f: (f.service, KINDS.index(f.kind)))


def _source_ranges(ruleset: Ruleset, chain: str) -> tuple[IPNetwork, ...]:
    """The ``-s`` ranges a KUBE-FW chain lets through to its KUBE-EXT chain."""
    if not chain.startswith("KUBE-FW-"):
        return ()
    rules = ruleset.chain("nat", chain)
    sources = (_value(rule, "-s", "--source") for rule in (rules.rules if rules else ()))
    return tuple(ip_network(s, strict=False) for s in sources if s is not None)


def nodeport_addresses(view: NodeView) -> tuple[IPAddress, ...]:
    """Where NodePorts answer: the rendered addresses, or the KUBE-NODEPORTS jumps' ``-d``
    addresses, or (addrtype LOCAL) the node's primary address."""
    if view.nodeport_ips:
        return view.nodeport_ips
    jumps = [
        rule
        for chain, _, rule in view.ruleset.rules("nat")
        if chain == "KUBE-SERVICES" and rule.target == "KUBE-NODEPORTS"
    ]
    explicit = [d for d in (_value(rule, "-d", "--destination") for rule in jumps) if d]
    ips = [ip_network(d, strict=False).network_address for d in explicit]
    ips = [ip for ip in ips if not ip.is_loopback] or ips
    if ips:
        return tuple(ips)
    return (view.node_ip,) if view.node_ip is not None else ()


def frontends(view: NodeView) -> list[Frontend]:
    if view.services is not None:
        return model_frontends(view.services, nodeport_addresses(view))
    if view.mode == "ipvs":
        return []  # IPVS services, ipsets and IPVS-mode rules carry no Service names
    return rule_frontends(view.ruleset, nodeport_addresses(view))


def select_service(found: list[Frontend], wanted: str, mode: str) -> list[Frontend]:
    """The frontends of ``NAMESPACE/NAME[:PORT]`` (PORT: the port's name or number)."""
    if not found and mode == "ipvs":
        raise ExplainError(
            "IPVS mode's kernel state names no Services: give the cluster's objects with -f "
            "(kubectl get svc,endpointslices,nodes -A -o json) to explain a Service by name"
        )
    service, _, port = wanted.partition(":")
    mine = [f for f in found if f.service.partition(":")[0] == service]
    if port:
        named = [f for f in mine if f.service == f"{service}:{port}"]
        numbered = {f.service for f in mine if f.kind == "cluster IP" and str(f.port) == port}
        mine = named or [f for f in mine if f.service in numbered]
    if not mine:
        known = sorted({f.service for f in found})
        raise ExplainError(
            f"no Service {wanted} in these rules (known: {', '.join(known) or 'none'})"
        )
    return mine


# --------------------------------------------------------------------------- packets


def pod_source(view: NodeView) -> IPAddress:
    """A pod of this node that backs no Service: the last address of the pods' CIDR."""
    cidr = view.pod_cidr
    if cidr is None:
        raise ExplainError("the pods' CIDR is unknown: give --cluster-cidr or --source")
    return cidr.network_address + cidr.num_addresses - 2


def external_source(view: NodeView, avoid: Iterable[IPNetwork] = ()) -> IPAddress:
    """An outside client: a documentation address that is neither the node's, a pod's,
    nor (for a blocked-source probe) in `avoid`."""
    taken = [*avoid, *([view.pod_cidr] if view.pod_cidr else [])]
    for ip in EXTERNAL_SOURCES:
        if not view.is_local(ip) and not any(ip in cidr for cidr in taken):
            return ip
    raise ExplainError("no outside address is free to use: give --source")


def origin_of(view: NodeView, source: IPAddress) -> str:
    if view.is_local(source):
        return "node"
    if view.pod_cidr is not None and source in view.pod_cidr:
        return "pod"
    return "external"


def explain_packet(
    view: NodeView,
    destination: IPAddress,
    port: int,
    protocol: str,
    origin: str | None = None,
    source: IPAddress | None = None,
    note: str = "",
) -> Explanation:
    """Trace one new connection; the source follows from the origin when not given."""
    if source is None:
        origin = origin or "pod"
        pickers = {"pod": lambda: pod_source(view), "external": lambda: external_source(view),
                   "node": lambda: view.node_source(destination)}  # fmt: skip
        source = pickers[origin]()
    origin = origin or origin_of(view, source)
    packet = Packet(source, destination, port, protocol, bridged=origin == "pod")
    result = trace(view.ruleset, packet, view.is_local, view.state)
    front = find_frontend(frontends(view), destination, port, protocol, view.is_local)
    service = front.service if front else service_in(result)
    kind = front.kind if front else None
    return Explanation(
        packet, origin, result, service, kind, note, masquerade_sources(view, result)
    )


def masquerade_sources(view: NodeView, result: TraceResult) -> dict[str, str]:
    """The address MASQUERADE picks for each masqueraded endpoint: that of the interface
    the node routes to the endpoint by, which ``ip route get`` names (live only)."""
    found: dict[str, str] = {}
    if view.route_source is None:
        return found
    for path in result.paths:
        target = split_destination(path.output) if path.masquerade else None
        if target is not None and path.output not in found:
            source = view.route_source(target[0])
            if source is not None:
                found[path.output] = str(source)
    return found


def find_frontend(
    found: list[Frontend], ip: IPAddress, port: int, protocol: str,
    is_local: Callable[[IPAddress], bool],
) -> Frontend | None:  # fmt: skip
    """The frontend of an address: an exact one, else a node port on any local address."""
    same = [f for f in found if f.port == port and f.protocol == protocol]
    exact = next((f for f in same if f.ip == ip), None)
    if exact is not None or not is_local(ip):
        return exact
    return next((f for f in same if f.kind == "node port"), None)


def service_in(result: TraceResult) -> str | None:
    """The first Service a matched rule names in its comment."""
    for step in result.matches:
        for word in re.findall(r'--comment "?([^" ]+)', step.rule):
            if SERVICE_NAME.match(word):
                return str(word)
    return None


def explain_service(view: NodeView, wanted: str, origins: Sequence[str]) -> list[Explanation]:
    """A connection to every address of the Service, from each origin; a load balancer IP
    with source ranges is tried from inside and from outside them."""
    explained = []
    for front in select_service(frontends(view), wanted, view.mode):
        for origin in origins:
            probe = (front.ip, front.port, front.protocol, origin)
            if origin != "external" or not front.source_ranges:
                explained.append(explain_packet(view, *probe))
                continue
            first = front.source_ranges[0]
            inside = first.network_address + (1 if first.num_addresses > 2 else 0)
            explained.append(explain_packet(view, *probe, inside, "inside the source ranges"))
            if not any(r.prefixlen == 0 for r in front.source_ranges):
                outside = external_source(view, front.source_ranges)
                explained.append(explain_packet(view, *probe, outside, "outside the source ranges"))
    return explained


# --------------------------------------------------------------------------- output


def percent(probability: float) -> str:
    return f"{probability * 100:.1f}%"


ORIGIN_TEXT = {"pod": "a pod on this node", "external": "outside the node",
               "node": "this node itself"}  # fmt: skip


def describe_outcome(outcome: Outcome, view: NodeView, packet: Packet) -> str:
    """One outcome in words: where the connection goes, and with which source."""
    if outcome.verdict == "DROP":
        return "DROP: dropped, the client gets no answer and times out"
    if outcome.verdict == "REJECT":
        return "REJECT: refused at once (ICMP port unreachable)"
    if outcome.verdict != "ACCEPT":
        return outcome.verdict
    snat = f"SNAT to {outcome.source}" if outcome.source else "SNAT to a node address"
    source = f"masqueraded ({snat})" if outcome.masquerade else "source kept"
    if outcome.output and outcome.output != "ACCEPT":
        via = f" by IPVS {outcome.virtual_service}" if outcome.virtual_service else ""
        return f"{outcome.output}{via}, {source}"
    accepted = "accepted by a rule, " if outcome.output == "ACCEPT" else ""
    where = "delivered to this node" if view.is_local(packet.destination) else "forwarded"
    return f"{accepted}no Service rule rewrote it: {where} unchanged, {source}"


def step_line(step: Step) -> str:
    """``TABLE CHAIN #N: RULE`` (IPVS's choice: ``ipvs SERVICE: -> REAL SERVER``)."""
    if step.table == "ipvs":
        return f"ipvs {step.chain}: {step.rule}"
    text = step.rule.removeprefix(f"-A {step.chain} ").removeprefix(f"-I {step.chain} ")
    return f"{step.table} {step.chain} #{step.number}: {text}"


def tree_lines(
    paths: Sequence[Path],
    view: NodeView,
    explained: Explanation,
    start: int = 0,
    ends: bool = True,
) -> list[str]:
    """The paths as a tree: shared rules once, then a branch per fork with its share. Rules
    every branch of a fork matches at its end (filter, POSTROUTING) are shown once, after
    the branches. `ends`: close each path with its outcome."""
    lines: list[str] = []
    depth = start
    while all(len(p.steps) > depth for p in paths) and len({p.steps[depth] for p in paths}) == 1:
        lines.append(step_line(paths[0].steps[depth]))
        depth += 1
    ended = [p for p in paths if len(p.steps) == depth]
    if ends:
        lines += dict.fromkeys(_end_line(p, view, explained) for p in ended)
    rest = [p for p in paths if len(p.steps) > depth]
    shortest = min((len(p.steps) - depth for p in rest), default=0)
    suffix = () if ended else _common_suffix([p.steps for p in rest], shortest - 1)
    groups: dict[Step, list[Path]] = {}
    for path in rest:
        trimmed = dataclasses.replace(path, steps=path.steps[: len(path.steps) - len(suffix)])
        groups.setdefault(path.steps[depth], []).append(trimmed)
    for index, branch in enumerate(groups.values()):
        last = index == len(groups) - 1 and not suffix
        lines.append(("└─ " if last else "├─ ") + _branch_label(branch, paths))
        inner = tree_lines(branch, view, explained, depth, ends and not suffix)
        lines += [("   " if last else "│  ") + line for line in inner]
    if suffix:
        lines.append("└─ then, on every branch:")
        tail = [step_line(step) for step in suffix]
        if ends:
            tail += dict.fromkeys(_end_line(p, view, explained) for p in rest)
        lines += ["   " + line for line in tail]
    return lines


def _common_suffix(sequences: Sequence[tuple[Step, ...]], longest: int) -> tuple[Step, ...]:
    """The steps all sequences end with (at most `longest`; none if fewer than two)."""
    length = 0
    while length < longest and len({s[-1 - length] for s in sequences}) == 1:
        length += 1
    return sequences[0][len(sequences[0]) - length :] if length >= 2 else ()


def _end_line(path: Path, view: NodeView, explanation: Explanation) -> str:
    return "=> " + describe_outcome(explanation.outcome(path), view, explanation.packet)


def _branch_label(branch: Sequence[Path], siblings: Sequence[Path]) -> str:
    """A fork's share of the connections, or the assumption it stands for."""
    common = set.intersection(*(set(p.assumptions) for p in branch))
    shared = set.intersection(*(set(p.assumptions) for p in siblings))
    if common - shared:
        return "if " + "; ".join(sorted(common - shared))
    scenario = branch[0].assumptions
    mine = sum(p.probability for p in branch if p.assumptions == scenario)
    total = sum(p.probability for p in siblings if p.assumptions == scenario)
    return percent(mine / total if total else 0.0)


def header(explanation: Explanation) -> list[str]:
    packet = explanation.packet
    port = f"[{packet.destination}]" if packet.destination.version == 6 else packet.destination
    service = ""
    if explanation.service:
        kind = f" {explanation.kind}" if explanation.kind else ""
        service = f" (Service {explanation.service}{kind})"
    note = f", {explanation.note}" if explanation.note else ""
    return [
        f"{packet.protocol} {packet.source} -> {port}:{packet.port}{service}",
        f"  a new connection from {ORIGIN_TEXT[explanation.origin]}{note}",
    ]


def outcome_lines(explanation: Explanation, view: NodeView) -> list[str]:
    lines = []
    for scenario in explanation.scenarios():
        if scenario.assumptions:
            lines.append("  if " + "; ".join(scenario.assumptions) + ":")
        for outcome in scenario.outcomes:
            text = describe_outcome(outcome, view, explanation.packet)
            lines.append(f"  {percent(outcome.probability):>6}  {text}")
    return lines


def text_output(explanations: Sequence[Explanation], view: NodeView, rules: bool) -> str:
    lines = [f"rules: {view.origin}; {view.mode} mode"]
    lines += [f"warning: {w}" for w in view.warnings]
    for explanation in explanations:
        lines += ["", *header(explanation), "outcome:", *outcome_lines(explanation, view)]
        if rules:
            lines.append("rules matched:")
            paths = explanation.result.paths
            lines += ["  " + line for line in tree_lines(paths, view, explanation)]
        assumptions = explanation.result.assumptions
        if assumptions:
            lines.append("may match (not understood here; both ways were followed):")
            lines += [f"  {text}" for text in assumptions]
    return "\n".join(lines) + "\n"


def _outcome_json(o: Outcome) -> dict[str, Any]:
    endpoint = o.output if split_destination(o.output) else None
    return {"endpoint": endpoint, "verdict": o.verdict, "probability": o.probability,
            "masquerade": o.masquerade, "source": o.source,
            "virtual_service": o.virtual_service}  # fmt: skip


def _path_json(p: Path) -> dict[str, Any]:
    return {
        "probability": p.probability, "verdict": p.verdict, "destination": p.destination,
        "masquerade": p.masquerade, "virtual_service": p.virtual_service,
        "assumptions": list(p.assumptions),
        "steps": [{"table": s.table, "chain": s.chain, "number": s.number, "rule": s.rule}
                  for s in p.steps],
    }  # fmt: skip


def explanation_json(e: Explanation) -> dict[str, Any]:
    """One explanation as plain data: the packet, outcomes per scenario, every path."""
    packet = e.packet
    return {
        "packet": {"protocol": packet.protocol, "source": str(packet.source),
                   "destination": str(packet.destination), "port": packet.port,
                   "from": e.origin},
        "service": e.service, "kind": e.kind, "note": e.note,
        "scenarios": [{"assumptions": list(s.assumptions),
                       "outcomes": [_outcome_json(o) for o in s.outcomes]}
                      for s in e.scenarios()],
        "paths": [_path_json(p) for p in e.result.paths],
    }  # fmt: skip


def json_output(explanations: Sequence[Explanation], view: NodeView) -> str:
    document = {
        "rules": view.origin,
        "mode": view.mode,
        "warnings": list(view.warnings),
        "explanations": [explanation_json(e) for e in explanations],
    }
    return json.dumps(document, indent=2) + "\n"


# --------------------------------------------------------------------------- command


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="pykubeproxy explain",
        allow_abbrev=False,
        description="Explain what this node's rules do with a new connection: "
        "explain DEST[:PORT], or explain svc NAMESPACE/NAME[:PORT]. Reads the kernel "
        "(run it in the agent's network namespace), or with -f the rules the agent would "
        "render; agent flags (--proxy-mode, --cluster-cidr, ...) shape those.",
    )
    parser.add_argument(
        "target", nargs="+", metavar="TARGET",
        help="DEST[:PORT] (e.g. 10.96.0.10:80), or: svc NAMESPACE/NAME[:PORT]",
    )  # fmt: skip
    parser.add_argument("-p", "--protocol", choices=PROTOCOLS, default="tcp")
    parser.add_argument("--source", type=ip_address, metavar="IP", help="the client's address")
    parser.add_argument(
        "--from", dest="origin", choices=ORIGINS,
        help="where the client is (default: follows --source; else a pod)",
    )  # fmt: skip
    parser.add_argument("-o", "--output", choices=("text", "json"), default="text")
    parser.add_argument(
        "--rules", action=argparse.BooleanOptionalAction, default=None,
        help="show every matched rule (default: for DEST, not for svc)",
    )  # fmt: skip
    add_input_options(parser)
    return parser


def _view(args: argparse.Namespace, cfg: ProxyConfig, cidr: IPNetwork | None) -> NodeView:
    if args.filename:
        cluster = load_cluster(args.filename, args, cfg)
        rendered = render_node(cluster, cfg)
        origin = f"rendered from {', '.join(args.filename)} for node {cluster.node.name or '?'}"
        return rendered_view(rendered, origin, cidr)
    from pykubeproxy.explain_kernel import read_view  # the kernel edge: live use only

    return read_view(cidr)


def _destination(target: str) -> tuple[IPAddress, int]:
    parsed = split_destination(target)
    if parsed is None:
        raise ExplainError(f"{target!r} is not an address with a port (e.g. 10.96.0.10:80)")
    ip, port = parsed
    if port is None:
        raise ExplainError(f"{target!r}: give the port too (e.g. {target}:80)")
    return ip, port


def main(argv: list[str]) -> int:
    parser = build_parser()
    try:
        args, cfg = parse_args(parser, argv)
        cidrs = cfg.cluster_cidrs()
        view = _view(args, cfg, cidrs[0] if cidrs else None)
        if view.pod_cidr is None:
            view.pod_cidr = pod_cidr_of(view.ruleset)
        if args.target[0] == "svc":
            if len(args.target) != 2:
                raise ExplainError("explain svc NAMESPACE/NAME[:PORT]")
            origins = [args.origin] if args.origin else ["pod", "external"]
            explanations = explain_service(view, args.target[1], origins)
            rules = bool(args.rules)
        else:
            if len(args.target) != 1:
                raise ExplainError("explain DEST[:PORT], or explain svc NAMESPACE/NAME[:PORT]")
            ip, port = _destination(args.target[0])
            origin = args.origin or (None if args.source else "pod")
            explanations = [explain_packet(view, ip, port, args.protocol, origin, args.source)]
            rules = args.rules is not False
    except (ConfigError, InputError, ExplainError, TraceError, OSError) as err:
        print(f"pykubeproxy explain: error: {err}", file=sys.stderr)
        return 2
    if args.output == "json":
        sys.stdout.write(json_output(explanations, view))
    else:
        sys.stdout.write(text_output(explanations, view, rules))
    return 0
