"""What a training step leaves behind: the `metrics.jsonl` schema, in one place.

The trainer builds these records; the run directory stores `to_row()`; `runs show`, the report,
the plot and the benchmarks read them back with `from_row()`, which tolerates rows written by
older versions (missing keys read as None/empty). CONTRACT.md fixes the row keys: `step`,
`epoch`, `batch_ids`, `batch_score`, `subset_score`, `proposals` [{`params`, `subset_score`,
`val_score`, `accepted`, `reason`}], `val_score`, `best_val`, `usage`, `wall_seconds`; the rest
are additions (`kind`, `skipped`, `subset_ids`, a proposal's `demo_ids` and an optimizer's own
facts in `extra`).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


def _number(value: Any) -> float | None:
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None


@dataclass
class ProposalRecord:
    """One proposal of a step and what became of it."""

    params: dict[str, str]  # the values it proposed ({} when the optimizer had none: see `reason`)
    subset_score: float | None = None  # stage 1: the backpropagated subset with these values
    val_score: float | None = None  # stage 2: the validation split (None: not reached, or stopped early)
    accepted: bool = False
    reason: str = ""
    demo_ids: dict[str, dict[str, list[str]]] | None = None  # demos proposals: the examples behind each value
    extra: dict[str, Any] = field(default_factory=dict)  # an optimizer's or acceptance's own facts, flat in the row

    @classmethod
    def nothing(cls, reason: str) -> ProposalRecord:
        """A proposal attempt that produced no values (unparseable reply, nothing left to try, ...)."""
        return cls({}, reason=reason)

    @property
    def proposed(self) -> bool:
        return bool(self.params)

    def to_row(self) -> dict[str, Any]:
        row: dict[str, Any] = {"params": dict(self.params), "subset_score": self.subset_score,
                               "val_score": self.val_score, "accepted": self.accepted, "reason": self.reason}
        if self.demo_ids:
            row["demo_ids"] = self.demo_ids
        row.update(self.extra)
        return row

    @classmethod
    def from_row(cls, row: Any) -> ProposalRecord:
        row = row if isinstance(row, dict) else {}
        known = {"params", "subset_score", "val_score", "accepted", "reason", "demo_ids"}
        params = row.get("params")
        return cls(params=dict(params) if isinstance(params, dict) else {},
                   subset_score=_number(row.get("subset_score")), val_score=_number(row.get("val_score")),
                   accepted=row.get("accepted") is True, reason=str(row.get("reason") or ""),
                   demo_ids=row.get("demo_ids") if isinstance(row.get("demo_ids"), dict) else None,
                   extra={k: v for k, v in row.items() if k not in known})


@dataclass
class StepRecord:
    """One step: its minibatch, subset, proposals, and the scores after it."""

    step: int
    epoch: int | None = None
    kind: str = "text"  # the optimizer's param kind this step: "text" (prompts) or "demos"
    batch_ids: list[str] = field(default_factory=list)
    batch_score: float | None = None
    subset_score: float | None = None
    proposals: list[ProposalRecord] = field(default_factory=list)
    val_score: float | None = None  # the accepted proposal's validation score
    best_val: float | None = None  # after the step
    skipped: str | None = None  # why the step proposed nothing
    subset_ids: list[str] | None = None
    usage: dict[str, dict[str, Any]] = field(default_factory=dict)  # this step's calls per role
    wall_seconds: float | None = None

    @property
    def accepted(self) -> ProposalRecord | None:
        return next((p for p in self.proposals if p.accepted), None)

    def to_row(self) -> dict[str, Any]:
        row: dict[str, Any] = {"step": self.step, "epoch": self.epoch, "kind": self.kind, "batch_ids": list(self.batch_ids),
                               "batch_score": self.batch_score, "subset_score": self.subset_score,
                               "proposals": [p.to_row() for p in self.proposals], "val_score": self.val_score,
                               "best_val": self.best_val, "skipped": self.skipped}
        if self.subset_ids is not None:
            row["subset_ids"] = list(self.subset_ids)
        row["usage"] = self.usage
        row["wall_seconds"] = self.wall_seconds
        return row

    @classmethod
    def from_row(cls, row: Any) -> StepRecord:
        row = row if isinstance(row, dict) else {}
        step = row.get("step")
        epoch = row.get("epoch")
        subset_ids = row.get("subset_ids")
        usage = row.get("usage")
        return cls(step=step if isinstance(step, int) and not isinstance(step, bool) else 0,
                   epoch=epoch if isinstance(epoch, int) else None, kind=str(row.get("kind") or "text"),
                   batch_ids=[str(i) for i in row.get("batch_ids") or []],
                   batch_score=_number(row.get("batch_score")), subset_score=_number(row.get("subset_score")),
                   proposals=[ProposalRecord.from_row(p) for p in row.get("proposals") or []],
                   val_score=_number(row.get("val_score")), best_val=_number(row.get("best_val")),
                   skipped=str(row["skipped"]) if row.get("skipped") else None,
                   subset_ids=[str(i) for i in subset_ids] if isinstance(subset_ids, list) else None,
                   usage=usage if isinstance(usage, dict) else {}, wall_seconds=_number(row.get("wall_seconds")))
