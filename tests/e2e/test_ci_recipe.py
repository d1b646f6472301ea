"""The command sequence of docs/ci.md: train, bake, validate, eval --fail-under; warm cache = no calls."""
from __future__ import annotations

import json
import subprocess
import sys

from tests.train.test_train import setup


def cli(*args, env=None, cwd=None):
    return subprocess.run([sys.executable, "-m", "autodiff_cli.app.cli", *map(str, args)],
                          capture_output=True, text=True, env=env, cwd=cwd)


def test_ci_recipe_gates_on_the_baked_config_and_reuses_the_cache(tmp_path):
    import os

    setup(tmp_path)
    env = {**os.environ, "AUTODIFF_CACHE": str(tmp_path / "ci-cache")}
    trained = cli("train", tmp_path / "spec.yaml", "--runs-dir", tmp_path / "runs", env=env)
    assert trained.returncode == 0, trained.stderr
    run = trained.stdout.strip().splitlines()[-1]
    baked = tmp_path / "spec.best.yaml"
    assert cli("export-prompts", run, "--format", "config", "-o", baked, env=env).returncode == 0
    assert cli("validate", baked, env=env).returncode == 0

    cold = cli("eval", baked, "--split", "test", "--fail-under", "0.9", "--json", "--out", tmp_path / "rows.jsonl", env=env)
    assert cold.returncode == 0, cold.stderr
    assert json.loads(cold.stdout.strip().splitlines()[-1])["score"] == 1.0
    warm = json.loads(cli("eval", baked, "--split", "test", "--json", env=env).stdout.strip().splitlines()[-1])
    assert warm["usage"]["task"]["calls"] == 0 and warm["usage"]["task"]["cached_calls"] == warm["n"]

    # the initial prompts fail the same gate with exit 1, not 2 or 3
    gate = cli("eval", tmp_path / "spec.yaml", "--split", "test", "--fail-under", "0.9", env=env)
    assert gate.returncode == 1 and "below --fail-under" in gate.stderr
