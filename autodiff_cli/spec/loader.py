"""Read a YAML spec with line numbers, apply `--set` overrides, validate it.

Every error names the file, the line and the key path, and says what was expected.
"""
from __future__ import annotations

import copy
import difflib
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, get_args, get_origin

import yaml
from pydantic import BaseModel, ValidationError

from autodiff_cli.errors import SpecError, describe
from autodiff_cli.spec.models import (
    Spec,
    is_env_var_name,
    is_secret_key,
    looks_secret,
    secret_in,
)

KeyPath = tuple  # of str | int


@dataclass
class LoadedSpec:
    spec: Spec
    path: Path  # the config file
    raw: dict  # the data after --set, before defaults
    lines: dict[KeyPath, int] = field(default_factory=dict)
    overrides: dict[KeyPath, str] = field(default_factory=dict)  # key path -> the --set argument

    @property
    def config_dir(self) -> Path:
        return self.path.parent

    def error(self, key: KeyPath, **kw: Any) -> SpecError:
        """A SpecError located at `key` (the nearest line the file has for it)."""
        return located_error(self.path, self.lines, self.overrides, key, **kw)

    def validate(self, model: type[BaseModel], data: Any, key: KeyPath) -> Any:
        """`data` (the raw value at `key`) validated by `model`, with errors located in the file."""
        return validate_part(model, data, key, self.path, self.lines, self.overrides)


def key_text(key: KeyPath) -> str:
    return ".".join(str(k) for k in key)


def located_error(path: Path, lines: dict, overrides: dict, key: KeyPath, cls=SpecError, **kw: Any) -> SpecError:
    for n in range(len(key), 0, -1):
        if key[:n] in overrides:
            return cls(file=f"--set {overrides[key[:n]]}", key=key_text(key), **kw)
    # a --set inside the faulty mapping (or beside a key the file lacks) caused the error
    scope = key if key in lines else key[:-1]
    if scope:
        for over, arg in overrides.items():
            if over[: len(scope)] == scope:
                return cls(file=f"--set {arg}", key=key_text(key), **kw)
    line = None
    for n in range(len(key), -1, -1):
        if key[:n] in lines:
            line = lines[key[:n]]
            break
    return cls(file=path, line=line, key=key_text(key) or None, **kw)


# ---------------------------------------------------------------- YAML with lines


def _walk_lines(node: yaml.Node, path: KeyPath, lines: dict, file: Path, walked: set | None = None) -> None:
    walked = set() if walked is None else walked
    # an alias (*a) is the anchored node itself: walk it once (recursive aliases and alias bombs
    # like "billion laughs" would otherwise never end); its lines are already known
    if id(node) in walked:
        return
    walked.add(id(node))
    if isinstance(node, yaml.ScalarNode):
        _check_text(node, path, file)
    if isinstance(node, yaml.MappingNode):
        seen: dict[Any, int] = {}
        for key_node, value_node in node.value:
            line = key_node.start_mark.line + 1
            if not isinstance(key_node, yaml.ScalarNode):
                raise SpecError(file=file, line=line, key=key_text(path) or None, expected="a plain key (a name)",
                                got="a list or mapping used as a key")
            _check_text(key_node, path, file)
            key = key_node.value
            if key in seen:
                raise SpecError(file=file, line=line, key=key_text(path + (key,)),
                                expected="each key once", got=f"a duplicate of line {seen[key]}")
            seen[key] = line
            lines[path + (key,)] = line
            _walk_lines(value_node, path + (key,), lines, file, walked)
    elif isinstance(node, yaml.SequenceNode):
        for i, item in enumerate(node.value):
            lines[path + (i,)] = item.start_mark.line + 1
            _walk_lines(item, path + (i,), lines, file, walked)


MAX_EXPANDED_NODES = 100_000  # far above any real spec; aliases can make a small file expand without bound


def _check_expanded_size(node: yaml.Node, path: KeyPath, file: Path) -> None:
    """Refuse a document whose aliases expand to more than MAX_EXPANDED_NODES values ("billion
    laughs"): a cache key, a run's config.yaml or a template would have to expand it. The error
    names the innermost key whose value alone is too big."""
    sizes: dict[int, float] = {}

    def size(n: yaml.Node) -> float:
        if id(n) not in sizes:
            sizes[id(n)] = float("inf")  # while in progress: a node that contains itself never ends
            children = ([v for pair in n.value for v in pair] if isinstance(n, yaml.MappingNode)
                        else n.value if isinstance(n, yaml.SequenceNode) else [])
            sizes[id(n)] = min(1 + sum(size(c) for c in children), float("inf"))
        return sizes[id(n)]

    if size(node) <= MAX_EXPANDED_NODES:
        return
    visited: set[int] = set()
    while id(node) not in visited:  # descend to the innermost key that is too big on its own
        visited.add(id(node))
        items = (node.value if isinstance(node, yaml.MappingNode)
                 else list(enumerate(node.value)) if isinstance(node, yaml.SequenceNode) else [])
        big = [(k, v) for k, v in items if size(v) > MAX_EXPANDED_NODES]
        if not big:
            break
        key, node = big[0]
        path += (key.value if isinstance(key, yaml.ScalarNode) else key,)
    got = "a value that never ends (it contains itself)" if size(node) == float("inf") else \
        f"{size(node):,.0f} values once its aliases (*name) are expanded"
    raise SpecError(file=file, line=node.start_mark.line + 1, key=key_text(path) or None,
                    expected=f"at most {MAX_EXPANDED_NODES:,} values", got=got)


def _check_text(node: yaml.ScalarNode, path: KeyPath, file: Path) -> None:
    try:
        node.value.encode("utf-8")
    except UnicodeEncodeError:  # a "\ud800" escape: no UTF-8 text (prompt, cache key, run file) can hold it
        raise SpecError(file=file, line=node.start_mark.line + 1, key=key_text(path) or None, expected="valid Unicode text",
                        got="a lone surrogate escape (e.g. \\ud800)") from None


def read_yaml(path: Path) -> tuple[Any, dict[KeyPath, int]]:
    """Parse one YAML document; return its data and a map key path -> line."""
    try:
        text = path.read_bytes().decode("utf-8")
    except FileNotFoundError:
        raise SpecError(f"config file not found: {path}") from None
    except IsADirectoryError:
        raise SpecError(f"expected a YAML file, got a directory: {path}") from None
    except UnicodeDecodeError as e:
        line = path.read_bytes()[: e.start].count(b"\n") + 1
        raise SpecError(file=path, line=line, expected="UTF-8 text", got=f"the byte {path.read_bytes()[e.start]:#04x}") from None
    lines: dict[KeyPath, int] = {}
    empty = object()
    data = load_yaml_text(text, path, lines=lines, empty=empty)
    if data is empty:
        raise SpecError(file=path, line=1, expected="a YAML mapping of spec keys", got="an empty file")
    return data, lines


def load_yaml_text(text: str, file: Path | str, *, path: KeyPath = (), depth: int = 0,
                   lines: dict[KeyPath, int] | None = None, empty: Any = None) -> Any:
    """`yaml.safe_load` with the checks every YAML input gets: nesting depth (MAX_DEPTH, checked while
    parsing, before PyYAML's recursive composer can overflow the stack), duplicate keys, lone
    surrogates, alias bombs. `path` and `depth` place the text inside a spec (a `--set` value), so
    errors name the key and the depth limit holds for the whole spec; errors name `file` and, when
    `lines` is given (a file), the line, which `lines` maps key paths to. A document without a node
    (empty, or comments only) is `empty`."""
    try:
        loader = _GuardedLoader(text, _DepthGuard(file, path, depth, with_lines=lines is not None))
    except yaml.reader.ReaderError as e:  # a character YAML never allows (NUL, other control characters)
        line = text[: e.position].count("\n") + 1
        raise SpecError(file=file, line=line if lines is not None else None, expected="printable text",
                        got=f"the character U+{e.character:04X} ({e.reason})") from None
    try:
        node = loader.get_single_node()
        if node is None:
            return empty
        lines = {} if lines is None else lines
        lines[path] = node.start_mark.line + 1
        _walk_lines(node, path, lines, file)
        _check_expanded_size(node, path, file)
        return loader.construct_document(node)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None) or getattr(e, "context_mark", None)
        line = mark.line + 1 if mark else None
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        context, context_mark = getattr(e, "context", None), getattr(e, "context_mark", None)
        if context and context_mark is not None and context_mark.line + 1 != line:
            problem += f", {context} started on line {context_mark.line + 1}"
        raise SpecError(file=file, line=line if lines is not None else None, expected="valid YAML",
                        got=f"a syntax error ({problem})") from None
    finally:
        loader.dispose()


# Levels of nested lists and mappings a spec may have, counted from its top (a spec's own structure
# needs about 10; a JSON schema or loop-in-loop bodies a few dozen). PyYAML's composer, deepcopy,
# YAML/JSON writers and repr all recurse once or more per level: far deeper input would end in a
# RecursionError instead of an error naming the line.
MAX_DEPTH = 100


class _DepthGuard:
    """Follows a YAML event stream (the parser is not recursive) and refuses a collection opening
    deeper than MAX_DEPTH, or an alias (*name) whose value would reach deeper once expanded."""

    def __init__(self, file: Path | str, path: KeyPath, depth: int, with_lines: bool) -> None:
        self.file, self.path, self.depth, self.with_lines = file, path, depth, with_lines
        # open collections, innermost last: [key path, is a mapping, next index | pending key, wants a key,
        # levels below it so far, anchor]
        self.open: list[list] = []
        self.heights: dict[str, int] = {}  # anchor -> levels of nesting of its value

    def see(self, event: yaml.Event) -> None:
        if isinstance(event, (yaml.SequenceStartEvent, yaml.MappingStartEvent)):
            path = self._child_path()
            self.open.append([path, isinstance(event, yaml.MappingStartEvent), 0, True, 0, event.anchor])
            if self.depth + len(self.open) > MAX_DEPTH:
                self._refuse(event, path, f"{MAX_DEPTH + 1} or more levels")
        elif isinstance(event, (yaml.SequenceEndEvent, yaml.MappingEndEvent)):
            frame = self.open.pop()
            height = frame[4] + 1
            if frame[5] is not None:
                self.heights[frame[5]] = height
            self._done(height)
        elif isinstance(event, yaml.AliasEvent):
            height = self.heights.get(event.anchor, 0)  # an anchor still open (it contains itself) is refused later
            if height and self.depth + len(self.open) + height > MAX_DEPTH:
                self._refuse(event, self._child_path(), f"{self.depth + len(self.open) + height} levels once "
                             f"the alias *{event.anchor} is expanded")
            self._done(height)
        elif isinstance(event, yaml.ScalarEvent):
            self._done(0, event.value)

    def _child_path(self) -> KeyPath:
        """The key path of the node that starts now (a mapping's key has none of its own)."""
        if not self.open:
            return self.path
        path, mapping, slot, wants_key = self.open[-1][:4]
        if mapping:
            return path if wants_key else path + (slot,)
        return path + (slot,)

    def _done(self, height: int, scalar: str | None = None) -> None:
        """A node of `height` levels ended: advance its parent to the next key, value or item."""
        if not self.open:
            return
        frame = self.open[-1]
        frame[4] = max(frame[4], height)
        if frame[1]:
            if frame[3]:
                frame[2] = scalar if scalar is not None else "?"
            frame[3] = not frame[3]
        else:
            frame[2] += 1

    def _refuse(self, event: yaml.Event, path: KeyPath, got: str) -> None:
        # name the innermost mapping key near the top: a path of a hundred list indices helps nobody
        shown = path[:8]
        while shown and not isinstance(shown[-1], str):
            shown = shown[:-1]
        raise SpecError(file=self.file, line=event.start_mark.line + 1 if self.with_lines else None,
                        key=key_text(shown) or None,
                        expected=f"at most {MAX_DEPTH} levels of nested lists and mappings", got=got)


_JSON_TOKENS = re.compile(r'"(?:[^"\\\n]|\\.)*"?|[\[\]{}\n]')


def check_json_depth(text: str, file: Path | str, *, first_line: int = 1, limit: int = MAX_DEPTH) -> None:
    """Refuse JSON text nested deeper than `limit` before `json.loads` (recursive in C) overflows;
    the error names the line where level limit + 1 opens. Strings are skipped; brackets in them do not count."""
    depth, line = 0, first_line
    for match in _JSON_TOKENS.finditer(text):
        token = match.group()
        if token == "\n":
            line += 1
        elif token in "[{":
            depth += 1
            if depth > limit:
                raise SpecError(file=file, line=line, expected=f"at most {limit} levels of nested lists and "
                                "mappings", got=f"{limit + 1} or more levels")
        elif token in "]}":
            depth -= 1


class _GuardedLoader(yaml.SafeLoader):
    """SafeLoader whose events pass the depth guard as the composer takes them."""

    def __init__(self, stream: str, guard: _DepthGuard) -> None:
        super().__init__(stream)
        self.guard = guard

    def get_event(self) -> yaml.Event:
        event = super().get_event()
        self.guard.see(event)
        return event


# ---------------------------------------------------------------- --set


_UNPARSED = object()


def _shown_override(arg: str, value: Any = _UNPARSED) -> str:
    """The --set argument as error messages show it: `KEY=***` when it may hold a secret (a secret-like key
    such as api_key, a key where api_key_env's variable NAME belongs, a key or a URL with credentials in the
    value), `***` when its key path itself does, shortened when long. `value` is the parsed value, if any yet."""
    name, equals, text = arg.partition("=")
    if looks_secret(name):
        return "***"
    hidden = f"{name}={'***' if equals else ''}"
    parts = name.strip().split(".")
    if looks_secret(text) or any(is_secret_key(p) for p in parts):
        return hidden
    if parts[-1] == "api_key_env" and not is_env_var_name(text.strip() if value is _UNPARSED else value):
        return hidden  # a key where its variable's name belongs
    if value is not _UNPARSED and secret_in(value) is not None:
        return hidden
    if len(text) > 80:  # a huge value (deeply nested, say) would drown the message
        return f"{name}={text[:60]}...{text[-12:]}"
    return arg


def parse_override(arg: str) -> tuple[KeyPath, Any]:
    shown = _shown_override(arg)  # for the messages below
    if "=" not in arg:
        raise SpecError(file=f"--set {shown}", expected="KEY=VALUE (e.g. models.task.model=local/qwen2.5-coder-1.5b)",
                        got=repr(arg) if shown == arg else "something else (not shown: it may hold a secret)")
    key, _, value_text = arg.partition("=")
    arg = shown
    parts: list[str | int] = []
    for part in key.strip().split("."):
        if not part:
            raise SpecError(file=f"--set {arg}", expected="a dotted key path", got=repr(key))
        parts.append(int(part) if part.isdigit() else part)
    if not value_text.strip():
        return tuple(parts), ""
    try:  # the checks of a spec file (depth over the whole spec, duplicate keys, lone surrogates, alias bombs)
        value = load_yaml_text(value_text, f"--set {arg}", path=tuple(parts), depth=len(parts))
    except SpecError as e:
        if e.expected == "valid YAML":
            raise SpecError(file=f"--set {arg}", key=key, expected="a YAML value", got=e.got) from None
        raise SpecError(file=f"--set {arg}", key=e.key, expected=e.expected, got=e.got) from None
    return tuple(parts), value


def apply_override(data: dict, key: KeyPath, value: Any, arg: str) -> None:
    """Set data[key] = value. Every step must name a key the format knows (checked against the schema)."""
    _check_known_path(key, data, arg)
    target: Any = data
    for i, part in enumerate(key[:-1]):
        if isinstance(target, list):
            if not isinstance(part, int) or part >= len(target):
                raise SpecError(file=f"--set {arg}", key=key_text(key[: i + 1]), expected=f"an index below {len(target)}", got=repr(part))
            target = target[part]
            continue
        if part not in target or target[part] is None:
            if isinstance(key[i + 1], int):
                raise SpecError(file=f"--set {arg}", key=key_text(key[: i + 2]), expected="an existing list item "
                                f"(set the whole list instead, e.g. {key_text(key[: i + 1])}=[...])", got="no such list")
            target[part] = {}
        elif not isinstance(target[part], (dict, list)):
            raise SpecError(file=f"--set {arg}", key=key_text(key[: i + 1]), expected="a mapping to set a key in",
                            got=_describe_safely(key[: i + 1], target[part]))
        target = target[part]
    last = key[-1]
    if isinstance(target, list):
        if not isinstance(last, int) or last >= len(target):
            raise SpecError(file=f"--set {arg}", key=key_text(key), expected=f"an index below {len(target)}", got=repr(last))
    target[last] = value


def _check_known_path(key: KeyPath, data: dict, arg: str) -> None:
    """Refuse a key path the schema does not have (a typo must not be silently ignored)."""
    model: Any = Spec
    raw: Any = data
    for i, part in enumerate(key):
        if model is None:
            return  # free-form value (e.g. `extra`, `state`): anything goes below
        fields = _fields_of(model, raw)
        if fields is None:  # a dict of named entries (models, nodes, params) or a list
            model = _item_model(model, raw, part)
        else:
            aliases = _aliases(_pick_model(model, raw))
            if part not in aliases:
                raise SpecError(file=f"--set {arg}", key=key_text(key[: i + 1]),
                                expected=f"a known key ({', '.join(sorted(aliases))})", got=_unknown_key(part, aliases))
            model = fields[aliases[part]]
        raw = raw.get(part) if isinstance(raw, dict) else (raw[part] if isinstance(raw, list) and isinstance(part, int) and part < len(raw) else None)


def _unknown_key(part: Any, known: Any) -> str:
    close = difflib.get_close_matches(str(part), [str(k) for k in known], n=1)
    return f"unknown key `{part}`" + (f" (did you mean `{close[0]}`?)" if close else "")


def _known_keys(key: KeyPath, data: Any, root: Any = None) -> list[str]:
    """The keys the schema (`root`, by default the Spec) allows in the mapping at `key` ([] for free-form ones)."""
    model: Any = Spec if root is None else root
    raw: Any = data
    for part in key:
        fields = _fields_of(model, raw)
        if fields is None:
            model = _item_model(model, raw, part)
        else:
            model = fields.get(_aliases(_pick_model(model, raw)).get(part, part))
        if model is None:
            return []
        raw = raw.get(part) if isinstance(raw, dict) else (raw[part] if isinstance(raw, list) and isinstance(part, int) and part < len(raw) else None)
    return sorted(_aliases(_pick_model(model, raw)))


def _aliases(model: Any) -> dict[str, str]:
    if isinstance(model, type) and issubclass(model, BaseModel):
        return {(f.alias or n): n for n, f in model.model_fields.items()}
    return {}


def _fields_of(model: Any, raw: Any) -> dict[str, Any] | None:
    model = _pick_model(model, raw)
    if isinstance(model, type) and issubclass(model, BaseModel):
        return {n: f.annotation for n, f in model.model_fields.items()}
    return None


def _pick_model(annotation: Any, raw: Any) -> Any:
    """Reduce Optional/Union/Annotated to the BaseModel the raw value is meant to be."""
    origin = get_origin(annotation)
    if origin is None:
        return annotation
    if str(origin) in ("typing.Annotated",) or getattr(origin, "__name__", "") == "Annotated":
        return _pick_model(get_args(annotation)[0], raw)
    if origin in (dict, list):
        return annotation
    # a union: prefer the member whose `kind` literal matches, else the first BaseModel
    members = [a for a in get_args(annotation) if a is not type(None)]
    models = [m for m in (_pick_model(a, raw) for a in members) if isinstance(m, type) and issubclass(m, BaseModel)]
    if isinstance(raw, dict) and "kind" in raw:
        for m in models:
            kind = m.model_fields.get("kind")
            if kind is not None and raw["kind"] in get_args(kind.annotation):
                return m
    if len(models) == 1 or (models and not isinstance(raw, (str, int, float))):
        return models[0]
    return None  # a scalar-typed field


def _item_model(annotation: Any, raw: Any, part: Any) -> Any:
    annotation = _pick_model(annotation, raw)
    origin = get_origin(annotation)
    if origin is dict:
        value_type = get_args(annotation)[1]
        return value_type if value_type is not Any else None
    if origin is list:
        return get_args(annotation)[0]
    return None


# ---------------------------------------------------------------- validation


def _clean_loc(loc: tuple, raw: Any) -> KeyPath:
    """Drop the union-tag segments pydantic adds (e.g. nodes.count.llm.user -> nodes.count.user)."""
    out: list = []
    cur = raw
    for part in loc:
        if isinstance(cur, dict) and part in cur or isinstance(cur, list) and isinstance(part, int) and part < len(cur):
            out.append(part)
            cur = cur[part]
        elif isinstance(cur, dict) and isinstance(part, str) and part.startswith(("function-", "tagged-union")) or isinstance(cur, dict) and cur.get("kind") == part:
            continue
        elif isinstance(cur, dict):
            out.append(part)  # a missing key: name it
            cur = None
        else:
            # str | SplitSpec style unions add the member name ('str', 'SplitSpec'): skip them
            continue
    return tuple(out)


def _error_key(err: dict, raw: Any) -> KeyPath:
    key = _clean_loc(err["loc"], raw)
    sub = (err.get("ctx") or {}).get("key") if err["type"] == "spec_value" else None
    if isinstance(sub, tuple):  # a path below the validated value, e.g. (1, "url") in an api_base list
        return key + sub
    return key + (sub,) if sub else key


def describe_pydantic_error(err: dict) -> tuple[str, str]:
    kind = err["type"]
    value = err.get("input")
    msg = err["msg"]
    if kind == "spec_value":  # raised by the models with both halves (models.spec_value_error)
        return err["ctx"]["expected"], err["ctx"]["got"]
    if kind == "missing":
        return "a value for this required key", "nothing"
    if kind == "extra_forbidden":
        return "a known key (see `autodiff schema`)", "an unknown key"
    if kind == "literal_error":
        return "one of " + err.get("ctx", {}).get("expected", ""), describe(value)
    if kind == "string_pattern_mismatch":
        return "a name of letters, digits and _ (not starting with a digit)", describe(value)
    if kind == "value_error":
        return msg.removeprefix("Value error, "), describe(value) if not isinstance(value, dict) else "this mapping"
    expected = msg.removeprefix("Input should be ").removeprefix("Input ").split(", unable to parse")[0]
    return expected, describe(value)


def validate_spec(data: Any, path: Path, lines: dict, overrides: dict) -> Spec:
    if not isinstance(data, dict):
        raise SpecError(file=path, line=1, expected="a YAML mapping of spec keys", got=describe(data))
    return validate_part(Spec, data, (), path, lines, overrides)


def validate_part(model: type[BaseModel], data: Any, at: KeyPath, path: Path, lines: dict, overrides: dict) -> Any:
    """`data`, found at key `at` of the spec file, validated by `model`; errors located like the Spec's own
    (node kinds validate their nodes with their own models this way, nodes/compiler.py)."""
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        # a missing key is often the echo of a misspelt one (`nodse:`): report the typo first
        errors = sorted(exc.errors(), key=lambda e: (e["type"] == "missing", _line_for(at + _error_key(e, data), lines)))
        located = [_located_validation_error(e, data, path, lines, overrides, model, at) for e in errors[:6]]
        err = located[0]
        if len(errors) > 1:
            more = []
            for e in located[1:]:
                where = e.file if e.line is None else f"line {e.line}"
                more.append(f"  also {where}: {e.key}: expected {e.expected}, got {e.got}")
            if len(errors) > 6:
                more.append(f"  ... and {len(errors) - 6} more")
            err.hint = "\n".join(more)
        raise err from None


def _describe_safely(key: KeyPath, value: Any, described: str | None = None) -> str:
    """`describe(value)` for an error message, unless the value sits under a secret-like key (api_key,
    api_key_env, an Authorization header) or holds a key or a URL with credentials: never echoed."""
    if any(is_secret_key(k) or k == "api_key_env" for k in key) or secret_in(value) is not None:
        return "a value not shown (it may be a secret)"
    return describe(value) if described is None else described


def _located_validation_error(err: dict, data: Any, path: Path, lines: dict, overrides: dict,
                              root: Any = None, at: KeyPath = ()) -> SpecError:
    key = _error_key(err, data)
    expected, got = describe_pydantic_error(err)
    if err["type"] not in ("spec_value", "extra_forbidden", "missing"):
        got = _describe_safely(at + key, err.get("input"), got)  # the models' own checks say more; this is the safety net
    if err["type"] == "extra_forbidden":
        known = _known_keys(key[:-1], data, root)
        if known:
            expected = f"a known key ({', '.join(known)})"
        got = _unknown_key(key[-1], known)
    return located_error(path, lines, overrides, at + key, expected=expected, got=got)


def _line_for(key: KeyPath, lines: dict) -> int:
    for n in range(len(key), -1, -1):
        if key[:n] in lines:
            return lines[key[:n]]
    return 0


def load_spec(path: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> LoadedSpec:
    """Read, override and validate a spec. Raises SpecError with file/line/key."""
    path = Path(path)
    data, lines = read_yaml(path)
    if not isinstance(data, dict):
        raise SpecError(file=path, line=1, expected="a YAML mapping of spec keys", got=describe(data))
    raw = copy.deepcopy(data)
    override_keys: dict[KeyPath, str] = {}
    for arg in overrides:
        key, value = parse_override(arg)
        arg = _shown_override(arg, value)
        apply_override(raw, key, value, arg)
        override_keys[key] = arg
    spec = validate_spec(raw, path, lines, override_keys)
    return LoadedSpec(spec=spec, path=path, raw=raw, lines=lines, overrides=override_keys)
