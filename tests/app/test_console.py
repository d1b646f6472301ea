"""app/console.py: progress and logs on stderr (results alone on stdout), plain timestamped lines
when stderr is not a terminal, rich's bar and live status line when it is, nothing but errors and
results under --quiet."""
from __future__ import annotations

import logging
import re
import sys

import pytest

from autodiff_cli.app import console

STAMPED = re.compile(r"^\[\d\d:\d\d:\d\d\] (.*)$")


@pytest.fixture(autouse=True)
def loud():
    console.set_quiet(False)
    yield
    console.set_quiet(False)


@pytest.fixture
def terminal(monkeypatch):
    """stderr is a terminal: the module asks `stderr_is_tty`, rich is told by FORCE_COLOR."""
    monkeypatch.setattr(console, "stderr_is_tty", lambda: True)
    monkeypatch.setenv("FORCE_COLOR", "1")
    monkeypatch.delenv("NO_COLOR", raising=False)


def lines(text: str) -> list[str]:
    out = []
    for line in text.splitlines():
        m = STAMPED.match(line)
        assert m, f"not a timestamped line: {line!r}"
        out.append(m.group(1))
    return out


class FakeUsage:
    def __init__(self) -> None:
        self.calls, self.cost = 0, 0.0

    def total_calls(self) -> int:
        return self.calls

    def total_cost(self) -> float:
        return self.cost


# ---------------------------------------------------------------- log / quiet / logging


def test_log_writes_one_timestamped_line_to_stderr_only(capsys):
    console.log("run directory runs/x")
    out = capsys.readouterr()
    assert out.out == ""
    assert lines(out.err) == ["run directory runs/x"]


def test_quiet_silences_log_lines(capsys):
    console.set_quiet(True)
    console.log("hidden")
    console.set_quiet(False)
    console.log("shown")
    assert lines(capsys.readouterr().err) == ["shown"]


def test_setup_logging_shows_autodiff_warnings_on_the_current_stderr_once(capsys):
    console.setup_logging()
    console.setup_logging()  # a second command in the same process: no second handler
    logging.getLogger("autodiff.grad").warning("unparsed reply from %s", "backward")
    logging.getLogger("autodiff.grad").info("not shown")
    logging.getLogger("elsewhere").warning("not ours")
    err = capsys.readouterr().err  # capsys swapped sys.stderr after the handler was made
    assert re.fullmatch(r"\[\d\d:\d\d:\d\d\] WARNING unparsed reply from backward\n", err), err


# ---------------------------------------------------------------- progress, plain


def test_plain_progress_logs_a_header_then_about_every_tenth(capsys):
    with console.progress("eval tiny [val]", 100) as update:
        for done in range(1, 101):
            update(done, 100, 0, None if done < 50 else done / 100)
    out = capsys.readouterr()
    assert out.out == ""
    got = lines(out.err)
    assert got[0] == "eval tiny [val]: 100 examples"
    assert got[1:] == [f"eval tiny [val]: {d}/100 done, score {'-' if d < 50 else f'{d / 100:.3f}'}, errors 0"
                       for d in range(10, 101, 10)]


def test_plain_progress_always_logs_the_last_update_and_shows_errors_and_spend(capsys):
    usage = FakeUsage()
    with console.progress("train", 3, usage=usage) as update:
        usage.calls, usage.cost = 7, 0.01234
        update(3, 3, 1, 2 / 3)
    got = lines(capsys.readouterr().err)
    assert got == ["train: 3 examples", "train: 3/3 done, score 0.667, errors 1 · 7 calls $0.0123"]


def test_plain_progress_logs_at_least_every_30_seconds(capsys, monkeypatch):
    clock = {"now": 1000.0}
    monkeypatch.setattr(console.time, "monotonic", lambda: clock["now"])
    with console.progress("slow", 1000) as update:
        update(1, 1000, 0, None)  # under a tenth, 0 s: nothing
        clock["now"] += 31
        update(2, 1000, 0, None)  # still under a tenth, but 31 s without a line
        clock["now"] += 5
        update(3, 1000, 0, None)
    assert lines(capsys.readouterr().err) == ["slow: 1000 examples", "slow: 2/1000 done, score -, errors 0"]


def test_plain_progress_is_used_on_a_terminal_when_the_bar_is_off(capsys, terminal):
    # --json: a machine reads stdout, stderr gets plain lines even on a terminal
    with console.progress("eval", 2, bar=False) as update:
        update(2, 2, 0, 1.0)
    assert lines(capsys.readouterr().err) == ["eval: 2 examples", "eval: 2/2 done, score 1.000, errors 0"]


@pytest.mark.parametrize("on_terminal", [False, True])
def test_disabled_or_quiet_progress_prints_nothing(capsys, monkeypatch, on_terminal):
    if on_terminal:
        monkeypatch.setattr(console, "stderr_is_tty", lambda: True)
        monkeypatch.setenv("FORCE_COLOR", "1")
    with console.progress("off", 5, enabled=False) as update:
        update(5, 5, 0, 1.0)
    console.set_quiet(True)
    with console.progress("quiet", 5) as update:
        update(5, 5, 0, 1.0)
    assert capsys.readouterr() == ("", "")


# ---------------------------------------------------------------- on a terminal


def test_terminal_progress_is_a_transient_bar_not_log_lines(capsys, terminal):
    usage = FakeUsage()
    with console.progress("eval tiny [val]", 10, usage=usage) as update:
        usage.calls = 4
        for done in range(1, 11):
            update(done, 10, 2, 0.5)
    out = capsys.readouterr()
    assert out.out == ""
    err = out.err
    assert not any(STAMPED.match(line) for line in err.splitlines())  # no plain lines
    assert "eval tiny [val]" in err  # the label is text, not rich markup
    assert "10/10" in err and "score 0.500 errors 2" in err and "4 calls $0.0000" in err
    assert err.endswith("\x1b[2K")  # transient: the bar is erased when done


def test_live_status_on_a_terminal_shows_the_line_and_prints_above_it(capsys, terminal):
    asked: list[int] = []

    def line() -> str:
        asked.append(1)
        return "step 2 [proposals] · 12 calls"

    with console.LiveStatus(line) as status:
        status.print("step 1: accepted [x]")
    out = capsys.readouterr()
    assert out.out == ""
    assert asked  # the status text is asked for while live
    assert "step 2 [proposals] · 12 calls" in out.err  # plain text, not markup
    assert re.search(r"\[\d\d:\d\d:\d\d\] step 1: accepted \[x\]", out.err)
    assert out.err.endswith("\x1b[2K")  # transient: the status line is gone at the end
    assert status._live is None


def test_live_status_off_a_terminal_is_plain_log_lines(capsys):
    asked: list[int] = []
    with console.LiveStatus(lambda: asked.append(1) or "status") as status:
        status.print("initial validation score 0.250")
    assert lines(capsys.readouterr().err) == ["initial validation score 0.250"]
    assert asked == []  # no live line to draw


def test_live_status_under_quiet_prints_nothing_even_on_a_terminal(capsys, terminal):
    console.set_quiet(True)
    with console.LiveStatus(lambda: "status") as status:
        status.print("step 1")
    assert capsys.readouterr() == ("", "")


def test_stderr_is_tty_asks_the_current_stderr(monkeypatch):
    class Tty:
        def isatty(self) -> bool:
            return True

    monkeypatch.setattr(sys, "stderr", Tty())
    assert console.stderr_is_tty() is True
