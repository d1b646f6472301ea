"""Each node kind through the NodeKind contract (autodiff_cli/nodes/base.py): its compile step, its
forward (with a RunContext and a stub model client), its backward rule (with a BackwardContext and a
stub backward engine) and its call bounds. One section per kind; the registry first."""
from __future__ import annotations

import asyncio
import json
import typing
from dataclasses import dataclass
from pathlib import Path

import pytest

from autodiff_cli.engine.forward import (
    ExampleRun,
    ForwardEngine,
    PipelineError,
    RunContext,
)
from autodiff_cli.engine.program import Ref, invocations
from autodiff_cli.engine.trace import Call, InputValue, Slot, Trace
from autodiff_cli.errors import SpecError
from autodiff_cli.grad.backward import (
    BackwardContext,
    BackwardEngine,
    BackwardResult,
    _input_key,
    _param_key,
)
from autodiff_cli.grad.loss import Evaluation
from autodiff_cli.nodes.base import NodeKind
from autodiff_cli.nodes.compiler import compile_spec
from autodiff_cli.nodes.function import FunctionKind
from autodiff_cli.nodes.llm import LLMKind
from autodiff_cli.nodes.loop import LoopKind
from autodiff_cli.nodes.registry import KINDS, kind_class, traced_kinds
from autodiff_cli.spec.loader import load_spec
from tests.conftest import write

HEAD = """
name: kinds
models:
  task: {model: fake/script.yaml}
data:
  val: val.jsonl
"""


def program_of(tmp_path, body: str):
    (tmp_path / "val.jsonl").write_text("")
    return compile_spec(load_spec(write(tmp_path / "spec.yaml", HEAD + body)))


@dataclass
class Reply:
    text: str
    prompt_tokens: int = 7
    completion_tokens: int = 3
    latency_s: float = 0.01
    cache_hit: bool = False


class StubClient:
    """Replies in turn from `replies` (the last repeats) and records every request."""

    def __init__(self, *replies: str) -> None:
        self.replies = list(replies) or ["ok"]
        self.requests: list[dict] = []

    async def complete(self, model, messages, *, role="task", json_schema=None, **extra):
        self.requests.append({"model": model, "messages": messages, "role": role, "schema": json_schema, **extra})
        return Reply(self.replies[min(len(self.requests), len(self.replies)) - 1])


def forward(program, node_name: str, env: dict[str, Slot], client=None, iteration=None):
    """One invocation of a node through its kind's forward, as the engine would run it."""
    engine = ForwardEngine(program, client or StubClient())
    run = ExampleRun("ex1")
    ctx = RunContext(engine, run, program.node(node_name), env, iteration)
    slot, calls = asyncio.run(program.node(node_name).forward(ctx))
    return slot, calls, run


def backward(program, call: Call, feedback: str, reply: dict | str, trainable: set[str], failed: bool = True):
    """One call's backward rule with a stub backward engine; returns its step, the requests and the result."""
    client = StubClient(reply if isinstance(reply, str) else json.dumps(reply))
    engine = BackwardEngine(program, client, "backward", trainable)
    result = BackwardResult([])
    ctx = BackwardContext(engine, Trace("ex1", [call]), Evaluation("ex1", 0.0, failed, feedback), result)
    step = asyncio.run(program.node(call.node).backward(call, feedback, ctx))
    return step, client.requests, result


def env_of(**values) -> dict[str, Slot]:
    env = {"input": Slot({"question": "How many apples?"}, [], {"question": Slot("How many apples?", [])})}
    env.update({name: (v if isinstance(v, Slot) else Slot(v, [])) for name, v in values.items()})
    return env


# ================================================================ registry


def test_every_registered_kind_is_a_node_kind_that_owns_its_spec_format():
    assert set(KINDS) == {"llm", "function", "loop"}
    for name in KINDS:
        cls = kind_class(name)
        assert issubclass(cls, NodeKind) and cls.kind == name
        # the kind's own model says what a spec may write for it, `kind:` first
        assert typing.get_args(cls.Spec.model_fields["kind"].annotation) == (name,)
    assert traced_kinds() == ["llm", "function"]  # a loop leaves no call of its own


def test_the_compiler_builds_each_node_with_its_kind(tmp_path):
    p = program_of(tmp_path, """
params:
  instruction: {value: "Count."}
nodes:
  hops:
    kind: loop
    max_iters: 2
    state: {notes: []}
    body:
      note: {kind: llm, system: "{{ instruction }}", user: "{{ input.question }} {{ state.notes }}"}
      keep: {kind: function, fn: dedup_extend, args: {items: state.notes, new: note}}
    update: {notes: keep}
  parse: {kind: function, fn: join, args: {items: hops.notes}}
output: parse
metric: {fn: exact_match, args: {pred: parse, target: input.answer}}
""")
    assert [type(n) for n in p.all_nodes()] == [LoopKind, LLMKind, FunctionKind, FunctionKind]
    assert [(node.name, times) for node, times in invocations(p.scope)] == [("note", 2), ("keep", 2), ("parse", 1)]


# ================================================================ llm

LLM = """
params:
  instruction: {value: "Count the {{ things }}.", role: task instruction}
  fmt: {value: "Answer: N", role: output format, trainable: false}
nodes:
  draft: {kind: llm, user: "{{ input.question }}"}
  count:
    kind: llm
    system: "{{ instruction }} {{ fmt }}"
    user: "Q: {{ input.question }} Draft: {{ draft }}"
    JSON
output: count
metric: {fn: exact_match, args: {pred: count, target: input.answer}}
"""


def test_llm_compile_reads_its_templates(tmp_path):
    p = program_of(tmp_path, LLM.replace("JSON", ""))
    count = p.node("count")
    assert isinstance(count, LLMKind) and count.kind == "llm" and count.model == "task"
    assert count.reads == [Ref("draft"), Ref("input", ("question",))]
    assert count.params == ["fmt", "instruction"]  # template names in sorted order
    assert count.drawing() == {"model": "task", "label": "count: llm (task)", "shape": ("[", "]", "box")}
    assert "answer" in p.input_fields  # the metric's field; the template's too:
    assert "question" in p.input_fields


def test_llm_compile_refuses_an_unknown_model_with_its_key(tmp_path):
    with pytest.raises(SpecError) as e:
        program_of(tmp_path, LLM.replace("JSON", "model: big"))
    assert e.value.key == "nodes.count.model" and "a key of `models` (task)" in e.value.expected


def test_llm_forward_renders_calls_the_model_and_records_the_call(tmp_path):
    p = program_of(tmp_path, LLM.replace("JSON", ""))
    client = StubClient("Answer: 3")
    slot, calls, _ = forward(p, "count", env_of(instruction="Count the {{ things }}.", fmt="Answer: N",
                                                draft=Slot("two and one", ["draft#0"])), client)
    (call,) = calls
    assert slot.value == "Answer: 3" and slot.sources == ["count#0"]
    assert (call.id, call.kind, call.call_index, call.output) == ("count#0", "llm", 0, "Answer: 3")
    # values are inserted literally, never rendered twice
    assert call.messages == [{"role": "system", "content": "Count the {{ things }}. Answer: N"},
                             {"role": "user", "content": "Q: How many apples? Draft: two and one"}]
    assert call.inputs["draft"].sources == ["draft#0"] and call.inputs["input.question"].sources == []
    assert call.params == {"instruction": "Count the {{ things }}.", "fmt": "Answer: N"}
    assert (call.model, call.prompt_tokens, call.completion_tokens) == ("task", 7, 3)
    assert client.requests[0]["role"] == "task" and client.requests[0]["schema"] is None


@pytest.mark.parametrize("reply, output", [('{"n": 3}', {"n": 3}), ("three", "three")])
def test_llm_forward_parses_json_when_asked_and_keeps_text_it_cannot(tmp_path, reply, output):
    p = program_of(tmp_path, LLM.replace("JSON", "json_schema: {type: object}"))
    client = StubClient(reply)
    slot, _, _ = forward(p, "count", env_of(instruction="i", fmt="f", draft="d"), client)
    assert slot.value == output and client.requests[0]["schema"] == {"type": "object"}


def test_llm_forward_template_error_names_the_node_and_example(tmp_path):
    p = program_of(tmp_path, LLM.replace("JSON", "").replace("{{ draft }}", "{{ draft.missing }}"))
    with pytest.raises(PipelineError, match=r"nodes\.count\.user: .* \(example ex1\)"):
        forward(p, "count", env_of(instruction="i", fmt="f", draft="text"))


def llm_call(**extra_inputs: InputValue) -> Call:
    call = Call("count#0", "count", "llm", 0, 1, None,
                inputs={"input.question": InputValue("How many apples?", []),
                        "draft": InputValue("two apples and one apple, so two and one in all.", ["draft#0"]),
                        **extra_inputs},
                params={"instruction": "Count.", "fmt": "Answer: N"},
                messages=[{"role": "user", "content": "Q"}], output="Answer: 2")
    return call


def test_llm_backward_asks_once_and_blames_trainable_params_and_traced_inputs(tmp_path):
    p = program_of(tmp_path, LLM.replace("JSON", ""))
    reply = {"diagnosis": "It did not add.", _param_key("instruction"): "Say to add the counts.",
             _input_key("draft"): "The draft should list every apple."}
    step, requests, result = backward(p, llm_call(), "The answer is 3.", reply, {"instruction"})
    assert step.params == [("instruction", "Say to add the counts. (Diagnosis: It did not add.)")]
    assert step.upstream == [("draft#0", "The draft should list every apple.")]
    (request,) = requests
    assert request["role"] == "backward" and result.calls == 1
    # keys: trainable params and traced inputs only; the fixed peer is shown, never a key
    assert request["schema"]["required"] == ["diagnosis", _param_key("instruction"), _input_key("draft")]
    prompt = request["messages"][1]["content"]
    assert "- `fmt` (output format, fixed): Answer: N" in prompt and "The answer is 3." in prompt


def test_llm_backward_drops_echoes_and_no_change_and_falls_back_to_the_diagnosis(tmp_path):
    p = program_of(tmp_path, LLM.replace("JSON", ""))
    reply = {"diagnosis": "It answered 2.", _param_key("instruction"): "No change needed.",
             _input_key("draft"): "Draft:  two apples\nand one apple, so two and one in all."}  # a copy of the input
    step, _, _ = backward(p, llm_call(), "wrong", reply, {"instruction"})
    assert step.upstream == [] and step.params == [("instruction", "Diagnosis: It answered 2.")]


def test_llm_backward_unparseable_reply_gives_nothing_and_counts_a_failure(tmp_path):
    p = program_of(tmp_path, LLM.replace("JSON", ""))
    step, _, result = backward(p, llm_call(), "wrong", "I think it is fine.", {"instruction"})
    assert (step.params, step.upstream, result.parse_failures) == ([], [], 1)


def test_llm_backward_describes_a_condition_input_as_the_decision_to_run(tmp_path):
    p = program_of(tmp_path, LLM.replace("JSON", ""))
    call = llm_call(**{"when: route": InputValue("count", ["route#0"], condition=True)})
    call.when = "route == 'count'"
    reply = {_input_key("when: route"): "This is arithmetic; it should not have been routed to counting."}
    step, requests, _ = backward(p, call, "wrong", reply, set())
    assert ("route#0", "This is arithmetic; it should not have been routed to counting.") in step.upstream
    prompt = requests[0]["messages"][1]["content"]
    assert "the node's condition `route == 'count'` read to decide that this call runs: count" in prompt


def test_llm_bounds(tmp_path):
    node = program_of(tmp_path, LLM.replace("JSON", "")).node("count")
    assert (node.max_model_calls(), node.max_backward_calls()) == (1, 1)


# ================================================================ function

FUNCTION = """
params:
  instruction: {value: "Answer."}
nodes:
  a: {kind: llm, system: "{{ instruction }}", user: "A {{ input.question }}"}
  b: {kind: llm, user: "B {{ input.question }}"}
  merge: {kind: function, fn: dedup_extend, args: {items: a, new: b}, backward: MODE}
output: merge
metric: {fn: exact_match, args: {pred: merge, target: input.answer}}
"""


def test_function_compile_resolves_the_function_and_its_arguments(tmp_path):
    p = program_of(tmp_path, FUNCTION.replace("MODE", "pass"))
    merge = p.node("merge")
    assert isinstance(merge, FunctionKind) and merge.fn_ref == "dedup_extend" and callable(merge.fn)
    assert merge.args == {"items": Ref("a"), "new": Ref("b")} and merge.reads == [Ref("a"), Ref("b")]
    assert merge.drawing() == {"fn": "dedup_extend", "label": "merge: dedup_extend", "shape": ("[[", "]]", "component")}


@pytest.mark.parametrize("change, key, expected", [
    ("fn: dedup_extend, args: {items: a, new: b}, with: {new: 1}", "nodes.merge.with", "constants for arguments"),
    ("fn: dedup_extend, args: {items: a, wrong: b}", "nodes.merge.args", "the arguments of dedup_extend"),
    ("fn: no_such_builtin, args: {items: a, new: b}", "nodes.merge.fn", "an importable `module:function`"),
    ("fn: bm25, args: {query: a, k: b}, with: {corpus: missing.jsonl}", "nodes.merge.with.corpus", "an existing file"),
])
def test_function_compile_errors_are_located(tmp_path, change, key, expected):
    text = FUNCTION.replace("fn: dedup_extend, args: {items: a, new: b}", change).replace("MODE", "pass")
    with pytest.raises(SpecError) as e:
        program_of(tmp_path, text)
    assert e.value.key == key and expected in e.value.expected


def test_function_forward_calls_with_args_and_constants(tmp_path):
    p = program_of(tmp_path, FUNCTION.replace("MODE", "pass"))
    slot, (call,), _ = forward(p, "merge", env_of(a=Slot(["x"], ["a#0"]), b=Slot(["x", "y"], ["b#0"])))
    assert slot.value == ["x", "y"] and slot.sources == ["merge#0"]
    assert call.inputs["items"].sources == ["a#0"] and call.inputs["new"].sources == ["b#0"]
    assert call.messages is None and call.model is None


async def _slow_join(items=None):
    await asyncio.sleep(0)
    return "+".join(items)


COROUTINE = """
nodes:
  a: {kind: llm, user: "A {{ input.question }}"}
  glue: {kind: function, fn: "tests.nodes.test_nodes:_slow_join", args: {items: a}}
output: glue
metric: {fn: exact_match, args: {pred: glue, target: input.answer}}
"""


def test_function_forward_awaits_a_coroutine_and_names_a_failing_function(tmp_path):
    p = program_of(tmp_path, COROUTINE)
    slot, _, _ = forward(p, "glue", env_of(a=Slot(["x", "y"], ["a#0"])))
    assert slot.value == "x+y"
    with pytest.raises(PipelineError, match=r"nodes\.glue: tests\.nodes\.test_nodes:_slow_join raised TypeError: .*\(example ex1\)"):
        forward(p, "glue", env_of(a=Slot(5, ["a#0"])))  # "+".join(5)


def merge_call() -> Call:
    return Call("merge#0", "merge", "function", 0, 2, None, output=["x", "y"],
                inputs={"items": InputValue(["x"], ["a#0"]), "new": InputValue(["y"], ["b#0"]),
                        "sep": InputValue(",", [])})


def test_function_pass_hands_the_feedback_to_every_traced_input_without_a_call(tmp_path):
    p = program_of(tmp_path, FUNCTION.replace("MODE", "pass"))
    step, requests, _ = backward(p, merge_call(), "wrong", {}, {"instruction"})
    assert step.upstream == [("a#0", "wrong"), ("b#0", "wrong")] and step.params == [] and requests == []


def test_function_route_splits_the_feedback_with_one_call(tmp_path):
    p = program_of(tmp_path, FUNCTION.replace("MODE", "route"))
    reply = {_input_key("items"): "a was wrong", _input_key("new"): "No change needed."}
    step, requests, _ = backward(p, merge_call(), "wrong", reply, {"instruction"})
    assert step.upstream == [("a#0", "a was wrong")]
    assert len(requests) == 1 and requests[0]["messages"][1]["content"].startswith("Function step merge#0 ")
    assert requests[0]["schema"]["required"] == [_input_key("items"), _input_key("new")]


def test_function_route_with_one_traced_input_passes_without_a_call(tmp_path):
    p = program_of(tmp_path, FUNCTION.replace("MODE", "route"))
    call = merge_call()
    call.inputs["new"].sources = []
    step, requests, _ = backward(p, call, "wrong", {}, set())
    assert step.upstream == [("a#0", "wrong")] and requests == []


@pytest.mark.parametrize("mode, args, when, bound", [
    ("pass", "{items: a, new: b}", None, 0),
    ("route", "{items: a, new: b}", None, 1),
    ("route", "{items: a}", None, 0),
    ("route", "{items: a}", "b == 'go'", 1),  # what the condition reads is a traced input too
    ("route", "{items: a}", "a == 'go'", 0),  # already an input
])
def test_function_bounds(tmp_path, mode, args, when, bound):
    text = FUNCTION.replace("MODE", mode).replace("args: {items: a, new: b}", f"args: {args}")
    text = text.replace("target: input.answer", "target: b")  # b stays used when merge does not read it
    if when:
        text = text.replace("backward: ", f"when: \"{when}\", backward: ")
    merge = program_of(tmp_path, text).node("merge")
    assert (merge.max_model_calls(), merge.max_backward_calls()) == (0, bound)


# ================================================================ loop

LOOP = """
params:
  instruction: {value: "Write a note."}
nodes:
  first: {kind: llm, user: "{{ input.question }}"}
  hops:
    kind: loop
    max_iters: 3
    state: {notes: []}
    body:
      note: {kind: llm, system: "{{ instruction }}", user: "{{ first }} {{ state.notes }}"}
      keep: {kind: function, fn: dedup_extend, args: {items: state.notes, new: note}}
    update: {notes: keep}
    until: "len(state.notes) >= 2"
  parse: {kind: function, fn: join, args: {items: hops.notes}}
output: parse
metric: {fn: exact_match, args: {pred: parse, target: input.answer}}
"""


def test_loop_compile_body_update_until_and_outside_reads(tmp_path):
    p = program_of(tmp_path, LOOP)
    hops = p.node("hops")
    assert isinstance(hops, LoopKind) and hops.kind == "loop" and not hops.traced
    assert list(hops.body.nodes) == ["note", "keep"] and hops.body.loop is hops
    assert hops.update == {"notes": Ref("keep")} and hops.until.source == "len(state.notes) >= 2"
    assert hops.reads == [Ref("first")]  # what its body reads from outside
    assert hops.inner_scopes() == [(hops.body, 3)]
    assert hops.drawn_inputs() == [("keep", "state.notes")]


def test_loop_compile_checks_fields_of_its_output(tmp_path):
    with pytest.raises(SpecError) as e:
        program_of(tmp_path, LOOP.replace("items: hops.notes", "items: hops.nots"))
    assert e.value.key == "nodes.parse.args.items"
    assert e.value.expected == "a key of `hops`'s final `state` (a loop's output): notes"


def test_loop_forward_unrolls_until_its_condition_with_time_sequential_calls(tmp_path):
    p = program_of(tmp_path, LOOP)
    client = StubClient("n1", "n2", "n3")
    slot, calls, run = forward(p, "hops", env_of(instruction="Write a note.", first=Slot("f", ["first#0"])), client)
    assert calls == []  # the loop adds no call of its own; its body's calls are in the trace
    assert [c.id for c in run.trace.calls] == ["note#0", "keep#0", "note#1", "keep#1"]
    assert [c.iteration for c in run.trace.calls] == [0, 0, 1, 1]
    assert slot.value == {"notes": ["n1", "n2"]} and slot.fields["notes"].sources == ["keep#1"]
    assert run.trace.call("note#1").inputs["state.notes"].sources == ["keep#0"]


def test_loop_backward_has_nothing_of_its_own(tmp_path):
    p = program_of(tmp_path, LOOP)
    step, requests, _ = backward(p, Call("hops#0", "hops", "loop", 0, 1, None), "wrong", {}, {"instruction"})
    assert (step.params, step.upstream, requests) == ([], [], [])


def test_loop_bounds_are_its_body_times_max_iters(tmp_path):
    p = program_of(tmp_path, LOOP)
    hops = p.node("hops")
    assert (hops.max_model_calls(), hops.max_backward_calls()) == (3, 3)
    # the backward engine's bound per example: first (1) + the loop (3) + parse (0)
    assert BackwardEngine(p, StubClient(), "backward", {"instruction"}).max_calls_per_example() == 4
    assert sum(node.max_model_calls() * times for node, times in invocations(p.scope)) == 4


def test_the_config_schema_takes_each_node_kind_from_its_own_model():
    """`autodiff schema` is the spec's schema with `Node` = the registered kinds' own models: a config of
    the repository validates against it, and a node missing a key its kind requires does not."""
    import jsonschema
    import yaml

    from autodiff_cli.app.commands import spec_schema

    schema = spec_schema()
    assert schema["$defs"]["Node"]["oneOf"] == [{"$ref": f"#/$defs/{kind_class(k).Spec.__name__}"} for k in KINDS]
    config = yaml.safe_load((Path(__file__).resolve().parents[2] / "configs" / "router.yaml").read_text())
    jsonschema.validate(config, schema)
    first = next(iter(config["nodes"]))
    config["nodes"][first] = {"kind": "llm", "system": "no user template"}
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(config, schema)
