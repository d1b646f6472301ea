"""`autodiff train`: forward, loss, backward, propose, two-stage validation, step by step.

One step:
  1. forward the minibatch with the current (= best) values; training scores from the loss
  2. moving batch: failed and correct examples accumulate until an update is accepted; the
     step backpropagates at most max_error_samples failed and max_correct_samples correct
     (a step whose minibatch has no failure is skipped)
  3. backward (mode autodiff): textual gradients for the failed examples only
  4. up to max_proposals proposals; each must beat the subset's score (stage 1), then strictly
     beat the best validation score (stage 2, early-stopped); the first that passes is
     accepted, the others are reverted
A step proposes either text (steps 3-4: gradients and the GDPO optimizer) or demos (a teacher
bootstraps the minibatch, then demo sets are sampled; optim/demos.py), as `train.demos` says.
After each step the run directory gets metrics, traces, prompts, checkpoint and summary, so
`--resume` continues exactly from the last completed step.
"""
from __future__ import annotations

import asyncio
import logging
import math
import random
import time
from dataclasses import dataclass, field
from typing import Any, Awaitable, Callable

from autodiff_cli.spec.compiler import Program
from autodiff_cli.data.loaders import Example
from autodiff_cli.engine.forward import score as score_trace
from autodiff_cli.errors import BudgetExhausted, ErrorRateExceeded, ModelCallError
from autodiff_cli.engine.evaluate import EvalReport, evaluate
from autodiff_cli.grad.backward import BackwardEngine, Gradient, canonical
from autodiff_cli.grad.loss import Evaluation, backward_calls_per_example, evaluate_loss, llm_evaluation
from autodiff_cli.optim import demos, gdpo
from autodiff_cli.engine.trace import Trace

log = logging.getLogger("autodiff.train")
OPTIMIZER_CALL_FAILED = "optimizer call failed"  # a proposal's reason when its call failed after retries


@dataclass(frozen=True)
class Strategy:
    """What distinguishes the training modes; one step skeleton serves them all. The step asks these
    methods what to do, and `train --dry-run` asks the same ones for its bounds."""

    moving_batch: bool  # failed/correct examples accumulate across steps until an update is accepted
    gradients: bool  # run the backward pass (no_gradient: the optimizer sees samples only)
    backprop_correct: bool  # feedback for every example, correct ones included (TextGrad)
    validate: bool  # two-stage validation; without it every proposal is taken (TextGrad)
    max_proposals: int | None = None  # None: train.max_proposals
    trains: bool = True  # mode none: the initial prompts are only scored

    def proposals_per_step(self, cfg) -> int:
        return self.max_proposals or cfg.max_proposals

    def subset(self, failed: list, correct: list) -> list:
        return failed + correct

    def backprop(self, failed: list, subset: list) -> list:
        """The examples whose traces get a backward pass (none without gradients)."""
        if not self.gradients:
            return []
        return subset if self.backprop_correct else failed

    def max_subset(self, cfg) -> int:
        """The most examples of a step's subset (scored again for every validated proposal)."""
        return cfg.max_error_samples + cfg.max_correct_samples if self.moving_batch else cfg.batch_size

    def max_backprop(self, cfg) -> int:
        if not self.gradients:
            return 0
        if not self.moving_batch:
            return cfg.batch_size
        return self.max_subset(cfg) if self.backprop_correct else cfg.max_error_samples


STRATEGIES = {
    "autodiff": Strategy(moving_batch=True, gradients=True, backprop_correct=False, validate=True),
    "no_gradient": Strategy(moving_batch=True, gradients=False, backprop_correct=False, validate=True),
    "textgrad": Strategy(moving_batch=False, gradients=True, backprop_correct=True, validate=False, max_proposals=1),
    "none": Strategy(moving_batch=False, gradients=False, backprop_correct=False, validate=True, trains=False),
}


@dataclass
class PoolEntry:
    example: Example
    trace: Trace
    score: float  # training (loss) score with the current values


@dataclass
class TrainState:
    """Everything needed to continue exactly (checkpoint.json)."""

    values: dict[str, str]  # the current values (= best_values unless the mode takes proposals unvalidated)
    initial_values: dict[str, str]
    best_values: dict[str, str] | None = None
    step: int = 0  # last completed step
    initial_val: float | None = None
    best_val: float | None = None
    best_step: int = 0
    history: list[dict] = field(default_factory=list)  # accepted values: {step, values, val_score}
    steps_since_improvement: int = 0
    failed_pool: list[str] = field(default_factory=list)  # example ids, oldest first
    correct_pool: list[str] = field(default_factory=list)
    proposals: dict[str, int] = field(default_factory=lambda: {"tried": 0, "passed_subset": 0, "accepted": 0})
    usage: dict = field(default_factory=dict)
    wall_seconds: float = 0.0
    stop_reason: str | None = None
    # demos: the teacher's runs {example id: {tries, score, outputs {param: node output}}}, the
    # student's latest training score per example, and the demo ids behind each demos value
    teacher: dict[str, dict] = field(default_factory=dict)
    student_scores: dict[str, float] = field(default_factory=dict)
    demo_ids: dict[str, dict[str, list[str]]] = field(default_factory=dict)

    def to_dict(self) -> dict:
        return dict(self.__dict__)

    @classmethod
    def from_dict(cls, data: dict) -> "TrainState":
        return cls(**data)


@dataclass
class ProposalSource:
    """Where one step's proposals come from: `next(attempt, failed)` -> (new values, demo ids or
    None, trace rows, why there is no proposal when new values are empty)."""

    next: Callable[[int, list[gdpo.FailedProposal]], Awaitable[tuple[dict, dict | None, list[dict], str]]]
    validate: bool
    max_proposals: int


class Trainer:
    def __init__(self, program: Program, client: Any, splits: dict[str, list[Example]], *,
                 on_step: Callable[[TrainState, dict, list[dict]], None] | None = None,
                 on_phase: Callable[[str, dict], None] | None = None) -> None:
        self.program = program
        self.spec = program.spec
        self.cfg = program.spec.train
        self.client = client
        self.splits = splits
        self.on_step = on_step or (lambda state, row, trace_rows: None)
        self.on_phase = on_phase or (lambda phase, info: None)
        self.strategy = STRATEGIES[self.cfg.mode]
        self.trainable = {n for n, p in program.params.items() if p.trainable and p.kind == "prompt"}
        self.backward_model = "backward" if "backward" in self.spec.models else _task_model(program)
        self.optimizer_model = "optimizer" if "optimizer" in self.spec.models else _task_model(program)
        self.backward_engine = BackwardEngine(program, client, self.backward_model, self.trainable)
        self.pools: dict[str, PoolEntry] = {}
        self.by_id = {e.id: e for e in splits["train"]}
        self.demo_params = demos.demo_params(program)
        self.trainable_demos = [n for n, p in program.params.items() if p.trainable and p.kind == "demos"]
        self._teacher: demos.Teacher | None = None

    @property
    def teacher(self) -> demos.Teacher:
        if self._teacher is None:
            self._teacher = demos.Teacher(self.program, self.client, self.cfg.teacher, self.cfg.fail_threshold)
        return self._teacher

    # ---------------------------------------------------------------- schedule

    def batches_per_epoch(self) -> int:
        return max(1, math.ceil(len(self.splits["train"]) / self.cfg.batch_size))

    def total_steps(self) -> int:
        return min(self.cfg.max_steps, self.cfg.epochs * self.batches_per_epoch())

    def planned_steps(self) -> list[tuple[int, str]]:
        """(step, kind) of every step a run makes at most (none when the mode does not train)."""
        if not self.strategy.trains:
            return []
        return [(s, self.step_kind(s)) for s in range(1, self.total_steps() + 1)]

    def batch_for(self, step: int) -> list[Example]:
        """Step s (1-based) takes batch s of a seeded shuffle per epoch: no RNG state to carry."""
        epoch, position = divmod(step - 1, self.batches_per_epoch())
        order = sorted(self.splits["train"], key=lambda e: e.id)
        random.Random(f"{self.cfg.seed}:epoch:{epoch}").shuffle(order)
        size = self.cfg.batch_size
        return order[position * size:(position + 1) * size]

    def epoch_of(self, step: int) -> int:
        return (step - 1) // self.batches_per_epoch()

    def step_kind(self, step: int) -> str:
        """"text" or "demos", by the `train.demos` schedule."""
        return demos.step_kind(self.cfg.demos, step, self.total_steps())

    # ---------------------------------------------------------------- scoring helpers

    async def validate(self, values: dict[str, str], split: str = "val", above: float | None = None) -> EvalReport:
        """Score a split; examples with call errors are retried once more (the cache keeps the rest free)."""
        examples = self.splits[split]
        report = await evaluate(self.program, examples, values, self.client, stop_unless_above=above)
        if report.stopped_early or not report.errors:
            return report
        failed_ids = {r.id for r in report.results if r.error}
        retry = await evaluate(self.program, [e for e in examples if e.id in failed_ids], values, self.client)
        by_id = {r.id: r for r in retry.results}
        report.results = [by_id.get(r.id, r) for r in report.results]
        return report

    async def forward(self, examples: list[Example], values: dict[str, str]) -> list[PoolEntry]:
        report = await evaluate(self.program, examples, values, self.client)
        entries = []
        for example, result in zip(examples, report.results):
            if result.error is None:
                entries.append(PoolEntry(example, result.trace, score_trace(self.program.loss, result.trace)))
        errors = report.errors
        if errors and errors / max(len(examples), 1) > self.cfg.max_error_rate:
            raise ErrorRateExceeded(f"{errors} of {len(examples)} training examples failed with model-call errors "
                                    f"(max_error_rate {self.cfg.max_error_rate}); first: {report.first_error()}")
        return entries

    # ---------------------------------------------------------------- initial / final

    async def initial(self, state: TrainState) -> None:
        self.on_phase("validate", {"what": "initial prompts"})
        report = await self.validate(state.values)
        if report.errors:
            raise ErrorRateExceeded(f"the initial validation has {report.errors} examples with model-call errors "
                                    f"after a retry; first: {report.first_error()}")
        state.initial_val = state.best_val = report.score
        state.best_values = dict(state.values)
        state.history.append({"step": 0, "values": dict(state.values), "val_score": report.score,
                              "demo_ids": dict(state.demo_ids)})

    async def test_scores(self, state: TrainState) -> dict[str, float | None]:
        if "test" not in self.splits:
            return {"initial": None, "best": None}
        self.on_phase("test", {})
        initial = (await self.validate(state.initial_values, "test")).score
        best_values = state.best_values or state.values
        best = initial if best_values == state.initial_values else (await self.validate(best_values, "test")).score
        return {"initial": initial, "best": best}

    # ---------------------------------------------------------------- one step

    async def restore_pools(self, state: TrainState) -> None:
        """After --resume: recompute the moving batch's traces (cache hits: the same traces)."""
        ids = state.failed_pool + state.correct_pool
        if ids:
            for entry in await self.forward([self.by_id[i] for i in ids], state.values):
                self.pools[entry.example.id] = entry

    def _update_pools(self, state: TrainState, entries: list[PoolEntry]) -> None:
        threshold = self.cfg.fail_threshold
        for entry in entries:
            eid = entry.example.id
            self.pools[eid] = entry
            for pool in (state.failed_pool, state.correct_pool):
                if eid in pool:
                    pool.remove(eid)
            (state.failed_pool if entry.score < threshold else state.correct_pool).append(eid)

    def _subset(self, state: TrainState, step: int) -> tuple[list[PoolEntry], list[PoolEntry]]:
        rng = random.Random(f"{self.cfg.seed}:subset:{step}")
        failed = list(state.failed_pool)
        correct = list(state.correct_pool)
        if len(failed) > self.cfg.max_error_samples:
            failed = sorted(rng.sample(failed, self.cfg.max_error_samples))
        if len(correct) > self.cfg.max_correct_samples:
            correct = sorted(rng.sample(correct, self.cfg.max_correct_samples))
        return [self.pools[i] for i in failed], [self.pools[i] for i in correct]

    async def step(self, state: TrainState, step: int) -> tuple[dict, list[dict]]:
        """Run one step; returns its metrics row and trace rows. Mutates state on acceptance."""
        started = time.perf_counter()
        usage_before = self.client.usage.copy()
        batch = self.batch_for(step)
        kind = self.step_kind(step)
        row: dict[str, Any] = {"step": step, "epoch": self.epoch_of(step), "kind": kind,
                               "batch_ids": [e.id for e in batch], "batch_score": None, "subset_score": None,
                               "proposals": [], "val_score": None, "best_val": state.best_val, "skipped": None}
        trace_rows: list[dict] = []
        self.on_phase("forward", {"step": step})
        entries = await self.forward(batch, state.values)
        for entry in entries:
            state.student_scores[entry.example.id] = entry.score
        if entries:
            row["batch_score"] = sum(e.score for e in entries) / len(entries)
        if not any(e.score < self.cfg.fail_threshold for e in entries):
            if self.strategy.moving_batch:
                self._update_pools(state, entries)
            row["skipped"] = "no failed example in the minibatch"
            return self._finish_row(state, row, usage_before, started), trace_rows
        if self.strategy.moving_batch:
            self._update_pools(state, entries)
            failed, correct = self._subset(state, step)
        else:  # the minibatch alone
            failed = [e for e in entries if e.score < self.cfg.fail_threshold]
            correct = [e for e in entries if e.score >= self.cfg.fail_threshold]
        subset = self.strategy.subset(failed, correct)
        row["subset_ids"] = [e.example.id for e in subset]
        row["subset_score"] = subset_score = sum(e.score for e in subset) / len(subset)

        if kind == "demos":
            source = await self._demo_source(state, step, batch, trace_rows)
        else:
            source = await self._text_source(state, step, failed, subset, trace_rows)
        if isinstance(source, str):
            row["skipped"] = source
            return self._finish_row(state, row, usage_before, started), trace_rows

        failed_proposals: list[gdpo.FailedProposal] = []
        optimizer_calls, optimizer_errors = 0, []
        for attempt in range(1, source.max_proposals + 1):
            self.on_phase("propose", {"step": step, "proposal": attempt, "kind": kind})
            new, demo_ids, rows, why_none = await source.next(attempt, failed_proposals)
            trace_rows += rows
            asked = [r for r in rows if r.get("kind") == "proposal"]
            optimizer_calls += len(asked)
            optimizer_errors += [r["reason"] for r in asked if r["reason"].startswith(OPTIMIZER_CALL_FAILED)]
            if new and not source.validate:
                record = await self._take(state, step, new)
            elif new:
                record = await self._judge(state, step, attempt, new, subset, subset_score, demo_ids)
            else:
                record = {"params": {}, "subset_score": None, "val_score": None, "accepted": False,
                          "reason": why_none}
            if demo_ids:
                record["demo_ids"] = demo_ids
            row["proposals"].append(record)
            self.on_phase("proposal", {"step": step, "proposal": attempt, "accepted": record["accepted"],
                                       "why": record["reason"]})
            if record["accepted"]:
                row["val_score"] = record["val_score"]
                break
            if new:
                failed_proposals.append(gdpo.FailedProposal(new, record["subset_score"], record["val_score"],
                                                            record["reason"]))
        self._check_call_errors("optimizer", optimizer_errors, optimizer_calls)
        return self._finish_row(state, row, usage_before, started), trace_rows

    async def _text_source(self, state: TrainState, step: int, failed: list[PoolEntry], subset: list[PoolEntry],
                           trace_rows: list[dict]) -> ProposalSource | str:
        """Backward pass, then GDPO proposals for the params with feedback (or why there are none)."""
        evaluations = {e.example.id: evaluate_loss(self.program, e.trace, e.score, self.cfg.fail_threshold) for e in subset}
        gradients: list[Gradient] = []
        backprop = self.strategy.backprop(failed, subset)
        if backprop:
            self.on_phase("backward", {"step": step, "examples": len(backprop)})
            gradients = await self._backward(backprop, evaluations)
            trace_rows += [{"kind": "gradient", **g.row()} for g in gradients]
        targets = self._params_to_change(gradients, failed)
        if not targets:
            return "no parameter received feedback"

        # A proposal with no value (unparseable, unchanged, ...) leaves the next request identical:
        # a salt then makes it a new call instead of a cache hit of the same unusable reply.
        unusable: dict[str, int] = {}

        async def next_proposal(attempt: int, failed_proposals: list[gdpo.FailedProposal]):
            changing = targets if self.cfg.propose == "joint" else [targets[(attempt - 1) % len(targets)]]
            proposals = await asyncio.gather(*(
                self._propose(self._request(state, p, gradients, subset, evaluations, failed_proposals),
                              salt=f"again-{unusable[p]}" if unusable.get(p) else None)
                for p in changing))
            for p in proposals:
                if p.value is None:
                    unusable[p.param] = unusable.get(p.param, 0) + 1
            rows = [{"kind": "proposal", "step": step, "attempt": attempt, "param": p.param, "value": p.value,
                     "method": p.method, "reason": p.reason, "raw": p.raw} for p in proposals]
            new = {p.param: p.value for p in proposals if p.value is not None}
            return new, None, rows, "no usable proposal: " + "; ".join(p.reason for p in proposals)

        return ProposalSource(next_proposal, self.strategy.validate, self.strategy.proposals_per_step(self.cfg))

    async def _demo_source(self, state: TrainState, step: int, batch: list[Example],
                           trace_rows: list[dict]) -> ProposalSource | str:
        """The teacher bootstraps the minibatch and the failed pool, then demo sets are sampled.
        Demo proposals are always validated (whatever the mode), like the paper's demo optimizer."""
        targets = self.trainable_demos
        pending = list({e.id: e for e in batch + [self.by_id[i] for i in state.failed_pool]
                        if e.id not in state.teacher}.values())
        if pending:
            self.on_phase("bootstrap", {"step": step, "examples": len(pending), "tries": self.teacher.tries})
            runs = await self.teacher.run(pending, state.values, [self.demo_params[p] for p in targets])
            state.teacher.update(runs)
            trace_rows += [{"kind": "teacher", "step": step, "example_id": i, **r} for i, r in sorted(runs.items())]

        async def next_proposal(attempt: int, failed_proposals: list[gdpo.FailedProposal]):
            changing = targets if self.cfg.propose == "joint" else [targets[(attempt - 1) % len(targets)]]
            new: dict[str, str] = {}
            ids: dict[str, dict[str, list[str]]] = {}
            rows: list[dict] = []
            for p in changing:
                tried = {f.values[p] for f in failed_proposals if p in f.values}
                picked = demos.propose(self.demo_params[p], seed=self.cfg.seed, step=step, attempt=attempt,
                                       teacher=state.teacher, student=state.student_scores, examples=self.by_id,
                                       current=state.values[p], tried=tried)
                if picked is not None:
                    new[p], ids[p] = picked
                    rows.append({"kind": "demos", "step": step, "attempt": attempt, "param": p,
                                 "ids": ids[p], "value": new[p]})
            return new, ids, rows, "no demo set left to try (no new bootstrapped or labelled examples)"

        return ProposalSource(next_proposal, True, self.cfg.max_proposals)

    async def _judge(self, state: TrainState, step: int, attempt: int, new: dict[str, str],
                     subset: list[PoolEntry], subset_score: float, demo_ids: dict | None = None) -> dict:
        """Two-stage validation of one proposal (any param kind); on acceptance commits it to `state`."""
        record = {"params": new, "subset_score": None, "val_score": None, "accepted": False, "reason": ""}
        state.proposals["tried"] += 1
        candidate = {**state.values, **new}
        self.on_phase("validate", {"step": step, "proposal": attempt, "stage": "subset"})
        sub = record["subset_score"] = await self._subset_score(subset, candidate)
        # stage 1: strictly better on the backpropagated subset (equal only if it was already perfect)
        if sub is None or not (sub > subset_score or (subset_score == 1.0 and sub == 1.0)):
            record["reason"] = f"subset score {_fmt(sub)} does not beat {_fmt(subset_score)}"
            return record
        state.proposals["passed_subset"] += 1
        self.on_phase("validate", {"step": step, "proposal": attempt, "stage": "validation"})
        # stage 2: strictly better than the best validation score; stops once it cannot win
        report = await self.validate(candidate, above=state.best_val)
        if report.stopped_early:
            record["reason"] = f"validation stopped early: cannot beat best {_fmt(state.best_val)}"
        elif report.errors:
            record["reason"] = f"validation has {report.errors} examples with call errors"
        elif report.score is not None and (state.best_val is None or report.score > state.best_val):
            record.update(val_score=report.score, accepted=True, reason="beats the best validation score")
            state.values = state.best_values = candidate
            state.best_val, state.best_step = report.score, step
            state.demo_ids.update(demo_ids or {})
            state.history.append({"step": step, "values": dict(candidate), "val_score": report.score,
                                  "demo_ids": dict(state.demo_ids)})
            state.proposals["accepted"] += 1
            # the moving batch restarts from the new values
            state.failed_pool, state.correct_pool = [], []
            self.pools.clear()
        else:
            record["val_score"] = report.score
            record["reason"] = f"validation {_fmt(report.score)} does not beat best {_fmt(state.best_val)}"
        return record

    async def _take(self, state: TrainState, step: int, new: dict[str, str]) -> dict:
        """TextGrad's rule: every proposal is taken; validation only records how it did."""
        state.proposals["tried"] += 1
        state.values = {**state.values, **new}
        self.on_phase("validate", {"step": step, "stage": "validation (for the record)"})
        report = await self.validate(state.values)
        record = {"params": new, "subset_score": None, "val_score": report.score, "accepted": True,
                  "reason": "taken without validation (textgrad)"}
        state.proposals["accepted"] += 1
        if report.score is not None and not report.errors and (state.best_val is None or report.score > state.best_val):
            state.best_val, state.best_step, state.best_values = report.score, step, dict(state.values)
            state.history.append({"step": step, "values": dict(state.values), "val_score": report.score,
                                  "demo_ids": dict(state.demo_ids)})
        return record

    def _finish_row(self, state: TrainState, row: dict, usage_before, started: float) -> dict:
        improved = state.best_step == row["step"]
        state.steps_since_improvement = 0 if improved else state.steps_since_improvement + 1
        row["best_val"] = state.best_val
        row["usage"] = _usage_delta(self.client.usage.to_dict(), usage_before.to_dict())
        row["wall_seconds"] = round(time.perf_counter() - started, 3)
        return row

    async def _backward(self, failed: list[PoolEntry], evaluations: dict[str, Evaluation]) -> list[Gradient]:
        async def one(entry: PoolEntry) -> list[Gradient]:
            ev = evaluations[entry.example.id]
            if backward_calls_per_example(self.program.loss):
                ev = await llm_evaluation(self.client, self.backward_model, self.program, entry.trace, ev,
                                          entry.example.fields)
            return await self.backward_engine.backward(entry.trace, ev)

        results = await asyncio.gather(*(one(e) for e in failed))
        self._check_call_errors("backward", [m for r in results for m in r.call_errors], sum(r.calls for r in results))
        return canonical([g for r in results for g in r.gradients])

    def _check_call_errors(self, role: str, errors: list[str], calls: int) -> None:
        """Stop the run (status failed) when too many of a step's backward or optimizer calls failed
        after their retries: a step without its gradients or proposals is not a step."""
        if errors and len(errors) / max(calls, 1) > self.cfg.max_error_rate:
            raise ErrorRateExceeded(f"{len(errors)} of {calls} {role} calls failed after retries "
                                    f"(max_error_rate {self.cfg.max_error_rate}); first: {errors[0]}")

    def _params_to_change(self, gradients: list[Gradient], failed: list[PoolEntry]) -> list[str]:
        order = list(self.program.params)
        if not self.strategy.gradients:
            used = {p for e in failed for c in e.trace.calls for p in c.params if p in self.trainable}
            return [p for p in order if p in used]
        with_feedback = {g.target.removeprefix("param:") for g in gradients if g.target.startswith("param:")}
        return [p for p in order if p in with_feedback]

    def _request(self, state: TrainState, param: str, gradients: list[Gradient], subset: list[PoolEntry],
                 evaluations: dict[str, Evaluation], failed: list[gdpo.FailedProposal]) -> gdpo.ProposalRequest:
        specs = self.program.params
        view = lambda n: gdpo.ParamView(n, state.values[n], specs[n].role or _default_role(specs[n]))  # noqa: E731
        peers = sorted({p for node in self.program.all_nodes() if param in node.params for p in node.params
                        if demos.in_prompt(specs[p], state.values[p])} - {param})
        others = [p for p in specs if p in self.trainable and p != param and p not in peers]
        feedback = [gdpo.FeedbackItem(g.example_id, g.score, g.node, g.call_index, g.topo_index, g.feedback)
                    for g in gradients if g.target == f"param:{param}"]
        samples = sorted((gdpo.SampleView(e.example.id, {f: e.example.fields.get(f) for f in sorted(self.program.input_fields)},
                                          e.trace.output, evaluations[e.example.id].target, e.score) for e in subset),
                         key=lambda s: (s.score, s.example_id))
        history = sorted(state.history, key=lambda h: (-(h["val_score"] or 0), h["step"]))[: self.cfg.history_k]
        return gdpo.ProposalRequest(
            param=view(param), peers=[view(p) for p in peers], others=[view(p) for p in others],
            history=[gdpo.HistoryEntry(h["step"], h["values"], h["val_score"]) for h in history],
            failed=list(failed), feedback=feedback, samples=samples, constraints=list(self.spec.constraints),
            steps_since_improvement=state.steps_since_improvement,
            mode="autodiff" if self.strategy.gradients else "no_gradient", current=dict(state.values))

    async def _propose(self, request: gdpo.ProposalRequest, salt: str | None = None) -> gdpo.Proposal:
        try:
            return await gdpo.propose(self.client, self.optimizer_model, request, salt=salt)
        except ModelCallError as e:  # counted in usage; this attempt just has no proposal
            return gdpo.Proposal(request.param.name, None, f"{OPTIMIZER_CALL_FAILED}: {e.message}", None, "")

    async def _subset_score(self, subset: list[PoolEntry], values: dict[str, str]) -> float | None:
        report = await evaluate(self.program, [e.example for e in subset], values, self.client)
        scores = [score_trace(self.program.loss, r.trace) for r in report.results if r.error is None]
        if len(scores) < len(subset):
            return None  # call errors: never accepted on partial evidence
        return sum(scores) / len(scores)

    # ---------------------------------------------------------------- the run

    async def run(self, state: TrainState) -> TrainState:
        if state.step == 0 and state.initial_val is None:
            await self.initial(state)
            self.on_step(state, {}, [])
        else:
            await self.restore_pools(state)
        if not self.strategy.trains:
            state.stop_reason = "mode none: initial prompts only"
            return state
        for step in range(state.step + 1, self.total_steps() + 1):
            row, trace_rows = await self.step(state, step)
            state.step = step
            self.on_step(state, row, trace_rows)
            if self.cfg.patience and state.steps_since_improvement >= self.cfg.patience:
                state.stop_reason = f"no improvement in {self.cfg.patience} steps (patience)"
                break
        return state


def _default_role(spec) -> str | None:
    return demos.ROLE if spec.kind == "demos" else None


def _task_model(program: Program) -> str:
    models = [n.model for n in program.all_nodes() if n.kind == "llm"]
    return models[0] if models else next(iter(program.spec.models))


def _fmt(value: float | None) -> str:
    return "-" if value is None else f"{value:.3f}"


def _usage_delta(now: dict, before: dict) -> dict:
    return {role: {k: (round(v - before[role][k], 8) if isinstance(v, float) else v - before[role][k])
                   for k, v in stats.items()} for role, stats in now.items()}


class BudgetGate:
    """Stops the run before a call that would exceed the budget (calls, tokens, cost)."""

    def __init__(self, budget, usage) -> None:
        self.budget = budget
        self.usage = usage
        self.started = usage.total_calls()  # calls in flight count too, so the limit is never passed

    def refund(self, role: str) -> None:
        """An admitted attempt never reached the provider (ModelClient): it spent nothing."""
        self.started -= 1

    def __call__(self, role: str) -> None:
        b = self.budget
        if b.max_calls is not None and self.started >= b.max_calls:
            raise BudgetExhausted(f"budget: max_calls {b.max_calls} reached")
        self.started += 1
        if b.max_tokens is not None and self.usage.total_tokens() >= b.max_tokens:
            raise BudgetExhausted(f"budget: {self.usage.total_tokens()} tokens reached max_tokens {b.max_tokens}")
        if b.max_cost_usd is not None and self.usage.total_cost() >= b.max_cost_usd:
            raise BudgetExhausted(f"budget: ${self.usage.total_cost():.4f} reached max_cost_usd {b.max_cost_usd}")
