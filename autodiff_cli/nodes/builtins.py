"""Built-in functions for `kind: function` nodes: answer parsers, BM25 retrieval, list helpers,
and the action executor of a ReAct agent.

Function nodes call them as `fn(**args, **with_)`. Each one is pure (bm25 caches its index)
and tolerates None or odd input instead of raising, so a sloppy model output gives a wrong
prediction rather than a crashed example.
"""
from __future__ import annotations

import hashlib
import importlib
import importlib.machinery
import importlib.util
import json
import os
import re
import sys
import threading
import types
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from autodiff_cli.errors import DataError, SpecError

__all__ = [
    "BUILTINS",
    "REACT_ACTIONS",
    "Builtin",
    "answer_after",
    "bm25",
    "bm25_cache_clear",
    "bm25_cache_info",
    "dedup_extend",
    "first_of",
    "import_user_module",
    "join",
    "json_field",
    "label",
    "last_integer",
    "react_act",
    "react_answer",
    "resolve_function",
    "split_ref",
    "user_code_origin",
]


def _as_text(value: Any) -> str | None:
    if value is None:
        return None
    if isinstance(value, str):
        return value
    if isinstance(value, (list, tuple)):
        return "\n".join(str(v) for v in value if v is not None)
    return str(value)


# --- answer parsers -------------------------------------------------------------------------

# An integer, optionally with thousands separators and a fractional part. A sign counts only
# when it does not follow a word character ("3-5" is a range, not minus five). The lookbehinds
# keep the tail of "1.2.3" from matching on its own, but allow "so...5".
_NUMBER = re.compile(
    r"(?:(?<!\w)(?P<sign>[-\u2212]))?"
    r"(?<!\d)(?<!\d\.)(?P<int>\d{1,3}(?:,\d{3})+(?!\d)|\d+)"
    r"(?:\.(?P<frac>\d+))?"
)


def last_integer(text: Any = None) -> str | None:
    """The last integer in `text`, normalized ("1,234" -> "1234", "007" -> "7"); None if none.

    Decimals with a non-zero fraction ("12.5") are not integers and are skipped; "12.0" counts.
    """
    text = _as_text(text)
    if not text:
        return None
    for match in reversed(list(_NUMBER.finditer(text))):
        frac = match.group("frac")
        if frac and frac.strip("0"):
            continue
        value = int(match.group("int").replace(",", ""))
        if match.group("sign") and value:
            value = -value
        return str(value)
    return None


def answer_after(text: Any = None, marker: str = "Answer:") -> str | None:
    """The first line after the last `marker` (case-insensitive), stripped; None if absent/empty."""
    text = _as_text(text)
    if not text or not marker:
        return None
    index = text.lower().rfind(str(marker).lower())
    if index < 0:
        return None
    rest = text[index + len(marker):].strip().strip("*").strip()  # "**Answer:** 7"
    if not rest:
        return None
    first = rest.splitlines()[0].strip()
    return first or None


_LABEL_MARKER = re.compile(
    r"\b(?:final\s+answer|answer|label|category|class|classification|type)\b"
    r"(?:\s*\*+)?\s*(?::|=|\bis\b)",
    re.IGNORECASE,
)
_EDGE_JUNK = " \t\r\n.,;:!?\"'`*()[]{}<>"


def _label_pattern(labels: list[str]) -> re.Pattern[str]:
    # Longest first, so "very positive" wins over "positive" at the same position.
    alternatives = sorted({l for l in labels if l}, key=len, reverse=True)
    return re.compile(r"(?<!\w)(?:" + "|".join(re.escape(l) for l in alternatives) + r")(?!\w)",
                      re.IGNORECASE)


def label(text: Any = None, labels: list[str] | tuple[str, ...] | None = None,
          default: str | None = None) -> str | None:
    """The label from `labels` that `text` names, in its canonical spelling from `labels`.

    In order: the whole stripped text is a label (case-insensitive); else the first label
    after the last marker ("Answer:", "Label:", "The answer is") that is followed by one;
    else the last label mentioned as a whole word; else `default`.
    """
    text = _as_text(text)
    if isinstance(labels, str):
        labels = [labels]
    candidates = [str(l) for l in (labels or []) if l is not None and str(l).strip()]
    if not text or not candidates:
        return default
    canonical: dict[str, str] = {}
    for name in candidates:
        canonical.setdefault(name.lower(), name)

    whole = text.strip().strip(_EDGE_JUNK).lower()
    if whole in canonical:
        return canonical[whole]

    pattern = _label_pattern(candidates)
    for marker in reversed(list(_LABEL_MARKER.finditer(text))):
        after = text[marker.end():]
        line = after.lstrip().split("\n", 1)[0]
        hit = pattern.search(line)
        if hit:
            return canonical[hit.group(0).lower()]

    mentions = list(pattern.finditer(text))
    if mentions:
        return canonical[mentions[-1].group(0).lower()]
    return default


_FENCE = re.compile(r"```(?:json|JSON)?\s*\n?(.*?)```", re.DOTALL)
_MAX_JSON_STARTS = 200


def _first_json_object(text: str, strict: bool = True) -> dict | None:
    decoder = json.JSONDecoder(strict=strict)  # strict=False: raw newlines inside strings
    chunks = [m.group(1) for m in _FENCE.finditer(text)] + [text]
    for chunk in chunks:
        start = chunk.find("{")
        tries = 0
        while start >= 0 and tries < _MAX_JSON_STARTS:
            tries += 1
            try:
                value, _ = decoder.raw_decode(chunk, start)
            except (ValueError, RecursionError):
                value = None
            if isinstance(value, dict):
                return value
            start = chunk.find("{", start + 1)
    return None


def json_field(text: Any = None, field: str = "", default: Any = None) -> Any:
    """The value at dotted `field` ("a.b.0") of the first JSON object in `text`, else `default`.

    Tolerates ```json fences and prose around the object; `text` may already be a dict.
    """
    if isinstance(text, dict):
        value: Any = text
    else:
        raw = _as_text(text)
        if not raw:
            return default
        value = _first_json_object(raw)
        if value is None:
            return default
    if field is None or field == "":
        return value
    for part in str(field).split("."):
        if isinstance(value, dict):
            if part not in value:
                return default
            value = value[part]
        elif isinstance(value, list) and re.fullmatch(r"-?\d+", part):
            index = int(part)
            if not -len(value) <= index < len(value):
                return default
            value = value[index]
        else:
            return default
    return value


# --- BM25 retrieval ------------------------------------------------------------------------

_TOKEN = re.compile(r"(?u)\b\w\w+\b")


def _stopwords() -> frozenset[str]:
    try:
        from bm25s.stopwords import STOPWORDS_EN
        return frozenset(STOPWORDS_EN)
    except ImportError:  # pragma: no cover - older bm25s
        return frozenset()


_STOPWORDS = _stopwords()


def _tokenize(text: str) -> list[str]:
    return [t for t in _TOKEN.findall(text.lower()) if t not in _STOPWORDS]


@dataclass(frozen=True)
class _Index:
    retriever: Any
    passages: tuple[str, ...]
    vocab: frozenset[str]
    titles: tuple[str | None, ...] = ()  # the title of each passage (None without one)


_INDEX_CACHE: dict[tuple, _Index] = {}
_INDEX_LOCK = threading.Lock()
_CACHE_STATS = {"hits": 0, "misses": 0}


def bm25_cache_info() -> dict[str, int]:
    """Index cache counters for this process: hits, misses (= indexes built), size."""
    with _INDEX_LOCK:
        return {**_CACHE_STATS, "size": len(_INDEX_CACHE)}


def bm25_cache_clear() -> None:
    with _INDEX_LOCK:
        _INDEX_CACHE.clear()
        _CACHE_STATS.update(hits=0, misses=0)


def _load_passages(path: Path, text_field: str, title_field: str | None) -> tuple[list[str], list[str | None]]:
    passages: list[str] = []
    titles: list[str | None] = []
    try:
        handle = path.open(encoding="utf-8")
    except OSError as exc:
        raise DataError(f"cannot read BM25 corpus: {exc.strerror or exc}", file=path,
                        expected="a readable JSONL file", got=str(path)) from None
    with handle:
        for lineno, line in enumerate(handle, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as exc:
                raise DataError(f"bad JSON in BM25 corpus ({exc.msg})", file=path, line=lineno,
                                expected="one JSON object per line", got=line.strip()[:60]) from None
            except RecursionError:
                raise DataError("bad JSON in BM25 corpus", file=path, line=lineno,
                                expected="one JSON object per line", got="nesting too deep to read") from None
            if not isinstance(row, dict) or not isinstance(row.get(text_field), str):
                raise DataError("bad BM25 corpus row", file=path, line=lineno, key=text_field,
                                expected=f"an object with a string `{text_field}` field",
                                got=line.strip()[:60])
            title = row.get(title_field) if title_field else None
            body = row[text_field]
            has_title = isinstance(title, str) and bool(title)
            passages.append(f"{title}: {body}" if has_title else body)
            titles.append(title if has_title else None)
    return passages, titles


def _build_index(passages: list[str], titles: list[str | None] | None = None) -> _Index:
    import bm25s

    tokens = [_tokenize(p) for p in passages]
    retriever = bm25s.BM25()
    if passages:
        retriever.index(tokens, show_progress=False)
    vocab = frozenset(t for doc in tokens for t in doc)
    return _Index(retriever, tuple(passages), vocab, tuple(titles or ()))


def _get_index(corpus: str | os.PathLike, text_field: str, title_field: str | None) -> _Index:
    path = Path(corpus).expanduser().resolve()
    try:
        stat = path.stat()
    except OSError as exc:
        raise DataError(f"cannot read BM25 corpus: {exc.strerror or exc}", file=path,
                        expected="an existing JSONL file", got=str(corpus)) from None
    key = (str(path), stat.st_mtime_ns, stat.st_size, text_field, title_field)
    # One lock for lookup and build: threads asking for the same corpus wait for one build.
    with _INDEX_LOCK:
        index = _INDEX_CACHE.get(key)
        if index is not None:
            _CACHE_STATS["hits"] += 1
            return index
        _CACHE_STATS["misses"] += 1
        for stale in [k for k in _INDEX_CACHE if k[0] == key[0]]:
            del _INDEX_CACHE[stale]
        index = _build_index(*_load_passages(path, text_field, title_field))
        _INDEX_CACHE[key] = index
        return index


def _search(index: _Index, query: str, k: int) -> list[str]:
    terms = [t for t in _tokenize(query) if t in index.vocab]
    if not terms or not index.passages:
        return []
    scores = index.retriever.get_scores(terms)
    # Ties go to the earlier corpus row; passages sharing no term with the query are dropped.
    order = sorted(range(len(index.passages)), key=lambda i: (-float(scores[i]), i))
    return [index.passages[i] for i in order[:k] if scores[i] > 0]


def bm25(query: Any = None, corpus: str | os.PathLike | None = None, k: int = 3,
         text_field: str = "text", title_field: str | None = "title") -> list[str]:
    """Top-`k` passages of a JSONL `corpus` for `query` ("title: text", or text without a title).

    `query` may be a list of queries: results are merged in order without duplicates. The index
    is built once per (corpus path, mtime, size, fields) per process.
    """
    if corpus is None or str(corpus) == "":
        raise DataError("bm25 needs a corpus", expected="a JSONL corpus path in `with: {corpus: ...}`",
                        got="nothing")
    try:
        k = int(k)
    except (TypeError, ValueError):
        k = 3
    if k <= 0:
        return []
    if isinstance(query, (list, tuple)):
        queries = [str(q) for q in query if q is not None]
    else:
        queries = [] if query is None else [str(query)]
    queries = [q for q in queries if q.strip()]
    if not queries:
        return []
    index = _get_index(corpus, text_field, title_field)
    results: list[str] = []
    seen: set[str] = set()
    for q in queries:
        for passage in _search(index, q, k):
            if passage not in seen:
                seen.add(passage)
                results.append(passage)
    return results


# --- list helpers --------------------------------------------------------------------------

def _as_list(value: Any) -> list:
    if value is None:
        return []
    if isinstance(value, (list, tuple)):
        return list(value)
    return [value]


def dedup_extend(items: Any = None, new: Any = None) -> list:
    """`items` followed by the elements of `new` not already present (order kept).

    Either may be None, a single value (a string counts as one item) or a list.
    """
    result = _as_list(items)
    seen: set = set()
    unhashable: list = []
    for item in result:
        try:
            seen.add(item)
        except TypeError:
            unhashable.append(item)
    for item in _as_list(new):
        try:
            if item in seen:
                continue
            seen.add(item)
        except TypeError:
            if item in unhashable:
                continue
            unhashable.append(item)
        result.append(item)
    return result


def join(items: Any = None, sep: str = "\n\n") -> str:
    """The items as text joined by `sep`; None items are skipped, a string is returned as is."""
    if items is None:
        return ""
    if isinstance(items, str):
        return items
    return str(sep).join(str(item) for item in _as_list(items) if item is not None)


def first_of(default: Any = None, **values: Any) -> Any:
    """The first of `values` (in the order `args` lists them) that is not None, else `default`: joins
    branches of which one ran, since a node skipped by its `when` outputs None."""
    return next((value for value in values.values() if value is not None), default)


# --- ReAct agent ---------------------------------------------------------------------------

REACT_ACTIONS = ("search", "lookup", "finish")
_ACTION_CALL = re.compile(r"^\s*(\w+)\s*[\[(]\s*(.*?)\s*[\])]\s*$", re.DOTALL)  # search[Paris]
_UNREADABLE = ("The action could not be read: reply with a JSON object with `thought`, "
               "`action` (one of search, lookup, finish) and `argument`.")


def _read_plan(plan: Any) -> tuple[str, str, str] | None:
    """(thought, action, argument) of a planner's output, or None if it names no action."""
    if isinstance(plan, str):
        parsed = _first_json_object(plan, strict=False)
        if parsed is None:
            call = _ACTION_CALL.match(plan.strip().splitlines()[-1]) if plan.strip() else None
            return ("", call.group(1).lower(), call.group(2)) if call else None
        plan = parsed
    if not isinstance(plan, dict):
        return None
    action = plan.get("action")
    if not isinstance(action, str) or not action.strip():
        return None
    argument = plan.get("argument", plan.get("action_input", ""))
    argument = "" if argument is None else (argument if isinstance(argument, str) else json.dumps(argument))
    thought = plan.get("thought", "")
    thought = "" if thought is None else str(thought)
    action = action.strip()
    call = _ACTION_CALL.match(action)
    if call and not argument.strip():  # {"action": "search[Paris]"}
        action, argument = call.group(1), call.group(2)
    return thought.strip(), action.strip().lower(), argument.strip()


def _react_step(thought: str, action: str | None, argument: str, observation: str) -> str:
    lines = [f"Thought: {thought}"] if thought else []
    lines.append(f"Action: {action}[{argument}]" if action else "Action: (unreadable)")
    lines.append(f"Observation: {observation}")
    return "\n".join(lines)


def react_act(plan: Any = None, corpus: str | os.PathLike | None = None, k: int = 2,
              text_field: str = "text", title_field: str | None = "title") -> dict[str, Any]:
    """Execute one ReAct action chosen by a planner over a JSONL `corpus`.

    `plan` is the planner's output: a dict `{"thought", "action", "argument"}` (as a node with
    `json_schema` gives), its JSON text, or `search[query]`-style text. Actions:
      search   the top-`k` BM25 passages for the argument
      lookup   the passage whose title equals the argument (case-insensitive), else the best
               BM25 hit for it
      finish   the argument is the final answer
    Returns `{"action", "argument", "observation", "step"}`; `step` is the
    "Thought/Action/Observation" text for the agent's history. An unreadable plan or an unknown
    action gives action None and an observation saying what went wrong; never raises on
    model output.
    """
    read = _read_plan(plan)
    if read is None:
        return {"action": None, "argument": "", "observation": _UNREADABLE,
                "step": _react_step("", None, "", _UNREADABLE)}
    thought, action, argument = read
    if action not in REACT_ACTIONS:
        observation = f"Unknown action `{action}`: use one of {', '.join(REACT_ACTIONS)}."
        return {"action": None, "argument": argument, "observation": observation,
                "step": _react_step(thought, action, argument, observation)}
    if action == "finish":
        observation = argument
    elif not argument:
        observation = f"`{action}` needs an argument."
    elif action == "search":
        hits = bm25(argument, corpus=corpus, k=k, text_field=text_field, title_field=title_field)
        observation = "\n".join(hits) if hits else f"No passage matches `{argument}`."
    else:  # lookup
        observation = _lookup(argument, corpus, text_field, title_field)
    return {"action": action, "argument": argument, "observation": observation,
            "step": _react_step(thought, action, argument, observation)}


def _lookup(title: str, corpus: Any, text_field: str, title_field: str | None) -> str:
    if corpus is None or str(corpus) == "":
        raise DataError("react_act needs a corpus", expected="a JSONL corpus path in `with: {corpus: ...}`",
                        got="nothing")
    index = _get_index(corpus, text_field, title_field)
    wanted = title.strip().strip("\"'").casefold()
    for passage, passage_title in zip(index.passages, index.titles):
        if passage_title is not None and passage_title.strip().casefold() == wanted:
            return passage
    hits = _search(index, title, 1)
    return hits[0] if hits else f"No passage titled `{title}`."


def react_answer(last: Any = None, steps: Any = None) -> str:
    """The agent's final answer: the argument of its `finish` action, else the last observation.

    `last` is the last `react_act` result (a loop's state keeps it); `steps` the history, used
    when `last` is missing (the text after the last "Observation:").
    """
    if isinstance(last, dict):
        if last.get("action") == "finish":
            return "" if last.get("argument") is None else str(last["argument"])
        if last.get("observation") is not None:
            return str(last["observation"])
    history = [s for s in _as_list(steps) if s is not None]
    if history:
        text = str(history[-1])
        marker = text.rfind("Observation:")
        return text[marker + len("Observation:"):].strip() if marker >= 0 else text.strip()
    return ""


# --- registry ------------------------------------------------------------------------------

@dataclass(frozen=True)
class Builtin:
    fn: Callable[..., Any]
    # `with` keys holding file paths, resolved relative to the config file by the caller.
    path_args: frozenset[str] = frozenset()


BUILTINS: dict[str, Builtin] = {
    "last_integer": Builtin(last_integer),
    "answer_after": Builtin(answer_after),
    "label": Builtin(label),
    "json_field": Builtin(json_field),
    "bm25": Builtin(bm25, frozenset({"corpus"})),
    "dedup_extend": Builtin(dedup_extend),
    "join": Builtin(join),
    "first_of": Builtin(first_of),
    "react_act": Builtin(react_act, frozenset({"corpus"})),
    "react_answer": Builtin(react_answer),
}

# `autodiff_cli.builtins:` is the spelling used in DESIGN.md's examples.
_BUILTIN_MODULES = ("autodiff_cli.nodes.builtins", "autodiff_cli.builtins")


def _expected() -> str:
    return (f"an importable `module:function`, a `file.py:function` next to the spec, or a builtin "
            f"({', '.join(BUILTINS)})")


def resolve_function(ref: str, base_dir: str | Path | None = None) -> tuple[Callable[..., Any], frozenset[str]]:
    """The function `ref` names and the `with` keys it takes as file paths.

    `ref` is a builtin name ("bm25"), "autodiff_cli.nodes.builtins:bm25", "package.module:function" or
    "path/to/file.py:function" (the attribute may be dotted, e.g. "pkg.mod:Class.method"). User code is
    found as `import_user_module` says, relative to `base_dir` (the spec's folder). Raises SpecError
    without a location; the caller adds file, line and key.
    """
    if not isinstance(ref, str) or not ref.strip():
        raise SpecError("cannot resolve function", expected=_expected(),
                        got=repr(ref) if isinstance(ref, str) else type(ref).__name__)
    ref = ref.strip()
    if ":" not in ref:
        if ref in BUILTINS:
            builtin = BUILTINS[ref]
            return builtin.fn, builtin.path_args
        hint = "write a Python function as `package.module:function` or `file.py:function`" if "." in ref else None
        raise SpecError("unknown function", expected=_expected(), got=f"'{ref}'", hint=hint)

    module_name, attr_path = split_ref(ref)
    if not module_name or not attr_path:
        raise SpecError("cannot resolve function", expected=_expected(), got=f"'{ref}'")
    if module_name in _BUILTIN_MODULES:
        if attr_path not in BUILTINS:
            raise SpecError(f"`{module_name}` has no builtin `{attr_path}`", expected=_expected(),
                            got=f"'{ref}'")
        builtin = BUILTINS[attr_path]
        return builtin.fn, builtin.path_args

    try:
        target: Any = import_user_module(module_name, base_dir)
    except UserFileNotFound as exc:
        raise SpecError("cannot import function", expected=_EXPECTED_FILE, got=f"'{ref}' ({exc})") from None
    except (Exception, SystemExit) as exc:  # the module's own import code may raise anything, exit too
        hint = None if is_file_ref(module_name) else (
            "hint: a module is looked for in the spec's folder first (mylib/funcs.py for `mylib.funcs:fn`), "
            "then on sys.path (PYTHONPATH, installed packages)")
        raise SpecError("cannot import function", expected=_expected(),
                        got=f"'{ref}' ({type(exc).__name__}: {exc})", hint=hint) from None
    owner = user_module_label(module_name, base_dir)
    for part in attr_path.split("."):
        try:
            target = getattr(target, part)
        except AttributeError:
            raise SpecError("cannot import function", expected=_expected(),
                            got=f"'{ref}' (AttributeError: {owner} has no attribute {part!r})") from None
        except Exception as exc:
            raise SpecError("cannot import function", expected=_expected(),
                            got=f"'{ref}' ({type(exc).__name__}: {exc})") from None
    if not callable(target):
        raise SpecError("not a function", expected=_expected(),
                        got=f"'{ref}' (a {type(target).__name__}, not callable)")
    for builtin in BUILTINS.values():
        if builtin.fn is target:
            return target, builtin.path_args
    return target, frozenset()


# --- user code: `module:function` and `file.py:function` next to the spec ---------------------
#
# Function nodes, metrics and losses name user code the same way, resolved against the spec's folder:
#   `helpers.py:pick`, `lib/helpers.py:pick`   a file, relative to the spec's folder (or absolute); loaded
#                                              under a private module name derived from its resolved path,
#                                              so two specs' `helpers.py` are two modules
#   `mylib.funcs:pick`                         the spec's folder first (`mylib/funcs.py` or
#                                              `mylib/funcs/__init__.py` there, loaded under a private
#                                              package for that folder), else an ordinary import from
#                                              sys.path
# A module of the spec's folder wins over an installed one of the same name for the spec's `fn:` only:
# it is loaded under its private name, so `import mylib` anywhere else still gets the installed package.
# While user code is being loaded, the spec's folder is first on sys.path (its own imports of modules
# next to it work, as for a script); it is taken off again afterwards.

USER_MODULE_PREFIX = "autodiff_user_"
_EXPECTED_FILE = "an existing Python file, relative to the spec's folder (`helpers.py:function`)"
_USER_LOCK = threading.RLock()


class UserFileNotFound(FileNotFoundError):
    """`file.py:function` names a file that does not exist."""


def split_ref(ref: str) -> tuple[str, str]:
    """(module or file, attribute path) of `module:function`; the last colon splits, so a Windows path's
    drive letter stays in the file part."""
    module_name, _, attr_path = ref.strip().rpartition(":")
    return module_name.strip(), attr_path.strip()


def is_file_ref(module_name: str) -> bool:
    """Whether the module part of `module:function` is a file path (`helpers.py`, `lib/helpers.py`)."""
    return module_name.endswith(".py") or "/" in module_name or "\\" in module_name


def _base(base_dir: str | Path | None) -> Path | None:
    return None if base_dir is None else Path(base_dir).expanduser().resolve()


def user_code_origin(module_name: str, base_dir: str | Path | None) -> Path | None:
    """The file of the spec's folder that the module part of `module:function` names (a file path, or a
    dotted module found under `base_dir`); None when it is imported from sys.path."""
    base = _base(base_dir)
    if is_file_ref(module_name):
        path = Path(module_name).expanduser()
        return (path if base is None else base / path).resolve()
    parts = module_name.split(".")
    if base is None or not all(p.isidentifier() for p in parts):
        return None
    for candidate in (base.joinpath(*parts).with_suffix(".py"), base.joinpath(*parts, "__init__.py")):
        if candidate.is_file():
            return candidate
    return None


def user_module_label(module_name: str, base_dir: str | Path | None) -> str:
    """How an error names the module: its file when it comes from the spec's folder."""
    origin = user_code_origin(module_name, base_dir)
    return f"module {module_name!r}" if origin is None else str(origin)


def _digest(path: Path) -> str:
    return hashlib.sha1(str(path).encode("utf-8", "surrogateescape")).hexdigest()[:12]


class _FolderOnPath:
    """The spec's folder first on sys.path while user code loads; removed (once) afterwards."""

    def __init__(self, folder: Path) -> None:
        self.folder = str(folder)

    def __enter__(self) -> None:
        sys.path.insert(0, self.folder)

    def __exit__(self, *exc: object) -> None:
        try:
            sys.path.remove(self.folder)
        except ValueError:  # the user code took it off itself
            pass


def import_user_module(module_name: str, base_dir: str | Path | None = None) -> Any:
    """The module the module part of `module:function` names (see the comment above): a file relative
    to `base_dir`, a dotted module under `base_dir`, else an ordinary import. A file that does not exist
    raises UserFileNotFound; anything the module raises while it loads propagates."""
    origin = user_code_origin(module_name, base_dir)
    if origin is None:
        return importlib.import_module(module_name)
    base = _base(base_dir) or origin.parent
    with _USER_LOCK:
        if is_file_ref(module_name):
            if not origin.is_file():
                raise UserFileNotFound(f"no file {origin}")
            stem = re.sub(r"\W", "_", origin.stem)
            name = f"{USER_MODULE_PREFIX}{stem}_{_digest(origin)}"
            if name in sys.modules:
                return sys.modules[name]
            spec = importlib.util.spec_from_file_location(name, origin)
            if spec is None or spec.loader is None:
                raise ImportError(f"{origin} cannot be loaded as a Python module")
            module = importlib.util.module_from_spec(spec)
            sys.modules[name] = module  # as an import does: the module may look itself up (dataclasses do)
            try:
                with _FolderOnPath(base):
                    spec.loader.exec_module(module)
            except BaseException:
                sys.modules.pop(name, None)
                raise
            return module
        # a dotted module under the spec's folder: a submodule of a private package whose path is that folder
        root = f"{USER_MODULE_PREFIX}dir_{_digest(base)}"
        if root not in sys.modules:
            package = types.ModuleType(root, f"user code of {base}")
            package.__path__ = [str(base)]
            package.__spec__ = importlib.machinery.ModuleSpec(root, None, is_package=True)
            package.__spec__.submodule_search_locations = [str(base)]
            sys.modules[root] = package
        importlib.invalidate_caches()  # files written since the folder was last looked at
        with _FolderOnPath(base):
            return importlib.import_module(f"{root}.{module_name}")
