"""Draw a compiled program as Mermaid or Graphviz DOT text.

A node with a `when` condition shows it under its name, and what the condition reads (when the node
does not also read it as data) comes in on a dashed edge labelled `when`.
"""
from __future__ import annotations

import re

from autodiff_cli.engine.program import Program

SHAPES = {  # what the compiler adds around the nodes -> (mermaid open, mermaid close, dot shape); node kinds
    "input": ("([", "])", "oval"),  # say their own (`drawing`, nodes/<kind>.py)
    "param": ("[/", "/]", "note"),
    "metric": ("((", "))", "doublecircle"),
}
BOX = ("[", "]", "box")


def _shape(data: dict) -> tuple[str, str, str]:
    return tuple(data.get("shape") or SHAPES.get(data.get("kind", ""), BOX))


def _id(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_]", "_", name)


def _label(name: str, data: dict) -> str:
    kind = data.get("kind", "")
    if data.get("label"):  # a node kind's own (nodes/<kind>.py `drawing`)
        return data["label"]
    if kind == "param":
        return name.removeprefix("param:")
    if kind == "metric":
        return f"metric: {data.get('fn')}"
    return f"{name}: {kind}" if kind not in ("input",) else name


def _mermaid_text(text: str) -> str:
    """Text safe inside a quoted Mermaid label (entity codes for quotes and angle brackets)."""
    return text.replace('"', "#quot;").replace("<", "#lt;").replace(">", "#gt;")


def _dot_text(text: str) -> str:
    return text.replace("\\", "\\\\").replace('"', '\\"')


def _edge_label(data: dict) -> str:
    label = data.get("label") or ""
    return (f"when {label}" if label else "when") if data.get("condition") else label


def to_mermaid(program: Program) -> str:
    g = program.graph
    lines = ["flowchart TD"]
    children: dict[str | None, list[str]] = {}
    for name, data in g.nodes(data=True):
        children.setdefault(data.get("parent"), []).append(name)

    def emit(name: str, indent: str) -> None:
        data = g.nodes[name]
        open_, close, _ = _shape(data)
        when = f"<br/>when: {_mermaid_text(data['when'])}" if data.get("when") else ""
        lines.append(f'{indent}{_id(name)}{open_}"{_label(name, data)}{when}"{close}')

    def emit_scope(parent: str | None, indent: str) -> None:
        for name in children.get(parent, []):
            cluster = g.nodes[name].get("cluster")  # a node kind with a nested scope (a loop's body)
            if cluster:
                lines.append(f'{indent}subgraph {_id(name)}_body["{_mermaid_text(cluster)}"]')
                emit_scope(name, indent + "  ")
                lines.append(f"{indent}end")
            emit(name, indent)

    emit_scope(None, "  ")
    for src, dst, data in g.edges(data=True):
        label = _edge_label(data)
        line = "-.->" if data.get("condition") else "-->"
        arrow = f' {line}|"{label}"| ' if label else f" {line} "
        lines.append(f"  {_id(src)}{arrow}{_id(dst)}")
    lines.append(f"  {_id(g.graph['output'])} -.->|output| metric")
    for skip in program.spec.skip:
        src = "metric" if skip.from_ == "loss" else _id(skip.from_)
        lines.append(f"  {src} -.->|skip| {_id('param:' + skip.to)}")
    return "\n".join(lines) + "\n"


def to_dot(program: Program) -> str:
    g = program.graph
    lines = [f'digraph "{program.spec.name}" {{', "  rankdir=TB;", '  node [fontname="Helvetica"];']
    children: dict[str | None, list[str]] = {}
    for name, data in g.nodes(data=True):
        children.setdefault(data.get("parent"), []).append(name)

    def emit_scope(parent: str | None, indent: str) -> None:
        for name in children.get(parent, []):
            data = g.nodes[name]
            shape = _shape(data)[2]
            style = ', style="dashed"' if data.get("kind") == "param" and not data.get("trainable", True) else ""
            when = f"\\nwhen: {_dot_text(data['when'])}" if data.get("when") else ""
            lines.append(f'{indent}{_id(name)} [label="{_label(name, data)}{when}", shape={shape}{style}];')
            if data.get("cluster"):  # a nested scope (a loop's body, unrolled at run time)
                lines.append(f'{indent}subgraph cluster_{_id(name)} {{')
                lines.append(f'{indent}  label="{_dot_text(data["cluster_dot"])}"; style=rounded;')
                emit_scope(name, indent + "  ")
                lines.append(f"{indent}}}")

    emit_scope(None, "  ")
    for src, dst, data in g.edges(data=True):
        label = _edge_label(data)
        attrs = ([f'label="{label}"'] if label else []) + (["style=dashed"] if data.get("condition") else [])
        lines.append(f'  {_id(src)} -> {_id(dst)}' + (f" [{', '.join(attrs)}];" if attrs else ";"))
    lines.append(f'  {_id(g.graph["output"])} -> metric [style=dotted, label="output"];')
    for skip in program.spec.skip:  # skip connections: evaluations routed straight to a param
        src = "metric" if skip.from_ == "loss" else _id(skip.from_)
        lines.append(f'  {src} -> {_id("param:" + skip.to)} [style=dashed, color=gray40, label="skip"];')
    lines.append("}")
    return "\n".join(lines) + "\n"
