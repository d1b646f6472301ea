"""Spec -> Program: resolve every reference, build the node graph, run the static checks.

Names a node can read:
  input        the example (input.question)
  state        the loop state, inside a loop body (state.context)
  iteration    the loop iteration (0-based), inside a loop body
  <node>       a node's output (a loop's output is its final state: hops.context)
  <param>      a parameter's current value (templates; function args too)
LLM nodes read names from their Jinja templates; function nodes from `args`; any node's `when`
condition from its expression. Only loops may create cycles; a loop body is its own scope,
unrolled at run time. Each node kind compiles its own nodes (autodiff_cli/nodes/, found through
nodes/registry.py); what kinds share (names, references, templates, functions, conditions,
order, usage) is here and reaches them through a CompileContext.
"""
from __future__ import annotations

import difflib
import inspect
import os
import sys
import sysconfig
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import networkx as nx

from autodiff_cli.data.paths import resolve_data_path
from autodiff_cli.engine.program import (
    Metric,
    Program,
    Ref,
    Scope,
    scope_nodes,
    unique_refs,
)
from autodiff_cli.errors import NotImplementedYet, SpecError, describe
from autodiff_cli.spec.loader import KeyPath, LoadedSpec
from autodiff_cli.spec.models import unbuilt_keys
from autodiff_cli.spec.templates import Template, TemplateError, compile_template

if TYPE_CHECKING:
    from autodiff_cli.nodes.base import NodeKind

MODEL_ROLES = ("backward", "optimizer")  # model configs used by their name (train/trainer.py)
RESERVED = frozenset({"input", "state", "iteration", "loss", "output", "metric"})

# Standard-library modules whose functions, handed model output or data as arguments, act on the machine:
# a config may name them (configs are code, README "Trust model"), but `fn: os:system` is then a shell
# driven by the model, so validate, eval and train say so. Listed by top-level name, so submodules count
# (os.path, importlib.util, concurrent.futures); modules whose functions only compute (json, re, math,
# string, codecs.decode, ...) are not, nor is anything outside the standard library (it may do anything:
# the warning is for names that look harmless in a config and are not). A private C twin counts as its
# module (_io is io, _pickle is pickle); os.system's own module is posix.
RISKY_STDLIB = {
    **dict.fromkeys(("os", "posix", "nt", "subprocess", "posixsubprocess", "pty", "shutil", "multiprocessing",
                     "concurrent", "asyncio", "webbrowser", "pydoc", "ensurepip", "venv"),
                    "which can run commands or touch files"),
    **dict.fromkeys(("builtins", "importlib", "runpy", "code", "codeop", "pickle", "marshal", "shelve", "ctypes",
                     "timeit", "doctest", "pdb", "bdb", "profile", "cProfile", "trace", "zipimport", "pkgutil"),
                    "which can run or load arbitrary code"),
    **dict.fromkeys(("io", "pathlib", "tempfile", "fileinput", "glob", "zipfile", "tarfile", "gzip", "bz2", "lzma",
                     "dbm", "sqlite3", "mmap", "fcntl", "linecache"),
                    "which can read, write or delete files"),
    **dict.fromkeys(("socket", "ssl", "http", "urllib", "ftplib", "smtplib", "poplib", "imaplib", "telnetlib",
                     "xmlrpc", "socketserver"),
                    "which can reach the network"),
    **dict.fromkeys(("sys", "signal", "resource"),
                    "which can stop or change the running process"),
}
_STDLIB_DIRS = tuple(os.path.realpath(sysconfig.get_paths()[k]) for k in ("stdlib", "platstdlib"))


def risky_stdlib_module(ref: str, fn: Callable | None, base_dir: Path | None = None) -> str | None:
    """The risky standard-library module (RISKY_STDLIB) that `ref` (`module:function`) names, or that the
    function it resolved to comes from (`shlex:os.system` is os.system); None for anything else. A module
    part that resolved to user code in the spec's folder `base_dir` (a local os.py) names no stdlib module:
    only the function's own module counts then."""
    from autodiff_cli.nodes.builtins import split_ref, user_code_origin

    named = split_ref(ref)[0] if ":" in ref else ""
    if named and user_code_origin(named, base_dir) is not None:
        named = ""
    target = inspect.unwrap(fn) if callable(fn) else None
    owner = getattr(target, "__module__", None) or ""
    for module in (named, owner):
        top = module.split(".")[0]
        if top.lstrip("_") in RISKY_STDLIB and _is_stdlib(top):
            return top.lstrip("_") if module is owner else module
    return None


def _is_stdlib(top: str) -> bool:
    """Whether the imported module `top` is the standard library's, not a project file that shadows its
    name (a local code.py)."""
    module = sys.modules.get(top)
    if module is None:
        return False
    path = getattr(module, "__file__", None)
    if path is None:  # built into the interpreter (sys, builtins, posix, marshal)
        return top in sys.stdlib_module_names or top.lstrip("_") in sys.stdlib_module_names
    path = os.path.realpath(path)
    return path.startswith(_STDLIB_DIRS) and "site-packages" not in path


class Compiler:
    def __init__(self, loaded: LoadedSpec) -> None:
        from autodiff_cli.nodes.registry import (  # imports the kinds, which import this module
            KINDS,
            kind_class,
            traced_kinds,
        )

        self.kinds = list(KINDS)
        self.kind_class = kind_class
        self.traced_kinds = traced_kinds
        self.validated: dict[KeyPath, tuple[type[NodeKind], Any]] = {}
        self.loaded = loaded
        self.spec = loaded.spec
        self.err = loaded.error
        self.topo_counter = 0
        self.input_fields: set[str] = set()
        self.used_params: set[str] = set()
        self.graph = nx.DiGraph()
        self.state_stack: list[set[str]] = []  # state keys of the loops being compiled, innermost last
        # node -> the fields its output is known to have and what they are (a loop's final state)
        self.output_fields: dict[str, tuple[set[str], str]] = {}
        for name, node_spec, key in self.spec_tree():
            cls = self.node_spec(None, key)[0]
            fields = cls.output_fields(node_spec)
            if fields is not None:
                self.output_fields[name] = (fields, cls.output_fields_are)
        self.warnings: list[str] = []

    def node_spec(self, raw: dict | None, key: KeyPath) -> tuple[type[NodeKind], Any]:
        """(kind, spec) of the node written as `raw` at `key`: the kind its `kind:` names, and the node checked
        by that kind's own model (`Spec`), with errors located in the file. Validated once per key."""
        if key not in self.validated:
            kind = raw["kind"]
            if kind not in self.kinds:
                names = [f"`kind: {k}`" for k in self.kinds]
                raise self.err(key + ("kind",), expected=", ".join(names[:-1]) + " or " + names[-1], got=describe(kind))
            cls = self.kind_class(kind)
            self.validated[key] = (cls, self.loaded.validate(cls.Spec, raw, key))
        return self.validated[key]

    def spec_tree(self, nodes: dict | None = None, prefix: KeyPath = ("nodes",)):
        """(name, node spec, key) of every node of the spec, nested ones (loop bodies) after their holder."""
        for name, raw in (self.spec.nodes if nodes is None else nodes).items():
            key = prefix + (name,)
            cls, node_spec = self.node_spec(raw, key)
            yield name, node_spec, key
            nested = cls.nested_specs(node_spec)
            if nested is not None:
                below, specs = nested
                yield from self.spec_tree(specs, key + below)

    # ---------------------------------------------------------------- entry

    def compile(self) -> Program:
        for key, what in unbuilt_keys(self.spec):
            raise self.err(key, cls=NotImplementedYet, expected="a key whose behaviour is built",
                           got=f"{what}: not implemented yet")
        self._check_names()
        scope = self.compile_scope(self.spec.nodes, ("nodes",), outer=set(), loop=None)
        self._number(scope)
        output = self.ref(self.spec.output, ("output",), visible=set(scope.nodes))
        metric = self._metric(self.spec.metric, ("metric",), set(scope.nodes))
        loss = self._metric(self.spec.loss, ("loss",), set(scope.nodes)) if self.spec.loss else metric
        self.check_used(scope, [output, *metric.args.values(), *loss.args.values()], ("nodes",))
        self._check_params()
        self._check_demos(scope)
        self._check_skip()
        self._check_models(scope)
        self._build_graph(scope, output, metric)
        return Program(self.loaded, scope, output, metric, loss, dict(self.spec.params), self.graph, self.input_fields,
                       self.warnings)

    def warn_if_risky(self, ref: str, fn: Callable, key: KeyPath) -> None:
        module = risky_stdlib_module(ref, fn, self.loaded.config_dir)
        if module is not None:
            where = self.err(key).location()
            self.warnings.append(f"warning: {where}: {ref} is from the standard library module `{module}`, "
                                 f"{RISKY_STDLIB[module.split('.')[0]]}; configs are code (see README \"Trust model\")")

    # ---------------------------------------------------------------- names

    def _check_names(self) -> None:
        seen: dict[str, KeyPath] = {}
        for name, _, key in self.spec_tree():
            if name in RESERVED:
                raise self.err(key, expected=f"a node name other than {', '.join(sorted(RESERVED))}", got=repr(name))
            if name in self.spec.params:
                raise self.err(key, expected="a node name that is not also a param name", got=repr(name))
            if name in seen:
                raise self.err(key, expected="node names unique across the spec (loop bodies included)",
                               got=f"`{name}` again (first at {'.'.join(map(str, seen[name]))})")
            seen[name] = key
        for name in self.spec.params:
            if name in RESERVED:
                raise self.err(("params", name), expected="a param name other than " + ", ".join(sorted(RESERVED)), got=repr(name))

    # ---------------------------------------------------------------- scopes

    def compile_scope(self, specs: dict, prefix: KeyPath, outer: set[str], loop: NodeKind | None) -> Scope:
        """The nodes of one scope, each compiled by its kind, with their conditions, in topological order."""
        local = set(specs)
        ctx = CompileContext(self, visible=local | outer, loop=loop)
        compiled: dict[str, NodeKind] = {}
        for name, raw in specs.items():
            key = prefix + (name,)
            cls, node_spec = self.node_spec(raw, key)
            node = cls.compile(name, node_spec, key, ctx)
            self._condition(node, ctx)
            node.upstream = tuple(sorted({r.root for r in node.dependencies()} & (local | outer)))
            compiled[name] = node
        order, generations = self._order(compiled, local, prefix)
        return Scope({n: compiled[n] for n in order}, generations, loop)

    def _condition(self, node: NodeKind, ctx: CompileContext) -> None:
        """`when`: the same restricted language as `until`, over names the node may read."""
        source = getattr(node.spec, "when", None)
        if source is None:
            return
        from autodiff_cli.spec.expr import ExprError, compile_expr

        key = node.key + ("when",)
        try:
            node.when = compile_expr(source)
        except ExprError as e:
            raise self.err(key, expected="a restricted expression over the node's inputs (the language of `until`)",
                           got=str(e)) from None
        refs: list[Ref] = []
        for name in sorted(node.when.names):
            if name == node.name:
                raise self.err(key, expected="a condition that does not read the node's own output",
                               got=f"a reference to `{name}`")
            fields = sorted(f for n, f in node.when.fields if n == name)
            if name in node.when.bare or not fields:
                ctx.check_root(name, (), key)
                refs.append(Ref(name))
            for field_name in fields:
                ctx.check_root(name, (field_name,), key)
                refs.append(Ref(name, (field_name,)))
        node.when_reads = unique_refs(refs)

    def _number(self, scope: Scope) -> None:
        """Topological indices over the whole program; a loop's body numbers right after the loop."""
        for node in scope.nodes.values():
            node.topo_index = self.topo_counter
            self.topo_counter += 1
            for inner, _ in node.inner_scopes():
                self._number(inner)

    def _order(self, compiled: dict[str, NodeKind], local: set[str], prefix: KeyPath) -> tuple[list[str], list[list[str]]]:
        g = nx.DiGraph()
        declared = list(compiled)
        g.add_nodes_from(declared)
        for name, node in compiled.items():
            for ref in node.dependencies():
                if ref.root in local and ref.root != name:
                    g.add_edge(ref.root, name)
                elif ref.root == name:
                    raise self.err(node.key, expected="a node that does not read its own output (use a loop with state)",
                                   got=f"a reference to `{name}`")
        try:
            cycle = nx.find_cycle(g)
        except nx.NetworkXNoCycle:
            cycle = None
        if cycle:
            path = " -> ".join([e[0] for e in cycle] + [cycle[0][0]])
            raise self.err(prefix + (cycle[0][0],), expected="no cycle outside a declared loop (use `kind: loop` with state)",
                           got=f"the cycle {path}")
        position = {n: i for i, n in enumerate(declared)}
        order = list(nx.lexicographical_topological_sort(g, key=lambda n: position[n]))
        generations = [sorted(gen, key=lambda n: position[n]) for gen in nx.topological_generations(g)]
        return order, generations

    # ---------------------------------------------------------------- references

    def ref(self, text: str, key: KeyPath, visible: set[str], in_loop: bool = False) -> Ref:
        try:
            ref = Ref.parse(text)
        except ValueError as e:
            raise self.err(key, expected=str(e).split(", got")[0], got=repr(text)) from None
        self.check_root(ref.root, ref.path, key, visible, in_loop)
        return ref

    def check_root(self, root: str, path: tuple, key: KeyPath, visible: set[str], in_loop: bool) -> None:
        if root == "input":
            if not path:
                raise self.err(key, expected="a field of the example, e.g. `input.question`", got="`input` alone")
            if path[0] != "*":
                self.input_fields.add(str(path[0]))
            return
        if root in ("state", "iteration"):
            if not in_loop:
                raise self.err(key, expected=f"`{root}` only inside a loop body", got=f"`{root}` outside a loop")
            if path and path[0] != "*":
                self.check_field(root, path[0], key)
            return
        if root in self.spec.params:
            self.used_params.add(root)
            return
        if root in visible:
            if path and path[0] != "*":
                self.check_field(root, path[0], key)
            return
        known = sorted(visible | set(self.spec.params) | {"input"})
        raise self.err(key, expected="a node, param or `input` (" + ", ".join(known) + ")", got=f"unknown name `{root}`")

    def check_field(self, root: str, field_name: Any, key: KeyPath) -> None:
        """`state.x` and `<loop>.x` (a loop's output is its final state) must name a key of that state."""
        if root == "state":
            known, what = (self.state_stack[-1] if self.state_stack else None), "the loop's `state`"
        else:
            known, what = self.output_fields.get(root, (None, ""))
            what = f"`{root}`'s {what}"
        if known is not None and str(field_name) not in known:
            raise self.err(key, expected=f"a key of {what}: {', '.join(sorted(known)) or 'none'}",
                           got=f"`{root}.{field_name}`")

    # ---------------------------------------------------------------- what kinds share

    def template(self, source: str | None, key: KeyPath) -> Template | None:
        if source is None:
            return None
        try:
            return compile_template(source)
        except TemplateError as e:
            raise self.err(key, expected="a valid Jinja2 template",
                           got=f"{e} (template line {e.line})" if e.line else str(e)) from None
        except (RecursionError, MemoryError, SyntaxError) as e:
            # Jinja parses nested expressions and blocks recursively, and Python compiles at most 20
            # statically nested blocks (for loops) of the code Jinja generates
            what = e.msg if isinstance(e, SyntaxError) else "expressions or blocks nested too deeply to parse"
            raise self.err(key, expected="a valid Jinja2 template (nested less deeply)", got=what) from None

    def check_signature(self, fn: Callable, given: set[str], key: KeyPath) -> None:
        try:
            sig = inspect.signature(fn)
        except (TypeError, ValueError):
            return
        try:
            sig.bind(**{name: None for name in given})
        except TypeError as e:
            raise self.err(key + ("args",), expected=f"the arguments of {getattr(fn, '__name__', 'fn')}{sig}",
                           got=f"{', '.join(sorted(given)) or 'none'} ({e})") from None

    def _metric(self, spec, key: KeyPath, visible: set[str]) -> Metric:
        from autodiff_cli.nodes.metrics import resolve_metric

        try:
            fn = resolve_metric(spec.fn, self.loaded.config_dir)  # user code relative to the spec's folder
        except SpecError as e:
            raise self.err(key + ("fn",), expected=e.expected or "a metric name, `module:function` or `file.py:function`",
                           got=e.got or e.message, hint=e.hint) from None
        self.warn_if_risky(spec.fn, fn, key + ("fn",))
        args = {a: self.ref(t, key + ("args", a), visible) for a, t in spec.args.items()}
        self.check_signature(fn, set(args), key)
        where = self.err(key + ("fn",))
        return Metric(fn, spec.fn, args, key, getattr(spec, "feedback", "template"), where.file, where.line)

    # ---------------------------------------------------------------- usage checks

    def check_used(self, scope: Scope, roots: list[Ref], prefix: KeyPath) -> None:
        """Every node of a scope must feed one of the roots (output, metric, loop update), as data or condition."""
        needed: set[str] = set()
        stack = [r.root for r in roots if r.root in scope.nodes]
        while stack:
            name = stack.pop()
            if name in needed:
                continue
            needed.add(name)
            stack += [r.root for r in scope.nodes[name].dependencies() if r.root in scope.nodes]
        for name, node in scope.nodes.items():
            if name not in needed:
                what = "the loop's `update` or `until`" if scope.loop else "`output`, the metric or the loss"
                raise self.err(node.key, expected=f"a node whose output reaches {what}", got="an unused node")

    def _check_params(self) -> None:
        for name in self.spec.params:
            if name not in self.used_params:
                raise self.err(("params", name), expected="a param that a node's template or args use", got="an unused param")

    def _check_demos(self, scope: Scope) -> None:
        """A demos param belongs to one llm node (its examples show that node's inputs and output)."""
        nodes = scope_nodes(scope)
        for name, param in self.spec.params.items():
            if param.kind != "demos":
                for key in ("max", "fields"):
                    if getattr(param, key) is not None:
                        raise self.err(("params", name, key), expected=f"`{key}` only with `kind: demos`",
                                       got=f"`{key}` on a `kind: {param.kind}` param")
                continue
            users = [n for n in nodes if name in n.params]
            bad = next((n for n in users if not n.reads_demos), None)
            if bad is not None:
                raise self.err(("params", name, "kind"), expected="a demos param read by an llm node's template",
                               got=f"`{name}` passed to the {bad.kind} node `{bad.name}`")
            if len(users) != 1:
                raise self.err(("params", name, "kind"), expected="a demos param used by exactly one llm node",
                               got="used by " + ", ".join(f"`{n.name}`" for n in users))
            for i, field_name in enumerate(param.fields or []):
                if not field_name or "." in field_name:
                    raise self.err(("params", name, "fields", i), expected="an example field name, e.g. `question`",
                                   got=repr(field_name))
                self.input_fields.add(field_name)  # the data must have it
        schedule = self.spec.train.demos
        if schedule != "off" and not any(p.kind == "demos" and p.trainable for p in self.spec.params.values()):
            raise self.err(("train", "demos"), expected="a trainable `kind: demos` param for a demo schedule",
                           got=f"`{schedule}` with none")

    def _check_skip(self) -> None:
        kinds = {name: node_spec.kind for name, node_spec, _ in self.spec_tree()}
        traced = "/".join(self.traced_kinds())
        for i, skip in enumerate(self.spec.skip):
            if skip.from_ != "loss" and skip.from_ not in kinds:
                raise self.err(("skip", i, "from"), expected="`loss` or a node name", got=repr(skip.from_))
            if skip.from_ in kinds and not self.kind_class(kinds[skip.from_]).traced:
                # it leaves no call of its own in the trace (a loop): name a node inside it instead
                raise self.err(("skip", i, "from"), expected=f"`loss` or an {traced} node (inside a loop body too)",
                               got=f"the {kinds[skip.from_]} `{skip.from_}`")
            if skip.to not in self.spec.params:
                raise self.err(("skip", i, "to"), expected="a param name", got=repr(skip.to))
            if not self.spec.params[skip.to].trainable:
                raise self.err(("skip", i, "to"), expected="a trainable param", got=f"`{skip.to}` (trainable: false)")
            if self.spec.params[skip.to].kind == "demos":
                raise self.err(("skip", i, "to"), expected="a prompt param (demos get no textual feedback)",
                               got=f"the demos param `{skip.to}`")

    def _check_models(self, scope: Scope) -> None:
        teacher = self.spec.train.teacher
        if teacher is not None and teacher not in self.spec.models:
            raise self.err(("train", "teacher"), expected="a key of `models`", got=repr(teacher))
        # a config nothing uses is most often a misspelt role (`optimiser:` silently leaves the optimizer
        # role to the task model): say so, without failing (a spare config is harmless)
        used = {m for node in scope_nodes(scope) for m in node.models()} | set(MODEL_ROLES) | {teacher}
        for name in self.spec.models:
            if name not in used:
                close = difflib.get_close_matches(name, sorted(MODEL_ROLES), n=1)
                hint = f" (did you mean `{close[0]}`?)" if close else ""
                self.warnings.append(
                    f"warning: {self.err(('models', name)).location()}: used by no node and no "
                    f"role{hint}; the roles are {', '.join(f'`{r}`' for r in MODEL_ROLES)}, a node names its model "
                    "with `model:`, the teacher with `train.teacher`")

    # ---------------------------------------------------------------- drawing graph

    def _build_graph(self, scope: Scope, output: Ref, metric: Metric) -> None:
        g = self.graph
        g.add_node("input", kind="input")

        def add_edge(src: str, dst: str, label: str = "", **attrs: Any) -> None:
            """One edge per pair; its label lists every field read along it (input.hint, input.question)."""
            labels = [x for x in (g.edges[src, dst].get("label") or "").split(", ") if x] if g.has_edge(src, dst) else []
            if label and label not in labels:
                labels.append(label)
            g.add_edge(src, dst, label=", ".join(labels), **attrs)

        def source(ref: Ref, node: NodeKind, parent: str | None) -> str | None:
            src = "input" if ref.root == "input" else (parent if ref.root == "state" and parent else ref.root)
            if ref.root == "iteration" or src == node.name or ref.root in self.spec.params:
                return None
            return src

        def add_scope(sc: Scope, parent: str | None) -> None:
            for node in sc.nodes.values():
                extra = {"when": node.when.source} if node.when is not None else {}
                g.add_node(node.name, kind=node.kind, parent=parent, **node.drawing(), **extra)
                for ref in node.reads:
                    src = source(ref, node, parent)
                    if src is not None:
                        add_edge(src, node.name, str(ref) if ref.path else "")
                for ref in node.condition_inputs():  # what decides whether it runs: drawn dashed
                    src = source(ref, node, parent)
                    if src is not None and not g.has_edge(src, node.name):
                        add_edge(src, node.name, str(ref) if ref.path else "", condition=True)
                for p in node.params:
                    g.add_node(f"param:{p}", kind="param", trainable=self.spec.params[p].trainable)
                    g.add_edge(f"param:{p}", node.name)
                for inner, _ in node.inner_scopes():
                    add_scope(inner, node.name)
                for src, label in node.drawn_inputs():
                    add_edge(src, node.name, label)

        add_scope(scope, None)
        g.add_node("metric", kind="metric", fn=metric.fn_ref)
        for ref in metric.args.values():
            add_edge("input" if ref.root == "input" else ref.root, "metric", str(ref) if ref.path else "")
        g.graph["output"] = output.root


@dataclass
class CompileContext:
    """What a node kind's compile step sees: the spec, where the node sits (the names visible there, the
    loop whose body it is in) and the compiler's shared checks, each raising a located SpecError."""

    compiler: Compiler
    visible: set[str]  # nodes this node may read: its scope's and the enclosing scopes'
    loop: NodeKind | None = None

    @property
    def spec(self):
        return self.compiler.spec

    @property
    def config_dir(self) -> Path:
        return self.compiler.loaded.config_dir

    @property
    def in_loop(self) -> bool:
        return self.loop is not None

    def err(self, key: KeyPath, **kw: Any) -> SpecError:
        return self.compiler.err(key, **kw)

    def ref(self, text: str, key: KeyPath) -> Ref:
        """A reference (`node`, `node.field`, `input.field`, `state.field`, a param) checked against what is visible."""
        return self.compiler.ref(text, key, self.visible, self.in_loop)

    def check_root(self, root: str, path: tuple, key: KeyPath) -> None:
        """Checks a name a template or expression reads (`path` may be ("*",): any field)."""
        self.compiler.check_root(root, path, key, self.visible, self.in_loop)

    def check_field(self, root: str, field_name: Any, key: KeyPath) -> None:
        """`state.x` and `<loop>.x` must name a key of that state."""
        self.compiler.check_field(root, field_name, key)

    def template(self, source: str | None, key: KeyPath) -> Template | None:
        return self.compiler.template(source, key)

    def add_input_fields(self, fields: list[str]) -> None:
        """Example fields the data must have."""
        self.compiler.input_fields.update(fields)

    def function(self, ref: str, key: KeyPath) -> tuple[Callable, frozenset[str]]:
        """The function `ref` names (a builtin, `module:function` or `file.py:function`, user code found
        relative to the spec's folder) and its path arguments; warns when it comes from a risky
        standard-library module."""
        from autodiff_cli.nodes.builtins import resolve_function

        try:
            fn, path_args = resolve_function(ref, self.config_dir)
        except SpecError as e:
            raise self.err(key, expected=e.expected or "an importable `module:function`", got=e.got or e.message,
                           hint=e.hint) from None
        self.compiler.warn_if_risky(ref, fn, key)
        return fn, path_args

    def check_signature(self, fn: Callable, given: set[str], key: KeyPath) -> None:
        self.compiler.check_signature(fn, given, key)

    def data_path(self, value: str, key: KeyPath) -> str:
        """A file a constant names, found next to the config or under $AUTODIFF_DATA."""
        found, tried = resolve_data_path(value, self.config_dir)
        if found is None:
            raise self.err(key, expected="an existing file (relative to the config or $AUTODIFF_DATA)",
                           got=f"{value!r} (tried {', '.join(map(str, tried))})",
                           hint="Fetch public datasets with `autodiff data fetch NAME`.")
        return str(found)

    def inner_scope(self, specs: dict, prefix: KeyPath, holder: NodeKind, state: set[str]) -> InnerScope:
        """Compiles a nested scope (a loop body) held by `holder`, whose nodes read `state` (its keys);
        use it as a context manager: inside, `inner.ctx` resolves references the way the body does."""
        return InnerScope(self, specs, prefix, holder, state)

    def check_used(self, scope: Scope, roots: list[Ref], prefix: KeyPath) -> None:
        self.compiler.check_used(scope, roots, prefix)


class InnerScope:
    """A nested scope being compiled: its state keys stay current until the `with` block ends, so the
    holder can check what reads them (a loop's `update` and `until`)."""

    def __init__(self, outer: CompileContext, specs: dict, prefix: KeyPath, holder: NodeKind, state: set[str]) -> None:
        self.outer, self.specs, self.prefix, self.holder, self.state = outer, specs, prefix, holder, state

    def __enter__(self) -> InnerScope:
        compiler = self.outer.compiler
        compiler.state_stack.append(self.state)
        outside = self.outer.visible - {self.holder.name}
        self.scope = compiler.compile_scope(self.specs, self.prefix, outer=outside, loop=self.holder)
        self.outside = outside
        self.ctx = CompileContext(compiler, visible=set(self.scope.nodes) | outside, loop=self.holder)
        return self

    def __exit__(self, *exc: object) -> None:
        self.outer.compiler.state_stack.pop()


def compile_spec(loaded: LoadedSpec) -> Program:
    """The Program of a loaded spec; its warnings (e.g. a function from a risky stdlib module) go to stderr."""
    program = Compiler(loaded).compile()
    for warning in program.warnings:
        print(warning, file=sys.stderr)
    return program
