"""The run directory `<runs-dir>/<name>-YYYYMMDD-HHMMSS[-n]/` (CONTRACT.md) and atomic file writes.

Every file is written atomically (a temporary file in the same folder, flushed and fsynced, then
`os.replace`d over the real one and the folder fsynced), so a crash leaves either the old file or
the new one, never half of one. Every write goes through `RunDir._write`, which scrubs the run's
secrets (API key values) from the data and from the serialized bytes: no key can land in a run
directory.

Files: config.yaml (the spec file's bytes), resolved.yaml (after --set and defaults), prompts.yaml
(best value of every param), summary.json, metrics.jsonl (one row per step), checkpoint.json,
traces/step-NNNN.jsonl.
"""
from __future__ import annotations

import json
import os
import re
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import yaml

from .errors import DataError, UsageError

SCRUBBED = "***"
TMP_SUFFIX = ".tmp"
_TRACE_FILE = re.compile(r"^step-(\d+)\.jsonl$")

CONFIG = "config.yaml"
RESOLVED = "resolved.yaml"
PROMPTS = "prompts.yaml"
SUMMARY = "summary.json"
METRICS = "metrics.jsonl"
CHECKPOINT = "checkpoint.json"
TRACES = "traces"


# ---------------------------------------------------------------- atomic writes


def _fsync_dir(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:  # pragma: no cover - platforms without directory fds
        return
    try:
        os.fsync(fd)
    except OSError:  # pragma: no cover
        pass
    finally:
        os.close(fd)


PAUSE_ENV = "AUTODIFF_TEST_PAUSE_BEFORE_REPLACE"


def _test_pause_before_replace(path: Path) -> None:
    """Test-only (benchmarks/crash_trials.py): with AUTODIFF_TEST_PAUSE_BEFORE_REPLACE=<file name>:<seconds>,
    say so on stderr and sleep between writing that file's temporary copy and replacing it, so a
    crash can be aimed at the middle of an atomic write."""
    name, _, seconds = os.environ.get(PAUSE_ENV, "").rpartition(":")
    if name and path.name == name:
        print(f"pause before replace {name}", file=sys.stderr, flush=True)
        time.sleep(float(seconds))


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write `data` to `path` atomically: the old content or the new one survives a crash, never a mix.

    The temporary file is a hidden `.<name>.<random>.tmp` in the same folder; it is removed on failure.
    """
    path = Path(path)
    folder = path.parent
    folder.mkdir(parents=True, exist_ok=True)
    try:
        mode = path.stat().st_mode & 0o777
    except FileNotFoundError:
        mode = 0o644
    fd, tmp_name = tempfile.mkstemp(dir=folder, prefix=f".{path.name}.", suffix=TMP_SUFFIX)
    tmp = Path(tmp_name)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, mode)
        _test_pause_before_replace(path)
        os.replace(tmp, path)
    except BaseException:
        try:
            tmp.unlink()
        except FileNotFoundError:
            pass
        raise
    _fsync_dir(folder)


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
    now = now or datetime.now(timezone.utc)
    now = now.replace(tzinfo=timezone.utc) if now.tzinfo is None else now.astimezone(timezone.utc)
    return f"{name}-{now:%Y%m%d-%H%M%S}"


class RunDir:
    """One run's folder. Create it with `RunDir.create`, reopen it (resume, export) with `RunDir.open`."""

    def __init__(self, path: Path, secrets: list[str] | tuple[str, ...] = ()) -> None:
        self.path = Path(path)
        # longest first, so a secret containing another is replaced whole
        self.secrets = sorted({s for s in secrets if isinstance(s, str) and s}, key=len, reverse=True)

    def __repr__(self) -> str:
        return f"RunDir({str(self.path)!r})"

    @property
    def name(self) -> str:
        return self.path.name

    # ---------------------------------------------------------------- create / open

    @classmethod
    def create(cls, runs_dir: Path, name: str, *, config_path: Path, resolved: dict, secrets: list[str],
               now: datetime | None = None) -> "RunDir":
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
        run = cls(candidate, secrets)
        run._write(CONFIG, Path(config_path).read_bytes())
        run._write(RESOLVED, dump_yaml(run._scrub(resolved)))
        return run

    @classmethod
    def open(cls, path: Path, *, secrets: list[str]) -> "RunDir":
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
        return cls(path, secrets)

    @staticmethod
    def is_run_dir(path: Path) -> bool:
        path = Path(path)
        return path.is_dir() and (path / CONFIG).is_file() and (path / RESOLVED).is_file()

    # ---------------------------------------------------------------- the one write path

    def _scrub_text(self, text: str) -> str:
        for secret in self.secrets:
            text = text.replace(secret, SCRUBBED)
            # the same secret as JSON would escape it (quotes, backslashes, control characters)
            escaped = json.dumps(secret, ensure_ascii=False)[1:-1]
            if escaped != secret:
                text = text.replace(escaped, SCRUBBED)
            escaped_ascii = json.dumps(secret)[1:-1]
            if escaped_ascii not in (secret, escaped):
                text = text.replace(escaped_ascii, SCRUBBED)
        return text

    def _scrub(self, data: Any) -> Any:
        """`data` with every secret replaced in its strings (keys included), before serializing."""
        if not self.secrets:
            return data
        if isinstance(data, str):
            return self._scrub_text(data)
        if isinstance(data, dict):
            return {self._scrub(k): self._scrub(v) for k, v in data.items()}
        if isinstance(data, list):
            return [self._scrub(v) for v in data]
        if isinstance(data, tuple):
            return tuple(self._scrub(v) for v in data)
        return data

    def _write(self, relative: str, content: str | bytes) -> Path:
        """Every file of the run directory is written here: secrets scrubbed, then an atomic write."""
        if isinstance(content, str):
            data = self._scrub_text(content).encode("utf-8")
        else:
            data = content
            for secret in self.secrets:
                data = data.replace(secret.encode("utf-8"), SCRUBBED.encode())
            try:  # escaped forms too, when the bytes are text
                data = self._scrub_text(data.decode("utf-8")).encode("utf-8")
            except UnicodeDecodeError:
                pass
        target = self.path / relative
        atomic_write_bytes(target, data)
        return target

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

    def _read_yaml(self, relative: str) -> Any:
        text = self._read_text(relative)
        if text is None:
            return None
        try:
            return yaml.safe_load(text)
        except yaml.YAMLError as e:
            raise DataError(file=self.path / relative, expected="YAML", got=f"a syntax error ({e})") from None

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
        self._write(SUMMARY, _json(self._scrub(summary)) + "\n")

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
        self._write(PROMPTS, dump_yaml(self._scrub(dict(values))))

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
        self._write(METRICS, old + _json(self._scrub(row), indent=None) + "\n")

    def read_metrics(self) -> list[dict]:
        text = self._read_text(METRICS)
        if text is None:
            return []
        rows: list[dict] = []
        for number, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except ValueError as e:
                raise DataError(file=self.path / METRICS, line=number, expected="one JSON object per line",
                                got=f"a syntax error ({e})") from None
            rows.append(row)
        return rows

    # ---------------------------------------------------------------- checkpoint

    def write_checkpoint(self, state: dict) -> None:
        self._write(CHECKPOINT, _json(self._scrub(state)) + "\n")

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
        text = "".join(_json(self._scrub(r), indent=None, default=str) + "\n" for r in rows)
        self._write(self.trace_name(step), text)

    def read_traces(self, step: int) -> list[dict]:
        text = self._read_text(self.trace_name(step))
        return [] if text is None else [json.loads(line) for line in text.splitlines() if line.strip()]

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
            self._write(METRICS, "".join(_json(self._scrub(r), indent=None) + "\n" for r in kept))
        for later in (s for s in self.trace_steps() if s > step):
            (self.path / self.trace_name(later)).unlink(missing_ok=True)
        for folder in (self.path, self.path / TRACES):
            if folder.is_dir():
                for p in folder.iterdir():
                    if p.name.startswith(".") and p.name.endswith(TMP_SUFFIX) and p.is_file():
                        p.unlink(missing_ok=True)
