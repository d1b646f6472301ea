"""The node-kind contract: what a kind of node (llm, function, loop, ...) must provide.

Like micrograd attaches a backward rule to each operation, each kind is one class that owns
everything about its nodes, so the compiler, the forward engine and the backward engine never
branch on kinds:

  compile(name, spec, key, ctx)  the kind's static checks; returns the compiled node (an instance),
                                 whose `reads` and `params` say what it reads
  forward(ctx)                   run one invocation with the engine's values so far (`ctx.env`);
                                 returns the output Slot and the Calls it recorded
  backward(call, feedback, ctx)  one call's rule: given the feedback its output received, the
                                 gradients of the params it used and the feedback for the calls that
                                 fed it (BackwardStep); backward-engine calls go through `ctx.ask`
  max_model_calls()              the most forward model calls one invocation makes  } upper bounds for
  max_backward_calls()           the most backward-engine calls one invocation costs } `train --dry-run`

What every kind shares is handled once, outside the kinds: `when` conditions and skipping (the
compiler and the engine), skip connections and the canonical order of feedback (the backward
engine). A kind that runs nested scopes (a loop's body) lists them in `inner_scopes`, and asks
the engine to run them through its forward context.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar

from pydantic import BaseModel

from autodiff_cli.engine.program import Ref, Scope
from autodiff_cli.engine.trace import Call, Slot
from autodiff_cli.grad.backward import BackwardContext, BackwardStep

if TYPE_CHECKING:
    from autodiff_cli.engine.forward import RunContext
    from autodiff_cli.nodes.compiler import (
        CompileContext,  # which imports the kinds  # the engine's context is only ever handed in
    )

KeyPath = tuple  # of str | int: where a node is in the spec, for errors


@dataclass(eq=False)
class NodeKind:
    """One compiled node; subclasses are the kinds (registered in nodes/registry.py)."""

    kind: ClassVar[str]  # the `kind:` of the spec
    Spec: ClassVar[type[BaseModel]]  # its keys as written in a spec (pydantic; `kind: Literal[...]` first)
    traced: ClassVar[bool] = True  # an invocation leaves a call of its own in the trace (skip connections start there)
    reads_demos: ClassVar[bool] = False  # a `kind: demos` param may belong to it (its output is a demo's response)
    output_fields_are: ClassVar[str] = "output"  # what `output_fields` are, for errors

    name: str  # unique across the spec
    spec: Any  # its pydantic model (spec.models)
    key: KeyPath
    topo_index: int = 0  # position in the program's topological order (loop bodies right after their loop)
    reads: list[Ref] = field(default_factory=list)  # what its templates, args or body read
    params: list[str] = field(default_factory=list)  # params it uses
    when: Any = None  # its condition (spec.expr.Expr), compiled by the compiler for every kind
    when_reads: list[Ref] = field(default_factory=list)  # what the condition reads
    upstream: tuple[str, ...] = ()  # nodes it reads (data or condition): all skipped -> it is skipped

    body: ClassVar[Scope | None] = None  # kinds with a nested scope override it per instance (a loop's body)

    # ------------------------------------------------------------ compile

    @classmethod
    def compile(cls, name: str, spec: Any, key: KeyPath, ctx: CompileContext) -> NodeKind:
        raise NotImplementedError

    @classmethod
    def nested_specs(cls, spec: Any) -> tuple[KeyPath, dict] | None:
        """The node specs nested in this one, with their key below it (a loop's body), for the name checks
        that run before compiling."""
        return None

    @classmethod
    def output_fields(cls, spec: Any) -> set[str] | None:
        """The fields its output is known to have, checked where others read `name.field`; None: any."""
        return None

    def inner_scopes(self) -> list[tuple[Scope, int]]:
        """Scopes it runs, each with the most times one invocation runs it."""
        return []

    def drawing(self) -> dict[str, Any]:
        """Attributes of its box in `autodiff graph` (nodes/compiler.py builds the graph, app/render_graph draws
        it): `label` (default `name: kind`), `shape` (Mermaid open, Mermaid close, DOT shape), and any facts."""
        return {}

    def models(self) -> list[str]:
        """The model configs (`models.<name>`) its forward pass calls."""
        return []

    def templates(self) -> dict[str, Any]:
        """Its prompt templates by part ("system", "user"): what `export-prompts` shows and `--dry-run` measures."""
        return {}

    @classmethod
    def declared_prompt(cls, spec: Any) -> tuple[str, dict[str, str]] | None:
        """(model, template sources by part) read from its spec alone, for a spec that does not compile on this
        machine (export-prompts of a run whose data is elsewhere); None: it has no prompt."""
        return None

    def drawn_inputs(self) -> list[tuple[str, str]]:
        """Edges into it besides what it reads, as (source node, label): a loop's `update`."""
        return []

    def dependencies(self) -> list[Ref]:
        """Everything it needs before it can run: its reads and its condition's."""
        return self.reads + [r for r in self.when_reads if r not in self.reads]

    def condition_inputs(self) -> list[Ref]:
        """What its condition reads that it does not already read as data: recorded among a call's inputs
        (`when: <ref>`) so that feedback can reach the node that decided it runs."""
        data_roots = {r.root for r in self.reads}
        return [r for r in self.when_reads if r.root not in data_roots]

    # ------------------------------------------------------------ forward

    async def forward(self, ctx: RunContext) -> tuple[Slot, list[Call]]:
        raise NotImplementedError

    # ------------------------------------------------------------ backward

    async def backward(self, call: Call, feedback: str, ctx: BackwardContext) -> BackwardStep:
        raise NotImplementedError

    # ------------------------------------------------------------ bounds (train --dry-run)

    def max_model_calls(self) -> int:
        return 0

    def max_backward_calls(self) -> int:
        return 0


def traced_sources(call: Call) -> dict[str, list[str]]:
    """The call's inputs that came from other calls: input key -> source call ids."""
    return {name: v.sources for name, v in call.inputs.items() if v.sources}
