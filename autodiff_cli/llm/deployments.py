"""Several deployments of one model (`api_base` as a list): litellm's Router chooses, this pool admits.

A model config may name several servers of the same model (vLLM replicas, Ollama hosts, regions of a
provider). Each deployment has its own limits (`concurrency`, `rpm`, `tpm`; a limit left out is the
model config's). For every attempt of a call, `DeploymentPool.acquire`:

1. waits until some deployment is admissible: not already tried by this call (unless every one has
   been), not cooling down after a failure (unless every allowed one is), a free concurrency slot, and
   room in its rpm/tpm window for the request's estimated tokens;
2. asks litellm's Router to choose among the admissible deployments (simple-shuffle, weighted by each
   deployment's concurrency), and takes the slot and the window grant in the same step (no await in
   between, so two calls never take the last slot twice).

`release` gives the slot back, replaces the token estimate by the tokens used, and after a failure
worth retrying (connection, timeout, 5xx, 429) cools the deployment down for a few seconds (a 429's
Retry-After when it says longer; doubled for each failure in a row, at most a minute), so other calls
go elsewhere; a reply ends the cool-down.

Why not `Router.acompletion`: the client keeps its own retry loop, timeouts, Retry-After handling and
usage accounting (see client.py), litellm's per-deployment `max_parallel_requests` refuses a call
with a 429 instead of waiting for a slot, and its rpm/tpm checks count whole minutes rather than a
sliding window. So the Router holds the deployments and makes the choice; it is never given the API
key, and its global usage callbacks are unhooked at once (nothing is routed through it).
"""
from __future__ import annotations

import asyncio
import random
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from autodiff_cli.llm.ratelimit import Grant, RateLimiter

if TYPE_CHECKING:
    from autodiff_cli.spec.models import Deployment

COOLDOWN_SECONDS = 5.0  # a deployment that just failed is avoided this long (while another can serve)
MAX_COOLDOWN_SECONDS = 60.0


@dataclass
class DeploymentState:
    id: str  # "d0", "d1", ... in the order of the spec
    url: str
    concurrency: int
    limiter: RateLimiter | None
    in_flight: int = 0
    cool_until: float = 0.0
    served: int = 0  # attempts answered
    failed: int = 0  # attempts that raised
    strikes: int = 0  # failures worth a cool-down since the last reply


@dataclass
class Lease:
    deployment: DeploymentState
    grant: Grant | None
    released: bool = field(default=False)

    @property
    def url(self) -> str:
        return self.deployment.url


class DeploymentPool:
    """The deployments of one model; shared by every model config that lists the same ones."""

    def __init__(self, model: str, deployments: Iterable[Deployment], *, clock: Callable[[], float] = time.monotonic,
                 rng: random.Random | None = None) -> None:
        self.model = model
        self.clock = clock
        self.states = [DeploymentState(f"d{i}", d.url, d.concurrency,
                                       RateLimiter(d.rpm, d.tpm, clock=clock) if (d.rpm or d.tpm) else None)
                       for i, d in enumerate(deployments)]
        if not self.states:
            raise ValueError("a pool needs at least one deployment")
        self._by_id = {s.id: s for s in self.states}
        self._rng = rng or random.Random()
        self._router = None
        self._changed: asyncio.Event | None = None
        self._loop: asyncio.AbstractEventLoop | None = None

    # ---------------------------------------------------------------- admission

    async def acquire(self, tokens: int, tried: set[str] | frozenset[str] = frozenset()) -> Lease:
        """A slot on one deployment for a request of about `tokens` tokens; waits while none is admissible."""
        while True:
            lease, wake_in = self._try_acquire(tokens, tried)
            if lease is not None:
                return lease
            changed = self._event()
            try:
                await asyncio.wait_for(changed.wait(), wake_in)
            except TimeoutError:
                pass

    def _try_acquire(self, tokens: int, tried: set[str] | frozenset[str]) -> tuple[Lease | None, float | None]:
        now = self.clock()
        allowed = [s for s in self.states if s.id not in tried] or self.states
        healthy = [s for s in allowed if s.cool_until <= now] or allowed
        free: list[DeploymentState] = []
        healthy_ids = {s.id for s in healthy}
        waits: list[float] = [s.cool_until - now for s in allowed if s.id not in healthy_ids]
        for s in healthy:
            if s.in_flight >= s.concurrency:
                continue  # a release wakes the waiters
            wait = s.limiter.wait_needed(tokens) if s.limiter is not None else 0.0
            if wait > 0:
                waits.append(wait)
            else:
                free.append(s)
        if not free:
            return None, (min(waits) if waits else None)
        chosen = self._choose(free)
        grant = chosen.limiter.try_acquire(tokens) if chosen.limiter is not None else None
        chosen.in_flight += 1
        return Lease(chosen, grant), None

    def release(self, lease: Lease, *, ok: bool, tokens_used: int = 0, cool_for: float | None = None) -> None:
        """Give the slot back. After a reply (`ok`), `tokens_used` settles the window and a cool-down ends;
        after a failure worth retrying elsewhere, `cool_for` seconds set the deployment aside."""
        if lease.released:
            return
        lease.released = True
        s = lease.deployment
        s.in_flight -= 1
        if lease.grant is not None and tokens_used:
            RateLimiter.settle(lease.grant, tokens_used)
        if ok:
            s.served += 1
            s.cool_until, s.strikes = 0.0, 0
        else:
            s.failed += 1
            if cool_for is not None:  # doubled for every failure in a row: a dead server is rarely tried
                s.strikes += 1
                wait = min(max(cool_for, 0.0) * 2 ** min(s.strikes - 1, 16), MAX_COOLDOWN_SECONDS)
                s.cool_until = max(s.cool_until, self.clock() + wait)
        self._notify()

    def untried(self, tried: set[str] | frozenset[str]) -> bool:
        """Whether some deployment has not been tried by a call that tried `tried`."""
        return any(s.id not in tried for s in self.states)

    def stats(self) -> list[dict]:
        return [{"id": s.id, "url": s.url, "concurrency": s.concurrency, "in_flight": s.in_flight, "served": s.served,
                 "failed": s.failed} for s in self.states]

    # ---------------------------------------------------------------- choice

    def _choose(self, free: list[DeploymentState]) -> DeploymentState:
        if len(free) == 1:
            return free[0]
        free_ids = {s.id for s in free}
        try:
            picked = self._get_router().get_available_deployment(
                model=self.model,
                request_kwargs={"_excluded_deployment_ids": [s.id for s in self.states if s.id not in free_ids]})
            chosen = self._by_id.get(str((picked.get("model_info") or {}).get("id")))
        except Exception:  # noqa: BLE001 - the Router could not choose: choose the same way here
            chosen = None
        if chosen is None or chosen.id not in free_ids:
            chosen = self._rng.choices(free, weights=[s.concurrency for s in free])[0]
        return chosen

    def _get_router(self):
        if self._router is None:
            from autodiff_cli.llm.providers import load_litellm

            litellm = load_litellm()
            router = litellm.Router(
                model_list=[{"model_name": self.model,
                             "litellm_params": {"model": self.model, "api_base": s.url, "weight": s.concurrency},
                             "model_info": {"id": s.id}} for s in self.states],
                routing_strategy="simple-shuffle", num_retries=0, disable_cooldowns=True)
            router.discard()  # unhook its global success/failure callbacks: no call goes through it
            self._router = router
        return self._router

    # ---------------------------------------------------------------- wake-ups

    def _event(self) -> asyncio.Event:
        loop = asyncio.get_running_loop()
        if self._changed is None or self._loop is not loop:  # events belong to one event loop
            self._changed, self._loop = asyncio.Event(), loop
        return self._changed

    def _notify(self) -> None:
        if self._changed is not None:
            self._changed.set()
            self._changed = asyncio.Event() if self._loop is not None else None
