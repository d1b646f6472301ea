"""Valid specs compile into the Program the engine and the diagrams rely on."""
from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest
from typer.testing import CliRunner

from autodiff_cli.app.cli import app
from autodiff_cli.engine.program import Program, Ref
from autodiff_cli.nodes.compiler import compile_spec
from autodiff_cli.spec.loader import load_spec

HEAD = """\
models:
  task: {model: fake/script.yaml}
data: {train: train.jsonl, val: val.jsonl}
"""

CHAIN = HEAD + """\
name: chain
params:
  instruction: {value: "Think step by step."}
  answer_format: {value: "Answer: N", trainable: false}
nodes:
  parse:
    kind: function
    fn: last_integer
    args: {text: answer}
  answer:
    kind: llm
    system: "{{ answer_format }}"
    user: "{{ reason }}"
  reason:
    kind: llm
    system: "{{ instruction }}"
    user: "{{ input.question }}"
output: parse
metric: {fn: exact_match, args: {pred: parse, target: input.answer}}
"""

FAN_IN = HEAD + """\
name: fan
params:
  instruction: {value: "Count."}
  style: {value: "Be brief.", trainable: false}
nodes:
  combine:
    kind: function
    fn: dedup_extend
    args: {items: left, new: right}
  left:
    kind: llm
    system: "{{ instruction }}"
    user: "{{ input.question }}"
  right:
    kind: llm
    system: "{{ style }}"
    user: "Q: {{ input['question'] }} ({{ input.hint }})"
  parse:
    kind: function
    fn: last_integer
    args: {text: combine}
output: parse
metric: {fn: exact_match, args: {pred: parse, target: input.answer}}
"""

LOOP = HEAD + """\
name: hop
params:
  query_prompt: {value: "Write a search query."}
nodes:
  hops:
    kind: loop
    max_iters: 3
    state: {context: []}
    update: {context: merge}
    until: "len(state.context) >= 2 or iteration >= 1"
    body:
      query:
        kind: llm
        system: "{{ query_prompt }}"
        user: "{{ input.question }}\\nKnown: {{ state.context }}"
      merge:
        kind: function
        fn: dedup_extend
        args: {items: state.context, new: query}
  answer:
    kind: llm
    user: "{{ hops.context }}\\n{{ input.question }}"
  parse:
    kind: function
    fn: last_integer
    args: {text: answer}
output: parse
metric: {fn: exact_match, args: {pred: parse, target: input.answer}}
"""

ROWS = '{"id": "a", "question": "How many? 2", "hint": "count", "answer": "2"}\n'


@pytest.fixture
def project(tmp_path: Path) -> Path:
    (tmp_path / "script.yaml").write_text('default: "Answer: 2"\n', encoding="utf-8")
    (tmp_path / "train.jsonl").write_text(ROWS, encoding="utf-8")
    (tmp_path / "val.jsonl").write_text(ROWS, encoding="utf-8")
    return tmp_path


def write_spec(project: Path, text: str, name: str = "spec.yaml") -> Path:
    path = project / name
    path.write_text(text, encoding="utf-8")
    return path


def compile_text(project: Path, text: str) -> Program:
    return compile_spec(load_spec(write_spec(project, text)))


def edges(program: Program) -> dict[tuple[str, str], str]:
    return {(a, b): (label or "") for a, b, label in program.graph.edges(data="label")}


# ---------------------------------------------------------------- chain


def test_chain_order_indices_and_generations(project):
    p = compile_text(project, CHAIN)
    # declared parse, answer, reason: executed in dependency order
    assert list(p.scope.nodes) == ["reason", "answer", "parse"]
    assert [p.node(n).topo_index for n in ("reason", "answer", "parse")] == [0, 1, 2]
    assert p.scope.generations == [["reason"], ["answer"], ["parse"]]
    assert p.scope.loop is None


def test_chain_reads_params_and_inputs_are_inferred(project):
    p = compile_text(project, CHAIN)
    reason, answer, parse = p.node("reason"), p.node("answer"), p.node("parse")
    assert reason.kind == "llm" and reason.model == "task"
    assert reason.reads == [Ref("input", ("question",))]
    assert reason.params == ["instruction"]
    assert answer.reads == [Ref("reason")]
    assert answer.params == ["answer_format"]
    assert parse.kind == "function" and parse.fn_ref == "last_integer" and callable(parse.fn)
    assert parse.args == {"text": Ref("answer")}
    assert parse.reads == [Ref("answer")]
    assert p.input_fields == {"question", "answer"}
    assert p.output == Ref("parse")
    assert p.metric.fn_ref == "exact_match"
    assert p.metric.args == {"pred": Ref("parse"), "target": Ref("input", ("answer",))}
    assert p.loss is p.metric  # no `loss`: training uses the metric
    assert set(p.params) == {"instruction", "answer_format"}


def test_chain_graph(project):
    p = compile_text(project, CHAIN)
    e = edges(p)
    assert set(e) == {
        ("input", "reason"), ("param:instruction", "reason"), ("reason", "answer"),
        ("param:answer_format", "answer"), ("answer", "parse"), ("parse", "metric"), ("input", "metric"),
    }
    assert e["input", "reason"] == "input.question"
    assert e["input", "metric"] == "input.answer"
    g = p.graph
    assert g.nodes["reason"]["kind"] == "llm" and g.nodes["parse"]["kind"] == "function"
    assert g.nodes["param:answer_format"]["trainable"] is False
    assert g.graph["output"] == "parse"


# ---------------------------------------------------------------- fan-in


def test_fan_in_independent_nodes_share_a_generation(project):
    p = compile_text(project, FAN_IN)
    assert list(p.scope.nodes) == ["left", "right", "combine", "parse"]
    assert p.scope.generations == [["left", "right"], ["combine"], ["parse"]]
    assert [n.topo_index for n in p.scope.nodes.values()] == [0, 1, 2, 3]
    combine = p.node("combine")
    assert combine.args == {"items": Ref("left"), "new": Ref("right")}
    assert set(combine.reads) == {Ref("left"), Ref("right")}


def test_fan_in_reads_from_subscripts_and_attributes(project):
    p = compile_text(project, FAN_IN)
    right = p.node("right")
    assert set(right.reads) == {Ref("input", ("question",)), Ref("input", ("hint",))}
    assert right.params == ["style"]
    assert p.node("left").params == ["instruction"]
    assert p.input_fields == {"question", "hint", "answer"}


def test_fan_in_graph_edges_carry_every_field(project):
    e = edges(compile_text(project, FAN_IN))
    assert ("left", "combine") in e and ("right", "combine") in e and ("combine", "parse") in e
    assert e["input", "right"] == "input.hint, input.question"  # one edge, both fields


# ---------------------------------------------------------------- loop


def test_loop_scope_and_numbering(project):
    p = compile_text(project, LOOP)
    assert list(p.scope.nodes) == ["hops", "answer", "parse"]
    assert p.scope.generations == [["hops"], ["answer"], ["parse"]]
    hops = p.node("hops")
    assert hops.kind == "loop" and hops.max_iters == 3
    assert hops.initial_state == {"context": []}
    body = hops.body
    assert body is not None and body.loop is hops
    assert list(body.nodes) == ["query", "merge"]
    assert body.generations == [["query"], ["merge"]]
    # the body numbers right after its loop
    assert [n.name for n in p.all_nodes()] == ["hops", "query", "merge", "answer", "parse"]
    assert [n.topo_index for n in p.all_nodes()] == [0, 1, 2, 3, 4]
    assert "query" not in p.scope.nodes  # body nodes live only in the loop's scope


def test_loop_state_update_until(project):
    p = compile_text(project, LOOP)
    hops = p.node("hops")
    assert hops.update == {"context": Ref("merge")}
    assert hops.until.source == "len(state.context) >= 2 or iteration >= 1"
    assert hops.until.evaluate({"state": {"context": ["a", "b"]}, "iteration": 0}) is True
    assert hops.until.evaluate({"state": {"context": []}, "iteration": 0}) is False
    query, merge = p.node("query"), p.node("merge")
    assert set(query.reads) == {Ref("input", ("question",)), Ref("state", ("context",))}
    assert query.params == ["query_prompt"]
    assert merge.args == {"items": Ref("state", ("context",)), "new": Ref("query")}
    # the loop reads from outside only what its body reads from outside
    assert hops.reads == [Ref("input", ("question",))]


def test_nested_reference_to_a_loop_output(project):
    p = compile_text(project, LOOP)
    answer = p.node("answer")
    assert {r.root for r in answer.reads} == {"hops", "input"}
    assert all(r.path == ("context",) for r in answer.reads if r.root == "hops")
    e = edges(p)
    assert e["hops", "answer"] == "hops.context"
    # inside the loop, `state` is drawn as coming from the loop; `update` feeds the loop back
    assert e["hops", "query"] == "state.context"
    assert e["merge", "hops"] == "state.context"
    assert ("query", "merge") in e
    assert p.graph.nodes["query"]["parent"] == "hops"
    assert p.graph.nodes["answer"]["parent"] is None


def test_loop_output_field_via_function_args(project):
    text = LOOP.replace('user: "{{ hops.context }}\\n{{ input.question }}"', 'user: "{{ ctx }} {{ input.question }}"')
    text = text.replace("  answer:\n", "  ctx:\n    kind: function\n    fn: join\n    args: {items: hops.context}\n  answer:\n")
    p = compile_text(project, text)
    assert p.node("ctx").args == {"items": Ref("hops", ("context",))}
    assert list(p.scope.nodes) == ["hops", "ctx", "answer", "parse"]


# ---------------------------------------------------------------- `autodiff graph`


def graph_cli(project: Path, text: str, fmt: str) -> str:
    spec = write_spec(project, text)
    r = CliRunner().invoke(app, ["graph", str(spec), "--format", fmt])
    assert r.exit_code == 0, r.stderr
    return r.stdout


def test_graph_mermaid(project):
    out = graph_cli(project, FAN_IN, "mermaid")
    assert out.startswith("flowchart TD\n")
    for node in ("input", "left", "right", "combine", "parse", "metric", "param_instruction", "param_style"):
        assert f"  {node}" in out
    for edge in ('input -->|"input.question"| left', "left --> combine", "right --> combine", "combine --> parse",
                 "param_instruction --> left", "parse --> metric"):
        assert edge in out, edge


def test_graph_mermaid_loop_subgraph(project):
    out = graph_cli(project, LOOP, "mermaid")
    assert 'subgraph hops_body["loop hops (max 3)"]' in out
    assert 'hops -->|"hops.context"| answer' in out
    assert 'merge -->|"state.context"| hops' in out
    assert "query --> merge" in out


def test_graph_dot(project):
    out = graph_cli(project, LOOP, "dot")
    assert out.startswith('digraph "hop" {')
    assert out.rstrip().endswith("}")
    for node in ("hops", "query", "merge", "answer", "parse", "metric", "param_query_prompt"):
        assert f"  {node} [label=" in out
    for edge in ('hops -> answer [label="hops.context"];', "query -> merge;", "answer -> parse;",
                 'input -> query [label="input.question"];'):
        assert edge in out, edge


def test_graph_bad_format_is_a_usage_error(project):
    spec = write_spec(project, CHAIN)
    r = CliRunner().invoke(app, ["graph", str(spec), "--format", "svg"])
    assert r.exit_code == 2
    assert r.stderr.startswith("error: --format: expected mermaid or dot")


@pytest.mark.skipif(shutil.which("dot") is None, reason="Graphviz `dot` is not installed")
@pytest.mark.parametrize("text", [CHAIN, FAN_IN, LOOP])
def test_dot_output_parses(project, text):
    out = graph_cli(project, text, "dot")
    done = subprocess.run(["dot", "-Tsvg"], input=out, capture_output=True, text=True, timeout=30)
    assert done.returncode == 0, done.stderr
    assert "<svg" in done.stdout


def test_quickstart_compiles():
    repo = Path(__file__).resolve().parents[2]
    p = compile_spec(load_spec(repo / "configs" / "quickstart.yaml"))
    assert list(p.scope.nodes) == ["count", "parse"]
    assert set(p.node("count").params) == {"instruction", "answer_format"}
    assert p.input_fields == {"question", "answer"}


def test_a_model_config_nothing_uses_is_a_located_warning(project, capsys):
    """A misspelt role (`optimiser:`) would silently leave the optimizer role to the task model."""
    text = CHAIN.replace("  task: {model: fake/script.yaml}\n",
                         "  task: {model: fake/script.yaml}\n  optimiser: {model: fake/script.yaml}\n"
                         "  backward: {model: fake/script.yaml}\n")
    program = compile_text(project, text)
    [warning] = program.warnings
    assert warning.startswith(f"warning: {project / 'spec.yaml'}:3: models.optimiser: used by no node and no role "
                              "(did you mean `optimizer`?)")
    assert "optimiser" in capsys.readouterr().err  # compile_spec prints it
    assert compile_text(project, CHAIN).warnings == []  # every config used (by a node, or a role by its name)
