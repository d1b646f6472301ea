"""Ctrl-C and SIGTERM for a long command: the first signal stops the work cleanly, later ones wait.

The first signal cancels the command's asyncio task; its clean-up (collecting the model calls in
flight, writing the summary) must then run to the end, so a second Ctrl-C is only acknowledged:
cancelling the clean-up too would leave futures whose errors nobody reads (asyncio prints their
tracebacks at exit) and a run directory without its final summary.
"""
from __future__ import annotations

import asyncio
import signal
from collections.abc import Callable

SIGNALS = (signal.SIGINT, signal.SIGTERM)


class GracefulStop:
    """Use as `with GracefulStop(note) as stop:`, call `stop.attach()` first thing inside the
    asyncio task to be cancelled, and `stop.after_loop()` once `asyncio.run` has returned."""

    def __init__(self, note: Callable[[str], None]) -> None:
        self._note = note
        self._task: asyncio.Task | None = None
        self.requested = False
        self._previous: dict[int, object] = {}

    def __enter__(self) -> GracefulStop:
        self._previous = {sig: signal.getsignal(sig) for sig in SIGNALS}
        self.after_loop()  # before the loop starts, too
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)

    def attach(self) -> None:
        """Route the signals to the running loop's current task (inside the loop)."""
        self._task = asyncio.current_task()
        loop = asyncio.get_running_loop()
        for sig in SIGNALS:
            loop.add_signal_handler(sig, self._on_signal)
        if self.requested:  # a signal came before the loop started
            self._task.cancel()

    def after_loop(self) -> None:
        """Closing the loop put back the default handlers (Ctrl-C = KeyboardInterrupt anywhere)."""
        for sig in SIGNALS:
            signal.signal(sig, lambda *_: self._on_signal())

    def _on_signal(self) -> None:
        if self.requested:
            self._note("already stopping: waiting for the model calls in flight, then the summary")
            return
        self.requested = True
        self._note("stopping: waiting for the model calls in flight to end")
        if self._task is not None and not self._task.done():
            self._task.cancel()
