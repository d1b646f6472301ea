"""Shared fixtures: an isolated cache and data root per test, and small spec builders."""
from __future__ import annotations

import textwrap
from pathlib import Path

import pytest


@pytest.fixture(autouse=True)
def isolated_env(tmp_path_factory, monkeypatch):
    """Never touch the user's cache or data: every test gets its own."""
    root = tmp_path_factory.mktemp("env")
    monkeypatch.setenv("AUTODIFF_CACHE", str(root / "cache"))
    monkeypatch.setenv("AUTODIFF_DATA", str(root / "data"))
    monkeypatch.delenv("AUTODIFF_CACHE_URL", raising=False)  # a shared Redis cache is opted into per test
    return root


def write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(textwrap.dedent(text).lstrip(), encoding="utf-8")
    return path
