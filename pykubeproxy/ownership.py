"""Which iptables chains are the agent's, whichever proxy mode wrote them.

The iptables applier deletes an owned chain that a sync no longer wants, and an owned
jump from a built-in chain that a sync no longer writes. Ownership therefore has to
cover both modes' chains: that is how switching modes, or ``--cleanup``, leaves nothing
of the other mode behind. Each mode lists its own names; this module only joins them,
so neither mode's rule code needs to know the other's.
"""

from __future__ import annotations

from pykubeproxy.iptables import ruleset
from pykubeproxy.ipvs import chains as ipvs_chains

OWNED_CHAINS = ruleset.OWNED_CHAINS | ipvs_chains.OWNED_CHAINS


def is_owned(chain: str) -> bool:
    """Whether the agent made this chain (kubelet's KUBE-* chains, KUBE-FIREWALL
    among them, are not the agent's)."""
    return chain in OWNED_CHAINS or chain.startswith(ruleset.SERVICE_CHAIN_PREFIXES)
