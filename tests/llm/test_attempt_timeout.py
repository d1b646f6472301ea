"""Issue 14 item 4: an attempt's `timeout` starts when its request is sent, not while litellm, the
openai SDK and httpx import or build their clients; usage `calls` counts the attempts that reached
the provider and `unsent` those that never did, so usage equals what the server saw, cold process
included."""
from __future__ import annotations

import asyncio
import importlib.util
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from autodiff_cli.errors import ModelCallError
from autodiff_cli.llm import fake
from autodiff_cli.llm.client import ModelClient
from autodiff_cli.llm.usage import Usage
from autodiff_cli.spec.models import ModelConfig
from tests.support.fake_server import FakeServer

ROOT = Path(__file__).resolve().parents[2]
KEY_ENV = "ATTEMPT_TIMEOUT_KEY"
SCRIPT = r"""
rules:
  - {match: 'n=(\d+)', reply: "Counted. Answer: {1}"}
default: "Answer: 0"
"""
PIPELINE = """\
nodes:
  count: {kind: llm, user: "{{ input.question }}"}
  parse: {kind: function, fn: last_integer, args: {text: count}}
output: parse
metric: {fn: exact_match, args: {pred: parse, target: input.answer}}
"""


@pytest.fixture(autouse=True)
def _fresh():
    fake.reset_fake_state()
    yield
    fake.reset_fake_state()


@pytest.fixture
def script(tmp_path) -> Path:
    path = tmp_path / "script.yaml"
    path.write_text(SCRIPT)
    return path


@pytest.fixture
def refused_url():
    """An api_base where nothing listens: the port is bound (so no other process takes it) but not listening."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    yield f"http://127.0.0.1:{sock.getsockname()[1]}/v1"
    sock.close()


def project(tmp_path: Path, api_base: str, n: int, *, timeout: float, max_retries: int, concurrency: int = 8) -> Path:
    rows = [{"id": f"q{i}", "question": f"How many? n={i}", "answer": str(i)} for i in range(n)]
    (tmp_path / "val.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    spec = tmp_path / "spec.yaml"
    spec.write_text(f"name: cold\nmodels:\n  task: {{model: openai/fake, api_base: \"{api_base}\", "
                    f"api_key_env: {KEY_ENV}, concurrency: {concurrency}, timeout: {timeout:g}, "
                    f"max_retries: {max_retries}}}\ndata:\n  val: val.jsonl\n" + PIPELINE)
    return spec


def eval_cold(spec: Path, tmp_path: Path, *extra: str) -> tuple[int, dict, str]:
    """`autodiff eval --json` in a fresh interpreter: nothing of litellm, openai or httpx imported yet."""
    env = {**os.environ, KEY_ENV: "any", "AUTODIFF_CACHE": str(tmp_path / "cache")}
    env.pop("AUTODIFF_CACHE_URL", None)
    r = subprocess.run([sys.executable, "-m", "autodiff_cli.app.cli", "eval", str(spec), "--split", "val", "--json",
                        "--no-cache", *extra], capture_output=True, text=True, env=env, cwd=ROOT, timeout=300)
    assert "Traceback" not in r.stderr, r.stderr
    return r.returncode, json.loads(r.stdout.strip().splitlines()[-1]), r.stderr


def test_a_cold_process_does_not_time_out_its_first_wave(script, tmp_path):
    """The tester's reproduction: concurrency 8, timeout 0.8 s, no retries, a server answering in 10 ms.
    Before the fix the first 8 attempts timed out while litellm built its client (8 of 40 errors) and
    usage counted 40 calls where the server saw 32."""
    with FakeServer(script, latency=0.01).in_thread() as srv:
        spec = project(tmp_path, srv.api_base, 40, timeout=0.8, max_retries=0)
        code, report, stderr = eval_cold(spec, tmp_path)
        stats = srv.stats()
    usage = report["usage"]["task"]
    assert (code, report["errors"], report["completed"], report["score"]) == (0, 0, 40, 1.0), stderr
    assert usage["calls"] == stats["requests"] == 40 and usage["unsent"] == 0
    assert usage["errors"] == sum(stats["errors"].values()) == 0
    assert (usage["prompt_tokens"], usage["completion_tokens"]) == (stats["prompt_tokens"], stats["completion_tokens"])


def test_refused_connections_are_unsent_attempts_not_calls(refused_url, tmp_path):
    code, report, stderr = eval_cold(project(tmp_path, refused_url, 4, timeout=0.8, max_retries=2), tmp_path,
                                     "--out", str(tmp_path / "rows.jsonl"))
    usage = report["usage"]["task"]
    assert code == 3 and report["errors"] == 4  # every example failed: above max_error_rate
    assert (usage["calls"], usage["errors"], usage["unsent"]) == (0, 0, 4 * 3)  # retried like connection errors
    rows = [json.loads(x) for x in (tmp_path / "rows.jsonl").read_text().splitlines()]
    assert all("3 attempts (none reached the provider)" in r["error"] for r in rows), rows[0]["error"]


def test_a_slow_server_times_out_and_the_attempt_is_a_call(script, tmp_path):
    with FakeServer(script, latency=1.5).in_thread() as srv:
        spec = project(tmp_path, srv.api_base, 3, timeout=0.5, max_retries=1)
        started = time.monotonic()
        code, report, _ = eval_cold(spec, tmp_path)
        wall = time.monotonic() - started
        time.sleep(0.05)  # the abandoned requests reach the counters
        stats = srv.stats()
    usage = report["usage"]["task"]
    assert code == 3 and report["errors"] == 3  # every example failed
    assert usage["calls"] == stats["requests"] == 6 and usage["errors"] == 6 and usage["unsent"] == 0
    assert wall < 30


# ---------------------------------------------------------------- in process


def client_for(api_base, tmp_path: Path, **cfg) -> ModelClient:
    model = ModelConfig(model="openai/fake", api_base=api_base, api_key_env="K", **cfg)
    return ModelClient({"m": model}, config_dir=tmp_path, usage=Usage(), cache=None, environ={"K": "k"},
                       base_delay=0.0)


def user(text: str) -> list[dict]:
    return [{"role": "user", "content": text}]


def test_time_spent_before_the_request_is_sent_is_not_part_of_the_timeout(script, tmp_path, monkeypatch):
    """litellm building the openai client for 1 s (blocking the loop, as a cold import does) must not
    time out an attempt whose timeout is 0.5 s and whose server answers at once."""
    from autodiff_cli.llm.providers import load_litellm

    load_litellm()  # first: it keeps litellm from fetching its cost map
    from litellm.llms.openai.openai import OpenAIChatCompletion

    real = OpenAIChatCompletion._get_openai_client
    slow = {"left": 1}

    def cold_client(self, *args, **kwargs):
        if slow["left"]:
            slow["left"] -= 1
            time.sleep(1.0)
        return real(self, *args, **kwargs)

    monkeypatch.setattr(OpenAIChatCompletion, "_get_openai_client", cold_client)

    async def main():
        async with FakeServer(script, latency=0.0) as srv:
            client = client_for(srv.api_base, tmp_path, timeout=0.5, max_retries=0)
            replies = await asyncio.gather(*(client.complete("m", user(f"n={i}")) for i in range(4)))
            return replies, client.usage.to_dict()["task"], srv.stats()

    replies, usage, stats = asyncio.run(main())
    assert [r.text for r in replies] == [f"Counted. Answer: {i}" for i in range(4)]
    assert usage["calls"] == stats["requests"] == 4 and usage["unsent"] == 0 and usage["errors"] == 0


def test_time_before_the_fake_handler_starts_is_not_part_of_the_timeout(tmp_path, monkeypatch):
    """In-process providers: the request is sent when the handler starts (for `fake/`), so the time
    litellm spends before it is not part of the timeout either."""
    from autodiff_cli.llm.providers import load_litellm

    litellm = load_litellm()
    (tmp_path / "s.yaml").write_text("rules: []\ndefault: fine\n")
    real = litellm.acompletion

    async def slow_start(**kwargs):
        time.sleep(0.4)  # blocking, before litellm reaches the handler
        return await real(**kwargs)

    monkeypatch.setattr(litellm, "acompletion", slow_start)
    model = ModelConfig(model="fake/s.yaml", timeout=0.2, max_retries=0)
    client = ModelClient({"m": model}, config_dir=tmp_path, usage=Usage(), cache=None, environ={})
    assert asyncio.run(client.complete("m", user("q"))).text == "fine"
    assert client.usage.to_dict()["task"]["calls"] == 1 and fake.fake_stats(tmp_path / "s.yaml")["calls"] == 1


def test_an_attempt_litellm_never_sends_is_given_up_as_unsent(tmp_path, monkeypatch):
    """Waiting to be sent is bounded (timeout + PRE_SEND_GRACE): litellm stuck before sending (here: never
    reaching the provider at all) ends the attempt as unsent, retried like a connection error."""
    from autodiff_cli.llm import client as client_module
    from autodiff_cli.llm.providers import load_litellm

    litellm = load_litellm()

    async def stuck(**kwargs):
        await asyncio.sleep(30)

    monkeypatch.setattr(litellm, "acompletion", stuck)
    monkeypatch.setattr(client_module, "PRE_SEND_GRACE", 0.2)
    client = client_for("http://127.0.0.1:9/v1", tmp_path, timeout=0.1, max_retries=1)
    started = time.monotonic()
    with pytest.raises(ModelCallError, match=r"2 attempts \(none reached the provider\).*not sent within 0.3 s"):
        asyncio.run(client.complete("m", user("q")))
    assert time.monotonic() - started < 5
    usage = client.usage.to_dict()["task"]
    assert (usage["calls"], usage["errors"], usage["unsent"]) == (0, 0, 2)


@pytest.mark.local_model
@pytest.mark.skipif(importlib.util.find_spec("llama_cpp") is None, reason="llama-cpp-python not installed")
def test_a_local_call_is_timed_from_generation_not_from_loading_the_model(tmp_path, monkeypatch):
    """`local/`: the request is sent when the model, loaded and free, starts on it. A slow load is not
    part of the timeout; a generation longer than the timeout is cut and counted as a call.

    Timing-free where it can be: the clock of an attempt starts at `request_sent`, so the test checks that
    it is signalled after the load has finished, rather than racing a short timeout against a first
    generation (whose speed depends on how busy the machine is)."""
    from autodiff_cli.llm import local
    from autodiff_cli.llm.providers import local as local_provider

    monkeypatch.setenv("AUTODIFF_CACHE", str(tmp_path / "cache"))
    events: list[str] = []
    real_load, real_sent = local._load, local_provider.request_sent

    def slow_load(path):
        events.append("load starts")
        time.sleep(1.0)  # as a first load of a larger model
        model = real_load(path)
        events.append("load ends")
        return model

    def sent(call_id):
        events.append("sent")
        real_sent(call_id)

    monkeypatch.setattr(local, "_load", slow_load)
    monkeypatch.setattr(local_provider, "request_sent", sent)
    models = {"short": ModelConfig(model="local/smollm2-135m", max_tokens=4, temperature=0.0, timeout=120,
                                   max_retries=0),
              "long": ModelConfig(model="local/smollm2-135m", max_tokens=2000, temperature=0.0, timeout=1.0,
                                  max_retries=0)}
    client = ModelClient(models, config_dir=tmp_path, usage=Usage(), cache=None)
    assert asyncio.run(client.complete("short", user("Say hello."))).text.strip()
    assert events == ["load starts", "load ends", "sent"]  # the attempt's clock started after the load
    started = time.monotonic()
    with pytest.raises(ModelCallError, match="no reply within 1 s"):
        asyncio.run(client.complete("long", user("Write a very long story about a dragon, in 3000 words.")))
    assert time.monotonic() - started < 30  # cut at the timeout, not run to max_tokens
    usage = client.usage.to_dict()["task"]
    assert (usage["calls"], usage["errors"], usage["unsent"]) == (2, 1, 0)


def test_a_budget_gate_is_refunded_for_attempts_that_were_never_sent(refused_url, tmp_path):
    class Gate:
        def __init__(self):
            self.admitted = self.refunded = 0

        def __call__(self, role):
            self.admitted += 1

        def refund(self, role):
            self.refunded += 1

    client = client_for(refused_url, tmp_path, max_retries=2)
    client.before_call = gate = Gate()
    with pytest.raises(ModelCallError, match="3 attempts"):
        asyncio.run(client.complete("m", user("q")))
    usage = client.usage.to_dict()["task"]
    assert (usage["calls"], usage["unsent"]) == (0, 3)
    assert gate.admitted == gate.refunded == 3


def test_a_refused_deployment_is_unsent_and_the_others_serve(script, refused_url, tmp_path):
    async def main():
        async with FakeServer(script, latency=0.0) as srv:
            client = client_for([refused_url, srv.api_base], tmp_path, max_retries=2)
            replies = await asyncio.gather(*(client.complete("m", user(f"n={i}")) for i in range(10)))
            return replies, client.usage.to_dict()["task"], srv.stats(), client.deployment_stats()["m"]

    replies, usage, stats, pool = asyncio.run(main())
    assert [r.text for r in replies] == [f"Counted. Answer: {i}" for i in range(10)]
    assert usage["calls"] == stats["requests"] == 10 and usage["errors"] == 0
    assert usage["unsent"] == pool[0]["failed"] >= 1 and pool[0]["served"] == 0


def test_usage_from_an_older_dict_without_unsent():
    old = {"task": {"calls": 3, "cached_calls": 1, "errors": 1, "prompt_tokens": 9, "completion_tokens": 2,
                    "cost_usd": 0.0}}
    usage = Usage.from_dict(old)
    assert usage.to_dict()["task"] == {**old["task"], "unsent": 0}
    usage.record("task", unsent=2)
    assert usage.total_calls() == 3 and usage.to_dict()["task"]["unsent"] == 2
