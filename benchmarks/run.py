#!/usr/bin/env python3
"""Benchmark runner: train and score config x mode x seed with the `autodiff` CLI, resumably,
and write one section of benchmarks/RESULTS.md.

    python benchmarks/run.py --config configs/object_count.yaml --mode autodiff --mode none \
        --seed 0 --set models.task.model=local/qwen2.5-coder-1.5b --section "ObjectCount, Qwen"

For each (config, mode, seed) the runner keeps an entry in WORK/state.json (written atomically
the moment anything is known, so a kill at any time loses nothing):
  - a recorded run whose summary.json says `completed` (or `budget_exhausted`, `failed`: final
    outcomes, see --retry-failed) is reused;
  - one that says `interrupted` or `running` (killed) is continued with `autodiff train CONFIG
    --resume RUN_DIR` and the same --set options;
  - otherwise a new run starts: `autodiff train CONFIG --runs-dir WORK/runs --set train.mode=M
    --set train.seed=S --set ...`.
Then the initial and the best prompts are scored per example on `test` (on `val` when the config
has no test split) with `autodiff eval ... --out FILE --json` (the call cache makes re-scoring
free), and the paired bootstrap interval of mean(best - initial) is computed over the examples
that completed in both. See benchmarks/README.md.

With `--variant 'NAME=K=V[,K=V...]'` (repeatable) every (config, mode, seed) is run once per
variant, with the variant's settings appended to the --set options, and the table gets a
`variant` column. A run is keyed by the combined --set options exactly as a plain invocation
with those options would key it, so a variant without settings (`'NAME='`) reuses the plain runs.

Only the standard library and PyYAML (a dependency of the project) are used; the CLI is run as
`sys.executable -m autodiff_cli.app.cli`.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import platform
import random
import re
import shlex
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
from datetime import UTC, datetime
from pathlib import Path

import yaml

HERE = Path(__file__).resolve().parent
MODES = ("autodiff", "textgrad", "no_gradient", "none")
ROLES = ("task", "backward", "optimizer")
REUSED = {"completed", "budget_exhausted", "failed"}  # final outcomes of a training run
RESUMABLE = {"interrupted", "running"}  # `running` on disk means the process was killed
SCORED = {"completed", "budget_exhausted"}  # runs whose best prompts are scored
STATE_VERSION = 1
EXIT_USAGE, EXIT_INTERRUPTED = 2, 130
_RUN_DIR_LOG = re.compile(r"^\[\d\d:\d\d:\d\d\] (?:run directory|resuming) (.+?)(?: after step \d+)?$")


class Interrupted(Exception):
    """The runner got SIGINT/SIGTERM: the state is saved, stop and exit 130."""


def log(message: str) -> None:
    stamp = datetime.now(UTC).strftime("%H:%M:%S")
    print(f"[{stamp}] bench: {message}", file=sys.stderr, flush=True)


# ---------------------------------------------------------------- options


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(
        prog="benchmarks/run.py",
        description="Train and score config x mode x seed with the autodiff CLI (resumable) and write one "
                    "section of the results file.")
    ap.add_argument("--config", action="append", required=True, type=Path, metavar="PATH",
                    help="a pipeline spec (repeatable)")
    ap.add_argument("--mode", action="append", choices=MODES, metavar="M",
                    help=f"training mode (repeatable): {', '.join(MODES)}; default autodiff")
    ap.add_argument("--seed", action="append", type=int, metavar="N", help="train.seed (repeatable; default 0)")
    ap.add_argument("--set", action="append", default=[], dest="sets", metavar="K=V",
                    help="passed to every train and eval, e.g. models.task.model=local/qwen2.5-coder-1.5b")
    ap.add_argument("--variant", action="append", default=[], dest="variants", metavar="NAME=K=V[,K=V...]",
                    help="run everything once per variant, with the variant's K=V settings passed after the --set "
                         "options (repeatable; 'NAME=' for none; a value may contain '=' but not ','); "
                         "the table gets a variant column")
    ap.add_argument("--work", type=Path, default=HERE / "work", metavar="DIR",
                    help="run directories, eval outputs and state.json (default: benchmarks/work)")
    ap.add_argument("--results", type=Path, default=HERE / "RESULTS.md", metavar="FILE",
                    help="the results file (default: benchmarks/RESULTS.md)")
    ap.add_argument("--section", metavar="NAME", help="heading of the section written (default: the config names)")
    ap.add_argument("--bootstrap", type=int, default=10000, metavar="N", help="bootstrap resamples (default 10000)")
    ap.add_argument("--retry-failed", action="store_true",
                    help="start runs recorded as failed or budget_exhausted over instead of reusing them")
    ap.add_argument("--dry-run", action="store_true", help="print the plan; run nothing, write nothing")
    ap.add_argument("--report-only", action="store_true",
                    help="write the section from the runs and scores already recorded; run nothing and leave "
                         "state.json alone (safe while another benchmark runs); fails if one is missing")
    args = ap.parse_args(argv)
    args.mode = list(dict.fromkeys(args.mode or ["autodiff"]))
    args.seed = list(dict.fromkeys(args.seed if args.seed is not None else [0]))
    for s in args.sets:
        key = s.split("=", 1)[0].strip()
        if "=" not in s:
            ap.error(f"--set {s!r}: expected KEY=VALUE")
        if key in ("train.mode", "train.seed"):
            ap.error(f"--set {key}=...: use --mode / --seed, the runner sets it per run")
    try:
        args.variants = parse_variants(args.variants)
    except ValueError as e:
        ap.error(str(e))
    for c in args.config:
        if not c.is_file():
            ap.error(f"--config {c}: no such file")
    if args.bootstrap < 100:
        ap.error("--bootstrap: expected at least 100 resamples")
    if args.section is None:
        args.section = " + ".join(dict.fromkeys(c.stem for c in args.config))
    if "--" in args.section or ">" in args.section or "\n" in args.section:
        ap.error("--section: may not contain '--', '>' or a newline (it goes into an HTML comment marker)")
    return args


def parse_variants(texts: list[str]) -> list[tuple[str | None, list[str]]]:
    """[(name, extra sets)] from --variant 'NAME=K=V[,K=V...]' values; [(None, [])] when there are none.

    NAME is everything before the first '='; the rest is split on ',' into K=V settings (whitespace
    around each is dropped); 'NAME=' is a variant without settings. ValueError on a bad one."""
    if not texts:
        return [(None, [])]
    variants: list[tuple[str | None, list[str]]] = []
    for text in texts:
        name, eq, rest = text.partition("=")
        name = name.strip()
        if not eq:
            raise ValueError(f"--variant {text!r}: expected NAME=K=V[,K=V...] (or 'NAME=' for a variant "
                             "without settings)")
        if not name:
            raise ValueError(f"--variant {text!r}: no name before the first '=' (expected NAME=K=V[,K=V...])")
        if "|" in name or "\n" in name:
            raise ValueError(f"--variant {text!r}: the name may not contain '|' or a newline (it is a table cell)")
        sets = [] if not rest.strip() else [item.strip() for item in rest.split(",")]
        for item in sets:
            key = item.split("=", 1)[0].strip()
            if "=" not in item or not key:
                raise ValueError(f"--variant {text!r}: setting {item!r} is not K=V (settings are separated by ',' "
                                 "and a value may not contain ',')")
            if key in ("train.mode", "train.seed"):
                raise ValueError(f"--variant {text!r}: {key} may not be set by a variant; use --mode / --seed")
        for other, other_sets in variants:
            if other == name:
                raise ValueError(f"--variant {text!r}: the name {name!r} is given twice")
            if other_sets == sets:
                raise ValueError(f"--variant {text!r}: the same settings as variant {other!r} (they would be "
                                 "the same runs)")
        variants.append((name, sets))
    return variants


# ---------------------------------------------------------------- state


def atomic_write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


class State:
    """WORK/state.json: {runs: {key: entry}, initial_evals: {key: eval}}; paths relative to WORK."""

    def __init__(self, work: Path, readonly: bool = False):
        self.work = work.resolve()
        self.path = self.work / "state.json"
        self.readonly = readonly
        self.data = {"schema_version": STATE_VERSION, "runs": {}, "initial_evals": {}}
        if self.path.exists():
            self.data.update(json.loads(self.path.read_text(encoding="utf-8")))

    def save(self) -> None:
        if not self.readonly:
            atomic_write(self.path, json.dumps(self.data, indent=2, ensure_ascii=False) + "\n")

    def rel(self, path: Path | str) -> str:
        p = Path(path).resolve()
        try:
            return str(p.relative_to(self.work))
        except ValueError:
            return str(p)

    def abs(self, path: str | None) -> Path | None:
        return None if path is None else (self.work / path).resolve()


def sets_hash(sets: list[str]) -> str:
    return hashlib.sha256(json.dumps(sets).encode()).hexdigest()[:10]


def config_id(config: Path) -> str:
    return str(config.resolve())


def run_key(config: Path, mode: str, seed: int, sets: list[str]) -> str:
    return f"{config_id(config)}|{mode}|seed={seed}|sets={sets_hash(sets)}"


def initial_key(config: Path, sets: list[str], split: str) -> str:
    return f"{config_id(config)}|sets={sets_hash(sets)}|{split}"  # see also row_facts


# ---------------------------------------------------------------- subprocesses


def cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "autodiff_cli.app.cli", *args]


def show(cmd: list[str]) -> str:
    shown = ["autodiff", *cmd[3:]] if cmd[:3] == cli() else cmd
    return shlex.join(shown)


class Runner:
    """Runs one CLI child at a time; SIGINT/SIGTERM are forwarded to it (a second one kills it)."""

    def __init__(self) -> None:
        self.child: subprocess.Popen | None = None
        self.stop = False
        self._old = {}

    def install(self) -> None:
        for sig in (signal.SIGINT, signal.SIGTERM):
            self._old[sig] = signal.signal(sig, self._on_signal)

    def restore(self) -> None:
        for sig, handler in self._old.items():
            signal.signal(sig, handler)
        self._old.clear()

    def _on_signal(self, signum, frame) -> None:
        again = self.stop
        self.stop = True
        child = self.child
        if child is not None and child.poll() is None:
            try:
                child.send_signal(signal.SIGKILL if again else signal.SIGTERM)
            except ProcessLookupError:
                pass

    def check(self) -> None:
        if self.stop:
            raise Interrupted()

    def run(self, cmd: list[str], on_line=None) -> tuple[int, list[str], list[str]]:
        """Run `cmd`, echo its stderr, call on_line(line) per stderr line; (code, stdout lines, stderr lines)."""
        self.check()
        log("$ " + show(cmd))
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                encoding="utf-8", errors="replace", bufsize=1)
        self.child = proc
        out: list[str] = []
        reader = threading.Thread(target=lambda: out.extend(proc.stdout), daemon=True)
        reader.start()
        err: list[str] = []
        try:
            for line in proc.stderr:
                sys.stderr.write(line)
                sys.stderr.flush()
                err.append(line.rstrip("\n"))
                del err[:-200]
                if on_line is not None:
                    on_line(line.rstrip("\n"))
            code = proc.wait()
            reader.join()
        finally:
            self.child = None
        return code, [line.rstrip("\n") for line in out], err


def error_paragraph(stderr: list[str]) -> str:
    """The CLI's one-paragraph error (from the last `error:` line), else the last stderr line."""
    for i in range(len(stderr) - 1, -1, -1):
        if stderr[i].startswith("error:"):
            return " ".join(x.strip() for x in stderr[i:i + 4] if x.strip())[:500]
    return (stderr[-1].strip() if stderr else "no output")[:500]


# ---------------------------------------------------------------- one run


def read_summary(run_dir: Path | None) -> dict | None:
    if run_dir is None:
        return None
    try:
        return json.loads((run_dir / "summary.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def plan_action(entry: dict | None, state: State, retry_failed: bool) -> tuple[str, Path | None, dict | None]:
    """('reuse' | 'resume' | 'start', run dir, summary) for a state entry."""
    run_dir = state.abs(entry.get("run_dir")) if entry else None
    summary = read_summary(run_dir)
    if summary is None:
        return "start", None, None
    status = summary.get("status")
    if status == "completed" or (status in REUSED and not retry_failed):
        return "reuse", run_dir, summary
    if status in RESUMABLE:
        return "resume", run_dir, summary
    return "start", None, None


def train_sets(mode: str, seed: int, sets: list[str]) -> list[str]:
    return [arg for s in (f"train.mode={mode}", f"train.seed={seed}", *sets) for arg in ("--set", s)]


def ensure_trained(runner: Runner, state: State, config: Path, mode: str, seed: int, sets: list[str],
                   retry_failed: bool, variant: str | None = None) -> dict:
    """Train (or reuse, or resume) one run; `sets` are all the --set options (a variant's included)."""
    what = f"{config.name}{'' if variant is None else f' [{variant}]'} {mode} seed {seed}"
    key = run_key(config, mode, seed, sets)
    entry = state.data["runs"].get(key)
    action, run_dir, summary = plan_action(entry, state, retry_failed)
    if action == "reuse":
        entry["status"] = summary["status"]
        log(f"{what}: reusing {run_dir} ({summary['status']})")
        return entry
    if action == "resume":
        cmd = cli("train", str(config), "--resume", str(run_dir), *train_sets(mode, seed, sets))
    else:
        cmd = cli("train", str(config), "--runs-dir", str(state.work / "runs"), *train_sets(mode, seed, sets))
    entry = state.data["runs"][key] = {
        "config": str(config), "config_id": config_id(config), "mode": mode, "seed": seed, "sets": list(sets),
        "run_dir": state.rel(run_dir) if run_dir else None, "status": "running", "exit_code": None,
        "reason": None, "trainings": (entry or {}).get("trainings", 0) + 1 if action == "resume" else 1,
        "eval": None,
    }
    state.save()

    def on_line(line: str) -> None:
        m = _RUN_DIR_LOG.match(line)
        if m and entry["run_dir"] is None:
            entry["run_dir"] = state.rel(m.group(1))  # recorded the moment the CLI names it
            state.save()

    code, out, err = runner.run(cmd, on_line)
    if out and out[-1].strip() and code != EXIT_USAGE:
        entry["run_dir"] = state.rel(out[-1].strip())
    summary = read_summary(state.abs(entry["run_dir"]))
    entry["exit_code"] = code
    if code in (0, 3, 4, EXIT_INTERRUPTED) and summary is not None:
        entry["status"], entry["reason"] = summary.get("status"), summary.get("reason")
    else:
        entry["status"] = "error"
        entry["reason"] = f"train exited {code}: {error_paragraph(err)}"
        if action == "resume":
            entry["reason"] += (" (to start this run over, delete its run directory or its entry in "
                                f"{state.path})")
    state.save()
    log(f"{what}: {entry['status']} ({entry['run_dir']})")
    runner.check()
    return entry


# ---------------------------------------------------------------- scoring


def has_test_split(run_dir: Path) -> bool:
    resolved = yaml.safe_load((run_dir / "resolved.yaml").read_text(encoding="utf-8")) or {}
    data = resolved.get("data") or {}
    if data.get("generator"):
        return (data["generator"].get("test") or 0) > 0
    return data.get("test") is not None


def initial_values(run_dir: Path) -> dict:
    resolved = yaml.safe_load((run_dir / "resolved.yaml").read_text(encoding="utf-8")) or {}
    return {name: (p or {}).get("value") for name, p in (resolved.get("params") or {}).items()}


def best_is_initial(run_dir: Path) -> bool:
    try:
        best = yaml.safe_load((run_dir / "prompts.yaml").read_text(encoding="utf-8")) or {}
    except OSError:
        return False
    best = {k: (v.get("value") if isinstance(v, dict) else v) for k, v in best.items()}
    return best == initial_values(run_dir)


def run_eval(runner: Runner, state: State, config: Path, sets: list[str], split: str, out: Path,
             run_dir: Path | None) -> dict:
    cmd = cli("eval", str(config), *(["--run", str(run_dir)] if run_dir else []), "--split", split,
              "--out", str(out), "--json", *[arg for s in sets for arg in ("--set", s)])
    code, stdout, err = runner.run(cmd)
    record = {"split": split, "out": state.rel(out), "exit_code": code, "result": None, "error": None}
    lines = [x for x in stdout if x.strip()]
    if code in (0, 1, 3) and lines and out.exists():
        try:
            record["result"] = json.loads(lines[-1])
        except ValueError:
            record["error"] = f"eval exited {code} with unparsable output"
    else:
        record["error"] = f"eval exited {code}: {error_paragraph(err)}"
    runner.check()
    return record


def ensure_scored(runner: Runner, state: State, config: Path, sets: list[str], entry: dict) -> None:
    run_dir = state.abs(entry.get("run_dir"))
    if entry.get("status") not in SCORED or run_dir is None:
        return
    split = "test" if has_test_split(run_dir) else "val"
    ikey = initial_key(config, sets, split)
    initial = state.data["initial_evals"].get(ikey)
    if not (initial and initial.get("result") and state.abs(initial["out"]).exists()):
        out = state.work / "evals" / f"{config.stem}-{sets_hash(sets)}" / f"initial-{split}.jsonl"
        initial = state.data["initial_evals"][ikey] = run_eval(runner, state, config, sets, split, out, None)
        state.save()
    best = entry.get("eval")
    if best and best.get("result") and best.get("split") == split and state.abs(best["out"]).exists():
        return
    if initial.get("result") and best_is_initial(run_dir):
        best = dict(initial, same_as_initial=True)  # no change was kept: the initial rows are the best rows
    else:
        out = state.work / "evals" / run_dir.name / f"best-{split}.jsonl"
        best = run_eval(runner, state, config, sets, split, out, run_dir)
    entry["eval"] = best
    state.save()


def read_rows(path: Path | None) -> dict[str, dict]:
    if path is None or not path.exists():
        return {}
    from autodiff_cli.io.files import (
        read_jsonl,  # "\n" only: eval --out rows may hold U+2028
    )

    return {str(row["id"]): row for row in read_jsonl(path) or []}


def paired_diffs_by_id(initial: dict[str, dict], best: dict[str, dict]) -> dict[str, float]:
    """id -> best - initial, for each example that completed (no error, a score) in both; ordered by id."""
    def ok(r):
        return r is not None and r.get("error") in (None, "") and r.get("score") is not None
    return {i: float(best[i]["score"]) - float(initial[i]["score"])
            for i in sorted(initial) if ok(initial[i]) and ok(best.get(i))}


def pooled_diffs(per_seed: list[dict[str, float]]) -> list[float]:
    """Per example scored in every seed: the mean over seeds of its (best - initial), ordered by id.
    Bootstrapping these resamples examples, keeping each example's seeds together, so the interval
    answers "does this mode beat the initial prompt on this test set, across seeds"."""
    common = set.intersection(*(set(d) for d in per_seed)) if per_seed else set()
    return [math.fsum(d[i] for d in per_seed) / len(per_seed) for i in sorted(common)]


def paired_bootstrap(diffs: list[float], resamples: int = 10000, seed: int = 0,
                     level: float = 0.95) -> tuple[float, float, float] | None:
    """(mean, low, high): the percentile-bootstrap `level` interval of the mean of paired differences."""
    n = len(diffs)
    if n == 0:
        return None
    rng = random.Random(seed)
    means = sorted(math.fsum(rng.choices(diffs, k=n)) / n for _ in range(resamples))
    alpha = (1 - level) / 2
    low = means[max(0, math.floor(alpha * resamples))]
    high = means[min(resamples - 1, math.ceil((1 - alpha) * resamples) - 1)]
    return math.fsum(diffs) / n, low, high


# ---------------------------------------------------------------- report


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    ram = None
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                ram = int(line.split()[1]) / 1024 / 1024
                break
    except OSError:
        pass
    ram_text = f"{ram:.1f} GiB RAM" if ram else "RAM unknown"
    return f"{os.cpu_count()} cores ({cpu}), {ram_text}, Python {platform.python_version()}, {platform.system()}"


def _f(x) -> str:
    return "–" if x is None else f"{x:.3f}"


def _signed(x: float) -> str:
    return f"{x:+.3f}"


def _compact(n: float) -> str:
    if n < 1000:
        return f"{n:.0f}"
    if n < 1_000_000:
        return f"{n / 1000:.1f}k"
    return f"{n / 1_000_000:.2f}M"


def _wall(seconds) -> str:
    if seconds is None:
        return "–"
    s = round(seconds)
    if s < 60:
        return f"{seconds:.1f} s" if seconds < 10 else f"{s} s"
    if s < 3600:
        return f"{s // 60} min {s % 60:02d} s"
    return f"{s // 3600} h {s % 3600 // 60:02d} min"


def row_facts(state: State, entry: dict, bootstrap: int, variant: str | None = None) -> dict:
    """Everything one table row shows, from the run's summary.json and the eval rows."""
    run_dir = state.abs(entry.get("run_dir"))
    summary = read_summary(run_dir) or {}
    facts = {"entry": entry, "summary": summary, "split": None, "initial": None, "best": None, "delta": None,
             "n_paired": 0, "n": None, "variant": variant}
    best = entry.get("eval")
    if best:
        split = best["split"]
        ikey = f"{entry['config_id']}|sets={sets_hash(entry['sets'])}|{split}"
        initial = state.data["initial_evals"].get(ikey) or {}
        for which, ev in (("initial", initial), ("best", best)):
            if ev.get("error"):
                facts["eval_error"] = f"scoring the {which} prompts on {split} failed: {ev['error']}"
        if initial.get("result") and best.get("result"):
            facts["split"] = split
            facts["initial"], facts["best"] = initial["result"]["score"], best["result"]["score"]
            facts["n"] = initial["result"]["n"]
            diffs = paired_diffs_by_id(read_rows(state.abs(initial["out"])), read_rows(state.abs(best["out"])))
            facts["n_paired"] = len(diffs)
            facts["diffs"] = diffs
            facts["delta"] = paired_bootstrap(list(diffs.values()), bootstrap)
    return facts


def render_section(name: str, command: str, facts: list[dict], notes_extra: list[str], bootstrap: int = 10000) -> str:
    """The section; a `variant` column (and variant-wise seed summary) when a fact has a variant."""
    date = datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC")
    variants = any(f.get("variant") is not None for f in facts)
    vcol, vsep = ("variant | ", "---|") if variants else ("", "")
    models: dict[str, list[str]] = {}
    for f in facts:
        m = f["summary"].get("models")
        if m:
            text = " · ".join(f"{role} `{m[role]}`" for role in (*ROLES, "teacher") if m.get(role))
            models.setdefault(text, [])
            label = Path(f["entry"]["config"]).stem + (f" ({f['variant']})" if variants else "")
            if label not in models[text]:
                models[text].append(label)
    if len(models) == 1:
        model_line = next(iter(models))
    elif models:
        model_line = "; ".join(f"{', '.join(c)}: {t}" for t, c in models.items())
    else:
        model_line = "–"
    # the teacher (few-shot demo bootstrapping) gets its own column when a run used one
    def taught(f: dict) -> bool:
        teacher = (f["summary"].get("usage") or {}).get("teacher") or {}
        return bool(teacher.get("calls") or teacher.get("cached_calls"))

    roles = (*ROLES, "teacher") if any(taught(f) for f in facts) else ROLES
    lines = [f"<!-- bench:{name} -->", f"## {name}", "",
             "Command:", "", "```", command, "```", "",
             f"Machine: {machine()}  ", f"Date: {date}  ", f"Models: {model_line}", "",
             f"| config | {vcol}mode | seed | val initial | val best | test initial | test best | Δ test [95% CI] | win? "
             f"| steps | proposals tried/passed/accepted | calls {'/'.join(roles)} "
             f"| tokens {'/'.join(roles)} | cost $ | wall | status |",
             f"|---|{vsep}---|---:|---:|---:|---:|---:|---|---|---:|---|---|---|---:|---:|---|"]
    notes = list(notes_extra)
    for f in facts:
        e, s = f["entry"], f["summary"]
        init, best = s.get("initial") or {}, s.get("best") or {}
        usage = s.get("usage") or {}
        props = s.get("proposals") or {}
        mark = "" if f["split"] in (None, "test") else " †"
        if f["delta"] is not None:
            mean, low, high = f["delta"]
            delta = f"{_signed(mean)} [{_signed(low)}, {_signed(high)}]{mark}"
            win = "**yes**" if low > 0 else "no"
        else:
            delta, win = "–", "–"
        calls = "/".join(str((usage.get(r) or {}).get("calls", 0)) for r in roles) if usage else "–"
        cached = sum((u or {}).get("cached_calls", 0) for u in usage.values())
        calls += f" (+{cached} cached)" if cached else ""
        tokens = "/".join(_compact((usage.get(r) or {}).get("prompt_tokens", 0) + (usage.get(r) or {}).get("completion_tokens", 0))
                          for r in roles) if usage else "–"
        cost = f"{sum((u or {}).get('cost_usd', 0.0) for u in usage.values()):.4f}" if usage else "–"
        proposals = f"{props.get('tried', 0)}/{props.get('passed_subset', 0)}/{props.get('accepted', 0)}" if props else "–"
        label = Path(e["config"]).stem
        vcell = f"{f['variant']} | " if variants else ""
        lines.append(
            f"| {label} | {vcell}{e['mode']} | {e['seed']} | {_f(init.get('val'))} | {_f(best.get('val'))} "
            f"| {_f(f['initial'])}{mark} | {_f(f['best'])}{mark} | {delta} | {win} | {s.get('steps', '–')} "
            f"| {proposals} | {calls} | {tokens} | {cost} | {_wall(s.get('wall_seconds'))} | {e.get('status', '–')} |")
        where = f"`{label}` {e['mode']} seed {e['seed']}"
        if variants:
            where = f"`{label}` [{f['variant']}] {e['mode']} seed {e['seed']}"
        if e.get("status") not in ("completed",):
            notes.append(f"{where}: {e.get('status')}: {e.get('reason') or s.get('reason') or 'no reason recorded'}")
        if f["split"] == "val":
            notes.append(f"{where}: the config has no test split; † columns are scored on val")
        if f["delta"] is not None and f["n"] and f["n_paired"] < f["n"]:
            notes.append(f"{where}: {f['n'] - f['n_paired']} of {f['n']} {f['split']} examples had model-call "
                         f"errors in one of the two scorings and are left out of the interval")
        if f.get("eval_error"):
            notes.append(f"{where}: {f['eval_error']}")
        t = best.get("test")
        if f["split"] == "test" and t is not None and f["best"] is not None and abs(t - f["best"]) > 1e-9:
            notes.append(f"{where}: summary.json says best test {_f(t)}, the separate eval {_f(f['best'])}")
    # across seeds
    groups: dict[tuple[str, str | None, str], list[dict]] = {}
    for f in facts:
        if f["delta"] is not None:
            group = (Path(f["entry"]["config"]).stem, f.get("variant"), f["entry"]["mode"])
            groups.setdefault(group, []).append(f)
    multi = {k: v for k, v in groups.items() if len(v) > 1}
    if multi:
        lines += ["", "Across seeds (Δ test = mean(best − initial) per seed; the pooled interval resamples test "
                      "examples, each with its mean Δ over the seeds):", "",
                  f"| config | {vcol}mode | seeds | Δ test mean ± sd | pooled Δ [95% CI] | win? |",
                  f"|---|{vsep}---|---:|---|---|---|"]
        for (label, variant, mode), group in multi.items():
            ds = [f["delta"][0] for f in group]
            pooled = paired_bootstrap(pooled_diffs([f.get("diffs") or {} for f in group]), bootstrap)
            cell, win = ("–", "–") if pooled is None else (
                f"{_signed(pooled[0])} [{_signed(pooled[1])}, {_signed(pooled[2])}]", "**yes**" if pooled[1] > 0 else "no")
            vcell = f"{variant} | " if variants else ""
            lines.append(f"| {label} | {vcell}{mode} | {len(ds)} | {_signed(statistics.mean(ds))} "
                         f"± {statistics.stdev(ds):.3f} | {cell} | {win} |")
    lines += ["", "A win is claimed only where the paired-bootstrap 95% interval of mean(best − initial) "
                  "lies above 0."]
    if notes:
        lines += ["", "Notes:", ""] + [f"- {n}" for n in dict.fromkeys(notes)]
    lines.append(f"<!-- /bench:{name} -->")
    return "\n".join(lines) + "\n"


def write_section(results: Path, name: str, section: str) -> None:
    text = results.read_text(encoding="utf-8") if results.exists() else ""
    pattern = re.compile(re.escape(f"<!-- bench:{name} -->") + r".*?" + re.escape(f"<!-- /bench:{name} -->") + r"\n?",
                         re.DOTALL)
    if pattern.search(text):
        text = pattern.sub(lambda m: section, text, count=1)
    else:
        text = (text.rstrip("\n") + "\n\n" if text.strip() else "") + section
    atomic_write(results, text)


# ---------------------------------------------------------------- main


def variant_notes(variants: list[tuple[str | None, list[str]]]) -> list[str]:
    """One line per variant: its settings (passed after the common --set options)."""
    return [f"variant `{name}`: " + (" ".join(f"`--set {s}`" for s in sets) + " after the common `--set` options"
                                     if sets else "no settings beyond the common `--set` options")
            for name, sets in variants if name is not None]


def plan(args: argparse.Namespace):
    """(config, variant, sets, mode, seed) in table order: config > variant > mode > seed; a variant's
    settings come after the common --set options (they win)."""
    for config in args.config:
        for variant, vsets in args.variants:
            sets = [*args.sets, *vsets]
            for mode in args.mode:
                for seed in args.seed:
                    yield config, variant, sets, mode, seed


def dry_run(args: argparse.Namespace, state: State) -> None:
    variants = f" x {len(args.variants)} variant(s)" if args.variants[0][0] is not None else ""
    print(f"plan ({len(args.config)} config(s){variants} x {len(args.mode)} mode(s) x {len(args.seed)} seed(s)); "
          f"state {state.path}")
    for line in variant_notes(args.variants):
        print(line.replace("`", ""))
    for config, variant, sets, mode, seed in plan(args):
        shown = "" if variant is None else f" variant={shlex.quote(variant)}"
        entry = state.data["runs"].get(run_key(config, mode, seed, sets))
        action, run_dir, summary = plan_action(entry, state, args.retry_failed)
        print(f"- {config}{shown} mode={mode} seed={seed}: {action}"
              + (f" {run_dir} ({summary['status']})" if run_dir else ""))
        if action == "resume":
            print("    " + show(cli("train", str(config), "--resume", str(run_dir),
                                    *train_sets(mode, seed, sets))))
        elif action == "start":
            print("    " + show(cli("train", str(config), "--runs-dir", str(state.work / "runs"),
                                    *train_sets(mode, seed, sets))))
        set_args = [a for s in sets for a in ("--set", s)]
        print("    then (unless already scored): "
              + show(cli("eval", str(config), "--split", "test", "--out", "FILE", "--json", *set_args))
              + "  and the same with --run RUN_DIR (val when the config has no test split)")
    print(f"then: section `{args.section}` of {args.results}")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    # the section shows the command that produces the runs, so without --report-only
    command = "python benchmarks/run.py " + shlex.join(a for a in (sys.argv[1:] if argv is None else argv)
                                                       if a != "--report-only")
    state = State(args.work, readonly=args.dry_run or args.report_only)
    if args.dry_run:
        dry_run(args, state)
        return 0
    if args.report_only:
        return report_only(args, state, command)
    runner = Runner()
    runner.install()
    rows: list[tuple[str | None, dict]] = []  # (variant, state entry), ordered config > variant > mode > seed
    try:
        for config, variant, sets, mode, seed in plan(args):
            entry = ensure_trained(runner, state, config, mode, seed, sets, args.retry_failed, variant)
            ensure_scored(runner, state, config, sets, entry)
            rows.append((variant, entry))
    except Interrupted:
        state.save()
        log(f"interrupted; state saved in {state.path}; run the same command again to continue")
        return EXIT_INTERRUPTED
    finally:
        runner.restore()
    write_report(args, state, command, rows)
    errors = [e for _, e in rows if e.get("status") == "error"
              or (e.get("status") in SCORED and not (e.get("eval") or {}).get("result"))]
    return EXIT_USAGE if errors else 0


def write_report(args: argparse.Namespace, state: State, command: str, rows: list[tuple[str | None, dict]]) -> None:
    facts = [row_facts(state, e, args.bootstrap, variant) for variant, e in rows]
    notes = variant_notes(args.variants)
    write_section(args.results, args.section, render_section(args.section, command, facts, notes, args.bootstrap))
    log(f"wrote section `{args.section}` of {args.results}")
    print(args.results)


def report_only(args: argparse.Namespace, state: State, command: str) -> int:
    """The section from what state.json already holds; nothing is run, state.json is not written."""
    rows, missing = [], []
    for config, variant, sets, mode, seed in plan(args):
        entry = state.data["runs"].get(run_key(config, mode, seed, sets))
        shown = "" if variant is None else f" [{variant}]"
        if entry is None or not (entry.get("eval") or {}).get("result"):
            missing.append(f"{config.name}{shown} {mode} seed {seed}: "
                           + ("not run" if entry is None else f"{entry.get('status')}, not scored"))
        else:
            rows.append((variant, entry))
    if missing:
        print("--report-only: these are not recorded yet (run without --report-only first):\n  "
              + "\n  ".join(missing), file=sys.stderr)
        return EXIT_USAGE
    write_report(args, state, command, rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
