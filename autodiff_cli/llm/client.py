"""Model calls: litellm underneath, with our own retries, call cache, concurrency limits and usage.

litellm's retries are off; this client retries rate limits, timeouts, connection errors, 5xx and
empty replies with exponential backoff (honouring Retry-After) and gives up at once on errors
that a retry cannot fix (auth, bad request, not found, context window). Every attempt is counted.
"""
from __future__ import annotations

import asyncio
import os
import random
import re
import time
from dataclasses import dataclass
from email.utils import parsedate_to_datetime
from pathlib import Path
from typing import Callable, TYPE_CHECKING, Any, Mapping

from autodiff_cli.errors import AutodiffError, ModelCallError, SpecError
from autodiff_cli.llm import fake, local
from autodiff_cli.llm.deployments import COOLDOWN_SECONDS, DeploymentPool
from autodiff_cli.llm.priority import PrioritySemaphore
from autodiff_cli.llm.ratelimit import RateLimiter, estimate_tokens
from autodiff_cli.llm.cache import CallCache
from autodiff_cli.llm.usage import Usage

if TYPE_CHECKING:
    from autodiff_cli.spec.models import ModelConfig

CACHE_FORMAT = 1
MAX_RETRY_AFTER = 300.0
ERROR_TEXT_LIMIT = 400


@dataclass
class Completion:
    text: str
    prompt_tokens: int  # tokens spent by this call: 0 on a cache hit
    completion_tokens: int
    cost_usd: float
    latency_s: float
    cache_hit: bool
    model: str
    attempts: int  # attempts sent to the provider: 0 on a cache hit


@dataclass(frozen=True)
class Target:
    """A model config resolved for calling."""

    name: str
    cfg: "ModelConfig"
    provider: str  # "local", "fake", or litellm's provider prefix ("" when litellm infers it)
    litellm_model: str
    path: Path | None  # the GGUF file or the fake script


class EmptyReply(Exception):
    """The provider answered with no text."""


class ModelClient:
    def __init__(
        self,
        models: Mapping[str, "ModelConfig"],
        *,
        config_dir: Path,
        usage: Usage,
        cache: CallCache | None,
        concurrency: int | None = None,
        environ: Mapping[str, str] = os.environ,
        base_delay: float = 0.5,
        max_delay: float = 30.0,
        rng: random.Random | None = None,
    ) -> None:
        self.models = dict(models)
        self.config_dir = Path(config_dir)
        self.usage = usage
        self.cache = cache
        self.concurrency = concurrency
        self.environ = environ
        self.base_delay = base_delay
        self.max_delay = max_delay
        self._rng = rng or random.Random()
        self._targets: dict[str, Target] = {}
        self._semaphores: dict[str, tuple[asyncio.AbstractEventLoop, PrioritySemaphore]] = {}
        self.before_call: Callable[[str], None] | None = None
        self._limiters: dict[str, RateLimiter] = {}
        self._pools: dict[tuple, DeploymentPool] = {}  # deployments -> pool, shared by configs that list them
        self._pool_of: dict[str, DeploymentPool | None] = {}  # config name -> its pool (None: one endpoint)

    def add_model(self, name: str, cfg: "ModelConfig") -> None:
        """Register a config the spec does not name (e.g. the default teacher: task at another temperature)."""
        self.models[name] = cfg
        self._targets.pop(name, None)
        self._pool_of.pop(name, None)

    # --- checks --------------------------------------------------------------------------------

    def check(self, model_name: str) -> None:
        """Fail early (exit 2) when a model cannot be called: unknown config, missing file, unset key."""
        self._target(model_name)
        self._api_key(self.models[model_name], model_name)

    def _target(self, name: str) -> Target:
        if name not in self._targets:
            self._targets[name] = self._resolve(name)
        return self._targets[name]

    def _resolve(self, name: str) -> Target:
        cfg = self.models.get(name)
        if cfg is None:
            known = ", ".join(sorted(self.models)) or "none"
            raise SpecError(f"no model config named `{name}` (known: {known})", key=f"models.{name}")
        provider, _, rest = cfg.model.partition("/")
        try:
            if provider == "local":
                local.require_llama_cpp()
                path = local.resolve_local_model(rest, base_dir=self.config_dir, environ=self.environ)
                model = rest if rest in local.ALIASES else str(path)
                return Target(name, cfg, "local", f"local/{model}", path)
            if provider == "fake":
                path = _absolute(rest, self.config_dir)
                fake.load_script(path)
                return Target(name, cfg, "fake", f"fake/{path}", path)
        except AutodiffError as e:
            if e.key is None and e.file is None:
                e.key = f"models.{name}.model"
            raise
        return Target(name, cfg, provider if rest else "", cfg.model, None)

    def _api_key(self, cfg: "ModelConfig", name: str) -> str | None:
        if not cfg.api_key_env:
            return None
        key = self.environ.get(cfg.api_key_env)
        if not key:
            raise SpecError(
                f"the environment variable {cfg.api_key_env} (holding the API key) is not set",
                key=f"models.{name}.api_key_env",
                hint=f"Export {cfg.api_key_env} before running; the key itself never goes in the config.",
            )
        return key

    # --- calls ---------------------------------------------------------------------------------

    async def complete(
        self, model_name: str, messages: list[dict], *, role: str = "task", json_schema: dict | None = None,
        salt: str | int | None = None,
    ) -> Completion:
        """One reply. `salt` (e.g. a try number) joins the cache key, so repeated tries of the same
        messages are separate calls; without it the key is unchanged."""
        started = time.monotonic()
        target = self._target(model_name)
        api_key = self._api_key(target.cfg, model_name)
        self.usage.role(role)  # an unknown role fails before anything is sent
        response_format = response_format_for(json_schema)
        key = None
        if self.cache is not None:
            key = self.cache.key(await self._cache_payload(target, messages, response_format, salt))
            hit = self.cache.get(key)
            if hit is not None:
                self.usage.record(role, cached_calls=1)
                return Completion(hit["text"], 0, 0, 0.0, time.monotonic() - started, True, hit.get("model", ""), 0)
        completion = await self._call_with_retries(target, messages, response_format, api_key, role)
        completion.latency_s = time.monotonic() - started
        if key is not None:
            self.cache.put(key, {"v": CACHE_FORMAT, "text": completion.text, "model": completion.model,
                                 "prompt_tokens": completion.prompt_tokens,
                                 "completion_tokens": completion.completion_tokens})
        return completion

    async def _call_with_retries(self, target: Target, messages, response_format, api_key, role) -> Completion:
        max_attempts = 1 + target.cfg.max_retries
        attempt = 0
        pool = self._pool(target)
        tried: set[str] = set()  # deployments this call has tried (several deployments only)
        pooled = {"tried": tried} if pool is not None else {}
        while True:
            attempt += 1
            if self.before_call is not None:
                self.before_call(role)  # e.g. the training budget: raises to stop before spending
            try:
                response = await self._attempt(target, messages, response_format, api_key, **pooled)
            except Exception as e:  # noqa: BLE001 - every provider error is classified below
                self.usage.record(role, calls=1, errors=1)
                error: Exception = e
            else:
                text, prompt, completion, cost = self._read(target, response)
                ok = bool(text.strip())
                self.usage.record(role, calls=1, errors=0 if ok else 1, prompt_tokens=prompt,
                                  completion_tokens=completion, cost_usd=cost)
                if ok:
                    model = getattr(response, "model", None) or target.litellm_model
                    return Completion(text, prompt, completion, cost, 0.0, False, model, attempt)
                error = EmptyReply("empty reply")
            if attempt >= max_attempts or not is_retryable(error):
                raise self._failure(target, role, attempt, error, api_key)
            if pool is not None:
                if pool.untried(tried):
                    continue  # another deployment takes the next attempt at once
                tried.clear()  # every deployment failed this call: back off, then any may serve it
            await asyncio.sleep(self._delay(attempt, error))

    async def _attempt(self, target: Target, messages, response_format, api_key, tried: set[str] | None = None):
        from autodiff_cli.llm.providers import load_litellm

        litellm = load_litellm()
        cfg = target.cfg
        kwargs: dict[str, Any] = dict(cfg.generation_params())
        kwargs.update(model=target.litellm_model, messages=messages, num_retries=0, max_retries=0,
                      timeout=cfg.timeout, drop_params=True)
        if response_format is not None:
            kwargs["response_format"] = response_format
        pool = self._pool(target)
        if cfg.api_base and target.provider not in ("local", "fake") and pool is None:
            kwargs["api_base"] = cfg.api_base
        if api_key:
            kwargs["api_key"] = api_key
        async with self._semaphore(target):
            if pool is not None:
                return await self._pool_attempt(pool, litellm, kwargs, messages, tried)
            limiter = self._limiter(target)
            grant = await limiter.acquire(estimate_tokens(messages, cfg.max_tokens)) if limiter else None
            try:
                # litellm does not enforce the timeout for custom providers; this does.
                response = await asyncio.wait_for(litellm.acompletion(**kwargs), timeout=cfg.timeout)
            except TimeoutError:
                raise TimeoutError(f"no reply within {cfg.timeout:g} s") from None
            if grant is not None:
                usage = getattr(response, "usage", None)
                used = int(getattr(usage, "total_tokens", 0) or 0)
                RateLimiter.settle(grant, used or grant.tokens)
            return response

    async def _pool_attempt(self, pool: DeploymentPool, litellm, kwargs: dict, messages, tried: set[str] | None):
        """One attempt on one of several deployments: the pool admits it (the deployment's concurrency and
        rpm/tpm), the deployment's URL is the api_base, and a failure sets the deployment aside for a while."""
        timeout = kwargs["timeout"]
        lease = await pool.acquire(estimate_tokens(messages, kwargs.get("max_tokens")), tried or frozenset())
        if tried is not None:
            tried.add(lease.deployment.id)
        try:
            response = await asyncio.wait_for(litellm.acompletion(**kwargs, api_base=lease.url), timeout=timeout)
        except BaseException as e:
            pool.release(lease, ok=False, cool_for=cooldown_seconds(e))
            if isinstance(e, TimeoutError):
                raise TimeoutError(f"no reply within {timeout:g} s") from None
            raise
        usage = getattr(response, "usage", None)
        pool.release(lease, ok=True, tokens_used=int(getattr(usage, "total_tokens", 0) or 0))
        return response

    def _pool(self, target: Target) -> DeploymentPool | None:
        """The deployments of a config whose api_base is a list (None for a single endpoint)."""
        if target.name not in self._pool_of:
            deployments = target.cfg.deployments() if target.provider not in ("local", "fake") else None
            pool = None
            if deployments:
                key = (target.litellm_model, tuple((d.url, d.concurrency, d.rpm, d.tpm) for d in deployments))
                pool = self._pools.get(key)
                if pool is None:
                    pool = self._pools[key] = DeploymentPool(target.litellm_model, deployments, rng=self._rng)
            self._pool_of[target.name] = pool
        return self._pool_of[target.name]

    def deployment_stats(self) -> dict[str, list[dict]]:
        """Per config with several deployments: each deployment's attempts answered and failed, calls in flight."""
        return {name: pool.stats() for name, pool in self._pool_of.items() if pool is not None}

    def _read(self, target: Target, response) -> tuple[str, int, int, float]:
        choices = getattr(response, "choices", None) or []
        text = (getattr(choices[0].message, "content", None) if choices else None) or ""
        usage = getattr(response, "usage", None)
        prompt = int(getattr(usage, "prompt_tokens", 0) or 0)
        completion = int(getattr(usage, "completion_tokens", 0) or 0)
        return text, prompt, completion, self._cost(target, response)

    def _cost(self, target: Target, response) -> float:
        if target.provider in ("local", "fake"):
            return 0.0
        # litellm prices every reply once already (None: a model it has no price for); pricing it
        # again cost ~5% of the client's CPU per call (benchmarks/RESULTS.md, the load figure)
        hidden = getattr(response, "_hidden_params", None)
        if isinstance(hidden, dict) and "response_cost" in hidden:
            return float(hidden["response_cost"] or 0.0)
        from autodiff_cli.llm.providers import load_litellm

        try:
            return float(load_litellm().completion_cost(completion_response=response) or 0.0)
        except Exception:  # noqa: BLE001 - litellm does not know every model's price
            return 0.0

    async def _cache_payload(self, target: Target, messages, response_format, salt=None) -> dict:
        payload = {
            "v": CACHE_FORMAT,
            "provider": target.provider,
            "model": await self._identity(target),
            "messages": messages,
            "params": target.cfg.generation_params(),
            "response_format": response_format,
        }
        if salt is not None:
            payload["salt"] = salt
        return payload

    async def _identity(self, target: Target) -> dict:
        if target.provider == "local":
            digest = await asyncio.to_thread(local.model_identity, target.path, environ=self.environ)
            return {"gguf_sha256": digest, "n_ctx": local.N_CTX}
        if target.provider == "fake":
            return {"script_sha256": fake.script_identity(target.path)}
        if isinstance(target.cfg.api_base, list):  # the same model whichever deployment serves the call
            return {"model": target.cfg.model, "deployments": True}
        return {"model": target.cfg.model, "api_base": target.cfg.api_base}

    def _limiter(self, target: Target) -> RateLimiter | None:
        """The config's rpm/tpm window (None without limits); shared by all its calls."""
        cfg = target.cfg
        if cfg.rpm is None and cfg.tpm is None:
            return None
        if target.name not in self._limiters:
            self._limiters[target.name] = RateLimiter(cfg.rpm, cfg.tpm)
        return self._limiters[target.name]

    def _semaphore(self, target: Target) -> PrioritySemaphore:
        loop = asyncio.get_running_loop()
        held = self._semaphores.get(target.name)
        if held is None or held[0] is not loop:  # semaphores belong to one event loop
            held = (loop, PrioritySemaphore(self.concurrency or target.cfg.capacity()))
            self._semaphores[target.name] = held
        return held[1]

    def _delay(self, attempt: int, error: Exception) -> float:
        wait = retry_after_seconds(error)
        if wait is not None:
            return min(wait, MAX_RETRY_AFTER)
        backoff = min(self.max_delay, self.base_delay * 2 ** (attempt - 1))
        return backoff * (0.5 + self._rng.random() / 2)

    def _failure(self, target: Target, role: str, attempts: int, error: Exception, api_key: str | None):
        detail = describe_error(error, api_key)
        err = ModelCallError(
            f"model call failed: model `{target.name}` ({target.cfg.model}), role {role}, "
            f"{attempts} attempt{'s' if attempts != 1 else ''}; last error: {detail}"
        )
        err.model_name, err.role, err.attempts, err.last_error = target.name, role, attempts, detail
        return err


def response_format_for(json_schema: dict | None) -> dict | None:
    if json_schema is None:
        return None
    return {"type": "json_schema", "json_schema": {"name": "output", "schema": json_schema}}


def is_retryable(error: Exception) -> bool:
    """Rate limits, timeouts, connection errors, 5xx and empty replies are worth another attempt."""
    if isinstance(error, (EmptyReply, TimeoutError)):
        return True
    from autodiff_cli.llm.providers import load_litellm

    litellm = load_litellm()
    never = (litellm.ContextWindowExceededError, litellm.AuthenticationError, litellm.PermissionDeniedError,
             litellm.NotFoundError, litellm.BadRequestError, litellm.UnprocessableEntityError)
    if isinstance(error, never):
        return False
    retry = (litellm.RateLimitError, litellm.Timeout, litellm.APIConnectionError, litellm.InternalServerError,
             litellm.ServiceUnavailableError, litellm.BadGatewayError)
    if isinstance(error, retry):
        return True
    status = getattr(error, "status_code", None)
    return isinstance(status, int) and (status in (408, 409, 429) or status >= 500)


def cooldown_seconds(error: BaseException) -> float | None:
    """How long a deployment that raised `error` is set aside: None when the error says nothing about the
    deployment's health (a bad request, a cancelled call), else a few seconds or a 429's Retry-After."""
    if not isinstance(error, Exception) or not is_retryable(error):
        return None
    return max(COOLDOWN_SECONDS, retry_after_seconds(error) or 0.0)


def retry_after_seconds(error: Exception) -> float | None:
    """Seconds to wait from a Retry-After (or retry-after-ms) header or a `retry_after` attribute."""
    value = getattr(error, "retry_after", None)
    if value is not None:
        return _seconds(value)
    # litellm's OpenAI path keeps the provider's headers in `litellm_response_headers`
    headers = (getattr(getattr(error, "response", None), "headers", None) or getattr(error, "headers", None)
               or getattr(error, "litellm_response_headers", None) or {})
    try:
        millis = headers.get("retry-after-ms")
        if millis is not None:
            return max(0.0, float(millis) / 1000)
        value = headers.get("retry-after")
    except (AttributeError, ValueError):
        return None
    return None if value is None else _seconds(value)


def _seconds(value: Any) -> float | None:
    try:
        return max(0.0, float(value))
    except (TypeError, ValueError):
        pass
    try:  # an HTTP date
        return max(0.0, parsedate_to_datetime(str(value)).timestamp() - time.time())
    except (TypeError, ValueError):
        return None


def describe_error(error: Exception, secret: str | None = None) -> str:
    """The error on one line, without the secret, shortened."""
    text = scrub(str(error), secret)
    if not text.startswith("litellm."):
        text = f"{type(error).__name__}: {text}" if text else type(error).__name__
    text = re.sub(r"\s+", " ", text).strip()
    return text if len(text) <= ERROR_TEXT_LIMIT else text[: ERROR_TEXT_LIMIT - 3] + "..."


def scrub(text: str, secret: str | None) -> str:
    if secret and len(secret) >= 4:
        text = text.replace(secret, "***")
    return text


def _absolute(path: str, base: Path) -> Path:
    p = Path(path).expanduser()
    return p if p.is_absolute() else (base / p).resolve()
