"""Bad specs are refused clearly: exit 2, no traceback, and a first line of the form
`error: <file>:<line>: <key path>: expected <what>, got <what>` pointing at the mistake.

Every test starts from a valid minimal spec (a fake model, two tiny jsonl splits), breaks one
thing and runs the real CLI: typer's CliRunner for most, a subprocess for a handful to prove
nothing but the error paragraph reaches the user.
"""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from autodiff_cli.app.cli import app

AUTODIFF = Path(sys.executable).with_name("autodiff")

# Line numbers below refer to this text; `line_of` finds them by content so the tests say
# which line the mistake is on.
BASE = """\
name: mini
models:
  task: {model: fake/script.yaml, temperature: 0}
data:
  train: train.jsonl
  val: val.jsonl
params:
  instruction:
    value: "Count the objects."
nodes:
  count:
    kind: llm
    model: task
    system: "{{ instruction }}"
    user: "{{ input.question }}"
  parse:
    kind: function
    fn: last_integer
    args: {text: count}
output: parse
metric: {fn: exact_match, args: {pred: parse, target: input.answer}}
"""

LOOP = """\
name: loopy
models:
  task: {model: fake/script.yaml}
data:
  train: train.jsonl
  val: val.jsonl
nodes:
  count:
    kind: llm
    user: "{{ input.question }}"
  hops:
    kind: loop
    max_iters: 3
    state: {context: []}
    update: {context: step}
    until: "len(state.context) >= 2"
    body:
      step:
        kind: function
        fn: dedup_extend
        args: {items: state.context, new: count}
  parse:
    kind: function
    fn: last_integer
    args: {text: hops.context}
output: parse
metric: {fn: exact_match, args: {pred: parse, target: input.answer}}
"""

ROWS = '{"id": "a", "question": "How many apples? 2 apples.", "answer": "2"}\n' \
       '{"id": "b", "question": "How many pears? 3 pears.", "answer": "3"}\n'


def edit(text: str, old: str, new: str) -> str:
    assert text.count(old) == 1, f"{old!r} must occur once in the base spec"
    return text.replace(old, new)


def line_of(text: str, needle: str) -> int:
    hits = [i for i, line in enumerate(text.splitlines(), start=1) if needle in line]
    assert len(hits) == 1, f"{needle!r} must be on exactly one line"
    return hits[0]


@pytest.fixture
def project(tmp_path: Path) -> Path:
    (tmp_path / "script.yaml").write_text('default: "Answer: 2"\n', encoding="utf-8")
    (tmp_path / "train.jsonl").write_text(ROWS, encoding="utf-8")
    (tmp_path / "val.jsonl").write_text(ROWS, encoding="utf-8")
    return tmp_path


class Result:
    def __init__(self, code: int, stdout: str, stderr: str) -> None:
        self.code, self.stdout, self.stderr = code, stdout, stderr
        self.first = stderr.splitlines()[0] if stderr.strip() else ""


def run(args: list[str], subprocess_: bool = False) -> Result:
    if subprocess_:
        p = subprocess.run([str(AUTODIFF), *args], capture_output=True, text=True, env=os.environ.copy(), timeout=60)
        return Result(p.returncode, p.stdout, p.stderr)
    r = CliRunner().invoke(app, args)
    assert r.exception is None or isinstance(r.exception, SystemExit), repr(r.exception)
    return Result(r.exit_code, r.stdout, r.stderr)


def validate(project: Path, text: str | bytes, *sets: str, subprocess_: bool = False) -> tuple[Result, Path]:
    spec = project / "spec.yaml"
    if isinstance(text, bytes):
        spec.write_bytes(text)
    else:
        spec.write_text(text, encoding="utf-8")
    args = ["validate", str(spec)]
    for s in sets:
        args += ["--set", s]
    return run(args, subprocess_), spec


def assert_refused(r: Result, where: str, key: str | None, *fragments: str) -> None:
    """Exit 2, no traceback, first line `error: <where>: <key>: expected ..., got ...`."""
    assert r.code == 2, (r.code, r.stdout, r.stderr)
    assert "Traceback" not in r.stdout + r.stderr
    assert r.stdout == ""
    head = f"error: {where}: " + (f"{key}: " if key else "") + "expected "
    assert r.first.startswith(head), f"\n{r.first}\ndoes not start with\n{head}"
    assert ", got " in r.first
    assert "\n\n" not in r.stderr.strip()  # one paragraph
    for fragment in fragments:
        assert fragment in r.stderr, f"{fragment!r} not in {r.stderr!r}"


def test_the_base_specs_are_valid(project):
    for text in (BASE, LOOP):
        r, _ = validate(project, text)
        assert r.code == 0, r.stderr
        assert r.stdout.startswith("ok: ")


# ---------------------------------------------------------------- YAML itself


def test_yaml_syntax_error(project):
    text = edit(BASE, "output: parse", "output: parse: oops")
    r, spec = validate(project, text, subprocess_=True)
    assert_refused(r, f"{spec}:{line_of(text, 'oops')}", None, "valid YAML", "syntax error")


def test_unclosed_bracket_names_where_it_started(project):
    text = edit(BASE, "args: {text: count}", "args: {text: count")
    r, spec = validate(project, text)
    assert r.code == 2 and "Traceback" not in r.stderr
    assert r.first.startswith(f"error: {spec}:")
    assert f"started on line {line_of(text, 'args: {text: count')}" in r.first


def test_duplicate_key(project):
    text = BASE + "output: count\n"
    r, spec = validate(project, text)
    assert_refused(r, f"{spec}:{line_of(text, 'output: count')}", "output", "each key once",
                   f"a duplicate of line {line_of(text, 'output: parse')}")


def test_empty_file(project):
    r, spec = validate(project, "# nothing here\n")
    assert_refused(r, f"{spec}:1", None, "a YAML mapping", "an empty file")


def test_not_utf8(project):
    text = edit(BASE, "Count the objects.", "Count the objects\udcff.")
    data = text.encode("utf-8", "surrogateescape")
    r, spec = validate(project, data, subprocess_=True)
    assert_refused(r, f"{spec}:{line_of(text, 'Count the objects')}", None, "UTF-8", "0xff")


def test_odd_yaml_keys_and_recursive_aliases_are_refused_cleanly(project):
    r, spec = validate(project, "? [a, b]\n: 1\n")
    assert_refused(r, f"{spec}:1", None, "a plain key")
    r, spec = validate(project, BASE + "constraints: &c [*c]\n")
    assert r.code == 2 and "Traceback" not in r.stderr + r.stdout


def test_an_alias_bomb_in_free_form_extra_is_refused_before_anything_expands_it(project):
    # `extra` takes any YAML, so a "billion laughs" there would pass the schema and only blow up
    # when the cache key or the run's config.yaml expands it: the loader counts expanded values
    bomb = "    extra:\n      l0: &a0 [x, x, x, x, x, x, x, x, x, x]\n" + "".join(
        f"      l{i}: &a{i} [" + ", ".join([f"*a{i - 1}"] * 10) + "]\n" for i in range(1, 9))
    text = edit(BASE, "  task: {model: fake/script.yaml, temperature: 0}\n",
                "  task:\n    model: fake/script.yaml\n" + bomb)
    r, spec = validate(project, text)
    assert_refused(r, f"{spec}:{line_of(text, 'l4:')}", "models.task.extra.l4", "at most 100,000 values",
                   "111,111 values once its aliases")
    r, spec = validate(project, edit(BASE, "  task: {model: fake/script.yaml, temperature: 0}\n",
                                     "  task: &t {model: fake/script.yaml, extra: {me: *t}}\n"))
    assert_refused(r, f"{spec}:3", "models.task.extra.me", "never ends (it contains itself)")


# ---------------------------------------------------------------- schema


def test_debug_adds_the_traceback_and_keeps_the_exit_code(project):
    text = edit(BASE, "name: mini", "name: 1mini")
    spec = project / "spec.yaml"
    spec.write_text(text, encoding="utf-8")
    r = run(["--debug", "validate", str(spec)], subprocess_=True)
    assert r.code == 2, r.stderr  # CONTRACT: --debug never changes an exit code
    assert "Traceback" in r.stderr and "SpecError" in r.stderr
    assert r.stderr.strip().splitlines()[-1].startswith(f"error: {spec}:1: name: expected ")


def test_unknown_top_level_key(project):
    text = edit(BASE, "nodes:", "nodse:")
    r, spec = validate(project, text, subprocess_=True)
    # the typo is reported first, not the missing `nodes` it causes
    assert_refused(r, f"{spec}:{line_of(text, 'nodse:')}", "nodse", "a known key (", "unknown key `nodse`",
                   "did you mean `nodes`?")


def test_unknown_key_inside_a_node(project):
    text = edit(BASE, "    system:", "    systen:")
    r, spec = validate(project, text)
    assert_refused(r, f"{spec}:{line_of(text, 'systen')}", "nodes.count.systen", "unknown key `systen`",
                   "did you mean `system`?")


def test_wrong_type_string_for_a_number(project):
    text = edit(BASE, "temperature: 0", "temperature: hot")
    r, spec = validate(project, text)
    assert_refused(r, f"{spec}:{line_of(text, 'hot')}", "models.task.temperature", "a valid number", "got 'hot'")


def test_wrong_type_max_iters(project):
    text = edit(LOOP, "max_iters: 3", 'max_iters: "two"')
    r, spec = validate(project, text)
    assert_refused(r, f"{spec}:{line_of(text, 'max_iters')}", "nodes.hops.max_iters", "a valid integer", "got 'two'")


def test_missing_metric(project):
    text = edit(BASE, "metric: {fn: exact_match, args: {pred: parse, target: input.answer}}\n", "")
    r, spec = validate(project, text)
    assert_refused(r, f"{spec}:1", "metric", "a value for this required key", "got nothing")


def test_missing_llm_user(project):
    text = edit(BASE, '    user: "{{ input.question }}"\n', "")
    r, spec = validate(project, text)
    assert_refused(r, f"{spec}:{line_of(text, '  count:')}", "nodes.count.user", "a value for this required key")


def test_bad_kind(project):
    text = edit(BASE, "kind: function", "kind: func")
    r, spec = validate(project, text)
    assert_refused(r, f"{spec}:{line_of(text, 'kind: func')}", "nodes.parse.kind",
                   "`kind: llm`, `kind: function` or `kind: loop`", "got 'func'")


@pytest.mark.parametrize("pasted", ["sk-live-1234567890abcdef", "AIzaSyD4x9Qm2Lk7pWv3Hn8RtY6bC1eF0gJ5sU"])
def test_a_key_pasted_as_api_key_env_is_refused_and_never_echoed(project, pasted):
    # the second one is letters and digits only, like some providers' keys: a valid env-var name
    text = edit(BASE, "temperature: 0}", f"temperature: 0, api_key_env: {pasted}}}")
    r, spec = validate(project, text)
    assert_refused(r, f"{spec}:3", "models.task.api_key_env", "the NAME of an environment variable",
                   "not shown: it may be the key itself")
    assert pasted not in r.stdout + r.stderr
    for name in ("OPENAI_API_KEY", "my_key_2", "TOGETHERAI_API_KEY"):  # real names pass the check (and are unset)
        r, _ = validate(project, edit(BASE, "temperature: 0}", f"temperature: 0, api_key_env: {name}}}"))
        assert f"the environment variable {name} (holding the API key) is not set" in r.stderr, r.stderr


def test_literal_api_key_is_refused_and_never_echoed(project):
    secret = "sk-live-1234567890abcdef"
    text = edit(BASE, "temperature: 0}", f"temperature: 0, api_key: {secret}}}")
    r, spec = validate(project, text)
    assert_refused(r, f"{spec}:3", "models.task.api_key", "api_key_env", "literal API key")
    assert secret not in r.stdout + r.stderr


def test_literal_api_key_hidden_in_extra(project):
    secret = "sk-live-abcdef"
    text = edit(BASE, "temperature: 0}", f"temperature: 0, extra: {{api_key: {secret}}}}}")
    r, spec = validate(project, text)
    assert_refused(r, f"{spec}:3", "models.task.extra.api_key", "literal API key")
    assert secret not in r.stdout + r.stderr


HTTP_MODEL = "  task: {model: fake/script.yaml, temperature: 0}"


def deployments(*items: str) -> str:
    """BASE with an HTTP model whose api_base is the block list of `items` (one per line)."""
    listed = "".join(f"\n      - {item}" for item in items) if items else " []"
    return edit(BASE, HTTP_MODEL, "  task:\n    model: openai/served\n    api_base:" + listed)


def test_several_deployments_are_accepted(project):
    text = deployments("http://127.0.0.1:8000/v1", "{url: 'http://gpu2:8000/v1', concurrency: 2, rpm: 60, tpm: 9000}")
    r, _ = validate(project, text)
    assert r.code == 0, r.stderr


def test_empty_deployment_list(project):
    text = deployments()
    r, spec = validate(project, text)
    assert_refused(r, f"{spec}:{line_of(text, 'api_base')}", "models.task.api_base", "at least one deployment",
                   "an empty list")


@pytest.mark.parametrize("item, key, fragment", [
    ("ftp://127.0.0.1/v1", "models.task.api_base.1", "'ftp://127.0.0.1/v1'"),
    ("localhost:8000", "models.task.api_base.1", "'localhost:8000'"),
    ("{url: 'gpu2:8000'}", "models.task.api_base.1.url", "'gpu2:8000'"),
])
def test_deployment_url_must_be_http(project, item, key, fragment):
    text = deployments("http://127.0.0.1:8000/v1", item)
    r, spec = validate(project, text)
    assert_refused(r, f"{spec}:{line_of(text, item)}", key, "http:// or https:// URL", fragment)


@pytest.mark.parametrize("url", ["ftp://x", "localhost:8000", "gpu2:8000/v1", "http://", "https://a b/v1"])
def test_a_single_api_base_follows_the_rule_of_a_list_item(project, url):
    # one rule for both forms: the same words, at `api_base` for a single URL and `api_base.<i>` in a list
    single = edit(BASE, HTTP_MODEL, f"  task:\n    model: openai/served\n    api_base: '{url}'")
    r, spec = validate(project, single)
    assert_refused(r, f"{spec}:{line_of(single, 'api_base')}", "models.task.api_base", "http:// or https:// URL",
                   f"got {url!r}")
    listed, _ = validate(project, deployments(f"'{url}'"))
    assert listed.first.split("api_base.0: ")[1] == r.first.split("api_base: ")[1]


def test_a_single_api_base_through_set_is_checked(project):
    r, _ = validate(project, BASE, "models.task.model=openai/served", "models.task.api_base=ftp://x")
    assert_refused(r, "--set models.task.api_base=ftp://x", "models.task.api_base", "got 'ftp://x'")


def test_duplicate_deployment(project):
    text = deployments("http://gpu1:8000/v1", "http://gpu2:8000/v1", "{url: 'http://GPU1:8000/v1/'}")
    r, spec = validate(project, text)
    assert_refused(r, f"{spec}:{line_of(text, 'GPU1')}", "models.task.api_base.2.url", "each deployment URL once",
                   "a duplicate of item 0")


def test_deployment_limits_and_keys_are_checked(project):
    text = deployments("http://gpu1:8000/v1", "{url: 'http://gpu2:8000/v1', concurrency: 0}")
    r, spec = validate(project, text)
    assert_refused(r, f"{spec}:{line_of(text, 'gpu2')}", "models.task.api_base.1.concurrency", "a whole number", "got 0")
    text = deployments("{url: 'http://gpu1:8000/v1', rmp: 5}")
    r, spec = validate(project, text)
    assert_refused(r, f"{spec}:{line_of(text, 'gpu1')}", "models.task.api_base.0.rmp", "url, concurrency, rpm, tpm",
                   "unknown key `rmp`")


def test_deployment_secrets_are_refused_and_never_echoed(project):
    secret = "sk-live-deploy-123456"
    text = deployments(f"{{url: 'http://gpu1:8000/v1', api_key: {secret}}}")
    r, spec = validate(project, text)
    assert_refused(r, f"{spec}:{line_of(text, 'gpu1')}", "models.task.api_base.0.api_key", "literal API key")
    assert secret not in r.stdout + r.stderr
    text = deployments(f"http://user:{secret}@gpu1:8000/v1")
    r, spec = validate(project, text)
    assert_refused(r, f"{spec}:{line_of(text, 'gpu1')}", "models.task.api_base.0", "credentials")
    assert secret not in r.stdout + r.stderr


def test_deployment_list_needs_an_http_provider(project):
    text = edit(BASE, "temperature: 0}", "temperature: 0,\n         api_base: [http://127.0.0.1:1/v1, http://127.0.0.1:2/v1]}")
    r, spec = validate(project, text)
    assert_refused(r, f"{spec}:{line_of(text, 'api_base')}", "models.task.api_base", "a `fake/` model, which is not served over HTTP")


def test_deployment_list_errors_through_set(project):
    r, _ = validate(project, BASE, "models.task.model=openai/served", "models.task.api_base=[http://a/v1, http://a/v1]")
    assert_refused(r, "--set models.task.api_base=[http://a/v1, http://a/v1]", "models.task.api_base.1",
                   "each deployment URL once")


def test_demo_schedule_needs_a_demos_param(project):
    text = BASE + "train: {demos: interleaved}\n"
    r, spec = validate(project, text)
    assert_refused(r, f"{spec}:{line_of(text, 'demos: interleaved')}", "train.demos", "`kind: demos` param")


def test_shots_only_on_demos_params(project):
    text = edit(BASE, '    value: "Count the objects."', '    value: "Count the objects."\n    max: 2')
    r, spec = validate(project, text)
    assert_refused(r, f"{spec}:{line_of(text, 'max: 2')}", "params.instruction.max", "only with `kind: demos`")


def test_demos_param_belongs_to_one_llm_node(project):
    text = edit(BASE, '    value: "Count the objects."', '    kind: demos')
    text = edit(text, "    fn: last_integer\n    args: {text: count}", "    fn: join\n    args: {items: count, sep: instruction}")
    r, spec = validate(project, text)
    assert_refused(r, f"{spec}:{line_of(text, 'kind: demos')}", "params.instruction.kind", "read by an llm node")


# ---------------------------------------------------------------- references and templates


def test_unknown_model_reference(project):
    text = edit(BASE, "model: task\n", "model: tsak\n")
    r, spec = validate(project, text)
    assert_refused(r, f"{spec}:{line_of(text, 'tsak')}", "nodes.count.model", "a key of `models` (task)", "'tsak'")


def test_unknown_name_in_template(project):
    text = edit(BASE, 'system: "{{ instruction }}"', 'system: "{{ instruction }} {{ instrution }}"')
    r, spec = validate(project, text, subprocess_=True)
    assert_refused(r, f"{spec}:{line_of(text, 'instrution')}", "nodes.count.system", "unknown name `instrution`")


def test_jinja_syntax_error(project):
    text = edit(BASE, 'user: "{{ input.question }}"', 'user: "{{ input.question "')
    r, spec = validate(project, text)
    assert_refused(r, f"{spec}:{line_of(text, 'user:')}", "nodes.count.user", "a valid Jinja2 template")


def test_jinja_unknown_filter(project):
    text = edit(BASE, 'user: "{{ input.question }}"', 'user: "{{ input.question | shout }}"')
    r, spec = validate(project, text)
    assert_refused(r, f"{spec}:{line_of(text, 'shout')}", "nodes.count.user", "a valid Jinja2 template", "shout")


def test_function_arg_references_unknown_node(project):
    text = edit(BASE, "args: {text: count}", "args: {text: cuont}")
    r, spec = validate(project, text)
    assert_refused(r, f"{spec}:{line_of(text, 'cuont')}", "nodes.parse.args.text", "unknown name `cuont`")


def test_fn_cannot_be_imported(project):
    text = edit(BASE, "fn: last_integer", "fn: no_such_module_xyz:parse")
    r, spec = validate(project, text)
    assert_refused(r, f"{spec}:{line_of(text, 'no_such_module_xyz')}", "nodes.parse.fn",
                   "an importable `module:function`", "no_such_module_xyz")


def test_wrong_function_arguments(project):
    text = edit(BASE, "args: {text: count}", "args: {txt: count}")
    r, spec = validate(project, text)
    assert_refused(r, f"{spec}:{line_of(text, 'txt: count')}", "nodes.parse.args", "the arguments of last_integer",
                   "txt")


def test_cycle_between_two_nodes(project):
    text = edit(BASE, 'user: "{{ input.question }}"', 'user: "{{ input.question }} {{ parse }}"')
    r, spec = validate(project, text, subprocess_=True)
    assert_refused(r, f"{spec}:{line_of(text, '  count:')}", "nodes.count", "no cycle outside a declared loop",
                   "count -> parse -> count")


def test_unused_node(project):
    text = edit(BASE, "output: parse", "  spare:\n    kind: function\n    fn: last_integer\n    args: {text: count}\n"
                                       "output: parse")
    r, spec = validate(project, text)
    assert_refused(r, f"{spec}:{line_of(text, 'spare:')}", "nodes.spare", "an unused node")


def test_unused_param(project):
    text = edit(BASE, "params:\n", "params:\n  tone: {value: be nice}\n")
    r, spec = validate(project, text)
    assert_refused(r, f"{spec}:{line_of(text, 'tone:')}", "params.tone", "an unused param")


def test_metric_reads_unknown_node(project):
    text = edit(BASE, "pred: parse", "pred: prase")
    r, spec = validate(project, text)
    assert_refused(r, f"{spec}:{line_of(text, 'metric:')}", "metric.args.pred", "unknown name `prase`")


def test_state_outside_a_loop(project):
    text = edit(BASE, "args: {text: count}", "args: {text: state.context}")
    r, spec = validate(project, text)
    assert_refused(r, f"{spec}:{line_of(text, 'state.context')}", "nodes.parse.args.text", "only inside a loop body")


def test_state_outside_a_loop_in_a_template(project):
    text = edit(BASE, 'user: "{{ input.question }}"', 'user: "{{ input.question }} {{ state.context }}"')
    r, spec = validate(project, text)
    assert_refused(r, f"{spec}:{line_of(text, 'state.context')}", "nodes.count.user", "only inside a loop body")


def test_unknown_state_field_inside_a_loop(project):
    text = edit(LOOP, "args: {items: state.context, new: count}", "args: {items: state.contxt, new: count}")
    r, spec = validate(project, text)
    assert_refused(r, f"{spec}:{line_of(text, 'contxt')}", "nodes.hops.body.step.args.items",
                   "a key of the loop's `state`: context", "`state.contxt`")


def test_unknown_field_of_a_loop_output(project):
    text = edit(LOOP, "args: {text: hops.context}", "args: {text: hops.contxt}")
    r, spec = validate(project, text)
    assert_refused(r, f"{spec}:{line_of(text, 'contxt')}", "nodes.parse.args.text", "final `state`", "`hops.contxt`")


def test_until_with_forbidden_construct(project):
    text = edit(LOOP, '"len(state.context) >= 2"', "\"__import__('os')\"")
    r, spec = validate(project, text)
    assert_refused(r, f"{spec}:{line_of(text, 'until:')}", "nodes.hops.until", "a restricted expression", "__import__")


def test_until_with_unknown_name(project):
    text = edit(LOOP, '"len(state.context) >= 2"', '"len(stat.context) >= 2"')
    r, spec = validate(project, text)
    assert_refused(r, f"{spec}:{line_of(text, 'until:')}", "nodes.hops.until", "unknown name `stat`")


# ---------------------------------------------------------------- --set


def test_set_unknown_key(project):
    arg = "models.task.modle=x"
    r, _ = validate(project, BASE, arg, subprocess_=True)
    assert_refused(r, f"--set {arg}", "models.task.modle", "a known key (", "unknown key `modle`",
                   "did you mean `model`?")


def test_set_bad_yaml_value(project):
    arg = "models.task.temperature=[1"
    r, _ = validate(project, BASE, arg)
    assert_refused(r, f"--set {arg}", "models.task.temperature", "a YAML value", "syntax error")
    assert len(r.stderr.strip().splitlines()) == 1


def test_set_wrong_type(project):
    arg = "models.task.temperature=hot"
    r, _ = validate(project, BASE, arg)
    assert_refused(r, f"--set {arg}", "models.task.temperature", "a valid number", "'hot'")


def test_set_that_leaves_a_mapping_incomplete_is_blamed(project):
    arg = "loss.feedback=llm"
    r, _ = validate(project, BASE, arg)
    assert_refused(r, f"--set {arg}", "loss.fn", "a value for this required key")


def test_set_cannot_create_list_items(project):
    arg = "skip.0.from=loss"
    r, _ = validate(project, BASE, arg)
    assert_refused(r, f"--set {arg}", "skip.0", "an existing list item")


def test_set_accepts_aliased_keys(project):
    # `with` is the alias of FunctionNode.with_; a node is a union, the alias must still be known
    r, _ = validate(project, BASE, "nodes.parse.fn=answer_after", "nodes.parse.with.marker=Result")
    assert r.code == 0, r.stderr


# ---------------------------------------------------------------- data


def test_data_file_missing(project):
    text = edit(BASE, "train: train.jsonl", "train: object_counting/train.jsonl")
    r, spec = validate(project, text, subprocess_=True)
    assert_refused(r, f"{spec}:{line_of(text, 'object_counting')}", "data.train", "an existing data file",
                   "autodiff data fetch object_counting")


def test_bad_data_row_names_file_and_line(project):
    bad = project / "bad.jsonl"
    bad.write_text(ROWS + '{"id": "c", "question": \n', encoding="utf-8")
    r, _ = validate(project, edit(BASE, "val: val.jsonl", "val: bad.jsonl"))
    assert_refused(r, f"{bad}:3", None, "a JSON object", "invalid JSON")


def test_input_field_missing_from_data(project):
    text = edit(BASE, "input.question", "input.questoin")
    r, _ = validate(project, text)
    assert_refused(r, f"{project / 'train.jsonl'}:1", "input.questoin", "a field 'questoin' in every example",
                   "question")
