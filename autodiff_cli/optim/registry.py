"""The optimizers `train.optimizer` can name (text steps) and the demos optimizer: one line each, `module:class`.

Classes are imported when first asked for (like nodes/registry.py and llm/providers/registry.py); a test
may register a class itself.
"""
from __future__ import annotations

import importlib

from autodiff_cli.optim.base import Optimizer

OPTIMIZERS: dict[str, str | type[Optimizer]] = {
    "gdpo": "autodiff_cli.optim.gdpo:GDPO",  # the paper's: one rewrite of the best values per proposal
    "pareto": "autodiff_cli.optim.pareto:Pareto",  # GEPA-style: a pool, parents from the per-example front
    "joint": "autodiff_cli.optim.joint:Joint",  # instructions and demos: two lineages, then a raced grid
    "demos": "autodiff_cli.optim.demos:DemoBootstrap",  # few-shot demo sets (the steps `train.demos` names)
}
DEMOS = "demos"  # runs the steps `train.demos` gives to demos


def optimizer_class(name: str) -> type[Optimizer]:
    entry = OPTIMIZERS[name]
    if isinstance(entry, str):
        module, _, cls = entry.partition(":")
        entry = OPTIMIZERS[name] = getattr(importlib.import_module(module), cls)
    return entry


def text_optimizers() -> list[str]:
    """The names `train.optimizer` accepts: optimizers of prompt params."""
    return [name for name in OPTIMIZERS if optimizer_class(name).param_kind == "prompt"]
