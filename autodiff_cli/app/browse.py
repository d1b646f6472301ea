"""Run browsing: `autodiff runs list`, `autodiff runs show RUN_DIR` and `autodiff diff RUN_DIR`.

Everything here only reads run directories (rundir.RunDir). Output goes to stdout: rich tables and
colours on a terminal, plain aligned text without escape codes otherwise (pipes, CI, tests).
The word-level diff (`word_diff`, `render_plain`) is shared with the run report (report.py).
"""
from __future__ import annotations

import difflib
import json
import re
import sys
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from autodiff_cli.errors import DataError, UsageError
from autodiff_cli.io.records import ProposalRecord, StepRecord
from autodiff_cli.io.rundir import KILLED, RunDir

_STAMP = re.compile(r"-(\d{8})-(\d{6})(?:-\d+)?$")


# ---------------------------------------------------------------- small formatting helpers


def is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def fmt_score(value: Any, digits: int = 3) -> str:
    return f"{value:.{digits}f}" if is_number(value) else "-"


def fmt_cost(value: Any) -> str:
    return f"${value:.4f}" if is_number(value) else "-"


def fmt_seconds(value: Any) -> str:
    if not is_number(value):
        return "-"
    if value < 60:
        return f"{value:.1f}s"
    minutes, seconds = divmod(int(round(value)), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m{seconds:02d}s" if hours else f"{minutes}m{seconds:02d}s"


def stdout_is_tty() -> bool:
    try:
        return sys.stdout.isatty()
    except (AttributeError, ValueError):
        return False


def _console():
    from rich.console import Console

    return Console(highlight=False, soft_wrap=True)


def plain_table(headers: list[str], rows: list[list[str]], right: Iterable[int] = ()) -> list[str]:
    """Rows as aligned text columns (two spaces apart); columns in `right` are right-aligned."""
    right = set(right)
    widths = [max([len(h)] + [len(r[i]) for r in rows]) for i, h in enumerate(headers)]

    def line(cells: list[str]) -> str:
        parts = [c.rjust(w) if i in right else c.ljust(w) for i, (c, w) in enumerate(zip(cells, widths))]
        return "  ".join(parts).rstrip()

    return [line(headers)] + [line(r) for r in rows]


def _print_table(headers: list[str], rows: list[list[str]], right: Iterable[int] = (), indent: str = "") -> None:
    right = list(right)
    if stdout_is_tty():
        from rich.table import Table

        table = Table(show_edge=False, box=None, padding=(0, 2, 0, 0), header_style="bold")
        for i, h in enumerate(headers):
            table.add_column(h, justify="right" if i in right else "left", no_wrap=i == 0)
        for r in rows:
            table.add_row(*r)
        from rich.padding import Padding

        _console().print(Padding(table, (0, 0, 0, len(indent)), expand=False))
        return
    for text in plain_table(headers, rows, right):
        print(indent + text)


# ---------------------------------------------------------------- reading runs


def resolve_run_dir(path: Path) -> Path:
    """`path` itself, or `runs/<path>` when only that exists (so a bare run name works)."""
    path = Path(path)
    if not path.exists() and not path.is_absolute():
        candidate = Path("runs") / path
        if RunDir.is_run_dir(candidate):
            return candidate
    return path


def open_run(path: Path) -> RunDir:
    return RunDir.open(resolve_run_dir(path))


def run_date(path: Path) -> datetime | None:
    """The run's start (UTC) from its folder name `<name>-YYYYMMDD-HHMMSS[-n]`, else config.yaml's mtime."""
    match = _STAMP.search(Path(path).name)
    if match:
        try:
            return datetime.strptime(match.group(1) + match.group(2), "%Y%m%d%H%M%S").replace(tzinfo=UTC)
        except ValueError:
            pass
    try:
        return datetime.fromtimestamp((Path(path) / "config.yaml").stat().st_mtime, tz=UTC)
    except OSError:
        return None


def total_cost(usage: Any) -> float | None:
    if not isinstance(usage, dict):
        return None
    costs = [u.get("cost_usd") for u in usage.values() if isinstance(u, dict)]
    costs = [c for c in costs if is_number(c)]
    return round(sum(costs), 6) if costs else None


def _section(summary: dict, key: str) -> dict:
    value = summary.get(key)
    return value if isinstance(value, dict) else {}


def run_status(run: RunDir, summary: dict) -> tuple[str, str | None]:
    """(status, reason) to show: the summary's, or `killed` with how to resume when the summary says
    `running` but no process holds the run any more (it could not write its own end)."""
    status = run.liveness(summary)
    if status != KILLED:
        return status, summary.get("reason")
    config = summary.get("config_path") or "CONFIG"
    return status, (f"the process ended without writing its end (killed or crashed) after step {summary.get('steps', 0)}; "
                    f"resume with: autodiff train {config} --resume {run.path}")


def run_row(path: Path) -> dict:
    """One `runs list` entry; never raises for a broken summary.json (its status says so)."""
    run = RunDir(path)
    error = None
    try:
        summary = run.read_summary()
    except DataError as e:
        summary, error = {}, e.headline()
    date = run_date(path)
    initial, best = _section(summary, "initial"), _section(summary, "best")
    if error:
        status, reason = "unreadable", error
    else:
        status, reason = run_status(run, summary)
    return {
        "run": path.name, "run_dir": str(path), "name": summary.get("name"),
        "date": date.strftime("%Y-%m-%dT%H:%M:%SZ") if date else None,
        "status": status, "reason": reason,
        "mode": summary.get("mode"),
        "initial_val": initial.get("val"), "initial_test": initial.get("test"),
        "best_step": best.get("step"), "best_val": best.get("val"), "best_test": best.get("test"),
        "steps": summary.get("steps"), "proposals": summary.get("proposals"),
        "cost_usd": total_cost(summary.get("usage")), "wall_seconds": summary.get("wall_seconds"),
    }


def list_runs(runs_dir: Path) -> list[dict]:
    """The run directories directly under `runs_dir`, newest first; other folders are skipped."""
    runs_dir = Path(runs_dir)
    if not runs_dir.exists():  # no run yet: an empty list, not an error (CONTRACT)
        return []
    if not runs_dir.is_dir():
        raise UsageError(file=runs_dir, key="--runs-dir", expected="a folder of run directories", got="a file")
    rows = [run_row(p) for p in runs_dir.iterdir() if RunDir.is_run_dir(p)]
    rows.sort(key=lambda r: (r["date"] or "", r["run"]), reverse=True)
    return rows


# ---------------------------------------------------------------- runs list


_STATUS_STYLE = {"completed": "green", "running": "cyan", "interrupted": "yellow", "budget_exhausted": "yellow",
                 "failed": "red", "unreadable": "red", KILLED: "red"}


def runs_list_command(runs_dir: Path, json_out: bool) -> None:
    rows = list_runs(runs_dir)
    if json_out:
        print(json.dumps(rows, ensure_ascii=False, indent=2))
        return
    if not rows:
        where = "" if Path(runs_dir).is_dir() else " (no such folder yet)"
        print(f"no runs in {runs_dir}{where}; `autodiff train CONFIG` makes one")
        return
    headers = ["run", "date (UTC)", "status", "mode", "best val", "best test", "steps", "cost"]
    table = []
    for r in rows:
        date = r["date"].replace("T", " ").rstrip("Z") if r["date"] else "-"
        table.append([r["run"], date, r["status"], r["mode"] or "-", fmt_score(r["best_val"]), fmt_score(r["best_test"]),
                      "-" if r["steps"] is None else str(r["steps"]), fmt_cost(r["cost_usd"])])
    if stdout_is_tty():
        from rich import box
        from rich.table import Table
        from rich.text import Text

        t = Table(box=box.SIMPLE_HEAD, show_edge=False, pad_edge=False, padding=0,
                  header_style="bold")
        for i, h in enumerate(headers):
            t.add_column(h, justify="right" if i >= 4 else "left", no_wrap=i > 0, overflow="fold")
        for r, cells in zip(rows, table):
            cells = list(cells)
            cells[1] = cells[1][:16]  # the minute is enough on screen (the run's name has the seconds)
            t.add_row(*cells[:2], Text(cells[2], style=_STATUS_STYLE.get(r["status"], "")), *cells[3:])
        _console().print(t)
        return
    for line in plain_table(headers, table, right=range(4, 8)):
        print(line)


# ---------------------------------------------------------------- runs show


def _models_line(models: Any) -> str:
    if not isinstance(models, dict):
        return "-"
    return ", ".join(f"{role} {m}" for role, m in models.items() if m) or "-"


def usage_rows(usage: Any) -> list[list[str]]:
    """Rows (role, calls, cached, errors, prompt tok, completion tok, cost) of the roles that did anything."""
    rows = []
    if not isinstance(usage, dict):
        return rows
    for role, u in usage.items():
        if not isinstance(u, dict):
            continue
        if not any(u.get(k) for k in ("calls", "cached_calls", "errors", "unsent", "prompt_tokens", "completion_tokens")):
            continue
        rows.append([str(role), str(u.get("calls", 0)), str(u.get("cached_calls", 0)), str(u.get("errors", 0)),
                     str(u.get("unsent", 0)), str(u.get("prompt_tokens", 0)), str(u.get("completion_tokens", 0)),
                     fmt_cost(u.get("cost_usd"))])
    return rows


USAGE_HEADERS = ["role", "calls", "cached", "errors", "unsent", "prompt tok", "completion tok", "cost"]


def step_line(step: StepRecord) -> str:
    """One step of metrics.jsonl as a line: scores, skip reason, best val."""
    parts = [f"batch {fmt_score(step.batch_score)}"]
    if step.subset_score is not None:
        n = len(step.subset_ids or [])
        parts.append(f"subset {fmt_score(step.subset_score)}" + (f" on {n}" if n else ""))
    if step.skipped:
        parts.append(f"skipped: {step.skipped}")
    if step.val_score is not None:
        parts.append(f"val {fmt_score(step.val_score)}")
    parts.append(f"best val {fmt_score(step.best_val)}")
    epoch = f" (epoch {step.epoch})" if step.epoch is not None else ""
    return f"step {step.step}{epoch}: " + "; ".join(parts)


def proposal_line(index: int, proposal: ProposalRecord) -> tuple[str, str, str]:
    """(prefix, verdict, rest) of one proposal, e.g. ("#1", "accepted", "[instruction] subset 1.000, val 1.000: ...")."""
    verdict = "accepted" if proposal.accepted else "rejected"
    scores = []
    if proposal.subset_score is not None:
        scores.append(f"subset {fmt_score(proposal.subset_score)}")
    if proposal.val_score is not None:
        scores.append(f"val {fmt_score(proposal.val_score)}")
    rest = (f"[{', '.join(proposal.params)}]" if proposal.proposed else "no proposal") \
        + (f" {', '.join(scores)}" if scores else "")
    if proposal.reason:
        rest += f": {proposal.reason}"
    return f"#{index}", verdict, rest


def show_run(run_dir: Path, json_out: bool) -> None:
    run = open_run(run_dir)
    summary = run.read_summary()
    metrics = run.read_metrics()
    if json_out:
        status, reason = run_status(run, summary) if summary else (None, None)
        print(json.dumps({"run_dir": str(run.path), "status": status, "reason": reason, "summary": summary,
                          "steps": metrics}, ensure_ascii=False, indent=2))
        return
    tty = stdout_is_tty()
    console = _console() if tty else None

    def out(text: str = "", style: str | None = None) -> None:
        if console is None:
            print(text)
        else:
            from rich.text import Text

            console.print(Text(text, style=style or ""))

    initial, best, proposals = _section(summary, "initial"), _section(summary, "best"), _section(summary, "proposals")
    date = run_date(run.path)
    out(f"run {run.name}", "bold")
    out(f"  folder:    {run.path}")
    if date:
        out(f"  started:   {date:%Y-%m-%d %H:%M:%S} UTC")
    if not summary:
        out("  no summary.json yet (the run has not started a step)", "yellow")
    else:
        name = summary.get("name") or "-"
        out(f"  pipeline:  {name}, mode {summary.get('mode') or '-'}, seed {summary.get('seed', '-')}")
        status, reason = run_status(run, summary)
        out(f"  status:    {status}" + (f" ({reason})" if reason else ""), _STATUS_STYLE.get(status))
        out(f"  models:    {_models_line(summary.get('models'))}")
        best_step = best.get("step")
        out(f"  val:       initial {fmt_score(initial.get('val'))} -> best {fmt_score(best.get('val'))}"
            + (f" (step {best_step})" if best_step is not None else ""))
        if initial.get("test") is not None or best.get("test") is not None:
            out(f"  test:      initial {fmt_score(initial.get('test'))} -> best {fmt_score(best.get('test'))}")
        out(f"  steps:     {summary.get('steps', '-')}")
        out(f"  proposals: {proposals.get('tried', 0)} tried, {proposals.get('passed_subset', 0)} passed the subset, "
            f"{proposals.get('accepted', 0)} accepted")
        out(f"  wall time: {fmt_seconds(summary.get('wall_seconds'))}; cost {fmt_cost(total_cost(summary.get('usage')))}")
        rows = usage_rows(summary.get("usage"))
        if rows:
            out("")
            out("usage", "bold")
            _print_table(USAGE_HEADERS, rows, right=range(1, 8), indent="  ")
    out("")
    out("steps", "bold")
    if not metrics:
        out("  no step finished yet")
    for row in metrics:
        step = StepRecord.from_row(row)
        out("  " + step_line(step), "bold" if step.accepted else None)
        for i, proposal in enumerate(step.proposals, 1):
            prefix, verdict, rest = proposal_line(i, proposal)
            if console is None:
                print(f"    {prefix} {verdict} {rest}")
            else:
                from rich.text import Text

                text = Text(f"    {prefix} ")
                text.append(verdict, style="green bold" if verdict == "accepted" else "red")
                text.append(f" {rest}")
                console.print(text)


# ---------------------------------------------------------------- word-level diff


_TOKEN = re.compile(r"\S+\s*|\s+")


@dataclass
class Segment:
    kind: str  # "equal" | "delete" | "insert"
    text: str


def _tokens(text: str) -> list[str]:
    return _TOKEN.findall(text)


def word_diff(old: str, new: str) -> list[Segment]:
    """`old` -> `new` as segments of equal, deleted and inserted words (whitespace kept with its word).

    A short stretch of equal words between two changes (e.g. a lone "the") is folded into them, so a
    rewritten phrase reads as one removal and one addition rather than a patchwork."""
    a, b = _tokens(old), _tokens(new)
    matcher = difflib.SequenceMatcher(None, [t.strip() for t in a], [t.strip() for t in b], autojunk=False)
    # chunks: [is_equal, old tokens, new tokens]
    chunks: list[list] = []
    for op, i1, i2, j1, j2 in matcher.get_opcodes():
        equal = op == "equal"
        if chunks and not equal and not chunks[-1][0]:
            chunks[-1][1] += a[i1:i2]
            chunks[-1][2] += b[j1:j2]
        else:
            chunks.append([equal, a[i1:i2], b[j1:j2]])
    merged: list[list] = []
    for k, chunk in enumerate(chunks):
        between_changes = 0 < k < len(chunks) - 1 and not chunks[k - 1][0] and not chunks[k + 1][0]
        if chunk[0] and between_changes and len(chunk[2]) <= 2 and "\n" not in "".join(chunk[2]):
            chunk = [False, chunk[1], chunk[2]]
        if merged and not chunk[0] and not merged[-1][0]:
            merged[-1][1] += chunk[1]
            merged[-1][2] += chunk[2]
        else:
            merged.append([chunk[0], list(chunk[1]), list(chunk[2])])
    out: list[Segment] = []
    for equal, old_tokens, new_tokens in merged:
        if equal:
            out.append(Segment("equal", "".join(new_tokens)))
            continue
        if old_tokens:
            out.append(Segment("delete", "".join(old_tokens)))
        if new_tokens:
            out.append(Segment("insert", "".join(new_tokens)))
    return [seg for seg in out if seg.text]


def diff_lines(segments: list[Segment]) -> list[list[Segment]]:
    """Segments split at newlines: one list of segments per line of the combined text."""
    lines: list[list[Segment]] = [[]]
    for seg in segments:
        parts = seg.text.split("\n")
        for k, part in enumerate(parts):
            if k:
                lines.append([])
            if part:
                lines[-1].append(Segment(seg.kind, part))
    return lines


def collapse(lines: list[list[Segment]], context: int = 3) -> list[list[Segment] | int]:
    """Lines near a change, with runs of other lines replaced by their count (an int)."""
    changed = [i for i, line in enumerate(lines) if any(s.kind != "equal" for s in line)]
    if not changed:
        return list(lines)
    keep = set()
    for i in changed:
        keep.update(range(max(0, i - context), min(len(lines), i + context + 1)))
    out: list[list[Segment] | int] = []
    skipped = 0
    for i, line in enumerate(lines):
        if i in keep:
            if skipped:
                out.append(skipped)
                skipped = 0
            out.append(line)
        else:
            skipped += 1
    if skipped:
        out.append(skipped)
    return out


def _marked(seg: Segment) -> str:
    """A deleted/inserted piece as `[-text-]` / `{+text+}` with its trailing whitespace outside the marks."""
    body = seg.text.rstrip()
    tail = seg.text[len(body):]
    lead_body = body.lstrip()
    lead = body[: len(body) - len(lead_body)]
    if not lead_body:
        return seg.text
    return f"{lead}[-{lead_body}-]{tail}" if seg.kind == "delete" else f"{lead}{{+{lead_body}+}}{tail}"


def render_plain(old: str, new: str, context: int = 3) -> list[str]:
    """Word diff as text lines: `[-removed-]` and `{+added+}` marks (git's --word-diff=plain),
    unchanged stretches longer than the context shown as `@@ N unchanged lines @@`."""
    out = []
    for item in collapse(diff_lines(word_diff(old, new)), context):
        if isinstance(item, int):
            out.append(f"@@ {item} unchanged line{'s' if item != 1 else ''} @@")
        else:
            out.append("".join(s.text if s.kind == "equal" else _marked(s) for s in item))
    return out


def _render_rich(old: str, new: str, context: int = 3) -> list:
    from rich.text import Text

    out = []
    for item in collapse(diff_lines(word_diff(old, new)), context):
        if isinstance(item, int):
            out.append(Text(f"@@ {item} unchanged line{'s' if item != 1 else ''} @@", style="cyan"))
            continue
        text = Text()
        for s in item:
            if s.kind == "equal":
                text.append(s.text)
            else:
                body = s.text.rstrip()
                text.append(body, style="red strike" if s.kind == "delete" else "green bold")
                text.append(s.text[len(body):])
        out.append(text)
    return out


def unified_lines(old: str, new: str, name: str, context: int = 3) -> list[str]:
    return list(difflib.unified_diff(old.splitlines(), new.splitlines(), f"{name} (initial)", f"{name} (best)",
                                     n=context, lineterm=""))


# ---------------------------------------------------------------- autodiff diff


@dataclass
class ParamChange:
    name: str
    role: str | None
    trainable: bool
    initial: str
    best: str

    @property
    def changed(self) -> bool:
        return self.initial != self.best


def param_changes(run: RunDir) -> list[ParamChange]:
    """Every param of resolved.yaml: its initial value and its best one (prompts.yaml, else unchanged)."""
    resolved = run.read_resolved()
    best = run.read_prompts()
    params = resolved.get("params") if isinstance(resolved.get("params"), dict) else {}
    out = []
    for name, entry in params.items():
        entry = entry if isinstance(entry, dict) else {"value": entry}
        initial = "" if entry.get("value") is None else str(entry.get("value"))
        out.append(ParamChange(str(name), entry.get("role"), entry.get("trainable", True) is not False,
                               initial, best.get(str(name), initial)))
    return out


def diff_command(run_dir: Path, lines_mode: bool = False, context: int = 3) -> None:
    run = open_run(run_dir)
    summary = run.read_summary()
    if not (run.path / "prompts.yaml").is_file():
        print(f"{run.path}: no prompts.yaml yet; every param is at its initial value", file=sys.stderr)
    changes = param_changes(run)
    tty = stdout_is_tty()
    console = _console() if tty else None

    def out(text="", style: str | None = None) -> None:
        if console is None:
            print(text)
        else:
            from rich.text import Text

            console.print(text if not isinstance(text, str) else Text(text, style=style or ""))

    best, initial = _section(summary, "best"), _section(summary, "initial")
    head = f"run {run.name}"
    if best:
        head += (f": best step {best.get('step', '?')}, val {fmt_score(initial.get('val'))} -> "
                 f"{fmt_score(best.get('val'))}")
    out(head, "bold")
    if not changes:
        out("no params")
    if not lines_mode and not tty and any(c.changed for c in changes):
        out("([-removed-] {+added+})")
    for c in changes:
        facts = [f for f in (c.role, None if c.trainable else "not trainable") if f]
        label = c.name + (f" ({', '.join(facts)})" if facts else "")
        out("")
        if not c.changed:
            out(f"{label}: unchanged", "dim")
            continue
        out(f"{label}: changed", "bold yellow")
        if lines_mode:
            for line in unified_lines(c.initial, c.best, c.name, context):
                style = ("red" if line.startswith("-") else "green" if line.startswith("+") else
                         "cyan" if line.startswith("@@") else None)
                out("    " + line, style)
        elif console is None:
            for line in render_plain(c.initial, c.best, context):
                print("    " + line)
        else:
            from rich.text import Text

            for text in _render_rich(c.initial, c.best, context):
                console.print(Text("    ") + text)
