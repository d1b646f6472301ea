"""`autodiff train`'s run directory as the user sees it: written byte for byte whatever the API key
is, never left saying `running` after its process ended, and a second writer refused."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from autodiff_cli.app.cli import app
from autodiff_cli.llm.fake import reset_fake_state
from tests.conftest import write
from tests.specs import TOY_SCRIPT, TOY_SPEC

ROOT = Path(__file__).resolve().parents[2]

KEY_ENV = "AUTODIFF_TEST_DUMMY_KEY"
SPEC_WITH_KEY = TOY_SPEC.replace("task: {model: fake/script.yaml}",
                                 f"task: {{model: fake/script.yaml, api_key_env: {KEY_ENV}, max_tokens: 64}}")


def rows(prefix, ns):
    return [{"id": f"{prefix}{i}", "question": f"How many? n={n}", "answer": str(n)} for i, n in enumerate(ns)]


def project(folder: Path, spec: str = SPEC_WITH_KEY, latency: float = 0.0,
            new_value: str = "Count the things exactly. ALWAYS ADD the counts, next to nothing else.") -> Path:
    script = TOY_SCRIPT % {"new": new_value} + f"latency: {latency}\n"
    write(folder / "script.yaml", script)
    for name, ns in (("train", [1, 2, 3, 1, 4, 5, 1, 2]), ("val", [1, 2, 3, 4]), ("test", [1, 6, 7])):
        (folder / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows(name, ns)))
    write(folder / "spec.yaml", spec)
    return folder


def train(folder: Path, *args) -> tuple:
    reset_fake_state()
    result = CliRunner().invoke(app, ["train", str(folder / "spec.yaml"), "--runs-dir", str(folder / "runs"),
                                      *map(str, args)])
    out = result.stdout.strip()
    return result, (Path(out.splitlines()[-1]) if out else None)


def without_volatile(data: dict) -> dict:
    """summary/checkpoint/metrics row minus what legitimately differs between two runs: time, place and
    usage (the second run is served from the call cache)."""
    data = json.loads(json.dumps(data))
    for key in ("wall_seconds", "run_dir", "config_path", "usage"):
        data.pop(key, None)
    if isinstance(data.get("state"), dict):
        data["state"].pop("wall_seconds", None)
        data["state"].pop("usage", None)
    return data


@pytest.mark.parametrize("dummy", ["x", "null", "task", "EMPTY", "none", "sk-no-key-required"])
def test_a_dummy_api_key_changes_no_byte_of_the_run_directory(tmp_path, monkeypatch, dummy):
    """Local servers and vLLM take any key. With the key `x` an old scrubber wrote `e***actly` into the
    trained prompt and `ma***_tokens` into resolved.yaml; with `null` summary.json was invalid JSON; with
    `task` config.yaml no longer parsed. The run must be what a run with an unrelated key writes."""
    runs = {}
    for name, key in (("reference", "an-unrelated-key-value-0123456789"), ("dummy", dummy)):
        monkeypatch.setenv(KEY_ENV, key)
        folder = project(tmp_path / name)
        result, run = train(folder)
        assert result.exit_code == 0, result.output
        runs[name] = run
    ref, got = runs["reference"], runs["dummy"]
    for file in ("config.yaml", "resolved.yaml", "prompts.yaml", "metrics.jsonl"):
        if file == "metrics.jsonl":
            strip = lambda t: [without_volatile(json.loads(x)) for x in t.split("\n") if x]
            assert strip((got / file).read_text()) == strip((ref / file).read_text())
        else:
            assert (got / file).read_bytes() == (ref / file).read_bytes(), file
    for file in ("summary.json", "checkpoint.json"):
        assert without_volatile(json.loads((got / file).read_text())) == \
            without_volatile(json.loads((ref / file).read_text())), file
    assert "exactly" in yaml.safe_load((got / "prompts.yaml").read_text())["instruction"]
    assert yaml.safe_load((got / "resolved.yaml").read_text())["models"]["task"]["max_tokens"] == 64
    # and the run directory is usable: export as a config, resume
    exported = CliRunner().invoke(app, ["export-prompts", str(got), "--format", "config"])
    assert exported.exit_code == 0, exported.output
    assert "exactly" in exported.stdout
    result, again = train(tmp_path / "dummy", "--resume", got)
    assert result.exit_code == 0 and again == got, result.output
    shown = CliRunner().invoke(app, ["runs", "show", str(got), "--json"])
    assert shown.exit_code == 0 and json.loads(shown.stdout)["status"] == "completed"


def cli_cmd(*args) -> list[str]:
    return [sys.executable, "-m", "autodiff_cli.app.cli", *map(str, args)]


def runs_list(runs_dir: Path) -> list[dict]:
    proc = subprocess.run(cli_cmd("runs", "list", "--runs-dir", runs_dir, "--json"), capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)


def test_a_killed_run_says_killed_with_how_to_resume_and_a_live_one_says_running(tmp_path):
    folder = project(tmp_path / "p", spec=TOY_SPEC.replace("max_steps: 2", "max_steps: 4"), latency=0.3)
    runs_dir = folder / "runs"
    # the run sleeps before its first checkpoint lands, so it is alive however slow the machine is
    pausing = [sys.executable, str(ROOT / "tests" / "tools" / "pausing_cli.py")]
    proc = subprocess.Popen([*pausing, "train", str(folder / "spec.yaml"), "--runs-dir", str(runs_dir)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "AUTODIFF_TEST_PAUSE_BEFORE_REPLACE": "checkpoint.json:600"})
    try:
        for line in proc.stderr:  # wait until the run has started (its summary says running) and is paused
            if "pause before replace checkpoint.json" in line:
                break
        else:
            pytest.fail("the run never reached its first checkpoint")
        [row] = runs_list(runs_dir)
        assert row["status"] == "running", row
        second = subprocess.run(cli_cmd("train", folder / "spec.yaml", "--resume", row["run_dir"]),
                                capture_output=True, text=True, timeout=120)
        assert second.returncode == 2 and f"in use by process {proc.pid}" in second.stderr, second.stderr
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    run_dir = Path(row["run_dir"])
    assert json.loads((run_dir / "summary.json").read_text())["status"] == "running"  # nothing could write its end
    [row] = runs_list(runs_dir)
    assert row["status"] == "killed"
    assert f"--resume {run_dir}" in row["reason"] and str((folder / "spec.yaml").resolve()) in row["reason"]
    shown = subprocess.run(cli_cmd("runs", "show", run_dir), capture_output=True, text=True, timeout=120)
    assert "status:    killed" in shown.stdout and "resume with" in shown.stdout
    resumed = subprocess.run(cli_cmd("train", folder / "spec.yaml", "--resume", run_dir), capture_output=True,
                             text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr
    [row] = runs_list(runs_dir)
    assert row["status"] == "completed"


def test_an_unexpected_error_ends_the_run_failed_not_running(tmp_path, monkeypatch):
    """A bug (or anything not foreseen) must still write how the run ended."""
    from autodiff_cli.train import trainer as trainer_module

    async def broken_step(self, state, step):
        raise RuntimeError("something nobody foresaw")

    monkeypatch.setattr(trainer_module.Trainer, "step", broken_step)
    folder = project(tmp_path / "p", spec=TOY_SPEC)
    result, _ = train(folder)
    assert result.exit_code != 0
    [run] = list((folder / "runs").iterdir())
    summary = json.loads((run / "summary.json").read_text())
    assert summary["status"] == "failed"
    assert "RuntimeError: something nobody foresaw" in summary["reason"]


def test_runs_list_without_a_runs_folder_says_there_are_none(tmp_path):
    result = CliRunner().invoke(app, ["runs", "list", "--runs-dir", str(tmp_path / "nothing")])
    assert result.exit_code == 0, result.output
    assert "no runs" in result.stdout
    as_json = CliRunner().invoke(app, ["runs", "list", "--runs-dir", str(tmp_path / "nothing"), "--json"])
    assert as_json.exit_code == 0 and json.loads(as_json.stdout) == []


def test_the_default_teacher_is_reported_when_the_text_optimizer_trains_demos():
    from types import SimpleNamespace as NS

    from autodiff_cli.app.train_run import role_models

    models = {"task": NS(model="fake/task.yaml")}
    spec = NS(models=models, params={"p": NS(kind="prompt"), "d": NS(kind="demos")},
              train=NS(teacher=None, demos="off"))
    node = NS(models=lambda: ["task"])

    def trainer(trainable):
        return NS(program=NS(all_nodes=lambda: [node], spec=spec), backward_model="task", optimizer_model="task",
                  optimizers={"text": NS(trainable=lambda: trainable)})

    assert role_models(spec, trainer(["p", "d"]))["teacher"] == "fake/task.yaml"  # e.g. train.optimizer: joint
    assert role_models(spec, trainer(["p"]))["teacher"] is None  # gdpo trains prompts only: no teacher
