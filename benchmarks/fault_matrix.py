"""Fault matrix: provider faults through the real HTTP path, in `autodiff eval` and `autodiff train`.

Every case starts `tests/support/fake_server.py` (an OpenAI-compatible server on 127.0.0.1, zero
latency) with one injected fault, points every model config of a small spec at it
(`model: openai/fake`, `api_base`, `api_key_env`), so each call goes ModelClient -> litellm ->
HTTP -> server, runs the CLI command in process (typer's CliRunner; the client's backoff base is
set to 0 so a case takes milliseconds, Retry-After is still honoured), and compares the outcome
with a fault-free reference run of the same command.

Faults (server-level, see the fake server's docstring): 429 with Retry-After, 500, 503, connection
reset, timeout (the server holds the request past the config's `timeout`), empty reply (a 200 with
no text), truncated JSON body, malformed optimizer JSON (a 200 whose content is a proposal cut off
mid-string) and context-length (the 400 `context_length_exceeded` body; never retried).

Shapes: `transient` = each distinct request fails the first N times (N = 2, timeout 1) and then
succeeds; `permanent` = it always fails. Targets:

- eval, transient: every request. Expected: the fault-free score, rows and exit 0; nothing
  reported. (context-length: not retried, so every example is an error, exit 3.)
- eval, permanent: the one validation example with n=3. Expected: that example is an error
  (score null, never 0), the score is the reference's over the other examples; exit 0 with
  `train.max_error_rate=0.5`, exit 3 with the default 0.1 and an `error: ... max_error_rate`
  line naming the fault.
- train, transient: every request of every role (context-length: the training example that
  only step 2 sees). Expected: the fault-free run's prompts, best/initial scores, steps and
  proposals (context-length: as permanent).
- train, permanent: the training example only step 2 sees (1 of 4 in the batch, above
  `max_error_rate` 0.1). Expected: exit 3, status `failed` with a reason naming the fault, step 1
  kept (metrics, checkpoint, prompts), then `--resume` against a recovered server reaches the
  fault-free run's result.
- train (optimizer only), permanent: every optimizer request. Expected: each proposal is
  recorded as rejected ("optimizer call failed: ..."), and as every optimizer call of step 1
  failed (above `max_error_rate`) the run stops: exit 3, status `failed` with a reason naming
  the fault, the initial prompts kept.
  Malformed optimizer JSON is tried transient (proposal 1 rejected as unparseable, proposal 2
  re-asks and is accepted: the fault-free result) and permanent (every proposal rejected with
  the reason, initial prompts kept, no crash).

Every case also checks that usage (calls, errors, prompt and completion tokens) equals the
server's own counts exactly (calls = requests, errors = error answers, calls - errors = replies
with text) and that no attempt was counted as `unsent` (the server was always listening); after a
resume, the final summary's usage equals the two servers' counts together.

Cold process: the cases above run in the test's own process, where litellm, the openai SDK and
httpx are already imported and their clients built. `eval (cold process)` runs the transient eval
cases of COLD_KINDS in a fresh interpreter (`python -m autodiff_cli.app.cli`; the backoff is then the
CLI's own), so the first wave of attempts meets a cold client: their timeouts must not run out
before their requests are sent, and usage must still equal what the server saw.

Columns of the RESULTS table: injected (faults the server fired), retried (failed attempts the
client tried again; for malformed JSON: rejected proposals followed by another proposal), reported
(calls given up and reported as errors, or rejected malformed proposals), survived (the run ended
with the expected outcome), lost (an example silently mis-scored, or completed work lost), usage
exact.

Usage:
    python benchmarks/fault_matrix.py [--kind K ...] [--work DIR] [--keep] [--write-results]

tests/e2e/test_faults.py runs the same cases.
"""
from __future__ import annotations

import argparse
import contextlib
import importlib.util
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

import yaml

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
RESULTS = HERE / "RESULTS.md"
SECTION = "faults"
KEY_ENV = "FAULT_MATRIX_KEY"

if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))
from tests.specs import COUNT_PIPELINE, TOY_SCRIPT

KINDS = ("429", "500", "503", "reset", "timeout", "empty", "truncated", "malformed", "context_length")
# timeout: a cold start used to run out the first attempts' 0.5 s before they were sent; reset: a
# connection reset after the request was read is a call, not an unsent attempt
COLD_KINDS = ("timeout", "reset")
SHAPES = ("transient", "permanent")
MAX_RETRIES = 3
TIMEOUT = 0.5  # seconds per attempt in the timeout cases (the server holds the request until the client gives up)
RETRY_AFTER = 0.05  # seconds, sent as Retry-After with each 429
NEW_VALUE = "Count the things. ALWAYS ADD the counts."
INITIAL = "Count the things."

# what the reported error must say, per fault kind (litellm's exception names or our own messages)
DETAIL = {
    "429": r"RateLimitError", "500": r"InternalServerError", "503": r"ServiceUnavailableError",
    "reset": r"Connection error|APIConnectionError", "timeout": r"no reply within 0\.5 s",
    "empty": r"EmptyReply: empty reply", "truncated": r"Unterminated string|Expecting|JSONDecodeError",
    "context_length": r"ContextWindowExceededError",
}
# Data: ids fix the seeded batches (step 1: train1, train5, train4, train7; step 2: train0, train6,
# train3, train2), so n=9 (train2) is seen by step 2 only and n=3 (val2) by validation only.
SPLITS = {"train": [1, 2, 9, 1, 4, 5, 1, 2], "val": [1, 2, 3, 4], "test": [1, 6, 7, 1]}
STEP2_ONLY = r"n=9\b"
ONE_VAL = r"n=3\b"
OPTIMIZER = "read by a program"  # in the optimizer meta-prompt's system message


def spec_text(api_base: str, timeout: float) -> str:
    model = (f'{{model: openai/fake, api_base: "{api_base}", api_key_env: {KEY_ENV}, '
             f"max_retries: {MAX_RETRIES}, timeout: {timeout:g}}}")
    return (f"name: faults\nmodels:\n  task: {model}\n  backward: {model}\n  optimizer: {model}\n"
            "data:\n  train: train.jsonl\n  val: val.jsonl\n  test: test.jsonl\n" + COUNT_PIPELINE.lstrip()
            + "train: {max_steps: 2, batch_size: 4, max_proposals: 2, max_error_samples: 2, "
              "max_correct_samples: 1, seed: 0}\n")


# ---------------------------------------------------------------- cases


@dataclass(frozen=True)
class Case:
    kind: str
    shape: str
    command: str  # eval | eval (cold process) | train | train (optimizer only)

    @property
    def id(self) -> str:
        return (f"{self.kind}-{self.shape}-{self.command.split()[0]}" + ("-optimizer" if "optimizer" in self.command else "")
                + ("-cold" if self.cold else ""))

    @property
    def cold(self) -> bool:
        """Run the command in a fresh interpreter (nothing of litellm imported yet)."""
        return self.command == "eval (cold process)"

    def target(self) -> str:
        """What the fault hits: all | step2 | val | optimizer."""
        if self.command == "train (optimizer only)":
            return "optimizer"
        if self.command.startswith("eval"):
            return "all" if self.shape == "transient" else "val"
        if self.shape == "permanent" or self.kind == "context_length":
            return "step2"
        return "all"

    def faults(self) -> list[dict]:
        fault: dict = {"kind": self.kind}
        if self.shape == "transient":
            fault["times"] = 1 if self.kind in ("timeout", "context_length", "malformed") else 2
        if self.kind == "429":
            fault["retry_after"] = RETRY_AFTER
        target = self.target()
        if target == "all":
            fault.update({"match": ".", "in": "all"})
        elif target == "optimizer":
            fault.update({"match": OPTIMIZER, "in": "system"})
        else:
            fault["match"] = STEP2_ONLY if target == "step2" else ONE_VAL
        return [fault]

    def timeout(self) -> float:
        return TIMEOUT if self.kind == "timeout" else 30.0


def all_cases(kinds: tuple[str, ...] = KINDS) -> list[Case]:
    cases = []
    for kind in kinds:
        if kind == "malformed":  # only an optimizer (or backward) reply can be malformed JSON; a task reply is an answer
            cases += [Case(kind, shape, "train (optimizer only)") for shape in SHAPES]
            continue
        for shape in SHAPES:
            cases.append(Case(kind, shape, "eval"))
            cases.append(Case(kind, shape, "train"))
        cases.append(Case(kind, "permanent", "train (optimizer only)"))
    return cases


def cold_cases(kinds: tuple[str, ...] = COLD_KINDS) -> list[Case]:
    return [Case(kind, "transient", "eval (cold process)") for kind in kinds]


@dataclass
class Outcome:
    case: Case
    injected: int = 0
    retried: int = 0
    reported: int = 0
    usage_exact: bool = True
    wrong: list[str] = field(default_factory=list)  # the run did not end as it should
    lost: list[str] = field(default_factory=list)  # an example mis-scored or completed work lost
    seconds: float = 0.0

    @property
    def survived(self) -> bool:
        return not self.wrong and not self.lost

    def problems(self) -> list[str]:
        return self.wrong + [f"LOST: {x}" for x in self.lost] + ([] if self.usage_exact else ["usage not exact"])


# ---------------------------------------------------------------- running the CLI in process


class Failures:
    """The model calls the client gave up on (ModelClient._failure), and how many provider calls
    (litellm.acompletion) ran at once at most."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, int, str]] = []  # (role, attempts, last error)
        self.in_flight = 0
        self.max_in_flight = 0


@contextlib.contextmanager
def instrumented() -> Iterator[Failures]:
    """No backoff wait (Retry-After still applies) and a record of every call given up."""
    from autodiff_cli.app import commands
    from autodiff_cli.llm.client import ModelClient
    from autodiff_cli.llm.providers import load_litellm

    litellm = load_litellm()
    failures = Failures()
    real_make, real_failure, real_acompletion = commands.make_client, ModelClient._failure, litellm.acompletion

    def make_client(*args, **kwargs):
        client = real_make(*args, **kwargs)
        client.base_delay = 0.0
        return client

    def failure(self, target, role, attempts, error, api_key, *rest):
        err = real_failure(self, target, role, attempts, error, api_key, *rest)
        failures.calls.append((role, attempts, err.last_error))
        return err

    async def acompletion(*args, **kwargs):
        failures.in_flight += 1
        failures.max_in_flight = max(failures.max_in_flight, failures.in_flight)
        try:
            return await real_acompletion(*args, **kwargs)
        finally:
            failures.in_flight -= 1

    commands.make_client, ModelClient._failure, litellm.acompletion = make_client, failure, acompletion
    try:
        yield failures
    finally:
        commands.make_client, ModelClient._failure, litellm.acompletion = real_make, real_failure, real_acompletion


@dataclass
class Result:
    code: int
    stdout: str
    stderr: str
    stats: dict
    failures: list[tuple[str, int, str]]


def cli(args: list[str], folder: Path) -> tuple[int, str, str, Failures]:
    from typer.testing import CliRunner

    from autodiff_cli.app.cli import app

    # each run its own call cache (never a shared Redis one)
    env = {KEY_ENV: "fault-matrix-key", "AUTODIFF_CACHE": str(folder / "cache"), "AUTODIFF_DATA": str(folder),
           "AUTODIFF_CACHE_URL": None}
    with instrumented() as failures:
        res = CliRunner().invoke(app, [str(a) for a in args], env=env)
    if res.exception is not None and not isinstance(res.exception, SystemExit):
        raise RuntimeError(f"`autodiff {' '.join(map(str, args[:1]))}` crashed: {res.exception!r}\n{res.stderr[-3000:]}")
    return res.exit_code, res.stdout, res.stderr, failures


def cli_cold(args: list[str], folder: Path) -> tuple[int, str, str]:
    """The CLI in a fresh interpreter: litellm, the openai SDK and httpx start cold."""
    env = {**os.environ, KEY_ENV: "fault-matrix-key", "AUTODIFF_CACHE": str(folder / "cache"),
           "AUTODIFF_DATA": str(folder)}
    env.pop("AUTODIFF_CACHE_URL", None)
    r = subprocess.run([sys.executable, "-m", "autodiff_cli.app.cli", *map(str, args)], capture_output=True, text=True,
                       env=env, cwd=ROOT, timeout=600)
    if "Traceback" in r.stderr:
        raise RuntimeError(f"`autodiff {args[0]}` crashed in a fresh process:\n{r.stderr[-3000:]}")
    return r.returncode, r.stdout, r.stderr


def make_project(folder: Path, api_base: str, timeout: float) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "script.yaml").write_text(TOY_SCRIPT % {"new": NEW_VALUE}, encoding="utf-8")
    for split, ns in SPLITS.items():
        rows = [{"id": f"{split}{i}", "question": f"How many? n={n}", "answer": str(n)} for i, n in enumerate(ns)]
        (folder / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    spec = folder / "spec.yaml"
    spec.write_text(spec_text(api_base, timeout), encoding="utf-8")
    return spec


@contextlib.contextmanager
def server(folder: Path, faults: list[dict], port: int = 0):
    from autodiff_cli.llm import fake
    from tests.support.fake_server import FakeServer

    fake.reset_fake_state()
    with FakeServer(folder / "script.yaml", latency=0.0, port=port, faults=faults).in_thread() as srv:
        yield srv


def run_command(folder: Path, command: str, faults: list[dict], timeout: float, extra: list[str] = (),
                port: int = 0, cold: bool = False) -> Result:
    """Run the command against a fresh fake server; `cold`: in a fresh interpreter, where the calls given
    up cannot be recorded (Result.failures is empty: the error rows tell)."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "script.yaml").write_text(TOY_SCRIPT % {"new": NEW_VALUE}, encoding="utf-8")
    with server(folder, faults, port) as srv:
        spec = make_project(folder, srv.api_base, timeout)
        if command == "eval":
            args = ["eval", spec, "--split", "val", "--json", "--out", folder / "rows.jsonl", *extra]
        else:
            args = ["train", spec, "--runs-dir", folder / "runs", *extra]
        if cold:
            code, out, err = cli_cold(args, folder)
            given_up = []
        else:
            code, out, err, failures = cli(args, folder)
            given_up = failures.calls
        time.sleep(0.05)  # abandoned (timed-out) connections reach the server's counters
        stats = srv.stats()
    return Result(code, out, err, stats, given_up)


# ---------------------------------------------------------------- references


@dataclass
class Reference:
    eval_result: dict
    eval_rows: dict  # id -> row
    summary: dict
    prompts: str
    metrics: list[dict]


def references(work: Path) -> Reference:
    ev = run_command(work / "ref-eval", "eval", [], 30.0)
    if ev.code != 0:
        raise RuntimeError(f"the fault-free eval failed ({ev.code}): {ev.stderr[-2000:]}")
    tr = run_command(work / "ref-train", "train", [], 30.0)
    if tr.code != 0:
        raise RuntimeError(f"the fault-free train run failed ({tr.code}): {tr.stderr[-2000:]}")
    run_dir = run_dir_of(tr)
    summary = json.loads((run_dir / "summary.json").read_text())
    if summary["best"]["step"] != 1 or summary["steps"] != 2:
        raise RuntimeError(f"the reference run is not the expected one (best at step 1 of 2): {summary}")
    return Reference(last_json(ev.stdout), read_rows(work / "ref-eval" / "rows.jsonl"), summary,
                     (run_dir / "prompts.yaml").read_text(), read_jsonl(run_dir / "metrics.jsonl"))


def last_json(stdout: str) -> dict:
    return json.loads(stdout.strip().splitlines()[-1])


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(x) for x in path.read_text().splitlines() if x.strip()] if path.exists() else []


def read_rows(path: Path) -> dict:
    return {r["id"]: r for r in read_jsonl(path)}


def run_dir_of(res: Result) -> Path:
    return Path(res.stdout.strip().splitlines()[-1])


# ---------------------------------------------------------------- checks


def usage_problems(usage: dict, stats: list[dict]) -> list[str]:
    """Usage summed over roles against the servers' counts."""
    total = {k: sum(u[k] for u in usage.values()) for k in ("calls", "errors", "prompt_tokens", "completion_tokens")}
    server = {"calls": sum(s["requests"] for s in stats),
              "errors": sum(sum(s["errors"].values()) for s in stats),
              "prompt_tokens": sum(s["prompt_tokens"] for s in stats),
              "completion_tokens": sum(s["completion_tokens"] for s in stats)}
    problems = [f"usage {k} {total[k]} != server {server[k]}" for k in total if total[k] != server[k]]
    unsent = sum(u.get("unsent", 0) for u in usage.values())
    if unsent:  # the server was listening: every attempt could reach it
        problems.append(f"usage unsent {unsent}: attempts counted as never sent although the server was up")
    replies = sum(s["replies"] for s in stats)
    if total["calls"] - total["errors"] != replies:
        problems.append(f"usage calls - errors = {total['calls'] - total['errors']} != server replies {replies}")
    return problems


def injected(stats: dict, kind: str) -> int:
    return stats["faults"].get("connection" if kind == "reset" else kind, 0)


def check_detail(case: Case, text: str, out: Outcome, where: str) -> None:
    if not re.search(DETAIL[case.kind], text):
        out.wrong.append(f"{where} does not name the fault ({DETAIL[case.kind]}): {text[-300:]!r}")


def check_attempts(case: Case, failures: list, out: Outcome) -> None:
    """Given-up calls used every attempt, except context-length, which is never retried."""
    want = 1 if case.kind == "context_length" else 1 + MAX_RETRIES
    bad = [f for f in failures if f[1] != want]
    if bad:
        out.wrong.append(f"calls given up after {sorted({f[1] for f in bad})} attempts, expected {want}")


def run_case(case: Case, ref: Reference, work: Path) -> Outcome:
    started = time.monotonic()
    out = Outcome(case)
    folder = work / case.id
    shutil.rmtree(folder, ignore_errors=True)
    try:
        if case.command.startswith("eval"):
            _eval_case(case, ref, folder, out)
        else:
            _train_case(case, ref, folder, out)
    except Exception as e:  # noqa: BLE001 - a case that breaks did not survive; the reason is kept
        out.wrong.append(f"{type(e).__name__}: {e}")
    out.seconds = time.monotonic() - started
    return out


def _eval_case(case: Case, ref: Reference, folder: Path, out: Outcome) -> None:
    runs = [("limit 0.5", ["--set", "train.max_error_rate=0.5"])] if case.shape == "permanent" else []
    runs.append(("default limit", []))
    for label, extra in runs:
        res = run_command(folder / label.replace(" ", "-"), "eval", case.faults(), case.timeout(), extra, cold=case.cold)
        out.injected += injected(res.stats, case.kind)
        out.reported += len(res.failures)
        out.retried += sum(f for f in res.stats["errors"].values()) - len(res.failures)
        result = last_json(res.stdout)
        problems = usage_problems(result["usage"], [res.stats])
        out.usage_exact &= not problems
        out.wrong += [f"{label}: {p}" for p in problems]
        rows = read_rows(folder / label.replace(" ", "-") / "rows.jsonl")
        # never mis-scored: an error row has no score; every scored row has the reference's score
        for rid, row in rows.items():
            if row["error"] and row["score"] is not None:
                out.lost.append(f"{label}: {rid} failed but was scored {row['score']}")
            if not row["error"] and row["score"] != ref.eval_rows[rid]["score"]:
                out.lost.append(f"{label}: {rid} scored {row['score']}, fault-free {ref.eval_rows[rid]['score']}")
        completed = [rid for rid, r in rows.items() if not r["error"]]
        expected_score = (sum(ref.eval_rows[i]["score"] for i in completed) / len(completed)) if completed else None
        if result["score"] != expected_score:
            out.lost.append(f"{label}: score {result['score']} != {expected_score} (the reference's over completed examples)")
        if (result["completed"], result["errors"]) != (len(completed), len(rows) - len(completed)):
            out.wrong.append(f"{label}: completed/errors {result['completed']}/{result['errors']} disagree with the rows")
        if case.shape == "transient" and case.kind != "context_length":
            if res.code != 0 or result["errors"] or res.failures:
                out.wrong.append(f"transient: exit {res.code}, {result['errors']} errors, {len(res.failures)} calls given up")
            if result["score"] != ref.eval_result["score"]:
                out.wrong.append(f"transient: score {result['score']} != fault-free {ref.eval_result['score']}")
            continue
        expected_errors = {r for r in ref.eval_rows} if case.shape == "transient" else {"val2"}
        errors = {rid for rid, r in rows.items() if r["error"]}
        if errors != expected_errors:
            out.wrong.append(f"{label}: error rows {sorted(errors)}, expected {sorted(expected_errors)}")
        for rid in errors:
            check_detail(case, rows[rid]["error"], out, f"{label}: row {rid}'s error")
        check_attempts(case, res.failures, out)
        want = 0 if label == "limit 0.5" else 3
        if res.code != want:
            out.wrong.append(f"{label}: exit {res.code}, expected {want}")
        if want == 3:
            line = next((x for x in res.stderr.splitlines() if x.startswith("error: ")), "")
            if "max_error_rate" not in line:
                out.wrong.append(f"{label}: no `error: ... max_error_rate` line on stderr")
            check_detail(case, line, out, f"{label}: the error line")


def _train_case(case: Case, ref: Reference, folder: Path, out: Outcome) -> None:
    res = run_command(folder, "train", case.faults(), case.timeout())
    out.injected = injected(res.stats, case.kind)
    out.reported = len(res.failures)
    out.retried = sum(res.stats["errors"].values()) - len(res.failures)
    run_dir = run_dir_of(res)
    summary = json.loads((run_dir / "summary.json").read_text())
    metrics = read_jsonl(run_dir / "metrics.jsonl")
    problems = usage_problems(summary["usage"], [res.stats])
    out.usage_exact &= not problems
    out.wrong += problems
    proposals = [p for m in metrics for p in m["proposals"]]
    target = case.target()

    if case.kind == "malformed":
        rejected = [p for p in proposals if p["reason"].startswith("no usable proposal: unparseable")]
        if any(p["accepted"] and p["reason"].startswith("no usable") for p in proposals):
            out.lost.append("a malformed proposal was accepted")
        out.reported = len(rejected)
        out.retried = sum(1 for m in metrics for a, b in zip(m["proposals"], m["proposals"][1:])
                          if a["reason"].startswith("no usable proposal: unparseable"))
        if not rejected:
            out.wrong.append("no proposal was rejected as unparseable")
        if res.code != 0 or summary["status"] != "completed":
            out.wrong.append(f"exit {res.code}, status {summary['status']}")
        if case.shape == "transient":
            _same_result(summary, run_dir, ref, out)
        else:
            if any(p["accepted"] for p in proposals) or summary["best"]["step"] != 0:
                out.lost.append("a proposal was accepted although every optimizer reply was malformed")
            if yaml.safe_load((run_dir / "prompts.yaml").read_text())["instruction"] != INITIAL:
                out.wrong.append("prompts.yaml is not the initial prompt")
        return

    if target == "all":  # transient everywhere: retried, and the fault-free result
        if res.code != 0 or summary["status"] != "completed":
            out.wrong.append(f"exit {res.code}, status {summary['status']}: {summary['reason']}")
        if res.failures:
            out.wrong.append(f"{len(res.failures)} calls were given up")
        _same_result(summary, run_dir, ref, out)
        for role in ("task", "backward", "optimizer"):
            done = summary["usage"][role]["calls"] - summary["usage"][role]["errors"]
            if done != ref.summary["usage"][role]["calls"]:
                out.wrong.append(f"{role}: {done} answered calls, the fault-free run made {ref.summary['usage'][role]['calls']}")
        if not out.injected:
            out.wrong.append("no fault was injected")
        return

    if target == "optimizer":  # every optimizer call fails: the run stops failed at step 1, nothing accepted
        reason = summary.get("reason") or ""
        if res.code != 3 or summary["status"] != "failed":
            out.wrong.append(f"exit {res.code}, status {summary['status']}, expected 3 and failed: {reason}")
        if "optimizer calls failed after retries" not in reason or "max_error_rate" not in reason:
            out.wrong.append(f"reason does not explain the failure: {reason!r}")
        if metrics or summary["steps"] != 0:  # step 1 never completed: nothing of it may be recorded
            out.wrong.append(f"{len(metrics)} step(s) recorded, summary steps {summary['steps']}; expected none")
        check_detail(case, reason, out, "summary.json reason")
        if {f[0] for f in res.failures} != {"optimizer"}:
            out.wrong.append(f"calls given up in roles {sorted({f[0] for f in res.failures})}")
        check_attempts(case, res.failures, out)
        if summary["usage"]["optimizer"]["errors"] == 0:
            out.wrong.append("no optimizer error in summary.json usage")
        if summary["best"]["step"] != 0 or yaml.safe_load((run_dir / "prompts.yaml").read_text())["instruction"] != INITIAL:
            out.lost.append("the prompts changed although no proposal was made")
        return

    # step2: the training example only step 2 sees fails: above max_error_rate, the run fails at step 2
    if res.code != 3 or summary["status"] != "failed":
        out.wrong.append(f"exit {res.code}, status {summary['status']}, expected 3 and failed")
    reason = summary.get("reason") or ""
    if "model-call errors" not in reason or "max_error_rate" not in reason:
        out.wrong.append(f"reason does not explain the failure: {reason!r}")
    check_detail(case, reason, out, "summary.json reason")
    check_attempts(case, res.failures, out)
    if [f[0] for f in res.failures] != ["task"]:
        out.wrong.append(f"calls given up: {res.failures}, expected one task call")
    checkpoint = json.loads((run_dir / "checkpoint.json").read_text())["state"]
    if summary["steps"] != 1 or checkpoint["step"] != 1 or [m["step"] for m in metrics] != [1]:
        out.lost.append(f"completed steps not kept: summary {summary['steps']}, checkpoint {checkpoint['step']}, "
                        f"metrics {[m['step'] for m in metrics]}")
    if metrics and metrics[0] != {**ref.metrics[0], "wall_seconds": metrics[0]["wall_seconds"],
                                  "usage": metrics[0]["usage"]}:
        out.lost.append("step 1's metrics differ from the fault-free run's")
    if (run_dir / "prompts.yaml").read_text() != ref.prompts:
        out.lost.append("prompts.yaml lost step 1's accepted prompt")
    # the provider recovers: --resume on the same port, no fault
    port = int(re.search(r":(\d+)/v1", (run_dir / "config.yaml").read_text()).group(1))
    with server(folder, [], port) as srv:
        code, stdout, stderr, _ = cli(["train", folder / "spec.yaml", "--runs-dir", folder / "runs",
                                       "--resume", run_dir], folder)
        stats2 = srv.stats()
    final = json.loads((run_dir / "summary.json").read_text())
    if code != 0 or final["status"] != "completed" or "after step 1" not in stderr:
        out.lost.append(f"--resume: exit {code}, status {final['status']}: {stderr[-500:]}")
    _same_result(final, run_dir, ref, out, lost=True)
    problems = usage_problems(final["usage"], [res.stats, stats2])
    out.usage_exact &= not problems
    out.wrong += [f"after --resume: {p}" for p in problems]


def _same_result(summary: dict, run_dir: Path, ref: Reference, out: Outcome, lost: bool = False) -> None:
    where = out.lost if lost else out.wrong
    for key in ("initial", "best", "steps"):
        if summary[key] != ref.summary[key]:
            where.append(f"{key} {summary[key]} != fault-free {ref.summary[key]}")
    if (run_dir / "prompts.yaml").read_text() != ref.prompts:
        where.append("prompts.yaml differs from the fault-free run's")
    metrics = read_jsonl(run_dir / "metrics.jsonl")
    scores = [(m["batch_score"], m["subset_score"], m["val_score"], m["best_val"]) for m in metrics]
    if scores != [(m["batch_score"], m["subset_score"], m["val_score"], m["best_val"]) for m in ref.metrics]:
        out.lost.append(f"step scores {scores} differ from the fault-free run's")


# ---------------------------------------------------------------- the matrix


def run_matrix(kinds: tuple[str, ...] = KINDS, work: Path | None = None, progress=None) -> tuple[Reference, list[Outcome]]:
    work = Path(work) if work else Path(tempfile.mkdtemp(prefix="autodiff-faults-"))
    work.mkdir(parents=True, exist_ok=True)
    ref = references(work)
    outcomes = []
    for case in all_cases(kinds) + cold_cases(tuple(k for k in COLD_KINDS if k in kinds)):
        outcome = run_case(case, ref, work)
        outcomes.append(outcome)
        if progress:
            progress(outcome)
    return ref, outcomes


def counts(outcomes: list[Outcome]) -> dict:
    return {"cases": len(outcomes), "survived": sum(o.survived for o in outcomes),
            "lost": sum(bool(o.lost) for o in outcomes), "usage_exact": sum(o.usage_exact for o in outcomes),
            "injected": sum(o.injected for o in outcomes)}


def _bench_runner():
    """benchmarks/run.py, for its machine() and write_section(); loaded by path (not a package)."""
    name = "autodiff_bench_runner"
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, HERE / "run.py")
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
    return sys.modules[name]


def section(command: str, outcomes: list[Outcome], seconds: float, load: dict | None = None,
            profile: dict | None = None) -> str:
    c = counts(outcomes)
    date = datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC")
    lines = [f"<!-- bench:{SECTION} -->", "## Fault matrix and load (issue 8)", "",
             "Command:", "", "```", command, "```", "",
             f"Machine: {_bench_runner().machine()}  ", f"Date: {date}", "",
             "Each case injects one fault through the fake OpenAI-compatible server (127.0.0.1, zero latency) "
             "under litellm's real HTTP path and runs the CLI command in process against the toy count "
             f"pipeline (max_retries {MAX_RETRIES}; backoff base 0, Retry-After {RETRY_AFTER:g} s honoured; "
             f"timeout cases: `timeout: {TIMEOUT:g}`). Transient = each distinct request fails the first 2 times "
             "(timeout, context-length, malformed: once), permanent = always. eval: every request (transient) or "
             "the one validation example with n=3 (permanent, run with max_error_rate 0.5 and 0.1); train: every "
             "request of every role (transient) or the training example only step 2 sees (permanent and "
             "context-length: the run must fail at step 2 with a reason, keep step 1, and `--resume` against the "
             "recovered server must reach the fault-free result); train (optimizer only): every optimizer request (step 1 has no proposal: above max_error_rate the run stops `failed`, initial prompts kept). "
             "Context-length is never retried; malformed optimizer JSON rejects the proposal with its reason. "
             f"eval (cold process): the transient eval case of {', '.join(COLD_KINDS)} run in a fresh interpreter "
             "(the CLI's own backoff), so the first attempts meet a cold litellm/openai/httpx. "
             "Usage exact = calls, errors and tokens in the command's usage equal the server's own counts "
             "(after a resume: both servers') and no attempt is counted as unsent.", "",
             f"{c['cases']} cases in {seconds:.0f} s: survived {c['survived']}, lost {c['lost']}, usage exact "
             f"{c['usage_exact']}/{c['cases']}, faults injected {c['injected']}.", "",
             "| fault | shape | command | injected | retried | reported | survived | lost | usage exact |",
             "|---|---|---|---:|---:|---:|---|---|---|"]
    for o in outcomes:
        note = "; ".join(o.problems())
        lines.append(f"| {o.case.kind} | {o.case.shape} | {o.case.command} | {o.injected} | {o.retried} | "
                     f"{o.reported} | {'yes' if o.survived else 'no: ' + note} | {'yes' if o.lost else 'no'} | "
                     f"{'yes' if o.usage_exact else 'no'} |")
    if load:
        lines += ["", "### Load", "", load_text(load)]
    if profile:
        lines += ["", profile_text(profile)]
    lines.append(f"<!-- /bench:{SECTION} -->")
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------- load


LOAD_SCRIPT = r"""
rules:
  - {match: 'n=\d*7\b', reply: "I lost count. Answer: 0"}
  - {match: 'n=(\d+)', reply: "Counted. Answer: {1}"}
default: "Answer: 0"
"""
LOAD_FAULTS = ({"kind": "500", "rate": 0.02}, {"kind": "429", "rate": 0.015, "retry_after": 0},
               {"kind": "reset", "rate": 0.015})
LOAD_CONCURRENCY = 64


def run_load(n: int, folder: Path, *, concurrency: int = LOAD_CONCURRENCY, seed: int = 0, latency: float = 0.005,
             faults: tuple[dict, ...] = LOAD_FAULTS) -> dict:
    """`autodiff eval` of n examples at --concurrency against the fake server with seeded rate faults.

    Example i asks "How many? n=i"; the script answers right unless i ends in 7, so the fault-free
    score over any set of completed examples is known without running. Returns the figures and
    `problems` (empty when every example was scored or, only after exhausting its retries,
    counted as an error, usage equals the server's counts and the score is the expected one)."""
    from autodiff_cli.llm import fake
    from tests.support.fake_server import FakeServer

    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    (folder / "script.yaml").write_text(LOAD_SCRIPT, encoding="utf-8")
    with (folder / "val.jsonl").open("w", encoding="utf-8") as f:
        for i in range(n):
            f.write(json.dumps({"id": f"q{i}", "question": f"How many? n={i}", "answer": str(i)}) + "\n")
    fake.reset_fake_state()
    # 5 ms per request: enough for the server to see the requests that are in flight together
    server = FakeServer(folder / "script.yaml", latency=latency, seed=seed, faults=list(faults))
    with server.in_thread() as srv:
        model = (f'{{model: openai/fake, api_base: "{srv.api_base}", api_key_env: {KEY_ENV}, '
                 f"max_retries: {MAX_RETRIES}, timeout: 60}}")
        spec = folder / "spec.yaml"
        spec.write_text(f"name: load\nmodels:\n  task: {model}\ndata:\n  val: val.jsonl\n" + COUNT_PIPELINE.lstrip(),
                        encoding="utf-8")
        started = time.monotonic()
        code, stdout, stderr, record = cli(["eval", spec, "--split", "val", "--concurrency", concurrency, "--json",
                                            "--out", folder / "rows.jsonl"], folder)
        failures = record.calls
        wall = time.monotonic() - started
        stats = srv.stats()
    problems: list[str] = []
    result = last_json(stdout) if stdout.strip() else {}
    if code != 0:
        problems.append(f"exit {code}: {stderr[-1000:]}")
    rows = read_rows(folder / "rows.jsonl")
    if len(rows) != n or result.get("n") != n:
        problems.append(f"{len(rows)} rows, n {result.get('n')}, expected {n}")
    errors = [r for r in rows.values() if r["error"]]
    completed = [r for r in rows.values() if not r["error"]]
    for r in errors:
        if r["score"] is not None or f"{1 + MAX_RETRIES} attempts" not in r["error"]:
            problems.append(f"{r['id']}: an error scored {r['score']} or before its retries ran out: {r['error']}")
    if len(failures) != len(errors) or any(f[1] != 1 + MAX_RETRIES for f in failures):
        problems.append(f"{len(failures)} calls given up for {len(errors)} error rows")
    wrong = [r["id"] for r in completed if r["score"] != (0.0 if r["id"].endswith("7") else 1.0)]
    if wrong:
        problems.append(f"{len(wrong)} completed examples mis-scored, e.g. {wrong[:5]}")
    expected = sum(0.0 if r["id"].endswith("7") else 1.0 for r in completed) / len(completed) if completed else None
    if result.get("score") != expected:
        problems.append(f"score {result.get('score')} != {expected} expected over completed examples")
    if (result.get("completed"), result.get("errors")) != (len(completed), len(errors)):
        problems.append(f"completed/errors {result.get('completed')}/{result.get('errors')} disagree with the rows")
    usage = result.get("usage", {})
    exact = bool(usage) and not usage_problems(usage, [stats])
    problems += usage_problems(usage, [stats]) if usage else ["no usage"]
    # the client must reach its limit and never pass it; the server sees fewer at once when the
    # client is CPU-bound (its share of each call's time is then larger than the server's latency)
    if record.max_in_flight != min(concurrency, n):
        problems.append(f"the client ran at most {record.max_in_flight} calls at once, not {concurrency}")
    if stats["max_in_flight"] > concurrency:
        problems.append(f"the server saw {stats['max_in_flight']} requests at once, above {concurrency}")
    n_faults = sum(stats["faults"].values())
    return {"n": n, "concurrency": concurrency, "fault_rate": sum(f.get("rate") or 0.0 for f in faults),
            "fault_mix": ", ".join(f"{f['kind']} {f['rate']:.1%}" if f.get("rate") else json.dumps(f) for f in faults),
            "wall_s": wall,
            "calls": stats["requests"], "faults": n_faults, "retries": sum(stats["errors"].values()) - len(failures),
            "errors": len(errors), "completed": len(completed), "max_in_flight": record.max_in_flight,
            "server_max_in_flight": stats["max_in_flight"],
            "score": result.get("score") or 0.0, "expected": expected or 0.0, "max_retries": MAX_RETRIES,
            "latency": latency, "exact": exact, "problems": problems, "ok": not problems}


def profile_load(n: int, folder: Path) -> dict:
    """Where the client's CPU time goes in `run_load(n)` (cProfile of the thread that runs the CLI;
    the fake server's thread is not profiled; litellm imported beforehand): inside
    litellm.acompletion (litellm, the openai SDK, HTTP), in the call cache, in autodiff's own code,
    and the rest (event loop, start-up, data)."""
    import cProfile
    import pstats

    from autodiff_cli.llm.providers import load_litellm

    load_litellm()
    profiler = cProfile.Profile()
    profiler.enable()
    r = run_load(n, folder)
    profiler.disable()
    stats = pstats.Stats(profiler).stats
    total = sum(v[2] for v in stats.values())
    here = str(Path(__file__).resolve())

    def cumulative(match) -> float:
        return sum(v[3] for (file, _, func), v in stats.items() if match(file, func))

    litellm_s = cumulative(lambda f, fn: f == here and fn == "acompletion")
    cache_s = cumulative(lambda f, fn: f.endswith("autodiff_cli/llm/cache.py") and fn in ("get", "put"))
    ours_s = sum(v[2] for (file, _, _), v in stats.items()
                 if "autodiff_cli" in file and not file.endswith("llm/cache.py"))
    return {"n": n, "wall_s": r["wall_s"], "total_s": total, "litellm_s": litellm_s, "cache_s": cache_s,
            "ours_s": ours_s, "calls": r["calls"], "ok": r["ok"]}


def profile_text(p: dict) -> str:
    t = p["total_s"]
    rest = t - p["litellm_s"] - p["cache_s"] - p["ours_s"]
    return (f"Where the time goes (`--profile {p['n']}`: cProfile of the CLI's thread over a {p['n']:,}-example "
            f"run, {t:.1f} s profiled, {1000 * t / p['calls']:.1f} ms per call under the profiler): inside "
            f"`litellm.acompletion` "
            f"(litellm, the openai SDK it drives, HTTP) {100 * p['litellm_s'] / t:.0f}%, the call cache "
            f"(diskcache) {100 * p['cache_s'] / t:.0f}%, autodiff's own code (engine, client, evaluation, "
            f"metrics) {100 * p['ours_s'] / t:.0f}%, the rest (event loop, start-up, data) {100 * rest / t:.0f}%. "
            "The client is CPU-bound in litellm. Fixed here: the client priced every reply a second time with "
            "`litellm.completion_cost` although litellm had already put the price in the reply's hidden "
            "params; that second pass was ~6% of the process's CPU (2,000-example runs, old vs new, twice "
            "each: 10.2 s vs 9.5 s of CPU).")


def load_text(r: dict) -> str:
    return (f"`autodiff eval` of {r['n']:,} examples at `--concurrency {r['concurrency']}` (in process, through "
            f"litellm and HTTP) against the fake server with {r['fault_rate']:.0%} seeded faults "
            f"({r['fault_mix']}): {r['wall_s']:.1f} s wall, {r['calls']:,} calls "
            f"({r['retries']:,} retried attempts, {r['faults']:,} faults injected), {r['errors']} example(s) "
            f"counted as errors (each after {r['max_retries'] + 1} failed attempts), {r['completed']:,} scored; "
            f"at most {r['max_in_flight']} provider calls at once (the server saw at most {r['server_max_in_flight']} "
            f"at once with its {r['latency'] * 1000:g} ms latency); score {r['score']:.4f} over completed examples "
            f"(fault-free expectation {r['expected']:.4f}); usage calls/errors/prompt/completion tokens equal "
            f"the server's: {'yes' if r['exact'] else 'NO'}.")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--kind", action="append", choices=KINDS, help="only these fault kinds (repeatable)")
    ap.add_argument("--work", type=Path, default=None, help="folder for the cases (default: a temporary one)")
    ap.add_argument("--keep", action="store_true", help="keep the work folder")
    ap.add_argument("--load", type=int, default=0, metavar="N",
                    help="also run the load test with N examples (tests/e2e/test_load.py; 10000 for the issue's figure)")
    ap.add_argument("--profile", type=int, default=0, metavar="N",
                    help="also profile a load run of N examples: where the client's time goes")
    ap.add_argument("--write-results", action="store_true", help=f"write the `{SECTION}` section of {RESULTS}")
    ap.add_argument("--results", type=Path, default=RESULTS)
    args = ap.parse_args(argv)
    work = args.work or Path(tempfile.mkdtemp(prefix="autodiff-faults-"))

    def show(o: Outcome) -> None:
        print(f"{o.case.kind:15s} {o.case.shape:9s} {o.case.command:22s} injected {o.injected:3d} retried "
              f"{o.retried:3d} reported {o.reported:2d} {'survived' if o.survived else 'FAILED'}"
              f"{' LOST' if o.lost else ''}{'' if o.usage_exact else ' usage-inexact'} [{o.seconds:.1f} s]"
              + (f"\n    {'; '.join(o.problems())}" if o.problems() else ""), flush=True)

    started = time.monotonic()
    load = profile = None
    try:
        _, outcomes = run_matrix(tuple(args.kind or KINDS), work, progress=show)
        seconds = time.monotonic() - started
        if args.load:
            load = run_load(args.load, work / "load")
            print(load_text(load))
            for p in load["problems"]:
                print(f"    {p}")
        if args.profile:
            profile = profile_load(args.profile, work / "profile")
            print(profile_text(profile))
    finally:
        if not args.keep and args.work is None:
            shutil.rmtree(work, ignore_errors=True)
    c = counts(outcomes)
    print(f"{c['cases']} cases: survived {c['survived']}, lost {c['lost']}, usage exact {c['usage_exact']} "
          f"({seconds:.0f} s)")
    if args.write_results:
        command = "python benchmarks/fault_matrix.py " + " ".join(shlex.quote(a) for a in (argv or sys.argv[1:]))
        _bench_runner().write_section(args.results, SECTION, section(command.strip(), outcomes, seconds, load, profile))
        print(f"wrote the `{SECTION}` section of {args.results}")
    ok = c["survived"] == c["cases"] and c["usage_exact"] == c["cases"] and (load is None or load["ok"])
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
