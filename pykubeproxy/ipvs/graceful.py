"""Graceful termination of IPVS real servers, and the conntrack flows of removed ones.

Upstream (pkg/proxy/ipvs/graceful_termination.go): a real server a sync no longer wants is
deleted at once when its protocol is UDP or SCTP or it has no connections; otherwise it gets
weight 0, so it takes no new connections, and is deleted once ActiveConn + InactiveConn
reaches 0. One that is wanted again leaves the list (and gets weight 1 back).

Differences, on purpose: upstream waits forever; here a real server is deleted after
``drain_timeout`` seconds at the latest, so nothing lingers. The list lives in memory, and
a real server found at weight 0 on one of our services and not wanted (a previous process
was draining it) joins it.

Flows: a client of a UDP or SCTP Service that keeps its source port keeps matching its old
conntrack flow. Since Linux 5.10 IPVS flushes the connections (and flows) of a deleted real
server itself when expire_nodest_conn=1; for older kernels, or the sysctl left at 0, the
flows of removed UDP/SCTP real servers and services are deleted over conntrack netlink, in
one table dump per call (`clear_flows`).
"""

from __future__ import annotations

import logging
import socket
import time
from collections import defaultdict
from collections.abc import Callable, Iterable, Iterator

from pykubeproxy import conntrack
from pykubeproxy.ipvs.netlink import (
    GONE,
    IPVS_CMD_DEL_DEST,
    IPVS_CMD_SET_DEST,
    Kernel,
    KernelDest,
    NetlinkError,
    Problems,
    Refused,
    dest_body,
    refusal,
)
from pykubeproxy.ipvs.state import RealServer, VirtualServer
from pykubeproxy.model import IPAddress, Protocol

log = logging.getLogger(__name__)

DEFAULT_DRAIN_TIMEOUT = 900.0
FLUSHED_PROTOCOLS = frozenset({Protocol.UDP, Protocol.SCTP})
# A virtual server as conntrack sees it: (protocol, address, port).
Frontend = tuple[Protocol, IPAddress, int]


class GracefulTermination:
    """The real servers being drained, and the flows to delete after a call."""

    def __init__(
        self,
        drain_timeout: float = DEFAULT_DRAIN_TIMEOUT,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.drain_timeout = drain_timeout
        self.clock = clock
        self._draining: dict[tuple[VirtualServer, RealServer], float] = {}  # -> deadline
        # Whose flows go: the removed real servers of a frontend, or None for all of them.
        self._flows: dict[Frontend, set[IPAddress] | None] = {}

    def draining(self) -> dict[tuple[VirtualServer, RealServer], float]:
        """Real servers at weight 0 waiting for their connections to end, with deadlines."""
        return dict(self._draining)

    def services(self) -> set[VirtualServer]:
        return {vs for vs, _ in self._draining}

    def keep(self, vs: VirtualServer, rs: RealServer) -> None:
        """A wanted real server is not (or no longer) draining."""
        if self._draining:
            self._draining.pop((vs, rs), None)

    def clear(self) -> None:
        self._draining.clear()
        self._flows.clear()

    def retire(self, kernel: Kernel, vs: VirtualServer, dest: KernelDest, refused: Refused) -> None:
        """Remove an unwanted real server: at once if it can go, else weight 0 and drain
        (queued writes; a refusal goes to `refused`)."""
        if vs.protocol in FLUSHED_PROTOCOLS or dest.connections == 0:
            self.delete(kernel, vs, dest.rs, refused)
            return
        if dest.weight != 0:
            what = f"set {vs} -> {dest.rs} weight 0 (draining {dest.connections} connections)"
            kernel.write_ipvs(what, IPVS_CMD_SET_DEST, dest_body(vs, dest.rs, 0), refused)
        self._draining.setdefault((vs, dest.rs), self.clock() + self.drain_timeout)

    def delete(self, kernel: Kernel, vs: VirtualServer, rs: RealServer, refused: Refused) -> None:
        """Delete a real server now (queued; one already gone is fine), and later its flows."""
        self._draining.pop((vs, rs), None)

        def unless_gone(err: NetlinkError) -> None:
            if err.code not in GONE:
                refused(err)

        kernel.write_ipvs(f"delete {vs} -> {rs}", IPVS_CMD_DEL_DEST, dest_body(vs, rs), unless_gone)
        self._forget_flows(vs, rs.address)

    def service_deleted(self, vs: VirtualServer) -> None:
        """A whole virtual service went: nothing of it drains, all its flows go."""
        for key in [key for key in self._draining if key[0] == vs]:
            del self._draining[key]
        self._forget_flows(vs, None)

    def _forget_flows(self, vs: VirtualServer, real_server: IPAddress | None) -> None:
        if vs.protocol not in FLUSHED_PROTOCOLS:
            return
        key = (vs.protocol, vs.address, vs.port)
        servers = self._flows.get(key, set())
        if real_server is None:
            self._flows[key] = None
        elif servers is not None:
            self._flows[key] = servers | {real_server}

    def drain(self, kernel: Kernel, problems: Problems) -> None:
        """Delete the draining real servers whose connections ended or whose time is up
        (queued writes)."""
        by_service: dict[VirtualServer, list[RealServer]] = defaultdict(list)
        for vs, rs in self._draining:
            by_service[vs].append(rs)
        now = self.clock()
        for vs, servers in sorted(by_service.items()):
            try:
                dests = kernel.dests(vs)
            except NetlinkError as err:
                if err.code not in GONE:
                    problems.add(f"list the real servers of {vs}: {err}")
                    continue
                dests = {}
            for rs in sorted(servers):
                self._drain_one(kernel, vs, rs, dests.get(rs), now, problems)

    def _drain_one(
        self,
        kernel: Kernel,
        vs: VirtualServer,
        rs: RealServer,
        dest: KernelDest | None,
        now: float,
        problems: Problems,
    ) -> None:
        if dest is None:
            self._draining.pop((vs, rs), None)  # gone already (or its service)
            return
        if dest.connections and now < self._draining[(vs, rs)]:
            return
        if dest.connections:
            log.warning(
                "real server %s of %s still has %d connections after %.0fs of draining; "
                "deleting it",
                rs,
                vs,
                dest.connections,
                self.drain_timeout,
            )
        self.delete(kernel, vs, rs, refusal(problems, f"delete {vs} -> {rs}"))

    def clear_flows(self, family: socket.AddressFamily = socket.AF_INET) -> None:
        """Delete the conntrack flows of the real servers and services removed so far, in
        the calling thread's namespace (one table dump); never raises."""
        if not self._flows:
            return
        gone, self._flows = self._flows, {}

        def pick(flows: Iterable[conntrack.Flow]) -> Iterator[conntrack.Flow]:
            for flow in flows:
                servers = gone.get((flow.protocol, flow.orig_dst, flow.orig_dst_port), set())
                if servers is None or flow.reply_src in servers:
                    yield flow

        deleted = conntrack.delete_flows(pick, FLUSHED_PROTOCOLS, family, "clear removed IPVS")
        if deleted:
            log.debug("deleted %d conntrack flows of removed IPVS real servers", deleted)
