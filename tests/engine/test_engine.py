"""Forward engine: traces record every invocation, its inputs' sources, loops unrolled."""
from __future__ import annotations

import asyncio
import json

from autodiff_cli.engine.forward import score
from autodiff_cli.llm.cache import CallCache
from autodiff_cli.llm.client import ModelClient
from autodiff_cli.llm.usage import Usage
from autodiff_cli.nodes.compiler import compile_spec
from autodiff_cli.spec.loader import load_spec
from autodiff_cli.spec.prompts_file import initial_values
from tests.conftest import write
from tests.specs import CORPUS
from tests.specs import MULTIHOP as LOOP

SCRIPT = """
rules:
  - match: "Write a search query"
    in: all
    reply: "query about {user}"
  - match: "How many"
    reply: "Let me count. 2 plus 1. Answer: 3"
  - match: "Passages"
    reply: "Paris"
default: "no idea"
"""

CHAIN = """
name: chain
models:
  task: {model: fake/script.yaml}
data:
  val: val.jsonl
params:
  instruction: {value: "Count carefully."}
nodes:
  count:
    kind: llm
    system: "{{ instruction }}"
    user: "{{ input.question }}"
  parse:
    kind: function
    fn: last_integer
    args: {text: count}
output: parse
metric: {fn: exact_match, args: {pred: parse, target: input.answer}}
"""



def build(tmp_path, spec_text, rows, cache=True):
    write(tmp_path / "script.yaml", SCRIPT)
    (tmp_path / "val.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (tmp_path / "corpus.jsonl").write_text("".join(json.dumps(r) + "\n" for r in CORPUS))
    loaded = load_spec(write(tmp_path / "spec.yaml", spec_text))
    program = compile_spec(loaded)
    client = ModelClient(loaded.spec.models, config_dir=tmp_path, usage=Usage(),
                         cache=CallCache(tmp_path / "cache") if cache else None, base_delay=0)
    return program, client


def run(program, client, example_id, fields, values=None):
    from autodiff_cli.engine.forward import ForwardEngine

    values = values or initial_values(program.spec)
    return asyncio.run(ForwardEngine(program, client).run(example_id, fields, values))


def test_chain_trace_records_inputs_sources_messages_and_params(tmp_path):
    program, client = build(tmp_path, CHAIN, [{"id": "a", "question": "How many apples?", "answer": "3"}])
    trace = run(program, client, "a", {"question": "How many apples?", "answer": "3"})
    assert [c.id for c in trace.calls] == ["count#0", "parse#0"]
    count, parse = trace.calls
    assert count.kind == "llm" and count.call_index == 0 and count.topo_index == 0
    assert count.messages == [{"role": "system", "content": "Count carefully."},
                              {"role": "user", "content": "How many apples?"}]
    assert count.params == {"instruction": "Count carefully."}
    assert count.inputs["input.question"].value == "How many apples?"
    assert count.inputs["input.question"].sources == []
    assert count.output == "Let me count. 2 plus 1. Answer: 3"
    assert count.prompt_tokens > 0 and count.completion_tokens > 0 and not count.cache_hit
    assert parse.inputs["text"].sources == ["count#0"]
    assert parse.output == "3"
    assert trace.output == "3" and trace.output_sources == ["parse#0"]
    assert score(program.metric, trace) == 1.0
    assert trace.predecessors(parse) == [count]
    json.dumps(trace.to_dict())  # a trace is plain data

    again = run(program, client, "a", {"question": "How many apples?", "answer": "3"})
    assert again.calls[0].cache_hit and again.calls[0].output == count.output
    assert client.usage.role("task")["calls"] == 1 and client.usage.role("task")["cached_calls"] == 1


def test_new_param_value_changes_the_prompt_and_misses_the_cache(tmp_path):
    program, client = build(tmp_path, CHAIN, [{"id": "a", "question": "How many apples?", "answer": "3"}])
    run(program, client, "a", {"question": "How many apples?", "answer": "3"})
    trace = run(program, client, "a", {"question": "How many apples?", "answer": "3"},
                {"instruction": "Literal {{ 7*7 }} text"})
    assert trace.calls[0].messages[0]["content"] == "Literal {{ 7*7 }} text"
    assert not trace.calls[0].cache_hit


def test_loop_unrolls_with_time_sequential_calls_and_state_provenance(tmp_path):
    program, client = build(tmp_path, LOOP, [{"id": "q", "question": "capital of France", "answer": "Paris"}])
    trace = run(program, client, "q", {"question": "capital of France", "answer": "Paris"})
    ids = [c.id for c in trace.calls]
    assert ids == ["query#0", "retrieve#0", "merge#0", "query#1", "retrieve#1", "merge#1", "answer#0"]
    q0, q1 = trace.calls_of("query")
    assert (q0.call_index, q0.iteration, q1.call_index, q1.iteration) == (0, 0, 1, 1)
    # the second query reads the state the first iteration's merge produced
    assert q0.inputs["state.context"].sources == [] and q0.inputs["state.context"].value == []
    assert q1.inputs["state.context"].sources == ["merge#0"]
    merge1 = trace.call("merge#1")
    assert merge1.inputs["items"].sources == ["merge#0"] and merge1.inputs["new"].sources == ["retrieve#1"]
    answer = trace.call("answer#0")
    assert answer.inputs["hops.context"].sources == ["merge#1"]
    assert answer.inputs["hops.context"].value == trace.call("merge#1").output  # until stopped after 2 of 3 iterations
    assert answer.output == "Paris" and score(program.metric, trace) == 1.0
    # topological indices: loop body after what precedes it, answer last
    assert q0.topo_index < trace.call("retrieve#0").topo_index < trace.call("merge#0").topo_index < answer.topo_index


def test_failed_model_call_marks_the_trace_not_the_score(tmp_path):
    program, client = build(tmp_path, CHAIN, [])
    write(tmp_path / "script.yaml", "rules:\n  - match: boom\n    error: 500\ndefault: ok\n")
    trace = run(program, client, "x", {"question": "boom", "answer": "1"})
    assert trace.error and "500" in trace.error or "Internal" in (trace.error or "")
    assert trace.calls[-1].error
    assert client.usage.role("task")["errors"] == client.usage.role("task")["calls"] == 4  # 1 + 3 retries


def test_until_that_cannot_read_the_output_lets_the_loop_run_to_max_iters(tmp_path, caplog):
    spec = LOOP.replace('until: "iteration >= 1 and len(state.context) >= 1"', "until: \"query.action == 'finish'\"")
    program, client = build(tmp_path, spec, [{"id": "q", "question": "capital of France", "answer": "Paris"}])
    trace = run(program, client, "q", {"question": "capital of France", "answer": "Paris"})
    assert [c.call_index for c in trace.calls_of("query")] == [0, 1, 2]  # max_iters 3, no crash
    assert "the loop goes on" in caplog.text


def test_engine_can_run_another_model_config_under_another_role_with_a_salt(tmp_path):
    from autodiff_cli.engine.forward import ForwardEngine

    program, client = build(tmp_path, CHAIN, [{"id": "a", "question": "How many apples?", "answer": "3"}])
    write(tmp_path / "other.yaml", 'default: "Answer: 7"\n')
    client.add_model("other", client.models["task"].model_copy(update={"model": "fake/other.yaml"}))
    fields = {"question": "How many apples?", "answer": "3"}
    engine = ForwardEngine(program, client, models={"task": "other"}, role="teacher", salt=1)
    trace = asyncio.run(engine.run("a", fields, initial_values(program.spec)))
    assert trace.calls[0].model == "other" and trace.output == "7"
    usage = client.usage.to_dict()
    assert usage["teacher"]["calls"] == 1 and usage["task"]["calls"] == 0
    assert asyncio.run(engine.run("a", fields, initial_values(program.spec))).calls[0].cache_hit
    salted = ForwardEngine(program, client, models={"task": "other"}, role="teacher", salt=2)
    assert not asyncio.run(salted.run("a", fields, initial_values(program.spec))).calls[0].cache_hit
