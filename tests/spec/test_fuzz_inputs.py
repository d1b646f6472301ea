"""Property-based fuzzing of what users hand the CLI: the YAML spec (and `--set`) and dataset rows.

Every example goes through the real entry point, `autodiff validate` (typer's CliRunner; a few
through a subprocess), and must end in exit 0 or 2, never a traceback, and on exit 2 the
first line must be `error: <file>[:<line>]: ...` naming the file at fault (the spec, a data
file, the model script, or the `--set` argument).

The default run is quick (FUZZ_EXAMPLES examples per property, default 40); raise it for a
deeper search, e.g. `FUZZ_EXAMPLES=1000 pytest tests/spec/test_fuzz_inputs.py`.
"""
from __future__ import annotations

import copy
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from typer.testing import CliRunner

from autodiff_cli.app.cli import app

EXAMPLES = int(os.environ.get("FUZZ_EXAMPLES", "40"))
FUZZ = settings(max_examples=EXAMPLES, deadline=None, derandomize=not os.environ.get("FUZZ_RANDOM"),
                suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow,
                                       HealthCheck.data_too_large, HealthCheck.large_base_example])

# A valid spec that uses most of the format: three model roles, sliced splits, both param kinds'
# keys, a loop with state and `until`, an llm and function nodes, metric, loss, skip, train, constraints.
BASE = """\
name: fuzzbase
description: the spec every fuzz example starts from
models:
  task: {model: fake/script.yaml, temperature: 0, max_tokens: 64, concurrency: 2, max_retries: 1}
  backward: {model: fake/script.yaml}
  optimizer: {model: fake/script.yaml, timeout: 30}
data:
  train: train.jsonl
  val: {path: val.jsonl, start: 0, stop: 10}
  test: test.jsonl
  id_field: id
params:
  instruction: {kind: prompt, value: "Count the things.", role: task instruction, trainable: true}
  answer_format: {value: "End with Answer: N", role: output format, trainable: false}
nodes:
  hops:
    kind: loop
    max_iters: 2
    state: {notes: []}
    body:
      think: {kind: llm, system: "{{ instruction }}", user: "{{ input.question }} {{ state.notes }}"}
      merge: {kind: function, fn: dedup_extend, args: {items: state.notes, new: think}}
    update: {notes: merge}
    until: "len(state.notes) >= 2 or iteration >= 1"
  count:
    kind: llm
    system: "{{ instruction }} {{ answer_format }}"
    user: "{{ input.question }} {{ hops.notes }}"
  parse: {kind: function, fn: last_integer, args: {text: count}, backward: pass}
output: parse
metric: {fn: exact_match, args: {pred: parse, target: input.answer}}
loss: {fn: f1, args: {pred: parse, target: input.answer}, feedback: template}
skip: [{from: loss, to: instruction}]
train: {mode: autodiff, max_steps: 2, batch_size: 2, max_proposals: 2, seed: 0, budget: {max_calls: 100}}
constraints: ["Keep it short."]
"""
BASE_DATA = yaml.safe_load(BASE)
ROWS = [{"id": f"r{i}", "question": f"How many? n={i}", "answer": str(i)} for i in range(4)]

TRACEBACK = re.compile(r"Traceback \(most recent call last\)|^\w+Error: |^\s+File \"", re.MULTILINE)


# ---------------------------------------------------------------- the project folder and the check


def reset(folder: Path) -> Path:
    """The valid project: spec, model script and three splits (hypothesis reuses the folder between examples)."""
    (folder / "script.yaml").write_text('default: "Answer: 1"\n', encoding="utf-8")
    for split in ("train", "val", "test"):
        (folder / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in ROWS), encoding="utf-8")
    (folder / "spec.yaml").write_text(BASE, encoding="utf-8")
    return folder


@pytest.fixture
def project(tmp_path):
    return reset(tmp_path)


def validate(spec: Path, *sets: str):
    return CliRunner().invoke(app, ["validate", str(spec), *[a for s in sets for a in ("--set", s)]])


def assert_clean(result, project: Path, *, allow_set: bool = False) -> None:
    """Exit 0 or 2, no traceback; on 2 a first line `error: <file>[:<line>]: ...` naming a file
    of the project (or the `--set` argument)."""
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        import traceback

        raise AssertionError("uncaught exception:\n" + "".join(traceback.format_exception(result.exception)))
    assert result.exit_code in (0, 2), result.output
    assert not TRACEBACK.search(result.output), result.output
    if result.exit_code == 0:
        assert result.stdout.startswith("ok: "), result.output
        return
    first = result.stderr.splitlines()[0] if result.stderr else ""
    assert first.startswith("error: "), result.output
    where = first[len("error: "):]
    if allow_set and where.startswith("--set "):
        return
    assert where.startswith(str(project) + os.sep), f"the first line names no file of the project: {first!r}"
    # the file is followed by `:<line>:` or `: `
    rest = where[len(str(project)):]
    m = re.match(r"[^:]*(:\d+)?: ", rest)
    assert m, f"expected error: <file>[:<line>]: ..., got {first!r}"


# ---------------------------------------------------------------- strategies: spec mutations


def all_paths(data, prefix=()):
    """Every key path of the spec tree (mapping keys and list indexes)."""
    out = []
    if isinstance(data, dict):
        for k, v in data.items():
            out.append(prefix + (k,))
            out.extend(all_paths(v, prefix + (k,)))
    elif isinstance(data, list):
        for i, v in enumerate(data):
            out.append(prefix + (i,))
            out.extend(all_paths(v, prefix + (i,)))
    return out


PATHS = all_paths(BASE_DATA)
TEMPLATE_PATHS = [p for p in PATHS if p[-1] in ("system", "user")]
NAMES = ["instruction", "answer_format", "input", "state", "iteration", "hops", "count", "parse", "think",
         "merge", "nope", "undefined_thing", "range", "cycler", "lipsum", "self", "loop", "namespace"]

unicode_text = st.text(alphabet=st.characters(codec="utf-8", exclude_categories=("Cs",)), max_size=40)
scalars = st.one_of(
    st.none(), st.booleans(), st.integers(min_value=-(2**70), max_value=2**70),
    st.floats(allow_nan=True, allow_infinity=True), unicode_text,
    st.sampled_from(["", " ", "fake/script.yaml", "fake/missing.yaml", "task", "llm", "function", "loop",
                     "instruction", "input.question", "exact_match", "nope.module:fn", "os:system",
                     "last_integer", "1e309", "-1", "0", "~", "null", "[", "{{", "{%"]),
    st.integers(min_value=1, max_value=300_000).map(lambda n: "x" * n),  # huge strings
)
values = st.recursive(scalars, lambda inner: st.one_of(st.lists(inner, max_size=4),
                                                       st.dictionaries(st.one_of(unicode_text, st.sampled_from(NAMES)),
                                                                       inner, max_size=4)), max_leaves=8)
template_text = st.lists(st.one_of(
    st.sampled_from(["{{ ", " }}", "{% ", " %}", "{# ", " #}", ".", "[", "]", "(", ")", "|", "'", " if ", " for ",
                     " in ", "endfor", "endif", "upper", "x", "1", " + ", "__class__", "input.", "state."]),
    st.sampled_from(NAMES), unicode_text), max_size=10).map("".join)


def _get(data, path):
    for p in path:
        data = data[p]
    return data


@st.composite
def mutated_specs(draw) -> tuple[dict, list[str]]:
    """The base spec with 1-4 mutations; returns the data and textual (post-dump) edits."""
    data = copy.deepcopy(BASE_DATA)
    for _ in range(draw(st.integers(1, 4))):
        paths = all_paths(data)
        if not paths:
            break
        op = draw(st.sampled_from(["drop", "rename", "retype", "template", "retype", "drop"]))
        if op == "template":
            path = draw(st.sampled_from(TEMPLATE_PATHS))
            try:
                parent = _get(data, path[:-1])
            except (KeyError, IndexError, TypeError):
                continue
            if isinstance(parent, dict):
                parent[path[-1]] = draw(template_text)
            continue
        path = draw(st.sampled_from(paths))
        parent = _get(data, path[:-1])
        key = path[-1]
        if op == "drop":
            del parent[key]
        elif op == "rename" and isinstance(parent, dict):
            new = draw(st.one_of(unicode_text, st.sampled_from(NAMES + ["kind", "model", "value", "api_key"])))
            parent[new] = parent.pop(key)
        else:
            parent[key] = draw(values)
    return data


def dump(data) -> str:
    return yaml.safe_dump(data, allow_unicode=True, sort_keys=False, width=1_000_000)


@st.composite
def text_edits(draw, text: str) -> bytes:
    """Byte-level damage: non-UTF-8 bytes, a duplicated line (duplicate key), truncation, stray characters."""
    data = text.encode("utf-8")
    kind = draw(st.sampled_from(["bytes", "dup", "truncate", "insert", "bom", "tabs"]))
    if kind == "bytes":
        at = draw(st.integers(0, len(data)))
        junk = draw(st.sampled_from([b"\xff", b"\xfe\xff", b"\xc3\x28", b"\xed\xa0\x80", b"\x80", b"\xf8\x88\x80\x80\x80",
                                     b"\x00", b"\xe2\x82"]))
        return data[:at] + junk + data[at:]
    if kind == "dup":
        lines = text.splitlines(keepends=True)
        i = draw(st.integers(0, len(lines) - 1))
        j = draw(st.integers(0, len(lines)))
        return "".join(lines[:j] + [lines[i]] + lines[j:]).encode("utf-8")
    if kind == "truncate":
        return data[: draw(st.integers(0, len(data)))]
    if kind == "insert":
        at = draw(st.integers(0, len(text)))
        junk = draw(st.one_of(unicode_text, st.sampled_from([":", "- ", "&a ", "*a", "!!python/object:os.system ", "\\ud800",
                                                             "!!binary ", "%YAML 1.1\n", "---\n", "? ", "\t", "\r"])))
        return (text[:at] + junk + text[at:]).encode("utf-8", "surrogatepass")
    if kind == "bom":
        return b"\xef\xbb\xbf" + data
    return text.replace("  ", "\t", draw(st.integers(1, 5))).encode("utf-8")


# ---------------------------------------------------------------- the spec


def test_the_base_spec_is_valid(project):
    result = validate(project / "spec.yaml")
    assert result.exit_code == 0, result.output


@FUZZ
@given(data=mutated_specs())
def test_mutated_specs_are_accepted_or_refused_cleanly(project, data):
    (project / "spec.yaml").write_text(dump(data), encoding="utf-8")
    assert_clean(validate(project / "spec.yaml"), project)


@FUZZ
@given(st.data())
def test_damaged_yaml_text_is_refused_cleanly(project, data):
    base = data.draw(st.one_of(st.just(BASE), mutated_specs().map(dump)))
    (project / "spec.yaml").write_bytes(data.draw(text_edits(base)))
    assert_clean(validate(project / "spec.yaml"), project)


@FUZZ
@given(template=template_text, where=st.sampled_from(TEMPLATE_PATHS))
def test_templates_with_undefined_names_or_bad_syntax_are_refused_cleanly(project, template, where):
    data = copy.deepcopy(BASE_DATA)
    _get(data, where[:-1])[where[-1]] = template
    (project / "spec.yaml").write_text(dump(data), encoding="utf-8")
    result = validate(project / "spec.yaml")
    assert_clean(result, project)
    if result.exit_code == 2:  # a template error points at the template's key
        first = result.stderr.splitlines()[0]
        assert str(project / "spec.yaml") in first


# random --set arguments: known and unknown key paths, YAML values of every shape, malformed args
set_keys = st.one_of(
    st.sampled_from([".".join(map(str, p)) for p in PATHS]),
    st.sampled_from(["models.task.api_key_env", "models.task.model", "models.backward.api_key", "models.task.extra",
                     "models.optimizer.extra.token", "data.generator", "nodes.count.json_schema", "train.demos"]),
    st.lists(st.one_of(st.sampled_from(NAMES + ["models", "task", "nodes", "train", "data", "params", "0", "1", "99",
                                                  "extra", "state", "api_key", "kind", "value"]),
                       unicode_text), min_size=1, max_size=5).map(".".join),
)
set_values = st.one_of(values.map(lambda v: yaml.safe_dump(v, default_flow_style=True, allow_unicode=True).strip()
                                  .removesuffix("...").strip()),
                       unicode_text, st.sampled_from(["", "[", "{a: ", "{{ x }}", "!!python/name:os.system", "*a",
                                                      "&a [*a]", "- x", "'unterminated", '"\\ud800"', "{a: 1, a: 2}",
                                                      "UNSET_VARIABLE_NAME", "fake/missing.yaml", "sk-abc-123",
                                                      "{api_key: sk-abc-123}"]))
set_args = st.one_of(st.tuples(set_keys, set_values).map(lambda kv: f"{kv[0]}={kv[1]}"), unicode_text)


@FUZZ
@given(args=st.lists(set_args, min_size=1, max_size=3))
def test_random_set_arguments_are_applied_or_refused_cleanly(project, args):
    if any("\x00" in a for a in args):  # a NUL byte cannot be passed as a process argument
        return
    assert_clean(validate(project / "spec.yaml", *args), project, allow_set=True)


# ---------------------------------------------------------------- dataset rows

json_values = st.recursive(
    st.one_of(st.none(), st.booleans(), st.integers(), st.floats(allow_nan=False), unicode_text,
              st.integers(1, 200_000).map(lambda n: "q" * n)),
    lambda inner: st.one_of(st.lists(inner, max_size=3), st.dictionaries(unicode_text, inner, max_size=3)),
    max_leaves=6)


@st.composite
def rows(draw) -> dict:
    row = {}
    for field, good in (("id", st.sampled_from(["a", "b", "c", "", 1, 2.5])),  # few ids: duplicates are frequent
                        ("question", st.just("How many? n=2")), ("answer", st.just("2"))):
        how = draw(st.sampled_from(["good", "good", "missing", "wrong"]))
        if how == "good":
            row[field] = draw(good)
        elif how == "wrong":
            row[field] = draw(json_values)
    for _ in range(draw(st.integers(0, 2))):
        row[draw(unicode_text)] = draw(json_values)
    return row


raw_lines = st.sampled_from([
    "", "   ", "{", "[1, 2]", '"just a string"', "null", "42", '{"id": "x", "question": "\\ud800", "answer": "1"}',
    '{"question": "lone \\udfff surrogate", "answer": "1"}', "NaN", '{"id": NaN, "question": "q", "answer": "1"}',
    '{"id": "x", "id": "y", "question": "q", "answer": "1"}', "{'single': 'quotes'}", "\x00",
    '{"question": "' + "\u2028" + '", "answer": "1"}',
])


@st.composite
def jsonl_files(draw) -> bytes:
    lines = draw(st.lists(st.one_of(rows().map(lambda r: json.dumps(r, ensure_ascii=draw(st.booleans()))),
                                    raw_lines), max_size=6))
    newline = draw(st.sampled_from(["\n", "\r\n"]))
    data = newline.join(lines).encode("utf-8", "surrogatepass")
    if draw(st.booleans()) and data:
        at = draw(st.integers(0, len(data)))
        data = data[:at] + draw(st.sampled_from([b"\xff", b"\xc3\x28", b"\xed\xa0\x80", b"\x80"])) + data[at:]
    return data


@st.composite
def csv_files(draw) -> bytes:
    header = draw(st.lists(st.sampled_from(["id", "question", "answer", "", "extra", "id "]), min_size=0, max_size=4))
    body = [",".join(header)]
    for _ in range(draw(st.integers(0, 4))):
        cells = draw(st.lists(st.one_of(st.sampled_from(["a", "b", "How many? n=2", "2", "", '"quoted, comma"',
                                                         '"unterminated', "\u00e9"]), unicode_text),
                              min_size=0, max_size=5))
        body.append(",".join(c.replace("\n", " ").replace("\r", " ") for c in cells))
    data = "\n".join(body).encode("utf-8", "surrogatepass")
    if draw(st.booleans()) and data:
        at = draw(st.integers(0, len(data)))
        data = data[:at] + b"\xff" + data[at:]
    return data


@FUZZ
@given(split=st.sampled_from(["train", "val", "test"]), content=jsonl_files())
def test_fuzzed_jsonl_rows_are_loaded_or_refused_cleanly(project, split, content):
    reset(project)
    (project / f"{split}.jsonl").write_bytes(content)
    result = validate(project / "spec.yaml")
    assert_clean(result, project)
    if result.exit_code == 2:
        first = result.stderr.splitlines()[0]
        assert f"{split}.jsonl" in first or str(project / "spec.yaml") in first, first


@FUZZ
@given(content=csv_files(), sliced=st.booleans())
def test_fuzzed_csv_rows_are_loaded_or_refused_cleanly(project, content, sliced):
    (project / "val.csv").write_bytes(content)
    val = "{path: val.csv, start: 0, stop: 2}" if sliced else "val.csv"
    (project / "spec.yaml").write_text(BASE.replace("{path: val.jsonl, start: 0, stop: 10}", val), encoding="utf-8")
    result = validate(project / "spec.yaml")
    assert_clean(result, project)
    if result.exit_code == 2:
        first = result.stderr.splitlines()[0]
        assert "val.csv" in first or str(project / "spec.yaml") in first, first


@pytest.mark.parametrize("content, where", [
    (b"", "test.jsonl"),                                                   # empty split
    (b"\n\n   \n", "test.jsonl"),                                          # only blank lines
    (b'{"id": "a", "question": "q", "answer": "1"}\n' * 2, "test.jsonl:2"),  # duplicate id
    (b'{"question": "q", "answer": "1"}\n' * 2, "test.jsonl:2"),            # identical rows without ids
    (b'{"id": "a", "answer": "1"}\n', "test.jsonl:1"),                      # missing field the template reads
    (b'{"id": "a", "question": "q", "answer": "1"}\n{"id": "b", "question": "q\xff"}\n', "test.jsonl:2"),
    (b'{"id": ["a"], "question": "q", "answer": "1"}\n', "test.jsonl:1"),   # id of the wrong type
])
def test_known_bad_rows_are_refused_with_file_and_line(project, content, where):
    (project / "test.jsonl").write_bytes(content)
    result = validate(project / "spec.yaml")
    assert result.exit_code == 2, result.output
    assert_clean(result, project)
    assert where in result.stderr.splitlines()[0]


def test_an_empty_split_after_slicing_is_refused(project):
    result = validate(project / "spec.yaml", "data.val.start=50")
    assert result.exit_code == 2, result.output
    assert_clean(result, project, allow_set=True)
    assert "data.val" in result.stderr.splitlines()[0]


# ---------------------------------------------------------------- a few through a real process


def _bomb() -> str:
    anchors = ['a0: &a0 ["lol","lol","lol","lol","lol","lol","lol","lol","lol"]']
    for i in range(1, 9):
        anchors.append(f"a{i}: &a{i} [" + ",".join([f"*a{i - 1}"] * 9) + "]")
    return "x_anchors:\n" + "".join(f"  {a}\n" for a in anchors) + BASE + "constraints: *a8\n"


SUBPROCESS_CASES = {
    "non-UTF-8 byte": BASE.encode().replace(b"Count the things.", b"Count the \xff things."),
    "duplicate key": (BASE + "name: again\n").encode(),
    "huge key": (BASE + "y" * 2_000_000 + ": 1\n").encode(),
    "huge value of the wrong type": (BASE + "description: [" + "1, " * 50_000 + "1]\n").replace(
        "description: the spec every fuzz example starts from\n", "").encode(),
    "recursive alias": BASE.replace("constraints: [\"Keep it short.\"]", "constraints: &c [*c]").encode(),
    "alias bomb (billion laughs)": _bomb().encode(),
    "lone surrogate escape": BASE.replace("Count the things.", "Count \\udc80 things.").encode(),
    "unset key variable": BASE.replace("backward: {model: fake/script.yaml}",
                                       "backward: {model: fake/script.yaml, api_key_env: AUTODIFF_FUZZ_UNSET}").replace(
        "count:\n    kind: llm\n", "count:\n    kind: llm\n    model: backward\n").encode(),
    "missing model script": BASE.replace("task: {model: fake/script.yaml", "task: {model: fake/missing.yaml").encode(),
    "python tag": BASE.replace("name: fuzzbase", "name: !!python/object/apply:os.system ['true']").encode(),
    "not a mapping": b"- just\n- a list\n",
    "tab indentation": BASE.replace("  task:", "\ttask:").encode(),
}


@pytest.mark.parametrize("case", list(SUBPROCESS_CASES))
def test_nasty_specs_in_a_real_process(project, case):
    (project / "spec.yaml").write_bytes(SUBPROCESS_CASES[case])
    proc = subprocess.run([sys.executable, "-m", "autodiff_cli.app.cli", "validate", str(project / "spec.yaml")],
                          capture_output=True, text=True, timeout=60, cwd=project, env=os.environ.copy())
    assert proc.returncode == 2, (proc.stdout, proc.stderr)
    assert "Traceback" not in proc.stderr and proc.stdout == ""
    first = proc.stderr.splitlines()[0]
    assert re.match(re.escape(f"error: {project / 'spec.yaml'}") + r"(:\d+)?: ", first), first
    assert len(proc.stderr) < 5_000  # one paragraph, never the huge value echoed


def test_a_nasty_set_argument_in_a_real_process(project):
    proc = subprocess.run([sys.executable, "-m", "autodiff_cli.app.cli", "validate", str(project / "spec.yaml"),
                           "--set", "train.max_steps=&a [*a]", "--set", "nodes.0.kind=x"],
                          capture_output=True, text=True, timeout=60, cwd=project, env=os.environ.copy())
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
    assert proc.stderr.startswith("error: --set "), proc.stderr
