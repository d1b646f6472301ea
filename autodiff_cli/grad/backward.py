"""Textual backpropagation over one example's trace.

Like micrograd's backward, a reverse walk over the trace: every call that received feedback
hands feedback to its predecessors by the rule of its node kind (each kind's `backward` in
autodiff_cli/nodes/, e.g. an llm call asks the backward engine once, a function call passes its
feedback on or has it routed). This module owns what every kind shares: the walk, the canonical
order in which feedback is combined, skip connections, the Gradient rows, and a BackwardContext
through which rules make their backward-engine calls. A skipped call (its `when` was false) ran
nothing and gets nothing.

Calls of one example run as soon as every consumer of their output is done, so independent
branches go concurrently. Feedback is always combined and shown in a canonical order
(score, example id, topological index, call index), never in order of arrival.
"""
from __future__ import annotations

import asyncio
import json
import logging
import re
from dataclasses import asdict, dataclass, field
from difflib import SequenceMatcher
from typing import Any

from autodiff_cli.engine.program import Program
from autodiff_cli.engine.trace import Call, Trace
from autodiff_cli.errors import ModelCallError
from autodiff_cli.grad.loss import Evaluation

log = logging.getLogger("autodiff.backward")

NO_CHANGE = re.compile(r"\bno changes? (?:is |are )?needed\b", re.IGNORECASE)  # "No change needed." and variants


@dataclass(frozen=True)
class Gradient:
    example_id: str
    score: float
    node: str  # the node whose backward rule produced it ("loss" for skip connections from the loss)
    call_index: int
    topo_index: int
    target: str  # "param:<name>" or "call:<call id>"
    feedback: str

    def sort_key(self) -> tuple:
        return (self.score, self.example_id, self.topo_index, self.call_index, self.target)

    def row(self) -> dict[str, Any]:
        data = asdict(self)
        del data["topo_index"]
        return data


def canonical(gradients: list[Gradient]) -> list[Gradient]:
    return sorted(gradients, key=Gradient.sort_key)


@dataclass
class BackwardResult:
    gradients: list[Gradient]
    parse_failures: int = 0  # replies that gave no gradient (failed calls included)
    calls: int = 0  # backward-engine calls asked
    call_errors: list[str] = field(default_factory=list)  # calls that failed after retries


DIAGNOSIS = "diagnosis"


def echoes(feedback: str, value: Any) -> bool:
    """Feedback that is mostly a verbatim copy of the value it is about. Small backward engines
    often fill an input's field with the input itself (the retrieved passages, say); passed on,
    that reads as feedback to the upstream node and its optimizer pastes it into the prompt."""
    text, shown = " ".join(feedback.split()), " ".join(str(value).split())
    if len(text) < ECHO_MIN_CHARS or not shown:
        return False
    match = SequenceMatcher(None, text, shown, autojunk=False).find_longest_match(0, len(text), 0, len(shown))
    return match.size >= ECHO_SHARE * len(text)


ECHO_MIN_CHARS = 40  # shorter feedback may well quote the input ("it says 1950, not 1905")
ECHO_SHARE = 0.5  # one verbatim run this share of the feedback: a copy, not a comment


def _param_key(name: str) -> str:
    return f"param: {name}"


def _input_key(name: str) -> str:
    return f"input: {name}"


def parse_json_object(text: str) -> dict | None:
    """The first JSON object in a reply (tolerates ```json fences and surrounding prose)."""
    text = text.strip()
    fenced = re.search(r"```(?:json)?\s*(\{.*?\})\s*```", text, re.DOTALL)
    candidates = [fenced.group(1)] if fenced else []
    start = text.find("{")
    if start >= 0:
        candidates.append(text[start: text.rfind("}") + 1])
    for candidate in candidates:
        try:
            value = json.loads(candidate)
        except (ValueError, RecursionError):  # a reply nested thousands deep is no gradient either
            continue
        if isinstance(value, dict):
            return value
    if start >= 0:  # an object followed by prose or a second object that holds braces
        try:
            value, _ = json.JSONDecoder().raw_decode(text, start)
        except (ValueError, RecursionError):
            return None
        if isinstance(value, dict):
            return value
    return None


@dataclass
class BackwardStep:
    """What one call's backward rule gives: feedback for params it used and for the calls that fed it."""

    params: list[tuple[str, str]] = field(default_factory=list)  # (param name, feedback)
    upstream: list[tuple[str, str]] = field(default_factory=list)  # (source call id, feedback)


class BackwardContext:
    """What a node kind's backward rule sees of one example's backward pass: the trace, the loss's
    evaluation, the trainable params and their specs, and `ask` for backward-engine calls."""

    def __init__(self, engine: BackwardEngine, trace: Trace, evaluation: Evaluation, result: BackwardResult) -> None:
        self.engine, self.trace, self.evaluation, self.result = engine, trace, evaluation, result

    @property
    def example_id(self) -> str:
        return self.trace.example_id

    @property
    def trainable(self) -> set[str]:
        return self.engine.trainable

    @property
    def param_specs(self) -> dict:
        return self.engine.program.params

    async def ask(self, call: Call, messages: list[dict], keys: list[str], diagnose: bool = False) -> dict[str, str] | None:
        """One backward-engine call for `call`: a JSON object with a string for each of `keys` (and first a
        `diagnosis` when asked). None when the call failed or the reply holds no object (counted in the
        result's parse failures)."""
        result = self.result
        # the diagnosis comes first so the model reasons before it assigns blame
        properties = {DIAGNOSIS: {"type": "string", "maxLength": 500}} if diagnose else {}
        properties.update({k: {"type": "string", "maxLength": 600} for k in keys})
        schema = {"type": "object", "properties": properties, "required": list(properties),
                  "additionalProperties": False}
        result.calls += 1
        try:
            reply = await self.engine.client.complete(self.engine.model_name, messages, role="backward",
                                                      json_schema=schema)
        except ModelCallError as e:
            log.warning("backward call for %s failed: %s", call.id, e.message)
            result.parse_failures += 1
            result.call_errors.append(e.message)
            return None
        data = parse_json_object(reply.text)
        if data is None:
            log.warning("backward reply for %s is not a JSON object; no gradient from it", call.id)
            result.parse_failures += 1
            return None
        return {k: str(v).strip() for k, v in data.items() if (k in keys or k == DIAGNOSIS) and v is not None}


class BackwardEngine:
    def __init__(self, program: Program, client: Any, model_name: str, trainable: set[str]) -> None:
        self.program = program
        self.client = client
        self.model_name = model_name
        self.trainable = trainable
        self.skips_from: dict[str, list[str]] = {}
        for skip in program.spec.skip:
            self.skips_from.setdefault(skip.from_, []).append(skip.to)

    def max_calls_per_example(self) -> int:
        """The most backward-engine calls one example's trace can cost: the sum of each node kind's bound
        (an llm invocation costs one, a routing function one, a loop its body's times max_iters)."""
        return sum(node.max_backward_calls() for node in self.program.scope.nodes.values())

    async def backward(self, trace: Trace, evaluation: Evaluation) -> BackwardResult:
        """Gradients for one failed example, in canonical order."""
        received: dict[str, list[tuple[tuple, str]]] = {c.id: [] for c in trace.calls}
        for source in evaluation.sources:
            received.setdefault(source, []).append(((10**9, 0, "loss"), evaluation.text))
        result = BackwardResult([])
        for param in self.skips_from.get("loss", []):
            if param in self.trainable:
                result.gradients.append(Gradient(trace.example_id, evaluation.score, "loss", 0, 10**9,
                                                 f"param:{param}", evaluation.text))
        consumers: dict[str, list[str]] = {c.id: [] for c in trace.calls}
        for call in trace.calls:
            for source in {s for v in call.inputs.values() for s in v.sources}:
                consumers.setdefault(source, []).append(call.id)
        done: dict[str, asyncio.Future] = {c.id: asyncio.get_running_loop().create_future() for c in trace.calls}
        ctx = BackwardContext(self, trace, evaluation, result)

        async def visit(call: Call) -> None:
            try:
                await asyncio.gather(*(done[c] for c in consumers.get(call.id, [])))
                if received[call.id] and not call.skipped:
                    await self._visit(ctx, call, received)
            finally:
                if not done[call.id].done():
                    done[call.id].set_result(None)

        await asyncio.gather(*(visit(c) for c in reversed(trace.calls)))
        result.gradients = canonical(result.gradients)
        return result

    # ---------------------------------------------------------------- one call

    def _combined(self, items: list[tuple[tuple, str]]) -> str:
        texts = [text for _, text in sorted(items)]
        unique = list(dict.fromkeys(texts))
        return unique[0] if len(unique) == 1 else "\n".join(f"({i}) {t}" for i, t in enumerate(unique, 1))

    async def _visit(self, ctx: BackwardContext, call: Call, received: dict) -> None:
        feedback = self._combined(received[call.id])
        order = (call.topo_index, call.call_index, call.id)
        result, trace, ev = ctx.result, ctx.trace, ctx.evaluation
        for param in self.skips_from.get(call.node, []):
            if param in self.trainable:
                result.gradients.append(self._gradient(trace, ev, call, f"param:{param}", feedback))
        step = await self.program.node(call.node).backward(call, feedback, ctx)
        for param, text in step.params:
            result.gradients.append(self._gradient(trace, ev, call, f"param:{param}", text))
        for source, text in step.upstream:
            received[source].append((order, text))
            result.gradients.append(self._gradient(trace, ev, call, f"call:{source}", text))

    @staticmethod
    def _gradient(trace: Trace, ev: Evaluation, call: Call, target: str, text: str) -> Gradient:
        return Gradient(trace.example_id, ev.score, call.node, call.call_index, call.topo_index, target, text)
