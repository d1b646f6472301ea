"""Backward pass: textual gradients over real traces (forward engine + scripted fake model).

Each test runs examples forward with `ForwardEngine`, scores them with `engine.score`, writes
the loss evaluation with `grad.loss.evaluate_loss` and walks the trace with
`BackwardEngine.backward`. Task and backward model share one fake script: the backward
engine's requests are told apart by their user message ("Invocation <call id> ..." for an llm
call, "Function step <call id> ..." for a routed function call).

Regenerate the golden files with `UPDATE_GOLDEN=1 pytest tests/grad/test_backward.py`.
"""
from __future__ import annotations

import asyncio
import json
import random
import re

import pytest
import yaml

from autodiff_cli.engine.forward import ForwardEngine, score
from autodiff_cli.grad.backward import BackwardEngine, _input_key, _param_key, canonical
from autodiff_cli.grad.loss import evaluate_loss
from autodiff_cli.llm.client import ModelClient
from autodiff_cli.llm.fake import reset_fake_state
from autodiff_cli.llm.usage import Usage
from autodiff_cli.nodes.compiler import compile_spec
from autodiff_cli.spec.loader import load_spec
from autodiff_cli.spec.prompts_file import initial_values
from tests.conftest import write
from tests.optim.test_gdpo import as_text, check_golden
from tests.specs import COUNT_PIPELINE

MODELS = """
models:
  task: {model: fake/script.yaml}
  backward: {model: fake/script.yaml}
data:
  val: val.jsonl
"""


@pytest.fixture(autouse=True)
def fresh_fake():
    reset_fake_state()


class Recorder:
    """Wraps the ModelClient: records every request and, given a seed, delays each call by a
    random few milliseconds so branches and examples finish in a different order."""

    def __init__(self, client: ModelClient, seed: int | None = None) -> None:
        self.client = client
        self.usage = client.usage
        self.requests: list[dict] = []
        self.rng = random.Random(seed) if seed is not None else None

    async def complete(self, model_name, messages, *, role="task", json_schema=None):
        self.requests.append({"model": model_name, "messages": messages, "role": role, "schema": json_schema})
        if self.rng is not None:
            await asyncio.sleep(self.rng.random() * 0.01)
        return await self.client.complete(model_name, messages, role=role, json_schema=json_schema)

    def backward_requests(self) -> list[dict]:
        return [r for r in self.requests if r["role"] == "backward"]

    def request_for(self, call_id: str) -> dict:
        found = [r for r in self.backward_requests()
                 if r["messages"][1]["content"].startswith((f"Invocation {call_id} ", f"Function step {call_id} "))]
        assert len(found) == 1, f"{len(found)} backward requests for {call_id}"
        return found[0]

    def prompt_for(self, call_id: str) -> str:
        return self.request_for(call_id)["messages"][1]["content"]


def P(name: str) -> str:
    """The reply key of a prompt parameter."""
    return _param_key(name)


def I(name: str) -> str:
    """The reply key of a traced input."""
    return _input_key(name)


def script(*rules: tuple, default: str = "no idea") -> str:
    """A fake-model script; a rule is (regex, reply) or (regex, reply, where); dict replies become JSON."""
    out = []
    for match, reply, *where in rules:
        rule = {"match": match, **({"in": where[0]} if where else {})}
        if isinstance(reply, dict) and set(reply) == {"error"}:
            rule.update(reply)
        else:
            rule["reply"] = json.dumps(reply) if isinstance(reply, dict) else reply
        out.append(rule)
    return yaml.safe_dump({"rules": out, "default": default}, sort_keys=False)


def predecessor_keys(request: dict) -> list[str]:
    """The keys the backward engine must fill (the schema's, without the diagnosis)."""
    return [k for k in request["schema"]["required"] if k != "diagnosis"]


def feedback_section(prompt: str) -> str:
    """The '## Feedback on this output' section of a backward prompt."""
    return prompt.split("## Feedback on this output\n", 1)[1].split("\n\n## ", 1)[0]


def setup(tmp_path, spec: str, script: str):
    write(tmp_path / "script.yaml", script)
    (tmp_path / "val.jsonl").write_text("")
    loaded = load_spec(write(tmp_path / "spec.yaml", spec))
    program = compile_spec(loaded)
    client = ModelClient(loaded.spec.models, config_dir=tmp_path, usage=Usage(), cache=None, base_delay=0)
    return program, client


def trainable(program) -> set[str]:
    return {n for n, p in program.params.items() if p.trainable and p.kind == "prompt"}


def forward(program, client, example_id: str, fields: dict, threshold: float = 0.5):
    trace = asyncio.run(ForwardEngine(program, client).run(example_id, fields, initial_values(program.spec)))
    assert trace.error is None
    return trace, evaluate_loss(program, trace, score(program.loss, trace), threshold)


def backward(program, client, trace, evaluation, seed=None):
    recorder = Recorder(client, seed)
    engine = BackwardEngine(program, recorder, "backward", trainable(program))
    return asyncio.run(engine.backward(trace, evaluation)), recorder


def rows(result) -> list[tuple]:
    return [(g.node, g.call_index, g.target, g.feedback) for g in result.gradients]


# ------------------------------------------------------------------ 1. llm -> function chain

CHAIN = MODELS + "name: chain\n" + COUNT_PIPELINE.lstrip()

COUNT_REPLY = {P("instruction"): "It never says to add the counts: tell the model to add them.",
               P("answer_format"): "Should be ignored."}
APPLES = {"question": "How many fruits? 2 apples and 3 pears.", "answer": "5"}


def chain_script(reply) -> str:
    return script(("^Invocation count#0 ", reply), ("How many", "I see 2 apples and 3 pears. Answer: 2"))


def chain(tmp_path, reply=COUNT_REPLY, spec=CHAIN):
    program, client = setup(tmp_path, spec, chain_script(reply))
    trace, ev = forward(program, client, "apples", APPLES)
    return program, client, trace, ev


def test_function_passes_the_loss_unchanged_and_only_trainable_params_get_gradients(tmp_path):
    program, client, trace, ev = chain(tmp_path)
    assert ev.failed and ev.score == 0.0 and ev.sources == ["parse#0"]
    result, rec = backward(program, client, trace, ev)

    assert result.parse_failures == 0
    assert rows(result) == [
        ("count", 0, "param:instruction", "It never says to add the counts: tell the model to add them."),
        ("parse", 0, "call:count#0", ev.text),  # the parse call hands the evaluation on unchanged
    ]
    # one backward-engine call, for count#0; the function call costs nothing
    assert len(rec.backward_requests()) == 1
    assert client.usage.role("backward")["calls"] == 1
    request = rec.request_for("count#0")
    assert predecessor_keys(request) == [P("instruction")]
    prompt = request["messages"][1]["content"]
    assert "- `instruction` (task instruction): Count the things.\n" in prompt
    assert "- `answer_format` (output format, fixed): End with Answer: N\n" in prompt
    assert f'- "{P("instruction")}": the prompt parameter `instruction`' in prompt
    assert f'"{P("answer_format")}"' not in prompt  # shown as a peer, never a key of the reply
    assert feedback_section(prompt) == ev.text
    assert "I see 2 apples and 3 pears. Answer: 2" in prompt  # the call's output
    assert request["messages"][0]["content"].startswith("You are the backward engine")


# ------------------------------------------------------------------ 2. two traced inputs

TWO_INPUTS = MODELS + """
name: two
params:
  pa: {value: "Name a fruit."}
  pb: {value: "Name a colour."}
nodes:
  a: {kind: llm, system: "{{ pa }}", user: "A: {{ input.question }}"}
  b: {kind: llm, system: "{{ pb }}", user: "B: {{ input.question }}"}
  merge: {kind: function, fn: dedup_extend, args: {items: a, new: b}, backward: MODE}
  text: {kind: function, fn: join, args: {items: merge}, with: {sep: " "}}
output: text
metric: {fn: exact_match, args: {pred: text, target: input.answer}}
"""

TWO_SCRIPT = script(
    ("^Function step merge#0 ", {I("items"): "The fruit should have been a banana.",
                                 I("new"): "The colour should have been left out."}),
    ("^Invocation a#0 ", {P("pa"): "Ask for a yellow fruit."}),
    ("^Invocation b#0 ", {P("pb"): "Ask for no colour at all."}),
    ("^A: ", "apple"),
    ("^B: ", "red"),
)


def two_inputs(tmp_path, mode):
    program, client = setup(tmp_path, TWO_INPUTS.replace("MODE", mode), TWO_SCRIPT)
    trace, ev = forward(program, client, "fruit", {"question": "a yellow fruit", "answer": "banana"})
    assert [c.id for c in trace.calls] == ["a#0", "b#0", "merge#0", "text#0"] and trace.output == "apple red"
    assert ev.failed
    return program, client, trace, ev


def test_pass_copies_the_feedback_to_every_traced_input(tmp_path):
    program, client, trace, ev = two_inputs(tmp_path, "pass")
    result, rec = backward(program, client, trace, ev)
    got = {(node, target): text for node, _, target, text in rows(result)}
    assert got == {
        ("text", "call:merge#0"): ev.text,
        ("merge", "call:a#0"): ev.text,
        ("merge", "call:b#0"): ev.text,
        ("a", "param:pa"): "Ask for a yellow fruit.",
        ("b", "param:pb"): "Ask for no colour at all.",
    }
    assert sorted(r["messages"][1]["content"].split(" ", 2)[1] for r in rec.backward_requests()) == ["a#0", "b#0"]
    assert feedback_section(rec.prompt_for("a#0")) == feedback_section(rec.prompt_for("b#0")) == ev.text


def test_route_splits_the_feedback_with_one_backward_call(tmp_path):
    program, client, trace, ev = two_inputs(tmp_path, "route")
    result, rec = backward(program, client, trace, ev)
    routes = [r for r in rec.backward_requests() if r["messages"][1]["content"].startswith("Function step")]
    assert len(routes) == 1 and len(rec.backward_requests()) == 3
    route = rec.request_for("merge#0")
    assert predecessor_keys(route) == [I("items"), I("new")]
    assert "`dedup_extend`" in route["messages"][1]["content"]
    assert feedback_section(route["messages"][1]["content"]) == ev.text
    got = {(node, target): text for node, _, target, text in rows(result)}
    assert got[("merge", "call:a#0")] == "The fruit should have been a banana."
    assert got[("merge", "call:b#0")] == "The colour should have been left out."
    # each source's own backward call sees only its share
    assert feedback_section(rec.prompt_for("a#0")) == "The fruit should have been a banana."
    assert feedback_section(rec.prompt_for("b#0")) == "The colour should have been left out."
    assert got[("a", "param:pa")] == "Ask for a yellow fruit." and got[("b", "param:pb")] == "Ask for no colour at all."


# ------------------------------------------------------------------ 3. loops: time-sequential gradients

LOOP = MODELS + """
name: multihop
params:
  query_instruction: {value: "Write a search query for the question."}
  answer_instruction: {value: "Answer from the passages."}
nodes:
  hops:
    kind: loop
    max_iters: 2
    state: {context: []}
    body:
      query:
        kind: llm
        system: "{{ query_instruction }}"
        user: "{{ input.question }} | known: {{ state.context }}"
      merge:
        kind: function
        fn: dedup_extend
        args: {items: state.context, new: query}
    update: {context: merge}
  answer:
    kind: llm
    system: "{{ answer_instruction }}"
    user: "Passages: {{ hops.context }}\\nQ: {{ input.question }}"
output: answer
metric: {fn: f1, args: {pred: answer, target: input.answer}}
"""

LOOP_SCRIPT = script(
    ("^Invocation answer#0 ", {P("answer_instruction"): "Name the city the passages call the capital.",
                               I("hops.context"): "The passages never mention the capital."}),
    ("^Invocation query#1 ", {P("query_instruction"): "Q1: ask for the capital directly.",
                              I("state.context"): "The first query found nothing about capitals."}),
    ("^Invocation query#0 ", {P("query_instruction"): "Q0: include the word capital."}),
    ("Write a search query", "query about {user}", "system"),
    ("^Passages", "Lyon in France"),
)

# f1 of "Lyon in France" against the target: 0.8, 0.5, 0.0 -- ids sort the other way round
LOOP_ROWS = {"a": {"question": "capital of France?", "answer": "Lyon France"},
             "b": {"question": "country of Lyon?", "answer": "France"},
             "c": {"question": "capital of France!", "answer": "Paris"}}


def loop_traces(tmp_path):
    program, client = setup(tmp_path, LOOP, LOOP_SCRIPT)
    done = {eid: forward(program, client, eid, fields, threshold=1.0) for eid, fields in LOOP_ROWS.items()}
    assert [done[e][1].score for e in "abc"] == [pytest.approx(0.8), 0.5, 0.0]
    assert all(ev.failed for _, ev in done.values())
    return program, client, done


def test_loop_gives_one_gradient_per_invocation_in_canonical_order(tmp_path):
    program, client, done = loop_traces(tmp_path)
    trace, ev = done["c"]
    assert [c.id for c in trace.calls] == ["query#0", "merge#0", "query#1", "merge#1", "answer#0"]
    result, rec = backward(program, client, trace, ev)
    assert result.parse_failures == 0
    query_grads = [(g.call_index, g.feedback) for g in result.gradients
                   if g.node == "query" and g.target == "param:query_instruction"]
    assert query_grads == [(0, "Q0: include the word capital."), (1, "Q1: ask for the capital directly.")]
    got = {(g.node, g.call_index, g.target): g.feedback for g in result.gradients}
    assert got[("answer", 0, "param:answer_instruction")] == "Name the city the passages call the capital."
    assert got[("answer", 0, "call:merge#1")] == "The passages never mention the capital."
    # merge#1 passes to both its sources: the previous state (merge#0) and this iteration's query
    assert got[("merge", 1, "call:merge#0")] == got[("merge", 1, "call:query#1")] == "The passages never mention the capital."
    assert got[("query", 1, "call:merge#0")] == "The first query found nothing about capitals."
    # merge#0 combined what it received in canonical order (query#1 before merge#1), not arrival order
    combined = "(1) The first query found nothing about capitals.\n(2) The passages never mention the capital."
    assert got[("merge", 0, "call:query#0")] == combined
    assert feedback_section(rec.prompt_for("query#0")) == combined
    assert feedback_section(rec.prompt_for("query#1")) == "The passages never mention the capital."
    assert ", loop iteration 1." in rec.prompt_for("query#1").splitlines()[0]
    # query#0 read no traced input (the initial state), so only its param is a key
    assert predecessor_keys(rec.request_for("query#0")) == [P("query_instruction")]
    assert predecessor_keys(rec.request_for("query#1")) == [P("query_instruction"), I("state.context")]
    assert len(rec.backward_requests()) == 3
    keys = [g.sort_key() for g in result.gradients]
    assert keys == sorted(keys)


DRAFT_ANSWER = MODELS + """
name: draft
params:
  draft_instruction: {value: "Write notes on the question."}
  answer_instruction: {value: "Answer from the notes."}
nodes:
  draft: {kind: llm, system: "{{ draft_instruction }}", user: "Q: {{ input.question }}"}
  answer: {kind: llm, system: "{{ answer_instruction }}", user: "Notes: {{ draft }}"}
output: answer
metric: {fn: exact_match, args: {pred: answer, target: input.answer}}
"""
NOTES = "Lyon is a city in France known for food; Marseille is a port on the Mediterranean sea."


@pytest.mark.parametrize("input_feedback, passed_on", [
    # a small model filling the input's field with the input itself: a copy says nothing
    (NOTES, False),
    (NOTES.replace("; ", ";\n  "), False),  # the same copy, wrapped differently
    ("Notes: " + NOTES[:70], False),
    # real feedback, even one quoting the input, goes upstream
    ("The notes never name the capital: they should say which city is the capital of France.", True),
    ("It says 'Lyon is a city in France' but the question asks for the capital.", True),
])
def test_feedback_that_only_copies_the_input_is_not_passed_upstream(tmp_path, input_feedback, passed_on):
    reply = {"diagnosis": "It answered Lyon.", P("answer_instruction"): "no change needed",
             I("draft"): input_feedback}
    program, client = setup(tmp_path, DRAFT_ANSWER, script(
        ("^Invocation answer#0 ", reply), ("^Invocation draft#0 ", {P("draft_instruction"): "Name the capital."}),
        ("^Q: ", NOTES), ("^Notes: ", "Lyon")))
    trace, ev = forward(program, client, "capital", {"question": "Capital of France?", "answer": "Paris"})
    result, rec = backward(program, client, trace, ev)
    got = {(g.node, g.target): g.feedback for g in result.gradients}
    if passed_on:
        assert got[("answer", "call:draft#0")] == input_feedback
        assert got[("draft", "param:draft_instruction")] == "Name the capital."
        assert len(rec.backward_requests()) == 2
    else:
        # nothing upstream: the draft is not visited (no backward call), and since the reply
        # blamed nothing usable, the answer's own instruction gets the diagnosis
        assert set(got) == {("answer", "param:answer_instruction")}
        assert got[("answer", "param:answer_instruction")] == "Diagnosis: It answered Lyon."
        assert len(rec.backward_requests()) == 1


def test_backward_is_deterministic_across_runs_and_concurrent_examples(tmp_path):
    program, client, done = loop_traces(tmp_path)

    def run_all(seed):
        recorder = Recorder(client, seed)
        engine = BackwardEngine(program, recorder, "backward", trainable(program))

        async def main():
            return await asyncio.gather(*(engine.backward(t, ev) for t, ev in done.values()))

        results = asyncio.run(main())
        gradients = canonical([g for r in results for g in r.gradients])
        return json.dumps([g.row() for g in gradients], sort_keys=True), gradients, recorder

    first, gradients, rec1 = run_all(seed=1)
    second, _, rec2 = run_all(seed=2)
    sequential = []
    for eid in sorted(done):  # one example at a time, no delays
        result, _ = backward(program, client, *done[eid])
        sequential += result.gradients
    assert first == second == json.dumps([g.row() for g in canonical(sequential)], sort_keys=True)
    # the delays did reorder the calls, so the equality above is not luck of scheduling
    order = lambda rec: [re.match(r"Invocation (\S+) of node `\w+`, example (\w+)", r["messages"][1]["content"]).groups()
                         for r in rec.backward_requests()]
    assert order(rec1) != order(rec2) and sorted(order(rec1)) == sorted(order(rec2))
    # canonical order: score, then example id, topological index, call index
    assert [g.example_id for g in gradients] == ["c"] * 8 + ["b"] * 8 + ["a"] * 8
    keys = [g.sort_key() for g in gradients]
    assert keys == sorted(keys)
    assert client.usage.role("backward")["calls"] == 3 * 3 * 3


# ------------------------------------------------------------------ 4. skip connections

SKIP = MODELS + """
name: skips
params:
  draft_instruction: {value: "Write a draft answer."}
  final_instruction: {value: "Polish the draft."}
nodes:
  draft: {kind: llm, system: "{{ draft_instruction }}", user: "Q: {{ input.question }}"}
  final: {kind: llm, system: "{{ final_instruction }}", user: "Draft: {{ draft }}"}
output: final
metric: {fn: exact_match, args: {pred: final, target: input.answer}}
skip:
  - {from: loss, to: draft_instruction}
  - {from: draft, to: final_instruction}
"""

SKIP_SCRIPT = script(
    ("^Invocation final#0 ", {P("final_instruction"): "No change needed.",
                              I("draft"): "The draft named the wrong city."}),
    ("^Invocation draft#0 ", {P("draft_instruction"): "Name the capital, not a city."}),
    ("^(Q|Draft): ", "Lyon"),
)


def test_skip_connections_from_the_loss_and_from_a_node(tmp_path):
    program, client = setup(tmp_path, SKIP, SKIP_SCRIPT)
    trace, ev = forward(program, client, "cap", {"question": "capital of France?", "answer": "Paris"})
    result, _ = backward(program, client, trace, ev)
    assert sorted(rows(result)) == sorted([
        ("loss", 0, "param:draft_instruction", ev.text),  # skip from the loss: the evaluation itself
        ("draft", 0, "param:draft_instruction", "Name the capital, not a city."),
        ("final", 0, "call:draft#0", "The draft named the wrong city."),
        # skip from draft: the feedback draft's call received; final itself said "No change needed."
        ("draft", 0, "param:final_instruction", "The draft named the wrong city."),
    ])
    assert result.gradients[-1].node == "loss"  # sorts after every node of the example
    keys = [g.sort_key() for g in result.gradients]
    assert keys == sorted(keys)


# ------------------------------------------------------------------ 5. unusable replies

TWO_PARAMS = CHAIN.replace(", trainable: false", "")


@pytest.mark.parametrize("reply, failures, expected", [
    ("The instruction looks fine to me.", 1, []),
    ('["not", "an", "object"]', 1, []),
    ({P("instruction"): "No change needed.", P("answer_format"): "Put the total after Answer:."}, 0,
     [("count", 0, "param:answer_format", "Put the total after Answer:.")]),
    ({P("instruction"): "Add the counts.", P("answer_format"): "No changes are needed here."}, 0,
     [("count", 0, "param:instruction", "Add the counts.")]),
    ("Here you go:\n```json\n" + json.dumps({P("instruction"): "Add the counts.", P("answer_format"): "no change needed"})
     + "\n```", 0, [("count", 0, "param:instruction", "Add the counts.")]),
    (json.dumps({P("instruction"): "Add the counts."}) + " I left {answer_format} alone.", 0,
     [("count", 0, "param:instruction", "Add the counts.")]),
], ids=["prose", "json-array", "no-change", "no-changes-plural", "fenced", "trailing-braces"])
def test_unusable_replies_give_no_gradient_and_never_crash(tmp_path, reply, failures, expected):
    program, client, trace, ev = chain(tmp_path, reply, spec=TWO_PARAMS)
    result, rec = backward(program, client, trace, ev)
    assert result.parse_failures == failures
    assert rows(result) == expected + [("parse", 0, "call:count#0", ev.text)]
    assert sorted(predecessor_keys(rec.request_for("count#0"))) == sorted([P("instruction"), P("answer_format")])


def test_a_failed_backward_call_counts_as_a_failure(tmp_path):
    program, client = setup(tmp_path, CHAIN, chain_script({"error": 400}))
    trace, ev = forward(program, client, "apples", APPLES)
    result, _ = backward(program, client, trace, ev)
    assert result.parse_failures == 1
    assert rows(result) == [("parse", 0, "call:count#0", ev.text)]


# ------------------------------------------------------------------ 6. golden prompts

def test_golden_backward_llm_and_loss_feedback(tmp_path):
    program, client, trace, ev = chain(tmp_path)
    _, rec = backward(program, client, trace, ev)
    check_golden("backward_llm.txt", as_text(rec.request_for("count#0")["messages"]))
    check_golden("loss_feedback.txt", ev.text + "\n")


# ------------------------------------------------------------------ empty demos are not shown

DEMOS_CHAIN = CHAIN.replace(
    '  answer_format: {value: "End with Answer: N", role: output format, trainable: false}\n',
    '  answer_format: {value: "End with Answer: N", role: output format, trainable: false}\n'
    '  shots: {kind: demos, value: "DEMO_VALUE"}\n').replace(
    'system: "{{ instruction }} {{ answer_format }}"',
    'system: "{{ instruction }} {{ answer_format }}{% if shots %} {{ shots }}{% endif %}"')


@pytest.mark.parametrize("demo_value, shown", [("", False), ("Q: 1 apple. A: 1", True)])
def test_an_empty_demos_block_is_left_out_of_the_backward_prompt(tmp_path, demo_value, shown):
    # an empty demos block is not part of the task prompt, so the backward prompt is the same
    # as without the param; a chosen block is shown as a fixed peer
    program, client, trace, ev = chain(tmp_path, spec=DEMOS_CHAIN.replace("DEMO_VALUE", demo_value))
    plain = chain(tmp_path / "plain", spec=CHAIN)
    prompt = backward(program, client, trace, ev)[1].prompt_for("count#0")
    assert ("`shots`" in prompt) is shown
    if shown:
        assert "- `shots` (few-shot demonstrations (worked examples), fixed): Q: 1 apple. A: 1" in prompt
    else:
        assert prompt == backward(*plain)[1].prompt_for("count#0")
