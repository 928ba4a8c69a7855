"""Delete the conntrack flows that keep UDP Service traffic on endpoints that no longer serve.

UDP has no teardown: conntrack keeps a flow, and the DNAT chosen for its first packet, for as
long as packets keep coming. A client that keeps its source port therefore keeps reaching a
removed endpoint, or, if its flow was created while the Service had no endpoints, keeps
reaching nothing, long after the rules changed. As kube-proxy does (pkg/proxy/conntrack,
``CleanStaleEntries`` in cleanup.go), the agent reconciles the kernel's table with the current
Services after a sync, rather than computing deletions from what changed: one netlink dump of
the address family, a pure filter in memory (`stale_flows`), one netlink delete per flow it
picks. Working from state, a flow missed once (failed sync, restart) is found the next time.

The rules are upstream's, in its version that compares endpoint IP *and* port:

- only UDP Service ports are considered (TCP and SCTP connections end on their own);
- a Service port without any serving endpoint is skipped, so a Service that lost its
  endpoints, or whose endpoints a restarted agent has not seen yet, loses no flow;
- an endpoint counts when its ``serving`` condition is true, whatever ``ready`` and
  ``terminating`` say, and traffic policies and topology play no part: an existing flow
  should survive a change of the Service the way a TCP connection would;
- a flow is stale when its original destination is a frontend of such a port (ClusterIP,
  external IP or load-balancer IP, with the Service port) or its original destination port
  is the NodePort (any destination address), and its reply source IP:port is none of the
  serving endpoints. A flow that was never DNATed replies from the frontend itself, so it
  is stale as soon as the Service has an endpoint.

Beyond upstream, flows to a frontend that a deleted (or changed) Service port no longer
has are deleted too: otherwise a client that keeps its source port keeps reaching the old
endpoint through a Service that no longer exists.

The netlink socket is opened and closed by each `ConntrackReconciler.reconcile` call, in the
calling thread: conntrack tables are per network namespace, and so is the flow list read.
"""

from __future__ import annotations

import errno
import logging
import socket
import time
from collections.abc import Callable, Iterable, Iterator
from collections.abc import Set as AbstractSet
from dataclasses import dataclass
from ipaddress import ip_address
from typing import Any

from pyroute2 import NFCTSocket
from pyroute2.netlink.exceptions import NetlinkError
from pyroute2.netlink.nfnetlink.nfctsocket import NFCTAttrTuple

from pykubeproxy.model import EndpointsMap, IPAddress, Protocol, ServicePortMap, ServicePortName

log = logging.getLogger(__name__)

# The protocols whose Service flows are reconciled (upstream: UDP only).
RECONCILED_PROTOCOLS = frozenset({Protocol.UDP})
_PROTOCOL_NUMBERS = {
    Protocol.TCP: socket.IPPROTO_TCP,
    Protocol.UDP: socket.IPPROTO_UDP,
    Protocol.SCTP: socket.IPPROTO_SCTP,
}
_ADDRESS_ATTRS = {
    socket.AF_INET: ("CTA_IP_V4_SRC", "CTA_IP_V4_DST"),
    socket.AF_INET6: ("CTA_IP_V6_SRC", "CTA_IP_V6_DST"),
}

Backend = tuple[IPAddress, int]
# A Service frontend: (protocol, IP, port), or (protocol, NodePort) on any node address.
Frontend = tuple[Protocol, IPAddress, int] | tuple[Protocol, int]


@dataclass(frozen=True)
class Flow:
    """One conntrack entry, reduced to what the rules look at and what a delete needs."""

    protocol: Protocol
    orig_src: IPAddress
    orig_src_port: int
    orig_dst: IPAddress
    orig_dst_port: int
    reply_src: IPAddress
    reply_src_port: int
    zone: int = 0
    # The kernel's id of the entry: a delete naming it removes that entry and no later one.
    kernel_id: int | None = None


@dataclass(frozen=True)
class ReconcileResult:
    """What one reconcile did, for kube-proxy's conntrack reconciler metrics."""

    deleted: int
    seconds: float
    # False when the table could not be read (nothing was deleted); upstream then records
    # neither reconciler metric.
    table_read: bool = True


def reconcile_needed(changed_ports: Iterable[ServicePortName]) -> bool:
    """Whether endpoint changes of these Service ports call for a reconcile.

    Upstream reconciles only after a sync in which a Service with a UDP port (before or after
    the change) got different endpoints (``ConntrackCleanupRequired`` of
    ``EndpointsMap.Update``, pkg/proxy/endpointschangetracker.go): the dump costs as much as
    the table is large.
    """
    return any(name.protocol in RECONCILED_PROTOCOLS for name in changed_ports)


def frontends(services: ServicePortMap) -> set[Frontend]:
    """Every (protocol, IP, port) and (protocol, NodePort) of the reconciled Service ports."""
    found: set[Frontend] = set()
    for svc in services.values():
        if svc.protocol in RECONCILED_PROTOCOLS:
            found.update(
                (svc.protocol, ip, svc.port)
                for ip in (svc.cluster_ip, *svc.load_balancer_ips, *svc.external_ips)
            )
            if svc.node_port:
                found.add((svc.protocol, svc.node_port))
    return found


def stale_flows(
    services: ServicePortMap,
    endpoints: EndpointsMap,
    flows: Iterable[Flow],
    gone: AbstractSet[Frontend] = frozenset(),
) -> list[Flow]:
    """The flows to delete: those kube-proxy's rules (see the module docstring) call stale,
    and, beyond upstream, every flow to a frontend of a Service port that is `gone`."""
    by_frontend: dict[tuple[Protocol, IPAddress, int], frozenset[Backend]] = {}
    by_node_port: dict[tuple[Protocol, int], frozenset[Backend]] = {}
    for name, svc in services.items():
        if svc.protocol not in RECONCILED_PROTOCOLS:
            continue
        serving = frozenset((ep.ip, ep.port) for ep in endpoints.get(name, ()) if ep.serving)
        if not serving:
            continue
        for ip in (svc.cluster_ip, *svc.load_balancer_ips, *svc.external_ips):
            by_frontend[svc.protocol, ip, svc.port] = serving
        if svc.node_port:
            by_node_port[svc.protocol, svc.node_port] = serving

    def is_stale(flow: Flow) -> bool:
        if {
            (flow.protocol, flow.orig_dst, flow.orig_dst_port),
            (flow.protocol, flow.orig_dst_port),
        } & gone:
            return True
        backend = (flow.reply_src, flow.reply_src_port)
        return any(
            serving is not None and backend not in serving
            for serving in (
                by_frontend.get((flow.protocol, flow.orig_dst, flow.orig_dst_port)),
                by_node_port.get((flow.protocol, flow.orig_dst_port)),
            )
        )

    return [flow for flow in flows if is_stale(flow)]


class ConntrackReconciler:
    """Reads the conntrack table over netlink and deletes the flows `stale_flows` picks."""

    def __init__(self, family: socket.AddressFamily = socket.AF_INET) -> None:
        self.family = family
        # The frontends seen by the last reconcile: flows to those that went are stale.
        self._frontends: set[Frontend] = set()

    def reconcile(self, services: ServicePortMap, endpoints: EndpointsMap) -> ReconcileResult:
        """Delete the stale flows of the calling thread's namespace; never raises.

        Without nf_conntrack_netlink, or without CAP_NET_ADMIN, this logs one warning and
        deletes nothing: stale flows then only age out.
        """
        started = time.monotonic()
        current = frontends(services)
        gone, self._frontends = self._frontends - current, current
        deleted = delete_flows(
            lambda flows: stale_flows(services, endpoints, flows, gone),
            RECONCILED_PROTOCOLS,
            self.family,
            "reconcile",
        )
        seconds = time.monotonic() - started
        if deleted is None:
            return ReconcileResult(0, seconds, table_read=False)
        log.debug("conntrack reconcile: %d stale flows deleted in %.3fs", deleted, seconds)
        return ReconcileResult(deleted, seconds)


def delete_flows(
    pick: Callable[[Iterable[Flow]], Iterable[Flow]],
    protocols: AbstractSet[Protocol],
    family: socket.AddressFamily = socket.AF_INET,
    why: str = "delete",
) -> int | None:
    """One dump of the calling thread's table, then a delete of each flow `pick` returns.

    Returns how many were deleted, or None (and one warning) when the table could not be
    read: without nf_conntrack_netlink or CAP_NET_ADMIN stale flows only age out. Never
    raises: a conntrack problem must never fail a sync.
    """
    try:
        with NFCTSocket(nfgen_family=family) as nfct:
            return _delete(nfct, family, list(pick(_dump(nfct, family, protocols))))
    except Exception as err:
        log.warning("cannot %s conntrack flows: %s: %s", why, type(err).__name__, err)
        return None


def _dump(
    nfct: Any, family: socket.AddressFamily, protocols: AbstractSet[Protocol]
) -> Iterator[Flow]:
    """The flows of these protocols, parsed from one dump of the family."""
    src_attr, dst_attr = _ADDRESS_ATTRS[family]
    wanted = {_PROTOCOL_NUMBERS[p]: p for p in protocols}
    for msg in nfct.dump():
        orig, reply = msg.get_attr("CTA_TUPLE_ORIG"), msg.get_attr("CTA_TUPLE_REPLY")
        orig_ports = orig.get_attr("CTA_TUPLE_PROTO")
        protocol = wanted.get(orig_ports.get_attr("CTA_PROTO_NUM"))
        if protocol is None:
            continue
        orig_ips, reply_ips = orig.get_attr("CTA_TUPLE_IP"), reply.get_attr("CTA_TUPLE_IP")
        reply_ports = reply.get_attr("CTA_TUPLE_PROTO")
        yield Flow(
            protocol=protocol,
            orig_src=ip_address(orig_ips.get_attr(src_attr)),
            orig_src_port=orig_ports.get_attr("CTA_PROTO_SRC_PORT"),
            orig_dst=ip_address(orig_ips.get_attr(dst_attr)),
            orig_dst_port=orig_ports.get_attr("CTA_PROTO_DST_PORT"),
            reply_src=ip_address(reply_ips.get_attr(src_attr)),
            reply_src_port=reply_ports.get_attr("CTA_PROTO_SRC_PORT"),
            zone=msg.get_attr("CTA_ZONE") or 0,
            kernel_id=msg.get_attr("CTA_ID"),
        )


def _delete(nfct: Any, family: socket.AddressFamily, flows: list[Flow]) -> int:
    """Delete each flow; one that expired meanwhile is not an error. Returns the count."""
    deleted = 0
    failures: list[NetlinkError] = []
    for flow in flows:
        orig = NFCTAttrTuple(
            family=family,
            saddr=str(flow.orig_src),
            daddr=str(flow.orig_dst),
            proto=_PROTOCOL_NUMBERS[flow.protocol],
            sport=flow.orig_src_port,
            dport=flow.orig_dst_port,
        )
        try:
            nfct.entry("del", tuple_orig=orig, id=flow.kernel_id, zone=flow.zone or None)
        except NetlinkError as err:
            if err.code != errno.ENOENT:
                failures.append(err)
            continue
        log.debug("deleted conntrack flow %s", flow)
        deleted += 1
    if failures:
        log.warning(
            "could not delete %d conntrack flows (first error: %s)",
            len(failures),
            failures[0],
        )
    return deleted
