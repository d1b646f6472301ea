"""`autodiff models list | pull NAME [--from DIR]` and `autodiff --version`, through the CLI, with
downloads from a real HTTP server on 127.0.0.1 (the `gguf_server` fixture of tests/llm/test_catalog.py:
aiohttp, with Range support) reached through $AUTODIFF_MODELS_URL. No other network.

The catalog entry of qwen2.5-coder-1.5b is given the hash and size of a small fake file per test, so
the real alias, file name and URL path are exercised."""
from __future__ import annotations

import json
from importlib.metadata import version

import pytest
from typer.testing import CliRunner

from autodiff_cli.app import models_cmd
from autodiff_cli.app.cli import app
from autodiff_cli.llm import catalog
from tests.llm import test_catalog as shared
from tests.llm.test_catalog import fake_gguf, sha, with_entry

gguf_server = shared.gguf_server  # the fixture, shared with the catalog's tests

NAME = "qwen2.5-coder-1.5b"


@pytest.fixture
def models_dir(tmp_path, monkeypatch):
    folder = tmp_path / "models"
    monkeypatch.setenv("AUTODIFF_MODELS", str(folder))
    return folder


@pytest.fixture
def served(gguf_server, monkeypatch):
    """The fake file, served at the coder model's URL path; the catalog entry carries its hash and size."""
    data = fake_gguf()
    entry = with_entry(monkeypatch, NAME, sha256=sha(data), size=len(data))
    gguf_server.publish(entry.url, data)
    return gguf_server, entry, data


def run(*args):
    return CliRunner().invoke(app, [*map(str, args)])


def test_version_prints_the_package_version():
    result = run("--version")
    assert result.exit_code == 0
    assert result.stdout.strip() == f"autodiff {version('autodiff-cli')}"


def test_list_shows_each_model_its_status_and_url(models_dir, monkeypatch):
    data = fake_gguf()
    coder = with_entry(monkeypatch, NAME, sha256=sha(data), size=len(data))
    models_dir.mkdir()
    (models_dir / coder.file).write_bytes(data)  # the recorded file
    (models_dir / catalog.lookup("qwen2.5-3b").file).write_bytes(b"GGUF?")  # no hash to check it against
    result = run("models", "list")
    assert result.exit_code == 0, result.output
    lines = {line.split()[0]: line for line in result.stdout.splitlines() if line.strip()}
    assert {"smollm2-135m", NAME, "qwen2.5-3b"} <= set(lines)
    assert "verified" in lines[NAME] and str(models_dir / coder.file) in lines[NAME] and coder.url in lines[NAME]
    assert "present, unverified" in lines["qwen2.5-3b"]

    rows = {r["name"]: r for r in json.loads(run("models", "list", "--json").stdout)["models"]}
    assert rows[NAME]["present"] is True and rows[NAME]["verified"] is True and rows[NAME]["status"] == "verified"
    assert rows[NAME]["sha256"] == sha(data) and rows[NAME]["size"] == len(data) and rows[NAME]["url"] == coder.url
    assert rows["qwen2.5-3b"]["present"] is True and rows["qwen2.5-3b"]["verified"] is None
    assert rows["qwen2.5-3b"]["sha256"] is None

    (models_dir / coder.file).write_bytes(data[:-1] + b"!")  # same size, other bytes
    rows = {r["name"]: r for r in json.loads(run("models", "list", "--json").stdout)["models"]}
    assert rows[NAME]["verified"] is False and rows[NAME]["status"] == "sha256 mismatch"
    (models_dir / coder.file).unlink()
    rows = {r["name"]: r for r in json.loads(run("models", "list", "--json").stdout)["models"]}
    assert (rows[NAME]["present"], rows[NAME]["path"], rows[NAME]["status"]) == (False, None, "missing")


def test_pull_downloads_verifies_and_installs(models_dir, served):
    server, entry, data = served
    result = run("models", "pull", NAME)
    assert result.exit_code == 0, result.output
    assert (models_dir / entry.file).read_bytes() == data
    assert list(models_dir.iterdir()) == [models_dir / entry.file]  # no .part left
    assert "installed and verified" in result.stdout and str(models_dir / entry.file) in result.stdout
    assert [r["path"] for r in server.requests] == [f"/{entry.url.split('/', 3)[3]}"] and server.range_requests() == []
    # the provider now finds it under its alias
    from autodiff_cli.llm import local

    assert local.resolve_local_model(NAME) == models_dir / entry.file
    # a second pull sees a verified file and downloads nothing
    again = run("models", "pull", NAME)
    assert again.exit_code == 0 and "already present and verified" in again.stdout and len(server.requests) == 1


def test_pull_resumes_a_partial_download_with_a_range_request(models_dir, served):
    server, entry, data = served
    models_dir.mkdir()
    half = len(data) // 2
    (models_dir / (entry.file + ".part")).write_bytes(data[:half])
    result = run("models", "pull", NAME)
    assert result.exit_code == 0, result.output
    assert server.range_requests() == [f"bytes={half}-"]
    assert (models_dir / entry.file).read_bytes() == data
    assert not (models_dir / (entry.file + ".part")).exists()


def test_pull_refuses_a_checksum_mismatch_and_installs_nothing(models_dir, gguf_server, monkeypatch):
    data = fake_gguf()
    entry = with_entry(monkeypatch, NAME, sha256=sha(b"another build"), size=len(data))
    gguf_server.publish(entry.url, data)
    result = run("models", "pull", NAME)
    assert result.exit_code == 2
    assert "failed verification" in result.stderr
    assert sha(data) in result.stderr and sha(b"another build") in result.stderr
    assert "Traceback" not in result.output
    assert list(models_dir.iterdir()) == []  # neither the file nor its .part


def test_pull_from_a_folder_copies_and_verifies_without_network(models_dir, served, tmp_path):
    server, entry, data = served
    offline = tmp_path / "usb"
    offline.mkdir()
    (offline / entry.file).write_bytes(data)
    result = run("models", "pull", NAME, "--from", offline)
    assert result.exit_code == 0, result.output
    assert (models_dir / entry.file).read_bytes() == data and server.requests == []
    assert list(models_dir.iterdir()) == [models_dir / entry.file]


def test_pull_from_a_folder_accepts_the_upstream_file_name(models_dir, served, tmp_path):
    _, entry, data = served
    offline = tmp_path / "hf-download"
    offline.mkdir()
    upstream = entry.url.rsplit("/", 1)[1]
    (offline / upstream).write_bytes(data)
    assert run("models", "pull", NAME, "--from", offline).exit_code == 0
    assert (models_dir / entry.file).read_bytes() == data


def test_pull_from_a_folder_refuses_a_corrupt_copy(models_dir, served, tmp_path):
    server, entry, data = served
    offline = tmp_path / "usb"
    offline.mkdir()
    (offline / entry.file).write_bytes(data[:-1] + b"!")
    result = run("models", "pull", NAME, "--from", offline)
    assert result.exit_code == 2 and "failed verification" in result.stderr
    assert list(models_dir.iterdir()) == [] and server.requests == []


def test_pull_from_a_folder_without_the_file_names_what_it_looked_for(models_dir, tmp_path):
    result = run("models", "pull", NAME, "--from", tmp_path)
    assert result.exit_code == 2 and catalog.lookup(NAME).file in result.stderr


def test_pull_of_an_unknown_name_exits_2_with_the_known_names(models_dir):
    result = run("models", "pull", "llama-70b")
    assert result.exit_code == 2
    assert "llama-70b" in result.stderr and all(name in result.stderr for name in catalog.names())


def test_pull_of_a_model_without_a_recorded_sha256_is_refused_unless_given_one(models_dir, gguf_server):
    entry = catalog.lookup("qwen2.5-3b")
    data = fake_gguf(seed=3)
    gguf_server.publish(entry.url, data)
    refused = run("models", "pull", "qwen2.5-3b")
    assert refused.exit_code == 2 and "no sha256 is recorded" in refused.stderr and "--sha256" in refused.stderr
    assert gguf_server.requests == [] and not models_dir.exists()
    wrong = run("models", "pull", "qwen2.5-3b", "--sha256", "0" * 64)
    assert wrong.exit_code == 2 and not (models_dir / entry.file).exists()
    ok = run("models", "pull", "qwen2.5-3b", "--sha256", sha(data))
    assert ok.exit_code == 0, ok.output
    assert (models_dir / entry.file).read_bytes() == data


def test_pull_replaces_a_corrupt_installed_file_only_with_a_verified_one(models_dir, served):
    _, entry, data = served
    models_dir.mkdir()
    (models_dir / entry.file).write_bytes(b"GGUF truncated")
    result = run("models", "pull", NAME)
    assert result.exit_code == 0, result.output
    assert "not the recorded file" in result.stderr
    assert (models_dir / entry.file).read_bytes() == data


def test_pull_shows_a_progress_bar_on_a_terminal(models_dir, served, monkeypatch):
    _, entry, data = served
    monkeypatch.setattr(models_cmd, "stderr_is_tty", lambda: True)
    result = run("models", "pull", NAME)
    assert result.exit_code == 0, result.output
    assert (models_dir / entry.file).read_bytes() == data
