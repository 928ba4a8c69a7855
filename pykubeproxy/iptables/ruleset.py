"""The desired iptables state as plain data, and its iptables-save text form.

A rule is the argument vector kube-proxy would hand to iptables-restore after
``-A CHAIN`` (a tuple of strings, comments unquoted). Keeping kube-proxy's own
argument order makes the golden tests read like upstream's and lets the same
data feed both appliers: python-iptables (the agent) and iptables-restore
(benchmark reference).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field

Argv = tuple[str, ...]

# Chains the agent owns by name in iptables mode (SERVICES, POSTROUTING, MARK_MASQ, FORWARD
# and PROXY_FIREWALL are the other proxy mode's too; pykubeproxy/ownership.py joins both
# modes' names), and the prefixes of the per-Service chains.
SERVICES = "KUBE-SERVICES"
EXTERNAL_SERVICES = "KUBE-EXTERNAL-SERVICES"
NODEPORTS = "KUBE-NODEPORTS"
POSTROUTING = "KUBE-POSTROUTING"
MARK_MASQ = "KUBE-MARK-MASQ"
FORWARD = "KUBE-FORWARD"
PROXY_FIREWALL = "KUBE-PROXY-FIREWALL"
# kubelet's chain: the agent makes sure it exists and holds the localnet guard, never
# flushes or deletes it, and never removes the jumps to it (upstream does the same).
FIREWALL = "KUBE-FIREWALL"
CANARY = "KUBE-PROXY-CANARY"
OWNED_CHAINS = frozenset(
    {
        SERVICES,
        EXTERNAL_SERVICES,
        NODEPORTS,
        POSTROUTING,
        MARK_MASQ,
        FORWARD,
        PROXY_FIREWALL,
        CANARY,
    }
)
SERVICE_CHAIN_PREFIXES = ("KUBE-SVC-", "KUBE-SVL-", "KUBE-EXT-", "KUBE-FW-", "KUBE-SEP-")


BASE32 = "ABCDEFGHIJKLMNOPQRSTUVWXYZ234567"  # RFC 4648, as Go's base32.StdEncoding
BASE32_PAIRS = [high + low for high in BASE32 for low in BASE32]  # each 10 bits, encoded


def chain_hash(text: str) -> str:
    """kube-proxy's name hash: base32 of sha256, first 16 characters.

    Those 16 characters encode exactly the digest's first 80 bits, read here as one
    integer: the library's base32 encoder would spend most of a first sync's time
    encoding the 22 bytes that are cut off anyway.
    """
    bits = int.from_bytes(hashlib.sha256(text.encode()).digest()[:10], "big")
    pairs = BASE32_PAIRS
    return (
        pairs[bits >> 70]
        + pairs[(bits >> 60) & 1023]
        + pairs[(bits >> 50) & 1023]
        + pairs[(bits >> 40) & 1023]
        + pairs[(bits >> 30) & 1023]
        + pairs[(bits >> 20) & 1023]
        + pairs[(bits >> 10) & 1023]
        + pairs[bits & 1023]
    )


def rule_identity(argv: Argv) -> tuple[str, str]:
    """(target, comment): how the applier recognises one of its rules in the kernel."""
    target = argv[argv.index("-j") + 1]
    return target, argv[argv.index("--comment") + 1] if "--comment" in argv else ""


@dataclass(frozen=True)
class Jump:
    """A rule the agent keeps in a built-in chain (``-I`` once, if missing).

    A `shared` jump leads to a chain kubelet also maintains: it is inserted when
    missing but never removed.
    """

    chain: str
    argv: Argv
    shared: bool = False

    @property
    def identity(self) -> tuple[str, str]:
        return rule_identity(self.argv)


@dataclass
class TableState:
    """The desired content of one table for one sync.

    `chains` are written whole (created, or flushed and refilled). `kept` are
    owned chains that must exist but are left as they are (unchanged Services
    in a partial sync). Every other owned chain in the kernel is stale and is
    deleted. `ensured` chains are shared with kubelet: created when missing,
    their rules appended when missing, nothing else in them touched.

    `partial` marks a sync between full ones: the applier may then leave alone
    the chains it wrote before with the same rules, if the kernel's table is as its
    last commit left it. A full sync (not `partial`) rewrites every chain.
    """

    name: str
    chains: dict[str, list[Argv]] = field(default_factory=dict)
    kept: set[str] = field(default_factory=set)
    kept_rules: int = 0
    jumps: list[Jump] = field(default_factory=list)
    ensured: dict[str, list[Argv]] = field(default_factory=dict)
    partial: bool = False

    def rule_count(self) -> int:
        """Rules the agent writes in this table, written or kept (kube-proxy's metric)."""
        written = sum(len(rules) for rules in (*self.chains.values(), *self.ensured.values()))
        return self.kept_rules + written


def quote(arg: str) -> str:
    """Quote an argument the way iptables-save does (only when it has spaces)."""
    if arg == "" or any(c in arg for c in ' \t"'):
        return '"' + arg.replace("\\", "\\\\").replace('"', '\\"') + '"'
    return arg


def format_rule(chain: str, argv: Argv, op: str = "-A") -> str:
    return " ".join([op, chain, *(quote(a) for a in argv)])


def restore_text(tables: list[TableState], *, with_jumps: bool = False) -> str:
    """iptables-restore input for the written chains, in kube-proxy's layout.

    Kept chains are declared too (``:CHAIN``), which is harmless with --noflush
    only for chains that are not rewritten; callers that need kept chains
    untouched use the python-iptables applier instead.
    """
    lines: list[str] = []
    for table in tables:
        chains = {**table.chains, **table.ensured}
        lines.append(f"*{table.name}")
        lines.extend(f":{chain} - [0:0]" for chain in chains)
        if with_jumps:
            lines.extend(format_rule(jump.chain, jump.argv, "-I") for jump in table.jumps)
        for chain, rules in chains.items():
            lines.extend(format_rule(chain, rule) for rule in rules)
        lines.append("COMMIT")
    return "\n".join(lines) + "\n"
