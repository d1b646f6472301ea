"""The package's layers import only downwards and no module imports itself back (docs/ARCHITECTURE.md).

Imports inside functions count too: a lazy import is still a dependency. Imports under
`if TYPE_CHECKING:` do not (they are annotations only).
"""
from __future__ import annotations

import ast
from pathlib import Path

import networkx as nx

PACKAGE = Path(__file__).resolve().parents[1] / "autodiff_cli"

# Bottom to top: a module may import its own layer and the layers before it.
LAYERS = ["errors", "io", "llm", "spec", "prompts", "data", "engine", "grad", "nodes",
          "optim", "train", "app"]


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def layer_of(module: str) -> str | None:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else None


def imports(path: Path) -> set[str]:
    found: set[str] = set()

    def visit(node: ast.AST) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.If) and "TYPE_CHECKING" in ast.unparse(child.test):
                continue
            if isinstance(child, ast.Import):
                found.update(a.name for a in child.names)
            elif isinstance(child, ast.ImportFrom) and child.module and not child.level:
                found.add(child.module)
            visit(child)

    visit(ast.parse(path.read_text(encoding="utf-8")))
    return {m for m in found if m.startswith("autodiff_cli.")}


def import_graph() -> nx.DiGraph:
    graph = nx.DiGraph()
    for path in PACKAGE.rglob("*.py"):
        name = module_name(path)
        if name == "autodiff_cli.__main__":
            continue  # `python -m autodiff_cli` is the entry point above everything
        graph.add_node(name)
        for target in imports(path):
            graph.add_edge(name, target)
    return graph


def test_every_folder_of_the_package_is_a_known_layer():
    folders = {p.name for p in PACKAGE.iterdir() if p.is_dir() and (p / "__init__.py").exists()}
    modules = {p.stem for p in PACKAGE.glob("*.py")} - {"__init__", "__main__"}
    assert folders | modules <= set(LAYERS)


def test_no_module_imports_a_layer_above_its_own():
    upward = []
    for source, target in import_graph().edges:
        a, b = layer_of(source), layer_of(target)
        if a and b and LAYERS.index(b) > LAYERS.index(a):
            upward.append(f"{source} -> {target}")
    assert upward == []


def test_there_is_no_import_cycle():
    assert list(nx.simple_cycles(import_graph())) == []
