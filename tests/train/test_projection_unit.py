"""train/projection.py called directly: `llm_invocations` unrolls loops (a body node counts max_iters
times per example), `project` returns per-role upper bounds built from the compiled program and the
Trainer (as `train --dry-run` builds them) without calling a model, `print_projection` shows them.

tests/train/test_projection.py checks through the CLI that the bounds hold in every mode and demos
schedule for a loop-free spec; this file covers the functions' own arithmetic, loops included."""
from __future__ import annotations

import asyncio
import json
from pathlib import Path

import pytest

from autodiff_cli.app.commands import load_pipeline, make_client
from autodiff_cli.data.splits import load_split, split_names
from autodiff_cli.llm.fake import reset_fake_state
from autodiff_cli.spec.prompts_file import initial_values
from autodiff_cli.train.projection import (
    DEFAULT_REPLY_TOKENS,
    llm_invocations,
    print_projection,
    project,
)
from autodiff_cli.train.state import TrainState
from autodiff_cli.train.trainer import Trainer
from tests.conftest import write
from tests.specs import CORPUS, MULTIHOP, TOY_SCRIPT

ROLES = {"task", "backward", "optimizer", "teacher"}

# MULTIHOP (a query node in a 3-iteration loop, then an answer node) with the training roles and
# splits; its `until` never holds, so every example makes the loop's 3 query calls and 1 answer call
LOOP_SPEC = (
    MULTIHOP.replace("  task: {model: fake/script.yaml}",
                     "  task: {model: fake/script.yaml}\n  backward: {model: fake/script.yaml}\n"
                     "  optimizer: {model: fake/script.yaml}")
    .replace("data:\n  val: val.jsonl", "data:\n  train: train.jsonl\n  val: val.jsonl\n  test: test.jsonl")
    .replace('until: "iteration >= 1 and len(state.context) >= 1"', 'until: "iteration >= 99"')
    + "train: {max_steps: 2, batch_size: 2, max_proposals: 1, max_error_samples: 2, max_correct_samples: 1, seed: 0}\n"
)
PER_EXAMPLE = 3 + 1
SIZES = {"train": 4, "val": 3, "test": 2}


@pytest.fixture(autouse=True)
def fresh_fake():
    reset_fake_state()


def rows(split: str, n: int, long_first: int = 0) -> list[dict]:
    out = [{"id": f"{split}{i}", "question": f"Capital of France? {i}", "answer": "Paris"} for i in range(n)]
    if long_first:
        out[0]["question"] += "x" * long_first
    return out


def make_project(tmp_path: Path, spec: str = LOOP_SPEC, sizes: dict = SIZES, long_first_val: int = 0,
                 long_second_val: int = 0) -> Path:
    assert "iteration >= 99" in spec
    write(tmp_path / "script.yaml", TOY_SCRIPT % {"new": "Answer with the city."})
    (tmp_path / "corpus.jsonl").write_text("".join(json.dumps(r) + "\n" for r in CORPUS))
    for split, n in sizes.items():
        data = rows(split, n, long_first_val if split == "val" else 0)
        if split == "val" and long_second_val:
            data[1]["question"] += "y" * long_second_val
        (tmp_path / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in data))
    if "test" not in sizes:
        spec = spec.replace("\n  test: test.jsonl", "")
    return write(tmp_path / "spec.yaml", spec)


def build(config: Path, overrides: list[str] = ()):
    """What `train --dry-run` builds (app/train_run.py): pipeline, splits, client, Trainer."""
    p = load_pipeline(config, list(overrides))
    splits = {s: load_split(p.loaded, s, p.program.input_fields) for s in split_names(p.loaded)}
    client = make_client(p, concurrency=None, no_cache=True)
    return p.program, splits, Trainer(p.program, client, splits), client


def made_calls(client) -> dict[str, int]:
    return {role: u["calls"] + u["cached_calls"] for role, u in client.usage.to_dict().items()}


# ---------------------------------------------------------------- llm_invocations


def test_llm_invocations_unroll_the_loop_body_and_skip_other_nodes(tmp_path):
    program, *_ = build(make_project(tmp_path))
    got = [(node.name, times) for node, times in llm_invocations(program.scope)]
    # the body's query up to max_iters times; retrieve/merge (functions) and the loop itself are not llm calls
    assert got == [("query", 3), ("answer", 1)]
    assert [(n.name, t) for n, t in llm_invocations(program.scope, repeat=2)] == [("query", 6), ("answer", 2)]
    assert all(node.kind == "llm" for node, _ in llm_invocations(program.scope))


def test_llm_invocations_follow_max_iters(tmp_path):
    program, *_ = build(make_project(tmp_path), ["nodes.hops.max_iters=5"])
    assert [(n.name, t) for n, t in llm_invocations(program.scope)] == [("query", 5), ("answer", 1)]


def test_llm_invocations_of_a_loop_body_scope_alone(tmp_path):
    program, *_ = build(make_project(tmp_path))
    (body, times), = program.node("hops").inner_scopes()
    assert times == 3
    assert [(n.name, t) for n, t in llm_invocations(body)] == [("query", 1)]


# ---------------------------------------------------------------- project


def test_a_mode_that_does_not_train_projects_validation_and_test_only(tmp_path):
    program, splits, trainer, client = build(make_project(tmp_path), ["train.mode=none"])
    bounds = project(program, splits, trainer)
    assert set(bounds) == ROLES and all(set(row) == {"calls", "tokens"} for row in bounds.values())
    # the initial validation, then the test split twice (initial and best values)
    assert bounds["task"]["calls"] == (SIZES["val"] + 2 * SIZES["test"]) * PER_EXAMPLE
    assert all(bounds[r] == {"calls": 0, "tokens": 0} for r in ("backward", "optimizer", "teacher"))
    assert made_calls(client)["task"] == 0  # projecting calls no model


def test_the_bound_is_reached_by_a_run_that_uses_every_iteration(tmp_path):
    # no test split and no training: the run is the initial validation, every loop iteration used
    program, splits, trainer, client = build(make_project(tmp_path, sizes={"train": 4, "val": 3}),
                                             ["train.mode=none"])
    bounds = project(program, splits, trainer)
    assert bounds["task"]["calls"] == 3 * PER_EXAMPLE
    state = TrainState(values=initial_values(program.spec), initial_values=initial_values(program.spec))
    asyncio.run(trainer.run(state))
    assert made_calls(client)["task"] == bounds["task"]["calls"]


def test_training_bounds_every_role_of_a_run_with_a_loop(tmp_path):
    program, splits, trainer, client = build(make_project(tmp_path))
    bounds = project(program, splits, trainer)
    idle = project(*build(make_project(tmp_path / "idle"), ["train.mode=none"])[:3])
    steps = len(trainer.planned_steps())
    assert steps == 2
    # each step evaluates at least its minibatch, every example with all its unrolled calls
    assert bounds["task"]["calls"] - idle["task"]["calls"] >= steps * 2 * PER_EXAMPLE
    assert bounds["task"]["calls"] % PER_EXAMPLE == 0
    assert bounds["backward"]["calls"] > 0 and bounds["optimizer"]["calls"] > 0
    assert bounds["teacher"]["calls"] == 0  # train.demos is off

    state = TrainState(values=initial_values(program.spec), initial_values=initial_values(program.spec))

    async def run() -> None:
        await trainer.run(state)
        await trainer.test_scores(state)

    asyncio.run(run())
    made = made_calls(client)
    assert state.step == steps and made["backward"] > 0 and made["optimizer"] > 0
    for role, count in made.items():
        assert count <= bounds[role]["calls"], (role, count, bounds)


def test_reply_tokens_come_from_each_models_max_tokens(tmp_path):
    config = make_project(tmp_path)
    default = project(*build(config)[:3])
    capped = project(*build(config, ["models.task.max_tokens=1000"])[:3])
    task_calls = default["task"]["calls"]
    assert capped["task"]["calls"] == task_calls
    # every projected task call budgets max_tokens for its reply instead of the default 256
    assert capped["task"]["tokens"] - default["task"]["tokens"] == task_calls * (1000 - DEFAULT_REPLY_TOKENS)
    assert capped["optimizer"] == default["optimizer"]  # the optimizer's model has no max_tokens set


def test_prompt_tokens_are_the_first_validation_examples_characters_over_4(tmp_path):
    # the query shows only the question; the answer also reads the loop's output, unknown before a run
    spec = LOOP_SPEC.replace('user: "{{ input.question }} | known: {{ state.context }}"', 'user: "{{ input.question }}"')
    assert spec != LOOP_SPEC
    base = project(*build(make_project(tmp_path / "a", spec))[:3])
    longer = project(*build(make_project(tmp_path / "b", spec, long_first_val=400))[:3])
    task_calls = base["task"]["calls"]
    assert longer["task"]["calls"] == task_calls
    # 400 more characters: 100 more tokens for each of the 3 query calls of each projected example; the
    # answer's template cannot render before the run, so its text is counted as written (no change)
    assert longer["task"]["tokens"] - base["task"]["tokens"] == (task_calls // PER_EXAMPLE) * 3 * 100
    # only the first validation example is measured
    other = project(*build(make_project(tmp_path / "c", spec, long_second_val=400))[:3])
    assert other == base


def test_optimizer_and_backward_tokens_per_call(tmp_path):
    bounds = project(*build(make_project(tmp_path))[:3])
    assert bounds["optimizer"]["tokens"] == bounds["optimizer"]["calls"] * 2500
    per_call = bounds["task"]["tokens"] // bounds["task"]["calls"]
    # a backward call shows about a task call's prompt and reply twice, plus its instructions
    assert bounds["backward"]["tokens"] == bounds["backward"]["calls"] * (2 * per_call + 600)


# ---------------------------------------------------------------- print_projection


def test_print_projection_json_and_table(tmp_path, capsys):
    program, splits, trainer, _ = build(make_project(tmp_path))
    bounds = project(program, splits, trainer)
    print_projection(program, splits, trainer, json_out=True)
    data = json.loads(capsys.readouterr().out)
    assert data == {"name": "multihop", "mode": "autodiff", "steps": 2, "upper_bounds": bounds}

    print_projection(program, splits, trainer)
    out = capsys.readouterr()
    lines = out.out.splitlines()
    assert lines[0].startswith("dry run: multihop, mode autodiff, 2 steps, train 4 / val 3 / test 2; upper bounds")
    assert lines[1].split() == ["role", "calls", "tokens"]
    assert [line.split() for line in lines[2:]] == [[r, str(bounds[r]["calls"]), str(bounds[r]["tokens"])]
                                                    for r in ("task", "backward", "optimizer", "teacher")]
    assert out.err == ""  # no budget set: no note


def test_print_projection_notes_a_budget_the_projection_exceeds(tmp_path, capsys):
    config = make_project(tmp_path)
    program, splits, trainer, _ = build(config, ["train.budget.max_calls=10"])
    print_projection(program, splits, trainer)
    assert "exceeds budget.max_calls 10" in capsys.readouterr().err
    program, splits, trainer, _ = build(config, ["train.budget.max_calls=100000"])
    print_projection(program, splits, trainer)
    assert capsys.readouterr().err == ""
