"""Pareto: a GEPA-style search (arXiv 2507.19457) whose mutations are this project's textual gradients.

It keeps a pool of candidates, each a full set of prompt values with its score on every validation
example. A step's parent is drawn from the per-example Pareto front (the candidates that score best
on at least one validation example and that no other candidate dominates), weighted by how many
examples each leads on: a lineage that solves examples nobody else solves stays alive even when its
mean is lower, where GDPO would only ever build on the single best. The step forwards its minibatch
with the parent's values, the mode's feedback policy backpropagates the failures, and GDPO's request
(gradients, peers, this step's failed proposals) writes the child. A child that strictly beats its
parent on the step's subset is scored on the whole validation split (no early stop: the front needs
every example's score) and joins the pool; the run's answer is the pool's best mean validation score.

What differs from GDPO is only here: the parent (`base_values`), the batching (the step's minibatch
alone: the moving batch would mix traces of different parents), and the acceptance (into the pool,
not "beat the best").
"""
from __future__ import annotations

import random
from collections import Counter
from dataclasses import dataclass
from typing import Any

from autodiff_cli.optim.base import Candidate, NoCandidate, Plan, StepContext
from autodiff_cli.optim.gdpo import GDPO, HistoryEntry, ProposalRequest
from autodiff_cli.optim.policies import Minibatch, TwoStage, fmt


@dataclass
class Member:
    """A candidate of the pool: full values and the score of each validation example."""

    values: dict[str, str]
    scores: dict[str, float]  # validation example id -> score
    step: int  # the step that produced it (0: the initial values)
    parent: int | None = None  # its parent's index in the pool

    @property
    def mean(self) -> float:
        return sum(self.scores.values()) / len(self.scores) if self.scores else 0.0

    def to_dict(self) -> dict[str, Any]:
        return {"values": dict(self.values), "scores": dict(self.scores), "step": self.step, "parent": self.parent}

    @classmethod
    def from_dict(cls, data: dict) -> Member:
        return cls(dict(data["values"]), {k: float(v) for k, v in data["scores"].items()}, int(data["step"]),
                   data.get("parent"))


def dominates(a: Member, b: Member) -> bool:
    """`a` scores at least as well as `b` on every example and better on one."""
    ids = a.scores.keys() | b.scores.keys()
    pairs = [(a.scores.get(i, 0.0), b.scores.get(i, 0.0)) for i in ids]
    return all(x >= y for x, y in pairs) and any(x > y for x, y in pairs)


def pareto_front(pool: list[Member]) -> dict[int, int]:
    """Pool index -> how many validation examples it leads on (ties lead together), for the members that
    lead somewhere and are not dominated by another such member."""
    leads: Counter[int] = Counter()
    for example_id in sorted(set().union(*(m.scores for m in pool))):
        top = max(m.scores.get(example_id, 0.0) for m in pool)
        leads.update(i for i, m in enumerate(pool) if m.scores.get(example_id, 0.0) == top)
    leaders = sorted(leads)
    return {i: leads[i] for i in leaders if not any(dominates(pool[j], pool[i]) for j in leaders if j != i)}


class Pareto(GDPO):
    name = "pareto"

    def __init__(self, env, options=None) -> None:
        super().__init__(env, options)
        self.pool: list[Member] = []
        self.parent: int | None = None  # this step's parent (None: the pool is not seeded yet)

    # ------------------------------------------------------------ the parent

    def base_values(self, state) -> dict[str, str]:
        if not self.pool:
            self.parent = None
            return state.values
        front = pareto_front(self.pool)
        rng = random.Random(f"{self.env.cfg.seed}:pareto:{state.step + 1}")
        indices = list(front)
        self.parent = rng.choices(indices, weights=[front[i] for i in indices])[0]
        # the parent's prompts; params it does not train (demos set by demo steps) as they are now
        parent = self.pool[self.parent].values
        return {**state.values, **{p: parent[p] for p in self.trainable() if p in parent}}

    def batching(self, mode):
        return Minibatch()

    def acceptance(self, mode):
        return PoolAcceptance(self)

    # ------------------------------------------------------------ the child

    async def propose(self, ctx: StepContext) -> Candidate | NoCandidate:
        proposal = await super().propose(ctx)
        if isinstance(proposal, Candidate):
            proposal.extra["parent"] = self.parent
        return proposal

    def request(self, ctx: StepContext, param: str) -> ProposalRequest:
        """GDPO's request, with the pool's best members as the history it shows."""
        request = super().request(ctx, param)
        if self.pool:
            best = sorted(self.pool, key=lambda m: (-m.mean, m.step))[: self.env.cfg.history_k]
            request.history = [HistoryEntry(m.step, m.values, m.mean) for m in best]
        return request

    # ------------------------------------------------------------ state

    def state_dict(self) -> dict:
        return {"pool": [m.to_dict() for m in self.pool]}

    def load_state_dict(self, state: dict) -> None:
        self.pool = [Member.from_dict(m) for m in state.get("pool", [])]

    def max_calls(self, plan: Plan, mode) -> dict[str, int]:
        # seeding the pool scores the initial values on every validation example once more (cache hits
        # after the initial validation, calls with --no-cache)
        return {**super().max_calls(plan, mode), "task": plan.n_val * plan.per_example_calls}


class PoolAcceptance(TwoStage):
    """A child that strictly beats its parent on the subset (TwoStage's first stage) is scored on every
    validation example and joins the pool; it becomes the run's best when its mean beats the best."""

    name = "pareto_pool"

    def __init__(self, optimizer: Pareto) -> None:
        self.optimizer = optimizer

    async def _scores(self, trainer, values: dict[str, str]) -> tuple[dict[str, float] | None, int]:
        report = await trainer.validate(values)
        if report.errors:
            return None, report.errors
        return {r.id: r.score for r in report.results}, 0

    async def decide(self, trainer, ctx, pending):
        pool, state = self.optimizer.pool, ctx.state
        if not pool:  # the values the first step started from (the initial ones) are the seed
            scores, errors = await self._scores(trainer, ctx.base)
            if scores is None:
                for _, record in pending:
                    record.reason = f"the seed's validation has {errors} examples with call errors"
                return
            pool.append(Member(dict(ctx.base), scores, 0))
            self.optimizer.parent = 0
        for candidate, record in pending:
            values = {**ctx.base, **candidate.values}
            trainer.on_phase("validate", {"step": ctx.step, "proposal": ctx.attempt, "stage": "validation (pool)"})
            scores, errors = await self._scores(trainer, values)
            if scores is None:
                record.reason = f"validation has {errors} examples with call errors"
                continue
            parent = self.optimizer.parent if self.optimizer.parent is not None else 0
            child = Member(values, scores, ctx.step, parent)
            pool.append(child)
            best = state.best_val is None or child.mean > state.best_val
            record.val_score, record.accepted = child.mean, True
            record.extra.update({"parent": parent, "pool": len(pool)})
            record.reason = (f"beats its parent on the subset; joins the pool as #{len(pool) - 1} "
                             f"(validation {fmt(child.mean)}, parent {fmt(pool[parent].mean)}"
                             + (", the best so far)" if best else f", best {fmt(state.best_val)})"))
            trainer.commit(state, ctx.step, values, child.mean, candidate.demo_ids, best=best)
            return
