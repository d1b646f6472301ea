"""User code next to the config: `fn: helpers.py:pick`, `fn: lib/helpers.py:pick` and `fn: mylib.funcs:pick`
resolve against the spec's folder, the same way for function nodes, metrics and losses, without leaving the
folder on sys.path; a missing file or function is a located spec error (exit 2)."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from autodiff_cli.app.cli import app
from autodiff_cli.errors import SpecError
from autodiff_cli.nodes.builtins import USER_MODULE_PREFIX, resolve_function
from autodiff_cli.nodes.compiler import compile_spec
from autodiff_cli.nodes.metrics import resolve_metric
from autodiff_cli.spec.loader import load_spec
from tests.conftest import write

# `fn:` of the node, the metric and the loss are on lines 10, 15 and 17
SPEC = """\
name: usercode
models:
  task: {model: fake/script.yaml}
data:
  val: val.jsonl
nodes:
  answer: {kind: llm, user: "{{ input.question }}"}
  parse:
    kind: function
    fn: "NODE_FN"
    args: {ARG: answer}
output: parse
metric:
  args: {pred: parse, target: input.answer}
  fn: "METRIC_FN"
loss:
  fn: "LOSS_FN"
  args: {pred: parse, target: input.answer}
"""
NODE_LINE, METRIC_LINE, LOSS_LINE = 10, 15, 17

HELPERS = """\
TAG = "TAGVALUE"

def pick(text):
    return f"{TAG}:{text}"

def score(pred, target):
    return 1.0 if TAG == "here" else 0.5

def lossy(pred, target):
    return 0.25
"""


def helpers(tag: str) -> str:
    return HELPERS.replace("TAGVALUE", tag)


def project(folder: Path, node: str = "last_integer", metric: str = "exact_match", loss: str = "exact_match",
            files: dict[str, str] | None = None, arg: str = "text") -> Path:
    write(folder / "script.yaml", 'default: "Answer: 4"\n')
    write(folder / "val.jsonl", '{"id": "q1", "question": "2+2?", "answer": "4"}\n')
    for name, text in (files or {}).items():
        write(folder / name, text)
    return write(folder / "spec.yaml", SPEC.replace("NODE_FN", node).replace("METRIC_FN", metric)
                 .replace("LOSS_FN", loss).replace("ARG", arg))


def compiled(spec: Path):
    return compile_spec(load_spec(spec))


def cli(*args):
    return CliRunner().invoke(app, [str(a) for a in args])


@pytest.fixture(autouse=True)
def no_leak():
    """Nothing a test loads stays on sys.path, nor under the user's own module names."""
    path, modules = list(sys.path), set(sys.modules)
    yield
    assert sys.path == path
    leaked = {m for m in set(sys.modules) - modules if not m.startswith(USER_MODULE_PREFIX)}
    assert not leaked & {"helpers", "mylib", "mylib.funcs", "lib", "lib.helpers", "yaml_like"}, leaked


FORMS = {
    "file": ("helpers.py:{fn}", {"helpers.py": helpers("here")}),
    "subfolder file": ("lib/helpers.py:{fn}", {"lib/helpers.py": helpers("here")}),
    "dotted": ("mylib.funcs:{fn}", {"mylib/__init__.py": "", "mylib/funcs.py": helpers("here")}),
    "dotted, no __init__": ("mylib.funcs:{fn}", {"mylib/funcs.py": helpers("here")}),
    "dotted package": ("mylib:{fn}", {"mylib/__init__.py": helpers("here")}),
}


@pytest.mark.parametrize("form", list(FORMS))
def test_node_metric_and_loss_resolve_user_code_in_the_spec_folder(tmp_path, monkeypatch, form):
    ref, files = FORMS[form]
    monkeypatch.chdir(tmp_path.parent)  # not the spec's folder: nothing is found through the working directory
    spec = project(tmp_path / "proj", node=ref.format(fn="pick"), metric=ref.format(fn="score"),
                   loss=ref.format(fn="lossy"), files=files)
    program = compiled(spec)
    assert program.node("parse").fn("x") == "here:x"
    assert program.metric.fn("a", "b") == 1.0
    assert program.loss.fn("a", "b") == 0.25
    # the same module, whichever role named it
    assert program.node("parse").fn.__globals__ is program.loss.fn.__wrapped__.__globals__


def test_a_relative_spec_path_resolves_against_the_spec_folder_not_the_working_directory(tmp_path, monkeypatch):
    project(tmp_path / "a", node="lib/helpers.py:pick", files={"lib/helpers.py": helpers("here")})
    write(tmp_path / "lib" / "helpers.py", helpers("working directory"))  # a decoy next to the working directory
    monkeypatch.chdir(tmp_path)
    assert compiled(Path("a/spec.yaml")).node("parse").fn("x") == "here:x"


def test_an_eval_runs_user_code_from_the_spec_folder(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    spec = project(tmp_path / "proj", node="helpers.py:pick", metric="mylib.funcs:score",
                   files={"helpers.py": helpers("here").replace('return f"{TAG}:{text}"', "return text[-1]"),
                          "mylib/funcs.py": helpers("here")})
    result = cli("eval", spec, "--json", "--quiet")
    assert result.exit_code == 0, result.output
    assert '"score": 1.0' in result.stdout


def test_two_specs_in_different_folders_each_get_their_own_helpers(tmp_path):
    first = project(tmp_path / "one", node="helpers.py:pick", metric="helpers.py:score",
                    files={"helpers.py": helpers("one")})
    second = project(tmp_path / "two", node="helpers.py:pick", metric="helpers.py:score",
                     files={"helpers.py": helpers("two")})
    dotted_one = project(tmp_path / "three", node="mylib.funcs:pick", files={"mylib/funcs.py": helpers("three")})
    dotted_two = project(tmp_path / "four", node="mylib.funcs:pick", files={"mylib/funcs.py": helpers("four")})
    programs = [compiled(s) for s in (first, second, dotted_one, dotted_two)]
    assert [p.node("parse").fn("x") for p in programs] == ["one:x", "two:x", "three:x", "four:x"]
    # compiled again in the same process: still each its own
    assert compiled(first).node("parse").fn("y") == "one:y"
    assert compiled(second).node("parse").fn("y") == "two:y"
    assert resolve_function("helpers.py:pick", tmp_path / "two")[0]("z") == "two:z"
    assert resolve_metric("helpers.py:score", tmp_path / "one")("a", "b") == 0.5


def test_a_local_module_wins_over_an_installed_one_for_the_spec_only(tmp_path):
    import yaml

    spec = project(tmp_path, node="yaml:pick", files={"yaml.py": helpers("local yaml")})
    assert compiled(spec).node("parse").fn("x") == "local yaml:x"
    assert sys.modules["yaml"] is yaml and hasattr(yaml, "safe_load")  # everyone else still gets PyYAML
    # a name the folder does not have comes from sys.path as before
    assert compiled(project(tmp_path / "b", node="textwrap:dedent")).node("parse").fn("  x") == "x"


def test_user_code_can_import_modules_next_to_it(tmp_path):
    files = {"helpers.py": "from yaml_like import shout\n\ndef pick(text):\n    return shout(text)\n",
             "yaml_like.py": "def shout(text):\n    return str(text).upper()\n"}
    try:
        assert compiled(project(tmp_path, node="helpers.py:pick", files=files)).node("parse").fn("x") == "X"
    finally:
        sys.modules.pop("yaml_like", None)  # an ordinary import made while the folder was on sys.path


@pytest.mark.parametrize("role, line", [("node", NODE_LINE), ("metric", METRIC_LINE), ("loss", LOSS_LINE)])
@pytest.mark.parametrize("ref, says", [
    ("nothere.py:pick", "no file {folder}/nothere.py"),
    ("lib/nothere.py:pick", "no file {folder}/lib/nothere.py"),
    ("helpers.py:nothere", "{folder}/helpers.py has no"),
    ("mylib.funcs:nothere", "{folder}/mylib/funcs.py has no"),
])
def test_a_missing_file_or_function_is_a_located_spec_error(tmp_path, role, line, ref, says):
    folder = tmp_path / "proj"
    fns = {"node": "last_integer", "metric": "exact_match", "loss": "exact_match"}
    fns[role] = ref
    spec = project(folder, **fns, files={"helpers.py": helpers("here"), "mylib/funcs.py": helpers("here")})
    result = cli("validate", spec)
    assert result.exit_code == 2, result.output
    key = {"node": "nodes.parse.fn", "metric": "metric.fn", "loss": "loss.fn"}[role]
    first = result.stderr.splitlines()[0]
    assert first.startswith(f"error: {spec}:{line}: {key}: expected "), first
    assert says.format(folder=folder) in first and "nothere" in first, first
    assert "Traceback" not in result.output


def test_resolution_errors_without_a_location_name_the_file(tmp_path):
    with pytest.raises(SpecError) as info:
        resolve_function("helpers.py:pick", tmp_path)
    assert info.value.file is None and f"no file {tmp_path}/helpers.py" in info.value.got
    with pytest.raises(SpecError, match="could not import metric 'helpers.py:pick'.*no file"):
        resolve_metric("helpers.py:pick", tmp_path)


def test_a_module_that_exits_while_loading_is_a_spec_error(tmp_path):
    spec = project(tmp_path, node="helpers.py:pick", files={"helpers.py": "import sys\nsys.exit(5)\n"})
    result = cli("validate", spec)
    assert result.exit_code == 2, result.output
    assert result.stderr.startswith(f"error: {spec}:{NODE_LINE}: nodes.parse.fn: ") and "SystemExit" in result.stderr


def warnings_of(result) -> list[str]:
    return [line for line in result.stderr.splitlines() if line.startswith("warning: ")]


def test_the_risky_stdlib_warning_sees_through_user_files(tmp_path):
    # a helper file that hands out os.system is os.system
    spec = project(tmp_path / "a", node="helpers.py:pick",
                   files={"helpers.py": "from os import system as pick\n"}, arg="command")
    result = cli("validate", spec)
    assert result.exit_code == 0, result.output
    (warned,) = warnings_of(result)
    assert warned.startswith(f"warning: {spec}:{NODE_LINE}: nodes.parse.fn: helpers.py:pick is from the standard "
                             "library module `posix`, which can run commands"), warned
    # a local os.py that only computes is not the standard library's os
    spec = project(tmp_path / "b", node="os:pick", files={"os.py": helpers("harmless")})
    result = cli("validate", spec)
    assert result.exit_code == 0, result.output
    assert warnings_of(result) == []
    # and the real one still warns
    spec = project(tmp_path / "c", node="os.path:basename", arg="p")
    assert [w.split(" is from")[0] for w in warnings_of(cli("validate", spec))] == [
        f"warning: {spec}:{NODE_LINE}: nodes.parse.fn: os.path:basename"]
