"""Several deployments of one model (`api_base` as a list), against real fake servers over HTTP:
spread, per-deployment limits, failover, exact usage, a cache key that ignores the deployment."""
from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import textwrap
import time
from contextlib import ExitStack
from pathlib import Path

import pytest

from autodiff_cli.errors import ModelCallError
from autodiff_cli.llm import fake
from autodiff_cli.llm.cache import CallCache
from autodiff_cli.llm.client import ModelClient
from autodiff_cli.llm.deployments import DeploymentPool
from autodiff_cli.llm.usage import Usage
from autodiff_cli.spec.models import Deployment, ModelConfig
from tests.support.fake_server import FakeServer

SCRIPT = r"""
rules:
  - {match: '^How many (\w+)', reply: "I count the {1}. Answer: 3"}
default: "the default answer"
"""
SECRET = "sk-test-deployments-0123456789"


@pytest.fixture(autouse=True)
def _fresh():
    fake.reset_fake_state()
    yield
    fake.reset_fake_state()


@pytest.fixture
def script(tmp_path) -> Path:
    path = tmp_path / "script.yaml"
    path.write_text(textwrap.dedent(SCRIPT))
    return path


def pooled_client(servers, tmp_path: Path, limits=None, *, cache: bool = False, **cfg) -> ModelClient:
    """A client whose model `m` lists the servers as deployments (limits: one mapping per server)."""
    limits = limits or [{} for _ in servers]
    api_base = [{"url": s.api_base, **lim} for s, lim in zip(servers, limits)]
    cfg.setdefault("max_retries", 3)
    model = ModelConfig(model="openai/fake", api_base=api_base, api_key_env="FAKE_SERVER_KEY", **cfg)
    return ModelClient({"m": model}, config_dir=tmp_path, usage=Usage(),
                       cache=CallCache(tmp_path / "calls") if cache else None,
                       environ={"FAKE_SERVER_KEY": SECRET}, base_delay=0.0)


def user(text: str) -> list[dict]:
    return [{"role": "user", "content": text}]


async def started(*servers: FakeServer) -> list[FakeServer]:
    return [await s.start() for s in servers]


def test_calls_spread_and_each_deployment_keeps_its_concurrency(script, tmp_path):
    async def main():
        servers = await started(*(FakeServer(script, latency=0.15) for _ in range(3)))
        try:
            client = pooled_client(servers, tmp_path, [{"concurrency": 3}, {"concurrency": 2}, {"concurrency": 1}])
            replies = await asyncio.gather(*(client.complete("m", user(f"How many q{i}")) for i in range(30)))
            return replies, [s.stats() for s in servers], client.usage.to_dict()["task"], client.deployment_stats()["m"]
        finally:
            for s in servers:
                await s.close()

    replies, stats, usage, pool = asyncio.run(main())
    assert [r.text for r in replies] == [f"I count the q{i}. Answer: 3" for i in range(30)]
    assert [s["max_in_flight"] for s in stats] == [3, 2, 1]  # each deployment's own limit, and reached
    assert all(s["requests"] > 0 for s in stats) and sum(s["requests"] for s in stats) == 30
    assert stats[0]["requests"] > stats[2]["requests"]  # the larger deployment serves more
    assert [p["served"] for p in pool] == [s["replies"] for s in stats]
    # usage is exact: what the servers counted, whichever served
    assert usage["calls"] == 30 and usage["errors"] == 0
    assert usage["prompt_tokens"] == sum(s["prompt_tokens"] for s in stats)
    assert usage["completion_tokens"] == sum(s["completion_tokens"] for s in stats)


def test_concurrency_flag_caps_the_whole_config(script, tmp_path):
    async def main():
        servers = await started(*(FakeServer(script, latency=0.1) for _ in range(2)))
        try:
            model = ModelConfig(model="openai/fake", api_base=[s.api_base for s in servers], concurrency=4,
                                api_key_env="K")
            client = ModelClient({"m": model}, config_dir=tmp_path, usage=Usage(), cache=None, environ={"K": "x"},
                                 concurrency=3)
            await asyncio.gather(*(client.complete("m", user(f"q{i}")) for i in range(12)))
            return [s.stats() for s in servers]
        finally:
            for s in servers:
                await s.close()

    stats = asyncio.run(main())
    assert all(s["max_in_flight"] <= 3 for s in stats)
    assert sum(s["requests"] for s in stats) == 12


@pytest.mark.parametrize("kind", ["500", "reset"])
def test_a_failing_deployment_is_retried_on_the_others(script, tmp_path, kind):
    async def main():
        bad = FakeServer(script, latency=0.05, faults=[{"kind": kind}])
        servers = await started(FakeServer(script, latency=0.05), bad, FakeServer(script, latency=0.05))
        try:
            client = pooled_client(servers, tmp_path, [{"concurrency": 2}] * 3, max_retries=2)
            replies = await asyncio.gather(*(client.complete("m", user(f"How many q{i}")) for i in range(20)))
            return replies, [s.stats() for s in servers], client.usage.to_dict()["task"], client.deployment_stats()["m"]
        finally:
            for s in servers:
                await s.close()

    replies, stats, usage, pool = asyncio.run(main())
    assert len(replies) == 20 and all(r.text.endswith("Answer: 3") for r in replies)
    good = [stats[0], stats[2]]
    # 20 calls against 2+2 healthy slots: the bad deployment had free slots, so it was tried
    assert stats[1]["requests"] >= 1 and stats[1]["replies"] == 0
    assert sum(s["replies"] for s in good) == 20
    assert usage["errors"] == stats[1]["requests"] == pool[1]["failed"]
    assert usage["calls"] == 20 + usage["errors"]
    # a failure sets the deployment aside: it is not tried by every call
    assert stats[1]["requests"] <= 4
    # a failed attempt moves to another deployment at once, never twice to the same one
    assert all(r.attempts <= 2 for r in replies)
    assert usage["prompt_tokens"] == sum(s["prompt_tokens"] for s in good)


def test_every_deployment_down_fails_the_call_cleanly(script, tmp_path):
    async def main():
        servers = await started(*(FakeServer(script, latency=0.0, faults=[{"kind": "500"}]) for _ in range(2)))
        try:
            client = pooled_client(servers, tmp_path, max_retries=3)
            with pytest.raises(ModelCallError) as info:
                await client.complete("m", user("How many q"))
            return info.value, [s.stats() for s in servers], client.usage.to_dict()["task"]
        finally:
            for s in servers:
                await s.close()

    error, stats, usage = asyncio.run(main())
    assert error.attempts == 4 and "500" in error.last_error
    assert [s["requests"] for s in stats] in ([2, 2], [1, 3], [3, 1])  # both tried, then backed off and tried again
    assert stats[0]["requests"] >= 1 and stats[1]["requests"] >= 1
    assert usage == {**usage, "calls": 4, "errors": 4}
    assert SECRET not in error.message


def test_rpm_of_one_deployment_sends_the_rest_elsewhere(script, tmp_path):
    async def main():
        servers = await started(*(FakeServer(script, latency=0.0) for _ in range(2)))
        try:
            client = pooled_client(servers, tmp_path, [{"rpm": 2}, {}])
            start = time.monotonic()
            for i in range(10):
                await client.complete("m", user(f"q{i}"))
            return [s.stats()["requests"] for s in servers], time.monotonic() - start
        finally:
            for s in servers:
                await s.close()

    requests, elapsed = asyncio.run(main())
    assert requests[0] <= 2 and sum(requests) == 10  # the limited deployment's window is full: no waiting
    assert elapsed < 10


def test_pool_waits_for_a_slot_avoids_cooling_and_tried_deployments():
    now = [1000.0]
    deployments = [Deployment(url="http://a/v1", concurrency=1), Deployment(url="http://b/v1", concurrency=1)]
    pool = DeploymentPool("openai/fake", deployments, clock=lambda: now[0])

    async def main():
        first = await pool.acquire(10)
        second = await pool.acquire(10)
        assert {first.deployment.id, second.deployment.id} == {"d0", "d1"}  # never two calls on one slot
        waiter = asyncio.ensure_future(pool.acquire(10))
        await asyncio.sleep(0.02)
        assert not waiter.done()  # both full: it waits
        pool.release(first, ok=False, cool_for=5.0)  # failed: set aside while the other one can serve
        await asyncio.sleep(0.02)
        assert not waiter.done()
        pool.release(second, ok=True, tokens_used=3)
        third = await asyncio.wait_for(waiter, 1)
        assert third.deployment is second.deployment
        pool.release(third, ok=True)
        for _ in range(10):  # new calls avoid the cooling deployment
            lease = await pool.acquire(10)
            assert lease.deployment is second.deployment
            pool.release(lease, ok=True)
        # ... unless the call already tried the healthy one
        lease = await pool.acquire(10, tried={second.deployment.id})
        assert lease.deployment is first.deployment
        pool.release(lease, ok=False, cool_for=5.0)  # a second failure in a row: 10 s aside
        now[0] += 5.1
        for _ in range(10):
            lease = await pool.acquire(10)
            assert lease.deployment is second.deployment
            pool.release(lease, ok=True)
        now[0] += 5.0  # the cool-down is over: both serve again
        seen = set()
        for _ in range(40):
            lease = await pool.acquire(10)
            seen.add(lease.deployment.id)
            pool.release(lease, ok=True)
        assert seen == {"d0", "d1"}
        # a call that tried every deployment may use any of them again
        lease = await pool.acquire(10, tried={"d0", "d1"})
        pool.release(lease, ok=True)
        assert pool.untried({"d0"}) and not pool.untried({"d0", "d1"})
        assert [p["in_flight"] for p in pool.stats()] == [0, 0]

    asyncio.run(main())


def test_pool_rate_window_per_deployment():
    now = [0.0]
    deployments = [Deployment(url="http://a/v1", concurrency=8, rpm=2), Deployment(url="http://b/v1", concurrency=8,
                                                                                   tpm=100)]
    pool = DeploymentPool("openai/fake", deployments, clock=lambda: now[0])

    async def main():
        got = []
        for _ in range(3):  # d0 takes 2 requests a minute, d1 100 tokens: 40 + 40 fit, a third does not
            lease = await pool.acquire(40)
            got.append(lease.deployment.id)
            pool.release(lease, ok=True, tokens_used=40)
        lease = await pool.acquire(40)
        got.append(lease.deployment.id)
        pool.release(lease, ok=True, tokens_used=40)
        assert sorted(got) == ["d0", "d0", "d1", "d1"]
        lease, wake_in = pool._try_acquire(40, set())
        assert lease is None and wake_in == pytest.approx(60.0)  # both windows are full: wait for the first to open
        now[0] += 60.5
        lease, _ = pool._try_acquire(40, set())
        return lease

    lease = asyncio.run(main())
    assert lease is not None and lease.deployment.id in ("d0", "d1")


def test_the_router_makes_the_choice_weighted_by_concurrency(monkeypatch):
    deployments = [Deployment(url="http://a/v1", concurrency=1), Deployment(url="http://b/v1", concurrency=9)]
    pool = DeploymentPool("openai/fake", deployments)
    router = pool._get_router()
    asked = []
    real = router.get_available_deployment

    def spy(**kw):
        asked.append(list(kw["request_kwargs"]["_excluded_deployment_ids"]))
        return real(**kw)

    monkeypatch.setattr(router, "get_available_deployment", spy)

    async def main():
        counts = {"d0": 0, "d1": 0}
        for _ in range(400):
            lease = await pool.acquire(1)
            counts[lease.deployment.id] += 1
            pool.release(lease, ok=True)
        return counts

    counts = asyncio.run(main())
    assert len(asked) == 400 and all(a == [] for a in asked)
    assert 10 <= counts["d0"] <= 80  # about 1 in 10


# ---------------------------------------------------------------- the CLI, end to end

SPEC = """\
name: pooled
models:
  task:
    model: openai/fake
    api_key_env: FAKE_SERVER_KEY
    temperature: 0
    api_base:
{deployments}
data:
  train: rows.jsonl
  val: rows.jsonl
nodes:
  count:
    kind: llm
    user: "{{{{ input.question }}}}"
  parse:
    kind: function
    fn: last_integer
    args: {{text: count}}
output: parse
metric: {{fn: exact_match, args: {{pred: parse, target: input.answer}}}}
"""


def write_spec(tmp_path: Path, servers, limits=None, name="spec.yaml") -> Path:
    limits = limits or [{} for _ in servers]
    lines = []
    for s, lim in zip(servers, limits):
        extra = "".join(f", {k}: {v}" for k, v in lim.items())
        lines.append(f"      - {{url: {s.api_base}{extra}}}")
    path = tmp_path / name
    path.write_text(SPEC.format(deployments="\n".join(lines)))
    return path


def cli_eval(spec: Path, env: dict, *args: str) -> tuple[dict, subprocess.CompletedProcess]:
    r = subprocess.run([sys.executable, "-m", "autodiff_cli.app.cli", "eval", str(spec), "--json", *args],
                       capture_output=True, text=True, env=env, timeout=120)
    assert r.returncode == 0, r.stderr
    assert "Traceback" not in r.stderr
    return json.loads(r.stdout.strip().splitlines()[-1]), r


def test_eval_over_three_deployments_spreads_survives_a_bad_one_and_caches_by_model(script, tmp_path):
    rows = [{"id": f"r{i}", "question": f"How many apples{i}?", "answer": "3"} for i in range(24)]
    (tmp_path / "rows.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    env = {**os.environ, "FAKE_SERVER_KEY": SECRET, "AUTODIFF_CACHE": str(tmp_path / "cache")}
    env.pop("AUTODIFF_CACHE_URL", None)
    with ExitStack() as stack:
        servers = [stack.enter_context(FakeServer(script, latency=0.1).in_thread()) for _ in range(2)]
        bad = stack.enter_context(FakeServer(script, latency=0.05, faults=[{"kind": "500"}]).in_thread())
        spec = write_spec(tmp_path, [*servers, bad], [{"concurrency": 2}, {"concurrency": 2}, {"concurrency": 2}])

        report, first = cli_eval(spec, env, "--out", str(tmp_path / "rows.out.jsonl"))
        assert (report["n"], report["completed"], report["errors"], report["score"]) == (24, 24, 0, 1.0)
        stats = [s.stats() for s in servers]
        assert all(s["replies"] > 0 for s in stats) and sum(s["replies"] for s in stats) == 24
        assert all(s["max_in_flight"] <= 2 for s in [*stats, bad.stats()])
        assert bad.stats()["replies"] == 0 and bad.stats()["requests"] >= 1  # tried, failed, served elsewhere
        assert report["usage"]["task"]["errors"] == bad.stats()["requests"]
        assert report["usage"]["task"]["prompt_tokens"] == sum(s["prompt_tokens"] for s in stats)

        # the second run hits the cache for every call, whichever deployment served it, and calls nobody
        for s in (*servers, bad):
            s.reset()
        report, second = cli_eval(spec, env)
        assert report["usage"]["task"]["cached_calls"] == 24 and report["usage"]["task"]["calls"] == 0
        # other deployments of the same model (here: one of the servers alone, listed in another order) share it
        alone = write_spec(tmp_path, [servers[1], servers[0]], name="other.yaml")
        report, third = cli_eval(alone, env)
        assert report["usage"]["task"]["cached_calls"] == 24 and report["usage"]["task"]["calls"] == 0
        assert all(s.stats()["requests"] == 0 for s in (*servers, bad))

    # the API key is never printed, written to the cache or to the rows
    for r in (first, second, third):
        assert SECRET not in r.stdout + r.stderr
    for path in [tmp_path / "rows.out.jsonl", *(tmp_path / "cache").rglob("*")]:
        if path.is_file():
            assert SECRET.encode() not in path.read_bytes()
