"""Few-shot demos with the scripted fake model: weighted sampling, bootstrapping with a teacher
(tries salted into the cache key), acceptance and revert through two-stage validation, the
schedules, resume, export and the teacher's usage."""
from __future__ import annotations

import asyncio
import json
import random
from collections import Counter
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from autodiff_cli.app.cli import app
from autodiff_cli.data.loaders import Example
from autodiff_cli.io.files import read_jsonl
from autodiff_cli.llm.fake import reset_fake_state
from autodiff_cli.optim import demos
from tests.conftest import write

# The student answers right only when its prompt holds a bootstrapped demo (`response: Sum is`)
# and the question's n (at the very end of the user message) is even, or when n is 1; with
# `helps` set to something absent, demos never help.
SCRIPT = r"""
rules:
  - match: "backward engine"
    in: system
    reply: '{"diagnosis": "It did not add.", "param: instruction": "Tell it to add the counts."}'
  - match: "read by a program"
    in: system
    reply: '{"reasoning": "Feedback says to add.", "method": "add_instruction", "new_value": "Count the things slowly."}'
  - match: '%(helps)s[\s\S]*n=([2468])$'
    in: all
    reply: "Sum is {1}. Answer: {1}"
  - match: 'n=1\b'
    reply: "Answer: 1"
default: "Answer: 0"
"""

# A teacher that always adds.
TEACHER = r"""
rules:
  - match: 'n=(\d+)'
    reply: "Sum is {1}. Answer: {1}"
"""

SPEC = """
name: demo
models:
  task: {model: fake/script.yaml}
  teach: {model: fake/teacher.yaml, temperature: 0.7}
data: {train: train.jsonl, val: val.jsonl, test: test.jsonl}
params:
  instruction: {value: "Count the things.", role: task instruction}
  examples: {kind: demos, max: 2}
nodes:
  count: {kind: llm, system: "{{ instruction }}\\n{{ examples }}", user: "{{ input.question }}"}
  parse: {kind: function, fn: last_integer, args: {text: count}}
output: parse
metric: {fn: exact_match, args: {pred: parse, target: input.answer}}
train: {max_steps: %(steps)d, epochs: 2, batch_size: 4, max_proposals: 2, max_error_samples: 2,
        max_correct_samples: 1, seed: 0, demos: %(schedule)s%(teacher)s}
"""


def rows(prefix, ns):
    return [{"id": f"{prefix}{i}", "question": f"How many? n={n}", "answer": str(n)} for i, n in enumerate(ns)]


@pytest.fixture(autouse=True)
def fresh_fake():
    reset_fake_state()


def setup(tmp_path: Path, *, schedule="demos_only", steps=1, teacher="teach", helps="response: Sum is"):
    write(tmp_path / "script.yaml", SCRIPT % {"helps": helps})
    write(tmp_path / "teacher.yaml", TEACHER)
    for name, ns in (("train", [1, 2, 3, 1, 4, 5, 1, 2]), ("val", [1, 2, 3, 4]), ("test", [1, 6, 7])):
        (tmp_path / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows(name, ns)))
    text = SPEC % {"steps": steps, "schedule": schedule, "teacher": f", teacher: {teacher}" if teacher else ""}
    return write(tmp_path / "spec.yaml", text)


def train(tmp_path, *args):
    result = CliRunner().invoke(app, ["train", str(tmp_path / "spec.yaml"), "--runs-dir", str(tmp_path / "runs"),
                                      *map(str, args)])
    run_dir = Path(result.stdout.strip().splitlines()[-1]) if result.stdout.strip() else None
    return result, run_dir


def read(run: Path) -> tuple[dict, list[dict], dict]:
    summary = json.loads((run / "summary.json").read_text())
    metrics = read_jsonl(run / "metrics.jsonl")
    state = json.loads((run / "checkpoint.json").read_text())["state"]
    return summary, metrics, state


def trace_rows(run: Path, step: int) -> list[dict]:
    return [json.loads(x) for x in (run / "traces" / f"step-{step:04d}.jsonl").read_text().splitlines()]


# ---------------------------------------------------------------- sampling and schedules


PARAM = demos.DemoParam("examples", "count", ("question",), shots=1, label="answer")


def test_sampling_favours_teacher_success_where_the_student_fails():
    teacher = {i: {"tries": 1, "score": 1.0, "outputs": {"examples": f"out {i}"}} for i in "abcdef"}
    student = {"a": 0.0, "b": 0.0, "c": 1.0, "d": 1.0, "e": 1.0, "f": 1.0}
    picks = Counter()
    for seed in range(400):
        ids = demos.draw(PARAM, teacher, student, sorted(teacher), random.Random(seed))
        assert ids == demos.draw(PARAM, teacher, student, sorted(teacher), random.Random(seed))  # deterministic
        picks.update(ids["bootstrapped"])
    # weights 1.1 for a and b, 0.1 for the others: about 85% of the draws pick a or b
    assert picks["a"] + picks["b"] > 0.75 * 400
    assert min(picks["a"], picks["b"]) > 4 * max(picks[i] for i in "cdef")


def test_raw_labelled_examples_fill_the_remaining_shots():
    param = demos.DemoParam("examples", "count", ("question",), shots=3, label="answer")
    examples = {e["id"]: Example(e["id"], e) for e in rows("t", [1, 2, 3, 4])}
    teacher = {"t1": {"tries": 2, "score": 1.0, "outputs": {"examples": "Sum is 2. Answer: 2"}},
               "t2": {"tries": 3, "score": 0.0, "outputs": {}}}  # the teacher failed t2: no candidate
    value, ids = demos.propose(param, seed=0, step=1, attempt=1, teacher=teacher, student={"t1": 0.0},
                               examples=examples, current="", tried=set())
    assert ids["bootstrapped"] == ["t1"] and len(ids["raw"]) == 2 and "t1" not in ids["raw"]
    assert value.startswith("Example 1:\nquestion: How many? n=2\nresponse: Sum is 2. Answer: 2\n\nExample 2:\n")
    assert "\nanswer: " in value  # raw demos show the label, not a response
    again = demos.propose(param, seed=0, step=1, attempt=1, teacher=teacher, student={"t1": 0.0},
                          examples=examples, current="", tried=set())
    assert again == (value, ids)
    # a demo set already tried (or the current one) is never proposed again
    other = demos.propose(param, seed=0, step=1, attempt=1, teacher=teacher, student={"t1": 0.0},
                          examples=examples, current=value, tried=set())
    assert other is not None and other[0] != value


@pytest.mark.parametrize("schedule, kinds", [
    ("off", "TTTT"), ("text_then_demos", "TTDD"), ("demos_then_text", "DDTT"),
    ("interleaved", "TDTD"), ("demos_only", "DDDD")])
def test_schedule_kinds(schedule, kinds):
    assert "".join(demos.step_kind(schedule, s, 4)[0].upper() for s in range(1, 5)) == kinds
    if schedule == "text_then_demos":
        assert [demos.step_kind(schedule, s, 3) for s in (1, 2, 3)] == ["text", "text", "demos"]


# ---------------------------------------------------------------- the teacher


def test_teacher_tries_are_separate_cached_calls(tmp_path):
    from autodiff_cli.llm.cache import CallCache
    from autodiff_cli.llm.client import ModelClient
    from autodiff_cli.llm.usage import Usage
    from autodiff_cli.nodes.compiler import compile_spec
    from autodiff_cli.spec.loader import load_spec
    from autodiff_cli.spec.prompts_file import initial_values

    setup(tmp_path)
    # this teacher is wrong on its first try of any question and right on the second
    write(tmp_path / "teacher.yaml", 'rules:\n  - match: "n=(\\\\d+)"\n    replies: ["Answer: 0", "Sum is {1}. Answer: {1}"]\n')
    program = compile_spec(load_spec(tmp_path / "spec.yaml"))
    examples = [Example(r["id"], r) for r in rows("train", [2, 3])]

    def bootstrap():
        client = ModelClient(program.spec.models, config_dir=tmp_path, usage=Usage(), cache=CallCache(tmp_path / "calls"))
        teacher = demos.Teacher(program, client, "teach", fail_threshold=0.5)
        runs = asyncio.run(teacher.run(examples, initial_values(program.spec), list(demos.demo_params(program).values())))
        return runs, client.usage.to_dict()

    runs, usage = bootstrap()
    assert runs == {"train0": {"tries": 2, "score": 1.0, "outputs": {"examples": "Sum is 2. Answer: 2"}},
                    "train1": {"tries": 2, "score": 1.0, "outputs": {"examples": "Sum is 3. Answer: 3"}}}
    assert usage["teacher"]["calls"] == 4 and usage["task"]["calls"] == 0
    # a new process (fresh script counters) gets the same tries from the cache: each try has its own key
    reset_fake_state()
    again, usage = bootstrap()
    assert again == runs and usage["teacher"]["cached_calls"] == 4 and usage["teacher"]["calls"] == 0


def test_default_teacher_is_the_task_model_sampling_under_role_teacher(tmp_path):
    setup(tmp_path, teacher=None)
    result, run = train(tmp_path)
    assert result.exit_code == 0, result.output
    summary, metrics, state = read(run)
    assert summary["models"]["teacher"] == "fake/script.yaml"
    teacher_rows = [r for r in trace_rows(run, 1) if r["kind"] == "teacher"]
    assert teacher_rows and {r["example_id"] for r in teacher_rows} == set(state["optimizers"]["demos"]["teacher"])
    # the student's own script never adds, so only n=1 succeeds (first try); the rest use all 3 tries
    assert all(r["tries"] == (1 if r["outputs"] else 3) for r in teacher_rows)
    assert summary["usage"]["teacher"]["calls"] == sum(r["tries"] for r in teacher_rows)
    assert metrics[0]["usage"]["teacher"]["calls"] == summary["usage"]["teacher"]["calls"]
    assert summary["usage"]["optimizer"]["calls"] == summary["usage"]["backward"]["calls"] == 0


# ---------------------------------------------------------------- acceptance and revert


def test_a_demos_proposal_that_helps_is_accepted(tmp_path):
    setup(tmp_path)
    result, run = train(tmp_path)
    assert result.exit_code == 0, result.output
    summary, metrics, state = read(run)
    assert summary["best"] == {"step": 1, "val": 0.75, "test": pytest.approx(2 / 3)}
    assert summary["proposals"]["accepted"] == 1
    step1 = metrics[0]
    assert step1["kind"] == "demos" and step1["proposals"][0]["accepted"] is True
    chosen = step1["proposals"][0]["demo_ids"]["examples"]
    assert state["demo_ids"] == {"examples": chosen} and len(chosen["bootstrapped"]) == 2
    assert state["history"][-1]["demo_ids"] == {"examples": chosen}
    prompts = yaml.safe_load((run / "prompts.yaml").read_text())
    assert prompts["examples"].startswith("Example 1:\nquestion: How many? n=") and "response: Sum is" in prompts["examples"]
    assert prompts["instruction"] == "Count the things."
    # the teacher always adds: one try (one call) per example, all accounted under `teacher`
    teacher_rows = [r for r in trace_rows(run, 1) if r["kind"] == "teacher"]
    assert all(r["tries"] == 1 and r["score"] == 1.0 for r in teacher_rows)
    assert summary["usage"]["teacher"]["calls"] == len(teacher_rows) == len(state["optimizers"]["demos"]["teacher"])
    assert summary["models"]["teacher"] == "fake/teacher.yaml"
    assert summary["usage"]["optimizer"]["calls"] == 0


def test_a_demos_proposal_that_does_not_help_is_reverted(tmp_path):
    setup(tmp_path, helps="NEVER PRESENT")
    result, run = train(tmp_path)
    assert result.exit_code == 0, result.output
    summary, metrics, state = read(run)
    assert summary["best"]["step"] == 0 and summary["proposals"]["accepted"] == 0
    assert summary["proposals"]["tried"] == 2
    proposals = metrics[0]["proposals"]
    assert all(not p["accepted"] and "subset score" in p["reason"] for p in proposals)
    assert proposals[0]["params"]["examples"] != proposals[1]["params"]["examples"]  # a new set each attempt
    assert yaml.safe_load((run / "prompts.yaml").read_text())["examples"] == ""
    assert state["demo_ids"] == {} and state["values"]["examples"] == ""


@pytest.mark.parametrize("schedule, kinds", [
    ("text_then_demos", ["text", "text", "demos", "demos"]), ("demos_then_text", ["demos", "demos", "text", "text"]),
    ("interleaved", ["text", "demos", "text", "demos"]), ("demos_only", ["demos"] * 4), ("off", ["text"] * 4)])
def test_each_schedule_proposes_text_or_demos_on_its_steps(tmp_path, schedule, kinds):
    setup(tmp_path, schedule=schedule, steps=4, helps="NEVER PRESENT")
    result, run = train(tmp_path)
    assert result.exit_code == 0, result.output
    _, metrics, _ = read(run)
    assert [m["kind"] for m in metrics] == kinds
    for m in metrics:
        assert m["proposals"], m  # nothing is ever accepted, so every step has failures and proposals
        usage = m["usage"]
        if m["kind"] == "text":
            assert usage["teacher"]["calls"] == 0 and usage["optimizer"]["calls"] > 0
            assert all("demo_ids" not in p and set(p["params"]) <= {"instruction"} for p in m["proposals"])
        else:
            assert usage["optimizer"]["calls"] == usage["backward"]["calls"] == 0
            assert all(set(p["demo_ids"]) == {"examples"} for p in m["proposals"] if p["params"])
    first_demos = next((m for m in metrics if m["kind"] == "demos"), None)
    if first_demos is not None:
        assert first_demos["usage"]["teacher"]["calls"] > 0


# ---------------------------------------------------------------- resume and export


@pytest.mark.parametrize("interrupt_at", [2, 3])
def test_interrupted_run_with_demos_resumes_to_the_same_result(tmp_path, monkeypatch, interrupt_at):
    setup(tmp_path, schedule="interleaved", steps=4)
    _, straight = train(tmp_path)
    reference, reference_metrics, reference_state = read(straight)
    assert reference["best"]["step"] == 2  # the demos of step 2 were accepted

    from autodiff_cli.train import trainer as trainer_module

    original = trainer_module.Trainer.step
    calls = {"n": 0}

    async def interrupting_step(self, state, step):
        if step == interrupt_at and calls["n"] == 0:
            calls["n"] += 1
            raise asyncio.CancelledError()
        return await original(self, state, step)

    monkeypatch.setattr(trainer_module.Trainer, "step", interrupting_step)
    result, run = train(tmp_path)
    assert result.exit_code == 130
    assert json.loads((run / "checkpoint.json").read_text())["state"]["step"] == interrupt_at - 1
    resumed, same_run = train(tmp_path, "--resume", run)
    assert resumed.exit_code == 0, resumed.output
    assert same_run == run
    final, metrics, state = read(run)
    assert final["status"] == "completed" and final["steps"] == 4
    assert final["best"] == reference["best"]
    assert (run / "prompts.yaml").read_text() == (straight / "prompts.yaml").read_text()
    for key in ("values", "optimizers", "demo_ids", "history"):  # optimizers: the teacher's runs, student scores
        assert state[key] == reference_state[key], key
    assert state["optimizers"]["demos"]["teacher"] and state["optimizers"]["demos"]["student_scores"]
    strip = lambda ms: [{k: v for k, v in m.items() if k not in ("usage", "wall_seconds")} for m in ms]
    assert strip(metrics) == strip(reference_metrics)


def test_export_includes_the_chosen_demos(tmp_path):
    setup(tmp_path)
    _, run = train(tmp_path)
    prompts = yaml.safe_load((run / "prompts.yaml").read_text())
    exported = yaml.safe_load(CliRunner().invoke(app, ["export-prompts", str(run)]).stdout)
    assert exported["params"]["examples"] == prompts["examples"]
    assert exported["nodes"]["count"]["system"] == "Count the things.\n" + prompts["examples"]
    md = CliRunner().invoke(app, ["export-prompts", str(run), "--format", "md"]).stdout
    state = json.loads((run / "checkpoint.json").read_text())["state"]
    assert "teacher-traced demos from examples " + ", ".join(f"`{i}`" for i in state["demo_ids"]["examples"]["bootstrapped"]) in md

    baked = tmp_path / "baked.yaml"
    assert CliRunner().invoke(app, ["export-prompts", str(run), "--format", "config", "-o", str(baked)]).exit_code == 0
    assert yaml.safe_load(baked.read_text())["params"]["examples"]["value"] == prompts["examples"]
    again = CliRunner().invoke(app, ["eval", str(baked), "--json"])
    assert again.exit_code == 0, again.output
    summary = json.loads((run / "summary.json").read_text())
    assert json.loads(again.stdout.strip().splitlines()[-1])["score"] == summary["best"]["val"] == 0.75
