"""`kind: loop`: a body of nodes run once per iteration, with a state carried between iterations.

Compile: the body is its own scope, whose nodes read `state` and `iteration`; `update` maps state
keys to body outputs; `until` (the restricted expression language) may stop it early.
Forward: unrolled at run time, at most `max_iters` iterations; each iteration's body calls join the
trace (call indices count across iterations, so gradients are time-sequential) and the state keeps
per-field provenance. A state field whose update source was skipped this iteration keeps its value.
Backward: none of its own: the loop leaves no call, its body's calls carry their rules.
"""
from __future__ import annotations

import copy
import logging
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar, Literal

from pydantic import BaseModel, Field, field_validator

from autodiff_cli.engine.forward import RunContext, state_slot
from autodiff_cli.engine.program import Ref, Scope, unique_refs
from autodiff_cli.engine.trace import Call, Slot, resolve
from autodiff_cli.grad.backward import BackwardContext, BackwardStep
from autodiff_cli.nodes.base import KeyPath, NodeKind
from autodiff_cli.spec.expr import Expr, ExprError, compile_expr
from autodiff_cli.spec.models import (
    WHEN_HELP,
    Name,
    NodeEntry,
    Strict,
    check_node_entries,
)

if TYPE_CHECKING:
    from autodiff_cli.nodes.compiler import CompileContext  # which imports the kinds

log = logging.getLogger("autodiff.engine")


class LoopNodeSpec(Strict):
    """`kind: loop` as written in a spec; its body's nodes are checked by their own kinds."""

    kind: Literal["loop"]
    body: dict[Name, NodeEntry]
    state: dict[Name, Any] = Field(default_factory=dict)
    update: dict[Name, str] = Field(default_factory=dict, description="state key -> reference to a body output")
    until: str | None = Field(None, description="restricted expression; the loop stops when it is true")
    max_iters: int = Field(ge=1, le=100)
    when: str | None = Field(None, description=WHEN_HELP)
    description: str | None = None

    @field_validator("body")
    @classmethod
    def _entries(cls, body: dict) -> dict:
        return check_node_entries(body)


@dataclass(eq=False)
class LoopKind(NodeKind):
    kind: ClassVar[str] = "loop"
    Spec: ClassVar[type[BaseModel]] = LoopNodeSpec
    traced: ClassVar[bool] = False
    output_fields_are: ClassVar[str] = "final `state` (a loop's output)"

    body: Scope | None = None  # type: ignore[misc]  # the base's class-level None, per instance here
    until: Expr | None = None
    update: dict[str, Ref] = field(default_factory=dict)
    initial_state: dict[str, Any] = field(default_factory=dict)
    max_iters: int = 1

    @classmethod
    def nested_specs(cls, spec: Any) -> tuple[KeyPath, dict]:
        return ("body",), spec.body

    @classmethod
    def output_fields(cls, spec: Any) -> set[str]:
        return set(spec.state)

    @classmethod
    def compile(cls, name: str, spec: Any, key: KeyPath, ctx: CompileContext) -> LoopKind:
        node = cls(name, spec, key, max_iters=spec.max_iters, initial_state=dict(spec.state))
        with ctx.inner_scope(spec.body, key + ("body",), node, set(spec.state)) as inner:
            node.body = inner.scope
            for field_name, text in spec.update.items():
                if field_name not in spec.state:
                    raise ctx.err(key + ("update", field_name),
                                  expected="a key of the loop's `state` (" + ", ".join(spec.state) + ")",
                                  got=repr(field_name))
                node.update[field_name] = inner.ctx.ref(text, key + ("update", field_name))
        body_names = set(node.body.nodes)
        if spec.until is not None:
            try:
                node.until = compile_expr(spec.until)
            except ExprError as e:
                raise ctx.err(key + ("until",), expected="a restricted expression (no calls but len, lower, ...)",
                              got=str(e)) from None
            for var in sorted(node.until.names):
                if var not in body_names | {"state", "input", "iteration"}:
                    raise ctx.err(key + ("until",), expected="names of body nodes, `state`, `input` or `iteration`",
                                  got=f"unknown name `{var}`")
        if not spec.update and spec.until is None:
            raise ctx.err(key, expected="a loop with `update` (state carried between iterations) or `until`",
                          got="neither")
        roots = list(node.update.values()) + [Ref(v) for v in (node.until.names if node.until else ()) if v in body_names]
        ctx.check_used(node.body, roots, key + ("body",))
        # the loop reads whatever its body reads (or its body's conditions read) from outside
        outside: list[Ref] = []
        for inner_node in node.body.nodes.values():
            outside += [r for r in inner_node.dependencies() if r.root in inner.outside or r.root == "input"]
        node.reads = unique_refs(outside)
        return node

    def inner_scopes(self) -> list[tuple[Scope, int]]:
        return [(self.body, self.max_iters)]

    def drawing(self) -> dict[str, Any]:
        return {"max_iters": self.max_iters, "shape": ("{{", "}}", "hexagon"),
                "cluster": f"loop {self.name} (max {self.max_iters})",  # its body, in `graph`
                "cluster_dot": f"{self.name} body (max {self.max_iters} iterations)"}

    def drawn_inputs(self) -> list[tuple[str, str]]:
        return [(ref.root, f"state.{field_name}") for field_name, ref in self.update.items()]

    # ------------------------------------------------------------ forward

    async def forward(self, ctx: RunContext) -> tuple[Slot, list[Call]]:
        state = {k: Slot(copy.deepcopy(v), []) for k, v in self.initial_state.items()}
        for iteration in range(self.max_iters):
            inner = dict(ctx.env)
            inner["state"] = state_slot(state)
            inner["iteration"] = Slot(iteration, [])
            await ctx.run_scope(self.body, inner, iteration)
            for field_name, ref in self.update.items():
                slot = resolve(inner, ref)
                if not slot.skipped:  # a branch not taken this iteration changes nothing
                    state[field_name] = slot
            if self.until is not None and self._done(inner, state, ctx, iteration):
                break
        # body calls were appended to the trace as they ran; the loop itself adds no call
        return state_slot(state), []

    def _done(self, inner: dict[str, Slot], state: dict[str, Slot], ctx: RunContext, iteration: int) -> bool:
        context = {name: inner[name].value for name in self.body.nodes}
        context.update(state=state_slot(state).value, input=ctx.env["input"].value, iteration=iteration)
        try:
            return bool(self.until.evaluate(context))
        except ExprError as e:
            # a model output without the field the condition reads (e.g. a reply that is
            # not JSON) does not stop the loop; it runs on until max_iters
            log.warning("nodes.%s.until on example %s: %s; the loop goes on", self.name, ctx.example_id, e)
            return False

    # ------------------------------------------------------------ backward

    async def backward(self, call: Call, feedback: str, ctx: BackwardContext) -> BackwardStep:
        # never asked for a call that ran: a loop leaves none (only a skipped one, which gets nothing)
        return BackwardStep()

    # ------------------------------------------------------------ bounds

    def max_model_calls(self) -> int:
        return self.max_iters * sum(node.max_model_calls() for node in self.body.nodes.values())

    def max_backward_calls(self) -> int:
        return self.max_iters * sum(node.max_backward_calls() for node in self.body.nodes.values())
