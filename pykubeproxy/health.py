"""kube-proxy's /healthz and /livez: healthy while no queued update is stale.

As upstream's ProxyHealthServer (pkg/proxy/healthcheck/proxy_health.go, v1.34): a sync that
is queued but not done within `timeout` (twice the sync period) makes the proxier of that IP
family unhealthy; `/healthz` also reports whether the node is eligible for load-balancer
traffic (not being deleted), `/livez` does not. The body is upstream's JSON: the overall
``lastUpdated`` (now, while healthy), ``currentTime``, ``nodeEligible`` (healthz only),
``healthy`` and the per-family ``status``, times in RFC 3339 with nanoseconds as Go's
JSON encoder writes them. The agent's start counts as its first update.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

from pykubeproxy.metrics import IP_FAMILY, Metrics
from pykubeproxy.web import Response, Routes


def go_json_time(wall: float) -> str:
    """A time as Go's time.Time marshals to JSON (RFC 3339, nanoseconds, zeros trimmed).

    A float Unix time holds microseconds, not nanoseconds: the digits below are zeros.
    """
    whole = int(wall // 1)
    nanos = round((wall - whole) * 1e6) * 1000
    if nanos == 1_000_000_000:
        whole, nanos = whole + 1, 0
    stamp = datetime.fromtimestamp(whole, UTC).strftime("%Y-%m-%dT%H:%M:%S")
    fraction = f".{nanos:09d}".rstrip("0").rstrip(".")
    return f"{stamp}{fraction}Z"


class ProxyHealth:
    """Tracks queued and completed syncs and answers the health endpoints."""

    def __init__(
        self,
        timeout: float,
        metrics: Metrics,
        clock: Callable[[], float] = time.time,
        ip_family: str = IP_FAMILY,
    ) -> None:
        self.timeout = timeout
        self.metrics = metrics
        self.ip_family = ip_family
        self._clock = clock
        self._lock = threading.Lock()
        self._last_updated = clock()
        self._oldest_queued: float | None = None
        self.node_eligible = True

    def queued_update(self) -> None:
        with self._lock:
            if self._oldest_queued is None:
                self._oldest_queued = self._clock()

    def updated(self) -> None:
        with self._lock:
            self._last_updated = self._clock()
            self._oldest_queued = None

    def is_healthy(self) -> tuple[bool, float, float]:
        """(healthy, lastUpdated, now), upstream's Health() for this agent's one family."""
        now = self._clock()
        with self._lock:
            last = self._last_updated
            stale = self._oldest_queued is not None and now - self._oldest_queued >= self.timeout
        return not stale, last, now

    def _answer(self, with_node: bool) -> Response:
        healthy, last, now = self.is_healthy()
        ok = healthy and (self.node_eligible or not with_node)
        # Upstream reports a recent lastUpdated while healthy, for older clients' sake.
        body: dict[str, Any] = {
            "lastUpdated": go_json_time(now if ok else last),
            "currentTime": go_json_time(now),
        }
        if with_node:
            body["nodeEligible"] = self.node_eligible
        body["healthy"] = healthy
        body["status"] = {self.ip_family: {"lastUpdated": go_json_time(last), "healthy": healthy}}
        code = 200 if ok else 503
        (self.metrics.healthz if with_node else self.metrics.livez).labels(str(code)).inc()
        return code, "application/json", json.dumps(body, separators=(",", ":")).encode()

    def healthz(self) -> Response:
        return self._answer(with_node=True)

    def livez(self) -> Response:
        return self._answer(with_node=False)

    def routes(self) -> Routes:
        return {"/healthz": self.healthz, "/livez": self.livez}
