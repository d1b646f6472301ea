"""The run report: `report.md` and its plots (`score.png`, `proposals.png`, `usage.png`, see
app/plot.py) in a run directory (`autodiff report RUN_DIR`).

`write_report(run_dir)` reads only the run directory (summary.json, metrics.jsonl, resolved.yaml,
prompts.yaml; data files for the split sizes when they are still where the run found them) and
(re)writes the files atomically. It can run at any time, also on a run in progress. Plots that
cannot be drawn (matplotlib missing or failing) never stop the report: it says so instead.
"""
from __future__ import annotations

from collections.abc import Collection, Sequence
from pathlib import Path
from typing import Any

from autodiff_cli.app.browse import (
    ParamChange,
    fmt_cost,
    fmt_seconds,
    is_number,
    param_changes,
    render_plain,
    resolve_run_dir,
    run_date,
    total_cost,
)
from autodiff_cli.app.plot import (
    PLOTS,
    PROPOSALS_PLOT,
    SCORE_PLOT,
    USAGE_PLOT,
    run_plots,
)
from autodiff_cli.io.records import StepRecord
from autodiff_cli.io.rundir import RunDir
from autodiff_cli.llm.usage import ROLES

REPORT = "report.md"
PLOT = SCORE_PLOT  # the score curve's file name (users and older reports refer to it)


def _s(value: Any) -> str:
    return f"{value:.4f}" if is_number(value) else "-"


def _cell(value: Any) -> str:
    """Text safe inside a Markdown table cell."""
    text = "-" if value is None else str(value)
    return text.replace("\\", "\\\\").replace("|", "\\|").replace("\r", " ").replace("\n", " ")


def _code(value: Any) -> str:
    text = str(value).replace("\n", " ")
    fence = "``" if "`" in text else "`"
    pad = " " if text.startswith("`") or text.endswith("`") else ""
    return f"{fence}{pad}{text}{pad}{fence}"


def _fence(lines: list[str], info: str = "text") -> list[str]:
    longest = max((len(run) for line in lines for run in _backtick_runs(line)), default=2)
    fence = "`" * max(3, longest + 1)
    return [f"{fence}{info}", *lines, fence]


def _backtick_runs(line: str) -> list[str]:
    import re

    return re.findall(r"`{3,}", line)


def _table(headers: list[str], rows: list[list[str]], right: Sequence[int] = ()) -> list[str]:
    align = ["---:" if i in right else "---" for i in range(len(headers))]
    out = ["| " + " | ".join(headers) + " |", "| " + " | ".join(align) + " |"]
    out += ["| " + " | ".join(_cell(c) for c in row) + " |" for row in rows]
    return out


def _dict(value: Any) -> dict:
    return value if isinstance(value, dict) else {}


# ---------------------------------------------------------------- sections


def _data_sizes(run: RunDir, summary: dict) -> dict[str, int] | None:
    """Examples per split, when the run's data can still be loaded from here."""
    try:
        from autodiff_cli.app.export import loaded_spec, open_run
        from autodiff_cli.data.splits import load_split, split_names

        loaded = loaded_spec(open_run(run.path))
        return {s: len(load_split(loaded, s)) for s in split_names(loaded)}
    except Exception:  # data moved or unreadable: the report says "unknown"
        return None


def _data_sources(resolved: dict) -> str:
    data = _dict(resolved.get("data"))
    if data.get("generator"):
        gen = _dict(data["generator"])
        return f"generator `{gen.get('name')}` (seed {gen.get('seed')})"
    parts = []
    for split in ("train", "val", "test"):
        entry = data.get(split)
        if entry is None:
            continue
        if isinstance(entry, dict):
            extra = [f"{k} {entry[k]}" for k in ("start", "stop", "sample", "stratify", "seed") if entry.get(k) is not None]
            parts.append(f"{split} {_code(entry.get('path'))}" + (f" ({', '.join(extra)})" if extra else ""))
        else:
            parts.append(f"{split} {_code(entry)}")
    return ", ".join(parts) or "-"


def _configuration(run: RunDir, summary: dict, resolved: dict) -> list[str]:
    train = _dict(resolved.get("train"))
    models = _dict(summary.get("models"))
    rows: list[list[str]] = [["pipeline", f"`{summary.get('name') or resolved.get('name') or '-'}`"]]
    if resolved.get("description"):
        rows.append(["description", str(resolved["description"])])
    rows.append(["run directory", f"`{run.path}`"])
    if summary.get("config_path"):
        rows.append(["config", f"`{summary['config_path']}`"])
    date = run_date(run.path)
    if date:
        rows.append(["started", f"{date:%Y-%m-%d %H:%M:%S} UTC"])
    rows.append(["mode", str(summary.get("mode") or train.get("mode") or "-")])
    status = summary.get("status") or "-"
    rows.append(["status", status + (f" ({summary['reason']})" if summary.get("reason") else "")])
    rows.append(["seed", str(summary.get("seed", train.get("seed", "-")))])
    for role in ROLES:
        if models.get(role):
            rows.append([f"model: {role}", f"`{models[role]}`"])
    rows.append(["data", _data_sources(resolved)])
    sizes = _data_sizes(run, summary)
    rows.append(["data sizes", ", ".join(f"{k} {v}" for k, v in sizes.items()) if sizes else "unknown (data not found)"])
    budget = {k: v for k, v in _dict(train.get("budget")).items() if v is not None}
    rows.append(["budget", ", ".join(f"{k} {v}" for k, v in budget.items()) or "none"])
    settings = [f"{k} {train[k]}" for k in ("max_steps", "epochs", "batch_size", "max_proposals", "max_error_samples",
                                             "max_correct_samples", "fail_threshold", "patience", "propose")
                if train.get(k) is not None]
    rows.append(["training", ", ".join(settings) or "-"])
    params = _dict(resolved.get("params"))
    trainable = [n for n, p in params.items() if _dict(p).get("trainable", True) is not False]
    fixed = [n for n in params if n not in trainable]
    rows.append(["trainable params", ", ".join(f"`{n}`" for n in trainable) or "none"])
    if fixed:
        rows.append(["fixed params", ", ".join(f"`{n}`" for n in fixed)])
    lines = ["## Configuration", ""]
    lines += ["| | |", "|---|---|"] + [f"| {a} | {_cell(b)} |" for a, b in rows]
    return lines


def _image(plots: Collection[str], name: str, alt: str) -> list[str]:
    """The Markdown that embeds plot `name`, or a line saying it was not drawn."""
    if name in plots:
        return [f"![{alt}]({name})", ""]
    return [f"*({name} not drawn: matplotlib is not installed or failed; `autodiff report` says why.)*", ""]


def _curve(summary: dict, metrics: list[dict], plots: Collection[str] = PLOTS) -> list[str]:
    initial, best, proposals = _dict(summary.get("initial")), _dict(summary.get("best")), _dict(summary.get("proposals"))
    lines = ["## Score curve", "", *_image(plots, SCORE_PLOT, "Validation score by step")]
    if SCORE_PLOT in plots:
        lines.append("Validation score of the current prompts by step (step 0 is the initial prompts) and the best "
                     "so far (dashed); green dots are accepted proposals, red crosses rejected proposals that were "
                     "scored on validation, purple squares the test scores of the initial and the best prompts.")
        lines.append("")
    lines += _image(plots, PROPOSALS_PLOT, "Proposals by step")
    if PROPOSALS_PLOT in plots:
        lines.append("Proposals of each step by what became of them: accepted, rejected at the subset (first stage), "
                     "rejected at validation (scored and lost, stopped early, dropped from a race), or refused / no "
                     "candidate (the optimizer proposed nothing usable); triangles mark skipped steps.")
        lines.append("")
    best_step = best.get("step")
    lines.append(f"- validation: initial {_s(initial.get('val'))}, best {_s(best.get('val'))}"
                 + (f" at step {best_step}" if best_step is not None else ""))
    lines.append(f"- steps: {summary.get('steps', len(metrics))}")
    lines.append(f"- proposals: {proposals.get('tried', 0)} tried, {proposals.get('passed_subset', 0)} passed the "
                 f"subset, {proposals.get('accepted', 0)} accepted")
    return lines


def _steps(metrics: list[dict]) -> list[str]:
    lines = ["## Steps", ""]
    if not metrics:
        return lines + ["No step has finished yet."]
    rows = []
    for step in map(StepRecord.from_row, metrics):
        step_cells = [str(step.step), _s(step.batch_score), _s(step.subset_score)]
        if not step.proposals:
            rows.append(step_cells + ["-", "-", "skipped" if step.skipped else "-", "-", step.skipped or "no proposal",
                                      _s(step.best_val)])
            continue
        for i, p in enumerate(step.proposals, 1):
            changed = ", ".join(f"`{n}`" for n in p.params) if p.params else "(none)"
            result = "**accepted**" if p.accepted else "rejected"
            cells = step_cells if i == 1 else ["", "", ""]
            rows.append(cells + [f"#{i}", changed, result, f"{_s(p.subset_score)} / {_s(p.val_score)}",
                                 p.reason or "-", _s(step.best_val) if i == len(step.proposals) else ""])
    headers = ["step", "batch", "subset", "proposal", "params", "result", "subset / val", "why", "best val"]
    lines += _table(headers, rows, right=(1, 2, 8))
    lines += ["", "*batch*: score of the minibatch; *subset*: score of the backpropagated examples; a proposal must "
              "beat the subset score, then strictly beat the best validation score."]
    return lines


def _param_section(change: ParamChange) -> list[str]:
    facts = [f for f in (change.role, None if change.trainable else "not trainable") if f]
    title = f"### `{change.name}`" + (f" ({', '.join(facts)})" if facts else "")
    if not change.changed:
        return [title, "", "Unchanged.", ""]
    lines = [title, "", "Changed by training (`[-removed-]`, `{+added+}`):", ""]
    lines += _fence(render_plain(change.initial, change.best))
    lines += ["", "<details><summary>best value</summary>", ""]
    lines += _fence(change.best.splitlines() or [""])
    lines += ["", "</details>", ""]
    return lines


def _params(run: RunDir) -> list[str]:
    lines = ["## Parameter changes", ""]
    changes = param_changes(run)
    if not changes:
        return lines + ["The pipeline has no params."]
    n = sum(c.changed for c in changes)
    lines += [f"{n} of {len(changes)} params changed from their initial to their best value.", ""]
    for change in changes:
        lines += _param_section(change)
    return lines[:-1] if lines[-1] == "" else lines


def _usage(summary: dict, plots: Collection[str] = PLOTS) -> list[str]:
    usage = _dict(summary.get("usage"))
    models = _dict(summary.get("models"))
    lines = ["## Usage and cost", ""]
    if not usage:
        return lines + ["No usage recorded yet."]
    lines += _image(plots, USAGE_PLOT, "Calls and tokens per role")
    keys = ("calls", "cached_calls", "errors", "unsent", "prompt_tokens", "completion_tokens")
    rows, totals = [], dict.fromkeys(keys, 0)
    for role, u in usage.items():
        u = _dict(u)
        for k in keys:
            totals[k] += u.get(k, 0) if is_number(u.get(k)) else 0
        rows.append([role, f"`{models[role]}`" if models.get(role) else "-",
                     *(str(u.get(k, 0)) for k in keys), fmt_cost(u.get("cost_usd"))])
    rows.append(["**total**", "", *(str(totals[k]) for k in keys), fmt_cost(total_cost(usage))])
    lines += _table(["role", "model", "calls", "cached", "errors", "unsent", "prompt tokens", "completion tokens",
                     "cost (USD)"], rows, right=range(2, 9))
    lines += ["", f"Wall time: {fmt_seconds(summary.get('wall_seconds'))}. *calls*: requests that reached the "
              "provider (*errors* among them); *cached*: replies served from the call cache (they cost nothing); "
              "*unsent*: attempts that never reached the provider (connection refused, not sent in time)."]
    return lines


def _tests(summary: dict) -> list[str]:
    initial, best = _dict(summary.get("initial")), _dict(summary.get("best"))
    lines = ["## Test scores", ""]
    rows = [["validation", _s(initial.get("val")), _s(best.get("val"))]]
    if initial.get("test") is not None or best.get("test") is not None:
        rows.append(["test", _s(initial.get("test")), _s(best.get("test"))])
    label = f"best (step {best['step']})" if best.get("step") is not None else "best"
    lines += _table(["split", "initial prompts", label], rows, right=(1, 2))
    if len(rows) == 1:
        status = summary.get("status")
        lines += ["", "No test score: the spec has no test split" +
                  ("." if status in (None, "completed") else f", or the run stopped early ({status}).")]
    return lines


# ---------------------------------------------------------------- entry points


def render_report(run: RunDir, plots: Collection[str] = PLOTS) -> str:
    """report.md's text; it embeds the plots named in `plots` (those written next to it)."""
    summary = run.read_summary()
    metrics = run.read_metrics()
    resolved = run.read_resolved()
    best, initial = _dict(summary.get("best")), _dict(summary.get("initial"))
    head = [f"# Run report: `{run.name}`", ""]
    if summary:
        head.append(f"Status **{summary.get('status', '-')}**; validation {_s(initial.get('val'))} → "
                    f"{_s(best.get('val'))}" + (f", test {_s(initial.get('test'))} → {_s(best.get('test'))}"
                                                  if best.get("test") is not None else "")
                    + f"; cost {fmt_cost(total_cost(summary.get('usage')))}.")
    else:
        head.append("The run has not written summary.json yet.")
    sections = [head, _configuration(run, summary, resolved), _curve(summary, metrics, plots), _steps(metrics),
                _params(run), _usage(summary, plots), _tests(summary)]
    return "\n\n".join("\n".join(s) for s in sections) + "\n"


def render_plots(run: RunDir) -> dict[str, bytes]:
    """{file name: PNG bytes} of the run's plots (score.png, proposals.png, usage.png)."""
    summary = run.read_summary()
    return run_plots(summary, run.read_metrics(), str(summary.get("name") or run.name))


def _drawn_plots(run: RunDir) -> dict[str, bytes]:
    """The plots, or none when they cannot be drawn: a plot never fails the report (nor, through it,
    the run that writes it at its end)."""
    from autodiff_cli.app.console import log

    try:
        return render_plots(run)
    except Exception as e:  # noqa: BLE001 - matplotlib missing or failing: the report goes on without plots
        log(f"warning: plots not drawn: {type(e).__name__}: {' '.join(str(e).split())}")
        return {}


def write_report(run_dir: str | Path) -> Path:
    """(Re)write `report.md` and its plots in `run_dir`; returns the report's path.

    Raises UsageError when `run_dir` is not a run directory and DataError when one of its files is
    unreadable.
    """
    return _write_all(Path(run_dir))[0]


def _write_all(run_dir: Path) -> tuple[Path, list[Path]]:
    """(the report's path, the plots' paths)."""
    run = RunDir.open(run_dir)
    plots = _drawn_plots(run)
    text = render_report(run, plots)
    written = [run._write(name, png) for name, png in plots.items()]
    return run._write(REPORT, text), written


def report_command(run_dir: Path) -> None:
    from autodiff_cli.app.console import log

    path, plots = _write_all(resolve_run_dir(run_dir))
    for plot in plots:
        log(f"wrote {plot}")
    print(path)
