"""`autodiff runs list`, `runs show` and `diff` on real run directories made by tiny fake-model runs.

`make_runs` is shared with test_report.py.
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from autodiff_cli.app import browse
from autodiff_cli.app.cli import app
from autodiff_cli.llm.fake import reset_fake_state
from tests.conftest import write
from tests.specs import TOY_SCRIPT, TOY_SPEC

SCRIPT = TOY_SCRIPT

SPEC = TOY_SPEC

ACCEPTED_VALUE = "Count all items. ALWAYS ADD the counts."
REJECTED_VALUE = "Count the things slowly."
ANSI = "\x1b["


def _rows(prefix, ns):
    return [{"id": f"{prefix}{i}", "question": f"How many? n={n}", "answer": str(n)} for i, n in enumerate(ns)]


def make_run(folder: Path, runs_dir: Path, new_value: str) -> Path:
    """A 2-step fake-model training run in `runs_dir` whose optimizer always proposes `new_value`."""
    reset_fake_state()
    write(folder / "script.yaml", SCRIPT % {"new": new_value})
    for name, ns in (("train", [1, 2, 3, 1, 4, 5, 1, 2]), ("val", [1, 2, 3, 4]), ("test", [1, 6, 7])):
        (folder / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in _rows(name, ns)))
    write(folder / "spec.yaml", SPEC)
    result = CliRunner().invoke(app, ["train", str(folder / "spec.yaml"), "--runs-dir", str(runs_dir)])
    assert result.exit_code == 0, result.output
    return Path(result.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """One runs folder with an improving run, a run whose proposals are all rejected, and clutter."""
    root = tmp_path_factory.mktemp("runs")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("AUTODIFF_CACHE", str(root / "cache"))
        mp.setenv("AUTODIFF_DATA", str(root / "data"))
        runs_dir = root / "runs"
        accepted = make_run(root / "a", runs_dir, ACCEPTED_VALUE)
        rejected = make_run(root / "b", runs_dir, REJECTED_VALUE)
    (runs_dir / "notes").mkdir()  # not a run directory
    (runs_dir / "notes" / "todo.txt").write_text("x")
    (runs_dir / "stray.txt").write_text("x")
    return {"dir": runs_dir, "accepted": accepted, "rejected": rejected}


def invoke(*args):
    return CliRunner().invoke(app, [str(a) for a in args])


def summary(run: Path) -> dict:
    return json.loads((run / "summary.json").read_text())


# ---------------------------------------------------------------- runs list


def test_runs_list_shows_each_run_with_status_and_scores(runs):
    result = invoke("runs", "list", "--runs-dir", runs["dir"])
    assert result.exit_code == 0, result.output
    assert ANSI not in result.output
    lines = result.stdout.splitlines()
    assert lines[0].split() == ["run", "date", "(UTC)", "status", "mode", "best", "val", "best", "test", "steps", "cost"]
    assert len(lines) == 3  # header + two runs; `notes` and `stray.txt` are skipped
    by_name = {line.split()[0]: line.split() for line in lines[1:]}
    acc = by_name[runs["accepted"].name]
    rej = by_name[runs["rejected"].name]
    # run, date, time, status, mode, best val, best test, steps, cost
    assert acc[3:] == ["completed", "autodiff", "1.000", "1.000", "2", "$0.0000"]
    assert rej[3:] == ["completed", "autodiff", "0.250", "0.333", "2", "$0.0000"]
    assert acc[1] == f"{runs['accepted'].name[4:8]}-{runs['accepted'].name[8:10]}-{runs['accepted'].name[10:12]}"


def test_runs_list_json_matches_summary(runs):
    result = invoke("runs", "list", "--runs-dir", runs["dir"], "--json")
    assert result.exit_code == 0, result.output
    rows = json.loads(result.stdout)
    assert {r["run"] for r in rows} == {runs["accepted"].name, runs["rejected"].name}
    for row in rows:
        s = summary(Path(row["run_dir"]))
        assert row["status"] == s["status"] and row["reason"] == s["reason"] and row["name"] == s["name"]
        assert row["best_val"] == s["best"]["val"] and row["best_test"] == s["best"]["test"]
        assert row["initial_val"] == s["initial"]["val"] and row["initial_test"] == s["initial"]["test"]
        assert row["best_step"] == s["best"]["step"] and row["steps"] == s["steps"]
        assert row["proposals"] == s["proposals"]
        assert row["cost_usd"] == pytest.approx(sum(u["cost_usd"] for u in s["usage"].values()))
        assert row["date"].endswith("Z")
    # newest first
    assert [r["date"] for r in rows] == sorted((r["date"] for r in rows), reverse=True)


def test_runs_list_of_missing_or_empty_folder(tmp_path):
    missing = invoke("runs", "list", "--runs-dir", tmp_path / "nope")  # CONTRACT: none yet is no error
    assert missing.exit_code == 0 and "no runs in" in missing.stdout and "no such folder yet" in missing.stdout
    (tmp_path / "empty").mkdir()
    empty = invoke("runs", "list", "--runs-dir", tmp_path / "empty", "--json")
    assert empty.exit_code == 0 and json.loads(empty.stdout) == []
    plain = invoke("runs", "list", "--runs-dir", tmp_path / "empty")
    assert plain.exit_code == 0 and plain.stdout.startswith("no runs in")
    a_file = tmp_path / "file"
    a_file.write_text("x")
    assert invoke("runs", "list", "--runs-dir", a_file).exit_code == 2


def test_a_run_with_a_broken_summary_is_listed_as_unreadable(tmp_path, runs):
    import shutil

    broken = tmp_path / "runs" / runs["accepted"].name
    shutil.copytree(runs["accepted"], broken)
    (broken / "summary.json").write_text("{not json")
    rows = json.loads(invoke("runs", "list", "--runs-dir", tmp_path / "runs", "--json").stdout)
    assert rows[0]["status"] == "unreadable" and "summary.json" in rows[0]["reason"]


# ---------------------------------------------------------------- runs show


def test_runs_show_lists_summary_steps_and_proposal_reasons(runs):
    result = invoke("runs", "show", runs["accepted"])
    assert result.exit_code == 0, result.output
    out = result.stdout
    assert ANSI not in out
    assert "status:    completed (ran 2 of 2 steps)" in out
    assert "task fake/script.yaml, backward fake/script.yaml, optimizer fake/script.yaml" in out
    assert "val:       initial 0.250 -> best 1.000 (step 1)" in out
    assert "test:      initial 0.333 -> best 1.000" in out
    assert "proposals: 1 tried, 1 passed the subset, 1 accepted" in out
    usage = summary(runs["accepted"])["usage"]
    task_line = next(line for line in out.splitlines() if line.strip().startswith("task "))
    assert task_line.split()[1:4] == [str(usage["task"]["calls"]), str(usage["task"]["cached_calls"]), "0"]
    assert "step 1 (epoch 0): batch 0.000; subset 0.000 on 2; val 1.000; best val 1.000" in out
    assert "#1 accepted [instruction] subset 1.000, val 1.000: beats the best validation score" in out
    assert "step 2 (epoch 0): batch 1.000; skipped: no failed example in the minibatch; best val 1.000" in out


def test_runs_show_gives_the_reason_of_every_rejection(runs):
    out = invoke("runs", "show", runs["rejected"]).stdout
    metrics = [json.loads(line) for line in (runs["rejected"] / "metrics.jsonl").read_text().splitlines()]
    for row in metrics:
        assert f"step {row['step']} (epoch 0)" in out
        for proposal in row["proposals"]:
            assert proposal["reason"] in out
    assert "#1 rejected [instruction] subset 0.000: subset score 0.000 does not beat 0.000" in out
    assert "#2 rejected no proposal: no usable proposal" in out
    assert "proposals: 2 tried, 0 passed the subset, 0 accepted" in out


def test_runs_show_json_and_errors(runs, tmp_path):
    data = json.loads(invoke("runs", "show", runs["accepted"], "--json").stdout)
    assert data["summary"] == summary(runs["accepted"])
    assert [s["step"] for s in data["steps"]] == [1, 2]
    bad = invoke("runs", "show", tmp_path)
    assert bad.exit_code == 2 and "run directory" in bad.output
    assert invoke("runs", "show", tmp_path / "nope").exit_code == 2


def test_runs_show_in_colour_on_a_terminal(runs, monkeypatch):
    from rich.console import Console

    monkeypatch.setattr(browse, "stdout_is_tty", lambda: True)
    monkeypatch.setattr(browse, "_console", lambda: Console(force_terminal=True, color_system="standard", width=200))
    out = invoke("runs", "show", runs["accepted"]).stdout
    assert ANSI in out and "accepted" in out and "beats the best validation score" in out
    listed = invoke("runs", "list", "--runs-dir", runs["dir"]).stdout
    assert ANSI in listed and runs["accepted"].name in listed


# ---------------------------------------------------------------- diff


def test_diff_shows_removed_and_added_words_and_unchanged_params(runs):
    result = invoke("diff", runs["accepted"])
    assert result.exit_code == 0, result.output
    out = result.stdout
    assert ANSI not in out
    assert "instruction (task instruction): changed" in out
    assert "([-removed-] {+added+})" in out  # the legend of the marks
    body = next(line for line in out.splitlines() if line.startswith("    ") and "[-" in line)
    assert "[-the things.-]" in body and "{+all items. ALWAYS ADD the counts.+}" in body
    assert body.strip().startswith("Count ")
    assert "answer_format (output format, not trainable): unchanged" in out
    assert "best step 1, val 0.250 -> 1.000" in out


def test_diff_lines_mode_is_a_unified_diff(runs):
    out = invoke("diff", runs["accepted"], "--lines").stdout
    assert "--- instruction (initial)" in out and "+++ instruction (best)" in out
    assert "    -Count the things." in out and f"    +{ACCEPTED_VALUE}" in out
    assert ANSI not in out


def test_diff_of_a_run_without_improvement_says_unchanged(runs):
    out = invoke("diff", runs["rejected"]).stdout
    assert "instruction (task instruction): unchanged" in out
    assert "[-" not in out and "{+" not in out
    assert yaml.safe_load((runs["rejected"] / "prompts.yaml").read_text())["instruction"] == "Count the things."


def test_diff_in_colour_on_a_terminal(runs, monkeypatch):
    from rich.console import Console

    monkeypatch.setattr(browse, "stdout_is_tty", lambda: True)
    monkeypatch.setattr(browse, "_console", lambda: Console(force_terminal=True, color_system="standard", width=200))
    out = invoke("diff", runs["accepted"]).stdout
    assert ANSI in out and "ALWAYS" in out and "[-" not in out


def test_word_diff_keeps_far_lines_out():
    old = "\n".join(f"line {i} stays" for i in range(20)) + "\nlast words here"
    new = "\n".join(f"line {i} stays" for i in range(20)) + "\nlast new words here"
    lines = browse.render_plain(old, new, context=2)
    assert lines[0] == "@@ 18 unchanged lines @@"
    assert lines[-1] == "last {+new+} words here"
    assert lines[1:3] == ["line 18 stays", "line 19 stays"]
    assert browse.render_plain("same", "same") == ["same"]
    assert browse.render_plain("a b c", "a c") == ["a [-b-] c"]
