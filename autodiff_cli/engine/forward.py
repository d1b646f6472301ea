"""The forward engine: run one example through a Program and record its Trace.

The engine schedules; the node kinds (autodiff_cli/nodes/) run. Nodes of one topological
generation run concurrently and their calls join the trace in topological order, whatever
finishes first. Before a node runs, the engine applies what every kind shares: a node whose
`when` is false, or every node it reads was skipped, is skipped (a skipped Call, a None
output, no model call); otherwise its kind's `forward` runs with a RunContext, and the values
the condition read join its call's inputs. A kind with a nested scope (a loop's body) asks the
context to run it.
"""
from __future__ import annotations

import asyncio
import logging
import numbers
from typing import Any

from autodiff_cli.engine.program import Metric, Program, Scope
from autodiff_cli.engine.trace import Call, InputValue, Slot, Trace, resolve
from autodiff_cli.errors import (
    AutodiffError,
    ModelCallError,
    describe,
    describe_exception,
)

__all__ = ["ExampleError", "ExampleRun", "ForwardEngine", "MetricValueError", "PipelineError", "RunContext", "Slot",
           "UserCodeError", "metric_inputs", "resolve", "score", "state_slot"]

log = logging.getLogger("autodiff.engine")


class ExampleError(AutodiffError):
    """One example cannot go on (a `when` condition that fails on its values): the example is counted in
    `errors` like a failed model call, and the run goes on."""


class PipelineError(AutodiffError):
    """A template failed on an example (a sandbox refusal, a value it cannot render): a bug in the
    pipeline, which stops the run."""


class UserCodeError(PipelineError, ExampleError):
    """User code (a function node's function, the metric, the loss) raised on one example: an error of
    that example (its message names the node or `metric`/`loss`, the `module:function`, the exception and
    the example), counted in `errors` like a failed model call, never a crash of the run."""


class MetricValueError(AutodiffError):
    """The metric or loss returned something that is not a score in [0, 1]: a bug in the metric, located
    at its `fn`, which stops the run."""


def _example_slot(fields: dict[str, Any]) -> Slot:
    return Slot(fields, [], {k: Slot(v, []) for k, v in fields.items()})


def state_slot(state: dict[str, Slot]) -> Slot:
    """A loop state as one Slot that keeps each field's provenance."""
    sources = sorted({s for slot in state.values() for s in slot.sources})
    return Slot({k: s.value for k, s in state.items()}, sources, dict(state))


class ExampleRun:
    """The mutable state of one example's forward pass."""

    def __init__(self, example_id: str) -> None:
        self.trace = Trace(example_id)
        self.counters: dict[str, int] = {}

    def next_index(self, node: str) -> int:
        i = self.counters.get(node, 0)
        self.counters[node] = i + 1
        return i


class RunContext:
    """What a node kind's `forward` sees: the values so far (`env`: names -> Slots), the loop iteration
    it runs in, and the engine's services (new calls, model calls, nested scopes)."""

    def __init__(self, engine: ForwardEngine, run: ExampleRun, node: Any, env: dict[str, Slot],
                 iteration: int | None) -> None:
        self.engine, self.run, self.node, self.env, self.iteration = engine, run, node, env, iteration

    @property
    def example_id(self) -> str:
        return self.run.trace.example_id

    def is_param(self, name: str) -> bool:
        return name in self.engine.program.params

    def new_call(self) -> Call:
        """The node's next call (`<node>#<call index>`), not yet in the trace."""
        return self.engine.new_call(self.node, self.run, self.iteration)

    async def complete(self, call: Call, model: str, messages: list[dict], json_schema: dict | None = None) -> str:
        """One model call for `call` (the engine's model swap, usage role and cache salt applied); fills the
        call's model, tokens, latency and cache hit. A call that fails after retries joins the trace with
        its error, and the ModelCallError ends the example."""
        engine = self.engine
        call.model = engine.models.get(model, model)
        extra = {} if engine.salt is None else {"salt": engine.salt}
        try:
            reply = await engine.client.complete(call.model, messages, role=engine.role, json_schema=json_schema,
                                                 **extra)
        except ModelCallError as e:
            call.error = e.message
            self.run.trace.calls.append(call)
            raise
        call.prompt_tokens, call.completion_tokens = reply.prompt_tokens, reply.completion_tokens
        call.latency_s, call.cache_hit = reply.latency_s, reply.cache_hit
        return reply.text

    async def run_scope(self, scope: Scope, env: dict[str, Slot], iteration: int | None) -> None:
        """Runs a nested scope (a loop body, one iteration) in `env`; its calls join the trace."""
        await self.engine.run_scope(scope, env, self.run, iteration)

    def fail(self, call: Call, message: str) -> UserCodeError:
        """The error that ends the example when the node's own code failed: `call` joins the trace with
        `message` as its error (as a failed model call does); raise what this returns."""
        call.error = message
        self.run.trace.calls.append(call)
        return UserCodeError(message)


class ForwardEngine:
    def __init__(self, program: Program, client: Any, *, models: dict[str, str] | None = None,
                 role: str = "task", salt: str | int | None = None) -> None:
        """`models` maps a node's model config to the one used instead (e.g. a teacher); `role` is the
        usage role of the llm calls; `salt` joins their cache keys (e.g. a teacher's try number)."""
        self.program = program
        self.client = client  # autodiff_cli.llm.client.ModelClient (or anything with `complete`)
        self.models = dict(models or {})
        self.role = role
        self.salt = salt

    async def run(self, example_id: str, fields: dict[str, Any], values: dict[str, str]) -> Trace:
        """Run one example with the given parameter values; model errors, failed conditions and user code
        that raised (UserCodeError) end up in trace.error."""
        run = ExampleRun(example_id)
        env: dict[str, Slot] = {"input": _example_slot(fields)}
        env.update({name: Slot(values[name], []) for name in self.program.params})
        try:
            await self.run_scope(self.program.scope, env, run, iteration=None)
        except (ModelCallError, ExampleError) as e:
            run.trace.error = e.message
            return run.trace
        out = resolve(env, self.program.output)
        run.trace.output, run.trace.output_sources = out.value, out.sources
        run.trace.slots = env  # type: ignore[attr-defined]  # kept for scoring, not serialised
        return run.trace

    def new_call(self, node: Any, run: ExampleRun, iteration: int | None) -> Call:
        index = run.next_index(node.name)
        return Call(id=f"{node.name}#{index}", node=node.name, kind=node.kind, call_index=index,
                    topo_index=node.topo_index, iteration=iteration)

    async def run_scope(self, scope: Scope, env: dict[str, Slot], run: ExampleRun, iteration: int | None) -> None:
        for generation in scope.generations:
            nodes = [scope.nodes[n] for n in generation]
            if len(nodes) == 1:
                results = [await self._run_node(nodes[0], env, run, iteration)]
            else:
                results = await asyncio.gather(*(self._run_node(n, env, run, iteration) for n in nodes))
            # calls are appended in topological order, whatever finished first
            for node, (slot, calls) in zip(nodes, results):
                env[node.name] = slot
                run.trace.calls.extend(calls)

    async def _run_node(self, node: Any, env: dict[str, Slot], run: ExampleRun, iteration: int | None) -> tuple[Slot, list[Call]]:
        if node.upstream and all(env[name].skipped for name in node.upstream):
            # nothing it reads was computed: the branch it belongs to was not taken
            return self._skipped(node, run, iteration, {str(r): resolve(env, r) for r in node.dependencies()
                                                        if r.root in node.upstream})
        condition: dict[str, Slot] = {}
        if node.when is not None:
            condition = {f"when: {r}": resolve(env, r) for r in node.when_reads}
            if not self._holds(node, env, run, iteration, condition):
                return self._skipped(node, run, iteration, condition, when=node.when.source)
        slot, calls = await node.forward(RunContext(self, run, node, env, iteration))
        if node.when is not None:
            traced = {f"when: {r}" for r in node.condition_inputs()}
            for call in calls:
                if call.node == node.name:
                    call.when = node.when.source
                    call.inputs.update({k: InputValue(s.value, s.sources, condition=True)
                                        for k, s in condition.items() if k in traced})
        return slot, calls

    def _holds(self, node: Any, env: dict[str, Slot], run: ExampleRun, iteration: int | None,
               condition: dict[str, Slot]) -> bool:
        """Evaluates the node's `when`. A value that lacks the field the condition reads (a reply that is not
        the JSON it expects) makes it false, as such a value lets a loop's `until` go on; any other failure
        is an error of the example."""
        from autodiff_cli.spec.expr import ExprError

        context = {name: env[name].value for name in node.when.names}
        try:
            return bool(node.when.evaluate(context))
        except ExprError as e:
            if e.missing:
                log.warning("nodes.%s.when on example %s: %s; the node is skipped", node.name,
                            run.trace.example_id, e)
                return False
            message = f"{'.'.join(map(str, node.key))}.when: {e} (example {run.trace.example_id})"
        call = self.new_call(node, run, iteration)
        call.when, call.error = node.when.source, message
        call.inputs = {k: InputValue(s.value, s.sources, condition=True) for k, s in condition.items()}
        run.trace.calls.append(call)
        raise ExampleError(message)

    def _skipped(self, node: Any, run: ExampleRun, iteration: int | None, inputs: dict[str, Slot],
                 when: str | None = None) -> tuple[Slot, list[Call]]:
        call = self.new_call(node, run, iteration)
        call.skipped, call.when = True, when
        call.inputs = {k: InputValue(s.value, s.sources, condition=when is not None) for k, s in inputs.items()}
        return Slot(None, [], skipped=True), [call]


def metric_inputs(metric: Metric, trace: Trace) -> dict[str, Slot]:
    slots = trace.slots
    return {arg: resolve(slots, ref) for arg, ref in metric.args.items()}


def score(metric: Metric, trace: Trace) -> float:
    """The metric (or loss) of a completed trace, checked to be a number in [0, 1] (the one place it is
    checked). A metric that raises is an error of the example: UserCodeError, whose message names `metric`
    or `loss`, the function, the exception and the example (its location is the spec's `fn` line). A value
    outside [0, 1] is a bug of the metric: MetricValueError, located at its `fn`."""
    kwargs = {arg: slot.value for arg, slot in metric_inputs(metric, trace).items()}
    where = {"file": metric.file, "line": metric.line, "key": ".".join(map(str, metric.key + ("fn",)))}
    try:
        value = metric.fn(**kwargs)
    except (Exception, SystemExit) as e:  # user code: whatever it raises, sys.exit() too
        raise UserCodeError(f"{'.'.join(map(str, metric.key))}: {metric.fn_ref} raised {describe_exception(e)} "
                            f"(example {trace.example_id})", file=metric.file, line=metric.line) from e
    if isinstance(value, bool):
        value = float(value)
    if not isinstance(value, numbers.Real) or not 0.0 <= float(value) <= 1.0:  # NaN fails the comparison too
        raise MetricValueError(f"{metric.fn_ref} returned {describe(value)} for example {trace.example_id}, "
                               "a score outside [0, 1] (a metric returns a number from 0 to 1)", **where)
    return float(value)
