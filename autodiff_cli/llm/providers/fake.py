"""`fake/<script.yaml>`: replies from a fake-model script (autodiff_cli/llm/fake.py), served in-process
through litellm's custom-provider path, so tests and dry runs exercise the real client (litellm,
retries, cache, usage) with no model at all. Scripted errors are raised as litellm's own exceptions."""
from __future__ import annotations

import asyncio
import time
from collections.abc import Mapping
from pathlib import Path
from types import ModuleType

from autodiff_cli.errors import ModelNotFound, SpecError
from autodiff_cli.llm import fake
from autodiff_cli.llm.providers.base import InProcessProvider, Target, absolute
from autodiff_cli.llm.providers.gateway import call_id_of, request_sent


class FakeProvider(InProcessProvider):
    name = "fake"

    def locate(self, rest: str, *, config_dir: Path, environ: Mapping[str, str]) -> tuple[str, Path]:
        path = absolute(rest, config_dir)
        fake.load_script(path)  # a missing or malformed script is an error now, not at the first call
        return f"fake/{path}", path

    async def identity(self, target: Target, environ: Mapping[str, str]) -> dict:
        return {"script_sha256": fake.script_identity(target.path)}

    def make_handler(self, litellm: ModuleType):
        class FakeHandler(litellm.CustomLLM):
            def completion(self, model, messages, model_response, **kwargs):
                request_sent(call_id_of(kwargs.get("logging_obj")))  # the "provider" has it now
                script = _script_for(litellm, model)
                time.sleep(script.latency)
                return _answer(litellm, script, model, messages, model_response)

            async def acompletion(self, model, messages, api_base, custom_prompt_dict, model_response,
                                  print_verbose, encoding, api_key, logging_obj, optional_params, **kwargs):
                request_sent(call_id_of(logging_obj))  # the "provider" has it now
                script = _script_for(litellm, model)
                with fake.counted_call(model):
                    if script.latency:
                        await asyncio.sleep(script.latency)
                    return _answer(litellm, script, model, messages, model_response)

        return FakeHandler()


def _script_for(litellm: ModuleType, model: str) -> fake.Script:
    try:
        return fake.load_script(model)
    except (ModelNotFound, SpecError) as e:
        raise litellm.NotFoundError(str(e), model=model, llm_provider="fake") from None


def _answer(litellm: ModuleType, script: fake.Script, model: str, messages: list[dict], model_response):
    try:
        text = fake.respond(script, messages)
    except fake.ScriptedError as e:
        raise _litellm_error(litellm, e, model) from None
    prompt = fake.prompt_tokens(messages)
    model_response.model = f"fake/{model}"
    model_response.choices[0].message.content = text
    completion = fake.count_tokens(text)
    model_response.usage = litellm.Usage(prompt_tokens=prompt, completion_tokens=completion,
                                         total_tokens=prompt + completion)
    return model_response


def _litellm_error(litellm: ModuleType, e: fake.ScriptedError, model: str) -> Exception:
    import httpx  # a litellm dependency

    common = {"model": model, "llm_provider": "fake"}
    message = f"scripted {e.kind} error"
    if e.kind == "429":
        headers = {"retry-after": str(e.retry_after)} if e.retry_after is not None else {}
        return litellm.RateLimitError(message, response=httpx.Response(429, headers=headers), **common)
    if e.kind == "500":
        return litellm.InternalServerError(message, **common)
    if e.kind == "503":
        return litellm.ServiceUnavailableError(message, **common)
    if e.kind == "400":
        return litellm.BadRequestError(message, **common)
    if e.kind == "timeout":
        return litellm.Timeout(message, **common)
    if e.kind == "connection":
        return litellm.APIConnectionError(message, **common)
    if e.kind == "context_length":
        return litellm.ContextWindowExceededError(message, **common)
    return litellm.AuthenticationError(message, **common)
