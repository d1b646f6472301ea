"""The paper's pipelines in `configs/`, each validated and trained in CI-sized form with the
scripted fake model: one step, one proposal, a few examples per split.

Data comes from `autodiff data fetch NAME --from <shared datasets>` (../shared/datasets next to
the repository, or $AUTODIFF_TEST_DATASETS) when that folder exists, else from small generated
rows with the same fields, so the tests never need the network. The loop configs must show
time-sequential gradients: the looped LLM node gets gradients from its call #0 and call #1,
and a repeated run writes the same traces.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from autodiff_cli.app.cli import app
from autodiff_cli.llm.fake import reset_fake_state

ROOT = Path(__file__).resolve().parents[2]
CONFIGS = ROOT / "configs"
SHARED = Path(os.environ.get("AUTODIFF_TEST_DATASETS", ROOT.parent / "shared" / "datasets"))
DATASETS = ("object_counting", "trec", "hotpotqa")

PAPER_CONFIGS = ["object_count", "quickstart", "trec", "hotpot_vanilla_rag", "hotpot_multihop_rag",
                 "hotpot_multihop_cycle", "hotpot_react"]
LOOPED = {"hotpot_multihop_cycle": "query", "hotpot_react": "plan"}  # config -> its looped LLM node

# Every role in one script; the first matching rule wins, so the meta-prompts (told apart by
# their system prompts) come before the task nodes, whose messages they quote. The backward
# reply carries a key for every param and upstream input of these configs; the engine keeps
# the keys a call asked for. Task answers are mostly wrong so that every step backpropagates.
# The ReAct planner searches first and finishes once its history holds an observation, so its
# loop runs exactly twice; the cyclic query writer always runs both hops.
BACKWARD = {
    "diagnosis": "The answer misses the second fact.",
    **{f"param: {p}": f"Make `{p}` ask for the missing fact." for p in (
        "instruction", "answer_format", "hop1_instruction", "hop2_instruction", "query_instruction",
        "answer_instruction", "planner_instruction", "planner_actions")},
    **{f"input: {i}": f"`{i}` should have held the passage with the second fact." for i in (
        "state.steps", "state.context", "hops.context", "context", "retrieve", "hop1_retrieve",
        "classify", "count", "plan")},
}
SCRIPT = {
    "rules": [
        {"match": "backward engine", "in": "system", "reply": json.dumps(BACKWARD)},
        {"match": "read by a program", "in": "system",
         "reply": json.dumps({"reasoning": "Answers miss the second fact.", "method": "rephrase",
                              "new_value": "Find both facts, then give only the short answer."})},
        {"match": "Observation:", "in": "user",  # the ReAct planner, second step
         "reply": json.dumps({"thought": "I have read enough.", "action": "finish", "argument": "unknown"})},
        {"match": "one step at a time", "in": "system",  # the ReAct planner, first step
         "reply": json.dumps({"thought": "Search the first fact.", "action": "search", "argument": "city river capital"})},
        {"match": "search query", "in": "system", "reply": "city river capital"},
        {"match": "question classifier", "in": "system", "reply": "Class: HUM"},
        {"match": "Count|reasoning question", "in": "system", "reply": "Let me count. Answer: 3"},
    ],
    "default": "unknown",
}

# Small CI-sized splits: (start, stop) windows, or a sample size for sampled splits.
SMALL = {"train": (0, 4), "val": (0, 3), "test": (3, 6)}
SAMPLE = 6


@pytest.fixture(scope="module")
def data_root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("datasets")
    if all((SHARED / name).is_dir() for name in DATASETS):
        for name in DATASETS:
            result = CliRunner().invoke(app, ["data", "fetch", name, "--from", str(SHARED), "--dest", str(root)])
            assert result.exit_code == 0, result.output
    else:
        _generate(root)
    return root


def _write_rows(path: Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")


def _generate(root: Path, n: int = 200) -> None:
    """Rows with the fields the configs read, enough for their full slices (val[30:90], test_public[66:166])."""
    labels = ["ABBR", "DESC", "ENTY", "HUM", "LOC", "NUM"]
    for split in ("train", "val"):
        _write_rows(root / "object_counting" / f"{split}.jsonl",
                    [{"id": f"oc-{split}-{i}", "question": f"I have {i % 7} apples and a pear. How many fruits do I have?",
                      "answer": str(i % 7 + 1)} for i in range(n)])
        _write_rows(root / "trec" / f"{split}.jsonl",
                    [{"id": f"trec-{split}-{i}", "question": f"What is thing number {i} ?", "label": labels[i % 6]}
                     for i in range(n)])
        _write_rows(root / "hotpotqa" / f"{split}.jsonl",
                    [{"id": f"hp-{split}-{i}", "question": f"Which river flows through the capital of country {i % 10}?",
                      "answer": f"river {i % 10}"} for i in range(n)])
    _write_rows(root / "hotpotqa" / "corpus.jsonl",
                [{"id": f"C{i}", "title": f"Country {i}", "text": f"The capital city of country {i} is city {i}, on river {i}."}
                 for i in range(10)])


@pytest.fixture(autouse=True)
def fresh_fake():
    reset_fake_state()


@pytest.fixture
def env(data_root, tmp_path, monkeypatch):
    monkeypatch.setenv("AUTODIFF_DATA", str(data_root))
    script = tmp_path / "script.yaml"
    script.write_text(yaml.safe_dump(SCRIPT, sort_keys=False), encoding="utf-8")
    return tmp_path, script


def small_sets(config: Path, script: Path) -> list[str]:
    """--set arguments: every model is the fake script, every split a few rows, one step."""
    spec = yaml.safe_load(config.read_text(encoding="utf-8"))
    sets = [f"models.{name}.model=fake/{script}" for name in spec["models"]]
    data = spec["data"]
    if "generator" in data:
        sets += [f"data.generator.{split}={stop - start}" for split, (start, stop) in SMALL.items()]
    for split, (start, stop) in SMALL.items():
        value = data.get(split)
        if value is None:
            continue
        if isinstance(value, str):
            sets.append(f"data.{split}={{path: {value}, start: {start}, stop: {stop}}}")
        elif "sample" in value:
            sets.append(f"data.{split}.sample={SAMPLE}")
        else:
            sets += [f"data.{split}.start={start}", f"data.{split}.stop={stop}"]
    sets += ["train.max_steps=1", "train.max_proposals=1", "train.batch_size=4",
             "train.max_error_samples=2", "train.max_correct_samples=1"]
    return [arg for s in sets for arg in ("--set", s)]


def train(config: Path, runs: Path, sets: list[str], *extra: str) -> tuple[object, Path | None]:
    result = CliRunner().invoke(app, ["train", str(config), "--runs-dir", str(runs), *extra, *sets])
    lines = result.stdout.strip().splitlines()
    return result, (Path(lines[-1]) if lines else None)


def gradients(run: Path) -> list[dict]:
    rows = [json.loads(line) for line in (run / "traces" / "step-0001.jsonl").read_text().splitlines()]
    return [r for r in rows if r["kind"] == "gradient"]


@pytest.mark.parametrize("name", PAPER_CONFIGS)
def test_config_validates_and_trains_with_the_fake_model(name, env):
    tmp_path, script = env
    config = CONFIGS / f"{name}.yaml"
    as_shipped = CliRunner().invoke(app, ["validate", str(config)])
    assert as_shipped.exit_code == 0, as_shipped.output
    sets = small_sets(config, script)
    small = CliRunner().invoke(app, ["validate", str(config), *sets])
    assert small.exit_code == 0, small.output

    result, run = train(config, tmp_path / "runs", sets)
    assert result.exit_code == 0, result.output
    summary = json.loads((run / "summary.json").read_text())
    assert summary["status"] == "completed" and summary["steps"] == 1, summary
    assert summary["usage"]["task"]["calls"] > 0 and summary["usage"]["task"]["errors"] == 0
    assert summary["models"]["task"] == f"fake/{script}"
    metrics = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics] == [1]
    # the script answers mostly wrong, so the step backpropagates and proposes
    assert not metrics[0].get("skipped"), metrics[0]
    assert summary["usage"]["backward"]["calls"] > 0 and summary["usage"]["optimizer"]["calls"] > 0
    assert summary["proposals"]["tried"] == 1
    assert any(g["target"].startswith("param:") for g in gradients(run))


@pytest.mark.parametrize("name", sorted(LOOPED))
def test_loop_configs_give_time_sequential_gradients_and_repeat_exactly(name, env):
    tmp_path, script = env
    config = CONFIGS / f"{name}.yaml"
    node = LOOPED[name]
    sets = small_sets(config, script)
    result, run = train(config, tmp_path / "runs", sets)
    assert result.exit_code == 0, result.output
    assert json.loads((run / "summary.json").read_text())["status"] == "completed"

    grads = gradients(run)
    looped = [g for g in grads if g["node"] == node]
    by_example: dict[str, set[int]] = {}
    for g in looped:
        by_example.setdefault(g["example_id"], set()).add(g["call_index"])
    assert by_example, f"no gradient from `{node}`"
    # every backpropagated example: one backward call per loop iteration, no third iteration
    assert all(indices == {0, 1} for indices in by_example.values()), by_example
    params = {g["target"] for g in looped if g["target"].startswith("param:")}
    assert params, looped
    for index in (0, 1):
        assert {g["target"] for g in looped if g["call_index"] == index and g["target"].startswith("param:")} == params
    # call #1 read call #0's output through the loop state and handed feedback back to it
    assert any(g["call_index"] == 1 and g["target"].startswith("call:") for g in looped)
    if name == "hotpot_react":
        skips = [g for g in grads if g["node"] == "loss"]
        assert skips and {g["target"] for g in skips} == {"param:planner_instruction"}

    again, run2 = train(config, tmp_path / "runs2", sets, "--no-cache")
    assert again.exit_code == 0, again.output
    assert run2 != run
    assert (run2 / "traces" / "step-0001.jsonl").read_text() == (run / "traces" / "step-0001.jsonl").read_text()
    assert (run2 / "prompts.yaml").read_text() == (run / "prompts.yaml").read_text()
