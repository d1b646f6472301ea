"""`train --dry-run`: an upper bound of the calls and tokens a run can spend, per role, without a call.

Tokens are estimated from the rendered prompts of the first validation example (4 characters
per token) plus each model config's max_tokens for the reply (256 when unset).
"""
from __future__ import annotations

import sys

from .compiler import CompiledNode, Program, Scope
from .data.loaders import Example

CHARS_PER_TOKEN = 4
DEFAULT_REPLY_TOKENS = 256


def llm_invocations(scope: Scope, repeat: int = 1) -> list[tuple[CompiledNode, int]]:
    """Each llm node with the most times one example can invoke it (loops unrolled)."""
    out: list[tuple[CompiledNode, int]] = []
    for node in scope.nodes.values():
        if node.kind == "llm":
            out.append((node, repeat))
        elif node.body is not None:
            out += llm_invocations(node.body, repeat * node.max_iters)
    return out


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
    cfg = program.spec.train
    values = {n: p.value for n, p in program.params.items()}
    sample = splits["val"][0]
    per_example_calls = 0
    per_example_tokens = 0
    for node, times in llm_invocations(program.scope):
        reply = program.spec.models[node.model].max_tokens or DEFAULT_REPLY_TOKENS
        per_example_calls += times
        per_example_tokens += times * (_prompt_tokens(node, sample, values) + reply)
    n_val, n_test = len(splits["val"]), len(splits.get("test", []))
    steps = trainer.total_steps() if cfg.mode != "none" else 0
    demo_steps = sum(1 for s in range(1, steps + 1) if trainer.step_kind(s) == "demos")
    text_steps = steps - demo_steps
    subset = cfg.max_error_samples + cfg.max_correct_samples
    task_examples = n_val + steps * (cfg.batch_size + cfg.max_proposals * (subset + n_val)) + 2 * n_test
    n_params = len(trainer.trainable) or 1
    backward_calls = text_steps * cfg.max_error_samples * per_example_calls if cfg.mode == "autodiff" else 0
    optimizer_calls = text_steps * cfg.max_proposals * (n_params if cfg.propose == "joint" else 1)
    if cfg.mode == "none":
        backward_calls = optimizer_calls = 0
    # on demo steps the teacher runs each training example seen so far at most once (up to its tries)
    teacher_examples = min(len(splits["train"]), steps * cfg.batch_size) if demo_steps else 0
    teacher_calls = teacher_examples * per_example_calls * (trainer.teacher.tries if demo_steps else 0)
    return {
        "task": {"calls": task_examples * per_example_calls, "tokens": task_examples * per_example_tokens},
        "backward": {"calls": backward_calls, "tokens": backward_calls * (2 * per_example_tokens // max(per_example_calls, 1) + 600)},
        "optimizer": {"calls": optimizer_calls, "tokens": optimizer_calls * 2500},
        "teacher": {"calls": teacher_calls, "tokens": teacher_calls * (per_example_tokens // max(per_example_calls, 1))},
    }


def print_projection(program: Program, splits: dict[str, list[Example]], trainer) -> None:
    cfg = program.spec.train
    table = project(program, splits, trainer)
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
