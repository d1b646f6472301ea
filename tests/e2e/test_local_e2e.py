"""End to end through the CLI, litellm and the real embedded SmolLM2 model (no key, no network).

In CI (CI=true) these never skip: a missing llama.cpp runtime or model is a failure there.
"""
from __future__ import annotations

import importlib.util
import json
import os
from pathlib import Path

import pytest
from typer.testing import CliRunner

from autodiff_cli.app.cli import app

ROOT = Path(__file__).resolve().parents[2]
QUICKSTART = ROOT / "configs" / "quickstart.yaml"

pytestmark = [
    pytest.mark.local_model,
    pytest.mark.skipif(importlib.util.find_spec("llama_cpp") is None and os.environ.get("CI") != "true",
                       reason="llama-cpp-python is not installed (pip install -e '.[local]')"),
]


def last_json(output: str) -> dict:
    return json.loads([line for line in output.splitlines() if line.startswith("{")][-1])


def test_eval_quickstart_counts_calls_tokens_and_hits_the_cache_on_rerun():
    args = ["eval", str(QUICKSTART), "--limit", "3", "--json", "--set", "models.task.max_tokens=16"]
    first = CliRunner().invoke(app, args)
    assert first.exit_code == 0, first.output
    cold = last_json(first.stdout)
    assert cold["n"] == 3 and cold["completed"] == 3 and cold["errors"] == 0
    assert cold["usage"]["task"]["calls"] == 3
    assert cold["usage"]["task"]["prompt_tokens"] > 0 and cold["usage"]["task"]["completion_tokens"] > 0
    warm = last_json(CliRunner().invoke(app, args).stdout)
    assert warm["usage"]["task"]["calls"] == 0 and warm["usage"]["task"]["cached_calls"] == 3
    assert warm["score"] == cold["score"]


def test_train_quickstart_runs_every_role_and_writes_the_run(tmp_path):
    result = CliRunner().invoke(app, [
        "train", str(QUICKSTART), "--runs-dir", str(tmp_path), "--json",
        "--set", "data.generator.train=2", "--set", "data.generator.val=2", "--set", "data.generator.test=0",
        "--set", "train.max_steps=1", "--set", "train.batch_size=2", "--set", "train.max_proposals=1",
        "--set", "models.task.max_tokens=8", "--set", "models.backward.max_tokens=48",
        "--set", "models.optimizer.max_tokens=64",
    ])
    assert result.exit_code == 0, result.output
    run = Path(result.stdout.strip().splitlines()[-1])
    summary = json.loads((run / "summary.json").read_text())
    assert summary["status"] == "completed" and summary["steps"] == 1
    assert summary["usage"]["task"]["calls"] + summary["usage"]["task"]["cached_calls"] >= 4
    metrics = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    if not metrics[0]["skipped"]:  # SmolLM2 usually fails these, so the step runs backward and a proposal
        assert summary["usage"]["backward"]["calls"] >= 1 and summary["usage"]["optimizer"]["calls"] >= 1
    for name in ("config.yaml", "resolved.yaml", "prompts.yaml", "checkpoint.json", "traces/step-0001.jsonl"):
        assert (run / name).exists(), name
