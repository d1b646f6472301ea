"""The Redis call cache ($AUTODIFF_CACHE_URL), against a real redis-server started here.

Skipped only when `redis-server` is missing and AUTODIFF_REQUIRE_REDIS is unset (CI sets it and
installs the server, so there a missing server fails)."""
from __future__ import annotations

import json
import os
import re
import shutil
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from autodiff_cli.errors import ModelCallError, UsageError
from autodiff_cli.llm import fake
from autodiff_cli.llm.cache import (
    REDIS_PREFIX,
    CallCache,
    RedisCallCache,
    open_cache,
    redact_url,
)
from autodiff_cli.llm.client import ModelClient
from autodiff_cli.llm.usage import Usage
from autodiff_cli.spec.models import ModelConfig

SECRET = "sk-redis-test-secret-987654321"
SERVER = shutil.which("redis-server")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def redis_url(tmp_path_factory):
    if SERVER is None:
        if os.environ.get("AUTODIFF_REQUIRE_REDIS"):
            pytest.fail("redis-server is not installed but AUTODIFF_REQUIRE_REDIS is set")
        pytest.skip("redis-server is not installed (apt-get install redis-server)")
    import redis  # the `redis` package is in the dev extra: its absence is a failure, not a skip

    workdir = tmp_path_factory.mktemp("redis")
    port = free_port()
    proc = subprocess.Popen([SERVER, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
                             "--dir", str(workdir)], cwd=workdir, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
    url = f"redis://127.0.0.1:{port}/0"
    try:
        client = redis.Redis.from_url(url)
        deadline = time.monotonic() + 20
        while True:
            try:
                client.ping()
                break
            except redis.ConnectionError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"redis-server did not start (exit {proc.poll()})") from None
                time.sleep(0.05)
        client.close()
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@pytest.fixture
def raw(redis_url):
    """A plain client on the test server, flushed before each test."""
    import redis

    client = redis.Redis.from_url(redis_url)
    client.flushdb()
    yield client
    client.close()


@pytest.fixture(autouse=True)
def _fresh():
    fake.reset_fake_state()
    yield
    fake.reset_fake_state()


REPLY = {"v": 1, "text": "Answer: 3", "model": "fake", "prompt_tokens": 4, "completion_tokens": 2}


def test_two_runners_share_hits_and_refuse_errors_and_empties(redis_url, raw):
    a, b = RedisCallCache(redis_url), RedisCallCache(redis_url)  # two machines' caches
    key = a.key({"model": "m", "messages": [{"role": "user", "content": "hi"}]})
    assert a.get(key) is None and b.get(key) is None
    assert a.put(key, REPLY) is True
    assert b.get(key) == REPLY  # the other runner hits
    assert json.loads(raw.get(REDIS_PREFIX + key)) == REPLY  # the value is the reply as JSON

    empty, error = a.key({"n": 1}), a.key({"n": 2})
    assert a.put(empty, {**REPLY, "text": "  "}) is False
    assert a.put(error, {**REPLY, "error": "boom"}) is False
    assert raw.get(REDIS_PREFIX + empty) is None and raw.get(REDIS_PREFIX + error) is None
    raw.set(REDIS_PREFIX + empty, b"not json")  # a damaged entry is a miss, never an error
    assert b.get(empty) is None


def test_stats_and_clear_touch_our_keys_only(redis_url, raw):
    cache = RedisCallCache(redis_url)
    raw.set("someone:else", b"keep me")
    for i in range(7):
        cache.put(cache.key({"i": i}), {**REPLY, "text": f"reply {i}"})
    stats = cache.stats()
    assert stats["entries"] == 7 and stats["size_bytes"] > 7 * 20 and stats["url"] == redis_url
    assert cache.clear() == 7
    assert cache.stats()["entries"] == 0
    assert raw.get("someone:else") == b"keep me"


def test_the_client_stores_only_good_replies(redis_url, raw, tmp_path):
    (tmp_path / "script.yaml").write_text(textwrap.dedent("""
        rules:
          - {match: "^empty", error: empty}
          - {match: "^down", error: 500}
        default: "Answer: 3"
    """))
    model = ModelConfig(model="fake/script.yaml", max_retries=1, api_key_env="SECRET_VAR")

    def client() -> ModelClient:
        return ModelClient({"m": model}, config_dir=tmp_path, usage=Usage(), cache=RedisCallCache(redis_url),
                           environ={"SECRET_VAR": SECRET}, base_delay=0.0)

    import asyncio

    async def run(c: ModelClient, text: str):
        return await c.complete("m", [{"role": "user", "content": text}])

    first = client()
    assert asyncio.run(run(first, "count")).cache_hit is False
    for text in ("empty", "down"):
        with pytest.raises(ModelCallError):
            asyncio.run(run(first, text))
    keys = raw.keys("*")
    assert len(keys) == 1 and re.fullmatch(rb"autodiff:calls:[0-9a-f]{64}", keys[0])
    second = client()
    assert asyncio.run(run(second, "count")).cache_hit is True
    assert second.usage.to_dict()["task"]["cached_calls"] == 1


def cli(*args, env, cwd=None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "autodiff_cli.app.cli", *map(str, args)], capture_output=True, text=True,
                          env=env, cwd=cwd, timeout=120)


SPEC = """\
name: shared
models:
  task: {model: fake/script.yaml, temperature: 0, api_key_env: SECRET_VAR}
data:
  train: rows.jsonl
  val: rows.jsonl
nodes:
  count:
    kind: llm
    user: "{{ input.question }}"
  parse:
    kind: function
    fn: last_integer
    args: {text: count}
output: parse
metric: {fn: exact_match, args: {pred: parse, target: input.answer}}
"""


def runner(root: Path) -> Path:
    """One CI runner's checkout: the spec, the fake model's script and the data."""
    root.mkdir()
    (root / "spec.yaml").write_text(SPEC)
    (root / "script.yaml").write_text("rules:\n  - {match: '^How many', reply: 'Answer: 3'}\ndefault: 'no'\n")
    (root / "rows.jsonl").write_text("".join(json.dumps({"id": f"r{i}", "question": f"How many {i}?", "answer": "3"})
                                             + "\n" for i in range(6)))
    return root


def test_two_cli_runners_share_the_cache_and_cache_commands_work(redis_url, raw, tmp_path):
    base = {**os.environ, "AUTODIFF_CACHE_URL": redis_url, "SECRET_VAR": SECRET}
    one, two = runner(tmp_path / "one"), runner(tmp_path / "two")
    env_one = {**base, "AUTODIFF_CACHE": str(tmp_path / "disk-one")}  # each runner's own disk, unused
    env_two = {**base, "AUTODIFF_CACHE": str(tmp_path / "disk-two")}

    cold = cli("eval", one / "spec.yaml", "--json", env=env_one)
    assert cold.returncode == 0, cold.stderr
    usage = json.loads(cold.stdout.strip().splitlines()[-1])["usage"]["task"]
    assert (usage["calls"], usage["cached_calls"]) == (6, 0)
    warm = cli("eval", two / "spec.yaml", "--json", env=env_two)
    assert warm.returncode == 0, warm.stderr
    report = json.loads(warm.stdout.strip().splitlines()[-1])
    assert report["score"] == 1.0 and (report["usage"]["task"]["calls"], report["usage"]["task"]["cached_calls"]) == (0, 6)
    assert not (tmp_path / "disk-one").exists() and not (tmp_path / "disk-two").exists()

    # keys are hashes under our prefix; neither keys nor values hold the API key
    keys = raw.keys("*")
    assert len(keys) == 6 and all(re.fullmatch(rb"autodiff:calls:[0-9a-f]{64}", k) for k in keys)
    assert all(SECRET.encode() not in k + raw.get(k) for k in keys)

    stats = cli("cache", "stats", env=env_two)
    assert stats.returncode == 0, stats.stderr
    assert f"redis: {redis_url}" in stats.stdout and "entries: 6" in stats.stdout
    raw.set("not:ours", b"x")
    cleared = cli("cache", "clear", env=env_one)
    assert cleared.returncode == 0 and "removed 6 cached replies" in cleared.stdout
    assert raw.keys("*") == [b"not:ours"]
    assert "entries: 0" in cli("cache", "stats", env=env_one).stdout
    for r in (cold, warm, stats, cleared):
        assert SECRET not in r.stdout + r.stderr


def assert_clean_usage_error(r: subprocess.CompletedProcess, *fragments: str) -> None:
    assert r.returncode == 2, (r.returncode, r.stdout, r.stderr)
    assert "Traceback" not in r.stderr and r.stderr.startswith("error: ")
    for fragment in fragments:
        assert fragment in r.stderr, (fragment, r.stderr)


def test_unreachable_server_is_a_clear_error_without_the_password(tmp_path):
    closed = free_port()
    env = {**os.environ, "AUTODIFF_CACHE_URL": f"redis://:hunter2-{SECRET}@127.0.0.1:{closed}/0",
           "SECRET_VAR": SECRET}
    root = runner(tmp_path / "r")
    for args in (("eval", root / "spec.yaml"), ("cache", "stats"), ("cache", "clear")):
        r = cli(*args, env=env)
        assert_clean_usage_error(r, "AUTODIFF_CACHE_URL", f"redis://:***@127.0.0.1:{closed}/0", "cannot be used")
        assert "hunter2" not in r.stdout + r.stderr
    # --no-cache never opens it
    r = cli("eval", root / "spec.yaml", "--no-cache", "--json", env=env)
    assert r.returncode == 0, r.stderr


def test_not_a_redis_url(tmp_path):
    r = cli("cache", "stats", env={**os.environ, "AUTODIFF_CACHE_URL": "http://127.0.0.1:6379"})
    assert_clean_usage_error(r, "AUTODIFF_CACHE_URL: expected a redis://")


def test_missing_redis_package_is_a_clear_error(tmp_path):
    code = ("import sys; sys.modules['redis'] = None\n"  # as if the package were not installed
            "from autodiff_cli.app.cli import main\n"
            "sys.argv = ['autodiff', 'cache', 'stats']\n"
            "main()\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60,
                       env={**os.environ, "AUTODIFF_CACHE_URL": "redis://127.0.0.1:6379/0"})
    assert_clean_usage_error(r, "`redis` package is not installed", 'pip install "autodiff-cli[redis]"')


def test_server_lost_mid_run_is_a_clear_error(redis_url, raw):
    cache = RedisCallCache(f"redis://127.0.0.1:{free_port()}/0", retries=1)
    with pytest.raises(UsageError) as info:
        cache.get("0" * 64)
    assert "cannot be used" in info.value.message


def test_backend_selection_and_redaction(redis_url, tmp_path):
    assert isinstance(open_cache({"AUTODIFF_CACHE": str(tmp_path)}), CallCache)
    assert isinstance(open_cache({"AUTODIFF_CACHE_URL": " "}), CallCache)
    assert isinstance(open_cache({"AUTODIFF_CACHE_URL": redis_url}), RedisCallCache)
    assert redact_url("redis://user:pw@h:1/0") == "redis://user:***@h:1/0"
    assert redact_url("redis://h:1/0") == "redis://h:1/0"
