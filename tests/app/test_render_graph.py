"""`autodiff graph` draws conditions: the `when` expression under the node's name, and what the condition
reads on a dashed edge labelled `when` (Mermaid and DOT)."""
from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest
from typer.testing import CliRunner

from autodiff_cli.app.cli import app
from autodiff_cli.app.render_graph import to_dot, to_mermaid
from autodiff_cli.nodes.compiler import compile_spec
from autodiff_cli.spec.loader import load_spec
from tests.conftest import write

ROUTER = Path(__file__).resolve().parents[2] / "configs" / "router.yaml"

QUOTED = """\
name: quoted
models:
  task: {model: fake/script.yaml}
data:
  val: val.jsonl
nodes:
  plan: {kind: llm, user: "{{ input.question }}", json_schema: {type: object}}
  act:
    kind: llm
    when: 'plan.action == "search" and len(input.question) < 80'
    user: "{{ input.question }} {{ plan }}"
  finish: {kind: function, fn: first_of, args: {acted: act, planned: plan}}
output: finish
metric: {fn: exact_match, args: {pred: finish, target: input.answer}}
"""


def graph(path: Path, fmt: str) -> str:
    r = CliRunner().invoke(app, ["graph", str(path), "--format", fmt])
    assert r.exit_code == 0, r.stderr
    return r.stdout


def quoted_program(tmp_path):
    (tmp_path / "val.jsonl").write_text("")
    return compile_spec(load_spec(write(tmp_path / "spec.yaml", QUOTED)))


def test_mermaid_draws_the_router_conditions():
    out = graph(ROUTER, "mermaid")
    assert '  count["count: llm (task)<br/>when: route == \'count\'"]' in out
    assert '  math["math: llm (task)<br/>when: route == \'math\'"]' in out
    assert '  route -.->|"when"| count' in out and '  route -.->|"when"| math' in out
    assert "  count --> answer" in out and "  classify --> route" in out  # data edges stay solid
    assert '  classify["classify: llm (task)"]' in out  # no condition, no annotation


def test_dot_draws_the_router_conditions():
    out = graph(ROUTER, "dot")
    assert '  count [label="count: llm (task)\\nwhen: route == \'count\'", shape=box];' in out
    assert '  route -> math [label="when", style=dashed];' in out
    assert "  count -> answer;" in out


def test_condition_text_is_escaped_and_a_data_input_is_not_drawn_twice(tmp_path):
    program = quoted_program(tmp_path)
    mermaid, dot = to_mermaid(program), to_dot(program)
    assert 'when: plan.action == #quot;search#quot; and len(input.question) #lt; 80"]' in mermaid
    assert 'when: plan.action == \\"search\\" and len(input.question) < 80", shape=box];' in dot
    # `act` reads `plan` in its template too: one solid edge, no dashed one
    assert "  plan --> act" in mermaid and '-.->|"when' not in mermaid
    assert "  plan -> act;" in dot and "style=dashed" not in dot


@pytest.mark.skipif(shutil.which("dot") is None, reason="Graphviz `dot` is not installed")
def test_dot_with_conditions_renders(tmp_path):
    for program in (compile_spec(load_spec(ROUTER)), quoted_program(tmp_path)):
        done = subprocess.run(["dot", "-Tsvg"], input=to_dot(program), capture_output=True, text=True, timeout=30)
        assert done.returncode == 0, done.stderr
        assert "<svg" in done.stdout and "when: " in done.stdout
