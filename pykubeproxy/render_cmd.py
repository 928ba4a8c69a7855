"""`pykubeproxy render`: the rules the agent would write on a node, with no kernel and no API.

Input is what ``kubectl get svc,endpointslices,nodes -A -o json`` prints (a List), any
number of such files, single objects, or directories of them (``-`` reads standard input).
The objects go through the agent's own pipeline (`convert`, the change trackers, the
renderers), with the agent's flags, so the output is what a sync on that node writes:
``iptables-restore`` text in iptables mode (the jumps from the built-in chains as ``-I``
lines, which land in the agent's order when restored), and in IPVS mode the virtual
services in ``ipvsadm-save -n`` form, kube-ipvs0's addresses in ``ip -batch`` form, the
ipsets in ``ipset restore`` form, then the iptables rules. ``--diff`` renders two snapshots
and prints the rule changes between them.

Where the kernel would be asked, a fixed answer is used instead: the node's addresses are
its Node object's InternalIP/ExternalIP addresses and 127.0.0.1 (``--node-address`` adds
more), and nf_conntrack_tcp_be_liberal is taken as 0 (the default).
"""

from __future__ import annotations

import argparse
import difflib
import json
import sys
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from ipaddress import IPv4Address, ip_address
from pathlib import Path
from typing import Any

import yaml

from pykubeproxy import config as config_module
from pykubeproxy import kubeproxyconfig as kpc
from pykubeproxy import startup
from pykubeproxy.changes import EndpointsChangeTracker, ServiceChangeTracker
from pykubeproxy.cli import ipv4_cidrs, localhost_nodeports, nodeport_cidrs
from pykubeproxy.config import ConfigError, ProxyConfig
from pykubeproxy.convert import node_facts, object_name, slice_service
from pykubeproxy.iptables.render import RenderConfig, Renderer
from pykubeproxy.iptables.ruleset import CANARY, TableState, restore_text
from pykubeproxy.ipvs import render as ipvs_render
from pykubeproxy.ipvs.state import DUMMY_DEVICE, IPSETS, IpvsState
from pykubeproxy.model import EndpointsMap, IPAddress, IPNetwork, NodeFacts, ServicePortMap

KINDS = ("Service", "EndpointSlice", "Node")
LOOPBACK = IPv4Address("127.0.0.1")
IPVS_PROTOCOL_FLAGS = {"tcp": "-t", "udp": "-u", "sctp": "--sctp-service"}


class InputError(ValueError):
    """A -f input that cannot be read or does not say which node to render for."""


@dataclass
class Snapshot:
    """Services, EndpointSlices and Nodes of a cluster, as raw API objects."""

    objects: dict[str, list[dict[str, Any]]] = field(
        default_factory=lambda: {kind: [] for kind in KINDS}
    )
    ignored: int = 0  # objects of other kinds

    def add(self, obj: Any, kind: str = "") -> None:
        """Add an object, or every item of a List (kubectl's, or a typed ``ServiceList``)."""
        if not isinstance(obj, dict):
            raise InputError(f"expected API objects, found {type(obj).__name__}")
        kind = obj.get("kind") or kind
        if isinstance(obj.get("items"), list):
            for item in obj["items"]:
                self.add(item, kind.removesuffix("List") if kind != "List" else "")
        elif kind in KINDS:
            self.objects[kind].append(obj)
        else:
            self.ignored += 1


def _documents(path: str) -> Iterator[tuple[str, Any]]:
    """(where, document) for a file, every .json/.yaml/.yml file of a directory, or stdin."""
    if path == "-":
        yield "<stdin>", json.load(sys.stdin)
        return
    source = Path(path)
    files = sorted(
        f for f in source.iterdir() if f.suffix in (".json", ".yaml", ".yml")
    ) if source.is_dir() else [source]  # fmt: skip
    for file in files:
        try:
            text = file.read_text()
            if file.suffix == ".json":
                yield str(file), json.loads(text)
            else:
                for document in yaml.safe_load_all(text):
                    yield str(file), document
        except (OSError, ValueError, yaml.YAMLError) as err:
            raise InputError(f"{file}: {err}") from None


def load_snapshot(paths: Sequence[str]) -> Snapshot:
    """Every object of every input, in order."""
    snapshot = Snapshot()
    for path in paths:
        for where, document in _documents(path):
            if document is None:
                continue
            try:
                snapshot.add(document)
            except InputError as err:
                raise InputError(f"{where}: {err}") from None
    return snapshot


@dataclass
class Cluster:
    """The model the agent would hold after watching the snapshot, and this node's facts."""

    services: ServicePortMap
    endpoints: EndpointsMap
    node: NodeFacts
    addresses: tuple[IPAddress, ...]  # the node's own addresses (what `ip addr` would list)
    pod_cidrs: tuple[IPNetwork, ...]  # the Node's spec.podCIDRs


def cluster_model(snapshot: Snapshot, node_name: str, extra: Sequence[IPAddress]) -> Cluster:
    """Feed the objects through the agent's change trackers, as its watches would."""
    services, endpoints = ServiceChangeTracker(), EndpointsChangeTracker()
    for obj in snapshot.objects["Service"]:
        services.update(object_name(obj), obj)
    for obj in snapshot.objects["EndpointSlice"]:
        owner = slice_service(obj)
        if owner is not None:
            endpoints.update(owner, str(object_name(obj)), obj)
    services.apply()
    endpoints.apply()
    nodes = {object_name(obj).name: obj for obj in snapshot.objects["Node"]}
    if not node_name:
        if len(nodes) > 1:
            raise InputError(f"{len(nodes)} Nodes in the input: name one with --node")
        node_name = next(iter(nodes), "")
    node = nodes.get(node_name)
    if node_name and node is None and nodes:
        raise InputError(f"no Node {node_name!r} in the input (there are {', '.join(nodes)})")
    facts = node_facts(node, node_name)
    addresses = [*_node_addresses(node), *extra, LOOPBACK]
    return Cluster(
        services.service_map,
        endpoints.endpoints_map,
        facts,
        tuple(dict.fromkeys(addresses)),
        startup.pod_cidrs_of(node),
    )


def _node_addresses(obj: Any) -> list[IPAddress]:
    """Every InternalIP and ExternalIP of a Node object (status.addresses)."""
    found = []
    status = obj.get("status") if isinstance(obj, dict) else None
    for entry in (status or {}).get("addresses") or []:
        if isinstance(entry, dict) and entry.get("type") in ("InternalIP", "ExternalIP"):
            try:
                found.append(ip_address(entry.get("address", "")))
            except ValueError:
                continue
    return found


def iptables_config(cfg: ProxyConfig, pod_cidrs: tuple[IPNetwork, ...]) -> RenderConfig:
    """The renderer settings the agent derives from these flags (cli.iptables_backend)."""
    return RenderConfig(
        local_detector=startup.local_detector(cfg, pod_cidrs),
        masquerade_all=cfg.masquerade_all,
        masquerade_bit=cfg.masquerade_bit,
        localhost_nodeports=localhost_nodeports(cfg),
    )


def ipvs_config(cfg: ProxyConfig, pod_cidrs: tuple[IPNetwork, ...]) -> ipvs_render.IpvsConfig:
    """IPVS mode's settings from these flags (cli.ipvs_backend)."""
    return ipvs_render.IpvsConfig(
        scheduler=cfg.ipvs_scheduler or "rr",
        cluster_cidr=startup.ipvs_local_cidrs(cfg, pod_cidrs),
        masquerade_all=cfg.masquerade_all,
        masquerade_bit=cfg.masquerade_bit,
    )


@dataclass
class RenderedNode:
    """What the agent would make true on the node: iptables tables and, in IPVS mode, IPVS."""

    mode: str
    tables: list[TableState]
    ipvs: IpvsState | None
    cluster: Cluster
    nodeport_ips: tuple[IPAddress, ...]  # the addresses NodePorts answer on (not loopback)

    def iptables_text(self) -> str:
        return restore_text(self.tables, with_jumps=True)


def render_node(cluster: Cluster, cfg: ProxyConfig) -> RenderedNode:
    """One full sync's desired state, as the agent's backend for `cfg.mode` renders it."""
    if cfg.nodeport_addresses == [kpc.NODEPORT_ADDRESSES_PRIMARY]:  # as cli.run resolves it
        cfg.document["nodePortAddresses"] = startup.primary_nodeport_cidrs(cluster.node.ip)
    cidrs = nodeport_cidrs(cfg) if cfg.mode == "iptables" else ipv4_cidrs(cfg.nodeport_cidrs())
    in_cidrs = tuple(ip for ip in cluster.addresses if any(ip in c for c in cidrs))
    if cfg.mode == "ipvs":
        own = frozenset(
            ip for ip in cluster.addresses if isinstance(ip, IPv4Address) and not ip.is_loopback
        )
        node_ips = tuple(sorted(ip for ip in own if not cidrs or ip in in_cidrs))
        rendered = ipvs_render.render(
            cluster.services,
            cluster.endpoints,
            ipvs_config(cfg, cluster.pod_cidrs),
            cluster.node,
            node_ips,
            own,
        )
        return RenderedNode("ipvs", rendered.tables, rendered.state, cluster, node_ips)
    node = cluster.node
    if cidrs:
        node = NodeFacts(node.name, node.zone, node.ip, in_cidrs)
    answering = in_cidrs if cidrs else cluster.addresses
    rendered_tables = Renderer(iptables_config(cfg, cluster.pod_cidrs)).render(
        cluster.services, cluster.endpoints, node=node
    )
    mangle = TableState("mangle", chains={CANARY: []})  # the agent's canary lives here too
    nodeport_ips = tuple(ip for ip in answering if not ip.is_loopback)
    return RenderedNode("iptables", [*rendered_tables.tables, mangle], None, cluster, nodeport_ips)


def ipvs_text(state: IpvsState) -> str:
    """Virtual services (``ipvsadm-save -n``), kube-ipvs0 (``ip -batch``), ipsets
    (``ipset restore``), each section sorted."""
    lines = ["# IPVS virtual services (ipvsadm-save -n)"]
    for vs in sorted(state.services):
        opts = state.services[vs]
        flag = IPVS_PROTOCOL_FLAGS[vs.protocol.value]
        address = f"[{vs.address}]" if vs.address.version == 6 else str(vs.address)
        service = f"{flag} {address}:{vs.port}"
        extra = f" -p {opts.persistence_timeout}" if opts.persistence_timeout is not None else ""
        if opts.scheduler == "mh":
            extra += " -b mh-port"
        lines.append(f"-A {service} -s {opts.scheduler}{extra}")
        lines += [f"-a {service} -r {rs} -m -w 1" for rs in sorted(state.real_servers.get(vs, ()))]
    lines.append(f"# {DUMMY_DEVICE} addresses (ip -batch)")
    lines += [
        f"address add {ip}/{ip.max_prefixlen} dev {DUMMY_DEVICE}"
        for ip in sorted(state.addresses, key=lambda ip: (ip.version, int(ip)))
    ]
    lines.append("# ipsets (ipset restore)")
    for spec in IPSETS:
        lines.append(f"create {spec.name} {spec.type} {' '.join(spec.create_args())}")
        lines += [f"add {spec.name} {entry}" for entry in sorted(state.ipsets.get(spec.name, ()))]
    return "\n".join(lines) + "\n"


def render_text(rendered: RenderedNode, cfg: ProxyConfig) -> str:
    """The whole output: a header, the IPVS state in IPVS mode, the iptables rules."""
    cluster = rendered.cluster
    ports = len(cluster.services)
    header = (
        f"# pykubeproxy render: node {cluster.node.name or '(none)'}, {rendered.mode} mode, "
        f"{len({name.service for name in cluster.services})} Services ({ports} ports), "
        f"cluster CIDR {cfg.cluster_cidr or '(none)'}\n"
    )
    ipvs = ipvs_text(rendered.ipvs) if rendered.ipvs is not None else ""
    iptables = "# iptables (iptables-restore)\n" if ipvs else ""
    return header + ipvs + iptables + rendered.iptables_text()


def diff_text(before: str, after: str, names: tuple[str, str]) -> str:
    """The rule changes, as a unified diff with one line of context."""
    return "".join(
        difflib.unified_diff(
            before.splitlines(keepends=True), after.splitlines(keepends=True), *names, n=1
        )
    )


def add_input_options(parser: argparse.ArgumentParser) -> None:
    """The options `render` and `explain -f` share: inputs, node, node addresses."""
    parser.add_argument(
        "-f", "--filename", action="append", default=[], metavar="FILE",
        help="kubectl get svc,endpointslices,nodes -A -o json output: a file, a directory "
        "of them, or - for stdin (repeatable)",
    )  # fmt: skip
    parser.add_argument(
        "--node", default="", help="the node to render for (default: --hostname-override, "
        "else the only Node in the input)",
    )  # fmt: skip
    parser.add_argument(
        "--node-address", action="append", default=[], type=ip_address, metavar="IP",
        help="an address of the node besides its Node object's InternalIP/ExternalIP",
    )  # fmt: skip


def load_cluster(paths: Sequence[str], args: argparse.Namespace, cfg: ProxyConfig) -> Cluster:
    """The model for the node `--node` (or the agent flag --hostname-override) names."""
    node = args.node or cfg.hostname_override.strip().lower()
    return cluster_model(load_snapshot(paths), node, args.node_address)


def parse(
    parser: argparse.ArgumentParser, argv: list[str]
) -> tuple[argparse.Namespace, ProxyConfig]:
    """This command's options, then every other word as the agent's flags."""
    args, rest = parser.parse_known_args(argv)
    return args, config_module.load(rest)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="pykubeproxy render",
        allow_abbrev=False,
        description="Print the rules the agent would write on a node, from kubectl's JSON. "
        "Any agent flag (--proxy-mode, --cluster-cidr, --masquerade-all, "
        "--nodeport-addresses, --ipvs-scheduler, --config ...) shapes them as it would.",
    )
    add_input_options(parser)
    parser.add_argument(
        "--diff", action="store_true",
        help="render two inputs (-f BEFORE -f AFTER) and print the changes; exit 1 if any",
    )  # fmt: skip
    return parser


def main(argv: list[str]) -> int:
    parser = build_parser()
    try:
        args, cfg = parse(parser, argv)
        if not args.filename:
            raise InputError("give the cluster's objects with -f FILE")
        if not args.diff:
            rendered = render_node(load_cluster(args.filename, args, cfg), cfg)
            sys.stdout.write(render_text(rendered, cfg))
            return 0
        if len(args.filename) != 2:
            raise InputError("--diff compares two inputs: -f BEFORE -f AFTER")
        before, after = (
            render_text(render_node(load_cluster([path], args, cfg), cfg), cfg).split("\n", 1)[1]
            for path in args.filename
        )
        changes = diff_text(before, after, (args.filename[0], args.filename[1]))
        sys.stdout.write(changes or "no changes\n")
        return 1 if changes else 0
    except (ConfigError, InputError) as err:
        print(f"pykubeproxy render: error: {err}", file=sys.stderr)
        return 2
