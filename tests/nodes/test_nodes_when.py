"""`nodes.<n>.when`: conditional nodes, through the real compiler, forward engine, model client (the
scripted fake model) and backward engine.

A false condition skips the node: a skipped call in the trace (no messages, no model call), output
None; nodes whose inputs were all skipped are skipped too; the backward pass gives skipped calls and
what only they read no gradient. A condition that fails on an example's values is an error of that
example; one that reads a field a model's output lacks is false, with a warning.
"""
from __future__ import annotations

import asyncio
import json
import logging

import pytest
import yaml
from typer.testing import CliRunner

from autodiff_cli.app.cli import app
from autodiff_cli.data.loaders import Example
from autodiff_cli.engine.evaluate import evaluate
from autodiff_cli.engine.forward import ForwardEngine, score
from autodiff_cli.engine.program import invocations
from autodiff_cli.errors import SpecError
from autodiff_cli.grad.backward import BackwardEngine, _input_key, _param_key
from autodiff_cli.grad.loss import evaluate_loss
from autodiff_cli.llm.client import ModelClient
from autodiff_cli.llm.fake import reset_fake_state
from autodiff_cli.llm.usage import Usage
from autodiff_cli.nodes.compiler import compile_spec
from autodiff_cli.spec.loader import load_spec
from autodiff_cli.spec.prompts_file import initial_values
from tests.conftest import write

HEAD = """\
name: branches
models:
  task: {model: fake/script.yaml}
  backward: {model: fake/script.yaml}
data:
  val: val.jsonl
"""

ROUTER = HEAD + """\
params:
  route_instruction: {value: "Route the question."}
  count_instruction: {value: "Count the items."}
  math_instruction: {value: "Compute the result."}
nodes:
  classify: {kind: llm, system: "{{ route_instruction }}", user: "{{ input.question }}"}
  route: {kind: function, fn: label, args: {text: classify}, with: {labels: [count, math], default: math}}
  count:
    kind: llm
    when: "route == 'count'"
    system: "{{ count_instruction }}"
    user: "{{ input.question }}"
  math:
    kind: llm
    when: "route == 'math'"
    system: "{{ math_instruction }}"
    user: "{{ input.question }}"
  count_parse: {kind: function, fn: last_integer, args: {text: count}}
  math_parse: {kind: function, fn: last_integer, args: {text: math}}
  answer: {kind: function, fn: first_of, args: {counted: count_parse, computed: math_parse}}
output: answer
metric: {fn: exact_match, args: {pred: answer, target: input.answer}}
"""

BACKWARD = {
    "count#0": {_param_key("count_instruction"): "Add up every item.",
                _input_key("when: route"): "Right branch: it is a counting question."},
    "classify#0": {_param_key("route_instruction"): "Name the branch by the question's verb."},
    "math#0": {_param_key("math_instruction"): "Do the arithmetic.",
               _input_key("when: route"): "Right branch: it is arithmetic."},
}


def script(backward: dict = BACKWARD) -> str:
    rules = [{"match": f"^Invocation {call} ", "reply": json.dumps(reply)} for call, reply in backward.items()]
    rules += [
        {"match": r"Route the question[\s\S]*How many", "in": "all", "reply": "count"},
        {"match": "Route the question", "in": "system", "reply": "math"},
        {"match": "Count the items", "in": "system", "reply": "Answer: 1"},
        {"match": "Compute the result", "in": "system", "reply": "Answer: 0"},
        {"match": "Write a note", "in": "system", "reply": "note {user}"},
        {"match": "Expand", "in": "system", "reply": "more on {user}"},
    ]
    return yaml.safe_dump({"rules": rules, "default": "no idea"}, sort_keys=False)


COUNTING = {"question": "How many apples? 2 apples and 3 apples.", "answer": "5"}
ARITHMETIC = {"question": "What is 2 plus 3?", "answer": "5"}


@pytest.fixture(autouse=True)
def fresh_fake():
    reset_fake_state()


def setup(tmp_path, spec: str = ROUTER):
    write(tmp_path / "script.yaml", script())
    (tmp_path / "val.jsonl").write_text("")
    loaded = load_spec(write(tmp_path / "spec.yaml", spec))
    program = compile_spec(loaded)
    client = ModelClient(loaded.spec.models, config_dir=tmp_path, usage=Usage(), cache=None, base_delay=0)
    return program, client


def run(program, client, example_id: str, fields: dict):
    return asyncio.run(ForwardEngine(program, client).run(example_id, fields, initial_values(program.spec)))


def backward(program, client, trace):
    ev = evaluate_loss(program, trace, score(program.loss, trace), 0.5)
    trainable = {n for n, p in program.params.items() if p.trainable}
    return asyncio.run(BackwardEngine(program, client, "backward", trainable).backward(trace, ev)), ev


# ------------------------------------------------------------------ compile


def test_what_a_condition_reads_orders_the_graph_and_counts_as_used(tmp_path):
    program, _ = setup(tmp_path)  # `route` feeds only conditions: it is used, and runs before them
    assert program.scope.generations == [["classify"], ["route"], ["count", "math"],
                                         ["count_parse", "math_parse"], ["answer"]]
    math = program.node("math")
    assert math.when.source == "route == 'math'"
    assert [str(r) for r in math.when_reads] == ["route"] and [str(r) for r in math.condition_inputs()] == ["route"]
    assert program.node("count_parse").upstream == ("count",)


@pytest.mark.parametrize("when, expected, got", [
    ("rout == 'math'", "a node, param or `input` (", "unknown name `rout`"),
    ("route ==", "a restricted expression over the node's inputs (the language of `until`)", "invalid syntax"),
    ("__import__('os')", "a restricted expression over the node's inputs", "names starting with `_`"),
    ("route.lower() == 'math'", "a restricted expression over the node's inputs", "method calls are not supported"),
    ("len(input) > 3", "a field of the example, e.g. `input.question`", "`input` alone"),
    ("state.n > 1", "`state` only inside a loop body", "`state` outside a loop"),
    ("math == 'x'", "a condition that does not read the node's own output", "a reference to `math`"),
    ("answer == 'x'", "no cycle outside a declared loop", "the cycle"),
])
def test_condition_errors_are_located_at_the_when_key(tmp_path, when, expected, got):
    text = ROUTER.replace("when: \"route == 'math'\"", f"when: {json.dumps(when)}")
    with pytest.raises(SpecError) as e:
        setup(tmp_path, text)
    line = text.splitlines().index(f"    when: {json.dumps(when)}") + 1
    if "cycle" in expected:  # a cycle is reported at the node where it starts
        assert e.value.expected.startswith(expected) and got in e.value.got
        return
    assert (e.value.file, e.value.line, e.value.key) == (str(tmp_path / "spec.yaml"), line, "nodes.math.when")
    assert e.value.expected.startswith(expected) and got in e.value.got


def test_validate_prints_the_contract_error_line(tmp_path):
    text = ROUTER.replace("when: \"route == 'math'\"", "when: \"route == 'math' and kind == 2\"")
    write(tmp_path / "script.yaml", script())
    (tmp_path / "val.jsonl").write_text("")
    spec = write(tmp_path / "spec.yaml", text)
    r = CliRunner().invoke(app, ["validate", str(spec)])
    line = text.splitlines().index("    when: \"route == 'math' and kind == 2\"") + 1
    assert r.exit_code == 2
    assert r.stderr.startswith(f"error: {spec}:{line}: nodes.math.when: expected a node, param or `input` (")
    assert "got unknown name `kind`" in r.stderr


def test_condition_fields_of_a_loop_output_and_state_are_checked(tmp_path):
    text = LOOP.replace("when: \"iteration == 1\"", "when: \"len(state.nots) > 0\"")
    with pytest.raises(SpecError) as e:
        setup(tmp_path, text)
    assert e.value.key == "nodes.hops.body.extra.when" and "a key of the loop's `state`: notes" in e.value.expected


# ------------------------------------------------------------------ forward


def test_a_false_condition_skips_the_node_at_no_cost(tmp_path):
    program, client = setup(tmp_path)
    trace = run(program, client, "c1", COUNTING)
    assert [(c.id, c.skipped) for c in trace.calls] == [
        ("classify#0", False), ("route#0", False), ("count#0", False), ("math#0", True),
        ("count_parse#0", False), ("math_parse#0", True), ("answer#0", False)]
    math = trace.call("math#0")
    assert math.messages is None and math.output is None and math.model is None
    assert (math.prompt_tokens, math.completion_tokens, math.params) == (0, 0, {})
    assert math.when == "route == 'math'"
    assert math.inputs["when: route"].value == "count" and math.inputs["when: route"].sources == ["route#0"]
    # the branch that ran records what its condition read, as a traced input from the router
    count = trace.call("count#0")
    assert count.when == "route == 'count'" and count.inputs["when: route"].condition
    assert count.inputs["when: route"].sources == ["route#0"]
    # a node whose only input was skipped is skipped too, with no condition of its own
    math_parse = trace.call("math_parse#0")
    assert math_parse.when is None and math_parse.inputs["math"].value is None
    # first_of takes the branch that ran; the skipped one fed it None from no call
    answer = trace.call("answer#0")
    assert answer.inputs["computed"].value is None and answer.inputs["computed"].sources == []
    assert trace.output == "1" and trace.output_sources == ["answer#0"]
    assert client.usage.role("task")["calls"] == 2  # classify and count: the skipped branch cost nothing
    row = json.loads(json.dumps(trace.to_dict()))
    skipped = next(c for c in row["calls"] if c["id"] == "math#0")
    assert skipped["skipped"] is True and skipped["messages"] is None
    assert skipped["inputs"]["when: route"] == {"value": "count", "from": ["route#0"], "condition": True}
    assert row["calls"][0]["inputs"]["input.question"] == {"value": COUNTING["question"], "from": []}


def test_when_every_branch_is_skipped_the_output_is_none_and_scores_zero(tmp_path):
    program, client = setup(tmp_path, ROUTER.replace("default: math", "default: neither"))
    write(tmp_path / "script.yaml", script().replace("reply: math", "reply: unsure"))
    trace = run(program, client, "q", ARITHMETIC)
    assert [c.id for c in trace.calls if c.skipped] == ["count#0", "math#0", "count_parse#0", "math_parse#0",
                                                        "answer#0"]
    assert trace.error is None and trace.output is None and score(program.metric, trace) == 0.0


def test_a_field_the_value_lacks_makes_the_condition_false_with_a_warning(tmp_path, caplog):
    program, client = setup(tmp_path, ROUTER.replace("when: \"route == 'math'\"", "when: \"classify.kind == 'math'\""))
    with caplog.at_level(logging.WARNING):
        trace = run(program, client, "q", ARITHMETIC)
    assert trace.error is None and trace.call("math#0").skipped  # "math" is text, not a mapping
    assert "nodes.math.when on example q" in caplog.text and "the node is skipped" in caplog.text


def test_a_condition_that_fails_is_an_error_of_its_example_only(tmp_path):
    spec = ROUTER.replace("when: \"route == 'math'\"", "when: \"int(input.level) > 1\"")
    program, client = setup(tmp_path, spec)
    examples = [Example("ok", {**ARITHMETIC, "level": "2"}), Example("bad", {**ARITHMETIC, "level": "high"})]
    report = asyncio.run(evaluate(program, examples, initial_values(program.spec), client))
    assert (report.n, report.completed, report.errors) == (2, 1, 1)
    bad = next(r for r in report.results if r.id == "bad")
    assert bad.score is None
    assert bad.error.startswith("nodes.math.when: int() cannot convert 'high'") and bad.error.endswith("(example bad)")
    failed = bad.trace.calls[-1]
    assert failed.id == "math#0" and failed.error == bad.error and not failed.skipped
    assert failed.inputs["when: input.level"].value == "high"
    ok = next(r for r in report.results if r.id == "ok")
    assert ok.error is None and ok.trace.call("math#0").output == "Answer: 0"


# ------------------------------------------------------------------ backward


def test_gradients_reach_only_the_branch_that_ran(tmp_path):
    program, client = setup(tmp_path)
    for example_id, fields, taken, other in (("c", COUNTING, "count", "math"), ("a", ARITHMETIC, "math", "count")):
        trace = run(program, client, example_id, fields)
        before = client.usage.role("backward")["calls"]
        result, ev = backward(program, client, trace)
        assert ev.failed and result.parse_failures == 0
        rows = {(g.node, g.target): g.feedback for g in result.gradients}
        assert set(rows) == {
            ("answer", f"call:{taken}_parse#0"), (f"{taken}_parse", f"call:{taken}#0"),
            (taken, f"param:{taken}_instruction"),
            (taken, "call:route#0"),  # through its condition: the decision that sent it here
            ("route", "call:classify#0"), ("classify", "param:route_instruction")}
        assert not any(other in node or other in target for node, target in rows)
        assert rows[(taken, "call:route#0")] == BACKWARD[f"{taken}#0"][_input_key("when: route")]
        # one backward call for the branch, one for the classifier; none for skipped calls
        assert client.usage.role("backward")["calls"] - before == 2


def test_the_dry_run_bounds_count_every_conditional_node(tmp_path):
    program, client = setup(tmp_path)
    assert [(n.name, t) for n, t in invocations(program.scope) if n.kind == "llm"] == [
        ("classify", 1), ("count", 1), ("math", 1)]  # a conditional node may run
    assert BackwardEngine(program, client, "backward", set()).max_calls_per_example() == 3


# ------------------------------------------------------------------ loops

LOOP = HEAD + """\
params:
  note_instruction: {value: "Write a note."}
  extra_instruction: {value: "Expand the note."}
nodes:
  hops:
    kind: loop
    max_iters: 3
    state: {notes: []}
    body:
      note: {kind: llm, system: "{{ note_instruction }}", user: "{{ input.question }} #{{ iteration }}"}
      extra: {kind: llm, when: "iteration == 1", system: "{{ extra_instruction }}", user: "{{ note }}"}
      keep: {kind: function, fn: dedup_extend, args: {items: state.notes, new: extra}}
    update: {notes: keep}
  answer: {kind: function, fn: join, args: {items: hops.notes}, with: {sep: " "}}
output: answer
metric: {fn: exact_match, args: {pred: answer, target: input.answer}}
"""


def test_conditions_inside_a_loop_body_per_iteration(tmp_path):
    program, client = setup(tmp_path, LOOP)
    trace = run(program, client, "q", {"question": "Q", "answer": "A"})
    assert [(c.id, c.iteration, c.skipped) for c in trace.calls] == [
        ("note#0", 0, False), ("extra#0", 0, True), ("keep#0", 0, True),
        ("note#1", 1, False), ("extra#1", 1, False), ("keep#1", 1, False),
        ("note#2", 2, False), ("extra#2", 2, True), ("keep#2", 2, True), ("answer#0", None, False)]
    # an update whose source was skipped leaves the state as it was
    assert trace.output == "more on note Q #1" and trace.call("answer#0").inputs["items"].sources == ["keep#1"]
    assert client.usage.role("task")["calls"] == 4
    write(tmp_path / "script.yaml", script({
        "extra#1": {_param_key("extra_instruction"): "Expand less.", _input_key("note"): "The note is vague."},
        "note#1": {_param_key("note_instruction"): "Be precise."}}))
    result, _ = backward(program, client, trace)
    got = [(g.node, g.call_index, g.target) for g in result.gradients]
    assert ("extra", 1, "param:extra_instruction") in got and ("note", 1, "param:note_instruction") in got
    # time-sequential, and only the iteration the node ran in: no gradient for note#0, note#2 or any skipped call
    assert {(node, i) for node, i, _ in got} == {("answer", 0), ("keep", 1), ("extra", 1), ("note", 1)}


def test_a_skipped_loop_leaves_one_skipped_call(tmp_path):
    program, client = setup(tmp_path, LOOP.replace("    max_iters: 3\n", "    max_iters: 3\n    when: \"len(input.question) > 5\"\n"))
    trace = run(program, client, "q", {"question": "Q", "answer": "A"})
    assert [(c.id, c.kind, c.skipped) for c in trace.calls] == [("hops#0", "loop", True), ("answer#0", "function", True)]
    assert trace.output is None and client.usage.role("task")["calls"] == 0
