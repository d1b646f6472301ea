"""Errors users see: one paragraph, a first line in CONTRACT.md's format, an exit code.

Spec and data errors render as
    error: <file>:<line>: <key path>: expected <what>, got <what>
followed by an optional hint on the next lines. Anything that reaches the CLI as an
AutodiffError is printed without a traceback (unless --debug).
"""
from __future__ import annotations

import reprlib
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

# Exit codes fixed by CONTRACT.md.
EXIT_OK = 0
EXIT_BELOW_THRESHOLD = 1
EXIT_USAGE = 2
EXIT_MODEL_ERRORS = 3
EXIT_BUDGET = 4
EXIT_INTERRUPTED = 130


def _few_parts(value: Any, budget: int = 1000) -> bool:
    """Whether `value` has at most `budget` parts (a YAML alias bomb shares parts: its repr never ends)."""
    stack, seen = [value], 0
    while stack:
        v = stack.pop()
        seen += 1
        if seen > budget:
            return False
        if isinstance(v, dict):
            stack.extend(v.keys())
            stack.extend(v.values())
        elif isinstance(v, (list, tuple, set, frozenset)):
            stack.extend(v)
    return True


_BOUNDED = reprlib.Repr()
_BOUNDED.maxlevel, _BOUNDED.maxstring, _BOUNDED.maxother = 3, 200, 200


def describe(value: Any, limit: int = 60) -> str:
    """A short, readable rendering of a bad value for an error message."""
    if value is None:
        return "nothing"
    text = repr(value) if _few_parts(value) else _BOUNDED.repr(value)
    if len(text) > limit:
        text = text[: limit - 3] + "..."
    return text if isinstance(value, (str, int, float, bool)) else f"{type(value).__name__} {text}"


def _userinfo(url: str) -> tuple[str, str | None] | None:
    """(user, password or None) of a URL's `user:password@`, None when it has none."""
    try:
        netloc = urlsplit(url).netloc
    except ValueError:
        return None
    userinfo, at, _ = netloc.rpartition("@")
    if not at:
        return None
    user, colon, password = userinfo.partition(":")
    return user, (password if colon else None)


def redact_url(url: str) -> str:
    """The URL without its credentials: scheme://user:***@host/... (a password hidden), or
    scheme://***@host/... (a user name alone is usually a token). The one place URLs are redacted."""
    try:
        parts = urlsplit(url)
    except ValueError:
        return "(a URL that cannot be parsed; not shown)"
    info = _userinfo(url)
    if info is None:
        return url
    user, password = info
    host = parts.netloc.rpartition("@")[2]
    return urlunsplit(parts._replace(netloc=f"{user + ':' if password is not None else ''}***@{host}"))


def scrub_url_secret(text: str, url: str) -> str:
    """`text` (e.g. a library's error message) with the secret of `url`'s credentials replaced by ***."""
    info = _userinfo(url)
    if info is None:
        return text
    user, password = info
    secret = password if password is not None else user
    return text.replace(secret, "***") if secret else text


class AutodiffError(Exception):
    """Base of every error the CLI reports cleanly."""

    exit_code = EXIT_USAGE

    def __init__(
        self,
        message: str = "",
        *,
        file: str | Path | None = None,
        line: int | None = None,
        key: str | None = None,
        expected: str | None = None,
        got: str | None = None,
        hint: str | None = None,
    ) -> None:
        self.message = message
        self.file = str(file) if file is not None else None
        self.line = line
        self.key = key
        self.expected = expected
        self.got = got
        self.hint = hint
        super().__init__(self.render())

    def location(self) -> str:
        parts = []
        if self.file:
            parts.append(self.file if self.line is None else f"{self.file}:{self.line}")
        if self.key:
            parts.append(self.key)
        return ": ".join(parts)

    def headline(self) -> str:
        where = self.location()
        if self.expected is not None:
            what = f"expected {self.expected}, got {self.got if self.got is not None else 'nothing'}"
            if self.message:
                what = f"{what} ({self.message})"
        else:
            what = self.message
        return f"{where}: {what}" if where else what

    def render(self) -> str:
        text = f"error: {self.headline()}"
        if self.hint:
            text += "\n" + self.hint
        return text

    def __str__(self) -> str:  # pragma: no cover - trivial
        return self.render()


class SpecError(AutodiffError):
    """The YAML spec (or a --set override) is wrong."""


class NotImplementedYet(SpecError):
    """A spec key that is part of the format but whose behaviour is not built yet."""


class DataError(AutodiffError):
    """A dataset file or row is wrong or missing."""


class ModelNotFound(AutodiffError):
    """A local model file or alias cannot be found."""


class UsageError(AutodiffError):
    """A bad command-line option or argument."""


class ModelCallError(AutodiffError):
    """A model call failed after all retries. Counted per example, never scored as wrong."""

    exit_code = EXIT_MODEL_ERRORS


class ErrorRateExceeded(AutodiffError):
    """Too many examples failed with model-call errors."""

    exit_code = EXIT_MODEL_ERRORS


class BudgetExhausted(AutodiffError):
    """A training budget (calls, tokens or cost) is used up."""

    exit_code = EXIT_BUDGET


class Interrupted(AutodiffError):
    """Ctrl-C or SIGTERM."""

    exit_code = EXIT_INTERRUPTED


def describe_exception(error: BaseException) -> str:
    """`Type: message` of an exception, for a message that wraps it ("... raised ValueError: bad input").
    An AutodiffError gives its headline: its own `error: ` prefix and hint would be doubled."""
    text = error.headline() if isinstance(error, AutodiffError) else str(error)
    return f"{type(error).__name__}: {text}" if text else type(error).__name__
