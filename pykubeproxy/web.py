"""A tiny threaded HTTP server for the health and metrics endpoints.

Both kube-proxy endpoints are plain GETs answered from memory, so the standard
library server is enough; each route is a function returning the response.
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


def serve(address: str, routes: Routes, name: str) -> ThreadingHTTPServer:
    """Start serving `routes` on `address` in a daemon thread."""

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

    host, port = parse_bind_address(address)
    server = ThreadingHTTPServer((host, port), Handler)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, name=name, daemon=True).start()
    log.info("serving %s on %s:%d", name, host, server.server_address[1])
    return server
