#!/usr/bin/env python3
"""Performance benchmarks of issue 6, one command; sections of benchmarks/RESULTS.md.

    python benchmarks/perf/run.py                 # measure and print the sections
    python benchmarks/perf/run.py --write         # ... and write them into benchmarks/RESULTS.md
    python benchmarks/perf/run.py --quick         # tiny sizes: a smoke test of the machinery (CI)
    python benchmarks/perf/run.py --only concurrency --only memory
    python benchmarks/perf/run.py --only adalflow --write   # figure 2: a training step vs AdalFlow 1.1.3
    python benchmarks/perf/run.py --only adalflow --adalflow-scenario worse   # one of its two scenarios

The five measurements (each a section between `<!-- bench:NAME -->` markers, like benchmarks/run.py):

  concurrency  Validation of 200 examples through a 3-node chain (llm -> llm -> function) against the
               fake OpenAI-compatible server (tests/support/fake_server.py, its own process) at
               500 ms latency, concurrency 16, through litellm's real HTTP path: wall time against the
               lower bound max(critical path, calls x latency / concurrency) (target: within 1.25x);
               client CPU per call (process CPU / calls), and where that CPU goes (cProfile of the
               same evaluation at zero latency, grouped by package: litellm's share apart).
  overhead     A zero-latency in-process model that bypasses the model client (a stub with
               `async complete(...)`): framework time per node invocation (target < 1 ms) and a
               1,000-example evaluation of the 3-node pipeline (target < 3 s). The same 1,000 examples
               through ModelClient + litellm with the in-process fake provider, and through the HTTP
               fake server at zero latency, reported apart.
  cache        A whole small training run (`autodiff train`, all roles on the fake server with latency),
               then the same command again on the warm cache: model calls (client usage and requests
               the server saw; target 0) and wall time (target < 10% of the cold run).
  memory       Peak RSS of a 10,000-example evaluation with the zero-latency stub, in a child process
               (resource.getrusage; target < 400 MB).
  adalflow     Figure 2, a training step against AdalFlow 1.1.3: the same single-node and 3-node pipelines,
               fake server, latency, batch size, proposals, validation set and worker count, trained by
               both tools; wall time and calls per role per step (target: >= 3x less wall time, fewer
               backward calls), in two scenarios (`--adalflow-scenario tie|worse|both`, default both):
               the step's first proposal ties the validation score, or is clearly worse on it. AdalFlow
               runs in its own virtual environment (created on first use under
               benchmarks/work/adalflow-venv, `--adalflow-venv DIR` to choose); see adalflow_side.py.

Timings are only meaningful on an otherwise idle machine: each section records the load average
at its start. `--quick` sizes are for smoke tests and say so in their headings.
"""
from __future__ import annotations

import argparse
import asyncio
import contextlib
import cProfile
import gc
import importlib.util
import json
import os
import pstats
import resource
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections import defaultdict
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent.parent
KEY_ENV = "AUTODIFF_PERF_KEY"
BENCHES = ("concurrency", "overhead", "cache", "memory", "adalflow")
SECTION_NAMES = {
    "concurrency": "Performance: concurrency efficiency (issue 6)",
    "overhead": "Performance: engine overhead (issue 6)",
    "cache": "Performance: warm-cache rerun of a training run (issue 6)",
    "memory": "Performance: memory of a 10,000-example evaluation (issue 6)",
    "adalflow": "Performance: training step vs AdalFlow (issue 6)",
}


@dataclass(frozen=True)
class Sizes:
    conc_examples: int = 200
    conc_latency: float = 0.5
    conc_concurrency: int = 16
    profile_examples: int = 200
    overhead_examples: int = 1000
    litellm_examples: int = 1000
    cache_latency: float = 0.5
    cache_train: int = 32
    cache_val: int = 32
    cache_test: int = 16
    cache_steps: int = 4
    cache_concurrency: int = 8
    memory_examples: int = 10000
    af_latency: float = 0.5
    af_train: int = 24
    af_val: int = 24
    af_steps: int = 5
    af_batch: int = 4
    af_proposals: int = 2
    af_workers: int = 4


FULL = Sizes()
QUICK = Sizes(conc_examples=20, conc_latency=0.05, conc_concurrency=4, profile_examples=10, overhead_examples=50,
              litellm_examples=10, cache_latency=0.01, cache_train=8, cache_val=4, cache_test=3, cache_steps=2,
              cache_concurrency=4, memory_examples=200, af_latency=0.02, af_train=8, af_val=6, af_steps=2)

TARGETS = {"concurrency_ratio": 1.25, "per_invocation_ms": 1.0, "overhead_eval_s": 3.0, "cache_ratio": 0.10,
           "peak_rss_mb": 400.0, "adalflow_ratio": 3.0}


def log(message: str) -> None:
    stamp = datetime.now(UTC).strftime("%H:%M:%S")
    print(f"[{stamp}] perf: {message}", file=sys.stderr, flush=True)


def _bench_runner():
    """benchmarks/run.py (machine(), write_section()); loaded by path: both files are called run.py."""
    name = "autodiff_bench_runner"
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, HERE.parent / "run.py")
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
    return sys.modules[name]


def adalflow_side():
    """benchmarks/perf/adalflow_side.py (figure 2), loaded by path like benchmarks/run.py."""
    name = "autodiff_perf_adalflow_side"
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, HERE / "adalflow_side.py")
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module  # dataclasses look their module up while the file executes
        spec.loader.exec_module(module)
    return sys.modules[name]


# ---------------------------------------------------------------- pipeline, data, script

CHAIN_SCRIPT = r"""
rules:
  - match: 'Draft: There are (\d+) items'
    reply: "The draft says {1}. Answer: {1}"
  - match: 'n=(\d+)'
    reply: "There are {1} items in the question."
default: "I don't know."
"""


def chain_spec(model_block: str) -> str:
    """The 3-node chain: llm draft -> llm answer -> function parse."""
    return f"""
name: perf_chain
models:
  task: {model_block}
data:
  val: val.jsonl
params:
  draft_instruction: {{value: "Think about the question step by step and say how many items there are."}}
  answer_instruction: {{value: "Read the draft and give the final answer as `Answer: N`."}}
nodes:
  draft: {{kind: llm, system: "{{{{ draft_instruction }}}}", user: "{{{{ input.question }}}}"}}
  answer:
    kind: llm
    system: "{{{{ answer_instruction }}}}"
    user: "Question: {{{{ input.question }}}}\\nDraft: {{{{ draft }}}}"
  parse: {{kind: function, fn: last_integer, args: {{text: answer}}}}
output: parse
metric: {{fn: exact_match, args: {{pred: parse, target: input.answer}}}}
"""


def server_model(url: str, concurrency: int, timeout: float = 60.0) -> str:
    return (f'{{model: openai/fake, api_base: "{url}/v1", api_key_env: {KEY_ENV}, concurrency: {concurrency}, '
            f"timeout: {timeout}, max_retries: 2}}")


def write_chain(work: Path, n: int, model_block: str) -> Path:
    work.mkdir(parents=True, exist_ok=True)
    (work / "script.yaml").write_text(CHAIN_SCRIPT.lstrip(), encoding="utf-8")
    with (work / "val.jsonl").open("w", encoding="utf-8") as f:
        for i in range(n):
            k = 1 + i % 9
            f.write(json.dumps({"id": f"ex{i:05d}", "question": f"How many items are in the list? n={k}",
                                "answer": str(k)}) + "\n")
    spec = work / "spec.yaml"
    spec.write_text(chain_spec(model_block).lstrip(), encoding="utf-8")
    return spec


def load_chain(spec: Path):
    from autodiff_cli.data.splits import load_split
    from autodiff_cli.spec.prompts_file import initial_values
    from autodiff_cli.nodes.compiler import compile_spec
    from autodiff_cli.spec.loader import load_spec

    loaded = load_spec(spec)
    program = compile_spec(loaded)
    examples = load_split(loaded, "val", program.input_fields)
    return loaded, program, examples, initial_values(loaded.spec)


def chain_shape(program) -> tuple[int, int]:
    """(llm calls per example, llm calls on the critical path) of a loop-free program."""
    calls = depth = 0
    for generation in program.scope.generations:
        llm = [n for n in generation if program.scope.nodes[n].kind == "llm"]
        calls += len(llm)
        depth += 1 if llm else 0
    return calls, depth


class StubModel:
    """A zero-latency in-process model with the ModelClient's `complete` signature (bypasses the client)."""

    def __init__(self, script_path: Path) -> None:
        from autodiff_cli.llm import fake

        self._fake = fake
        self.script = fake.load_script(script_path)
        self.calls = 0

    async def complete(self, model_name: str, messages: list[dict], *, role: str = "task",
                       json_schema: dict | None = None, salt: Any = None):
        from autodiff_cli.llm.client import Completion

        self.calls += 1
        text = self._fake.respond(self.script, messages)
        return Completion(text, 0, 0, 0.0, 0.0, False, "stub", 1)


def model_client(loaded, environ: dict | None = None):
    from autodiff_cli.llm.client import ModelClient
    from autodiff_cli.llm.usage import Usage

    return ModelClient(loaded.spec.models, config_dir=loaded.config_dir, usage=Usage(), cache=None,
                       environ=environ if environ is not None else {KEY_ENV: "perf-any-key"})


# ---------------------------------------------------------------- the fake server, in its own process


class ServerProcess:
    def __init__(self, url: str, proc: subprocess.Popen) -> None:
        self.url, self.proc = url, proc

    def stats(self) -> dict:
        with urllib.request.urlopen(self.url + "/stats", timeout=10) as r:
            return json.loads(r.read())

    def reset(self) -> None:
        req = urllib.request.Request(self.url + "/reset", data=b"", method="POST")
        urllib.request.urlopen(req, timeout=10).read()


@contextlib.contextmanager
def fake_server(script: Path, latency: float, jitter: float = 0.0, seed: int = 0):
    cmd = [sys.executable, "-m", "tests.support.fake_server", "--script", str(script), "--latency", str(latency),
           "--jitter", str(jitter), "--seed", str(seed), "--port", "0"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    try:
        url = proc.stdout.readline().strip()
        if not url.startswith("http://127.0.0.1:"):
            raise RuntimeError(f"the fake server did not start (exit {proc.poll()})")
        yield ServerProcess(url, proc)
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


# ---------------------------------------------------------------- profile grouping

HTTP_PACKAGES = {"httpx", "httpcore", "h11", "anyio", "sniffio", "aiohttp", "aiohappyeyeballs", "yarl", "multidict",
                 "propcache", "frozenlist", "aiosignal", "certifi", "ssl", "socket", "selectors"}
GROUPS = [("autodiff_cli", "autodiff (engine, client, evaluate)"), ("litellm", "litellm"), ("openai", "openai SDK"),
          ("pydantic", "pydantic (response objects)"), ("pydantic_core", "pydantic (response objects)"),
          ("jinja2", "jinja2 (templates)"), ("markupsafe", "jinja2 (templates)"), ("asyncio", "asyncio event loop")]
LITELLM_STACK = ("litellm", "openai SDK", "HTTP client (httpx/aiohttp)", "pydantic (response objects)")


STDLIB = "Python stdlib (not charged to a caller)"
LOOP = "asyncio event loop"


def _group(filename: str) -> str | None:
    """The package group of a code file; None for the standard library (charged to its callers)."""
    parts = Path(filename).parts
    if "site-packages" in parts:
        i = parts.index("site-packages")
        top = (parts[i + 1] if i + 1 < len(parts) else "").split(".")[0]
        if top in HTTP_PACKAGES:
            return "HTTP client (httpx/aiohttp)"
        return dict(GROUPS).get(top, f"other libraries ({top})")
    if "autodiff_cli" in parts:
        return "autodiff (engine, client, evaluate)"
    if "asyncio" in parts or Path(filename).stem == "selectors":
        return LOOP
    if Path(filename).stem in ("ssl", "socket"):
        return "HTTP client (httpx/aiohttp)"
    return None


def profile_groups(profile: cProfile.Profile) -> dict[str, float]:
    """Seconds of own time per package group. Time spent in the standard library and in builtins is
    charged to the package that called it (through any chain of stdlib callers, split by the
    callers' shares), so e.g. json.loads under the openai SDK counts as the SDK's; the asyncio loop
    is its own group; waiting in epoll/select is left out (idle, not CPU)."""
    stats = pstats.Stats(profile).stats  # {func: (cc, nc, tt, ct, callers)}
    memo: dict[tuple, dict[str, float]] = {}

    def dist(func: tuple, visiting: frozenset) -> dict[str, float]:
        """Fractions of `func`'s own time per group."""
        if func in memo:
            return memo[func]
        group = _group(func[0]) if func[0] != "~" else None
        if group is not None:
            out = {group: 1.0}
        else:
            callers = stats.get(func, (0, 0, 0, 0, {}))[4]
            weights = {c: v[2] for c, v in callers.items() if c not in visiting}
            total = sum(weights.values())
            if not total:
                out = {STDLIB: 1.0}
            else:
                out = defaultdict(float)
                for caller, w in weights.items():
                    for g, f in dist(caller, visiting | {func}).items():
                        out[g] += f * w / total
                out = dict(out)
        if not visiting:  # only results computed without a cycle guard are exact enough to reuse
            memo[func] = out
        return out

    out: dict[str, float] = defaultdict(float)
    for func, (_, _, tt, _, _) in stats.items():
        if func[0] == "~" and any(w in func[2] for w in ("poll", "select")):
            continue
        for group, fraction in dist(func, frozenset()).items():
            out[group] += tt * fraction
    return dict(out)


# ---------------------------------------------------------------- (a) concurrency efficiency


def bench_concurrency(sizes: Sizes, work: Path) -> dict:
    from autodiff_cli.engine.evaluate import evaluate
    from autodiff_cli.llm.providers import load_litellm

    load_litellm()
    work = work / "concurrency"
    work.mkdir(parents=True, exist_ok=True)
    (work / "script.yaml").write_text(CHAIN_SCRIPT.lstrip(), encoding="utf-8")
    result: dict[str, Any] = {"examples": sizes.conc_examples, "latency_s": sizes.conc_latency,
                              "concurrency": sizes.conc_concurrency}
    with fake_server(work / "script.yaml", sizes.conc_latency) as srv:
        spec = write_chain(work, sizes.conc_examples, server_model(srv.url, sizes.conc_concurrency))
        loaded, program, examples, values = load_chain(spec)
        per_example, depth = chain_shape(program)
        client = model_client(loaded)

        async def main():
            # litellm's first call builds its HTTP client: not part of the measurement
            await client.complete("task", [{"role": "user", "content": "warm up"}])
            srv.reset()
            client.usage = type(client.usage)()
            gc.collect()
            t0, c0 = time.perf_counter(), time.process_time()
            report = await evaluate(program, examples, values, client)
            return report, time.perf_counter() - t0, time.process_time() - c0

        log(f"concurrency: {len(examples)} examples, latency {sizes.conc_latency} s, concurrency "
            f"{sizes.conc_concurrency}")
        report, wall, cpu = asyncio.run(main())
        stats = srv.stats()
    calls = client.usage.to_dict()["task"]["calls"]
    critical = depth * sizes.conc_latency
    throughput = calls * sizes.conc_latency / sizes.conc_concurrency
    bound = max(critical, throughput)
    result.update(
        calls=calls, expected_calls=per_example * len(examples), server_requests=stats["requests"],
        server_max_in_flight=stats["max_in_flight"], errors=report.errors, score=report.score,
        wall_s=wall, critical_path_s=critical, throughput_bound_s=throughput, bound_s=bound, ratio=wall / bound,
        cpu_s=cpu, cpu_per_call_ms=1000 * cpu / calls if calls else None,
    )
    result["profile"] = profile_http_path(sizes, work)
    return result


def profile_http_path(sizes: Sizes, work: Path) -> dict:
    """cProfile of the same evaluation at zero latency: where the client's CPU goes."""
    from autodiff_cli.engine.evaluate import evaluate

    pwork = work / "profile"
    with fake_server(work / "script.yaml", 0.0) as srv:
        spec = write_chain(pwork, sizes.profile_examples, server_model(srv.url, sizes.conc_concurrency))
        loaded, program, examples, values = load_chain(spec)
        client = model_client(loaded)
        profile = cProfile.Profile()

        async def main():
            await client.complete("task", [{"role": "user", "content": "warm up"}])
            client.usage = type(client.usage)()
            c0 = time.process_time()
            profile.enable()
            try:
                await evaluate(program, examples, values, client)
            finally:
                profile.disable()
            return time.process_time() - c0

        log(f"concurrency: profiling {len(examples)} examples at zero latency")
        cpu = asyncio.run(main())
    groups = profile_groups(profile)
    total = sum(groups.values()) or 1.0
    calls = client.usage.to_dict()["task"]["calls"]
    return {"examples": len(examples), "calls": calls, "cpu_s_profiled": cpu,
            "groups": {k: v / total for k, v in sorted(groups.items(), key=lambda kv: -kv[1])},
            "litellm_share": sum(v for k, v in groups.items() if k in LITELLM_STACK) / total}


# ---------------------------------------------------------------- (b) engine overhead


def bench_overhead(sizes: Sizes, work: Path) -> dict:
    from autodiff_cli.engine.evaluate import evaluate
    from autodiff_cli.llm.providers import load_litellm

    work = work / "overhead"
    out: dict[str, Any] = {}

    # 1. the stub: no model client, no litellm
    spec = write_chain(work / "stub", sizes.overhead_examples, "{model: fake/script.yaml, concurrency: 16}")
    loaded, program, examples, values = load_chain(spec)
    stub = StubModel(spec.parent / "script.yaml")

    async def timed(client, exs):
        gc.collect()
        t0, c0 = time.perf_counter(), time.process_time()
        report = await evaluate(program, exs, values, client)
        return report, time.perf_counter() - t0, time.process_time() - c0

    asyncio.run(timed(stub, examples[:20]))  # warm: templates compiled, code paths imported
    stub.calls = 0
    log(f"overhead: {len(examples)} examples with the zero-latency stub")
    report, wall, cpu = asyncio.run(timed(stub, examples))
    invocations = sum(len(r.trace.calls) for r in report.results)
    out["stub"] = {"examples": len(examples), "model_calls": stub.calls, "invocations": invocations,
                   "errors": report.errors, "score": report.score, "wall_s": wall, "cpu_s": cpu,
                   "per_invocation_ms": 1000 * wall / invocations, "cpu_per_invocation_ms": 1000 * cpu / invocations,
                   "per_example_ms": 1000 * wall / len(examples)}

    # 2. through ModelClient + litellm with the in-process fake provider (no HTTP, zero latency)
    load_litellm()
    spec = write_chain(work / "provider", sizes.litellm_examples, "{model: fake/script.yaml, concurrency: 16}")
    loaded, program, examples, values = load_chain(spec)
    client = model_client(loaded, environ={})

    async def through_client(client, exs):
        await client.complete("task", [{"role": "user", "content": "warm up"}])
        client.usage = type(client.usage)()
        return await timed(client, exs)

    log(f"overhead: {len(examples)} examples through litellm's fake provider")
    report, wall, cpu = asyncio.run(through_client(client, examples))
    calls = client.usage.to_dict()["task"]["calls"]
    out["litellm_fake_provider"] = {"examples": len(examples), "model_calls": calls, "errors": report.errors,
                                    "wall_s": wall, "cpu_s": cpu, "per_call_ms": 1000 * wall / calls,
                                    "cpu_per_call_ms": 1000 * cpu / calls}

    # 3. through ModelClient + litellm + HTTP to the fake server at zero latency
    (work / "http").mkdir(parents=True, exist_ok=True)
    (work / "http" / "script.yaml").write_text(CHAIN_SCRIPT.lstrip(), encoding="utf-8")
    with fake_server(work / "http" / "script.yaml", 0.0) as srv:
        spec = write_chain(work / "http", sizes.litellm_examples, server_model(srv.url, 16))
        loaded, program, examples, values = load_chain(spec)
        client = model_client(loaded)
        log(f"overhead: {len(examples)} examples through litellm + HTTP to the fake server (zero latency)")
        report, wall, cpu = asyncio.run(through_client(client, examples))
    calls = client.usage.to_dict()["task"]["calls"]
    out["litellm_http"] = {"examples": len(examples), "model_calls": calls, "errors": report.errors,
                           "wall_s": wall, "cpu_s": cpu, "per_call_ms": 1000 * wall / calls,
                           "cpu_per_call_ms": 1000 * cpu / calls}
    return out


# ---------------------------------------------------------------- (c) warm-cache rerun of a training run

TRAIN_SCRIPT = r"""
rules:
  - match: "backward engine"
    in: system
    reply: '{"diagnosis": "It did not add the counts.", "param: instruction": "The instruction never says to add the counts: it should tell the model to ALWAYS ADD them."}'
  - match: "read by a program"
    in: system
    reply: '{"reasoning": "The feedback says to add.", "method": "add_instruction", "new_value": "Count the things. ALWAYS ADD the counts."}'
  - match: 'ALWAYS ADD[\s\S]*n=([1-6])\b'
    in: all
    reply: "Adding them up gives {1}. Answer: {1}"
  - match: 'n=1\b'
    reply: "Answer: 1"
default: "Answer: 0"
"""


def train_spec(url: str, sizes: Sizes) -> str:
    model = server_model(url, sizes.cache_concurrency)
    return f"""
name: perf_cache
models:
  task: {model}
  backward: {model}
  optimizer: {model}
data:
  train: train.jsonl
  val: val.jsonl
  test: test.jsonl
params:
  instruction: {{value: "Count the things.", role: task instruction}}
  answer_format: {{value: "End with Answer: N", role: output format, trainable: false}}
nodes:
  count: {{kind: llm, system: "{{{{ instruction }}}} {{{{ answer_format }}}}", user: "{{{{ input.question }}}}"}}
  parse: {{kind: function, fn: last_integer, args: {{text: count}}}}
output: parse
metric: {{fn: exact_match, args: {{pred: parse, target: input.answer}}}}
train: {{max_steps: {sizes.cache_steps}, batch_size: 4, max_proposals: 2, max_error_samples: 2, max_correct_samples: 1, seed: 0}}
"""


def _rows(prefix: str, n: int) -> str:
    return "".join(json.dumps({"id": f"{prefix}{i:03d}", "question": f"How many things? n={1 + i % 8}",
                               "answer": str(1 + i % 8)}) + "\n" for i in range(n))


def bench_cache(sizes: Sizes, work: Path) -> dict:
    work = work / "cache"
    if work.exists():
        shutil.rmtree(work)
    work.mkdir(parents=True)
    (work / "script.yaml").write_text(TRAIN_SCRIPT.lstrip(), encoding="utf-8")
    for name, n in (("train", sizes.cache_train), ("val", sizes.cache_val), ("test", sizes.cache_test)):
        (work / f"{name}.jsonl").write_text(_rows(name, n), encoding="utf-8")
    env = {**os.environ, "AUTODIFF_CACHE": str(work / "cache"), KEY_ENV: "perf-any-key"}
    runs = []
    with fake_server(work / "script.yaml", sizes.cache_latency) as srv:
        spec = work / "spec.yaml"
        spec.write_text(train_spec(srv.url, sizes).lstrip(), encoding="utf-8")
        cmd = [sys.executable, "-m", "autodiff_cli.app.cli", "train", str(spec), "--runs-dir", str(work / "runs")]
        for label in ("cold", "warm"):
            before = srv.stats()["requests"]
            log(f"cache: {label} run: {shlex.join(['autodiff', *cmd[3:]])}")
            t0 = time.perf_counter()
            proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
            process_wall = time.perf_counter() - t0
            if proc.returncode != 0:
                raise RuntimeError(f"autodiff train exited {proc.returncode}: {proc.stderr[-2000:]}")
            run_dir = Path(proc.stdout.strip().splitlines()[-1])
            summary = json.loads((run_dir / "summary.json").read_text(encoding="utf-8"))
            usage = summary["usage"]
            runs.append({"label": label, "run_dir": str(run_dir), "status": summary["status"],
                         "process_wall_s": process_wall, "run_wall_s": summary["wall_seconds"],
                         "calls": sum(u["calls"] for u in usage.values()),
                         "cached_calls": sum(u["cached_calls"] for u in usage.values()),
                         "calls_by_role": {r: u["calls"] for r, u in usage.items()},
                         "server_requests": srv.stats()["requests"] - before,
                         "best_val": summary["best"]["val"], "steps": summary["steps"],
                         "prompts": (run_dir / "prompts.yaml").read_text(encoding="utf-8")})
    cold, warm = runs
    return {"latency_s": sizes.cache_latency, "concurrency": sizes.cache_concurrency, "cold": cold, "warm": warm,
            "run_ratio": warm["run_wall_s"] / cold["run_wall_s"] if cold["run_wall_s"] else None,
            "process_ratio": warm["process_wall_s"] / cold["process_wall_s"],
            "same_prompts": cold["prompts"] == warm["prompts"],
            "sizes": {"train": sizes.cache_train, "val": sizes.cache_val, "test": sizes.cache_test,
                      "steps": sizes.cache_steps}}


# ---------------------------------------------------------------- (d) memory


def bench_memory(sizes: Sizes, work: Path) -> dict:
    work = work / "memory"
    write_chain(work, sizes.memory_examples, "{model: fake/script.yaml, concurrency: 16}")
    log(f"memory: {sizes.memory_examples} examples with the stub, in a child process")
    proc = subprocess.run([sys.executable, str(Path(__file__).resolve()), "--memory-child", str(work)],
                          capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"the memory child exited {proc.returncode}: {proc.stderr[-2000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def memory_child(work: Path) -> None:
    """Runs in a fresh process: evaluate the spec in `work` with the stub; print peak RSS as JSON."""
    from autodiff_cli.engine.evaluate import evaluate

    def rss_mb() -> float:
        # VmHWM is the peak RSS of this process image; ru_maxrss would also count the parent's pages
        # (Linux keeps the high-water mark across fork/vfork + exec), so it is only the fallback.
        try:
            for line in Path("/proc/self/status").read_text().splitlines():
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
        except OSError:
            pass
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / (1024 if sys.platform != "darwin" else 1024**2)

    loaded, program, examples, values = load_chain(work / "spec.yaml")
    stub = StubModel(work / "script.yaml")
    before = rss_mb()
    t0 = time.perf_counter()
    report = asyncio.run(evaluate(program, examples, values, stub))
    wall = time.perf_counter() - t0
    print(json.dumps({"examples": len(examples), "model_calls": stub.calls, "completed": report.completed,
                      "traces_kept": len(report.results), "score": report.score, "wall_s": wall,
                      "rss_before_eval_mb": before, "peak_rss_mb": rss_mb()}))


# ---------------------------------------------------------------- (e) a training step vs AdalFlow (figure 2)


def af_settings(sizes: Sizes):
    side = adalflow_side()
    return side.Settings(latency=sizes.af_latency, train=sizes.af_train, val=sizes.af_val, steps=sizes.af_steps,
                         batch=sizes.af_batch, proposals=sizes.af_proposals, workers=sizes.af_workers)


AF_SCENARIOS = {"tie": ("tie",), "worse": ("worse",), "both": ("tie", "worse")}


def bench_adalflow(sizes: Sizes, work: Path, venv: Path | None = None, scenario: str = "both") -> dict:
    """Both tools on both pipelines in the chosen scenario(s) (adalflow_side.compare); creates the
    AdalFlow venv when missing."""
    side = adalflow_side()
    return side.compare(af_settings(sizes), work / "adalflow", venv=venv, log=log, scenarios=AF_SCENARIOS[scenario])


# ---------------------------------------------------------------- sections


def _ms(x: float | None) -> str:
    return "–" if x is None else (f"{x:.3f} ms" if x < 1 else f"{x:.2f} ms")


def _s(x: float | None) -> str:
    return "–" if x is None else f"{x:.2f} s"


def _verdict(ok: bool) -> str:
    return "**met**" if ok else "**not met**"


def _head(name: str, command: str, meta: dict, quick: bool) -> list[str]:
    title = name + (" — QUICK SMOKE SIZES, not the benchmark" if quick else "")
    return [f"<!-- bench:{name} -->", f"## {title}", "", "Command:", "", "```", command, "```", "",
            f"Machine: {meta['machine']}  ", f"Date: {meta['date']}  ",
            f"Load average at start (1/5/15 min): {meta['load']}  ",
            f"Versions: {meta['versions']}", ""]


def render_concurrency(r: dict, command: str, meta: dict, quick: bool) -> str:
    name = SECTION_NAMES["concurrency"]
    lines = _head(name, command, meta, quick)
    lines += [
        f"Validation of {r['examples']} examples through a 3-node chain (llm `draft` → llm `answer` → function "
        f"`parse`) against the fake OpenAI-compatible server (own process, 127.0.0.1) at {r['latency_s'] * 1000:g} ms "
        f"latency, model `concurrency: {r['concurrency']}`, through ModelClient + litellm's real HTTP path, no cache.",
        "",
        "| calls | critical path | calls × latency ÷ concurrency | lower bound | wall | wall ÷ bound | server max in flight | client CPU | CPU per call | errors |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
        f"| {r['calls']} | {_s(r['critical_path_s'])} | {_s(r['throughput_bound_s'])} | {_s(r['bound_s'])} "
        f"| {_s(r['wall_s'])} | {r['ratio']:.3f}× | {r['server_max_in_flight']} | {_s(r['cpu_s'])} "
        f"| {_ms(r['cpu_per_call_ms'])} | {r['errors']} |",
        "",
        f"Target: wall within {TARGETS['concurrency_ratio']}× of the bound: {_verdict(r['ratio'] <= TARGETS['concurrency_ratio'])}.",
        "",
    ]
    p = r["profile"]
    lines += [f"Where the client CPU goes (cProfile of the same evaluation, {p['examples']} examples = {p['calls']} "
              f"calls, at zero latency; own time per package, builtins charged to their callers, waiting in epoll "
              f"left out; profiling inflates Python-heavy code): litellm and the libraries under it (openai SDK, "
              f"HTTP client, pydantic response objects) take **{p['litellm_share']:.0%}**.", "",
              "| package | share of profiled CPU |", "|---|---:|"]
    lines += [f"| {k} | {v:.1%} |" for k, v in p["groups"].items() if v >= 0.005]
    lines.append(f"<!-- /bench:{name} -->")
    return "\n".join(lines) + "\n"


def render_overhead(r: dict, command: str, meta: dict, quick: bool) -> str:
    name = SECTION_NAMES["overhead"]
    s, lp, lh = r["stub"], r["litellm_fake_provider"], r["litellm_http"]
    lines = _head(name, command, meta, quick)
    lines += [
        "The 3-node chain (llm → llm → function) evaluated with a zero-latency in-process model that bypasses "
        "the model client (a stub whose `async complete` answers from the fake script: one regex per call, "
        "included in the times).",
        "",
        "| path | examples | node invocations | model calls | wall | per node invocation | CPU per invocation | per model call | errors |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
        f"| stub (no model client) | {s['examples']} | {s['invocations']} | {s['model_calls']} | {_s(s['wall_s'])} "
        f"| {_ms(s['per_invocation_ms'])} | {_ms(s['cpu_per_invocation_ms'])} | – | {s['errors']} |",
        f"| ModelClient + litellm, in-process fake provider | {lp['examples']} | – | {lp['model_calls']} "
        f"| {_s(lp['wall_s'])} | – | – | {_ms(lp['per_call_ms'])} (CPU {_ms(lp['cpu_per_call_ms'])}) | {lp['errors']} |",
        f"| ModelClient + litellm + HTTP, fake server at 0 ms | {lh['examples']} | – | {lh['model_calls']} "
        f"| {_s(lh['wall_s'])} | – | – | {_ms(lh['per_call_ms'])} (CPU {_ms(lh['cpu_per_call_ms'])}) | {lh['errors']} |",
        "",
        f"Targets: framework time per node invocation < {TARGETS['per_invocation_ms']:g} ms: "
        f"{_verdict(s['per_invocation_ms'] < TARGETS['per_invocation_ms'])}; "
        f"{s['examples']:,}-example evaluation < {TARGETS['overhead_eval_s']:g} s: "
        f"{_verdict(s['wall_s'] < TARGETS['overhead_eval_s'])}."
        + (" (Quick sizes: the 3 s target is for 1,000 examples.)" if quick else ""),
        "",
        "The litellm rows are reported apart: they are the cost of the model client and litellm per call, "
        "not of the engine.",
        f"<!-- /bench:{name} -->",
    ]
    return "\n".join(lines) + "\n"


def render_cache(r: dict, command: str, meta: dict, quick: bool) -> str:
    name = SECTION_NAMES["cache"]
    c, w = r["cold"], r["warm"]
    roles = lambda run: ", ".join(f"{k} {v}" for k, v in run["calls_by_role"].items() if v) or "0"
    sz = r["sizes"]
    lines = _head(name, command, meta, quick)
    lines += [
        f"`autodiff train` of a count-then-parse pipeline (train {sz['train']}, val {sz['val']}, test {sz['test']} "
        f"examples, {sz['steps']} steps, batch 4, 2 proposals) with task, backward and optimizer all on the fake "
        f"server at {r['latency_s'] * 1000:g} ms latency (`concurrency: {r['concurrency']}`), run twice on one "
        "fresh `AUTODIFF_CACHE` (a separate process each time).",
        "",
        "| run | status | model calls (client) | requests the server saw | cached calls | training wall (summary.json) | whole process |",
        "|---|---|---:|---:|---:|---:|---:|",
        f"| cold | {c['status']} | {c['calls']} ({roles(c)}) | {c['server_requests']} | {c['cached_calls']} "
        f"| {_s(c['run_wall_s'])} | {_s(c['process_wall_s'])} |",
        f"| warm | {w['status']} | {w['calls']} | {w['server_requests']} | {w['cached_calls']} "
        f"| {_s(w['run_wall_s'])} | {_s(w['process_wall_s'])} |",
        "",
        f"Warm ÷ cold: training wall {r['run_ratio']:.1%}, whole process {r['process_ratio']:.1%} "
        f"(the process figure includes interpreter start-up and imports). Same best prompts: "
        f"{'yes' if r['same_prompts'] else 'NO'}.",
        "",
        f"Targets: 0 model calls: {_verdict(w['calls'] == 0 and w['server_requests'] == 0)}; under "
        f"{TARGETS['cache_ratio']:.0%} of the cold wall time: training wall {_verdict(r['run_ratio'] < TARGETS['cache_ratio'])}, "
        f"whole process {_verdict(r['process_ratio'] < TARGETS['cache_ratio'])}.",
        f"<!-- /bench:{name} -->",
    ]
    return "\n".join(lines) + "\n"


def render_memory(r: dict, command: str, meta: dict, quick: bool) -> str:
    name = SECTION_NAMES["memory"]
    lines = _head(name, command, meta, quick)
    lines += [
        f"`evaluate` of {r['examples']:,} examples through the 3-node chain with the zero-latency stub model, in a "
        "fresh child process; peak RSS = the child's `VmHWM` (/proc/self/status; `resource.getrusage` ru_maxrss "
        "would include the parent's pages, which Linux carries across fork + exec). Every trace is kept in the report, "
        "as `autodiff eval` keeps them.",
        "",
        "| examples | model calls | traces kept | RSS before the evaluation (imports + data) | peak RSS | evaluation wall |",
        "|---:|---:|---:|---:|---:|---:|",
        f"| {r['examples']:,} | {r['model_calls']:,} | {r['traces_kept']:,} | {r['rss_before_eval_mb']:.0f} MB "
        f"| {r['peak_rss_mb']:.0f} MB | {_s(r['wall_s'])} |",
        "",
        f"Target: peak RSS < {TARGETS['peak_rss_mb']:g} MB: {_verdict(r['peak_rss_mb'] < TARGETS['peak_rss_mb'])}."
        + (" (Quick sizes: the target is for 10,000 examples.)" if quick else ""),
        f"<!-- /bench:{name} -->",
    ]
    return "\n".join(lines) + "\n"


def _af_scenario_facts(side, s: dict, scenario: str) -> dict:
    """What the validation file of a scenario makes of the initial prompts and of proposal 1 (rev 1),
    and where each tool's early stop can fire in file order (1-based example numbers)."""
    rows = side.val_examples(s["val"], s["seed"], scenario)
    n = len(rows)
    best = sum(side.answers_right(0, r["category"]) for r in rows) / n
    rev1 = sum(side.answers_right(1, r["category"]) for r in rows) / n
    broken = [i + 1 for i, r in enumerate(rows) if not side.answers_right(1, r["category"])]
    # autodiff stops once (score so far + examples left) / n <= best, i.e. after n(1 - best) wrong answers;
    # AdalFlow's pred_step once that bound is < best, i.e. after one more wrong answer
    need = round(n * (1 - best))
    ours = broken[need - 1] if 0 < need <= len(broken) else None
    theirs = broken[need] if need < len(broken) else None
    return {"n": n, "best": best, "rev1": rev1, "broken": broken,
            "categories": " → ".join(side.SCENARIOS[scenario]["val_categories"]), "autodiff_stop_at": ours,
            "adalflow_stop_at": theirs}


def render_adalflow(r: dict, command: str, meta: dict, quick: bool) -> str:
    name = SECTION_NAMES["adalflow"]
    side = adalflow_side()
    s = r["settings"]
    v = r.get("adalflow_versions") or {}
    meta = dict(meta, versions=meta["versions"] + f"; autodiff {r.get('autodiff_source', 'unknown')}; AdalFlow venv: "
                f"adalflow {v.get('adalflow')}, openai {v.get('openai')}, httpx {v.get('httpx')}, tiktoken "
                f"{v.get('tiktoken')}, Python {v.get('python')}")
    lines = _head(name, command, meta, quick)
    target = TARGETS["adalflow_ratio"]
    runs = r["runs"]
    scenarios = list(runs)
    facts = {sc: _af_scenario_facts(side, s, sc) for sc in scenarios}
    lines += [
        "Both tools trained the same two pipelines against one fake OpenAI-compatible server "
        "(`tests/support/fake_server.py`, subclassed in `benchmarks/perf/adalflow_side.py` to answer the "
        "Responses API that AdalFlow 1.1.3's stock `OpenAIClient` speaks, and with this benchmark's fake model), "
        f"at {s['latency'] * 1000:g} ms per request, no jitter: **single** = one LLM node with a trainable "
        "instruction, a last-integer parser, exact match; **chain** = three LLM nodes (`listing` → `tally` → "
        "`answer`), each with its own trainable instruction, then the parser and exact match. autodiff ran "
        "`autodiff train` (a subprocess); AdalFlow ran `Trainer.fit` (`benchmarks/perf/adalflow_step.py`, in its "
        "own venv, nothing patched), one after the other on the same server, in "
        + (f"two scenarios (`{'`, `'.join(scenarios)}`, below)" if len(scenarios) > 1 else f"the `{scenarios[0]}` scenario (below)")
        + ".",
        "",
        "| setting | autodiff | AdalFlow 1.1.3 |",
        "|---|---|---|",
        f"| steps | `train.max_steps: {s['steps']}` | `max_steps={s['steps']}` |",
        f"| batch size | `train.batch_size: {s['batch']}` | `train_batch_size={s['batch']}` |",
        f"| proposals per step | `train.max_proposals: {s['proposals']}` | `max_proposals_per_step={s['proposals']}` |",
        f"| subset: failed / correct examples | `max_error_samples: {s['max_error']}`, `max_correct_samples: "
        f"{s['max_correct']}` | `max_error_samples={s['max_error']}`, `max_correct_samples={s['max_correct']}` |",
        f"| workers | `concurrency: {s['workers']}` on each model config | `num_workers={s['workers']}` |",
        f"| data | train {s['train']}, validation {s['val']} examples (the same files) | the same |",
        "| method | mode `autodiff` (moving batch, two-stage validation) | strategy `constrained` (the same scheme) |",
        "| loss feedback | template (the default with exact match: no model call) | `EvalFnToTextLoss` (a backward-engine call per subset example) |",
        "| call cache | on (the default), a fresh directory | `Generator(use_cache=True)` (the default), a fresh `~/.adalflow` |",
        "| early stop of a proposal's validation | `stop_unless_above` = the best score: stops once the proposal can no longer end strictly above it, cancelling the outstanding calls | its own, as the constrained step calls it: `validation_step(minimum_score=last_val_score)`; `pred_step` stops scoring once the best possible score is below it |",
        "",
        "**Scenario `tie`.** The fake model makes every step the same in both tools: the initial prompts fail 2/3 "
        "of the training questions; proposal 1 of each step fixes them (it beats the subset) but breaks another "
        "category, so it only ties the validation score and is rejected; proposal 2 fails the subset check. So "
        "each step is forward on the batch, backward on the subset, two optimizer rounds, two subset checks and "
        "one validation; nothing is accepted. Each step's proposals carry a new tag, so no step is served from "
        "another step's cache (a step may reuse its own tool's cached backward calls for examples kept in the "
        "moving batch, which both tools do: the per-step table gives autodiff's count, AdalFlow does not "
        "report its own). Calls are the requests the server received, per step window, by role (see below). "
        "This is the worst case for autodiff's early stop: a tie can only be known once the last example of "
        "the broken category has been scored.",
        "",
        "**Scenario `worse`.** Everything is the same (training file, fake model, pipelines, settings, role "
        "classification) except the validation file's mix of categories: half of it asks about the category "
        "proposal 1 breaks, so proposal 1 still beats the subset but is then clearly worse on validation than "
        "the initial prompts, which is what most proposals that pass the subset do in real runs. Both tools do "
        "the same logical work per step as in `tie`; autodiff may cancel the doomed validation once it can no "
        "longer win (the feature under test), AdalFlow runs its validation as its code does.",
        "",
        "| scenario | validation file, categories in turn (file order, no shuffle) | initial prompts | proposal 1 (if fully scored) | examples proposal 1 gets wrong (numbers in file order) | autodiff's bound crossed at example | AdalFlow's `pred_step` stops scoring at example |",
        "|---|---|---:|---:|---|---:|---:|",
    ]
    for sc, f in facts.items():
        broken = f["broken"]
        where = (", ".join(map(str, broken)) if len(broken) <= 8 else
                 f"every {broken[1] - broken[0]}{'nd' if broken[1] - broken[0] == 2 else 'rd' if broken[1] - broken[0] == 3 else 'th'}"
                 f" from {broken[0]}: {', '.join(map(str, broken[:3]))}, …, {broken[-1]} ({len(broken)} of {f['n']})")
        lines.append(f"| {sc} | {f['categories']} | {f['best']:.3f} | {f['rev1']:.3f} | {where} "
                     f"| {f['autodiff_stop_at'] or '–'} of {f['n']} | "
                     f"{(str(f['adalflow_stop_at']) + ' of ' + str(f['n'])) if f['adalflow_stop_at'] else 'never (a tie never falls below)'} |")
    lines += [
        "",
        "The bound columns count examples in file order (both tools submit the examples in file order; when "
        "each example's answer arrives depends on how the tool schedules its calls, below). The broken "
        "category is spread evenly through the file, so neither tool meets it all at the start or all at the "
        "end.",
        "",
        "| scenario | pipeline | tool | steps | wall per step (mean) | min – max | task calls | of which cancelled by the client | backward calls | optimizer calls | all calls |",
        "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    means: dict[str, dict[str, dict[str, dict]]] = {}
    for sc, by_pipeline in runs.items():
        for pipeline, by_tool in by_pipeline.items():
            for tool in ("adalflow", "autodiff"):
                if tool not in by_tool:
                    continue
                m = means.setdefault(sc, {}).setdefault(pipeline, {})[tool] = side.mean_step(by_tool[tool])
                c = m["calls"]
                label = "AdalFlow 1.1.3" if tool == "adalflow" else "autodiff"
                lines.append(f"| {sc} | {pipeline} | {label} | {m['steps']} | {_s(m['wall_s'])} | {_s(m['min_s'])} – "
                             f"{_s(m['max_s'])} | {c['task']:.1f} | {m['cancelled']['task']:.1f} | {c['backward']:.1f} "
                             f"| {c['optimizer']:.1f} | {sum(c.values()):.1f} |")
    lines += [
        "",
        "Calls are counted on the server, per step window: a call the client cancelled counts (the server "
        "received it); the cancelled column says how many of them the client gave up on before the answer was "
        "due (it closed the connection; the server logs such a request as cancelled, and its busy time ends "
        "there). " + _af_cancel_sentence(runs, means),
        "",
        "| scenario | pipeline | AdalFlow wall per step | autodiff wall per step | AdalFlow ÷ autodiff | target ≥ "
        f"{target:g}× | backward calls per step (AdalFlow / autodiff) | fewer backward calls |",
        "|---|---|---:|---:|---:|---|---:|---|",
    ]
    for sc, by_pipeline in r.get("ratios", {}).items():
        for pipeline, ratio in by_pipeline.items():
            a, b = means[sc][pipeline]["adalflow"], means[sc][pipeline]["autodiff"]
            lines.append(f"| {sc} | {pipeline} | {_s(a['wall_s'])} | {_s(b['wall_s'])} | **{ratio['wall_ratio']:.2f}×** "
                         f"| {_verdict(ratio['wall_ratio'] >= target)} | {a['calls']['backward']:.1f} / "
                         f"{b['calls']['backward']:.1f} | {_verdict(ratio['backward_fewer'])} |")
    lines += [
        "",
        "Where a step's time goes (mean per step, from the server's log: seconds during which at least one "
        "request of the role was in flight; \"no request in flight\" is the client's own work between "
        "requests — prompt rendering, parsing, bookkeeping, thread/event-loop scheduling; the roles overlap "
        "little, so the columns roughly add up to the wall time):",
        "",
        "| scenario | pipeline | tool | wall | task busy | of which validation (calls received, cancelled) | backward busy | optimizer busy | no request in flight | most in flight: task / backward / optimizer |",
        "|---|---|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for sc, by_pipeline in means.items():
        for pipeline, by_tool in by_pipeline.items():
            for tool, m in by_tool.items():
                b, f = m["busy_s"], m["max_in_flight"]
                label = "AdalFlow 1.1.3" if tool == "adalflow" else "autodiff"
                lines.append(f"| {sc} | {pipeline} | {label} | {_s(m['wall_s'])} | {_s(b['task'])} | "
                             f"{_s(m['val_busy_s'])} ({m['val_calls']:.1f}, {m['val_cancelled']:.1f}) | "
                             f"{_s(b['backward'])} | {_s(b['optimizer'])} | {_s(m['idle_s'])} "
                             f"| {f['task']} / {f['backward']} / {f['optimizer']} |")
    lines.append("")
    for sc, by_pipeline in means.items():
        for pipeline, by_tool in by_pipeline.items():
            if set(by_tool) != {"adalflow", "autodiff"}:
                continue
            a, b = by_tool["adalflow"], by_tool["autodiff"]
            d = {k: a["busy_s"][k] - b["busy_s"][k] for k in side.ROLES}
            lines.append(
                f"- **{sc} / {pipeline}**: AdalFlow spends {_s(a['wall_s'] - b['wall_s'])} more per step: backward "
                f"{d['backward']:+.2f} s (AdalFlow sends backward calls one at a time, at most "
                f"{a['max_in_flight']['backward']} in flight, vs {b['max_in_flight']['backward']} in ours; it also "
                f"asks its backward engine for the loss feedback of every subset example), optimizer "
                f"{d['optimizer']:+.2f} s (AdalFlow proposes one parameter after another: at most "
                f"{a['max_in_flight']['optimizer']} in flight, vs {b['max_in_flight']['optimizer']}), task "
                f"{d['task']:+.2f} s (of which validation {a['val_busy_s'] - b['val_busy_s']:+.2f} s: "
                f"{a['val_calls']:.1f} vs {b['val_calls']:.1f} validation calls received), client work with nothing "
                f"in flight {a['idle_s'] - b['idle_s']:+.2f} s. Task calls: {a['calls']['task']:.1f} vs "
                f"{b['calls']['task']:.1f} per step, at the same worker count in both tools: in autodiff they are "
                f"{b['busy_s']['task'] / b['wall_s']:.0%} of the step, a floor that no change to the backward or "
                f"the optimizer can lower; the validation of proposal 1 alone is {b['val_busy_s'] / b['wall_s']:.0%}. "
                f"The rest of the step (wall minus validation busy time) takes {_s(a['wall_s'] - a['val_busy_s'])} "
                f"in AdalFlow and {_s(b['wall_s'] - b['val_busy_s'])} in autodiff: "
                f"{(a['wall_s'] - a['val_busy_s']) / (b['wall_s'] - b['val_busy_s']):.2f}×. Even if autodiff's "
                f"backward, optimizer and client time were zero, its step could not be shorter than its task calls, "
                f"so on these steps the ratio cannot exceed {a['wall_s'] / b['busy_s']['task']:.2f}×.")
    missed = {sc for sc, by_pipeline in r.get("ratios", {}).items()
              for ratio in by_pipeline.values() if not ratio["wall_ratio"] or ratio["wall_ratio"] < target}
    if missed:
        lines += [
            "",
            f"Why the {target:g}× target is missed ({', '.join(f'`{sc}`' for sc in scenarios if sc in missed)}): "
            "the worker count is the same in both tools, so the task calls of a step (forward on the batch, the "
            "subset checks, the validation) take the same time in both; autodiff's gains are in what AdalFlow does "
            "one call at a time (the backward pass, one parameter's proposal after another) and in fewer backward "
            "calls, and those are the smaller part of a step that validates a proposal. The bound above says how "
            "far any change to autodiff's backward or optimizer could go on such steps."
            + (" In `worse`, autodiff's early stop also cuts the validation of the doomed proposal short (the "
               "validation columns above), which AdalFlow's does not: what is left of autodiff's step is still "
               "the forward pass on the batch, the two subset checks and the part of the validation before the "
               "bound is crossed, all task calls at the same worker count." if "worse" in missed else ""),
        ]
    lines += _af_early_stop_lines(runs, facts)
    lines += [
        "",
        "Per step (server-side calls by role task/backward/optimizer, and how many of them the client "
        "cancelled; the outcome of the proposals):",
        "",
        "| scenario | pipeline | tool | step | wall | calls t/b/o | cancelled | outcome |",
        "|---|---|---|---:|---:|---:|---:|---|",
    ]
    for sc, by_pipeline in runs.items():
        for pipeline, by_tool in by_pipeline.items():
            for tool in ("adalflow", "autodiff"):
                if tool not in by_tool:
                    continue
                for st in by_tool[tool]["steps"]:
                    c = st["calls"]
                    if tool == "autodiff":
                        outcome = "; ".join(p["reason"] for p in st.get("proposals") or []) or (st.get("skipped") or "–")
                        if st.get("cached_calls"):
                            outcome += f" ({st['cached_calls']} calls from its cache)"
                    else:
                        pr = st.get("proposals") or {}
                        outcome = ", ".join(f"{stage} {x['pass']} passed / {x['fail']} failed" for stage, x in pr.items())
                        for val in st.get("validations") or []:
                            outcome += (f"; its validation scored {val['scored']} of {val['examples']} examples "
                                        f"({val['score']:.3f}) and returned after {val['end'] - val['start']:.2f} s")
                    label = "AdalFlow 1.1.3" if tool == "adalflow" else "autodiff"
                    lines.append(f"| {sc} | {pipeline} | {label} | {st['step']} | {_s(st['wall_s'])} | "
                                 f"{c['task']}/{c['backward']}/{c['optimizer']} | {sum(st['cancelled'].values())} "
                                 f"| {outcome} |")
    lines += [
        "",
        "How requests are classified (on the server, from the text of all messages): *backward* = autodiff's "
        "\"You are the backward engine of a prompt optimizer\" or \"You evaluate the final output of an LLM "
        "pipeline\" and AdalFlow's \"You MUST determining the root cause of a system error\" (its backward engine, "
        "which also writes its loss feedback); *optimizer* = autodiff's \"You are the optimizer of an LLM "
        "pipeline\" and AdalFlow's \"You are an excellent prompt engineer\"; *task* = a request with one of the "
        f"pipelines' node markers; anything else fails the run ({r.get('unknown_requests', 0)} here). A step "
        "window is AdalFlow's `train_step` call to the return of its proposal step, which saves its checkpoint "
        "(timestamps taken in its process), and for autodiff the time between two versions of the run "
        "directory's `checkpoint.json` (written after the initial validation and at the end of each step, "
        "with the step's other files); the wall column is that window.",
        "",
        "Offline supplies: AdalFlow builds a tiktoken `cl100k_base` tokenizer when it is imported, which would "
        "download the encoding file. The runner points `TIKTOKEN_CACHE_DIR` at a copy of the real file that "
        "litellm (installed with autodiff) ships under the name tiktoken caches it by; tiktoken checks its "
        "sha256. Nothing is stubbed, and AdalFlow's training never tokenizes anything here, so it has no "
        "bearing on the timings. `adalflow.datasets` imports torch, so the benchmark declares its own "
        "`Example` DataClass with the same fields instead of importing it.",
        "",
        "The machine was shared with a long CPU-bound benchmark (the load average above): the wall times are "
        "dominated by the server's latency, but the client-side columns (no request in flight) are inflated "
        "by it, for both tools.",
        f"<!-- /bench:{name} -->",
    ]
    return "\n".join(lines) + "\n"


def _af_cancel_sentence(runs: dict, means: dict) -> str:
    parts = []
    for sc, by_pipeline in runs.items():
        for pipeline, by_tool in by_pipeline.items():
            for tool, run in by_tool.items():
                total = sum(sum(st["calls"].values()) for st in run["steps"])
                cancelled = sum(sum(st["cancelled"].values()) for st in run["steps"])
                label = "AdalFlow" if tool == "adalflow" else "autodiff"
                if tool == "autodiff" or cancelled:
                    parts.append(f"{sc}/{pipeline} {label} {cancelled} of {total}")
    return ("Over all the steps, calls cancelled by the client of the calls received: " + "; ".join(parts) +
            " (AdalFlow never cancels a call; it is listed only where it did)." if parts else "")


def _af_early_stop_lines(runs: dict, facts: dict) -> list[str]:
    """How each tool's early stop behaved on the validations of proposal 1."""
    out = ["", "The validation of proposal 1, per scenario and pipeline (all steps):", "",
           "| scenario | pipeline | tool | validations stopped early | validation calls received per step | of which cancelled | examples scored per validation | validation busy per step | chain: `listing` calls sent before the first `answer` call |",
           "|---|---|---|---:|---:|---:|---:|---:|---:|"]
    for sc, by_pipeline in runs.items():
        n = facts[sc]["n"]
        for pipeline, by_tool in by_pipeline.items():
            for tool in ("adalflow", "autodiff"):
                if tool not in by_tool:
                    continue
                steps = by_tool[tool]["steps"]
                k = len(steps) or 1
                calls = sum(st["val_calls"] for st in steps) / k
                cancelled = sum(st["val_cancelled"] for st in steps) / k
                busy = sum(st["val_busy_s"] for st in steps) / k
                if tool == "autodiff":
                    firsts = [p for st in steps for p in (st.get("proposals") or []) if "validation" in (p["reason"] or "")]
                    stopped = sum(1 for p in firsts if p.get("stopped_early"))
                    scored = "–"
                    label = "autodiff"
                    early = f"{stopped} of {len(firsts)}"
                else:
                    vals = [v for st in steps for v in (st.get("validations") or [])]
                    stopped = sum(1 for v in vals if v["scored"] < v["examples"])
                    scored = (f"{sum(v['scored'] for v in vals) / len(vals):.1f} of {n}" if vals else "–")
                    label = "AdalFlow 1.1.3"
                    early = f"{stopped} of {len(vals)} (scoring only)"
                order = [st.get("val_first_before_last") for st in steps]
                order = "–" if not order or None in order else f"{sum(order) / len(order):.1f} of {n}"
                out.append(f"| {sc} | {pipeline} | {label} | {early} | {calls:.1f} | {cancelled:.1f} | {scored} "
                           f"| {_s(busy)} | {order} |")
    # the chain's validation in autodiff sent every `listing` call before the first `answer` call, every step
    breadth_first = any(
        by_pipeline.get("chain", {}).get("autodiff") for by_pipeline in runs.values()) and all(
        st.get("val_first_before_last") == facts[sc]["n"]
        for sc, by_pipeline in runs.items() for st in (by_pipeline.get("chain", {}).get("autodiff") or {}).get("steps", []))
    # AdalFlow's server-side validation calls: every example's every node, in every step
    side = adalflow_side()
    adal_full = all(st["val_calls"] == facts[sc]["n"] * len(side.PIPELINES[pipeline]["nodes"])
                    for sc, by_pipeline in runs.items() for pipeline, by_tool in by_pipeline.items()
                    for st in (by_tool.get("adalflow") or {}).get("steps", []))
    out += ["", ("AdalFlow's early stop (`pred_step`'s `break` once the best possible score is below "
            "`minimum_score`) stops the scoring loop, not the calls: every example was submitted to its "
            "`ThreadPoolExecutor` up front, and leaving the `with` block waits for all of them (`shutdown(wait=True)`), "
            "so the server received every validation call of every step and the step waits for the last answer (the "
            "time its `validation_step` took is in the per-step table). " if adal_full else
            "AdalFlow's validation calls received per step are in the table above. ") +
            "autodiff's early stop cancels the examples in flight and never sends the rest; the calls it had sent "
            "count above even when it cancelled them.",
            ] + ([] if not breadth_first else [
            "",
            "How early autodiff's bound is crossed depends on when examples finish. In the single pipeline an "
            "example is one call, so examples finish in file order. In the chain an example is three calls in a "
            "row, and the two tools order them differently (last column): AdalFlow's 4 worker threads each take "
            "one example through `listing` → `tally` → `answer`, so examples finish one after another; autodiff's "
            "evaluation (`autodiff_cli/engine/evaluate.py`) starts every example at once and the task model's 4 slots "
            "serve calls in the order they ask, so every example's `listing` call is sent before the first "
            "`answer` call (breadth-first). No example is scored until the last third of its calls, so in "
            "`worse` the bound is crossed only during the `answer` calls, and the early stop saves the "
            "`answer` calls of the examples not yet sent."])
    return out


RENDER = {"concurrency": render_concurrency, "overhead": render_overhead, "cache": render_cache,
          "memory": render_memory, "adalflow": render_adalflow}
MEASURE = {"concurrency": bench_concurrency, "overhead": bench_overhead, "cache": bench_cache,
           "memory": bench_memory, "adalflow": bench_adalflow}


def _meta() -> dict:
    import platform

    try:
        from importlib.metadata import version
        versions = f"Python {platform.python_version()}, litellm {version('litellm')}, openai {version('openai')}, " \
                   f"httpx {version('httpx')}"
    except Exception:  # noqa: BLE001
        versions = f"Python {platform.python_version()}"
    load = ", ".join(f"{x:.2f}" for x in os.getloadavg())
    return {"machine": _bench_runner().machine(), "date": datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"),
            "load": load, "versions": versions}


def run_benchmarks(sizes: Sizes, work: Path, only: list[str] | None = None,
                   adalflow_venv: Path | None = None, adalflow_scenario: str = "both") -> dict[str, dict]:
    """Measure; {bench: {"result": ..., "meta": ...}} in BENCHES order."""
    os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")
    out: dict[str, dict] = {}
    for bench in BENCHES:
        if only and bench not in only:
            continue
        meta = _meta()
        if bench == "adalflow":
            result = bench_adalflow(sizes, work, adalflow_venv, adalflow_scenario)
        else:
            result = MEASURE[bench](sizes, work)
        out[bench] = {"meta": meta, "result": result}
    return out


def render(measured: dict[str, dict], command: str, quick: bool) -> dict[str, str]:
    return {b: RENDER[b](m["result"], command, m["meta"], quick) for b, m in measured.items()}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="benchmarks/perf/run.py", description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="tiny sizes (a smoke test; the sections say so)")
    ap.add_argument("--write", action="store_true", help="write the sections into the results file")
    ap.add_argument("--only", action="append", choices=BENCHES, metavar="NAME",
                    help=f"run only these ({', '.join(BENCHES)}; repeatable)")
    ap.add_argument("--results", type=Path, default=HERE.parent / "RESULTS.md", metavar="FILE",
                    help="the results file (default: benchmarks/RESULTS.md)")
    ap.add_argument("--work", type=Path, default=None, metavar="DIR",
                    help="scratch files (default: a temporary directory, removed at the end)")
    ap.add_argument("--adalflow-venv", type=Path, default=None, metavar="DIR",
                    help="the AdalFlow 1.1.3 virtual environment, created when missing "
                         "(default: benchmarks/work/adalflow-venv)")
    ap.add_argument("--adalflow-scenario", choices=tuple(AF_SCENARIOS), default="both",
                    help="figure 2's scenario: `tie` (proposal 1 ties the validation score), `worse` (it is "
                         "clearly worse on validation) or `both` (the default)")
    ap.add_argument("--json", action="store_true", help="also print the raw measurements as JSON")
    ap.add_argument("--memory-child", type=Path, default=None, help=argparse.SUPPRESS)
    return ap.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.memory_child is not None:
        memory_child(args.memory_child)
        return 0
    command = "python benchmarks/perf/run.py " + shlex.join(sys.argv[1:] if argv is None else argv)
    command = command.strip()
    sizes = QUICK if args.quick else FULL
    with contextlib.ExitStack() as stack:
        if args.work is None:
            work = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="autodiff-perf-")))
        else:
            work = args.work.resolve()
            work.mkdir(parents=True, exist_ok=True)
        measured = run_benchmarks(sizes, work, args.only, args.adalflow_venv, args.adalflow_scenario)
    sections = render(measured, command, args.quick)
    if args.json:
        print(json.dumps({b: m["result"] for b, m in measured.items()}, indent=2, default=str))
    for text in sections.values():
        print(text)
    if args.write:
        runner = _bench_runner()
        for bench, text in sections.items():
            runner.write_section(args.results, SECTION_NAMES[bench], text)
        log(f"wrote {len(sections)} section(s) of {args.results}")
    return 0


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    sys.exit(main())
