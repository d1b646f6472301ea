"""`train --dry-run`: its bounds hold for every mode, demos schedule and loss feedback, because they
come from the objects that decide the calls (an old projection re-derived the modes from strings and
projected 0 backward calls for textgrad, which makes them)."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from autodiff_cli.app.cli import app
from autodiff_cli.llm.fake import reset_fake_state
from tests.conftest import write
from tests.specs import TOY_SCRIPT

SPEC = """
name: proj
models:
  task: {model: fake/script.yaml}
  backward: {model: fake/script.yaml}
  optimizer: {model: fake/script.yaml}
data: {train: train.jsonl, val: val.jsonl, test: test.jsonl}
params:
  instruction: {value: "Count the things.", role: task instruction}
  answer_format: {value: "End with Answer: N", role: output format}
  examples: {kind: demos, value: "", max: 2}
nodes:
  count: {kind: llm, system: "{{ instruction }} {{ answer_format }}\\n{{ examples }}", user: "{{ input.question }}"}
  parse: {kind: function, fn: last_integer, args: {text: count}}
output: parse
metric: {fn: exact_match, args: {pred: parse, target: input.answer}}
loss: {fn: exact_match, args: {pred: parse, target: input.answer}, feedback: FEEDBACK}
train: {mode: MODE, demos: DEMOS, max_steps: 3, epochs: 2, batch_size: 4, max_proposals: 2,
        max_error_samples: 2, max_correct_samples: 1, seed: 0}
"""
MODES = ["autodiff", "textgrad", "no_gradient", "none"]
SCHEDULES = ["off", "text_then_demos", "demos_then_text", "interleaved", "demos_only"]


def project_dir(tmp_path: Path, mode: str, demos: str, feedback: str) -> Path:
    # the optimizer's proposal never fixes anything: every step makes all its proposals
    write(tmp_path / "script.yaml", TOY_SCRIPT % {"new": "Count the things carefully."})
    for name, ns in (("train", [1, 2, 3, 1, 4, 5, 1, 2]), ("val", [1, 2, 3, 4]), ("test", [1, 6, 7])):
        rows = [{"id": f"{name}{i}", "question": f"How many? n={n}", "answer": str(n)} for i, n in enumerate(ns)]
        (tmp_path / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    text = SPEC.replace("MODE", mode).replace("DEMOS", demos).replace("FEEDBACK", feedback)
    return write(tmp_path / "spec.yaml", text)


def cli(*args):
    reset_fake_state()
    return CliRunner().invoke(app, [*map(str, args)])


@pytest.mark.parametrize("feedback", ["template", "llm"])
@pytest.mark.parametrize("demos", SCHEDULES)
@pytest.mark.parametrize("mode", MODES)
def test_the_projection_bounds_the_calls_of_a_run(tmp_path, mode, demos, feedback):
    spec = project_dir(tmp_path, mode, demos, feedback)
    dry = cli("train", spec, "--dry-run", "--json")
    assert dry.exit_code == 0, dry.output
    bounds = json.loads(dry.stdout)["upper_bounds"]
    run = cli("train", spec, "--runs-dir", tmp_path / "runs", "--no-cache", "--json")
    assert run.exit_code == 0, run.output
    summary = json.loads(run.stdout.strip().splitlines()[-2])
    made = {role: u["calls"] + u["cached_calls"] for role, u in summary["usage"].items()}
    for role, count in made.items():
        assert count <= bounds[role]["calls"], (role, count, bounds)
    # the bounds are about this run, not a blanket number: a role that cannot be called projects 0
    if mode == "none":
        assert all(bounds[r]["calls"] == 0 for r in ("backward", "optimizer", "teacher"))
    if mode == "textgrad" and demos != "demos_only":
        assert made["backward"] > 0  # the case the old projection put at 0
    if feedback == "llm" and mode in ("autodiff", "textgrad") and demos != "demos_only":
        assert bounds["backward"]["calls"] >= made["backward"] > 0
    if demos == "off" or mode == "none":
        assert bounds["teacher"]["calls"] == 0
