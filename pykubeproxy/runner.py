"""A bounded-frequency runner, after kube-proxy's BoundedFrequencyRunner.

Bursts of `run()` requests coalesce into one call no sooner than
`min_interval` after the previous one; a call happens at least every
`max_interval` even without requests; `retry_after()` schedules an earlier
retry after a failure. The scheduling decision is the pure `next_due()`, so
tests drive `step(now)` with a fake clock and never sleep.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable

log = logging.getLogger(__name__)


class BoundedFrequencyRunner:
    """Calls `fn` in one thread, at a bounded frequency."""

    def __init__(
        self,
        fn: Callable[[], None],
        min_interval: float,
        max_interval: float,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._fn = fn
        self.min_interval = min_interval
        self.max_interval = max_interval
        self._clock = clock
        self._cond = threading.Condition()
        self._last_run: float | None = None
        self._requested = True  # the first call happens as soon as the loop starts
        self._retry_at: float | None = None
        self._stopped = False

    def run(self) -> None:
        """Ask for a call soon (coalesced with any other pending request)."""
        with self._cond:
            self._requested = True
            self._cond.notify()

    def retry_after(self, delay: float) -> None:
        """Ask for a call after `delay` seconds (but not before min_interval)."""
        with self._cond:
            at = self._clock() + delay
            self._retry_at = at if self._retry_at is None else min(self._retry_at, at)
            self._cond.notify()

    def stop(self) -> None:
        with self._cond:
            self._stopped = True
            self._cond.notify()

    def next_due(self, now: float) -> float:
        """When the next call should start, given what has been asked for."""
        if self._last_run is None:
            return now
        earliest = self._last_run + self.min_interval
        due = self._last_run + self.max_interval
        if self._requested:
            due = min(due, max(now, earliest))
        if self._retry_at is not None:
            due = min(due, max(self._retry_at, earliest))
        return due

    def step(self, now: float) -> bool:
        """Call `fn` if it is due at `now`; returns whether it did."""
        with self._cond:
            if now < self.next_due(now):
                return False
            self._requested = False
            self._retry_at = None
            self._last_run = now
        self._fn()
        return True

    def loop(self) -> None:
        """Run until `stop()`; `fn` exceptions are logged and retried, never fatal."""
        while True:
            with self._cond:
                while not self._stopped:
                    now = self._clock()
                    wait = self.next_due(now) - now
                    if wait <= 0:
                        break
                    self._cond.wait(wait)
                if self._stopped:
                    return
            try:
                self.step(self._clock())
            except Exception:
                delay = max(self.min_interval, 1.0)
                log.exception("sync failed; retrying after %.1fs", delay)
                self.retry_after(delay)
