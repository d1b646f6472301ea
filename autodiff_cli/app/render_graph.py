"""Draw a compiled program as Mermaid or Graphviz DOT text."""
from __future__ import annotations

import re

from autodiff_cli.spec.compiler import Program

SHAPES = {  # kind -> (mermaid open, mermaid close, dot shape)
    "input": ("([", "])", "oval"),
    "llm": ("[", "]", "box"),
    "function": ("[[", "]]", "component"),
    "loop": ("{{", "}}", "hexagon"),
    "param": ("[/", "/]", "note"),
    "metric": ("((", "))", "doublecircle"),
}


def _id(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_]", "_", name)


def _label(name: str, data: dict) -> str:
    kind = data.get("kind", "")
    if kind == "param":
        return name.removeprefix("param:")
    if kind == "llm":
        return f"{name}: llm ({data.get('model')})"
    if kind == "function":
        return f"{name}: {data.get('fn')}"
    if kind == "metric":
        return f"metric: {data.get('fn')}"
    return f"{name}: {kind}" if kind not in ("input",) else name


def to_mermaid(program: Program) -> str:
    g = program.graph
    lines = ["flowchart TD"]
    children: dict[str | None, list[str]] = {}
    for name, data in g.nodes(data=True):
        children.setdefault(data.get("parent"), []).append(name)

    def emit(name: str, indent: str) -> None:
        data = g.nodes[name]
        open_, close, _ = SHAPES.get(data.get("kind", ""), ("[", "]", "box"))
        lines.append(f'{indent}{_id(name)}{open_}"{_label(name, data)}"{close}')

    def emit_scope(parent: str | None, indent: str) -> None:
        for name in children.get(parent, []):
            if g.nodes[name].get("kind") == "loop":
                spec = program.node(name).spec
                lines.append(f'{indent}subgraph {_id(name)}_body["loop {name} (max {spec.max_iters})"]')
                emit_scope(name, indent + "  ")
                lines.append(f"{indent}end")
            emit(name, indent)

    emit_scope(None, "  ")
    for src, dst, data in g.edges(data=True):
        label = data.get("label")
        arrow = f' -->|"{label}"| ' if label else " --> "
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
            shape = SHAPES.get(data.get("kind", ""), ("", "", "box"))[2]
            style = ', style="dashed"' if data.get("kind") == "param" and not data.get("trainable", True) else ""
            lines.append(f'{indent}{_id(name)} [label="{_label(name, data)}", shape={shape}{style}];')
            if data.get("kind") == "loop":  # the body as a cluster, unrolled at run time
                lines.append(f'{indent}subgraph cluster_{_id(name)} {{')
                lines.append(f'{indent}  label="{name} body (max {program.node(name).spec.max_iters} iterations)"; style=rounded;')
                emit_scope(name, indent + "  ")
                lines.append(f"{indent}}}")

    emit_scope(None, "  ")
    for src, dst, data in g.edges(data=True):
        label = data.get("label")
        lines.append(f'  {_id(src)} -> {_id(dst)}' + (f' [label="{label}"];' if label else ";"))
    lines.append(f'  {_id(g.graph["output"])} -> metric [style=dotted, label="output"];')
    for skip in program.spec.skip:  # skip connections: evaluations routed straight to a param
        src = "metric" if skip.from_ == "loss" else _id(skip.from_)
        lines.append(f'  {src} -> {_id("param:" + skip.to)} [style=dashed, color=gray40, label="skip"];')
    lines.append("}")
    return "\n".join(lines) + "\n"
