r"""A latency-injecting OpenAI-compatible HTTP server for benchmarks and tests (127.0.0.1 only).

It answers `POST /v1/chat/completions` (non-streaming) from a fake-model script (the format of
`autodiff_cli/llm/fake.py`: rules, `replies`, `fail_times`, scripted errors), so litellm reaches
it over real HTTP with a model config such as

    models:
      task: {model: openai/fake, api_base: "http://127.0.0.1:PORT/v1", api_key_env: FAKE_KEY}

(any value in FAKE_KEY). In process:

    async with FakeServer("script.yaml", latency=0.5, jitter=0.05, seed=0) as srv:
        srv.url        # http://127.0.0.1:PORT  (port 0 = any free port)
        srv.stats()    # the counters below

or, for code that runs its own event loop (e.g. `autodiff train` in process):

    with FakeServer("script.yaml", latency=0.5).in_thread() as srv: ...

As a command (prints the URL on its first stdout line, serves until SIGINT/SIGTERM):

    python -m tests.support.fake_server --script S --latency 0.5 [--jitter 0.05] [--seed 0] \
        [--port 0] [--fault '{"kind": "500", "rate": 0.05}']...

Latency: every chat request waits `latency` (the script's own `latency` when not given) plus a
uniform jitter in [-jitter, +jitter] (never below 0) before its answer, errors included. The
jitter is a function of (seed, request body, how many times that body was seen), so a run gets
the same delays whatever order requests arrive in.

Scripted errors become HTTP: 429 (with `Retry-After: <retry_after>` when the rule sets it),
500, 503, 400, auth = 401, context_length = 400 with code `context_length_exceeded`,
`empty` = a 200 reply with empty content, `timeout` = no answer at all (the request is held
until the client gives up and closes the connection, or the server stops), `connection` = the
connection is reset (TCP RST). Server-level faults (`faults=[...]`, `--fault JSON`) are checked
before the script and add kinds a script cannot express: `empty_body` (a 200 with a 0-byte
body), `truncated` (a 200 whose JSON body is cut in half), `malformed` (a well-formed 200 whose
content is a JSON object cut off mid-string, as a reply stopped by max_tokens: not the JSON an
optimizer or backward meta-prompt asks for). A fault is a mapping: `kind` (the script's kinds,
`reset` = `connection`, `empty_body`, `truncated`, `malformed`), optional `match`
(regex, searched in the last user message or, with `in: system|all`, elsewhere), and either
`times` (the first N requests with the same messages fail, then the script answers), `rate`
(each request fails with this probability, seeded as the jitter) or neither (always);
`retry_after` for a 429.

Usage is exact and the fake provider's: prompt tokens = whitespace-separated words of all
message contents, completion tokens = words of the reply. `GET /stats` returns the counters:
`requests` (chat requests received), `replies` (200 answers with content), `errors` by kind,
`faults` (server-level faults fired, by kind; `malformed` is only counted here: it is a reply),
`in_flight`, `max_in_flight` (chat requests between their arrival and their answer), `prompt_tokens`,
`completion_tokens`, `connections` (TCP connections accepted); `POST /reset` zeroes them (and the
script's `fail_times` / `replies` counters).

Built on aiohttp's web server (a litellm dependency). Subclasses extend it through `_routes` (more
endpoints), `_chat` (one chat request: `_decide` the answer, wait, `_response`) and `_decide`.
"""
from __future__ import annotations

import argparse
import asyncio
import contextlib
import hashlib
import json
import re
import signal
import socket
import struct
import sys
import threading
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from aiohttp import web

from autodiff_cli.llm import fake

HOST = "127.0.0.1"
FAULT_KINDS = ("429", "500", "503", "400", "auth", "context_length", "timeout", "connection", "reset", "empty",
               "empty_body", "truncated", "malformed")
# the content of a `malformed` reply: a proposal cut off inside its JSON string
MALFORMED_TEXT = '{"reasoning": "The feedback asks for a change.", "method": "rephrase", "new_value": "Count the'
CHAT_PATHS = ("/v1/chat/completions", "/chat/completions")
MAX_BODY_BYTES = 64 * 1024**2  # aiohttp's default (1 MiB) would refuse a long prompt with a 413
# how long stopping the server waits for requests still being answered before it cancels them
SHUTDOWN_GRACE = 0.25


@dataclass(frozen=True)
class Fault:
    """A server-level fault (checked before the script)."""

    kind: str
    pattern: re.Pattern | None = None
    where: str = "user"
    times: int | None = None
    rate: float | None = None
    retry_after: float | None = None

    @classmethod
    def parse(cls, raw: Fault | Mapping[str, Any]) -> Fault:
        if isinstance(raw, Fault):
            return raw
        unknown = set(raw) - {"kind", "match", "in", "times", "rate", "retry_after"}
        if unknown:
            raise ValueError(f"fault: unknown keys {sorted(unknown)}")
        kind = str(raw.get("kind", ""))
        if kind not in FAULT_KINDS:
            raise ValueError(f"fault kind: expected one of {', '.join(FAULT_KINDS)}, got {kind!r}")
        where = str(raw.get("in", "user"))
        if where not in fake.WHERE:
            raise ValueError(f"fault `in`: expected one of {', '.join(fake.WHERE)}, got {where!r}")
        if raw.get("times") is not None and raw.get("rate") is not None:
            raise ValueError("fault: give `times` or `rate`, not both")
        rate = None if raw.get("rate") is None else float(raw["rate"])
        if rate is not None and not 0.0 <= rate <= 1.0:
            raise ValueError(f"fault rate: expected a probability in [0, 1], got {rate}")
        return cls(
            kind="connection" if kind == "reset" else kind,
            pattern=None if raw.get("match") is None else re.compile(str(raw["match"])),
            where=where,
            times=None if raw.get("times") is None else int(raw["times"]),
            rate=rate,
            retry_after=None if raw.get("retry_after") is None else float(raw["retry_after"]),
        )


class _Answer:
    """What to do with one chat request: send (`status`, `payload`, `headers`), or one of the actions
    `hang`, `reset`, `empty_body`, `truncated`; `kind` is the error counted for it."""

    __slots__ = ("action", "headers", "kind", "payload", "status")

    def __init__(self, status: int = 200, payload: Any = None, headers: dict | None = None,
                 action: str = "send", kind: str | None = None) -> None:
        self.status, self.payload, self.headers, self.action, self.kind = status, payload, headers or {}, action, kind


class FakeServer:
    """The server; see the module docstring."""

    def __init__(self, script: str | Path, *, latency: float | None = None, jitter: float = 0.0, seed: int = 0,
                 port: int = 0, faults: Sequence[Fault | Mapping[str, Any]] = (),
                 hang_seconds: float = 3600.0) -> None:
        self.script_path = Path(script).resolve()
        self.script = fake.load_script(self.script_path)  # ModelNotFound / SpecError as the provider
        self.latency = self.script.latency if latency is None else float(latency)
        if self.latency < 0 or jitter < 0:
            raise ValueError("latency and jitter must be >= 0")
        self.jitter = float(jitter)
        self.seed = seed
        self.port = port
        self.faults = tuple(Fault.parse(f) for f in faults)
        self.hang_seconds = hang_seconds
        self._runner: web.AppRunner | None = None
        self._listener: asyncio.base_events.Server | None = None
        self._closing: asyncio.Event | None = None
        self._lock = threading.Lock()  # stats may be read from another thread
        self._seen: dict[str, int] = {}  # request body digest -> times seen (jitter, rate)
        self._fault_counts: dict[tuple[int, str], int] = {}
        self._ids = 0
        self._reset_counters()

    # ---------------------------------------------------------------- lifecycle

    @property
    def url(self) -> str:
        return f"http://{HOST}:{self.port}"

    @property
    def api_base(self) -> str:
        return self.url + "/v1"

    @property
    def address(self) -> tuple[str, int]:
        """(host, port) of the listening socket."""
        return self._listener.sockets[0].getsockname()[:2]

    async def start(self) -> FakeServer:
        self._closing = asyncio.Event()
        app = web.Application(client_max_size=MAX_BODY_BYTES)
        app.add_routes(self._routes())
        # handler_cancellation: a client that closes its connection cancels its request's handler (a held
        # `timeout` request ends then, and `in_flight` counts only requests someone still waits for)
        self._runner = web.AppRunner(app, handle_signals=False, access_log=None, handler_cancellation=True,
                                     shutdown_timeout=SHUTDOWN_GRACE)
        await self._runner.setup()
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((HOST, self.port))
        # the listening socket is ours, not an aiohttp site's, so that accepted connections are counted;
        # aiohttp's Server is the protocol factory, as a site would pass it
        self._listener = await asyncio.get_running_loop().create_server(self._accept, sock=sock, backlog=1024)
        self.port = sock.getsockname()[1]
        return self

    def _accept(self) -> asyncio.Protocol:
        self._count(connections=1)
        return self._runner.server()

    async def close(self) -> None:
        if self._listener is None:
            return
        self._closing.set()  # held requests end
        self._listener.close()
        await self._runner.cleanup()  # closes idle connections, cancels requests still answering after the grace
        with contextlib.suppress(Exception):
            await asyncio.wait_for(self._listener.wait_closed(), 1.0)
        self._listener = None

    async def __aenter__(self) -> FakeServer:
        return await self.start()

    async def __aexit__(self, *exc) -> None:
        await self.close()

    async def serve_forever(self) -> None:
        await self._closing.wait()

    @contextlib.contextmanager
    def in_thread(self) -> Iterator[FakeServer]:
        """Run the server on its own event loop in a daemon thread (for callers with their own loop)."""
        loop = asyncio.new_event_loop()
        started = threading.Event()
        failure: list[BaseException] = []

        def run() -> None:
            asyncio.set_event_loop(loop)
            try:
                loop.run_until_complete(self.start())
            except BaseException as e:  # noqa: BLE001 - reported to the caller
                failure.append(e)
                started.set()
                return
            started.set()
            loop.run_until_complete(self.serve_forever())
            loop.run_until_complete(self.close())

        thread = threading.Thread(target=run, name="fake-server", daemon=True)
        thread.start()
        started.wait()
        if failure:
            loop.close()
            raise failure[0]
        try:
            yield self
        finally:
            loop.call_soon_threadsafe(self._closing.set)
            thread.join(timeout=10)
            loop.close()

    # ---------------------------------------------------------------- counters

    def _reset_counters(self) -> None:
        with self._lock:
            self._stats = {"requests": 0, "replies": 0, "errors": {}, "faults": {}, "in_flight": 0, "max_in_flight": 0,
                           "prompt_tokens": 0, "completion_tokens": 0, "connections": 0}

    def stats(self) -> dict[str, Any]:
        with self._lock:
            out = dict(self._stats)
            out["errors"] = dict(self._stats["errors"])
            out["faults"] = dict(self._stats["faults"])
        return out

    def reset(self) -> None:
        """Zero the counters and the fault/script counters (fail_times, replies)."""
        in_flight = self.stats()["in_flight"]
        self._reset_counters()
        with self._lock:
            self._stats["in_flight"] = in_flight  # requests being answered still leave
            self._seen.clear()
            self._fault_counts.clear()
        fake.reset_script_counters(self.script.path)

    def _count(self, **deltas: int) -> None:
        with self._lock:
            for k, v in deltas.items():
                self._stats[k] += v

    def _count_error(self, kind: str) -> None:
        with self._lock:
            self._stats["errors"][kind] = self._stats["errors"].get(kind, 0) + 1

    def _enter(self) -> None:
        with self._lock:
            s = self._stats
            s["requests"] += 1
            s["in_flight"] += 1
            s["max_in_flight"] = max(s["max_in_flight"], s["in_flight"])

    def _leave(self) -> None:
        with self._lock:
            self._stats["in_flight"] -= 1

    # ---------------------------------------------------------------- HTTP

    def _routes(self) -> list[web.AbstractRouteDef]:
        """The endpoints (a subclass adds its own to these)."""
        routes = []
        for path in CHAT_PATHS:
            routes += [web.post(path, self._chat), web.route("*", path, self._method_not_allowed)]
        routes += [web.get("/stats", self._get_stats), web.post("/reset", self._post_reset)]
        routes += [web.get(path, self._health) for path in ("/health", "/v1/health")]
        routes += [web.get(path, self._models) for path in ("/v1/models", "/models")]
        return routes + [web.route("*", "/{tail:.*}", self._not_found)]

    async def _get_stats(self, request: web.Request) -> web.Response:
        return _json_response(200, self.stats())

    async def _post_reset(self, request: web.Request) -> web.Response:
        self.reset()
        return _json_response(200, {"ok": True})

    async def _health(self, request: web.Request) -> web.Response:
        return _json_response(200, {"ok": True})

    async def _models(self, request: web.Request) -> web.Response:
        return _json_response(200, {"object": "list", "data": [{"id": "fake", "object": "model", "owned_by": "autodiff"}]})

    async def _method_not_allowed(self, request: web.Request) -> web.Response:
        return _json_response(405, _error_obj("use POST", "invalid_request_error"))

    async def _not_found(self, request: web.Request) -> web.Response:
        return _json_response(404, _error_obj(f"no route {request.method} {request.path}", "not_found_error"))

    async def _chat(self, request: web.Request) -> web.StreamResponse:
        """One chat request: decided on arrival (counters, faults, script), answered after its delay."""
        body = await request.read()
        self._enter()
        try:
            answer, delay = self._decide(body)
            if answer.action == "hang":
                self._count_error("timeout")
                await self._hang()
                return _drop(request)
            if delay > 0:
                await asyncio.sleep(delay)
            if answer.kind is not None:
                self._count_error(answer.kind)
            if answer.action == "reset":
                return _drop(request, reset=True)
            return self._response(answer)
        finally:
            self._leave()

    async def _hang(self) -> None:
        """Hold a request until the server stops or hang_seconds pass; the client giving up (closing its
        connection) cancels the handler before that."""
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._closing.wait(), self.hang_seconds)

    @staticmethod
    def _response(answer: _Answer) -> web.Response:
        if answer.action == "empty_body":
            body = b""
        else:
            body = json.dumps(answer.payload, ensure_ascii=False).encode("utf-8")
            if answer.action == "truncated":
                body = body[: len(body) // 2]  # a complete HTTP response whose JSON stops halfway
        return web.Response(status=answer.status, body=body, headers=answer.headers, content_type="application/json")

    # ---------------------------------------------------------------- replies

    def _arrive(self, body: bytes) -> tuple[str, int, float]:
        """A request body's digest, how many times it was seen before, and its (seeded) delay."""
        digest = hashlib.sha256(body).hexdigest()
        with self._lock:
            nth = self._seen.get(digest, 0)
            self._seen[digest] = nth + 1
        delay = self.latency
        if self.jitter:
            delay = max(0.0, delay + (2 * _unit(self.seed, "jitter", digest, nth) - 1) * self.jitter)
        return digest, nth, delay

    def _decide(self, body: bytes) -> tuple[_Answer, float]:
        """The answer to a chat request body and the delay before it."""
        digest, nth, delay = self._arrive(body)
        try:
            data = json.loads(body or b"{}")
            messages = data["messages"]
            if not isinstance(messages, list):
                raise TypeError
        except (ValueError, KeyError, TypeError):
            return _Answer(400, _error_obj("expected a JSON body with `messages`", "invalid_request_error"),
                           kind="400"), 0.0
        if data.get("stream"):
            return _Answer(400, _error_obj("streaming is not supported by the fake server", "invalid_request_error"),
                           kind="400"), 0.0
        model = str(data.get("model") or "fake")
        text = None
        for index, f in enumerate(self.faults):
            if self._fault_fires(index, f, messages, digest, nth):
                with self._lock:
                    self._stats["faults"][f.kind] = self._stats["faults"].get(f.kind, 0) + 1
                if f.kind == "malformed":
                    text = MALFORMED_TEXT  # a reply like any other (usage counted), just not the JSON asked for
                    break
                if f.kind != "empty":
                    return self._error_answer(f.kind, f.retry_after), delay
                text = ""  # a well-formed reply with no text, usage counted as for any reply
                break
        if text is None:
            try:
                text = fake.respond(self.script, messages)  # a scripted `empty` returns ''
            except fake.ScriptedError as e:
                return self._error_answer(e.kind, e.retry_after), delay
        prompt = fake.prompt_tokens(messages)
        completion = fake.count_tokens(text)
        with self._lock:
            self._ids += 1
            ident = self._ids
            if text.strip():
                self._stats["replies"] += 1
            self._stats["prompt_tokens"] += prompt
            self._stats["completion_tokens"] += completion
        payload = {
            "id": f"chatcmpl-fake-{ident}",
            "object": "chat.completion",
            "created": int(time.time()),
            "model": model,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": "stop",
                         "logprobs": None}],
            "usage": {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion},
        }
        return _Answer(200, payload, kind=None if text.strip() else "empty"), delay

    def _fault_fires(self, index: int, f: Fault, messages: list, digest: str, nth: int) -> bool:
        if f.pattern is not None and f.pattern.search(fake._text(messages, f.where)) is None:
            return False
        if f.rate is not None:
            return _unit(self.seed, f"fault{index}", digest, nth) < f.rate
        if f.times is not None:
            key = (index, json.dumps(messages, sort_keys=True, ensure_ascii=False))
            with self._lock:
                seen = self._fault_counts.get(key, 0)
                self._fault_counts[key] = seen + 1
            return seen < f.times
        return True

    @staticmethod
    def _error_answer(kind: str, retry_after: float | None) -> _Answer:
        if kind == "timeout":
            return _Answer(action="hang", kind="timeout")
        if kind == "connection":
            return _Answer(action="reset", kind="connection")
        if kind in ("empty_body", "truncated"):
            payload = {"id": "chatcmpl-fake-truncated", "object": "chat.completion", "model": "fake",
                       "choices": [{"index": 0, "message": {"role": "assistant", "content": "cut here"},
                                    "finish_reason": "stop"}]}
            return _Answer(200, payload, action=kind, kind=kind)
        if kind == "429":
            headers = {} if retry_after is None else {"Retry-After": _fmt_seconds(retry_after)}
            return _Answer(429, _error_obj("scripted 429: rate limit reached", "rate_limit_exceeded", "rate_limit_exceeded"),
                           headers, kind="429")
        if kind == "auth":
            return _Answer(401, _error_obj("scripted auth error: invalid api key", "invalid_request_error",
                                           "invalid_api_key"), kind="auth")
        if kind == "context_length":
            return _Answer(400, _error_obj("This model's maximum context length is 8 tokens. However, your messages "
                                           "resulted in more tokens (scripted context_length error).",
                                           "invalid_request_error", "context_length_exceeded"), kind="context_length")
        status = int(kind)  # 400, 500, 503
        return _Answer(status, _error_obj(f"scripted {kind} error", "server_error" if status >= 500 else
                                          "invalid_request_error"), kind=kind)


def _error_obj(message: str, type_: str, code: str | None = None) -> dict:
    return {"error": {"message": message, "type": type_, "param": None, "code": code}}


def _json_response(status: int, payload: Any) -> web.Response:
    return web.Response(status=status, body=json.dumps(payload).encode(), content_type="application/json")


def _drop(request: web.Request, *, reset: bool = False) -> web.Response:
    """End the request's connection without an answer: closed, or with `reset` a TCP RST.

    aiohttp answers every request its handler returns, and has no way to reset a connection, so this
    is done on the transport underneath: SO_LINGER 0 makes the kernel send an RST on close, and
    `abort` closes at once. The response returned is never sent (aiohttp takes its failed write as
    a client that went away)."""
    transport = request.transport
    if transport is not None:
        if reset:
            sock = transport.get_extra_info("socket")
            if sock is not None:
                with contextlib.suppress(OSError):
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            transport.abort()
        else:
            transport.close()
    return web.Response(status=204)


def _fmt_seconds(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else repr(float(value))


def _unit(seed: int, what: str, digest: str, nth: int) -> float:
    """A number in [0, 1) from (seed, what, request digest, occurrence): order-independent randomness."""
    h = hashlib.blake2b(f"{seed}|{what}|{digest}|{nth}".encode(), digest_size=8).digest()
    return int.from_bytes(h, "big") / 2**64


# ---------------------------------------------------------------- command


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m tests.support.fake_server",
                                 description="An OpenAI-compatible fake model server on 127.0.0.1 (see the module docstring).")
    ap.add_argument("--script", required=True, type=Path, help="a fake-model script (autodiff_cli/llm/fake.py format)")
    ap.add_argument("--latency", type=float, default=None, help="seconds per request (default: the script's `latency`)")
    ap.add_argument("--jitter", type=float, default=0.0, help="uniform jitter in seconds, +-")
    ap.add_argument("--seed", type=int, default=0, help="seed of the jitter and of `rate` faults")
    ap.add_argument("--port", type=int, default=0, help="port on 127.0.0.1 (0: any free port)")
    ap.add_argument("--fault", action="append", default=[], metavar="JSON",
                    help='a server-level fault, e.g. \'{"kind": "500", "rate": 0.05}\' (repeatable)')
    args = ap.parse_args(argv)
    try:
        faults = [Fault.parse(json.loads(f)) for f in args.fault]
        server = FakeServer(args.script, latency=args.latency, jitter=args.jitter, seed=args.seed, port=args.port,
                            faults=faults)
    except Exception as e:  # noqa: BLE001 - one line for the user
        print(f"error: {e}", file=sys.stderr)
        return 2

    async def run() -> None:
        await server.start()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, server._closing.set)
        print(server.url, flush=True)
        print(f"fake server on {server.url} (script {server.script_path}, latency {server.latency:g} s, "
              f"jitter {server.jitter:g} s); Ctrl-C stops it", file=sys.stderr, flush=True)
        await server.serve_forever()
        await server.close()

    asyncio.run(run())
    return 0


if __name__ == "__main__":
    sys.exit(main())
