"""`autodiff export-prompts`: yaml/json/md/config from a run directory built by hand."""
from __future__ import annotations

import json

import pytest
import yaml
from typer.testing import CliRunner

from autodiff_cli.app.cli import app
from autodiff_cli.app.export import (
    Placeholder,
    export_prompts,
    render_with_placeholders,
)
from autodiff_cli.io.rundir import RunDir
from autodiff_cli.spec.loader import load_spec
from autodiff_cli.spec.templates import TemplateError, compile_template
from tests.conftest import write
from tests.specs import MULTIHOP

SCRIPT = """
rules:
  - match: "carefully"
    in: system
    reply: "Answer: 3"
default: "Answer: 0"
"""

SPEC = """
name: tiny
models:
  task: {model: fake/script.yaml, max_retries: 0}
data:
  val: val.jsonl
params:
  instruction: {value: "Count.", role: "how to count"}
  style: {value: "Be brief.", trainable: false}
nodes:
  count:
    kind: llm
    system: "{{ instruction }}\\n{{ style }}"
    user: "Question: {{ input.question }}"
  parse: {kind: function, fn: last_integer, args: {text: count}}
output: parse
metric: {fn: exact_match, args: {pred: parse, target: input.answer}}
"""

ROWS = [
    {"id": "e1", "question": "3 apples?", "answer": "3"},
    {"id": "e2", "question": "5 pears?", "answer": "5"},
]

BEST = "Count carefully.\nAnswer with `Answer: N` and keep {{ braces }} literal."

# the multi-hop loop, with the iteration shown in the query prompt
LOOP = MULTIHOP.replace("known: {{ state.context }}", "known: {{ state.context }} | hop {{ iteration + 1 }}")


def invoke(*args):
    return CliRunner().invoke(app, [str(a) for a in args])


def last_json(result) -> dict:
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout.strip().splitlines()[-1])


def make_run(tmp_path, spec_text=SPEC, prompts=None, resolved_style="dump", record_config=True):
    """A run directory as the trainer leaves it: config.yaml, resolved.yaml, prompts.yaml, summary.json."""
    project = tmp_path / "project"
    write(project / "script.yaml", SCRIPT)
    (project / "val.jsonl").write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    (project / "corpus.jsonl").write_text(json.dumps({"title": "Paris", "text": "Paris is in France."}) + "\n")
    config = write(project / "spec.yaml", spec_text)
    loaded = load_spec(config)
    resolved = loaded.spec.model_dump(by_alias=True, mode="json") if resolved_style == "dump" else loaded.raw
    run = RunDir.create(tmp_path / "runs", loaded.spec.name, config_path=config, resolved=resolved)
    run.write_prompts(prompts if prompts is not None else {"instruction": BEST, "style": "Be brief."})
    summary = {"schema_version": 1, "name": loaded.spec.name, "run_dir": str(run.path), "status": "completed",
               "initial": {"val": 0.0, "test": None}, "best": {"step": 3, "val": 0.5, "test": None}}
    if record_config:
        summary["config_path"] = str(config.resolve())
    run.write_summary(summary)
    return config, run


# ---------------------------------------------------------------- config


@pytest.mark.parametrize("resolved_style", ["dump", "raw"])
def test_baked_config_scores_exactly_as_the_runs_best_prompts(tmp_path, resolved_style):
    config, run = make_run(tmp_path, resolved_style=resolved_style)
    baked = config.parent / "baked.yaml"
    res = invoke("export-prompts", run.path, "--format", "config", "-o", baked)
    assert res.exit_code == 0, res.output
    assert res.stdout == "" and f"wrote {baked}" in res.stderr
    text = baked.read_text(encoding="utf-8")
    assert text.startswith("# Exported by `autodiff export-prompts --format config` from run ")
    assert "step 3" in text and "relative to the original config's folder" in text and str(config.parent) in text
    assert yaml.safe_load(text)["params"]["instruction"]["value"] == BEST

    with_prompts = last_json(invoke("eval", config, "--prompts", run.path / "prompts.yaml", "--json"))
    from_baked = last_json(invoke("eval", baked, "--json"))
    original = last_json(invoke("eval", config, "--json"))
    assert with_prompts["score"] == from_baked["score"] == 0.5
    assert original["score"] == 0.0  # the run's prompts are what changes the score
    assert from_baked["usage"]["task"]["cached_calls"] == 2  # the very same calls as with --prompts


def test_config_without_recorded_config_path_still_bakes_the_values(tmp_path):
    _, run = make_run(tmp_path, record_config=False)
    text = export_prompts(run.path, "config")
    assert "relative to the original config's folder." in text
    assert yaml.safe_load(text)["params"]["instruction"]["value"] == BEST


# ---------------------------------------------------------------- yaml / json


@pytest.mark.parametrize("fmt", ["yaml", "json"])
def test_yaml_and_json_load_with_eval_prompts(tmp_path, fmt):
    config, run = make_run(tmp_path)
    out = tmp_path / f"exported.{fmt}"
    assert invoke("export-prompts", run.path, "--format", fmt, "-o", out).exit_code == 0
    data = json.loads(out.read_text()) if fmt == "json" else yaml.safe_load(out.read_text())
    assert data["params"] == {"instruction": BEST, "style": "Be brief."}
    assert data["nodes"] == {"count": {"system": BEST + "\nBe brief.", "user": "Question: {{ input.question }}"}}
    assert last_json(invoke("eval", config, "--prompts", out, "--json"))["score"] == 0.5


def test_default_format_is_yaml_on_stdout(tmp_path):
    _, run = make_run(tmp_path)
    res = invoke("export-prompts", run.path)
    assert res.exit_code == 0, res.output
    assert yaml.safe_load(res.stdout)["params"]["instruction"] == BEST
    assert "instruction: |" in res.stdout  # multi-line prompts read as blocks


# ---------------------------------------------------------------- md


def test_markdown_shows_rendered_prompts_with_placeholders(tmp_path):
    _, run = make_run(tmp_path)
    res = invoke("export-prompts", run.path, "--format", "md")
    assert res.exit_code == 0, res.output
    md = res.stdout
    assert md.startswith(f"# Prompts of run `{run.path.name}`")
    assert "best step: 3 (val 0.5000)" in md
    assert f"```text\n{BEST}\nBe brief.\n```" in md  # the rendered system prompt
    assert "```text\nQuestion: {{ input.question }}\n```" in md
    assert "### `instruction`" in md and "changed by training — how to count" in md
    assert "### `style`" in md and "not trainable, unchanged" in md


@pytest.mark.parametrize("record_config", [True, False])
def test_markdown_of_a_loop_keeps_state_and_node_placeholders(tmp_path, record_config):
    # without config_path the spec is read from the run's copy, where corpus.jsonl is not found:
    # the nodes are still shown, as declared
    _, run = make_run(tmp_path, LOOP, prompts={"answer_instruction": "Answer in one word."},
                      record_config=record_config)
    md = export_prompts(run.path, "md")
    assert "### `query`" in md and "in loop `hops`" in md
    assert "{{ input.question }} | known: {{ state.context }} | hop {{ iteration + 1 }}" in md
    assert "Passages: {{ hops.context }}\nQ: {{ input.question }}" in md
    assert "```text\nAnswer in one word.\n```" in md
    assert "```text\nWrite a search query for the question.\n```" in md  # not in prompts.yaml: the spec's value
    assert md.index("### `query`") < md.index("### `answer`")


def test_fences_grow_around_backticks(tmp_path):
    _, run = make_run(tmp_path, prompts={"instruction": "Reply like\n```\nAnswer: 3\n```"})
    md = export_prompts(run.path, "md")
    assert "````text\nReply like\n```\nAnswer: 3\n```\n````" in md


# ---------------------------------------------------------------- placeholders


def test_placeholders_build_paths_in_the_sandbox():
    source = ("{{ p }} {{ input.question }} {{ input['a b'] }} {{ input['x'] }} {{ retrieve }} {{ state.context }} "
              "{{ docs[0] }} {{ iteration + 1 }} {% for d in docs %}<{{ d.title }}>{% endfor %} {{ q.strip() }}")
    rendered = render_with_placeholders(compile_template(source), {"p": "P {{ not rendered }}"})
    assert rendered == ("P {{ not rendered }} {{ input.question }} {{ input['a b'] }} {{ input.x }} {{ retrieve }} "
                        "{{ state.context }} {{ docs[0] }} {{ iteration + 1 }} <{{ docs[i].title }}> {{ q.strip() }}")
    # underscore attributes are refused when a template is compiled, and placeholders refuse them too
    with pytest.raises(TemplateError):
        compile_template("{{ input.__class__ }}")
    with pytest.raises(AttributeError):
        Placeholder("x")._secret


# ---------------------------------------------------------------- errors


def test_bad_format_exits_2_with_the_contract_message(tmp_path):
    _, run = make_run(tmp_path)
    res = invoke("export-prompts", run.path, "--format", "x")
    assert res.exit_code == 2
    assert res.stderr.splitlines()[0] == "error: --format: expected yaml, json, md or config, got 'x'"


def test_a_folder_that_is_not_a_run_exits_2(tmp_path):
    (tmp_path / "nope").mkdir()
    res = invoke("export-prompts", tmp_path / "nope")
    assert res.exit_code == 2
    assert res.stderr.startswith(f"error: {tmp_path / 'nope'}: expected a run directory")
    assert "Traceback" not in res.output
