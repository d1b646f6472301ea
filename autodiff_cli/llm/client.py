"""Model calls: litellm underneath, with our own retries, call cache, concurrency limits and usage.

litellm's retries are off; this client retries rate limits, timeouts, connection errors, 5xx and
empty replies with exponential backoff (honouring Retry-After) and gives up at once on errors
that a retry cannot fix (auth, bad request, not found, context window). Every attempt is counted.

When an attempt starts and what it counts as (see `_send`):

- Its `timeout` runs from the moment its request is handed to the provider (litellm's pre-call
  hook for HTTP providers; an in-process provider's handler starting on it: for `fake/` at once, for
  `local/` when the model starts on it), not while litellm, the openai SDK or httpx import or build
  their clients, nor while a local model loads or serves other calls. Before that moment the attempt
  waits at most its timeout plus PRE_SEND_GRACE seconds (unless its provider `waits_for_model`: a
  `local/` call waits for the model as long as the calls before it take).
- An attempt whose request reached the provider is a usage `call` (an `error` too when it failed or
  timed out: the provider saw it, may bill it, and may still answer). One that never reached it —
  the connection was refused or not made (aiohttp/httpcore connect errors inside litellm's
  exception), litellm failed before sending, or it was not sent in time — is counted as `unsent`,
  never as a call. It is still an attempt: retried like a connection error (backoff, another
  deployment first) and counted towards `max_retries`, so a server that is down fails the call
  after 1 + max_retries attempts instead of retrying forever. A budget hook (`before_call`) admits
  every attempt before it starts; for one that was never sent, its `refund(role)` (when it has one)
  gives the admission back, so unsent attempts never count as spending.
- An attempt abandoned by its caller (early stop, budget, Ctrl-C) after its request was sent is a
  call (not an error; its reply and tokens are never known), so usage matches what the provider saw
  in every case; one abandoned before is not counted at all and its budget admission is given back.

What differs between providers (resolving a config, its cache identity, cost, concurrency, endpoints)
is asked of the config's provider (llm/providers/registry.py); nothing here tests a provider's name.
"""
from __future__ import annotations

import asyncio
import concurrent.futures
import importlib
import os
import random
import re
import sys
import threading
import time
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from email.utils import parsedate_to_datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from autodiff_cli.errors import ModelCallError, SpecError
from autodiff_cli.llm.cache import CallCache
from autodiff_cli.llm.deployments import COOLDOWN_SECONDS, DeploymentPool
from autodiff_cli.llm.priority import PrioritySemaphore
from autodiff_cli.llm.providers.base import Target
from autodiff_cli.llm.providers.gateway import load_litellm, unwatch_sends, watch_sends
from autodiff_cli.llm.providers.registry import provider_for
from autodiff_cli.llm.ratelimit import RateLimiter, estimate_tokens
from autodiff_cli.llm.usage import Usage

if TYPE_CHECKING:
    from autodiff_cli.spec.models import ModelConfig

CACHE_FORMAT = 1
MAX_RETRY_AFTER = 300.0
ERROR_TEXT_LIMIT = 400
PRE_SEND_GRACE = 60.0  # seconds an attempt may take to be sent, on top of its timeout (a cold start takes ~1-5 s)
# Modules a provider's route imports only after its first request left (Provider.warm_up_module),
# imported once, in a thread, before the first attempt of such a route.
_warm_ups: dict[str, concurrent.futures.Future] = {}  # module -> its import (process-wide, whatever the loop)
_warm_ups_lock = threading.Lock()


@dataclass
class Completion:
    text: str
    prompt_tokens: int  # tokens spent by this call: 0 on a cache hit
    completion_tokens: int
    cost_usd: float
    latency_s: float
    cache_hit: bool
    model: str
    attempts: int  # attempts made, unsent ones included: 0 on a cache hit


class EmptyReply(Exception):
    """The provider answered with no text."""


class NotSent(Exception):
    """litellm did not hand the request to the provider in time."""


class Sends:
    """The requests one attempt handed to its provider, as signalled through providers.request_sent
    (from litellm's pre-call hook on the event loop, or from a local model's worker thread).

    `on_send` records a call the moment litellm hands a request over, before its bytes leave: a run's
    usage journal then holds every request the server may have received, even if the process is
    killed a microsecond later. `counted` is how many sends were recorded so; the attempt's outcome
    records the rest (and takes back a send whose connection was refused)."""

    def __init__(self, on_send: Callable[[], None] | None = None) -> None:
        self.id = f"autodiff-{uuid.uuid4().hex}"  # the attempt's litellm_call_id
        self.count = 0
        self.counted = 0
        self.first_at: float | None = None  # monotonic time of the first send: the timeout starts here
        self._on_send = on_send
        self._loop = asyncio.get_running_loop()
        self.event = asyncio.Event()

    def __call__(self) -> None:
        if self.first_at is None:
            self.first_at = time.monotonic()
        self.count += 1  # litellm may send twice in one attempt (a 422 retried with params dropped)
        try:
            here = asyncio.get_running_loop() is self._loop
        except RuntimeError:
            here = False
        if here:
            if self._on_send is not None:  # on the loop only: usage is not shared with other threads
                self._on_send()
                self.counted += 1
            self.event.set()
        elif not self._loop.is_closed():  # a local model's thread may start after its caller gave up
            self._loop.call_soon_threadsafe(self.event.set)

    def reached(self, error: BaseException | None = None) -> int:
        """Requests that reached the provider: the sends, minus a last one whose connection failed."""
        if self.count and error is not None and never_connected(error):
            return self.count - 1
        return self.count


class ModelClient:
    def __init__(
        self,
        models: Mapping[str, ModelConfig],
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
        self._warm_up_module: dict[str, str | None] = {}  # config name -> the module its route imports late

    def add_model(self, name: str, cfg: ModelConfig) -> None:
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
        return provider_for(cfg.model).resolve(name, cfg, config_dir=self.config_dir, environ=self.environ)

    def _api_key(self, cfg: ModelConfig, name: str) -> str | None:
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
        attempt = unsent = 0
        pool = self._pool(target)
        tried: set[str] = set()  # deployments this call has tried (several deployments only)
        pooled = {"tried": tried} if pool is not None else {}
        while True:
            attempt += 1
            if self.before_call is not None:
                self.before_call(role)  # e.g. the training budget: raises to stop before spending
            sends = Sends(on_send=lambda: self.usage.record(role, calls=1))
            try:
                response = await self._attempt(target, messages, response_format, api_key, sends, **pooled)
            except asyncio.CancelledError:
                # abandoned (early stop, budget, Ctrl-C): a request that had left is a call (the provider
                # saw it and may bill it; its reply and tokens are never known); one that had not is
                # nothing at all, and the budget gets its admission back
                reached = sends.reached()
                if reached > sends.counted:
                    self.usage.record(role, calls=reached - sends.counted)
                if not reached:
                    self._refund(role)
                raise
            except Exception as e:  # noqa: BLE001 - every provider error is classified below
                error: Exception = e
                reached = sends.reached(e)
                if reached:
                    self.usage.record(role, calls=reached - sends.counted, errors=reached)
                else:
                    unsent += 1
                    self.usage.record(role, calls=-sends.counted, unsent=1)  # a refused connection sent nothing
                    self._refund(role)
            else:
                text, prompt, completion, cost = self._read(target, response)
                ok = bool(text.strip())
                reached = max(sends.reached(), 1)  # a reply came from the provider even if nothing signalled
                self.usage.record(role, calls=reached - sends.counted, errors=reached - 1 if ok else reached,
                                  prompt_tokens=prompt, completion_tokens=completion, cost_usd=cost)
                if ok:
                    model = getattr(response, "model", None) or target.litellm_model
                    return Completion(text, prompt, completion, cost, 0.0, False, model, attempt)
                error = EmptyReply("empty reply")
            if attempt >= max_attempts or not is_retryable(error):
                raise self._failure(target, role, attempt, error, api_key, unsent)
            if pool is not None:
                if pool.untried(tried):
                    continue  # another deployment takes the next attempt at once
                tried.clear()  # every deployment failed this call: back off, then any may serve it
            await asyncio.sleep(self._delay(attempt, error))

    def _refund(self, role: str) -> None:
        """Give the budget hook back the admission of an attempt that never reached the provider."""
        refund = getattr(self.before_call, "refund", None)
        if refund is not None:
            refund(role)

    async def _attempt(self, target: Target, messages, response_format, api_key, sends: Sends,
                       tried: set[str] | None = None):
        litellm = load_litellm()
        target.provider.prepare(litellm)
        await self._warm_up(litellm, target)
        cfg = target.cfg
        kwargs: dict[str, Any] = dict(cfg.generation_params())
        kwargs.update(model=target.litellm_model, messages=messages, num_retries=0, max_retries=0,
                      timeout=cfg.timeout, drop_params=True, litellm_call_id=sends.id)
        if response_format is not None:
            kwargs["response_format"] = response_format
        pool = self._pool(target)
        kwargs.update(target.provider.call_kwargs(target))
        if api_key:
            kwargs["api_key"] = api_key
        async with self._semaphore(target):
            if pool is not None:
                return await self._pool_attempt(pool, litellm, kwargs, messages, sends, tried)
            limiter = self._limiter(target)
            grant = await limiter.acquire(estimate_tokens(messages, cfg.max_tokens)) if limiter else None
            response = await self._send(litellm, kwargs, sends, pre_send=not target.provider.waits_for_model)
            if grant is not None:
                usage = getattr(response, "usage", None)
                used = int(getattr(usage, "total_tokens", 0) or 0)
                RateLimiter.settle(grant, used or grant.tokens)
            return response

    async def _pool_attempt(self, pool: DeploymentPool, litellm, kwargs: dict, messages, sends: Sends,
                            tried: set[str] | None):
        """One attempt on one of several deployments: the pool admits it (the deployment's concurrency and
        rpm/tpm), the deployment's URL is the api_base, and a failure sets the deployment aside for a while
        (a refused connection too: the deployment is down, though the attempt is counted as unsent)."""
        lease = await pool.acquire(estimate_tokens(messages, kwargs.get("max_tokens")), tried or frozenset())
        if tried is not None:
            tried.add(lease.deployment.id)
        try:
            response = await self._send(litellm, {**kwargs, "api_base": lease.url}, sends)
        except BaseException as e:
            pool.release(lease, ok=False, cool_for=cooldown_seconds(e))
            raise
        usage = getattr(response, "usage", None)
        pool.release(lease, ok=True, tokens_used=int(getattr(usage, "total_tokens", 0) or 0))
        return response

    async def _warm_up(self, litellm, target: Target) -> None:
        """Import what the config's provider route would import after its first request was sent (WARM_UP),
        before any attempt of the route is sent, in a thread: calls of other routes in flight go on."""
        if target.name not in self._warm_up_module:
            self._warm_up_module[target.name] = target.provider.warm_up_module(litellm, target)
        module = self._warm_up_module[target.name]
        if module is None:
            return
        with _warm_ups_lock:
            job = _warm_ups.get(module)
            if job is None:
                job = _warm_ups[module] = concurrent.futures.Future()
                threading.Thread(target=_import_into, args=(module, job), name="autodiff-warm-up", daemon=True).start()
        if not job.done():
            await asyncio.wrap_future(job)

    async def _send(self, litellm, kwargs: dict, sends: Sends, *, pre_send: bool = True):
        """`litellm.acompletion(**kwargs)` with the attempt's timeout counted from the moment its request is
        sent (`sends`), not from the call: before that moment litellm may be importing the provider's
        SDK or building its HTTP client (seconds in a cold process, blocking the event loop). Waiting to
        be sent is bounded by timeout + PRE_SEND_GRACE unless `pre_send` is False (a `local/` call queues
        for its model behind other calls, each bounded by its own timeout)."""
        timeout = kwargs["timeout"]
        watch_sends(sends.id, sends)
        task = asyncio.ensure_future(litellm.acompletion(**kwargs))
        task.add_done_callback(lambda _: sends.event.set())  # an attempt that ends unsent ends the wait too
        try:
            try:
                async with asyncio.timeout(timeout + PRE_SEND_GRACE if pre_send else None):
                    await sends.event.wait()
            except TimeoutError:
                raise NotSent(f"the request was not sent within {timeout + PRE_SEND_GRACE:g} s") from None
            if sends.first_at is not None and not task.done():
                left = timeout - (time.monotonic() - sends.first_at)
                try:
                    # litellm does not enforce the timeout for custom providers; this does, for every provider.
                    async with asyncio.timeout(max(left, 0.0)):
                        return await task
                except TimeoutError:
                    raise TimeoutError(f"no reply within {timeout:g} s") from None
            return task.result()
        finally:
            unwatch_sends(sends.id)
            if not task.done():  # given up or cancelled: end the provider call (a local model stops generating)
                task.cancel()
                await asyncio.gather(task, return_exceptions=True)

    def _pool(self, target: Target) -> DeploymentPool | None:
        """The deployments of a config whose api_base is a list (None for a single endpoint)."""
        if target.name not in self._pool_of:
            deployments = target.provider.deployments(target.cfg)
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
        return text, prompt, completion, target.provider.cost(target, response)

    async def _cache_payload(self, target: Target, messages, response_format, salt=None) -> dict:
        payload = {
            "v": CACHE_FORMAT,
            "provider": target.key_name,
            "model": await target.provider.identity(target, self.environ),
            "messages": messages,
            "params": target.cfg.generation_params(),
            "response_format": response_format,
        }
        if salt is not None:
            payload["salt"] = salt
        return payload

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
            held = (loop, PrioritySemaphore(target.provider.concurrency(target.cfg, self.concurrency)))
            self._semaphores[target.name] = held
        return held[1]

    def _delay(self, attempt: int, error: Exception) -> float:
        wait = retry_after_seconds(error)
        if wait is not None:
            return min(wait, MAX_RETRY_AFTER)
        backoff = min(self.max_delay, self.base_delay * 2 ** (attempt - 1))
        return backoff * (0.5 + self._rng.random() / 2)

    def _failure(self, target: Target, role: str, attempts: int, error: Exception, api_key: str | None,
                 unsent: int = 0):
        detail = describe_error(error, api_key)
        never = ""
        if unsent:
            never = " (none reached the provider)" if unsent == attempts else f" ({unsent} never reached the provider)"
        err = ModelCallError(
            f"model call failed: model `{target.name}` ({target.cfg.model}), role {role}, "
            f"{attempts} attempt{'s' if attempts != 1 else ''}{never}; last error: {detail}"
        )
        err.model_name, err.role, err.attempts, err.last_error = target.name, role, attempts, detail
        return err


def _import_into(module: str, job: concurrent.futures.Future) -> None:
    try:
        importlib.import_module(module)
    except Exception:  # noqa: BLE001 - best effort: the call itself imports what it needs, and says what fails
        pass
    finally:
        job.set_result(None)


def response_format_for(json_schema: dict | None) -> dict | None:
    if json_schema is None:
        return None
    return {"type": "json_schema", "json_schema": {"name": "output", "schema": json_schema}}


def is_retryable(error: Exception) -> bool:
    """Rate limits, timeouts, connection errors, 5xx and empty replies are worth another attempt."""
    if isinstance(error, (EmptyReply, TimeoutError, NotSent)):
        return True
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


def never_connected(error: BaseException) -> bool:
    """Whether the request never reached the server: its connection was refused or could not be made.

    litellm wraps the transport's error (as InternalServerError or APIConnectionError, via the openai
    SDK's APIConnectionError and httpx), so the cause chain is searched for the connect-phase errors
    themselves: aiohttp's ClientConnectorError / ConnectionTimeoutError (litellm's default transport;
    it maps every ClientOSError, a reset mid-request included, to httpx.ConnectError, so that one is
    not proof) or httpcore's ConnectError / ConnectTimeout (httpx's own transport)."""
    kinds: list[type] = []
    aiohttp = sys.modules.get("aiohttp")  # an exception of a module never imported cannot be in the chain
    if aiohttp is not None:
        kinds += [aiohttp.ClientConnectorError, getattr(aiohttp, "ConnectionTimeoutError", aiohttp.ClientConnectorError)]
    httpcore = sys.modules.get("httpcore")
    if httpcore is not None:
        kinds += [httpcore.ConnectError, httpcore.ConnectTimeout]
    if not kinds:
        return False
    seen: set[int] = set()
    e: BaseException | None = error
    while e is not None and id(e) not in seen:
        if isinstance(e, tuple(kinds)):
            return True
        seen.add(id(e))
        e = e.__cause__ or e.__context__
    return False


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


MIN_SECRET_CHARS = 8  # shorter values are dummy keys (`x`, `EMPTY`, `none`), and replacing them would garble text


def scrub(text: str, secret: str | None) -> str:
    """A provider's error text without the key it may quote (real ones do on a bad key). This is the one
    place a key could enter autodiff's own messages, so it is redacted here, where it is caught."""
    if secret and len(secret) >= MIN_SECRET_CHARS:
        text = text.replace(secret, "***")
    return text
