"""The optimizer contract, after torch.optim.Optimizer and DSPy's Teleprompter: one object per
optimizer, one module each, and a step loop (train/trainer.py) that never changes for a new one.

Each step, the loop forwards the minibatch, lets the mode's batching pick the subset, writes the
loss evaluations and (for an optimizer that `uses_gradients`) the textual gradients of the
examples the mode's feedback policy names, and then asks the step's optimizer:

    why_not = await optimizer.begin_step(ctx)        # per-step preparation; a reason to skip, or None
    for attempt in 1..optimizer.max_proposals(mode):
        proposal = await optimizer.propose(ctx)      # a Candidate, or NoCandidate with the reason
        record = await acceptance.judge(trainer, ctx, candidate)   # acceptance = optimizer.acceptance(mode)
        optimizer.after_judge(ctx, candidate, record)

An optimizer keeps whatever it learns across steps in its own state (`state_dict()` goes into the
checkpoint, `load_state_dict()` restores it on --resume) and declares the calls it may make
(`max_calls`, for `train --dry-run`). The registry (optim/registry.py) names them for
`train.optimizer`; the demos optimizer runs on the steps `train.demos` gives to demos.
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar

from pydantic import BaseModel, ValidationError

if TYPE_CHECKING:
    from autodiff_cli.data.loaders import Example
    from autodiff_cli.engine.program import Program
    from autodiff_cli.grad.backward import Gradient
    from autodiff_cli.grad.loss import Evaluation
    from autodiff_cli.io.records import ProposalRecord
    from autodiff_cli.optim.policies import Acceptance, Batching, Mode
    from autodiff_cli.train.state import PoolEntry, TrainState


@dataclass
class Candidate:
    """Proposed values for some params (the others keep the state's current values)."""

    values: dict[str, str]
    demo_ids: dict[str, dict[str, list[str]]] | None = None  # demos: the examples behind each value
    extra: dict[str, Any] = field(default_factory=dict)  # facts for the metrics row (e.g. a parent)


@dataclass
class NoCandidate:
    """An attempt that produced nothing to judge, and why. With `values`, the optimizer proposed them
    and refused them itself (e.g. a copy of a training example): recorded and counted as refused, and
    shown to its next proposal among the failed ones."""

    reason: str
    values: dict[str, str] | None = None


@dataclass
class StepContext:
    """What the loop knows about the current step; optimizers read it and add trace rows."""

    step: int
    state: TrainState
    base: dict[str, str]  # the values the step started from (a candidate changes some of them)
    batch: list[Example]
    failed: list[PoolEntry]
    correct: list[PoolEntry]
    subset_score: float
    evaluations: dict[str, Evaluation] = field(default_factory=dict)  # per subset example
    gradients: list[Gradient] = field(default_factory=list)  # canonical order
    with_gradients: bool = False  # the mode backpropagates (no_gradient: the optimizer sees samples only)
    attempt: int = 0  # the proposal being made (1-based)
    rejected: list[ProposalRecord] = field(default_factory=list)  # this step's proposals that were not accepted
    trace_rows: list[dict] = field(default_factory=list)  # written to traces/step-NNNN.jsonl

    @property
    def subset(self) -> list[PoolEntry]:
        return self.failed + self.correct

    @property
    def values(self) -> dict[str, str]:
        return self.base


@dataclass
class OptimizerEnv:
    """What every optimizer may use: the program, the model client, the training settings."""

    program: Program
    client: Any  # llm.client.ModelClient
    cfg: Any  # spec.models.TrainSpec
    optimizer_model: str  # the model config of the `optimizer` role
    examples: dict[str, Example]  # training examples by id
    total_steps: int = 0  # the most steps the run makes (train.max_steps capped by epochs)
    on_phase: Callable[[str, dict], None] = lambda phase, info: None


@dataclass(frozen=True)
class Plan:
    """The part of a run an optimizer is asked to bound (`train --dry-run`)."""

    steps: list[int]  # the steps this optimizer runs
    total_steps: int
    n_train: int
    batch_size: int
    per_example_calls: int  # llm calls of one example's forward pass (loops unrolled)
    n_val: int = 0


class Optimizer(ABC):
    name: ClassVar[str]
    param_kind: ClassVar[str]  # "prompt" or "demos": the params it changes
    step_kind: ClassVar[str]  # the `kind` of its steps in metrics.jsonl ("text" or "demos")
    uses_gradients: ClassVar[bool] = False  # the loop runs the backward pass before its steps
    Options: ClassVar[type[BaseModel] | None] = None  # its `train.optimizer_options`, if it takes any

    def __init__(self, env: OptimizerEnv, options: BaseModel | None = None) -> None:
        self.env = env
        self.options = options
        self.targets: list[str] = []  # the params this step changes (set by begin_step)

    @classmethod
    def parse_options(cls, raw: dict, loaded: Any) -> BaseModel | None:
        """`train.optimizer_options` checked against `Options`; a mistake is a located spec error."""
        where = ("train", "optimizer_options")
        if cls.Options is None:
            if raw:
                raise loaded.error(where, expected=f"no options (optimizer {cls.name} takes none)",
                                   got=", ".join(sorted(map(str, raw))))
            return None
        try:
            return cls.Options(**raw)
        except ValidationError as e:
            from autodiff_cli.spec.loader import describe_pydantic_error

            first = e.errors()[0]
            expected, got = describe_pydantic_error(first)
            raise loaded.error(where + tuple(str(p) for p in first["loc"]), expected=expected, got=got) from None

    def observe(self, entries: list[PoolEntry]) -> None:
        """Every step's forward pass, whichever optimizer the step belongs to (e.g. the student's scores)."""

    def trainable(self) -> list[str]:
        """The params of its kind that are trainable, in spec order."""
        return [n for n, p in self.env.program.params.items() if p.trainable and p.kind == self.param_kind]

    def base_values(self, state: TrainState) -> dict[str, str]:
        """The values a step starts from (forwarded, backpropagated, changed by candidates): the
        current ones; a population-based optimizer picks a parent instead."""
        return state.values

    async def begin_step(self, ctx: StepContext) -> str | None:
        """Prepare this step's proposals (e.g. bootstrap demos); return why the step has none, or None."""
        self.targets = self.trainable()
        return None if self.targets else f"no trainable {self.param_kind} parameter"

    @abstractmethod
    async def propose(self, ctx: StepContext) -> Candidate | NoCandidate:
        """The next candidate of this step (`ctx.attempt` says which)."""

    def after_judge(self, ctx: StepContext, candidate: Candidate, record: ProposalRecord) -> None:
        """What became of a candidate (accepted or not); the default learns nothing from it."""

    def acceptance(self, mode: Mode) -> Acceptance:
        """How its candidates are judged: by default the mode's rule."""
        return mode.acceptance

    def batching(self, mode: Mode) -> Batching:
        """Which examples its steps learn from: by default the mode's."""
        return mode.batching

    def max_proposals(self, mode: Mode) -> int:
        return mode.proposals_per_step(self.env.cfg)

    def state_dict(self) -> dict:
        """What it learned across steps, for the checkpoint (JSON-serialisable)."""
        return {}

    def load_state_dict(self, state: dict) -> None:
        """Restore `state_dict()` on --resume."""

    def step_call_errors(self) -> tuple[list[str], int]:
        """(errors, calls) of its own model calls this step that failed after retries; too many stop the run."""
        return [], 0

    def max_calls(self, plan: Plan, mode: Mode) -> dict[str, int]:
        """The most calls per role it makes itself over `plan` (task calls of judging are the acceptance's;
        a `task` entry counts task calls it makes besides judging)."""
        return {}
