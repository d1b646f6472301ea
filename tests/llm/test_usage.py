"""llm/usage.py: counters per role and the journal a training run keeps in its run directory."""
from __future__ import annotations

from autodiff_cli.llm.usage import FIELDS, Usage


def test_the_journal_adds_up_to_what_was_recorded_across_processes(tmp_path):
    path = tmp_path / "usage.jsonl"
    first = Usage()
    first.journal_to(path)
    first.record("task", calls=1)  # the request is handed over
    first.record("task", errors=0, prompt_tokens=12, completion_tokens=3, cost_usd=0.25)  # its reply
    first.record("backward", calls=1)
    first.record("backward", calls=-1, unsent=1)  # the connection was refused after all
    first.close_journal()
    # a second process (a resume) continues from the journal and appends to it
    second = Usage.from_journal(path)
    assert second == first
    second.journal_to(path)
    second.record("optimizer", calls=1, errors=1)
    second.close_journal()
    again = Usage.from_journal(path)
    assert again.to_dict()["optimizer"]["calls"] == 1 and again.to_dict()["backward"]["unsent"] == 1
    assert again.to_dict()["task"] == {"calls": 1, "cached_calls": 0, "errors": 0, "prompt_tokens": 12,
                                       "completion_tokens": 3, "cost_usd": 0.25, "unsent": 0}
    assert list(again.to_dict()["task"]) == list(FIELDS)


def test_a_line_cut_by_a_kill_is_skipped_and_a_missing_journal_is_none(tmp_path):
    path = tmp_path / "usage.jsonl"
    path.write_text('{"role": "task", "calls": 2}\n{"role": "task", "calls": 1}\n{"role": "ta', encoding="utf-8")
    assert Usage.from_journal(path).to_dict()["task"]["calls"] == 3
    assert Usage.from_journal(tmp_path / "none.jsonl") is None


def test_copies_and_dict_round_trips_do_not_write_to_the_journal(tmp_path):
    path = tmp_path / "usage.jsonl"
    usage = Usage()
    usage.journal_to(path)
    usage.record("task", calls=1)
    usage.copy()
    Usage.from_dict(usage.to_dict())
    usage.close_journal()
    assert path.read_text(encoding="utf-8").count("\n") == 1
