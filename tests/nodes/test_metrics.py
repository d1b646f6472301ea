"""Builtin metrics, their edge cases, and resolving custom `module:function` metrics."""
from __future__ import annotations

import json
import sys

import pytest
from hypothesis import given
from hypothesis import strategies as st
from typer.testing import CliRunner

from autodiff_cli.app.cli import app
from autodiff_cli.errors import SpecError
from autodiff_cli.nodes.metrics import (
    METRICS,
    accuracy,
    contains,
    exact_match,
    f1,
    normalize_answer,
    resolve_metric,
)


@pytest.mark.parametrize(
    ("text", "normal"),
    [
        ("The  Eiffel Tower!", "eiffel tower"),
        ("An apple, a pear.", "apple pear"),
        ("  12 ", "12"),
        ("theory", "theory"),  # "the" only as a whole word
        ("A", ""),
        (42, "42"),
    ],
)
def test_normalize_answer(text, normal):
    assert normalize_answer(text) == normal


def test_exact_match():
    assert exact_match("The answer: Paris.", "paris") == 0.0
    assert exact_match("  Paris. ", "paris") == 1.0
    assert exact_match("the Beatles", "Beatles") == 1.0
    assert exact_match("8", 8) == 1.0
    assert exact_match(None, "x") == 0.0


def test_exact_match_list_of_targets():
    assert exact_match("NYC", ["New York City", "nyc"]) == 1.0
    assert exact_match("Boston", ["New York City", "nyc"]) == 0.0
    assert exact_match("x", []) == 0.0


def test_f1_is_squad_token_f1():
    assert f1("the cat sat", "cat sat down") == pytest.approx(0.8)  # p=2/2, r=2/3
    assert f1("cat cat", "cat") == pytest.approx(2 / 3)  # token counts, not sets
    assert f1("dog", "cat") == 0.0
    assert f1("", "") == 1.0 and f1("the", "cat") == 0.0
    assert f1(None, "cat") == 0.0
    assert f1("cat sat", ["dog", "cat sat"]) == 1.0


def test_contains():
    assert contains("I think the answer is Paris, France.", "paris") == 1.0
    assert contains("The answer is 10.", "1") == 0.0  # whole words: "1" is not in "10"
    assert contains("The answer is 10.", "10") == 1.0
    assert contains("no idea", "paris") == 0.0
    assert contains("anything", "") == 0.0 and contains("", "the") == 1.0
    assert contains(None, "x") == 0.0
    assert contains("it is LOC", ["HUM", "LOC"]) == 1.0


def test_accuracy_is_plain_string_equality():
    assert accuracy(" LOC\n", "LOC") == 1.0
    assert accuracy("loc", "LOC") == 0.0
    assert accuracy("LOC.", "LOC") == 0.0
    assert accuracy(3, "3") == 1.0
    assert accuracy(None, "None") == 0.0


@given(
    st.one_of(st.none(), st.text(max_size=30)),
    st.one_of(st.text(max_size=30), st.lists(st.text(max_size=10), max_size=3)),
)
def test_every_metric_returns_a_float_in_unit_interval(pred, target):
    for metric in METRICS.values():
        value = metric(pred, target)
        assert isinstance(value, float) and 0.0 <= value <= 1.0


@given(st.text(max_size=40))
def test_a_prediction_matches_itself(text):
    assert exact_match(text, text) == 1.0 and f1(text, text) == 1.0 and accuracy(text, text) == 1.0
    assert contains(text, text) == 1.0


def test_resolve_builtin_names():
    for name, fn in METRICS.items():
        assert resolve_metric(name) is fn
    assert set(METRICS) == {"exact_match", "f1", "contains", "accuracy"}


@pytest.fixture
def user_module(tmp_path, monkeypatch):
    (tmp_path / "my_metrics.py").write_text(
        "def half(pred, target):\n    return 0.5\n"
        "def strict(pred, target):\n    return pred == target\n"
        "def broken(pred, target):\n    return 7\n"
        "NOT_CALLABLE = 3\n",
        encoding="utf-8",
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    yield tmp_path
    sys.modules.pop("my_metrics", None)


def test_resolve_module_function(user_module):
    assert resolve_metric("my_metrics:half")("a", "b") == 0.5
    strict = resolve_metric("my_metrics:strict")
    assert strict("a", "a") == 1.0 and isinstance(strict("a", "a"), float)


def test_resolve_file_path(user_module):
    assert resolve_metric(f"{user_module / 'my_metrics.py'}:half")("a", "b") == 0.5


SPEC = """\
name: scored
models:
  task: {model: fake/script.yaml}
data:
  val: val.jsonl
nodes:
  answer: {kind: llm, user: "{{ input.question }}"}
output: answer
metric: {fn: METRIC, args: ARGS}
"""

USER_METRICS = """\
from autodiff_cli.errors import DataError

def two(pred, target):
    return 2.0

def nan(pred, target):
    return float("nan")

def words(pred, target):
    return "high"

def boom(pred, target):
    raise ValueError("bad input")

def reads_a_file(pred, target):
    raise DataError(file="gold.jsonl", line=3, key="answer", expected="a string", got="a list")

def named(prediction, gold):
    return float(prediction == gold)
"""


def eval_with_metric(tmp_path, monkeypatch, metric: str, args: str = "{pred: answer, target: input.answer}"):
    (tmp_path / "script.yaml").write_text('default: "4"\n', encoding="utf-8")
    (tmp_path / "val.jsonl").write_text('{"id": "q1", "question": "2+2?", "answer": "4"}\n', encoding="utf-8")
    (tmp_path / "user_metrics_mod.py").write_text(USER_METRICS, encoding="utf-8")
    spec = tmp_path / "spec.yaml"
    spec.write_text(SPEC.replace("METRIC", metric).replace("ARGS", args), encoding="utf-8")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, "user_metrics_mod", raising=False)
    r = CliRunner().invoke(app, ["eval", str(spec), "--no-cache", "--quiet", "--json"])
    assert r.exception is None or isinstance(r.exception, SystemExit), repr(r.exception)
    return r, spec


@pytest.mark.parametrize("fn, shown", [("two", "2.0"), ("nan", "nan"), ("words", "'high'")])
def test_a_metric_returning_a_value_out_of_range_says_so_plainly(tmp_path, monkeypatch, fn, shown):
    r, spec = eval_with_metric(tmp_path, monkeypatch, f"'user_metrics_mod:{fn}'")
    assert r.exit_code == 2, r.output
    assert r.stderr == (f"error: {spec}:9: metric.fn: user_metrics_mod:{fn} returned {shown} for example q1, a "
                        "score outside [0, 1] (a metric returns a number from 0 to 1)\n")


def test_a_metric_that_raises_is_an_error_of_the_example_reported_once_with_its_exception(tmp_path, monkeypatch):
    # an error of that example, counted like a failed model call (here 1 of 1: above max_error_rate, exit 3)
    r, _ = eval_with_metric(tmp_path, monkeypatch, "'user_metrics_mod:boom'")
    assert r.exit_code == 3, r.output
    assert json.loads(r.stdout)["errors"] == 1
    assert r.stderr.count("error:") == 1, r.stderr
    assert "first: metric: user_metrics_mod:boom raised ValueError: bad input (example q1)\n" in r.stderr, r.stderr


def test_an_autodiff_error_raised_by_a_metric_keeps_a_single_error_prefix(tmp_path, monkeypatch):
    r, _ = eval_with_metric(tmp_path, monkeypatch, "'user_metrics_mod:reads_a_file'")
    assert r.exit_code == 3, r.output
    assert r.stderr.count("error:") == 1, r.stderr
    assert ("first: metric: user_metrics_mod:reads_a_file raised DataError: gold.jsonl:3: answer: expected a "
            "string, got a list (example q1)") in r.stderr, r.stderr


def test_a_metric_with_its_own_argument_names_is_called_with_them(tmp_path, monkeypatch):
    r, _ = eval_with_metric(tmp_path, monkeypatch, "'user_metrics_mod:named'",
                            "{prediction: answer, gold: input.answer}")
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout)["score"] == 1.0


@pytest.mark.parametrize(
    ("spec", "says"),
    [
        ("no_such_module_xyz:fn", "could not import metric 'no_such_module_xyz:fn': ModuleNotFoundError"),
        ("my_metrics:missing", "module 'my_metrics' has no function 'missing'"),
        ("my_metrics:NOT_CALLABLE", "has no function 'NOT_CALLABLE'"),
        ("/nowhere/m.py:fn", "could not import metric '/nowhere/m.py:fn'"),
        ("bleu", "expected one of exact_match, f1, contains, accuracy or module:function, got 'bleu'"),
    ],
)
def test_resolve_errors(user_module, spec, says):
    with pytest.raises(SpecError) as info:
        resolve_metric(spec)
    message = str(info.value)
    assert message.startswith("error: metric: ") and says in message


def test_module_that_raises_on_import(tmp_path, monkeypatch):
    (tmp_path / "bad_metric_mod.py").write_text("raise RuntimeError('boom')\n", encoding="utf-8")
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(SpecError) as info:
        resolve_metric("bad_metric_mod:fn")
    assert "RuntimeError: boom" in str(info.value)


def test_an_autodiff_error_while_importing_a_metric_is_not_prefixed_twice(tmp_path, monkeypatch):
    (tmp_path / "needs_config_mod.py").write_text(
        "from autodiff_cli.errors import UsageError\n"
        "raise UsageError(key='MY_SETTING', expected='a path', got='nothing')\n",
        encoding="utf-8")
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(SpecError) as info:
        resolve_metric("needs_config_mod:fn")
    message = str(info.value)
    assert message.count("error:") == 1, message
    assert ("could not import metric 'needs_config_mod:fn': UsageError: MY_SETTING: expected a path, got nothing"
            in message)
