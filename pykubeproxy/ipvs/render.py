"""Render the typed model into kube-proxy's IPVS-mode state (pure, no kernel).

One IPVS virtual server per Service IP:port:protocol (ClusterIP, externalIPs,
LoadBalancer ingress IPs) and per node IP for NodePorts; the Service IPs are
bound to the kube-ipvs0 dummy device; kube-proxy's ipsets say which ip:port
pairs are Services, and a short, fixed list of iptables rules matches those
sets for masquerade, hairpin and filtering. Names, set entries, comments and
rule order follow kube-proxy's ipvs proxier (see docs/kube-proxy-ipvs-facts.md).
"""

from __future__ import annotations

from dataclasses import dataclass

from pykubeproxy.iptables.common import (
    comment,
    commented_jump,
    forward_jump,
    forward_rules,
    mark_masq_rules,
    masquerade_mark,
    nat_jumps,
    postrouting_rules,
)
from pykubeproxy.iptables.ruleset import (
    FORWARD,
    MARK_MASQ,
    POSTROUTING,
    PROXY_FIREWALL,
    SERVICES,
    Argv,
    Jump,
    TableState,
)
from pykubeproxy.ipvs import state as sets
from pykubeproxy.ipvs.chains import (
    IPVS_FILTER,
    IPVS_OUT_FILTER,
    LOAD_BALANCER,
    NODE_PORT,
    SOURCE_RANGES_FIREWALL,
)
from pykubeproxy.ipvs.state import (
    IpsetSpec,
    IpvsState,
    RealServer,
    ServiceOptions,
    VirtualServer,
)
from pykubeproxy.model import (
    Endpoint,
    EndpointsMap,
    IPAddress,
    IPNetwork,
    NamespacedName,
    NodeFacts,
    Protocol,
    ServicePort,
    ServicePortMap,
)
from pykubeproxy.topology import categorize


@dataclass(frozen=True)
class IpvsConfig:
    """The settings that shape IPVS mode."""

    scheduler: str = "rr"
    cluster_cidr: tuple[IPNetwork, ...] = ()
    masquerade_all: bool = False
    masquerade_bit: int = 14
    random_fully: bool = True

    @property
    def mark(self) -> str:
        return masquerade_mark(self.masquerade_bit)


@dataclass
class Rendered:
    """One sync's desired IPVS state and iptables tables, and what kube-proxy reports."""

    state: IpvsState
    nat: TableState
    filter: TableState
    # Services with a Local policy, some endpoint, but none on this node, per policy.
    no_local_endpoints: dict[str, int]

    @property
    def tables(self) -> list[TableState]:
        return [self.nat, self.filter]


def _entry(ip: IPAddress, protocol: Protocol, port: int, *extra: str) -> str:
    """kube-proxy's ipset entry text: ``ip,proto:port[,extra]``."""
    return ",".join((f"{ip}", f"{protocol.value}:{port}", *extra))


def _real(endpoints: tuple[Endpoint, ...]) -> set[RealServer]:
    return {RealServer(ep.ip, ep.port) for ep in endpoints}


def render(
    services: ServicePortMap,
    endpoints: EndpointsMap,
    cfg: IpvsConfig,
    node: NodeFacts,
    node_ips: tuple[IPAddress, ...],
    node_addresses: frozenset[IPAddress],
) -> Rendered:
    """The IPVS services, kube-ipvs0 addresses, ipset entries and iptables rules.

    `node_ips` are the addresses NodePorts listen on; `node_addresses` are all of the
    node's own addresses (an external or LB IP already on the node is not bound to
    kube-ipvs0 again). `node` gives the name that makes an endpoint local, the zone that
    topology hints are read against, and the IP a source range may admit.
    """
    state = IpvsState()
    no_local: dict[str, set[NamespacedName]] = {"internal": set(), "external": set()}
    for svc in services.values():
        _render_service(svc, endpoints.get(svc.name, ()), cfg, node, node_ips, node_addresses,
                        state, no_local)  # fmt: skip
    state.ipsets[sets.IPVS_IPS.name] = {str(ip) for ip in state.addresses}
    nat, filt = render_tables(state, cfg)
    counts = {policy: len(names) for policy, names in no_local.items()}
    return Rendered(state, nat, filt, counts)


def _render_service(
    svc: ServicePort,
    endpoints: tuple[Endpoint, ...],
    cfg: IpvsConfig,
    node: NodeFacts,
    node_ips: tuple[IPAddress, ...],
    node_addresses: frozenset[IPAddress],
    out: IpvsState,
    no_local: dict[str, set[NamespacedName]],
) -> None:
    """One Service port, as upstream's syncProxyRules loop body writes it."""
    entries = out.ipsets
    proto, port = svc.protocol, svc.port
    chosen = categorize(endpoints, svc, node.name, node.zone)

    def real_servers(local_only: bool) -> set[RealServer]:
        """Upstream's syncEndpoint: a Local policy uses this node's endpoints; with none
        here it falls back to the cluster-wide set (upstream PR 97081: this node's pods
        still reach the Service; outside traffic is forwarded, but its replies, which
        skip this node, are dropped by the client). That set is empty for a ClusterIP-only
        Service with internalTrafficPolicy Local, so its virtual server has no real server.
        """
        if not local_only:
            return _real(chosen.cluster)
        if chosen.local:
            return _real(chosen.local)
        if chosen.has_any:
            for policy, local in (("internal", svc.internal_policy_local),
                                  ("external", svc.external_policy_local)):  # fmt: skip
                if local:
                    no_local[policy].add(svc.name.service)
        return _real(chosen.cluster)

    def serve(vip: IPAddress, vip_port: int, local_only: bool) -> None:
        server = VirtualServer(vip, vip_port, proto)
        out.services[server] = ServiceOptions(cfg.scheduler, svc.session_affinity_seconds)
        out.real_servers[server] = real_servers(local_only)
        out.names[server] = str(svc.name)

    for ep in endpoints:  # upstream: every endpoint on this node, whatever its conditions
        if node.name and ep.node_name == node.name:
            entries[sets.LOOP_BACK.name].add(_entry(ep.ip, proto, ep.port, str(ep.ip)))
    entries[sets.CLUSTER_IP.name].add(_entry(svc.cluster_ip, proto, port))
    serve(svc.cluster_ip, port, svc.internal_policy_local)
    out.addresses.add(svc.cluster_ip)
    local = svc.external_policy_local
    for ip in svc.external_ips:
        spec = sets.EXTERNAL_IP_LOCAL if local else sets.EXTERNAL_IP
        entries[spec.name].add(_entry(ip, proto, port))
        serve(ip, port, local)
        if ip not in node_addresses:
            out.addresses.add(ip)
    for ip in svc.load_balancer_ips:
        entries[sets.LOAD_BALANCER.name].add(_entry(ip, proto, port))
        if local:
            entries[sets.LOAD_BALANCER_LOCAL.name].add(_entry(ip, proto, port))
        if svc.load_balancer_source_ranges:
            _source_ranges(svc, ip, node, entries)
        serve(ip, port, local)
        if ip not in node_addresses:
            out.addresses.add(ip)
    if svc.node_port:
        if not node_ips:
            return  # upstream skips the rest of the port, its health check port included
        for node_set in _node_port_sets(proto, local):
            if proto is Protocol.SCTP:
                entries[node_set.name].update(_entry(ip, proto, svc.node_port) for ip in node_ips)
            else:
                entries[node_set.name].add(str(svc.node_port))
        for ip in node_ips:
            serve(ip, svc.node_port, local)
    if svc.health_check_node_port:
        entries[sets.HEALTH_CHECK_NODE_PORT.name].add(str(svc.health_check_node_port))


def _source_ranges(
    svc: ServicePort, lb_ip: IPAddress, node: NodeFacts, entries: dict[str, set[str]]
) -> None:
    """loadBalancerSourceRanges: the LB ip:port goes through KUBE-SOURCE-RANGES-FIREWALL,
    which lets each range in. When the node's IP is in a range, the LB IP itself is let in
    as a source too: a node that reaches the LB IP gets its packets back from IPVS with the
    LB IP as source. Otherwise KUBE-IPVS-OUT-FILTER stops the node from reaching it."""
    entry = _entry(lb_ip, svc.protocol, svc.port)
    entries[sets.LOAD_BALANCER_FW.name].add(entry)
    ranges = svc.load_balancer_source_ranges
    entries[sets.LOAD_BALANCER_SOURCE_CIDR.name].update(f"{entry},{cidr}" for cidr in ranges)
    if node.ip is not None and any(node.ip in cidr for cidr in ranges):
        entries[sets.LOAD_BALANCER_SOURCE_IP.name].add(f"{entry},{lb_ip}")


def _node_port_sets(protocol: Protocol, local: bool) -> list[IpsetSpec]:
    by_protocol = {
        Protocol.TCP: (sets.NODE_PORT_TCP, sets.NODE_PORT_LOCAL_TCP),
        Protocol.UDP: (sets.NODE_PORT_UDP, sets.NODE_PORT_LOCAL_UDP),
        Protocol.SCTP: (sets.NODE_PORT_SCTP, sets.NODE_PORT_LOCAL_SCTP),
    }
    cluster_set, local_set = by_protocol[protocol]
    return [cluster_set, local_set] if local else [cluster_set]


def _comment(spec: IpsetSpec) -> Argv:
    return comment(spec.comment)


def _match(spec: IpsetSpec, dims: str) -> Argv:
    return ("-m", "set", "--match-set", spec.name, dims)


# kube-proxy's ipsetWithIptablesChain: (set, table, from chain, to, match dimensions, protocol)
SET_RULES: tuple[tuple[IpsetSpec, str, str, str, str, str], ...] = (
    (sets.LOOP_BACK, "nat", POSTROUTING, "MASQUERADE", "dst,dst,src", ""),
    (sets.LOAD_BALANCER, "nat", SERVICES, LOAD_BALANCER, "dst,dst", ""),
    (sets.LOAD_BALANCER_LOCAL, "nat", LOAD_BALANCER, "RETURN", "dst,dst", ""),
    (sets.NODE_PORT_LOCAL_TCP, "nat", NODE_PORT, "RETURN", "dst", "tcp"),
    (sets.NODE_PORT_TCP, "nat", NODE_PORT, MARK_MASQ, "dst", "tcp"),
    (sets.NODE_PORT_LOCAL_UDP, "nat", NODE_PORT, "RETURN", "dst", "udp"),
    (sets.NODE_PORT_UDP, "nat", NODE_PORT, MARK_MASQ, "dst", "udp"),
    (sets.NODE_PORT_LOCAL_SCTP, "nat", NODE_PORT, "RETURN", "dst,dst", "sctp"),
    (sets.NODE_PORT_SCTP, "nat", NODE_PORT, MARK_MASQ, "dst,dst", "sctp"),
    (sets.LOAD_BALANCER_FW, "filter", PROXY_FIREWALL, SOURCE_RANGES_FIREWALL, "dst,dst", ""),
    (sets.LOAD_BALANCER_SOURCE_CIDR, "filter", SOURCE_RANGES_FIREWALL, "RETURN", "dst,dst,src", ""),
    (sets.LOAD_BALANCER_SOURCE_IP, "filter", SOURCE_RANGES_FIREWALL, "RETURN", "dst,dst,src", ""),
)  # fmt: skip


def render_tables(state: IpvsState, cfg: IpvsConfig) -> tuple[TableState, TableState]:
    """IPVS mode's nat and filter rules (kube-proxy's writeIptablesRules), in its order."""
    nat = TableState("nat", jumps=_jumps("nat"))
    filt = TableState("filter", jumps=_jumps("filter"))
    nat.chains = {SERVICES: [], POSTROUTING: [], NODE_PORT: [], LOAD_BALANCER: [], MARK_MASQ: []}
    filt.chains = {FORWARD: [], NODE_PORT: [], PROXY_FIREWALL: [], SOURCE_RANGES_FIREWALL: [],
                   IPVS_FILTER: [], IPVS_OUT_FILTER: []}  # fmt: skip
    tables = {"nat": nat.chains, "filter": filt.chains}

    def used(spec: IpsetSpec) -> bool:
        return bool(state.ipsets.get(spec.name))

    services = nat.chains[SERVICES]
    services.append(("-s", "127.0.0.0/8", "-j", "RETURN"))
    for spec, table, chain, target, dims, proto in SET_RULES:
        if used(spec):
            protocol: Argv = ("-p", proto) if proto else ()
            rule = (*protocol, *_comment(spec), *_match(spec, dims), "-j", target)
            tables[table][chain].append(rule)
    if used(sets.CLUSTER_IP):
        masq = (*_comment(sets.CLUSTER_IP), *_match(sets.CLUSTER_IP, "dst,dst"))
        if cfg.masquerade_all:
            services.append((*masq, "-j", MARK_MASQ))
        elif cfg.cluster_cidr:
            services += [(*masq, "!", "-s", str(c), "-j", MARK_MASQ) for c in cfg.cluster_cidr]
        else:
            services.append((*masq[:-1], "src,dst", "-j", MARK_MASQ))
    external_only = ("-m", "physdev", "!", "--physdev-is-in", "-m", "addrtype", "!",
                     "--src-type", "LOCAL", "-j", "ACCEPT")  # fmt: skip
    to_local = ("-m", "addrtype", "--dst-type", "LOCAL", "-j", "ACCEPT")
    for spec, masquerade in ((sets.EXTERNAL_IP, True), (sets.EXTERNAL_IP_LOCAL, False)):
        if used(spec):
            base = (*_comment(spec), *_match(spec, "dst,dst"))
            if masquerade:
                services.append((*base, "-j", MARK_MASQ))
            services += [(*base, *external_only), (*base, *to_local)]
    services.append(("-m", "addrtype", "--dst-type", "LOCAL", "-j", NODE_PORT))
    nat.chains[LOAD_BALANCER].append(("-j", MARK_MASQ))
    filt.chains[SOURCE_RANGES_FIREWALL].append(("-j", "DROP"))
    filt.chains[IPVS_OUT_FILTER] += [
        ("-s", ip, "-m", "ipvs", "--vaddr", ip, "--vproto", proto, "--vport", port, "-j", "DROP")
        for ip, proto, port in _no_node_access(state)
    ]
    for spec in (sets.CLUSTER_IP, sets.LOAD_BALANCER):
        if used(spec):
            services.append((*_match(spec, "dst,dst"), "-j", "ACCEPT"))
    filt.chains[FORWARD] += forward_rules(cfg.mark, drop_invalid=False)
    health = sets.HEALTH_CHECK_NODE_PORT
    filt.chains[NODE_PORT].append((*_comment(health), *_match(health, "dst"), "-j", "ACCEPT"))
    filt.chains[IPVS_FILTER] += [
        *((*_match(spec, "dst,dst"), "-j", "RETURN") for spec in
          (sets.LOAD_BALANCER, sets.CLUSTER_IP, sets.EXTERNAL_IP, sets.EXTERNAL_IP_LOCAL)),
        (*_match(health, "dst"), "-j", "RETURN"),
        ("-m", "conntrack", "--ctstate", "NEW", *_match(sets.IPVS_IPS, "dst"), "-j", "REJECT"),
    ]  # fmt: skip
    nat.chains[POSTROUTING] += postrouting_rules(cfg.mark, cfg.random_fully)
    nat.chains[MARK_MASQ] += mark_masq_rules(cfg.mark)
    return nat, filt


def _no_node_access(state: IpvsState) -> list[tuple[str, str, str]]:
    """(LB IP, protocol, port) of each LB with source ranges that leave the node's IP out:
    upstream drops the node's own traffic to them in KUBE-IPVS-OUT-FILTER (a node reaching
    an LB IP through IPVS sends from that IP, which no range admits)."""
    admitted = {e.rsplit(",", 1)[0] for e in state.ipsets[sets.LOAD_BALANCER_SOURCE_IP.name]}
    found = []
    for entry in sorted(state.ipsets[sets.LOAD_BALANCER_FW.name] - admitted):
        ip, proto_port = entry.split(",")
        proto, port = proto_port.split(":")
        found.append((ip, proto, port))
    return found


def _jumps(table: str) -> list[Jump]:
    """IPVS mode's jump rules in upstream's order (``iptablesJumpChain``); each missing one
    is prepended in turn, so INPUT ends up with KUBE-IPVS-FILTER, KUBE-PROXY-FIREWALL,
    KUBE-NODE-PORT at its top, as on an upstream node."""
    if table == "nat":
        return nat_jumps()
    access = "kubernetes ipvs access filter"
    firewall = "kube-proxy firewall rules"
    return [
        forward_jump(),
        commented_jump("INPUT", "kubernetes health check rules", NODE_PORT),
        commented_jump("INPUT", firewall, PROXY_FIREWALL),
        commented_jump("FORWARD", firewall, PROXY_FIREWALL),
        commented_jump("INPUT", access, IPVS_FILTER),
        commented_jump("OUTPUT", access, IPVS_OUT_FILTER),
    ]
