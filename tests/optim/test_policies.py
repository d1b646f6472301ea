"""optim/policies.py: each batching, feedback and acceptance policy on its own, and the modes made of them."""
from __future__ import annotations

import asyncio
from dataclasses import dataclass
from types import SimpleNamespace

import pytest

from autodiff_cli.data.loaders import Example
from autodiff_cli.engine.trace import Trace
from autodiff_cli.optim.base import Candidate, StepContext
from autodiff_cli.optim.policies import (
    MODES,
    Everyone,
    FailedOnly,
    Minibatch,
    MovingBatch,
    NoFeedback,
    Racing,
    TakeAll,
    TwoStage,
)
from autodiff_cli.train.state import PoolEntry, TrainState

CFG = SimpleNamespace(fail_threshold=0.5, seed=0, max_error_samples=2, max_correct_samples=1, batch_size=4,
                      max_proposals=3)


def entry(i: int, score: float) -> PoolEntry:
    return PoolEntry(Example(f"e{i}", {"q": i}), Trace(f"e{i}"), score)


def fresh_state() -> TrainState:
    return TrainState(values={"p": "old"}, initial_values={"p": "old"}, best_values={"p": "old"}, best_val=0.5)


# ---------------------------------------------------------------- batching


def test_the_moving_batch_accumulates_failures_across_steps_and_samples_at_most_its_limits():
    batching, state, pools = MovingBatch(), fresh_state(), {}
    failed, correct = batching.select(state, pools, [entry(0, 0.0), entry(1, 1.0)], 1, CFG)
    assert [e.example.id for e in failed] == ["e0"] and [e.example.id for e in correct] == ["e1"]
    failed, correct = batching.select(state, pools, [entry(2, 0.0), entry(3, 0.0), entry(4, 1.0)], 2, CFG)
    assert state.failed_pool == ["e0", "e2", "e3"] and state.correct_pool == ["e1", "e4"]
    assert len(failed) == CFG.max_error_samples and len(correct) == CFG.max_correct_samples
    assert {e.example.id for e in failed} <= {"e0", "e2", "e3"}
    again = batching.select(fresh_copy(state), dict(pools), [], 2, CFG)  # the sample is seeded by (seed, step)
    assert [e.example.id for e in again[0]] == [e.example.id for e in failed]
    # an example scored again moves to the pool its new score puts it in
    batching.select(state, pools, [entry(0, 1.0)], 3, CFG)
    assert "e0" in state.correct_pool and "e0" not in state.failed_pool
    assert sorted(batching.pooled_ids(state)) == ["e0", "e1", "e2", "e3", "e4"]
    batching.after_accept(state, pools)
    assert state.failed_pool == state.correct_pool == [] and pools == {}
    assert batching.max_subset(CFG) == 3 and batching.max_failed(CFG) == 2


def fresh_copy(state: TrainState) -> TrainState:
    return TrainState.from_dict({k: (list(v) if isinstance(v, list) else v) for k, v in state.to_dict().items()})


def test_a_step_without_failure_still_feeds_the_moving_batch_but_not_the_minibatch():
    state, pools = fresh_state(), {}
    MovingBatch().note_skipped(state, pools, [entry(0, 1.0)], CFG)
    assert state.correct_pool == ["e0"]
    other = fresh_state()
    Minibatch().note_skipped(other, {}, [entry(0, 1.0)], CFG)
    assert other.correct_pool == []


def test_the_minibatch_is_the_step_alone():
    batching, state = Minibatch(), fresh_state()
    failed, correct = batching.select(state, {}, [entry(0, 0.0), entry(1, 0.9), entry(2, 0.2)], 1, CFG)
    assert [e.example.id for e in failed] == ["e0", "e2"] and [e.example.id for e in correct] == ["e1"]
    assert state.failed_pool == [] and batching.pooled_ids(state) == []
    assert batching.max_subset(CFG) == batching.max_failed(CFG) == CFG.batch_size


# ---------------------------------------------------------------- feedback


def test_feedback_policies_choose_whose_traces_are_backpropagated():
    failed, subset = ["f"], ["f", "c"]
    assert FailedOnly().backprop(failed, subset) == ["f"] and FailedOnly.gives_gradients
    assert Everyone().backprop(failed, subset) == ["f", "c"]
    assert NoFeedback().backprop(failed, subset) == [] and not NoFeedback.gives_gradients
    assert FailedOnly().max_backprop(CFG, MovingBatch()) == 2
    assert FailedOnly().max_backprop(CFG, Minibatch()) == 4
    assert Everyone().max_backprop(CFG, MovingBatch()) == 3
    assert NoFeedback().max_backprop(CFG, MovingBatch()) == 0


# ---------------------------------------------------------------- acceptance


@dataclass
class FakeTrainer:
    """What an acceptance rule calls back: scores by the candidate's value, and the commit. `per_example`
    gives a candidate's score on each validation example (for racing)."""

    subset: dict[str, float | None]
    val: dict[str, float]
    stopped_early: bool = False
    per_example: dict[str, list[float]] | None = None

    def __post_init__(self):
        self.committed: list[tuple] = []
        self.validated: list[tuple] = []
        self.scored = 0  # validation examples scored while racing
        n = len(next(iter(self.per_example.values()))) if self.per_example else 0
        self.splits = {"val": [Example(f"v{i:02d}", {}) for i in range(n)]}
        self.cfg = SimpleNamespace(seed=0)

    def on_phase(self, phase, info):
        pass

    async def subset_score(self, subset, values):
        return self.subset[values["p"]]

    async def validate(self, values, above=None):
        self.validated.append((values["p"], above))
        score = self.val[values["p"]]
        stopped = self.stopped_early and above is not None and score <= above
        return SimpleNamespace(score=None if stopped else score, errors=0, stopped_early=stopped)

    async def evaluate_on(self, examples, values):
        self.scored += len(examples)
        scores = self.per_example[values["p"]]
        return SimpleNamespace(errors=0, results=[SimpleNamespace(score=scores[int(e.id[1:])]) for e in examples])

    def commit(self, state, step, values, val_score, demo_ids, *, best):
        self.committed.append((values["p"], val_score, best))
        state.values = values
        if best:
            state.best_val = val_score


def context(subset_score: float = 0.4, best_val: float = 0.5) -> StepContext:
    state = fresh_state()
    state.best_val = best_val
    return StepContext(step=1, state=state, base=dict(state.values), batch=[], failed=[entry(0, 0.0)], correct=[],
                       subset_score=subset_score, attempt=1)


def judge(rule, trainer, *values: str, subset_score: float = 0.4, best_val: float = 0.5):
    """Screen each candidate, then let the rule decide the pending ones (at once, or together)."""
    ctx = context(subset_score, best_val)

    async def run():
        records, pending = [], []
        for value in values:
            candidate = Candidate({"p": value}, extra={"note": "x"})
            record, waits = await rule.screen(trainer, ctx, candidate)
            records.append(record)
            if waits:
                pending.append((candidate, record))
            if pending and (rule.eager or value == values[-1]):
                await rule.decide(trainer, ctx, pending)
                pending = []
        return records

    records = asyncio.run(run())
    return (records[0] if len(records) == 1 else records), ctx.state


def test_two_stage_rejects_at_the_subset_without_validating():
    trainer = FakeTrainer(subset={"new": 0.4}, val={"new": 1.0})
    record, state = judge(TwoStage(), trainer, "new")
    assert not record.accepted and "subset score 0.400 does not beat 0.400" in record.reason
    assert trainer.validated == [] and trainer.committed == [] and state.proposals["tried"] == 1
    assert record.to_row()["note"] == "x"  # the candidate's facts reach the metrics row


def test_two_stage_rejects_what_does_not_strictly_beat_the_best_validation_score():
    trainer = FakeTrainer(subset={"new": 1.0}, val={"new": 0.5})
    record, state = judge(TwoStage(), trainer, "new")
    assert not record.accepted and record.val_score == 0.5 and "does not beat best 0.500" in record.reason
    assert trainer.validated == [("new", 0.5)] and state.proposals["passed_subset"] == 1 and not trainer.committed


def test_two_stage_accepts_and_commits_a_strictly_better_candidate():
    trainer = FakeTrainer(subset={"new": 1.0}, val={"new": 0.75})
    record, state = judge(TwoStage(), trainer, "new")
    assert record.accepted and record.val_score == 0.75 and trainer.committed == [("new", 0.75, True)]
    assert TwoStage().max_examples(CFG, subset=3, n_val=10) == 13


def test_two_stage_reports_an_early_stop():
    trainer = FakeTrainer(subset={"new": 1.0}, val={"new": 0.25}, stopped_early=True)
    record, _ = judge(TwoStage(), trainer, "new")
    assert not record.accepted and "stopped early" in record.reason and record.val_score is None


def test_take_all_takes_every_candidate_and_only_a_better_one_becomes_the_best():
    trainer = FakeTrainer(subset={}, val={"worse": 0.25, "better": 0.75})
    worse, state = judge(TakeAll(), trainer, "worse")
    assert worse.accepted and worse.val_score == 0.25 and trainer.committed == [("worse", 0.25, False)]
    assert state.values == {"p": "worse"}  # taken all the same
    better, _ = judge(TakeAll(), trainer, "better")
    assert trainer.committed[-1] == ("better", 0.75, True) and better.subset_score is None
    assert trainer.validated[-1] == ("better", None)  # no early stop: it is recorded, not judged
    assert TakeAll().max_examples(CFG, subset=3, n_val=10) == 10


# 12 validation examples; scored in rounds of 2 (Racing.ROUNDS = 6)
STRONG = [1.0] * 10 + [0.0, 0.0]  # 10/12
MIDDLE = [1.0] * 7 + [0.0] * 5  # 7/12
WEAK = [0.0] * 12


def test_racing_validates_the_contenders_together_and_accepts_the_best_not_the_first():
    trainer = FakeTrainer(subset={"mid": 1.0, "strong": 1.0, "weak": 1.0, "bad": 0.0},
                          val={}, per_example={"mid": MIDDLE, "strong": STRONG, "weak": WEAK, "bad": WEAK})
    records, state = judge(Racing(), trainer, "mid", "bad", "strong", "weak", best_val=0.5)
    mid, bad, strong, weak = records
    assert strong.accepted and strong.val_score == 10 / 12 and trainer.committed == [("strong", 10 / 12, True)]
    assert "won the race" in strong.reason
    assert not bad.accepted and "subset score" in bad.reason  # never raced
    assert "cannot beat best 0.500" in weak.reason and weak.val_score is None
    assert not mid.accepted and "dropped from the race" in mid.reason or "another contender" in mid.reason
    # the weak one was dropped early: fewer examples scored than validating all three in full
    assert trainer.scored < 3 * 12


def test_racing_drops_a_contender_once_it_cannot_reach_the_leader():
    always = [1.0] * 12
    trainer = FakeTrainer(subset={"a": 1.0, "b": 1.0}, val={}, per_example={"a": always, "b": MIDDLE})
    (a, b), _ = judge(Racing(), trainer, "a", "b", best_val=0.0)
    assert a.accepted and a.val_score == 1.0
    assert "cannot reach the leading contender" in b.reason
    assert trainer.scored < 24


def test_racing_accepts_nothing_when_no_contender_beats_the_best():
    trainer = FakeTrainer(subset={"mid": 1.0}, val={}, per_example={"mid": MIDDLE})
    record, _ = judge(Racing(), trainer, "mid", best_val=0.9)
    assert not record.accepted and not trainer.committed and "cannot beat best 0.900" in record.reason
    assert trainer.scored < 12  # stopped as soon as 0.9 was out of reach


def test_racing_is_what_validation_racing_configures():
    cfg = SimpleNamespace(validation="racing")
    assert isinstance(MODES["autodiff"].configured(cfg).acceptance, Racing)
    assert isinstance(MODES["textgrad"].configured(cfg).acceptance, TakeAll)  # nothing to race
    assert isinstance(MODES["autodiff"].configured(SimpleNamespace(validation="sequential")).acceptance, TwoStage)


# ---------------------------------------------------------------- modes


@pytest.mark.parametrize("mode, batching, feedback, acceptance, proposals, trains", [
    ("autodiff", MovingBatch, FailedOnly, TwoStage, 3, True),
    ("no_gradient", MovingBatch, NoFeedback, TwoStage, 3, True),
    ("textgrad", Minibatch, Everyone, TakeAll, 1, True),
    ("none", Minibatch, NoFeedback, TwoStage, 3, False),
])
def test_each_mode_is_one_policy_of_each_kind(mode, batching, feedback, acceptance, proposals, trains):
    m = MODES[mode]
    assert (type(m.batching), type(m.feedback), type(m.acceptance)) == (batching, feedback, acceptance)
    assert m.proposals_per_step(CFG) == proposals and m.trains is trains
