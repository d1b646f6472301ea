#!/usr/bin/env python3
"""Side-by-side benchmark: DSPy's optimizers and autodiff's on the same model, rows, instruction and budget.

    python benchmarks/peers/run.py --task trec [--system S ...] [--seed N ...] [--model qwen2.5-coder-1.5b]
    python benchmarks/peers/run.py --report [--task trec ...]

One GGUF is served once by llama-cpp-python's own OpenAI-compatible server (`python -m llama_cpp.server`,
in the peers venv) on 127.0.0.1, behind a counting proxy on a fixed 127.0.0.1 port (serve.py). Both tools
call the proxy with the same model, the same temperatures per role and the same train/val/test rows
(tasks.py exports them once with autodiff's loader). Every run gets the same budget of task-model calls
for its optimization: autodiff through `train.budget.max_calls` (which counts all its calls), DSPy through
its `auto="light"` settings capped to the budget (MIPROv2's trials, GEPA's max_metric_calls), and the proxy
refuses a task-model call past the budget in any run's optimize phase. The proxy's per-run counts are what
the table reports, so the budget is checked, not assumed.

Systems (a task x system x seed is a run; `*-none`/`autodiff-initial` have no seed):
  dspy-none, dspy-bootstrap, dspy-mipro, dspy-gepa     (DSPy 3.x in the peers venv, dspy_job.py)
  autodiff-initial, autodiff-gdpo, autodiff-pareto, autodiff-demos, autodiff-joint   (the `autodiff` CLI)

Runs are resumable: each has a directory WORK/runs/<task>-<model>-<sizes>-b<budget>-<hash>/<system>[-seed<N>]
with its calls.jsonl (the proxy's log), its state and summary.json (written last); a completed run is
reused, an interrupted one continues (autodiff: `train --resume` through benchmarks/run.py's
ensure_trained; DSPy: the run's own DSPy cache replays the calls already made). See benchmarks/README.md.
"""
from __future__ import annotations

import argparse
import hashlib
import importlib.metadata
import importlib.util
import json
import math
import os
import shlex
import signal
import statistics
import subprocess
import sys
import time
import tomllib
from datetime import UTC, datetime
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
sys.path.insert(0, str(HERE))

import serve  # this folder
import tasks as tasklib

DEFAULT_WORK = ROOT / "benchmarks" / "work" / "peers"
DEFAULT_VENV = ROOT / "benchmarks" / "work" / "peers-venv"
DEFAULT_DATA_FROM = ROOT.parent / "shared" / "datasets"
CONSTRAINTS = HERE / "constraints.txt"
DSPY_VERSION = "3.4.1"  # the newest DSPy 3.x when this was written; its litellm pin (>=1.65.8) accepts ours
LITELLM_RANGE = ((1, 100), (1, 107))  # [1.100, 1.107): autodiff's range; 1.107.0 was a compromised release
API_KEY_ENV = "PEERS_API_KEY"  # the local server checks no key; litellm's openai client wants one
EXIT_FAILED, EXIT_USAGE, EXIT_INTERRUPTED = 1, 2, 130

DSPY_SYSTEMS = ("dspy-none", "dspy-bootstrap", "dspy-mipro", "dspy-gepa")
# autodiff systems: `--set` options on top of the common ones (models, data, budget), after the optimizers of
# autodiff_cli/optim/registry.py. A system whose settings the installed autodiff refuses (`train --dry-run`
# exits 2: an optimizer it does not have, demos on a config without a demos param) is reported as not
# available, with the CLI's reason. --autodiff-system NAME=K=V[,K=V...] replaces or adds an entry.
AUTODIFF_SYSTEMS: dict[str, list[str]] = {
    "autodiff-gdpo": ["train.optimizer=gdpo", "train.demos=off"],  # the paper's optimizer, prompts only
    "autodiff-pareto": ["train.optimizer=pareto", "train.demos=off"],  # GEPA-style pool and Pareto front
    "autodiff-demos": ["train.demos=demos_only"],  # bootstrapped few-shot demos only
    "autodiff-joint": ["train.optimizer=joint", "train.demos=off"],  # instruction and demo lineages, then a grid
}
INITIAL = {"dspy": "dspy-none", "autodiff": "autodiff-initial"}
ORDER = ("autodiff-initial", "dspy-none")  # run first: every other run is compared with its tool's initial
FINAL = {"completed", "budget_exhausted", "failed"}  # final outcomes: reused (failed: unless --retry-failed)


def log(message: str) -> None:
    print(f"[{datetime.now(UTC):%H:%M:%S}] peers: {message}", file=sys.stderr, flush=True)


def bench_module():
    """benchmarks/run.py, imported by path: its resumable training, bootstrap and report helpers are reused."""
    spec = importlib.util.spec_from_file_location("autodiff_bench_runner", ROOT / "benchmarks" / "run.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


bench = bench_module()


def write_json(path: Path, data) -> None:
    bench.atomic_write(path, json.dumps(data, indent=2, ensure_ascii=False, default=str) + "\n")


def read_json(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


# ---------------------------------------------------------------- options


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="benchmarks/peers/run.py", description=__doc__.split("\n\n")[0])
    ap.add_argument("--task", action="append", choices=sorted(tasklib.TASKS), help="repeatable; default: all")
    ap.add_argument("--system", action="append", metavar="S",
                    help="repeatable; default: all (" + ", ".join(("autodiff-initial", *DSPY_SYSTEMS,
                                                                    *AUTODIFF_SYSTEMS)) + ")")
    ap.add_argument("--seed", action="append", type=int, help="repeatable; default: the task's seeds")
    ap.add_argument("--model", default="qwen2.5-coder-1.5b", help="a `local/` alias of autodiff (every role)")
    ap.add_argument("--budget", type=int, help="task-model calls per run for its optimization (default: the task's)")
    for split in tasklib.SPLITS:
        ap.add_argument(f"--{split}", type=int, metavar="N", help=f"the first N {split} examples (default: the task's)")
    ap.add_argument("--meta-temperature", type=float, default=0.7,
                    help="autodiff's optimizer, MIPROv2's prompt model, GEPA's reflection LM (default 0.7)")
    ap.add_argument("--teacher-temperature", type=float, default=0.7,
                    help="the demo teacher of both tools (default 0.7, autodiff's default teacher)")
    ap.add_argument("--meta-max-tokens", type=int, default=1024,
                    help="max_tokens of the non-task roles (default 1024, autodiff's local default)")
    ap.add_argument("--concurrency", type=int, default=1,
                    help="calls in flight per tool (autodiff's per-model concurrency, DSPy's num_threads; default 1: "
                         "the server answers one at a time)")
    ap.add_argument("--threads", type=int, default=max(1, (os.cpu_count() or 2) - 1),
                    help="llama.cpp threads of the server (default: cores - 1; with every core busy elsewhere, "
                         "llama.cpp's spinning threads slow down several-fold)")
    ap.add_argument("--port", type=int, default=18765,
                    help="the proxy's 127.0.0.1 port (default 18765); it is part of each run's settings, keep it")
    ap.add_argument("--autodiff-system", action="append", default=[], metavar="NAME=K=V[,K=V...]",
                    help="define or redefine an autodiff system's --set options (repeatable)")
    ap.add_argument("--work", type=Path, default=DEFAULT_WORK, help="default benchmarks/work/peers")
    ap.add_argument("--venv", type=Path, default=DEFAULT_VENV, help="default benchmarks/work/peers-venv")
    ap.add_argument("--data-from", type=Path, default=DEFAULT_DATA_FROM,
                    help="`autodiff data fetch --from` source when a dataset is missing (default ../shared/datasets)")
    ap.add_argument("--results", type=Path, default=ROOT / "benchmarks" / "RESULTS.md")
    ap.add_argument("--prompts-dir", type=Path, default=ROOT / "benchmarks" / "prompts",
                    help="where each run's best prompts go as <config>-<system>-seed<N>.yaml")
    ap.add_argument("--section", help="heading of the RESULTS.md section (default: 'Peers: ...')")
    ap.add_argument("--bootstrap", type=int, default=10000, help="paired-bootstrap resamples (default 10000)")
    ap.add_argument("--retry-failed", action="store_true", help="start failed runs over")
    ap.add_argument("--dry-run", action="store_true", help="print the plan; run nothing")
    ap.add_argument("--report", action="store_true",
                    help="write the section and the prompt files from the recorded runs; run nothing")
    args = ap.parse_args(argv)
    for item in args.autodiff_system:
        name, eq, rest = item.partition("=")
        if not eq or not name.startswith("autodiff-") or name == "autodiff-initial":
            ap.error(f"--autodiff-system {item!r}: expected autodiff-NAME=K=V[,K=V...]")
        AUTODIFF_SYSTEMS[name] = [s.strip() for s in rest.split(",") if s.strip()]
    known = ("autodiff-initial", *DSPY_SYSTEMS, *AUTODIFF_SYSTEMS)
    for s in args.system or []:
        if s not in known:
            ap.error(f"--system {s}: expected one of {', '.join(known)}")
    args.system = list(dict.fromkeys(args.system or known))
    args.task = list(dict.fromkeys(args.task or tasklib.TASKS))
    args.work, args.venv = args.work.resolve(), args.venv.absolute()
    args.argv = list(sys.argv[1:] if argv is None else argv)
    return args


# ---------------------------------------------------------------- the peers venv


def venv_python(venv: Path) -> Path:
    return venv / "bin" / "python"


def _venv_versions(venv: Path) -> dict | None:
    code = ("import json, importlib.metadata as m\nout = {}\n"
            "for d in ('dspy', 'litellm', 'gepa', 'optuna', 'openai', 'llama_cpp_python', 'fastapi', 'uvicorn'):\n"
            "    try: out[d] = m.version(d)\n    except m.PackageNotFoundError: out[d] = None\nprint(json.dumps(out))")
    try:
        proc = subprocess.run([str(venv_python(venv)), "-c", code], capture_output=True, text=True, timeout=120,
                              check=False)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return json.loads(proc.stdout.strip().splitlines()[-1]) if proc.returncode == 0 else None


def litellm_ok(version: str | None) -> bool:
    if not version:
        return False
    parts = tuple(int(p) for p in version.split(".")[:3] if p.isdigit())
    return LITELLM_RANGE[0] <= parts[:2] < LITELLM_RANGE[1] and parts != (1, 107, 0)


def requirements() -> list[str]:
    """DSPy with MIPROv2's optuna, llama-cpp-python's server at the main venv's version (pip then reuses the
    wheel it built for the main venv instead of compiling llama.cpp again), and autodiff's own dependencies
    (read from pyproject.toml) so the DSPy job can import autodiff's parsers, metrics and retriever from the
    repository without installing the package."""
    try:
        llama = f"llama-cpp-python[server]=={importlib.metadata.version('llama_cpp_python')}"
    except importlib.metadata.PackageNotFoundError:
        llama = "llama-cpp-python[server]>=0.3.7"  # compiles llama.cpp (minutes)
    project = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["project"]
    return [llama, f"dspy=={DSPY_VERSION}", "optuna", *project["dependencies"]]


def ensure_venv(venv: Path) -> dict:
    want_llama = next(r for r in requirements() if r.startswith("llama")).partition("==")[2] or None
    versions = _venv_versions(venv) if venv_python(venv).exists() else None
    if (versions and versions.get("dspy") == DSPY_VERSION and litellm_ok(versions.get("litellm"))
            and versions.get("optuna") and versions.get("fastapi") and versions.get("uvicorn")
            and versions.get("llama_cpp_python") and (want_llama is None or versions["llama_cpp_python"] == want_llama)):
        return versions
    if not venv_python(venv).exists():
        log(f"creating the virtual environment {venv}")
        subprocess.run([getattr(sys, "_base_executable", None) or sys.executable, "-m", "venv", str(venv)], check=True)
    cmd = [str(venv_python(venv)), "-m", "pip", "install", "-q", *requirements(), "-c", str(CONSTRAINTS)]
    log("$ " + shlex.join(cmd))
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise SystemExit(f"pip install into {venv} failed:\n{proc.stderr[-3000:]}")
    versions = _venv_versions(venv)
    if not versions or versions.get("dspy") != DSPY_VERSION or not litellm_ok(versions.get("litellm")):
        raise SystemExit(f"{venv} does not hold dspy {DSPY_VERSION} with litellm in [1.100, 1.107): {versions}")
    return versions


# ---------------------------------------------------------------- plan


class Group:
    """One task's runs that share every setting but the system and seed: same rows, model, budget, temperatures."""

    def __init__(self, args: argparse.Namespace, task: str) -> None:
        info = tasklib.TASKS[task]
        self.task, self.info = task, info
        self.config = ROOT / info["config"]
        self.sizes = dict(info["sizes"] or {})
        for split in tasklib.SPLITS:
            if getattr(args, split) is not None:
                self.sizes[split] = getattr(args, split)
        self.budget = args.budget or info["budget"]
        self.seeds = args.seed if args.seed is not None else info["seeds"]
        self.alias = args.model
        self.settings = {
            "task": task, "config": info["config"], "model": args.model, "sizes": self.sizes, "budget": self.budget,
            "meta_temperature": args.meta_temperature, "teacher_temperature": args.teacher_temperature,
            "meta_max_tokens": args.meta_max_tokens, "concurrency": args.concurrency, "port": args.port,
            "dspy": DSPY_VERSION,
        }
        digest = hashlib.sha256(json.dumps(self.settings, sort_keys=True).encode()).hexdigest()[:8]
        self.key = digest
        # the initial programs depend on the rows and the model only: they are shared by every budget and setting
        self.base = args.work / "runs" / f"{task}-{args.model}-{tasklib.sizes_tag(self.sizes)}"
        self.name = f"{self.base.name}/b{self.budget}-{digest}"
        self.dir = self.base / f"b{self.budget}-{digest}"
        self.task_json: Path | None = None

    def run_dir(self, system: str, seed: int | None) -> Path:
        if system in INITIAL.values():
            return self.base / system
        return self.dir / f"{system}-seed{seed}"

    def tag(self, system: str, seed: int | None) -> str:
        if system in INITIAL.values():
            return f"{self.task}.{system}.{hashlib.sha256(str(self.base).encode()).hexdigest()[:8]}"
        return f"{self.task}.{system}.s{seed}.{self.key}"

    def runs(self, systems: list[str]) -> list[tuple[str, int | None]]:
        ordered = [s for s in ORDER if s in systems] + [s for s in systems if s not in ORDER]
        out = []
        for system in ordered:
            for seed in ([None] if system in INITIAL.values() else self.seeds):
                out.append((system, seed))
        return out


def tool_of(system: str) -> str:
    return system.split("-", 1)[0]


# ---------------------------------------------------------------- the harness


class Harness:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.runner = bench.Runner()
        self.server: serve.LlamaServer | None = None
        self.proxy: serve.CallProxy | None = None
        self.versions: dict | None = None

    # ------------------------------------------------------------ services

    def ensure_services(self) -> None:
        if self.proxy is not None:
            return
        from autodiff_cli.llm.local import resolve_local_model

        if serve.port_in_use(self.args.port):
            raise SystemExit(f"127.0.0.1:{self.args.port} is taken (another benchmark?); stop it or choose --port "
                             "(the port is part of the runs' settings: a new port means new runs)")
        self.versions = ensure_venv(self.args.venv)
        log("peers venv: " + ", ".join(f"{k} {v}" for k, v in self.versions.items()))
        gguf = resolve_local_model(self.args.model)
        self.server = serve.LlamaServer(venv_python(self.args.venv), gguf, self.args.model, self.args.work / "server",
                                        threads=self.args.threads)
        log(f"starting llama_cpp.server for {gguf.name} on 127.0.0.1:{self.server.port} (log {self.server.log_path})")
        self.server.start()
        self.proxy = serve.CallProxy(self.server.url, self.args.port)
        self.proxy.start()
        log(f"counting proxy on {self.proxy.url}")

    def stop_services(self) -> None:
        if self.proxy is not None:
            self.proxy.stop()
        if self.server is not None:
            self.server.stop()

    def env(self, run_dir: Path) -> dict[str, str]:
        return {"AUTODIFF_CACHE": str(run_dir / "cache"), API_KEY_ENV: "local-no-key",
                "NO_PROXY": "127.0.0.1,localhost", "no_proxy": "127.0.0.1,localhost",
                "LITELLM_LOCAL_MODEL_COST_MAP": "True"}

    # ------------------------------------------------------------ data

    def export(self, group: Group) -> None:
        """The rows both tools read; the datasets are fetched into WORK/datasets when not found."""
        if not os.environ.get("AUTODIFF_DATA"):
            os.environ["AUTODIFF_DATA"] = str(self.args.work / "datasets")
        data = Path(os.environ["AUTODIFF_DATA"])
        if not (data / group.info["dataset"]).is_dir():
            cmd = bench.cli("data", "fetch", group.info["dataset"], "--from", str(self.args.data_from),
                            "--dest", str(data))
            log("$ " + bench.show(cmd))
            subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
        group.task_json = tasklib.export_task(group.task, self.args.work, group.sizes)

    # ------------------------------------------------------------ autodiff

    def autodiff_sets(self, group: Group, tag: str, split_for_test: bool) -> list[str]:
        task = json.loads(group.task_json.read_text(encoding="utf-8"))
        files = task["files"]
        a = self.args
        sets = []
        for role in ("task", "backward", "optimizer"):
            sets += [f"models.{role}.model=openai/{group.alias}",
                     f"models.{role}.api_base={serve_api_base(a.port, tag, role)}",
                     f"models.{role}.api_key_env={API_KEY_ENV}", f"models.{role}.concurrency={a.concurrency}"]
        sets += [f"models.backward.max_tokens={a.meta_max_tokens}", f"models.optimizer.max_tokens={a.meta_max_tokens}",
                 f"models.optimizer.temperature={a.meta_temperature}",
                 # a named teacher with its own api_base, so the proxy counts its calls apart from the task's
                 (f"models.teacher={{model: openai/{group.alias}, api_base: {serve_api_base(a.port, tag, 'teacher')}, "
                  f"api_key_env: {API_KEY_ENV}, temperature: {a.teacher_temperature}, "
                  f"max_tokens: {task['task_model']['max_tokens'] or a.meta_max_tokens}, concurrency: {a.concurrency}}}"),
                 "train.teacher=teacher",
                 f"data.train={files['train']['path']}", f"data.val={files['val']['path']}",
                 # training never sees the test split; it is scored afterwards by `autodiff eval --split test`
                 f"data.test={files['test']['path'] if split_for_test else 'null'}"]
        return sets

    def probe(self, group: Group, seed: int, sets: list[str], out: Path) -> str | None:
        """None when the installed autodiff accepts the system's settings, else its one-paragraph refusal."""
        cmd = bench.cli("train", str(group.config), "--dry-run", *bench.train_sets("autodiff", seed, sets))
        proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, **self.env(out)}, check=False)
        if proc.returncode == 0:
            return None
        return bench.error_paragraph(proc.stderr.splitlines())

    def run_autodiff(self, group: Group, system: str, seed: int | None, out: Path) -> dict:
        tag = group.tag(system, seed)
        settings = list(AUTODIFF_SYSTEMS.get(system, []))
        train_sets = self.autodiff_sets(group, tag, False) + settings + [f"train.budget.max_calls={group.budget}"]
        eval_sets = self.autodiff_sets(group, tag, True)
        state = bench.State(out)
        if system != "autodiff-initial" and not state.data["runs"]:
            refused = self.probe(group, seed, train_sets, out)
            if refused is not None:
                return {"status": "not_available", "reason": refused, "settings": settings}
        self.ensure_services()
        self.proxy.register(tag, out / "calls.jsonl", "optimize", group.budget)
        old_env = {k: os.environ.get(k) for k in self.env(out)}
        os.environ.update(self.env(out))
        load, started = os.getloadavg(), datetime.now(UTC)
        try:
            if system == "autodiff-initial":
                evals = {}
                for split in ("val", "test"):
                    evals[split] = self.autodiff_eval(group, tag, out, split, None, eval_sets)
                summary = {"status": "completed" if all(e.get("result") for e in evals.values()) else "failed",
                           "evals": evals}
            else:
                self.proxy.set_phase(tag, "optimize")
                entry = bench.ensure_trained(self.runner, state, group.config, "autodiff", seed, train_sets, False)
                run_dir = state.abs(entry.get("run_dir"))
                ad = bench.read_summary(run_dir) or {}
                summary = {"status": entry["status"], "reason": entry.get("reason"), "run_dir": str(run_dir),
                           "autodiff_summary": {k: ad.get(k) for k in ("status", "reason", "steps", "initial", "best",
                                                                        "proposals", "usage", "wall_seconds", "models")}}
                if entry["status"] in ("completed", "budget_exhausted") and run_dir is not None:
                    initial_rows = group.run_dir("autodiff-initial", None) / "test.jsonl"
                    if bench.best_is_initial(run_dir) and initial_rows.exists():
                        summary["evals"] = {"test": {"same_as_initial": True, "out": str(initial_rows)}}
                    else:
                        summary["evals"] = {"test": self.autodiff_eval(group, tag, out, "test", run_dir, eval_sets)}
                    if not (summary["evals"]["test"].get("result") or summary["evals"]["test"].get("same_as_initial")):
                        summary["status"] = "failed"
                        summary["reason"] = f"scoring on test failed: {summary['evals']['test'].get('error')}"
        finally:
            for k, v in old_env.items():
                if v is None:
                    os.environ.pop(k, None)
                else:
                    os.environ[k] = v
        summary.update(load_average_start=[round(x, 2) for x in load], started_utc=f"{started:%Y-%m-%d %H:%M:%S}",
                       settings=settings, train_sets=train_sets, calls=serve.load_calls(out / "calls.jsonl"))
        return summary

    def autodiff_eval(self, group: Group, tag: str, out: Path, split: str, run_dir: Path | None, sets: list[str]) -> dict:
        self.proxy.set_phase(tag, split)
        rows = out / f"{split}.jsonl"
        t0 = time.perf_counter()
        cmd = bench.cli("eval", str(group.config), *(["--run", str(run_dir)] if run_dir else []), "--split", split,
                        "--out", str(rows), "--json", *[x for s in sets for x in ("--set", s)])
        code, stdout, err = self.runner.run(cmd)
        record = {"split": split, "out": str(rows), "exit_code": code, "wall_seconds": round(time.perf_counter() - t0, 2)}
        lines = [x for x in stdout if x.strip()]
        if code in (0, 1, 3) and lines and rows.exists():
            record["result"] = json.loads(lines[-1])
        else:
            record["error"] = f"eval exited {code}: {bench.error_paragraph(err)}"
        self.runner.check()
        return record

    # ------------------------------------------------------------ DSPy

    def run_dspy(self, group: Group, system: str, seed: int | None, out: Path) -> dict:
        self.ensure_services()
        tag = group.tag(system, seed)
        task = json.loads(group.task_json.read_text(encoding="utf-8"))
        a = self.args
        job = {"task_json": str(group.task_json), "system": system.split("-", 1)[1], "seed": seed or 0,
               "budget": group.budget, "calls_per_example": tasklib.calls_per_example(task),
               "proxy": self.proxy.url, "tag": tag, "alias": group.alias, "run_dir": str(out),
               "meta_temperature": a.meta_temperature, "teacher_temperature": a.teacher_temperature,
               "meta_max_tokens": a.meta_max_tokens, "num_threads": a.concurrency, "num_retries": 3,
               "timeout": 600}
        write_json(out / "job.json", job)
        self.proxy.register(tag, out / "calls.jsonl", "optimize", group.budget)
        env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTHON", "VIRTUAL_ENV"))}
        env.update(self.env(out), PYTHONPATH=str(ROOT), PYTHONUNBUFFERED="1", TQDM_DISABLE="1",
                   DSPY_CACHEDIR=str(out / "dspy-cache"))
        cmd = [str(venv_python(a.venv)), str(HERE / "dspy_job.py"), str(out / "job.json")]
        load, started = os.getloadavg(), datetime.now(UTC)
        (out / "result.json").unlink(missing_ok=True)
        log(f"{tag}: $ {shlex.join(cmd)}  (log {out / 'job.log'})")
        t0 = time.perf_counter()
        with (out / "job.log").open("a", encoding="utf-8") as f:
            f.write(f"\n===== {started.isoformat()} load average {load}\n")
            f.flush()
            proc = subprocess.Popen(cmd, env=env, stdout=f, stderr=subprocess.STDOUT, cwd=str(out))
            self.runner.child = proc  # Ctrl-C / SIGTERM on the harness is passed on (benchmarks/run.py's Runner)
            try:
                code = proc.wait()
            finally:
                self.runner.child = None
        self.runner.check()
        result = read_json(out / "result.json") or {}
        status = result.get("status") if code == 0 else "failed"
        return {"status": status or "failed",
                "reason": result.get("reason") or (None if code == 0 else f"dspy_job.py exited {code}; see job.log"),
                "load_average_start": [round(x, 2) for x in load], "started_utc": f"{started:%Y-%m-%d %H:%M:%S}",
                "process_wall_seconds": round(time.perf_counter() - t0, 1), "job": job, "result": result,
                "calls": serve.load_calls(out / "calls.jsonl")}

    # ------------------------------------------------------------ the loop

    def run_one(self, group: Group, system: str, seed: int | None) -> dict:
        out = group.run_dir(system, seed)
        previous = read_json(out / "summary.json")
        if previous and (previous.get("status") == "completed"
                         or (previous.get("status") in FINAL and not self.args.retry_failed)):
            log(f"{group.name} {system}{'' if seed is None else f' seed {seed}'}: reusing ({previous['status']})")
            return previous
        if previous and previous.get("status") == "failed" and self.args.retry_failed:
            # start over: calls, caches and run directories of the failed attempt are kept aside, not counted
            aside = out.with_name(f"{out.name}.failed-{datetime.now(UTC):%Y%m%d-%H%M%S}")
            out.rename(aside)
            log(f"{group.name} {system}{'' if seed is None else f' seed {seed}'}: the failed attempt is kept in {aside}")
        out.mkdir(parents=True, exist_ok=True)
        write_json(group.dir / "group.json", group.settings)
        log(f"{group.name} {system}{'' if seed is None else f' seed {seed}'}: running")
        if tool_of(system) == "dspy":
            summary = self.run_dspy(group, system, seed, out)
        else:
            summary = self.run_autodiff(group, system, seed, out)
        summary.update(system=system, seed=seed, group=group.settings,
                       server={"command": shlex.join(self.server.command()), "gguf": str(self.server.gguf)}
                       if self.server is not None else None)
        if summary["status"] != "not_available":
            write_json(out / "summary.json", summary)
        log(f"{group.name} {system}{'' if seed is None else f' seed {seed}'}: {summary['status']}"
            + (f" ({summary.get('reason')})" if summary.get("reason") and summary["status"] != "completed" else ""))
        return summary

    def run(self, groups: list[Group]) -> int:
        self.runner.install()
        failed = 0
        try:
            for group in groups:
                self.export(group)
                for system, seed in group.runs(self.args.system):
                    summary = self.run_one(group, system, seed)
                    failed += summary["status"] in ("failed", "error")
                    if summary["status"] == "not_available":
                        write_json(group.run_dir(system, seed) / "not_available.json", summary)
        except bench.Interrupted:
            log("interrupted; run the same command again to continue")
            return EXIT_INTERRUPTED
        finally:
            self.runner.restore()
            self.stop_services()
        return EXIT_FAILED if failed else 0


def serve_api_base(port: int, tag: str, role: str) -> str:
    return f"http://127.0.0.1:{port}/t/{tag}/{role}/v1"


# ---------------------------------------------------------------- report


def _role_sum(calls: dict, phases: tuple[str, ...], roles: tuple[str, ...]) -> tuple[int, int]:
    n = tokens = 0
    for phase in phases:
        for role, c in (calls.get(phase) or {}).items():
            if role in roles:
                n += c["calls"]
                tokens += c["prompt_tokens"] + c["completion_tokens"]
    return n, tokens


def collect(group: Group, systems: list[str]) -> list[dict]:
    """One fact per run of the group (recorded summaries; not-available systems too)."""
    facts = []
    for system, seed in group.runs(systems):
        out = group.run_dir(system, seed)
        s = read_json(out / "summary.json") or read_json(out / "not_available.json")
        if s is None:
            facts.append({"system": system, "seed": seed, "status": "not run", "rows": {}, "summary": {}})
            continue
        rows, val, wall_opt, wall_total = {}, None, None, None
        if tool_of(system) == "dspy":
            result = s.get("result") or {}
            rows = bench.read_rows(out / "test.jsonl") if s["status"] == "completed" else {}
            val = ((result.get("scores") or {}).get("val") or {}).get("score")
            walls = result.get("wall_seconds") or {}
            wall_opt, wall_total = walls.get("optimize"), sum(walls.values()) if walls else None
        elif s["status"] != "not_available":
            evals = s.get("evals") or {}
            test = evals.get("test") or {}
            rows = bench.read_rows(Path(test["out"])) if test.get("out") and (test.get("result") or test.get("same_as_initial")) else {}
            if system == "autodiff-initial":
                val = ((evals.get("val") or {}).get("result") or {}).get("score")
                wall_opt = 0.0
            else:
                ad = s.get("autodiff_summary") or {}
                val = (ad.get("best") or {}).get("val")
                wall_opt = ad.get("wall_seconds")
            wall_total = (wall_opt or 0.0) + sum((e.get("wall_seconds") or 0.0) for e in evals.values())
        calls = s.get("calls") or {}
        facts.append({"system": system, "seed": seed, "status": s["status"], "reason": s.get("reason"), "summary": s,
                      "rows": rows, "val": val, "wall_opt": wall_opt, "wall_total": wall_total,
                      "task": _role_sum(calls, ("optimize",), serve.TASK_ROLES),
                      "meta": _role_sum(calls, ("optimize",), ("backward", "optimizer", "prompt", "reflection")),
                      "scoring": _role_sum(calls, ("val", "test"), serve.ROLES),
                      "refused": sum(c.get("refused", 0) for c in (calls.get("optimize") or {}).values()),
                      "out": out})
    return facts


def _score(rows: dict) -> tuple[float | None, int]:
    ok = [float(r["score"]) for r in rows.values() if r.get("error") in (None, "") and r.get("score") is not None]
    return (math.fsum(ok) / len(ok) if ok else None), len(ok)


def _cell(iv) -> str:
    if iv is None:
        return "–"
    mean, low, high = iv
    return f"{bench._signed(mean)} [{bench._signed(low)}, {bench._signed(high)}]" + (" **win**" if low > 0 else "")


def _delta(a: dict, b: dict, resamples: int):
    """Paired bootstrap of mean(b − a) over the examples scored in both."""
    if not a or not b:
        return None
    return bench.paired_bootstrap(list(bench.paired_diffs_by_id(a, b).values()), resamples)


def best_dspy(facts: list[dict], seed: int | None) -> dict | None:
    """The DSPy optimizer run of this seed with the highest val score (chosen on val, never on test)."""
    runs = [f for f in facts if tool_of(f["system"]) == "dspy" and f["system"] != "dspy-none" and f["seed"] == seed
            and f["status"] == "completed" and f.get("val") is not None and f["rows"]]
    return max(runs, key=lambda f: f["val"], default=None)


def render_group(group: Group, facts: list[dict], resamples: int, notes: list[str]) -> list[str]:
    by_key = {(f["system"], f["seed"]): f for f in facts}
    initials = {tool: by_key.get((name, None)) for tool, name in INITIAL.items()}
    s = group.settings
    test_n = next((len(f["rows"]) for f in facts if f["rows"]), None)
    lines = [f"### {group.task} — `{group.alias}`, budget {group.budget} task-model calls per run", "",
             (f"Rows: {', '.join(f'{k} {v}' for k, v in _sizes(group).items())} (`{group.info['config']}`"
              f"{', first N of each split' if group.sizes else ''}); test n = {test_n if test_n is not None else '–'}. "
              f"Temperatures: task {_task_temp(group)}, optimizer / MIPROv2 prompt model / GEPA reflection "
              f"{s['meta_temperature']}, demo teacher {s['teacher_temperature']}; max_tokens of those roles "
              f"{s['meta_max_tokens']}; {s['concurrency']} call(s) in flight per tool. Run directory "
              f"`{_shown(group.dir)}`."), "",
             ("| system | seed | val | test (n) | Δ test vs its initial [95% CI] | Δ test vs best DSPy [95% CI] "
              "| task calls / tokens (optimize) | optimizer calls / tokens | scoring calls | wall optimize | wall total "
              "| load avg at start | status |"),
             "|---|---:|---:|---:|---|---|---:|---:|---:|---:|---:|---|---|"]
    for f in facts:
        sysname, seed = f["system"], f["seed"]
        if f["status"] in ("not run", "not_available"):
            lines.append(f"| {sysname} | {'–' if seed is None else seed} | – | – | – | – | – | – | – | – | – | – "
                         f"| {f['status'].replace('_', ' ')} |")
            if f["status"] == "not_available":
                notes.append(f"{group.task} {sysname}: not available in the installed autodiff "
                             f"(settings `{' '.join(f['summary'].get('settings') or [])}`): {f.get('reason')}")
            continue
        score, n = _score(f["rows"])
        own = initials.get(tool_of(sysname))
        vs_initial = "–" if own is None or own is f else _cell(_delta(own["rows"], f["rows"], resamples))
        best = best_dspy(facts, seed)
        vs_best = "–" if best is None or seed is None else ("(best DSPy)" if best is f else
                                                            _cell(_delta(best["rows"], f["rows"], resamples)))
        task_calls, task_tokens = f["task"]
        over = f" **over {group.budget}**" if task_calls > group.budget else ""
        load = "/".join(f"{x:.2f}" for x in f["summary"].get("load_average_start") or []) or "–"
        lines.append(
            f"| {sysname} | {'–' if seed is None else seed} | {bench._f(f.get('val'))} | {bench._f(score)} ({n}) "
            f"| {vs_initial} | {vs_best} | {task_calls}{over} / {bench._compact(task_tokens)} "
            f"| {f['meta'][0]} / {bench._compact(f['meta'][1])} | {f['scoring'][0]} | {bench._wall(f.get('wall_opt'))} "
            f"| {bench._wall(f.get('wall_total'))} | {load} | {f['status']} |")
        notes.extend(_run_notes(group, f))
    # across seeds
    multi = {}
    for f in facts:
        if f["seed"] is not None and f["rows"]:
            multi.setdefault(f["system"], []).append(f)
    multi = {k: v for k, v in multi.items() if len(v) > 1}
    if multi:
        dspy_means = {k: statistics.mean(x["val"] for x in v) for k, v in multi.items()
                      if tool_of(k) == "dspy" and all(x.get("val") is not None for x in v)}
        best_sys = max(dspy_means, key=dspy_means.get, default=None)
        lines += ["", (f"Across seeds ({group.task}): each test example's score is averaged over the seeds before "
                       "resampling, so an example's seeds stay together. Best DSPy system by mean val: "
                       f"{best_sys or '–'}."), "",
                  ("| system | seeds | val mean | test mean ± sd | pooled Δ vs its initial [95% CI] "
                   "| pooled Δ vs best DSPy system [95% CI] | task calls mean | wall total mean |"),
                  "|---|---:|---:|---|---|---|---:|---:|"]
        for system, runs in multi.items():
            tests = [_score(r["rows"])[0] for r in runs]
            own = initials.get(tool_of(system))
            pooled_initial = None
            if own is not None and own["rows"]:
                pooled_initial = bench.paired_bootstrap(
                    bench.pooled_diffs([bench.paired_diffs_by_id(own["rows"], r["rows"]) for r in runs]), resamples)
            pooled_best = "–"
            if best_sys is not None and system != best_sys:
                base = {r["seed"]: r for r in multi[best_sys]}
                pairs = [bench.paired_diffs_by_id(base[r["seed"]]["rows"], r["rows"]) for r in runs if r["seed"] in base]
                pooled_best = _cell(bench.paired_bootstrap(bench.pooled_diffs(pairs), resamples)) if pairs else "–"
            elif system == best_sys:
                pooled_best = "(best DSPy)"
            vals = [r["val"] for r in runs if r.get("val") is not None]
            lines.append(f"| {system} | {len(runs)} | {bench._f(statistics.mean(vals) if vals else None)} "
                         f"| {bench._f(statistics.mean(tests))} ± {statistics.stdev(tests):.3f} "
                         f"| {_cell(pooled_initial) if own is not None else '–'} | {pooled_best} "
                         f"| {statistics.mean(r['task'][0] for r in runs):.0f} "
                         f"| {bench._wall(statistics.mean(r.get('wall_total') or 0 for r in runs))} |")
    lines.append("")
    return lines


def _sizes(group: Group) -> dict:
    task = json.loads(group.task_json.read_text(encoding="utf-8")) if group.task_json else None
    return {s: task["files"][s]["n"] for s in tasklib.SPLITS} if task else group.sizes


def _task_temp(group: Group) -> str:
    task = json.loads(group.task_json.read_text(encoding="utf-8")) if group.task_json else {}
    return str((task.get("task_model") or {}).get("temperature"))


def _run_notes(group: Group, f: dict) -> list[str]:
    where = f"{group.task} {f['system']}" + ("" if f["seed"] is None else f" seed {f['seed']}")
    s, notes = f["summary"], []
    if f["status"] not in ("completed",):
        reason = " ".join(str(f.get("reason") or "–").split())  # one line: it is a list item
        notes.append(f"{where}: {f['status']}: {reason[:400]}{'…' if len(reason) > 400 else ''}")
    if f["refused"]:
        notes.append(f"{where}: the proxy refused {f['refused']} task-model calls past the budget (they reached no "
                     "model; the tool saw an error for each)")
    _, n = _score(f["rows"])
    if f["rows"] and n < len(f["rows"]):
        notes.append(f"{where}: {len(f['rows']) - n} test examples had model-call errors and are left out")
    if tool_of(f["system"]) == "dspy":
        result = s.get("result") or {}
        d = result.get("details") or {}
        test = (result.get("scores") or {}).get("test") or {}
        if test.get("format_failures"):
            notes.append(f"{where}: {test['format_failures']} of {test.get('n')} test replies were not in DSPy's "
                         "format (ChatAdapter, then its JSON fallback): no answer, scored 0")
        if "mipro_trials" in d:
            notes.append(f"{where}: MIPROv2 light chose {d['mipro_auto_trials']} trials; the budget paid for "
                         f"{d['mipro_trials']} (valset {d['mipro_valset']}, minibatch "
                         f"{d['mipro_minibatch_size'] or 'off'}; {d['task_calls_before_trials']} task calls spent on "
                         "bootstrapping before the trials)" + (f"; {d['mipro_note']}" if d.get("mipro_note") else ""))
        if "gepa_max_metric_calls" in d:
            notes.append(f"{where}: GEPA max_metric_calls {d['gepa_max_metric_calls']} (light: "
                         f"{d['gepa_light_metric_calls']}, budget cap {d['gepa_cap_metric_calls']})"
                         + (f"; it used {d['total_metric_calls']}, {d.get('candidates')} candidates"
                            if d.get("total_metric_calls") is not None else "")
                         + (f"; {d['gepa_note']}" if d.get("gepa_note") else ""))
        calls = result.get("dspy_calls") or {}
        asked = sum((calls.get("test") or {}).values())
        per_example = (f["summary"].get("job") or {}).get("calls_per_example", 1)
        if test.get("n") and asked > test["n"] * per_example:
            notes.append(f"{where}: DSPy asked the model {asked} times for {test['n']} test examples "
                         f"({per_example} LM call(s) each): the extra calls are its ChatAdapter's fallback to "
                         "JSONAdapter after a reply it could not parse")
        dspy_task = sum(n for role, n in (calls.get("optimize") or {}).items() if role in serve.TASK_ROLES)
        cached = dspy_task - f["task"][0] - f["refused"]
        if cached > 0:
            notes.append(f"{where}: DSPy made {dspy_task} task-model LM calls while optimizing; {cached} of them "
                         "were answered by its own cache (a program evaluated again on the same example)")
    else:
        ad = s.get("autodiff_summary") or {}
        usage = ad.get("usage") or {}
        own = sum((usage.get(r) or {}).get("calls", 0) for r in serve.TASK_ROLES)
        if ad and own != f["task"][0]:
            notes.append(f"{where}: autodiff's summary counts {own} task+teacher calls, the proxy {f['task'][0]}")
        if (s.get("evals") or {}).get("test", {}).get("same_as_initial"):
            notes.append(f"{where}: no change was kept; its test rows are the initial prompt's")
    return notes


def export_prompts(group: Group, facts: list[dict], prompts_dir: Path, notes: list[str]) -> None:
    """Each run's best prompts as <config>-<system>-seed<N>.yaml: `autodiff export-prompts --format yaml` for
    autodiff's runs; for DSPy's, its saved program's instructions and demos per predictor."""
    import yaml

    config = Path(group.info["config"]).stem
    for f in facts:
        if f["status"] not in ("completed", "budget_exhausted") or f["system"] in INITIAL.values():
            continue
        path = prompts_dir / f"{config}-{f['system']}-seed{f['seed']}.yaml"
        path.parent.mkdir(parents=True, exist_ok=True)
        if tool_of(f["system"]) == "autodiff":
            run_dir = f["summary"].get("run_dir")
            proc = subprocess.run(bench.cli("export-prompts", str(run_dir), "--format", "yaml", "-o", str(path)),
                                  capture_output=True, text=True, check=False)
            if proc.returncode != 0:
                notes.append(f"export-prompts {run_dir}: {bench.error_paragraph(proc.stderr.splitlines())}")
        else:
            program = ((f["summary"].get("result") or {}).get("program")) or []
            doc = {p["predictor"]: {"instructions": p["instructions"], "demos": p["demos"]} for p in program}
            bench.atomic_write(path, f"# DSPy {f['system']} seed {f['seed']}: instructions and demos per predictor "
                                     f"(from {_shown(f['out'] / 'program.json')})\n"
                               + yaml.safe_dump(doc, sort_keys=False, allow_unicode=True, width=100))


def report(args: argparse.Namespace, groups: list[Group]) -> int:
    name = args.section or "Peers: DSPy vs autodiff on " + ", ".join(dict.fromkeys(g.alias for g in groups))
    if "--" in name or ">" in name:
        raise SystemExit("--section: may not contain '--' or '>'")
    command = "python benchmarks/peers/run.py " + shlex.join(a for a in args.argv if a != "--report")
    versions = _venv_versions(args.venv) or {}
    lines = [f"<!-- bench:{name} -->", f"## {name}", "",
             "Command (run it again to resume; `--report` rewrites this section from what is recorded):", "",
             "```", command, "```", "",
             f"Machine: {bench.machine()}  ", f"Date: {datetime.now(UTC):%Y-%m-%d %H:%M UTC}  ",
             f"Load average now (1/5/15 min): {', '.join(f'{x:.2f}' for x in os.getloadavg())}  ",
             ("Model server: llama-cpp-python's `python -m llama_cpp.server` "
              f"{versions.get('llama_cpp_python', '?')} (n_ctx 8192, the GGUF's chat template; each run's summary.json "
              "holds the exact server command) behind the counting proxy of `benchmarks/peers/serve.py`; both tools "
              "call it as `openai/<alias>` through litellm "
              f"(autodiff: litellm {_main_litellm()}; DSPy {versions.get('dspy', '?')} with litellm "
              f"{versions.get('litellm', '?')}, gepa {versions.get('gepa', '?')}, optuna {versions.get('optuna', '?')})."),
             ""]
    notes: list[str] = []
    for group in groups:
        try:
            group.task_json = tasklib.export_task(group.task, args.work, group.sizes)
        except Exception:  # noqa: BLE001 - the report still renders from the summaries
            group.task_json = None
        facts = collect(group, args.system)
        if not any(f["status"] != "not run" for f in facts):
            lines += [f"### {group.task} — `{group.alias}`", "", "No recorded runs.", ""]
            continue
        lines += render_group(group, facts, args.bootstrap, notes)
        export_prompts(group, facts, args.prompts_dir, notes)
    lines += [(
        "How to read it: **val** is the chosen program's score on the whole validation split (autodiff: its best "
        "validation score in training; DSPy: the optimized program scored on val after optimizing). **Δ vs its "
        "initial** compares with the same tool's unoptimized program (`autodiff-initial`: autodiff's initial prompts; "
        "`dspy-none`: `Predict` with the initial instruction), **Δ vs best DSPy** with the DSPy optimizer run of the "
        "same seed that scored best on val. Both are paired percentile bootstraps "
        f"({args.bootstrap:,} resamples) of the mean per-example test difference over the examples scored in both; "
        "**win** = the interval's lower bound is above 0. **task calls** are the task and teacher calls that "
        "reached the model server during optimization, counted by the proxy (cache hits never reach it); "
        "**optimizer calls** are autodiff's backward and optimizer calls, MIPROv2's prompt-model calls and GEPA's "
        "reflection calls; **scoring calls** are the final val and test scorings (outside the budget). autodiff's "
        "`train.budget.max_calls` counts all its calls, so its task calls stay below the budget by its optimizer "
        "calls: the budget is tilted against autodiff, never for it. Prompts of every run: "
        f"`{_shown(args.prompts_dir)}/"
        "<config>-<system>-seed<N>.yaml`. What installing and running DSPy against the local server involved: "
        "benchmarks/README.md, \"What a user meets running DSPy against a local model\".")]
    if notes:
        lines += ["", "Notes:", ""] + [f"- {n}" for n in dict.fromkeys(notes)]
    lines.append(f"<!-- /bench:{name} -->")
    bench.write_section(args.results, name, "\n".join(lines) + "\n")
    log(f"wrote section `{name}` of {args.results}")
    print(args.results)
    return 0


def _shown(path: Path) -> str:
    return str(path.relative_to(ROOT) if path.is_relative_to(ROOT) else path)


def _main_litellm() -> str:
    try:
        return importlib.metadata.version("litellm")
    except importlib.metadata.PackageNotFoundError:
        return "?"


# ---------------------------------------------------------------- main


def dry_run(args: argparse.Namespace, groups: list[Group]) -> int:
    for group in groups:
        sizes = ", ".join(f"{k} {v}" for k, v in group.sizes.items()) or "the config's"
        print(f"{group.name}: budget {group.budget} task-model calls, sizes: {sizes}, seeds {group.seeds}")
        for system, seed in group.runs(args.system):
            s = read_json(group.run_dir(system, seed) / "summary.json")
            action = ("reuse" if s and (s["status"] == "completed" or (s["status"] in FINAL and not args.retry_failed))
                      else "resume" if group.run_dir(system, seed).exists() else "start")
            print(f"  {system}{'' if seed is None else f' seed {seed}'}: {action}"
                  + (f" ({s['status']})" if s else ""))
    return 0


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    groups = [Group(args, t) for t in args.task]
    if args.dry_run:
        return dry_run(args, groups)
    if args.report:
        return report(args, groups)
    signal.signal(signal.SIGPIPE, signal.SIG_DFL)
    code = Harness(args).run(groups)
    if code != EXIT_INTERRUPTED:
        report(args, groups)
    return code


if __name__ == "__main__":
    sys.exit(main())
