"""GDPO optimizer: golden meta-prompts, canonical order, tolerant parsing, leak checks, and
`propose` through the real litellm path with the scripted fake provider.

Regenerate the golden files with `UPDATE_GOLDEN=1 pytest tests/optim/test_gdpo.py`.
"""
from __future__ import annotations

import asyncio
import json
import os
import random
from dataclasses import replace
from importlib import resources
from pathlib import Path

import pytest

from autodiff_cli.llm import fake
from autodiff_cli.llm.client import ModelClient
from autodiff_cli.llm.usage import Usage
from autodiff_cli.optim.gdpo import (
    METHODS,
    PROPOSAL_SCHEMA,
    FailedProposal,
    FeedbackItem,
    HistoryEntry,
    ParamView,
    ProposalRequest,
    SampleView,
    leaks_meta_prompt,
    parse_proposal,
    propose,
    render_optimizer_messages,
)
from autodiff_cli.spec.models import ModelConfig

GOLDEN = Path(__file__).resolve().parents[1] / "golden"


def check_golden(name: str, text: str) -> None:
    """Compare `text` with tests/golden/<name>; UPDATE_GOLDEN=1 rewrites the file instead."""
    path = GOLDEN / name
    if os.environ.get("UPDATE_GOLDEN"):
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text, encoding="utf-8")
        return
    assert path.exists(), f"missing golden file {path}; run UPDATE_GOLDEN=1 pytest {__file__}"
    expected = path.read_text(encoding="utf-8")
    assert text == expected, f"rendered text differs from {path}; if intended, run UPDATE_GOLDEN=1 pytest"


def as_text(messages: list[dict]) -> str:
    return "".join(f"=== {m['role']} ===\n{m['content']}\n" for m in messages)


INSTRUCTION = "You will answer a reasoning question. Think step by step."


def make_request(mode: str = "autodiff", **changes) -> ProposalRequest:
    feedback = [
        FeedbackItem("ex-7", 0.0, "count", 0, 0,
                     "The instruction does not say to count each item of a listed quantity separately, "
                     "so 'two apples' was counted once."),
        FeedbackItem("ex-2", 0.0, "hops.query", 0, 1, "The first query repeats the question instead of "
                                                      "naming the entity to look up."),
        FeedbackItem("ex-2", 0.0, "hops.query", 1, 1, "The second query ignores the passage retrieved in the "
                                                      "first hop; it should ask about the bridge entity."),
        FeedbackItem("ex-2", 0.0, "count", 0, 0, "No change needed for the counting step."),
        FeedbackItem("ex-9", 0.5, "count", 0, 0, "Vegetables were included although the question asks "
                                                 "only for fruits."),
    ]
    samples = [
        SampleView("ex-9", {"question": "I have a carrot and two plums. How many fruits do I have?"},
                   "Answer: 3", 2, 0.5),
        SampleView("ex-2", {"question": "Who directed the film that won the 1998 award?"},
                   "Answer: unknown", "Jane Doe", 0.0),
        SampleView("ex-7", {"question": "I have two apples and a pear. How many fruits do I have?", "level": 1},
                   "Answer: 2", 3, 0.0),
    ]
    request = ProposalRequest(
        param=ParamView("instruction", INSTRUCTION, "task instruction"),
        peers=[ParamView("answer_format", "End with 'Answer: N' where N is an integer.", "output format")],
        others=[ParamView("query_instruction", "Write a search query for the question.", None)],
        history=[
            HistoryEntry(0, {"instruction": INSTRUCTION, "answer_format": "End with 'Answer: N'."}, 0.45),
            HistoryEntry(2, {"instruction": INSTRUCTION + " Count every object separately.",
                             "answer_format": "End with 'Answer: N' where N is an integer."}, 0.55),
        ],
        failed=[
            FailedProposal({"instruction": "Count the fruits."}, 0.25, None, "did not beat the subset"),
            FailedProposal({"instruction": "You are a careful counter. Count each item."}, 0.75, 0.5,
                           "validation 0.500 <= best 0.550"),
        ],
        feedback=feedback if mode == "autodiff" else [],
        samples=samples,
        constraints=["Keep it under 80 words."],
        steps_since_improvement=3,
        mode=mode,
    )
    return replace(request, **changes)


# --- rendering ---------------------------------------------------------------------------------


def test_golden_autodiff():
    check_golden("optimizer_autodiff.txt", as_text(render_optimizer_messages(make_request("autodiff"))))


def test_golden_no_gradient():
    check_golden("optimizer_no_gradient.txt", as_text(render_optimizer_messages(make_request("no_gradient"))))


def test_feedback_order_does_not_matter():
    request = make_request()
    reference = render_optimizer_messages(request)
    rng = random.Random(0)
    for _ in range(5):
        shuffled = list(request.feedback)
        rng.shuffle(shuffled)
        samples = list(request.samples)
        rng.shuffle(samples)
        history = list(reversed(request.history))
        other = replace(request, feedback=shuffled, samples=samples, history=history)
        assert render_optimizer_messages(other) == reference


def test_feedback_grouped_worst_first_with_call_labels():
    user = render_optimizer_messages(make_request())[1]["content"]
    # ex-2 and ex-7 both score 0: ties broken by example id; ex-9 (0.5) last
    assert user.index("## Example ex-2") < user.index("## Example ex-7") < user.index("## Example ex-9")
    # within ex-2: topological order (count before hops.query), then call order
    first = user.index("[example ex-2 | node count | call 0]")
    call0 = user.index("[example ex-2 | node hops.query | call 0]")
    call1 = user.index("[example ex-2 | node hops.query | call 1]")
    assert first < call0 < call1


def test_peer_rule_history_and_failures_are_shown():
    system, user = (m["content"] for m in render_optimizer_messages(make_request()))
    assert "Change ONLY this parameter" in system
    assert "output-format peer" in system
    for method in METHODS:  # the schema's enum and the instructions agree
        assert method in system
    assert PROPOSAL_SCHEMA["properties"]["method"]["enum"] == list(METHODS)
    assert user.index("validation score 0.550") < user.index("validation score 0.450")
    assert "You are a careful counter. Count each item." in user
    assert "bolder change" in user
    assert "bolder change" not in render_optimizer_messages(make_request(steps_since_improvement=0))[1]["content"]


def test_no_gradient_shows_samples_without_feedback():
    user = render_optimizer_messages(make_request("no_gradient"))[1]["content"]
    assert "[example" not in user
    assert "Expected: Jane Doe" in user
    assert user.index("## Example ex-2") < user.index("## Example ex-7") < user.index("## Example ex-9")


def test_unknown_mode_is_refused():
    with pytest.raises(ValueError):
        render_optimizer_messages(make_request(mode="sgd"))


# --- parsing -----------------------------------------------------------------------------------

GOOD = {"reasoning": "Items with quantities were counted once.", "method": "add_instruction",
        "new_value": "Count every item, including each unit of a quantity like 'two apples'."}


def test_parse_good_json():
    value, method, reason = parse_proposal(json.dumps(GOOD))
    assert value == GOOD["new_value"]
    assert method == "add_instruction"
    assert reason == GOOD["reasoning"]


def test_parse_fenced_json():
    raw = "```json\n" + json.dumps(GOOD, indent=2) + "\n```"
    assert parse_proposal(raw)[0] == GOOD["new_value"]


def test_parse_json_in_prose_with_raw_newlines():
    raw = ('Sure! Here is my {improved} proposal:\n{"reasoning": "r", "method": "Add Instruction", '
           '"new_value": "Line one.\nLine two."}\nHope this helps.')
    value, method, _ = parse_proposal(raw)
    assert value == "Line one.\nLine two."
    assert method == "add_instruction"


def test_parse_new_value_block():
    raw = "I would rephrase it.\n<NEW_VALUE>\nCount each item separately.\n</NEW_VALUE>"
    assert parse_proposal(raw)[0] == "Count each item separately."


@pytest.mark.parametrize("raw", [
    "Count every fruit carefully and answer with a number.",
    "",
    '{"reasoning": "unterminated',
    "[1, 2, 3]",
])
def test_parse_garbage_never_returns_raw(raw):
    value, _, reason = parse_proposal(raw)
    assert value is None
    assert reason


def test_parse_missing_key():
    value, method, reason = parse_proposal('{"reasoning": "r", "method": "rephrase"}')
    assert value is None and method == "rephrase"
    assert "new_value" in reason


def test_parse_empty_and_non_text_values():
    assert parse_proposal('{"new_value": "   "}')[0] is None
    assert parse_proposal('{"new_value": ["a", "b"]}')[0] is None


# --- leaks -------------------------------------------------------------------------------------


def system_template() -> str:
    return resources.files("autodiff_cli.prompts").joinpath("optimizer.system.j2").read_text(encoding="utf-8")


def test_leak_of_template_text_is_detected():
    value = ("Count the objects in the question. It must be self-contained prompt text addressed to "
             "the task model.")
    run = leaks_meta_prompt(value)
    assert run is not None and len(run.split()) == 8
    assert run == "it must be self contained prompt text addressed"  # words, punctuation dropped
    # case and punctuation do not hide it
    assert leaks_meta_prompt(value.upper().replace(" ", " , ")) == run


def test_ordinary_prompt_is_not_a_leak():
    for value in [INSTRUCTION,
                  "You are an expert at counting. List every object the question mentions, count each unit "
                  "of a quantity separately (two apples are 2), then add them up step by step and check "
                  "your total against the question before you answer.",
                  "Classify the question into one of: ABBR, DESC, ENTY, HUM, LOC, NUM. Reply with the label."]:
        assert leaks_meta_prompt(value) is None


def test_runs_through_jinja_tags_are_not_static_text():
    # "{{ param.name }}" sits between these words: the run around it is not a static 8-word run
    assert leaks_meta_prompt("Write the new value of instruction now, as the JSON object") is None


def test_leak_already_in_current_value_is_ignored():
    value = "Do not repeat a failed proposal of this step, nor a light rewording."
    assert leaks_meta_prompt(value) is not None
    assert leaks_meta_prompt(value, ignore=value) is None


# --- propose through litellm -------------------------------------------------------------------


def reply_for(value: str, method: str = "add_instruction") -> str:
    return json.dumps({"reasoning": "because", "method": method, "new_value": value})


LEAKED = "Count objects. It must be self-contained prompt text addressed to the task model."


@pytest.fixture
def client(tmp_path):
    fake.reset_fake_state()
    rules = [
        {"match": "improve: `good`", "reply": "Here you go:\n" + reply_for("Count each unit of every item.")},
        {"match": "improve: `garbage`", "reply": "Count the fruits, I think that is best."},
        {"match": "improve: `same`", "reply": reply_for("  Old value.  ")},
        {"match": "improve: `leaky`", "reply": reply_for(LEAKED)},
        {"match": "improve: `repeat`", "reply": reply_for("Count the fruits.")},
        {"match": "improve: `empty`", "reply": reply_for("")},
        {"match": "improve: `copies_question`", "reply": reply_for(
            "Count carefully. For example: I have two apples and a pear. How many fruits?")},
        {"match": "improve: `copies_diagnosis`", "reply": reply_for(
            "Count carefully: the model counted the pear twice because it was listed last.")},
    ]
    script = tmp_path / "optimizer.yaml"
    script.write_text(json.dumps({"rules": rules, "default": "no rule"}), encoding="utf-8")  # JSON is YAML
    models = {"opt": ModelConfig(model="fake/optimizer.yaml")}
    yield ModelClient(models, config_dir=tmp_path, usage=Usage(), cache=None, base_delay=0)
    fake.reset_fake_state()


def run_propose(client, name: str, value: str = "Old value."):
    request = make_request(param=ParamView(name, value, "task instruction"),
                           failed=[FailedProposal({name: "Count the fruits."}, 0.2, None, "subset")])
    return asyncio.run(propose(client, "opt", request))


def test_propose_good_reply(client):
    proposal = run_propose(client, "good")
    assert proposal.param == "good"
    assert proposal.value == "Count each unit of every item."
    assert proposal.method == "add_instruction"
    assert proposal.reason == "because"
    usage = client.usage.role("optimizer")
    assert usage["calls"] == 1 and usage["errors"] == 0 and usage["prompt_tokens"] > 0
    assert client.usage.role("task")["calls"] == 0


def test_propose_garbage_reply_keeps_raw(client, caplog):
    with caplog.at_level("WARNING", logger="autodiff.optimizer"):
        proposal = run_propose(client, "garbage")
    assert proposal.value is None
    assert proposal.raw == "Count the fruits, I think that is best."
    assert proposal.reason.startswith("unparseable")
    assert "Count the fruits, I think" in caplog.text
    assert client.usage.role("optimizer")["calls"] == 1


@pytest.mark.parametrize("name, reason", [
    ("same", "the proposed value is unchanged"),
    ("leaky", "shares 8 words with the optimizer's instructions: "),
    ("repeat", "identical to a failed proposal of this step"),
    ("empty", "the proposed value is empty"),
])
def test_propose_rejections(client, name, reason):
    proposal = run_propose(client, name)
    assert proposal.value is None
    assert proposal.reason.startswith(reason)
    assert proposal.raw


def test_a_proposal_that_pastes_a_training_example_is_refused_with_the_reason(client):
    proposal = run_propose(client, "copies_question")
    assert proposal.value is None and proposal.refused.startswith("Count carefully. For example")
    assert proposal.reason.startswith("refused: it copies 6 words of training example ex-7's question "
                                      '("i have two apples and a pear")')


def test_a_proposal_that_pastes_the_backward_engines_diagnosis_is_refused(client):
    feedback = [FeedbackItem("ex-3", 0.0, "count", 0, 0, "Say how to count repeated items. "
                             "(Diagnosis: The model counted the pear twice because it was listed last.)")]
    request = make_request(param=ParamView("copies_diagnosis", "Old value.", "task instruction"), feedback=feedback)
    proposal = asyncio.run(propose(client, "opt", request))
    assert proposal.value is None and "of the diagnosis of example ex-3" in proposal.reason


def test_what_the_prompt_already_says_is_no_copy(client):
    current = "Old value. Example: I have two apples and a pear."
    proposal = run_propose(client, "copies_question", value=current)
    assert proposal.refused is None and proposal.value.startswith("Count carefully")


def test_leak_in_current_value_does_not_block_proposals(client):
    proposal = run_propose(client, "leaky", value="Old value. " + LEAKED.split(". ", 1)[1])
    assert proposal.value == LEAKED


def test_value_delimiters_copied_from_the_meta_prompt_are_dropped():
    value, method, _ = parse_proposal('{"reasoning": "r", "method": "rephrase", "new_value": "<VALUE>Think step by step.</VALUE>"}')
    assert (value, method) == ("Think step by step.", "rephrase")
    assert parse_proposal('{"reasoning": "r", "method": "rephrase", "new_value": "<VALUE></VALUE>"}')[0] is None


def test_history_names_only_values_that_differ_from_the_current_ones():
    # `current` holds every param (a fixed one of another node and an empty demos block too):
    # a history entry lists beside the param only what was different then
    request = make_request(
        history=[HistoryEntry(1, {"instruction": INSTRUCTION, "answer_format": "End with 'Answer: N' where N is an integer.",
                                  "retriever_prompt": "Find passages.", "shots": "", "query_instruction": "Old query."},
                              0.5)],
        current={"instruction": INSTRUCTION, "answer_format": "End with 'Answer: N' where N is an integer.",
                 "retriever_prompt": "Find passages.", "shots": "", "query_instruction": "Write a search query for the question."})
    user = render_optimizer_messages(request)[1]["content"]
    assert "Old query." in user  # changed since: shown
    assert "retriever_prompt" not in user and "shots" not in user  # unchanged (fixed, empty demos): not shown
