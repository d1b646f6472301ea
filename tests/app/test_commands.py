"""app/commands.py called directly (no CLI): loading with --set overrides, validate on good and bad
specs (errors located at file, line and key), the task models, eval's result and --out rows,
export-prompts in each format. The model is the scripted fake."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import typer
import yaml

from autodiff_cli.app.commands import (
    eval_command,
    export_command,
    load_pipeline,
    task_models,
    validate_command,
)
from autodiff_cli.errors import (
    EXIT_BELOW_THRESHOLD,
    EXIT_MODEL_ERRORS,
    AutodiffError,
    DataError,
    ModelNotFound,
    SpecError,
    UsageError,
)
from autodiff_cli.io.rundir import RunDir
from autodiff_cli.llm.fake import reset_fake_state
from autodiff_cli.spec.loader import load_spec
from tests.conftest import write
from tests.specs import MULTIHOP

SCRIPT = """
rules:
  - match: "carefully"
    in: system
    reply: "Answer: 2"
  - match: "boom"
    error: 503
  - match: "apples"
    reply: "Answer: 3"
  - match: "pears"
    reply: "Answer: 5"
default: "Answer: 0"
"""

# line numbers matter: the tests below point at them
SPEC = """\
name: tiny
models:
  task: {model: fake/script.yaml, max_retries: 0}
  other: {model: fake/script.yaml, max_retries: 0}
data:
  train: train.jsonl
  val: val.jsonl
params:
  instruction: {value: "Count."}
  style: {value: "Be brief.", trainable: false}
nodes:
  count: {kind: llm, system: "{{ instruction }} {{ style }}", user: "{{ input.question }}"}
  parse: {kind: function, fn: last_integer, args: {text: count}}
output: parse
metric: {fn: exact_match, args: {pred: parse, target: input.answer}}
train: {batch_size: 2, max_error_rate: 0.3}
"""

VAL = [
    {"id": "e1", "question": "3 apples?", "answer": "3"},
    {"id": "e2", "question": "5 pears?", "answer": "5"},
    {"id": "e3", "question": "some plums?", "answer": "2"},
    {"id": "e4", "question": "4 apples?", "answer": "4"},
]


@pytest.fixture(autouse=True)
def fresh_fake():
    reset_fake_state()


def jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def project(tmp_path: Path, spec: str = SPEC, val: list[dict] = VAL, script: bool = True) -> Path:
    if script:
        write(tmp_path / "script.yaml", SCRIPT)
    jsonl(tmp_path / "train.jsonl", VAL[:2])
    jsonl(tmp_path / "val.jsonl", val)
    return write(tmp_path / "spec.yaml", spec)


def line_of(text: str, fragment: str) -> int:
    return next(i for i, line in enumerate(text.splitlines(), start=1) if fragment in line)


def run_eval(config: Path, **kw):
    args = {"prompts": None, "run": None, "split": "val", "limit": None, "concurrency": None, "fail_under": None,
            "json_out": True, "out": None, "no_cache": True, "overrides": []}
    args.update(kw)
    return eval_command(config, **args)


# ---------------------------------------------------------------- load_pipeline / task_models


def test_load_pipeline_applies_the_overrides_before_compiling(tmp_path):
    config = project(tmp_path)
    p = load_pipeline(config, ["name=renamed", "params.instruction.value=Count carefully.",
                               "nodes.count.model=other"])
    assert p.spec is p.loaded.spec
    assert p.spec.name == "renamed"
    assert p.program.params["instruction"].value == "Count carefully."
    assert p.program.node("count").model == "other"  # the compiled program, not only the spec
    assert p.loaded.config_dir == tmp_path
    assert task_models(p) == ["other"]
    plain = load_pipeline(config, [])  # the file itself is untouched
    assert (plain.spec.name, plain.program.params["instruction"].value, task_models(plain)) == ("tiny", "Count.", ["task"])


def test_load_pipeline_locates_a_bad_override_at_its_set_argument(tmp_path):
    config = project(tmp_path)
    with pytest.raises(SpecError) as info:
        load_pipeline(config, ["nodes.parse.args.text=nothere"])
    assert info.value.file == "--set nodes.parse.args.text=nothere"
    assert info.value.key == "nodes.parse.args.text"
    assert "nothere" in info.value.got


def test_task_models_are_the_llm_nodes_models_loop_bodies_included(tmp_path):
    spec = MULTIHOP.replace("  task: {model: fake/script.yaml}",
                            "  task: {model: fake/script.yaml}\n  small: {model: fake/script.yaml}\n"
                            "  backward: {model: fake/script.yaml}")
    spec = spec.replace("        kind: llm\n        system: \"{{ query_instruction }}\"",
                        "        kind: llm\n        model: small\n        system: \"{{ query_instruction }}\"")
    config = project(tmp_path, spec)
    jsonl(tmp_path / "corpus.jsonl", [{"title": "Paris", "text": "Paris is in France."}])
    p = load_pipeline(config, [])
    assert p.program.node("query").model == "small"  # the edit above took
    # sorted and unique; function nodes and the backward model (not a node's) are not task models
    assert task_models(p) == ["small", "task"]
    assert task_models(load_pipeline(config, ["nodes.answer.model=small"])) == ["small"]


# ---------------------------------------------------------------- validate


def test_validate_a_good_spec_prints_one_ok_line(tmp_path, capsys):
    config = project(tmp_path)
    validate_command(config, [])
    out = capsys.readouterr()
    assert out.out == f"ok: {config}: 2 nodes, 2 params (1 trainable), data train 2, val 4\n"


def test_validate_counts_the_data_after_overrides(tmp_path, capsys):
    config = project(tmp_path)
    jsonl(tmp_path / "test.jsonl", VAL[:3])
    validate_command(config, ["data.test=test.jsonl", "params.style.trainable=true"])
    assert capsys.readouterr().out == f"ok: {config}: 2 nodes, 2 params (2 trainable), data train 2, val 4, test 3\n"


def test_validate_locates_a_spec_error_at_its_file_line_and_key(tmp_path, capsys):
    text = SPEC.replace("{batch_size: 2,", "{batch_size: 0,")
    config = project(tmp_path, text)
    with pytest.raises(SpecError) as info:
        validate_command(config, [])
    e = info.value
    assert (e.file, e.line, e.key) == (str(config), line_of(text, "batch_size: 0"), "train.batch_size")
    assert e.headline().startswith(f"{config}:{e.line}: train.batch_size: expected ")
    assert capsys.readouterr().out == ""


def test_validate_locates_a_missing_model_script_at_the_models_key(tmp_path, capsys):
    config = project(tmp_path, script=False)
    with pytest.raises(ModelNotFound) as info:
        validate_command(config, [])
    e = info.value
    assert (e.file, e.line, e.key) == (str(config), line_of(SPEC, "task: {model:"), "models.task.model")
    assert "script.yaml" in e.message
    # set on the command line: located at the --set argument
    write(tmp_path / "script.yaml", SCRIPT)
    with pytest.raises(ModelNotFound) as info:
        validate_command(config, ["models.task.model=fake/nope.yaml"])
    assert (info.value.file, info.value.key) == ("--set models.task.model=fake/nope.yaml", "models.task.model")
    assert capsys.readouterr().out == ""


def test_validate_checks_only_the_models_nodes_use(tmp_path, capsys):
    # `other` names a script that does not exist, but no node uses it
    config = project(tmp_path, SPEC.replace("other: {model: fake/script.yaml", "other: {model: fake/absent.yaml"))
    validate_command(config, [])
    assert capsys.readouterr().out.startswith("ok: ")
    with pytest.raises(ModelNotFound) as info:
        validate_command(config, ["nodes.count.model=other"])
    assert info.value.key == "models.other.model" and info.value.file == str(config)


def test_validate_reads_the_data_and_locates_a_row_without_a_field(tmp_path):
    config = project(tmp_path, val=[VAL[0], {"id": "e2", "question": "5 pears?"}])
    with pytest.raises(DataError) as info:
        validate_command(config, [])
    e = info.value
    assert Path(e.file).name == "val.jsonl" and e.line == 2 and e.key == "input.answer"


# ---------------------------------------------------------------- eval


def test_eval_prints_the_json_result_and_writes_the_out_rows(tmp_path, capsys):
    config = project(tmp_path)
    out = tmp_path / "results" / "rows.jsonl"
    run_eval(config, out=out)
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert {k: result[k] for k in ("name", "split", "n", "completed", "errors", "score")} == {
        "name": "tiny", "split": "val", "n": 4, "completed": 4, "errors": 0, "score": 0.5}
    assert result["usage"]["task"]["calls"] == 4
    rows = [json.loads(line) for line in out.read_text(encoding="utf-8").splitlines()]
    assert rows == [
        {"id": "e1", "prediction": "3", "target": "3", "score": 1.0, "error": None},
        {"id": "e2", "prediction": "5", "target": "5", "score": 1.0, "error": None},
        {"id": "e3", "prediction": "0", "target": "2", "score": 0.0, "error": None},
        {"id": "e4", "prediction": "3", "target": "4", "score": 0.0, "error": None},
    ]


def test_eval_limit_split_and_overrides(tmp_path, capsys):
    config = project(tmp_path)
    out = tmp_path / "rows.jsonl"
    run_eval(config, split="train", limit=1, out=out)
    result = json.loads(capsys.readouterr().out)
    assert (result["split"], result["n"], result["score"]) == ("train", 1, 1.0)
    assert [json.loads(x)["id"] for x in out.read_text().splitlines()] == ["e1"]
    # an override of a param reaches the model: the script answers 2 to a careful instruction
    run_eval(config, out=out, overrides=["params.instruction.value=Count carefully."])
    assert json.loads(capsys.readouterr().out)["score"] == 0.25
    assert [json.loads(x)["prediction"] for x in out.read_text().splitlines()] == ["2", "2", "2", "2"]


def test_eval_with_a_prompts_file(tmp_path, capsys):
    config = project(tmp_path)
    prompts = write(tmp_path / "prompts.yaml", "params:\n  instruction: Count carefully.\n")
    run_eval(config, prompts=prompts)
    assert json.loads(capsys.readouterr().out)["score"] == 0.25


def test_eval_refuses_an_unknown_split_before_any_call(tmp_path, capsys):
    config = project(tmp_path)
    with pytest.raises(UsageError) as info:
        run_eval(config, split="dev", out=tmp_path / "rows.jsonl")
    assert info.value.key == "--split"
    assert not (tmp_path / "rows.jsonl").exists()
    assert capsys.readouterr().out == ""


def test_eval_below_fail_under_exits_1_after_writing_the_rows(tmp_path, capsys):
    config = project(tmp_path)
    out = tmp_path / "rows.jsonl"
    with pytest.raises(typer.Exit) as info:
        run_eval(config, fail_under=0.6, out=out)
    assert info.value.exit_code == EXIT_BELOW_THRESHOLD
    assert len(out.read_text().splitlines()) == 4
    captured = capsys.readouterr()
    assert json.loads(captured.out)["score"] == 0.5
    assert "below --fail-under 0.6" in captured.err
    run_eval(config, fail_under=0.5)  # at the threshold: passes


def test_eval_with_too_many_model_errors_exits_3_and_records_them(tmp_path, capsys):
    val = VAL[:2] + [{"id": "e3", "question": "boom", "answer": "1"}]  # 1 of 3 fails: above 0.3
    config = project(tmp_path, val=val)
    out = tmp_path / "rows.jsonl"
    with pytest.raises(typer.Exit) as info:
        run_eval(config, out=out)
    assert info.value.exit_code == EXIT_MODEL_ERRORS
    result = json.loads(capsys.readouterr().out)
    assert (result["n"], result["completed"], result["errors"], result["score"]) == (3, 2, 1, 1.0)
    rows = {r["id"]: r for r in map(json.loads, out.read_text().splitlines())}
    assert rows["e3"]["score"] is None and rows["e3"]["error"]  # not scored as wrong
    assert rows["e1"]["error"] is None
    run_eval(config, overrides=["train.max_error_rate=0.5"])  # tolerated: no exit


def test_eval_table_output_on_stdout(tmp_path, capsys):
    config = project(tmp_path)
    run_eval(config, json_out=False)
    out = capsys.readouterr().out
    assert out.splitlines()[0].startswith("tiny [val]: score 0.5000 on 4/4 examples (0 errors) in ")
    assert "task" in out and "completion tok" in out


# ---------------------------------------------------------------- export-prompts


BEST = "Count carefully.\nEnd with `Answer: N`."


def make_run(tmp_path: Path) -> tuple[Path, RunDir]:
    config = project(tmp_path / "project")
    loaded = load_spec(config)
    run = RunDir.create(tmp_path / "runs", "tiny", config_path=config,
                        resolved=loaded.spec.model_dump(by_alias=True, mode="json"))
    run.write_prompts({"instruction": BEST, "style": "Be brief."})
    run.write_summary({"schema_version": 1, "name": "tiny", "run_dir": str(run.path), "status": "completed",
                       "initial": {"val": 0.5, "test": None}, "best": {"step": 2, "val": 0.75, "test": None},
                       "config_path": str(config.resolve())})
    return config, run


def test_export_to_stdout_in_each_format(tmp_path, capsys):
    _, run = make_run(tmp_path)
    export_command(run.path, "yaml", None)
    data = yaml.safe_load(capsys.readouterr().out)
    assert data["params"] == {"instruction": BEST, "style": "Be brief."}
    assert data["nodes"]["count"] == {"system": f"{BEST} Be brief.", "user": "{{ input.question }}"}

    export_command(run.path, "json", None)
    assert json.loads(capsys.readouterr().out) == data

    export_command(run.path, "md", None)
    md = capsys.readouterr().out
    assert md.startswith(f"# Prompts of run `{run.path.name}`") and "best step: 2 (val 0.7500)" in md

    export_command(run.path, "config", None)
    baked = capsys.readouterr().out
    assert baked.startswith("# Exported by `autodiff export-prompts --format config`")
    assert yaml.safe_load(baked)["params"]["instruction"]["value"] == BEST


@pytest.mark.parametrize("fmt", ["yaml", "json", "md", "config"])
def test_export_to_a_file_writes_only_the_file(tmp_path, capsys, fmt):
    _, run = make_run(tmp_path)
    export_command(run.path, fmt, None)
    expected = capsys.readouterr().out
    target = tmp_path / "out" / f"best.{fmt}"
    target.parent.mkdir()
    export_command(run.path, fmt, target)
    captured = capsys.readouterr()
    assert captured.out == ""
    assert f"wrote {target}" in captured.err
    assert target.read_text(encoding="utf-8") == expected


def test_exported_config_evaluates_as_the_runs_best_prompts(tmp_path, capsys):
    config, run = make_run(tmp_path)
    baked = config.parent / "baked.yaml"
    export_command(run.path, "config", baked)
    capsys.readouterr()
    run_eval(baked)
    assert json.loads(capsys.readouterr().out)["score"] == 0.25  # the careful instruction's score


def test_export_refuses_an_unknown_format_before_reading_the_run(tmp_path, capsys):
    with pytest.raises(UsageError) as info:
        export_command(tmp_path / "no-such-run", "toml", tmp_path / "x.toml")
    assert info.value.key == "--format" and "'toml'" in info.value.got
    assert not (tmp_path / "x.toml").exists()


def test_export_of_a_missing_run_is_a_clean_error(tmp_path):
    with pytest.raises(AutodiffError):
        export_command(tmp_path / "no-such-run", "yaml", None)
