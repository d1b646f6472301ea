"""optim/joint.py: the step plan, the grid's combinations, lineages judged against their own best, the
raced grid, resume, the dry-run bound and option errors, on the scripted fake model."""
from __future__ import annotations

import asyncio
import json
from pathlib import Path
from types import SimpleNamespace

import pytest
import yaml
from typer.testing import CliRunner

from autodiff_cli.app.cli import app
from autodiff_cli.io.files import read_jsonl
from autodiff_cli.llm.fake import reset_fake_state
from autodiff_cli.optim.joint import (
    GridRace,
    Joint,
    JointOptions,
    LineageAcceptance,
    Member,
    planned,
    values_key,
)
from autodiff_cli.optim.policies import MODES, Minibatch, Racing, TwoStage
from tests.conftest import write
from tests.optim.test_demos import TEACHER  # a teacher that always adds
from tests.specs import TOY_SCRIPT, TOY_SPEC

T1 = "Count the things. ALWAYS ADD them."
T3 = "Count the things. ALWAYS ADD them CAREFULLY."

# Text and demos help different examples: the instruction T1 makes the student right on n = 3, 5, 7 and
# T3 (GDPO's second rewrite, once T1 is the current value) on n = 3, 5, 7, 9; a bootstrapped demo
# (`response: Sum is`) makes it right on even n; n = 1 is always right. Only the combination gets all.
SCRIPT_TEMPLATE = r"""
rules:
  - match: "backward engine"
    in: system
    reply: '{"diagnosis": "It did not add.", "param: instruction": "Tell it to ALWAYS ADD the counts."}'
  - match: 'read by a program[\s\S]*ALWAYS ADD them\.'
    in: all
    reply: '{"reasoning": "Add more carefully.", "method": "rephrase", "new_value": "%(t3)s"}'
  - match: "read by a program"
    in: system
    reply: '{"reasoning": "Feedback says to add.", "method": "add_instruction", "new_value": "%(t1)s"}'
  - match: 'ALWAYS ADD them CAREFULLY[\s\S]*n=([3579])$'
    in: all
    reply: "Answer: {1}"
  - match: 'ALWAYS ADD them\.[\s\S]*n=([357])$'
    in: all
    reply: "Answer: {1}"
  - match: 'response: Sum is[\s\S]*n=([2468])$'
    in: all
    reply: "Sum is {1}. Answer: {1}"
  - match: 'n=1\b'
    reply: "Answer: 1"
default: "Answer: 0"
"""
SCRIPT = SCRIPT_TEMPLATE % {"t1": T1, "t3": T3}


SPEC = """
name: joint
models:
  task: {model: fake/script.yaml}
  teach: {model: fake/teacher.yaml, temperature: 0.7}
data: {train: train.jsonl, val: val.jsonl, test: test.jsonl}
params:
  instruction: {value: "Count the things.", role: task instruction}
  examples: {kind: demos, max: 2}
nodes:
  count: {kind: llm, system: "{{ instruction }}\\n{{ examples }}", user: "{{ input.question }}"}
  parse: {kind: function, fn: last_integer, args: {text: count}}
output: parse
metric: {fn: exact_match, args: {pred: parse, target: input.answer}}
train: {optimizer: joint, max_steps: %(steps)d, epochs: 4, batch_size: 8, max_proposals: 2, seed: 0, teacher: teach%(extra)s}
"""

# validation: 1 right at first; T1 4/7, T3 5/7, demos 3/7; T3 + demos 7/7, T1 + demos 6/7
VAL = [1, 3, 5, 7, 9, 2, 4]


def setup(tmp_path: Path, *, steps: int = 4, extra: str = "") -> Path:
    write(tmp_path / "script.yaml", SCRIPT)
    write(tmp_path / "teacher.yaml", TEACHER)
    for name, ns in (("train", [1, 2, 3, 4, 5, 7, 8, 9]), ("val", VAL), ("test", [1, 6, 9])):
        rows = [{"id": f"{name}{i}", "question": f"How many? n={n}", "answer": str(n)} for i, n in enumerate(ns)]
        (tmp_path / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return write(tmp_path / "spec.yaml", SPEC % {"steps": steps, "extra": extra})


def cli(*args):
    reset_fake_state()
    return CliRunner().invoke(app, [*map(str, args)])


def run_dir(result) -> Path:
    return Path(result.stdout.strip().splitlines()[-1])


def read(run: Path) -> tuple[dict, list[dict], dict]:
    return (json.loads((run / "summary.json").read_text()), read_jsonl(run / "metrics.jsonl"),
            json.loads((run / "checkpoint.json").read_text())["state"])


# ---------------------------------------------------------------- the plan and the grid, without a model


def test_the_step_plan_alternates_text_and_demos_and_ends_on_the_grid():
    assert [planned(s, 5) for s in range(1, 6)] == ["text", "demos", "text", "demos", "grid"]
    assert [planned(s, 4) for s in range(1, 5)] == ["text", "demos", "text", "grid"]
    assert planned(1, 1) == "grid"
    assert planned(2, 9, last_chance=True) == "grid"  # patience would stop the run after this step
    opt = Joint.__new__(Joint)
    opt.env = SimpleNamespace(cfg=SimpleNamespace(patience=3), total_steps=6)
    assert opt.total_steps() == 6  # the trainer's (OptimizerEnv.total_steps)
    assert [opt.last_chance(SimpleNamespace(steps_since_improvement=n)) for n in (0, 1, 2)] == [False, False, True]
    opt.env.cfg.patience = None
    assert not opt.last_chance(SimpleNamespace(steps_since_improvement=50))


def joint_with(text: list[Member], demos: list[Member], k: int = 2) -> Joint:
    opt = Joint.__new__(Joint)
    opt.options = JointOptions(k=k)
    opt.text = SimpleNamespace(trainable=lambda: ["p"])
    opt.demos = SimpleNamespace(trainable=lambda: ["d"])
    opt.lineages = {"text": text, "demos": demos}
    opt.grid_tried = []
    return opt


def member(p: str, d: str, val: float, step: int) -> Member:
    return Member({"p": p, "d": d, "fixed": "f"}, val, step, {"d": {"bootstrapped": [d] if d else [], "raw": []}})


def test_the_grid_combines_the_top_k_of_each_lineage_best_pairs_first_and_skips_what_is_known():
    init = member("p0", "", 0.2, 0)
    text = [init, member("p1", "", 0.5, 1), member("p3", "", 0.6, 3)]
    demos = [init, member("p0", "d2", 0.4, 2)]
    opt = joint_with(text, demos)
    grid = opt.combinations()
    # top 2: p3, p1 x d2, the initial demos; with the initial demos they are text members (known)
    assert [c.values for c in grid] == [{"p": "p3", "d": "d2"}, {"p": "p1", "d": "d2"}]
    assert grid[0].demo_ids == {"d": {"bootstrapped": ["d2"], "raw": []}}
    assert grid[0].extra == {"lineage": "grid", "text_step": 3, "text_val": 0.6, "demos_step": 2, "demos_val": 0.4}
    assert [c.values for c in joint_with(text, demos, k=1).combinations()] == [{"p": "p3", "d": "d2"}]
    # a combination raced before is not raced again; with nothing new the grid is empty
    opt.grid_tried = [values_key({"p": "p3", "d": "d2", "fixed": "f"})]
    assert [c.values for c in opt.combinations()] == [{"p": "p1", "d": "d2"}]
    assert joint_with([init], demos).combinations() == []


def test_each_kind_of_step_has_its_policies():
    opt = joint_with([member("p0", "", 0.2, 0)], [member("p0", "", 0.2, 0)])
    opt.env = SimpleNamespace(cfg=SimpleNamespace(max_proposals=3, validation="sequential"))
    opt.text = SimpleNamespace(max_proposals=lambda mode: mode.proposals_per_step(opt.env.cfg), trainable=list)
    opt.demos = SimpleNamespace(max_proposals=lambda mode: 3, trainable=list)
    autodiff, textgrad = MODES["autodiff"], MODES["textgrad"]
    racing = autodiff.configured(SimpleNamespace(validation="racing"))
    opt.kind = None  # outside a step (the dry run): bounds of any kind of step
    assert opt.uses_gradients and opt.max_proposals(textgrad) == 3 and isinstance(opt.batching(autodiff), Minibatch)
    opt.kind = "text"
    assert opt.uses_gradients and opt.max_proposals(textgrad) == 1
    rule = opt.acceptance(autodiff)
    assert isinstance(rule, LineageAcceptance) and type(rule.inner) is TwoStage and rule.eager
    assert type(opt.acceptance(textgrad).inner) is TwoStage  # never taken blind
    racing_rule = opt.acceptance(racing)
    assert isinstance(racing_rule.inner, Racing) and not racing_rule.eager
    opt.kind = "demos"
    assert not opt.uses_gradients and opt.max_proposals(textgrad) == 3
    opt.kind, opt.grid = "grid", ["a", "b"]
    assert not opt.uses_gradients and opt.max_proposals(autodiff) == 2 and isinstance(opt.acceptance(autodiff), GridRace)
    assert opt.acceptance(autodiff).max_examples(None, 8, 7) == 7  # no subset stage
    # a lineage with nothing to train skips its steps, and says why
    for kind, what in (("text", "prompt"), ("demos", "demos")):
        opt.kind = kind
        assert asyncio.run(opt.begin_step(None)) == f"no trainable {what} parameter: joint's {kind} lineage has nothing to train"


# ---------------------------------------------------------------- runs on the fake model


def test_lineages_are_judged_against_their_own_best_and_the_grid_races_their_combinations(tmp_path):
    spec = setup(tmp_path)
    result = cli("train", spec, "--runs-dir", tmp_path / "runs")
    assert result.exit_code == 0, result.output
    run = run_dir(result)
    summary, metrics, state = read(run)
    assert [m["kind"] for m in metrics] == ["text"] * 4  # the contract's step kind; the lineage is per proposal
    accepted = [next(p for p in m["proposals"] if p["accepted"]) for m in metrics]
    assert [p["lineage"] for p in accepted] == ["text", "demos", "text", "grid"]
    assert [p["val_score"] for p in accepted] == pytest.approx([4 / 7, 3 / 7, 5 / 7, 1.0])
    assert [m["best_val"] for m in metrics] == pytest.approx([4 / 7, 4 / 7, 5 / 7, 1.0])
    # step 2: the demos set scores 3/7, below the run's best (the text lineage's 4/7), and is accepted all
    # the same: it beats its own lineage's best (the initial 1/7)
    assert accepted[1]["lineage_best"] == pytest.approx(1 / 7)
    assert accepted[1]["reason"] == "beats the demos lineage's best validation score 0.143; the run's best stays 0.571"
    assert set(accepted[1]["params"]) == {"examples"} and accepted[1]["demo_ids"]["examples"]["bootstrapped"]
    # step 3: the text lineage builds on its own best (T1), not on the run's current values (step 2's demos)
    assert accepted[2]["params"] == {"instruction": T3} and accepted[2]["lineage_best"] == pytest.approx(4 / 7)
    # the grid: T3 and T1 with the demos (with the initial demos they are text members, already validated)
    grid = metrics[3]["proposals"]
    assert [(p["params"]["instruction"], p["text_step"], p["demos_step"]) for p in grid] == [(T3, 3, 2), (T1, 1, 2)]
    assert grid[0]["accepted"] and grid[0]["reason"].startswith("grid: beats the best validation score")
    assert not grid[1]["accepted"] and grid[1]["reason"].startswith("grid: ")
    assert all(p["subset_score"] is None for p in grid)  # no subset stage
    lineages = state["optimizers"]["text"]["lineages"]
    text_best = max(m["val"] for m in lineages["text"])
    demos_best = max(m["val"] for m in lineages["demos"])
    assert [m["step"] for m in lineages["text"]] == [0, 1, 3] and [m["step"] for m in lineages["demos"]] == [0, 2]
    assert all(m["values"]["examples"] == "" for m in lineages["text"])
    assert all(m["values"]["instruction"] == "Count the things." for m in lineages["demos"])
    assert summary["best"]["val"] == 1.0 > max(text_best, demos_best) and summary["best"]["step"] == 4
    assert len(state["optimizers"]["text"]["grid_tried"]) == 2
    # backward passes and optimizer calls on text steps only, the teacher on the demos step only
    usage = [m["usage"] for m in metrics]
    assert [u["backward"]["calls"] > 0 for u in usage] == [True, False, True, False]
    assert [u["optimizer"]["calls"] > 0 for u in usage] == [True, False, True, False]
    assert [u["teacher"]["calls"] > 0 for u in usage] == [False, True, False, False]
    # the best values and the demo ids behind them
    prompts = yaml.safe_load((run / "prompts.yaml").read_text())
    assert prompts["instruction"] == T3 and "response: Sum is" in prompts["examples"]
    assert state["history"][-1]["demo_ids"] == accepted[1]["demo_ids"] == state["demo_ids"]
    assert [row["kind"] for row in read_jsonl(run / "traces" / "step-0004.jsonl")] == ["grid"]


def test_under_racing_validation_lineage_candidates_race_against_their_lineage_best(tmp_path):
    spec = setup(tmp_path, extra=", validation: racing")
    result = cli("train", spec, "--runs-dir", tmp_path / "runs")
    assert result.exit_code == 0, result.output
    summary, metrics, state = read(run_dir(result))
    # step 1 races both of GDPO's proposals (the second one, T3, saw T1 fail and wins the race)
    assert [p["params"]["instruction"] for p in metrics[0]["proposals"]] == [T1, T3]
    assert "text lineage: dropped from the race" in metrics[0]["proposals"][0]["reason"]
    demos = next(p for p in metrics[1]["proposals"] if p["accepted"])
    assert demos["lineage"] == "demos" and demos["val_score"] == pytest.approx(3 / 7)
    assert demos["val_score"] < metrics[1]["best_val"] == pytest.approx(5 / 7)
    lineages = state["optimizers"]["text"]["lineages"]
    assert summary["best"]["val"] == 1.0 > max(m["val"] for kind in ("text", "demos") for m in lineages[kind])
    assert metrics[3]["proposals"][0]["lineage"] == "grid" and metrics[3]["proposals"][0]["accepted"]


def test_without_a_demos_param_the_demos_lineage_skips_its_steps_and_the_grid_has_nothing_to_combine(tmp_path):
    write(tmp_path / "script.yaml", TOY_SCRIPT % {"new": "Count the things. ALWAYS ADD the counts."})
    for name, ns in (("train", [1, 2, 3, 1, 4, 5, 1, 2]), ("val", [1, 2, 3, 4]), ("test", [1, 6, 7])):
        rows = [{"id": f"{name}{i}", "question": f"How many? n={n}", "answer": str(n)} for i, n in enumerate(ns)]
        (tmp_path / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    spec = write(tmp_path / "spec.yaml", TOY_SPEC.replace("train: {max_steps: 2,", "train: {max_steps: 2, optimizer: joint,"))
    result = cli("train", spec, "--runs-dir", tmp_path / "runs")
    assert result.exit_code == 0, result.output
    summary, metrics, state = read(run_dir(result))
    assert metrics[0]["proposals"][0]["accepted"] and summary["best"]["val"] == 1.0
    # step 2 is the last (the grid), but there is nothing to combine: it is its parity's, the demos lineage's
    assert metrics[1]["skipped"] == "no trainable demos parameter: joint's demos lineage has nothing to train"
    assert summary["usage"]["teacher"]["calls"] == 0 and state["optimizers"]["text"]["grid_tried"] == []


def test_a_dry_run_bounds_a_joint_run(tmp_path):
    spec = setup(tmp_path)
    dry = cli("train", spec, "--dry-run", "--json")
    assert dry.exit_code == 0, dry.output
    bounds = json.loads(dry.stdout)["upper_bounds"]
    result = cli("train", spec, "--runs-dir", tmp_path / "runs", "--no-cache")
    assert result.exit_code == 0, result.output
    usage = read(run_dir(result))[0]["usage"]
    for role in ("task", "backward", "optimizer", "teacher"):
        assert 0 < usage[role]["calls"] <= bounds[role]["calls"], role


@pytest.mark.parametrize("interrupt_at", [2, 4])
def test_a_resumed_joint_run_ends_like_an_uninterrupted_one(tmp_path, monkeypatch, interrupt_at):
    from autodiff_cli.train import trainer as trainer_module

    done = cli("train", setup(tmp_path / "whole"), "--runs-dir", tmp_path / "whole" / "runs")
    assert done.exit_code == 0, done.output
    reference = run_dir(done)

    spec = setup(tmp_path / "cut")
    real_step = trainer_module.Trainer.step

    async def interrupted(self, state, step):
        if step == interrupt_at:
            raise KeyboardInterrupt
        return await real_step(self, state, step)

    monkeypatch.setattr(trainer_module.Trainer, "step", interrupted)
    first = cli("train", spec, "--runs-dir", tmp_path / "cut" / "runs")
    assert first.exit_code == 130, first.output
    run = run_dir(first)
    monkeypatch.setattr(trainer_module.Trainer, "step", real_step)
    again = cli("train", spec, "--runs-dir", tmp_path / "cut" / "runs", "--resume", run)
    assert again.exit_code == 0, again.output
    state = lambda r: read(r)[2]
    assert state(run)["optimizers"] == state(reference)["optimizers"]
    for key in ("values", "best_values", "best_val", "demo_ids", "history"):
        assert state(run)[key] == state(reference)[key], key
    assert (run / "prompts.yaml").read_text() == (reference / "prompts.yaml").read_text()


@pytest.mark.parametrize("extra, message", [
    (", optimizer_options: {k: 0}", "train.optimizer_options.k: expected greater than or equal to 1, got 0"),
    (", optimizer_options: {size: 3}", "train.optimizer_options.size: expected a known key"),
    (", demos: interleaved",
     "train.demos: expected off with optimizer joint (it runs its own demos steps), got 'interleaved'"),
])
def test_option_errors_are_located_spec_errors(tmp_path, extra, message):
    spec = setup(tmp_path, extra=extra)
    bad = cli("validate", spec)
    assert bad.exit_code == 2 and message in bad.output and f"{spec}:" in bad.output, bad.output
