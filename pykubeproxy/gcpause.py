"""Pause Python's cyclic garbage collector while the agent does bulk work.

Why: listing 10,000 objects, converting them and rendering 180,000 rules allocate
millions of container objects that are never part of a reference cycle. The collector
is triggered by allocation counts, so during such a phase it runs again and again,
each full pass walking every live object; at 10,000 Services that was close to half
of render time. Garbage without cycles is freed by reference counting whether the
collector runs or not, so pausing it for a bounded phase loses nothing: any cycle made
meanwhile is collected by the first pass after the phase.

The listing (a watch thread) and a sync (the runner thread) may overlap, so pauses are
counted: the collector is enabled again when the last paused phase ends, and only if it
was enabled when the first began.
"""

from __future__ import annotations

import gc
import threading
from collections.abc import Iterator
from contextlib import contextmanager


class CollectorPause:
    """A counted pause of `gc`: nested and concurrent phases share one pause."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._holders = 0
        self._resume = False

    @contextmanager
    def __call__(self) -> Iterator[None]:
        with self._lock:
            if self._holders == 0:
                self._resume = gc.isenabled()
                gc.disable()
            self._holders += 1
        try:
            yield
        finally:
            with self._lock:
                self._holders -= 1
                if self._holders == 0 and self._resume:
                    gc.enable()


collector_paused = CollectorPause()
