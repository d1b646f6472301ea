"""The model-call cache: a thin layer on diskcache.

Keys are the sha256 of a canonical JSON payload that the client builds from everything that
changes a reply (provider, model identity, messages, generation params, response format) and
never from secrets. Only successful, non-empty replies are stored.
"""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any, Mapping

SIZE_LIMIT = 2 * 1024**3


def cache_root(environ: Mapping[str, str] = os.environ) -> Path:
    """`$AUTODIFF_CACHE`, default `~/.cache/autodiff`."""
    value = environ.get("AUTODIFF_CACHE")
    return Path(value).expanduser() if value else Path.home() / ".cache" / "autodiff"


def ensure_private_dir(path: Path) -> Path:
    """Create `path` (and missing parents) with mode 0700; existing directories are left as they are."""
    missing = []
    for p in (path, *path.parents):
        if p.exists():
            break
        missing.append(p)
    for p in reversed(missing):
        p.mkdir(mode=0o700, exist_ok=True)
        os.chmod(p, 0o700)  # mkdir's mode is filtered by the umask
    return path


def canonical_json(payload: Any) -> str:
    return json.dumps(payload, sort_keys=True, separators=(",", ":"), ensure_ascii=False)


class CallCache:
    """Cache of model replies in `<directory>` (default `$AUTODIFF_CACHE/calls`), opened on first use."""

    def __init__(
        self,
        directory: str | Path | None = None,
        *,
        environ: Mapping[str, str] = os.environ,
        size_limit: int = SIZE_LIMIT,
    ) -> None:
        self.directory = Path(directory) if directory is not None else cache_root(environ) / "calls"
        self.size_limit = size_limit
        self._cache = None

    @staticmethod
    def key(payload: dict) -> str:
        return hashlib.sha256(canonical_json(payload).encode("utf-8")).hexdigest()

    def get(self, key: str) -> dict | None:
        if self._cache is None and not self.directory.exists():
            return None
        value = self._open().get(key)
        return value if isinstance(value, dict) else None

    def put(self, key: str, value: dict) -> bool:
        """Store a reply; refuses (returns False) errors and empty replies."""
        if not storable(value):
            return False
        self._open().set(key, value)
        return True

    def stats(self) -> dict[str, Any]:
        if self._cache is None and not self.directory.exists():
            return {"directory": str(self.directory), "entries": 0, "size_bytes": 0}
        cache = self._open()
        return {"directory": str(self.directory), "entries": len(cache), "size_bytes": cache.volume()}

    def clear(self) -> int:
        """Remove every entry; returns how many were removed."""
        if self._cache is None and not self.directory.exists():
            return 0
        return self._open().clear()

    def close(self) -> None:
        if self._cache is not None:
            self._cache.close()
            self._cache = None

    def _open(self):
        if self._cache is None:
            import diskcache  # lazily: keeps `autodiff --help` fast

            ensure_private_dir(self.directory)
            os.chmod(self.directory, 0o700)
            self._cache = diskcache.Cache(str(self.directory), size_limit=self.size_limit)
        return self._cache


def storable(value: Any) -> bool:
    if not isinstance(value, dict) or value.get("error"):
        return False
    text = value.get("text")
    return isinstance(text, str) and text.strip() != ""
