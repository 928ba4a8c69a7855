"""kube-proxy's /healthz and /livez: healthy while no queued update is stale.

A sync that is queued but not done within `timeout` (twice the sync period)
makes the proxy unhealthy; `/healthz` also reports whether the node is
eligible for load-balancer traffic (not being deleted). The JSON is written
the way kube-proxy's Go code prints it, time format included.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable
from datetime import UTC, datetime

from pykubeproxy.metrics import Metrics
from pykubeproxy.web import Response, Routes


def go_time(wall: float, monotonic_offset: float) -> str:
    """A Go time.Time's String() form, as kube-proxy's healthz JSON shows it."""
    moment = datetime.fromtimestamp(wall, UTC)
    nanos = round((wall % 1) * 1e9) % 1_000_000_000
    stamp = moment.strftime("%Y-%m-%d %H:%M:%S") + f".{nanos:09d}".rstrip("0").rstrip(".")
    return f"{stamp} +0000 UTC m=+{monotonic_offset:.9f}"


class ProxyHealth:
    """Tracks queued and completed syncs and answers the health endpoints."""

    def __init__(
        self,
        timeout: float,
        metrics: Metrics,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.timeout = timeout
        self.metrics = metrics
        self._clock = clock
        self._started = clock()
        self._lock = threading.Lock()
        self._last_updated: float | None = None
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
        """(healthy, lastUpdated, now), kube-proxy's isHealthy()."""
        now = self._clock()
        with self._lock:
            last = self._last_updated if self._last_updated is not None else self._started
            stale = self._oldest_queued is not None and now - self._oldest_queued >= self.timeout
        return not stale, last, now

    def _stamp(self, wall: float) -> str:
        return go_time(wall, wall - self._started)

    def _answer(self, with_node: bool) -> Response:
        healthy, last, now = self.is_healthy()
        if with_node:
            healthy = healthy and self.node_eligible
        if healthy:
            last = now  # kube-proxy reports a recent lastUpdated while healthy
        code = 200 if healthy else 503
        (self.metrics.healthz if with_node else self.metrics.livez).labels(str(code)).inc()
        body = (
            f'{{"lastUpdated": {json.dumps(self._stamp(last))},'
            f'"currentTime": {json.dumps(self._stamp(now))}'
        )
        if with_node:
            body += f', "nodeEligible": {json.dumps(self.node_eligible)}'
        return code, "application/json", (body + "}").encode()

    def healthz(self) -> Response:
        return self._answer(with_node=True)

    def livez(self) -> Response:
        return self._answer(with_node=False)

    def routes(self) -> Routes:
        return {"/healthz": self.healthz, "/livez": self.livez}
