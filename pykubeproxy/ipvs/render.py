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

from pykubeproxy.iptables.ruleset import (
    FORWARD,
    IPVS_FILTER,
    IPVS_OUT_FILTER,
    LOAD_BALANCER,
    MARK_MASQ,
    NODE_PORT,
    POSTROUTING,
    PROXY_FIREWALL,
    SERVICES,
    SOURCE_RANGES_FIREWALL,
    Argv,
    Jump,
    TableState,
)
from pykubeproxy.ipvs import state as sets
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
    Protocol,
    ServicePort,
    ServicePortMap,
)
from pykubeproxy.topology import categorize


@dataclass(frozen=True)
class IpvsConfig:
    """The settings that shape IPVS mode."""

    node_name: str = ""
    scheduler: str = "rr"
    cluster_cidr: tuple[IPNetwork, ...] = ()
    masquerade_all: bool = False
    masquerade_bit: int = 14
    random_fully: bool = True

    @property
    def mark(self) -> str:
        return f"{1 << self.masquerade_bit:#x}"


def _entry(ip: IPAddress, protocol: Protocol, port: int, *extra: str) -> str:
    """kube-proxy's ipset entry text: ``ip,proto:port[,extra]``."""
    return ",".join((f"{ip}", f"{protocol.value}:{port}", *extra))


def _real(endpoints: tuple[Endpoint, ...]) -> set[RealServer]:
    return {RealServer(ep.ip, ep.port) for ep in endpoints}


def render_state(
    services: ServicePortMap,
    endpoints: EndpointsMap,
    cfg: IpvsConfig,
    node_ips: tuple[IPAddress, ...],
    node_addresses: frozenset[IPAddress],
) -> IpvsState:
    """The IPVS services, kube-ipvs0 addresses and ipset entries for these Services.

    `node_ips` are the addresses NodePorts listen on; `node_addresses` are all
    of the node's own addresses (an external or LB IP already on the node is
    not bound to kube-ipvs0 again).
    """
    out = IpvsState()
    entries = out.ipsets

    def serve(vip: IPAddress, port: int, svc: ServicePort, real: set[RealServer]) -> None:
        server = VirtualServer(vip, port, svc.protocol)
        out.services[server] = ServiceOptions(cfg.scheduler, svc.session_affinity_seconds)
        out.real_servers[server] = real

    for svc in services.values():
        proto, port = svc.protocol, svc.port
        chosen = categorize(endpoints.get(svc.name, ()), svc, cfg.node_name)
        internal = _real(chosen.local if svc.internal_policy_local else chosen.cluster)
        external = _real(chosen.local if svc.external_policy_local else chosen.cluster)
        for ep in chosen.reachable:
            if ep.node_name == cfg.node_name:
                entries[sets.LOOP_BACK.name].add(_entry(ep.ip, proto, ep.port, str(ep.ip)))
        entries[sets.CLUSTER_IP.name].add(_entry(svc.cluster_ip, proto, port))
        serve(svc.cluster_ip, port, svc, internal)
        out.addresses.add(svc.cluster_ip)
        local = svc.external_policy_local
        for ip in svc.external_ips:
            spec = sets.EXTERNAL_IP_LOCAL if local else sets.EXTERNAL_IP
            entries[spec.name].add(_entry(ip, proto, port))
            serve(ip, port, svc, external)
            if ip not in node_addresses:
                out.addresses.add(ip)
        for ip in svc.load_balancer_ips:
            entries[sets.LOAD_BALANCER.name].add(_entry(ip, proto, port))
            if local:
                entries[sets.LOAD_BALANCER_LOCAL.name].add(_entry(ip, proto, port))
            if svc.load_balancer_source_ranges:
                entries[sets.LOAD_BALANCER_FW.name].add(_entry(ip, proto, port))
                for cidr in svc.load_balancer_source_ranges:
                    entries[sets.LOAD_BALANCER_SOURCE_CIDR.name].add(
                        _entry(ip, proto, port, str(cidr))
                    )
                if any(
                    node in cidr for cidr in svc.load_balancer_source_ranges for node in node_ips
                ):
                    entries[sets.LOAD_BALANCER_SOURCE_IP.name].add(_entry(ip, proto, port, str(ip)))
            serve(ip, port, svc, external)
            if ip not in node_addresses:
                out.addresses.add(ip)
        if svc.node_port and node_ips:
            for node_set in _node_port_sets(proto, local):
                if proto is Protocol.SCTP:
                    entries[node_set.name].update(
                        _entry(ip, proto, svc.node_port) for ip in node_ips
                    )
                else:
                    entries[node_set.name].add(str(svc.node_port))
            for ip in node_ips:
                serve(ip, svc.node_port, svc, external)
        if svc.health_check_node_port:
            entries[sets.HEALTH_CHECK_NODE_PORT.name].add(str(svc.health_check_node_port))
    entries[sets.IPVS_IPS.name] = {str(ip) for ip in out.addresses}
    return out


def _node_port_sets(protocol: Protocol, local: bool) -> list[IpsetSpec]:
    by_protocol = {
        Protocol.TCP: (sets.NODE_PORT_TCP, sets.NODE_PORT_LOCAL_TCP),
        Protocol.UDP: (sets.NODE_PORT_UDP, sets.NODE_PORT_LOCAL_UDP),
        Protocol.SCTP: (sets.NODE_PORT_SCTP, sets.NODE_PORT_LOCAL_SCTP),
    }
    cluster_set, local_set = by_protocol[protocol]
    return [cluster_set, local_set] if local else [cluster_set]


def _comment(spec: IpsetSpec) -> Argv:
    return ("-m", "comment", "--comment", spec.comment)


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
    for spec in (sets.CLUSTER_IP, sets.LOAD_BALANCER):
        if used(spec):
            services.append((*_match(spec, "dst,dst"), "-j", "ACCEPT"))
    mark = cfg.mark
    marked = ("-m", "mark", "--mark", f"{mark}/{mark}")
    filt.chains[FORWARD] += [
        ("-m", "comment", "--comment", "kubernetes forwarding rules", *marked, "-j", "ACCEPT"),
        ("-m", "comment", "--comment", "kubernetes forwarding conntrack rule",
         "-m", "conntrack", "--ctstate", "RELATED,ESTABLISHED", "-j", "ACCEPT"),
    ]  # fmt: skip
    health = sets.HEALTH_CHECK_NODE_PORT
    filt.chains[NODE_PORT].append((*_comment(health), *_match(health, "dst"), "-j", "ACCEPT"))
    filt.chains[IPVS_FILTER] += [
        *((*_match(spec, "dst,dst"), "-j", "RETURN") for spec in
          (sets.LOAD_BALANCER, sets.CLUSTER_IP, sets.EXTERNAL_IP, sets.EXTERNAL_IP_LOCAL)),
        (*_match(health, "dst"), "-j", "RETURN"),
        ("-m", "conntrack", "--ctstate", "NEW", *_match(sets.IPVS_IPS, "dst"), "-j", "REJECT"),
    ]  # fmt: skip
    masq_random: Argv = ("--random-fully",) if cfg.random_fully else ()
    nat.chains[POSTROUTING] += [
        ("-m", "mark", "!", "--mark", f"{mark}/{mark}", "-j", "RETURN"),
        ("-j", "MARK", "--xor-mark", mark),
        ("-m", "comment", "--comment", "kubernetes service traffic requiring SNAT",
         "-j", "MASQUERADE", *masq_random),
    ]  # fmt: skip
    nat.chains[MARK_MASQ].append(("-j", "MARK", "--or-mark", mark))
    return nat, filt


def _jumps(table: str) -> list[Jump]:
    """IPVS mode's jump rules, in the order kube-proxy leaves them at the top of each chain."""

    def jump(chain: str, comment: str, target: str) -> Jump:
        return Jump(chain, ("-m", "comment", "--comment", comment, "-j", target))

    if table == "nat":
        return [
            jump("OUTPUT", "kubernetes service portals", SERVICES),
            jump("PREROUTING", "kubernetes service portals", SERVICES),
            jump("POSTROUTING", "kubernetes postrouting rules", POSTROUTING),
        ]
    access = "kubernetes ipvs access filter"
    return [
        jump("INPUT", access, IPVS_FILTER),
        jump("INPUT", "kube-proxy firewall rules", PROXY_FIREWALL),
        jump("INPUT", "kubernetes health check rules", NODE_PORT),
        jump("FORWARD", "kube-proxy firewall rules", PROXY_FIREWALL),
        jump("FORWARD", "kubernetes forwarding rules", FORWARD),
        jump("OUTPUT", access, IPVS_OUT_FILTER),
    ]
