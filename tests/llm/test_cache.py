"""The call cache: keys, refusal of errors and empty replies, private directory."""
from __future__ import annotations

import stat

from autodiff_cli.llm.cache import CallCache, cache_root

PAYLOAD = {
    "provider": "fake",
    "model": {"script_sha256": "ab" * 32},
    "messages": [{"role": "user", "content": "héllo"}],
    "params": {"temperature": 0.0, "max_tokens": 5},
    "response_format": None,
}


def mode(path):
    return stat.S_IMODE(path.stat().st_mode)


def test_key_is_canonical_and_sensitive_to_content():
    reordered = dict(reversed(list(PAYLOAD.items())))
    assert CallCache.key(PAYLOAD) == CallCache.key(reordered)
    assert len(CallCache.key(PAYLOAD)) == 64
    for change in (
        {"model": {"script_sha256": "cd" * 32}},
        {"messages": [{"role": "user", "content": "hello"}]},
        {"params": {"temperature": 0.5, "max_tokens": 5}},
        {"response_format": {"type": "json_object"}},
        {"provider": "local"},
    ):
        assert CallCache.key({**PAYLOAD, **change}) != CallCache.key(PAYLOAD), change


def test_default_directory_comes_from_environment(tmp_path):
    root = tmp_path / "root"
    assert cache_root({"AUTODIFF_CACHE": str(root)}) == root
    assert CallCache(environ={"AUTODIFF_CACHE": str(root)}).directory == root / "calls"


def test_directories_created_lazily_with_mode_0700(tmp_path):
    root = tmp_path / "new" / "root"
    cache = CallCache(environ={"AUTODIFF_CACHE": str(root)})
    assert not root.exists()
    assert cache.get("missing") is None and cache.stats()["entries"] == 0 and cache.clear() == 0
    assert not root.exists(), "reads must not create the cache"
    assert cache.put("k", {"text": "reply"})
    assert mode(root) == 0o700
    assert mode(root / "calls") == 0o700
    assert mode(tmp_path / "new") == 0o700


def test_put_get_stats_clear(tmp_path):
    cache = CallCache(tmp_path / "calls")
    value = {"text": "ok", "prompt_tokens": 3, "completion_tokens": 1, "model": "fake/x"}
    assert cache.put("k1", value)
    assert cache.get("k1") == value
    assert cache.get("k2") is None
    stats = cache.stats()
    assert stats["entries"] == 1 and stats["size_bytes"] > 0 and stats["directory"] == str(tmp_path / "calls")
    # A second instance (another process) sees the same entry.
    assert CallCache(tmp_path / "calls").get("k1") == value
    assert cache.clear() == 1
    assert cache.get("k1") is None


def test_errors_and_empty_replies_are_never_stored(tmp_path):
    cache = CallCache(tmp_path / "calls")
    for bad in ({"text": ""}, {"text": "   \n"}, {"text": None}, {"error": "boom"}, {"text": "x", "error": "500"}, {}):
        assert cache.put("k", bad) is False
        assert cache.get("k") is None
    assert cache.stats()["entries"] == 0
