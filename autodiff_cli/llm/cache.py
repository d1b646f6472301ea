"""The model-call cache: a thin layer on diskcache, or on Redis to share it between machines.

Keys are the sha256 of a canonical JSON payload that the client builds from everything that
changes a reply (provider, model identity, messages, generation params, response format) and
never from secrets. Only successful, non-empty replies are stored.

`open_cache()` picks the backend: `$AUTODIFF_CACHE_URL` (redis://, rediss:// or unix://) selects
`RedisCallCache` (the optional `redis` package, `pip install "autodiff-cli[redis]"`), so CI runners
share their calls; otherwise `CallCache` on disk under `$AUTODIFF_CACHE/calls`. Both have the same
get/put/stats/clear; in Redis every entry is `autodiff:calls:<sha256>` = the reply as JSON, and
`clear` deletes those keys only.
"""
from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from autodiff_cli.errors import UsageError, redact_url, scrub_url_secret

SIZE_LIMIT = 2 * 1024**3
CACHE_URL_ENV = "AUTODIFF_CACHE_URL"
REDIS_PREFIX = "autodiff:calls:"


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


def open_cache(environ: Mapping[str, str] = os.environ) -> CallCache | RedisCallCache:
    """The call cache the environment selects: Redis at `$AUTODIFF_CACHE_URL` (checked now: a missing
    package or an unreachable server is a UsageError, exit 2), else the disk cache."""
    url = (environ.get(CACHE_URL_ENV) or "").strip()
    if not url:
        return CallCache(environ=environ)
    cache = RedisCallCache(url)
    cache.ping()
    return cache


class RedisCallCache:
    """The call cache in Redis: `<prefix><sha256 key>` -> the reply as JSON (no expiry: bound the server's
    memory with its own `maxmemory` and an LRU policy)."""

    def __init__(self, url: str, *, prefix: str = REDIS_PREFIX, retries: int = 3) -> None:
        self.url = url
        self.prefix = prefix
        self.shown_url = redact_url(url)
        try:
            import redis
            from redis.backoff import ExponentialBackoff
            from redis.retry import Retry
        except ImportError:
            raise UsageError(f"{CACHE_URL_ENV} is set ({self.shown_url}) but the `redis` package is not installed",
                             hint='Install it with `pip install "autodiff-cli[redis]"`, or unset '
                                  f"{CACHE_URL_ENV} to use the cache on disk.") from None
        self._errors = (redis.RedisError, OSError)
        try:
            self._client = redis.Redis.from_url(
                url, socket_connect_timeout=5, socket_timeout=30, health_check_interval=30,
                retry=Retry(ExponentialBackoff(cap=2.0, base=0.1), retries))
        except ValueError:  # not a Redis URL
            raise UsageError(key=CACHE_URL_ENV, expected="a redis://, rediss:// or unix:// URL, e.g. "
                             "redis://127.0.0.1:6379/0", got=self.shown_url) from None

    key = staticmethod(CallCache.key)

    def ping(self) -> None:
        self._do(self._client.ping)

    def get(self, key: str) -> dict | None:
        raw = self._do(self._client.get, self.prefix + key)
        if raw is None:
            return None
        try:
            value = json.loads(raw)
        except (ValueError, RecursionError):
            return None  # not ours, or damaged: a miss
        return value if storable(value) else None

    def put(self, key: str, value: dict) -> bool:
        """Store a reply; refuses (returns False) errors and empty replies."""
        if not storable(value):
            return False
        self._do(self._client.set, self.prefix + key, canonical_json(value).encode("utf-8"))
        return True

    def stats(self) -> dict[str, Any]:
        entries = size = 0
        for batch in self._batches():
            entries += len(batch)
            pipe = self._client.pipeline(transaction=False)
            for k in batch:
                pipe.strlen(k)
            size += sum(self._do(pipe.execute))
        return {"url": self.shown_url, "prefix": self.prefix, "entries": entries, "size_bytes": size}

    def clear(self) -> int:
        """Remove this cache's entries (keys under the prefix, nothing else); returns how many."""
        removed = 0
        for batch in self._batches():
            removed += self._do(self._client.unlink, *batch)
        return removed

    def close(self) -> None:
        self._client.close()

    def _batches(self, count: int = 500):
        """The keys under the prefix, a SCAN page at a time."""
        cursor, match = 0, _glob_escape(self.prefix) + "*"
        while True:
            cursor, keys = self._do(self._client.scan, cursor, match, count)
            if keys:
                yield keys
            if int(cursor) == 0:
                return

    def _do(self, fn, *args):
        try:
            return fn(*args)
        except self._errors as e:
            detail = scrub_url_secret(f"{type(e).__name__}: {e}", self.url)
            raise UsageError(f"the call cache at {self.shown_url} ({CACHE_URL_ENV}) cannot be used: {detail}",
                             hint=f"Start the Redis server or fix {CACHE_URL_ENV}; unset it to use the cache on "
                                  "disk, or pass --no-cache.") from None


def _glob_escape(text: str) -> str:
    return "".join("\\" + c if c in "*?[]\\" else c for c in text)


def storable(value: Any) -> bool:
    if not isinstance(value, dict) or value.get("error"):
        return False
    text = value.get("text")
    return isinstance(text, str) and text.strip() != ""
