"""The iptables chains only IPVS mode writes (kube-proxy's ``iptablesChains`` in
pkg/proxy/ipvs/proxier.go); the chains it shares with iptables mode are named in
iptables/ruleset.py."""

from __future__ import annotations

NODE_PORT = "KUBE-NODE-PORT"  # in both the nat and the filter table
LOAD_BALANCER = "KUBE-LOAD-BALANCER"
SOURCE_RANGES_FIREWALL = "KUBE-SOURCE-RANGES-FIREWALL"
IPVS_FILTER = "KUBE-IPVS-FILTER"
IPVS_OUT_FILTER = "KUBE-IPVS-OUT-FILTER"
OWNED_CHAINS = frozenset(
    {NODE_PORT, LOAD_BALANCER, SOURCE_RANGES_FIREWALL, IPVS_FILTER, IPVS_OUT_FILTER}
)
