"""configs/router.yaml trained on the scripted fake model: a classifier routes each generated question
to the counting or the arithmetic branch (`when`), and each failed example's gradients reach only the
branch it took; the branch it did not take is a skipped call that cost nothing."""
from __future__ import annotations

import asyncio
import json
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from autodiff_cli.app.cli import app
from autodiff_cli.data.splits import load_split
from autodiff_cli.engine.evaluate import evaluate
from autodiff_cli.llm.client import ModelClient
from autodiff_cli.llm.fake import reset_fake_state
from autodiff_cli.llm.usage import Usage
from autodiff_cli.nodes.compiler import compile_spec
from autodiff_cli.spec.loader import load_spec
from autodiff_cli.spec.prompts_file import initial_values

CONFIG = Path(__file__).resolve().parents[2] / "configs" / "router.yaml"
BRANCH = {"counting": "count", "arithmetic": "math"}

# Every key the backward engine may be asked for; it keeps the ones a call asks for. The branches answer
# wrong, so every example fails and is backpropagated.
BACKWARD = {
    "diagnosis": "The answer is wrong.",
    "param: route_instruction": "Say which words mark a counting question.",
    "param: count_instruction": "Add up the items of the asked category only.",
    "param: math_instruction": "Work the operation out digit by digit.",
    "input: when: route": "The question was routed to the right branch.",
}
SCRIPT = {
    "rules": [
        {"match": "backward engine", "in": "system", "reply": json.dumps(BACKWARD)},
        {"match": "read by a program", "in": "system",
         "reply": json.dumps({"reasoning": "Be precise.", "method": "rephrase", "new_value": "Be precise."})},
        {"match": r"Decide what the question asks for[\s\S]*How many", "in": "all", "reply": "count"},
        {"match": "Decide what the question asks for", "in": "system", "reply": "math"},
        {"match": "Count only the items", "in": "system", "reply": "I count them. Answer: 1"},
        {"match": "Compute the result", "in": "system", "reply": "Let me compute. Answer: 0"},
    ],
    "default": "no idea",
}


@pytest.fixture(autouse=True)
def fresh_fake():
    reset_fake_state()


@pytest.fixture
def script(tmp_path) -> Path:
    path = tmp_path / "script.yaml"
    path.write_text(yaml.safe_dump(SCRIPT, sort_keys=False), encoding="utf-8")
    return path


def overrides(script: Path) -> list[str]:
    sets = [f"models.{m}.model=fake/{script}" for m in ("task", "backward", "optimizer")]
    sets += ["data.generator.train=8", "data.generator.val=4", "data.generator.test=2", "train.max_steps=1",
             "train.batch_size=8", "train.max_error_samples=8", "train.max_correct_samples=0",
             "train.max_proposals=1"]
    return [arg for s in sets for arg in ("--set", s)]


def loaded(script: Path):
    """The config as `train` loads it with these overrides."""
    return load_spec(CONFIG, overrides(script)[1::2])


def test_router_gradients_reach_only_the_branch_each_example_took(tmp_path, script):
    result = CliRunner().invoke(app, ["train", str(CONFIG), "--runs-dir", str(tmp_path / "runs"), *overrides(script)])
    assert result.exit_code == 0, result.output
    run = Path(result.stdout.strip().splitlines()[-1])
    rows = [json.loads(line) for line in (run / "traces" / "step-0001.jsonl").read_text().splitlines()]
    gradients = [r for r in rows if r["kind"] == "gradient"]
    kinds = {e.id: e.fields["kind"] for e in load_split(loaded(script), "train")}
    backpropagated = {g["example_id"] for g in gradients}
    assert {kinds[e] for e in backpropagated} == {"counting", "arithmetic"}  # both branches were trained
    for example_id in backpropagated:
        taken = BRANCH[kinds[example_id]]
        other = BRANCH["arithmetic" if taken == "count" else "counting"]
        mine = [g for g in gradients if g["example_id"] == example_id]
        assert not [g for g in mine if g["node"] == other or other in g["target"]], mine
        targets = {(g["node"], g["target"]) for g in mine}
        assert (taken, f"param:{taken}_instruction") in targets
        # the decision that sent the example there is blamed through the branch's condition
        assert {(taken, "call:route#0"), ("route", "call:classify#0"),
                ("classify", "param:route_instruction")} <= targets
    summary = json.loads((run / "summary.json").read_text())
    assert summary["status"] == "completed" and summary["usage"]["task"]["errors"] == 0


def test_router_skipped_branches_are_skipped_calls_that_cost_nothing(tmp_path, script):
    spec = loaded(script)
    program = compile_spec(spec)
    examples = load_split(spec, "val")
    client = ModelClient(spec.spec.models, config_dir=CONFIG.parent, usage=Usage(), cache=None, base_delay=0)
    report = asyncio.run(evaluate(program, examples, initial_values(program.spec), client))
    assert report.errors == 0 and report.n == 4
    for result, example in zip(report.results, examples):
        taken = BRANCH[example.fields["kind"]]
        other = BRANCH["arithmetic" if taken == "count" else "counting"]
        calls = {c.node: c for c in result.trace.calls}
        assert not calls[taken].skipped and calls[taken].messages
        assert calls[other].skipped and calls[other].messages is None and calls[other].completion_tokens == 0
        assert calls["answer"].output == calls[taken].output  # first_of took the branch that ran
    # one classifier call and one branch call per example
    assert client.usage.role("task")["calls"] == 2 * len(examples)


def test_router_dry_run_bounds_both_branches(tmp_path, script):
    result = CliRunner().invoke(app, ["train", str(CONFIG), "--dry-run", "--json", *overrides(script)])
    assert result.exit_code == 0, result.output
    bounds = json.loads(result.stdout)["upper_bounds"]
    # per example: classify + either branch may run = 3 task calls, 3 backward calls; task examples:
    # val 4 initially, then the batch 8 and, for the one proposal, the subset 8 and val 4
    assert bounds["task"]["calls"] == 3 * (4 + 8 + 8 + 4 + 2 * 2)
    assert bounds["backward"]["calls"] == 3 * 8
