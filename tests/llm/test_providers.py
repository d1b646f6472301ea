"""The provider contract (llm/providers/base.py): each provider's target, cache identity, cost and
concurrency; the registry; cache keys byte-identical to those before providers became a registry; and
a provider added the documented way (one module, one registry line) working through the client."""
from __future__ import annotations

import asyncio
import hashlib
import importlib.util
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
from pydantic import ValidationError

from autodiff_cli.errors import ModelNotFound, SpecError
from autodiff_cli.llm import fake, local
from autodiff_cli.llm.cache import CallCache
from autodiff_cli.llm.client import ModelClient
from autodiff_cli.llm.providers import registry
from autodiff_cli.llm.providers.base import InProcessProvider, Target
from autodiff_cli.llm.providers.fake import FakeProvider
from autodiff_cli.llm.providers.gateway import call_id_of, load_litellm, request_sent
from autodiff_cli.llm.providers.litellm_http import LiteLLMProvider
from autodiff_cli.llm.providers.local import LocalProvider
from autodiff_cli.llm.usage import Usage
from autodiff_cli.spec.models import ModelConfig

ROOT = Path(__file__).resolve().parents[2]
SCRIPT_BYTES = b"rules: []\ndefault: pinned\n"
GGUF_BYTES = b"GGUF pinned weights"


@pytest.fixture(autouse=True)
def _fresh():
    fake.reset_fake_state()
    yield
    fake.reset_fake_state()


@pytest.fixture
def llama_cpp_present(monkeypatch):
    """`local/` resolution checks that llama-cpp-python is installed; these tests need only its answer."""
    monkeypatch.setattr(local, "require_llama_cpp", lambda: None)


def resolve(model: str, tmp_path: Path, environ=None, **cfg) -> Target:
    config = ModelConfig(model=model, **cfg)
    return registry.provider_for(model).resolve("m", config, config_dir=tmp_path, environ=environ or {})


# ---------------------------------------------------------------- the registry


def test_the_registry_maps_prefixes_to_providers():
    assert isinstance(registry.provider_for("local/smollm2-135m"), LocalProvider)
    assert isinstance(registry.provider_for("fake/s.yaml"), FakeProvider)
    for model in ("openai/gpt-4o-mini", "anthropic/claude-3-haiku", "ollama_chat/qwen2.5:7b", "gpt-4o-mini"):
        assert isinstance(registry.provider_for(model), LiteLLMProvider)
    assert registry.provider_for("fake/a.yaml") is registry.provider_for("fake/b.yaml")  # one instance each
    assert [p.in_process for p in map(registry.provider_for, ("local/x", "fake/x", "openai/x"))] == [True, True, False]


@pytest.mark.parametrize("model", ["local/m.gguf", "fake/s.yaml"])
def test_a_deployment_list_is_refused_for_an_in_process_provider(model):
    with pytest.raises(ValidationError, match=f"`{model.split('/')[0]}/` model, which is not served over HTTP"):
        ModelConfig(model=model, api_base=["http://a:8000/v1", "http://b:8000/v1"])
    assert ModelConfig(model=model, api_base="http://a:8000/v1").api_base == "http://a:8000/v1"  # accepted, unused
    assert ModelConfig(model="openai/m", api_base=["http://a:8000/v1", "http://b:8000/v1"]).deployments()


# ---------------------------------------------------------------- local/


def test_local_resolves_files_and_aliases(tmp_path, llama_cpp_present):
    (tmp_path / "models").mkdir()
    (tmp_path / "models" / "tiny.gguf").write_bytes(GGUF_BYTES)
    target = resolve("local/models/tiny.gguf", tmp_path)
    assert (target.key_name, target.path) == ("local", tmp_path / "models" / "tiny.gguf")
    assert target.litellm_model == f"local/{tmp_path / 'models' / 'tiny.gguf'}"
    (tmp_path / local.QWEN_FILE).write_bytes(GGUF_BYTES)
    alias = resolve("local/qwen2.5-coder-1.5b", tmp_path, environ={"AUTODIFF_MODELS": str(tmp_path)})
    assert (alias.litellm_model, alias.path) == ("local/qwen2.5-coder-1.5b", tmp_path / local.QWEN_FILE)


def test_local_errors_name_the_model_key(tmp_path, monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(local, "resolve_local_model", lambda *a, **k: pytest.fail("llama.cpp is checked first"))
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "llama_cpp" else real(name, *a))
    with pytest.raises(ModelNotFound, match="llama-cpp-python") as info:
        resolve("local/tiny.gguf", tmp_path)
    assert info.value.key == "models.m.model"
    monkeypatch.undo()
    monkeypatch.setattr(local, "require_llama_cpp", lambda: None)
    with pytest.raises(ModelNotFound, match="missing.gguf") as info:
        resolve("local/missing.gguf", tmp_path)
    assert info.value.key == "models.m.model"


def test_local_identity_cost_concurrency_and_endpoints(tmp_path, llama_cpp_present):
    (tmp_path / "tiny.gguf").write_bytes(GGUF_BYTES)
    target = resolve("local/tiny.gguf", tmp_path, concurrency=8, api_base="http://ignored:1/v1")
    provider = target.provider
    identity = asyncio.run(provider.identity(target, {"AUTODIFF_CACHE": str(tmp_path / "cache")}))
    assert identity == {"gguf_sha256": hashlib.sha256(GGUF_BYTES).hexdigest(), "n_ctx": local.N_CTX}
    assert provider.cost(target, SimpleNamespace(_hidden_params={"response_cost": 9.0})) == 0.0
    assert provider.concurrency(target.cfg, None) == provider.concurrency(target.cfg, 16) == 1  # one model, one call
    assert provider.deployments(target.cfg) is None and provider.call_kwargs(target) == {}
    assert provider.waits_for_model and provider.warm_up_module(load_litellm(), target) is None


# ---------------------------------------------------------------- fake/


def test_fake_resolves_scripts_against_the_config_folder(tmp_path, monkeypatch):
    (tmp_path / "s.yaml").write_bytes(SCRIPT_BYTES)
    monkeypatch.chdir(ROOT)
    target = resolve("fake/s.yaml", tmp_path)
    assert (target.key_name, target.litellm_model, target.path) == ("fake", f"fake/{tmp_path / 's.yaml'}",
                                                                     tmp_path / "s.yaml")
    with pytest.raises(ModelNotFound) as info:
        resolve("fake/missing.yaml", tmp_path)
    assert info.value.key == "models.m.model"
    (tmp_path / "bad.yaml").write_text("rules: [{match: x}]\n")
    with pytest.raises(SpecError) as info:  # located in the script itself, not at the model key
        resolve("fake/bad.yaml", tmp_path)
    assert info.value.file is not None and info.value.key != "models.m.model"


def test_fake_identity_cost_concurrency_and_endpoints(tmp_path):
    (tmp_path / "s.yaml").write_bytes(SCRIPT_BYTES)
    target = resolve("fake/s.yaml", tmp_path, concurrency=5)
    provider = target.provider
    assert asyncio.run(provider.identity(target, {})) == {"script_sha256": hashlib.sha256(SCRIPT_BYTES).hexdigest()}
    assert provider.cost(target, SimpleNamespace(_hidden_params={"response_cost": 9.0})) == 0.0
    assert provider.concurrency(target.cfg, None) == 5 and provider.concurrency(target.cfg, 2) == 2
    assert provider.deployments(target.cfg) is None and provider.call_kwargs(target) == {}
    assert not provider.waits_for_model


# ---------------------------------------------------------------- every model litellm routes


def test_litellm_routed_targets_keep_the_model_string(tmp_path):
    routed = resolve("openai/gpt-4o-mini", tmp_path)
    assert (routed.key_name, routed.litellm_model, routed.path) == ("openai", "openai/gpt-4o-mini", None)
    assert resolve("gpt-4o-mini", tmp_path).key_name == ""  # litellm infers the provider


def test_litellm_routed_identity_cost_concurrency_and_endpoints(tmp_path):
    single = resolve("openai/m", tmp_path, api_base="http://a:8000/v1", concurrency=6)
    pooled = resolve("openai/m", tmp_path, concurrency=3,
                     api_base=["http://a:8000/v1", {"url": "http://b:8000/v1", "concurrency": 5}])
    provider = single.provider
    assert asyncio.run(provider.identity(single, {})) == {"model": "openai/m", "api_base": "http://a:8000/v1"}
    assert asyncio.run(provider.identity(pooled, {})) == {"model": "openai/m", "deployments": True}
    assert provider.cost(single, SimpleNamespace(_hidden_params={"response_cost": 0.25})) == 0.25
    assert provider.cost(single, SimpleNamespace(_hidden_params={"response_cost": None})) == 0.0  # unpriced
    assert provider.concurrency(single.cfg, None) == 6 and provider.concurrency(pooled.cfg, None) == 3 + 5
    assert provider.concurrency(pooled.cfg, 4) == 4
    assert provider.deployments(single.cfg) is None
    assert [(d.url, d.concurrency) for d in provider.deployments(pooled.cfg)] == [("http://a:8000/v1", 3),
                                                                                ("http://b:8000/v1", 5)]
    assert provider.call_kwargs(single) == {"api_base": "http://a:8000/v1"} and provider.call_kwargs(pooled) == {}
    litellm = load_litellm()
    assert provider.warm_up_module(litellm, single) == "openai.resources"  # its route imports the SDK late
    assert provider.warm_up_module(litellm, resolve("anthropic/claude-3-haiku", tmp_path)) is None


# ---------------------------------------------------------------- cache keys


# Computed with the client of commit 26fe896 (before providers were a registry), for the models below and
# MESSAGES, without and with (a JSON schema, salt 2). Runs' caches and the benchmarks' depend on them.
PINNED_KEYS = {
    "fake": ("83a49d00a5ae3a21e8e494e2abf7dcad9ee3d574da2d6147e903d11795b84d52",
             "9f2527a36452ed36b50f1b70ab268481e84246d261188b8595e956a68216a960"),
    "local": ("1803d179a04704ff861c265852c6a876e7c3d77d85235a46a46f7b8d5aa82f5d",
              "92f03bcaa1d313a26e0869a943b74bd62b1dd953900b5e97cf4bd81995060817"),
    "http": ("735dfb2080c2519343f4d2e8cf81b4c7eb9139b1736ad801f6be77ddfff96d99",
             "22d1bdccc0dfc5a83eb4e4a744f03c1c14724f8e3cd90629e7947dc115775bc4"),
    "http_no_base": ("6f322dc2f8930818d5fe0337ba349c5365c6c7dcf84fa96c011a04e4766a3b04",
                     "0145c0794aad5982ffb89959bf9cef01c7bc56c414714244192003bf301f41f2"),
    "bare": ("c6d606ac9ed0de0070e23dd9636fd2333edc998e605227c3c2b78f94e4641a1a",
             "fe970317ef53c46c90d652a00387d41a78fdf78593b8af4aaceec9e538e14290"),
    "pool": ("99a3644c352918ea13b8f454cc4c528bda8bfefcc9d8035b8cf57a4762362e3c",
             "1127cf3c082dc2bf287e099aa6d4870636a36a6f7a2b17402b9b78203a4064bd"),
}
PINNED_MODELS = {
    "fake": {"model": "fake/script.yaml", "temperature": 0.0},
    "local": {"model": "local/tiny.gguf", "max_tokens": 16, "seed": 1},
    "http": {"model": "openai/gpt-4o-mini", "api_base": "http://127.0.0.1:9/v1", "temperature": 0.2},
    "http_no_base": {"model": "anthropic/claude-3-haiku", "top_p": 0.5, "stop": ["\n"]},
    "bare": {"model": "gpt-4o-mini"},
    "pool": {"model": "openai/qwen", "api_base": ["http://a:8000/v1", {"url": "http://b:8000/v1", "concurrency": 2}]},
}
MESSAGES = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "How many apples? é"}]
SCHEMA_FORMAT = {"type": "json_schema", "json_schema": {"name": "output", "schema": {"type": "object"}}}


def test_cache_keys_are_those_of_before_the_registry(tmp_path, llama_cpp_present):
    (tmp_path / "script.yaml").write_bytes(SCRIPT_BYTES)
    (tmp_path / "tiny.gguf").write_bytes(GGUF_BYTES)
    models = {name: ModelConfig(**cfg) for name, cfg in PINNED_MODELS.items()}
    client = ModelClient(models, config_dir=tmp_path, usage=Usage(), cache=None,
                         environ={"AUTODIFF_CACHE": str(tmp_path / "cache")})

    def keys(name):
        target = client._target(name)
        return tuple(CallCache.key(asyncio.run(client._cache_payload(target, MESSAGES, fmt, salt)))
                     for fmt, salt in ((None, None), (SCHEMA_FORMAT, 2)))

    assert {name: keys(name) for name in models} == PINNED_KEYS


# ---------------------------------------------------------------- layering


def test_the_client_imports_no_provider_a_spec_does_not_use():
    code = ("import sys\n"
            "from autodiff_cli.llm.client import ModelClient\n"
            "from autodiff_cli.llm.usage import Usage\n"
            "from autodiff_cli.spec.models import ModelConfig\n"
            "models = {'m': ModelConfig(model='openai/m', api_base=['http://a:1/v1', 'http://b:1/v1'])}\n"
            "ModelClient(models, config_dir='.', usage=Usage(), cache=None, environ={}).check('m')\n"
            "loaded = [m for m in sys.modules if m.startswith('autodiff_cli.llm.')]\n"
            "bad = [m for m in ('autodiff_cli.llm.fake', 'autodiff_cli.llm.local', 'autodiff_cli.llm.providers.fake',\n"
            "                   'autodiff_cli.llm.providers.local', 'litellm') if m in sys.modules]\n"
            "assert not bad, bad\n"
            "assert 'autodiff_cli.llm.providers.litellm_http' in loaded, loaded\n")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT)


# ---------------------------------------------------------------- adding a provider


class EchoProvider(InProcessProvider):
    """A provider added as docs/ARCHITECTURE.md says ("Add a provider"): `echo/<suffix>` replies with the last
    user message and the suffix, after a delay that is part of the attempt's timeout."""

    name = "echo"

    def locate(self, rest, *, config_dir, environ):
        if not rest:
            raise ModelNotFound("`echo/` needs a suffix")
        return f"echo/{rest}", None

    async def identity(self, target, environ):
        return {"echo": target.litellm_model}

    def make_handler(self, litellm):
        class EchoHandler(litellm.CustomLLM):
            async def acompletion(self, model, messages, api_base, custom_prompt_dict, model_response,
                                  print_verbose, encoding, api_key, logging_obj, optional_params, **kwargs):
                request_sent(call_id_of(logging_obj))
                await asyncio.sleep(0.3)
                model_response.choices[0].message.content = f"{messages[-1]['content']} ({model})"
                model_response.usage = litellm.Usage(prompt_tokens=1, completion_tokens=2, total_tokens=3)
                return model_response

        return EchoHandler()


@pytest.fixture
def echo_registered(monkeypatch):
    monkeypatch.setitem(registry.PROVIDERS, "echo", f"{__name__}:EchoProvider")  # the one registry line


def test_a_provider_added_with_one_module_and_one_registry_line(tmp_path, echo_registered):
    models = {"m": ModelConfig(model="echo/suffix", concurrency=1), "bad": ModelConfig(model="echo/")}
    client = ModelClient(models, config_dir=tmp_path, usage=Usage(), cache=CallCache(tmp_path / "calls"),
                         environ={}, base_delay=0.0)
    with pytest.raises(ModelNotFound) as info:
        client.check("bad")
    assert info.value.key == "models.bad.model"
    with pytest.raises(ValidationError, match="`echo/` model"):
        ModelConfig(model="echo/x", api_base=["http://a:1/v1", "http://b:1/v1"])

    async def both():
        started = time.monotonic()
        replies = await asyncio.gather(client.complete("m", [{"role": "user", "content": "hi"}]),
                                       client.complete("m", [{"role": "user", "content": "ho"}]))
        return replies, time.monotonic() - started

    (hi, ho), wall = asyncio.run(both())
    assert (hi.text, ho.text) == ("hi (suffix)", "ho (suffix)") and hi.cost_usd == 0.0
    assert wall >= 0.6  # concurrency 1: one after the other
    again = asyncio.run(client.complete("m", [{"role": "user", "content": "hi"}]))
    assert again.cache_hit and again.text == "hi (suffix)"
    task = client.usage.to_dict()["task"]
    assert (task["calls"], task["cached_calls"], task["errors"], task["prompt_tokens"]) == (2, 1, 0, 2)


def test_an_added_provider_s_attempts_are_timed_from_its_send(tmp_path, echo_registered):
    client = ModelClient({"m": ModelConfig(model="echo/slow", timeout=0.15, max_retries=1)}, config_dir=tmp_path,
                         usage=Usage(), cache=None, environ={}, base_delay=0.0)
    with pytest.raises(Exception, match=r"2 attempts; last error: TimeoutError: no reply within 0.15 s"):
        asyncio.run(client.complete("m", [{"role": "user", "content": "hi"}]))
    task = client.usage.to_dict()["task"]
    assert (task["calls"], task["errors"], task["unsent"]) == (2, 2, 0)  # both reached the provider
