"""Spec -> Program: resolve every reference, build the node graph, run the static checks.

Names a node can read:
  input        the example (input.question)
  state        the loop state, inside a loop body (state.context)
  iteration    the loop iteration (0-based), inside a loop body
  <node>       a node's output (a loop's output is its final state: hops.context)
  <param>      a parameter's current value (templates; function args too)
LLM nodes read names from their Jinja templates; function nodes from `args`.
Only loops may create cycles; a loop body is its own scope, unrolled at run time.
"""
from __future__ import annotations

import inspect
import os
import sys
import sysconfig
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import networkx as nx

from autodiff_cli.errors import NotImplementedYet, SpecError
from autodiff_cli.spec.loader import KeyPath, LoadedSpec
from autodiff_cli.spec.models import FunctionNode, LLMNode, LoopNode, ParamSpec, unbuilt_keys
from autodiff_cli.spec.templates import Template, TemplateError, compile_template

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


def risky_stdlib_module(ref: str, fn: Callable | None) -> str | None:
    """The risky standard-library module (RISKY_STDLIB) that `ref` (`module:function`) names, or that the
    function it resolved to comes from (`shlex:os.system` is os.system); None for anything else."""
    named = ref.partition(":")[0].strip() if ":" in ref else ""
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


@dataclass(frozen=True)
class Ref:
    """A reference `root.a.b`: root is input, state, iteration, a node or a param."""

    root: str
    path: tuple[str | int, ...] = ()

    @classmethod
    def parse(cls, text: str) -> "Ref":
        parts = [p.strip() for p in str(text).split(".")]
        if not parts or not all(parts):
            raise ValueError(f"a reference like `node`, `node.field` or `input.field`, got {text!r}")
        return cls(parts[0], tuple(int(p) if p.isdigit() else p for p in parts[1:]))

    def __str__(self) -> str:
        return ".".join([self.root, *map(str, self.path)])


@dataclass
class CompiledNode:
    name: str  # unique across the spec
    kind: str
    spec: Any
    key: KeyPath  # where it is in the spec (for errors)
    topo_index: int = 0
    reads: list[Ref] = field(default_factory=list)  # everything it reads
    params: list[str] = field(default_factory=list)  # params it uses
    # llm
    model: str | None = None
    system: Template | None = None
    user: Template | None = None
    # function
    fn: Callable | None = None
    fn_ref: str | None = None
    args: dict[str, Ref] = field(default_factory=dict)
    constants: dict[str, Any] = field(default_factory=dict)
    # loop
    body: "Scope | None" = None
    until: Any = None  # autodiff_cli.spec.expr.Expr
    update: dict[str, Ref] = field(default_factory=dict)
    initial_state: dict[str, Any] = field(default_factory=dict)
    max_iters: int = 1


@dataclass
class Scope:
    """The nodes of the top level or of one loop body, in execution (topological) order."""

    nodes: dict[str, CompiledNode]
    generations: list[list[str]]  # nodes that may run concurrently, generation by generation
    loop: CompiledNode | None = None


def scope_nodes(scope: Scope) -> list[CompiledNode]:
    """Every node of a scope, loop bodies included, in execution order."""
    out: list[CompiledNode] = []
    for node in scope.nodes.values():
        out.append(node)
        if node.body is not None:
            out += scope_nodes(node.body)
    return out


def invocations(scope: Scope, repeat: int = 1) -> list[tuple[CompiledNode, int]]:
    """Every node that runs (loop bodies included, loops themselves not) with the most times one
    example can invoke it: a loop body runs up to max_iters times per invocation of its loop."""
    out: list[tuple[CompiledNode, int]] = []
    for node in scope.nodes.values():
        if node.body is not None:
            out += invocations(node.body, repeat * node.max_iters)
        else:
            out.append((node, repeat))
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

    def all_nodes(self) -> list[CompiledNode]:
        return scope_nodes(self.scope)

    def node(self, name: str) -> CompiledNode:
        for n in self.all_nodes():
            if n.name == name:
                return n
        raise KeyError(name)


def data_root() -> Path:
    return Path(os.environ.get("AUTODIFF_DATA", "datasets"))


def resolve_data_path(text: str, config_dir: Path) -> tuple[Path | None, list[Path]]:
    """A path relative to the config, else to $AUTODIFF_DATA. Returns (found, tried)."""
    p = Path(text).expanduser()
    if p.is_absolute():
        return (p if p.exists() else None), [p]
    tried = [config_dir / p, data_root() / p]
    for candidate in tried:
        if candidate.exists():
            return candidate, tried
    return None, tried


class Compiler:
    def __init__(self, loaded: LoadedSpec) -> None:
        self.loaded = loaded
        self.spec = loaded.spec
        self.err = loaded.error
        self.topo_counter = 0
        self.input_fields: set[str] = set()
        self.used_params: set[str] = set()
        self.graph = nx.DiGraph()
        self.loop_names: set[str] = set()
        self.state_stack: list[set[str]] = []  # state keys of the loops being compiled, innermost last
        self.loop_states: dict[str, set[str]] = {}  # loop name -> its state keys (its output's fields)
        self.warnings: list[str] = []

        def find_loops(nodes: dict) -> None:
            for name, node in nodes.items():
                if isinstance(node, LoopNode):
                    self.loop_states[name] = set(node.state)
                    find_loops(node.body)

        find_loops(self.spec.nodes)

    # ---------------------------------------------------------------- entry

    def compile(self) -> Program:
        for key, what in unbuilt_keys(self.spec):
            raise self.err(key, cls=NotImplementedYet, expected="a key whose behaviour is built",
                           got=f"{what}: not implemented yet")
        self._check_names()
        scope = self._compile_scope(self.spec.nodes, ("nodes",), outer=set(), loop=None)
        self._number(scope)
        output = self._ref(self.spec.output, ("output",), visible=set(scope.nodes), scope_nodes=set(scope.nodes))
        metric = self._metric(self.spec.metric, ("metric",), set(scope.nodes))
        loss = self._metric(self.spec.loss, ("loss",), set(scope.nodes)) if self.spec.loss else metric
        self._check_used(scope, [output, *metric.args.values(), *loss.args.values()], ("nodes",))
        self._check_params()
        self._check_demos(scope)
        self._check_skip(set(scope.nodes))
        self._check_models()
        self._build_graph(scope, output, metric)
        return Program(self.loaded, scope, output, metric, loss, dict(self.spec.params), self.graph, self.input_fields,
                       self.warnings)

    def _warn_if_risky(self, ref: str, fn: Callable, key: KeyPath) -> None:
        module = risky_stdlib_module(ref, fn)
        if module is not None:
            where = self.err(key).location()
            self.warnings.append(f"warning: {where}: {ref} is from the standard library module `{module}`, "
                                 f"{RISKY_STDLIB[module.split('.')[0]]}; configs are code (see README \"Trust model\")")

    # ---------------------------------------------------------------- names

    def _check_names(self) -> None:
        seen: dict[str, KeyPath] = {}

        def visit(nodes: dict, prefix: KeyPath) -> None:
            for name, node in nodes.items():
                key = prefix + (name,)
                if name in RESERVED:
                    raise self.err(key, expected=f"a node name other than {', '.join(sorted(RESERVED))}", got=repr(name))
                if name in self.spec.params:
                    raise self.err(key, expected="a node name that is not also a param name", got=repr(name))
                if name in seen:
                    raise self.err(key, expected="node names unique across the spec (loop bodies included)",
                                   got=f"`{name}` again (first at {'.'.join(map(str, seen[name]))})")
                seen[name] = key
                if isinstance(node, LoopNode):
                    visit(node.body, key + ("body",))

        visit(self.spec.nodes, ("nodes",))
        for name in self.spec.params:
            if name in RESERVED:
                raise self.err(("params", name), expected="a param name other than " + ", ".join(sorted(RESERVED)), got=repr(name))

    # ---------------------------------------------------------------- scopes

    def _compile_scope(self, specs: dict, prefix: KeyPath, outer: set[str], loop: CompiledNode | None) -> Scope:
        local = set(specs)
        visible = local | outer
        compiled: dict[str, CompiledNode] = {}
        for name, node_spec in specs.items():
            key = prefix + (name,)
            if isinstance(node_spec, LLMNode):
                compiled[name] = self._llm(name, node_spec, key, visible, loop)
            elif isinstance(node_spec, FunctionNode):
                compiled[name] = self._function(name, node_spec, key, visible, loop)
            else:
                compiled[name] = self._loop(name, node_spec, key, visible)
        order, generations = self._order(compiled, local, prefix)
        return Scope({n: compiled[n] for n in order}, generations, loop)

    def _number(self, scope: Scope) -> None:
        """Topological indices over the whole program; a loop's body numbers right after the loop."""
        for node in scope.nodes.values():
            node.topo_index = self.topo_counter
            self.topo_counter += 1
            if node.body is not None:
                self._number(node.body)

    def _order(self, compiled: dict[str, CompiledNode], local: set[str], prefix: KeyPath) -> tuple[list[str], list[list[str]]]:
        g = nx.DiGraph()
        declared = list(compiled)
        g.add_nodes_from(declared)
        for name, node in compiled.items():
            for ref in node.reads:
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

    def _ref(self, text: str, key: KeyPath, visible: set[str], scope_nodes: set[str], in_loop: bool = False) -> Ref:
        try:
            ref = Ref.parse(text)
        except ValueError as e:
            raise self.err(key, expected=str(e).split(", got")[0], got=repr(text)) from None
        self._check_root(ref.root, ref.path, key, visible, in_loop)
        return ref

    def _check_root(self, root: str, path: tuple, key: KeyPath, visible: set[str], in_loop: bool) -> None:
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
                self._check_field(root, path[0], key)
            return
        if root in self.spec.params:
            self.used_params.add(root)
            return
        if root in visible:
            if path and path[0] != "*":
                self._check_field(root, path[0], key)
            return
        known = sorted(visible | set(self.spec.params) | {"input"})
        raise self.err(key, expected="a node, param or `input` (" + ", ".join(known) + ")", got=f"unknown name `{root}`")

    def _check_field(self, root: str, field_name: Any, key: KeyPath) -> None:
        """`state.x` and `<loop>.x` (a loop's output is its final state) must name a key of that state."""
        if root == "state":
            known, what = (self.state_stack[-1] if self.state_stack else None), "the loop's `state`"
        else:
            known, what = self.loop_states.get(root), f"`{root}`'s final `state` (a loop's output)"
        if known is not None and str(field_name) not in known:
            raise self.err(key, expected=f"a key of {what}: {', '.join(sorted(known)) or 'none'}",
                           got=f"`{root}.{field_name}`")

    # ---------------------------------------------------------------- node kinds

    def _template(self, source: str | None, key: KeyPath) -> Template | None:
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

    def _llm(self, name: str, spec: LLMNode, key: KeyPath, visible: set[str], loop: CompiledNode | None) -> CompiledNode:
        node = CompiledNode(name, "llm", spec, key, model=spec.model)
        if spec.model not in self.spec.models:
            raise self.err(key + ("model",), expected="a key of `models` (" + ", ".join(self.spec.models) + ")", got=repr(spec.model))
        node.system = self._template(spec.system, key + ("system",))
        node.user = self._template(spec.user, key + ("user",))
        for part, tmpl in (("system", node.system), ("user", node.user)):
            if tmpl is None:
                continue
            for var in sorted(tmpl.names):
                self._check_root(var, ("*",) if var == "input" else (), key + (part,), visible, loop is not None)
                for attr in sorted(a for n, a in tmpl.attributes if n == var):
                    self._check_field(var, attr, key + (part,))
                if var == "input":
                    fields = sorted(a for n, a in tmpl.attributes if n == "input")
                    if not fields:
                        raise self.err(key + (part,), expected="a field of the example, e.g. `{{ input.question }}`", got="`input` alone")
                    self.input_fields.update(fields)
                    node.reads += [Ref("input", (f,)) for f in fields]
                elif var == "state":
                    fields = sorted(a for n, a in tmpl.attributes if n == "state")
                    node.reads += [Ref("state", (f,)) for f in fields] or [Ref("state")]
                elif var in self.spec.params:
                    if var not in node.params:
                        node.params.append(var)
                else:
                    # precise provenance: `hops.context` reads one state field, `hops` all of it
                    fields = sorted(a for n, a in tmpl.attributes if n == var)
                    if var in tmpl.bare or not fields:
                        node.reads.append(Ref(var))
                    node.reads += [Ref(var, (f,)) for f in fields]
        for p in spec.params or []:
            if p not in self.spec.params:
                raise self.err(key + ("params",), expected="names of params", got=f"unknown param `{p}`")
            if p not in node.params:
                raise self.err(key + ("params",), expected="params the system/user templates use",
                               got=f"`{p}`, which neither template mentions")
        node.reads = _unique(node.reads)
        return node

    def _function(self, name: str, spec: FunctionNode, key: KeyPath, visible: set[str], loop: CompiledNode | None) -> CompiledNode:
        from autodiff_cli.nodes.builtins import resolve_function

        node = CompiledNode(name, "function", spec, key, fn_ref=spec.fn)
        try:
            fn, path_args = resolve_function(spec.fn)
        except SpecError as e:
            raise self.err(key + ("fn",), expected=e.expected or "an importable `module:function`", got=e.got or e.message) from None
        node.fn = fn
        self._warn_if_risky(spec.fn, fn, key + ("fn",))
        for arg, text in spec.args.items():
            ref = self._ref(text, key + ("args", arg), visible, set(), loop is not None)
            node.args[arg] = ref
            if ref.root in self.spec.params:
                node.params.append(ref.root)
        node.reads = _unique(list(node.args.values()))
        overlap = set(spec.args) & set(spec.with_)
        if overlap:
            raise self.err(key + ("with",), expected="constants for arguments not already in `args`", got=", ".join(sorted(overlap)))
        for arg, value in spec.with_.items():
            if arg in path_args and isinstance(value, str):
                found, tried = resolve_data_path(value, self.loaded.config_dir)
                if found is None:
                    raise self.err(key + ("with", arg), expected="an existing file (relative to the config or $AUTODIFF_DATA)",
                                   got=f"{value!r} (tried {', '.join(map(str, tried))})",
                                   hint="Fetch public datasets with `autodiff data fetch NAME`.")
                value = str(found)
            node.constants[arg] = value
        self._check_signature(fn, set(spec.args) | set(spec.with_), key)
        return node

    def _check_signature(self, fn: Callable, given: set[str], key: KeyPath) -> None:
        try:
            sig = inspect.signature(fn)
        except (TypeError, ValueError):
            return
        try:
            sig.bind(**{name: None for name in given})
        except TypeError as e:
            raise self.err(key + ("args",), expected=f"the arguments of {getattr(fn, '__name__', 'fn')}{sig}",
                           got=f"{', '.join(sorted(given)) or 'none'} ({e})") from None

    def _loop(self, name: str, spec: LoopNode, key: KeyPath, visible: set[str]) -> CompiledNode:
        from autodiff_cli.spec.expr import ExprError, compile_expr

        node = CompiledNode(name, "loop", spec, key, max_iters=spec.max_iters, initial_state=dict(spec.state))
        outer = visible - {name}
        self.state_stack.append(set(spec.state))
        node.body = self._compile_scope(spec.body, key + ("body",), outer=outer, loop=node)
        body_names = set(node.body.nodes)
        for field_name, text in spec.update.items():
            if field_name not in spec.state:
                raise self.err(key + ("update", field_name), expected="a key of the loop's `state` (" + ", ".join(spec.state) + ")",
                               got=repr(field_name))
            node.update[field_name] = self._ref(text, key + ("update", field_name), body_names | outer, body_names, True)
        self.state_stack.pop()
        if spec.until is not None:
            try:
                node.until = compile_expr(spec.until)
            except ExprError as e:
                raise self.err(key + ("until",), expected="a restricted expression (no calls but len, lower, ...)", got=str(e)) from None
            for var in sorted(node.until.names):
                if var not in body_names | {"state", "input", "iteration"}:
                    raise self.err(key + ("until",), expected="names of body nodes, `state`, `input` or `iteration`",
                                   got=f"unknown name `{var}`")
        if not spec.update and spec.until is None:
            raise self.err(key, expected="a loop with `update` (state carried between iterations) or `until`", got="neither")
        roots = list(node.update.values()) + [Ref(v) for v in (node.until.names if node.until else ()) if v in body_names]
        self._check_used(node.body, roots, key + ("body",))
        # the loop reads whatever its body reads from outside
        outside: list[Ref] = []
        for inner in node.body.nodes.values():
            outside += [r for r in inner.reads if r.root in outer or r.root == "input"]
        node.reads = _unique(outside)
        return node

    def _metric(self, spec, key: KeyPath, visible: set[str]) -> Metric:
        from autodiff_cli.nodes.metrics import resolve_metric

        try:
            fn = resolve_metric(spec.fn)
        except SpecError as e:
            raise self.err(key + ("fn",), expected=e.expected or "a metric name or `module:function`", got=e.got or e.message) from None
        self._warn_if_risky(spec.fn, fn, key + ("fn",))
        args = {a: self._ref(t, key + ("args", a), visible, visible) for a, t in spec.args.items()}
        self._check_signature(fn, set(args), key)
        where = self.err(key + ("fn",))
        return Metric(fn, spec.fn, args, key, getattr(spec, "feedback", "template"), where.file, where.line)

    # ---------------------------------------------------------------- usage checks

    def _check_used(self, scope: Scope, roots: list[Ref], prefix: KeyPath) -> None:
        """Every node of a scope must feed one of the roots (output, metric, loop update)."""
        needed: set[str] = set()
        stack = [r.root for r in roots if r.root in scope.nodes]
        while stack:
            name = stack.pop()
            if name in needed:
                continue
            needed.add(name)
            stack += [r.root for r in scope.nodes[name].reads if r.root in scope.nodes]
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
            if any(n.kind != "llm" for n in users):
                bad = next(n.name for n in users if n.kind != "llm")
                raise self.err(("params", name, "kind"), expected="a demos param read by an llm node's template",
                               got=f"`{name}` passed to the function node `{bad}`")
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

    def _check_skip(self, top_nodes: set[str]) -> None:
        all_names = {n for n in self._all_names()}
        for i, skip in enumerate(self.spec.skip):
            if skip.from_ != "loss" and skip.from_ not in all_names:
                raise self.err(("skip", i, "from"), expected="`loss` or a node name", got=repr(skip.from_))
            if skip.from_ in self.loop_names:
                # a loop leaves no call of its own in the trace: name the body node instead
                raise self.err(("skip", i, "from"), expected="`loss` or an llm/function node (inside a loop body too)",
                               got=f"the loop `{skip.from_}`")
            if skip.to not in self.spec.params:
                raise self.err(("skip", i, "to"), expected="a param name", got=repr(skip.to))
            if not self.spec.params[skip.to].trainable:
                raise self.err(("skip", i, "to"), expected="a trainable param", got=f"`{skip.to}` (trainable: false)")
            if self.spec.params[skip.to].kind == "demos":
                raise self.err(("skip", i, "to"), expected="a prompt param (demos get no textual feedback)",
                               got=f"the demos param `{skip.to}`")

    def _all_names(self) -> list[str]:
        names: list[str] = []

        def walk(nodes: dict) -> None:
            for n, s in nodes.items():
                names.append(n)
                if isinstance(s, LoopNode):
                    self.loop_names.add(n)
                    walk(s.body)

        walk(self.spec.nodes)
        return names

    def _check_models(self) -> None:
        teacher = self.spec.train.teacher
        if teacher is not None and teacher not in self.spec.models:
            raise self.err(("train", "teacher"), expected="a key of `models`", got=repr(teacher))

    # ---------------------------------------------------------------- drawing graph

    def _build_graph(self, scope: Scope, output: Ref, metric: Metric) -> None:
        g = self.graph
        g.add_node("input", kind="input")

        def add_edge(src: str, dst: str, label: str = "") -> None:
            """One edge per pair; its label lists every field read along it (input.hint, input.question)."""
            labels = [x for x in (g.edges[src, dst].get("label") or "").split(", ") if x] if g.has_edge(src, dst) else []
            if label and label not in labels:
                labels.append(label)
            g.add_edge(src, dst, label=", ".join(labels))

        def add_scope(sc: Scope, parent: str | None) -> None:
            for node in sc.nodes.values():
                g.add_node(node.name, kind=node.kind, parent=parent, model=node.model, fn=node.fn_ref)
                for ref in node.reads:
                    src = "input" if ref.root == "input" else (parent if ref.root == "state" and parent else ref.root)
                    if ref.root in ("iteration",) or src == node.name:
                        continue
                    if ref.root in self.spec.params:
                        continue
                    add_edge(src, node.name, str(ref) if ref.path else "")
                for p in node.params:
                    g.add_node(f"param:{p}", kind="param", trainable=self.spec.params[p].trainable)
                    g.add_edge(f"param:{p}", node.name)
                if node.body:
                    add_scope(node.body, node.name)
                    for field_name, ref in node.update.items():
                        add_edge(ref.root, node.name, f"state.{field_name}")

        add_scope(scope, None)
        g.add_node("metric", kind="metric", fn=metric.fn_ref)
        for ref in metric.args.values():
            add_edge("input" if ref.root == "input" else ref.root, "metric", str(ref) if ref.path else "")
        g.graph["output"] = output.root


def _unique(refs: list[Ref]) -> list[Ref]:
    seen: dict[Ref, None] = {}
    for r in refs:
        seen.setdefault(r, None)
    return list(seen)


def compile_spec(loaded: LoadedSpec) -> Program:
    """The Program of a loaded spec; its warnings (e.g. a function from a risky stdlib module) go to stderr."""
    program = Compiler(loaded).compile()
    for warning in program.warnings:
        print(warning, file=sys.stderr)
    return program
