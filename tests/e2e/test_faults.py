"""The fault matrix (issue 8): every provider fault kind x transient/permanent x `eval`/`train`,
through litellm's real HTTP path to the fake OpenAI-compatible server. The cases and their checks
live in benchmarks/fault_matrix.py (which also writes the RESULTS.md section); here each case is
one test, plus tests that the checks catch what they are meant to catch."""
from __future__ import annotations

import asyncio
import importlib.util
import sys
from pathlib import Path

import pytest

from autodiff_cli.llm import fake
from autodiff_cli.llm.client import ModelClient
from autodiff_cli.llm.usage import Usage
from autodiff_cli.optim.gdpo import parse_proposal
from autodiff_cli.spec.models import ModelConfig
from tests.support.fake_server import MALFORMED_TEXT, FakeServer

ROOT = Path(__file__).resolve().parents[2]


def load_matrix():
    if "fault_matrix" not in sys.modules:
        spec = importlib.util.spec_from_file_location("fault_matrix", ROOT / "benchmarks" / "fault_matrix.py")
        module = importlib.util.module_from_spec(spec)
        sys.modules["fault_matrix"] = module
        spec.loader.exec_module(module)
    return sys.modules["fault_matrix"]


M = load_matrix()
CASES = M.all_cases()


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    return M.references(tmp_path_factory.mktemp("fault-reference"))


def test_the_matrix_covers_every_kind_shape_and_command():
    seen = {(c.kind, c.shape, c.command.split()[0]) for c in CASES}
    for kind in M.KINDS:
        for shape in M.SHAPES:
            assert (kind, shape, "train") in seen
            if kind != "malformed":  # eval calls no optimizer; a task reply is an answer, right or wrong
                assert (kind, shape, "eval") in seen
    assert len({c.id for c in CASES}) == len(CASES)


@pytest.mark.parametrize("case", CASES + M.cold_cases(), ids=[c.id for c in CASES + M.cold_cases()])
def test_fault(case, reference, tmp_path):
    outcome = M.run_case(case, reference, tmp_path)
    assert outcome.survived and outcome.usage_exact, outcome.problems()
    assert outcome.injected > 0
    if case.kind == "context_length":
        assert outcome.retried == 0 and outcome.reported == outcome.injected  # never retried, always reported
    elif case.shape == "transient" and case.target() == "all":
        assert outcome.reported == 0 and outcome.retried == outcome.injected
    else:
        assert outcome.reported > 0


# ---------------------------------------------------------------- the checks bite


def test_a_retried_context_length_error_is_caught(reference, tmp_path, monkeypatch):
    from autodiff_cli.llm import client as client_module

    monkeypatch.setattr(client_module, "is_retryable", lambda error: True)
    outcome = M.run_case(M.Case("context_length", "permanent", "eval"), reference, tmp_path)
    assert not outcome.survived
    assert any("attempts, expected 1" in p for p in outcome.problems())


def test_an_error_scored_as_a_wrong_answer_is_caught(reference, tmp_path, errors_scored_as_zero):
    outcome = M.run_case(M.Case("500", "permanent", "eval"), reference, tmp_path)
    assert outcome.lost and any("failed but was scored 0.0" in p for p in outcome.lost)


def test_usage_dropped_by_a_resume_is_caught(reference, tmp_path, monkeypatch):
    from autodiff_cli.llm.usage import Usage

    monkeypatch.setattr(Usage, "from_journal", classmethod(lambda cls, path: None))  # the checkpoint's only
    outcome = M.run_case(M.Case("500", "permanent", "train"), reference, tmp_path)
    assert not outcome.usage_exact
    assert any(p.startswith("after --resume: usage calls") for p in outcome.problems())


def test_a_malformed_reply_served_again_from_the_cache_is_caught(reference, tmp_path, monkeypatch):
    from autodiff_cli.optim import gdpo

    real = gdpo.propose

    async def unsalted(client, model_name, request, *, salt=None):
        return await real(client, model_name, request)

    monkeypatch.setattr(gdpo, "propose", unsalted)
    outcome = M.run_case(M.Case("malformed", "transient", "train (optimizer only)"), reference, tmp_path)
    assert not outcome.survived
    assert any("prompts.yaml differs" in p for p in outcome.problems())


# ---------------------------------------------------------------- the `malformed` fault


def test_malformed_fault_is_a_counted_reply_that_no_proposal_parser_accepts(tmp_path):
    script = tmp_path / "script.yaml"
    script.write_text('rules: []\ndefault: \'{"reasoning": "r", "method": "rephrase", "new_value": "Count."}\'\n')

    async def main():
        async with FakeServer(script, latency=0.0, faults=[{"kind": "malformed", "times": 1, "match": "^propose"}]) as srv:
            model = ModelConfig(model="openai/fake", api_base=srv.api_base, api_key_env="K", max_retries=2)
            client = ModelClient({"m": model}, config_dir=tmp_path, usage=Usage(), cache=None, environ={"K": "k"},
                                 base_delay=0.0)
            first = await client.complete("m", [{"role": "user", "content": "propose"}], role="optimizer")
            second = await client.complete("m", [{"role": "user", "content": "propose"}], role="optimizer")
            return first, second, client.usage.to_dict()["optimizer"], srv.stats()

    fake.reset_fake_state()
    first, second, usage, stats = asyncio.run(main())
    assert first.text == MALFORMED_TEXT and first.attempts == 1  # a reply, not an error: nothing to retry
    value, _, reason = parse_proposal(first.text)
    assert value is None and reason.startswith("unparseable")
    assert parse_proposal(second.text)[0] == "Count."
    assert stats["faults"] == {"malformed": 1} and stats["errors"] == {} and stats["replies"] == 2
    assert (usage["calls"], usage["errors"]) == (2, 0)
    assert (usage["prompt_tokens"], usage["completion_tokens"]) == (stats["prompt_tokens"], stats["completion_tokens"])
