"""The plots of a run's report, drawn with matplotlib: `score.png`, `proposals.png`, `usage.png`.

- `score.png`: the validation score of the current prompts by step, the best-so-far line, accepted
  steps, proposals that lost at validation, and the initial and best test scores when there are any.
- `proposals.png`: per step, stacked bars of the proposals by what became of them (see
  `classify_proposal`), and a mark on the steps that were skipped.
- `usage.png`: calls and tokens per role (task, backward, optimizer, teacher).

matplotlib is imported only when a plot is drawn (CLI start-up time), and only through
`matplotlib.figure.Figure` + `FigureCanvasAgg`: no pyplot, no global backend switch, no GUI. Each
plot is drawn under matplotlib's default style (a user's matplotlibrc does not change it), at a
fixed size and dpi, and saved without the "Software" text chunk, so the same run gives the same
bytes (with the same matplotlib and fonts).
"""
from __future__ import annotations

import io
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, Self

from autodiff_cli.io.records import ProposalRecord, StepRecord
from autodiff_cli.llm.usage import ROLES

SCORE_PLOT = "score.png"
PROPOSALS_PLOT = "proposals.png"
USAGE_PLOT = "usage.png"
PLOTS = (SCORE_PLOT, PROPOSALS_PLOT, USAGE_PLOT)

DPI = 100
SCORE_SIZE = (8.0, 4.5)  # inches: 800x450 pixels
BAR_SIZE = (8.0, 3.6)  # 800x360

BLUE, ORANGE, GREEN, RED, PURPLE, GREY = "#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#7f7f7f"
LIGHT_RED, LIGHT_GREY = "#f4a582", "#c7c7c7"

# ---------------------------------------------------------------- what the plots show


def _num(value: Any) -> float | None:
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None


@dataclass
class CurvePoints:
    """What the score curve shows; steps are 0 (initial) .. last."""

    current: list[tuple[int, float]] = field(default_factory=list)  # val score of the current prompts by step
    best_so_far: list[tuple[int, float]] = field(default_factory=list)  # best val after each step
    accepted: list[tuple[int, float]] = field(default_factory=list)  # accepted proposals with a val score
    rejected: list[tuple[int, float]] = field(default_factory=list)  # rejected proposals with a val score
    best: float | None = None
    best_step: int | None = None
    initial_test: float | None = None
    best_test: float | None = None
    last_step: int = 0
    title: str = "validation score by step"


def curve_from_metrics(initial_val: float | None, rows: list[dict], best_val: float | None = None,
                       steps: int | None = None, *, best_step: int | None = None,
                       initial_test: float | None = None, best_test: float | None = None) -> CurvePoints:
    """CurvePoints from summary.json's numbers and metrics.jsonl rows."""
    pts = CurvePoints(initial_test=_num(initial_test), best_test=_num(best_test),
                      best_step=best_step if isinstance(best_step, int) and not isinstance(best_step, bool) else None)
    current = best = _num(initial_val)
    if current is not None:
        pts.current.append((0, current))
        pts.best_so_far.append((0, current))
    last = 0
    for record in sorted(map(StepRecord.from_row, rows), key=lambda r: r.step):
        step = record.step
        last = max(last, step)
        for proposal in record.proposals:
            val = proposal.val_score
            if val is None:
                continue
            if proposal.accepted:
                current = val
                pts.accepted.append((step, val))
            else:
                pts.rejected.append((step, val))
        if record.best_val is not None:
            best = record.best_val
        elif current is not None and (best is None or current > best):
            best = current
        if current is not None:
            pts.current.append((step, current))
        if best is not None:
            pts.best_so_far.append((step, best))
    seen = [v for _, v in pts.best_so_far] + [v for _, v in pts.current]
    pts.best = _num(best_val) if _num(best_val) is not None else (max(seen) if seen else None)
    pts.last_step = max(last, steps if isinstance(steps, int) and not isinstance(steps, bool) else 0)
    return pts


# What became of a proposal, in the order the bars stack.
ACCEPTED, REJECTED_SUBSET, REJECTED_VALIDATION, REFUSED = "accepted", "rejected_subset", "rejected_validation", "refused"
CATEGORIES = (ACCEPTED, REJECTED_SUBSET, REJECTED_VALIDATION, REFUSED)
CATEGORY_LABELS = {ACCEPTED: "accepted", REJECTED_SUBSET: "rejected at subset",
                   REJECTED_VALIDATION: "rejected at validation", REFUSED: "refused / no candidate"}
CATEGORY_COLORS = {ACCEPTED: GREEN, REJECTED_SUBSET: ORANGE, REJECTED_VALIDATION: RED, REFUSED: LIGHT_GREY}


def classify_proposal(proposal: ProposalRecord, step_subset_score: float | None = None) -> str:
    """Which of CATEGORIES a proposal of a step falls in (the step's own subset score is the bar).

    The rule, in this order (it follows what the trainer and the acceptance policies write):
    1. `accepted` is true: accepted (two-stage and racing winners, take_all/textgrad, a pareto child,
       a joint lineage's commit);
    2. no `params`, or `extra["refused"]`: refused / no candidate. The optimizer produced nothing
       (`ProposalRecord.nothing`) or refused its own values (e.g. a copy of an example); nothing
       was scored;
    3. a `val_score`: rejected at validation (scored on the whole split and lost to the best);
    4. rejected at subset when its reason is TwoStage.screen's ("subset score ... does not beat ...";
       also when call errors left the subset score None), or when its subset score does not beat
       the step's subset score by the trainer's rule (`beats_subset`: strictly, or both 1.0);
    5. anything else reached validation without a final score: rejected at validation. That is a
       racing drop ("dropped from the race after k/n ..."), a validation stopped early, validation
       call errors, a race lost to another contender, and a grid combination (no subset stage).
    """
    if proposal.accepted:
        return ACCEPTED
    if not proposal.params or proposal.extra.get("refused") is True:
        return REFUSED
    if proposal.val_score is not None:
        return REJECTED_VALIDATION
    if proposal.reason.startswith("subset score"):
        return REJECTED_SUBSET
    sub, bar = proposal.subset_score, step_subset_score
    if sub is not None and bar is not None and not (sub > bar or (bar == 1.0 and sub == 1.0)):
        return REJECTED_SUBSET
    return REJECTED_VALIDATION


@dataclass
class ProposalCounts:
    """Proposals per step and category; steps 1 .. last_step (a step without a row counts nothing)."""

    last_step: int = 0
    counts: dict[int, dict[str, int]] = field(default_factory=dict)  # step -> category -> n
    skipped: list[int] = field(default_factory=list)  # steps that proposed nothing

    def total(self, category: str | None = None) -> int:
        return sum(n for c in self.counts.values() for k, n in c.items() if category in (None, k))


def proposal_counts(rows: list[dict], steps: int | None = None) -> ProposalCounts:
    out = ProposalCounts()
    for record in map(StepRecord.from_row, rows):
        out.last_step = max(out.last_step, record.step)
        per = out.counts.setdefault(record.step, dict.fromkeys(CATEGORIES, 0))
        for proposal in record.proposals:
            per[classify_proposal(proposal, record.subset_score)] += 1
        if not record.proposals:
            out.skipped.append(record.step)
    if isinstance(steps, int) and not isinstance(steps, bool):
        out.last_step = max(out.last_step, steps)
    out.skipped.sort()
    return out


@dataclass
class RoleUsage:
    role: str
    calls: int = 0
    cached_calls: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cost_usd: float | None = None


def usage_rows(usage: Any) -> list[RoleUsage]:
    """summary.json's `usage` ({role: {calls, cached_calls, prompt_tokens, ...}}), the known roles first."""
    usage = usage if isinstance(usage, Mapping) else {}
    roles = [r for r in ROLES if r in usage] + sorted(str(r) for r in usage if r not in ROLES)
    out = []
    for role in roles:
        u = usage.get(role)
        u = u if isinstance(u, Mapping) else {}
        out.append(RoleUsage(role, *(int(_num(u.get(k)) or 0) for k in
                                     ("calls", "cached_calls", "prompt_tokens", "completion_tokens")),
                             cost_usd=_num(u.get("cost_usd"))))
    return out


# ---------------------------------------------------------------- drawing


class _Drawing:
    """A Figure on an Agg canvas under matplotlib's default style; `png()` saves it deterministically."""

    def __init__(self, size: tuple[float, float], ncols: int = 1) -> None:
        self.size, self.ncols = size, ncols

    def __enter__(self) -> Self:
        import matplotlib.style
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure

        self._style = matplotlib.style.context("default")  # rcParams are restored on exit
        self._style.__enter__()
        try:
            self.figure = Figure(figsize=self.size, dpi=DPI, layout="constrained")
            FigureCanvasAgg(self.figure)
            self.axes = [self.figure.add_subplot(1, self.ncols, i + 1) for i in range(self.ncols)]
        except BaseException:
            self._style.__exit__(None, None, None)
            raise
        return self

    def __exit__(self, *exc) -> None:
        self._style.__exit__(*exc)

    def png(self) -> bytes:
        buf = io.BytesIO()
        # no "Software" chunk (it names the version); PNG has no date unless asked for one
        self.figure.canvas.print_png(buf, metadata={"Software": None})
        return buf.getvalue()


def _note(ax, text: str) -> None:
    ax.text(0.5, 0.5, text, transform=ax.transAxes, ha="center", va="center", color=GREY, fontsize=12)


def _integer_steps(ax, first: float, last_step: int) -> float:
    """Integer step ticks from `first`; returns the right end of the x-axis."""
    from matplotlib.ticker import MaxNLocator

    ax.xaxis.set_major_locator(MaxNLocator(integer=True, min_n_ticks=1))
    right = max(last_step, 1) + 0.5
    ax.set_xlim(first, right)
    return right


def score_png(points: CurvePoints) -> bytes:
    with _Drawing(SCORE_SIZE) as d:
        ax = d.axes[0]
        ax.set_title(points.title)
        ax.set_xlabel("step")
        ax.set_ylabel("validation score")
        ax.grid(True, color="#e6e6e6")
        ax.set_axisbelow(True)
        values = ([v for _, v in points.current + points.best_so_far + points.accepted + points.rejected]
                  + [v for v in (points.best, points.initial_test, points.best_test) if v is not None])
        low, high = min([0.0, *values]), max([1.0, *values])
        pad = (high - low) * 0.04
        ax.set_ylim(low - pad, high + pad)
        right = _integer_steps(ax, -0.5, points.last_step)

        def extended(series: list[tuple[int, float]]) -> tuple[list[float], list[float]]:
            # a score holds until a step changes it: drawn as steps, to the right end of the axis
            xs, ys = [float(s) for s, _ in series], [v for _, v in series]
            return xs + [right], ys + [ys[-1]]

        if points.current:
            ax.step(*extended(points.current), where="post", color=BLUE, linewidth=2, label="current prompts")
            ax.plot(*points.current[0], "o", color=BLUE, markersize=7, label="initial")
        if points.best_so_far:  # over the current line: where they agree, its dashes show on it
            ax.step(*extended(points.best_so_far), where="post", color=ORANGE, linestyle="--", linewidth=1.5,
                    label="best so far" + (f" ({points.best:.3f})" if points.best is not None else ""))
        if points.accepted:
            ax.plot([s for s, _ in points.accepted], [v for _, v in points.accepted], "o", color=GREEN,
                    markeredgecolor="black", markersize=7, label="accepted", linestyle="none")
        if points.rejected:
            ax.plot([s for s, _ in points.rejected], [v for _, v in points.rejected], "x", color=RED,
                    markersize=7, markeredgewidth=2, label="rejected at validation", linestyle="none")
        if points.initial_test is not None:
            ax.plot([0], [points.initial_test], "s", color=PURPLE, markerfacecolor="white", markeredgewidth=2,
                    markersize=8, label=f"test, initial ({points.initial_test:.3f})", linestyle="none")
        if points.best_test is not None:
            at = points.best_step if points.best_step is not None else points.last_step
            ax.plot([at], [points.best_test], "s", color=PURPLE, markersize=8,
                    label=f"test, best prompts ({points.best_test:.3f})", linestyle="none")
        if not (points.current or points.accepted or points.rejected):
            _note(ax, "no validation score yet")
        else:
            ax.legend(loc="best", fontsize="small", framealpha=0.9)
        return d.png()


def proposals_png(counts: ProposalCounts, title: str = "proposals by step") -> bytes:
    with _Drawing(BAR_SIZE) as d:
        ax = d.axes[0]
        ax.set_title(title)
        ax.set_xlabel("step")
        ax.set_ylabel("proposals")
        ax.grid(True, axis="y", color="#e6e6e6")
        ax.set_axisbelow(True)
        from matplotlib.ticker import MaxNLocator

        ax.yaxis.set_major_locator(MaxNLocator(integer=True))
        _integer_steps(ax, 0.4, counts.last_step)
        steps = sorted(counts.counts)
        total = counts.total()
        handles = []
        if total:
            bottom = [0] * len(steps)
            width = 0.8 if len(steps) < 200 else 1.0
            for category in CATEGORIES:
                heights = [counts.counts[s][category] for s in steps]
                handles.append(ax.bar(steps, heights, width, bottom=bottom, color=CATEGORY_COLORS[category],
                                      label=f"{CATEGORY_LABELS[category]} ({sum(heights)})", linewidth=0))
                bottom = [b + h for b, h in zip(bottom, heights)]
            ax.set_ylim(0, max(bottom) * 1.3 + 0.5)
        else:
            ax.set_ylim(0, 1)
        if counts.skipped:
            top = ax.get_ylim()[1]
            handles += ax.plot(counts.skipped, [top * 0.02] * len(counts.skipped), "^", color=GREY, markersize=5,
                               linestyle="none", label=f"skipped step ({len(counts.skipped)})")
        if not counts.counts and counts.last_step == 0:
            ax.set_xticks([])
            _note(ax, "no steps yet")
        elif not total:
            n = len(counts.counts)
            _note(ax, f"no proposals: {'the step was' if n == 1 else f'all {n} steps were'} skipped"
                  if counts.skipped and len(counts.skipped) == n else "no proposals")
        if handles:
            ax.legend(handles=handles, loc="upper left", fontsize="small", ncols=3 if total else 1, framealpha=0.9)
        return d.png()


def _thousands(ax) -> None:
    from matplotlib.ticker import FuncFormatter, MaxNLocator

    ax.yaxis.set_major_locator(MaxNLocator(integer=True))
    ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:,.0f}"))


def usage_png(rows: list[RoleUsage], title: str = "usage per role") -> bytes:
    with _Drawing(BAR_SIZE, ncols=2) as d:
        calls_ax, tokens_ax = d.axes
        d.figure.suptitle(title)
        calls_ax.set_title("calls", fontsize="medium")
        tokens_ax.set_title("tokens", fontsize="medium")
        for ax in d.axes:
            ax.grid(True, axis="y", color="#e6e6e6")
            ax.set_axisbelow(True)
            _thousands(ax)
        if not rows or not any(r.calls or r.cached_calls or r.prompt_tokens or r.completion_tokens for r in rows):
            for ax in d.axes:
                ax.set_xticks([])
                ax.set_ylim(0, 1)
            _note(calls_ax, "no usage recorded yet")
            return d.png()
        xs = list(range(len(rows)))
        labels = [r.role + (f"\n${r.cost_usd:.4f}" if r.cost_usd else "") for r in rows]
        _stacked(calls_ax, xs, [("to the provider", BLUE, [r.calls for r in rows]),
                                ("from the cache", LIGHT_GREY, [r.cached_calls for r in rows])])
        _stacked(tokens_ax, xs, [("prompt", PURPLE, [r.prompt_tokens for r in rows]),
                                 ("completion", LIGHT_RED, [r.completion_tokens for r in rows])])
        for ax in d.axes:
            ax.set_xticks(xs, labels)
        return d.png()


def _stacked(ax, xs: list[int], series: Iterable[tuple[str, str, list[int]]]) -> None:
    bottom = [0] * len(xs)
    for label, color, heights in series:
        ax.bar(xs, heights, 0.6, bottom=bottom, color=color, label=label, linewidth=0)
        bottom = [b + h for b, h in zip(bottom, heights)]
    ax.set_ylim(0, max(max(bottom) * 1.2, 1))
    ax.legend(loc="upper right", fontsize="small", framealpha=0.9)


# ---------------------------------------------------------------- a run's plots


def run_plots(summary: Mapping[str, Any], metrics: list[dict], name: str) -> dict[str, bytes]:
    """{file name: PNG bytes} for every plot of a run, from summary.json and metrics.jsonl."""

    def part(key: str) -> Mapping[str, Any]:
        value = summary.get(key)
        return value if isinstance(value, Mapping) else {}

    initial, best = part("initial"), part("best")
    steps = summary.get("steps") if isinstance(summary.get("steps"), int) else None
    points = curve_from_metrics(initial.get("val"), metrics, best.get("val"), steps, best_step=best.get("step"),
                                initial_test=initial.get("test"), best_test=best.get("test"))
    prefix = f"{name}: " if name and len(name) <= 40 else ""
    points.title = f"{prefix}validation score by step"
    return {SCORE_PLOT: score_png(points),
            PROPOSALS_PLOT: proposals_png(proposal_counts(metrics, steps), f"{prefix}proposals by step"),
            USAGE_PLOT: usage_png(usage_rows(summary.get("usage")), f"{prefix}usage per role")}
