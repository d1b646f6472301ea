"""Which provider serves a model string: its first segment, looked up here (one line per provider).

Entries are "module:class" and imported on first use, so a provider's code (and what it imports: the
script model, llama.cpp bindings) is loaded only by processes whose specs name it.
"""
from __future__ import annotations

import functools
import importlib

from autodiff_cli.llm.providers.base import Provider

PROVIDERS: dict[str, str] = {
    "local": "autodiff_cli.llm.providers.local:LocalProvider",  # GGUF models in-process (llama-cpp-python)
    "fake": "autodiff_cli.llm.providers.fake:FakeProvider",  # scripted replies (tests, dry runs)
}
LITELLM_ROUTED = "autodiff_cli.llm.providers.litellm_http:LiteLLMProvider"  # every other model string


def provider_for(model: str) -> Provider:
    """The provider of a model string such as `local/smollm2-135m`, `fake/s.yaml` or `openai/gpt-4o-mini`."""
    return _instance(PROVIDERS.get(model.partition("/")[0], LITELLM_ROUTED))


@functools.cache
def _instance(entry: str) -> Provider:
    module, _, name = entry.partition(":")
    return getattr(importlib.import_module(module), name)()
