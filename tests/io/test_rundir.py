"""The run directory: naming, atomic writes, data written as given, JSONL, liveness, metrics, resume truncation, open()."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path

import pytest
import yaml

from autodiff_cli.errors import EXIT_USAGE, UsageError
from autodiff_cli.io.files import atomic_write_bytes
from autodiff_cli.io.rundir import RunDir
from tests.conftest import write

NOW = datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC)
SPEC_TEXT = "name: tiny\n# a comment that only the file as given has\nparams:\n  instruction: {value: 'Count.'}\n"
RESOLVED = {"name": "tiny", "params": {"instruction": {"kind": "prompt", "value": "Count."}}}


def make(tmp_path, now=NOW, name="tiny") -> RunDir:
    config = tmp_path / "spec.yaml"
    if not config.exists():
        write(config, SPEC_TEXT)
    return RunDir.create(tmp_path / "runs", name, config_path=config, resolved=RESOLVED, now=now)


def files_of(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.is_file())


# ---------------------------------------------------------------- naming


def test_name_is_utc_timestamp_and_collisions_get_a_suffix(tmp_path):
    first, second, third = make(tmp_path), make(tmp_path), make(tmp_path)
    assert first.path == tmp_path / "runs" / "tiny-20260102-030405"
    assert second.path.name == "tiny-20260102-030405-2"
    assert third.path.name == "tiny-20260102-030405-3"
    # an aware time in another zone is converted to UTC; a naive one is taken as UTC
    paris = NOW.astimezone(timezone(timedelta(hours=1)))
    assert make(tmp_path, now=paris, name="other").path.name == "other-20260102-030405"
    assert make(tmp_path, now=NOW.replace(tzinfo=None), name="naive").path.name == "naive-20260102-030405"
    # without `now`: the current UTC time
    fresh = make(tmp_path, now=None, name="fresh")
    stamp = datetime.strptime(fresh.path.name.removeprefix("fresh-"), "%Y%m%d-%H%M%S").replace(tzinfo=UTC)
    assert abs((datetime.now(UTC) - stamp).total_seconds()) < 60


def test_create_writes_config_as_given_and_resolved(tmp_path):
    run = make(tmp_path)
    assert (run.path / "config.yaml").read_bytes() == SPEC_TEXT.encode()
    assert yaml.safe_load((run.path / "resolved.yaml").read_text()) == RESOLVED
    assert RunDir.is_run_dir(run.path)


# ---------------------------------------------------------------- atomic writes


def test_a_crash_during_replace_keeps_the_old_file_and_leaves_no_temporary(tmp_path, monkeypatch):
    run = make(tmp_path)
    run.write_summary({"status": "running", "steps": 1})
    run.append_metrics({"step": 1, "val_score": 0.5})
    before = {p: p.read_bytes() for p in files_of(run.path)}

    def crash(*args, **kwargs):
        raise OSError("disk gone")

    monkeypatch.setattr(os, "replace", crash)
    with pytest.raises(OSError):
        run.write_summary({"status": "completed", "steps": 2})
    with pytest.raises(OSError):
        run.append_metrics({"step": 2, "val_score": 0.75})
    with pytest.raises(OSError):
        run.write_checkpoint({"step": 2})
    monkeypatch.undo()

    assert run.read_summary() == {"status": "running", "steps": 1}
    assert run.read_metrics() == [{"step": 1, "val_score": 0.5}]
    assert run.read_checkpoint() is None
    assert {p: p.read_bytes() for p in files_of(run.path)} == before  # nothing new, nothing changed


def test_a_crash_while_writing_the_data_leaves_the_old_file(tmp_path, monkeypatch):
    target = tmp_path / "out" / "file.json"
    atomic_write_bytes(target, b'{"old": true}\n')
    real_fsync = os.fsync
    calls = []

    def crash_mid_write(fd):  # the new bytes are in the temporary file, not yet durable
        calls.append(fd)
        raise OSError("power cut")

    monkeypatch.setattr(os, "fsync", crash_mid_write)
    with pytest.raises(OSError):
        atomic_write_bytes(target, b'{"new": tr')
    monkeypatch.setattr(os, "fsync", real_fsync)
    assert calls
    assert json.loads(target.read_text()) == {"old": True}
    assert [p.name for p in target.parent.iterdir()] == ["file.json"]


def test_atomic_write_keeps_an_existing_files_mode(tmp_path):
    target = tmp_path / "f.txt"
    atomic_write_bytes(target, b"a")
    assert (target.stat().st_mode & 0o777) == 0o644
    target.chmod(0o600)
    atomic_write_bytes(target, b"b")
    assert target.read_bytes() == b"b" and (target.stat().st_mode & 0o777) == 0o600


# ---------------------------------------------------------------- data as given


def test_every_file_holds_exactly_what_it_was_given(tmp_path):
    """A run directory is the user's data: nothing rewrites it (an old scrubber turned every `x` of a
    prompt into `***` when an API key was `x`)."""
    run = make(tmp_path)
    tricky = {"instruction": "exactly next max_tokens null task x *** \u2028 ok", "empty": ""}
    run.write_prompts(tricky)
    run.write_summary({"reason": "null", "status": "running", "note": "x" * 5})
    run.write_checkpoint({"state": {"values": tricky}})
    run.append_metrics({"step": 1, "proposals": [{"params": tricky}]})
    run.write_traces(1, [{"feedback": "task null x"}])
    assert run.read_prompts() == tricky
    assert run.read_summary() == {"reason": "null", "status": "running", "note": "xxxxx"}
    assert run.read_checkpoint() == {"state": {"values": tricky}}
    assert run.read_metrics() == [{"step": 1, "proposals": [{"params": tricky}]}]
    assert run.read_traces(1) == [{"feedback": "task null x"}]
    assert (run.path / "config.yaml").read_bytes() == (tmp_path / "spec.yaml").read_bytes()


@pytest.mark.parametrize("separator", ["\u2028", "\u2029", "\x85"])  # not escaped by json.dumps
def test_jsonl_files_survive_every_line_separator_python_knows(tmp_path, separator):
    """metrics.jsonl and traces are written with raw unicode; str.splitlines() would cut a row holding
    U+2028 (models emit it) in two, and --resume, runs show and the report would fail."""
    run = make(tmp_path)
    value = f"first{separator}second"
    run.append_metrics({"step": 1, "proposals": [{"params": {"instruction": value}}]})
    run.append_metrics({"step": 2, "proposals": []})
    run.write_traces(1, [{"kind": "proposal", "value": value}, {"kind": "gradient", "feedback": value}])
    assert [r["step"] for r in run.read_metrics()] == [1, 2]
    assert run.read_metrics()[0]["proposals"][0]["params"]["instruction"] == value
    assert [r["kind"] for r in run.read_traces(1)] == ["proposal", "gradient"]
    run.truncate_after(1)
    assert [r["step"] for r in run.read_metrics()] == [1]


def test_a_run_held_by_a_live_process_is_running_and_one_whose_process_died_is_killed(tmp_path):
    run = make(tmp_path)
    run.write_summary({"status": "running"})
    assert run.liveness() == "killed"  # nobody holds it (a run made before its process could lock it)
    holder = subprocess.Popen([sys.executable, "-c", (
        "import sys, time; from autodiff_cli.io.rundir import RunDir; r = RunDir.open(sys.argv[1]); r.acquire(); "
        "print('held', flush=True); time.sleep(60)"), str(run.path)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        assert run.in_use() and run.liveness() == "running"
        assert run.lock_owner()["pid"] == holder.pid
        with pytest.raises(UsageError, match=f"in use by process {holder.pid}"):
            RunDir.open(run.path).acquire()  # a second writer is refused
    finally:
        holder.kill()  # SIGKILL: the process cannot clean up; the kernel drops its lock
        holder.wait(timeout=30)
    assert not run.in_use() and run.liveness() == "killed"
    run.write_summary({"status": "completed"})
    assert run.liveness() == "completed"
    again = RunDir.open(run.path)
    again.acquire()  # free again
    assert again.in_use()
    again.release()


# ---------------------------------------------------------------- contents


def test_prompts_are_readable_yaml_blocks_and_round_trip(tmp_path):
    run = make(tmp_path)
    values = {
        "instruction": "Count the objects.\nThen answer with `Answer: N`.",
        "trailing": "line one\nline two\n",
        "spaces": "trailing space \nnext",
        "unicode": "Zähle die Äpfel — 🍎",
        "braces": "Keep {{ this }} literal",
        "empty": "",
    }
    run.write_prompts(values)
    text = (run.path / "prompts.yaml").read_text(encoding="utf-8")
    assert "instruction: |" in text and "  Count the objects.\n" in text
    assert "Zähle die Äpfel — 🍎" in text
    assert run.read_prompts() == values


def test_summary_and_checkpoint_are_indented_json_in_given_order(tmp_path):
    run = make(tmp_path)
    assert run.read_checkpoint() is None and run.read_summary() == {}
    summary = {"schema_version": 1, "name": "tiny", "status": "running", "best": {"step": 0, "val": None}, "é": "ü"}
    run.write_summary(summary)
    text = (run.path / "summary.json").read_text(encoding="utf-8")
    assert text.startswith('{\n  "schema_version": 1,\n  "name": "tiny"') and '"é": "ü"' in text
    assert list(run.read_summary()) == list(summary)
    state = {"values": {"a": "x"}, "rng": [3, [1, 2, 3], None], "position": 7}
    run.write_checkpoint(state)
    assert run.read_checkpoint() == state


def test_metrics_round_trip_and_truncate_after(tmp_path):
    run = make(tmp_path)
    assert run.read_metrics() == []
    rows = [{"step": s, "epoch": 0, "batch_ids": [f"e{s}"], "val_score": s / 10, "proposals": []} for s in range(1, 5)]
    for row in rows:
        run.append_metrics(row)
        run.write_traces(row["step"], [{"example_id": f"e{row['step']}", "node": "count", "feedback": "ok"}])
    lines = (run.path / "metrics.jsonl").read_text().splitlines()
    assert len(lines) == 4 and all(json.loads(line) for line in lines)
    assert run.read_metrics() == rows
    assert run.trace_steps() == [1, 2, 3, 4]
    assert (run.path / "traces" / "step-0003.jsonl").is_file()
    assert run.read_traces(2) == [{"example_id": "e2", "node": "count", "feedback": "ok"}]
    # a write interrupted before its replace left a temporary file behind
    (run.path / ".metrics.jsonl.abc123.tmp").write_text('{"step": 5, "half')
    run.truncate_after(2)
    assert run.read_metrics() == rows[:2]
    assert run.trace_steps() == [1, 2]
    assert not (run.path / ".metrics.jsonl.abc123.tmp").exists()
    run.append_metrics(rows[2])  # the resumed step is written again
    assert run.read_metrics() == rows[:3]
    run.truncate_after(0)
    assert run.read_metrics() == [] and run.trace_steps() == []


# ---------------------------------------------------------------- open


def test_open_accepts_a_run_and_refuses_anything_else(tmp_path):
    run = make(tmp_path)
    assert RunDir.open(run.path).path == run.path

    (tmp_path / "empty").mkdir()
    (tmp_path / "half").mkdir()
    write(tmp_path / "half" / "config.yaml", SPEC_TEXT)
    write(tmp_path / "a-file.yaml", SPEC_TEXT)
    for bad, got in ((tmp_path / "missing", "no such folder"), (tmp_path / "a-file.yaml", "a file"),
                     (tmp_path / "empty", "without config.yaml and resolved.yaml"),
                     (tmp_path / "half", "without resolved.yaml")):
        with pytest.raises(UsageError) as info:
            RunDir.open(bad)
        err = info.value
        assert err.exit_code == EXIT_USAGE
        first = err.render().splitlines()[0]
        assert first.startswith(f"error: {bad}: expected a run directory made by `autodiff train`"), first
        assert got in first


def test_runs_dir_that_is_a_file_is_a_usage_error(tmp_path):
    write(tmp_path / "spec.yaml", SPEC_TEXT)
    write(tmp_path / "runs", "not a folder")
    with pytest.raises(UsageError):
        RunDir.create(tmp_path / "runs", "tiny", config_path=tmp_path / "spec.yaml", resolved=RESOLVED)
