"""`autodiff train` end to end with the scripted fake model: gradients, proposals, validation,
run directory, budget, interrupt and resume, export."""
from __future__ import annotations

import asyncio
import json
import re
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from autodiff_cli.app.cli import app
from autodiff_cli.llm.fake import reset_fake_state
from tests.conftest import write
from tests.specs import TOY_SCRIPT, TOY_SPEC

SCRIPT = TOY_SCRIPT

SPEC = TOY_SPEC


def rows(prefix, ns):
    return [{"id": f"{prefix}{i}", "question": f"How many? n={n}", "answer": str(n)} for i, n in enumerate(ns)]


@pytest.fixture(autouse=True)
def fresh_fake():
    reset_fake_state()


def setup(tmp_path: Path, new_value="Count the things. ALWAYS ADD the counts.", spec=SPEC):
    write(tmp_path / "script.yaml", SCRIPT % {"new": new_value})
    for name, ns in (("train", [1, 2, 3, 1, 4, 5, 1, 2]), ("val", [1, 2, 3, 4]), ("test", [1, 6, 7])):
        (tmp_path / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows(name, ns)))
    return write(tmp_path / "spec.yaml", spec)


def train(tmp_path, *args):
    result = CliRunner().invoke(app, ["train", str(tmp_path / "spec.yaml"), "--runs-dir", str(tmp_path / "runs"),
                                      *map(str, args)])
    run_dir = Path(result.stdout.strip().splitlines()[-1]) if result.stdout.strip() else None
    return result, run_dir


def test_gradient_proposal_and_acceptance_fill_the_run_directory(tmp_path):
    setup(tmp_path)
    result, run = train(tmp_path)
    assert result.exit_code == 0, result.output
    summary = json.loads((run / "summary.json").read_text())
    assert summary["status"] == "completed"
    assert summary["initial"] == {"val": 0.25, "test": pytest.approx(1 / 3)}
    assert summary["best"] == {"step": 1, "val": 1.0, "test": 1.0}
    assert summary["proposals"] == {"tried": 1, "passed_subset": 1, "accepted": 1}
    assert set(summary["usage"]) == {"task", "backward", "optimizer", "teacher"}
    assert summary["models"]["backward"] == "fake/script.yaml"
    prompts = yaml.safe_load((run / "prompts.yaml").read_text())
    assert prompts["instruction"] == "Count the things. ALWAYS ADD the counts."
    assert prompts["answer_format"] == "End with Answer: N"  # not trainable: untouched

    metrics = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics] == [1, 2]
    first = metrics[0]
    assert {"step", "epoch", "batch_ids", "batch_score", "subset_score", "proposals", "val_score", "best_val",
            "usage", "wall_seconds"} <= set(first)
    assert first["proposals"][0]["accepted"] is True and first["val_score"] == 1.0
    # selective gradients: one backward call per failed example of the subset, none for correct ones
    failed_in_subset = [i for i in first["subset_ids"] if not i.endswith(("0", "3"))]  # n=1 rows are right
    assert first["usage"]["backward"]["calls"] == len(failed_in_subset) == 2
    grads = [json.loads(x) for x in (run / "traces" / "step-0001.jsonl").read_text().splitlines()]
    grad_rows = [g for g in grads if g["kind"] == "gradient"]
    assert {g["target"] for g in grad_rows} == {"param:instruction", "call:count#0"}
    assert all({"example_id", "node", "call_index", "target", "feedback", "score"} <= set(g) for g in grad_rows)
    # the parse node passed the loss evaluation unchanged to the count call
    passed = [g for g in grad_rows if g["target"] == "call:count#0"]
    assert all(g["node"] == "parse" and "wrong" in g["feedback"] for g in passed)
    # step 2: everything is right now, so the step is skipped at no backward cost
    assert metrics[1]["skipped"] and metrics[1]["usage"]["backward"]["calls"] == 0
    checkpoint = json.loads((run / "checkpoint.json").read_text())
    assert checkpoint["state"]["step"] == 2

    baked = tmp_path / "baked.yaml"
    assert CliRunner().invoke(app, ["export-prompts", str(run), "--format", "config", "-o", str(baked)]).exit_code == 0
    again = CliRunner().invoke(app, ["eval", str(baked), "--json"])
    assert json.loads(again.stdout.strip().splitlines()[-1])["score"] == summary["best"]["val"]


def test_a_proposal_that_does_not_help_is_reverted(tmp_path):
    setup(tmp_path, new_value="Count the things slowly.")
    result, run = train(tmp_path)
    assert result.exit_code == 0, result.output
    summary = json.loads((run / "summary.json").read_text())
    assert summary["best"]["step"] == 0 and summary["proposals"]["accepted"] == 0
    assert yaml.safe_load((run / "prompts.yaml").read_text())["instruction"] == "Count the things."
    step1 = json.loads((run / "metrics.jsonl").read_text().splitlines()[0])
    first, second = step1["proposals"]
    assert first["accepted"] is False and "subset score" in first["reason"]
    # the same text again is refused before any scoring
    assert second["params"] == {} and "failed proposal" in second["reason"]


def test_no_gradient_mode_makes_no_backward_call(tmp_path):
    setup(tmp_path, spec=SPEC.replace("seed: 0}", "seed: 0, mode: no_gradient}"))
    result, run = train(tmp_path)
    assert result.exit_code == 0, result.output
    summary = json.loads((run / "summary.json").read_text())
    assert summary["usage"]["backward"]["calls"] == 0 and summary["usage"]["optimizer"]["calls"] >= 1
    assert summary["best"]["val"] == 1.0


def test_budget_stops_the_run_with_exit_4(tmp_path):
    setup(tmp_path, spec=SPEC.replace("seed: 0}", "seed: 0, budget: {max_calls: 6}}"))
    result, run = train(tmp_path, "--no-cache")
    assert result.exit_code == 4, result.output
    summary = json.loads((run / "summary.json").read_text())
    assert summary["status"] == "budget_exhausted" and "max_calls" in summary["reason"]
    total = sum(u["calls"] for u in summary["usage"].values())
    assert total <= 6


def test_interrupted_run_resumes_to_the_same_result(tmp_path, monkeypatch):
    setup(tmp_path, spec=SPEC.replace("max_steps: 2", "max_steps: 3, epochs: 2").replace("max_proposals: 2", "max_proposals: 1"))
    _, straight = train(tmp_path)
    reference = json.loads((straight / "summary.json").read_text())

    from autodiff_cli.train import trainer as trainer_module

    original = trainer_module.Trainer.step
    calls = {"n": 0}

    async def interrupting_step(self, state, step):
        if step == 2 and calls["n"] == 0:
            calls["n"] += 1
            await asyncio.sleep(0.5)  # time spent in the step that is then interrupted
            raise asyncio.CancelledError()
        return await original(self, state, step)

    monkeypatch.setattr(trainer_module.Trainer, "step", interrupting_step)
    result, run = train(tmp_path)
    assert result.exit_code == 130
    stopped = json.loads((run / "summary.json").read_text())
    assert stopped["status"] == "interrupted"
    checkpoint = json.loads((run / "checkpoint.json").read_text())["state"]
    assert checkpoint["step"] == 1 and stopped["wall_seconds"] >= checkpoint["wall_seconds"] + 0.5
    resumed, same_run = train(tmp_path, "--resume", run)
    assert resumed.exit_code == 0, resumed.output
    assert same_run == run
    final = json.loads((run / "summary.json").read_text())
    assert final["status"] == "completed" and final["steps"] == reference["steps"] == 3
    assert final["best"] == reference["best"]
    assert final["wall_seconds"] >= stopped["wall_seconds"]  # the interrupted step's time is not lost
    assert (run / "prompts.yaml").read_text() == (straight / "prompts.yaml").read_text()
    assert [json.loads(x)["step"] for x in (run / "metrics.jsonl").read_text().splitlines()] == [1, 2, 3]


def test_resume_refuses_a_changed_config(tmp_path):
    setup(tmp_path)
    _, run = train(tmp_path)
    result, _ = train(tmp_path, "--resume", run, "--set", "train.max_steps=5")
    assert result.exit_code == 2 and "resolved.yaml" in result.stderr


def test_dry_run_calls_nothing(tmp_path):
    setup(tmp_path)
    result = CliRunner().invoke(app, ["train", str(tmp_path / "spec.yaml"), "--dry-run"])
    assert result.exit_code == 0, result.output
    assert "backward" in result.stdout and not (tmp_path / "runs").exists()


def test_moving_batch_accumulates_failures_until_an_update_is_accepted(tmp_path):
    setup(tmp_path, new_value="Count the things slowly.",
          spec=SPEC.replace("max_error_samples: 2", "max_error_samples: 10").replace("max_correct_samples: 1", "max_correct_samples: 10"))
    result, run = train(tmp_path)
    assert result.exit_code == 0, result.output
    step1, step2 = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert set(step1["subset_ids"]) == set(step1["batch_ids"])
    # nothing was accepted at step 1, so step 2 backpropagates both minibatches
    assert set(step2["subset_ids"]) == set(step1["batch_ids"]) | set(step2["batch_ids"])


def test_stage_two_rejects_a_proposal_that_only_helps_the_subset(tmp_path):
    setup(tmp_path)
    # validation questions use another format that the improved instruction does not fix
    (tmp_path / "val.jsonl").write_text("".join(
        json.dumps({"id": f"v{i}", "question": f"How many? k={n}", "answer": str(n)}) + "\n" for i, n in enumerate([2, 3])))
    result, run = train(tmp_path)
    assert result.exit_code == 0, result.output
    summary = json.loads((run / "summary.json").read_text())
    assert summary["proposals"]["passed_subset"] >= 1 and summary["proposals"]["accepted"] == 0
    step1 = json.loads((run / "metrics.jsonl").read_text().splitlines()[0])
    assert step1["proposals"][0]["subset_score"] > step1["subset_score"]
    assert "validation" in step1["proposals"][0]["reason"]
    assert yaml.safe_load((run / "prompts.yaml").read_text())["instruction"] == "Count the things."


def test_llm_feedback_asks_the_backward_engine_to_explain_the_loss(tmp_path):
    spec = SPEC.replace("metric: {fn: exact_match, args: {pred: parse, target: input.answer}}",
                        "metric: {fn: exact_match, args: {pred: parse, target: input.answer}}\n"
                        "loss: {fn: exact_match, args: {pred: parse, target: input.answer}, feedback: llm}")
    setup(tmp_path, spec=spec)
    script = (tmp_path / "script.yaml").read_text().replace(
        "rules:\n", "rules:\n  - match: 'You evaluate the final output'\n    in: system\n    reply: 'It forgot to add.'\n")
    (tmp_path / "script.yaml").write_text(script)
    result, run = train(tmp_path, "--set", "train.max_steps=1")
    assert result.exit_code == 0, result.output
    rows = [json.loads(x) for x in (run / "traces" / "step-0001.jsonl").read_text().splitlines()]
    passed = [r for r in rows if r["kind"] == "gradient" and r["target"] == "call:count#0"]
    assert passed and all("It forgot to add." in r["feedback"] for r in passed)
    usage = json.loads((run / "metrics.jsonl").read_text().splitlines()[0])["usage"]["backward"]
    assert usage["calls"] == 2 * 2  # per failed example: one loss explanation + one backward call


def test_one_at_a_time_changes_one_param_per_proposal(tmp_path):
    spec = SPEC.replace("trainable: false", "trainable: true").replace("seed: 0}", "seed: 0, propose: one_at_a_time}")
    setup(tmp_path, spec=spec)
    script = (tmp_path / "script.yaml").read_text().replace(
        '"param: instruction": ', '"param: answer_format": "Say it differently.", "param: instruction": ')
    (tmp_path / "script.yaml").write_text(script)
    result, run = train(tmp_path, "--set", "train.max_steps=1")
    assert result.exit_code == 0, result.output
    proposals = json.loads((run / "metrics.jsonl").read_text().splitlines()[0])["proposals"]
    assert all(len(p["params"]) <= 1 for p in proposals)


def test_patience_ends_the_run_early(tmp_path):
    setup(tmp_path, new_value="Count the things slowly.",
          spec=SPEC.replace("max_steps: 2", "max_steps: 4, epochs: 2, patience: 1"))
    result, run = train(tmp_path)
    assert result.exit_code == 0, result.output
    summary = json.loads((run / "summary.json").read_text())
    assert summary["steps"] == 1 and "patience" in summary["reason"]


def test_sigterm_interrupts_cleanly_and_the_run_resumes(tmp_path):
    """SIGTERM then SIGINT (a second, impatient Ctrl-C): a clean stop, a full summary, an exact resume."""
    import os
    import signal
    import subprocess
    import sys
    import time

    # proposals never help here, so every step runs backward and two proposals: slow enough to interrupt
    setup(tmp_path, new_value="Count the things slowly.", spec=SPEC.replace("max_steps: 2", "max_steps: 3, epochs: 2"))
    (tmp_path / "script.yaml").write_text((tmp_path / "script.yaml").read_text() + "latency: 0.3\n")
    cmd = [sys.executable, "-m", "autodiff_cli.app.cli", "train", str(tmp_path / "spec.yaml"),
           "--runs-dir", str(tmp_path / "runs")]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=os.environ.copy())
    deadline = time.time() + 60
    while time.time() < deadline and not list((tmp_path / "runs").glob("*/metrics.jsonl")):
        time.sleep(0.1)  # wait until step 1 is written, then interrupt step 2
    proc.send_signal(signal.SIGTERM)
    time.sleep(0.05)
    if proc.poll() is None:
        proc.send_signal(signal.SIGINT)  # an impatient second Ctrl-C must not cut the clean-up short
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err
    run = Path(out.strip().splitlines()[-1])
    summary = json.loads((run / "summary.json").read_text())
    assert summary["status"] == "interrupted" and "Traceback" not in err and "never retrieved" not in err
    assert "stopping: waiting for the model calls in flight" in err
    done_steps = json.loads((run / "checkpoint.json").read_text())["state"]["step"]
    assert done_steps >= 1  # the step in progress was abandoned, the completed ones kept
    resumed = subprocess.run(cmd + ["--resume", str(run)], capture_output=True, text=True, env=os.environ.copy())
    assert resumed.returncode == 0, resumed.stderr
    assert json.loads((run / "summary.json").read_text())["status"] == "completed"
    assert [json.loads(x)["step"] for x in (run / "metrics.jsonl").read_text().splitlines()] == [1, 2, 3]


def test_textgrad_mode_backprops_every_example_and_takes_one_unvalidated_proposal(tmp_path):
    setup(tmp_path, new_value="Count the things slowly.", spec=SPEC.replace("seed: 0}", "seed: 0, mode: textgrad}"))
    result, run = train(tmp_path)
    assert result.exit_code == 0, result.output
    step1 = json.loads((run / "metrics.jsonl").read_text().splitlines()[0])
    assert step1["usage"]["backward"]["calls"] == len(step1["batch_ids"])  # correct examples included
    assert len(step1["proposals"]) == 1 and step1["proposals"][0]["accepted"] is True
    assert step1["proposals"][0]["subset_score"] is None  # no stage 1
    summary = json.loads((run / "summary.json").read_text())
    # the proposal was taken, but the best prompts stay the ones with the best validation score
    assert summary["best"]["step"] == 0
    assert yaml.safe_load((run / "prompts.yaml").read_text())["instruction"] == "Count the things."
    checkpoint = json.loads((run / "checkpoint.json").read_text())["state"]
    assert checkpoint["values"]["instruction"] == "Count the things slowly."


def test_too_many_call_errors_fail_the_run_and_keep_completed_steps(tmp_path):
    setup(tmp_path, new_value="Count the things slowly.",
          spec=SPEC.replace("seed: 0}", "seed: 0, max_error_rate: 0.1}").replace("task: {model: fake/script.yaml}",
                                                                                 "task: {model: fake/script.yaml, max_retries: 1}"))
    script = (tmp_path / "script.yaml").read_text().replace("rules:\n", "rules:\n  - match: 'n=5'\n    error: 500\n", 1)
    (tmp_path / "script.yaml").write_text(script)
    result, run = train(tmp_path, "--no-cache")
    assert result.exit_code == 3, result.output
    summary = json.loads((run / "summary.json").read_text())
    assert summary["status"] == "failed" and "model-call errors" in summary["reason"]
    assert summary["usage"]["task"]["errors"] >= 2  # the attempt and its retry
    metrics_file = run / "metrics.jsonl"
    metrics = [json.loads(x) for x in metrics_file.read_text().splitlines()] if metrics_file.exists() else []
    assert summary["steps"] == len(metrics)  # every completed step is kept, the failed one is not
    assert json.loads((run / "checkpoint.json").read_text())["state"]["step"] == summary["steps"]


def test_backward_calls_that_keep_failing_fail_the_run(tmp_path):
    # a step without its gradients is not a step: backward calls failed after retries above
    # max_error_rate stop the run (status failed), like failed training examples do
    setup(tmp_path, spec=SPEC.replace("backward: {model: fake/script.yaml}",
                                      "backward: {model: fake/script.yaml, max_retries: 1}"))
    script = (tmp_path / "script.yaml").read_text().replace(
        "rules:\n", "rules:\n  - match: 'backward engine'\n    in: system\n    error: 503\n", 1)
    (tmp_path / "script.yaml").write_text(script)
    result, run = train(tmp_path, "--no-cache")
    assert result.exit_code == 3, result.output
    summary = json.loads((run / "summary.json").read_text())
    assert summary["status"] == "failed" and summary["steps"] == 0
    assert re.search(r"\d+ of \d+ backward calls failed after retries \(max_error_rate 0\.1\); first: .*503",
                     summary["reason"]), summary["reason"]
    assert summary["usage"]["optimizer"]["calls"] == 0  # no proposal from a step without gradients
    assert "backward calls failed" in result.output
