"""Raw netlink for IPVS mode: messages packed by hand, writes sent many per system call.

Why not pyroute2 for the hot paths: pyroute2 0.9 builds every message through generic
request objects, encodes and decodes it field by field, and runs each request through an
asyncio loop; at 9,000 writes that was over 90% of a first sync (docs/performance.md). Here a
message is a few ``struct.pack`` calls, and a dump reply is cut into attributes without
building objects for the fields nobody reads.

Writes are pipelined: `Channel.queue` collects requests and `Channel.flush` sends them in
chunks, one ``send`` per chunk. Only the last request of a chunk asks for an ACK; the kernel
handles the requests of one ``send`` in order and answers the others only to refuse them
(an ``NLMSG_ERROR`` carrying their sequence number), so the ACK of the last one means the
whole chunk was handled, and every refusal before it is matched to its request. A chunk is
small enough that its refusals fit in the socket's receive buffer; if replies were dropped
anyway (``ENOBUFS``) the call fails, since no one knows which writes took.

Every error is reported as pyroute2's `NetlinkError`, as the rest of IPVS mode expects.
"""

from __future__ import annotations

import contextlib
import errno
import socket
import struct
from collections.abc import Callable, Hashable, Iterable, Iterator
from typing import Any, Generic, TypeVar

from pyroute2.netlink.exceptions import NetlinkError

NETLINK_ROUTE = 0
NETLINK_NETFILTER = 12
NETLINK_GENERIC = 16
SOL_NETLINK = 270
SO_RCVBUFFORCE = 33  # not in Python's socket module
NETLINK_CAP_ACK = 10  # refusals without a copy of the request: small replies

NLMSG_ERROR = 2
NLMSG_DONE = 3
NLMSG_MIN_TYPE = 0x10  # below: netlink's own messages
NLM_F_REQUEST = 0x1
NLM_F_MULTI = 0x2
NLM_F_ACK = 0x4
NLM_F_DUMP = 0x300
NLM_F_EXCL = 0x200
NLM_F_CREATE = 0x400
NLA_F_NESTED = 0x8000
NLA_F_NET_BYTEORDER = 0x4000
NLA_TYPE_MASK = 0x3FFF

GENL_ID_CTRL = 0x10
CTRL_CMD_GETFAMILY = 3
CTRL_ATTR_FAMILY_ID = 1
CTRL_ATTR_FAMILY_NAME = 2

CHUNK = 128  # requests per send: their refusals stay well inside the receive buffer
RECEIVE_BUFFER = 1 << 20
READ_SIZE = 1 << 16  # the kernel fills a dump reply up to 32 KiB

HEADER = struct.Struct("=IHHII")  # struct nlmsghdr
ATTR = struct.Struct("=HH")  # struct nlattr
U16 = struct.Struct("=H")
U32 = struct.Struct("=I")
BE16 = struct.Struct(">H")
BE32 = struct.Struct(">I")
ERROR = struct.Struct("=i")

# What a queued write calls once the kernel answered: 0 if it took the write, else the errno.
Done = Callable[[int], None]
K = TypeVar("K", bound=Hashable)
V = TypeVar("V")
_MISSING: Any = object()


# The ipset subsystem's own error codes (include/uapi/linux/netfilter/ipset/ip_set.h), which
# strerror does not know; they do not clash with errno values.
IPSET_ERRORS = {
    4097: "the kernel speaks another ipset protocol",
    4098: "the kernel has no such set type",
    4099: "too many sets",
    4100: "the set is in use",
    4102: "a set of that name exists with another type or options",
    4103: "the member exists already",
    4108: "the set is referenced",
    4352: "the set is full",
}


def error(code: int) -> NetlinkError:
    """The error for a kernel refusal's code."""
    return NetlinkError(code, IPSET_ERRORS.get(code))


def attr(kind: int, data: bytes) -> bytes:
    """One netlink attribute, padded to 4 bytes."""
    return ATTR.pack(4 + len(data), kind) + data + b"\0" * (-len(data) % 4)


def nested(kind: int, *parts: bytes) -> bytes:
    return attr(kind | NLA_F_NESTED, b"".join(parts))


def asciiz(kind: int, text: str) -> bytes:
    return attr(kind, text.encode() + b"\0")


def attrs(data: bytes, start: int = 0) -> dict[int, bytes]:
    """The attributes in data[start:] by type (flags masked off; a repeated type keeps its
    last value)."""
    found = {}
    end = len(data)
    while start + 4 <= end:
        length, kind = ATTR.unpack_from(data, start)
        if length < 4:
            break
        found[kind & NLA_TYPE_MASK] = data[start + 4 : start + length]
        start += (length + 3) & ~3
    return found


def repeated(data: bytes, kind: int) -> Iterator[bytes]:
    """Every attribute of one type in data, in order (e.g. the members of an ipset list)."""
    start, end = 0, len(data)
    while start + 4 <= end:
        length, found = ATTR.unpack_from(data, start)
        if length < 4:
            break
        if found & NLA_TYPE_MASK == kind:
            yield data[start + 4 : start + length]
        start += (length + 3) & ~3


def _messages(data: bytes) -> Iterator[tuple[int, int, int, bytes]]:
    """(type, flags, sequence number, payload) of each message in one datagram."""
    start, end = 0, len(data)
    while start + HEADER.size <= end:
        length, kind, flags, seq, _ = HEADER.unpack_from(data, start)
        if length < HEADER.size:
            break
        yield kind, flags, seq, data[start + HEADER.size : start + length]
        start += (length + 3) & ~3


def _errno(payload: bytes) -> int:
    """The errno of an NLMSG_ERROR (0: an ACK) or NLMSG_DONE payload."""
    return -ERROR.unpack_from(payload)[0] if len(payload) >= ERROR.size else 0


class Memo(Generic[K, V]):
    """Records parsed from their raw bytes or text, kept from one read to the next.

    A full sync reads the same thousands of records (virtual services, set members,
    addresses) every time, and most are as they were: looking a raw record up costs far less
    than parsing it again. A record whose bytes changed (a service's traffic counters, say)
    is parsed anew. Each read keeps only the records it saw.
    """

    def __init__(self, parse: Callable[[K], V]) -> None:
        self._parse = parse
        self._known: dict[K, V] = {}

    def __call__(self, raws: Iterable[K]) -> list[V]:
        known = self._known
        seen: dict[K, V] = {}
        found = []
        for raw in raws:
            value = seen.get(raw, _MISSING)
            if value is _MISSING:
                value = known.get(raw, _MISSING)
                if value is _MISSING:
                    value = self._parse(raw)
                seen[raw] = value
            found.append(value)
        self._known = seen
        return found


class Channel:
    """One netlink socket of the calling thread's network namespace."""

    def __init__(self, protocol: int) -> None:
        try:
            self.sock = socket.socket(
                socket.AF_NETLINK, socket.SOCK_RAW | socket.SOCK_CLOEXEC, protocol
            )
        except OSError as err:
            raise NetlinkError(err.errno or errno.EPROTONOSUPPORT, str(err)) from err
        with contextlib.suppress(OSError):  # Linux 4.3+; else refusals echo the request
            self.sock.setsockopt(SOL_NETLINK, NETLINK_CAP_ACK, 1)
        try:
            try:  # as root, past net.core.rmem_max
                self.sock.setsockopt(socket.SOL_SOCKET, SO_RCVBUFFORCE, RECEIVE_BUFFER)
            except OSError:
                self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, RECEIVE_BUFFER)
            self.sock.bind((0, 0))
        except OSError as err:
            self.sock.close()
            raise NetlinkError(err.errno or errno.EIO, str(err)) from err
        self._seq = 0
        self._queued: list[tuple[int, int, bytes, Done]] = []

    def close(self) -> None:
        self.sock.close()

    def _send(self, data: bytes) -> None:
        try:
            self.sock.send(data)
        except OSError as err:
            raise NetlinkError(err.errno or errno.EIO, f"netlink send: {err}") from err

    def _receive(self) -> bytes:
        try:
            return self.sock.recv(READ_SIZE)
        except OSError as err:
            if err.errno == errno.ENOBUFS:
                raise NetlinkError(err.errno, "netlink replies were lost (ENOBUFS)") from err
            raise NetlinkError(err.errno or errno.EIO, f"netlink receive: {err}") from err

    def request(self, kind: int, flags: int, payload: bytes) -> list[bytes]:
        """One request, after the queued writes: the payloads of its replies (a dump's
        messages, a get's answer, nothing for an ACK). Raises NetlinkError if refused."""
        self.flush()
        self._seq += 1
        seq = self._seq
        flags |= NLM_F_REQUEST
        self._send(HEADER.pack(HEADER.size + len(payload), kind, flags, seq, 0) + payload)
        found: list[bytes] = []
        while True:
            for reply, reply_flags, reply_seq, body in _messages(self._receive()):
                if reply_seq != seq:
                    continue  # a late answer to an earlier request
                if reply in (NLMSG_ERROR, NLMSG_DONE):
                    code = _errno(body)
                    if code:
                        raise error(code)
                    return found
                if reply < NLMSG_MIN_TYPE:
                    continue  # NLMSG_NOOP and the like
                found.append(body)
                if not reply_flags & NLM_F_MULTI and not flags & NLM_F_ACK:
                    return found

    def queue(self, kind: int, flags: int, payload: bytes, done: Done) -> None:
        """A write, sent by the next flush (or request): done(errno or 0) is called then."""
        self._queued.append((kind, flags, payload, done))

    def flush(self) -> None:
        """Send the queued writes and call their `done` in order."""
        queued, self._queued = self._queued, []
        for start in range(0, len(queued), CHUNK):
            chunk = queued[start : start + CHUNK]
            first = self._seq + 1
            last = first + len(chunk) - 1
            self._seq = last
            parts: list[bytes] = []
            for seq, (kind, flags, payload, _) in enumerate(chunk, first):
                flags |= NLM_F_REQUEST | (NLM_F_ACK if seq == last else 0)
                parts += (HEADER.pack(HEADER.size + len(payload), kind, flags, seq, 0), payload)
            self._send(b"".join(parts))
            codes: dict[int, int] = {}
            while last not in codes:
                for reply, _, seq, body in _messages(self._receive()):
                    if reply == NLMSG_ERROR and first <= seq <= last:
                        codes[seq] = _errno(body)
            for seq, (*_, done) in enumerate(chunk, first):
                done(codes.get(seq, 0))


class GenericChannel(Channel):
    """A generic netlink socket bound to one family, whose id the kernel tells."""

    def __init__(self, family: str) -> None:
        super().__init__(NETLINK_GENERIC)
        try:
            self.family = self._family_id(family)
        except NetlinkError:
            self.close()
            raise

    def _family_id(self, name: str) -> int:
        ask = struct.pack("=BBH", CTRL_CMD_GETFAMILY, 1, 0) + asciiz(CTRL_ATTR_FAMILY_NAME, name)
        for body in self.request(GENL_ID_CTRL, 0, ask):
            found = attrs(body, 4).get(CTRL_ATTR_FAMILY_ID)
            if found is not None:
                return int(U16.unpack(found[:2])[0])
        raise NetlinkError(errno.ENOENT, f"no generic netlink family {name}")
