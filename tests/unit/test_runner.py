"""The bounded-frequency runner, driven by a fake clock: no test sleeps."""

from __future__ import annotations

import threading

from pykubeproxy.runner import BoundedFrequencyRunner


class Recorder:
    def __init__(self) -> None:
        self.calls = 0

    def __call__(self) -> None:
        self.calls += 1


def make(
    min_interval: float = 1.0, max_interval: float = 30.0
) -> tuple[BoundedFrequencyRunner, Recorder]:
    fn = Recorder()
    return BoundedFrequencyRunner(fn, min_interval, max_interval, clock=lambda: 0.0), fn


def test_first_call_is_immediate_then_periodic() -> None:
    runner, fn = make()
    assert runner.step(0.0) and fn.calls == 1
    assert not runner.step(29.9)
    assert runner.step(30.0) and fn.calls == 2
    assert runner.next_due(30.0) == 60.0


def test_bursts_coalesce_no_sooner_than_min_interval() -> None:
    runner, fn = make(min_interval=1.0)
    runner.step(0.0)
    for _ in range(100):
        runner.run()
    assert runner.next_due(0.2) == 1.0
    assert not runner.step(0.5)
    assert runner.step(1.0) and fn.calls == 2
    assert runner.next_due(1.0) == 31.0  # the burst was consumed by one call


def test_request_after_a_quiet_period_runs_at_once() -> None:
    runner, fn = make(min_interval=1.0)
    runner.step(0.0)
    runner.run()
    assert runner.next_due(10.0) == 10.0
    assert runner.step(10.0) and fn.calls == 2


def test_retry_after_is_bounded_by_min_interval() -> None:
    runner, _ = make(min_interval=2.0)
    runner.step(0.0)
    runner.retry_after(0.5)  # the clock says 0.0: retry at 0.5, but not before 2.0
    assert runner.next_due(0.0) == 2.0
    runner.step(2.0)
    runner.retry_after(5.0)
    assert runner.next_due(2.0) == 5.0


def test_loop_stops_and_survives_exceptions() -> None:
    calls: list[int] = []
    stopped = threading.Event()

    def fn() -> None:
        calls.append(1)
        if len(calls) == 1:
            raise RuntimeError("boom")
        runner.stop()
        stopped.set()

    runner = BoundedFrequencyRunner(fn, 0.0, 30.0)
    runner.retry_after(0.0)
    thread = threading.Thread(target=runner.loop, daemon=True)
    thread.start()
    thread.join(10)
    assert not thread.is_alive() and stopped.is_set() and len(calls) == 2
