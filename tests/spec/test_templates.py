"""Prompt templates: a Jinja2 sandbox, strict about undefined names, values inserted literally."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from autodiff_cli.app.cli import app
from autodiff_cli.spec.templates import TemplateError, compile_template


def render(source: str, **context) -> str:
    return compile_template(source).render(context)


# ---------------------------------------------------------------- sandbox


@pytest.mark.parametrize("source", [
    "{{ ''.__class__.__mro__ }}",
    "{{ x.__class__ }}",
    "{{ x.__class__.__base__.__subclasses__() }}",
    "{{ cycler.__init__.__globals__.os }}",
    "{{ lipsum.__globals__['os'].system('echo pwned') }}",
    "{{ f.__globals__ }}",
    "{{ x.format(1) }}",  # str.format could reach attributes through the format string
])
def test_sandbox_refuses_introspection(source):
    with pytest.raises(TemplateError, match="sandbox|names starting with `_`"):  # refused at compile or render time
        render(source, x="{0.__class__}", f=lambda: None)


def test_sandbox_values_are_immutable():
    items = [1, 2]
    with pytest.raises(TemplateError, match="sandbox"):
        render("{{ items.append(3) }}", items=items)
    assert items == [1, 2]


def test_sandbox_cannot_call_os(tmp_path):
    marker = tmp_path / "pwned"
    for source in (
        f"{{{{ cycler.__init__.__globals__.os.system('touch {marker}') }}}}",
        f"{{{{ joiner.__init__.__globals__['os'].system('touch {marker}') }}}}",
        f"{{{{ namespace.__init__.__globals__.os.system('touch {marker}') }}}}",
    ):
        with pytest.raises(TemplateError):
            render(source)
    assert not marker.exists()


@pytest.mark.parametrize("source", ['{% include "/etc/passwd" %}', '{% extends "base.j2" %}',
                                    '{% import "macros.j2" as m %}', '{% from "m.j2" import x %}'])
def test_templates_are_self_contained(source):
    with pytest.raises(TemplateError, match="not supported") as info:
        compile_template(source)
    assert info.value.line == 1


def test_unknown_filter_is_a_compile_error():
    with pytest.raises(TemplateError, match="shout"):
        compile_template("{{ x | shout }}")


def test_syntax_error_has_a_line():
    with pytest.raises(TemplateError, match="syntax") as info:
        compile_template("line one\n{{ x ")
    assert info.value.line == 2


def test_render_failures_are_template_errors():
    with pytest.raises(TemplateError, match="cannot render"):
        render("{{ n + 'a' }}", n=1)
    with pytest.raises(TemplateError):
        render("{{ range(10**9) | list | length }}")


# ---------------------------------------------------------------- strict undefined


def test_missing_variable_raises():
    with pytest.raises(TemplateError, match="undefined"):
        render("Hello {{ name }}")


def test_missing_field_raises():
    with pytest.raises(TemplateError, match="undefined"):
        render("{{ input.question }}", input={"answer": "2"})


def test_missing_variable_inside_a_filter_or_loop_raises():
    with pytest.raises(TemplateError):
        render("{{ missing | upper }}")
    with pytest.raises(TemplateError):
        render("{% for p in missing %}{{ p }}{% endfor %}")


# ---------------------------------------------------------------- values are inserted literally


def test_param_value_with_template_syntax_is_literal():
    assert render("{{ instruction }}", instruction="{{ 7*7 }}") == "{{ 7*7 }}"
    assert render("Q: {{ input.question }}", input={"question": "{% for i in range(3) %}x{% endfor %}"}) == \
        "Q: {% for i in range(3) %}x{% endfor %}"
    assert render("{{ a }}", a="{{ b }}", b="secret") == "{{ b }}"


def test_no_autoescape_and_trailing_newline_kept():
    assert render("{{ x }}\n", x="<b>&'\"") == "<b>&'\"\n"


def test_none_renders_empty_and_scalars_as_text():
    assert render("[{{ x }}]", x=None) == "[]"
    assert render("{{ a }} {{ b }} {{ c }}", a=3, b=2.5, c=False) == "3 2.5 False"


# ---------------------------------------------------------------- lists and mappings


def test_list_renders_one_item_per_line():
    assert render("{{ passages }}", passages=["first", "second", "third"]) == "first\nsecond\nthird"
    assert render("{{ t }}", t=("a", "b")) == "a\nb"
    assert render("{{ empty }}", empty=[]) == ""


def test_dict_renders_as_json():
    out = render("{{ d }}", d={"answer": 3, "why": ["a", "b"], "naïve": "é"})
    assert json.loads(out) == {"answer": 3, "why": ["a", "b"], "naïve": "é"}
    assert "é" in out  # not \u-escaped


def test_list_of_mappings_renders_one_json_per_line():
    out = render("{{ rows }}", rows=[{"a": 1}, {"b": 2}])
    assert [json.loads(line) for line in out.splitlines()] == [{"a": 1}, {"b": 2}]


def test_explicit_filters_still_work_on_lists():
    assert render("{{ xs | join(', ') }}", xs=["a", "b"]) == "a, b"
    assert render("{% for x in xs %}- {{ x }}\n{% endfor %}", xs=["a", "b"]) == "- a\n- b\n"


# ---------------------------------------------------------------- what a template reads


def test_names_and_attributes():
    t = compile_template("{{ instruction }} {{ input.question }} {{ input['hint'] }} "
                         "{% for p in hops.context %}{{ p }}{% endfor %} {{ range(2) | list }}")
    assert t.names == {"instruction", "input", "hops"}  # loop variables and Jinja globals are not inputs
    assert ("input", "question") in t.attributes and ("input", "hint") in t.attributes
    assert ("hops", "context") in t.attributes


# ---------------------------------------------------------------- end to end


def test_eval_inserts_param_and_data_values_literally(tmp_path: Path):
    """Through the whole pipeline: the fake model echoes the prompt it was given."""
    (tmp_path / "echo.yaml").write_text("rules: []\n", encoding="utf-8")  # no default: echo the user message
    row = {"id": "a", "question": "{{ input.answer }} {{ 7*7 }}", "answer": "49"}
    (tmp_path / "val.jsonl").write_text(json.dumps(row) + "\n", encoding="utf-8")
    spec = tmp_path / "spec.yaml"
    spec.write_text(
        "name: literal\n"
        "models:\n  task: {model: fake/echo.yaml}\n"
        "data: {val: val.jsonl}\n"
        "params:\n  instruction: {value: \"{{ 7*7 }} {% if true %}yes{% endif %}\"}\n"
        "nodes:\n  echo:\n    kind: llm\n    user: \"{{ instruction }} | {{ input.question }}\"\n"
        "output: echo\n"
        "metric: {fn: exact_match, args: {pred: echo, target: input.answer}}\n",
        encoding="utf-8",
    )
    out = tmp_path / "rows.jsonl"
    r = CliRunner().invoke(app, ["eval", str(spec), "--out", str(out), "--json", "--no-cache"])
    assert r.exit_code == 0, r.stderr
    [result] = [json.loads(line) for line in out.read_text(encoding="utf-8").splitlines()]
    assert result["prediction"] == "{{ 7*7 }} {% if true %}yes{% endif %} | {{ input.answer }} {{ 7*7 }}"
    assert result["score"] == 0.0
