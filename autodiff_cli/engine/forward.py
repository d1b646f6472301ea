"""The forward engine: run one example through a Program and record its Trace.

Values move between nodes as Slots: the value plus the ids of the calls it came from, so
every call's inputs name their sources (loop state included) and the trace is a DAG even
when the program has loops. Nodes of one topological generation run concurrently; loops
run their body once per iteration until `until` holds or `max_iters` is reached.
"""
from __future__ import annotations

import asyncio
import copy
import inspect
import json
import logging
import numbers
import time
from dataclasses import dataclass, field
from typing import Any

from autodiff_cli.spec.compiler import CompiledNode, Metric, Program, Ref, Scope
from autodiff_cli.errors import AutodiffError, ModelCallError, describe, describe_exception
from autodiff_cli.engine.trace import Call, InputValue, Trace


log = logging.getLogger("autodiff.engine")


class PipelineError(AutodiffError):
    """A function node, template or loop condition failed on an example: a bug in the pipeline."""


@dataclass
class Slot:
    value: Any
    sources: list[str] = field(default_factory=list)
    fields: dict[str, "Slot"] | None = None  # per-field provenance (loop state, loop outputs)


def _index(value: Any, part: str | int) -> Any:
    if isinstance(value, dict):
        return value.get(part if part in value else str(part))
    if isinstance(value, (list, tuple, str)) and isinstance(part, int):
        return value[part] if -len(value) <= part < len(value) else None
    return None


def resolve(env: dict[str, Slot], ref: Ref) -> Slot:
    """The value `ref` names in `env`, with the call ids it came from."""
    slot = env[ref.root]
    path = list(ref.path)
    if path and slot.fields is not None and str(path[0]) in slot.fields:
        slot = slot.fields[str(path.pop(0))]
    value = slot.value
    for part in path:
        value = _index(value, part)
    return Slot(value, list(slot.sources))


def _example_slot(fields: dict[str, Any]) -> Slot:
    return Slot(fields, [], {k: Slot(v, []) for k, v in fields.items()})


def _state_slot(state: dict[str, Slot]) -> Slot:
    sources = sorted({s for slot in state.values() for s in slot.sources})
    return Slot({k: s.value for k, s in state.items()}, sources, dict(state))


class _Run:
    """The mutable state of one example's forward pass."""

    def __init__(self, example_id: str) -> None:
        self.trace = Trace(example_id)
        self.counters: dict[str, int] = {}

    def next_index(self, node: str) -> int:
        i = self.counters.get(node, 0)
        self.counters[node] = i + 1
        return i


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
        """Run one example with the given parameter values; model errors end up in trace.error."""
        run = _Run(example_id)
        env: dict[str, Slot] = {"input": _example_slot(fields)}
        env.update({name: Slot(values[name], []) for name in self.program.params})
        try:
            await self._run_scope(self.program.scope, env, run, iteration=None)
        except ModelCallError as e:
            run.trace.error = e.message
            return run.trace
        out = resolve(env, self.program.output)
        run.trace.output, run.trace.output_sources = out.value, out.sources
        run.trace.slots = env  # type: ignore[attr-defined]  # kept for scoring, not serialised
        return run.trace

    # ---------------------------------------------------------------- scopes

    async def _run_scope(self, scope: Scope, env: dict[str, Slot], run: _Run, iteration: int | None) -> None:
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

    async def _run_node(self, node: CompiledNode, env: dict[str, Slot], run: _Run, iteration: int | None) -> tuple[Slot, list[Call]]:
        if node.kind == "llm":
            return await self._run_llm(node, env, run, iteration)
        if node.kind == "function":
            return await self._run_function(node, env, run, iteration)
        return await self._run_loop(node, env, run)

    def _new_call(self, node: CompiledNode, run: _Run, iteration: int | None) -> Call:
        index = run.next_index(node.name)
        return Call(id=f"{node.name}#{index}", node=node.name, kind=node.kind, call_index=index,
                    topo_index=node.topo_index, iteration=iteration)

    # ---------------------------------------------------------------- llm

    async def _run_llm(self, node: CompiledNode, env: dict[str, Slot], run: _Run, iteration: int | None) -> tuple[Slot, list[Call]]:
        call = self._new_call(node, run, iteration)
        context: dict[str, Any] = {}
        for ref in node.reads:
            slot = resolve(env, ref)
            call.inputs[str(ref)] = InputValue(slot.value, slot.sources)
            if ref.root in ("input", "state"):
                context.setdefault(ref.root, env[ref.root].value)
            else:
                context[ref.root] = env[ref.root].value
        for name in ("iteration",):
            if name in env:
                context[name] = env[name].value
        for p in node.params:
            call.params[p] = env[p].value
            context[p] = env[p].value
        messages = []
        for role, tmpl in (("system", node.system), ("user", node.user)):
            if tmpl is not None:
                try:
                    messages.append({"role": role, "content": tmpl.render(context)})
                except Exception as e:  # TemplateError: e.g. a field this example lacks
                    raise PipelineError(f"nodes.{node.name}.{role}: {e} (example {run.trace.example_id})") from None
        call.messages = messages
        call.model = self.models.get(node.model, node.model)
        extra = {} if self.salt is None else {"salt": self.salt}
        try:
            reply = await self.client.complete(call.model, messages, role=self.role, json_schema=node.spec.json_schema,
                                               **extra)
        except ModelCallError as e:
            call.error = e.message
            run.trace.calls.append(call)
            raise
        call.prompt_tokens, call.completion_tokens = reply.prompt_tokens, reply.completion_tokens
        call.latency_s, call.cache_hit = reply.latency_s, reply.cache_hit
        output: Any = reply.text
        if node.spec.json_schema is not None:
            try:
                output = json.loads(reply.text)
            except (ValueError, RecursionError):  # RecursionError: a reply nested thousands deep
                output = reply.text  # left for the parser downstream; the trace shows the raw text
        call.output = output
        return Slot(output, [call.id]), [call]

    # ---------------------------------------------------------------- function

    async def _run_function(self, node: CompiledNode, env: dict[str, Slot], run: _Run, iteration: int | None) -> tuple[Slot, list[Call]]:
        call = self._new_call(node, run, iteration)
        kwargs = dict(node.constants)
        for arg, ref in node.args.items():
            slot = resolve(env, ref)
            call.inputs[arg] = InputValue(slot.value, slot.sources)
            kwargs[arg] = slot.value
            if ref.root in self.program.params:
                call.params[ref.root] = env[ref.root].value
        start = time.perf_counter()
        try:
            output = node.fn(**kwargs)
            if inspect.isawaitable(output):
                output = await output
        except Exception as e:
            raise PipelineError(
                f"nodes.{node.name}: {node.fn_ref} raised {describe_exception(e)} (example {run.trace.example_id})"
            ) from e
        call.latency_s = time.perf_counter() - start
        call.output = output
        return Slot(output, [call.id]), [call]

    # ---------------------------------------------------------------- loop

    async def _run_loop(self, node: CompiledNode, env: dict[str, Slot], run: _Run) -> tuple[Slot, list[Call]]:
        from autodiff_cli.spec.expr import ExprError

        state = {k: Slot(copy.deepcopy(v), []) for k, v in node.initial_state.items()}
        for iteration in range(node.max_iters):
            inner = dict(env)
            inner["state"] = _state_slot(state)
            inner["iteration"] = Slot(iteration, [])
            await self._run_scope(node.body, inner, run, iteration)
            for field_name, ref in node.update.items():
                state[field_name] = resolve(inner, ref)
            if node.until is not None:
                context = {name: inner[name].value for name in node.body.nodes}
                context.update(state=_state_slot(state).value, input=env["input"].value, iteration=iteration)
                try:
                    done = bool(node.until.evaluate(context))
                except ExprError as e:
                    # a model output without the field the condition reads (e.g. a reply that is
                    # not JSON) does not stop the loop; it runs on until max_iters
                    log.warning("nodes.%s.until on example %s: %s; the loop goes on", node.name,
                                run.trace.example_id, e)
                    done = False
                if done:
                    break
        # body calls were appended to the trace as they ran; the loop itself adds no call
        return _state_slot(state), []


def metric_inputs(metric: Metric, trace: Trace) -> dict[str, Slot]:
    slots = getattr(trace, "slots")
    return {arg: resolve(slots, ref) for arg, ref in metric.args.items()}


def score(metric: Metric, trace: Trace) -> float:
    """The metric of a completed trace, checked to be a number in [0, 1] (the one place it is checked)."""
    kwargs = {arg: slot.value for arg, slot in metric_inputs(metric, trace).items()}
    where = {"file": metric.file, "line": metric.line, "key": ".".join(map(str, metric.key + ("fn",)))}
    try:
        value = metric.fn(**kwargs)
    except Exception as e:
        raise PipelineError(f"{metric.fn_ref} raised {describe_exception(e)} (example {trace.example_id})",
                            **where) from e
    if isinstance(value, bool):
        value = float(value)
    if not isinstance(value, numbers.Real) or not 0.0 <= float(value) <= 1.0:  # NaN fails the comparison too
        raise PipelineError(f"{metric.fn_ref} returned {describe(value)} for example {trace.example_id}, "
                            "a score outside [0, 1] (a metric returns a number from 0 to 1)", **where)
    return float(value)
