"""Jinja2 prompt templates, rendered in a sandbox.

Values (params, data, node outputs) are inserted literally: a value that itself contains
`{{ ... }}` is never rendered a second time. Undefined names are errors, not empty text.
Lists render one item per line and mappings as JSON, so retrieved passages read naturally.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from jinja2 import StrictUndefined, TemplateSyntaxError, meta, nodes
from jinja2.exceptions import SecurityError, UndefinedError
from jinja2.sandbox import ImmutableSandboxedEnvironment


def _finalize(value: Any) -> Any:
    if value is None:
        return ""
    if isinstance(value, (list, tuple)):
        return "\n".join(str(_finalize(v)) for v in value)
    if isinstance(value, dict):
        return json.dumps(value, ensure_ascii=False)
    return value


_ENV = ImmutableSandboxedEnvironment(
    undefined=StrictUndefined, autoescape=False, finalize=_finalize, keep_trailing_newline=True
)


class TemplateError(Exception):
    """A template could not be compiled or rendered; the caller adds file/line/key."""

    def __init__(self, message: str, line: int | None = None) -> None:
        super().__init__(message)
        self.line = line  # line within the template, 1-based


@dataclass
class Template:
    source: str
    names: frozenset[str]  # top-level variables the template reads
    attributes: frozenset[tuple[str, str]]  # (name, attr) pairs read as name.attr or name['attr']
    bare: frozenset[str]  # names also read whole (not only through an attribute)
    _compiled: Any

    def render(self, context: dict[str, Any]) -> str:
        try:
            return self._compiled.render(context)
        except UndefinedError as e:
            raise TemplateError(f"undefined value: {e.message}") from None
        except SecurityError as e:
            raise TemplateError(f"refused by the sandbox: {e}") from None
        except Exception as e:  # e.g. {{ n + 'a' }} on this example's values, or an over-long range()
            raise TemplateError(f"cannot render: {type(e).__name__}: {e}") from None


def compile_template(source: str) -> Template:
    try:
        ast = _ENV.parse(source)
        compiled = _ENV.from_string(source)  # also checks filter and test names
    except TemplateSyntaxError as e:
        raise TemplateError(f"template syntax error: {e.message}", e.lineno) from None
    for node in ast.find_all((nodes.Extends, nodes.Include, nodes.Import, nodes.FromImport)):
        raise TemplateError("template syntax error: a prompt template is self-contained "
                            "({% extends %}, {% include %} and {% import %} are not supported)", node.lineno)
    for node in ast.find_all((nodes.Getattr, nodes.Getitem)):
        key = node.attr if isinstance(node, nodes.Getattr) else getattr(node.arg, "value", None)
        if isinstance(key, str) and key.startswith("_"):  # Python internals: refused now, not at render time
            raise TemplateError(f"template refers to `{key}`: names starting with `_` are not allowed", node.lineno)
    names = frozenset(meta.find_undeclared_variables(ast))
    attributes: set[tuple[str, str]] = set()
    through_attribute: set[int] = set()  # ids of Name nodes read as name.attr
    for node in ast.find_all((nodes.Getattr, nodes.Getitem)):
        target = node.node
        if isinstance(target, nodes.Name):
            if isinstance(node, nodes.Getattr):
                attributes.add((target.name, node.attr))
                through_attribute.add(id(target))
            elif isinstance(node.arg, nodes.Const) and isinstance(node.arg.value, str):
                attributes.add((target.name, node.arg.value))
                through_attribute.add(id(target))
    bare = {n.name for n in ast.find_all(nodes.Name) if n.ctx == "load" and id(n) not in through_attribute}
    return Template(source, names, frozenset(attributes), frozenset(bare & names), compiled)
