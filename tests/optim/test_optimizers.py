"""optim/base.py: the optimizer contract. A new optimizer plugs in with one registry line, keeps its own
state through the checkpoint, and is bounded by --dry-run; the two built-in ones honour the contract."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
from pydantic import BaseModel
from typer.testing import CliRunner

from autodiff_cli.app.cli import app
from autodiff_cli.io.records import ProposalRecord, StepRecord
from autodiff_cli.llm.fake import reset_fake_state
from autodiff_cli.optim import registry
from autodiff_cli.optim.base import Candidate, NoCandidate, Optimizer, Plan
from autodiff_cli.optim.demos import DemoBootstrap
from autodiff_cli.optim.gdpo import GDPO
from autodiff_cli.optim.policies import MODES, TwoStage
from tests.conftest import write
from tests.specs import TOY_SCRIPT, TOY_SPEC

FIX = "Count the things. ALWAYS ADD the counts."


class Scripted(Optimizer):
    """A toy optimizer: proposes its `values` in turn and remembers, across steps, how often it proposed."""

    name = "scripted"
    param_kind = "prompt"
    step_kind = "text"

    class Options(BaseModel):
        values: list[str]

    def __init__(self, env, options=None):
        super().__init__(env, options)
        self.proposed = 0

    async def propose(self, ctx):
        values = self.options.values
        if self.proposed >= len(values):
            return NoCandidate("nothing left")
        self.proposed += 1
        return Candidate({"instruction": values[self.proposed - 1]}, extra={"proposal_number": self.proposed})

    def state_dict(self):
        return {"proposed": self.proposed}

    def load_state_dict(self, state):
        self.proposed = state.get("proposed", 0)

    def max_calls(self, plan, mode):
        return {"optimizer": 0}


@pytest.fixture
def scripted(monkeypatch):
    monkeypatch.setitem(registry.OPTIMIZERS, Scripted.name, Scripted)  # the one registry line


def project(tmp_path: Path, extra: str = "") -> Path:
    write(tmp_path / "script.yaml", TOY_SCRIPT % {"new": "unused"})
    for name, ns in (("train", [1, 2, 3, 1, 4, 5, 1, 2]), ("val", [1, 2, 3, 4]), ("test", [1, 6, 7])):
        rows = [{"id": f"{name}{i}", "question": f"How many? n={n}", "answer": str(n)} for i, n in enumerate(ns)]
        (tmp_path / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    spec = TOY_SPEC.replace("train: {max_steps: 2,", "train: {max_steps: 2, " + extra) if extra else TOY_SPEC
    return write(tmp_path / "spec.yaml", spec)


def cli(*args):
    reset_fake_state()
    return CliRunner().invoke(app, [*map(str, args)])


def test_a_new_optimizer_plugs_in_with_one_registry_line_and_keeps_its_state(tmp_path, scripted):
    spec = project(tmp_path, f'optimizer: scripted, optimizer_options: {{values: ["Count.", "{FIX}"]}},')
    result = cli("train", spec, "--runs-dir", tmp_path / "runs")
    assert result.exit_code == 0, result.output
    run = Path(result.stdout.strip().splitlines()[-1])
    summary = json.loads((run / "summary.json").read_text())
    assert summary["optimizer"] == "scripted" and summary["best"]["val"] == 1.0
    step1 = StepRecord.from_row(json.loads((run / "metrics.jsonl").read_text().split("\n")[0]))
    # its first candidate fails the subset (two-stage acceptance, the mode's), the second is accepted
    assert [(p.params["instruction"], p.accepted) for p in step1.proposals] == [("Count.", False), (FIX, True)]
    assert [p.extra["proposal_number"] for p in step1.proposals] == [1, 2]
    state = json.loads((run / "checkpoint.json").read_text())["state"]
    assert state["optimizers"]["text"] == {"proposed": 2}
    # it uses no gradients and makes no calls of its own: the loop spends nothing on its behalf
    assert summary["usage"]["optimizer"]["calls"] == summary["usage"]["backward"]["calls"] == 0


def test_an_optimizer_state_is_restored_on_resume(tmp_path, scripted, monkeypatch):
    from autodiff_cli.train import trainer as trainer_module

    spec = project(tmp_path, 'optimizer: scripted, optimizer_options: {values: ["a", "b", "c", "d"]},')
    real_step = trainer_module.Trainer.step

    async def interrupted_at_step_2(self, state, step):
        if step == 2:
            raise KeyboardInterrupt
        return await real_step(self, state, step)

    monkeypatch.setattr(trainer_module.Trainer, "step", interrupted_at_step_2)
    first = cli("train", spec, "--runs-dir", tmp_path / "runs")
    assert first.exit_code == 130, first.output
    run = Path(first.stdout.strip().splitlines()[-1])
    saved = json.loads((run / "checkpoint.json").read_text())["state"]["optimizers"]["text"]
    assert saved["proposed"] >= 1
    monkeypatch.setattr(trainer_module.Trainer, "step", real_step)
    loaded = []
    real_load = Scripted.load_state_dict
    monkeypatch.setattr(Scripted, "load_state_dict", lambda self, s: (loaded.append(dict(s)), real_load(self, s)))
    again = cli("train", spec, "--runs-dir", tmp_path / "runs", "--resume", run)
    assert again.exit_code == 0, again.output
    assert loaded == [saved]  # the checkpoint's state reached the optimizer before its next step
    final = json.loads((run / "checkpoint.json").read_text())["state"]["optimizers"]["text"]
    assert final["proposed"] > saved["proposed"]


def test_an_unknown_optimizer_or_bad_options_are_located_spec_errors(tmp_path, scripted):
    spec = project(tmp_path, "optimizer: nonesuch,")
    bad = cli("validate", spec)
    assert bad.exit_code == 2 and "train.optimizer: expected one of gdpo, pareto, joint, scripted, got 'nonesuch'" in bad.output
    assert f"{spec}:" in bad.output
    spec = project(tmp_path, "optimizer: scripted, optimizer_options: {values: 3},")
    bad = cli("train", spec, "--dry-run")
    assert bad.exit_code == 2 and "train.optimizer_options.values: expected a valid list" in bad.output
    spec = project(tmp_path, "optimizer: gdpo, optimizer_options: {x: 1},")
    bad = cli("validate", spec)
    assert bad.exit_code == 2 and "train.optimizer_options: expected no options (optimizer gdpo takes none), got x" \
        in bad.output


def test_the_built_in_optimizers_honour_the_contract():
    assert registry.optimizer_class("gdpo") is GDPO and registry.optimizer_class(registry.DEMOS) is DemoBootstrap
    assert registry.optimizer_class("pareto").name == "pareto" and registry.text_optimizers() == ["gdpo", "pareto", "joint"]
    assert GDPO.uses_gradients and GDPO.param_kind == "prompt" and GDPO.step_kind == "text"
    assert not DemoBootstrap.uses_gradients and DemoBootstrap.param_kind == "demos"
    cfg = type("Cfg", (), {"max_proposals": 3, "propose": "joint", "teacher": None, "fail_threshold": 0.5})()
    env = type("Env", (), {"cfg": cfg, "program": None})()
    textgrad = MODES["textgrad"]
    gdpo = GDPO.__new__(GDPO)
    gdpo.env = env
    gdpo.trainable = lambda: ["a", "b"]
    assert gdpo.max_proposals(textgrad) == 1 and gdpo.acceptance(textgrad) is textgrad.acceptance
    assert gdpo.max_calls(Plan([1, 2], 4, 10, 2, 1), textgrad) == {"optimizer": 2 * 1 * 2}
    demos = DemoBootstrap.__new__(DemoBootstrap)
    demos.env = env
    # demo sets are never taken blind, and the mode's one-proposal rule is TextGrad's for text only
    assert isinstance(demos.acceptance(textgrad), TwoStage) and demos.max_proposals(textgrad) == 3
    demos.load_state_dict({"teacher": {"e1": {"tries": 1, "score": 1.0, "outputs": {}}}, "student_scores": {"e1": 0.0}})
    assert demos.state_dict() == {"teacher": {"e1": {"tries": 1, "score": 1.0, "outputs": {}}},
                                  "student_scores": {"e1": 0.0}}


def test_records_round_trip_and_read_old_rows():
    record = StepRecord(step=3, epoch=0, kind="demos", batch_ids=["a"], batch_score=0.5, subset_score=0.25,
                        proposals=[ProposalRecord({"p": "v"}, 0.5, 0.75, True, "why", demo_ids={"p": {"raw": ["a"]}},
                                                  extra={"parent": 2}), ProposalRecord.nothing("none left")],
                        val_score=0.75, best_val=0.75, subset_ids=["a"], usage={"task": {"calls": 1}}, wall_seconds=1.5)
    row = record.to_row()
    assert list(row) == ["step", "epoch", "kind", "batch_ids", "batch_score", "subset_score", "proposals", "val_score",
                         "best_val", "skipped", "subset_ids", "usage", "wall_seconds"]
    assert row["proposals"][0] == {"params": {"p": "v"}, "subset_score": 0.5, "val_score": 0.75, "accepted": True,
                                   "reason": "why", "demo_ids": {"p": {"raw": ["a"]}}, "parent": 2}
    assert StepRecord.from_row(json.loads(json.dumps(row))) == record
    old = StepRecord.from_row({"step": 1, "proposals": [{"params": {}, "accepted": False}]})
    assert old.kind == "text" and old.accepted is None and not old.proposals[0].proposed and old.usage == {}


def test_refused_proposals_are_recorded_counted_and_shown_to_the_next_proposal(tmp_path, monkeypatch):
    """A proposal that pastes a training example's question is refused before any task call: the run
    directory records it (`refused` in metrics.jsonl, `proposals.refused` in summary.json), and the
    optimizer's next request lists it among the failed proposals."""
    paste = "Answer like this: how many apples are in the big red basket"
    write(tmp_path / "script.yaml", TOY_SCRIPT % {"new": paste})
    for name, ns in (("train", [1, 2, 3, 1]), ("val", [1, 2]), ("test", [1])):
        rows = [{"id": f"{name}{i}", "question": f"How many apples are in the big red basket? n={n}",
                 "answer": str(n)} for i, n in enumerate(ns)]
        (tmp_path / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    spec = write(tmp_path / "spec.yaml", TOY_SPEC.replace("max_steps: 2,", "max_steps: 1,"))
    requests = []
    real_request = GDPO.request
    monkeypatch.setattr(GDPO, "request", lambda self, ctx, p: requests.append(real_request(self, ctx, p)) or requests[-1])
    result = cli("train", spec, "--runs-dir", tmp_path / "runs")
    assert result.exit_code == 0, result.output
    run = Path(result.stdout.strip().splitlines()[-1])
    summary = json.loads((run / "summary.json").read_text())
    step = StepRecord.from_row(json.loads((run / "metrics.jsonl").read_text().split("\n")[0]))
    assert [p.extra.get("refused") for p in step.proposals] == [True, True]
    assert all("refused: it copies 6 words of training example" in p.reason for p in step.proposals)
    assert summary["proposals"]["refused"] == 2 and summary["proposals"]["tried"] == 0
    assert summary["usage"]["task"]["calls"] == 3  # n=1, 2, 3 in validation and the minibatch: nothing judged
    assert [len(r.failed) for r in requests] == [0, 1]
    assert requests[1].failed[0].values == {"instruction": paste}
    assert requests[1].failed[0].reason.startswith("refused: it copies 6 words of training example")
