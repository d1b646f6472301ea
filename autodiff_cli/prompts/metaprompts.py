"""Meta-prompts (the backward engine's and the optimizer's instructions) live in template
files under autodiff_cli/prompts/; this module loads and renders them in the sandbox."""
from __future__ import annotations

from functools import cache
from importlib import resources
from typing import Any

from autodiff_cli.spec.templates import Template, compile_template


@cache
def template(name: str) -> Template:
    text = resources.files("autodiff_cli.prompts").joinpath(name).read_text(encoding="utf-8")
    return compile_template(text)


def render(name: str, **context: Any) -> str:
    return template(name).render(context).strip()


def messages(name: str, **context: Any) -> list[dict[str, str]]:
    """System and user messages from `<name>.system.j2` and `<name>.user.j2`."""
    return [{"role": "system", "content": render(f"{name}.system.j2", **context)},
            {"role": "user", "content": render(f"{name}.user.j2", **context)}]
