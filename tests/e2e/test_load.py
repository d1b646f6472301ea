"""Load (issue 8): `autodiff eval` of 10,000 examples at --concurrency 64 against the fake
OpenAI-compatible server with 5% seeded faults (500, 429, connection reset), through litellm's
real HTTP path, completes with exact accounting. The run itself is `run_load` in
benchmarks/fault_matrix.py (which records the figure in RESULTS.md with `--load 10000`).

The 10,000-example test is marked `load` (it takes a minute or two); it runs in the normal suite.
LOAD_EXAMPLES changes its size."""
from __future__ import annotations

import asyncio
import os

import pytest

from autodiff_cli.llm import fake
from autodiff_cli.llm.client import ModelClient
from autodiff_cli.llm.usage import Usage
from autodiff_cli.spec.models import ModelConfig
from tests.e2e.test_faults import load_matrix
from tests.support.fake_server import FakeServer

M = load_matrix()
EXAMPLES = int(os.environ.get("LOAD_EXAMPLES", "10000"))


@pytest.mark.load
def test_eval_of_10000_examples_at_concurrency_64_with_5_percent_faults(tmp_path):
    r = M.run_load(EXAMPLES, tmp_path / "load")
    assert r["problems"] == [], r["problems"]
    assert r["n"] == EXAMPLES == r["completed"] + r["errors"]
    assert r["exact"] and r["max_in_flight"] == 64
    assert r["score"] == r["expected"]
    # about 5% of the attempts failed; each was retried (or was the last of an error's attempts)
    assert 0.03 * EXAMPLES <= r["faults"] <= 0.07 * EXAMPLES
    assert r["faults"] == r["retries"] + r["errors"]
    assert r["calls"] == EXAMPLES + r["retries"]
    print("\n" + M.load_text(r))


def test_load_checks_catch_a_lost_error_and_a_capped_concurrency(tmp_path, monkeypatch, errors_scored_as_zero):
    """The load run's own checks: an error scored as wrong, or fewer calls in flight than asked for."""
    from autodiff_cli.engine import evaluate as evaluate_module

    r = M.run_load(40, tmp_path / "small", concurrency=4, latency=0.05,
                   faults=({"kind": "500", "match": r"n=1\b"},))  # q1 always fails: an error after 4 attempts
    assert r["errors"] == 1
    assert any("an error scored 0.0" in p for p in r["problems"])
    assert any("score" in p and "expected over completed" in p for p in r["problems"])
    assert not any("in flight" in p for p in r["problems"])
    monkeypatch.undo()
    monkeypatch.setattr(evaluate_module, "evaluate", _gated(evaluate_module.evaluate, 10))
    capped = M.run_load(40, tmp_path / "capped", concurrency=16, latency=0.05, faults=())
    assert any("at most 10 calls at once, not 16" in p for p in capped["problems"])


def _gated(evaluate, limit):
    async def gated(*args, **kwargs):
        kwargs["max_in_flight"] = limit
        return await evaluate(*args, **kwargs)

    return gated


def test_the_concurrency_option_sizes_the_evaluation_gate(tmp_path):
    """--concurrency above the configs' own limits is reached (the evaluation gate used to stay at
    2 x the configs' concurrency, so `--concurrency 64` ran 16 examples at a time)."""
    r = M.run_load(200, tmp_path / "gate", concurrency=48, latency=0.05, faults=())
    assert r["problems"] == [] and r["max_in_flight"] == 48 >= r["server_max_in_flight"]


def test_cost_of_a_priced_model_is_litellm_s_price_of_the_reply(tmp_path):
    """Usage cost comes from the price litellm put on the reply (no second pricing pass)."""
    from autodiff_cli.llm.providers import load_litellm

    litellm = load_litellm()
    script = tmp_path / "script.yaml"
    script.write_text("rules: []\ndefault: a reply of six words here\n")

    async def main():
        async with FakeServer(script, latency=0.0) as srv:
            models = {"priced": ModelConfig(model="openai/gpt-4o-mini", api_base=srv.api_base, api_key_env="K"),
                      "unpriced": ModelConfig(model="openai/fake", api_base=srv.api_base, api_key_env="K")}
            client = ModelClient(models, config_dir=tmp_path, usage=Usage(), cache=None, environ={"K": "k"})
            priced = await client.complete("priced", [{"role": "user", "content": "one two three"}])
            unpriced = await client.complete("unpriced", [{"role": "user", "content": "one two three"}])
            return priced, unpriced, client.usage.to_dict()["task"]

    fake.reset_fake_state()
    priced, unpriced, usage = asyncio.run(main())
    expected = sum(litellm.cost_per_token(model="gpt-4o-mini", prompt_tokens=3, completion_tokens=6))
    assert (priced.prompt_tokens, priced.completion_tokens) == (3, 6)
    assert priced.cost_usd == pytest.approx(expected) and expected > 0
    assert unpriced.cost_usd == 0.0
    assert usage["cost_usd"] == pytest.approx(expected)
