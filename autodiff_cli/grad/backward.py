"""Textual backpropagation over one example's trace.

Like micrograd's backward, a reverse walk over the trace: every call that received feedback
hands feedback to its predecessors by the rule of its node kind.
  llm call       one backward-engine call: feedback for each trainable param it used (shown
                 with its peers) and each traced upstream output, as one JSON object
  function call  backward: pass -> the feedback goes unchanged to each traced input (no call)
                 backward: route -> the backward engine splits it among the inputs
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

from autodiff_cli.prompts import metaprompts
from autodiff_cli.spec.compiler import Program, invocations
from autodiff_cli.errors import ModelCallError
from autodiff_cli.optim import demos
from autodiff_cli.engine.trace import Call, Trace
from autodiff_cli.grad.loss import Evaluation, _short

log = logging.getLogger("autodiff.backward")

NO_CHANGE = re.compile(r"\bno changes? (?:is |are )?needed\b", re.I)  # "No change needed." and variants


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
    fenced = re.search(r"```(?:json)?\s*(\{.*?\})\s*```", text, re.S)
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
        """The most backward-engine calls one example's trace can cost: one per llm invocation and one
        per invocation of a routing function node (`backward: route` with several inputs)."""
        return sum(times for node, times in invocations(self.program.scope)
                   if node.kind == "llm" or (node.kind == "function" and node.spec.backward == "route"
                                             and len(node.args) > 1))

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

        async def visit(call: Call) -> None:
            try:
                await asyncio.gather(*(done[c] for c in consumers.get(call.id, [])))
                if received[call.id]:
                    await self._visit(trace, evaluation, call, received, result)
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

    async def _visit(self, trace: Trace, ev: Evaluation, call: Call, received: dict, result: BackwardResult) -> None:
        feedback = self._combined(received[call.id])
        order = (call.topo_index, call.call_index, call.id)
        for param in self.skips_from.get(call.node, []):
            if param in self.trainable:
                result.gradients.append(self._gradient(trace, ev, call, f"param:{param}", feedback))
        if call.kind == "function":
            node = self.program.node(call.node)
            sources = {name: v.sources for name, v in call.inputs.items() if v.sources}
            if not sources:
                return
            if node.spec.backward == "route" and len(sources) > 1:
                routed = await self._route(trace, call, feedback, sources, result)
            else:
                routed = {name: feedback for name in sources}
            for name, text in routed.items():
                for source in sources[name]:
                    received[source].append((order, text))
                    result.gradients.append(self._gradient(trace, ev, call, f"call:{source}", text))
            return
        await self._llm(trace, ev, call, feedback, received, result, order)

    async def _llm(self, trace: Trace, ev: Evaluation, call: Call, feedback: str, received: dict,
                   result: BackwardResult, order: tuple) -> None:
        params = [p for p in call.params if p in self.trainable]
        upstream = {name: v for name, v in call.inputs.items() if v.sources}
        if not params and not upstream:
            return
        keys = [{"key": _param_key(p), "description": f"the prompt parameter `{p}`"} for p in params]
        keys += [{"key": _input_key(n), "description": f"the input `{n}` (output of {', '.join(v.sources)}): {_short(v.value, 600)}"}
                 for n, v in upstream.items()]
        spec_params = self.program.params
        node_params = [{"name": p, "role": spec_params[p].role or _default_role(spec_params[p]), "value": value,
                        "trainable": p in self.trainable} for p, value in call.params.items()
                       if demos.in_prompt(spec_params[p], value)]
        msgs = metaprompts.messages("backward_llm", failed=ev.failed, call_id=call.id, node=call.node, example_id=trace.example_id,
                                    iteration=call.iteration, messages=call.messages or [], output=_short(call.output),
                                    feedback=feedback, node_params=node_params, keys=keys)
        reply = await self._ask(msgs, [k["key"] for k in keys], result, call, diagnose=True)
        if reply is None:
            return
        diagnosis = reply.get(DIAGNOSIS, "")
        blamed = {p: reply.get(_param_key(p), "") for p in params}
        blamed = {p: t for p, t in blamed.items() if t and not NO_CHANGE.search(t)}
        upstream_feedback = {n: reply.get(_input_key(n), "") for n in upstream}
        upstream_feedback = {n: t for n, t in upstream_feedback.items()
                             if t and not NO_CHANGE.search(t) and not echoes(t, upstream[n].value)}
        upstream_blamed = bool(upstream_feedback)
        if not blamed and diagnosis and not upstream_blamed:
            # small models often diagnose the mistake yet blame nothing; the diagnosis still
            # tells the optimizer what went wrong, so every trainable param of the call gets it
            blamed = {p: "" for p in params}
        for p, text in blamed.items():
            text = f"{text} (Diagnosis: {diagnosis})" if text and diagnosis else (text or f"Diagnosis: {diagnosis}")
            result.gradients.append(self._gradient(trace, ev, call, f"param:{p}", text))
        for name, text in upstream_feedback.items():
            for source in upstream[name].sources:
                received[source].append((order, text))
                result.gradients.append(self._gradient(trace, ev, call, f"call:{source}", text))

    async def _route(self, trace: Trace, call: Call, feedback: str, sources: dict[str, list[str]],
                     result: BackwardResult) -> dict[str, str]:
        node = self.program.node(call.node)
        keys = [{"key": _input_key(n), "description": f"output of {', '.join(s)}: {_short(call.inputs[n].value, 600)}"}
                for n, s in sources.items()]
        msgs = metaprompts.messages("backward_route", call_id=call.id, node=call.node, fn=node.fn_ref,
                                    example_id=trace.example_id, iteration=call.iteration,
                                    output=_short(call.output), feedback=feedback, keys=keys)
        reply = await self._ask(msgs, [k["key"] for k in keys], result, call)
        if reply is None:
            return {}
        return {n: reply[_input_key(n)] for n in sources
                if reply.get(_input_key(n)) and not NO_CHANGE.search(reply[_input_key(n)])}

    async def _ask(self, msgs: list[dict], keys: list[str], result: BackwardResult, call: Call,
                   diagnose: bool = False) -> dict[str, str] | None:
        # the diagnosis comes first so the model reasons before it assigns blame
        properties = {DIAGNOSIS: {"type": "string", "maxLength": 500}} if diagnose else {}
        properties.update({k: {"type": "string", "maxLength": 600} for k in keys})
        schema = {"type": "object", "properties": properties, "required": list(properties),
                  "additionalProperties": False}
        result.calls += 1
        try:
            reply = await self.client.complete(self.model_name, msgs, role="backward", json_schema=schema)
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

    @staticmethod
    def _gradient(trace: Trace, ev: Evaluation, call: Call, target: str, text: str) -> Gradient:
        return Gradient(trace.example_id, ev.score, call.node, call.call_index, call.topo_index, target, text)


def _default_role(spec) -> str:
    return demos.ROLE if spec.kind == "demos" else "prompt"
