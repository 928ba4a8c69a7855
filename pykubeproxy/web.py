"""A tiny threaded HTTP server for the health and metrics endpoints.

Both kube-proxy servers answer plain GETs from memory, so the standard library server is
enough; each route is a function returning the response.
"""

from __future__ import annotations

import logging
import threading
import time
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


def _start(host: str, port: int, routes: Routes, name: str) -> ThreadingHTTPServer:
    server = ThreadingHTTPServer((host, port), _handler(routes, name))
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, name=name, daemon=True).start()
    log.info("serving %s on %s:%d", name, host, server.server_address[1])
    return server


def serve(
    address: str, routes: Routes, name: str, *, hard_fail: bool = True
) -> ThreadingHTTPServer | None:
    """Serve `routes` on `address` in a daemon thread; an empty address serves nothing.

    A port that cannot be bound raises with `hard_fail` (upstream's bindAddressHardFail);
    otherwise it is logged and retried in the background every 5s, as upstream does.
    """
    if not address:
        log.info("%s server disabled (empty bind address)", name)
        return None
    host, port = parse_bind_address(address)
    try:
        return _start(host, port, routes, name)
    except OSError as err:
        if hard_fail:
            raise OSError(f"starting {name} server on {address} failed: {err}") from None
        log.error("starting %s server on %s failed: %s; retrying every %.0fs",
                  name, address, err, RETRY_INTERVAL)  # fmt: skip

    def retry() -> None:
        while True:
            time.sleep(RETRY_INTERVAL)
            try:
                _start(host, port, routes, name)
                return
            except OSError as err:
                log.error("starting %s server on %s failed: %s", name, address, err)

    threading.Thread(target=retry, name=f"{name}-retry", daemon=True).start()
    return None
