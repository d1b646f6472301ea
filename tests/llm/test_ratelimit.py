"""rpm / tpm limits: a sliding 60 s window, checked with a fake clock; and wired into the client."""
from __future__ import annotations

import asyncio

from autodiff_cli.llm.cache import CallCache
from autodiff_cli.llm.client import ModelClient
from autodiff_cli.llm.ratelimit import RateLimiter, estimate_tokens
from autodiff_cli.llm.usage import Usage
from autodiff_cli.spec.models import ModelConfig
from tests.conftest import write


class FakeClock:
    def __init__(self) -> None:
        self.now = 0.0
        self.sleeps: list[float] = []

    def __call__(self) -> float:
        return self.now

    async def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        self.now += seconds


def grant_times(limiter: RateLimiter, tokens: list[int]) -> list[float]:
    async def go():
        return [(await limiter.acquire(t)).at for t in tokens]

    return asyncio.run(go())


def test_rpm_lets_n_requests_through_per_minute():
    clock = FakeClock()
    times = grant_times(RateLimiter(3, None, clock=clock, sleep=clock.sleep), [1] * 7)
    assert times == [0, 0, 0, 60, 60, 60, 120]


def test_tpm_waits_for_tokens_to_leave_the_window():
    clock = FakeClock()
    limiter = RateLimiter(None, 1000, clock=clock, sleep=clock.sleep)
    times = grant_times(limiter, [600, 300, 300, 5000])
    # 600 + 300 fit; the third waits for the first to expire; the huge one waits for an empty window
    assert times == [0, 0, 60, 120]


def test_settled_tokens_replace_the_estimate():
    clock = FakeClock()
    limiter = RateLimiter(None, 1000, clock=clock, sleep=clock.sleep)

    async def go():
        first = await limiter.acquire(900)
        RateLimiter.settle(first, 100)  # the reply was short
        return (await limiter.acquire(800)).at

    assert asyncio.run(go()) == 0


def test_estimate_counts_the_prompt_and_the_reply_cap():
    assert estimate_tokens([{"role": "user", "content": "x" * 400}], 50) == 100 + 1 + 50


def test_client_calls_go_through_the_limiter(tmp_path):
    script = write(tmp_path / "s.yaml", "default: ok\n")
    cfg = ModelConfig(model=f"fake/{script}", rpm=1000, tpm=100000)
    client = ModelClient({"m": cfg}, config_dir=tmp_path, usage=Usage(), cache=CallCache(tmp_path / "c"), base_delay=0)

    async def go():
        for i in range(3):
            await client.complete("m", [{"role": "user", "content": f"hi {i}"}])
        await client.complete("m", [{"role": "user", "content": "hi 0"}])  # cached: not counted

    asyncio.run(go())
    window = client._limiters["m"].window
    assert len(window) == 3 and all(g.tokens > 0 for g in window)
