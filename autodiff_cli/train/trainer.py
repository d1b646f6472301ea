"""`autodiff train`: the one step loop, for every mode and every optimizer.

One step:
  1. forward the minibatch with the current values; training scores from the loss
  2. the mode's batching picks the subset (the paper's moving batch, or the minibatch alone); a
     step whose minibatch has no failure is skipped
  3. the loss writes a textual evaluation per subset example; for an optimizer that uses
     gradients, the backward engine backpropagates the examples the mode's feedback names
  4. the step's optimizer (train.optimizer, or the demos optimizer on the steps `train.demos`
     gives to demos) proposes candidates, and its acceptance rule judges each one; the first one
     accepted ends the step
The loop knows no mode and no optimizer by name: it asks the policies (optim/policies.py) and the
optimizer contract (optim/base.py). After each step the run directory gets metrics, traces,
prompts, checkpoint and summary (app/train_run.py), so `--resume` continues exactly.
"""
from __future__ import annotations

import asyncio
import logging
import math
import random
import time
from collections.abc import Callable
from typing import Any

from autodiff_cli.data.loaders import Example
from autodiff_cli.engine.evaluate import EvalReport, evaluate
from autodiff_cli.engine.program import Program
from autodiff_cli.errors import BudgetExhausted, ErrorRateExceeded
from autodiff_cli.grad.backward import BackwardEngine, Gradient, canonical
from autodiff_cli.grad.loss import (
    Evaluation,
    backward_calls_per_example,
    evaluate_loss,
    llm_evaluation,
)
from autodiff_cli.io.records import ProposalRecord, StepRecord
from autodiff_cli.optim.base import NoCandidate, Optimizer, OptimizerEnv, StepContext
from autodiff_cli.optim.demos import step_kind as demos_step_kind
from autodiff_cli.optim.policies import MODES, Mode
from autodiff_cli.optim.registry import DEMOS, optimizer_class, text_optimizers
from autodiff_cli.train.state import PoolEntry, TrainState

log = logging.getLogger("autodiff.train")


def check_train_settings(program: Program) -> None:
    """Spec errors of the `train` block that only the training layer can see (e.g. an unknown
    optimizer): raised by `validate` too, with file, line and key."""
    cfg = program.spec.train
    text = text_optimizers()
    if cfg.optimizer not in text:
        raise program.loaded.error(("train", "optimizer"), expected=f"one of {', '.join(text)}",
                                   got=repr(cfg.optimizer))
    optimizer_class(cfg.optimizer).parse_options(cfg.optimizer_options, program.loaded)


class Trainer:
    def __init__(self, program: Program, client: Any, splits: dict[str, list[Example]], *,
                 on_step: Callable[[TrainState, StepRecord | None, list[dict]], None] | None = None,
                 on_phase: Callable[[str, dict], None] | None = None) -> None:
        check_train_settings(program)
        self.program = program
        self.spec = program.spec
        self.cfg = program.spec.train
        self.client = client
        self.splits = splits
        self.on_step = on_step or (lambda state, record, trace_rows: None)
        self.on_phase = on_phase or (lambda phase, info: None)
        self.mode: Mode = MODES[self.cfg.mode].configured(self.cfg)
        self.batching = self.mode.batching  # the current step's optimizer's (commit asks it)
        self.backward_model = "backward" if "backward" in self.spec.models else _task_model(program)
        self.optimizer_model = "optimizer" if "optimizer" in self.spec.models else _task_model(program)
        trainable_prompts = {n for n, p in program.params.items() if p.trainable and p.kind == "prompt"}
        self.backward_engine = BackwardEngine(program, client, self.backward_model, trainable_prompts)
        self.pools: dict[str, PoolEntry] = {}
        self.example_errors: list[dict] = []  # the current step's training examples with errors (trace rows)
        self.by_id = {e.id: e for e in splits["train"]}
        env = OptimizerEnv(program, client, self.cfg, self.optimizer_model, self.by_id, self.total_steps(),
                           on_phase=lambda phase, info: self.on_phase(phase, info))
        text = optimizer_class(self.cfg.optimizer)
        self.optimizers: dict[str, Optimizer] = {
            "text": text(env, text.parse_options(self.cfg.optimizer_options, program.loaded)),
            "demos": optimizer_class(DEMOS)(env)}

    # ---------------------------------------------------------------- schedule

    def batches_per_epoch(self) -> int:
        return max(1, math.ceil(len(self.splits["train"]) / self.cfg.batch_size))

    def total_steps(self) -> int:
        return min(self.cfg.max_steps, self.cfg.epochs * self.batches_per_epoch())

    def step_kind(self, step: int) -> str:
        """"text" or "demos", by the `train.demos` schedule."""
        return demos_step_kind(self.cfg.demos, step, self.total_steps())

    def optimizer_for(self, step: int) -> Optimizer:
        return self.optimizers[self.step_kind(step)]

    def planned_steps(self) -> list[tuple[int, str]]:
        """(step, kind) of every step a run makes at most (none when the mode does not train)."""
        if not self.mode.trains:
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

    # ---------------------------------------------------------------- scoring (the policies call these)

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

    async def evaluate_on(self, examples: list[Example], values: dict[str, str]) -> EvalReport:
        return await evaluate(self.program, examples, values, self.client)

    async def subset_score(self, subset: list[PoolEntry], values: dict[str, str]) -> float | None:
        report = await evaluate(self.program, [e.example for e in subset], values, self.client, losses=True)
        scores = [r.loss for r in report.results if r.error is None]
        if len(scores) < len(subset):
            return None  # call errors or user code that raised: never accepted on partial evidence
        return sum(scores) / len(scores)

    async def forward(self, examples: list[Example], values: dict[str, str]) -> list[PoolEntry]:
        """The examples scored by the loss. An example with an error (a failed model call, user code that
        raised) is left out: not scored, not backpropagated, and listed in `self.example_errors`; too
        many stop the run (max_error_rate)."""
        report = await evaluate(self.program, examples, values, self.client, losses=True)
        entries = []
        for example, result in zip(examples, report.results):
            if result.error is None:
                entries.append(PoolEntry(example, result.trace, result.loss))
            else:
                self.example_errors.append({"kind": "error", "example_id": example.id, "error": result.error})
        errors = report.errors
        if errors and errors / max(len(examples), 1) > self.cfg.max_error_rate:
            raise ErrorRateExceeded(f"{errors} of {len(examples)} training examples failed with model-call errors "
                                    f"or errors of user code (max_error_rate {self.cfg.max_error_rate}); "
                                    f"first: {report.first_error()}")
        return entries

    def commit(self, state: TrainState, step: int, values: dict[str, str], val_score: float | None,
               demo_ids: dict | None, *, best: bool) -> None:
        """An accepted candidate becomes the current values (and the best ones when `best`)."""
        state.values = values
        state.proposals["accepted"] += 1
        state.demo_ids.update(demo_ids or {})
        if best:
            state.best_values, state.best_val, state.best_step = dict(values), val_score, step
            state.history.append({"step": step, "values": dict(values), "val_score": val_score,
                                  "demo_ids": dict(state.demo_ids)})
        self.batching.after_accept(state, self.pools)

    # ---------------------------------------------------------------- initial / final

    async def initial(self, state: TrainState) -> None:
        self.on_phase("validate", {"what": "initial prompts"})
        report = await self.validate(state.values)
        if report.errors:
            raise ErrorRateExceeded(f"the initial validation has {report.errors} examples with model-call errors "
                                    f"or errors of user code after a retry; first: {report.first_error()}")
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

    # ---------------------------------------------------------------- checkpoint

    def save_optimizers(self, state: TrainState) -> None:
        state.optimizers = {kind: opt.state_dict() for kind, opt in self.optimizers.items()}

    async def restore(self, state: TrainState) -> None:
        """After --resume: the optimizers' states, and the moving batch's traces (cache hits: the same traces)."""
        for kind, opt in self.optimizers.items():
            opt.load_state_dict(state.optimizers.get(kind, {}))
        ids = sorted({i for opt in self.optimizers.values() for i in opt.batching(self.mode).pooled_ids(state)})
        if ids:
            for entry in await self.forward([self.by_id[i] for i in ids], state.values):
                self.pools[entry.example.id] = entry

    # ---------------------------------------------------------------- one step

    async def step(self, state: TrainState, step: int) -> tuple[StepRecord, list[dict]]:
        """Run one step; returns its record and trace rows. Mutates state on acceptance."""
        started = time.perf_counter()
        usage_before = self.client.usage.copy()
        optimizer = self.optimizer_for(step)
        base = dict(optimizer.base_values(state))
        batching = self.batching = optimizer.batching(self.mode)
        batch = self.batch_for(step)
        record = StepRecord(step=step, epoch=self.epoch_of(step), kind=optimizer.step_kind,
                            batch_ids=[e.id for e in batch], best_val=state.best_val)
        self.on_phase("forward", {"step": step})
        self.example_errors = []
        entries = await self.forward(batch, base)
        error_rows = self.example_errors  # the step's trace file says which examples failed, and why
        for opt in self.optimizers.values():
            opt.observe(entries)
        if entries:
            record.batch_score = sum(e.score for e in entries) / len(entries)
        if not any(e.score < self.cfg.fail_threshold for e in entries):
            batching.note_skipped(state, self.pools, entries, self.cfg)
            record.skipped = "no failed example in the minibatch"
            return self._finish(state, record, usage_before, started), error_rows
        failed, correct = batching.select(state, self.pools, entries, step, self.cfg)
        subset = failed + correct
        record.subset_ids = [e.example.id for e in subset]
        record.subset_score = sum(e.score for e in subset) / len(subset)
        ctx = StepContext(step, state, base, batch, failed, correct, record.subset_score)
        ctx.trace_rows += error_rows
        ctx.evaluations = {e.example.id: evaluate_loss(self.program, e.trace, e.score, self.cfg.fail_threshold)
                           for e in subset}
        backprop = self.mode.feedback.backprop(failed, subset) if optimizer.uses_gradients else []
        ctx.with_gradients = optimizer.uses_gradients and self.mode.feedback.gives_gradients
        if backprop:
            self.on_phase("backward", {"step": step, "examples": len(backprop)})
            ctx.gradients = await self._backward(backprop, ctx.evaluations)
            ctx.trace_rows += [{"kind": "gradient", **g.row()} for g in ctx.gradients]

        why_not = await optimizer.begin_step(ctx)
        if why_not:
            record.skipped = why_not
            return self._finish(state, record, usage_before, started), ctx.trace_rows
        acceptance = optimizer.acceptance(self.mode)
        last = optimizer.max_proposals(self.mode)
        pending: list[tuple] = []  # candidates screened in, awaiting the acceptance's decision
        for attempt in range(1, last + 1):
            ctx.attempt = attempt
            self.on_phase("propose", {"step": step, "proposal": attempt, "kind": optimizer.step_kind})
            proposal = await optimizer.propose(ctx)
            if isinstance(proposal, NoCandidate):
                judged = ProposalRecord.nothing(proposal.reason)
                if proposal.values:  # refused by the optimizer itself: recorded, counted, shown to its next proposals
                    judged.params, judged.extra = dict(proposal.values), {"refused": True}
                    state.proposals["refused"] = state.proposals.get("refused", 0) + 1
            else:
                judged, waits = await acceptance.screen(self, ctx, proposal)
                if waits:
                    judged.reason = "passed the subset; to be validated with the step's other contenders"
                    pending.append((proposal, judged))
                else:
                    optimizer.after_judge(ctx, proposal, judged)
            record.proposals.append(judged)
            if judged.proposed:
                ctx.rejected.append(judged)  # what the optimizer's next proposals are shown as tried
            if pending and (acceptance.eager or attempt == last):
                await acceptance.decide(self, ctx, pending)
                for candidate, decided in pending:
                    optimizer.after_judge(ctx, candidate, decided)
                pending = []
            self.on_phase("proposal", {"step": step, "proposal": attempt, "accepted": judged.accepted,
                                       "why": judged.reason})
            if record.accepted is not None:
                record.val_score = record.accepted.val_score
                break
        errors, calls = optimizer.step_call_errors()
        self._check_call_errors("optimizer", errors, calls)
        return self._finish(state, record, usage_before, started), ctx.trace_rows

    def _finish(self, state: TrainState, record: StepRecord, usage_before, started: float) -> StepRecord:
        improved = state.best_step == record.step
        state.steps_since_improvement = 0 if improved else state.steps_since_improvement + 1
        record.best_val = state.best_val
        record.usage = _usage_delta(self.client.usage.to_dict(), usage_before.to_dict())
        record.wall_seconds = round(time.perf_counter() - started, 3)
        return record

    async def _backward(self, examples: list[PoolEntry], evaluations: dict[str, Evaluation]) -> list[Gradient]:
        async def one(entry: PoolEntry) -> list[Gradient]:
            ev = evaluations[entry.example.id]
            if backward_calls_per_example(self.program.loss):
                ev = await llm_evaluation(self.client, self.backward_model, self.program, entry.trace, ev,
                                          entry.example.fields)
            return await self.backward_engine.backward(entry.trace, ev)

        results = await asyncio.gather(*(one(e) for e in examples))
        self._check_call_errors("backward", [m for r in results for m in r.call_errors], sum(r.calls for r in results))
        return canonical([g for r in results for g in r.gradients])

    def _check_call_errors(self, role: str, errors: list[str], calls: int) -> None:
        """Stop the run (status failed) when too many of a step's backward or optimizer calls failed
        after their retries: a step without its gradients or proposals is not a step."""
        if errors and len(errors) / max(calls, 1) > self.cfg.max_error_rate:
            raise ErrorRateExceeded(f"{len(errors)} of {calls} {role} calls failed after retries "
                                    f"(max_error_rate {self.cfg.max_error_rate}); first: {errors[0]}")

    # ---------------------------------------------------------------- the run

    async def run(self, state: TrainState) -> TrainState:
        if state.step == 0 and state.initial_val is None:
            await self.initial(state)
            self.save_optimizers(state)
            self.on_step(state, None, [])
        else:
            await self.restore(state)
        if not self.mode.trains:
            state.stop_reason = "mode none: initial prompts only"
            return state
        for step in range(state.step + 1, self.total_steps() + 1):
            record, trace_rows = await self.step(state, step)
            state.step = step
            self.save_optimizers(state)
            self.on_step(state, record, trace_rows)
            if self.cfg.patience and state.steps_since_improvement >= self.cfg.patience:
                state.stop_reason = f"no improvement in {self.cfg.patience} steps (patience)"
                break
        return state


def _task_model(program: Program) -> str:
    models = [m for n in program.all_nodes() for m in n.models()]
    return models[0] if models else next(iter(program.spec.models))


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
