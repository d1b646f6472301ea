"""`kind: function`: a Python function (a builtin, `module:function` or `file.py:function`, user code found
relative to the spec's folder: builtins.import_user_module) called with what the node reads.

Compile: `args` are references (its reads), `with` constants (file paths resolved for builtins
that take them); the function must import and accept exactly these arguments.
Forward: `fn(**with, **args)`, awaited if it is a coroutine function; no model call. A function that
raises is an error of that example (UserCodeError; its call joins the trace with the error).
Backward: `backward: pass` hands the feedback unchanged to every traced input (no call);
`backward: route` has the backward engine split it among them (one call, when there are several).
"""
from __future__ import annotations

import inspect
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar, Literal

from pydantic import BaseModel, Field

from autodiff_cli.engine.forward import RunContext
from autodiff_cli.engine.program import Ref, unique_refs
from autodiff_cli.engine.trace import Call, InputValue, Slot, resolve
from autodiff_cli.errors import describe_exception
from autodiff_cli.grad.backward import (
    NO_CHANGE,
    BackwardContext,
    BackwardStep,
    _input_key,
)
from autodiff_cli.grad.loss import _short
from autodiff_cli.nodes.base import KeyPath, NodeKind, traced_sources
from autodiff_cli.prompts import metaprompts
from autodiff_cli.spec.models import WHEN_HELP, Strict

if TYPE_CHECKING:
    from autodiff_cli.nodes.compiler import CompileContext  # which imports the kinds


class FunctionNodeSpec(Strict):
    """`kind: function` as written in a spec."""

    kind: Literal["function"]
    fn: str = Field(description="a builtin name, `module:function` or `file.py:function` (relative to the spec's folder)")
    args: dict[str, str] = Field(default_factory=dict, description="argument -> reference (node, input.field, state.field)")
    with_: dict[str, Any] = Field(default_factory=dict, alias="with", description="constant keyword arguments")
    backward: Literal["pass", "route"] = "pass"
    when: str | None = Field(None, description=WHEN_HELP)
    description: str | None = None


@dataclass(eq=False)
class FunctionKind(NodeKind):
    kind: ClassVar[str] = "function"
    Spec: ClassVar[type[BaseModel]] = FunctionNodeSpec

    fn: Callable | None = None
    fn_ref: str | None = None
    args: dict[str, Ref] = field(default_factory=dict)
    constants: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def compile(cls, name: str, spec: Any, key: KeyPath, ctx: CompileContext) -> FunctionKind:
        node = cls(name, spec, key, fn_ref=spec.fn)
        node.fn, path_args = ctx.function(spec.fn, key + ("fn",))
        for arg, text in spec.args.items():
            ref = ctx.ref(text, key + ("args", arg))
            node.args[arg] = ref
            if ref.root in ctx.spec.params:
                node.params.append(ref.root)
        node.reads = unique_refs(list(node.args.values()))
        overlap = set(spec.args) & set(spec.with_)
        if overlap:
            raise ctx.err(key + ("with",), expected="constants for arguments not already in `args`",
                          got=", ".join(sorted(overlap)))
        for arg, value in spec.with_.items():
            if arg in path_args and isinstance(value, str):
                value = ctx.data_path(value, key + ("with", arg))
            node.constants[arg] = value
        ctx.check_signature(node.fn, set(spec.args) | set(spec.with_), key)
        return node

    def drawing(self) -> dict[str, Any]:
        return {"fn": self.fn_ref, "label": f"{self.name}: {self.fn_ref}", "shape": ("[[", "]]", "component")}

    # ------------------------------------------------------------ forward

    async def forward(self, ctx: RunContext) -> tuple[Slot, list[Call]]:
        call = ctx.new_call()
        kwargs = dict(self.constants)
        for arg, ref in self.args.items():
            slot = resolve(ctx.env, ref)
            call.inputs[arg] = InputValue(slot.value, slot.sources)
            kwargs[arg] = slot.value
            if ctx.is_param(ref.root):
                call.params[ref.root] = ctx.env[ref.root].value
        start = time.perf_counter()
        try:
            output = self.fn(**kwargs)
            if inspect.isawaitable(output):
                output = await output
        except (Exception, SystemExit) as e:  # user code: whatever it raises, sys.exit() too
            # an error of this example (counted in `errors`, like a failed model call), never of the run
            call.latency_s = time.perf_counter() - start
            raise ctx.fail(call, f"nodes.{self.name}: {self.fn_ref} raised {describe_exception(e)} "
                                 f"(example {ctx.example_id})") from e
        call.latency_s = time.perf_counter() - start
        call.output = output
        return Slot(output, [call.id]), [call]

    # ------------------------------------------------------------ backward

    async def backward(self, call: Call, feedback: str, ctx: BackwardContext) -> BackwardStep:
        sources = traced_sources(call)
        if not sources:
            return BackwardStep()
        if self.spec.backward == "route" and len(sources) > 1:
            routed = await self._route(call, feedback, sources, ctx)
        else:
            routed = {name: feedback for name in sources}
        return BackwardStep(upstream=[(source, text) for name, text in routed.items() for source in sources[name]])

    async def _route(self, call: Call, feedback: str, sources: dict[str, list[str]], ctx: BackwardContext) -> dict[str, str]:
        keys = [{"key": _input_key(n), "description": f"output of {', '.join(s)}: {_short(call.inputs[n].value, 600)}"}
                for n, s in sources.items()]
        msgs = metaprompts.messages("backward_route", call_id=call.id, node=call.node, fn=self.fn_ref,
                                    example_id=ctx.example_id, iteration=call.iteration,
                                    output=_short(call.output), feedback=feedback, keys=keys)
        reply = await ctx.ask(call, msgs, [k["key"] for k in keys])
        if reply is None:
            return {}
        return {n: reply[_input_key(n)] for n in sources
                if reply.get(_input_key(n)) and not NO_CHANGE.search(reply[_input_key(n)])}

    # ------------------------------------------------------------ bounds

    def max_backward_calls(self) -> int:
        # a routing call only when feedback has more than one traced input to split among
        inputs = len(self.args) + len(self.condition_inputs())
        return 1 if self.spec.backward == "route" and inputs > 1 else 0
