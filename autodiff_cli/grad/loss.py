"""The loss node: an example's training score turned into a textual evaluation.

`feedback: template` (default) writes the evaluation from a template at no cost;
`feedback: llm` asks the backward engine to explain what is wrong (failed examples only).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from autodiff_cli.engine.forward import metric_inputs
from autodiff_cli.engine.program import Metric, Program
from autodiff_cli.engine.trace import Trace
from autodiff_cli.prompts import metaprompts


@dataclass
class Evaluation:
    example_id: str
    score: float
    failed: bool
    text: str
    sources: list[str] = field(default_factory=list)  # the calls whose outputs the loss read
    pred: Any = None
    target: Any = None


def _short(value: Any, limit: int = 1500) -> str:
    text = "" if value is None else str(value)
    return text if len(text) <= limit else text[:limit] + " ..."


def _loss_args(metric: Metric, trace: Trace) -> list[dict]:
    return [{"name": name, "value": _short(slot.value), "source": ", ".join(slot.sources)}
            for name, slot in metric_inputs(metric, trace).items()]


def evaluate_loss(program: Program, trace: Trace, score: float, threshold: float) -> Evaluation:
    """The template evaluation of a completed trace whose loss score is `score`."""
    loss = program.loss
    inputs = metric_inputs(loss, trace)
    failed = score < threshold
    text = metaprompts.render("loss_feedback.j2", failed=failed, score=score, metric=loss.fn_ref,
                              args=_loss_args(loss, trace))
    sources = sorted({s for slot in inputs.values() for s in slot.sources})
    pred = inputs["pred"].value if "pred" in inputs else trace.output
    target = inputs["target"].value if "target" in inputs else None
    return Evaluation(trace.example_id, score, failed, text, sources, pred, target)


def backward_calls_per_example(loss: Metric) -> int:
    """Backward-engine calls the loss itself costs for one backpropagated example."""
    return 1 if loss.feedback == "llm" else 0


async def llm_evaluation(client: Any, model_name: str, program: Program, trace: Trace, evaluation: Evaluation,
                         example_fields: dict) -> Evaluation:
    """Replace the template text with the backward engine's explanation (`feedback: llm`)."""
    used = {f: _short(example_fields.get(f)) for f in sorted(program.input_fields)}
    msgs = metaprompts.messages("loss_llm", inputs=used, args=_loss_args(program.loss, trace),
                                score=evaluation.score, metric=program.loss.fn_ref)
    reply = await client.complete(model_name, msgs, role="backward")
    evaluation.text = f"{evaluation.text}\n{reply.text.strip()}"
    return evaluation
