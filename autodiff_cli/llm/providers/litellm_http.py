"""Every model string litellm routes itself (`openai/...`, `anthropic/...`, `ollama/...`, a bare model
name): a service over HTTP, at one `api_base` or several deployments (an `api_base` list)."""
from __future__ import annotations

from collections.abc import Mapping
from types import ModuleType
from typing import Any

from autodiff_cli.llm.providers.base import Provider, Target

# What litellm's route for a provider imports only *after* handing the request over: the openai SDK
# loads its resources on first use of `client.chat` (~1 s cold, blocking the event loop), which would
# count in the first attempts' timeouts. The client imports it once, in a thread, before the first attempt.
WARM_UP = {route: "openai.resources" for route in ("openai", "custom_openai", "azure", "text-completion-openai")}


class LiteLLMProvider(Provider):
    name = ""  # the default: no prefix of its own

    def make_target(self, model_name, cfg, *, config_dir, environ) -> Target:
        prefix, _, rest = cfg.model.partition("/")
        return Target(model_name, cfg, self, prefix if rest else "", cfg.model)

    async def identity(self, target: Target, environ: Mapping[str, str]) -> dict:
        if isinstance(target.cfg.api_base, list):  # the same model whichever deployment serves the call
            return {"model": target.cfg.model, "deployments": True}
        return {"model": target.cfg.model, "api_base": target.cfg.api_base}

    def cost(self, target: Target, response: Any) -> float:
        # litellm prices every reply once already (None: a model it has no price for); pricing it
        # again cost ~5% of the client's CPU per call (benchmarks/RESULTS.md, the load figure)
        hidden = getattr(response, "_hidden_params", None)
        if isinstance(hidden, dict) and "response_cost" in hidden:
            return float(hidden["response_cost"] or 0.0)
        from autodiff_cli.llm.providers.gateway import load_litellm

        try:
            return float(load_litellm().completion_cost(completion_response=response) or 0.0)
        except Exception:  # noqa: BLE001 - litellm does not know every model's price
            return 0.0

    def deployments(self, cfg):
        return cfg.deployments()

    def call_kwargs(self, target: Target) -> dict[str, Any]:
        base = target.cfg.api_base
        return {"api_base": base} if isinstance(base, str) and base else {}  # a list: each attempt's deployment

    def warm_up_module(self, litellm: ModuleType, target: Target) -> str | None:
        base = target.cfg.api_base if isinstance(target.cfg.api_base, str) else None
        try:
            route = litellm.get_llm_provider(model=target.litellm_model, api_base=base)[1]
        except Exception:  # noqa: BLE001 - litellm will say what is wrong with the model when called
            return None
        return WARM_UP.get(route)
