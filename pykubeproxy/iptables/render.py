"""Render the typed model into kube-proxy's iptables layout (pure, no kernel).

Rules, chain names, comments and ordering follow kube-proxy's iptables
proxier, so `iptables-save` on a pykubeproxy node reads like an upstream one.
Each Service port renders independently into a `ServiceRules`; the renderer
memoises them, so a sync re-renders only the Services whose inputs changed and
a partial sync can tell the applier which per-Service chains to leave alone.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from ipaddress import IPv4Network, IPv6Network

from pykubeproxy.iptables.ruleset import (
    CANARY,
    EXTERNAL_SERVICES,
    FIREWALL,
    FORWARD,
    MARK_MASQ,
    NODEPORTS,
    POSTROUTING,
    PROXY_FIREWALL,
    SERVICES,
    Argv,
    Jump,
    TableState,
    chain_hash,
)
from pykubeproxy.model import (
    Endpoint,
    EndpointsMap,
    IPAddress,
    ServicePort,
    ServicePortMap,
    ServicePortName,
    usable_endpoints,
)

NODEPORTS_COMMENT = "kubernetes service nodeports; NOTE: this must be the last rule in this chain"


@dataclass(frozen=True)
class RenderConfig:
    """The proxier settings that shape the rules."""

    cluster_cidr: tuple[IPv4Network | IPv6Network, ...] = ()
    masquerade_all: bool = False
    masquerade_bit: int = 14
    # None: every local address (addrtype LOCAL); else the node IPs to accept NodePorts on.
    nodeport_ips: tuple[IPAddress, ...] | None = None
    localhost_nodeports: bool = True
    random_fully: bool = True

    @property
    def mark(self) -> str:
        return f"{1 << self.masquerade_bit:#x}"


def service_chain(name: ServicePortName, prefix: str = "KUBE-SVC-") -> str:
    return prefix + chain_hash(f"{name}{name.protocol.value}")


def endpoint_chain(name: ServicePortName, endpoint: Endpoint) -> str:
    return "KUBE-SEP-" + chain_hash(f"{name}{name.protocol.value}{endpoint.address}")


def comment(text: str) -> Argv:
    return ("-m", "comment", "--comment", text)


def probability(n: int) -> str:
    return f"{1.0 / n:.10f}"


@dataclass
class ServiceRules:
    """Everything one Service port contributes, split by where it goes."""

    nat_services: list[Argv] = field(default_factory=list)
    nat_nodeports: list[Argv] = field(default_factory=list)
    filter_services: list[Argv] = field(default_factory=list)
    filter_external: list[Argv] = field(default_factory=list)
    nat_chains: dict[str, list[Argv]] = field(default_factory=dict)


def render_service(
    svc: ServicePort, endpoints: tuple[Endpoint, ...], cfg: RenderConfig
) -> ServiceRules:
    """kube-proxy's per-Service-port rules (cluster traffic policy, ready endpoints)."""
    out = ServiceRules()
    name = str(svc.name)
    proto = svc.protocol.value
    match = ("-m", proto, "-p", proto)
    port, node_port = str(svc.port), str(svc.node_port)
    ready = usable_endpoints(endpoints)
    svc_chain = service_chain(svc.name)
    ext_chain = service_chain(svc.name, "KUBE-EXT-")

    def to_ip(text: str, ip: IPAddress, target: str) -> Argv:
        return (*comment(text), *match, "-d", str(ip), "--dport", port, "-j", target)

    if not ready:
        reject = f"{name} has no endpoints"
        out.filter_services.append(to_ip(reject, svc.cluster_ip, "REJECT"))
        for ip in (*svc.external_ips, *svc.load_balancer_ips):
            out.filter_external.append(to_ip(reject, ip, "REJECT"))
        if svc.node_port:
            local = ("-m", "addrtype", "--dst-type", "LOCAL")
            out.filter_external.append(
                (*comment(reject), *local, *match, "--dport", node_port, "-j", "REJECT")
            )
        return out

    cluster_ip_rule = to_ip(f"{name} cluster IP", svc.cluster_ip, svc_chain)
    out.nat_services.append(cluster_ip_rule)
    out.nat_services += [to_ip(f"{name} external IP", ip, ext_chain) for ip in svc.external_ips]
    out.nat_services += [
        to_ip(f"{name} loadbalancer IP", ip, ext_chain) for ip in svc.load_balancer_ips
    ]
    if svc.node_port:
        out.nat_nodeports.append((*comment(name), *match, "--dport", node_port, "-j", ext_chain))

    svc_rules: list[Argv] = []
    masq_match = cluster_ip_rule[:-2]
    if cfg.masquerade_all:
        svc_rules.append((*masq_match, "-j", MARK_MASQ))
    else:
        svc_rules += [(*masq_match, "!", "-s", str(c), "-j", MARK_MASQ) for c in cfg.cluster_cidr]
    if svc.externally_accessible:
        masquerade = comment(f"masquerade traffic for {name} external destinations")
        out.nat_chains[ext_chain] = [(*masquerade, "-j", MARK_MASQ), ("-j", svc_chain)]
    seps = [(ep, endpoint_chain(svc.name, ep)) for ep in ready]
    affinity = svc.session_affinity_seconds
    if affinity is not None:
        svc_rules += [
            (*comment(f"{name} -> {ep.address}"), "-m", "recent", "--name", sep,
             "--rcheck", "--seconds", str(affinity), "--reap", "-j", sep)
            for ep, sep in seps
        ]  # fmt: skip
    n = len(seps)
    for i, (ep, sep) in enumerate(seps):
        pick: Argv = ()
        if i < n - 1:
            pick = ("-m", "statistic", "--mode", "random", "--probability", probability(n - i))
        svc_rules.append((*comment(f"{name} -> {ep.address}"), *pick, "-j", sep))
    out.nat_chains[svc_chain] = svc_rules
    remember: Argv = ()
    for ep, sep in seps:
        if affinity is not None:
            remember = ("-m", "recent", "--name", sep, "--set")
        out.nat_chains[sep] = [
            (*comment(name), "-s", str(ep.ip), "-j", MARK_MASQ),
            (*comment(name), *remember, *match, "-j", "DNAT", "--to-destination", ep.address),
        ]
    return out


def jump_rules(cfg: RenderConfig) -> tuple[list[Jump], list[Jump]]:
    """The rules in built-in chains that lead into the agent's chains (nat, filter)."""
    new = ("-m", "conntrack", "--ctstate", "NEW")

    def jump(chain: str, comment: str, target: str, extra: Argv = ()) -> Jump:
        return Jump(chain, (*extra, "-m", "comment", "--comment", comment, "-j", target))

    portals = "kubernetes service portals"
    external = "kubernetes externally-visible service portals"
    lb_firewall = "kubernetes load balancer firewall"
    filter_jumps = [
        jump("INPUT", external, EXTERNAL_SERVICES, new),
        jump("FORWARD", external, EXTERNAL_SERVICES, new),
        jump("INPUT", "kubernetes health check service ports", NODEPORTS),
        jump("FORWARD", portals, SERVICES, new),
        jump("OUTPUT", portals, SERVICES, new),
        jump("FORWARD", "kubernetes forwarding rules", FORWARD),
        jump("INPUT", lb_firewall, PROXY_FIREWALL, new),
        jump("OUTPUT", lb_firewall, PROXY_FIREWALL, new),
        jump("FORWARD", lb_firewall, PROXY_FIREWALL, new),
    ]
    if cfg.localhost_nodeports:
        filter_jumps += [
            jump("INPUT", "kubernetes firewall for dropping marked packets", FIREWALL),
            jump("OUTPUT", "kubernetes firewall for dropping marked packets", FIREWALL),
        ]
    nat_jumps = [
        jump("OUTPUT", portals, SERVICES),
        jump("PREROUTING", portals, SERVICES),
        jump("POSTROUTING", "kubernetes postrouting rules", POSTROUTING),
    ]
    return nat_jumps, filter_jumps


@dataclass
class Renderer:
    """Renders whole tables, re-rendering only Services whose inputs changed."""

    cfg: RenderConfig
    _cache: dict[ServicePortName, tuple[ServicePort, tuple[Endpoint, ...], ServiceRules]] = field(
        default_factory=dict
    )

    def _service(self, svc: ServicePort, endpoints: tuple[Endpoint, ...]) -> ServiceRules:
        cached = self._cache.get(svc.name)
        if cached is not None and cached[0] == svc and cached[1] == endpoints:
            return cached[2]
        rules = render_service(svc, endpoints, self.cfg)
        self._cache[svc.name] = (svc, endpoints, rules)
        return rules

    def render(
        self,
        services: ServicePortMap,
        endpoints: EndpointsMap,
        rewrite: set[ServicePortName] | None = None,
    ) -> tuple[TableState, TableState]:
        """The nat and filter tables; `rewrite` limits which per-Service chains are written.

        With `rewrite=None` (a full sync) every chain is written; otherwise the
        per-Service chains of other Services are only declared as kept.
        """
        cfg = self.cfg
        nat_jumps, filter_jumps = jump_rules(cfg)
        nat = TableState("nat", jumps=nat_jumps)
        filt = TableState("filter", jumps=filter_jumps)
        mark = cfg.mark
        nat_services: list[Argv] = []
        nat_nodeports: list[Argv] = []
        filter_services: list[Argv] = []
        filter_external: list[Argv] = []
        service_chains: dict[str, list[Argv]] = {}
        for name in sorted(services, key=str):
            rules = self._service(services[name], endpoints.get(name, ()))
            nat_services += rules.nat_services
            nat_nodeports += rules.nat_nodeports
            filter_services += rules.filter_services
            filter_external += rules.filter_external
            if rewrite is None or name in rewrite:
                service_chains.update(rules.nat_chains)
            else:
                nat.kept.update(rules.nat_chains)
                nat.kept_rules += sum(len(chain) for chain in rules.nat_chains.values())
        for live in set(self._cache) - set(services):
            del self._cache[live]

        if cfg.nodeport_ips is None:
            local: Argv = ("-m", "addrtype", "--dst-type", "LOCAL")
            if not cfg.localhost_nodeports:
                local = (*local, "!", "-d", "127.0.0.0/8")
            nat_services.append((*comment(NODEPORTS_COMMENT), *local, "-j", NODEPORTS))
        else:
            nat_services.extend(
                (*comment(NODEPORTS_COMMENT), "-d", str(ip), "-j", NODEPORTS)
                for ip in cfg.nodeport_ips
                if cfg.localhost_nodeports or not ip.is_loopback
            )

        masq_random: Argv = ("--random-fully",) if cfg.random_fully else ()
        marked = ("-m", "mark", "--mark", f"{mark}/{mark}")
        snat = comment("kubernetes service traffic requiring SNAT")
        nat.chains = {
            SERVICES: nat_services,
            NODEPORTS: nat_nodeports,
            POSTROUTING: [
                ("-m", "mark", "!", *marked[2:], "-j", "RETURN"),
                ("-j", "MARK", "--xor-mark", mark),
                (*snat, "-j", "MASQUERADE", *masq_random),
            ],
            MARK_MASQ: [("-j", "MARK", "--or-mark", mark)],
            CANARY: [],
            **service_chains,
        }
        established = ("-m", "conntrack", "--ctstate", "RELATED,ESTABLISHED")
        filt.chains = {
            SERVICES: filter_services,
            EXTERNAL_SERVICES: filter_external,
            FORWARD: [
                ("-m", "conntrack", "--ctstate", "INVALID", "-j", "DROP"),
                (*comment("kubernetes forwarding rules"), *marked, "-j", "ACCEPT"),
                (*comment("kubernetes forwarding conntrack rule"), *established, "-j", "ACCEPT"),
            ],
            NODEPORTS: [],  # health-check node ports come with traffic policies
            PROXY_FIREWALL: [],
            CANARY: [],
        }
        if cfg.localhost_nodeports:
            localnet = ("-d", "127.0.0.0/8", "!", "-s", "127.0.0.0/8")
            not_ours = ("-m", "conntrack", "!", "--ctstate", "RELATED,ESTABLISHED,DNAT")
            filt.chains[FIREWALL] = [
                (
                    *comment("block incoming localnet connections"),
                    *localnet,
                    *not_ours,
                    "-j",
                    "DROP",
                )
            ]
        return nat, filt
