"""In-memory Kubernetes API server double for tests and the sandbox demo.

No kube-apiserver binary is available here, and generic HTTP mocks ignore the
conventions an informer-style client depends on, so this double implements them:

* One generic MVCC store serves every registered kind (services, endpointslices,
  nodes, core and events.k8s.io events) with a single global resourceVersion
  counter shared by all kinds, like etcd's revision.  uid, creationTimestamp,
  generation and resourceVersion are server-managed; an update that changes
  nothing does not bump the revision.
* create / get / replace / merge-patch / delete, with ``Status`` errors
  (AlreadyExists, NotFound, Conflict on a stale resourceVersion, BadRequest ...).
* list: labelSelector (full syntax), fieldSelector (metadata.name,
  metadata.namespace), limit/continue paging over a consistent snapshot,
  resourceVersion / resourceVersionMatch, 410 Expired after compaction.  A list at
  resourceVersion "0" is answered whole, ``limit`` ignored, as an API server answers it
  from its watch cache (the API conventions allow a server to ignore ``limit`` there).
* watch: HTTP/1.1 chunked, one JSON event per line.  Resume from a
  resourceVersion, synthetic ADDED events for "" and "0", a single 410 ERROR
  event for compacted versions, selector transitions reported as ADDED/DELETED,
  timeoutSeconds and periodic BOOKMARK events.
* Fault injection: dropped watches, compaction, injected HTTP failures,
  refused connections (pause/resume), TLS with a throwaway CA, bearer tokens.

Not modelled: admission, defaulting and IP allocation, namespaces as objects,
finalizers, subresources, JSON patch, server-side apply, protobuf.
"""

from __future__ import annotations

import argparse
import base64
import bisect
import builtins
import contextlib
import copy
import ctypes
import fcntl
import ipaddress
import json
import logging
import os
import random
import re
import select
import shutil
import signal
import socket
import socketserver
import ssl
import subprocess
import tempfile
import threading
import time
import uuid
from collections import deque
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from http.server import BaseHTTPRequestHandler
from pathlib import Path
from types import TracebackType
from typing import Any, NamedTuple, Self
from urllib.parse import parse_qs, urlsplit

log = logging.getLogger(__name__)

Obj = dict[str, Any]

GIT_VERSION = "v1.31.0"
_VERSION_INFO: Obj = {
    "major": "1",
    "minor": "31",
    "gitVersion": GIT_VERSION,
    "gitCommit": "0" * 40,
    "gitTreeState": "clean",
    "buildDate": "2024-08-13T00:00:00Z",
    "goVersion": "go1.22.5",
    "compiler": "gc",
    "platform": "linux/amd64",
}
_THREAD_PREFIX = "apiserver-double"
_NAME_CHARS = "bcdfghjklmnpqrstvwxz2456789"  # generateName suffix alphabet, as upstream


# --------------------------------------------------------------------------- kinds


@dataclass(frozen=True)
class ResourceKind:
    """A served resource.  Kinds with the same ``resource`` share one store, like the two
    Event APIs; ``renames`` is the field conversion from this API to the stored shape."""

    resource: str
    kind: str
    group_version: str
    namespaced: bool
    generation_fields: tuple[str, ...] = ()  # top-level fields whose change bumps generation
    renames: tuple[tuple[str, str], ...] = ()  # (served field, stored field)

    @property
    def group(self) -> str:
        return self.group_version.rpartition("/")[0]

    def convert(self, obj: Obj, incoming: bool) -> Obj:
        """Shallow copy of ``obj`` with top-level fields renamed to/from the stored shape."""
        names = dict(self.renames) if incoming else {s: w for w, s in self.renames}
        return {names.get(key, key): value for key, value in obj.items()}

    def decorate(self, obj: Obj) -> Obj:
        """The stored object as this API serves it, with kind/apiVersion (which stored
        objects and list items lack)."""
        return {"kind": self.kind, "apiVersion": self.group_version, **self.convert(obj, False)}


KINDS: tuple[ResourceKind, ...] = (
    ResourceKind("services", "Service", "v1", True, ("spec",)),
    ResourceKind(
        "endpointslices",
        "EndpointSlice",
        "discovery.k8s.io/v1",
        True,
        ("addressType", "endpoints", "ports"),
    ),
    ResourceKind("nodes", "Node", "v1", False, ("spec",)),
    ResourceKind("events", "Event", "v1", True),
    ResourceKind(
        "events",
        "Event",
        "events.k8s.io/v1",
        True,
        renames=(
            ("regarding", "involvedObject"),
            ("note", "message"),
            ("reportingController", "reportingComponent"),
            ("deprecatedSource", "source"),
            ("deprecatedFirstTimestamp", "firstTimestamp"),
            ("deprecatedLastTimestamp", "lastTimestamp"),
            ("deprecatedCount", "count"),
        ),
    ),
)
_BY_PATH = {(k.group_version, k.resource): k for k in KINDS}
_BY_NAME = {k.resource: k for k in reversed(KINDS)}  # test API: "events" means core v1


def _kind(name: str) -> ResourceKind:
    try:
        return _BY_NAME[name]
    except KeyError:
        raise ValueError(f"unknown kind {name!r}; expected one of {sorted(_BY_NAME)}") from None


# --------------------------------------------------------------------------- errors

_REASONS = {
    400: "BadRequest",
    401: "Unauthorized",
    403: "Forbidden",
    404: "NotFound",
    405: "MethodNotAllowed",
    409: "Conflict",
    410: "Expired",
    415: "UnsupportedMediaType",
    422: "Invalid",
    429: "TooManyRequests",
    500: "InternalError",
    503: "ServiceUnavailable",
    504: "Timeout",
}


class ApiError(Exception):
    """A failed request, carried as the ``Status`` object the real server would send."""

    def __init__(
        self,
        code: int,
        message: str,
        reason: str | None = None,
        details: Obj | None = None,
        retry_after: int | None = None,
    ) -> None:
        super().__init__(f"{code} {message}")
        self.code = code
        self.retry_after = retry_after
        self.status: Obj = {
            "kind": "Status",
            "apiVersion": "v1",
            "metadata": {},
            "status": "Failure",
            "message": message,
            "reason": reason if reason is not None else _REASONS.get(code, ""),
            "code": code,
        }
        if retry_after is not None:
            details = {**(details or {}), "retryAfterSeconds": retry_after}
        if details:
            self.status["details"] = details

    @property
    def reason(self) -> str:
        return str(self.status["reason"])

    @classmethod
    def about(
        cls, code: int, rk: ResourceKind, name: str, message: str, reason: str | None = None
    ) -> ApiError:
        """An error about one named object, with the details block clients parse."""
        qualified = f"{rk.resource}.{rk.group}" if rk.group else rk.resource
        details = {"name": name, "kind": rk.resource, **({"group": rk.group} if rk.group else {})}
        return cls(code, message.format(f'{qualified} "{name}"'), reason, details)


# --------------------------------------------------------------------------- selectors

_KEY = r"[A-Za-z0-9](?:[-A-Za-z0-9_./]*[A-Za-z0-9])?"
_VALUE = r"(?:[A-Za-z0-9](?:[-A-Za-z0-9_.]*[A-Za-z0-9])?)?"
_LABEL_REQUIREMENT = re.compile(
    rf"\s*(?:!\s*(?P<absent>{_KEY})|(?P<key>{_KEY})"
    rf"(?:\s*(?P<op>==|!=|=|>|<)\s*(?P<value>{_VALUE})"
    rf"|\s+(?P<setop>in|notin)\s*\((?P<values>[^()]*)\))?)\s*"
)
_TOP_LEVEL_COMMA = re.compile(r",(?![^()]*\))")
_FIELD_TERM = re.compile(r"\s*(?P<field>[^=!\s]+)\s*(?P<op>!=|==|=)\s*(?P<value>[^,]*?)\s*")
FIELD_LABELS = ("metadata.name", "metadata.namespace")

Requirement = tuple[str, str, frozenset[str]]


def parse_label_selector(text: str) -> Callable[[Mapping[str, str]], bool]:
    """Compile a label selector; bad syntax is a 400, as on the real server."""
    requirements: list[Requirement] = []
    for term in _TOP_LEVEL_COMMA.split(text) if text.strip() else ():
        m = _LABEL_REQUIREMENT.fullmatch(term)
        if m is None:
            raise ApiError(400, f"unable to parse requirement: {term.strip()!r} in {text!r}")
        if m["absent"]:
            requirements.append((m["absent"], "!", frozenset()))
        elif m["setop"]:
            values = frozenset(v.strip() for v in m["values"].split(","))
            if not all(v and re.fullmatch(_VALUE, v) for v in values):
                raise ApiError(400, f"invalid value set in requirement {term.strip()!r}")
            requirements.append((m["key"], m["setop"], values))
        elif m["op"]:
            op = "=" if m["op"] == "==" else m["op"]
            if op in "<>" and not m["value"].isdigit():
                raise ApiError(400, f"{op} needs an integer value in {term.strip()!r}")
            requirements.append((m["key"], op, frozenset([m["value"]])))
        else:
            requirements.append((m["key"], "exists", frozenset()))
    return lambda labels: all(_label_requirement_matches(labels, r) for r in requirements)


def _label_requirement_matches(labels: Mapping[str, str], requirement: Requirement) -> bool:
    key, op, values = requirement
    value = labels.get(key)
    if op in ("!", "exists"):
        return (value is None) == (op == "!")
    if op in ("!=", "notin"):  # an absent label satisfies negative requirements
        return value not in values
    if value is None:
        return False
    if op in ("=", "in"):
        return value in values
    bound = int(next(iter(values)))
    try:
        return int(value) > bound if op == ">" else int(value) < bound
    except ValueError:
        return False


def parse_field_selector(text: str) -> Callable[[Obj], bool]:
    """Compile a field selector over the fields every kind supports."""
    terms: list[tuple[str, bool, str]] = []
    for term in text.split(",") if text.strip() else ():
        m = _FIELD_TERM.fullmatch(term)
        if m is None:
            raise ApiError(400, f"invalid selector: '{text}'; can't understand '{term}'")
        if m["field"] not in FIELD_LABELS:
            raise ApiError(400, f"field label not supported: {m['field']}")
        terms.append((m["field"].removeprefix("metadata."), m["op"] != "!=", m["value"]))
    return lambda obj: all(
        (str(obj["metadata"].get(name) or "") == value) == equal for name, equal, value in terms
    )


def merge_patch(target: Any, patch: Any) -> Any:
    """RFC 7386 JSON merge patch; strategic merge patches are applied the same way."""
    if not isinstance(patch, dict):
        return copy.deepcopy(patch)
    result = dict(target) if isinstance(target, dict) else {}
    for key, value in patch.items():
        if value is None:
            result.pop(key, None)
        else:
            result[key] = merge_patch(result.get(key), value)
    return result


# --------------------------------------------------------------------------- params


def _parse_bool(query: Mapping[str, str], name: str) -> bool:
    """Go's strconv.ParseBool, because clients send True/true/1 interchangeably."""
    value = query.get(name, "false")
    if value in ("1", "t", "T", "TRUE", "true", "True"):
        return True
    if value in ("0", "f", "F", "FALSE", "false", "False"):
        return False
    raise ApiError(400, f"invalid boolean for {name}: {value!r}")


def _parse_int(query: Mapping[str, str], name: str) -> int:
    try:
        return int(query.get(name) or 0)
    except ValueError:
        raise ApiError(400, f"invalid integer for {name}: {query[name]!r}") from None


def _encode_continue(rv: int, last_key: str) -> str:
    raw = json.dumps({"v": "meta.k8s.io/v1", "rv": rv, "start": last_key}).encode()
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def _decode_continue(token: str) -> tuple[int, str]:
    try:
        data = json.loads(base64.urlsafe_b64decode(token + "=" * (-len(token) % 4)))
        return int(data["rv"]), str(data["start"])
    except (ValueError, TypeError, KeyError) as err:
        raise ApiError(400, f"continue key is not valid: {err}") from None


# --------------------------------------------------------------------------- sockets & TLS


def _listening_socket(family: int, address: tuple[str, int]) -> socket.socket:
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(address)
    sock.listen(128)
    return sock


_SIOCGSKNS = 0x894C  # ioctl: open the network namespace a socket lives in
_CLONE_NEWNET = 0x40000000


def _foreign_netns(sock: socket.socket) -> int | None:
    """Return an fd for the socket's network namespace if it is not ours, so resume() can
    re-bind there; None when it is ours (or we may not ask)."""
    try:
        fd = fcntl.ioctl(sock.fileno(), _SIOCGSKNS)
    except OSError:
        return None
    own = os.stat("/proc/thread-self/ns/net")
    theirs = os.fstat(fd)
    if (own.st_dev, own.st_ino) == (theirs.st_dev, theirs.st_ino):
        os.close(fd)
        return None
    return fd


def listening_socket_in(
    netns_fd: int | None, family: int, address: tuple[str, int]
) -> socket.socket:
    """Bind inside another network namespace from a throwaway thread (setns is per thread)."""
    if netns_fd is None:
        return _listening_socket(family, address)
    result: list[socket.socket | BaseException] = []

    def bind_there() -> None:
        try:
            libc = ctypes.CDLL(None, use_errno=True)
            if libc.setns(netns_fd, _CLONE_NEWNET) != 0:
                raise OSError(ctypes.get_errno(), "setns failed")
            result.append(_listening_socket(family, address))
        except BaseException as err:  # handed to the caller's thread
            result.append(err)

    thread = threading.Thread(target=bind_there, name=f"{_THREAD_PREFIX}-rebind")
    thread.start()
    thread.join()
    if isinstance(result[0], BaseException):
        raise result[0]
    return result[0]


def _make_certificates(directory: Path, sans: Iterable[str]) -> tuple[Path, Path, Path]:
    """Create a CA and a CA-signed server certificate with the openssl CLI (stdlib has no
    X.509 writer); returns (ca.crt, server.crt, server.key)."""
    if shutil.which("openssl") is None:
        raise RuntimeError("the openssl command is required for tls=True (apt-get install openssl)")
    ca_key, ca_crt = directory / "ca.key", directory / "ca.crt"
    key, csr, crt, ext = (directory / f"server.{s}" for s in ("key", "csr", "crt", "ext"))
    alt_names = []
    for san in dict.fromkeys(["127.0.0.1", "localhost", *sans]):
        try:
            alt_names.append(f"IP:{ipaddress.ip_address(san)}")
        except ValueError:
            alt_names.append(f"DNS:{san}")
    ext.write_text(
        f"subjectAltName={','.join(alt_names)}\nbasicConstraints=CA:FALSE\n"
        "keyUsage=critical,digitalSignature,keyEncipherment\nextendedKeyUsage=serverAuth\n"
        "subjectKeyIdentifier=hash\nauthorityKeyIdentifier=keyid,issuer\n"
    )
    ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]
    commands = [
        [
            "req",
            "-x509",
            *ec,
            "-keyout",
            ca_key,
            "-out",
            ca_crt,
            "-days",
            "7",
            "-subj",
            "/CN=pykubeproxy-sandbox-ca",
            "-addext",
            "basicConstraints=critical,CA:TRUE",
            "-addext",
            "keyUsage=critical,keyCertSign,cRLSign",
        ],
        ["req", *ec, "-keyout", key, "-out", csr, "-subj", "/CN=kube-apiserver"],
        [
            "x509",
            "-req",
            "-in",
            csr,
            "-CA",
            ca_crt,
            "-CAkey",
            ca_key,
            "-set_serial",
            str(random.getrandbits(63)),
            "-days",
            "7",
            "-out",
            crt,
            "-extfile",
            ext,
        ],
    ]
    for args in commands:
        subprocess.run(["openssl", *map(str, args)], check=True, capture_output=True)
    return ca_crt, crt, key


# --------------------------------------------------------------------------- store internals


@dataclass(frozen=True, slots=True)
class _Entry:
    """One committed change.  ``obj`` is the new state (for DELETED: the last state stamped
    with the deletion's resourceVersion); ``prev`` the state before (None for ADDED)."""

    rv: int
    store: str
    type: str
    key: str
    obj: Obj
    prev: Obj | None


@dataclass(eq=False)
class _Watch:
    """An open watch stream; the store appends to ``queue`` while holding its lock."""

    kind: ResourceKind
    match: Callable[[Obj], bool]
    conn: socket.socket
    queue: deque[_Entry] = field(default_factory=deque)
    closed: bool = False  # dropped, server stopping, or the client went away
    error: Obj | None = None  # a Status to send as the only event

    def event(self, entry: _Entry) -> Obj | None:
        """What this watcher sees of a change: objects moving across its selector are
        reported as ADDED/DELETED, like the real watch cache does."""
        if entry.type != "MODIFIED" or entry.prev is None:
            return self._wire(entry.type, entry.obj) if self.match(entry.obj) else None
        if self.match(entry.obj):
            return self._wire("MODIFIED" if self.match(entry.prev) else "ADDED", entry.obj)
        if self.match(entry.prev):
            meta = {**entry.prev["metadata"], "resourceVersion": str(entry.rv)}
            return self._wire("DELETED", {**entry.prev, "metadata": meta})
        return None

    def _wire(self, type_: str, obj: Obj) -> Obj:
        return {"type": type_, "object": self.kind.decorate(obj)}


class RecordedRequest(NamedTuple):
    """An HTTP request as seen by the server, for asserting on client behaviour."""

    method: str
    path: str
    query: dict[str, str]


def _key(namespace: str, name: str) -> str:
    return f"{namespace}/{name}" if namespace else name


def _now() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _clean_body(rk: ResourceKind, body: Any) -> Obj:
    """Own a stored-shape copy of a client body, without kind/apiVersion (stamped on the way
    out)."""
    if not isinstance(body, dict) or not isinstance(body.get("metadata", {}), dict):
        raise ApiError(400, "the request body must be a JSON object with an object 'metadata'")
    obj = copy.deepcopy(rk.convert(body, incoming=True))
    obj.pop("kind", None)
    obj.pop("apiVersion", None)
    obj["metadata"] = obj.get("metadata") or {}
    return obj


# --------------------------------------------------------------------------- server


class ApiServerDouble:
    """In-memory API server speaking real HTTP; see the module docstring for the semantics."""

    def __init__(
        self,
        host: str = "127.0.0.1",
        port: int = 0,
        *,
        sock: socket.socket | None = None,
        tls: bool = False,
        token: str | None = None,
        bookmark_interval: float = 1.0,
        extra_sans: Sequence[str] = (),
    ) -> None:
        self.bookmark_interval = bookmark_interval
        self._token = token
        self._cond = threading.Condition()  # guards the store, the history and the watchers
        self._objects: dict[str, dict[str, Obj]] = {k.resource: {} for k in KINDS}
        self._history: list[_Entry] = []
        self._rv = 1  # "0" means "any version" to clients, so never hand it out
        self._compacted = 1  # history starts after this revision
        self._watchers: set[_Watch] = set()
        self._failure: tuple[int, int | None] | None = None
        self._requests: list[RecordedRequest] = []
        self._requests_lock = threading.Lock()
        self._conns: set[socket.socket] = set()
        self._threads: set[threading.Thread] = set()
        self._conns_lock = threading.Lock()
        self._lifecycle = threading.Lock()
        self._state = "new"  # new -> running <-> paused -> stopped
        self._accept_thread: threading.Thread | None = None
        self._server = _Server(self)

        self._netns_fd: int | None = None
        if sock is None:
            family = socket.AF_INET6 if ":" in host else socket.AF_INET
            self._lsock = _listening_socket(family, (host, port))
        else:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # resume() re-binds
            if sock.getsockname()[1] == 0:
                sock.bind((host, port))
            sock.listen(128)
            self._lsock = sock
            self._netns_fd = _foreign_netns(sock)
        self._family = self._lsock.family
        self._address: tuple[str, int] = self._lsock.getsockname()[:2]

        self.ca_cert_path: Path | None = None
        self._ssl: ssl.SSLContext | None = None
        self._tmpdir: tempfile.TemporaryDirectory[str] | None = None
        if tls:
            self._tmpdir = tempfile.TemporaryDirectory(prefix=f"{_THREAD_PREFIX}-")
            sans = [host, self._address[0], *extra_sans]
            self.ca_cert_path, crt, key = _make_certificates(Path(self._tmpdir.name), sans)
            self._ssl = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
            self._ssl.load_cert_chain(crt, key)

    # ------------------------------------------------------------------ lifecycle

    @property
    def url(self) -> str:
        host = self._address[0]
        if ipaddress.ip_address(host).is_unspecified:
            host = "::1" if self._family == socket.AF_INET6 else "127.0.0.1"
        if ":" in host:
            host = f"[{host}]"
        return f"{'https' if self._ssl else 'http'}://{host}:{self._address[1]}"

    @property
    def port(self) -> int:
        return self._address[1]

    @property
    def resource_version(self) -> int:
        """The current global revision."""
        with self._cond:
            return self._rv

    def start(self) -> Self:
        """Serve in daemon threads."""
        with self._lifecycle:
            if self._state != "new":
                raise RuntimeError(f"cannot start a server that is {self._state}")
            self._state = "running"
            self._start_accepting()
        log.info("API server double serving on %s", self.url)
        return self

    def stop(self) -> None:
        """Stop accepting, cut every connection (watches included) and join all threads."""
        with self._lifecycle:
            if self._state == "stopped":
                return
            if self._state == "running":
                self._stop_accepting()
            self._lsock.close()
            self._state = "stopped"
            self._cut_connections()
            with self._conns_lock:
                threads = list(self._threads)
            for thread in threads:
                thread.join(timeout=10)
            if self._tmpdir is not None:
                self._tmpdir.cleanup()
            if self._netns_fd is not None:
                os.close(self._netns_fd)
                self._netns_fd = None

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    def pause(self) -> None:
        """Close the listening socket and every connection, so clients see refused
        connections until resume() (the server is "down")."""
        with self._lifecycle:
            if self._state != "running":
                raise RuntimeError(f"cannot pause a server that is {self._state}")
            self._stop_accepting()
            self._lsock.close()
            self._state = "paused"
            self._cut_connections()

    def resume(self) -> None:
        """Listen again on the same address (inside the same network namespace)."""
        with self._lifecycle:
            if self._state != "paused":
                raise RuntimeError(f"cannot resume a server that is {self._state}")
            self._lsock = listening_socket_in(self._netns_fd, self._family, self._address)
            self._state = "running"
            self._start_accepting()

    def _start_accepting(self) -> None:
        self._accept_thread = threading.Thread(
            target=self._accept_loop,
            args=(self._lsock,),
            name=f"{_THREAD_PREFIX}-accept",
            daemon=True,
        )
        self._accept_thread.start()

    def _stop_accepting(self) -> None:
        # shutdown() wakes the blocked accept() on Linux; the accept loop then ends.
        with contextlib.suppress(OSError):
            socket.socket.shutdown(self._lsock, socket.SHUT_RDWR)
        if self._accept_thread is not None:
            self._accept_thread.join()

    def _accept_loop(self, lsock: socket.socket) -> None:
        while True:
            try:
                conn, address = lsock.accept()
            except OSError:
                return  # listening socket shut down (pause/stop)
            if self._ssl is not None:  # handshake happens in the connection's thread
                conn = self._ssl.wrap_socket(conn, server_side=True, do_handshake_on_connect=False)
            thread = threading.Thread(
                target=self._serve_connection,
                args=(conn, address),
                name=f"{_THREAD_PREFIX}-conn",
                daemon=True,
            )
            with self._conns_lock:  # registered before it runs, so stop() can always cut it
                self._conns.add(conn)
                self._threads = {t for t in self._threads if t.is_alive()}
                self._threads.add(thread)
            thread.start()

    def _serve_connection(self, conn: socket.socket, address: Any) -> None:
        try:
            if isinstance(conn, ssl.SSLSocket):
                conn.settimeout(10)
                conn.do_handshake()
                conn.settimeout(None)
            _Handler(conn, address, self._server)
        except OSError as err:
            log.debug("connection from %s ended: %s", address, err)
        finally:
            with self._conns_lock:
                self._conns.discard(conn)
            conn.close()

    def _cut_connections(self) -> None:
        """Abruptly end every connection; the raw shutdown also unblocks TLS reads."""
        self.drop_watches()
        with self._conns_lock:
            for conn in self._conns:
                with contextlib.suppress(OSError):
                    socket.socket.shutdown(conn, socket.SHUT_RDWR)

    # ------------------------------------------------------------------ fault injection

    def drop_watches(self) -> int:
        """Abruptly close every open watch connection (no final chunk); returns how many."""
        with self._cond:
            watches = list(self._watchers)
            for watch in watches:
                watch.closed = True
            self._cond.notify_all()
        for watch in watches:
            with contextlib.suppress(OSError):
                socket.socket.shutdown(watch.conn, socket.SHUT_RDWR)
        return len(watches)

    def compact(self, rv: int | None = None) -> None:
        """Forget history up to ``rv`` (default: now), so older lists/watches get 410."""
        with self._cond:
            upto = self._rv if rv is None else min(rv, self._rv)
            self._compacted = max(self._compacted, upto)
            del self._history[: bisect.bisect_right(self._history, upto, key=lambda e: e.rv)]

    def set_failure(self, code: int | None, retry_after: int | None = None) -> None:
        """Answer every HTTP request with ``code`` (and Retry-After) until set to None."""
        self._failure = None if code is None else (code, retry_after)

    @property
    def requests(self) -> builtins.list[RecordedRequest]:
        """Snapshot of every HTTP request received so far."""
        with self._requests_lock:
            return builtins.list(self._requests)

    def watch_count(self) -> int:
        """Open watch streams (dropped or abandoned ones stop counting at once)."""
        with self._cond:
            return sum(not watch.closed for watch in self._watchers)

    def write_kubeconfig(self, path: str | os.PathLike[str]) -> Path:
        """Write a kubeconfig (JSON is valid YAML) for this server, atomically so scripts
        may poll for the file."""
        cluster: Obj = {"server": self.url}
        if self.ca_cert_path is not None:
            ca = base64.b64encode(self.ca_cert_path.read_bytes()).decode()
            cluster["certificate-authority-data"] = ca
        config = {
            "apiVersion": "v1",
            "kind": "Config",
            "clusters": [{"name": "sandbox", "cluster": cluster}],
            "users": [{"name": "sandbox", "user": {"token": self._token} if self._token else {}}],
            "contexts": [{"name": "sandbox", "context": {"cluster": "sandbox", "user": "sandbox"}}],
            "current-context": "sandbox",
        }
        target = Path(path)
        tmp = target.with_name(f".{target.name}.tmp")
        tmp.write_text(json.dumps(config, indent=2) + "\n")
        os.replace(tmp, target)
        return target

    # ------------------------------------------------------------------ test API (no HTTP)

    def create(self, kind: str, obj: Obj) -> Obj:
        rk = _kind(kind)
        return copy.deepcopy(rk.decorate(self._create(rk, None, obj)))

    def update(self, kind: str, obj: Obj) -> Obj:
        rk = _kind(kind)
        name = str((obj.get("metadata") or {}).get("name") or "")
        return copy.deepcopy(rk.decorate(self._update(rk, None, name, obj)))

    def patch(self, kind: str, namespace: str | None, name: str, patch: Obj) -> Obj:
        rk = _kind(kind)
        return copy.deepcopy(rk.decorate(self._patch(rk, namespace, name, patch)))

    def delete(self, kind: str, namespace: str | None, name: str) -> Obj:
        rk = _kind(kind)
        return copy.deepcopy(rk.decorate(self._delete(rk, namespace, name)))

    def get(self, kind: str, namespace: str | None, name: str) -> Obj:
        """Raises ApiError (404) when absent, like the HTTP GET."""
        rk = _kind(kind)
        return copy.deepcopy(rk.decorate(self._get(rk, namespace, name)))

    def list(self, kind: str, namespace: str | None = None) -> builtins.list[Obj]:
        """Every object of ``kind`` (in ``namespace`` if given), sorted by namespace/name."""
        rk = _kind(kind)
        head = {"kind": rk.kind, "apiVersion": rk.group_version}
        return [copy.deepcopy({**head, **obj}) for obj in self._list(rk, namespace, {})["items"]]

    # ------------------------------------------------------------------ store core

    def _scope(self, rk: ResourceKind, namespace: str | None) -> str:
        return (namespace or "default") if rk.namespaced else ""

    def _commit(self, rk: ResourceKind, type_: str, key: str, obj: Obj, prev: Obj | None) -> None:
        """Record a change and hand it to the store's watchers (caller holds the lock)."""
        entry = _Entry(self._rv, rk.resource, type_, key, obj, prev)
        self._history.append(entry)
        for watch in self._watchers:
            if watch.kind.resource == rk.resource:
                watch.queue.append(entry)
        self._cond.notify_all()

    def _bump(self) -> str:
        self._rv += 1
        return str(self._rv)

    def _get(self, rk: ResourceKind, namespace: str | None, name: str) -> Obj:
        with self._cond:
            obj = self._objects[rk.resource].get(_key(self._scope(rk, namespace), name))
        if obj is None:
            raise ApiError.about(404, rk, name, "{} not found")
        return obj

    def _create(self, rk: ResourceKind, namespace: str | None, body: Any) -> Obj:
        obj = _clean_body(rk, body)
        meta = obj["metadata"]
        body_ns = meta.get("namespace") or ""
        if namespace and body_ns and body_ns != namespace:
            raise ApiError(
                400,
                "the namespace of the provided object does not match the namespace sent on the "
                "request",
            )
        name = meta.get("name") or ""
        if not name:
            if not meta.get("generateName"):
                raise ApiError(422, "metadata.name: name or generateName is required")
            name = meta["generateName"] + "".join(random.choices(_NAME_CHARS, k=5))
        ns = self._scope(rk, namespace or body_ns)
        with self._cond:
            store = self._objects[rk.resource]
            if _key(ns, name) in store:
                raise ApiError.about(409, rk, name, "{} already exists", "AlreadyExists")
            meta.update(name=name, uid=str(uuid.uuid4()), creationTimestamp=_now())
            meta["resourceVersion"] = self._bump()
            if rk.namespaced:
                meta["namespace"] = ns
            else:
                meta.pop("namespace", None)
            if rk.generation_fields:
                meta["generation"] = 1
            store[_key(ns, name)] = obj
            self._commit(rk, "ADDED", _key(ns, name), obj, None)
        return obj

    def _update(self, rk: ResourceKind, namespace: str | None, name: str, body: Any) -> Obj:
        obj = _clean_body(rk, body)
        meta = obj["metadata"]
        if meta.setdefault("name", name) != name:
            raise ApiError(
                400,
                f"the name of the object ({meta['name']}) does not match the name on the URL "
                f"({name})",
            )
        body_ns = meta.get("namespace") or ""
        if rk.namespaced and namespace and body_ns and body_ns != namespace:
            raise ApiError(400, "the namespace of the provided object does not match the request")
        ns = self._scope(rk, namespace or body_ns)
        with self._cond:
            old = self._objects[rk.resource].get(_key(ns, name))
            if old is None:
                raise ApiError.about(404, rk, name, "{} not found")
            return self._replace(rk, _key(ns, name), old, obj)

    def _patch(self, rk: ResourceKind, namespace: str | None, name: str, patch: Any) -> Obj:
        if not isinstance(patch, dict):
            raise ApiError(400, "a merge patch must be a JSON object")
        with self._cond:
            key = _key(self._scope(rk, namespace), name)
            old = self._objects[rk.resource].get(key)
            if old is None:
                raise ApiError.about(404, rk, name, "{} not found")
            merged = copy.deepcopy(merge_patch(old, rk.convert(patch, incoming=True)))
            if not isinstance(merged.get("metadata"), dict):
                merged["metadata"] = {}
            return self._replace(rk, key, old, merged)

    def _replace(self, rk: ResourceKind, key: str, old: Obj, obj: Obj) -> Obj:
        """Store ``obj`` over ``old`` keeping server-managed metadata (caller holds the lock)."""
        meta, old_meta = obj["metadata"], old["metadata"]
        wanted = meta.get("resourceVersion")
        if wanted and wanted != old_meta["resourceVersion"]:
            raise ApiError.about(
                409,
                rk,
                old_meta["name"],
                "Operation cannot be fulfilled on {}: the object has been modified; please apply "
                "your changes to the latest version and try again",
            )
        for managed in ("name", "namespace", "uid", "creationTimestamp", "generation"):
            if managed in old_meta:
                meta[managed] = old_meta[managed]
            else:
                meta.pop(managed, None)
        meta["resourceVersion"] = old_meta["resourceVersion"]
        if any(obj.get(f) != old.get(f) for f in rk.generation_fields):
            meta["generation"] = old_meta.get("generation", 0) + 1
        if obj == old:  # no-op updates do not create a revision
            return old
        meta["resourceVersion"] = self._bump()
        self._objects[rk.resource][key] = obj
        self._commit(rk, "MODIFIED", key, obj, old)
        return obj

    def _delete(self, rk: ResourceKind, namespace: str | None, name: str) -> Obj:
        key = _key(self._scope(rk, namespace), name)
        with self._cond:
            old = self._objects[rk.resource].pop(key, None)
            if old is None:
                raise ApiError.about(404, rk, name, "{} not found")
            obj = {**old, "metadata": {**old["metadata"], "resourceVersion": self._bump()}}
            self._commit(rk, "DELETED", key, obj, old)
        return obj

    def _state_at(self, store: str, rv: int) -> dict[str, Obj]:
        """The store as of revision ``rv``, by undoing newer history (caller holds the lock)."""
        if rv == self._rv:
            return self._objects[store]
        state = dict(self._objects[store])
        newer = self._history[bisect.bisect_right(self._history, rv, key=lambda e: e.rv) :]
        for entry in reversed(newer):
            if entry.store != store:
                continue
            if entry.prev is None:
                state.pop(entry.key, None)
            else:
                state[entry.key] = entry.prev
        return state

    def _list(self, rk: ResourceKind, namespace: str | None, query: Mapping[str, str]) -> Obj:
        match = _matcher(rk, namespace, None, query)
        limit = _parse_int(query, "limit")
        token = query.get("continue", "")
        rv_param = query.get("resourceVersion", "")
        rv_match = query.get("resourceVersionMatch", "")
        if rv_match not in ("", "Exact", "NotOlderThan"):
            raise ApiError(400, f"unsupported resourceVersionMatch {rv_match!r}")
        if rv_match and not rv_param:
            raise ApiError(400, "resourceVersionMatch is forbidden unless resourceVersion is set")
        start = ""
        with self._cond:
            if token:
                if rv_param:
                    raise ApiError(400, "specifying resource version is not allowed with continue")
                at, start = _decode_continue(token)
                if at < self._compacted:
                    raise ApiError(
                        410,
                        "The provided continue parameter is too old to display a consistent list "
                        "result. You can start a new list without the continue parameter.",
                    )
            elif rv_param in ("", "0"):
                at = self._rv
            else:
                at = self._requested_rv(rv_param)
                # Exact, or the legacy "limit with a resourceVersion" rule, reads at `at`;
                # NotOlderThan is served from the latest state, like the watch cache.
                if not (rv_match == "Exact" or (limit > 0 and not rv_match)):
                    at = self._rv
            state = self._state_at(rk.resource, at)
            keys = sorted(k for k, obj in state.items() if k > start and match(obj))
            items = [state[k] for k in keys]
        meta: Obj = {"resourceVersion": str(at)}
        from_cache = rv_param == "0"
        if 0 < limit < len(items) and not from_cache:
            meta["continue"] = _encode_continue(at, keys[limit - 1])
            if not query.get("labelSelector") and not query.get("fieldSelector"):
                meta["remainingItemCount"] = len(items) - limit
            items = items[:limit]
        return {
            "kind": f"{rk.kind}List",
            "apiVersion": rk.group_version,
            "metadata": meta,
            "items": [rk.convert(obj, incoming=False) for obj in items],
        }

    def _requested_rv(self, value: str) -> int:
        """Parse a client resourceVersion, rejecting the future (504) and the compacted (410)."""
        try:
            rv = int(value)
        except ValueError:
            raise ApiError(400, f"invalid resourceVersion {value!r}") from None
        if rv > self._rv:
            raise ApiError(
                504,
                f"Too large resource version: {rv}, current: {self._rv}",
                details={
                    "causes": [
                        {
                            "reason": "ResourceVersionTooLarge",
                            "message": "Too large resource version",
                        }
                    ],
                    "retryAfterSeconds": 1,
                },
            )
        if rv < self._compacted:
            raise ApiError(410, f"too old resource version: {rv} ({self._compacted})")
        return rv

    # ------------------------------------------------------------------ watch

    def _open_watch(
        self,
        rk: ResourceKind,
        namespace: str | None,
        name: str | None,
        query: Mapping[str, str],
        conn: socket.socket,
    ) -> _Watch:
        """Register a watcher with its backlog queued, atomically w.r.t. writers."""
        watch = _Watch(rk, _matcher(rk, namespace, name, query), conn)
        rv_param = query.get("resourceVersion", "")
        with self._cond:
            if rv_param in ("", "0"):  # synthetic ADDED events for the current state
                watch.queue.extend(
                    _Entry(
                        int(obj["metadata"]["resourceVersion"]),
                        rk.resource,
                        "ADDED",
                        key,
                        obj,
                        None,
                    )
                    for key, obj in sorted(self._objects[rk.resource].items())
                )
            else:
                try:
                    rv = self._requested_rv(rv_param)
                except ApiError as err:
                    if err.code != 410:
                        raise
                    watch.error = err.status  # sent as an ERROR event, as the watch cache does
                    return watch
                newer = self._history[bisect.bisect_right(self._history, rv, key=lambda e: e.rv) :]
                watch.queue.extend(e for e in newer if e.store == rk.resource)
            self._watchers.add(watch)
        return watch

    def _pump(
        self, watch: _Watch, emit: Callable[[Obj], None], timeout: float, bookmarks: bool
    ) -> bool:
        """Feed ``watch`` to ``emit`` until timeout (True: end cleanly) or until it is closed
        (False: cut the connection)."""
        wake_r, wake_w = os.pipe()
        monitor = threading.Thread(
            target=self._watch_client,
            args=(watch, wake_r),
            name=f"{_THREAD_PREFIX}-watchmon",
            daemon=True,
        )
        monitor.start()
        now = time.monotonic()
        deadline = now + timeout if timeout > 0 else None
        next_bookmark = now + self.bookmark_interval if bookmarks else None
        try:
            while True:
                wake_at = min((t for t in (deadline, next_bookmark) if t is not None), default=None)
                with self._cond:
                    while not (watch.queue or watch.closed):
                        if wake_at is not None and time.monotonic() >= wake_at:
                            break
                        self._cond.wait(None if wake_at is None else wake_at - time.monotonic())
                    if watch.closed:
                        return False
                    batch = list(watch.queue)
                    watch.queue.clear()
                    rv = self._rv  # every change up to rv is in batch or already sent
                for entry in batch:
                    if (event := watch.event(entry)) is not None:
                        emit(event)
                now = time.monotonic()
                if deadline is not None and now >= deadline:
                    return True
                if next_bookmark is not None and now >= next_bookmark:
                    meta = {"resourceVersion": str(rv)}
                    emit({"type": "BOOKMARK", "object": watch.kind.decorate({"metadata": meta})})
                    next_bookmark = now + self.bookmark_interval
        finally:
            os.write(wake_w, b"x")
            monitor.join()
            os.close(wake_r)
            os.close(wake_w)

    def _forget_watch(self, watch: _Watch) -> None:
        with self._cond:
            self._watchers.discard(watch)

    def _watch_client(self, watch: _Watch, wake_fd: int) -> None:
        """Notice a client hanging up on an idle watch, so watch_count() stays truthful."""
        poller = select.poll()
        poller.register(watch.conn.fileno(), select.POLLIN | select.POLLRDHUP)
        poller.register(wake_fd, select.POLLIN)
        if any(fd != wake_fd for fd, _ in poller.poll()):
            with self._cond:
                watch.closed = True
                self._cond.notify_all()

    # ------------------------------------------------------------------ HTTP plumbing

    def _record(self, request: RecordedRequest) -> None:
        with self._requests_lock:
            self._requests.append(request)

    def _admit(self, authorization: str | None) -> None:
        failure = self._failure
        if failure is not None:
            raise ApiError(failure[0], f"injected failure {failure[0]}", retry_after=failure[1])
        # The scheme is case-insensitive (RFC 7235); kubernetes' in-cluster loader sends "bearer".
        scheme, _, credentials = (authorization or "").partition(" ")
        if self._token is not None and (scheme.lower() != "bearer" or credentials != self._token):
            raise ApiError(401, "Unauthorized")

    def _discovery(self, path: str) -> Obj | None:
        """Minimal /api, /apis, group and resource-list documents derived from KINDS."""
        groups: dict[str, list[str]] = {}
        for rk in KINDS:
            if rk.group:
                groups.setdefault(rk.group, []).append(rk.group_version)

        def group_doc(group: str) -> Obj:
            versions = [
                {"groupVersion": gv, "version": gv.rpartition("/")[2]}
                for gv in dict.fromkeys(groups[group])
            ]
            return {"name": group, "versions": versions, "preferredVersion": versions[0]}

        if path == "/api":
            address = self.url.split("://")[1]
            return {
                "kind": "APIVersions",
                "versions": ["v1"],
                "serverAddressByClientCIDRs": [
                    {"clientCIDR": "0.0.0.0/0", "serverAddress": address}
                ],
            }
        if path == "/apis":
            return {
                "kind": "APIGroupList",
                "apiVersion": "v1",
                "groups": [group_doc(g) for g in groups],
            }
        group_version = "v1" if path == "/api/v1" else path.removeprefix("/apis/")
        if group_version in groups:
            return {"kind": "APIGroup", "apiVersion": "v1", **group_doc(group_version)}
        resources = [
            {
                "name": rk.resource,
                "singularName": rk.kind.lower(),
                "namespaced": rk.namespaced,
                "kind": rk.kind,
                "verbs": ["create", "delete", "get", "list", "patch", "update", "watch"],
            }
            for rk in KINDS
            if rk.group_version == group_version
        ]
        if not resources or not path.startswith(("/api/", "/apis/")):
            return None
        return {
            "kind": "APIResourceList",
            "apiVersion": "v1",
            "groupVersion": group_version,
            "resources": resources,
        }


def _matcher(
    rk: ResourceKind, namespace: str | None, name: str | None, query: Mapping[str, str]
) -> Callable[[Obj], bool]:
    """Combine path scope and selectors into one predicate (400 on bad selectors)."""
    labels = parse_label_selector(query.get("labelSelector", ""))
    fields = parse_field_selector(query.get("fieldSelector", ""))
    scope = namespace if rk.namespaced else None

    def match(obj: Obj) -> bool:
        meta = obj["metadata"]
        return (
            (scope is None or meta.get("namespace") == scope)
            and (name is None or meta.get("name") == name)
            and labels(meta.get("labels") or {})
            and fields(obj)
        )

    return match


def _resolve(
    group_version: str, parts: list[str]
) -> tuple[ResourceKind, str | None, str | None, bool] | None:
    """Map path segments after /api/v1 or /apis/{g}/{v} to (kind, namespace, name, watch)."""
    watch = bool(parts) and parts[0] == "watch"  # legacy /watch/ prefix
    parts = parts[1:] if watch else parts
    namespace = None
    if len(parts) >= 3 and parts[0] == "namespaces":
        namespace, parts = parts[1], parts[2:]
    if not parts or len(parts) > 2:
        return None
    rk = _BY_PATH.get((group_version, parts[0]))
    name = parts[1] if len(parts) == 2 else None
    if rk is None or (namespace is not None and not rk.namespaced):
        return None
    if rk.namespaced and namespace is None and name is not None:
        return None
    return rk, namespace, name, watch


class _Server(socketserver.BaseServer):
    """Just enough of a socketserver for BaseHTTPRequestHandler; ApiServerDouble accepts."""

    def __init__(self, api: ApiServerDouble) -> None:
        super().__init__(("", 0), _Handler)
        self.api = api


_MERGE_PATCH_TYPES = ("application/merge-patch+json", "application/strategic-merge-patch+json")


class _Handler(BaseHTTPRequestHandler):
    """Translates HTTP into store operations; one instance per connection."""

    protocol_version = "HTTP/1.1"
    server_version = "pykubeproxy-apiserver-double"
    server: _Server

    def do_GET(self) -> None:
        self._dispatch()

    do_POST = do_PUT = do_PATCH = do_DELETE = do_GET

    def log_message(self, format: str, *args: Any) -> None:
        log.debug("%s " + format, self.address_string(), *args)

    def _dispatch(self) -> None:
        api = self.server.api
        url = urlsplit(self.path)
        query = {k: v[0] for k, v in parse_qs(url.query, keep_blank_values=True).items()}
        api._record(RecordedRequest(self.command, url.path, query))
        body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        try:
            api._admit(self.headers.get("Authorization"))
            self._route(url.path.rstrip("/") or "/", query, body)
        except ApiError as err:
            headers = {} if err.retry_after is None else {"Retry-After": str(err.retry_after)}
            self._send(err.code, err.status, headers)

    def _route(self, path: str, query: dict[str, str], body: bytes) -> None:
        api = self.server.api
        if path in ("/healthz", "/livez", "/readyz"):
            return self._send(200, b"ok")
        if path == "/version":
            return self._send(200, _VERSION_INFO)
        parts = path.strip("/").split("/")
        if parts[:2] == ["api", "v1"]:
            target = _resolve("v1", parts[2:])
        elif parts[0] == "apis" and len(parts) > 3:
            target = _resolve(f"{parts[1]}/{parts[2]}", parts[3:])
        else:
            target = None
        if target is None:
            if (doc := api._discovery(path)) is not None:
                return self._send(200, doc)
            raise ApiError(404, "the server could not find the requested resource")
        rk, namespace, name, watch = target
        method = self.command
        if method == "GET" and (watch or _parse_bool(query, "watch")):
            return self._watch(rk, namespace, name, query)
        if name is None and method == "GET":
            return self._send(200, api._list(rk, namespace, query))
        if name is None and method == "POST" and (namespace or not rk.namespaced):
            return self._send(201, rk.decorate(api._create(rk, namespace, self._json(body))))
        if name is not None and method == "GET":
            return self._send(200, rk.decorate(api._get(rk, namespace, name)))
        if name is not None and method == "PUT":
            return self._send(200, rk.decorate(api._update(rk, namespace, name, self._json(body))))
        if name is not None and method == "PATCH":
            content_type = (self.headers.get("Content-Type") or "").split(";")[0].strip()
            if content_type not in _MERGE_PATCH_TYPES:
                accepted = ", ".join(_MERGE_PATCH_TYPES)
                raise ApiError(415, f"unsupported patch type; accepted media types: {accepted}")
            return self._send(200, rk.decorate(api._patch(rk, namespace, name, self._json(body))))
        if name is not None and method == "DELETE":
            return self._send(200, rk.decorate(api._delete(rk, namespace, name)))
        raise ApiError(405, f"{method} is not supported on {path}")

    def _watch(
        self, rk: ResourceKind, namespace: str | None, name: str | None, query: dict[str, str]
    ) -> None:
        timeout = _parse_int(query, "timeoutSeconds")
        bookmarks = _parse_bool(query, "allowWatchBookmarks")
        api = self.server.api
        watch = api._open_watch(rk, namespace, name, query, self.connection)
        try:
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Transfer-Encoding", "chunked")
            self.send_header("Cache-Control", "no-cache, private")
            self.end_headers()
            if watch.error is not None:
                self._emit({"type": "ERROR", "object": watch.error})
            elif not api._pump(watch, self._emit, timeout, bookmarks):
                self.close_connection = True  # cut: no final chunk
                return
            api._forget_watch(watch)
            self.wfile.write(b"0\r\n\r\n")
        except OSError:  # the client went away mid-write
            self.close_connection = True
        finally:
            api._forget_watch(watch)

    def _emit(self, event: Obj) -> None:
        data = json.dumps(event, separators=(",", ":")).encode() + b"\n"
        self.wfile.write(b"%x\r\n%s\r\n" % (len(data), data))
        self.wfile.flush()

    def _json(self, body: bytes) -> Obj:
        try:
            value = json.loads(body or b"null")
        except ValueError as err:
            raise ApiError(400, f"invalid JSON body: {err}") from None
        if not isinstance(value, dict):
            raise ApiError(400, "the request body must be a JSON object")
        return value

    def _send(
        self, code: int, payload: Obj | bytes, headers: Mapping[str, str] | None = None
    ) -> None:
        is_json = not isinstance(payload, bytes)
        data = json.dumps(payload).encode() if not isinstance(payload, bytes) else payload
        self.send_response(code)
        self.send_header("Content-Type", "application/json" if is_json else "text/plain")
        self.send_header("Content-Length", str(len(data)))
        for key, value in (headers or {}).items():
            self.send_header(key, value)
        self.end_headers()
        self.wfile.write(data)


# --------------------------------------------------------------------------- CLI


def main(argv: Sequence[str] | None = None) -> int:
    """Run the double in the foreground for manual sandbox use, until SIGTERM/SIGINT."""
    parser = argparse.ArgumentParser(prog="python -m pykubeproxy.sandbox.apiserver")
    parser.add_argument("--listen", default="127.0.0.1:6443", help="HOST:PORT (port 0: any)")
    parser.add_argument("--kubeconfig-out", type=Path, help="write a kubeconfig here")
    parser.add_argument("--tls", action="store_true", help="serve HTTPS with a throwaway CA")
    parser.add_argument("--token", help="require this bearer token")
    parser.add_argument("--bookmark-interval", type=float, default=1.0)
    parser.add_argument("--log-level", default="INFO")
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    host, _, port = args.listen.rpartition(":")
    signals = {signal.SIGINT, signal.SIGTERM}
    signal.pthread_sigmask(signal.SIG_BLOCK, signals)  # server threads inherit the mask
    server = ApiServerDouble(
        host.strip("[]") or "127.0.0.1",
        int(port),
        tls=args.tls,
        token=args.token,
        bookmark_interval=args.bookmark_interval,
    )
    with server:
        if args.kubeconfig_out is not None:
            server.write_kubeconfig(args.kubeconfig_out)
            log.info("kubeconfig written to %s", args.kubeconfig_out)
        received = signal.sigwait(signals)
        log.info("received %s, stopping", signal.Signals(received).name)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
