"""The per-Service health check servers on each Service's ``healthCheckNodePort``.

Cloud load balancers probe every node on a Service's health check node port
(Services with ``externalTrafficPolicy: Local``) and send traffic only to nodes
that answer 200. kube-proxy answers there from memory: 200 while the node has
at least one local ready endpoint of the Service and the proxy itself is
healthy, 503 otherwise (upstream ``pkg/proxy/healthcheck/service_health.go``,
``hcHandler.ServeHTTP``). Both proxy modes share this one component; the
proxier feeds it after each successful sync.

Listeners follow upstream ``newServiceHealthServer``: with
``--nodeport-addresses`` restricting node ports, one listener per matching node
address (looked up once, at construction); otherwise one wildcard listener.
Go's wildcard listener is a dual-stack ``[::]`` socket, so ours is too where the
host supports it.
"""

from __future__ import annotations

import contextlib
import json
import logging
import socket
import socketserver
import threading
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from functools import partial
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, NamedTuple

from pykubeproxy.model import NamespacedName

log = logging.getLogger(__name__)

# How long a connected client may stay silent before its handler thread gives up.
CLIENT_TIMEOUT_SECONDS = 60.0


class HealthCheckResponse(NamedTuple):
    status: int
    headers: tuple[tuple[str, str], ...]
    body: bytes


def service_health_response(
    service: NamespacedName, local_endpoints: int, proxy_healthy: bool
) -> HealthCheckResponse:
    """What upstream ``hcHandler.ServeHTTP`` answers for one Service.

    The body is not produced by a JSON encoder upstream but by a dedented,
    tab-indented template with no trailing newline; it is reproduced byte for
    byte. The endpoint count doubles as the load-balancing weight header.
    """
    healthy = local_endpoints != 0 and proxy_healthy
    body = (
        "{\n"
        '\t"service": {\n'
        f'\t\t"namespace": {json.dumps(service.namespace)},\n'
        f'\t\t"name": {json.dumps(service.name)}\n'
        "\t},\n"
        f'\t"localEndpoints": {local_endpoints},\n'
        f'\t"serviceProxyHealthy": {json.dumps(proxy_healthy)}\n'
        "}"
    )
    headers = (
        ("Content-Type", "application/json"),
        ("X-Content-Type-Options", "nosniff"),
        ("X-Load-Balancing-Endpoint-Weight", str(local_endpoints)),
    )
    return HealthCheckResponse(200 if healthy else 503, headers, body.encode())


def listen_hosts(node_ips: Callable[[], Sequence[str]] | None) -> tuple[str, ...]:
    """The addresses each Service's health check port is opened on.

    `node_ips` is None when node ports are open on every address. When listing
    the node's addresses fails, upstream falls back to the wildcard.
    """
    wildcard = ("::",) if socket.has_dualstack_ipv6() else ("0.0.0.0",)
    if node_ips is None:
        return wildcard
    try:
        return tuple(dict.fromkeys(node_ips()))
    except Exception as err:  # any failure to list addresses means "listen everywhere"
        log.error("cannot list the node addresses for health check ports, using all: %s", err)
        return wildcard


class _Handler(BaseHTTPRequestHandler):
    """Answers every path and method alike, as upstream's handler does."""

    protocol_version = "HTTP/1.1"
    timeout = CLIENT_TIMEOUT_SECONDS

    def __init__(
        self, respond: Callable[[], HealthCheckResponse | None], *args: Any, **kwargs: Any
    ) -> None:
        self._respond = respond
        super().__init__(*args, **kwargs)

    def _answer(self, with_body: bool) -> None:
        # One request per connection, so closing a Service's listener leaves no
        # kept-alive connection answering for it.
        self.close_connection = True
        response = self._respond()
        if response is None:
            return
        self.send_response_only(response.status)
        for name, value in response.headers:
            self.send_header(name, value)
        self.send_header("Date", self.date_time_string())
        self.send_header("Content-Length", str(len(response.body)))
        self.send_header("Connection", "close")
        self.end_headers()
        if with_body:
            self.wfile.write(response.body)

    def do_GET(self) -> None:
        self._answer(with_body=True)

    def do_HEAD(self) -> None:
        self._answer(with_body=False)

    do_POST = do_PUT = do_PATCH = do_DELETE = do_OPTIONS = do_GET

    def log_message(self, format: str, *args: object) -> None:
        log.debug("health check: " + format, *args)


class _Listener(ThreadingHTTPServer):
    """One listening socket with its own accept thread.

    Closing must free the port at once (a port moves between Services within
    one sync) without waiting for a polling loop, so the accept thread blocks in
    accept() and is woken by shutting the listening socket down, which Linux
    turns into an accept() error.
    """

    daemon_threads = True

    def __init__(self, host: str, port: int, handler: Callable[..., _Handler]) -> None:
        self.address_family = socket.AF_INET6 if ":" in host else socket.AF_INET
        self._closing = threading.Event()
        super().__init__((host, port), handler)
        self._accepter = threading.Thread(
            target=self._accept_until_closed, name=f"healthcheck-{port}", daemon=True
        )
        self._accepter.start()

    def server_bind(self) -> None:
        if self.server_address[0] == "::":
            self.socket.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
        # HTTPServer.server_bind would add a reverse DNS lookup nothing here uses.
        socketserver.TCPServer.server_bind(self)

    def _accept_until_closed(self) -> None:
        while True:
            try:
                request, client = self.get_request()
            except OSError as err:
                if self._closing.wait(0.1):  # short pause so a persistent error cannot spin
                    break
                log.warning("health check port %d: accept failed: %s", self.server_address[1], err)
                continue
            self.process_request(request, client)
        self.server_close()

    def close(self) -> None:
        self._closing.set()
        with contextlib.suppress(OSError):
            self.socket.shutdown(socket.SHUT_RDWR)
        self._accepter.join()


@dataclass
class _ServiceHealthCheck:
    port: int
    listeners: list[_Listener] = field(default_factory=list)
    local_endpoints: int = 0

    def close(self) -> None:
        for listener in self.listeners:
            listener.close()
        self.listeners.clear()


class ServiceHealthServer:
    """kube-proxy's ServiceHealthServer: one HTTP server per health-checked Service.

    `node_ips` lists the node addresses matching ``--nodeport-addresses`` (None
    when they match everything); `proxy_healthy` is the proxy's own health
    (upstream ``ProxyHealthServer.Health().Healthy``, without node eligibility).
    `sync_services`/`sync_endpoints` are called from the sync thread while
    requests are answered on server threads; one lock guards the Service table.
    """

    def __init__(
        self,
        node_ips: Callable[[], Sequence[str]] | None,
        proxy_healthy: Callable[[], bool],
    ) -> None:
        self.listen_hosts = listen_hosts(node_ips)
        self._proxy_healthy = proxy_healthy
        self._lock = threading.Lock()
        self._services: dict[NamespacedName, _ServiceHealthCheck] = {}

    def sync_services(self, ports: Mapping[NamespacedName, int]) -> None:
        """Make `ports` (Service -> health check node port) the served set.

        Servers of Services that left or whose port changed are closed first,
        then new ones opened; unchanged ones are left alone. A port that cannot
        be opened on every listen address is logged as one warning and the
        Service is left out, so, as upstream, every later sync tries (and, while
        the port stays taken, warns) again.
        """
        with self._lock:
            for service, check in list(self._services.items()):
                if ports.get(service) != check.port:
                    log.info("closing health check of Service %s on port %d", service, check.port)
                    check.close()
                    del self._services[service]
            for service, port in ports.items():
                if service in self._services:
                    continue
                check = _ServiceHealthCheck(port)
                try:
                    for host in self.listen_hosts:
                        check.listeners.append(_Listener(host, port, self._handler(service)))
                except OSError as err:
                    check.close()
                    log.warning(
                        "failed to start the health check of Service %s on port %d: %s",
                        service,
                        port,
                        err,
                    )
                    continue
                log.info("opened health check of Service %s on port %d", service, port)
                self._services[service] = check

    def sync_endpoints(self, counts: Mapping[NamespacedName, int]) -> None:
        """Set each served Service's local ready endpoint count; absent means 0."""
        with self._lock:
            for service, check in self._services.items():
                check.local_endpoints = counts.get(service, 0)

    def close(self) -> None:
        """Stop every server (on agent shutdown)."""
        with self._lock:
            for check in self._services.values():
                check.close()
            self._services.clear()

    def _handler(self, service: NamespacedName) -> Callable[..., _Handler]:
        return partial(_Handler, partial(self._respond, service))

    def _respond(self, service: NamespacedName) -> HealthCheckResponse | None:
        with self._lock:
            check = self._services.get(service)
            local_endpoints = check.local_endpoints if check else None
        if local_endpoints is None:
            # A request that raced with closing its Service's server. Upstream's
            # handler writes nothing, which Go sends as an empty 200; dropping the
            # connection instead keeps a probe from reading it as healthy.
            log.debug("health check request for closed Service %s", service)
            return None
        return service_health_response(service, local_endpoints, self._proxy_healthy())
