"""The collector pause: counted across nested and concurrent phases, and it never turns
on a collector that was off."""

from __future__ import annotations

import gc
import threading
from collections.abc import Iterator

import pytest

from pykubeproxy.gcpause import CollectorPause


@pytest.fixture
def collector_on() -> Iterator[None]:
    was = gc.isenabled()
    gc.enable()
    yield
    (gc.enable if was else gc.disable)()


@pytest.mark.usefixtures("collector_on")
def test_nested_phases_resume_the_collector_once_the_last_ends() -> None:
    pause = CollectorPause()
    with pause():
        assert not gc.isenabled()
        with pause():
            assert not gc.isenabled()
        assert not gc.isenabled()
    assert gc.isenabled()


@pytest.mark.usefixtures("collector_on")
def test_overlapping_phases_in_two_threads_share_one_pause() -> None:
    pause = CollectorPause()
    inside, leave = threading.Event(), threading.Event()

    def other_phase() -> None:
        with pause():
            inside.set()
            leave.wait(10)

    thread = threading.Thread(target=other_phase)
    with pause():
        thread.start()
        inside.wait(10)
    assert not gc.isenabled()  # the other thread's phase still runs
    leave.set()
    thread.join(10)
    assert gc.isenabled()


@pytest.mark.usefixtures("collector_on")
def test_a_collector_that_was_off_stays_off() -> None:
    gc.disable()
    pause = CollectorPause()
    with pause():
        pass
    assert not gc.isenabled()


@pytest.mark.usefixtures("collector_on")
def test_an_exception_in_the_phase_still_resumes_the_collector() -> None:
    pause = CollectorPause()
    with pytest.raises(RuntimeError), pause():
        raise RuntimeError("sync failed")
    assert gc.isenabled()
