"""Absurdly deep nesting (hundreds of `[` or `{`) in any input is refused with a located error and
exit 2 — never a RecursionError traceback with exit 1, with or without `--debug`.

PyYAML's composer, deepcopy, json.loads and the YAML/JSON writers all recurse once or more per level,
so the loader counts levels over the parser's (iterative) events before anything composes the value;
aliases count with the depth of what they expand to. Deep but sane nesting still works end to end.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from autodiff_cli.app.cli import app
from tests.specs import MINI_TRAIN

MAX_DEPTH = 100  # levels of nested lists and mappings a spec may have (spec/loader.py), as the errors say

DEEP = 600  # past Python's default recursion limit of 1000 for every recursive reader

BASE = MINI_TRAIN.replace("name: mini", "name: deep") + "train: {max_steps: 1, batch_size: 2, max_proposals: 1}\n"
ROWS = [{"id": "a", "question": "How many? 2 apples.", "answer": "2"},
        {"id": "b", "question": "How many? 3 pears.", "answer": "3"}]


def nested_list(depth: int) -> str:
    return "[" * depth + "]" * depth


def nested_map(depth: int) -> str:
    return "{a: " * depth + "1" + "}" * depth


@pytest.fixture
def project(tmp_path: Path) -> Path:
    (tmp_path / "script.yaml").write_text('default: "Answer: 2"\n', encoding="utf-8")
    for split in ("train", "val"):
        (tmp_path / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in ROWS), encoding="utf-8")
    return tmp_path


def cli(*args) -> tuple[int, str, str]:
    r = CliRunner().invoke(app, [str(a) for a in args])
    # a RecursionError escaping the CLI is the bug: typer's runner would report it as exit 1
    assert r.exception is None or isinstance(r.exception, SystemExit), repr(r.exception)
    return r.exit_code, r.stdout, r.stderr


def command(name: str, spec: Path, *extra) -> list:
    args = [name, spec, *extra]
    return args + (["--runs-dir", spec.parent / "runs"] if name == "train" else [])


def assert_refused(code: int, stdout: str, stderr: str, head: str, *, debug: bool = False) -> None:
    assert code == 2, (code, stderr[-2000:])
    errors = [line for line in stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1, stderr[-2000:]
    assert errors[0].startswith(head), f"\n{errors[0]}\ndoes not start with\n{head}"
    assert f"expected at most {MAX_DEPTH} levels of nested lists and mappings" in errors[0]
    assert len(errors[0]) < 500  # the value is never echoed
    if not debug:
        assert "Traceback" not in stderr and stderr.startswith("error: ")
    assert "RecursionError" not in stderr


@pytest.mark.parametrize("debug", [False, True])
@pytest.mark.parametrize("name", ["validate", "eval", "train"])
def test_deep_nesting_in_the_spec_is_refused_with_file_line_and_key(project, name, debug):
    spec = project / "spec.yaml"
    spec.write_text(BASE + f"constraints: {nested_list(DEEP)}\n", encoding="utf-8")
    line = BASE.count("\n") + 1
    code, out, err = cli(*(["--debug"] if debug else []), *command(name, spec))
    assert_refused(code, out, err, f"error: {spec}:{line}: constraints: ", debug=debug)
    assert not (project / "runs").exists()


@pytest.mark.parametrize("value, key", [
    (nested_list(DEEP), "models.task.extra.x"),
    (nested_map(DEEP), "models.task.extra.x.a.a.a.a"),  # a key path of 8 levels at most
])
def test_deep_nesting_in_a_free_form_mapping_names_its_key(project, value, key):
    spec = project / "spec.yaml"
    spec.write_text(BASE.replace("temperature: 0}", f"temperature: 0,\n         extra: {{x: {value}}}}}"),
                    encoding="utf-8")
    assert_refused(*cli("validate", spec), f"error: {spec}:4: {key}: ")


def test_block_style_nesting_is_counted_too(project):
    spec = project / "spec.yaml"
    block = "".join("  " * i + "- \n" for i in range(DEEP))  # "-" opening a list inside a list, 600 times
    spec.write_text(BASE + "constraints:\n" + block, encoding="utf-8")
    line = BASE.count("\n") + 1 + MAX_DEPTH  # the line that opens level MAX_DEPTH + 1 (the top mapping is 1)
    assert_refused(*cli("validate", spec), f"error: {spec}:{line}: constraints: ")


def test_aliases_count_with_the_depth_they_expand_to(project):
    # each anchor is 60 levels of lists holding the previous one: 60 levels in the text, 600 expanded
    anchors = ["a0: &a0 " + nested_list(60)]
    for i in range(1, 10):
        anchors.append(f"a{i}: &a{i} " + "[" * 60 + f"*a{i - 1}" + "]" * 60)
    spec = project / "spec.yaml"
    spec.write_text(BASE.replace("temperature: 0}", "temperature: 0,\n         extra: {" + ", ".join(anchors) + "}}"),
                    encoding="utf-8")
    code, out, err = cli("validate", spec)
    assert_refused(code, out, err, f"error: {spec}:4: models.task.extra.a1: ")
    assert "once the alias *a0 is expanded" in err


@pytest.mark.parametrize("debug", [False, True])
@pytest.mark.parametrize("name", ["validate", "eval", "train"])
def test_deep_nesting_in_a_set_value_is_refused(project, name, debug):
    spec = project / "spec.yaml"
    spec.write_text(BASE, encoding="utf-8")
    debug_flag = ["--debug"] if debug else []
    code, out, err = cli(*debug_flag, *command(name, spec, "--set", f"constraints={nested_list(DEEP)}"))
    assert_refused(code, out, err, "error: --set constraints=[[[", debug=debug)
    assert ": constraints: expected at most" in err


def test_the_depth_limit_holds_for_the_whole_spec_across_set_values(project):
    spec = project / "spec.yaml"
    spec.write_text(BASE, encoding="utf-8")
    # 60 levels below a key path 4 levels deep is fine; the same value 45 more levels down is not
    assert cli("validate", spec, "--set", f"models.task.extra.x={nested_list(60)}")[0] == 0
    path = "models.task.extra.x" + ".0" * 45
    code, out, err = cli("validate", spec, "--set", f"models.task.extra.x={nested_list(60)}",
                         "--set", f"{path}={nested_list(60)}")
    assert_refused(code, out, err, "error: --set models.task.extra.x.0.0.0")


def schema(levels: int) -> str:
    """A JSON schema of objects nested `levels` deep (two YAML levels each: the schema and its properties)."""
    return "{type: object, properties: {a: " * levels + "{type: string}" + "}}" * levels


@pytest.mark.parametrize("where", ["extra", "json_schema"])
def test_nesting_at_the_limit_still_validates_evaluates_and_trains(project, where):
    # the deepest spec allowed goes through every reader and writer (deepcopy, pydantic, cache key,
    # the model call's response format, config.yaml, resolved.yaml, checkpoint) without a RecursionError
    inner = MAX_DEPTH - 4  # below the top (1), models (2), task (3) and the mapping {x: ...} (4)
    spec = project / "spec.yaml"
    if where == "extra":
        text = BASE.replace("temperature: 0}", f"temperature: 0,\n         extra: {{x: {nested_list(inner)}}}}}")
    else:  # the top (1), nodes (2), count (3), then 48 schemas of 2 levels end at level 100 with {type: string}
        text = BASE.replace('user: "{{ input.question }}"}', f'user: "{{{{ input.question }}}}",\n          '
                            f'json_schema: {schema((MAX_DEPTH - 4) // 2)}}}')
    spec.write_text(text, encoding="utf-8")
    code, _, err = cli("validate", spec)
    assert code == 0, err
    code, out, err = cli("eval", spec, "--json")
    assert code == 0, err
    assert json.loads(out)["score"] == 0.5
    code, out, err = cli("train", spec, "--runs-dir", project / "runs")
    assert code == 0, err
    run_dir = Path(out.strip().splitlines()[-1])
    assert (run_dir / "resolved.yaml").is_file() and (run_dir / "checkpoint.json").is_file()


@pytest.mark.parametrize("template, got", [
    ("{{ " + "(" * DEEP + "1" + ")" * DEEP + " }}", "nested too deeply to parse"),
    ("{% if 1 %}" * DEEP + "{% endif %}" * DEEP, "nested too deeply to parse"),
    ("{% for a in [1] %}" * 25 + "{% endfor %}" * 25, "too many statically nested blocks"),
])
def test_deep_nesting_in_a_template_is_refused_with_its_key(project, template, got):
    spec = project / "spec.yaml"
    spec.write_text(BASE.replace('user: "{{ input.question }}"', f'user: "{{{{ input.question }}}}{template}"'),
                    encoding="utf-8")
    code, out, err = cli("validate", spec)
    assert code == 2, err
    assert err.startswith(f"error: {spec}:10: nodes.count.user: expected a valid Jinja2 template (nested less "
                          f"deeply), got "), err
    assert got in err and "Traceback" not in err


@pytest.mark.parametrize("suffix, text, line", [
    (".yaml", "instruction: " + nested_list(DEEP) + "\n", 1),
    (".json", '{\n  "instruction": ' + nested_list(DEEP) + "\n}\n", 2),
    (".json", '{"instruction": "[[[[ brackets in a string do not count ]]]]", "x": ' + nested_list(DEEP) + "}", 1),
])
def test_deep_nesting_in_a_prompts_file_is_refused_with_its_line(project, suffix, text, line):
    spec = project / "spec.yaml"
    spec.write_text(BASE, encoding="utf-8")
    prompts = project / f"prompts{suffix}"
    prompts.write_text(text, encoding="utf-8")
    code, out, err = cli("eval", spec, "--prompts", prompts)
    assert_refused(code, out, err, f"error: {prompts}:{line}: ")


def test_a_prompts_file_within_the_limit_still_loads(project):
    spec = project / "spec.yaml"
    spec.write_text(BASE, encoding="utf-8")
    prompts = project / "prompts.json"
    prompts.write_text(json.dumps({"params": {"instruction": {"value": "Count [{ carefully }]."}}}), encoding="utf-8")
    code, out, err = cli("eval", spec, "--prompts", prompts, "--json")
    assert code == 0, err


@pytest.mark.parametrize("debug", [False, True])
def test_deep_nesting_no_check_locates_is_still_exit_2_without_a_traceback(project, debug):
    """The CLI's last resort: a RecursionError from any reader (here a data row) is an input error, exit 2."""
    spec = project / "spec.yaml"
    spec.write_text(BASE, encoding="utf-8")
    row = '{"id": "c", "question": ' + nested_list(5000) + ', "answer": "1"}\n'
    (project / "val.jsonl").write_text(row, encoding="utf-8")
    proc = subprocess.run([sys.executable, "-m", "autodiff_cli.app.cli", *(["--debug"] if debug else []),
                           "eval", str(spec)], capture_output=True, text=True, timeout=120, cwd=project,
                          env=os.environ.copy())
    assert proc.returncode == 2, proc.stderr[-2000:]
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1, proc.stderr[-2000:]
    if not debug:
        assert proc.stderr.startswith("error: ") and "Traceback" not in proc.stderr
