"""ModelClient through the real litellm path, with the scripted fake provider."""
from __future__ import annotations

import asyncio
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from autodiff_cli.errors import (
    EXIT_MODEL_ERRORS,
    ModelCallError,
    ModelNotFound,
    SpecError,
)
from autodiff_cli.llm import fake
from autodiff_cli.llm.cache import CallCache
from autodiff_cli.llm.client import ModelClient, is_retryable, retry_after_seconds
from autodiff_cli.llm.usage import ROLES, Usage
from autodiff_cli.spec.models import ModelConfig

SECRET = "sk-test-PLANTED-0123456789abcdef"

SCRIPT = """
rules:
  - {match: "^flaky500", fail_times: 2, error: 500, reply: "recovered"}
  - {match: "^flaky429", fail_times: 2, error: 429, retry_after: 0.2, reply: "recovered"}
  - {match: "^flakyempty", fail_times: 1, error: empty, reply: "recovered"}
  - {match: "^always500", error: 500}
  - {match: "^alwaysempty", error: empty}
  - {match: "^auth", error: auth}
  - {match: "^context", error: context_length}
  - {match: "^badrequest", error: 400}
  - {match: "^timeout", error: timeout}
  - {match: "^connection", fail_times: 1, error: connection, reply: "recovered"}
default: "the answer"
"""


@pytest.fixture(autouse=True)
def _isolated(tmp_path, monkeypatch):
    monkeypatch.setenv("AUTODIFF_CACHE", str(tmp_path / "cache-root"))
    fake.reset_fake_state()
    yield
    fake.reset_fake_state()


def write_script(tmp_path, text=SCRIPT, name="script.yaml"):
    path = tmp_path / name
    path.write_text(textwrap.dedent(text))
    return path


def make_client(tmp_path, *, cache=True, environ=None, client_concurrency=None, **model):
    model.setdefault("model", "fake/script.yaml")
    models = {"m": ModelConfig(**model)}
    return ModelClient(
        models,
        config_dir=tmp_path,
        usage=Usage(),
        cache=CallCache(tmp_path / "calls") if cache else None,
        concurrency=client_concurrency,
        environ=environ if environ is not None else {},
        base_delay=0.0,
    )


def ask(client, text, **kwargs):
    return asyncio.run(client.complete("m", [{"role": "user", "content": text}], **kwargs))


def task_usage(client):
    return client.usage.to_dict()["task"]


@pytest.mark.parametrize("text", ["flaky500", "flaky429", "flakyempty", "connection"])
def test_retryable_failures_are_retried_and_counted(tmp_path, text):
    write_script(tmp_path)
    client = make_client(tmp_path, max_retries=3)
    completion = ask(client, text)
    assert completion.text == "recovered"
    fails = 1 if text in ("flakyempty", "connection") else 2
    assert completion.attempts == fails + 1
    usage = task_usage(client)
    assert (usage["calls"], usage["errors"], usage["cached_calls"]) == (fails + 1, fails, 0)
    assert usage["completion_tokens"] == 1  # "recovered"; the empty reply adds 0


def test_retry_after_is_honoured_over_backoff(tmp_path):
    write_script(tmp_path)
    client = make_client(tmp_path, max_retries=3)
    client.base_delay = 60.0  # the backoff would take minutes: the 0.2 s Retry-After must win
    started = time.monotonic()
    assert ask(client, "flaky429").text == "recovered"
    elapsed = time.monotonic() - started
    assert 0.4 <= elapsed < 10


def test_backoff_grows_and_is_capped(tmp_path):
    client = make_client(tmp_path)
    client.base_delay, client.max_delay = 1.0, 3.0
    delays = [client._delay(n, RuntimeError()) for n in (1, 2, 3, 4, 5)]
    assert 0.5 <= delays[0] <= 1.0 and 1.0 <= delays[1] <= 2.0
    assert all(1.5 <= d <= 3.0 for d in delays[2:])


def test_gives_up_after_max_retries(tmp_path):
    write_script(tmp_path)
    client = make_client(tmp_path, max_retries=2)
    with pytest.raises(ModelCallError) as info:
        ask(client, "always500")
    assert info.value.attempts == 3
    assert info.value.exit_code == EXIT_MODEL_ERRORS
    assert task_usage(client)["calls"] == 3 and task_usage(client)["errors"] == 3


def test_always_empty_fails_and_is_not_cached(tmp_path):
    write_script(tmp_path)
    client = make_client(tmp_path, max_retries=1)
    for _ in range(2):
        with pytest.raises(ModelCallError, match="empty reply"):
            ask(client, "alwaysempty")
    assert task_usage(client)["calls"] == 4 and task_usage(client)["errors"] == 4
    assert client.cache.stats()["entries"] == 0


@pytest.mark.parametrize("text", ["auth", "context", "badrequest"])
def test_non_retryable_errors_fail_at_once(tmp_path, text):
    write_script(tmp_path)
    client = make_client(tmp_path, max_retries=5)
    with pytest.raises(ModelCallError) as info:
        ask(client, text)
    assert info.value.attempts == 1
    usage = task_usage(client)
    assert (usage["calls"], usage["errors"]) == (1, 1)


def test_timeouts_are_retried(tmp_path):
    write_script(tmp_path)
    client = make_client(tmp_path, max_retries=1)
    with pytest.raises(ModelCallError, match="Timeout") as info:
        ask(client, "timeout")
    assert info.value.attempts == 2


def test_our_own_timeout_applies_to_slow_providers(tmp_path):
    write_script(tmp_path, "rules: []\nlatency: 1.0\n")
    client = make_client(tmp_path, max_retries=1, timeout=0.05)
    started = time.monotonic()
    with pytest.raises(ModelCallError, match="no reply within 0.05 s"):
        ask(client, "slow")
    assert time.monotonic() - started < 0.9
    assert task_usage(client)["errors"] == 2


def test_error_message_is_one_line_and_names_everything(tmp_path):
    write_script(tmp_path)
    client = make_client(tmp_path, max_retries=1)
    with pytest.raises(ModelCallError) as info:
        asyncio.run(client.complete("m", [{"role": "user", "content": "always500"}], role="backward"))
    text = str(info.value)
    assert "\n" not in text
    assert text.startswith("error: model call failed: model `m` (fake/script.yaml)")
    assert "role backward" in text and "2 attempts" in text and "InternalServerError" in text
    assert client.usage.to_dict()["backward"]["calls"] == 2


def test_api_key_reaches_provider_but_never_errors_or_cache(tmp_path, monkeypatch):
    from autodiff_cli.llm.providers import load_litellm

    litellm = load_litellm()
    write_script(tmp_path)
    client = make_client(tmp_path, environ={"MY_KEY": SECRET}, api_key_env="MY_KEY", max_retries=1)
    seen = []
    real = litellm.acompletion

    async def echoing_provider(**kwargs):
        seen.append(kwargs.get("api_key"))
        if kwargs["messages"][-1]["content"] == "leak":
            # Some providers echo the key they were given.
            raise litellm.AuthenticationError(f"Incorrect API key provided: {kwargs['api_key']}",
                                              llm_provider="openai", model="m")
        return await real(**kwargs)

    monkeypatch.setattr(litellm, "acompletion", echoing_provider)
    assert ask(client, "hello").text == "the answer"
    with pytest.raises(ModelCallError) as info:
        ask(client, "leak")
    assert seen == [SECRET, SECRET]
    assert SECRET not in str(info.value) and SECRET not in repr(info.value.args)
    assert "Incorrect API key provided: ***" in str(info.value)
    client.cache.close()
    for path in tmp_path.rglob("*"):
        if path.is_file():
            assert SECRET.encode() not in path.read_bytes(), path


def test_cache_hit_on_identical_call(tmp_path):
    script = write_script(tmp_path)
    client = make_client(tmp_path, temperature=0.0)
    first = ask(client, "question")
    second = ask(client, "question")
    assert not first.cache_hit and second.cache_hit
    assert second.text == first.text and second.attempts == 0 and second.cost_usd == 0.0
    usage = task_usage(client)
    assert (usage["calls"], usage["cached_calls"]) == (1, 1)
    assert usage["prompt_tokens"] == first.prompt_tokens  # a hit adds no tokens
    assert fake.fake_stats(script)["calls"] == 1


def test_failed_calls_are_not_cached(tmp_path):
    write_script(tmp_path)
    client = make_client(tmp_path, max_retries=0)
    for _ in range(2):
        with pytest.raises(ModelCallError):
            ask(client, "always500")
    assert task_usage(client)["calls"] == 2 and task_usage(client)["cached_calls"] == 0


def test_cache_key_ignores_api_key_but_follows_model_identity_and_params(tmp_path):
    script = write_script(tmp_path)
    a = make_client(tmp_path, environ={"K": "key-one-1111"}, api_key_env="K")
    b = make_client(tmp_path, environ={"K": "key-two-2222"}, api_key_env="K")
    ask(a, "q")
    assert ask(b, "q").cache_hit, "the API key must not be part of the cache key"
    assert not ask(make_client(tmp_path, temperature=0.7), "q").cache_hit
    assert not ask(a, "q", json_schema={"type": "object"}).cache_hit
    script.write_text(SCRIPT + "latency: 0\n")  # a different script is a different model
    assert not ask(a, "q").cache_hit


def test_a_salt_joins_the_cache_key_only_when_given(tmp_path):
    write_script(tmp_path)
    client = make_client(tmp_path)
    target = client._target("m")
    messages = [{"role": "user", "content": "q"}]
    plain = asyncio.run(client._cache_payload(target, messages, None))
    assert "salt" not in plain and plain == asyncio.run(client._cache_payload(target, messages, None, None))
    ask(client, "q")
    assert ask(client, "q").cache_hit
    assert not ask(client, "q", salt=1).cache_hit and not ask(client, "q", salt=2).cache_hit
    assert ask(client, "q", salt=1).cache_hit


def test_added_model_configs_are_callable(tmp_path):
    write_script(tmp_path)
    client = make_client(tmp_path)
    client.add_model("m@hot", client.models["m"].model_copy(update={"temperature": 0.7}))
    assert asyncio.run(client.complete("m@hot", [{"role": "user", "content": "q"}], role="teacher")).text == "the answer"
    assert client.usage.to_dict()["teacher"]["calls"] == 1


def test_no_cache_means_every_call_is_sent(tmp_path):
    script = write_script(tmp_path)
    client = make_client(tmp_path, cache=False)
    ask(client, "q")
    ask(client, "q")
    assert fake.fake_stats(script)["calls"] == 2 and task_usage(client)["cached_calls"] == 0


async def _many(client, n, model="m"):
    return await asyncio.gather(*(client.complete(model, [{"role": "user", "content": f"q{i}"}]) for i in range(n)))


def test_concurrency_limit_from_config(tmp_path):
    script = write_script(tmp_path, "rules: []\nlatency: 0.05\n")
    client = make_client(tmp_path, cache=False, concurrency=3)
    asyncio.run(_many(client, 12))
    assert fake.fake_stats(script)["max_in_flight"] == 3


def test_concurrency_argument_overrides_config(tmp_path):
    script = write_script(tmp_path, "rules: []\nlatency: 0.05\n")
    models = {"m": ModelConfig(model="fake/script.yaml", concurrency=8)}
    client = ModelClient(models, config_dir=tmp_path, usage=Usage(), cache=None, concurrency=2, environ={})
    asyncio.run(_many(client, 8))
    assert fake.fake_stats(script)["max_in_flight"] == 2


def test_relative_fake_path_resolves_against_config_dir(tmp_path, monkeypatch):
    (tmp_path / "cfg").mkdir()
    write_script(tmp_path / "cfg", "rules: []\ndefault: here\n", name="s.yaml")
    monkeypatch.chdir(tmp_path)
    models = {"m": ModelConfig(model="fake/s.yaml")}
    client = ModelClient(models, config_dir=tmp_path / "cfg", usage=Usage(), cache=None, environ={})
    assert ask(client, "x").text == "here"


def test_check_reports_what_is_missing(tmp_path):
    write_script(tmp_path)
    models = {
        "ok": ModelConfig(model="fake/script.yaml"),
        "noscript": ModelConfig(model="fake/missing.yaml"),
        "nokey": ModelConfig(model="openai/gpt-4o-mini", api_key_env="NOT_SET_ANYWHERE"),
        "withkey": ModelConfig(model="openai/gpt-4o-mini", api_key_env="SET_KEY"),
        "nofile": ModelConfig(model="local/does/not/exist.gguf"),
    }
    client = ModelClient(models, config_dir=tmp_path, usage=Usage(), cache=None, environ={"SET_KEY": "x"})
    client.check("ok")
    client.check("withkey")
    with pytest.raises(SpecError, match="no model config named `nope`"):
        client.check("nope")
    with pytest.raises(ModelNotFound, match="missing.yaml") as info:
        client.check("noscript")
    assert info.value.key == "models.noscript.model"
    with pytest.raises(SpecError, match="NOT_SET_ANYWHERE") as info:
        client.check("nokey")
    assert info.value.key == "models.nokey.api_key_env"
    with pytest.raises(ModelNotFound):
        client.check("nofile")


def test_unknown_role_is_refused(tmp_path):
    write_script(tmp_path)
    with pytest.raises(ValueError, match="unknown usage role"):
        ask(make_client(tmp_path), "q", role="critic")


def test_usage_roundtrip_and_add():
    u = Usage()
    u.record("task", calls=2, errors=1, prompt_tokens=10, completion_tokens=3, cost_usd=0.5)
    u.record("optimizer", cached_calls=4)
    d = u.to_dict()
    assert list(d) == list(ROLES)
    assert list(d["task"]) == ["calls", "cached_calls", "errors", "prompt_tokens", "completion_tokens", "cost_usd",
                               "unsent"]
    assert Usage.from_dict(d) == u
    total = Usage().add(u).add(u)
    assert total.total_calls() == 4 and total.to_dict()["optimizer"]["cached_calls"] == 8
    assert Usage.from_dict({"task": {"calls": 1}}).to_dict()["teacher"]["calls"] == 0


def test_retry_classification():
    from autodiff_cli.llm.providers import load_litellm

    litellm = load_litellm()
    common = {"llm_provider": "x", "model": "y"}
    assert is_retryable(litellm.RateLimitError("r", **common))
    assert is_retryable(litellm.InternalServerError("i", **common))
    assert is_retryable(litellm.ServiceUnavailableError("s", **common))
    assert is_retryable(litellm.APIConnectionError("c", **common))
    assert is_retryable(litellm.Timeout("t", **common))
    assert not is_retryable(litellm.AuthenticationError("a", **common))
    assert not is_retryable(litellm.BadRequestError("b", **common))
    assert not is_retryable(litellm.NotFoundError("n", **common))
    assert not is_retryable(litellm.ContextWindowExceededError("c", **common))
    assert not is_retryable(ValueError("a bug"))


def test_retry_after_parsing():
    class E(Exception):
        pass

    e = E()
    e.retry_after = "2"
    assert retry_after_seconds(e) == 2.0
    e2 = E()
    e2.headers = {"retry-after-ms": "250"}
    assert retry_after_seconds(e2) == 0.25
    e3 = E()
    e3.headers = {"retry-after": "Wed, 21 Oct 2015 07:28:00 GMT"}
    assert retry_after_seconds(e3) == 0.0
    assert retry_after_seconds(E()) is None


def test_importing_client_and_cache_does_not_import_litellm():
    code = (
        "import sys, autodiff_cli.llm.client, autodiff_cli.llm.cache, autodiff_cli.llm.usage; "
        "bad = [m for m in ('litellm', 'llama_cpp', 'diskcache') if m in sys.modules]; "
        "assert not bad, bad"
    )
    root = Path(__file__).resolve().parents[2]
    subprocess.run([sys.executable, "-c", code], check=True, cwd=root)
