"""engine/trace.py: Slots carry a value with the ids of the calls it came from; `resolve` follows a
Ref path into dicts and lists keeping those sources; Calls and Traces serialize for the run
directory and link each call to the calls that fed it."""
from __future__ import annotations

import json

import pytest

from autodiff_cli.engine.program import Ref
from autodiff_cli.engine.trace import Call, InputValue, Slot, Trace, resolve


def test_slot_defaults_are_not_shared():
    a, b = Slot("x"), Slot("y")
    a.sources.append("n#0")
    assert b.sources == [] and a.fields is None and a.skipped is False


# ---------------------------------------------------------------- resolve


def test_a_bare_node_reference_is_its_whole_value_and_sources():
    env = {"count": Slot("Answer: 3", ["count#0"])}
    got = resolve(env, Ref.parse("count"))
    assert (got.value, got.sources, got.skipped) == ("Answer: 3", ["count#0"], False)
    got.sources.append("other#0")  # a copy: the env's slot is not changed through the result
    assert env["count"].sources == ["count#0"]


def test_paths_go_into_dicts_and_lists_and_keep_the_sources():
    value = {"docs": [{"title": "Paris"}, {"title": "Lyon"}], "meta": {"k": 2}}
    env = {"retrieve": Slot(value, ["query#0", "query#1"])}
    assert resolve(env, Ref.parse("retrieve.docs.1.title")).value == "Lyon"
    assert resolve(env, Ref.parse("retrieve.meta.k")).value == 2
    got = resolve(env, Ref.parse("retrieve.docs.0"))
    assert got.value == {"title": "Paris"} and got.sources == ["query#0", "query#1"]


def test_a_numeric_part_reads_a_string_key_of_a_dict():
    # Ref.parse turns `0` into an int; JSON objects have string keys
    env = {"n": Slot({"0": "zero", "scores": {"1": "one"}}, ["n#0"])}
    assert resolve(env, Ref.parse("n.0")).value == "zero"
    assert resolve(env, Ref.parse("n.scores.1")).value == "one"


def test_indexing_a_string_and_a_tuple():
    env = {"s": Slot("abc", []), "t": Slot(("x", "y"), [])}
    assert resolve(env, Ref.parse("s.2")).value == "c"
    assert resolve(env, Ref.parse("t.1")).value == "y"


def test_a_missing_root_is_an_error():
    with pytest.raises(KeyError):
        resolve({"count": Slot("3", ["count#0"])}, Ref.parse("parse"))


@pytest.mark.parametrize("ref", ["n.missing", "n.items.5", "n.items.0.deeper", "n.text.x", "n.missing.deeper"])
def test_a_missing_field_or_index_resolves_to_none_not_a_crash(ref):
    # the value of a node is only known at run time (e.g. JSON replies lacking a key): None, sources kept
    env = {"n": Slot({"items": ["a"], "text": "abc"}, ["n#0"])}
    got = resolve(env, Ref.parse(ref))
    assert got.value is None and got.sources == ["n#0"]


def test_per_field_provenance_takes_the_fields_own_sources():
    # loop state: each field came from different calls
    fields = {"context": Slot(["p1", "p2"], ["merge#1"]), "count": Slot(2, [])}
    env = {"state": Slot({"context": ["p1", "p2"], "count": 2}, ["merge#1", "other#0"], fields)}
    ctx = resolve(env, Ref.parse("state.context"))
    assert ctx.value == ["p1", "p2"] and ctx.sources == ["merge#1"]
    assert resolve(env, Ref.parse("state.context.1")).value == "p2"
    assert resolve(env, Ref.parse("state.count")).sources == []
    whole = resolve(env, Ref.parse("state"))
    assert whole.sources == ["merge#1", "other#0"]  # the whole state: every field's sources


def test_a_path_missing_from_the_fields_falls_back_to_the_value():
    env = {"state": Slot({"context": [], "extra": "e"}, ["x#0"], {"context": Slot([], ["m#0"])})}
    got = resolve(env, Ref.parse("state.extra"))
    assert got.value == "e" and got.sources == ["x#0"]


def test_a_skipped_slot_stays_skipped():
    env = {"maybe": Slot(None, [], skipped=True), "ran": Slot({"a": 1}, ["ran#0"])}
    assert resolve(env, Ref.parse("maybe")).skipped is True
    assert resolve(env, Ref.parse("maybe.field")).skipped is True
    assert resolve(env, Ref.parse("ran.a")).skipped is False


# ---------------------------------------------------------------- Call / Trace


def make_trace() -> Trace:
    q0 = Call("hops.query#0", "hops.query", "llm", 0, 0, 0,
              inputs={"input.question": InputValue("Where?", [])},
              params={"query_instruction": "Write a query."},
              messages=[{"role": "user", "content": "Where?"}], output="paris", model="fake/script.yaml",
              prompt_tokens=3, completion_tokens=1)
    r0 = Call("hops.retrieve#0", "hops.retrieve", "function", 0, 1, 0,
              inputs={"query": InputValue("paris", ["hops.query#0"])}, output=["Paris is..."])
    q1 = Call("hops.query#1", "hops.query", "llm", 1, 0, 1,
              inputs={"state.context": InputValue(["Paris is..."], ["hops.retrieve#0"]),
                      "input.question": InputValue("Where?", [])}, output="france")
    answer = Call("answer#0", "answer", "llm", 0, 2, None,
                  inputs={"hops.context": InputValue(["Paris is..."], ["hops.retrieve#0", "hops.query#1"]),
                          "when: input.question": InputValue("Where?", [], condition=True),
                          "q": InputValue("paris", ["hops.retrieve#0", "hops.query#0"])},
                  when="input.question", output="Paris")
    skipped = Call("extra#0", "extra", "llm", 0, 3, None, skipped=True, when="false")
    return Trace("e1", [q0, r0, q1, answer, skipped], output="Paris", output_sources=["answer#0"])


def test_calls_of_a_node_in_call_order():
    trace = make_trace()
    assert [c.id for c in trace.calls_of("hops.query")] == ["hops.query#0", "hops.query#1"]
    assert [c.id for c in trace.calls_of("answer")] == ["answer#0"]
    assert trace.calls_of("query") == []  # qualified names only
    assert trace.calls_of("nothing") == []


def test_call_by_id():
    trace = make_trace()
    assert trace.call("hops.retrieve#0").kind == "function"
    with pytest.raises(KeyError):
        trace.call("answer#1")


def test_predecessors_are_unique_sorted_and_include_condition_inputs():
    trace = make_trace()
    answer = trace.call("answer#0")
    # hops.retrieve#0 fed two of its inputs: listed once; the order is by id, not by input
    assert [c.id for c in trace.predecessors(answer)] == ["hops.query#0", "hops.query#1", "hops.retrieve#0"]
    assert [c.id for c in trace.predecessors(trace.call("hops.query#1"))] == ["hops.retrieve#0"]
    assert trace.predecessors(trace.call("hops.query#0")) == []  # data only
    assert trace.predecessors(trace.call("extra#0")) == []


def test_predecessors_of_a_call_fed_by_an_unknown_id_fail_loudly():
    trace = make_trace()
    orphan = Call("x#0", "x", "llm", 0, 4, None, inputs={"a": InputValue(1, ["ghost#0"])})
    with pytest.raises(KeyError):
        trace.predecessors(orphan)


def test_call_to_dict_names_the_sources_of_each_input_and_marks_conditions():
    answer = make_trace().call("answer#0")
    data = answer.to_dict()
    assert data["inputs"] == {
        "hops.context": {"value": ["Paris is..."], "from": ["hops.retrieve#0", "hops.query#1"]},
        "when: input.question": {"value": "Where?", "from": [], "condition": True},
        "q": {"value": "paris", "from": ["hops.retrieve#0", "hops.query#0"]},
    }
    assert {k: data[k] for k in ("id", "node", "kind", "call_index", "topo_index", "iteration", "when", "skipped",
                                 "output", "error", "cache_hit")} == {
        "id": "answer#0", "node": "answer", "kind": "llm", "call_index": 0, "topo_index": 2, "iteration": None,
        "when": "input.question", "skipped": False, "output": "Paris", "error": None, "cache_hit": False}


def test_trace_to_dict_round_trips_through_json():
    trace = make_trace()
    data = json.loads(json.dumps(trace.to_dict()))
    assert data == trace.to_dict()
    assert set(data) == {"example_id", "output", "output_from", "error", "calls"}
    assert (data["example_id"], data["output"], data["output_from"], data["error"]) == ("e1", "Paris", ["answer#0"], None)
    assert [c["id"] for c in data["calls"]] == [c.id for c in trace.calls]
    # every call can be rebuilt from its dict: the fields come back as they were
    for original, row in zip(trace.calls, data["calls"], strict=True):
        inputs = {k: InputValue(v["value"], v["from"], v.get("condition", False)) for k, v in row["inputs"].items()}
        rebuilt = Call(**{**row, "inputs": inputs})
        assert rebuilt == original
    q0 = data["calls"][0]
    assert q0["params"] == {"query_instruction": "Write a query."}
    assert q0["messages"] == [{"role": "user", "content": "Where?"}]
    assert (q0["prompt_tokens"], q0["completion_tokens"], q0["model"]) == (3, 1, "fake/script.yaml")
    assert data["calls"][-1]["skipped"] is True and data["calls"][-1]["when"] == "false"


def test_an_errored_trace_keeps_its_error():
    data = Trace("e2", error="model call failed: 503").to_dict()
    assert data == {"example_id": "e2", "output": None, "output_from": [], "error": "model call failed: 503",
                    "calls": []}
