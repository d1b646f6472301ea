"""Progress and result output: rich on a terminal, plain timestamped lines otherwise.

Results go to stdout; progress and logs go to stderr (CONTRACT.md).
"""
from __future__ import annotations

import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime

_settings = {"quiet": False}


def set_quiet(quiet: bool) -> None:
    """--quiet: no progress bars or log lines (errors and results still print)."""
    _settings["quiet"] = quiet


def stderr_is_tty() -> bool:
    return sys.stderr.isatty()


def setup_logging() -> None:
    """Warnings of the `autodiff.*` loggers (unparsed replies, failed backward calls) as log lines."""
    import logging

    class CurrentStderr(logging.StreamHandler):
        """Writes to whatever sys.stderr is at the time (tests and embedders swap it)."""

        @property
        def stream(self):  # type: ignore[override]
            return sys.stderr

        @stream.setter
        def stream(self, value) -> None:
            pass

    logger = logging.getLogger("autodiff")
    if not logger.handlers:
        handler = CurrentStderr()
        handler.setFormatter(logging.Formatter("[%(asctime)s] %(levelname)s %(message)s", "%H:%M:%S"))
        logger.addHandler(handler)
        logger.setLevel(logging.WARNING)


def log(message: str) -> None:
    if _settings["quiet"]:
        return
    stamp = datetime.now(UTC).strftime("%H:%M:%S")
    print(f"[{stamp}] {message}", file=sys.stderr, flush=True)


def _fmt_score(score: float | None) -> str:
    return "-" if score is None else f"{score:.3f}"


@contextmanager
def progress(label: str, total: int, enabled: bool = True, bar: bool = True, usage=None) -> Iterator:
    """Yields update(done, total, errors, score). A bar on a TTY (unless bar=False), else a line every ~10%.

    With `usage` (an llm.usage.Usage), the bar and the lines also show calls and cost so far.
    """
    def spend() -> str:
        return "" if usage is None else f" · {usage.total_calls()} calls ${usage.total_cost():.4f}"

    if not enabled or _settings["quiet"]:
        yield lambda *a: None
        return
    if bar and stderr_is_tty():
        from rich.console import Console
        from rich.progress import (
            BarColumn,
            MofNCompleteColumn,
            Progress,
            TextColumn,
            TimeElapsedColumn,
            TimeRemainingColumn,
        )

        display = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                       TextColumn("score {task.fields[score]} errors {task.fields[errors]}{task.fields[spend]}"),
                       TimeElapsedColumn(), TimeRemainingColumn(), console=Console(stderr=True), transient=True)
        with display:
            from rich.markup import escape

            task = display.add_task(escape(label), total=total, score="-", errors=0, spend=spend())

            def update(done: int, total_: int, errors: int, score: float | None) -> None:
                display.update(task, completed=done, score=_fmt_score(score), errors=errors, spend=spend())

            yield update
        return
    last = {"t": time.monotonic(), "step": 0}
    log(f"{label}: {total} examples")

    def update_plain(done: int, total_: int, errors: int, score: float | None) -> None:
        step = done * 10 // max(total_, 1)
        if done == total_ or step > last["step"] or time.monotonic() - last["t"] > 30:
            last.update(t=time.monotonic(), step=step)
            log(f"{label}: {done}/{total_} done, score {_fmt_score(score)}, errors {errors}{spend()}")

    yield update_plain


class LiveStatus:
    """One live status line under the log lines on a terminal (train); plain log lines otherwise.

    `line` is called a few times a second for the current text; `print` adds a log line above it.
    """

    def __init__(self, line) -> None:
        self.line = line
        self._live = None

    def __enter__(self) -> LiveStatus:
        if stderr_is_tty() and not _settings["quiet"]:
            from rich.console import Console
            from rich.live import Live
            from rich.text import Text

            self._text = Text
            self._live = Live(get_renderable=lambda: Text(self.line()), console=Console(stderr=True),
                              refresh_per_second=4, transient=True)
            self._live.__enter__()
        return self

    def print(self, message: str) -> None:
        if self._live is None:
            log(message)
        else:
            stamp = datetime.now(UTC).strftime("%H:%M:%S")
            self._live.console.print(self._text(f"[{stamp}] {message}"))

    def __exit__(self, *exc) -> None:
        if self._live is not None:
            self._live.__exit__(*exc)
            self._live = None
