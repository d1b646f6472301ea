"""The run report: report.md (sections and numbers from summary.json) and its plots (score.png,
proposals.png, usage.png; drawn by app/plot.py, tested in test_plot.py), through `write_report`
and `autodiff report`."""
from __future__ import annotations

import io
import json

import pytest
from PIL import Image
from typer.testing import CliRunner

from autodiff_cli.app.cli import app
from autodiff_cli.app.plot import PLOTS
from autodiff_cli.app.report import write_report
from autodiff_cli.io.rundir import RunDir
from tests.app.test_browse import ACCEPTED_VALUE, REJECTED_VALUE, make_run

SECTIONS = ["## Configuration", "## Score curve", "## Steps", "## Parameter changes", "## Usage and cost",
            "## Test scores"]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("report-runs")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("AUTODIFF_CACHE", str(root / "cache"))
        mp.setenv("AUTODIFF_DATA", str(root / "data"))
        return {"accepted": make_run(root / "a", root / "runs", ACCEPTED_VALUE),
                "rejected": make_run(root / "b", root / "runs", REJECTED_VALUE)}


def read_png(data: bytes) -> tuple[int, int, set[tuple[int, int, int]]]:
    """(width, height, the RGB colours in it), read with PIL (matplotlib's own dependency)."""
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    im = Image.open(io.BytesIO(data)).convert("RGB")
    return im.width, im.height, {c for _, c in im.getcolors(1 << 24)}


def test_report_has_every_section_and_the_summary_numbers(runs):
    run = runs["accepted"]
    path = write_report(run)
    assert path == run / "report.md"
    text = path.read_text()
    summary = json.loads((run / "summary.json").read_text())
    positions = [text.index(s) for s in SECTIONS]
    assert positions == sorted(positions)
    assert text.startswith(f"# Run report: `{run.name}`")
    # configuration
    assert "| pipeline | `toy` |" in text and "| mode | autodiff |" in text
    assert "| status | completed (ran 2 of 2 steps) |" in text
    for role in ("task", "backward", "optimizer"):
        assert f"| model: {role} | `{summary['models'][role]}` |" in text
    assert "| data sizes | train 8, val 4, test 3 |" in text
    assert "| budget | none |" in text
    assert "max_steps 2" in text and "batch_size 4" in text
    # score curve
    assert "![Validation score by step](score.png)" in text and "![Proposals by step](proposals.png)" in text
    assert "![Calls and tokens per role](usage.png)" in text
    assert f"initial {summary['initial']['val']:.4f}, best {summary['best']['val']:.4f} at step {summary['best']['step']}" in text
    assert "1 tried, 1 passed the subset, 1 accepted" in text
    # steps: one row per proposal, with why
    assert "| 1 | 0.0000 | 0.0000 | #1 | `instruction` | **accepted** | 1.0000 / 1.0000 | beats the best validation score | 1.0000 |" in text
    assert "| 2 | 1.0000 | - | - | - | skipped | - | no failed example in the minibatch | 1.0000 |" in text
    # parameter diff
    assert "### `instruction` (task instruction)" in text
    assert "Count [-the things.-]{+all items. ALWAYS ADD the counts.+}" in text
    assert f"```text\n{ACCEPTED_VALUE}\n```" in text
    assert "### `answer_format` (output format, not trainable)\n\nUnchanged." in text
    # usage and cost
    task = summary["usage"]["task"]
    assert (f"| task | `fake/script.yaml` | {task['calls']} | {task['cached_calls']} | {task['errors']} | "
            f"{task['unsent']} | {task['prompt_tokens']} | {task['completion_tokens']} | $0.0000 |") in text
    total_calls = sum(u["calls"] for u in summary["usage"].values())
    assert f"| **total** |  | {total_calls} |" in text
    # test scores
    tests = text[text.index("## Test scores"):]
    assert f"| best (step {summary['best']['step']}) |" in tests
    assert f"| validation | {summary['initial']['val']:.4f} | {summary['best']['val']:.4f} |" in tests
    assert f"| test | {summary['initial']['test']:.4f} | {summary['best']['test']:.4f} |" in tests
    assert "\x1b[" not in text


def test_report_of_a_run_without_improvement(runs):
    text = write_report(runs["rejected"]).read_text()
    assert "### `instruction` (task instruction)\n\nUnchanged." in text
    assert "0 of 2 params changed" in text
    assert "subset score 0.000 does not beat 0.000" in text
    assert "no usable proposal" in text
    assert REJECTED_VALUE not in text.split("## Parameter changes")[1]


def test_score_png_is_a_valid_readable_image(runs):
    run = runs["accepted"]
    write_report(run)
    width, height, found = read_png((run / "score.png").read_bytes())
    assert (width, height) == (800, 450)
    assert len(found) >= 5  # background, axes, line, markers, text colours
    assert (0x2C, 0xA0, 0x2C) in found  # an accepted step's marker
    assert (0x1F, 0x77, 0xB4) in found  # the score line
    assert read_png((run / "proposals.png").read_bytes())[:2] == (800, 360)
    assert read_png((run / "usage.png").read_bytes())[:2] == (800, 360)


def test_report_command_rewrites_the_report_and_its_plots(runs):
    run = runs["accepted"]
    for name in ("report.md", *PLOTS):
        (run / name).unlink(missing_ok=True)
    result = CliRunner().invoke(app, ["report", str(run)])
    assert result.exit_code == 0, result.output
    assert result.stdout.strip() == str(run / "report.md")
    assert "\x1b[" not in result.output
    assert all((run / name).is_file() for name in ("report.md", *PLOTS))
    bad = CliRunner().invoke(app, ["report", str(run.parent / "nope")])
    assert bad.exit_code == 2 and "run directory" in bad.output


def test_report_of_a_run_that_has_not_finished_a_step(tmp_path):
    config = tmp_path / "spec.yaml"
    config.write_text("name: x\n")
    rd = RunDir.create(tmp_path / "runs", "x", config_path=config,
                       resolved={"name": "x", "params": {"p": {"value": "v"}}, "data": {"val": "v.jsonl"}})
    text = write_report(rd.path).read_text()
    for section in SECTIONS:
        assert section in text
    assert "No step has finished yet." in text and "unknown (data not found)" in text
    width, height, found = read_png((rd.path / "score.png").read_bytes())
    assert (width, height) == (800, 450) and len(found) > 2
