"""Scores of one prediction against its target, each a float in [0, 1].

A target may be a list of acceptable answers: the best match counts. A missing prediction
(None) scores 0. `resolve_metric` turns a spec's `metric:` value into a callable.
"""
from __future__ import annotations

import functools
import re
import string
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

from autodiff_cli.errors import SpecError, describe_exception
from autodiff_cli.nodes.builtins import (
    import_user_module,
    is_file_ref,
    split_ref,
    user_module_label,
)

Metric = Callable[[Any, Any], float]

_PUNCTUATION = set(string.punctuation)
_ARTICLES = re.compile(r"\b(a|an|the)\b")


def normalize_answer(text: Any) -> str:
    """SQuAD normalisation: lowercase, drop punctuation and articles, collapse whitespace."""
    text = str(text).lower()
    text = "".join(ch for ch in text if ch not in _PUNCTUATION)
    text = _ARTICLES.sub(" ", text)
    return " ".join(text.split())


def _targets(target: Any) -> list[Any]:
    return list(target) if isinstance(target, (list, tuple)) else [target]


def _best(score_one: Callable[[Any, Any], float]) -> Metric:
    """Lift a single-target score to: None prediction -> 0.0, list of targets -> best match."""

    @functools.wraps(score_one)
    def metric(pred: Any, target: Any) -> float:
        if pred is None:
            return 0.0
        return max((score_one(pred, t) for t in _targets(target) if t is not None), default=0.0)

    return metric


@_best
def exact_match(pred: Any, target: Any) -> float:
    """1.0 when the normalised prediction equals the normalised target."""
    return float(normalize_answer(pred) == normalize_answer(target))


@_best
def f1(pred: Any, target: Any) -> float:
    """SQuAD token F1 between the normalised prediction and target."""
    pred_tokens = normalize_answer(pred).split()
    target_tokens = normalize_answer(target).split()
    if not pred_tokens or not target_tokens:
        return float(pred_tokens == target_tokens)
    common = sum((Counter(pred_tokens) & Counter(target_tokens)).values())
    if common == 0:
        return 0.0
    precision = common / len(pred_tokens)
    recall = common / len(target_tokens)
    return 2 * precision * recall / (precision + recall)


@_best
def contains(pred: Any, target: Any) -> float:
    """1.0 when the normalised target occurs in the normalised prediction (as whole words)."""
    wanted, said = normalize_answer(target), normalize_answer(pred)
    if not wanted:
        return float(not said)  # an empty target is in every string; only an empty answer matches it
    # Pad with spaces so "1" is not found inside "10".
    return float(f" {wanted} " in f" {said} ")


@_best
def accuracy(pred: Any, target: Any) -> float:
    """1.0 when the prediction equals the target as text, ignoring surrounding whitespace only."""
    return float(str(pred).strip() == str(target).strip())


METRICS: dict[str, Metric] = {
    "exact_match": exact_match,
    "f1": f1,
    "contains": contains,
    "accuracy": accuracy,
}


def resolve_metric(name_or_path: str, base_dir: str | Path | None = None) -> Metric:
    """A builtin metric by name, or user code: `module:function` or `path/to/file.py:function`, found
    relative to `base_dir` (the spec's folder) exactly as function nodes find theirs
    (builtins.import_user_module)."""
    if name_or_path in METRICS:
        return METRICS[name_or_path]
    module_name, attr = split_ref(name_or_path) if ":" in name_or_path else ("", "")
    if not module_name or not attr:
        raise SpecError(
            key="metric", expected=f"one of {', '.join(METRICS)} or module:function",
            got=repr(name_or_path)
        )
    module = _import_module(module_name, name_or_path, base_dir)
    fn: Any = module
    for part in attr.split("."):
        fn = getattr(fn, part, None)
    if not callable(fn):
        raise SpecError(
            f"could not import metric {name_or_path!r}: {user_module_label(module_name, base_dir)} "
            f"has no function {attr!r}",
            key="metric",
        )
    return _checked(fn)


def _import_module(module_name: str, spec_text: str, base_dir: str | Path | None) -> Any:
    try:
        return import_user_module(module_name, base_dir)
    except (Exception, SystemExit) as exc:  # any failure while importing user code is a spec problem
        hint = None if is_file_ref(module_name) else (
            "hint: a module is looked for in the spec's folder first (mylib/funcs.py for `mylib.funcs:fn`), "
            "then on sys.path (PYTHONPATH, installed packages)")
        raise SpecError(
            f"could not import metric {spec_text!r}: {describe_exception(exc)}",
            key="metric",
            hint=hint,
        ) from None


def _checked(fn: Callable[..., Any]) -> Metric:
    """A user metric as the engine calls it: any argument names (the spec's `args`), a bool as 0.0 or 1.0.
    The range is checked where the score is used (engine.score, with the example's id), not in here: an
    error raised in here would read as the metric itself raising."""

    @functools.wraps(fn)
    def metric(*args: Any, **kwargs: Any) -> Any:
        value = fn(*args, **kwargs)
        return float(value) if isinstance(value, bool) else value

    return metric
