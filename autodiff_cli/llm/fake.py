r"""The scripted fake model behind `fake/<path to a script file>` (the provider, served through litellm
like any other, is autodiff_cli/llm/providers/fake.py; tests/support/fake_server.py serves the same
scripts over HTTP).

Tests and dry runs use it to exercise the same code path as real runs (litellm, retries, cache,
usage) with no model at all. The script is YAML:

    rules:                       # the first rule whose `match` hits wins
      - match: "How many"        # regex searched in the last user message
        in: user                 # where to search: user (default), system, or all (every message)
        reply: "Let me count. Answer: 3"
      - match: "fruit (\\w+)"
        reply: "Answer: {1}"     # {0}, {1}... regex groups; {user}/{system}: the whole message
      - match: "flaky"
        fail_times: 2            # the first 2 attempts with the same messages fail, then `reply`
        error: 500               # 429, 500, 503, 400, timeout, connection, context_length, auth, empty
        retry_after: 0.01        # seconds, sent as Retry-After with a 429
        reply: "ok"
      - match: "boom"
        error: 500               # no fail_times: always fails
      - match: "coin"
        replies: ["tails", "heads"]   # successive calls with the same messages, in turn (the last repeats)
    default: "I don't know."     # reply when no rule matches; omitted: echo the last user message
    latency: 0.0                 # seconds of simulated latency per call

Errors are raised as litellm's own exception classes (by the provider, providers/fake.py), so the
client's retry logic sees exactly what a real provider would raise; `empty` replies ''. Only
`{0}`-style, `{user}` and `{system}` placeholders are replaced, so replies may contain JSON braces.
Token usage is a deterministic count of whitespace-separated words. `fail_times` and `replies` counters are per (script,
messages) and per process (a cached reply never reaches the script, so it does not count).
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import re
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from autodiff_cli.errors import ModelNotFound, SpecError

ERROR_KINDS = ("429", "500", "503", "400", "timeout", "connection", "context_length", "auth", "empty")
WHERE = ("user", "system", "all")
PLACEHOLDER = re.compile(r"\{(\d+|user|system)\}")


@dataclass(frozen=True)
class Rule:
    pattern: re.Pattern
    where: str
    reply: str | None
    error: str | None
    fail_times: int | None
    retry_after: float | None
    replies: tuple[str, ...] = ()


@dataclass(frozen=True)
class Script:
    path: str
    identity: str
    rules: tuple[Rule, ...]
    default: str | None
    latency: float


class ScriptedError(Exception):
    """A scripted failure: a litellm exception from the `fake/` provider, an HTTP error from the fake server."""

    def __init__(self, kind: str, retry_after: float | None) -> None:
        super().__init__(kind)
        self.kind = kind
        self.retry_after = retry_after


_lock = threading.Lock()
_parsed: dict[str, Script] = {}
_attempts: dict[tuple[str, str], int] = {}
_stats: dict[str, dict[str, int]] = {}


def script_identity(path: str | Path) -> str:
    """sha256 of the script's bytes (part of the cache key)."""
    return hashlib.sha256(_read(Path(path))).hexdigest()


def load_script(path: str | Path) -> Script:
    """Parse a script; ModelNotFound if it is missing, SpecError if it is malformed."""
    path = Path(path)
    data = _read(path)
    identity = hashlib.sha256(data).hexdigest()
    cached = _parsed.get(identity + str(path))
    if cached is not None:
        return cached
    script = _parse(path, data, identity)
    _parsed[identity + str(path)] = script
    return script


def respond(script: Script, messages: list[dict]) -> str:
    """The scripted reply to `messages`; raises ScriptedError for a scripted failure."""
    for rule in script.rules:
        found = rule.pattern.search(_text(messages, rule.where))
        if found is None:
            continue
        if rule.error is not None and not _recovered(script, rule, messages):
            if rule.error == "empty":
                return ""
            raise ScriptedError(rule.error, rule.retry_after)
        if rule.replies:
            return _fill(_next_reply(script, rule, messages), found, messages)
        return _fill(rule.reply or "", found, messages)
    if script.default is None:
        return _text(messages, "user")
    return script.default


def count_tokens(text: str) -> int:
    return len(text.split())


def fake_stats(path: str | Path) -> dict[str, int]:
    """Calls seen and the most calls in flight at once for one script (for tests)."""
    with _lock:
        return dict(_stats.get(str(Path(path)), {"calls": 0, "in_flight": 0, "max_in_flight": 0}))


def prompt_tokens(messages: list[dict]) -> int:
    """The prompt tokens of a request: words of every message's content."""
    return sum(count_tokens(_content(m)) for m in messages)


@contextlib.contextmanager
def counted_call(path: str | Path) -> Iterator[None]:
    """Count one call of a script as seen and in flight while it lasts (`fake_stats`)."""
    _enter(str(Path(path)))
    try:
        yield
    finally:
        _leave(str(Path(path)))


def reset_script_counters(path: str | Path) -> None:
    """Forget which messages a script's `fail_times` and `replies` rules have seen (one script only)."""
    script = str(Path(path))
    with _lock:
        for key in [k for k in _attempts if k[0] == script or k[0].startswith(script + "#replies:")]:
            del _attempts[key]


def reset_fake_state() -> None:
    with _lock:
        _attempts.clear()
        _stats.clear()
        _parsed.clear()


def _read(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except (FileNotFoundError, IsADirectoryError, NotADirectoryError):
        raise ModelNotFound(
            f"fake model script not found: {path}",
            hint="A `fake/<script>` model names a YAML script (see autodiff_cli/llm/fake.py); "
            "relative paths are resolved against the config file's directory.",
        ) from None


def _parse(path: Path, data: bytes, identity: str) -> Script:
    try:
        doc = yaml.safe_load(data) or {}
    except yaml.YAMLError as e:
        raise SpecError(f"not valid YAML: {e}", file=path) from None
    if not isinstance(doc, dict):
        raise SpecError("", file=path, expected="a mapping with `rules`", got=type(doc).__name__)
    unknown = set(doc) - {"rules", "default", "latency"}
    if unknown:
        raise SpecError(f"unknown keys {sorted(unknown)}", file=path, key="(top level)")
    rules = doc.get("rules") or []
    if not isinstance(rules, list):
        raise SpecError("", file=path, key="rules", expected="a list", got=type(rules).__name__)
    default = doc.get("default")
    return Script(
        path=str(path),
        identity=identity,
        rules=tuple(_parse_rule(path, i, r) for i, r in enumerate(rules)),
        default=None if default is None else str(default),
        latency=float(doc.get("latency") or 0.0),
    )


def _parse_rule(path: Path, index: int, raw: Any) -> Rule:
    key = f"rules[{index}]"
    if not isinstance(raw, dict):
        raise SpecError("", file=path, key=key, expected="a mapping", got=type(raw).__name__)
    unknown = set(raw) - {"match", "in", "reply", "replies", "error", "fail_times", "retry_after"}
    if unknown:
        raise SpecError(f"unknown keys {sorted(unknown)}", file=path, key=key)
    error = None if raw.get("error") is None else str(raw["error"])
    if error is None and raw.get("fail_times") is not None:
        error = "500"
    if error is not None and error not in ERROR_KINDS:
        raise SpecError("", file=path, key=f"{key}.error", expected=" | ".join(ERROR_KINDS), got=error)
    replies = raw.get("replies")
    if replies is not None and (not isinstance(replies, list) or not replies):
        raise SpecError("", file=path, key=f"{key}.replies", expected="a non-empty list of replies",
                        got=type(replies).__name__)
    if error is None and raw.get("reply") is None and not replies:
        raise SpecError("a rule needs a `reply`, `replies` or an `error`", file=path, key=key)
    where = str(raw.get("in", "user"))
    if where not in WHERE:
        raise SpecError("", file=path, key=f"{key}.in", expected=" | ".join(WHERE), got=where)
    try:
        pattern = re.compile(str(raw.get("match", "")))
    except re.error as e:
        raise SpecError(f"bad regex: {e}", file=path, key=f"{key}.match") from None
    return Rule(
        pattern=pattern,
        where=where,
        reply=None if raw.get("reply") is None else str(raw["reply"]),
        error=error,
        fail_times=None if raw.get("fail_times") is None else int(raw["fail_times"]),
        retry_after=None if raw.get("retry_after") is None else float(raw["retry_after"]),
        replies=tuple(str(r) for r in replies or ()),
    )


def _recovered(script: Script, rule: Rule, messages: list[dict]) -> bool:
    """True once a `fail_times` rule has failed often enough for these messages."""
    if rule.fail_times is None:
        return False
    key = (script.path, json.dumps(messages, sort_keys=True, ensure_ascii=False))
    with _lock:
        seen = _attempts.get(key, 0)
        _attempts[key] = seen + 1
    return seen >= rule.fail_times


def _next_reply(script: Script, rule: Rule, messages: list[dict]) -> str:
    key = (script.path + "#replies:" + rule.pattern.pattern, json.dumps(messages, sort_keys=True, ensure_ascii=False))
    with _lock:
        seen = _attempts.get(key, 0)
        _attempts[key] = seen + 1
    return rule.replies[min(seen, len(rule.replies) - 1)]


def _fill(reply: str, found: re.Match, messages: list[dict]) -> str:
    def value(m: re.Match) -> str:
        name = m.group(1)
        if name in ("user", "system"):
            return _text(messages, name)
        index = int(name)
        return (found.group(index) or "") if index <= (found.re.groups or 0) else m.group(0)

    return PLACEHOLDER.sub(value, reply)


def _text(messages: list[dict], where: str) -> str:
    if where == "all":
        return "\n".join(_content(m) for m in messages)
    for message in reversed(messages):
        if message.get("role") == where:
            return _content(message)
    return ""


def _content(message: dict) -> str:
    content = message.get("content")
    if isinstance(content, list):  # OpenAI content parts
        return "\n".join(part.get("text", "") for part in content if isinstance(part, dict))
    return "" if content is None else str(content)


def _enter(path: str) -> None:
    with _lock:
        stats = _stats.setdefault(path, {"calls": 0, "in_flight": 0, "max_in_flight": 0})
        stats["calls"] += 1
        stats["in_flight"] += 1
        stats["max_in_flight"] = max(stats["max_in_flight"], stats["in_flight"])


def _leave(path: str) -> None:
    with _lock:
        _stats[path]["in_flight"] -= 1
