"""Joint: instructions and few-shot demos searched together (`train.optimizer: joint`, with `train.demos: off`).

The `train.demos` schedules judge text steps and demo steps against one best validation score, so a
text candidate that wins validation by noise raises the bar every later demo set has to clear. Joint
keeps two lineages apart instead, and combines them at the end:

- text lineage (odd steps): GDPO rewrites the prompt params; the demos params keep their initial values.
- demos lineage (even steps): DemoBootstrap bootstraps and samples demo sets; the prompt params keep their
  initial values.
  A lineage step starts from its lineage's best values, and its candidates are judged by the mode's
  two-stage rule (beat the subset, then strictly beat the best validation score, early-stopped; racing
  under `validation: racing`; two stages also in textgrad mode) with the LINEAGE's best as the bar. An
  accepted candidate joins its lineage and is committed to the run too, as the run's best when it beats
  it, so the run's best is always the best value seen.
- grid (the run's last step, or a step after which `patience` would stop the run): the top-K members of
  each lineage (its initial values included, ranked by validation score) are combined, the prompt params
  of one with the demos params of the other. Combinations never validated (a pure lineage member's
  score is known) are raced on validation together (`Racing`, no subset stage) and the winner is
  committed when it beats the run's best. With nothing new to combine, the step is its lineage's.

So a joint run ends at least as good on validation as the better lineage, and on the combination when
that is better still. Steps are planned from the step number (and the patience counter), never from
what happened, so `--resume` continues exactly; the checkpoint holds both lineages, the combinations
already raced, and DemoBootstrap's teacher runs and student scores.

Limits, by design or by the contract:
- A lineage with nothing to train (no trainable prompt or demos param) skips its steps: `begin_step`
  says so in the step's `skipped`; the other lineage still runs on its own steps, and the grid has
  nothing to combine.
- Steps learn from their minibatch only (`Minibatch`, as pareto): the moving batch would mix traces of
  the two lineages' values.
- The trainer skips a step whose minibatch has no failure before asking the optimizer. The grid step
  forwards the initial values (the likeliest to fail) to make that rare, but it can still happen.
"""
from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass, replace
from typing import Any

from pydantic import Field

from autodiff_cli.io.records import ProposalRecord
from autodiff_cli.optim.base import (
    Candidate,
    NoCandidate,
    Optimizer,
    OptimizerEnv,
    Plan,
    StepContext,
)
from autodiff_cli.optim.demos import DemoBootstrap
from autodiff_cli.optim.gdpo import GDPO, HistoryEntry, ProposalRequest
from autodiff_cli.optim.policies import Acceptance, Minibatch, Racing, TwoStage, fmt
from autodiff_cli.spec.models import Strict

LINEAGES = ("text", "demos")
NO_IDS: dict[str, list[str]] = {"bootstrapped": [], "raw": []}


class JointOptions(Strict):
    k: int = Field(2, ge=1, description="the grid combines the top k values of each lineage (initial included)")


def planned(step: int, total_steps: int, *, last_chance: bool = False) -> str:
    """"text", "demos" or "grid": what step `step` (1-based) of `total_steps` is planned to be. The last
    step (or one after which patience would stop the run: `last_chance`) is the grid; the others
    alternate, odd text and even demos."""
    if step >= total_steps or last_chance:
        return "grid"
    return by_parity(step)


def by_parity(step: int) -> str:
    return "text" if step % 2 == 1 else "demos"


def values_key(values: dict[str, str]) -> str:
    return hashlib.sha256(json.dumps(values, sort_keys=True, ensure_ascii=False).encode()).hexdigest()


@dataclass
class Member:
    """A lineage's accepted values (or its initial ones) with their validation score."""

    values: dict[str, str]  # every param's value
    val: float | None
    step: int  # the step that produced it (0: the initial values)
    demo_ids: dict[str, dict[str, list[str]]]  # the examples behind each trainable demos param's value

    def to_dict(self) -> dict[str, Any]:
        return {"values": dict(self.values), "val": self.val, "step": self.step, "demo_ids": dict(self.demo_ids)}

    @classmethod
    def from_dict(cls, data: dict) -> Member:
        val = data.get("val")
        return cls(dict(data["values"]), None if val is None else float(val), int(data["step"]),
                   dict(data.get("demo_ids") or {}))


def ranked(members: list[Member]) -> list[Member]:
    """Best validation score first; ties: the older member."""
    return sorted(members, key=lambda m: (-(m.val if m.val is not None else -math.inf), m.step))


class _TextLineage(GDPO):
    """GDPO, shown the text lineage's members as its history (not the run's, which holds demo sets)."""

    def __init__(self, env: OptimizerEnv, joint: Joint) -> None:
        super().__init__(env)
        self.joint = joint

    def request(self, ctx: StepContext, param: str) -> ProposalRequest:
        request = super().request(ctx, param)
        best = ranked(self.joint.lineages["text"])[: self.env.cfg.history_k]
        request.history = [HistoryEntry(m.step, m.values, m.val) for m in best if m.val is not None]
        return request


class Joint(Optimizer):
    name = "joint"
    param_kind = "prompt"  # so `train.optimizer` may name it; `trainable()` covers the demos params too
    step_kind = "text"
    Options = JointOptions

    def __init__(self, env: OptimizerEnv, options: JointOptions | None = None) -> None:
        super().__init__(env, options or JointOptions())
        self.text = _TextLineage(env, self)
        self.demos = DemoBootstrap(env)
        self.lineages: dict[str, list[Member]] = {kind: [] for kind in LINEAGES}
        self.grid_tried: list[str] = []  # values_key of every combination raced so far
        # this step's (set by base_values); None outside a step, where the bounds cover every kind
        self.kind: str | None = None
        self.grid: list[Candidate] = []

    @classmethod
    def parse_options(cls, raw: dict, loaded: Any) -> JointOptions | None:
        options = super().parse_options(raw, loaded)
        schedule = loaded.spec.train.demos
        if schedule != "off":
            raise loaded.error(("train", "demos"), expected="off with optimizer joint (it runs its own demos steps)",
                               got=repr(schedule))
        return options

    # ------------------------------------------------------------ the plan

    def trainable(self) -> list[str]:
        return [n for n, p in self.env.program.params.items() if p.trainable and p.kind in ("prompt", "demos")]

    def total_steps(self) -> int:
        return self.env.total_steps

    def last_chance(self, state) -> bool:
        """Patience stops the run after this step unless it improves the best."""
        patience = self.env.cfg.patience
        return bool(patience) and state.steps_since_improvement >= patience - 1

    @property
    def uses_gradients(self) -> bool:  # the trainer reads it per step, after base_values
        return self.kind in (None, "text")

    def head(self, kind: str) -> Member:
        return ranked(self.lineages[kind])[0]

    def base_values(self, state) -> dict[str, str]:
        self._seed(state)
        step = state.step + 1
        kind = planned(step, self.total_steps(), last_chance=self.last_chance(state))
        self.grid = self.combinations() if kind == "grid" else []
        if kind == "grid" and not self.grid:
            kind = by_parity(step)
        self.kind = kind
        if kind == "grid":
            return dict(state.initial_values)  # forwarded only (the likeliest values to have a failure)
        return dict(self.head(kind).values)

    def _seed(self, state) -> None:
        """Both lineages start from the initial values and their validation score."""
        if all(self.lineages.values()):
            return
        start = (state.history[0].get("demo_ids") if state.history else state.demo_ids) or {}
        ids = {p: dict(start.get(p) or NO_IDS) for p in self.demos.trainable()}
        for kind in LINEAGES:
            self.lineages[kind] = [Member(dict(state.initial_values), state.initial_val, 0, dict(ids))]

    def combinations(self) -> list[Candidate]:
        """The grid: top-K text members x top-K demos members, best-ranked pairs first, without the ones
        already validated (lineage members, combinations raced before)."""
        k = self.options.k
        texts, demos = ranked(self.lineages["text"])[:k], ranked(self.lineages["demos"])[:k]
        prompt_params, demos_params = self.text.trainable(), self.demos.trainable()
        known = {values_key(m.values) for kind in LINEAGES for m in self.lineages[kind]} | set(self.grid_tried)
        out: list[tuple[tuple[int, int, int], Candidate]] = []
        for i, t in enumerate(texts):
            for j, d in enumerate(demos):
                full = {**t.values, **{p: d.values[p] for p in demos_params}}
                key = values_key(full)
                if key in known:
                    continue
                known.add(key)
                values = {**{p: t.values[p] for p in prompt_params}, **{p: d.values[p] for p in demos_params}}
                extra = {"lineage": "grid", "text_step": t.step, "text_val": t.val, "demos_step": d.step,
                         "demos_val": d.val}
                out.append(((i + j, i, j), Candidate(values, demo_ids=dict(d.demo_ids), extra=extra)))
        return [c for _, c in sorted(out, key=lambda pair: pair[0])]

    # ------------------------------------------------------------ a step

    def observe(self, entries: list) -> None:
        if self.kind == "demos":  # the demos lineage's student: its own values, not the text lineage's
            self.demos.observe(entries)

    def batching(self, mode):
        return Minibatch()

    async def begin_step(self, ctx: StepContext) -> str | None:
        if self.kind == "grid":
            self.targets = sorted({p for c in self.grid for p in c.values})
            ctx.trace_rows.append({"kind": "grid", "step": ctx.step, "k": self.options.k,
                                   "combinations": [dict(c.extra) for c in self.grid]})
            return None
        inner = self.text if self.kind == "text" else self.demos
        if not inner.trainable():
            self.targets = []
            what = "prompt" if self.kind == "text" else "demos"
            return f"no trainable {what} parameter: joint's {self.kind} lineage has nothing to train"
        why_not = await inner.begin_step(ctx)
        self.targets = inner.targets
        return f"{self.kind} lineage: {why_not}" if why_not else None

    async def propose(self, ctx: StepContext) -> Candidate | NoCandidate:
        if self.kind == "grid":
            if ctx.attempt > len(self.grid):
                return NoCandidate("no combination left")
            c = self.grid[ctx.attempt - 1]
            return Candidate(dict(c.values), demo_ids=dict(c.demo_ids or {}), extra=dict(c.extra))
        proposal = await (self.text if self.kind == "text" else self.demos).propose(ctx)
        if isinstance(proposal, Candidate):
            proposal.extra["lineage"] = self.kind
        return proposal

    def after_judge(self, ctx: StepContext, candidate: Candidate, record: ProposalRecord) -> None:
        if self.kind == "grid":
            self.grid_tried.append(values_key({**ctx.base, **candidate.values}))
        else:
            (self.text if self.kind == "text" else self.demos).after_judge(ctx, candidate, record)

    def acceptance(self, mode) -> Acceptance:
        """The grid's race on a grid step; else the lineage rule (outside a step, e.g. in the dry run, its
        `max_examples`, subset + validation, bounds a grid candidate's validation too)."""
        if self.kind == "grid":
            return GridRace()
        return self._lineage_rule(mode)

    def _lineage_rule(self, mode) -> LineageAcceptance:
        inner = mode.acceptance if isinstance(mode.acceptance, TwoStage) else TwoStage()  # never taken blind
        return LineageAcceptance(self, inner)

    def max_proposals(self, mode) -> int:
        """This step's; outside a step (the dry run), the most of a lineage step (a grid step's excess is
        a `task` entry of `max_calls`)."""
        if self.kind == "grid":
            return len(self.grid)
        if self.kind == "text":
            return self.text.max_proposals(mode)
        if self.kind == "demos":
            return self.demos.max_proposals(mode)
        return self._lineage_proposals(mode)

    def _lineage_proposals(self, mode) -> int:
        return max(self.text.max_proposals(mode), self.demos.max_proposals(mode))

    def step_call_errors(self) -> tuple[list[str], int]:
        return self.text.step_call_errors() if self.kind == "text" else ([], 0)

    def grow(self, kind: str, step: int, values: dict[str, str], val: float | None,
             demo_ids: dict | None) -> Member:
        """An accepted candidate joins its lineage (and becomes its best: it beat it)."""
        member = Member(dict(values), val, step, {**self.head(kind).demo_ids, **(demo_ids or {})})
        self.lineages[kind].append(member)
        return member

    # ------------------------------------------------------------ state and bounds

    def state_dict(self) -> dict:
        return {"lineages": {kind: [m.to_dict() for m in members] for kind, members in self.lineages.items()},
                "grid_tried": list(self.grid_tried), "text": self.text.state_dict(), "demos": self.demos.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        lineages = state.get("lineages") or {}
        self.lineages = {kind: [Member.from_dict(m) for m in lineages.get(kind) or []] for kind in LINEAGES}
        self.grid_tried = list(state.get("grid_tried") or [])
        self.text.load_state_dict(state.get("text") or {})
        self.demos.load_state_dict(state.get("demos") or {})

    def max_calls(self, plan: Plan, mode) -> dict[str, int]:
        """Text steps are odd and demos steps even (a grid step that falls back keeps its parity). The
        projection bounds judging on every step by `max_proposals` x (subset + validation) as answered
        outside a step; a grid step races up to K x K combinations on the validation split, so what exceeds
        that is a `task` entry, per grid step (the last one, and one per `patience` steps at most)."""
        calls: dict[str, int] = {}
        odd = [s for s in plan.steps if s % 2 == 1]
        even = [s for s in plan.steps if s % 2 == 0]
        for inner, steps in ((self.text, odd), (self.demos, even)):
            if steps and inner.trainable():  # a lineage with nothing to train skips its steps
                for role, n in inner.max_calls(replace(plan, steps=steps), mode).items():
                    calls[role] = calls.get(role, 0) + n
        if plan.steps:
            cfg = self.env.cfg
            patience = cfg.patience
            grids = min(len(plan.steps), 1 + (len(plan.steps) // patience if patience else 0))
            judged = self._lineage_proposals(mode) * self._lineage_rule(mode).max_examples(cfg, plan.batch_size,
                                                                                           plan.n_val)
            beyond = max(0, self.options.k ** 2 * plan.n_val - judged)
            calls["task"] = calls.get("task", 0) + grids * beyond * plan.per_example_calls
        return calls


class LineageAcceptance(Acceptance):
    """The mode's two-stage rule (TwoStage, or Racing) with a lineage's best as the bar: its decide sees
    the state with the lineage's best validation score, and its commit grows the lineage and commits
    to the run (as the run's best only when it beats it)."""

    name = "joint_lineage"

    def __init__(self, joint: Joint, inner: TwoStage) -> None:
        self.joint, self.inner = joint, inner
        self.eager = inner.eager

    async def screen(self, trainer, ctx, candidate):
        return await self.inner.screen(trainer, ctx, candidate)

    async def decide(self, trainer, ctx, pending):
        kind = self.joint.kind
        bar = self.joint.head(kind).val
        committer = _LineageCommit(trainer, self.joint, kind, ctx.state)
        await self.inner.decide(committer, replace(ctx, state=_LineageView(ctx.state, bar)), pending)
        for _, record in pending:
            record.extra["lineage_best"] = bar
            if record.accepted:
                record.reason = (f"beats the {kind} lineage's best validation score {fmt(bar)}"
                                 + ("; the run's best" if committer.run_best
                                    else f"; the run's best stays {fmt(ctx.state.best_val)}"))
            elif record.reason:
                record.reason = f"{kind} lineage: {record.reason}"

    def max_examples(self, cfg, subset, n_val):
        return self.inner.max_examples(cfg, subset, n_val)


class _LineageView:
    """The run's state as a lineage's acceptance sees it: the best validation score is the lineage's."""

    def __init__(self, state, best_val: float | None) -> None:
        self._state = state
        self.best_val = best_val

    def __getattr__(self, name: str):
        return getattr(self._state, name)


class _LineageCommit:
    """The trainer as a lineage's acceptance sees it: a commit grows the lineage, then commits to the run."""

    def __init__(self, trainer, joint: Joint, kind: str, state) -> None:
        self._trainer, self._joint, self._kind, self._state = trainer, joint, kind, state
        self.run_best = False

    def __getattr__(self, name: str):
        return getattr(self._trainer, name)

    def commit(self, _view, step: int, values: dict[str, str], val: float | None, demo_ids: dict | None, *,
               best: bool) -> None:
        member = self._joint.grow(self._kind, step, values, val, demo_ids)
        state = self._state
        self.run_best = val is not None and (state.best_val is None or val > state.best_val)
        self._trainer.commit(state, step, values, val, member.demo_ids, best=self.run_best)


class GridRace(Racing):
    """The grid's combinations are raced on validation together (no subset stage: a combination of two
    validated lineages has no step subset of its own); the winner is committed if it beats the run's best."""

    name = "joint_grid"

    async def screen(self, trainer, ctx, candidate):
        ctx.state.proposals["tried"] += 1
        return ProposalRecord(dict(candidate.values), demo_ids=candidate.demo_ids, extra=dict(candidate.extra)), True

    async def decide(self, trainer, ctx, pending):
        await super().decide(trainer, ctx, pending)
        for _, record in pending:
            record.reason = f"grid: {record.reason}"

    def max_examples(self, cfg, subset, n_val):
        return n_val
