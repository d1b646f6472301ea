"""optim/pareto.py: the per-example Pareto front, parent choice, the pool's acceptance, its checkpointed
state, and a whole run on the scripted fake model."""
from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pytest
from typer.testing import CliRunner

from autodiff_cli.app.cli import app
from autodiff_cli.io.records import StepRecord
from autodiff_cli.llm.fake import reset_fake_state
from autodiff_cli.optim.pareto import Member, Pareto, dominates, pareto_front
from autodiff_cli.optim.policies import MODES, Minibatch
from tests.conftest import write
from tests.specs import TOY_SCRIPT, TOY_SPEC

FIX = "Count the things. ALWAYS ADD the counts."


def member(*scores: float, step: int = 0) -> Member:
    return Member({"p": f"v{step}"}, {f"e{i}": s for i, s in enumerate(scores)}, step)


def test_the_front_keeps_whoever_leads_somewhere_weighted_by_how_often():
    pool = [member(1, 0, 0, 0), member(0, 1, 1, 0, step=1), member(0, 0, 1, 0, step=2)]
    # e3: nobody solves it, so everyone ties there and "leads"; #2 is dominated by #1
    assert pareto_front(pool) == {0: 2, 1: 3}


def test_a_member_with_a_lower_mean_stays_on_the_front_when_it_alone_solves_an_example():
    best = member(0, 1, 1, 1, step=1)
    niche = member(1, 0, 0, 0, step=2)
    assert best.mean > niche.mean and set(pareto_front([best, niche])) == {0, 1}


def test_domination_needs_one_strict_win_and_no_loss():
    assert dominates(member(1, 1), member(1, 0)) and not dominates(member(1, 0), member(1, 0))
    assert not dominates(member(1, 0), member(0, 1))
    twins = [member(1, 0), member(1, 0, step=1)]
    assert pareto_front(twins) == {0: 2, 1: 2}  # identical candidates: neither dominates the other


class _Cfg:
    seed, history_k = 0, 3


class _Param:
    def __init__(self, kind):
        self.kind, self.trainable = kind, True


class _Program:
    params = {"p": _Param("prompt"), "shots": _Param("demos")}


class _Env:
    cfg = _Cfg()
    program = _Program()


def test_the_parent_is_drawn_from_the_front_in_proportion_to_its_leads_and_reproducibly():
    opt = Pareto.__new__(Pareto)
    opt.env, opt.parent = _Env(), None
    opt.pool = [member(*([1] * 9 + [0])), member(*([0] * 9 + [1]), step=1), member(*([0] * 10), step=2)]
    state = type("S", (), {"values": {"p": "current", "shots": "demos set by a demo step"}})()
    picks = Counter()
    for step in range(400):
        state.step = step
        values = opt.base_values(state)
        # the parent's prompts, and what it does not train as it is now
        assert values == {**opt.pool[opt.parent].values, "shots": "demos set by a demo step"}
        picks[opt.parent] += 1
    assert set(picks) == {0, 1}  # #2 leads nowhere (the others solve every example it fails too)
    assert 0.8 < picks[0] / 400 < 0.97  # 9 leads against 1
    state.step = 7
    first = (opt.base_values(state), opt.parent)
    assert (opt.base_values(state), opt.parent) == first  # a step's parent depends on the seed and step only
    opt.pool = []
    assert opt.base_values(state) == state.values and opt.parent is None  # not seeded yet: the current values


def test_its_policies_and_state():
    opt = Pareto.__new__(Pareto)
    opt.env = _Env()
    opt.pool = [member(1, 0), member(0, 1, step=2)]
    opt.pool[1].parent = 0
    assert isinstance(opt.batching(MODES["autodiff"]), Minibatch)
    saved = json.loads(json.dumps(opt.state_dict()))
    other = Pareto.__new__(Pareto)
    other.load_state_dict(saved)
    assert other.pool == opt.pool


# ---------------------------------------------------------------- a run on the fake model


def project(tmp_path: Path, extra: str = "optimizer: pareto,", steps: int = 2) -> Path:
    write(tmp_path / "script.yaml", TOY_SCRIPT % {"new": FIX})
    for name, ns in (("train", [1, 2, 3, 1, 4, 5, 1, 2]), ("val", [1, 2, 3, 4]), ("test", [1, 6, 7])):
        rows = [{"id": f"{name}{i}", "question": f"How many? n={n}", "answer": str(n)} for i, n in enumerate(ns)]
        (tmp_path / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return write(tmp_path / "spec.yaml", TOY_SPEC.replace("train: {max_steps: 2,", f"train: {{max_steps: {steps}, " + extra))


def cli(*args):
    reset_fake_state()
    return CliRunner().invoke(app, [*map(str, args)])


def test_a_pareto_run_grows_its_pool_from_the_initial_values_and_ends_on_the_best(tmp_path):
    spec = project(tmp_path)
    result = cli("train", spec, "--runs-dir", tmp_path / "runs")
    assert result.exit_code == 0, result.output
    run = Path(result.stdout.strip().splitlines()[-1])
    summary = json.loads((run / "summary.json").read_text())
    assert summary["optimizer"] == "pareto" and summary["best"]["val"] == 1.0
    step1 = StepRecord.from_row(json.loads((run / "metrics.jsonl").read_text().split("\n")[0]))
    accepted = step1.accepted
    assert accepted is not None and accepted.params == {"instruction": FIX}
    assert accepted.extra == {"parent": 0, "pool": 2} and "joins the pool as #1" in accepted.reason
    pool = json.loads((run / "checkpoint.json").read_text())["state"]["optimizers"]["text"]["pool"]
    assert [m["step"] for m in pool] == [0, 1] and pool[1]["parent"] == 0
    assert sorted(pool[0]["scores"]) == ["val0", "val1", "val2", "val3"]
    assert pool[0]["scores"] == {"val0": 1.0, "val1": 0.0, "val2": 0.0, "val3": 0.0}  # only n=1 is right at first
    assert set(pool[1]["scores"].values()) == {1.0}
    assert (run / "prompts.yaml").read_text().count(FIX) == 1


def test_a_dry_run_bounds_a_pareto_run(tmp_path):
    spec = project(tmp_path)
    dry = cli("train", spec, "--dry-run", "--json")
    assert dry.exit_code == 0, dry.output
    bounds = json.loads(dry.stdout)["upper_bounds"]
    result = cli("train", spec, "--runs-dir", tmp_path / "runs", "--no-cache")
    assert result.exit_code == 0, result.output
    usage = json.loads((Path(result.stdout.strip().splitlines()[-1]) / "summary.json").read_text())["usage"]
    for role in ("task", "backward", "optimizer"):
        assert usage[role]["calls"] <= bounds[role]["calls"], role


@pytest.mark.parametrize("interrupt_at", [2])
def test_a_resumed_pareto_run_ends_like_an_uninterrupted_one(tmp_path, monkeypatch, interrupt_at):
    from autodiff_cli.train import trainer as trainer_module

    whole = project(tmp_path / "whole", steps=3)
    done = cli("train", whole, "--runs-dir", tmp_path / "whole" / "runs")
    assert done.exit_code == 0, done.output
    reference = Path(done.stdout.strip().splitlines()[-1])

    spec = project(tmp_path / "cut", steps=3)
    real_step = trainer_module.Trainer.step

    async def interrupted(self, state, step):
        if step == interrupt_at:
            raise KeyboardInterrupt
        return await real_step(self, state, step)

    monkeypatch.setattr(trainer_module.Trainer, "step", interrupted)
    first = cli("train", spec, "--runs-dir", tmp_path / "cut" / "runs")
    assert first.exit_code == 130, first.output
    run = Path(first.stdout.strip().splitlines()[-1])
    monkeypatch.setattr(trainer_module.Trainer, "step", real_step)
    again = cli("train", spec, "--runs-dir", tmp_path / "cut" / "runs", "--resume", run)
    assert again.exit_code == 0, again.output
    state = lambda r: json.loads((r / "checkpoint.json").read_text())["state"]
    assert state(run)["optimizers"] == state(reference)["optimizers"]
    assert (run / "prompts.yaml").read_text() == (reference / "prompts.yaml").read_text()
