"""The compiled program the engine runs: references, scopes of node kinds, the metric and the loss.

Built by the compiler (nodes/compiler.py) from a spec; read by the forward engine, the backward
engine, the optimizers and the dry-run projection. Nodes are instances of a kind (nodes/base.py):
this module only holds them.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import networkx as nx

from autodiff_cli.spec.loader import KeyPath, LoadedSpec
from autodiff_cli.spec.models import ParamSpec

if TYPE_CHECKING:
    from autodiff_cli.nodes.base import NodeKind


@dataclass(frozen=True)
class Ref:
    """A reference `root.a.b`: root is input, state, iteration, a node or a param."""

    root: str
    path: tuple[str | int, ...] = ()

    @classmethod
    def parse(cls, text: str) -> Ref:
        parts = [p.strip() for p in str(text).split(".")]
        if not parts or not all(parts):
            raise ValueError(f"a reference like `node`, `node.field` or `input.field`, got {text!r}")
        return cls(parts[0], tuple(int(p) if p.isdigit() else p for p in parts[1:]))

    def __str__(self) -> str:
        return ".".join([self.root, *map(str, self.path)])


def unique_refs(refs: list[Ref]) -> list[Ref]:
    seen: dict[Ref, None] = {}
    for r in refs:
        seen.setdefault(r, None)
    return list(seen)


@dataclass
class Scope:
    """The nodes of the top level or of one loop body, in execution (topological) order."""

    nodes: dict[str, NodeKind]
    generations: list[list[str]]  # nodes that may run concurrently, generation by generation
    loop: NodeKind | None = None  # the node whose nested scope this is


def scope_nodes(scope: Scope) -> list[NodeKind]:
    """Every node of a scope, nested scopes (loop bodies) included, in execution order."""
    out: list[NodeKind] = []
    for node in scope.nodes.values():
        out.append(node)
        for inner, _ in node.inner_scopes():
            out += scope_nodes(inner)
    return out


def invocations(scope: Scope, repeat: int = 1) -> list[tuple[NodeKind, int]]:
    """Every node that runs (loop bodies included, loops themselves not) with the most times one
    example can invoke it: a loop body runs up to max_iters times per invocation of its loop."""
    out: list[tuple[NodeKind, int]] = []
    for node in scope.nodes.values():
        inner = node.inner_scopes()
        if not inner:
            out.append((node, repeat))
        for body, times in inner:
            out += invocations(body, repeat * times)
    return out


@dataclass
class Metric:
    fn: Callable
    fn_ref: str
    args: dict[str, Ref]
    key: KeyPath
    feedback: str = "template"
    file: str | None = None  # where its `fn` is (the spec file or a --set), for errors while scoring
    line: int | None = None


@dataclass
class Program:
    loaded: LoadedSpec
    scope: Scope
    output: Ref
    metric: Metric
    loss: Metric
    params: dict[str, ParamSpec]
    graph: nx.DiGraph  # nodes, params, input, output and metric, for drawing and checks
    input_fields: set[str]
    warnings: list[str] = field(default_factory=list)  # printed on stderr by compile_spec; never fatal

    @property
    def spec(self):
        return self.loaded.spec

    def all_nodes(self) -> list[NodeKind]:
        return scope_nodes(self.scope)

    def node(self, name: str) -> NodeKind:
        for n in self.all_nodes():
            if n.name == name:
                return n
        raise KeyError(name)
