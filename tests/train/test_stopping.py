"""train/stopping.py with real signals sent to this process: the first SIGINT/SIGTERM cancels the
attached task, a second one is only acknowledged (the clean-up runs to its end), a signal that comes
before the loop cancels the task as soon as it attaches, and the previous handlers come back on exit."""
from __future__ import annotations

import asyncio
import os
import signal

import pytest

from autodiff_cli.train.stopping import GracefulStop

STOPPING = "stopping: waiting for the model calls in flight to end"
ALREADY = "already stopping: waiting for the model calls in flight, then the summary"


@pytest.fixture
def outer_handlers():
    """Handlers of our own around each test: a handler GracefulStop failed to install or to restore
    records the signal here instead of killing the test run (SIGTERM) or raising KeyboardInterrupt."""
    seen: list[int] = []
    previous = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}

    def outer(signum, frame):
        seen.append(signum)

    for sig in previous:
        signal.signal(sig, outer)
    yield outer, seen
    for sig, handler in previous.items():
        signal.signal(sig, handler)


def kill(sig: int) -> None:
    os.kill(os.getpid(), sig)


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_first_signal_cancels_the_attached_task(outer_handlers, sig):
    _, seen = outer_handlers
    notes: list[str] = []
    reached: list[str] = []

    async def main() -> None:
        stop.attach()
        kill(sig)
        await asyncio.sleep(5)
        reached.append("after sleep")  # never: the sleep is cancelled

    with GracefulStop(notes.append) as stop:
        assert not stop.requested
        with pytest.raises(asyncio.CancelledError):
            asyncio.run(main())
    assert stop.requested
    assert notes == [STOPPING]
    assert reached == [] and seen == []


def test_second_signal_is_acknowledged_and_the_clean_up_finishes(outer_handlers):
    _, seen = outer_handlers
    notes: list[str] = []
    cleanup: list[str] = []

    async def main() -> None:
        stop.attach()
        try:
            kill(signal.SIGINT)
            await asyncio.sleep(5)
        except asyncio.CancelledError:
            kill(signal.SIGINT)
            kill(signal.SIGTERM)
            await asyncio.sleep(0.05)  # the clean-up awaits: a second cancel would hit here
            cleanup.append(f"done, cancelled {asyncio.current_task().cancelling()} time(s)")
            raise

    with GracefulStop(notes.append) as stop, pytest.raises(asyncio.CancelledError):
        asyncio.run(main())
    assert cleanup == ["done, cancelled 1 time(s)"]
    assert notes == [STOPPING, ALREADY, ALREADY]
    assert seen == []


def test_a_signal_before_the_loop_cancels_the_task_when_it_attaches(outer_handlers):
    _, seen = outer_handlers
    notes: list[str] = []
    steps: list[str] = []

    async def main() -> None:
        stop.attach()
        steps.append("attached")
        await asyncio.sleep(5)
        steps.append("after sleep")

    with GracefulStop(notes.append) as stop:
        kill(signal.SIGINT)  # no loop yet: no KeyboardInterrupt, only a note
        assert stop.requested and notes == [STOPPING]
        with pytest.raises(asyncio.CancelledError):
            asyncio.run(main())
    assert steps == ["attached"]  # cancelled at its first await
    assert notes == [STOPPING]  # the cancel at attach is not a second signal
    assert seen == []


def test_after_the_loop_a_signal_neither_interrupts_nor_reaches_the_old_handler(outer_handlers):
    _, seen = outer_handlers
    notes: list[str] = []

    async def main() -> None:
        stop.attach()
        kill(signal.SIGTERM)
        await asyncio.sleep(5)

    with GracefulStop(notes.append) as stop:
        with pytest.raises(asyncio.CancelledError):
            asyncio.run(main())
        stop.after_loop()  # closing the loop reset the handlers
        kill(signal.SIGINT)  # the summary is being written: no KeyboardInterrupt
        kill(signal.SIGTERM)  # and no death by SIGTERM
    assert notes == [STOPPING, ALREADY, ALREADY]
    assert seen == []


def test_a_run_without_signals_completes_and_notes_nothing(outer_handlers):
    notes: list[str] = []

    async def main() -> str:
        stop.attach()
        await asyncio.sleep(0)
        return "finished"

    with GracefulStop(notes.append) as stop:
        assert asyncio.run(main()) == "finished"
        stop.after_loop()
        kill(signal.SIGINT)  # the task is done: nothing to cancel, only noted
    assert stop.requested and notes == [STOPPING]


def test_the_previous_handlers_are_restored_on_exit(outer_handlers):
    outer, seen = outer_handlers
    with GracefulStop(lambda _: None):
        assert signal.getsignal(signal.SIGINT) is not outer
        assert signal.getsignal(signal.SIGTERM) is not outer
    assert signal.getsignal(signal.SIGINT) is outer
    assert signal.getsignal(signal.SIGTERM) is outer
    kill(signal.SIGINT)
    kill(signal.SIGTERM)
    assert seen == [signal.SIGINT, signal.SIGTERM]


def test_the_previous_handlers_are_restored_after_an_error_and_after_a_loop(outer_handlers):
    outer, _ = outer_handlers

    async def main() -> None:
        stop.attach()
        raise ValueError("boom")

    with pytest.raises(ValueError, match="boom"), GracefulStop(lambda _: None) as stop:
        asyncio.run(main())
    assert signal.getsignal(signal.SIGINT) is outer
    assert signal.getsignal(signal.SIGTERM) is outer
