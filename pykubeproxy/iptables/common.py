"""The netfilter rules both proxy modes write the same way (pure).

kube-proxy's iptables and IPVS proxiers each write their own copy of the masquerade
machinery (KUBE-MARK-MASQ sets a mark, KUBE-POSTROUTING masquerades what carries it),
the KUBE-FORWARD chain that lets marked and established traffic through a FORWARD policy
of DROP, and the jumps from the built-in chains into them (pkg/proxy/iptables/proxier.go
and pkg/proxy/ipvs/proxier.go, ``writeIptablesRules``). Here they are written once, so
a change to one of them reaches both modes.
"""

from __future__ import annotations

from pykubeproxy.iptables.ruleset import FORWARD, POSTROUTING, SERVICES, Argv, Jump


def masquerade_mark(bit: int) -> str:
    """The fwmark bit that asks for SNAT, as iptables-save prints it (``0x4000``)."""
    return f"{1 << bit:#x}"


def comment(text: str) -> Argv:
    return ("-m", "comment", "--comment", text)


def _marked(mark: str) -> Argv:
    return ("-m", "mark", "--mark", f"{mark}/{mark}")


def mark_masq_rules(mark: str) -> list[Argv]:
    """KUBE-MARK-MASQ: set the mark; KUBE-POSTROUTING acts on it."""
    return [("-j", "MARK", "--or-mark", mark)]


def postrouting_rules(mark: str, random_fully: bool) -> list[Argv]:
    """KUBE-POSTROUTING: masquerade marked packets, clearing the mark first so a packet
    that traverses the stack again is not masqueraded twice."""
    masquerade: Argv = ("-j", "MASQUERADE", *(("--random-fully",) if random_fully else ()))
    return [
        ("-m", "mark", "!", *_marked(mark)[2:], "-j", "RETURN"),
        ("-j", "MARK", "--xor-mark", mark),
        (*comment("kubernetes service traffic requiring SNAT"), *masquerade),
    ]


def forward_rules(mark: str, drop_invalid: bool) -> list[Argv]:
    """KUBE-FORWARD: accept Service traffic even where the FORWARD policy drops.

    With `drop_invalid` (iptables mode, unless the node tolerates out-of-window packets
    with nf_conntrack_tcp_be_liberal, as upstream decides since Kubernetes 1.29), packets
    conntrack calls INVALID are dropped first: they would otherwise leave the node
    un-NATed and reset the connection. Upstream's IPVS mode writes no such rule.
    """
    established = ("-m", "conntrack", "--ctstate", "RELATED,ESTABLISHED")
    invalid_drop: list[Argv] = []
    if drop_invalid:
        invalid_drop.append(("-m", "conntrack", "--ctstate", "INVALID", "-j", "DROP"))
    return [
        *invalid_drop,
        (*comment("kubernetes forwarding rules"), *_marked(mark), "-j", "ACCEPT"),
        (*comment("kubernetes forwarding conntrack rule"), *established, "-j", "ACCEPT"),
    ]


def commented_jump(chain: str, text: str, target: str, extra: Argv = ()) -> Jump:
    """A jump from a built-in chain, recognised by its target and comment."""
    return Jump(chain, (*extra, *comment(text), "-j", target))


def nat_jumps() -> list[Jump]:
    """The nat table's jumps, the same in both modes and in this order."""
    portals = "kubernetes service portals"
    return [
        commented_jump("OUTPUT", portals, SERVICES),
        commented_jump("PREROUTING", portals, SERVICES),
        commented_jump("POSTROUTING", "kubernetes postrouting rules", POSTROUTING),
    ]


def forward_jump() -> Jump:
    """FORWARD → KUBE-FORWARD, the same in both modes."""
    return commented_jump("FORWARD", "kubernetes forwarding rules", FORWARD)
