"""The only module that talks to the API server (and imports `kubernetes`).

Each watched kind runs kube's reflector loop in its own thread: list (paged,
with kube-proxy's selectors), deliver the differences against the local
cache, then watch from the list's resourceVersion with bookmarks, resuming
from the last resourceVersion seen. A 410 Expired re-lists, and objects that
vanished while disconnected are delivered as deletions. Errors reconnect with
capped exponential backoff (honouring Retry-After), so an unreachable API
server only delays updates: the installed rules stay as they are.

Objects are handed on as raw JSON dicts; `convert` turns them into the model.
"""

from __future__ import annotations

import json
import logging
import random
import socket
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import kubernetes
import urllib3

from pykubeproxy.gcpause import collector_paused

log = logging.getLogger(__name__)

# kube-proxy's selector: skip headless Services and Services owned by another proxy.
PROXY_SELECTOR = "!service.kubernetes.io/headless,!service.kubernetes.io/service-proxy-name"
PAGE_SIZE = 500
# One list at a time in this process: a list of 10,000 objects is tens of MB once parsed,
# and two of them (Services and EndpointSlices at start) need not be held together. The
# time is the same either way, since parsing holds the GIL.
LISTING = threading.Lock()
WATCH_TIMEOUT_RANGE = (300, 600)  # seconds, randomised like client-go's reflector
BACKOFF_INITIAL = 0.8
BACKOFF_MAX = 30.0
CONNECT_TIMEOUT = 10.0

Handler = Callable[[str, dict[str, Any] | None], None]


class Expired(Exception):
    """The resourceVersion we hold is too old: re-list."""


class RetryableError(Exception):
    """The server said to try again later (5xx, 429), maybe after `delay` seconds."""

    def __init__(self, message: str, delay: float | None = None) -> None:
        super().__init__(message)
        self.delay = delay


class RateLimiter:
    """client-go's token bucket: `qps` requests per second on average, `burst` at once.

    Every API request of the agent waits here first (clientConnection.qps and burst, as
    upstream's client honours them); a qps of 0 or less does not limit.
    """

    def __init__(
        self,
        qps: float,
        burst: int,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        self.qps, self.burst = qps, max(burst, 1)
        self._clock, self._sleep = clock, sleep
        self._tokens = float(self.burst)
        self._at = clock()
        self._lock = threading.Lock()

    def wait(self) -> None:
        if self.qps <= 0:
            return
        with self._lock:
            now = self._clock()
            self._tokens = min(self.burst, self._tokens + (now - self._at) * self.qps)
            self._at = now
            self._tokens -= 1
            delay = -self._tokens / self.qps if self._tokens < 0 else 0.0
        if delay > 0:
            self._sleep(delay)


UNLIMITED = RateLimiter(0, 1)


def api_client(kubeconfig: str, master: str) -> Any:
    """An ApiClient from a kubeconfig, from --master alone, or from the pod's service account."""
    configuration = kubernetes.client.Configuration()
    if kubeconfig:
        kubernetes.config.load_kube_config(  # type: ignore[no-untyped-call]
            config_file=kubeconfig, client_configuration=configuration
        )
    elif not master:
        kubernetes.config.load_incluster_config(  # type: ignore[no-untyped-call]
            client_configuration=configuration
        )
    if master:
        configuration.host = master
    configuration.retries = False  # the reflector backs off itself, and logs why
    return kubernetes.client.ApiClient(configuration)


class ApiError(Exception):
    """The API server answered with an error status."""

    def __init__(self, status: int, reason: str, headers: Any, body: bytes) -> None:
        super().__init__(f"HTTP {status} {reason}: {body[:300]!r}")
        self.status, self.reason, self.headers = status, reason, headers


def api_request(
    client: Any,
    method: str,
    path: str,
    query: dict[str, str],
    timeout: tuple[float, float],
    body: dict[str, Any] | None = None,
) -> Any:
    """One request with JSON in and out; the urllib3 response (unread) on success.

    The client's generated API classes are not used: each carries hundreds of model classes
    to build at import, which made the agent's start seconds (and, emulated, minutes) slower
    for objects it reads as plain JSON anyway.
    """
    headers = {"Accept": "application/json"}
    if body is not None:
        headers["Content-Type"] = "application/json"
    request = client.param_serialize(
        method,
        path,
        query_params=list(query.items()) or None,
        header_params=headers,
        body=body,
        auth_settings=["BearerToken"],
    )
    response = client.call_api(*request, _request_timeout=timeout)
    if not 200 <= response.status <= 299:
        raise ApiError(response.status, response.reason, response.headers, response.read())
    return response.response


@dataclass(frozen=True)
class Kind:
    """One watched collection: its API path and kube-proxy's selectors for it."""

    name: str
    path: str
    label_selector: str | None = None
    field_selector: str | None = None


def services_kind() -> Kind:
    return Kind("Service", "/api/v1/services", label_selector=PROXY_SELECTOR)


def endpoint_slices_kind() -> Kind:
    return Kind(
        "EndpointSlice", "/apis/discovery.k8s.io/v1/endpointslices", label_selector=PROXY_SELECTOR
    )


def node_kind(node_name: str) -> Kind:
    return Kind("Node", "/api/v1/nodes", field_selector=f"metadata.name={node_name}")


def object_key(obj: dict[str, Any]) -> str:
    meta = obj.get("metadata") or {}
    return f"{meta.get('namespace') or ''}/{meta.get('name') or ''}"


class Reflector:
    """List-then-watch one kind forever, feeding `handler(key, obj or None)`."""

    def __init__(
        self,
        client: Any,
        kind: Kind,
        handler: Handler,
        on_synced: Callable[[], None],
        stop: threading.Event,
        limiter: RateLimiter = UNLIMITED,
    ) -> None:
        self.client = client
        self.limiter = limiter
        self.kind = kind
        self.handler = handler
        self.on_synced = on_synced
        self.stop = stop
        # Key → resourceVersion of what the handler was last given: enough to tell, on a
        # re-list, what changed and what went, without holding every object twice.
        self.known: dict[str, str] = {}
        self.resource_version = ""
        # The first list may be served from the API server's cache (resourceVersion "0": one
        # response, no paging, as client-go's reflector asks); a list after an expired watch
        # reads the latest state, since the cache can be just as stale as the watch was.
        self.list_from_cache = True
        self.synced = False

    def start(self) -> threading.Thread:
        thread = threading.Thread(target=self.run, name=f"watch-{self.kind.name}", daemon=True)
        thread.start()
        return thread

    def run(self) -> None:
        backoff = BACKOFF_INITIAL
        while not self.stop.is_set():
            try:
                if not self.resource_version:
                    self.list()
                backoff = BACKOFF_INITIAL
                self.watch()
            except Expired:
                log.info(
                    "%s watch: resourceVersion %s expired; re-listing",
                    self.kind.name,
                    self.resource_version,
                )
                self.resource_version = ""
                self.list_from_cache = False
            except RetryableError as err:
                delay = err.delay if err.delay is not None else backoff
                log.warning(
                    "%s: API server unavailable (%s); retrying in %.1fs", self.kind.name, err, delay
                )
                self.stop.wait(delay)
                backoff = min(backoff * 2, BACKOFF_MAX)
            except Exception as err:
                delay = backoff * random.uniform(1.0, 1.5)
                log.warning(
                    "%s: cannot reach the API server (%s); retrying in %.1fs",
                    self.kind.name,
                    err,
                    delay,
                )
                self.stop.wait(delay)
                backoff = min(backoff * 2, BACKOFF_MAX)

    def _request(self, read_timeout: float, **query: str) -> Any:
        """The raw HTTP response of a list or watch call (JSON is parsed by the caller)."""
        selectors = {
            "labelSelector": self.kind.label_selector,
            "fieldSelector": self.kind.field_selector,
        }
        params = {k: v for k, v in {**selectors, **query}.items() if v}
        self.limiter.wait()
        try:
            return api_request(
                self.client, "GET", self.kind.path, params, (CONNECT_TIMEOUT, read_timeout)
            )
        except ApiError as err:
            self._raise_for(err.status, err.reason, err.headers)
            raise

    def _raise_for(self, status: int, reason: str, headers: Any) -> None:
        if status == 410:
            raise Expired(reason)
        if status == 429 or status >= 500:
            retry_after = (headers or {}).get("Retry-After")
            delay = float(retry_after) if retry_after and retry_after.isdigit() else None
            raise RetryableError(f"HTTP {status} {reason}", delay)

    def list(self) -> None:
        """Page through the collection, delivering what changed against what was known.

        Each object is handed on as soon as it is read and then dropped, so a list of
        10,000 objects is never held twice (parsed and converted) for long.
        """
        with LISTING, collector_paused():
            seen, version = self._list_pages()
        for key in set(self.known) - seen:
            del self.known[key]
            self.handler(key, None)
        self.resource_version = version
        log.info(
            "%s: listed %d objects at resourceVersion %s",
            self.kind.name,
            len(seen),
            self.resource_version,
        )
        if not self.synced:
            self.synced = True
            self.on_synced()

    def _list_pages(self) -> tuple[set[str], str]:
        """Read every page, handing on what changed; the keys seen and the list's version."""
        seen: set[str] = set()
        token = ""
        first_page = {"resourceVersion": "0"} if self.list_from_cache else {}
        while True:
            page_query = {"continue": token} if token else first_page
            response = self._request(60, limit=str(PAGE_SIZE), **page_query)
            page = json.loads(response.data)
            response.release_conn()
            del response
            objects = page.get("items") or []
            objects.reverse()
            while objects:
                obj = objects.pop()
                key = object_key(obj)
                seen.add(key)
                version = (obj.get("metadata") or {}).get("resourceVersion") or ""
                if not version or self.known.get(key) != version:
                    self.known[key] = version
                    self.handler(key, obj)
            meta = page.get("metadata") or {}
            token = meta.get("continue") or ""
            if not token:
                return seen, meta.get("resourceVersion") or ""

    def watch(self) -> None:
        """Stream events from the held resourceVersion until the server ends the watch."""
        timeout = random.randint(*WATCH_TIMEOUT_RANGE)
        response = self._request(
            timeout + 30,
            watch="true",
            allowWatchBookmarks="true",
            resourceVersion=self.resource_version,
            timeoutSeconds=str(timeout),
        )
        try:
            for line in _lines(response):
                if self.stop.is_set():
                    return
                self._event(json.loads(line))
        finally:
            response.release_conn()

    def _event(self, event: dict[str, Any]) -> None:
        kind, obj = event.get("type"), event.get("object") or {}
        if kind == "ERROR":
            code = obj.get("code", 0)
            if code == 410:
                raise Expired(obj.get("message", "expired"))
            self._raise_for(code or 500, obj.get("message", ""), None)
            raise RuntimeError(f"watch error: {obj.get('message')}")
        version = (obj.get("metadata") or {}).get("resourceVersion")
        if version:
            self.resource_version = version
        if kind == "BOOKMARK":
            return
        key = object_key(obj)
        if kind == "DELETED":
            if self.known.pop(key, None) is not None:
                self.handler(key, None)
        elif kind in ("ADDED", "MODIFIED"):
            self.known[key] = version or ""
            self.handler(key, obj)


def _lines(response: Any) -> Iterator[bytes]:
    """Newline-delimited JSON from a chunked watch stream."""
    buffer = b""
    try:
        for chunk in response.stream(amt=None, decode_content=True):
            buffer += chunk
            while b"\n" in buffer:
                line, buffer = buffer.split(b"\n", 1)
                if line.strip():
                    yield line
    except urllib3.exceptions.ProtocolError as err:
        raise ConnectionError(f"watch stream broken: {err}") from None
    if buffer.strip():
        yield buffer


# --- start-up requests ---------------------------------------------------------------------

REPORTING_CONTROLLER = "kube-proxy"


def node_event(
    node_name: str, type_: str, reason: str, note: str = "", when: datetime | None = None
) -> dict[str, Any]:
    """An events.k8s.io/v1 Event about this node, as upstream's recorder makes them.

    client-go's event recorder (tools/events) fills it in: the Node as ``regarding`` (its
    UID is the node name, as kube-proxy sets it), action ``StartKubeProxy`` (kube-proxy's
    only one), in the ``default`` namespace since a Node has none, named after the node and
    the time in nanoseconds, reported by ``kube-proxy-<hostname>``.
    """
    when = when or datetime.now(UTC)
    nanos = int(when.timestamp()) * 1_000_000_000 + when.microsecond * 1000
    return {
        "apiVersion": "events.k8s.io/v1",
        "kind": "Event",
        "metadata": {"name": f"{node_name}.{nanos:x}", "namespace": "default"},
        "eventTime": when.strftime("%Y-%m-%dT%H:%M:%S.%fZ"),
        "reportingController": REPORTING_CONTROLLER,
        "reportingInstance": f"{REPORTING_CONTROLLER}-{socket.gethostname()}",
        "action": "StartKubeProxy",
        "reason": reason,
        "regarding": {"kind": "Node", "name": node_name, "uid": node_name},
        "note": note,
        "type": type_,
    }


def starting_event(node_name: str) -> dict[str, Any]:
    """upstream's ``birthCry``: Normal, reason Starting, no note."""
    return node_event(node_name, "Normal", "Starting")


def read_only_sysfs_event(node_name: str) -> dict[str, Any]:
    """The warning upstream posts when /sys is read-only and the conntrack hash table could
    not be grown (its reason is the error's name)."""
    return node_event(
        node_name,
        "Warning",
        "readOnlySysFS",
        "/sys is read-only: the conntrack hash size was not raised with nf_conntrack_max",
    )


def post_event(client: Any, event: dict[str, Any], limiter: RateLimiter = UNLIMITED) -> None:
    """Create an Event (events.k8s.io/v1); raises ApiError on an error answer."""
    limiter.wait()
    namespace = event["metadata"]["namespace"]
    path = f"/apis/events.k8s.io/v1/namespaces/{namespace}/events"
    api_request(client, "POST", path, {}, (CONNECT_TIMEOUT, 30), body=event).release_conn()


def get_node(client: Any, name: str, limiter: RateLimiter = UNLIMITED) -> dict[str, Any] | None:
    """This node's Node object (None when absent), listed by name as the Node watch is."""
    limiter.wait()
    query = {"fieldSelector": f"metadata.name={name}"}
    response = api_request(client, "GET", "/api/v1/nodes", query, (CONNECT_TIMEOUT, 30))
    items: list[dict[str, Any]] = json.loads(response.data).get("items") or []
    return items[0] if items else None
