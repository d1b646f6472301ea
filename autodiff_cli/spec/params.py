"""What every layer needs to know about the param kinds (`prompt`, `demos`) of a spec.

The backward engine and the optimizer show params with their roles; a demos param is a block of
worked examples that is not part of its prompt while empty. Kept here, beside the format, so that
grad/ and optim/ read it without depending on each other.
"""
from __future__ import annotations

from typing import Any

DEMOS_ROLE = "few-shot demonstrations (worked examples)"


def in_prompt(spec: Any, value: str) -> bool:
    """Whether a param shows in its prompt: an empty demos block does not (so it is not shown to the
    backward engine or the optimizer as part of the prompt either)."""
    return bool(value) or spec.kind != "demos"


def default_role(spec: Any) -> str:
    """The role shown for a param whose spec gives none."""
    return DEMOS_ROLE if spec.kind == "demos" else "prompt"
