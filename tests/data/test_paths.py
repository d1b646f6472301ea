"""data/paths.py: a data file is found next to the config, else under $AUTODIFF_DATA (default
./datasets); what was tried is returned, in order, for the error message."""
from __future__ import annotations

from pathlib import Path

from autodiff_cli.data.paths import data_root, resolve_data_path


def touch(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("{}\n")
    return path


def test_data_root_follows_the_environment_at_call_time(monkeypatch, tmp_path):
    monkeypatch.setenv("AUTODIFF_DATA", str(tmp_path / "a"))
    assert data_root() == tmp_path / "a"
    monkeypatch.setenv("AUTODIFF_DATA", str(tmp_path / "b"))
    assert data_root() == tmp_path / "b"
    monkeypatch.delenv("AUTODIFF_DATA")
    assert data_root() == Path("datasets")


def test_absolute_path_is_used_as_is(monkeypatch, tmp_path):
    monkeypatch.setenv("AUTODIFF_DATA", str(tmp_path / "root"))
    target = touch(tmp_path / "elsewhere" / "val.jsonl")
    touch(tmp_path / "config" / target.relative_to("/"))  # never looked for under the config folder
    assert resolve_data_path(str(target), tmp_path / "config") == (target, [target])
    missing = tmp_path / "nowhere.jsonl"
    assert resolve_data_path(str(missing), tmp_path / "config") == (None, [missing])


def test_home_relative_path_is_expanded(monkeypatch, tmp_path):
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    target = touch(tmp_path / "home" / "data" / "val.jsonl")
    found, tried = resolve_data_path("~/data/val.jsonl", tmp_path / "config")
    assert found == target and tried == [target]


def test_next_to_the_config_wins_over_the_data_root(monkeypatch, tmp_path):
    monkeypatch.setenv("AUTODIFF_DATA", str(tmp_path / "root"))
    config_dir = tmp_path / "config"
    beside = touch(config_dir / "sets" / "val.jsonl")
    touch(tmp_path / "root" / "sets" / "val.jsonl")
    found, tried = resolve_data_path("sets/val.jsonl", config_dir)
    assert found == beside
    assert tried == [beside, tmp_path / "root" / "sets" / "val.jsonl"]


def test_falls_back_to_the_data_root(monkeypatch, tmp_path):
    monkeypatch.setenv("AUTODIFF_DATA", str(tmp_path / "root"))
    under_root = touch(tmp_path / "root" / "bbh" / "train.jsonl")
    found, tried = resolve_data_path("bbh/train.jsonl", tmp_path / "config")
    assert found == under_root
    assert tried == [tmp_path / "config" / "bbh" / "train.jsonl", under_root]


def test_not_found_returns_none_and_every_place_tried_in_order(monkeypatch, tmp_path):
    monkeypatch.setenv("AUTODIFF_DATA", str(tmp_path / "root"))
    found, tried = resolve_data_path("val.jsonl", tmp_path / "config")
    assert found is None
    assert tried == [tmp_path / "config" / "val.jsonl", tmp_path / "root" / "val.jsonl"]


def test_default_root_is_datasets_relative_to_the_working_directory(monkeypatch, tmp_path):
    monkeypatch.delenv("AUTODIFF_DATA")
    monkeypatch.chdir(tmp_path)
    touch(tmp_path / "datasets" / "val.jsonl")
    found, tried = resolve_data_path("val.jsonl", tmp_path / "config")
    assert found == Path("datasets") / "val.jsonl" and found.exists()
    assert tried == [tmp_path / "config" / "val.jsonl", Path("datasets") / "val.jsonl"]
