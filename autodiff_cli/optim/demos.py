"""Few-shot demos: the `demos` parameter kind, bootstrapped by a teacher, sampled with weights.

A demos param belongs to the one llm node whose template reads it. Its value is a rendered
block of worked examples: each shows the example's `fields` (default: the `input.X` fields the
node reads) and then either the node's output in a teacher's successful trace (`response:`,
i.e. reasoning and answer) or, for a raw labelled example, the expected answer
(`<target field>:`). Demo ids are data ids, so a set of demos is reproducible and resumable.

Bootstrapping: a teacher (the model config `train.teacher`, or each node's own model config at
temperature 0.7) runs training examples through the whole pipeline, up to three tries per
example (one when the named teacher has temperature 0). The try number salts the call cache
key, so tries are separate calls that the cache still replays on resume. A trace whose training
score reaches `fail_threshold` becomes a candidate; the node's output in it is the demo.

Sampling: candidates where the teacher succeeds and the student (the current prompts) fails
weigh most (weight BASE_WEIGHT + max(0, teacher score - student score)); raw labelled examples
(weighted towards those the student fails) fill the remaining shots. The random generator is
seeded per (seed, step, attempt, param), so proposals need no RNG state in the checkpoint.
"""
from __future__ import annotations

import asyncio
import json
import random
from dataclasses import dataclass
from typing import Any

from autodiff_cli.optim.base import (
    Candidate,
    NoCandidate,
    Optimizer,
    OptimizerEnv,
    Plan,
    StepContext,
)
from autodiff_cli.optim.policies import TwoStage

DEFAULT_SHOTS = 3
TEACHER_TRIES = 3
TEACHER_TEMPERATURE = 0.7
BASE_WEIGHT = 0.1  # every candidate keeps a chance; teacher-pass/student-fail ones weigh 11x more
UNKNOWN_STUDENT = 0.5  # student score assumed for an example the student has not been scored on
MAX_DRAWS = 20  # redraws before giving up on finding a demo set not tried yet


@dataclass(frozen=True)
class DemoParam:
    name: str
    node: str  # the llm node whose prompt uses it
    fields: tuple[str, ...]  # example fields each demo shows
    shots: int
    label: str | None  # the example field holding the expected answer (raw demos); None: no raw demos


def demo_params(program: Any) -> dict[str, DemoParam]:
    """Every `kind: demos` param of a compiled program (the compiler checked each has one llm node)."""
    label = _label_field(program)
    out: dict[str, DemoParam] = {}
    for name, spec in program.params.items():
        if spec.kind != "demos":
            continue
        node = next(n for n in program.all_nodes() if n.reads_demos and name in n.params)
        if spec.fields is not None:
            fields = tuple(spec.fields)
        else:
            fields = tuple(dict.fromkeys(str(r.path[0]) for r in node.reads if r.root == "input" and r.path))
        out[name] = DemoParam(name, node.name, fields, DEFAULT_SHOTS if spec.max is None else spec.max, label)
    return out


def _label_field(program: Any) -> str | None:
    """The example field the metric compares against: its `target` argument, else its only `input.X` argument."""
    args = program.metric.args
    refs = [args["target"]] if "target" in args else [r for r in args.values() if r.root == "input"]
    if len(refs) == 1 and refs[0].root == "input" and len(refs[0].path) == 1:
        return str(refs[0].path[0])
    return None


def step_kind(schedule: str, step: int, total_steps: int) -> str:
    """"text" or "demos": what step `step` (1-based) of `total_steps` proposes under `train.demos`."""
    if schedule == "off":
        return "text"
    if schedule == "demos_only":
        return "demos"
    if schedule == "interleaved":
        return "text" if step % 2 == 1 else "demos"
    first_half = step <= (total_steps + 1) // 2
    if schedule == "text_then_demos":
        return "text" if first_half else "demos"
    if schedule == "demos_then_text":
        return "demos" if first_half else "text"
    raise ValueError(f"unknown demo schedule {schedule!r}")


# ---------------------------------------------------------------- rendering


def _show(value: Any) -> str:
    if isinstance(value, str):
        return value.strip()
    return json.dumps(value, ensure_ascii=False, sort_keys=True, default=str)


def render(param: DemoParam, ids: dict[str, list[str]], examples: dict[str, Any], teacher: dict[str, dict]) -> str:
    """The text of a demo set: bootstrapped demos (teacher outputs) first, then raw labelled ones."""
    blocks = []
    for kind in ("bootstrapped", "raw"):
        for demo_id in ids.get(kind, []):
            fields = examples[demo_id].fields
            lines = [f"Example {len(blocks) + 1}:"]
            lines += [f"{f}: {_show(fields.get(f))}" for f in param.fields]
            if kind == "bootstrapped":
                lines.append(f"response: {_show(teacher[demo_id]['outputs'][param.name])}")
            else:
                lines.append(f"{param.label}: {_show(fields.get(param.label))}")
            blocks.append("\n".join(lines))
    return "\n\n".join(blocks)


# ---------------------------------------------------------------- sampling


def weighted_sample(items: list[str], weights: list[float], k: int, rng: random.Random) -> list[str]:
    """k items without replacement, each drawn with probability proportional to its weight
    (Efraimidis-Spirakis keys u^(1/w)); deterministic for a given rng and item order."""
    keyed = sorted(((rng.random() ** (1.0 / w), item) for item, w in zip(items, weights) if w > 0), reverse=True)
    return [item for _, item in keyed[:k]]


def draw(param: DemoParam, teacher: dict[str, dict], student: dict[str, float], train_ids: list[str],
         rng: random.Random) -> dict[str, list[str]]:
    """One demo set: {"bootstrapped": ids, "raw": ids}, each sorted."""
    candidates = sorted(i for i, r in teacher.items() if param.name in r.get("outputs", {}))
    weights = [BASE_WEIGHT + max(0.0, teacher[i]["score"] - student.get(i, UNKNOWN_STUDENT)) for i in candidates]
    boot = weighted_sample(candidates, weights, param.shots, rng)
    raw: list[str] = []
    if param.label is not None and len(boot) < param.shots:
        rest = [i for i in sorted(train_ids) if i not in boot]
        raw_weights = [BASE_WEIGHT + 1.0 - student.get(i, UNKNOWN_STUDENT) for i in rest]
        raw = weighted_sample(rest, raw_weights, param.shots - len(boot), rng)
    return {"bootstrapped": sorted(boot), "raw": sorted(raw)}


def propose(param: DemoParam, *, seed: int, step: int, attempt: int, teacher: dict[str, dict],
            student: dict[str, float], examples: dict[str, Any], current: str,
            tried: set[str]) -> tuple[str, dict[str, list[str]]] | None:
    """A new value for `param` (and its demo ids) that is neither the current value nor one in
    `tried`; None when no such demo set turns up."""
    rng = random.Random(f"{seed}:demos:{step}:{attempt}:{param.name}")
    for _ in range(MAX_DRAWS):
        ids = draw(param, teacher, student, list(examples), rng)
        if not ids["bootstrapped"] and not ids["raw"]:
            return None
        value = render(param, ids, examples, teacher)
        if value != current and value not in tried:
            return value, ids
    return None


# ---------------------------------------------------------------- the teacher


class Teacher:
    """Runs training examples through the pipeline with the teacher's model configs (role `teacher`)."""

    def __init__(self, program: Any, client: Any, name: str | None, fail_threshold: float) -> None:
        self.program = program
        self.client = client
        self.threshold = fail_threshold
        spec = program.spec
        node_models = sorted({m for n in program.all_nodes() for m in n.models()})
        if name is not None:
            self.models = {m: name for m in node_models}
            temperature = spec.models[name].temperature
            self.tries = TEACHER_TRIES if temperature is None or temperature > 0 else 1
        else:
            self.models = {}
            for m in node_models:
                derived = f"{m}@teacher"  # `@` keeps it apart from any name a spec can use
                client.add_model(derived, spec.models[m].model_copy(update={"temperature": TEACHER_TEMPERATURE}))
                self.models[m] = derived
            self.tries = TEACHER_TRIES

    async def run(self, examples: list[Any], values: dict[str, str], params: list[DemoParam]) -> dict[str, dict]:
        """{example id: {"tries", "score", "outputs": {param: node output}}}; outputs only on success."""
        from autodiff_cli.engine.forward import ForwardEngine, score

        async def one(example: Any) -> dict:
            best: float | None = None
            for attempt in range(1, self.tries + 1):
                engine = ForwardEngine(self.program, self.client, models=self.models, role="teacher", salt=attempt)
                trace = await engine.run(example.id, example.fields, values)
                if trace.error is not None:
                    continue  # a failed call is a failed try, never a wrong answer to learn from
                result = score(self.program.loss, trace)
                best = result if best is None else max(best, result)
                if result >= self.threshold:
                    return {"tries": attempt, "score": result, "outputs": _outputs(trace, params)}
            return {"tries": self.tries, "score": best, "outputs": {}}

        results = await asyncio.gather(*(one(e) for e in examples))
        return {e.id: r for e, r in zip(examples, results)}


def _outputs(trace: Any, params: list[DemoParam]) -> dict[str, Any]:
    """Each param's demo output: its node's first invocation in the trace (loops: call #0)."""
    out: dict[str, Any] = {}
    for p in params:
        call = next((c for c in trace.calls if c.node == p.node and c.call_index == 0), None)
        if call is not None and call.output is not None:
            out[p.name] = call.output
    return out


# ---------------------------------------------------------------- the optimizer


class DemoBootstrap(Optimizer):
    """Few-shot demos (DSPy's BootstrapFewShot, with the paper's weighting): on its steps, a teacher
    runs the minibatch and the failed pool's examples it has not seen; each proposal is a weighted
    sample of demo sets for the trainable demos params. Its candidates are always validated (two
    stages), whatever the mode: a demo set is never taken blind."""

    name = "demos"
    param_kind = "demos"
    step_kind = "demos"

    def __init__(self, env: OptimizerEnv, options=None) -> None:
        super().__init__(env, options)
        self.params = demo_params(env.program)
        self.teacher_runs: dict[str, dict] = {}  # example id -> {tries, score, outputs}
        self.student_scores: dict[str, float] = {}  # example id -> its latest training score
        self._teacher: Teacher | None = None

    @property
    def teacher(self) -> Teacher:
        if self._teacher is None:
            cfg = self.env.cfg
            self._teacher = Teacher(self.env.program, self.env.client, cfg.teacher, cfg.fail_threshold)
        return self._teacher

    def observe(self, entries: list) -> None:
        for entry in entries:
            self.student_scores[entry.example.id] = entry.score

    async def begin_step(self, ctx: StepContext) -> str | None:
        self.targets = self.trainable()
        if not self.targets:
            return "no trainable demos parameter"
        examples = self.env.examples
        pending = list({e.id: e for e in ctx.batch + [examples[i] for i in ctx.state.failed_pool]
                        if e.id not in self.teacher_runs}.values())
        if pending:
            self.env.on_phase("bootstrap", {"step": ctx.step, "examples": len(pending), "tries": self.teacher.tries})
            runs = await self.teacher.run(pending, ctx.values, [self.params[p] for p in self.targets])
            self.teacher_runs.update(runs)
            ctx.trace_rows += [{"kind": "teacher", "step": ctx.step, "example_id": i, **r} for i, r in sorted(runs.items())]
        return None

    async def propose(self, ctx: StepContext) -> Candidate | NoCandidate:
        targets = self.targets
        changing = targets if self.env.cfg.propose == "joint" else [targets[(ctx.attempt - 1) % len(targets)]]
        new: dict[str, str] = {}
        ids: dict[str, dict[str, list[str]]] = {}
        for p in changing:
            tried = {r.params[p] for r in ctx.rejected if p in r.params}
            picked = propose(self.params[p], seed=self.env.cfg.seed, step=ctx.step, attempt=ctx.attempt,
                             teacher=self.teacher_runs, student=self.student_scores, examples=self.env.examples,
                             current=ctx.values[p], tried=tried)
            if picked is not None:
                new[p], ids[p] = picked
                ctx.trace_rows.append({"kind": "demos", "step": ctx.step, "attempt": ctx.attempt, "param": p,
                                       "ids": ids[p], "value": new[p]})
        if not new:
            return NoCandidate("no demo set left to try (no new bootstrapped or labelled examples)")
        return Candidate(new, demo_ids=ids)

    def acceptance(self, mode):
        return TwoStage()

    def max_proposals(self, mode) -> int:
        return self.env.cfg.max_proposals

    def state_dict(self) -> dict:
        return {"teacher": self.teacher_runs, "student_scores": self.student_scores}

    def load_state_dict(self, state: dict) -> None:
        self.teacher_runs = dict(state.get("teacher") or {})
        self.student_scores = dict(state.get("student_scores") or {})

    def max_calls(self, plan: Plan, mode) -> dict[str, int]:
        # each training example seen by the run (minibatches, pools) is bootstrapped once, up to its tries
        examples = min(plan.n_train, plan.total_steps * plan.batch_size) if plan.steps else 0
        return {"teacher": examples * plan.per_example_calls * (self.teacher.tries if plan.steps else 0)}
