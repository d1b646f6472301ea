"""The package's one atomic writer and one JSONL reader/writer.

Every file autodiff writes (run directories, `eval --out`, exports, fetched data, scaffolds)
goes through `atomic_write_bytes`: a temporary file in the same folder, flushed and fsynced,
then `os.replace`d over the real one and the folder fsynced, so a crash leaves the old file or
the new one, never half of one.

JSONL is written with `ensure_ascii=False` (text stays readable) and therefore read back by
splitting on "\\n" only: `str.splitlines()` would also split inside a JSON string holding
U+2028, U+2029, U+0085 or a form feed, which models do emit.
"""
from __future__ import annotations

import json
import os
import secrets
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

from autodiff_cli.errors import DataError, describe

TMP_SUFFIX = ".tmp"


def fsync_dir(folder: Path) -> None:
    """Make a rename in `folder` durable (what atomic writes and the model download both need)."""
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


def atomic_write_bytes(path: Path | str, data: bytes, *, mode: int = 0o666) -> Path:
    """Write `data` to `path` atomically. The temporary file is a hidden `.<name>.<random>.tmp` in
    the same folder and is removed on failure. A new file gets `mode` less the umask (the kernel
    applies it, as for open()); an existing file keeps its mode."""
    path = Path(path)
    folder = path.parent
    folder.mkdir(parents=True, exist_ok=True)
    try:
        keep: int | None = path.stat().st_mode & 0o777
    except FileNotFoundError:
        keep = None
    # not tempfile.mkstemp: its 0600 would survive the rename, and the umask is only readable by setting it
    tmp = folder / f".{path.name}.{secrets.token_hex(6)}{TMP_SUFFIX}"
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        if keep is not None:
            os.chmod(tmp, keep)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(folder)
    return path


def atomic_write_text(path: Path | str, text: str, **kw: Any) -> Path:
    return atomic_write_bytes(path, text.encode("utf-8"), **kw)


# ---------------------------------------------------------------- JSONL


def jsonl_line(row: Any, *, default: Any = None) -> str:
    """One JSONL line (with its newline). Raw U+2028 etc. are safe: readers split on "\\n" only."""
    return json.dumps(row, ensure_ascii=False, default=default) + "\n"


def jsonl_text(rows: Iterable[Any], *, default: Any = None) -> str:
    return "".join(jsonl_line(r, default=default) for r in rows)


def jsonl_rows(text: str, shown: str | Path) -> Iterator[tuple[int, dict]]:
    """(line number, object) for each non-blank line of JSONL text; a bad line is a DataError naming
    the file and line (invalid JSON, not an object, nested too deeply, a lone surrogate escape)."""
    for number, raw in enumerate(text.split("\n"), start=1):
        if not raw.strip():
            continue
        try:
            row = json.loads(raw)
        except json.JSONDecodeError as exc:
            raise DataError(file=shown, line=number, expected="a JSON object",
                            got=f"invalid JSON ({exc.msg} at column {exc.colno})") from None
        except RecursionError:  # json's decoder recurses once per nesting level
            raise DataError(file=shown, line=number, expected="a JSON object nested at most a few hundred levels",
                            got="nesting too deep to read") from None
        if not isinstance(row, dict):
            raise DataError(file=shown, line=number, expected="a JSON object", got=describe(row))
        if "\\u" in raw and not _encodable(row):  # an escaped lone surrogate (\ud800) is no text
            raise DataError(file=shown, line=number, expected="valid Unicode text",
                            got="a lone surrogate escape (e.g. \\ud800) that no UTF-8 text can hold")
        yield number, row


def _encodable(row: dict) -> bool:
    try:
        json.dumps(row, ensure_ascii=False).encode("utf-8")
    except (UnicodeEncodeError, RecursionError):
        return False
    return True


def read_jsonl(path: Path | str) -> list[dict] | None:
    """The objects of a JSONL file written by autodiff, or None when there is no such file."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return None
    return [row for _, row in jsonl_rows(text, path)]
