"""benchmarks/perf/run.py at its --quick sizes, in process: every measurement is produced and the call
counts are exact. No timing is asserted here: timing targets belong to the benchmark's sections."""
from __future__ import annotations

import importlib.util
import json
import py_compile
import sys
import urllib.request
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

from autodiff_cli.llm import fake

ROOT = Path(__file__).resolve().parents[2]


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
    # figure 2 (adalflow) needs AdalFlow's own venv: never created by the unit tests (see the tests below)
    return perf.run_benchmarks(perf.QUICK, tmp_path_factory.mktemp("perf"),
                               only=[b for b in perf.BENCHES if b != "adalflow"])


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
    assert set(sections) == set(perf.BENCHES) - {"adalflow"}
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
    for bench in sections:
        assert written.count(f"<!-- bench:{perf.SECTION_NAMES[bench]} -->") == 1


def test_command_line_writes_the_chosen_sections(tmp_path, capsys):
    perf = load_perf()
    results = tmp_path / "RESULTS.md"
    assert perf.main(["--quick", "--only", "memory", "--write", "--results", str(results),
                      "--work", str(tmp_path / "work")]) == 0
    text = results.read_text()
    assert "<!-- bench:Performance: memory of a 10,000-example evaluation (issue 6) -->" in text
    assert "concurrency efficiency" not in text
    assert "--only memory" in capsys.readouterr().out


# ---------------------------------------------------------------- figure 2: a training step vs AdalFlow
# Only what runs without AdalFlow's venv: the fake model, the server, the role classifier, the autodiff
# half at quick sizes and the section. benchmarks/perf/adalflow_step.py runs inside that venv; here it
# is only compiled.


@pytest.fixture(scope="module")
def side():
    return load_perf().adalflow_side()


def _post(url: str, body: dict) -> dict:
    req = urllib.request.Request(url, data=json.dumps(body).encode(), method="POST",
                                 headers={"Content-Type": "application/json", "Authorization": "Bearer x"})
    with urllib.request.urlopen(req, timeout=10) as r:
        return json.loads(r.read())


ADALFLOW_OPTIMIZER = """<START_OF_SYSTEM_PROMPT>
You are an excellent prompt engineer tasked with instruction and demonstration tuning a compound LLM system.
<END_OF_SYSTEM_PROMPT>
<START_OF_USER_MESSAGE>
You are 3 steps since your last improvement.
<START_OF_VARIABLE_AND_PEERS_INFO>
<START_OF_VARIABLE_DESC>
<NAME> tally_instruction </NAME>
<VARIABLE>[tally] Add up the listed objects that belong to the asked category.</VARIABLE>
<END_OF_VARIABLE_DESC>
<END_OF_VARIABLE_AND_PEERS_INFO>
<START_OF_CURRENT_ITERATION>
1. method: ADD new elements (round 3, rev 1)
<END_OF_CURRENT_ITERATION>
<END_OF_USER_MESSAGE>"""


def test_the_role_classifier_knows_both_tools_meta_prompts(side):
    prompts = ROOT / "autodiff_cli" / "prompts"
    for name, role in (("backward_llm.system.j2", "backward"), ("backward_route.system.j2", "backward"),
                       ("loss_llm.system.j2", "backward"), ("optimizer.system.j2", "optimizer")):
        assert side.classify((prompts / name).read_text()) == ("autodiff", role), name
    assert side.classify(ADALFLOW_OPTIMIZER) == ("adalflow", "optimizer")
    assert side.classify("<START_OF_SYSTEM_PROMPT>\nYou MUST determining the root cause of a system error.") == \
        ("adalflow", "backward")
    assert side.classify("[count] Count the objects.\nI have 1 apple and 2 drums. How many fruits do I have?") == \
        (None, "task")
    assert side.classify("hello") == (None, "unknown")


def test_the_fake_model_makes_every_step_alike(side):
    """Initial prompts fail 2/3 of train; rev 1 fixes train but only ties validation; rev 2 fails all of train."""
    train = side.make_examples("train", 30, list(side.TRAIN_CATEGORIES), 0)
    val = side.val_examples(24, 0, "tie")
    for row in train + val:
        assert side.parse_question(row["question"]) == (row["category"], int(row["answer"]))

    def score(rows, rev):
        return sum(side.answers_right(rev, r["category"]) for r in rows) / len(rows)

    assert score(train, 0) == pytest.approx(1 / 3)
    assert score(train, 1) == 1.0 and score(train, 2) == 0.0
    assert score(val, 0) == score(val, 1) == pytest.approx(2 / 3)  # rev 1 ties: rejected
    assert score(val, 2) == pytest.approx(1 / 3)
    # interleaved in file order, no shuffle: every third example is the category rev 1 breaks, the last one too
    assert [r["category"] for r in val[:3]] * 8 == [r["category"] for r in val]
    assert [i for i, r in enumerate(val) if not side.answers_right(1, r["category"])] == list(range(2, 24, 3))
    assert [r["id"] for r in val] == sorted(r["id"] for r in val)


def _stop_after(side, rows, best):
    """How many examples (in file order) rev 1 takes to cross autodiff's bound (`stop_unless_above`)."""
    n, score = len(rows), 0
    for i, r in enumerate(rows, 1):
        score += side.answers_right(1, r["category"])
        if (score + n - i) / n <= best:
            return i
    return None


def test_the_worse_scenario_differs_only_in_the_validation_mix(side):
    """Same training file and fake model; rev 1 still beats the subset but is clearly worse on validation,
    and the category it breaks (half the file) is spread evenly, so the bound is crossed halfway through."""
    tie, worse = side.val_examples(24, 0, "tie"), side.val_examples(24, 0, "worse")
    assert [r["category"] for r in worse[:4]] == ["fruits", "musical instruments", "vegetables", "musical instruments"]
    assert [r["category"] for r in worse[:4]] * 6 == [r["category"] for r in worse]
    broken = [i for i, r in enumerate(worse) if not side.answers_right(1, r["category"])]
    assert broken == list(range(1, 24, 2))  # 12 of 24: every other example from the second on

    def score(rows, rev):
        return sum(side.answers_right(rev, r["category"]) for r in rows) / len(rows)

    assert score(worse, 0) == pytest.approx(3 / 4) and score(worse, 1) == pytest.approx(1 / 2)
    assert score(worse, 2) == pytest.approx(1 / 2)
    # autodiff's bound: after the sixth wrong answer (example 12 of 24); a tie only at the last example
    assert _stop_after(side, worse, score(worse, 0)) == 12
    assert _stop_after(side, tie, score(tie, 0)) == 24
    # the training side is the same in both scenarios
    for scenario in ("tie", "worse"):
        assert side.val_questions(24, 0, scenario) == {side.QUESTION_RE.search(r["question"]).group(0)
                                                       for r in side.val_examples(24, 0, scenario)}


def test_write_data_keeps_the_training_file_and_changes_only_validation(side, tmp_path):
    files = {sc: side.write_data(tmp_path / sc, 24, 24, 0, sc) for sc in side.SCENARIOS}
    assert files["tie"][0].read_text() == files["worse"][0].read_text()
    assert files["tie"][1].read_text() != files["worse"][1].read_text()
    rows = [json.loads(line) for line in files["worse"][1].read_text().splitlines()]
    assert [r["id"] for r in rows] == [f"val{i:03d}" for i in range(24)]  # file order = id order


def test_the_server_answers_each_tool_in_its_own_format(side):
    q = "I have 2 carrots, 1 apple, 3 flutes and 1 onion. How many vegetables do I have?"
    with side.BenchServer(latency=0.0).in_thread() as srv:
        # AdalFlow's OpenAIClient: the Responses API, the whole rendered template as `input`
        out = _post(srv.url + "/v1/responses", {"model": "fake", "input": ADALFLOW_OPTIMIZER})
        text = out["output"][0]["content"][0]["text"]
        root = ET.fromstring(text)  # what AdalFlow's CustomizedXMLParser does
        new = root.find("proposed_variable").text
        assert new.startswith("[tally] Add up the listed objects") and new.endswith("(round 3, rev 2)")
        assert out["usage"]["input_tokens"] > 0 and out["object"] == "response"
        out = _post(srv.url + "/v1/responses", {"model": "fake", "input": (
            "You MUST determining the root cause of a system error.\n<VARIABLES>\nLength of the list: 2\n"
            "</VARIABLES>\nYour output will be a list of strings with the SAME LENGTH as the <VARIABLES> list")})
        assert len(json.loads(out["output"][0]["content"][0]["text"])) == 2
        task = {"model": "fake", "input": f"<START_OF_SYSTEM_PROMPT>\n[count] Count.\n<END_OF_SYSTEM_PROMPT>\n{q}"}
        # 3 vegetables; the initial prompt miscounts vegetables
        assert _post(srv.url + "/v1/responses", task)["output"][0]["content"][0]["text"].endswith("Answer: 4")
        # autodiff through litellm: chat completions, its JSON formats
        chat = lambda system, user: _post(srv.url + "/v1/chat/completions", {
            "model": "fake", "messages": [{"role": "system", "content": system}, {"role": "user", "content": user}]}
        )["choices"][0]["message"]["content"]
        reply = json.loads(chat("You are the backward engine of a prompt optimizer for LLM pipelines.",
                                 '## Predecessors (the keys of your JSON reply)\n- "param: tally_instruction": x\n'
                                 '- "call:listing#0": y\n'))
        assert set(reply) == {"diagnosis", "param: tally_instruction", "call:listing#0"}
        reply = json.loads(chat("You are the optimizer of an LLM pipeline.", "Current value:\n<VALUE>\n"
                                 "[count] Count.\n</VALUE>\n# Progress\nSteps since the last improvement: 0."))
        assert reply["new_value"].startswith("[count] Count. Check each object") and \
            reply["new_value"].endswith("(round 0, rev 1)")
        # rev 1 counts vegetables right, rev 2 does not; upstream outputs carry the tag
        assert chat(reply["new_value"], q).endswith("Answer: 3")
        assert chat("[count] Count. (round 0, rev 2)", q).endswith("Answer: 4")
        assert chat("[listing] List. (round 0, rev 1)", q).endswith("(round 0, rev 1)")
        stats = srv.stats()
        assert stats["by_role"] == {"optimizer": 2, "backward": 2, "task": 4}
        assert [r.api for r in srv.log()] == ["responses"] * 3 + ["chat"] * 5


def test_step_accounting_counts_calls_and_busy_time_per_window(side):
    R = side.Request
    log = [R(0.0, 1.0, "task", None, "chat"), R(0.5, 1.5, "task", None, "chat"), R(2.0, 3.0, "backward", "x", "chat"),
           R(10.0, 11.0, "task", None, "chat")]
    (st,) = side.step_accounting(log, [{"step": 1, "start": 0.0, "end": 4.0}])
    assert st["calls"] == {"task": 2, "backward": 1, "optimizer": 0}
    assert st["busy_s"]["task"] == pytest.approx(1.5) and st["busy_s"]["backward"] == pytest.approx(1.0)
    assert st["idle_s"] == pytest.approx(1.5) and st["max_in_flight"]["task"] == 2


def test_the_server_logs_a_request_the_client_gives_up_on_as_cancelled(side):
    import socket
    import time

    body = json.dumps({"model": "fake", "messages": [{"role": "user", "content": (
        "[count] Count.\nI have 1 apple and 2 drums. How many fruits do I have?")}]}).encode()
    head = (f"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(body)}\r\n\r\n").encode()
    with side.BenchServer(latency=1.0).in_thread() as srv:
        srv.val_questions = {"I have 1 apple and 2 drums. How many fruits do I have?"}
        sock = socket.create_connection(("127.0.0.1", srv.port))
        sock.sendall(head + body)
        time.sleep(0.2)
        sock.close()  # what an HTTP client does when its caller cancels the call
        for _ in range(100):
            if srv.log() and srv.log()[0].cancelled:
                break
            time.sleep(0.02)
        out = _post(srv.url + "/v1/chat/completions", json.loads(body))  # answered after the full latency
        assert out["choices"][0]["message"]["content"].endswith("Answer: 1")
        cancelled, answered = srv.log()
    assert cancelled.cancelled and not answered.cancelled
    assert cancelled.role == answered.role == "task" and cancelled.validation and cancelled.node == "count"
    assert 0.1 < cancelled.end - cancelled.start < 0.9  # its busy time ends when the client went away
    assert answered.end - answered.start == pytest.approx(1.0)
    (st,) = side.step_accounting([cancelled, answered], [{"step": 1, "start": cancelled.start - 1, "end": answered.end + 1}])
    assert st["calls"]["task"] == 2 and st["cancelled"]["task"] == 1  # received: counted; and counted apart
    assert st["val_calls"] == 2 and st["val_cancelled"] == 1


def test_the_adalflow_script_compiles(tmp_path):
    py_compile.compile(str(ROOT / "benchmarks" / "perf" / "adalflow_step.py"), cfile=str(tmp_path / "x.pyc"),
                       doraise=True)


def test_autodiff_side_at_quick_sizes_and_its_section(side, tmp_path):
    perf = load_perf()
    s = perf.af_settings(perf.QUICK)
    r = side.compare(s, tmp_path, tools=("autodiff",))
    assert r["unknown_requests"] == 0 and r["scenarios"] == ["tie", "worse"]
    for scenario in ("tie", "worse"):
        for pipeline, params in (("single", 1), ("chain", 3)):
            run = r["runs"][scenario][pipeline]["autodiff"]
            assert run["status"] == "completed" and len(run["steps"]) == s.steps and run["scenario"] == scenario
            for st in run["steps"]:
                # proposal 1 passes the subset and is rejected on validation, proposal 2 fails the subset
                first, second = st["proposals"]
                assert first["subset"] == 1.0 and not first["accepted"] and "validation" in first["reason"]
                assert second["subset"] == 0.0 and "subset score" in second["reason"]
                if scenario == "worse":  # 5/6 is the best; rev 1's second example is wrong: stop at once
                    assert first["stopped_early"] and "stopped early" in first["reason"]
                    # calls sent before the stop may be cancelled, but fewer than all of them are answered
                    assert st["val_calls"] - st["val_cancelled"] < s.val * params
                else:
                    assert st["val_calls"] - st["val_cancelled"] <= s.val * params
                assert st["calls"]["optimizer"] == st["client_calls"]["optimizer"] == 2 * params
                assert st["calls"]["backward"] == st["client_calls"]["backward"] >= 0
                # a call the client cancelled after sending it is counted on both sides; one cancelled
                # between litellm's pre-call hook and the socket write only on the client's
                assert st["cancelled"]["backward"] == st["cancelled"]["optimizer"] == 0
                cancelled = st["cancelled"]["task"]
                assert st["calls"]["task"] - cancelled <= st["client_calls"]["task"] <= st["calls"]["task"] + cancelled
                assert st["client_calls"]["task"] > 0
                assert st["val_cancelled"] <= st["cancelled"]["task"]
                assert 0 < st["busy_s"]["task"] <= st["wall_s"]
                assert st["wall_s"] >= st["own_wall_s"] - 0.05 and st["own_wall_s"] > 0  # window = step + its writes
                if pipeline == "chain":
                    assert 0 < st["val_first_before_last"] <= s.val
                else:
                    assert st["val_first_before_last"] is None
            assert sum(st["calls"]["backward"] + st["cached_calls"] for st in run["steps"]) > 0
    section = perf.render_adalflow(r, "python benchmarks/perf/run.py --quick --only adalflow", perf._meta(), True)
    name = perf.SECTION_NAMES["adalflow"]
    assert section.startswith(f"<!-- bench:{name} -->") and section.rstrip().endswith(f"<!-- /bench:{name} -->")
    for scenario in ("tie", "worse"):
        assert f"| {scenario} | single | autodiff | 2 |" in section and f"| {scenario} | chain | autodiff | 2 |" in section
    assert "**Scenario `tie`.**" in section and "**Scenario `worse`.**" in section


def test_one_scenario_alone(side, tmp_path):
    perf = load_perf()
    assert perf.parse_args(["--only", "adalflow"]).adalflow_scenario == "both"
    assert perf.parse_args(["--adalflow-scenario", "worse"]).adalflow_scenario == "worse"
    with pytest.raises(SystemExit):
        perf.parse_args(["--adalflow-scenario", "best"])
    r = side.compare(perf.af_settings(perf.QUICK), tmp_path, tools=("autodiff",), pipelines=("single",),
                     scenarios=perf.AF_SCENARIOS["worse"])
    assert list(r["runs"]) == ["worse"]
    section = perf.render_adalflow(r, "python benchmarks/perf/run.py --quick --only adalflow", perf._meta(), True)
    assert "| worse | single | autodiff | 2 |" in section and "| tie |" not in section
