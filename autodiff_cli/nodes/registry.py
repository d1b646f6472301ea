"""Node kinds by the name a spec gives them (`kind: llm`): one line per kind, `module:class`.

Classes are imported when first asked for, so the compiler (which kinds import) can depend on
this module without an import cycle. The YAML model of each kind is in spec/models.py (`NodeSpec`).
"""
from __future__ import annotations

import importlib
from functools import cache

from autodiff_cli.nodes.base import NodeKind

KINDS: dict[str, str] = {
    "llm": "autodiff_cli.nodes.llm:LLMKind",
    "function": "autodiff_cli.nodes.function:FunctionKind",
    "loop": "autodiff_cli.nodes.loop:LoopKind",
}


@cache
def kind_class(kind: str) -> type[NodeKind]:
    """The class of a kind name; the spec's schema admits only registered kinds."""
    module, _, name = KINDS[kind].partition(":")
    return getattr(importlib.import_module(module), name)


def traced_kinds() -> list[str]:
    """Kinds whose invocations leave a call of their own in the trace (skip connections start there)."""
    return [kind for kind in KINDS if kind_class(kind).traced]
