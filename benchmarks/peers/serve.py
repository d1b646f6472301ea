"""The model both tools call, and the counter in front of it.

`LlamaServer` starts llama-cpp-python's own OpenAI-compatible server (`python -m llama_cpp.server`, from
the peers venv) on 127.0.0.1 for one GGUF file, with the settings autodiff's `local/` provider loads the
same file with (n_ctx 8192, all cores, the GGUF's own chat template).

`CallProxy` listens on a fixed 127.0.0.1 port and forwards `POST /t/<tag>/<role>/v1/chat/completions` to
that server unchanged. Each tool is pointed at it with an `api_base` that names the run (`tag`) and the
role of the calls (`task`, `teacher`, `backward`, `optimizer`, `prompt`, `reflection`), so every call that
reaches the model is counted on the server side, per run, phase and role, with the tokens the server
reports. A run's calls are appended to its own `calls.jsonl` (read back on the next start, so a resumed run
keeps its count). Calls answered from a tool's cache never reach it.

The phase of a run (`optimize`, `val`, `test`) is set by the harness before each autodiff command and by
the DSPy job itself (`POST /control/<tag>`). In the `optimize` phase a run may have a cap on its
task-model calls (task + teacher): the call past it is refused with HTTP 400 before it reaches the model
(autodiff's own `train.budget.max_calls` stops it earlier; for DSPy, whose optimizers have no hard cap in
calls, this is the cap).

Why not a library: litellm's proxy can count spend per key, but it needs a database for that, adds a third
OpenAI-compatible layer between the tools and the model and would itself be one more litellm version in the
comparison; a forwarder that counts is ~150 lines of aiohttp, which the main venv has (litellm needs it).
"""
from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import subprocess
import threading
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

from aiohttp import ClientSession, ClientTimeout, web

from autodiff_cli.llm.local import (
    grammar_format,  # the json_schema -> llama.cpp grammar normalisation, reused
)

TASK_ROLES = ("task", "teacher")  # calls of the task prompt by the task model: the budget counts these
ROLES = ("task", "teacher", "backward", "optimizer", "prompt", "reflection")
PHASES = ("optimize", "val", "test")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def port_in_use(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) == 0


class LlamaServer:
    """`python -m llama_cpp.server` as a child process (started and stopped by its pid only)."""

    def __init__(self, python: Path, gguf: Path, alias: str, log_dir: Path, n_ctx: int = 8192,
                 threads: int | None = None, seed: int = 0) -> None:
        self.python, self.gguf, self.alias = python, gguf, alias
        self.port = free_port()
        self.n_ctx, self.threads, self.seed = n_ctx, threads or os.cpu_count() or 1, seed
        log_dir.mkdir(parents=True, exist_ok=True)
        self.log_path = log_dir / f"llama-server-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}.log"
        self.proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def command(self) -> list[str]:
        # As autodiff's `local/` provider loads the file: chat_format unset (llama-cpp-python applies the chat
        # template stored in the GGUF) and logits_all off (the server's default, on, runs the output layer for
        # every prompt token; neither tool asks for logprobs). interrupt_requests only concerns streamed replies.
        return [str(self.python), "-m", "llama_cpp.server", "--model", str(self.gguf), "--model_alias", self.alias,
                "--host", "127.0.0.1", "--port", str(self.port), "--n_ctx", str(self.n_ctx),
                "--n_threads", str(self.threads), "--n_threads_batch", str(self.threads), "--seed", str(self.seed),
                "--interrupt_requests", "False", "--logits_all", "False", "--verbose", "False"]

    def start(self, timeout: float = 600.0) -> None:
        self.log = self.log_path.open("a", encoding="utf-8")
        env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTHON", "VIRTUAL_ENV"))}
        self.proc = subprocess.Popen(self.command(), stdout=self.log, stderr=subprocess.STDOUT, env=env,
                                     start_new_session=True)  # Ctrl-C goes to the harness, which stops it
        t0 = time.time()
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"llama_cpp.server exited {self.proc.returncode}; see {self.log_path}")
            try:
                with urllib.request.urlopen(f"{self.url}/v1/models", timeout=5) as r:
                    if r.status == 200:
                        return
            except OSError:
                pass
            if time.time() - t0 > timeout:
                self.stop()
                raise RuntimeError(f"llama_cpp.server did not answer within {timeout:.0f} s; see {self.log_path}")
            time.sleep(0.5)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None


@dataclass
class RunLog:
    """One run's calls: appended to `path` (one JSON line each) and summed in memory."""

    path: Path
    phase: str = "optimize"
    task_budget: int | None = None  # cap on task-model calls in the optimize phase
    records: list[dict] = field(default_factory=list)
    inflight: int = 0  # task-model calls admitted in the optimize phase and not answered yet

    def load(self) -> None:
        if self.path.exists():
            with self.path.open(encoding="utf-8") as f:
                self.records = [json.loads(line) for line in f if line.strip()]

    def append(self, record: dict) -> None:
        self.records.append(record)
        with self.path.open("a", encoding="utf-8") as f:
            f.write(json.dumps(record, ensure_ascii=False) + "\n")

    def task_calls(self, phase: str) -> int:
        return sum(1 for r in self.records if r["phase"] == phase and r["role"] in TASK_ROLES and r["reached"])


def summarize(records: list[dict]) -> dict:
    """{phase: {role: {calls, errors, refused, prompt_tokens, completion_tokens, seconds}}}: `calls` are the
    requests that reached the model (answered or failed there); `refused` were stopped by the budget cap."""
    out: dict[str, dict[str, dict]] = {}
    for r in records:
        c = out.setdefault(r["phase"], {}).setdefault(r["role"], dict.fromkeys(
            ("calls", "errors", "refused", "client_gone", "prompt_tokens", "completion_tokens"), 0) | {"seconds": 0.0})
        if not r["reached"]:
            c["refused"] += 1
            continue
        c["calls"] += 1
        c["errors"] += r["status"] != 200
        c["client_gone"] += bool(r.get("client_gone"))
        c["prompt_tokens"] += r.get("prompt_tokens") or 0
        c["completion_tokens"] += r.get("completion_tokens") or 0
        c["seconds"] = round(c["seconds"] + r.get("seconds", 0.0), 3)
    return out


def load_calls(path: Path) -> dict:
    """summarize() of a run's calls.jsonl (empty when it has none)."""
    log = RunLog(path)
    log.load()
    return summarize(log.records)


class CallProxy:
    """The counting forwarder, on its own asyncio loop in a daemon thread of the harness."""

    def __init__(self, upstream: str, port: int) -> None:
        self.upstream = upstream
        self.port = port
        self.runs: dict[str, RunLog] = {}
        self.lock = threading.Lock()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._ready = threading.Event()
        self._error: BaseException | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def api_base(self, tag: str, role: str) -> str:
        return f"{self.url}/t/{tag}/{role}/v1"

    # ------------------------------------------------------------ the harness's side (any thread)

    def register(self, tag: str, path: Path, phase: str = "optimize", task_budget: int | None = None) -> RunLog:
        with self.lock:
            log = RunLog(path, phase, task_budget)
            log.load()
            self.runs[tag] = log
            return log

    def set_phase(self, tag: str, phase: str) -> None:
        with self.lock:
            self.runs[tag].phase = phase

    def start(self) -> None:
        self._thread = threading.Thread(target=self._serve, name="call-proxy", daemon=True)
        self._thread.start()
        self._ready.wait(60)
        if self._error is not None:
            raise RuntimeError(f"the call proxy could not listen on 127.0.0.1:{self.port}: {self._error}")

    def stop(self) -> None:
        if self._loop is not None:
            self._loop.call_soon_threadsafe(self._stop.set)
        if self._thread is not None:
            self._thread.join(30)

    # ------------------------------------------------------------ the server

    def _serve(self) -> None:
        self._loop = asyncio.new_event_loop()
        try:
            self._loop.run_until_complete(self._main())
        except BaseException as e:  # noqa: BLE001 - reported to start()
            self._error = e
            self._ready.set()

    async def _main(self) -> None:
        self._stop = asyncio.Event()
        # no timeout: a queued call to a serialised local model may wait long; the tools have their own
        self.session = ClientSession(timeout=ClientTimeout(total=None))
        app = web.Application(client_max_size=64 * 1024 * 1024)
        app.router.add_post("/t/{tag}/{role}/v1/chat/completions", self._chat)
        app.router.add_post("/t/{tag}/{role}/chat/completions", self._chat)
        app.router.add_get("/t/{tag}/{role}/v1/models", self._models)
        app.router.add_post("/control/{tag}", self._control)
        app.router.add_get("/stats/{tag}", self._stats)
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", self.port)
        await site.start()
        self._ready.set()
        await self._stop.wait()
        await runner.cleanup()
        await self.session.close()

    def _run(self, tag: str) -> RunLog | None:
        with self.lock:
            return self.runs.get(tag)

    async def _models(self, request: web.Request) -> web.Response:
        async with self.session.get(f"{self.upstream}/v1/models") as r:
            return web.Response(status=r.status, body=await r.read(), content_type="application/json")

    async def _control(self, request: web.Request) -> web.Response:
        run = self._run(request.match_info["tag"])
        if run is None:
            return _error(404, f"unknown run tag {request.match_info['tag']!r}")
        body = await request.json()
        if body.get("phase") not in PHASES:
            return _error(400, f"phase: expected one of {', '.join(PHASES)}")
        with self.lock:
            run.phase = body["phase"]
        return web.json_response({"phase": run.phase})

    async def _stats(self, request: web.Request) -> web.Response:
        run = self._run(request.match_info["tag"])
        if run is None:
            return _error(404, f"unknown run tag {request.match_info['tag']!r}")
        with self.lock:
            records = list(run.records)
        return web.json_response({"phase": run.phase, "task_budget": run.task_budget, "by_phase": summarize(records)})

    async def _chat(self, request: web.Request) -> web.Response:
        tag, role = request.match_info["tag"], request.match_info["role"]
        run = self._run(tag)
        if run is None:  # nothing reaches the model uncounted
            return _error(404, f"unknown run tag {tag!r} (the harness registers every run it starts)")
        if role not in ROLES:
            return _error(404, f"unknown role {role!r}: expected one of {', '.join(ROLES)}")
        body = await request.read()
        try:
            params = json.loads(body)
        except ValueError:
            return _error(400, "the body is not JSON")
        record = {"t": round(time.time(), 3), "role": role, "phase": run.phase, "reached": True,
                  "temperature": params.get("temperature"),
                  "max_tokens": params.get("max_tokens") or params.get("max_completion_tokens")}
        fmt = params.get("response_format")
        if isinstance(fmt, dict) and fmt.get("type") == "json_schema":
            # llama-cpp-python's server (0.3.x) accepts response_format types `text` and `json_object` (with an
            # optional `schema`) only, and answers OpenAI's `json_schema` with HTTP 500. Rewritten into its own form
            # of the same grammar-constrained JSON, as autodiff's `local/` provider does in-process; the same rule
            # for both tools' requests, and the record says so.
            params["response_format"] = grammar_format(fmt)
            body = json.dumps(params).encode()
            record["response_format"] = "json_schema -> json_object+schema"
        capped = run.phase == "optimize" and role in TASK_ROLES
        with self.lock:
            # calls in flight count too, so concurrent calls never pass the cap together
            over = capped and run.task_budget is not None and run.task_calls("optimize") + run.inflight >= run.task_budget
            if over:
                run.append({**record, "reached": False, "status": 400})
            elif capped:
                run.inflight += 1
        if over:
            return _error(400, f"benchmark budget: {run.task_budget} task-model calls reached in this run's "
                               "optimize phase")
        t0 = time.perf_counter()
        try:
            async with self.session.post(f"{self.upstream}/v1/chat/completions", data=body,
                                         headers={"Content-Type": "application/json"}) as r:
                status, data = r.status, await r.read()
        except asyncio.CancelledError:  # the proxy is shutting down: the request had left, so it is a call
            with self.lock:
                run.append({**record, "status": 499, "seconds": round(time.perf_counter() - t0, 3), "client_gone": True})
                if capped:
                    run.inflight -= 1
            raise
        except Exception as e:  # noqa: BLE001 - the server is gone: a 502, counted as an error
            status, data = 502, json.dumps({"error": {"message": f"upstream: {type(e).__name__}: {e}"}}).encode()
        record.update(status=status, seconds=round(time.perf_counter() - t0, 3),
                      client_gone=request.transport is None or request.transport.is_closing())
        try:
            usage = json.loads(data).get("usage") or {}
            record.update(prompt_tokens=usage.get("prompt_tokens", 0), completion_tokens=usage.get("completion_tokens", 0))
        except (ValueError, AttributeError):
            pass
        with self.lock:
            run.append(record)
            if capped:
                run.inflight -= 1
        return web.Response(status=status, body=data, content_type="application/json")


def _error(status: int, message: str) -> web.Response:
    return web.json_response({"error": {"message": message, "type": "invalid_request_error", "param": None,
                                        "code": None}}, status=status)
