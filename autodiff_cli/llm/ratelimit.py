"""Requests-per-minute and tokens-per-minute limits of one model config (`rpm`, `tpm`).

A sliding 60-second window of the requests sent: a request waits until the window has room
for one more request and for its estimated tokens. After the reply, the estimate is replaced
by the tokens actually used, so the window stays exact.
"""
from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

WINDOW = 60.0


@dataclass
class Grant:
    at: float
    tokens: int


class RateLimiter:
    def __init__(self, rpm: int | None, tpm: int | None, *, clock: Callable[[], float] = time.monotonic,
                 sleep: Callable[[float], Awaitable[None]] = asyncio.sleep) -> None:
        self.rpm = rpm
        self.tpm = tpm
        self.clock = clock
        self.sleep = sleep
        self.window: list[Grant] = []
        self._lock: asyncio.Lock | None = None

    def _prune(self, now: float) -> None:
        self.window = [g for g in self.window if now - g.at < WINDOW]

    def _wait_needed(self, now: float, tokens: int) -> float:
        """Seconds until a request of `tokens` fits (0 if it fits now)."""
        self._prune(now)
        waits = [0.0]
        if self.rpm is not None and len(self.window) >= self.rpm:
            waits.append(self.window[len(self.window) - self.rpm].at + WINDOW - now)
        if self.tpm is not None and self.window:
            # a request larger than the whole budget waits for an empty window, then goes alone
            need = min(tokens, self.tpm)
            used = sum(g.tokens for g in self.window)
            for grant in self.window:
                if used + need <= self.tpm:
                    break
                used -= grant.tokens
                waits.append(grant.at + WINDOW - now)
        return max(waits)

    def wait_needed(self, tokens: int) -> float:
        """Seconds until a request of `tokens` would fit (0 if it fits now); nothing is taken."""
        return self._wait_needed(self.clock(), tokens)

    def try_acquire(self, tokens: int) -> Grant | None:
        """Take room for a request now if the window has it (no waiting; for callers that choose between
        several limiters, like a pool of deployments), else None."""
        now = self.clock()
        if self._wait_needed(now, tokens) > 0:
            return None
        grant = Grant(now, tokens)
        self.window.append(grant)
        return grant

    async def acquire(self, tokens: int) -> Grant:
        if self._lock is None:
            self._lock = asyncio.Lock()
        async with self._lock:  # first come, first served
            while True:
                wait = self._wait_needed(self.clock(), tokens)
                if wait <= 0:
                    grant = Grant(self.clock(), tokens)
                    self.window.append(grant)
                    return grant
                await self.sleep(wait)

    @staticmethod
    def settle(grant: Grant, tokens_used: int) -> None:
        grant.tokens = tokens_used


def estimate_tokens(messages: list[dict], max_tokens: int | None) -> int:
    """A request's tokens before it is sent: about 4 characters a token, plus the reply's cap."""
    chars = sum(len(str(m.get("content", ""))) for m in messages)
    return chars // 4 + 1 + (max_tokens or 256)
