"""benchmarks/run.py end to end with the scripted fake model: trains config x mode x seed through
the CLI in subprocesses, writes one section of a results file, reuses its state on a rerun,
resumes an interrupted run, and computes the paired bootstrap interval."""
from __future__ import annotations

import asyncio
import importlib.util
import json
import random
import re
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from autodiff_cli.app.cli import app
from autodiff_cli.llm.fake import reset_fake_state
from tests.conftest import write
from tests.specs import TOY_SCRIPT, TOY_SPEC

ROOT = Path(__file__).resolve().parents[2]

# The toy setup of tests/specs.py: the optimizer proposes ALWAYS ADD, so `autodiff` improves on test.
SCRIPT = TOY_SCRIPT % {"new": "Count the things. ALWAYS ADD the counts."}
SPEC = TOY_SPEC.replace("max_proposals: 2", "max_proposals: 1").replace(", seed: 0}", "}")

SPLITS = {"train": [1, 2, 3, 1, 4, 5, 1, 2], "val": [1, 2, 3, 4], "test": [1, 6, 7, 2, 3, 1, 5, 8, 9, 2, 4, 1]}


def _load_runner():
    spec = importlib.util.spec_from_file_location("bench_run", ROOT / "benchmarks" / "run.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["bench_run"] = module
    spec.loader.exec_module(module)
    return module


bench = _load_runner()


@pytest.fixture(autouse=True)
def fresh_fake():
    reset_fake_state()


@pytest.fixture
def toy(tmp_path):
    write(tmp_path / "script.yaml", SCRIPT)
    for name, ns in SPLITS.items():
        (tmp_path / f"{name}.jsonl").write_text("".join(
            json.dumps({"id": f"{name}{i:02d}", "question": f"How many? n={n}", "answer": str(n)}) + "\n"
            for i, n in enumerate(ns)))
    return write(tmp_path / "spec.yaml", SPEC)


@pytest.fixture
def commands(monkeypatch):
    """Every CLI command line the runner starts."""
    seen: list[list[str]] = []
    original = bench.Runner.run

    def recording(self, cmd, on_line=None):
        seen.append(cmd[3:])
        return original(self, cmd, on_line)

    monkeypatch.setattr(bench.Runner, "run", recording)
    return seen


def run_bench(tmp_path, config, *extra):
    return bench.main(["--config", str(config), "--work", str(tmp_path / "work"),
                       "--results", str(tmp_path / "RESULTS.md"), "--section", "toy", "--bootstrap", "2000", *extra])


def section(results: Path, name: str = "toy") -> str:
    text = results.read_text()
    found = re.findall(rf"<!-- bench:{name} -->.*?<!-- /bench:{name} -->", text, re.DOTALL)
    assert len(found) == 1, text
    return found[0]


def table_rows(text: str) -> dict[str, list[str]]:
    """mode -> cells of its row in the main table."""
    lines = [ln for ln in text.splitlines() if ln.startswith("| toy") or ln.startswith("| spec")]
    return {cells[1]: cells for cells in ([c.strip() for c in ln.strip("|").split("|")] for ln in lines)}


def state_of(tmp_path) -> dict:
    return json.loads((tmp_path / "work" / "state.json").read_text())


def test_runner_trains_scores_writes_one_section_and_reuses_its_state(tmp_path, toy, commands):
    results = tmp_path / "RESULTS.md"
    results.write_text("# Measured results\n\nHand-written intro.\n\n<!-- bench:other -->\nkeep me\n<!-- /bench:other -->\n")
    assert run_bench(tmp_path, toy, "--mode", "autodiff", "--mode", "none", "--seed", "0") == 0
    trains = [c for c in commands if c[0] == "train"]
    assert len(trains) == 2 and all("--runs-dir" in c for c in trains)
    assert {c[c.index("--set") + 1] for c in trains} == {"train.mode=autodiff", "train.mode=none"}

    text = section(results)
    assert "Hand-written intro." in results.read_text() and "keep me" in results.read_text()
    assert "python benchmarks/run.py --config" in text and "--mode autodiff --mode none" in text
    assert re.search(r"Machine: \d+ cores .*GiB RAM", text) and re.search(r"Date: \d{4}-\d\d-\d\d \d\d:\d\d UTC", text)
    assert "task `fake/script.yaml`" in text

    rows = table_rows(text)
    assert set(rows) == {"autodiff", "none"}
    state = state_of(tmp_path)
    runs = {e["mode"]: tmp_path / "work" / e["run_dir"] for e in state["runs"].values()}
    for mode, run in runs.items():
        summary = json.loads((run / "summary.json").read_text())
        assert summary["status"] == "completed" and summary["mode"] == mode
        cells = rows[mode]
        # config | mode | seed | val init | val best | test init | test best | delta | win | steps | proposals | calls ...
        assert cells[2] == "0"
        assert [float(x) for x in cells[3:7]] == pytest.approx(
            [summary["initial"]["val"], summary["best"]["val"], summary["initial"]["test"], summary["best"]["test"]], abs=5e-4)
        mean = float(cells[7].split()[0])
        assert mean == pytest.approx(summary["best"]["test"] - summary["initial"]["test"], abs=5e-4)
        assert cells[9] == str(summary["steps"])
        p = summary["proposals"]
        assert cells[10] == f"{p['tried']}/{p['passed_subset']}/{p['accepted']}"
        u = summary["usage"]
        assert cells[11].split()[0] == f"{u['task']['calls']}/{u['backward']['calls']}/{u['optimizer']['calls']}"
        assert cells[-1] == "completed"
    # the fake script makes the full method right on every test example: a clear, significant win
    assert rows["autodiff"][8] == "**yes**" and float(rows["autodiff"][7].split()[0]) > 0.5
    low = float(re.search(r"\[([+-][\d.]+),", rows["autodiff"][7]).group(1))
    assert low > 0
    assert rows["none"][7].startswith("+0.000 [+0.000, +0.000]") and rows["none"][8] == "no"

    # again: nothing is trained or scored again, the section is replaced, not duplicated
    before = sorted(p.name for p in (tmp_path / "work" / "runs").iterdir())
    commands.clear()
    assert run_bench(tmp_path, toy, "--mode", "autodiff", "--mode", "none") == 0
    assert commands == []
    assert sorted(p.name for p in (tmp_path / "work" / "runs").iterdir()) == before
    assert state_of(tmp_path)["runs"] == state["runs"]
    again = section(results)  # exactly one
    assert table_rows(again) == rows
    assert results.read_text().count("<!-- bench:other -->") == 1 and "keep me" in results.read_text()

    # --report-only: the same section from the record, without running anything or touching state.json
    results.write_text(results.read_text().replace(again, "<!-- bench:toy -->\nstale\n<!-- /bench:toy -->"))
    state_file = tmp_path / "work" / "state.json"
    stamp = state_file.stat().st_mtime_ns
    assert run_bench(tmp_path, toy, "--mode", "autodiff", "--mode", "none", "--report-only") == 0
    assert commands == [] and state_file.stat().st_mtime_ns == stamp
    redone = section(results)
    assert table_rows(redone) == rows and "stale" not in redone
    assert "--report-only" not in redone and "--mode autodiff --mode none" in redone


def test_report_only_names_what_is_not_recorded_and_writes_nothing(tmp_path, toy, commands, capsys):
    results = tmp_path / "RESULTS.md"
    assert run_bench(tmp_path, toy, "--mode", "none") == 0
    before = results.read_text()
    commands.clear()
    capsys.readouterr()
    assert run_bench(tmp_path, toy, "--mode", "none", "--mode", "autodiff", "--seed", "0", "--seed", "3",
                     "--report-only") == 2
    err = capsys.readouterr().err
    assert "spec.yaml autodiff seed 0: not run" in err and "spec.yaml none seed 3: not run" in err
    assert "none seed 0" not in err
    assert commands == [] and results.read_text() == before


def test_an_interrupted_run_is_resumed_not_restarted(tmp_path, toy, commands, monkeypatch):
    from autodiff_cli.train import trainer as trainer_module

    original = trainer_module.Trainer.step

    async def interrupting_step(self, state, step):
        if step == 2:
            raise asyncio.CancelledError()
        return await original(self, state, step)

    # a run killed during step 2, trained with exactly the options the runner passes
    runs = tmp_path / "work" / "runs"
    with monkeypatch.context() as m:
        m.setattr(trainer_module.Trainer, "step", interrupting_step)
        result = CliRunner().invoke(app, ["train", str(toy), "--runs-dir", str(runs),
                                          "--set", "train.mode=autodiff", "--set", "train.seed=0"])
    assert result.exit_code == 130, result.output
    run = Path(result.stdout.strip().splitlines()[-1])
    assert json.loads((run / "summary.json").read_text())["status"] == "interrupted"

    state = bench.State(tmp_path / "work")
    key = bench.run_key(toy, "autodiff", 0, [])
    state.data["runs"][key] = {"config": str(toy), "config_id": bench.config_id(toy), "mode": "autodiff", "seed": 0,
                               "sets": [], "run_dir": state.rel(run), "status": "running", "eval": None}
    state.save()

    assert run_bench(tmp_path, toy, "--mode", "autodiff") == 0
    trains = [c for c in commands if c[0] == "train"]
    assert len(trains) == 1 and trains[0][trains[0].index("--resume") + 1] == str(run.resolve())
    assert "train.mode=autodiff" in trains[0] and "--runs-dir" not in trains[0]
    assert [p.resolve() for p in runs.iterdir()] == [run.resolve()]  # no new run
    summary = json.loads((run / "summary.json").read_text())
    assert summary["status"] == "completed" and summary["steps"] == 2
    assert [json.loads(x)["step"] for x in (run / "metrics.jsonl").read_text().splitlines()] == [1, 2]
    entry = state_of(tmp_path)["runs"][key]
    assert entry["status"] == "completed" and entry["trainings"] == 1
    row = table_rows(section(tmp_path / "RESULTS.md"))["autodiff"]
    assert row[-1] == "completed" and float(row[6]) == pytest.approx(summary["best"]["test"], abs=5e-4)


def test_a_budget_stop_is_recorded_with_its_reason_and_the_runner_moves_on(tmp_path, toy, commands):
    rc = run_bench(tmp_path, toy, "--mode", "autodiff", "--set", "train.budget.max_calls=6")
    assert rc == 0
    entry = next(iter(state_of(tmp_path)["runs"].values()))
    assert entry["status"] == "budget_exhausted" and entry["exit_code"] == 4
    text = section(tmp_path / "RESULTS.md")
    assert table_rows(text)["autodiff"][-1] == "budget_exhausted"
    assert re.search(r"- `spec` autodiff seed 0: budget_exhausted: .*max_calls", text)
    commands.clear()
    assert run_bench(tmp_path, toy, "--mode", "autodiff", "--set", "train.budget.max_calls=6") == 0
    assert not [c for c in commands if c[0] == "train"]  # a final outcome is reused


def test_plan_actions_and_dry_run(tmp_path, toy, capsys):
    state = bench.State(tmp_path / "work")
    run = tmp_path / "work" / "runs" / "toy-1"
    run.mkdir(parents=True)
    entry = {"run_dir": state.rel(run)}
    assert bench.plan_action(None, state, False)[0] == "start"
    assert bench.plan_action(entry, state, False)[0] == "start"  # no summary.json
    for status, action, retry in (("completed", "reuse", "reuse"), ("running", "resume", "resume"),
                                  ("interrupted", "resume", "resume"), ("failed", "reuse", "start"),
                                  ("budget_exhausted", "reuse", "start")):
        (run / "summary.json").write_text(json.dumps({"status": status}))
        assert bench.plan_action(entry, state, False)[0] == action, status
        assert bench.plan_action(entry, state, True)[0] == retry, status

    work = tmp_path / "dry"
    assert bench.main(["--config", str(toy), "--mode", "textgrad", "--seed", "1", "--seed", "2", "--work", str(work),
                       "--results", str(tmp_path / "R.md"), "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert out.count(": start") == 2 and "--set train.mode=textgrad --set train.seed=2" in out
    assert not work.exists() and not (tmp_path / "R.md").exists()


def test_write_section_appends_then_replaces_in_place(tmp_path):
    results = tmp_path / "R.md"
    bench.write_section(results, "a", "<!-- bench:a -->\none\n<!-- /bench:a -->\n")
    results.write_text(results.read_text() + "\ntail text\n")
    bench.write_section(results, "b", "<!-- bench:b -->\nbee\n<!-- /bench:b -->\n")
    bench.write_section(results, "a", "<!-- bench:a -->\ntwo\n<!-- /bench:a -->\n")
    text = results.read_text()
    assert "one" not in text and text.index("two") < text.index("tail text") < text.index("bee")
    assert text.count("<!-- bench:a -->") == 1 and text.count("<!-- bench:b -->") == 1


def test_paired_bootstrap_separates_a_clear_improvement_from_noise():
    rng = random.Random(1)
    improved = [1.0] * 30 + [0.0] * 65 + [-1.0] * 5  # mean +0.25
    mean, low, high = bench.paired_bootstrap(improved, 4000, seed=0)
    assert mean == pytest.approx(0.25) and 0 < low < mean < high
    noise = [rng.choice((-1.0, 0.0, 1.0)) for _ in range(100)]
    mean, low, high = bench.paired_bootstrap(noise, 4000, seed=0)
    assert low < 0 < high and low <= mean <= high
    assert bench.paired_bootstrap(noise, 4000, seed=0) == (mean, low, high)  # seeded: reproducible
    assert bench.paired_bootstrap([], 4000) is None
    assert bench.paired_bootstrap([0.0] * 10, 1000) == (0.0, 0.0, 0.0)
    # pairing: only examples completed in both count
    initial = {"a": {"id": "a", "score": 0.0, "error": None}, "b": {"id": "b", "score": 1.0, "error": None},
               "c": {"id": "c", "score": None, "error": "timeout"}}
    best = {"a": {"id": "a", "score": 1.0, "error": None}, "b": {"id": "b", "score": None, "error": "rate limit"},
            "c": {"id": "c", "score": 1.0, "error": None}}
    assert bench.paired_diffs_by_id(initial, best) == {"a": 1.0}


def test_variants_are_separate_runs_and_rows_and_an_empty_variant_reuses_the_plain_run(tmp_path, toy, commands):
    common = ("--mode", "none", "--set", "train.batch_size=4")
    assert run_bench(tmp_path, toy, *common) == 0  # a plain run first
    plain = state_of(tmp_path)["runs"]
    assert list(plain) == [bench.run_key(toy, "none", 0, ["train.batch_size=4"])]

    commands.clear()
    assert run_bench(tmp_path, toy, *common, "--variant", "plain=",
                     "--variant", "short=train.max_steps=1, train.max_proposals=2") == 0
    trains = [c for c in commands if c[0] == "train"]
    assert len(trains) == 1  # "plain" reused the plain run; "short" trained once, its settings after --set
    assert trains[0][-6:] == ["--set", "train.batch_size=4", "--set", "train.max_steps=1",
                              "--set", "train.max_proposals=2"]
    evals = [c for c in commands if c[0] == "eval"]
    assert len(evals) == 1 and evals[0][-4:] == ["--set", "train.max_steps=1", "--set", "train.max_proposals=2"]
    runs = state_of(tmp_path)["runs"]
    short_key = bench.run_key(toy, "none", 0, ["train.batch_size=4", "train.max_steps=1", "train.max_proposals=2"])
    assert set(runs) == {*plain, short_key}
    assert {k: runs[k] for k in plain} == plain  # the plain entry is reused as it is
    assert runs[short_key]["run_dir"] != next(iter(plain.values()))["run_dir"]

    text = section(tmp_path / "RESULTS.md")
    assert "| config | variant | mode | seed | val initial |" in text
    assert "--variant plain= --variant 'short=train.max_steps=1, train.max_proposals=2'" in text
    rows = table_rows(text)  # keyed by the second cell: the variant
    assert list(rows) == ["plain", "short"] and all(r[2] == "none" and r[-1] == "completed" for r in rows.values())
    assert "- variant `plain`: no settings beyond the common `--set` options" in text
    assert "- variant `short`: `--set train.max_steps=1` `--set train.max_proposals=2` after the common" in text

    commands.clear()  # a rerun reuses both, and without --variant the section is the plain one again
    assert run_bench(tmp_path, toy, *common) == 0
    assert commands == [] and "| config | mode | seed | val initial |" in section(tmp_path / "RESULTS.md")


@pytest.mark.parametrize("variants, message", [
    (["nosettings"], "expected NAME=K=V"),
    (["=train.max_steps=1"], "no name"),
    (["a=", "a=train.max_steps=1"], "given twice"),
    (["a=train.max_steps"], "is not K=V"),
    (["a=train.max_steps=1,,train.max_proposals=2"], "is not K=V"),
    (["a=train.mode=none"], "train.mode may not be set"),
    (["a=train.max_steps=1,train.seed=3"], "train.seed may not be set"),
    (["a=", "b="], "the same settings as variant 'a'"),
    (["a|b="], "may not contain '|'"),
])
def test_a_bad_variant_is_a_usage_error(tmp_path, toy, capsys, variants, message):
    with pytest.raises(SystemExit) as exit_info:
        bench.main(["--config", str(toy), "--work", str(tmp_path / "work"), "--dry-run",
                    *[a for v in variants for a in ("--variant", v)]])
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "work").exists()


def test_dry_run_shows_the_variants(tmp_path, toy, capsys):
    assert bench.main(["--config", str(toy), "--work", str(tmp_path / "work"), "--results", str(tmp_path / "R.md"),
                       "--set", "train.batch_size=4", "--variant", "v one=", "--variant", "v2=train.max_steps=1=x",
                       "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "1 config(s) x 2 variant(s) x 1 mode(s) x 1 seed(s)" in out
    assert "variant v2: --set train.max_steps=1=x after the common --set options" in out
    assert out.count(": start") == 2 and "variant='v one' mode=autodiff" in out and "variant=v2 mode=autodiff" in out
    assert "--set train.batch_size=4 --set train.max_steps=1=x" in out  # a value may contain '='
    assert not (tmp_path / "work").exists()


def test_the_seed_summary_groups_by_variant():
    def fact(variant, seed, delta):
        return {"entry": {"config": "x/toy.yaml", "mode": "autodiff", "seed": seed, "status": "completed"},
                "summary": {}, "split": "test", "initial": 0.5, "best": 0.5 + delta, "delta": (delta, delta - 0.1, delta + 0.1),
                "n_paired": 10, "n": 10, "variant": variant}

    facts = [fact(v, s, d) for v, ds in (("A", (0.1, 0.3)), ("B", (-0.2, 0.0))) for s, d in enumerate(ds)]
    text = bench.render_section("s", "cmd", facts, [], bootstrap=1000)
    assert "| config | variant | mode | seeds | Δ test mean ± sd | pooled Δ [95% CI] | win? |" in text
    assert "| toy | A | autodiff | 2 | +0.200 ± 0.141 | – | – |" in text
    assert "| toy | B | autodiff | 2 | -0.100 ± 0.141 | – | – |" in text
    plain = bench.render_section("s", "cmd", [dict(f, variant=None) for f in facts], [], bootstrap=1000)
    assert "| config | mode | seeds | Δ test mean ± sd |" in plain and "| toy | autodiff | 4 | +0.050 ± 0.208 |" in plain
    assert "| config | mode | seed | val initial |" in plain and "variant" not in plain


def test_the_pooled_interval_pairs_examples_across_seeds():
    # Each example's seeds are averaged before resampling, and only examples scored in every seed count.
    assert bench.pooled_diffs([{"a": 1.0, "b": 0.0, "c": 1.0}, {"a": 0.0, "b": -1.0}]) == [0.5, -0.5]
    assert bench.pooled_diffs([]) == []

    def fact(seed, diffs):
        mean = sum(diffs.values()) / len(diffs)
        return {"entry": {"config": "x/toy.yaml", "mode": "autodiff", "seed": seed, "status": "completed"},
                "summary": {}, "split": "test", "initial": 0.5, "best": 0.5 + mean, "n_paired": len(diffs),
                "n": len(diffs), "variant": None, "diffs": diffs,
                "delta": bench.paired_bootstrap(list(diffs.values()), 1000)}

    ids = [f"q{i:02d}" for i in range(40)]
    # every seed gains on the same 12 of 40 questions and loses none: each seed alone is a win, so is the pool
    steady = [fact(s, {i: (1.0 if n < 12 else 0.0) for n, i in enumerate(ids)}) for s in range(3)]
    row = next(ln for ln in bench.render_section("s", "cmd", steady, [], 2000).splitlines()
               if ln.startswith("| toy | autodiff | 3 |"))
    assert row.endswith("| **yes** |") and "+0.300 [" in row
    # seeds that move different questions in opposite directions: the per-seed means vary, the pool is no win
    mixed = [fact(0, {i: (1.0 if n < 8 else 0.0) for n, i in enumerate(ids)}),
             fact(1, {i: (-1.0 if 8 <= n < 16 else 0.0) for n, i in enumerate(ids)}),
             fact(2, {i: (1.0 if 20 <= n < 24 else 0.0) for n, i in enumerate(ids)})]
    row = next(ln for ln in bench.render_section("s", "cmd", mixed, [], 2000).splitlines()
               if ln.startswith("| toy | autodiff | 3 |"))
    assert row.endswith("| no |") and "+0.033 [" in row


def test_teacher_calls_get_a_column_only_when_a_run_bootstrapped_demos():
    def fact(variant, usage):
        return {"entry": {"config": "x/toy.yaml", "mode": "autodiff", "seed": 0, "status": "completed"},
                "summary": {"usage": usage}, "split": "test", "initial": 0.5, "best": 0.5, "delta": None,
                "n_paired": 0, "n": 10, "variant": variant}

    plain = {"task": {"calls": 30, "cached_calls": 2, "prompt_tokens": 900, "completion_tokens": 100},
             "backward": {"calls": 3}, "optimizer": {"calls": 4}}
    demos = {"task": {"calls": 20}, "teacher": {"calls": 7, "prompt_tokens": 1500, "completion_tokens": 500}}
    text = bench.render_section("s", "cmd", [fact("text", plain), fact("demos", demos)], [])
    assert "| calls task/backward/optimizer/teacher | tokens task/backward/optimizer/teacher |" in text
    assert "| 30/3/4/0 (+2 cached) | 1.0k/0/0/0 |" in text and "| 20/0/0/7 | 0/0/0/2.0k |" in text
    text = bench.render_section("s", "cmd", [fact(None, dict(plain, teacher={"calls": 0}))], [])
    assert "| calls task/backward/optimizer | tokens task/backward/optimizer |" in text and "teacher" not in text
