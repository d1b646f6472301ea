"""Score a program on a list of examples, concurrently.

Examples whose model calls failed after retries, or whose user code (a function node, the metric, the
loss) raised, are counted as errors and left out of the score; they are never scored as wrong answers.
"""
from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from autodiff_cli.data.loaders import Example
from autodiff_cli.engine.forward import (
    ExampleError,
    ForwardEngine,
    metric_inputs,
    score,
)
from autodiff_cli.engine.program import Program
from autodiff_cli.engine.trace import Trace
from autodiff_cli.llm.priority import call_priority


@dataclass
class ExampleResult:
    id: str
    prediction: Any
    target: Any
    score: float | None
    error: str | None  # a failed model call, or user code that raised: the example is not scored
    trace: Trace
    loss: float | None = None  # the training score (program.loss), when `evaluate(losses=True)`

    def row(self) -> dict[str, Any]:
        return {"id": self.id, "prediction": self.prediction, "target": self.target,
                "score": self.score, "error": self.error}


@dataclass
class EvalReport:
    n: int
    results: list[ExampleResult] = field(default_factory=list)
    wall_seconds: float = 0.0
    stopped_early: bool = False  # it could no longer beat `stop_unless_above`; outstanding calls were cancelled

    @property
    def completed(self) -> int:
        return sum(1 for r in self.results if r.error is None)

    @property
    def errors(self) -> int:
        return self.n - self.completed

    @property
    def score(self) -> float | None:
        scores = [r.score for r in self.results if r.score is not None]
        return sum(scores) / len(scores) if scores else None

    @property
    def error_rate(self) -> float:
        return self.errors / self.n if self.n else 0.0

    def first_error(self) -> str | None:
        return next((r.error for r in self.results if r.error), None)


ProgressFn = Callable[[int, int, int, float | None], None]  # done, total, errors, running score


async def evaluate(program: Program, examples: list[Example], values: dict[str, str], client: Any,
                   *, progress: ProgressFn | None = None, max_in_flight: int | None = None,
                   stop_unless_above: float | None = None, losses: bool = False) -> EvalReport:
    """Run every example; results come back in the order of `examples`.

    With `stop_unless_above`, evaluation stops (cancelling outstanding calls) as soon as the
    score can no longer end strictly above that value, counting unfinished examples as 1.
    With `losses`, each scored example also gets its loss (`ExampleResult.loss`); a loss that
    raises makes the example an error, as a metric that raises does.
    """
    engine = ForwardEngine(program, client)
    # the client's --concurrency replaces every config's own limit, so it sizes the gate too
    override = getattr(client, "concurrency", None)
    limit = max_in_flight or max(16, 2 * sum(override or m.capacity() for m in program.spec.models.values()))
    gate = asyncio.Semaphore(limit)  # bounds memory for large sets; the model limits pace the calls
    report = EvalReport(n=len(examples))
    start = time.perf_counter()
    done = errors = 0
    total_score = 0.0

    async def one(position: int, example: Example) -> ExampleResult:
        nonlocal done, errors, total_score
        call_priority.set(position)  # earlier examples' calls go first: they finish (and score) in order
        async with gate:
            trace = await engine.run(example.id, example.fields, values)
        result = _result(program, example, trace)
        if losses:
            _add_loss(program, result)
        done += 1
        errors += result.error is not None
        total_score += result.score or 0.0
        if progress:
            scored = done - errors
            progress(done, len(examples), errors, total_score / scored if scored else None)
        return result

    tasks = [asyncio.ensure_future(one(i, e)) for i, e in enumerate(examples)]
    if stop_unless_above is not None:
        hopeless = asyncio.Event()

        def check(_task: asyncio.Future) -> None:
            # errors may still be retried, so they count as possible successes
            if (total_score + (len(examples) - done + errors)) / max(len(examples), 1) <= stop_unless_above:
                hopeless.set()

        for t in tasks:
            t.add_done_callback(check)
    waiter = stopper = None
    try:
        if stop_unless_above is None:
            report.results = list(await asyncio.gather(*tasks))
        else:
            waiter = asyncio.ensure_future(asyncio.gather(*tasks))
            stopper = asyncio.ensure_future(hopeless.wait())
            await asyncio.wait({waiter, stopper}, return_when=asyncio.FIRST_COMPLETED)
            stopper.cancel()
            if waiter.done():
                report.results = waiter.result()
            else:
                report.stopped_early = True
                for t in tasks:
                    t.cancel()
                await asyncio.gather(*tasks, return_exceptions=True)
                waiter.cancel()
                await asyncio.gather(waiter, return_exceptions=True)
                report.results = [t.result() for t in tasks if t.done() and not t.cancelled() and t.exception() is None]
    except BaseException:
        # interrupted: cancel the examples and collect every future, so none is left holding an
        # exception nobody reads (asyncio would print its traceback at exit)
        helpers = [f for f in (waiter, stopper) if f is not None]
        for f in [*tasks, *helpers]:
            f.cancel()
        await asyncio.gather(*tasks, *helpers, return_exceptions=True)
        raise
    report.wall_seconds = time.perf_counter() - start
    return report


def _result(program: Program, example: Example, trace: Trace) -> ExampleResult:
    if trace.error is None:
        try:
            value = score(program.metric, trace)
        except ExampleError as e:  # the metric raised: an error of this example (its prediction is kept)
            trace.error = e.message
            return ExampleResult(example.id, trace.output, _target(program, trace, example), None, e.message, trace)
        return ExampleResult(example.id, trace.output, _target(program, trace, example), value, None, trace)
    return ExampleResult(example.id, None, _target(program, trace, example), None, trace.error, trace)


def _add_loss(program: Program, result: ExampleResult) -> None:
    """The example's loss (the metric's score when the spec has no `loss`); a loss that raises makes the
    example an error, unscored."""
    if result.error is not None:
        return
    if program.loss is program.metric:
        result.loss = result.score
        return
    try:
        result.loss = score(program.loss, result.trace)
    except ExampleError as e:
        result.trace.error = result.error = e.message
        result.score = None


def _target(program: Program, trace: Trace, example: Example) -> Any:
    """The value the metric compares against (its `target` argument), for the --out rows."""
    ref = program.metric.args.get("target")
    if ref is None:
        return None
    if ref.root == "input":
        value: Any = example.fields
        for part in ref.path:
            value = value.get(part) if isinstance(value, dict) else None
        return value
    if hasattr(trace, "slots"):
        return metric_inputs(program.metric, trace)["target"].value
    return None
