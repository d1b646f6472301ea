"""User code that raises on an example (a function node, the metric, the loss) is an error of that example:
unscored, counted in `errors` like a failed model call, shown in `--out` and the run directory; above
`max_error_rate` the run ends `failed` (exit 3), and a run is never left `running`."""
from __future__ import annotations

import asyncio
import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from autodiff_cli.app.cli import app
from autodiff_cli.data.loaders import Example
from autodiff_cli.engine.evaluate import evaluate
from autodiff_cli.engine.forward import MetricValueError, UserCodeError, score
from autodiff_cli.io.rundir import RunDir
from autodiff_cli.llm.fake import reset_fake_state
from autodiff_cli.nodes.compiler import compile_spec
from autodiff_cli.spec.loader import load_spec
from tests.conftest import write
from tests.specs import TOY_SCRIPT, TOY_SPEC

HELPERS = """\
import re
import sys


def pick(text, question):
    if "n=5" in question:
        raise ValueError(f"five is not allowed: {question!r}")
    if "n=6" in question:
        sys.exit("the helper gave up")
    found = re.findall(r"\\d+", text or "")
    return found[-1] if found else None


def picky_loss(pred, target):
    if target == "2":
        raise KeyError("no loss for two")
    return float(pred == target)


def picky_metric(pred, target):
    if target == "3":
        raise RuntimeError("no metric for three")
    return float(pred == target)
"""

PARSE = "parse: {kind: function, fn: last_integer, args: {text: count}}"
RAISING_PARSE = 'parse: {kind: function, fn: "helpers.py:pick", args: {text: count, question: input.question}}'


def rows(prefix, ns):
    return [{"id": f"{prefix}{i}", "question": f"How many? n={n}", "answer": str(n)} for i, n in enumerate(ns)]


@pytest.fixture(autouse=True)
def fresh_fake():
    reset_fake_state()


def setup(tmp_path: Path, spec: str, train=(1, 2, 3, 1, 4, 5, 1, 2), val=(1, 2, 3, 4), test=(1, 3, 4)) -> Path:
    write(tmp_path / "script.yaml", TOY_SCRIPT % {"new": "Count the things. ALWAYS ADD the counts."})
    write(tmp_path / "helpers.py", HELPERS)
    for name, ns in (("train", train), ("val", val), ("test", test)):
        (tmp_path / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows(name, ns)))
    return write(tmp_path / "spec.yaml", spec)


def raising_spec(train: str = "", metric: str | None = None, loss: str | None = None) -> str:
    text = TOY_SPEC.replace(PARSE, RAISING_PARSE)
    assert text != TOY_SPEC
    if metric:
        text = text.replace("metric: {fn: exact_match,", f'metric: {{fn: "{metric}",')
    if loss:
        text += f'loss: {{fn: "{loss}", args: {{pred: parse, target: input.answer}}}}\n'
    return text.replace("seed: 0}", f"seed: 0{train}}}")


def invoke(*args):
    return CliRunner().invoke(app, [str(a) for a in args])


def out_rows(path: Path) -> dict[str, dict]:
    return {r["id"]: r for r in map(json.loads, path.read_text().splitlines())}


# ---------------------------------------------------------------- eval


def test_eval_counts_a_raising_function_as_an_error_of_that_example(tmp_path):
    spec = setup(tmp_path, raising_spec(), val=(1, 2, 3, 4, 5, 1, 2, 3, 4, 1))  # 1 of 10 raises
    out = tmp_path / "rows.jsonl"
    result = invoke("eval", spec, "--json", "--out", out, "--set", "train.max_error_rate=0.2")
    assert result.exit_code == 0, result.output  # below max_error_rate: the score of the others stands
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert (report["n"], report["completed"], report["errors"]) == (10, 9, 1)
    written = out_rows(out)
    failed = written["val4"]
    assert failed["score"] is None and failed["prediction"] is None and failed["target"] == "5"
    assert failed["error"] == ("nodes.parse: helpers.py:pick raised ValueError: five is not allowed: "
                               "'How many? n=5' (example val4)")
    assert all(r["error"] is None and r["score"] is not None for i, r in written.items() if i != "val4")
    assert report["score"] == pytest.approx(sum(r["score"] for r in written.values() if r["score"] is not None) / 9)


def test_eval_above_max_error_rate_exits_3_naming_the_function_and_example(tmp_path):
    spec = setup(tmp_path, raising_spec(), val=(5, 6, 1, 2))  # a ValueError and a sys.exit()
    out = tmp_path / "rows.jsonl"
    result = invoke("eval", spec, "--json", "--out", out)
    assert result.exit_code == 3, result.output
    assert json.loads(result.stdout.strip().splitlines()[-1])["errors"] == 2
    assert "first: nodes.parse: helpers.py:pick raised ValueError: five is not allowed" in result.stderr
    assert "(example val0)" in result.stderr and "Traceback" not in result.output
    written = out_rows(out)
    assert written["val1"]["error"] == ("nodes.parse: helpers.py:pick raised SystemExit: the helper gave up "
                                        "(example val1)")
    assert [written[i]["score"] for i in ("val2", "val3")] == [1.0, 0.0]  # "Answer: 0" for n=2 without ALWAYS ADD


def test_eval_counts_a_raising_metric_as_an_error_of_that_example(tmp_path):
    spec = setup(tmp_path, raising_spec(metric="helpers.py:picky_metric"), val=(1, 2, 3, 4))
    out = tmp_path / "rows.jsonl"
    result = invoke("eval", spec, "--json", "--out", out, "--set", "train.max_error_rate=0.3")
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout.strip().splitlines()[-1])["errors"] == 1
    row = out_rows(out)["val2"]
    assert row["score"] is None and row["prediction"] == "0"  # the pipeline ran: what it predicted is kept
    assert row["error"] == "metric: helpers.py:picky_metric raised RuntimeError: no metric for three (example val2)"


def test_the_failed_call_joins_the_trace_with_its_error(tmp_path):
    spec = setup(tmp_path, raising_spec())
    program = compile_spec(load_spec(spec))

    class Client:
        async def complete(self, model, messages, **kw):
            from tests.nodes.test_nodes import Reply

            return Reply("Answer: 5")

    examples = [Example("a", {"question": "How many? n=5", "answer": "5"}),
                Example("b", {"question": "How many? n=1", "answer": "1"})]
    report = asyncio.run(evaluate(program, examples, {"instruction": "x", "answer_format": "y"}, Client(), losses=True))
    bad, good = report.results
    assert bad.error and bad.trace.error == bad.error and bad.loss is None and bad.score is None
    assert [(c.node, c.error is not None) for c in bad.trace.calls] == [("count", False), ("parse", True)]
    assert bad.trace.calls[-1].error == bad.error
    assert (good.error, good.score, good.loss) == (None, 0.0, 0.0)  # "5" is not "1"
    assert report.errors == 1


def test_a_raising_loss_is_an_error_only_when_losses_are_asked_for(tmp_path):
    spec = setup(tmp_path, raising_spec(loss="helpers.py:picky_loss"))
    program = compile_spec(load_spec(spec))

    class Client:
        async def complete(self, model, messages, **kw):
            from tests.nodes.test_nodes import Reply

            return Reply("Answer: 2")

    examples = [Example("a", {"question": "How many? n=2", "answer": "2"})]
    values = {"instruction": "x", "answer_format": "y"}
    plain = asyncio.run(evaluate(program, examples, values, Client()))
    assert plain.errors == 0 and plain.score == 1.0  # eval scores the metric; the loss is not run
    trained = asyncio.run(evaluate(program, examples, values, Client(), losses=True))
    (result,) = trained.results
    assert trained.errors == 1 and result.score is None and result.loss is None
    assert result.error == "loss: helpers.py:picky_loss raised KeyError: 'no loss for two' (example a)"


def test_a_metric_value_out_of_range_still_stops_with_a_located_error(tmp_path):
    spec = setup(tmp_path, raising_spec())
    program = compile_spec(load_spec(spec))
    program.metric.fn = lambda **kwargs: 7
    trace = type("T", (), {"example_id": "q", "slots": {}})()
    program.metric.args = {}
    with pytest.raises(MetricValueError) as info:
        score(program.metric, trace)
    assert not isinstance(info.value, UserCodeError)
    assert info.value.render().startswith(f"error: {spec}:") and "metric.fn" in info.value.render()


# ---------------------------------------------------------------- train


def train(tmp_path, *args):
    result = invoke("train", tmp_path / "spec.yaml", "--runs-dir", tmp_path / "runs", *args)
    run_dir = Path(result.stdout.strip().splitlines()[-1]) if result.stdout.strip() else None
    return result, run_dir


def summary_of(run: Path) -> dict:
    return json.loads((run / "summary.json").read_text())


def error_rows(run: Path) -> list[dict]:
    found = []
    for path in sorted((run / "traces").glob("step-*.jsonl")):
        found += [r for r in map(json.loads, path.read_text().splitlines()) if r["kind"] == "error"]
    return found


def test_train_below_max_error_rate_leaves_the_example_out_and_completes(tmp_path):
    setup(tmp_path, raising_spec(", max_error_rate: 0.3"))  # one of the 8 training examples raises
    result, run = train(tmp_path)
    assert result.exit_code == 0, result.output
    summary = summary_of(run)
    assert summary["status"] == "completed" and summary["best"]["val"] == 1.0
    (row,) = error_rows(run)
    assert row == {"kind": "error", "example_id": "train5",
                   "error": "nodes.parse: helpers.py:pick raised ValueError: five is not allowed: 'How many? n=5' "
                            "(example train5)"}
    metrics = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    step = next(m for m in metrics if "train5" in m["batch_ids"])
    assert "train5" not in (step["subset_ids"] or [])  # not scored, not backpropagated
    gradients = [json.loads(x) for x in (run / "traces" / f"step-{step['step']:04d}.jsonl").read_text().splitlines()]
    assert all(g.get("example_id") != "train5" for g in gradients if g["kind"] == "gradient")


def test_train_above_max_error_rate_ends_failed_with_the_reason_and_exit_3(tmp_path):
    setup(tmp_path, raising_spec(", max_error_rate: 0.1"))
    result, run = train(tmp_path)
    assert result.exit_code == 3, result.output
    summary = summary_of(run)
    assert summary["status"] == "failed"
    assert summary["reason"].startswith("1 of 4 training examples failed with model-call errors or errors of user "
                                        "code (max_error_rate 0.1); first: nodes.parse: helpers.py:pick raised "
                                        "ValueError: five is not allowed"), summary["reason"]
    assert "(example train5)" in summary["reason"]
    assert "Traceback" not in result.output


def test_train_with_a_raising_loss_above_max_error_rate_ends_failed(tmp_path):
    setup(tmp_path, raising_spec(", max_error_rate: 0.1", loss="helpers.py:picky_loss"), train=(1, 2, 3, 1, 4, 1, 1, 2))
    result, run = train(tmp_path)
    assert result.exit_code == 3, result.output
    summary = summary_of(run)
    assert summary["status"] == "failed"
    assert "first: loss: helpers.py:picky_loss raised KeyError: 'no loss for two' (example train" in summary["reason"]


def test_a_raising_function_in_the_initial_validation_fails_the_run_like_a_model_error(tmp_path):
    setup(tmp_path, raising_spec(", max_error_rate: 0.5"), val=(1, 2, 5, 4))
    result, run = train(tmp_path)
    assert result.exit_code == 3, result.output
    summary = summary_of(run)
    assert summary["status"] == "failed"
    assert summary["reason"].startswith("the initial validation has 1 examples with model-call errors or errors of "
                                        "user code after a retry; first: nodes.parse: helpers.py:pick raised "
                                        "ValueError"), summary["reason"]


@pytest.mark.parametrize("rate, status", [(0.3, "completed"), (0.1, "failed")])
def test_a_run_is_never_left_running(tmp_path, rate, status):
    setup(tmp_path, raising_spec(f", max_error_rate: {rate}"))
    _, run = train(tmp_path)
    summary = summary_of(run)
    assert summary["status"] == status
    rd = RunDir.open(run)
    assert rd.liveness(summary) == status and not rd.in_use()  # the process let go of the run
