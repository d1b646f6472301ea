"""`train --dry-run`: an upper bound of the calls and tokens a run can spend, per role, without a call.

Tokens are estimated from the rendered prompts of the first validation example (4 characters
per token) plus each model config's max_tokens for the reply (256 when unset).
"""
from __future__ import annotations

import json
import sys

from autodiff_cli.data.loaders import Example
from autodiff_cli.engine.program import Program, Scope, invocations
from autodiff_cli.grad.loss import backward_calls_per_example
from autodiff_cli.nodes.base import NodeKind as CompiledNode
from autodiff_cli.optim.base import Plan

CHARS_PER_TOKEN = 4
DEFAULT_REPLY_TOKENS = 256


def llm_invocations(scope: Scope, repeat: int = 1) -> list[tuple[CompiledNode, int]]:
    """Each node that calls a model with the most times one example can invoke it (loops unrolled)."""
    return [(node, times) for node, times in invocations(scope, repeat) if node.max_model_calls()]


def _prompt_tokens(node: CompiledNode, example: Example, values: dict[str, str]) -> int:
    context = {**values, "input": example.fields, "state": {}, "iteration": 0}
    chars = 0
    for tmpl in node.templates().values():
        try:
            chars += len(tmpl.render({**{n: "" for n in tmpl.names}, **context}))
        except Exception:  # other nodes' outputs are unknown before running: count the template text
            chars += len(tmpl.source)
    return chars // CHARS_PER_TOKEN + 1


def project(program: Program, splits: dict[str, list[Example]], trainer) -> dict[str, dict[str, int]]:
    """Upper bounds per role. Every count comes from the objects that decide the calls in a run: the
    trainer's planned steps and the optimizer of each, the mode's policies (subset, backpropagated
    examples), each optimizer's acceptance rule (what judging a candidate scores), proposals and own
    calls (`max_calls`), the loss (its own backward calls) and the backward engine (calls per trace)."""
    cfg = program.spec.train
    mode = trainer.mode
    values = {n: p.value for n, p in program.params.items()}
    sample = splits["val"][0]
    per_example_calls = 0
    per_example_tokens = 0
    for node, times in llm_invocations(program.scope):
        calls = times * node.max_model_calls()
        reply = max((program.spec.models[m].max_tokens or DEFAULT_REPLY_TOKENS for m in node.models()),
                    default=DEFAULT_REPLY_TOKENS)
        per_example_calls += calls
        per_example_tokens += calls * (_prompt_tokens(node, sample, values) + reply)
    n_val, n_test, n_train = len(splits["val"]), len(splits.get("test", [])), len(splits["train"])
    steps = trainer.planned_steps()
    per_trace = trainer.backward_engine.max_calls_per_example() + backward_calls_per_example(program.loss)
    # task: the initial validation, every step's minibatch, judging the candidates, the test split twice
    task_examples = n_val + len(steps) * cfg.batch_size + 2 * n_test
    calls = {"task": 0, "backward": 0, "optimizer": 0, "teacher": 0}
    for kind, optimizer in trainer.optimizers.items():
        its = [s for s, k in steps if k == kind]
        if not its:
            continue
        batching = optimizer.batching(mode)
        judged = optimizer.acceptance(mode).max_examples(cfg, batching.max_subset(cfg), n_val)
        task_examples += len(its) * optimizer.max_proposals(mode) * judged
        if optimizer.uses_gradients:
            calls["backward"] += len(its) * mode.feedback.max_backprop(cfg, batching) * per_trace
        plan = Plan(its, trainer.total_steps(), n_train, cfg.batch_size, per_example_calls, n_val)
        for role, n in optimizer.max_calls(plan, mode).items():
            calls[role] += n
    per_call = per_example_tokens // max(per_example_calls, 1)
    return {
        "task": {"calls": task_examples * per_example_calls + calls["task"],
                 "tokens": task_examples * per_example_tokens + calls["task"] * per_call},
        "backward": {"calls": calls["backward"], "tokens": calls["backward"] * (2 * per_call + 600)},
        "optimizer": {"calls": calls["optimizer"], "tokens": calls["optimizer"] * 2500},
        "teacher": {"calls": calls["teacher"], "tokens": calls["teacher"] * per_call},
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
