"""The run report: report.md (sections and numbers from summary.json) and score.png (a valid PNG
drawn without a plotting library), through `write_report` and `autodiff report`."""
from __future__ import annotations

import json
import struct
import zlib

import pytest
from typer.testing import CliRunner

from autodiff_cli.app.cli import app
from autodiff_cli.app.plot import CurvePoints, curve_from_metrics, score_curve_png
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


def read_png(data: bytes) -> tuple[int, int, list[bytes]]:
    """(width, height, rows of RGB bytes); checks the signature, chunk CRCs and the IHDR."""
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    pos, chunks = 8, []
    while pos < len(data):
        (length,) = struct.unpack(">I", data[pos:pos + 4])
        kind, body = data[pos + 4:pos + 8], data[pos + 8:pos + 8 + length]
        (crc,) = struct.unpack(">I", data[pos + 8 + length:pos + 12 + length])
        assert crc == zlib.crc32(kind + body) & 0xFFFFFFFF
        chunks.append((kind, body))
        pos += 12 + length
    assert chunks[0][0] == b"IHDR" and chunks[-1][0] == b"IEND"
    width, height, depth, color, _, _, _ = struct.unpack(">IIBBBBB", chunks[0][1])
    assert (depth, color) == (8, 2)
    raw = zlib.decompress(b"".join(body for kind, body in chunks if kind == b"IDAT"))
    stride = 1 + width * 3
    assert len(raw) == height * stride
    rows = [raw[y * stride:(y + 1) * stride] for y in range(height)]
    assert all(r[0] == 0 for r in rows)  # filter type None
    return width, height, [r[1:] for r in rows]


def colours(rows: list[bytes]) -> set[bytes]:
    return {r[i:i + 3] for r in rows for i in range(0, len(r), 3)}


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
    assert "![Validation score by step](score.png)" in text
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
    width, height, rows = read_png((run / "score.png").read_bytes())
    assert (width, height) == (640, 400)
    found = colours(rows)
    assert len(found) >= 5  # background, axes, line, markers, text colours
    assert bytes((22, 150, 60)) in found  # an accepted step's marker
    assert bytes((31, 100, 180)) in found  # the score line


def test_report_command_rewrites_both_files(runs):
    run = runs["accepted"]
    (run / "report.md").unlink(missing_ok=True)
    (run / "score.png").unlink(missing_ok=True)
    result = CliRunner().invoke(app, ["report", str(run)])
    assert result.exit_code == 0, result.output
    assert result.stdout.strip() == str(run / "report.md")
    assert "\x1b[" not in result.output
    assert (run / "report.md").is_file() and (run / "score.png").is_file()
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
    width, height, rows = read_png((rd.path / "score.png").read_bytes())
    assert (width, height) == (640, 400) and len(colours(rows)) > 2


def test_curve_points_from_metrics():
    rows = [
        {"step": 1, "proposals": [{"accepted": False, "val_score": 0.2}, {"accepted": True, "val_score": 0.5}]},
        {"step": 2, "proposals": [{"accepted": False, "val_score": None}]},
        {"step": 3, "proposals": [{"accepted": False, "val_score": 0.4}]},
    ]
    pts = curve_from_metrics(0.25, rows, 0.5, steps=4)
    assert pts.current == [(0, 0.25), (1, 0.5), (2, 0.5), (3, 0.5)]
    assert pts.accepted == [(1, 0.5)] and pts.rejected == [(1, 0.2), (3, 0.4)]
    assert pts.best == 0.5 and pts.last_step == 4
    many = curve_from_metrics(0.1, [{"step": s, "proposals": []} for s in range(1, 120)])
    width, height, rows_ = read_png(score_curve_png(many))
    assert (width, height) == (640, 400)
    empty = read_png(score_curve_png(CurvePoints()))
    assert len(colours(empty[2])) > 2
