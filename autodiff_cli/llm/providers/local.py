"""`local/<alias or file.gguf>`: a GGUF model run in-process by llama-cpp-python (autodiff_cli/llm/local.py),
served through litellm's custom-provider path."""
from __future__ import annotations

import asyncio
from collections.abc import Mapping
from functools import partial
from pathlib import Path
from types import ModuleType

from autodiff_cli.errors import ModelNotFound
from autodiff_cli.llm import local
from autodiff_cli.llm.providers.base import InProcessProvider, Target
from autodiff_cli.llm.providers.gateway import call_id_of, request_sent


class LocalProvider(InProcessProvider):
    name = "local"
    # a call may wait for the model to load, or to finish a call of another config on the same file
    waits_for_model = True

    def locate(self, rest: str, *, config_dir: Path, environ: Mapping[str, str]) -> tuple[str, Path]:
        local.require_llama_cpp()
        path = local.resolve_local_model(rest, base_dir=config_dir, environ=environ)
        return f"local/{rest if rest in local.ALIASES else path}", path

    async def identity(self, target: Target, environ: Mapping[str, str]) -> dict:
        digest = await asyncio.to_thread(local.model_identity, target.path, environ=environ)
        return {"gguf_sha256": digest, "n_ctx": local.N_CTX}

    def concurrency(self, cfg, override: int | None) -> int:
        # one model serves one call at a time: more slots would only queue in worker threads behind its
        # lock, out of example order; here they wait in the client's priority order
        return 1

    def make_handler(self, litellm: ModuleType):
        class LocalHandler(litellm.CustomLLM):
            def completion(self, model, messages, model_response, optional_params=None, **kwargs):
                path = _resolve_for_litellm(litellm, model)
                started = partial(request_sent, call_id_of(kwargs.get("logging_obj")))
                result = _run(litellm, model,
                              lambda: local.generate(path, messages, optional_params or {}, on_start=started))
                return _fill_response(litellm, model, result, model_response)

            async def acompletion(self, model, messages, api_base, custom_prompt_dict, model_response,
                                  print_verbose, encoding, api_key, logging_obj, optional_params, **kwargs):
                path = _resolve_for_litellm(litellm, model)
                abort = local.CallAbort()
                started = partial(request_sent, call_id_of(logging_obj))
                try:
                    result = await asyncio.to_thread(
                        _run, litellm, model, lambda: local.generate(path, messages, optional_params, abort, started))
                except asyncio.CancelledError:
                    # nobody will read this reply: free the model now instead of generating up to
                    # max_tokens (an early stop or Ctrl-C would wait for it)
                    abort.request()
                    raise
                return _fill_response(litellm, model, result, model_response)

        return LocalHandler()


def _resolve_for_litellm(litellm: ModuleType, model: str) -> Path:
    try:
        local.require_llama_cpp()
        return local.resolve_local_model(model)
    except ModelNotFound as e:
        raise litellm.NotFoundError(e.render(), model=model, llm_provider="local") from None


def _run(litellm: ModuleType, model: str, call) -> dict:
    try:
        return call()
    except ValueError as e:
        if "context window" in str(e):
            raise litellm.ContextWindowExceededError(str(e), model=model, llm_provider="local") from None
        raise


def _fill_response(litellm: ModuleType, model: str, result: dict, model_response):
    choice = (result.get("choices") or [{}])[0]
    usage = result.get("usage") or {}
    model_response.model = f"local/{model}"
    model_response.choices[0].message.content = (choice.get("message") or {}).get("content") or ""
    if choice.get("finish_reason"):
        model_response.choices[0].finish_reason = choice["finish_reason"]
    prompt, completion = int(usage.get("prompt_tokens", 0)), int(usage.get("completion_tokens", 0))
    model_response.usage = litellm.Usage(prompt_tokens=prompt, completion_tokens=completion,
                                         total_tokens=prompt + completion)
    return model_response
