"""The scripted fake provider, alone and through litellm's real custom-provider path."""
from __future__ import annotations

import asyncio
import textwrap

import pytest

from autodiff_cli.errors import ModelNotFound, SpecError
from autodiff_cli.llm import fake
from autodiff_cli.llm.providers import load_litellm
from autodiff_cli.llm.providers.registry import provider_for

SCRIPT = r"""
rules:
  - match: "How many"
    reply: "Let me count. Answer: 3"
  - match: 'fruit (\w+) and (\w+)'
    reply: 'Answer: {1}+{2} {"json": true} {7}'
  - match: 'Be (\w+)'
    in: system
    reply: "I am {1}. You said: {user}"
  - match: "needle"
    in: all
    reply: "found"
  - match: "flaky"
    fail_times: 2
    error: 503
    reply: "ok"
  - match: "boom"
    error: 500
"""


@pytest.fixture(autouse=True)
def _fresh_state():
    fake.reset_fake_state()
    yield
    fake.reset_fake_state()


def write(tmp_path, text, name="script.yaml"):
    path = tmp_path / name
    path.write_text(textwrap.dedent(text))
    return path


def user(text, system=None):
    messages = [{"role": "system", "content": system}] if system else []
    return messages + [{"role": "user", "content": text}]


def test_rules_groups_placeholders_and_default(tmp_path):
    script = fake.load_script(write(tmp_path, SCRIPT + 'default: "I don\'t know."\n'))
    assert fake.respond(script, user("How many apples?")) == "Let me count. Answer: 3"
    # Only {N}, {user}, {system} are placeholders: JSON braces and unknown groups stay literal.
    assert fake.respond(script, user("a fruit apple and pear")) == 'Answer: apple+pear {"json": true} {7}'
    assert fake.respond(script, user("hi", system="Be brief")) == "I am brief. You said: hi"
    assert fake.respond(script, user("hay", system="needle here")) == "found"
    assert fake.respond(script, user("nothing matches")) == "I don't know."


def test_default_omitted_echoes_last_user_message(tmp_path):
    script = fake.load_script(write(tmp_path, "rules: []\n"))
    messages = [{"role": "user", "content": "first"}, {"role": "assistant", "content": "x"},
                {"role": "user", "content": "echo me"}]
    assert fake.respond(script, messages) == "echo me"


def test_fail_times_counts_per_messages(tmp_path):
    script = fake.load_script(write(tmp_path, SCRIPT))
    for _ in range(2):
        with pytest.raises(fake.ScriptedError):
            fake.respond(script, user("flaky one"))
    assert fake.respond(script, user("flaky one")) == "ok"
    # Other messages have their own counter.
    with pytest.raises(fake.ScriptedError):
        fake.respond(script, user("flaky two"))
    # A rule without fail_times always fails.
    for _ in range(3):
        with pytest.raises(fake.ScriptedError):
            fake.respond(script, user("boom"))


def test_replies_come_in_turn_per_messages(tmp_path):
    script = fake.load_script(write(tmp_path, r"rules: [{match: 'coin (\w+)', replies: ['tails {1}', 'heads {1}']}]" + "\n"))
    assert [fake.respond(script, user("coin a")) for _ in range(3)] == ["tails a", "heads a", "heads a"]
    assert fake.respond(script, user("coin b")) == "tails b"  # other messages have their own turn


def test_missing_script_is_model_not_found(tmp_path):
    with pytest.raises(ModelNotFound, match="not found"):
        fake.load_script(tmp_path / "nope.yaml")


@pytest.mark.parametrize(
    "text, needle",
    [
        ("rules: [{match: x, error: 418}]", "expected"),
        ("rules: [{match: x}]", "reply"),
        ("rules: [{match: '(', reply: y}]", "bad regex"),
        ("rules: [{match: x, reply: y, colour: red}]", "unknown keys"),
        ("rules: [{match: x, replies: []}]", "non-empty list"),
        ("[1, 2]", "expected a mapping"),
    ],
)
def test_malformed_script_is_spec_error(tmp_path, text, needle):
    with pytest.raises(SpecError, match=needle):
        fake.load_script(write(tmp_path, text + "\n"))


def test_script_identity_is_sha256_of_bytes(tmp_path):
    path = write(tmp_path, SCRIPT)
    first = fake.script_identity(path)
    path.write_text(SCRIPT + "latency: 0\n")
    assert fake.script_identity(path) != first
    assert len(first) == 64


# --- through litellm -----------------------------------------------------------------------------

ERRORS = """
rules:
  - {match: "^429$", error: 429, retry_after: 1.5}
  - {match: "^500$", error: 500}
  - {match: "^503$", error: 503}
  - {match: "^400$", error: 400}
  - {match: "^timeout$", error: timeout}
  - {match: "^connection$", error: connection}
  - {match: "^context_length$", error: context_length}
  - {match: "^auth$", error: auth}
  - {match: "^empty$", error: empty}
default: "one two three"
"""


def litellm_serving_fake():
    """litellm with the `fake` handler registered (the client does this before a fake model's first call)."""
    litellm = load_litellm()
    provider_for("fake/script.yaml").prepare(litellm)
    return litellm


def acomplete(path, text, **kwargs):
    litellm = litellm_serving_fake()
    return asyncio.run(
        litellm.acompletion(model=f"fake/{path}", messages=user(text), num_retries=0, max_retries=0, **kwargs)
    )


def test_reply_and_usage_through_litellm(tmp_path):
    path = write(tmp_path, ERRORS)
    response = acomplete(path, "count these four words")
    assert response.choices[0].message.content == "one two three"
    assert (response.usage.prompt_tokens, response.usage.completion_tokens) == (4, 3)
    assert fake.fake_stats(path)["calls"] == 1


def test_empty_reply_through_litellm(tmp_path):
    response = acomplete(write(tmp_path, ERRORS), "empty")
    assert response.choices[0].message.content in ("", None)


@pytest.mark.parametrize(
    "kind, cls_name, status",
    [
        ("429", "RateLimitError", 429),
        ("500", "InternalServerError", 500),
        ("503", "ServiceUnavailableError", 503),
        ("400", "BadRequestError", 400),
        ("timeout", "Timeout", 408),
        ("connection", "APIConnectionError", None),
        ("context_length", "ContextWindowExceededError", 400),
        ("auth", "AuthenticationError", 401),
    ],
)
def test_errors_are_litellm_exceptions(tmp_path, kind, cls_name, status):
    litellm = litellm_serving_fake()
    with pytest.raises(getattr(litellm, cls_name)) as info:
        acomplete(write(tmp_path, ERRORS), kind)
    if status is not None:
        assert info.value.status_code == status
    if kind == "429":
        assert info.value.response.headers["retry-after"] == "1.5"


def test_provider_registration_is_idempotent():
    litellm = litellm_serving_fake()
    before = [e["provider"] for e in litellm.custom_provider_map]
    provider_for("fake/other.yaml").prepare(litellm)
    provider_for("fake/script.yaml").prepare(litellm)
    assert [e["provider"] for e in litellm.custom_provider_map] == before
    assert before.count("fake") == 1
    assert load_litellm() is litellm


def test_docstring_example_is_a_valid_script(tmp_path):
    example = fake.__doc__.split("The script is YAML:\n", 1)[1].split("\nErrors are raised", 1)[0]
    script = fake.load_script(write(tmp_path, example))
    assert fake.respond(script, user("a fruit kiwi")) == "Answer: kiwi"
    assert fake.respond(script, user("unknown")) == "I don't know."
    assert [r.error for r in script.rules] == [None, None, "500", "500", None]
    assert [fake.respond(script, user("coin")) for _ in range(3)] == ["tails", "heads", "heads"]
