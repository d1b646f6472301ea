"""What a person sees: a progress bar on a terminal (tmux pane), plain timestamped lines in CI."""
from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time

import pytest
from typer.testing import CliRunner

from autodiff_cli.app.cli import app
from tests.conftest import write

SPEC = """
name: slow
models:
  task: {model: fake/script.yaml}
data:
  val: val.jsonl
params:
  instruction: {value: "Count."}
nodes:
  count: {kind: llm, system: "{{ instruction }}", user: "{{ input.question }}"}
  parse: {kind: function, fn: last_integer, args: {text: count}}
output: parse
metric: {fn: exact_match, args: {pred: parse, target: input.answer}}
"""


def project(tmp_path, latency=0.0, n=6):
    write(tmp_path / "script.yaml", f"default: 'Answer: 1'\nlatency: {latency}\n")
    (tmp_path / "val.jsonl").write_text("".join(
        json.dumps({"id": f"e{i}", "question": f"q{i}", "answer": "1"}) + "\n" for i in range(n)))
    return write(tmp_path / "spec.yaml", SPEC)


def test_quiet_prints_results_only(tmp_path):
    spec = project(tmp_path)
    result = CliRunner().invoke(app, ["eval", str(spec), "--quiet"])
    assert result.exit_code == 0 and result.stderr == ""
    assert "score 1.0000" in result.stdout


def test_without_a_terminal_progress_is_plain_timestamped_lines(tmp_path):
    spec = project(tmp_path)
    proc = subprocess.run([sys.executable, "-m", "autodiff_cli.app.cli", "eval", str(spec)], capture_output=True, text=True)
    assert proc.returncode == 0
    assert re.search(r"^\[\d\d:\d\d:\d\d\] eval slow \[val\]: 6/6 done", proc.stderr, re.MULTILINE)
    assert "\x1b[" not in proc.stderr + proc.stdout and "━" not in proc.stderr


@pytest.mark.skipif(shutil.which("tmux") is None, reason="tmux is not installed")
def test_on_a_terminal_a_progress_bar_is_on_screen(tmp_path):
    spec = project(tmp_path, latency=0.5, n=12)
    session = f"autodiff-test-{os.getpid()}"
    cmd = f"{sys.executable} -m autodiff_cli.app.cli eval {spec} --concurrency 1; sleep 5"
    subprocess.run(["tmux", "new-session", "-d", "-s", session, "-x", "120", "-y", "20", cmd], check=True,
                   env={**os.environ, "TERM": "xterm-256color"})
    try:
        screen = ""
        deadline = time.time() + 20
        while time.time() < deadline and "━" not in screen:
            time.sleep(0.3)
            screen = subprocess.run(["tmux", "capture-pane", "-p", "-t", session], capture_output=True, text=True).stdout
        assert "━" in screen and "eval slow [val]" in screen and "calls $" in screen  # bar, label, spend
        assert re.search(r"\d+/12", screen)
    finally:
        subprocess.run(["tmux", "kill-session", "-t", session], capture_output=True)


@pytest.mark.skipif(shutil.which("tmux") is None, reason="tmux is not installed")
def test_train_shows_a_live_status_line_on_a_terminal(tmp_path):
    from tests.train.test_train import setup

    setup(tmp_path, new_value="Count the things slowly.")
    (tmp_path / "script.yaml").write_text((tmp_path / "script.yaml").read_text() + "latency: 0.4\n")
    session = f"autodiff-train-{os.getpid()}"
    cmd = (f"{sys.executable} -m autodiff_cli.app.cli train {tmp_path / 'spec.yaml'} --runs-dir {tmp_path / 'runs'}"
           f" --concurrency 1; sleep 5")
    subprocess.run(["tmux", "new-session", "-d", "-s", session, "-x", "160", "-y", "30", cmd], check=True,
                   env={**os.environ, "TERM": "xterm-256color"})
    try:
        screen = ""
        deadline = time.time() + 30
        while time.time() < deadline and "train toy · step" not in screen:
            time.sleep(0.3)
            screen = subprocess.run(["tmux", "capture-pane", "-p", "-t", session], capture_output=True, text=True).stdout
        assert "train toy · step" in screen and "best val" in screen and "calls" in screen
    finally:
        subprocess.run(["tmux", "kill-session", "-t", session], capture_output=True)
