"""The run directory `<runs-dir>/<name>-YYYYMMDD-HHMMSS[-n]/` (CONTRACT.md) and atomic file writes.

Every file is written atomically (files.atomic_write_bytes), so a crash leaves either the old file
or the new one, never half of one. Nothing here rewrites what it is given: a run directory is the
user's data, written byte for byte. API keys never reach it because nothing hands one to it (specs
name key variables, never keys; provider errors are redacted where they are caught, in
llm/client.describe_error).

While `autodiff train` works on a run, it holds an exclusive lock on `run.lock` (fcntl.flock,
which the kernel releases when the process ends, SIGKILL included). A summary that says
`running` while nobody holds the lock is the summary of a process that died: `liveness()` tells
the two apart, and a second `train --resume` of a run in use is refused.

Files: config.yaml (the spec file's bytes), resolved.yaml (after --set and defaults), prompts.yaml
(best value of every param), summary.json, metrics.jsonl (one row per step), checkpoint.json,
traces/step-NNNN.jsonl.
"""
from __future__ import annotations

import fcntl
import json
import os
import re
import socket
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import yaml

from autodiff_cli.errors import DataError, UsageError
from autodiff_cli.io.files import (
    TMP_SUFFIX,
    atomic_write_bytes,
    jsonl_line,
    jsonl_rows,
    jsonl_text,
)

_TRACE_FILE = re.compile(r"^step-(\d+)\.jsonl$")

CONFIG = "config.yaml"
RESOLVED = "resolved.yaml"
PROMPTS = "prompts.yaml"
SUMMARY = "summary.json"
METRICS = "metrics.jsonl"
CHECKPOINT = "checkpoint.json"
TRACES = "traces"
LOCK = "run.lock"
USAGE_JOURNAL = "usage.jsonl"  # append-only: one line per usage change (llm/usage.Usage.journal_to)
KILLED = "killed"  # shown by readers, never written: the process could not write it


# ---------------------------------------------------------------- serialization


class _ReadableDumper(yaml.SafeDumper):
    """SafeDumper that writes multi-line strings as `|` blocks (PyYAML falls back to quotes when a
    string cannot be a block, e.g. trailing spaces, so loading always gives the same string back)."""


def _str_representer(dumper: yaml.SafeDumper, value: str) -> yaml.Node:
    style = "|" if "\n" in value else None
    return dumper.represent_scalar("tag:yaml.org,2002:str", value, style=style)


_ReadableDumper.add_representer(str, _str_representer)


def dump_yaml(data: Any) -> str:
    """YAML as written in run directories: key order kept, unicode as is, multi-line strings as blocks,
    long lines not folded (a prompt reads as written)."""
    return yaml.dump(data, Dumper=_ReadableDumper, sort_keys=False, allow_unicode=True, default_flow_style=False,
                     width=1_000_000)


def _json(data: Any, *, indent: int | None = 2, default: Any = None) -> str:
    return json.dumps(data, sort_keys=False, ensure_ascii=False, indent=indent, default=default)


# ---------------------------------------------------------------- the run directory


def run_dir_name(name: str, now: datetime | None = None) -> str:
    """`<name>-YYYYMMDD-HHMMSS` in UTC (a naive `now` is taken as UTC)."""
    now = now or datetime.now(UTC)
    now = now.replace(tzinfo=UTC) if now.tzinfo is None else now.astimezone(UTC)
    return f"{name}-{now:%Y%m%d-%H%M%S}"


class RunDir:
    """One run's folder. Create it with `RunDir.create`, reopen it (resume, export) with `RunDir.open`."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self._lock_fd: int | None = None

    def __repr__(self) -> str:
        return f"RunDir({str(self.path)!r})"

    @property
    def name(self) -> str:
        return self.path.name

    # ---------------------------------------------------------------- create / open

    @classmethod
    def create(cls, runs_dir: Path, name: str, *, config_path: Path, resolved: dict,
               now: datetime | None = None) -> RunDir:
        """Make a new `<runs_dir>/<name>-YYYYMMDD-HHMMSS[-n]` (race-free) with config.yaml and resolved.yaml."""
        runs_dir = Path(runs_dir)
        try:
            runs_dir.mkdir(parents=True, exist_ok=True)
        except (FileExistsError, NotADirectoryError):
            raise UsageError(key="--runs-dir", expected="a folder", got=f"a file: {runs_dir}") from None
        base = run_dir_name(name, now)
        n = 1
        while True:
            candidate = runs_dir / (base if n == 1 else f"{base}-{n}")
            try:
                candidate.mkdir(exist_ok=False)
                break
            except FileExistsError:
                n += 1
        run = cls(candidate)
        run._write(CONFIG, Path(config_path).read_bytes())
        run._write(RESOLVED, dump_yaml(resolved))
        return run

    @classmethod
    def open(cls, path: Path) -> RunDir:
        """An existing run directory; anything else (no folder, a file, a folder `train` did not make)
        is a UsageError (exit 2)."""
        path = Path(path)
        what = "a run directory made by `autodiff train` (with config.yaml and resolved.yaml)"
        if not path.exists():
            raise UsageError(file=path, expected=what, got="no such folder")
        if not path.is_dir():
            raise UsageError(file=path, expected=what, got="a file")
        missing = [f for f in (CONFIG, RESOLVED) if not (path / f).is_file()]
        if missing:
            raise UsageError(file=path, expected=what, got="a folder without " + " and ".join(missing))
        return cls(path)

    @staticmethod
    def is_run_dir(path: Path) -> bool:
        path = Path(path)
        return path.is_dir() and (path / CONFIG).is_file() and (path / RESOLVED).is_file()

    @property
    def usage_journal(self) -> Path:
        return self.path / USAGE_JOURNAL

    # ---------------------------------------------------------------- who is running it

    def acquire(self) -> None:
        """Mark this run as worked on by this process until it ends (however it ends). A run that
        another live process holds is a UsageError: two writers would interleave its files."""
        if self._lock_fd is not None:
            return
        fd = os.open(self.path / LOCK, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(fd)
            owner = self.lock_owner()
            who = f"process {owner['pid']} on {owner['host']}" if owner else "another process"
            raise UsageError(file=self.path, expected="a run no other process is working on",
                             got=f"a run in use by {who}",
                             hint="Wait for it to end (or stop it with Ctrl-C), then --resume.") from None
        # who holds it, for `runs list`/`runs show` and the error above (the lock itself is the flock)
        os.ftruncate(fd, 0)
        os.write(fd, json.dumps({"pid": os.getpid(), "host": socket.gethostname()}).encode() + b"\n")
        self._lock_fd = fd

    def release(self) -> None:
        if self._lock_fd is not None:
            os.close(self._lock_fd)  # closing the descriptor releases the flock
            self._lock_fd = None

    def lock_owner(self) -> dict | None:
        try:
            data = json.loads((self.path / LOCK).read_text(encoding="utf-8") or "null")
        except (OSError, ValueError):
            return None
        return data if isinstance(data, dict) else None

    def in_use(self) -> bool:
        """True while a live process holds the run (an `autodiff train` working on it)."""
        if self._lock_fd is not None:
            return True
        try:
            fd = os.open(self.path / LOCK, os.O_RDONLY)
        except FileNotFoundError:  # runs made before the lock existed, or never started
            return False
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except OSError:
            return True
        finally:
            os.close(fd)  # also drops the shared lock just taken
        return False

    def liveness(self, summary: dict | None = None) -> str:
        """The run's status as a reader should show it: the summary's, except that a summary saying
        `running` whose process is gone (SIGKILL, power loss, OOM killer) is `killed`."""
        summary = self.read_summary() if summary is None else summary
        status = summary.get("status") or "unknown"
        if status == "running" and not self.in_use():
            return KILLED
        return status

    # ---------------------------------------------------------------- the one write path

    def _write(self, relative: str, content: str | bytes) -> Path:
        """Every file of the run directory is written here, atomically and as given."""
        data = content.encode("utf-8") if isinstance(content, str) else content
        return atomic_write_bytes(self.path / relative, data)

    def _read_text(self, relative: str) -> str | None:
        try:
            return (self.path / relative).read_text(encoding="utf-8")
        except FileNotFoundError:
            return None

    def _read_json(self, relative: str) -> Any:
        text = self._read_text(relative)
        if text is None:
            return None
        try:
            return json.loads(text)
        except ValueError as e:
            raise DataError(file=self.path / relative, line=getattr(e, "lineno", None), expected="JSON",
                            got=f"a syntax error ({e})") from None
        except RecursionError:
            raise DataError(file=self.path / relative, expected="JSON", got="nesting too deep to read") from None

    def _read_yaml(self, relative: str) -> Any:
        text = self._read_text(relative)
        if text is None:
            return None
        try:
            return yaml.safe_load(text)
        except yaml.YAMLError as e:
            raise DataError(file=self.path / relative, expected="YAML", got=f"a syntax error ({e})") from None
        except RecursionError:
            raise DataError(file=self.path / relative, expected="YAML", got="nesting too deep to read") from None

    def _read_jsonl(self, relative: str) -> list[dict]:
        text = self._read_text(relative)
        return [] if text is None else [row for _, row in jsonl_rows(text, self.path / relative)]

    # ---------------------------------------------------------------- config

    def read_config_bytes(self) -> bytes:
        return (self.path / CONFIG).read_bytes()

    def read_resolved(self) -> dict:
        data = self._read_yaml(RESOLVED)
        if not isinstance(data, dict):
            raise DataError(file=self.path / RESOLVED, expected="a YAML mapping (the resolved spec)",
                            got="nothing" if data is None else type(data).__name__)
        return data

    # ---------------------------------------------------------------- summary

    def write_summary(self, summary: dict) -> None:
        self._write(SUMMARY, _json(summary) + "\n")

    def read_summary(self) -> dict:
        """summary.json, or {} if the run has not written one yet."""
        data = self._read_json(SUMMARY)
        if data is None:
            return {}
        if not isinstance(data, dict):
            raise DataError(file=self.path / SUMMARY, expected="a JSON object", got=type(data).__name__)
        return data

    # ---------------------------------------------------------------- prompts

    def write_prompts(self, values: dict[str, str]) -> None:
        self._write(PROMPTS, dump_yaml(dict(values)))

    def read_prompts(self) -> dict[str, str]:
        """prompts.yaml ({param: value}), or {} if the run has not written one yet."""
        data = self._read_yaml(PROMPTS)
        if data is None:
            return {}
        if not isinstance(data, dict) or not all(isinstance(v, str) for v in data.values()):
            raise DataError(file=self.path / PROMPTS, expected="a mapping of param name -> text",
                            got=type(data).__name__ if not isinstance(data, dict) else "a non-text value")
        return {str(k): v for k, v in data.items()}

    # ---------------------------------------------------------------- metrics

    def append_metrics(self, row: dict) -> None:
        """Add one step's row. The whole file is rewritten atomically (old rows + new): a crash never
        leaves half a row."""
        old = self._read_text(METRICS) or ""
        if old and not old.endswith("\n"):
            old += "\n"
        self._write(METRICS, old + jsonl_line(row))

    def read_metrics(self) -> list[dict]:
        return self._read_jsonl(METRICS)

    # ---------------------------------------------------------------- checkpoint

    def write_checkpoint(self, state: dict) -> None:
        self._write(CHECKPOINT, _json(state) + "\n")

    def read_checkpoint(self) -> dict | None:
        data = self._read_json(CHECKPOINT)
        if data is not None and not isinstance(data, dict):
            raise DataError(file=self.path / CHECKPOINT, expected="a JSON object", got=type(data).__name__)
        return data

    # ---------------------------------------------------------------- traces

    @staticmethod
    def trace_name(step: int) -> str:
        return f"{TRACES}/step-{step:04d}.jsonl"

    def write_traces(self, step: int, rows: list[dict]) -> None:
        self._write(self.trace_name(step), jsonl_text(rows, default=str))

    def read_traces(self, step: int) -> list[dict]:
        return self._read_jsonl(self.trace_name(step))

    def trace_steps(self) -> list[int]:
        folder = self.path / TRACES
        if not folder.is_dir():
            return []
        return sorted(int(m.group(1)) for p in folder.iterdir() if (m := _TRACE_FILE.match(p.name)))

    # ---------------------------------------------------------------- resume

    def truncate_after(self, step: int) -> None:
        """For resume: drop the metrics rows and trace files of steps > `step` (a step in progress when
        the run stopped), and leftover temporary files of interrupted writes."""
        rows = self.read_metrics()
        kept = [r for r in rows if not (isinstance(r.get("step"), int) and r["step"] > step)]
        if len(kept) != len(rows):
            self._write(METRICS, jsonl_text(kept))
        for later in (s for s in self.trace_steps() if s > step):
            (self.path / self.trace_name(later)).unlink(missing_ok=True)
        for folder in (self.path, self.path / TRACES):
            if folder.is_dir():
                for p in folder.iterdir():
                    if p.name.startswith(".") and p.name.endswith(TMP_SUFFIX) and p.is_file():
                        p.unlink(missing_ok=True)
