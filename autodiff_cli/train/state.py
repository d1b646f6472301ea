"""The training state a checkpoint holds: everything needed to continue a run exactly."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from autodiff_cli.data.loaders import Example
from autodiff_cli.engine.trace import Trace


@dataclass
class PoolEntry:
    """An example of the moving batch (or of a step's minibatch) with its trace and training score."""

    example: Example
    trace: Trace
    score: float  # training (loss) score with the values it was run with


@dataclass
class TrainState:
    values: dict[str, str]  # the current values (= best_values unless the mode takes candidates unvalidated)
    initial_values: dict[str, str]
    best_values: dict[str, str] | None = None
    step: int = 0  # last completed step
    initial_val: float | None = None
    best_val: float | None = None
    best_step: int = 0
    history: list[dict] = field(default_factory=list)  # accepted values: {step, values, val_score, demo_ids}
    steps_since_improvement: int = 0
    failed_pool: list[str] = field(default_factory=list)  # the moving batch: example ids, oldest first
    correct_pool: list[str] = field(default_factory=list)
    proposals: dict[str, int] = field(default_factory=lambda: {"tried": 0, "passed_subset": 0, "accepted": 0})
    usage: dict = field(default_factory=dict)
    wall_seconds: float = 0.0
    stop_reason: str | None = None
    demo_ids: dict[str, dict[str, list[str]]] = field(default_factory=dict)  # the examples behind each demos value
    optimizers: dict[str, dict[str, Any]] = field(default_factory=dict)  # each optimizer's state_dict()

    def to_dict(self) -> dict:
        return dict(self.__dict__)

    @classmethod
    def from_dict(cls, data: dict) -> TrainState:
        return cls(**data)
