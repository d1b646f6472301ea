"""`kind: llm`: a system and a user template rendered with what the node reads, sent to a model.

Compile: the templates' names are its reads (`input.X`, `state.X`, nodes, `node.field`) and params.
Forward: one model call; with `json_schema` the reply is parsed into a mapping when it can be.
Backward: one backward-engine call that diagnoses the mistake and writes feedback for each trainable
param the call used (shown with its peers, e.g. instruction vs output format) and each traced input,
including the values its condition read (so a wrong routing decision can be blamed on the router).
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar, Literal

from pydantic import BaseModel, Field

from autodiff_cli.engine.forward import PipelineError, RunContext
from autodiff_cli.engine.program import Ref, unique_refs
from autodiff_cli.engine.trace import Call, InputValue, Slot, resolve
from autodiff_cli.grad.backward import (
    DIAGNOSIS,
    NO_CHANGE,
    BackwardContext,
    BackwardStep,
    _input_key,
    _param_key,
    echoes,
)
from autodiff_cli.grad.loss import _short
from autodiff_cli.nodes.base import KeyPath, NodeKind
from autodiff_cli.prompts import metaprompts
from autodiff_cli.spec.models import WHEN_HELP, Strict
from autodiff_cli.spec.params import default_role, in_prompt
from autodiff_cli.spec.templates import Template

if TYPE_CHECKING:
    from autodiff_cli.nodes.compiler import CompileContext  # which imports the kinds


class LLMNodeSpec(Strict):
    """`kind: llm` as written in a spec."""

    kind: Literal["llm"]
    model: str = Field("task", description="a key of `models`")
    system: str | None = Field(None, description="Jinja template of the system message")
    user: str = Field(description="Jinja template of the user message")
    params: list[str] | None = Field(None, description="params this node uses; inferred from the templates when absent")
    json_schema: dict[str, Any] | None = Field(None, description="ask for JSON output that follows this schema")
    when: str | None = Field(None, description=WHEN_HELP)
    description: str | None = None


@dataclass(eq=False)
class LLMKind(NodeKind):
    kind: ClassVar[str] = "llm"
    Spec: ClassVar[type[BaseModel]] = LLMNodeSpec
    reads_demos: ClassVar[bool] = True

    model: str = "task"
    system: Template | None = None
    user: Template | None = None

    @classmethod
    def compile(cls, name: str, spec: Any, key: KeyPath, ctx: CompileContext) -> LLMKind:
        node = cls(name, spec, key, model=spec.model)
        if spec.model not in ctx.spec.models:
            raise ctx.err(key + ("model",), expected="a key of `models` (" + ", ".join(ctx.spec.models) + ")",
                          got=repr(spec.model))
        node.system = ctx.template(spec.system, key + ("system",))
        node.user = ctx.template(spec.user, key + ("user",))
        for part, tmpl in (("system", node.system), ("user", node.user)):
            if tmpl is not None:
                node._read_template(tmpl, key + (part,), ctx)
        for p in spec.params or []:
            if p not in ctx.spec.params:
                raise ctx.err(key + ("params",), expected="names of params", got=f"unknown param `{p}`")
            if p not in node.params:
                raise ctx.err(key + ("params",), expected="params the system/user templates use",
                              got=f"`{p}`, which neither template mentions")
        node.reads = unique_refs(node.reads)
        return node

    def _read_template(self, tmpl: Template, key: KeyPath, ctx: CompileContext) -> None:
        for var in sorted(tmpl.names):
            ctx.check_root(var, ("*",) if var == "input" else (), key)
            for attr in sorted(a for n, a in tmpl.attributes if n == var):
                ctx.check_field(var, attr, key)
            fields = sorted(a for n, a in tmpl.attributes if n == var)
            if var == "input":
                if not fields:
                    raise ctx.err(key, expected="a field of the example, e.g. `{{ input.question }}`", got="`input` alone")
                ctx.add_input_fields(fields)
                self.reads += [Ref("input", (f,)) for f in fields]
            elif var == "state":
                self.reads += [Ref("state", (f,)) for f in fields] or [Ref("state")]
            elif var in ctx.spec.params:
                if var not in self.params:
                    self.params.append(var)
            else:
                # precise provenance: `hops.context` reads one state field, `hops` all of it
                if var in tmpl.bare or not fields:
                    self.reads.append(Ref(var))
                self.reads += [Ref(var, (f,)) for f in fields]

    def drawing(self) -> dict[str, Any]:
        return {"model": self.model, "label": f"{self.name}: llm ({self.model})", "shape": ("[", "]", "box")}

    def models(self) -> list[str]:
        return [self.model]

    def templates(self) -> dict[str, Any]:
        return {part: t for part, t in (("system", self.system), ("user", self.user)) if t is not None}

    @classmethod
    def declared_prompt(cls, spec: Any) -> tuple[str, dict[str, str]]:
        return spec.model, {part: s for part, s in (("system", spec.system), ("user", spec.user)) if s is not None}

    # ------------------------------------------------------------ forward

    async def forward(self, ctx: RunContext) -> tuple[Slot, list[Call]]:
        call = ctx.new_call()
        env = ctx.env
        context: dict[str, Any] = {}
        for ref in self.reads:
            slot = resolve(env, ref)
            call.inputs[str(ref)] = InputValue(slot.value, slot.sources)
            if ref.root in ("input", "state"):
                context.setdefault(ref.root, env[ref.root].value)
            else:
                context[ref.root] = env[ref.root].value
        if "iteration" in env:
            context["iteration"] = env["iteration"].value
        for p in self.params:
            call.params[p] = env[p].value
            context[p] = env[p].value
        messages = []
        for role, tmpl in (("system", self.system), ("user", self.user)):
            if tmpl is not None:
                try:
                    messages.append({"role": role, "content": tmpl.render(context)})
                except Exception as e:  # TemplateError: e.g. a field this example lacks
                    raise PipelineError(f"nodes.{self.name}.{role}: {e} (example {ctx.example_id})") from None
        call.messages = messages
        text = await ctx.complete(call, self.model, messages, json_schema=self.spec.json_schema)
        output: Any = text
        if self.spec.json_schema is not None:
            try:
                output = json.loads(text)
            except (ValueError, RecursionError):  # RecursionError: a reply nested thousands deep
                output = text  # left for the parser downstream; the trace shows the raw text
        call.output = output
        return Slot(output, [call.id]), [call]

    # ------------------------------------------------------------ backward

    async def backward(self, call: Call, feedback: str, ctx: BackwardContext) -> BackwardStep:
        step = BackwardStep()
        params = [p for p in call.params if p in ctx.trainable]
        upstream = {name: v for name, v in call.inputs.items() if v.sources}
        if not params and not upstream:
            return step
        keys = [{"key": _param_key(p), "description": f"the prompt parameter `{p}`"} for p in params]
        keys += [{"key": _input_key(n), "description": _describe_input(n, v, call)} for n, v in upstream.items()]
        specs = ctx.param_specs
        node_params = [{"name": p, "role": specs[p].role or default_role(specs[p]), "value": value,
                        "trainable": p in ctx.trainable} for p, value in call.params.items()
                       if in_prompt(specs[p], value)]
        msgs = metaprompts.messages("backward_llm", failed=ctx.evaluation.failed, call_id=call.id, node=call.node,
                                    example_id=ctx.example_id, iteration=call.iteration, messages=call.messages or [],
                                    output=_short(call.output), feedback=feedback, node_params=node_params, keys=keys)
        reply = await ctx.ask(call, msgs, [k["key"] for k in keys], diagnose=True)
        if reply is None:
            return step
        diagnosis = reply.get(DIAGNOSIS, "")
        blamed = {p: reply.get(_param_key(p), "") for p in params}
        blamed = {p: t for p, t in blamed.items() if t and not NO_CHANGE.search(t)}
        upstream_feedback = {n: reply.get(_input_key(n), "") for n in upstream}
        upstream_feedback = {n: t for n, t in upstream_feedback.items()
                             if t and not NO_CHANGE.search(t) and not echoes(t, upstream[n].value)}
        if not blamed and diagnosis and not upstream_feedback:
            # small models often diagnose the mistake yet blame nothing; the diagnosis still
            # tells the optimizer what went wrong, so every trainable param of the call gets it
            blamed = {p: "" for p in params}
        for p, text in blamed.items():
            text = f"{text} (Diagnosis: {diagnosis})" if text and diagnosis else (text or f"Diagnosis: {diagnosis}")
            step.params.append((p, text))
        for name, text in upstream_feedback.items():
            step.upstream += [(source, text) for source in upstream[name].sources]
        return step

    # ------------------------------------------------------------ bounds

    def max_model_calls(self) -> int:
        return 1

    def max_backward_calls(self) -> int:
        return 1


def _describe_input(name: str, value: InputValue, call: Call) -> str:
    origin = f"output of {', '.join(value.sources)}"
    if value.condition:
        return (f"the value `{name.removeprefix('when: ')}` ({origin}) that the node's condition `{call.when}` "
                f"read to decide that this call runs: {_short(value.value, 600)}")
    return f"the input `{name}` ({origin}): {_short(value.value, 600)}"
