"""A tiny threaded HTTP server for the health and metrics endpoints.

Both kube-proxy servers answer plain GETs from memory, so the standard library server is
enough; each route is a function returning the response.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

log = logging.getLogger(__name__)

Response = tuple[int, str, bytes]
Routes = dict[str, Callable[[], Response]]


def parse_bind_address(text: str) -> tuple[str, int]:
    """``host:port`` (IPv6 hosts in brackets); raises ValueError when malformed."""
    host, sep, port_text = text.rpartition(":")
    if not sep or not port_text.isdigit() or not 0 <= int(port_text) <= 65535:
        raise ValueError(f"{text!r} is not a host:port address")
    return host.strip("[]") or "0.0.0.0", int(port_text)


RETRY_INTERVAL = 5.0  # upstream retries a server that failed to start every 5s


def _handler(routes: Routes, name: str) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            route = routes.get(self.path.split("?", 1)[0])
            status, content_type, body = (
                route() if route else (404, "text/plain", b"404 page not found\n")
            )
            self.send_response(status)
            self.send_header("Content-Type", content_type)
            self.send_header("X-Content-Type-Options", "nosniff")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *args: object) -> None:
            log.debug("%s: " + format, name, *args)

    return Handler


class Server:
    """One served address: serving now (`http`), or retried in the background until it is."""

    def __init__(self, address: str, routes: Routes, name: str) -> None:
        self.address, self.routes, self.name = address, routes, name
        self.http: ThreadingHTTPServer | None = None
        self._closed = threading.Event()

    def start(self) -> None:
        """Bind and serve in a daemon thread; raises OSError when the port cannot be bound."""
        host, port = parse_bind_address(self.address)
        http = ThreadingHTTPServer((host, port), _handler(self.routes, self.name))
        http.daemon_threads = True
        threading.Thread(target=http.serve_forever, name=self.name, daemon=True).start()
        log.info("serving %s on %s:%d", self.name, host, http.server_address[1])
        self.http = http

    def retry(self) -> None:
        """Try again every RETRY_INTERVAL seconds, in the background, until bound or closed."""

        def loop() -> None:
            while not self._closed.wait(RETRY_INTERVAL):
                try:
                    self.start()
                    return
                except OSError as err:
                    log.error("starting %s server on %s failed: %s", self.name, self.address, err)

        threading.Thread(target=loop, name=f"{self.name}-retry", daemon=True).start()

    def close(self) -> None:
        self._closed.set()
        if self.http is not None:
            self.http.shutdown()
            self.http.server_close()


def serve(address: str, routes: Routes, name: str, *, hard_fail: bool = True) -> Server | None:
    """Serve `routes` on `address` in a daemon thread; an empty address serves nothing.

    A port that cannot be bound raises with `hard_fail` (upstream's bindAddressHardFail);
    otherwise it is logged and retried in the background every 5s, as upstream does.
    """
    if not address:
        log.info("%s server disabled (empty bind address)", name)
        return None
    server = Server(address, routes, name)
    try:
        server.start()
    except OSError as err:
        if hard_fail:
            raise OSError(f"starting {name} server on {address} failed: {err}") from None
        log.error("starting %s server on %s failed: %s; retrying every %.0fs",
                  name, address, err, RETRY_INTERVAL)  # fmt: skip
        server.retry()
    return server
