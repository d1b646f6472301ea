"""Crash trials: SIGKILL `autodiff train` at moments spread over a run, then `--resume` it.

Each trial trains a small pipeline with the scripted fake model (a little latency per call, so a
run lasts a few seconds and has several steps, each with a backward pass and proposals), kills
the process with SIGKILL at one chosen moment, and checks that

- every JSON file of the run directory parses (no half-written JSON; leftover temporary files of
  an interrupted write are hidden `.NAME.*.tmp` files, removed by the resume),
- the checkpoint holds the last completed step,
- `autodiff train --resume RUN_DIR` continues from that step, and
- the resumed run's `prompts.yaml`, best step and best scores equal an uninterrupted reference
  run's (each trial has its own call cache, filled by the killed process before it died).

The moments cycle through three kinds:

- `checkpoint`: while `checkpoint.json` is being written. The test-only variable
  AUTODIFF_TEST_PAUSE_BEFORE_REPLACE=checkpoint.json:SECONDS makes the run directory's atomic
  write sleep between writing the temporary file and `os.replace` (and say so on stderr); the
  trial kills during the Nth such pause (N spread over the run's checkpoint writes, the
  initial-validation one included).
- `backward`: a random fraction of one call latency after the stderr phase line
  `backward step=S`, while the backward-engine calls are in flight.
- `propose`: likewise after `propose step=S proposal=P`, while the optimizer call is in flight.

Usage:
    python benchmarks/crash_trials.py [--trials 20] [--jobs 2] [--seed 0] [--work DIR] [--write-results]

It prints one line per trial and the counts tried / survived / lost, and with --write-results
replaces the `<!-- bench:crash -->` section of benchmarks/RESULTS.md. tests/e2e/test_crash_trials.py
runs the same trials (CRASH_TRIALS, default 6).
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import os
import random
import re
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

import yaml

from autodiff_cli.errors import DataError
from autodiff_cli.io.files import read_jsonl

HERE = Path(__file__).resolve().parent
PAUSING_CLI = HERE.parent / "tests" / "tools" / "pausing_cli.py"  # the CLI with the pause hook (test tooling)
RESULTS = HERE / "RESULTS.md"
SECTION = "crash"
PAUSE_ENV = "AUTODIFF_TEST_PAUSE_BEFORE_REPLACE"
KINDS = ("checkpoint", "backward", "propose")

LATENCY = 0.08  # seconds per fake model call
PAUSE = 1.0  # seconds each checkpoint write waits before its os.replace (only in `checkpoint` trials)

# The task model answers n=1..2 right once the instruction holds RULE-A, 3..4 with RULE-B, and so
# on; the optimizer adds the next rule to whatever it sees. Proposals fail the subset stage when
# they do not fix the backpropagated examples, so steps have backward passes and several proposals.
SCRIPT = r"""
rules:
  - match: "backward engine"
    in: system
    reply: '{"diagnosis": "No rule covers this question.", "param: instruction": "Add the rule for this kind of question."}'
  - match: 'read by a program[\s\S]*RULE-C'
    in: all
    reply: '{"reasoning": "One more rule.", "method": "add_instruction", "new_value": "Count the things. RULE-A RULE-B RULE-C RULE-D"}'
  - match: 'read by a program[\s\S]*RULE-B'
    in: all
    reply: '{"reasoning": "One more rule.", "method": "add_instruction", "new_value": "Count the things. RULE-A RULE-B RULE-C"}'
  - match: 'read by a program[\s\S]*RULE-A'
    in: all
    reply: '{"reasoning": "One more rule.", "method": "add_instruction", "new_value": "Count the things. RULE-A RULE-B"}'
  - match: 'read by a program'
    in: system
    reply: '{"reasoning": "A first rule.", "method": "add_instruction", "new_value": "Count the things. RULE-A"}'
  - match: 'RULE-A[\s\S]*n=([12])\b'
    in: all
    reply: "Answer: {1}"
  - match: 'RULE-B[\s\S]*n=([34])\b'
    in: all
    reply: "Answer: {1}"
  - match: 'RULE-C[\s\S]*n=([56])\b'
    in: all
    reply: "Answer: {1}"
  - match: 'RULE-D[\s\S]*n=([78])\b'
    in: all
    reply: "Answer: {1}"
default: "Answer: 0"
latency: LATENCY
"""

SPEC = """\
name: crash
models:
  task: {model: fake/script.yaml}
  backward: {model: fake/script.yaml}
  optimizer: {model: fake/script.yaml}
data:
  train: train.jsonl
  val: val.jsonl
  test: test.jsonl
params:
  instruction: {value: "Count the things.", role: task instruction}
  answer_format: {value: "End with Answer: N", role: output format, trainable: false}
nodes:
  count: {kind: llm, system: "{{ instruction }} {{ answer_format }}", user: "{{ input.question }}"}
  parse: {kind: function, fn: last_integer, args: {text: count}}
output: parse
metric: {fn: exact_match, args: {pred: parse, target: input.answer}}
train: {max_steps: 4, batch_size: 4, max_proposals: 2, max_error_samples: 2, max_correct_samples: 1, seed: 0}
"""

SPLITS = {"train": [5, 1, 7, 3, 8, 2, 6, 4, 7, 5, 3, 1, 2, 8, 4, 6], "val": [1, 3, 5, 7, 2, 4, 6, 8], "test": [2, 4, 6, 8]}

PHASE = re.compile(r"\] (backward|propose) step=(\d+)(?: .*?proposal=(\d+))?")


def make_project(folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "script.yaml").write_text(SCRIPT.lstrip().replace("LATENCY", str(LATENCY)), encoding="utf-8")
    for split, ns in SPLITS.items():
        rows = [{"id": f"{split}{i}", "question": f"How many? n={n}", "answer": str(n)} for i, n in enumerate(ns)]
        (folder / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    (folder / "spec.yaml").write_text(SPEC, encoding="utf-8")
    return folder / "spec.yaml"


def train_cmd(folder: Path, *extra: str) -> list[str]:
    return [sys.executable, str(PAUSING_CLI), "train", str(folder / "spec.yaml"),
            "--runs-dir", str(folder / "runs"), *extra]


def env_for(folder: Path, **extra: str) -> dict:
    env = {k: v for k, v in os.environ.items() if k != PAUSE_ENV}
    env.update(AUTODIFF_CACHE=str(folder / "cache"), AUTODIFF_DATA=str(folder / "data"), PYTHONUNBUFFERED="1")
    env.update(extra)
    return env


# ---------------------------------------------------------------- the reference run


@dataclass
class Reference:
    run_dir: Path
    prompts: str
    best: dict
    steps: int
    backward_steps: list[int]
    proposals: list[tuple[int, int]]  # (step, proposal)
    wall: float


def reference_run(work: Path) -> Reference:
    folder = work / "reference"
    shutil.rmtree(folder, ignore_errors=True)
    make_project(folder)
    started = time.monotonic()
    proc = subprocess.run(train_cmd(folder), capture_output=True, text=True, env=env_for(folder), timeout=600)
    wall = time.monotonic() - started
    if proc.returncode != 0:
        raise RuntimeError(f"the reference run failed ({proc.returncode}):\n{proc.stderr}")
    run_dir = Path(proc.stdout.strip().splitlines()[-1])
    summary = json.loads((run_dir / "summary.json").read_text())
    backward, proposals = [], []
    for m in PHASE.finditer(proc.stderr):
        if m.group(1) == "backward":
            backward.append(int(m.group(2)))
        else:
            proposals.append((int(m.group(2)), int(m.group(3))))
    if summary["status"] != "completed" or not backward or not proposals or summary["best"]["step"] == 0:
        raise RuntimeError(f"the reference run is not the multi-step run the trials need: {summary}\n{proc.stderr}")
    return Reference(run_dir, (run_dir / "prompts.yaml").read_text(), summary["best"], summary["steps"],
                     sorted(set(backward)), proposals, wall)


# ---------------------------------------------------------------- one trial


@dataclass
class Trial:
    number: int
    kind: str  # checkpoint | backward | propose
    target: tuple  # (occurrence,) | (step,) | (step, proposal)
    delay: float  # seconds after the phase line
    expected_step: int | None = None  # the last completed step when the kill lands
    outcome: str = "pending"  # survived | lost | missed
    on_target: bool = True  # the kill landed in the aimed step (else later: a busy machine read the log late)
    notes: list[str] = field(default_factory=list)
    seconds: float = 0.0

    def label(self) -> str:
        if self.kind == "checkpoint":
            n = self.target[0]
            return f"checkpoint write #{n} ({'initial validation' if n == 1 else f'step {n - 1}'})"
        if self.kind == "backward":
            return f"backward of step {self.target[0]} (+{self.delay:.2f} s)"
        return f"proposal {self.target[1]} of step {self.target[0]} (+{self.delay:.2f} s)"


def plan(trials: int, ref: Reference, seed: int) -> list[Trial]:
    """`trials` moments: kinds in turn (so a third are checkpoint writes), targets spread over the run."""
    rng = random.Random(seed)
    writes = list(range(1, ref.steps + 2))  # the initial validation's checkpoint, then one per step
    out = []
    for i in range(trials):
        kind = KINDS[i % 3]
        turn = i // 3
        if kind == "checkpoint":
            target = (writes[turn % len(writes)],)
            expected = None if target[0] == 1 else target[0] - 2
            delay = 0.0
        elif kind == "backward":
            step = ref.backward_steps[turn % len(ref.backward_steps)]
            target, expected, delay = (step,), step - 1, rng.uniform(0.0, 0.8 * LATENCY)
        else:
            target = ref.proposals[turn % len(ref.proposals)]
            expected, delay = target[0] - 1, rng.uniform(0.0, 0.8 * LATENCY)
        out.append(Trial(i + 1, kind, target, delay, expected))
    return out


def _matches(trial: Trial, line: str, seen: dict) -> bool:
    if trial.kind == "checkpoint":
        if "pause before replace checkpoint.json" in line:
            seen["writes"] = seen.get("writes", 0) + 1
            return seen["writes"] == trial.target[0]
        return False
    m = PHASE.search(line)
    if not m or m.group(1) != trial.kind:
        return False
    if trial.kind == "backward":
        return int(m.group(2)) == trial.target[0]
    return (int(m.group(2)), int(m.group(3))) == trial.target


def check_readable(run_dir: Path) -> list[str]:
    """Problems with the run directory's files: JSON/JSONL/YAML that does not parse."""
    problems = []
    for p in sorted(run_dir.rglob("*")):
        if not p.is_file() or p.name.endswith(".tmp"):
            continue
        rel = p.relative_to(run_dir)
        try:
            text = p.read_text(encoding="utf-8") if p.suffix in (".json", ".jsonl", ".yaml", ".md") else None
            if p.suffix == ".json":
                json.loads(text)
            elif p.suffix == ".jsonl":
                read_jsonl(p)
            elif p.suffix == ".yaml":
                yaml.safe_load(text)
        except (ValueError, yaml.YAMLError, UnicodeDecodeError, DataError) as e:
            problems.append(f"{rel}: {type(e).__name__}: {e}")
    return problems


def run_trial(trial: Trial, ref: Reference, work: Path) -> Trial:
    started = time.monotonic()
    folder = work / f"trial-{trial.number:02d}"
    shutil.rmtree(folder, ignore_errors=True)
    make_project(folder)
    try:
        _run_trial(trial, ref, folder)
    except Exception as e:  # noqa: BLE001 - a trial that breaks is a lost trial, with the reason
        trial.outcome = "lost"
        trial.notes.append(f"{type(e).__name__}: {e}")
    trial.seconds = time.monotonic() - started
    return trial


def _run_trial(trial: Trial, ref: Reference, folder: Path) -> None:
    extra = {PAUSE_ENV: f"checkpoint.json:{PAUSE}"} if trial.kind == "checkpoint" else {}
    proc = subprocess.Popen(train_cmd(folder), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=env_for(folder, **extra))
    out_lines: list[str] = []
    reader = threading.Thread(target=lambda: out_lines.extend(proc.stdout), daemon=True)
    reader.start()
    seen: dict = {}
    killed = False
    log: list[str] = []
    for line in proc.stderr:
        log.append(line)
        if _matches(trial, line, seen):
            if trial.delay:
                time.sleep(trial.delay)
            if proc.poll() is None:
                os.kill(proc.pid, signal.SIGKILL)
                killed = True
            break
    proc.wait(timeout=120)
    proc.stderr.close()
    reader.join(timeout=10)
    if not killed or proc.returncode != -signal.SIGKILL:
        trial.outcome = "missed"
        trial.notes.append(f"the run ended before the moment (exit {proc.returncode})")
        return
    runs = [p for p in (folder / "runs").iterdir() if p.is_dir()]
    assert len(runs) == 1, f"expected one run directory, got {runs}"
    run_dir = runs[0]
    problems = check_readable(run_dir)
    tmp_files = [p.name for p in run_dir.rglob(".*.tmp")]
    if trial.kind == "checkpoint" and not any(n.startswith(".checkpoint.json.") for n in tmp_files):
        problems.append("killed in a checkpoint write, but no temporary checkpoint file is there")
    checkpoint = run_dir / "checkpoint.json"
    done = json.loads(checkpoint.read_text())["state"]["step"] if checkpoint.exists() else None
    if done != trial.expected_step:
        if trial.kind != "checkpoint" and done is not None and (trial.expected_step is None or done > trial.expected_step):
            trial.on_target = False  # nothing lost: the kill landed in a later step than aimed at
            trial.notes.append(f"landed after step {done} (aimed at step {trial.target[0]})")
        else:
            problems.append(f"checkpoint step {done}, expected {trial.expected_step}")
    if problems:
        trial.outcome = "lost"
        trial.notes += problems
        return

    resumed = subprocess.run(train_cmd(folder, "--resume", str(run_dir)), capture_output=True, text=True,
                             env=env_for(folder), timeout=600)
    if resumed.returncode != 0:
        raise AssertionError(f"resume exited {resumed.returncode}: {resumed.stderr[-2000:]}")
    expected_from = done or 0
    if f"resuming {run_dir} after step {expected_from}" not in resumed.stderr:
        problems.append(f"the resume did not continue after step {expected_from}")
    summary = json.loads((run_dir / "summary.json").read_text())
    if summary["status"] != "completed":
        problems.append(f"status {summary['status']}")
    if summary["steps"] != ref.steps:
        problems.append(f"{summary['steps']} steps, the reference ran {ref.steps}")
    if summary["best"] != ref.best:
        problems.append(f"best {summary['best']}, the reference's {ref.best}")
    if (run_dir / "prompts.yaml").read_text() != ref.prompts:
        problems.append("prompts.yaml differs from the reference's")
    steps = [row["step"] for row in read_jsonl(run_dir / "metrics.jsonl") or []]
    if steps != list(range(1, ref.steps + 1)):
        problems.append(f"metrics.jsonl steps {steps}")
    problems += check_readable(run_dir)
    if list(run_dir.rglob(".*.tmp")):
        problems.append("temporary files left after the resume")
    trial.outcome = "lost" if problems else "survived"
    trial.notes += problems


def run_trials(n: int, *, jobs: int = 2, seed: int = 0, work: Path | None = None,
               progress=None) -> tuple[Reference, list[Trial]]:
    work = Path(work) if work else Path(tempfile.mkdtemp(prefix="autodiff-crash-"))
    work.mkdir(parents=True, exist_ok=True)
    ref = reference_run(work)
    trials = plan(n, ref, seed)
    with ThreadPoolExecutor(max_workers=max(1, jobs)) as pool:
        for t in pool.map(lambda t: run_trial(t, ref, work), trials):
            if progress:
                progress(t)
    return ref, trials


def counts(trials: list[Trial]) -> dict:
    c = {"tried": sum(t.outcome != "missed" for t in trials),
         "survived": sum(t.outcome == "survived" for t in trials),
         "lost": sum(t.outcome == "lost" for t in trials),
         "missed": sum(t.outcome == "missed" for t in trials)}
    for kind in KINDS:
        c[kind] = sum(t.kind == kind and t.outcome != "missed" and t.on_target for t in trials)
    c["off_target"] = sum(t.outcome != "missed" and not t.on_target for t in trials)
    return c


# ---------------------------------------------------------------- killed under faults, with a dummy key

# Over HTTP this time: the fake server (tests/support/fake_server.py) answers from the same script.
# 15% of requests fail, a third each as 500, 429 and a reset connection, seeded per request body (the
# same pattern every time); max_retries 8 makes a call that fails every attempt vanishingly rare.
KILL_FAULTS = ({"kind": "500", "rate": 0.05}, {"kind": "429", "rate": 0.05, "retry_after": 0},
               {"kind": "reset", "rate": 0.05})
KILL_LATENCY = 0.2  # seconds per request: the kill lands while a proposal's optimizer request is held
KILL_KEY_ENV = "CRASH_TRIALS_KEY"


def http_project(folder: Path, api_base: str) -> Path:
    spec = make_project(folder)
    model = (f'{{model: openai/fake, api_base: "{api_base}", api_key_env: {KILL_KEY_ENV}, max_retries: 8, '
             "timeout: 10}")
    spec.write_text(SPEC.replace("{model: fake/script.yaml}", model), encoding="utf-8")
    return spec


def comparable(data: dict) -> dict:
    """summary.json or checkpoint.json without usage, wall time and place (the run's folder, the config's
    path): what must be the same, byte for byte once serialised, between two runs of one training."""
    data = json.loads(json.dumps(data))
    for key in ("usage", "wall_seconds", "run_dir", "config_path"):
        data.pop(key, None)
    if isinstance(data.get("state"), dict):
        for key in ("usage", "wall_seconds"):
            data["state"].pop(key, None)
    return data


def run_killed_under_faults(work: Path, key: str, kill_step: int = 2) -> dict:
    """`autodiff train` against the fake server with the API key `key` (a dummy such as `x` or `null`),
    15% of its requests failing, SIGKILLed in the middle of step `kill_step` while that step's first
    optimizer request is at the server, then `--resume`d against the same server. Its prompts, summary
    and checkpoint must be what an uninterrupted, fault-free run writes (usage, wall time and place
    aside), and its usage must equal the server's counts. Returns {problems, ...}."""
    from autodiff_cli.llm import fake
    from tests.support.fake_server import FakeServer

    def command(spec: Path, folder: Path, key: str, *extra) -> tuple[list[str], dict]:
        assert spec == folder / "spec.yaml"  # train_cmd's
        env = {**env_for(folder), KILL_KEY_ENV: key}
        env.pop("AUTODIFF_CACHE_URL", None)
        return train_cmd(folder, *map(str, extra)), env

    problems: list[str] = []
    ref_dir, bad_dir = work / "reference-http", work / f"killed-{key}"
    for folder in (ref_dir, bad_dir):
        shutil.rmtree(folder, ignore_errors=True)
        make_project(folder)  # the script the server reads
    fake.reset_fake_state()
    with FakeServer(ref_dir / "script.yaml", latency=0.0).in_thread() as srv:
        cmd, env = command(http_project(ref_dir, srv.api_base), ref_dir, "a-reference-key-0123456789")
        ref = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    if ref.returncode != 0:
        raise RuntimeError(f"the fault-free reference run failed:\n{ref.stderr[-2000:]}")
    ref_run = Path(ref.stdout.strip().splitlines()[-1])

    fake.reset_fake_state()
    with FakeServer(bad_dir / "script.yaml", latency=KILL_LATENCY, faults=KILL_FAULTS).in_thread() as srv:
        spec = http_project(bad_dir, srv.api_base)
        cmd, env = command(spec, bad_dir, key)
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
        killed_in = None
        for line in proc.stderr:  # the status lines (no terminal: one timestamped line per phase)
            m = PHASE.search(line)
            if m and m.group(1) == "propose" and int(m.group(2)) == kill_step:
                time.sleep(KILL_LATENCY / 2)  # its optimizer request has reached the server, which holds it
                killed_in = line.strip()
                proc.kill()
                break
        proc.wait(timeout=60)
        proc.stderr.close()
        proc.stdout.close()
        runs = list((bad_dir / "runs").iterdir()) if (bad_dir / "runs").is_dir() else []
        if killed_in is None or proc.returncode != -signal.SIGKILL or len(runs) != 1:
            raise RuntimeError(f"the run was not killed in step {kill_step} (exit {proc.returncode}, "
                               f"{len(runs)} run folders)")
        run_dir = runs[0]
        at_kill = json.loads((run_dir / "summary.json").read_text())
        if (at_kill["status"], at_kill["steps"]) != ("running", kill_step - 1):
            problems.append(f"at the kill the summary says {at_kill['status']} after step {at_kill['steps']}")
        cmd, env = command(spec, bad_dir, key, "--resume", run_dir)
        resumed = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
        if resumed.returncode != 0:
            problems.append(f"--resume exited {resumed.returncode}: {resumed.stderr[-1500:]}")
        time.sleep(0.05)  # closed connections reach the counters
        stats = srv.stats()

    if (run_dir / "prompts.yaml").read_bytes() != (ref_run / "prompts.yaml").read_bytes():
        problems.append("prompts.yaml differs from the uninterrupted fault-free run's")
    for name in ("summary.json", "checkpoint.json"):
        got, want = (comparable(json.loads((d / name).read_text())) for d in (run_dir, ref_run))
        if got != want:
            problems.append(f"{name} differs from the fault-free run's in "
                            f"{sorted(k for k in set(got) | set(want) if got.get(k) != want.get(k))}")
    usage = json.loads((run_dir / "summary.json").read_text())["usage"]
    total = {k: sum(u.get(k, 0) for u in usage.values()) for k in ("calls", "errors", "unsent")}
    server = {"calls": stats["requests"], "errors": sum(stats["errors"].values()), "unsent": 0}
    problems += [f"usage {k} {total[k]} != server {server[k]}" for k in ("calls", "unsent") if total[k] != server[k]]
    # the request in flight at the kill got an answer (maybe an injected error) nobody read: the killed
    # process could count it as a call, not know how it ended
    if not server["errors"] - 1 <= total["errors"] <= server["errors"]:
        problems.append(f"usage errors {total['errors']} against the server's {server['errors']}")
    fired = sum(stats["faults"].values())
    if not fired:
        problems.append("no fault fired: the scenario tested nothing")
    return {"problems": problems, "key": key, "killed_in": killed_in, "requests": stats["requests"],
            "faults": fired, "usage_calls": total["calls"], "best": comparable(json.loads(
                (run_dir / "summary.json").read_text()))["best"]}


# ---------------------------------------------------------------- RESULTS.md


def _bench_runner():
    """benchmarks/run.py, for its machine() and write_section(); loaded by path (not a package)."""
    name = "autodiff_bench_runner"
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, Path(__file__).resolve().parent / "run.py")
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
    return sys.modules[name]


def machine() -> str:
    return _bench_runner().machine()


def section(command: str, ref: Reference, trials: list[Trial]) -> str:
    c = counts(trials)
    date = datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC")
    lines = [f"<!-- bench:{SECTION} -->", "## Crash trials (issue 8)", "",
             "Command:", "", "```", command, "```", "",
             f"Machine: {machine()}  ", f"Date: {date}", "",
             f"Each trial SIGKILLs `autodiff train` (fake model, {LATENCY:g} s per call; the uninterrupted "
             f"reference run: {ref.steps} steps, best step {ref.best['step']}, best val {ref.best['val']}, "
             f"{ref.wall:.1f} s) at one moment, checks that every JSON file of the run directory parses and "
             "that the checkpoint holds the last completed step, resumes with `--resume`, and compares the "
             "final `prompts.yaml` and summary `best` with the reference's (same cache per trial).", "",
             "| tried | survived | lost | in a checkpoint write | inside backward | inside proposing |",
             "|---:|---:|---:|---:|---:|---:|",
             f"| {c['tried']} | {c['survived']} | {c['lost']} | {c['checkpoint']} | {c['backward']} | {c['propose']} |",
             "", "| # | killed during | last completed step | outcome |", "|---:|---|---:|---|"]
    for t in trials:
        lines.append(f"| {t.number} | {t.label()} | {'–' if t.expected_step is None else t.expected_step} "
                     f"| {t.outcome}{': ' + '; '.join(t.notes) if t.notes else ''} |")
    if c["off_target"]:
        lines += ["", f"{c['off_target']} kill(s) landed in a later step than aimed at (the log was read late); "
                      "they count as tried, not under their kind."]
    if c["missed"]:
        lines += ["", f"{c['missed']} planned moment(s) were missed (the run ended first) and are not counted."]
    lines.append(f"<!-- /bench:{SECTION} -->")
    return "\n".join(lines) + "\n"


def write_section(results: Path, text: str) -> None:
    _bench_runner().write_section(results, SECTION, text)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--trials", type=int, default=int(os.environ.get("CRASH_TRIALS", "20")))
    ap.add_argument("--jobs", type=int, default=2, help="trials run at once (default 2)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--work", type=Path, default=None, help="folder for the trials (default: a temporary one)")
    ap.add_argument("--keep", action="store_true", help="keep the work folder")
    ap.add_argument("--write-results", action="store_true", help=f"write the section into {RESULTS}")
    ap.add_argument("--results", type=Path, default=RESULTS)
    args = ap.parse_args(argv)
    work = args.work or Path(tempfile.mkdtemp(prefix="autodiff-crash-"))

    def show(t: Trial) -> None:
        print(f"trial {t.number:2d} {t.kind:10s} {t.label():45s} {t.outcome}"
              + (f" ({'; '.join(t.notes)})" if t.notes else "") + f" [{t.seconds:.1f} s]", flush=True)

    try:
        ref, trials = run_trials(args.trials, jobs=args.jobs, seed=args.seed, work=work, progress=show)
    finally:
        if not args.keep and args.work is None:
            shutil.rmtree(work, ignore_errors=True)
    c = counts(trials)
    print(f"tried {c['tried']} survived {c['survived']} lost {c['lost']} (checkpoint {c['checkpoint']}, "
          f"backward {c['backward']}, propose {c['propose']}, landed later than aimed {c['off_target']}; "
          f"missed {c['missed']})")
    if args.write_results:
        command = "python benchmarks/crash_trials.py " + " ".join(shlex.quote(a) for a in (argv or sys.argv[1:]))
        write_section(args.results, section(command.strip(), ref, trials))
        print(f"wrote the `{SECTION}` section of {args.results}")
    return 0 if c["lost"] == 0 and c["missed"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
