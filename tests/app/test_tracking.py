"""app/tracking.py: `train --mlflow URI` against a real MLflow tracking store (a sqlite database made here),
read back with MlflowClient. CI installs the `mlflow` extra, so nothing here may be skipped: mlflow is
imported at the top, with no importorskip, so that without the extra this module fails."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import yaml
from mlflow import MlflowClient
from typer.testing import CliRunner

from autodiff_cli.app.cli import app
from autodiff_cli.app.tracking import (
    NOT_LOGGED,
    TRACKING_FILE,
    flatten_params,
    normalize_uri,
)
from autodiff_cli.llm.fake import reset_fake_state
from tests.conftest import write
from tests.specs import TOY_SCRIPT, TOY_SPEC

FIX = "Count the things. ALWAYS ADD the counts."


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> str:
    """One sqlite store for the module (MLflow creates its tables once: about 20 s on CI's machine)."""
    return f"sqlite:///{tmp_path_factory.mktemp('mlflow') / 'mlflow.db'}"


@pytest.fixture
def workdir(tmp_path, monkeypatch) -> Path:
    """An empty current folder: MLflow must write nothing there (no ./mlruns, no ./mlflow.db)."""
    here = tmp_path / "cwd"
    here.mkdir()
    monkeypatch.chdir(here)
    monkeypatch.delenv("AUTODIFF_MLFLOW_URI", raising=False)
    return here


def project(root: Path, steps: int = 2) -> Path:
    write(root / "script.yaml", TOY_SCRIPT % {"new": FIX})
    for name, ns in (("train", [1, 2, 3, 1, 4, 5, 1, 2]), ("val", [1, 2, 3, 4]), ("test", [1, 6, 7])):
        rows = [{"id": f"{name}{i}", "question": f"How many? n={n}", "answer": str(n)} for i, n in enumerate(ns)]
        (root / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return write(root / "spec.yaml", TOY_SPEC.replace("train: {max_steps: 2,", f"train: {{max_steps: {steps},"))


def cli(*args):
    reset_fake_state()
    return CliRunner().invoke(app, [*map(str, args)])


def run_dir_of(result) -> Path:
    return Path(result.stdout.strip().splitlines()[-1])


def mlflow_run_id(run: Path) -> str:
    return json.loads((run / TRACKING_FILE).read_text())["run_id"]


def history(client: MlflowClient, run_id: str, key: str) -> list[tuple[int, float]]:
    return sorted((m.step, m.value) for m in client.get_metric_history(run_id, key))


def rows_of(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line.strip()]


def test_a_tracked_run_logs_params_metrics_artifacts_and_registers_its_best_prompt(tmp_path, workdir, store, monkeypatch):
    monkeypatch.setenv("TOY_API_KEY", "sk-proj-abcdefghijklmnop1234567890")  # a key that must never reach MLflow
    spec = project(tmp_path)
    result = cli("train", spec, "--runs-dir", tmp_path / "runs", "--mlflow", store,
                 "--set", "models.optimizer.api_key_env=TOY_API_KEY")
    assert result.exit_code == 0, result.output
    assert "warning" not in result.stderr, result.stderr
    run = run_dir_of(result)
    summary = json.loads((run / "summary.json").read_text())
    client = MlflowClient(tracking_uri=store, registry_uri=store)
    logged = client.get_run(mlflow_run_id(run))
    run_id = logged.info.run_id
    assert logged.info.status == "FINISHED" and logged.info.run_name == run.name
    assert client.get_experiment(logged.info.experiment_id).name == "toy"

    # params: the resolved spec, flattened; the key's variable by NAME only
    params = logged.data.params
    assert params["train.max_steps"] == "2" and params["models.task.model"] == "fake/script.yaml"
    assert params["models.optimizer.api_key_env"] == "TOY_API_KEY"
    assert params["params.instruction.value"] == "Count the things."
    assert not any("sk-proj" in v for v in params.values())
    tags = logged.data.tags
    assert tags["autodiff.status"] == "completed" and tags["autodiff.run_dir"] == str(run)
    assert tags["autodiff.optimizer"] == "gdpo" and tags["autodiff.mode"] == "autodiff"

    # metrics: each step's, equal to metrics.jsonl; the initial score at step 0
    rows = rows_of(run)
    assert [r["step"] for r in rows] == [1, 2]
    initial = summary["initial"]["val"]
    assert history(client, run_id, "best_val") == [(0, initial)] + [(r["step"], r["best_val"]) for r in rows]
    assert history(client, run_id, "val_score") == [(r["step"], r["val_score"]) for r in rows if r["val_score"] is not None]
    assert history(client, run_id, "batch_score") == [(r["step"], r["batch_score"]) for r in rows]
    assert history(client, run_id, "proposals/accepted") == [
        (r["step"], sum(p["accepted"] for p in r["proposals"])) for r in rows]
    for role in ("task", "backward", "optimizer"):
        assert history(client, run_id, f"calls/{role}") == [(r["step"], r["usage"][role]["calls"]) for r in rows]
        assert history(client, run_id, f"tokens/{role}") == [
            (r["step"], r["usage"][role]["prompt_tokens"] + r["usage"][role]["completion_tokens"]) for r in rows]
        assert history(client, run_id, f"cost_usd/{role}") == [(r["step"], r["usage"][role]["cost_usd"]) for r in rows]
    assert history(client, run_id, "calls/backward")[0][1] > 0  # the step that backpropagated
    end = logged.data.metrics
    assert end["initial_val"] == initial and end["best_val"] == summary["best"]["val"] == 1.0
    assert end["initial_test"] == summary["initial"]["test"] and end["best_test"] == summary["best"]["test"]
    assert end["run/calls"] == sum(u["calls"] for u in summary["usage"].values())

    # artifacts
    top = {a.path: a.is_dir for a in client.list_artifacts(run_id)}
    for name in ("prompts.yaml", "report.md", "summary.json", "metrics.jsonl", "score.png"):
        assert top.get(name) is False, (name, sorted(top))
    assert top.get("traces") is True and top.get("prompts") is True
    assert sorted(a.path for a in client.list_artifacts(run_id, "traces")) == ["traces/step-0001.jsonl",
                                                                                 "traces/step-0002.jsonl"]
    assert [a.path for a in client.list_artifacts(run_id, "prompts")] == ["prompts/step-0001.yaml"]  # the accepted step
    local = Path(client.download_artifacts(run_id, "prompts.yaml", str(tmp_path / "down")))
    assert local.read_text() == (run / "prompts.yaml").read_text()

    # the prompt registry: the trained param's best value, linked to the run; the fixed param is not trained
    best = yaml.safe_load((run / "prompts.yaml").read_text())["instruction"]
    assert best == FIX
    prompt = client.load_prompt("toy.instruction")
    assert prompt.template == FIX and prompt.tags.get("autodiff.mlflow_run_id") == run_id
    assert {"name": "toy.instruction", "version": str(prompt.version)} in json.loads(tags["mlflow.linkedPrompts"])
    assert "toy.answer_format" not in {p.name for p in client.search_prompts()}
    assert sorted(workdir.iterdir()) == []  # nothing in the current folder (MLflow's default ./mlruns, ./mlflow.db)


def test_a_resumed_run_continues_its_mlflow_run(tmp_path, workdir, store, monkeypatch):
    from autodiff_cli.train import trainer as trainer_module

    spec = project(tmp_path)  # two steps (two batches of the one epoch)
    real_step = trainer_module.Trainer.step

    async def interrupted(self, state, step):
        if step == 2:
            raise KeyboardInterrupt
        return await real_step(self, state, step)

    monkeypatch.setattr(trainer_module.Trainer, "step", interrupted)
    first = cli("train", spec, "--runs-dir", tmp_path / "runs", "--mlflow", store)
    assert first.exit_code == 130, first.output
    run = run_dir_of(first)
    run_id = mlflow_run_id(run)
    client = MlflowClient(tracking_uri=store, registry_uri=store)
    cut = client.get_run(run_id)
    assert cut.info.status == "KILLED" and cut.data.tags["autodiff.status"] == "interrupted"
    assert [s for s, _ in history(client, run_id, "best_val")] == [0, 1]

    monkeypatch.setattr(trainer_module.Trainer, "step", real_step)
    again = cli("train", spec, "--runs-dir", tmp_path / "runs", "--resume", run, "--mlflow", store)
    assert again.exit_code == 0, again.output
    assert "warning" not in again.stderr, again.stderr
    assert mlflow_run_id(run) == run_id  # the same MLflow run, and no other for this run directory
    same_dir = client.search_runs([cut.info.experiment_id], filter_string=f"tags.`autodiff.run_dir` = '{run}'")
    assert [r.info.run_id for r in same_dir] == [run_id]
    done = client.get_run(run_id)
    assert done.info.status == "FINISHED" and done.data.tags["autodiff.status"] == "completed"
    rows = rows_of(run)
    assert [r["step"] for r in rows] == [1, 2]
    initial = json.loads((run / "summary.json").read_text())["initial"]["val"]
    assert history(client, run_id, "best_val") == [(0, initial)] + [(r["step"], r["best_val"]) for r in rows]
    assert [s for s, _ in history(client, run_id, "calls/task")] == [1, 2]  # each step once
    assert client.load_prompt("toy.instruction").template == FIX


def test_a_resume_without_mlflow_says_the_run_was_tracked(tmp_path, workdir, store, monkeypatch):
    from autodiff_cli.train import trainer as trainer_module

    spec = project(tmp_path, steps=2)
    real_step = trainer_module.Trainer.step

    async def interrupted(self, state, step):
        if step == 2:
            raise KeyboardInterrupt
        return await real_step(self, state, step)

    monkeypatch.setattr(trainer_module.Trainer, "step", interrupted)
    first = cli("train", spec, "--runs-dir", tmp_path / "runs", "--mlflow", store)
    assert first.exit_code == 130, first.output
    run = run_dir_of(first)
    monkeypatch.setattr(trainer_module.Trainer, "step", real_step)
    again = cli("train", spec, "--runs-dir", tmp_path / "runs", "--resume", run)
    assert again.exit_code == 0, again.output
    assert f"this run was tracked in MLflow ({store}, run {mlflow_run_id(run)})" in again.stderr
    assert "pass --mlflow URI" in again.stderr


def test_a_run_tracked_from_its_resume_on_gets_its_earlier_steps(tmp_path, workdir, store, monkeypatch):
    """What MLflow lacks is logged from metrics.jsonl when the run is opened (also what covers a process that
    died between writing a step and logging it)."""
    from autodiff_cli.train import trainer as trainer_module

    spec = project(tmp_path)
    real_step = trainer_module.Trainer.step

    async def interrupted(self, state, step):
        if step == 2:
            raise KeyboardInterrupt
        return await real_step(self, state, step)

    monkeypatch.setattr(trainer_module.Trainer, "step", interrupted)
    first = cli("train", spec, "--runs-dir", tmp_path / "runs")  # not tracked
    assert first.exit_code == 130, first.output
    run = run_dir_of(first)
    assert not (run / TRACKING_FILE).exists()
    monkeypatch.setattr(trainer_module.Trainer, "step", real_step)
    again = cli("train", spec, "--runs-dir", tmp_path / "runs", "--resume", run, "--mlflow", store)
    assert again.exit_code == 0, again.output
    client = MlflowClient(tracking_uri=store)
    run_id = mlflow_run_id(run)
    rows = rows_of(run)
    initial = json.loads((run / "summary.json").read_text())["initial"]["val"]
    assert history(client, run_id, "best_val") == [(0, initial)] + [(r["step"], r["best_val"]) for r in rows]
    assert client.get_run(run_id).data.params["train.max_steps"] == "2"


def test_a_tracking_failure_is_a_warning_and_the_run_goes_on(tmp_path, workdir, monkeypatch):
    (tmp_path / "a-file").write_text("not a folder")
    monkeypatch.setenv("AUTODIFF_MLFLOW_URI", f"sqlite:///{tmp_path / 'a-file' / 'mlflow.db'}")  # the env var
    result = cli("train", project(tmp_path), "--runs-dir", tmp_path / "runs")
    assert result.exit_code == 0, result.output
    assert "warning: MLflow: could not open a run in sqlite:///" in result.stderr
    assert "this run is not tracked" in result.stderr and "Traceback" not in result.output
    run = run_dir_of(result)
    assert json.loads((run / "summary.json").read_text())["status"] == "completed"
    assert not (run / TRACKING_FILE).exists()


def test_mlflow_without_the_extra_is_a_usage_error(tmp_path, workdir, monkeypatch):
    for name in [m for m in sys.modules if m == "mlflow" or m.startswith("mlflow.")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "mlflow", None)  # `import mlflow` now fails as if it were not installed
    result = cli("train", project(tmp_path), "--runs-dir", tmp_path / "runs", "--mlflow", "sqlite:///x.db")
    assert result.exit_code == 2, result.output
    assert "--mlflow needs the optional MLflow extra" in result.stderr
    assert 'pip install "autodiff-cli[mlflow]"' in result.stderr
    assert "Traceback" not in result.output
    assert not (tmp_path / "runs").exists()  # refused before the run directory was made


def test_the_params_are_the_flattened_spec_without_secrets():
    resolved = {
        "train": {"max_steps": 2, "budget": {"max_calls": None}, "demos": "off"},
        "models": {"task": {"model": "openai/gpt-4o-mini", "api_key_env": "OPENAI_API_KEY", "stop": ["\n", "END"],
                            "extra": {"headers": {"X-Team": "search"}, "reasoning": {"effort": "low"}},
                            "api_base": [{"url": "http://127.0.0.1:8000/v1", "rpm": 10}]}},
        "params": {"p": {"value": "use sk-abcdefghijklmnop12345678 here"}, "q": {"value": "x" * 7000}},
        "odd key!": {"client_secret": "hidden", "ok": True},
        "skip": [],
    }
    params = flatten_params(resolved)
    assert params["train.max_steps"] == "2" and params["train.budget.max_calls"] == "null"
    assert params["models.task.api_key_env"] == "OPENAI_API_KEY"  # the variable's name, never its value
    assert params["models.task.stop"] == '["\\n", "END"]'
    assert params["models.task.extra.headers.X-Team"] == NOT_LOGGED  # no header value, whatever its name
    assert params["models.task.extra.reasoning.effort"] == "low"
    assert params["models.task.api_base.0.url"] == "http://127.0.0.1:8000/v1"
    assert params["params.p.value"] == NOT_LOGGED  # a key pasted into a prompt
    assert len(params["params.q.value"]) <= 6000 and params["params.q.value"].endswith("(truncated)")
    assert params["odd key_.client_secret"] == NOT_LOGGED and params["odd key_.ok"] == "true"
    assert params["skip"] == "[]"


def test_a_local_store_is_named_by_its_absolute_path(workdir):
    """So tracking.json names the same store whatever folder a resume runs in."""
    assert normalize_uri("sqlite:///runs/mlflow.db") == f"sqlite:///{workdir / 'runs' / 'mlflow.db'}"
    assert normalize_uri("sqlite:////srv/mlflow.db") == "sqlite:////srv/mlflow.db"
    assert normalize_uri("mlruns") == str(workdir / "mlruns")
    for uri in ("http://127.0.0.1:5000", "file:./mlruns", "databricks", "postgresql://db/mlflow"):
        assert normalize_uri(uri) == uri
