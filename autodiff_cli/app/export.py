"""`autodiff export-prompts RUN_DIR --format yaml|json|md|config`: a run's best prompts as plain text.

- yaml / json: `{"params": {name: value}, "nodes": {node: {"system": text, "user": text}}}`, loadable by
  `autodiff eval --prompts` (which reads `params`). Node prompts are rendered with the run's param
  values; everything else stays a visible placeholder (`{{ input.question }}`, `{{ retrieve }}`).
- md: a readable document: run, best step and score, each node's prompts, each param's value (a demos
  param's also the example ids behind it, from the checkpoint).
- config: the run's resolved.yaml with every `params.<name>.value` replaced by the best value. Its
  relative paths are relative to the original config's folder: put the file there (or use absolute
  paths) and `autodiff eval` on it scores exactly as the run's best prompts.

Everything comes from the run directory (config.yaml, resolved.yaml, prompts.yaml, summary.json);
summary.json's `config_path` (absolute, recorded by the trainer) says where relative paths start.
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from autodiff_cli.errors import AutodiffError, UsageError
from autodiff_cli.io.rundir import RunDir, dump_yaml

FORMATS = ("yaml", "json", "md", "config")


def check_format(fmt: str) -> None:
    if fmt not in FORMATS:
        raise UsageError(key="--format", expected="yaml, json, md or config", got=repr(fmt))


# ---------------------------------------------------------------- placeholders


class Placeholder:
    """A stand-in for a value known only at run time. Attribute and item access extend its dotted
    path; str() is `{{ path }}`. Works in Jinja's sandbox (no underscore attribute is ever served)."""

    __slots__ = ("_path",)
    # attributes Jinja's runtime and sandbox probe on values: answer them plainly
    unsafe_callable = False
    alters_data = False
    jinja_pass_arg = None

    def __init__(self, path: str) -> None:
        self._path = path

    def __getattr__(self, name: str) -> Placeholder:
        if name.startswith("_"):
            raise AttributeError(name)
        return Placeholder(f"{self._path}.{name}")

    def __getitem__(self, key: Any) -> Placeholder:
        if isinstance(key, str) and key.isidentifier():
            return Placeholder(f"{self._path}.{key}")
        return Placeholder(f"{self._path}[{key!r}]")

    def __call__(self, *args: Any, **kwargs: Any) -> Placeholder:
        return Placeholder(f"{self._path}()")

    def __iter__(self):
        yield Placeholder(f"{self._path}[i]")

    def __len__(self) -> int:
        return 1

    def __bool__(self) -> bool:
        return True

    def _op(self, op: str, other: Any, reverse: bool = False) -> Placeholder:
        other_text = other._path if isinstance(other, Placeholder) else repr(other)
        return Placeholder(f"{other_text} {op} {self._path}" if reverse else f"{self._path} {op} {other_text}")

    def __add__(self, other: Any) -> Placeholder:
        return self._op("+", other)

    def __radd__(self, other: Any) -> Placeholder:
        return self._op("+", other, True)

    def __sub__(self, other: Any) -> Placeholder:
        return self._op("-", other)

    def __rsub__(self, other: Any) -> Placeholder:
        return self._op("-", other, True)

    def __mul__(self, other: Any) -> Placeholder:
        return self._op("*", other)

    def __rmul__(self, other: Any) -> Placeholder:
        return self._op("*", other, True)

    def __str__(self) -> str:
        return "{{ " + self._path + " }}"

    __repr__ = __str__


def render_with_placeholders(template: Any, values: dict[str, str]) -> str:
    """`template` (templates.Template) rendered with the param `values`; every other name a Placeholder.
    A template that cannot render that way (e.g. arithmetic on a node's output) is shown as written."""
    from autodiff_cli.spec.templates import TemplateError

    env_globals = getattr(getattr(template._compiled, "environment", None), "globals", {})
    context: dict[str, Any] = {}
    for name in template.names:
        if name in values:
            context[name] = values[name]
        elif name not in env_globals:
            context[name] = Placeholder(name)
    try:
        return template.render(context)
    except TemplateError:
        return template.source


# ---------------------------------------------------------------- the run


@dataclass
class PromptNode:
    name: str
    model: str | None
    loop: str | None  # the loop whose body holds it
    system: Any  # templates.Template | None
    user: Any
    params: list[str]


@dataclass
class RunView:
    run: RunDir
    summary: dict
    resolved: dict
    values: dict[str, str]  # best value of every param of the spec
    initial: dict[str, str]  # the spec's values
    config_path: Path  # where the spec's relative paths start (the original config, else the run's copy)


def _param_entries(resolved: dict) -> dict[str, Any]:
    params = resolved.get("params")
    return params if isinstance(params, dict) else {}


def _initial_value(entry: Any) -> str:
    if isinstance(entry, dict):
        value = entry.get("value", "")
        return "" if value is None else str(value)
    return "" if entry is None else str(entry)


def open_run(run_dir: Path) -> RunView:
    run = RunDir.open(run_dir)
    summary = run.read_summary()
    resolved = run.read_resolved()
    initial = {str(name): _initial_value(entry) for name, entry in _param_entries(resolved).items()}
    best = run.read_prompts()
    if not best and initial:
        from autodiff_cli.app.console import log

        log(f"{run.path}: no prompts.yaml yet; exporting the spec's initial values")
    values = {name: best.get(name, value) for name, value in initial.items()}
    config_path = run.path / "config.yaml"
    recorded = summary.get("config_path")
    if isinstance(recorded, str) and recorded and Path(recorded).is_file():
        config_path = Path(recorded)
    return RunView(run, summary, resolved, values, initial, config_path)


def loaded_spec(view: RunView):
    """The run's resolved spec, located at the original config (so relative paths resolve as in the run)."""
    from autodiff_cli.spec.loader import LoadedSpec, validate_spec

    try:
        spec = validate_spec(view.resolved, view.config_path, {}, {})
        return LoadedSpec(spec=spec, path=view.config_path, raw=view.resolved)
    except AutodiffError:
        from autodiff_cli.spec.loader import load_spec

        return load_spec(view.run.path / "config.yaml")  # an older resolved.yaml: the spec as given


def prompt_nodes(view: RunView) -> list[PromptNode]:
    """The LLM nodes with their templates: in execution order when the spec compiles here, else as declared."""
    from autodiff_cli.nodes.compiler import compile_spec

    loaded = loaded_spec(view)
    try:
        program = compile_spec(loaded)
    except AutodiffError:  # e.g. a data file of a function node is missing on this machine
        return _declared_nodes(loaded.spec)
    out = []
    for node in program.all_nodes():
        templates = node.templates()
        if not templates:
            continue
        out.append(PromptNode(node.name, node.models()[0], _loop_of(program, node.name), templates.get("system"),
                              templates.get("user"), list(node.params)))
    return out


def _loop_of(program: Any, name: str) -> str | None:
    """The node whose nested scope (a loop's body) holds `name`, if any."""
    for node in program.all_nodes():
        if any(name in scope.nodes for scope, _ in node.inner_scopes()):
            return node.name
    return None


def _declared_nodes(spec: Any) -> list[PromptNode]:
    """The nodes with prompts as the spec declares them, read by their kinds' own models, without compiling."""
    from pydantic import ValidationError

    from autodiff_cli.nodes.registry import KINDS, kind_class
    from autodiff_cli.spec.templates import TemplateError, compile_template

    def template(source: str | None):
        if source is None:
            return None
        try:
            return compile_template(source)
        except TemplateError:
            return None

    out: list[PromptNode] = []

    def walk(nodes: dict, loop: str | None) -> None:
        for name, raw in nodes.items():
            if not isinstance(raw, dict) or raw.get("kind") not in KINDS:
                continue
            cls = kind_class(raw["kind"])
            try:
                node = cls.Spec.model_validate(raw)
            except ValidationError:
                continue
            declared = cls.declared_prompt(node)
            if declared is not None:
                model, sources = declared
                system, user = template(sources.get("system")), template(sources.get("user"))
                used = set().union(*(t.names for t in (system, user) if t is not None))
                out.append(PromptNode(name, model, loop, system, user, [p for p in spec.params if p in used]))
            nested = cls.nested_specs(node)
            if nested is not None:
                walk(nested[1], name)

    walk(spec.nodes, None)
    return out


def rendered_nodes(view: RunView) -> dict[str, dict[str, str | None]]:
    nodes: dict[str, dict[str, str | None]] = {}
    for node in prompt_nodes(view):
        nodes[node.name] = {
            "system": None if node.system is None else render_with_placeholders(node.system, view.values),
            "user": None if node.user is None else render_with_placeholders(node.user, view.values),
        }
    return nodes


# ---------------------------------------------------------------- formats


def export_prompts(run_dir: Path, fmt: str) -> str:
    """The run's best prompts in `fmt` (yaml, json, md or config), as text ending with a newline."""
    check_format(fmt)
    view = open_run(Path(run_dir))
    if fmt == "config":
        return _config(view)
    if fmt == "md":
        return _markdown(view)
    data = {"params": dict(view.values), "nodes": rendered_nodes(view)}
    if fmt == "json":
        return json.dumps(data, ensure_ascii=False, indent=2) + "\n"
    return dump_yaml(data)


def _best(view: RunView) -> dict:
    best = view.summary.get("best")
    return best if isinstance(best, dict) else {}


def _score(value: Any) -> str:
    return f"{value:.4f}" if isinstance(value, (int, float)) and not isinstance(value, bool) else "-"


def _config(view: RunView) -> str:
    import copy

    from autodiff_cli.spec.loader import validate_spec

    baked = copy.deepcopy(view.resolved)
    params = baked.get("params")
    for name, value in view.values.items():
        entry = params.get(name)
        if isinstance(entry, dict):
            entry["value"] = value
        else:
            params[name] = {"value": value}
    validate_spec(baked, view.config_path, {}, {})  # the baked spec must load as the run's did
    best = _best(view)
    step = best.get("step")
    where = view.config_path.parent if view.config_path != view.run.path / "config.yaml" else None
    header = [
        f"# Exported by `autodiff export-prompts --format config` from run {view.run.path.resolve()}",
        f"# params.*.value are the run's best prompts (step {step if step is not None else '?'}, "
        f"val {_score(best.get('val'))}).",
        "# Relative paths (data, fake/ scripts, function files) are relative to the original config's folder"
        + (f":\n#   {where.resolve()}" if where is not None else "."),
        "# Put this file there (or make those paths absolute) before running it.",
    ]
    return "\n".join(header) + "\n" + dump_yaml(baked)


def best_demo_ids(view: RunView) -> dict[str, dict]:
    """The demo ids behind the best values' demos params (from the checkpoint's history), if any."""
    try:
        state = (view.run.read_checkpoint() or {}).get("state") or {}
    except AutodiffError:
        return {}
    step = _best(view).get("step", state.get("best_step"))
    for entry in reversed(state.get("history") or []):
        if isinstance(entry, dict) and entry.get("step") == step:
            ids = entry.get("demo_ids")
            return ids if isinstance(ids, dict) else {}
    return {}


def _fence(text: str, info: str = "text") -> str:
    longest = max((len(m) for m in re.findall(r"`{3,}", text)), default=2)
    fence = "`" * max(3, longest + 1)
    return f"{fence}{info}\n{text}{'' if text.endswith(chr(10)) else chr(10)}{fence}"


def _markdown(view: RunView) -> str:
    summary = view.summary
    best = _best(view)
    initial = summary.get("initial") if isinstance(summary.get("initial"), dict) else {}
    name = summary.get("name") or view.resolved.get("name") or view.run.name
    lines = [f"# Prompts of run `{view.run.name}`", ""]
    lines.append(f"- pipeline: `{name}`")
    lines.append(f"- run directory: `{view.run.path.resolve()}`")
    if summary.get("config_path"):
        lines.append(f"- config: `{summary['config_path']}`")
    if summary.get("status"):
        lines.append(f"- status: {summary['status']}" + (f" ({summary['reason']})" if summary.get("reason") else ""))
    if best:
        test = f", test {_score(best.get('test'))}" if best.get("test") is not None else ""
        lines.append(f"- best step: {best.get('step', '?')} (val {_score(best.get('val'))}{test})")
    if initial:
        test = f", test {_score(initial.get('test'))}" if initial.get("test") is not None else ""
        lines.append(f"- initial: val {_score(initial.get('val'))}{test}")
    if not summary:
        lines.append("- no summary.json yet")
    lines += ["", "Names in `{{ ... }}` are filled in at run time (the example, other nodes' outputs, loop state).", ""]

    lines += ["## Nodes", ""]
    for node in prompt_nodes(view):
        where = f", in loop `{node.loop}`" if node.loop else ""
        model = f", model `{node.model}`" if node.model else ""
        uses = f"; params: {', '.join(f'`{p}`' for p in node.params)}" if node.params else ""
        lines += [f"### `{node.name}`", "", f"LLM node{model}{where}{uses}.", ""]
        for part, tmpl in (("System", node.system), ("User", node.user)):
            if tmpl is None:
                continue
            lines += [f"{part} prompt:", "", _fence(render_with_placeholders(tmpl, view.values)), ""]

    lines += ["## Params", ""]
    entries = _param_entries(view.resolved)
    demo_ids = best_demo_ids(view)
    for pname, value in view.values.items():
        entry = entries.get(pname) if isinstance(entries.get(pname), dict) else {}
        facts = [str(entry.get("kind") or "prompt")]
        if entry.get("trainable", True) is False:
            facts.append("not trainable")
        facts.append("changed by training" if value != view.initial.get(pname) else "unchanged")
        ids = demo_ids.get(pname) or {}
        for kind, what in (("bootstrapped", "teacher-traced demos"), ("raw", "labelled demos")):
            if ids.get(kind):
                facts.append(f"{what} from examples " + ", ".join(f"`{i}`" for i in ids[kind]))
        lines += [f"### `{pname}`", "", f"{', '.join(facts)}" + (f" — {entry['role']}" if entry.get("role") else ""), "",
                  _fence(value), ""]
    return "\n".join(lines).rstrip("\n") + "\n"
