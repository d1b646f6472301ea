"""benchmarks/perf/run.py at its --quick sizes, in process: every measurement is produced and the call
counts are exact. No timing is asserted here: timing targets belong to the benchmark's sections."""
from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

from autodiff_cli.llm import fake

ROOT = Path(__file__).resolve().parent.parent


def load_perf():
    name = "autodiff_perf_bench"
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, ROOT / "benchmarks" / "perf" / "run.py")
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module  # dataclasses look their module up while the file executes
        spec.loader.exec_module(module)
    return sys.modules[name]


@pytest.fixture(autouse=True)
def _fresh():
    fake.reset_fake_state()
    yield
    fake.reset_fake_state()


@pytest.fixture(scope="module")
def measured(tmp_path_factory):
    perf = load_perf()
    return perf.run_benchmarks(perf.QUICK, tmp_path_factory.mktemp("perf"))


def test_concurrency_counts_every_call_and_stays_under_the_limit(measured):
    perf = load_perf()
    r = measured["concurrency"]["result"]
    q = perf.QUICK
    assert r["examples"] == q.conc_examples
    assert r["calls"] == r["expected_calls"] == 2 * q.conc_examples == r["server_requests"]
    assert r["errors"] == 0 and r["score"] == 1.0
    assert 1 <= r["server_max_in_flight"] <= q.conc_concurrency
    assert r["critical_path_s"] == pytest.approx(2 * q.conc_latency)
    assert r["throughput_bound_s"] == pytest.approx(r["calls"] * q.conc_latency / q.conc_concurrency)
    assert r["bound_s"] == max(r["critical_path_s"], r["throughput_bound_s"])
    assert r["ratio"] == pytest.approx(r["wall_s"] / r["bound_s"])
    assert r["cpu_per_call_ms"] > 0
    p = r["profile"]
    assert p["calls"] == 2 * q.profile_examples
    assert sum(p["groups"].values()) == pytest.approx(1.0)
    assert "litellm" in p["groups"] and "autodiff (engine, client, evaluate)" in p["groups"]
    assert 0 < p["litellm_share"] <= 1


def test_overhead_paths_make_exactly_the_calls_of_the_pipeline(measured):
    perf = load_perf()
    r = measured["overhead"]["result"]
    q = perf.QUICK
    stub = r["stub"]
    assert stub["examples"] == q.overhead_examples
    assert stub["model_calls"] == 2 * q.overhead_examples  # two llm nodes per example
    assert stub["invocations"] == 3 * q.overhead_examples  # ... and one function node
    assert stub["errors"] == 0 and stub["score"] == 1.0
    for path in ("litellm_fake_provider", "litellm_http"):
        assert r[path]["model_calls"] == 2 * q.litellm_examples and r[path]["errors"] == 0
        assert r[path]["per_call_ms"] > 0


def test_warm_cache_rerun_of_a_training_run_makes_no_call(measured):
    r = measured["cache"]["result"]
    cold, warm = r["cold"], r["warm"]
    assert cold["status"] == warm["status"] == "completed"
    assert cold["calls"] > 0 and cold["calls"] == cold["server_requests"]
    assert cold["calls_by_role"]["backward"] > 0 and cold["calls_by_role"]["optimizer"] > 0
    assert warm["calls"] == 0 and warm["server_requests"] == 0
    # every look-up of the cold run (calls made + answered from its own cache) is a cache hit now
    assert warm["cached_calls"] == cold["calls"] + cold["cached_calls"]
    assert r["same_prompts"] and warm["steps"] == cold["steps"]


def test_memory_child_reports_a_peak(measured):
    perf = load_perf()
    r = measured["memory"]["result"]
    n = perf.QUICK.memory_examples
    assert (r["examples"], r["model_calls"], r["traces_kept"], r["completed"]) == (n, 2 * n, n, n)
    assert r["peak_rss_mb"] >= r["rss_before_eval_mb"] > 0


def test_sections_are_written_between_markers_and_replaced(measured, tmp_path):
    perf = load_perf()
    sections = perf.render(measured, "python benchmarks/perf/run.py --quick --write", quick=True)
    assert set(sections) == set(perf.BENCHES)
    results = tmp_path / "RESULTS.md"
    results.write_text("# Measured results\n\nkept as it is\n")
    runner = perf._bench_runner()
    for _ in range(2):
        for bench, text in sections.items():
            name = perf.SECTION_NAMES[bench]
            assert text.startswith(f"<!-- bench:{name} -->") and text.rstrip().endswith(f"<!-- /bench:{name} -->")
            assert "QUICK SMOKE SIZES" in text and "Machine:" in text and "Date:" in text
            assert "python benchmarks/perf/run.py --quick --write" in text
            runner.write_section(results, name, text)
    written = results.read_text()
    assert written.startswith("# Measured results\n\nkept as it is\n")
    for name in perf.SECTION_NAMES.values():
        assert written.count(f"<!-- bench:{name} -->") == 1


def test_command_line_writes_the_chosen_sections(tmp_path, capsys):
    perf = load_perf()
    results = tmp_path / "RESULTS.md"
    assert perf.main(["--quick", "--only", "memory", "--write", "--results", str(results),
                      "--work", str(tmp_path / "work")]) == 0
    text = results.read_text()
    assert "<!-- bench:Performance: memory of a 10,000-example evaluation (issue 6) -->" in text
    assert "concurrency efficiency" not in text
    assert "--only memory" in capsys.readouterr().out
