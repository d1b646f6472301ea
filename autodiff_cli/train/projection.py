"""`train --dry-run`: an upper bound of the calls and tokens a run can spend, per role, without a call.

Tokens are estimated from the rendered prompts of the first validation example (4 characters
per token) plus each model config's max_tokens for the reply (256 when unset).
"""
from __future__ import annotations

import json
import sys

from autodiff_cli.spec.compiler import CompiledNode, Program, Scope, invocations
from autodiff_cli.data.loaders import Example
from autodiff_cli.grad.loss import backward_calls_per_example

CHARS_PER_TOKEN = 4
DEFAULT_REPLY_TOKENS = 256


def llm_invocations(scope: Scope, repeat: int = 1) -> list[tuple[CompiledNode, int]]:
    """Each llm node with the most times one example can invoke it (loops unrolled)."""
    return [(node, times) for node, times in invocations(scope, repeat) if node.kind == "llm"]


def _prompt_tokens(node: CompiledNode, example: Example, values: dict[str, str]) -> int:
    context = {**values, "input": example.fields, "state": {}, "iteration": 0}
    chars = 0
    for tmpl in (node.system, node.user):
        if tmpl is None:
            continue
        try:
            chars += len(tmpl.render({**{n: "" for n in tmpl.names}, **context}))
        except Exception:  # other nodes' outputs are unknown before running: count the template text
            chars += len(tmpl.source)
    return chars // CHARS_PER_TOKEN + 1


def project(program: Program, splits: dict[str, list[Example]], trainer) -> dict[str, dict[str, int]]:
    """Upper bounds per role. Every count comes from the objects that decide the calls in a run: the
    trainer's planned steps and their kinds, its strategy (subset, backpropagated examples, proposals
    and whether they are validated), the loss (its own backward calls) and the backward engine (calls
    per trace)."""
    cfg = program.spec.train
    strategy = trainer.strategy
    values = {n: p.value for n, p in program.params.items()}
    sample = splits["val"][0]
    per_example_calls = 0
    per_example_tokens = 0
    for node, times in llm_invocations(program.scope):
        reply = program.spec.models[node.model].max_tokens or DEFAULT_REPLY_TOKENS
        per_example_calls += times
        per_example_tokens += times * (_prompt_tokens(node, sample, values) + reply)
    n_val, n_test, n_train = len(splits["val"]), len(splits.get("test", [])), len(splits["train"])
    steps = trainer.planned_steps()
    text_steps = sum(1 for _, kind in steps if kind == "text")
    demo_steps = len(steps) - text_steps
    proposals = strategy.proposals_per_step(cfg)
    subset = strategy.max_subset(cfg)

    # task: initial validation, then per step the minibatch and, per proposal, the subset (two-stage
    # validation only; demo proposals are always validated) and the validation split; test at the end
    per_text_proposal = (subset if strategy.validate else 0) + n_val
    per_demo_proposal = subset + n_val
    task_examples = (n_val + len(steps) * cfg.batch_size + text_steps * proposals * per_text_proposal
                     + demo_steps * cfg.max_proposals * per_demo_proposal + 2 * n_test)
    # backward: per text step, each backpropagated example's trace, plus the loss's own calls
    per_trace = trainer.backward_engine.max_calls_per_example() + backward_calls_per_example(program.loss)
    backward_calls = text_steps * strategy.max_backprop(cfg) * per_trace
    # optimizer: one call per param a text proposal changes
    per_proposal = (len(trainer.trainable) or 1) if cfg.propose == "joint" else 1
    optimizer_calls = text_steps * proposals * per_proposal
    # teacher: each training example seen by a demo step, once, up to its tries
    teacher_examples = min(n_train, len(steps) * cfg.batch_size) if demo_steps else 0
    teacher_calls = teacher_examples * per_example_calls * (trainer.teacher.tries if demo_steps else 0)
    per_call = per_example_tokens // max(per_example_calls, 1)
    return {
        "task": {"calls": task_examples * per_example_calls, "tokens": task_examples * per_example_tokens},
        "backward": {"calls": backward_calls, "tokens": backward_calls * (2 * per_call + 600)},
        "optimizer": {"calls": optimizer_calls, "tokens": optimizer_calls * 2500},
        "teacher": {"calls": teacher_calls, "tokens": teacher_calls * per_call},
    }


def print_projection(program: Program, splits: dict[str, list[Example]], trainer, json_out: bool = False) -> None:
    cfg = program.spec.train
    table = project(program, splits, trainer)
    if json_out:
        print(json.dumps({"name": program.spec.name, "mode": cfg.mode, "steps": len(trainer.planned_steps()),
                          "upper_bounds": table}))
        return
    print(f"dry run: {program.spec.name}, mode {cfg.mode}, {trainer.total_steps()} steps, "
          f"train {len(splits['train'])} / val {len(splits['val'])} / test {len(splits.get('test', []))}; "
          "upper bounds, no model called (cached calls cost nothing)")
    print(f"{'role':<10} {'calls':>10} {'tokens':>12}")
    for role, row in table.items():
        print(f"{role:<10} {row['calls']:>10} {row['tokens']:>12}")
    budget = cfg.budget
    total_calls = sum(r["calls"] for r in table.values())
    if budget.max_calls and total_calls > budget.max_calls:
        print(f"note: the projection exceeds budget.max_calls {budget.max_calls}; the run stops there "
              "(status budget_exhausted)", file=sys.stderr)
