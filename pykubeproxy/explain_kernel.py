"""What `pykubeproxy explain` reads from the kernel of the network namespace it runs in.

The rules are read with ``iptables-legacy-save``, not python-iptables: its text is the
kernel's own rendering of every rule, foreign ones included, with every match module's
options in the syntax the tracer parses. python-iptables would have to re-create that text
extension by extension (and fails on extensions it cannot load), which is exactly
iptables-save's job; the agent writes legacy xtables, which is what this tool reads.

The rest is read only when the rules use it: ipset members (``-m set``) and IPVS virtual
services through pyroute2, as the IPVS applier reads them; ``-m recent`` entries from
/proc/net/xt_recent (session affinity: a client already listed is sent to the endpoint
whose list holds it; an entry's age is not checked, it counts until it is reaped); the
node's addresses and the kernel's choice of source address from iproute2.
"""

from __future__ import annotations

import json
import shutil
import subprocess
from ipaddress import ip_address
from pathlib import Path

from pykubeproxy.explain import ExplainError, NodeView
from pykubeproxy.iptables.trace import (
    IpSet,
    NodeState,
    RealServer,
    Ruleset,
    VirtualKey,
    VirtualService,
    parse,
)
from pykubeproxy.ipvs.chains import IPVS_FILTER
from pykubeproxy.ipvs.state import DUMMY_DEVICE
from pykubeproxy.model import IPAddress, IPNetwork
from pykubeproxy.nodeinfo import local_addresses

RECENT_DIR = Path("/proc/net/xt_recent")
# Where a connection to the outside would go: its route gives the node's primary address.
OUTSIDE = ip_address("198.51.100.100")
TIMEOUT = 30


def _run(argv: list[str]) -> str:
    return subprocess.run(argv, check=True, capture_output=True, text=True, timeout=TIMEOUT).stdout


def read_rules() -> Ruleset:
    """Every table of legacy xtables, as iptables-legacy-save prints them."""
    try:
        return parse(_run(["iptables-legacy-save"]))
    except subprocess.CalledProcessError as err:
        raise ExplainError(f"cannot read the rules: {err.stderr.strip() or err}") from None


def route_source(destination: IPAddress) -> IPAddress | None:
    """The source address the kernel picks for a connection from this node (``ip route
    get``): the destination itself when it is local; None without a route."""
    try:
        routes = json.loads(_run(["ip", "-json", "route", "get", str(destination)]))
    except (subprocess.CalledProcessError, ValueError):
        return None
    source = routes[0].get("prefsrc") if routes else None
    return ip_address(source) if source else None


def _referenced(ruleset: Ruleset, module: str, option: str) -> set[str]:
    """The names a match option refers to (``--match-set NAME``, recent's ``--name``)."""
    return {
        match.values[0]
        for table in ruleset.tables
        for _, _, rule in ruleset.rules(table)
        for match in rule.matches
        if match.module == module and match.option == option and match.values
    }


def read_recent(names: set[str]) -> dict[str, frozenset[IPAddress]]:
    """The addresses in each xt_recent list (``src=ADDRESS ttl: ... last_seen: ...``)."""
    found: dict[str, frozenset[IPAddress]] = {}
    for name in names:
        try:
            lines = (RECENT_DIR / name).read_text().splitlines()
        except OSError:
            continue
        found[name] = frozenset(
            ip_address(line.split()[0].removeprefix("src=")) for line in lines if line
        )
    return found


def read_ipsets(names: set[str]) -> dict[str, IpSet]:
    """The sets the rules match on, with their members (sets that do not exist are left
    out: a match on them stays "may match")."""
    if not names:
        return {}
    from pykubeproxy.ipvs.ipsets import read_set
    from pykubeproxy.ipvs.netlink import Kernel

    found = {}
    with Kernel() as kernel:
        for name in sorted(names):
            current = read_set(kernel, name)
            if current is not None:
                members = frozenset(member.text() for member in current.members)
                found[name] = IpSet(current.type, members)
    return found


def read_virtual_services() -> dict[VirtualKey, VirtualService]:
    """Every IPVS virtual service with its scheduler, persistence and real servers."""
    from pykubeproxy.ipvs.netlink import F_PERSISTENT, Kernel

    found = {}
    with Kernel() as kernel:
        for vs, service in kernel.services().items():
            dests = kernel.dests(vs)
            servers = tuple(RealServer(str(rs), dests[rs].weight) for rs in sorted(dests))
            persistent = service.timeout if service.flags & F_PERSISTENT else None
            key = (vs.address, vs.port, vs.protocol.value)
            found[key] = VirtualService(service.scheduler, servers, persistent)
    return found


def nf_tables_warning() -> tuple[str, ...]:
    """A warning when nf_tables holds tables too: the kernel runs them, explain does not."""
    if shutil.which("nft") is None:
        return ()
    try:
        tables = [line for line in _run(["nft", "list", "tables"]).splitlines() if line]
    except (subprocess.CalledProcessError, OSError):
        return ()
    if not tables:
        return ()
    names = ", ".join(line.removeprefix("table ") for line in tables)
    return (f"nf_tables holds rules too ({names}); the kernel runs them, this trace does not",)


def read_view(pod_cidr: IPNetwork | None) -> NodeView:
    """This network namespace's rules and the kernel state they read."""
    ruleset = read_rules()
    mode = "ipvs" if ruleset.chain("filter", IPVS_FILTER) is not None else "iptables"
    try:
        state = NodeState(
            ipsets=read_ipsets(_referenced(ruleset, "set", "--match-set")),
            recent=read_recent(_referenced(ruleset, "recent", "--name")),
            virtual_services=read_virtual_services() if mode == "ipvs" else None,
        )
    except Exception as err:  # netlink: no permission, no ip_vs, ...
        raise ExplainError(f"cannot read the IPVS services and ipsets: {err}") from err
    addresses = frozenset(local_addresses())
    node_ip = route_source(OUTSIDE)
    if node_ip is None:
        own = set(local_addresses(DUMMY_DEVICE))
        node_ip = next((ip for ip in sorted(own, key=str) if not ip.is_loopback), None)
    return NodeView(
        mode=mode,
        ruleset=ruleset,
        local=addresses,
        state=state,
        origin="this node's kernel",
        node_ip=node_ip,
        pod_cidr=pod_cidr,
        warnings=nf_tables_warning(),
        route_source=route_source,
    )
