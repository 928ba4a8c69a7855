"""Render the typed model into kube-proxy's iptables layout (pure, no kernel).

Rules, chain names, comments and ordering follow kube-proxy's iptables
proxier, so `iptables-save` on a pykubeproxy node reads like an upstream one.
Each Service port renders independently into a `ServiceRules`; the renderer
memoises them, so a sync re-renders only the Services whose inputs changed and
a partial sync can tell the applier which per-Service chains to leave alone.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from ipaddress import IPv4Address, IPv4Network, IPv6Network

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
    NamespacedName,
    NodeFacts,
    Protocol,
    ServicePort,
    ServicePortMap,
    ServicePortName,
)
from pykubeproxy.topology import categorize

NODEPORTS_COMMENT = "kubernetes service nodeports; NOTE: this must be the last rule in this chain"
# Past this many endpoints, upstream drops the per-endpoint comments to keep tables small.
LARGE_CLUSTER_ENDPOINTS = 1000
ANY_NODE = NodeFacts()  # no name, zone or IP: nothing is local, no hint applies


@dataclass(frozen=True)
class LocalDetector:
    """Matches that tell traffic from this node's pods from other traffic.

    kube-proxy's LocalTrafficDetector: `if_local` selects pod-originated packets,
    `if_not_local` the rest (e.g. ``-s``/``! -s`` the cluster CIDR).
    """

    if_local: Argv
    if_not_local: Argv

    @classmethod
    def by_cidr(cls, cidr: IPv4Network | IPv6Network) -> LocalDetector:
        return cls(("-s", str(cidr)), ("!", "-s", str(cidr)))


@dataclass(frozen=True)
class RenderConfig:
    """The proxier settings that shape the rules."""

    local_detector: LocalDetector | None = None
    masquerade_all: bool = False
    masquerade_bit: int = 14
    localhost_nodeports: bool = True
    random_fully: bool = True
    # nf_conntrack_tcp_be_liberal=1 on the node: no INVALID-drop rule (as upstream).
    conntrack_tcp_liberal: bool = False
    # The ip6tables side of a node: NodePorts never answer on ::1, no localnet guard.
    ipv6: bool = False

    @property
    def mark(self) -> str:
        return masquerade_mark(self.masquerade_bit)


def service_chain(name: ServicePortName, prefix: str = "KUBE-SVC-") -> str:
    return prefix + chain_hash(f"{name}{name.protocol.value}")


def endpoint_chain(name: ServicePortName, endpoint: Endpoint) -> str:
    return "KUBE-SEP-" + chain_hash(f"{name}{name.protocol.value}{endpoint.address}")


def probability(n: int) -> str:
    return f"{1.0 / n:.10f}"


@dataclass
class ServiceRules:
    """Everything one Service port contributes, split by where it goes."""

    nat_services: list[Argv] = field(default_factory=list)
    nat_nodeports: list[Argv] = field(default_factory=list)
    filter_services: list[Argv] = field(default_factory=list)
    filter_external: list[Argv] = field(default_factory=list)
    filter_nodeports: list[Argv] = field(default_factory=list)
    filter_firewall: list[Argv] = field(default_factory=list)
    nat_chains: dict[str, list[Argv]] = field(default_factory=dict)
    # Local traffic policy with no endpoint on this node (kube-proxy's metric).
    no_local_internal: bool = False
    no_local_external: bool = False


def render_service(
    svc: ServicePort,
    endpoints: tuple[Endpoint, ...],
    cfg: RenderConfig,
    node: NodeFacts = ANY_NODE,
    large_cluster: bool = False,
) -> ServiceRules:
    """One Service port's rules, as upstream's syncProxyRules writes them.

    Traffic to the ClusterIP goes to the internal policy chain (KUBE-SVC, or
    KUBE-SVL for internalTrafficPolicy Local); traffic to NodePorts, external
    and LoadBalancer IPs goes to KUBE-EXT, which masquerades it (Cluster policy)
    or keeps the client address and sends it to KUBE-SVL (Local policy), except
    for traffic from this node or its pods, which is short-circuited to
    KUBE-SVC. LoadBalancer IPs with source ranges pass KUBE-FW first. Without
    any endpoint the filter table REJECTs; with a Local policy and no endpoint
    here it DROPs what was not short-circuited.
    """
    out = ServiceRules()
    name = str(svc.name)
    proto = svc.protocol.value
    match = ("-m", proto, "-p", proto)
    port = str(svc.port)
    chosen = categorize(endpoints, svc, node.name, node.zone)
    has_any = chosen.has_any
    cluster_chain = service_chain(svc.name)
    suffix = cluster_chain.removeprefix("KUBE-SVC-")  # the four chains share one hash
    local_chain, ext_chain, fw_chain = (f"KUBE-{kind}-{suffix}" for kind in ("SVL", "EXT", "FW"))
    endpoint_chains = {ep.address: endpoint_chain(svc.name, ep) for ep in chosen.reachable}

    internal_chain, has_internal = cluster_chain, has_any
    if svc.internal_policy_local:
        internal_chain, has_internal = local_chain, bool(chosen.local)
    external_policy_chain, has_external = cluster_chain, has_any
    if svc.external_policy_local:
        external_policy_chain, has_external = local_chain, bool(chosen.local)
    uses_ext_chain = has_any and svc.externally_accessible
    uses_fw_chain = has_any and bool(svc.load_balancer_ips and svc.load_balancer_source_ranges)
    lb_chain = fw_chain if uses_fw_chain else ext_chain

    internal_verdict = external_verdict = ("", "")
    if not has_any:
        internal_verdict = external_verdict = ("REJECT", f"{name} has no endpoints")
    else:
        if not has_internal:
            internal_verdict = ("DROP", f"{name} has no local endpoints")
            out.no_local_internal = True
        if not has_external:
            external_verdict = ("DROP", f"{name} has no local endpoints")
            out.no_local_external = True

    def to_ip(text: str, ip: IPAddress, target: str) -> Argv:
        return (*comment(text), *match, "-d", str(ip), "--dport", port, "-j", target)

    def refuse(verdict: tuple[str, str], ip: IPAddress) -> Argv:
        return to_ip(verdict[1], ip, verdict[0])

    cluster_ip_rule = to_ip(f"{name} cluster IP", svc.cluster_ip, internal_chain)
    if has_internal:
        out.nat_services.append(cluster_ip_rule)
    else:
        out.filter_services.append(refuse(internal_verdict, svc.cluster_ip))
    for ip in svc.external_ips:
        if has_any:
            out.nat_services.append(to_ip(f"{name} external IP", ip, ext_chain))
        if not has_external:
            out.filter_external.append(refuse(external_verdict, ip))
    for ip in svc.load_balancer_ips:
        if has_any:
            out.nat_services.append(to_ip(f"{name} loadbalancer IP", ip, lb_chain))
        if uses_fw_chain:
            dropped = f"{name} traffic not accepted by {fw_chain}"
            out.filter_firewall.append(to_ip(dropped, ip, "DROP"))
    if not has_external:
        out.filter_external += [refuse(external_verdict, ip) for ip in svc.load_balancer_ips]
    if svc.node_port:
        node_port = ("--dport", str(svc.node_port))
        if has_any:
            out.nat_nodeports.append((*comment(name), *match, *node_port, "-j", ext_chain))
        if not has_external:
            verdict, why = external_verdict
            local = ("-m", "addrtype", "--dst-type", "LOCAL")
            out.filter_external.append((*comment(why), *local, *match, *node_port, "-j", verdict))
    if svc.health_check_node_port:
        out.filter_nodeports.append(
            (*comment(f"{name} health check node port"), "-m", "tcp", "-p", "tcp",
             "--dport", str(svc.health_check_node_port), "-j", "ACCEPT")
        )  # fmt: skip

    chains = out.nat_chains
    if has_internal:
        masq_match = cluster_ip_rule[:-2]
        if cfg.masquerade_all:
            chains[internal_chain] = [(*masq_match, "-j", MARK_MASQ)]
        elif cfg.local_detector is not None:
            not_local = cfg.local_detector.if_not_local
            chains[internal_chain] = [(*masq_match, *not_local, "-j", MARK_MASQ)]
    if uses_ext_chain:
        ext = chains[ext_chain] = []
        if not svc.external_policy_local:
            masquerade = comment(f"masquerade traffic for {name} external destinations")
            ext.append((*masquerade, "-j", MARK_MASQ))
        else:
            if cfg.local_detector is not None:
                pods = comment(f"pod traffic for {name} external destinations")
                ext.append((*pods, *cfg.local_detector.if_local, "-j", cluster_chain))
            from_node = ("-m", "addrtype", "--src-type", "LOCAL")
            masquerade = comment(f"masquerade LOCAL traffic for {name} external destinations")
            ext.append((*masquerade, *from_node, "-j", MARK_MASQ))
            route = comment(f"route LOCAL traffic for {name} external destinations")
            ext.append((*route, *from_node, "-j", cluster_chain))
        if has_external:
            ext.append(("-j", external_policy_chain))
    if uses_fw_chain:
        allowed = comment(f"{name} loadbalancer IP")
        fw = chains[fw_chain] = [
            (*allowed, "-s", str(cidr), "-j", ext_chain) for cidr in svc.load_balancer_source_ranges
        ]
        if node.ip is not None and any(node.ip in c for c in svc.load_balancer_source_ranges):
            fw += [(*allowed, "-s", str(ip), "-j", ext_chain) for ip in svc.load_balancer_ips]
        fw.append(comment(f"other traffic to {name} will be dropped by KUBE-PROXY-FIREWALL"))

    def commented(text: str) -> Argv:
        return () if large_cluster else comment(text)

    def dispatch(chain: str, targets: tuple[Endpoint, ...]) -> None:
        rules = chains.setdefault(chain, [])
        seps = [(ep, endpoint_chains[ep.address]) for ep in targets]
        if svc.session_affinity_seconds is not None:
            rules += [
                (*commented(f"{name} -> {ep.address}"), "-m", "recent", "--name", sep,
                 "--rcheck", "--seconds", str(svc.session_affinity_seconds), "--reap", "-j", sep)
                for ep, sep in seps
            ]  # fmt: skip
        for i, (ep, sep) in enumerate(seps):
            pick: Argv = ()
            if i < len(seps) - 1:
                odds = probability(len(seps) - i)
                pick = ("-m", "statistic", "--mode", "random", "--probability", odds)
            rules.append((*commented(f"{name} -> {ep.address}"), *pick, "-j", sep))

    if chosen.cluster and svc.uses_cluster_endpoints:
        dispatch(cluster_chain, chosen.cluster)
    if chosen.local and svc.uses_local_endpoints:
        dispatch(local_chain, chosen.local)
    for ep in chosen.reachable:
        sep = endpoint_chains[ep.address]
        remember: Argv = ()
        if svc.session_affinity_seconds is not None:
            remember = ("-m", "recent", "--name", sep, "--set")
        chains[sep] = [
            (*commented(name), "-s", ep.ip_text, "-j", MARK_MASQ),
            (*commented(name), *remember, *match, "-j", "DNAT", "--to-destination", ep.address),
        ]
    return out


def jump_rules() -> tuple[list[Jump], list[Jump]]:
    """The rules in built-in chains that lead into the agent's chains (nat, filter).

    Upstream's order and comments (iptablesJumpChains), then kubelet's two
    uncommented jumps to KUBE-FIREWALL, which upstream ensures too but never
    removes: they are kubelet's as much as ours (iptablesKubeletJumpChains).
    """
    new = ("-m", "conntrack", "--ctstate", "NEW")
    jump = commented_jump
    portals = "kubernetes service portals"
    external = "kubernetes externally-visible service portals"
    lb_firewall = "kubernetes load balancer firewall"
    filter_jumps = [
        jump("INPUT", external, EXTERNAL_SERVICES, new),
        jump("FORWARD", external, EXTERNAL_SERVICES, new),
        jump("INPUT", "kubernetes health check service ports", NODEPORTS),
        jump("FORWARD", portals, SERVICES, new),
        jump("OUTPUT", portals, SERVICES, new),
        forward_jump(),
        jump("INPUT", lb_firewall, PROXY_FIREWALL, new),
        jump("OUTPUT", lb_firewall, PROXY_FIREWALL, new),
        jump("FORWARD", lb_firewall, PROXY_FIREWALL, new),
        Jump("INPUT", ("-j", FIREWALL), shared=True),
        Jump("OUTPUT", ("-j", FIREWALL), shared=True),
    ]
    return nat_jumps(), filter_jumps


def localnet_guard() -> Argv:
    """The rule kubelet also keeps in KUBE-FIREWALL: route_localnet must not expose
    127.0.0.0/8 to the network (upstream issue 90259)."""
    return (
        *comment("block incoming localnet connections"),
        "-d", "127.0.0.0/8", "!", "-s", "127.0.0.0/8",
        "-m", "conntrack", "!", "--ctstate", "RELATED,ESTABLISHED,DNAT",
        "-j", "DROP",
    )  # fmt: skip


@dataclass
class Rendered:
    """One sync's desired tables, and the counts kube-proxy reports about them."""

    nat: TableState
    filter: TableState
    no_local_endpoints: dict[str, int]

    @property
    def tables(self) -> list[TableState]:
        """nat before filter: a Service that gains endpoints is DNATed before its
        REJECT goes."""
        return [self.nat, self.filter]


CacheKey = tuple[ServicePort, tuple[Endpoint, ...], NodeFacts, bool]


@dataclass
class Renderer:
    """Renders whole tables, re-rendering only Services whose inputs changed."""

    cfg: RenderConfig
    _cache: dict[ServicePortName, tuple[CacheKey, ServiceRules]] = field(default_factory=dict)

    def _service(self, key: CacheKey) -> ServiceRules:
        cached = self._cache.get(key[0].name)
        if cached is not None and cached[0] == key:
            return cached[1]
        rules = render_service(*key[:2], self.cfg, *key[2:])
        self._cache[key[0].name] = (key, rules)
        return rules

    def render(
        self,
        services: ServicePortMap,
        endpoints: EndpointsMap,
        rewrite: set[ServicePortName] | None = None,
        node: NodeFacts = ANY_NODE,
    ) -> Rendered:
        """The nat and filter tables; `rewrite` limits which per-Service chains are written.

        With `rewrite=None` (a full sync) every chain is written; otherwise the
        per-Service chains of other Services are only declared as kept.
        """
        cfg = self.cfg
        nat_jumps, filter_jumps = jump_rules()
        partial = rewrite is not None
        nat = TableState("nat", jumps=nat_jumps, partial=partial)
        filt = TableState("filter", jumps=filter_jumps, partial=partial)
        total = sum(len(endpoints.get(name, ())) for name in services)
        large = total > LARGE_CLUSTER_ENDPOINTS
        # Only the per-Service chains depend on the node's identity, not its NodePort IPs.
        identity = NodeFacts(node.name, node.zone, node.ip)
        merged = ServiceRules()
        service_chains: dict[str, list[Argv]] = {}
        no_local = {"internal": 0, "external": 0}
        for name in sorted(services, key=str):
            rules = self._service((services[name], endpoints.get(name, ()), identity, large))
            merged.nat_services += rules.nat_services
            merged.nat_nodeports += rules.nat_nodeports
            merged.filter_services += rules.filter_services
            merged.filter_external += rules.filter_external
            merged.filter_nodeports += rules.filter_nodeports
            merged.filter_firewall += rules.filter_firewall
            no_local["internal"] += rules.no_local_internal
            no_local["external"] += rules.no_local_external
            if rewrite is None or name in rewrite:
                service_chains.update(rules.nat_chains)
            else:
                nat.kept.update(rules.nat_chains)
                nat.kept_rules += sum(len(chain) for chain in rules.nat_chains.values())
        for gone in set(self._cache) - set(services):
            del self._cache[gone]

        nat_services = merged.nat_services
        localhost_nodeports = cfg.localhost_nodeports and not cfg.ipv6
        if node.nodeport_ips is None:
            local: Argv = ("-m", "addrtype", "--dst-type", "LOCAL")
            if not localhost_nodeports:
                local = (*local, "!", "-d", "::1/128" if cfg.ipv6 else "127.0.0.0/8")
            nat_services.append((*comment(NODEPORTS_COMMENT), *local, "-j", NODEPORTS))
        else:
            nat_services.extend(
                (*comment(NODEPORTS_COMMENT), "-d", str(ip), "-j", NODEPORTS)
                for ip in node.nodeport_ips
                if localhost_nodeports or not ip.is_loopback
            )

        nat.chains = {
            SERVICES: nat_services,
            NODEPORTS: merged.nat_nodeports,
            POSTROUTING: postrouting_rules(cfg.mark, cfg.random_fully),
            MARK_MASQ: mark_masq_rules(cfg.mark),
            CANARY: [],
            **service_chains,
        }
        filt.chains = {
            SERVICES: merged.filter_services,
            EXTERNAL_SERVICES: merged.filter_external,
            FORWARD: forward_rules(cfg.mark, drop_invalid=not cfg.conntrack_tcp_liberal),
            NODEPORTS: merged.filter_nodeports,
            PROXY_FIREWALL: merged.filter_firewall,
            CANARY: [],
        }
        filt.ensured[FIREWALL] = [localnet_guard()] if localhost_nodeports else []
        return Rendered(nat, filt, no_local)


def sample_rules() -> list[Argv]:
    """Rules of every shape the renderer emits, from a small cluster and each setting.

    The applier's fast encoder learns and verifies its shapes from these, so a rule
    shape added to the renderer belongs here too (a test checks the coverage).
    """
    here, there = "node-a", "node-b"
    services: ServicePortMap = {}
    endpoints: EndpointsMap = {}
    ranges = (IPv4Network("198.51.100.0/24"), IPv4Network("203.0.113.0/25"))
    for n, proto in enumerate(Protocol):
        # ClusterIP, NodePort+affinity, external+LB, no endpoints, ETP Local + source ranges
        # with a local endpoint, the same without one, ITP Local without a local endpoint.
        for kind in range(7):
            name = ServicePortName(NamespacedName(f"ns{n}", f"svc{kind}"), "p", proto)
            ext = (IPv4Address(f"198.51.100.{kind + 1}"),) if kind >= 2 else ()
            local_external = kind in (4, 5)
            services[name] = ServicePort(
                name,
                IPv4Address(f"10.96.{n}.{kind + 10}"),
                80 + kind,
                node_port=30000 + 10 * n + kind if kind else 0,
                external_ips=ext,
                load_balancer_ips=ext,
                load_balancer_source_ranges=ranges if local_external else (),
                session_affinity_seconds=10800 if kind == 1 else None,
                external_policy_local=local_external,
                internal_policy_local=kind == 6,
                health_check_node_port=32000 + 10 * n + kind if local_external else 0,
            )
            if kind != 3:
                endpoints[name] = tuple(
                    Endpoint(
                        IPv4Address(f"10.244.{n}.{kind * 8 + i + 2}"),
                        8080,
                        node_name=here if kind == 4 and i == 0 else there,
                    )
                    for i in range(kind % 3 + 2)
                )
    cidr = IPv4Network("10.244.0.0/16")
    configs = [
        (RenderConfig(), NodeFacts(here)),
        (RenderConfig(local_detector=LocalDetector.by_cidr(cidr)), NodeFacts(here)),
        (
            RenderConfig(masquerade_all=True, random_fully=False, localhost_nodeports=False),
            NodeFacts(here, ip=IPv4Address("198.51.100.200")),
        ),
        (
            RenderConfig(conntrack_tcp_liberal=True),
            NodeFacts(here, nodeport_ips=(IPv4Address("127.0.0.1"), IPv4Address("198.18.0.2"))),
        ),
    ]
    # Past the endpoint threshold every per-endpoint comment goes: one big Service does it.
    big = ServicePortName(NamespacedName("big", "svc"), "p", Protocol.TCP)
    large = (
        {**services, big: ServicePort(big, IPv4Address("10.96.9.9"), 80)},
        {**endpoints, big: tuple(
            Endpoint(IPv4Address("10.245.0.1"), 1024 + i) for i in range(LARGE_CLUSTER_ENDPOINTS)
        )},
    )  # fmt: skip
    rules: dict[Argv, None] = {}
    for cfg, node in configs:
        for cluster in ((services, endpoints), large):
            for table in Renderer(cfg).render(*cluster, node=node).tables:
                rules.update((jump.argv, None) for jump in table.jumps)
                for chain_rules in (*table.chains.values(), *table.ensured.values()):
                    rules.update(dict.fromkeys(chain_rules))
    return list(rules)


