"""The report's plots (app/plot.py): score.png, proposals.png and usage.png drawn with matplotlib
(Figure + Agg canvas, no pyplot), from hand-built StepRecords and run directories (no model).

Checks the classification of proposals, the data behind each plot, the PNGs' sizes, that different
data gives different pixels, that the same data gives the same bytes, and the reports of runs with
no step, only skipped steps, or no matplotlib."""
from __future__ import annotations

import io
import os
import subprocess
import sys

import pytest
from PIL import Image

from autodiff_cli.app import plot
from autodiff_cli.app.plot import (
    ACCEPTED,
    CATEGORIES,
    PLOTS,
    REFUSED,
    REJECTED_SUBSET,
    REJECTED_VALIDATION,
    classify_proposal,
    curve_from_metrics,
    proposal_counts,
    run_plots,
    usage_rows,
)
from autodiff_cli.app.report import write_report
from autodiff_cli.io.records import ProposalRecord, StepRecord
from autodiff_cli.io.rundir import RunDir

SIZES = {"score.png": (800, 450), "proposals.png": (800, 360), "usage.png": (800, 360)}
GREEN, ORANGE, RED = (0x2C, 0xA0, 0x2C), (0xFF, 0x7F, 0x0E), (0xD6, 0x27, 0x28)


def P(params=None, subset=None, val=None, accepted=False, reason="", **extra) -> ProposalRecord:
    return ProposalRecord({"instruction": "v"} if params is None else params, subset, val, accepted, reason,
                          extra=extra)


# One proposal of each kind the trainer and the acceptance policies write, with the step's subset
# score 0.5 as the bar: (proposal, expected category).
CASES = {
    "two_stage accepted": (P(subset=0.75, val=0.8, accepted=True, reason="beats the best validation score"), ACCEPTED),
    "racing winner": (P(subset=0.75, val=0.8, accepted=True, reason="beats the best validation score (won the race)"),
                      ACCEPTED),
    "take_all (textgrad)": (P(val=0.3, accepted=True, reason="taken without validation (textgrad)"), ACCEPTED),
    "two_stage reject at subset": (P(subset=0.25, reason="subset score 0.250 does not beat 0.500"), REJECTED_SUBSET),
    "subset with call errors": (P(subset=None, reason="subset score - does not beat 0.500"), REJECTED_SUBSET),
    "subset tie (no reason)": (P(subset=0.5), REJECTED_SUBSET),
    "reject at validation": (P(subset=0.75, val=0.55, reason="validation 0.550 does not beat best 0.600"),
                             REJECTED_VALIDATION),
    "validation stopped early": (P(subset=0.75, reason="validation stopped early: cannot beat best 0.600"),
                                 REJECTED_VALIDATION),
    "validation call errors": (P(subset=0.75, reason="validation has 2 examples with call errors"),
                               REJECTED_VALIDATION),
    "racing drop": (P(subset=0.75, reason="dropped from the race after 2/12 validation examples: cannot beat best "
                                          "0.600"), REJECTED_VALIDATION),
    "racing loser": (P(subset=0.75, val=0.7, reason="validation 0.700: another contender scored 0.800"),
                     REJECTED_VALIDATION),
    "joint lineage": (P(subset=0.75, reason="text lineage: validation stopped early: cannot beat best 0.600"),
                      REJECTED_VALIDATION),
    "grid race drop (no subset stage)": (P(reason="grid: dropped from the race after 1/6 validation examples: "
                                                  "cannot beat best 0.600"), REJECTED_VALIDATION),
    "perfect subset, stopped early": (P(subset=1.0, reason="validation stopped early: cannot beat best 1.000"),
                                      REJECTED_VALIDATION),
    "refused by the optimizer": (P(reason='refused: it copies 8 words of example 3 ("...")', refused=True), REFUSED),
    "no candidate": (ProposalRecord.nothing("the reply had no proposal"), REFUSED),
}


@pytest.mark.parametrize("case", list(CASES))
def test_classify_proposal(case):
    proposal, expected = CASES[case]
    bar = 1.0 if case.startswith("perfect") else 0.5
    assert classify_proposal(proposal, bar) == expected
    # the same after a trip through metrics.jsonl (`refused` is flat in the row)
    assert classify_proposal(ProposalRecord.from_row(proposal.to_row()), bar) == expected


def step_row(step: int, proposals: list[ProposalRecord], best: float | None, subset: float | None = 0.5,
             skipped: str | None = None) -> dict:
    return StepRecord(step=step, subset_score=subset, proposals=proposals, best_val=best, skipped=skipped,
                      val_score=next((p.val_score for p in proposals if p.accepted), None)).to_row()


ROWS = [
    step_row(1, [CASES["two_stage reject at subset"][0], P(subset=0.75, val=0.6, accepted=True)], 0.6),
    step_row(2, [], 0.6, subset=None, skipped="no failed example in the minibatch"),
    step_row(3, [CASES["reject at validation"][0], CASES["no candidate"][0], CASES["refused by the optimizer"][0]], 0.6),
    step_row(4, [CASES["racing drop"][0], P(subset=0.75, val=0.7, accepted=True)], 0.7),
]
USAGE = {
    "task": {"calls": 120, "cached_calls": 30, "errors": 1, "prompt_tokens": 54000, "completion_tokens": 3000,
             "cost_usd": 0.0123, "unsent": 0},
    "backward": {"calls": 10, "cached_calls": 0, "errors": 0, "prompt_tokens": 20000, "completion_tokens": 4000,
                 "cost_usd": 0.004, "unsent": 0},
    "optimizer": {"calls": 6, "cached_calls": 0, "errors": 0, "prompt_tokens": 9000, "completion_tokens": 2500,
                  "cost_usd": 0.002, "unsent": 0},
    "teacher": {"calls": 0, "cached_calls": 0, "errors": 0, "prompt_tokens": 0, "completion_tokens": 0,
                "cost_usd": 0.0, "unsent": 0},
}
SUMMARY = {"name": "toy", "status": "completed", "initial": {"val": 0.5, "test": 0.45},
           "best": {"step": 4, "val": 0.7, "test": 0.66}, "steps": 4,
           "proposals": {"tried": 6, "passed_subset": 4, "accepted": 2, "refused": 1}, "usage": USAGE}


def image(png: bytes) -> Image.Image:
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    im = Image.open(io.BytesIO(png))
    im.load()
    return im


def pixels(png: bytes) -> bytes:
    return image(png).convert("RGB").tobytes()


def colours(png: bytes) -> dict[tuple[int, int, int], int]:
    """{RGB colour: how many pixels have it}."""
    return {c: n for n, c in image(png).convert("RGB").getcolors(1 << 24)}


def count(png: bytes, rgb: tuple[int, int, int]) -> int:
    return colours(png).get(rgb, 0)


# ---------------------------------------------------------------- what the plots show


def test_proposal_counts_per_step_and_category():
    counts = proposal_counts(ROWS, steps=5)
    assert counts.last_step == 5 and counts.skipped == [2]
    assert counts.counts[1] == {ACCEPTED: 1, REJECTED_SUBSET: 1, REJECTED_VALIDATION: 0, REFUSED: 0}
    assert counts.counts[2] == dict.fromkeys(CATEGORIES, 0)
    assert counts.counts[3] == {ACCEPTED: 0, REJECTED_SUBSET: 0, REJECTED_VALIDATION: 1, REFUSED: 2}
    assert counts.counts[4] == {ACCEPTED: 1, REJECTED_SUBSET: 0, REJECTED_VALIDATION: 1, REFUSED: 0}
    assert counts.total() == 7 and counts.total(ACCEPTED) == 2
    assert proposal_counts([]).counts == {} and proposal_counts([], steps=0).last_step == 0


def test_curve_points_from_metrics():
    rows = [
        {"step": 1, "proposals": [{"params": {"p": "a"}, "accepted": False, "val_score": 0.2},
                                  {"params": {"p": "b"}, "accepted": True, "val_score": 0.5}], "best_val": 0.5},
        {"step": 2, "proposals": [{"params": {"p": "c"}, "accepted": False, "val_score": None}], "best_val": 0.5},
        {"step": 3, "proposals": [{"params": {"p": "d"}, "accepted": False, "val_score": 0.4}], "best_val": 0.5},
    ]
    pts = curve_from_metrics(0.25, rows, 0.5, steps=4, best_step=1, initial_test=0.3, best_test=0.6)
    assert pts.current == [(0, 0.25), (1, 0.5), (2, 0.5), (3, 0.5)]
    assert pts.best_so_far == [(0, 0.25), (1, 0.5), (2, 0.5), (3, 0.5)]
    assert pts.accepted == [(1, 0.5)] and pts.rejected == [(1, 0.2), (3, 0.4)]
    assert pts.best == 0.5 and pts.last_step == 4 and pts.best_step == 1
    assert (pts.initial_test, pts.best_test) == (0.3, 0.6)
    # take_all: the current prompts can fall below the best so far
    textgrad = curve_from_metrics(0.5, [{"step": 1, "proposals": [{"params": {"p": "a"}, "accepted": True,
                                                                   "val_score": 0.3}], "best_val": 0.5}])
    assert textgrad.current == [(0, 0.5), (1, 0.3)] and textgrad.best_so_far == [(0, 0.5), (1, 0.5)]
    assert curve_from_metrics(None, []).current == []


def test_usage_rows_known_roles_first_and_junk_tolerated():
    rows = usage_rows({"zeta": {"calls": 2}, **USAGE, "broken": "x"})
    assert [r.role for r in rows] == ["task", "backward", "optimizer", "teacher", "broken", "zeta"]
    task = rows[0]
    assert (task.calls, task.cached_calls, task.prompt_tokens, task.completion_tokens, task.cost_usd) == (
        120, 30, 54000, 3000, 0.0123)
    assert rows[4].calls == 0 and rows[5].calls == 2
    assert usage_rows(None) == [] and usage_rows([]) == []


# ---------------------------------------------------------------- the PNGs


@pytest.fixture(scope="module")
def sample():
    return run_plots(SUMMARY, ROWS, "toy")


def test_plots_are_pngs_of_a_fixed_size_and_small(sample):
    assert set(sample) == set(PLOTS) == set(SIZES)
    for name, png in sample.items():
        im = image(png)
        assert im.format == "PNG" and im.size == SIZES[name], name
        assert "Software" not in im.info and b"atplotlib" not in png  # no version text in the file
        assert len(png) < 100_000, name


def test_same_input_gives_identical_bytes(sample):
    assert run_plots(SUMMARY, ROWS, "toy") == sample
    # whatever the user's matplotlib settings, and they are left as they were
    import matplotlib

    with matplotlib.rc_context({"lines.linewidth": 9, "axes.facecolor": "black", "font.size": 20}):
        before = dict(matplotlib.rcParams)
        assert run_plots(SUMMARY, ROWS, "toy") == sample
        assert dict(matplotlib.rcParams) == before


def test_pixels_differ_when_the_data_differs(sample):
    # score: another accepted score
    rows = [*ROWS[:3], step_row(4, [P(subset=0.75, val=0.9, accepted=True)], 0.9)]
    other = run_plots({**SUMMARY, "best": {"step": 4, "val": 0.9, "test": 0.66}}, rows, "toy")
    for name in PLOTS:
        assert image(other[name]).size == SIZES[name]
    assert pixels(other["score.png"]) != pixels(sample["score.png"])
    assert pixels(other["proposals.png"]) != pixels(sample["proposals.png"])  # the racing drop is gone
    assert other["usage.png"] == sample["usage.png"]  # same usage: same image
    # proposals: more accepted bars, fewer rejected at subset (the legend's patches count in both)
    accepted_only = [step_row(s, [P(subset=0.75, val=0.5 + s / 10, accepted=True)], 0.5 + s / 10) for s in (1, 2, 3, 4)]
    more = plot.proposals_png(proposal_counts(accepted_only, 4), "toy: proposals by step")
    assert image(more).size == SIZES["proposals.png"]
    assert count(more, GREEN) > count(sample["proposals.png"], GREEN)
    assert count(more, ORANGE) < count(sample["proposals.png"], ORANGE)
    # usage: other numbers
    usage = {**USAGE, "optimizer": {**USAGE["optimizer"], "calls": 90, "completion_tokens": 40000}}
    assert plot.usage_png(usage_rows(USAGE), "toy: usage per role") == sample["usage.png"]
    assert pixels(plot.usage_png(usage_rows(usage), "toy: usage per role")) != pixels(sample["usage.png"])


def test_no_steps_and_all_skipped_still_give_valid_plots(sample):
    empty = run_plots({}, [], "x")
    skipped = run_plots({"initial": {"val": 0.3}, "steps": 3},
                        [step_row(s, [], 0.3, subset=None, skipped="no failed example in the minibatch")
                         for s in (1, 2, 3)], "x")
    for plots in (empty, skipped):
        for name in PLOTS:
            assert image(plots[name]).size == SIZES[name]
            assert len(colours(plots[name])) > 2  # axes and a note, not blank
    # a "no steps yet" chart and an "all skipped" one are not the same picture
    assert pixels(empty["proposals.png"]) != pixels(skipped["proposals.png"])
    assert pixels(empty["score.png"]) != pixels(skipped["score.png"])  # the initial score is drawn
    assert count(skipped["proposals.png"], GREEN) == 0  # no bars and no legend of categories


def test_matplotlib_is_imported_lazily_and_never_through_pyplot(tmp_path):
    code = ("import sys\n"
            "import autodiff_cli.app.report, autodiff_cli.app.cli\n"
            "assert 'matplotlib' not in sys.modules\n"
            "from autodiff_cli.app.plot import run_plots\n"
            "run_plots({}, [], 'x')\n"
            "import matplotlib\n"
            "assert 'matplotlib.pyplot' not in sys.modules\n"
            "print(matplotlib.get_backend() if 'matplotlib.pyplot' in sys.modules else 'untouched')\n")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=False,
                            env={**os.environ, "MPLCONFIGDIR": str(tmp_path)})
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "untouched"


# ---------------------------------------------------------------- in the report


def hand_made_run(tmp_path, rows: list[dict], summary: dict) -> RunDir:
    config = tmp_path / "spec.yaml"
    config.write_text("name: toy\n")
    rd = RunDir.create(tmp_path / "runs", "toy", config_path=config,
                       resolved={"name": "toy", "params": {"instruction": {"value": "v"}}, "data": {"val": "v.jsonl"}})
    for row in rows:
        rd.append_metrics(row)
    if summary:
        rd.write_summary(summary)
    return rd


def test_report_embeds_the_three_plots(tmp_path, sample):
    rd = hand_made_run(tmp_path, ROWS, SUMMARY)
    text = write_report(rd.path).read_text()
    assert "![Validation score by step](score.png)" in text
    assert "![Proposals by step](proposals.png)" in text
    assert "![Calls and tokens per role](usage.png)" in text
    for name in PLOTS:
        assert (rd.path / name).read_bytes() == sample[name]  # the report draws what run_plots draws
    first = {name: (rd.path / name).read_bytes() for name in PLOTS}
    write_report(rd.path)
    assert {name: (rd.path / name).read_bytes() for name in PLOTS} == first


@pytest.mark.parametrize("kind", ["no step", "all skipped"])
def test_report_of_runs_without_proposals(tmp_path, kind):
    rows = [] if kind == "no step" else [step_row(s, [], 0.5, subset=None, skipped="no failed example") for s in (1, 2)]
    rd = hand_made_run(tmp_path, rows, {} if kind == "no step" else {**SUMMARY, "steps": 2,
                                                                     "best": {"step": 0, "val": 0.5}})
    text = write_report(rd.path).read_text()
    for name in PLOTS:
        assert image((rd.path / name).read_bytes()).size == SIZES[name]
    assert "](score.png)" in text and "](proposals.png)" in text


def test_report_without_matplotlib_is_still_written(tmp_path, monkeypatch, capsys):
    for module in ("matplotlib", "matplotlib.style", "matplotlib.figure", "matplotlib.backends",
                   "matplotlib.backends.backend_agg", "matplotlib.ticker"):
        monkeypatch.setitem(sys.modules, module, None)  # `import matplotlib...` raises ImportError
    from autodiff_cli.app import console

    monkeypatch.setitem(console._settings, "quiet", False)
    rd = hand_made_run(tmp_path, ROWS, SUMMARY)
    text = write_report(rd.path).read_text()
    assert not any((rd.path / name).exists() for name in PLOTS)
    assert "](score.png)" not in text
    for name in PLOTS:
        assert f"*({name} not drawn: matplotlib is not installed or failed" in text
    assert "## Steps" in text and "## Usage and cost" in text
    assert "warning: plots not drawn: ModuleNotFoundError" in capsys.readouterr().err


def test_plot_module_holds_no_png_encoder():
    assert not hasattr(plot, "encode_png") and not hasattr(plot, "Canvas") and not hasattr(plot, "_GLYPHS")
