"""The one place that imports litellm (slow to import: every other module goes through here lazily).

It also carries the "request sent" signal of each attempt: the client gives every attempt its own
`litellm_call_id` and watches it (`watch_sends`); litellm calls its logging object's `pre_call` right
before an HTTP provider's request leaves (litellm_core_utils/litellm_logging.py, `Logging.pre_call`,
which calls every `CustomLogger.log_pre_api_call` in `litellm.input_callback`), and the in-process
providers' handlers call `request_sent` themselves when they start on a request.
"""
from __future__ import annotations

import logging
import os
import re
import threading
import warnings
from collections.abc import Callable
from types import ModuleType
from typing import Any

_lock = threading.Lock()
_litellm: ModuleType | None = None

LITELLM_LOGGERS = ("LiteLLM", "LiteLLM Router", "LiteLLM Proxy", "litellm")


def load_litellm() -> ModuleType:
    """Import and configure litellm once (in-process providers register their handlers on first use)."""
    global _litellm
    if _litellm is not None:
        return _litellm
    with _lock:
        if _litellm is None:
            # Without this litellm fetches a cost map from the network at import time.
            os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")
            import litellm

            _quieten(litellm)
            _register_send_signal(litellm)
            _litellm = litellm
    return _litellm


def _quieten(litellm: ModuleType) -> None:
    litellm.suppress_debug_info = True
    litellm.set_verbose = False
    litellm.telemetry = False
    litellm.turn_off_message_logging = True
    for name in LITELLM_LOGGERS:
        logging.getLogger(name).setLevel(logging.CRITICAL)


def register_handler(litellm: ModuleType, provider: str, make_handler: Callable[[ModuleType], Any]) -> None:
    """Route `<provider>/...` models to the litellm `CustomLLM` that `make_handler` builds (once per process;
    litellm reads `custom_provider_map` on every call, so a provider registered late is found)."""
    with _lock:
        current = list(getattr(litellm, "custom_provider_map", None) or [])
        if any(entry.get("provider") == provider for entry in current):
            return
        handler = make_handler(litellm)
        # litellm builds a custom handler's coroutine in a worker thread; a call cancelled before that
        # coroutine starts (early stop, budget, Ctrl-C) leaves it unawaited, which is harmless
        warnings.filterwarnings("ignore", category=RuntimeWarning,
                                message=rf"coroutine '.*{re.escape(type(handler).__name__)}\.acompletion' was never awaited")
        litellm.custom_provider_map = [*current, {"provider": provider, "custom_handler": handler}]


# ---------------------------------------------------------------- "request sent" signals

_watched: dict[str, Callable[[], None]] = {}  # litellm_call_id -> the attempt's on_send (one key per attempt)


def watch_sends(call_id: str, on_send: Callable[[], None]) -> None:
    """Call `on_send` (from any thread) each time a request of the attempt `call_id` is handed to its provider."""
    _watched[call_id] = on_send


def unwatch_sends(call_id: str) -> None:
    _watched.pop(call_id, None)


def request_sent(call_id: str | None) -> None:
    """A request of attempt `call_id` is leaving for the provider now (no-op for calls nobody watches)."""
    on_send = _watched.get(call_id) if call_id else None
    if on_send is not None:
        on_send()


def call_id_of(logging_obj: Any) -> str | None:
    """The attempt's `litellm_call_id`, as litellm hands it to a custom handler (on its logging object)."""
    return getattr(logging_obj, "litellm_call_id", None)


def _register_send_signal(litellm: ModuleType) -> None:
    from litellm.integrations.custom_logger import CustomLogger

    class SendSignal(CustomLogger):
        """litellm's pre_call hook, fired right before each HTTP request (the `litellm_call_id` is ours)."""

        def log_pre_api_call(self, model, messages, kwargs):
            request_sent(kwargs.get("litellm_call_id"))

    if not any(type(c).__name__ == "SendSignal" for c in litellm.input_callback):
        litellm.logging_callback_manager.add_litellm_input_callback(SendSignal())
