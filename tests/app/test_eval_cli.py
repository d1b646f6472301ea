"""`autodiff eval` through the real CLI and litellm with the scripted fake model."""
from __future__ import annotations

import json

from typer.testing import CliRunner

from autodiff_cli.app.cli import app
from tests.conftest import write

SCRIPT = """
rules:
  - match: "boom"
    error: 503
  - match: "apples"
    reply: "Answer: 3"
  - match: "pears"
    reply: "Answer: 5"
default: "Answer: 0"
"""

SPEC = """
name: tiny
models:
  task: {model: fake/script.yaml, max_retries: 1}
data:
  val: val.jsonl
params:
  instruction: {value: "Count."}
nodes:
  count: {kind: llm, system: "{{ instruction }}", user: "{{ input.question }}"}
  parse: {kind: function, fn: last_integer, args: {text: count}}
output: parse
metric: {fn: exact_match, args: {pred: parse, target: input.answer}}
train: {max_error_rate: 0.2}
"""

ROWS = [
    {"id": "e1", "question": "3 apples?", "answer": "3"},
    {"id": "e2", "question": "5 pears?", "answer": "5"},
    {"id": "e3", "question": "some plums?", "answer": "2"},
    {"id": "e4", "question": "4 apples?", "answer": "4"},
]


def setup(tmp_path, rows=ROWS, spec=SPEC):
    write(tmp_path / "script.yaml", SCRIPT)
    (tmp_path / "val.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return write(tmp_path / "spec.yaml", spec)


def invoke(*args):
    return CliRunner().invoke(app, [str(a) for a in args])


def test_json_result_follows_the_contract_and_rerun_is_fully_cached(tmp_path):
    spec = setup(tmp_path)
    first = invoke("eval", spec, "--json", "--out", tmp_path / "rows.jsonl")
    assert first.exit_code == 0, first.output
    result = json.loads(first.stdout.strip().splitlines()[-1])
    assert {"split", "n", "completed", "errors", "score", "usage"} <= set(result)
    assert (result["split"], result["n"], result["completed"], result["errors"]) == ("val", 4, 4, 0)
    assert result["score"] == 0.5  # e1, e2 right; e3, e4 wrong
    assert set(result["usage"]) == {"task", "backward", "optimizer", "teacher"}
    assert result["usage"]["task"]["calls"] == 4 and result["usage"]["task"]["prompt_tokens"] > 0
    rows = [json.loads(line) for line in (tmp_path / "rows.jsonl").read_text().splitlines()]
    assert [r["id"] for r in rows] == ["e1", "e2", "e3", "e4"]
    assert rows[0] == {"id": "e1", "prediction": "3", "target": "3", "score": 1.0, "error": None}

    second = json.loads(invoke("eval", spec, "--json").stdout.strip().splitlines()[-1])
    assert second["usage"]["task"]["calls"] == 0 and second["usage"]["task"]["cached_calls"] == 4
    assert second["score"] == result["score"]

    uncached = json.loads(invoke("eval", spec, "--json", "--no-cache").stdout.strip().splitlines()[-1])
    assert uncached["usage"]["task"]["calls"] == 4


def test_fail_under_exits_1_and_limit_counts(tmp_path):
    spec = setup(tmp_path)
    below = invoke("eval", spec, "--fail-under", "0.6")
    assert below.exit_code == 1
    assert invoke("eval", spec, "--limit", "2", "--fail-under", "0.6").exit_code == 0


def test_model_errors_are_counted_apart_and_exit_3_above_the_limit(tmp_path):
    rows = ROWS[:3] + [{"id": "bad", "question": "boom", "answer": "1"}]
    spec = setup(tmp_path, rows)
    res = invoke("eval", spec, "--json", "--out", tmp_path / "rows.jsonl")
    assert res.exit_code == 3, res.output
    result = json.loads(res.stdout.strip().splitlines()[-1])
    assert (result["completed"], result["errors"]) == (3, 1)
    assert result["score"] == 2 / 3  # the failed example is not scored as wrong
    assert result["usage"]["task"]["errors"] == 2  # 1 attempt + 1 retry
    bad = [json.loads(x) for x in (tmp_path / "rows.jsonl").read_text().splitlines()][-1]
    assert bad["score"] is None and bad["error"]
    assert "max_error_rate" in res.stderr


def test_prompts_file_overrides_values_and_unknown_params_are_refused(tmp_path):
    spec = setup(tmp_path)
    write(tmp_path / "prompts.yaml", "instruction: 'Count twice.'\n")
    assert invoke("eval", spec, "--prompts", tmp_path / "prompts.yaml").exit_code == 0
    write(tmp_path / "bad.yaml", "instrution: 'x'\n")
    res = invoke("eval", spec, "--prompts", tmp_path / "bad.yaml")
    assert res.exit_code == 2 and "unknown param `instrution`" in res.stderr


def test_bad_split_and_missing_split_exit_2(tmp_path):
    spec = setup(tmp_path)
    assert invoke("eval", spec, "--split", "dev").exit_code == 2
    res = invoke("eval", spec, "--split", "test")
    assert res.exit_code == 2 and "`test` split" in res.stderr
