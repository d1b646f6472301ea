r"""The scripted fake model `fake/<path to a script file>`, served through litellm like any provider.

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

Errors are raised as litellm's own exception classes, so the client's retry logic sees exactly
what a real provider would raise; `empty` replies ''. Only `{0}`-style, `{user}` and `{system}`
placeholders are replaced, so replies may contain JSON braces. Token usage is a deterministic
count of whitespace-separated words. `fail_times` and `replies` counters are per (script,
messages) and per process (a cached reply never reaches the script, so it does not count).
"""
from __future__ import annotations

import asyncio
import hashlib
import json
import re
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

import yaml

from autodiff_cli.errors import ModelNotFound, SpecError
from autodiff_cli.llm.providers import request_sent

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
    """A scripted failure, turned into a litellm exception by the handler."""

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


def reset_fake_state() -> None:
    with _lock:
        _attempts.clear()
        _stats.clear()
        _parsed.clear()


def make_handler(litellm: ModuleType):
    """The litellm CustomLLM for the `fake` provider (built here so this module never imports litellm)."""

    class FakeHandler(litellm.CustomLLM):
        def completion(self, model, messages, model_response, **kwargs):
            request_sent(getattr(kwargs.get("logging_obj"), "litellm_call_id", None))  # the "provider" has it now
            script = _script_for(litellm, model)
            time.sleep(script.latency)
            return _answer(litellm, script, model, messages, model_response)

        async def acompletion(self, model, messages, api_base, custom_prompt_dict, model_response, print_verbose,
                              encoding, api_key, logging_obj, optional_params, **kwargs):
            request_sent(getattr(logging_obj, "litellm_call_id", None))  # the "provider" has it now
            script = _script_for(litellm, model)
            path = str(Path(model))
            _enter(path)
            try:
                if script.latency:
                    await asyncio.sleep(script.latency)
                return _answer(litellm, script, model, messages, model_response)
            finally:
                _leave(path)

    return FakeHandler()


def _script_for(litellm: ModuleType, model: str) -> Script:
    try:
        return load_script(model)
    except (ModelNotFound, SpecError) as e:
        raise litellm.NotFoundError(str(e), model=model, llm_provider="fake") from None


def _answer(litellm: ModuleType, script: Script, model: str, messages: list[dict], model_response):
    try:
        text = respond(script, messages)
    except ScriptedError as e:
        raise _litellm_error(litellm, e, model) from None
    prompt = sum(count_tokens(_content(m)) for m in messages)
    model_response.model = f"fake/{model}"
    model_response.choices[0].message.content = text
    model_response.usage = litellm.Usage(
        prompt_tokens=prompt, completion_tokens=count_tokens(text), total_tokens=prompt + count_tokens(text)
    )
    return model_response


def _litellm_error(litellm: ModuleType, e: ScriptedError, model: str) -> Exception:
    import httpx  # a litellm dependency

    common = {"model": model, "llm_provider": "fake"}
    message = f"scripted {e.kind} error"
    if e.kind == "429":
        headers = {"retry-after": str(e.retry_after)} if e.retry_after is not None else {}
        return litellm.RateLimitError(message, response=httpx.Response(429, headers=headers), **common)
    if e.kind == "500":
        return litellm.InternalServerError(message, **common)
    if e.kind == "503":
        return litellm.ServiceUnavailableError(message, **common)
    if e.kind == "400":
        return litellm.BadRequestError(message, **common)
    if e.kind == "timeout":
        return litellm.Timeout(message, **common)
    if e.kind == "connection":
        return litellm.APIConnectionError(message, **common)
    if e.kind == "context_length":
        return litellm.ContextWindowExceededError(message, **common)
    return litellm.AuthenticationError(message, **common)


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
