"""The small policies a training mode is made of; the step loop asks them, it never branches on a mode.

- Batching: which examples a step learns from. `MovingBatch` (the paper's): failed and correct
  examples accumulate across steps until an update is accepted, and each step samples at most
  `max_error_samples` failed and `max_correct_samples` correct ones. `Minibatch`: the step's
  minibatch alone.
- Feedback: whose traces get a backward pass. `FailedOnly` (the paper's selective gradients),
  `Everyone` (TextGrad), `NoFeedback` (the no-gradient ablation: the optimizer sees samples only).
- Acceptance: what becomes of a candidate. `TwoStage`: strictly beat the subset, then strictly
  beat the best validation score (early-stopped); `TakeAll` (TextGrad): every candidate is taken,
  validation only records how it did.

A `Mode` bundles one of each (train.mode); `MODES` is the registry. Every policy also answers the
bound questions `train --dry-run` asks, so the projection and the run cannot disagree.
"""
from __future__ import annotations

import asyncio
import random
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any, ClassVar

from autodiff_cli.io.records import ProposalRecord

if TYPE_CHECKING:  # the loop and its state; policies only call back into them
    from autodiff_cli.optim.base import Candidate, StepContext
    from autodiff_cli.train.state import PoolEntry, TrainState
    from autodiff_cli.train.trainer import Trainer


def fmt(value: float | None) -> str:
    return "-" if value is None else f"{value:.3f}"


# ---------------------------------------------------------------- batching


class Batching:
    """Which examples of a step's minibatch (and of earlier steps) the step learns from."""

    name: ClassVar[str]

    def select(self, state: TrainState, pools: dict[str, PoolEntry], entries: list[PoolEntry], step: int,
               cfg: Any) -> tuple[list[PoolEntry], list[PoolEntry]]:
        """(failed, correct) examples of the step's subset."""
        raise NotImplementedError

    def note_skipped(self, state: TrainState, pools: dict[str, PoolEntry], entries: list[PoolEntry],
                     cfg: Any) -> None:
        """A step whose minibatch had no failure still shows its examples to a batching that keeps them."""

    def after_accept(self, state: TrainState, pools: dict[str, PoolEntry]) -> None:
        """The values changed: examples scored with the old ones say nothing about the new ones."""

    def pooled_ids(self, state: TrainState) -> list[str]:
        """Examples whose traces a resumed run must recompute before its next step."""
        return []

    def max_subset(self, cfg: Any) -> int:
        raise NotImplementedError

    def max_failed(self, cfg: Any) -> int:
        raise NotImplementedError


class MovingBatch(Batching):
    name = "moving_batch"

    @staticmethod
    def _pool(state: TrainState, pools: dict[str, PoolEntry], entries: list[PoolEntry], cfg: Any) -> None:
        for entry in entries:
            eid = entry.example.id
            pools[eid] = entry
            for pool in (state.failed_pool, state.correct_pool):
                if eid in pool:
                    pool.remove(eid)
            (state.failed_pool if entry.score < cfg.fail_threshold else state.correct_pool).append(eid)

    def select(self, state, pools, entries, step, cfg):
        self._pool(state, pools, entries, cfg)
        rng = random.Random(f"{cfg.seed}:subset:{step}")
        failed, correct = list(state.failed_pool), list(state.correct_pool)
        if len(failed) > cfg.max_error_samples:
            failed = sorted(rng.sample(failed, cfg.max_error_samples))
        if len(correct) > cfg.max_correct_samples:
            correct = sorted(rng.sample(correct, cfg.max_correct_samples))
        return [pools[i] for i in failed], [pools[i] for i in correct]

    def note_skipped(self, state, pools, entries, cfg):
        self._pool(state, pools, entries, cfg)

    def after_accept(self, state, pools):
        state.failed_pool, state.correct_pool = [], []
        pools.clear()

    def pooled_ids(self, state):
        return state.failed_pool + state.correct_pool

    def max_subset(self, cfg):
        return cfg.max_error_samples + cfg.max_correct_samples

    def max_failed(self, cfg):
        return cfg.max_error_samples


class Minibatch(Batching):
    name = "minibatch"

    def select(self, state, pools, entries, step, cfg):
        return ([e for e in entries if e.score < cfg.fail_threshold],
                [e for e in entries if e.score >= cfg.fail_threshold])

    def max_subset(self, cfg):
        return cfg.batch_size

    def max_failed(self, cfg):
        return cfg.batch_size


# ---------------------------------------------------------------- feedback


class Feedback:
    """Whose traces a step backpropagates (for an optimizer that uses gradients)."""

    name: ClassVar[str]
    gives_gradients: ClassVar[bool] = True  # False: the optimizer is told it sees samples only

    def backprop(self, failed: list, subset: list) -> list:
        raise NotImplementedError

    def max_backprop(self, cfg: Any, batching: Batching) -> int:
        raise NotImplementedError


class FailedOnly(Feedback):
    name = "failed_only"

    def backprop(self, failed, subset):
        return failed

    def max_backprop(self, cfg, batching):
        return batching.max_failed(cfg)


class Everyone(Feedback):
    name = "everyone"

    def backprop(self, failed, subset):
        return subset

    def max_backprop(self, cfg, batching):
        return batching.max_subset(cfg)


class NoFeedback(Feedback):
    name = "none"
    gives_gradients = False

    def backprop(self, failed, subset):
        return []

    def max_backprop(self, cfg, batching):
        return 0


# ---------------------------------------------------------------- acceptance


class Acceptance:
    """What becomes of candidates; on acceptance it commits the values to the state.

    Judging has two parts. `screen` looks at one candidate as soon as it is proposed (a cheap first
    stage, e.g. the subset) and says whether it is still pending; `decide` settles the pending ones
    (validation) and commits what it accepts. An `eager` rule decides each candidate at once (the
    first accepted one ends the step); a racing rule gathers the step's contenders and decides them
    together, so the validation calls go to those that can still win.
    """

    name: ClassVar[str]
    eager: ClassVar[bool] = True

    async def screen(self, trainer: Trainer, ctx: StepContext, candidate: Candidate) -> tuple[ProposalRecord, bool]:
        """(its record, whether it awaits `decide`)."""
        raise NotImplementedError

    async def decide(self, trainer: Trainer, ctx: StepContext,
                     pending: list[tuple[Candidate, ProposalRecord]]) -> None:
        raise NotImplementedError

    def max_examples(self, cfg: Any, subset: int, n_val: int) -> int:
        """The most task-model examples judging one candidate can score."""
        raise NotImplementedError


def _record(candidate: Candidate) -> ProposalRecord:
    return ProposalRecord(dict(candidate.values), demo_ids=candidate.demo_ids, extra=dict(candidate.extra))


def beats_subset(sub: float | None, base: float) -> bool:
    """Stage 1: strictly better on the backpropagated subset (equal only if it was already perfect)."""
    return sub is not None and (sub > base or (base == 1.0 and sub == 1.0))


class TwoStage(Acceptance):
    """The paper's rule: beat the subset, then strictly beat the best validation score (early-stopped
    once it cannot); the first candidate that does is accepted."""

    name = "two_stage"

    async def screen(self, trainer, ctx, candidate):
        record = _record(candidate)
        ctx.state.proposals["tried"] += 1
        trainer.on_phase("validate", {"step": ctx.step, "proposal": ctx.attempt, "stage": "subset"})
        sub = record.subset_score = await trainer.subset_score(ctx.subset, {**ctx.base, **candidate.values})
        if not beats_subset(sub, ctx.subset_score):
            record.reason = f"subset score {fmt(sub)} does not beat {fmt(ctx.subset_score)}"
            return record, False
        ctx.state.proposals["passed_subset"] += 1
        return record, True

    async def decide(self, trainer, ctx, pending):
        state = ctx.state
        for candidate, record in pending:
            values = {**ctx.base, **candidate.values}
            trainer.on_phase("validate", {"step": ctx.step, "proposal": ctx.attempt, "stage": "validation"})
            report = await trainer.validate(values, above=state.best_val)
            if report.stopped_early:
                record.reason = f"validation stopped early: cannot beat best {fmt(state.best_val)}"
            elif report.errors:
                record.reason = f"validation has {report.errors} examples with call errors"
            elif report.score is not None and (state.best_val is None or report.score > state.best_val):
                record.val_score, record.accepted, record.reason = report.score, True, "beats the best validation score"
                trainer.commit(state, ctx.step, values, report.score, candidate.demo_ids, best=True)
                return
            else:
                record.val_score = report.score
                record.reason = f"validation {fmt(report.score)} does not beat best {fmt(state.best_val)}"

    def max_examples(self, cfg, subset, n_val):
        return subset + n_val


class Racing(TwoStage):
    """Two stages, but the step's candidates that beat the subset are validated together, in rounds of
    validation examples (the same examples for all, in a seeded order), and each is dropped the moment
    it can no longer win: when even a perfect score on the examples left would not strictly beat the
    best validation score, or would not reach what the leading contender has already scored. The one
    left with the highest score is accepted if it strictly beats the best. Dropping is exact: a
    candidate that could still end up the winner is never dropped."""

    name = "racing"
    eager = False
    ROUNDS = 6  # validation examples are scored in this many rounds

    async def decide(self, trainer, ctx, pending):
        state = ctx.state
        examples = sorted(trainer.splits["val"], key=lambda e: e.id)
        random.Random(f"{trainer.cfg.seed}:race:{ctx.step}").shuffle(examples)
        n = len(examples)
        size = max(1, -(-n // self.ROUNDS))
        alive = list(range(len(pending)))
        totals = [0.0] * len(pending)
        done = 0
        best = state.best_val
        for start in range(0, n, size):
            chunk = examples[start:start + size]
            trainer.on_phase("validate", {"step": ctx.step, "stage": "racing", "contenders": len(alive),
                                          "examples": f"{start + len(chunk)}/{n}"})
            reports = await asyncio.gather(*(trainer.evaluate_on(chunk, {**ctx.base, **pending[i][0].values})
                                             for i in alive))
            for i, report in zip(list(alive), reports):
                if report.errors:
                    pending[i][1].reason = f"validation has {report.errors} examples with call errors"
                    alive.remove(i)
                    continue
                totals[i] += sum(r.score for r in report.results)
            done += len(chunk)
            left = n - done
            leader = max((totals[i] for i in alive), default=0.0)
            for i in list(alive):
                reach = (totals[i] + left) / n
                if best is not None and reach <= best:
                    pending[i][1].reason = (f"dropped from the race after {done}/{n} validation examples: "
                                            f"cannot beat best {fmt(best)}")
                elif totals[i] + left < leader:
                    pending[i][1].reason = (f"dropped from the race after {done}/{n} validation examples: "
                                            "cannot reach the leading contender")
                else:
                    continue
                alive.remove(i)
            if not alive:
                return
        for i in alive:
            pending[i][1].val_score = totals[i] / n
        winner = max(alive, key=lambda i: (totals[i], -i))  # ties: the earlier proposal
        record, score = pending[winner][1], totals[winner] / n
        for i in alive:
            if i != winner:
                pending[i][1].reason = f"validation {fmt(totals[i] / n)}: another contender scored {fmt(score)}"
        if best is None or score > best:
            record.accepted, record.reason = True, "beats the best validation score (won the race)"
            candidate = pending[winner][0]
            trainer.commit(state, ctx.step, {**ctx.base, **candidate.values}, score, candidate.demo_ids, best=True)
        else:
            record.reason = f"validation {fmt(score)} does not beat best {fmt(best)}"


class TakeAll(Acceptance):
    """TextGrad's rule: every candidate is taken; validation only records how it did."""

    name = "take_all"

    async def screen(self, trainer, ctx, candidate):
        ctx.state.proposals["tried"] += 1
        return _record(candidate), True

    async def decide(self, trainer, ctx, pending):
        state = ctx.state
        for candidate, record in pending:
            values = {**ctx.base, **candidate.values}
            trainer.on_phase("validate", {"step": ctx.step, "stage": "validation (for the record)"})
            report = await trainer.validate(values)
            best = report.score is not None and not report.errors and (state.best_val is None or report.score > state.best_val)
            trainer.commit(state, ctx.step, values, report.score, candidate.demo_ids, best=best)
            record.val_score, record.accepted, record.reason = report.score, True, "taken without validation (textgrad)"

    def max_examples(self, cfg, subset, n_val):
        return n_val


# ---------------------------------------------------------------- modes


@dataclass(frozen=True)
class Mode:
    """A training mode (`train.mode`): one policy of each kind."""

    batching: Batching
    feedback: Feedback
    acceptance: Acceptance
    max_proposals: int | None = None  # None: train.max_proposals
    trains: bool = True  # mode none: the initial prompts are only scored

    def proposals_per_step(self, cfg: Any) -> int:
        return self.max_proposals or cfg.max_proposals

    def configured(self, cfg: Any) -> Mode:
        """The mode as `train` configures it: `validation: racing` races two-stage candidates."""
        if getattr(cfg, "validation", "sequential") == "racing" and type(self.acceptance) is TwoStage:
            return replace(self, acceptance=Racing())
        return self


MODES: dict[str, Mode] = {
    "autodiff": Mode(MovingBatch(), FailedOnly(), TwoStage()),
    "no_gradient": Mode(MovingBatch(), NoFeedback(), TwoStage()),
    "textgrad": Mode(Minibatch(), Everyone(), TakeAll(), max_proposals=1),
    "none": Mode(Minibatch(), NoFeedback(), TwoStage(), trains=False),
}
