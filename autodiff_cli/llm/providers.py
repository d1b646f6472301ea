"""The one place that imports litellm (slow to import: every other module goes through here lazily)."""
from __future__ import annotations

import logging
import os
import threading
import warnings
from types import ModuleType

_lock = threading.Lock()
_litellm: ModuleType | None = None

LITELLM_LOGGERS = ("LiteLLM", "LiteLLM Router", "LiteLLM Proxy", "litellm")


def load_litellm() -> ModuleType:
    """Import and configure litellm once, with the `local` and `fake` providers registered."""
    global _litellm
    if _litellm is not None:
        return _litellm
    with _lock:
        if _litellm is None:
            # Without this litellm fetches a cost map from the network at import time.
            os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")
            import litellm

            _quieten(litellm)
            _register_custom_providers(litellm)
            _litellm = litellm
    return _litellm


def _quieten(litellm: ModuleType) -> None:
    litellm.suppress_debug_info = True
    litellm.set_verbose = False
    litellm.telemetry = False
    litellm.turn_off_message_logging = True
    for name in LITELLM_LOGGERS:
        logging.getLogger(name).setLevel(logging.CRITICAL)


def _register_custom_providers(litellm: ModuleType) -> None:
    from autodiff_cli.llm import fake, local

    # litellm builds a custom handler's coroutine in a worker thread; a call cancelled before that
    # coroutine starts (early stop, budget, Ctrl-C) leaves it unawaited, which is harmless
    warnings.filterwarnings("ignore", message=r"coroutine '.*(Local|Fake)Handler\.acompletion' was never awaited",
                            category=RuntimeWarning)
    current = list(getattr(litellm, "custom_provider_map", None) or [])
    present = {entry.get("provider") for entry in current}
    for provider, module in (("local", local), ("fake", fake)):
        if provider not in present:
            current.append({"provider": provider, "custom_handler": module.make_handler(litellm)})
    litellm.custom_provider_map = current
