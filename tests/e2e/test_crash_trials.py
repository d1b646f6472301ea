"""SIGKILL `autodiff train` at moments spread over a run (while checkpoint.json is being written,
inside backward, inside proposing), then resume: the run directory stays readable, the resume
continues from the last completed step and ends with the uninterrupted run's prompts and best
scores. The trials themselves are in benchmarks/crash_trials.py.

CRASH_TRIALS sets the number of trials (default 20, the issue's number, at least a third of them
in checkpoint writes; fewer for a quick local run); CRASH_JOBS how many run at once.
"""
from __future__ import annotations

import importlib.util
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def load_trials_module():
    spec = importlib.util.spec_from_file_location("crash_trials", ROOT / "benchmarks" / "crash_trials.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["crash_trials"] = module
    spec.loader.exec_module(module)
    return module


C = load_trials_module()
TRIALS = int(os.environ.get("CRASH_TRIALS", "20"))
JOBS = int(os.environ.get("CRASH_JOBS", "3"))


def test_crash_trials_lose_nothing(tmp_path):
    ref, trials = C.run_trials(TRIALS, jobs=JOBS, seed=0, work=tmp_path)
    counts = C.counts(trials)
    report = "\n".join(f"{t.number} {t.label()}: {t.outcome} {t.notes}" for t in trials)
    assert counts["missed"] == 0, report
    assert counts["lost"] == 0, report
    assert counts["survived"] == counts["tried"] == TRIALS, report
    assert counts["checkpoint"] * 3 >= TRIALS and counts["backward"] >= 1 and counts["propose"] >= 1, counts
    # the moments are spread: several steps and checkpoint writes, not one moment repeated
    # (a run has only steps + 1 checkpoint writes: with many trials each is hit more than once)
    timed = [(t.kind, t.target, t.delay) for t in trials if t.kind != "checkpoint"]
    assert len(set(timed)) == len(timed)
    writes = {t.target[0] for t in trials if t.kind == "checkpoint"}
    assert writes == set(range(1, min(ref.steps + 1, counts["checkpoint"]) + 1)), writes
    assert ref.best["step"] > 1 and ref.steps >= 3  # prompts changed over several steps: a real comparison


def test_the_pause_hook_is_inert_unless_asked_for(tmp_path):
    code = ("import sys; from pathlib import Path; from autodiff_cli.io.files import atomic_write_bytes; "
            "atomic_write_bytes(Path(sys.argv[1]), b'{}')")
    for pause in (None, "other.json:5"):
        env = {k: v for k, v in os.environ.items() if k != C.PAUSE_ENV}
        if pause:
            env[C.PAUSE_ENV] = pause
        started = time.monotonic()
        subprocess.run([sys.executable, str(C.PAUSING_CLI), "-c", code, str(tmp_path / "checkpoint.json")],
                       env=env, check=True, timeout=60)
        assert time.monotonic() - started < 4  # the interpreter's start, no 5 s pause
    assert json.loads((tmp_path / "checkpoint.json").read_text()) == {}


def test_the_product_has_no_pause_hook():
    """The pause lives in tests/tools: no test-only code path ships in the package."""
    package = Path(C.HERE.parent / "autodiff_cli")
    assert not [p for p in package.rglob("*.py") if C.PAUSE_ENV in p.read_text(encoding="utf-8")]


def test_a_kill_in_the_middle_of_an_atomic_write_keeps_the_old_file(tmp_path):
    """The primitive under the trials: SIGKILL between writing the temporary file and os.replace."""
    target = tmp_path / "checkpoint.json"
    target.write_text(json.dumps({"state": {"step": 1}}))
    code = ("import sys; from pathlib import Path; from autodiff_cli.io.files import atomic_write_bytes; "
            "atomic_write_bytes(Path(sys.argv[1]), b'{\"state\": {\"step\": 2}}')")
    env = {**os.environ, C.PAUSE_ENV: "checkpoint.json:30"}
    proc = subprocess.Popen([sys.executable, str(C.PAUSING_CLI), "-c", code, str(target)], stderr=subprocess.PIPE,
                            text=True, env=env)
    assert "pause before replace checkpoint.json" in proc.stderr.readline()
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    assert json.loads(target.read_text()) == {"state": {"step": 1}}  # the old file, whole
    leftovers = list(tmp_path.glob(".checkpoint.json.*.tmp"))
    assert len(leftovers) == 1 and json.loads(leftovers[0].read_text())["state"]["step"] == 2

    from autodiff_cli.io.rundir import RunDir

    (tmp_path / "config.yaml").write_text("name: x\n")
    (tmp_path / "resolved.yaml").write_text("name: x\n")
    RunDir.open(tmp_path).truncate_after(1)  # what --resume does first
    assert not list(tmp_path.glob(".*.tmp"))


@pytest.mark.parametrize("key", ["x", "null"])
def test_a_run_killed_under_faults_with_a_dummy_key_ends_as_an_uninterrupted_fault_free_run(tmp_path, key):
    """Issue 14's acceptance: the fake server with 15% faults, the API key `x` or `null`, a SIGKILL in
    the middle of step 2 (its optimizer request at the server), `--resume`: prompts, summary and
    checkpoint as a fault-free uninterrupted run writes them (usage, wall time, place aside), and the
    usage equal to the server's request count (a journal in the run directory keeps the calls the
    killed process made)."""
    result = C.run_killed_under_faults(tmp_path, key)
    assert result["problems"] == [], result
    assert result["faults"] > 0 and result["usage_calls"] == result["requests"]
    assert result["best"]["step"] >= 2  # the prompts changed after the kill too: a real comparison
