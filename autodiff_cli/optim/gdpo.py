"""GDPO: the text optimizer that proposes a new value for one prompt parameter.

One proposal = one optimizer-LLM call. The request carries everything the paper's GDPO
shows the optimizer: the parameter's value and role, its peers (the other parts of the same
prompt), the other trainable parameters, the best accepted values with their validation
scores, this step's failed proposals, and the textual gradients per example, worst example
first (or, with no gradients, the worst samples themselves). The meta-prompt lives in
`prompts/optimizer.{system,user}.j2`; this module only prepares a plain, canonically ordered
context for it, so the rendered text is identical whatever order the caller used.

Unlike AdalFlow, a reply that cannot be parsed never becomes the new prompt, and a value that
copies the optimizer's own instructions is rejected (see `leaks_meta_prompt`).
"""
from __future__ import annotations

import asyncio
import json
import logging
import re
from dataclasses import dataclass
from functools import lru_cache
from importlib import resources
from typing import Any

from jinja2 import Environment, TemplateSyntaxError

from autodiff_cli.errors import ModelCallError
from autodiff_cli.optim.base import (
    Candidate,
    NoCandidate,
    Optimizer,
    OptimizerEnv,
    Plan,
    StepContext,
)
from autodiff_cli.optim.guards import (
    COPY_WORDS,
    copied_span,
    diagnosis_of,
    ngrams,
    shared_run,
    words,
)
from autodiff_cli.prompts import metaprompts
from autodiff_cli.spec.params import DEMOS_ROLE, in_prompt

log = logging.getLogger("autodiff.optimizer")

# The editing methods the optimizer chooses from (described in prompts/optimizer.system.j2).
METHODS = ("add_instruction", "add_example", "rephrase", "simplify")

PROPOSAL_SCHEMA: dict = {
    "type": "object",
    "properties": {
        # a length cap keeps small local models from looping in the reasoning until max_tokens
        # (large caps make llama.cpp grammars deep enough to crash; keep it small)
        "reasoning": {"type": "string", "maxLength": 600},
        "method": {"type": "string", "enum": list(METHODS)},
        "new_value": {"type": "string"},
    },
    "required": ["reasoning", "method", "new_value"],
    "additionalProperties": False,
}

BOLD_AFTER = 2  # steps without improvement after which the optimizer is asked for a bolder change
FIELD_LIMIT = 1500  # characters of one shown input/output/target before it is shortened
LEAK_WORDS = 8
RAW_LOG_LIMIT = 500


# --- the request -------------------------------------------------------------------------------


@dataclass
class FeedbackItem:
    """One textual gradient for the parameter."""

    example_id: str
    score: float
    node: str
    call_index: int
    topo_index: int
    feedback: str


@dataclass
class SampleView:
    """What one example looked like (shown in no_gradient mode, and as context for feedback)."""

    example_id: str
    inputs: dict
    output: Any
    target: Any
    score: float


@dataclass
class HistoryEntry:
    step: int
    values: dict[str, str]
    val_score: float


@dataclass
class FailedProposal:
    values: dict[str, str]
    subset_score: float | None
    val_score: float | None
    reason: str


@dataclass
class ParamView:
    name: str
    value: str
    role: str | None


@dataclass
class ProposalRequest:
    param: ParamView  # the parameter to improve
    peers: list[ParamView]  # other params of the same node prompt(s)
    others: list[ParamView]  # the other trainable params of the pipeline
    history: list[HistoryEntry]  # the best accepted values (highest validation score first)
    failed: list[FailedProposal]  # this step's failed proposals
    feedback: list[FeedbackItem]  # empty in no_gradient mode
    samples: list[SampleView]  # the backpropagated subset (worst first)
    constraints: list[str]
    steps_since_improvement: int
    mode: str  # "autodiff" | "no_gradient"
    # every param's current value (fixed ones and empty demos too); history entries name the
    # values that differed from these. Default: the values shown above.
    current: dict[str, str] | None = None


@dataclass
class Proposal:
    param: str
    value: str | None  # None: no proposal (see `reason`)
    reason: str  # why there is no value; with a value, the optimizer's own reasoning
    method: str | None
    raw: str  # the optimizer's whole reply, kept for the logs
    refused: str | None = None  # a value refused because it copies an example or a diagnosis (see `reason`)


# --- rendering ---------------------------------------------------------------------------------


def render_optimizer_messages(request: ProposalRequest) -> list[dict]:
    """The optimizer's system and user messages, from prompts/optimizer.*.j2."""
    if request.mode not in ("autodiff", "no_gradient"):
        raise ValueError(f"unknown optimizer mode {request.mode!r}; expected autodiff or no_gradient")
    return metaprompts.messages("optimizer", **_context(request))


def _context(request: ProposalRequest) -> dict[str, Any]:
    param = request.param
    current = request.current or {p.name: p.value for p in [param, *request.peers, *request.others]}
    samples = {s.example_id: _sample(s) for s in request.samples}
    history = sorted(request.history, key=lambda h: (-h.val_score, h.step))
    failed = sorted(request.failed, key=lambda f: (_values_key(f.values), f.reason))
    return {
        "mode": request.mode,
        "param": _param(param),
        "peers": [_param(p) for p in sorted(request.peers, key=lambda p: p.name)],
        "others": [_param(p) for p in sorted(request.others, key=lambda p: p.name)],
        "history": [
            {"step": h.step, "val_score": _score(h.val_score), **_values(h.values, param.name, current)}
            for h in history
        ],
        "failed": [
            {"subset_score": _score(f.subset_score), "val_score": _score(f.val_score), "reason": f.reason,
             **_values(f.values, param.name, current)}
            for f in failed
        ],
        "examples": _feedback_groups(request.feedback, samples) if request.mode == "autodiff" else [],
        "samples": [samples[s.example_id] for s in sorted(request.samples, key=lambda s: (s.score, s.example_id))],
        "constraints": list(request.constraints),
        "steps_since_improvement": request.steps_since_improvement,
        "bold": request.steps_since_improvement >= BOLD_AFTER,
    }


def _param(p: ParamView) -> dict[str, str]:
    return {"name": p.name, "value": p.value, "role": p.role or "not described"}


def _values(values: dict[str, str], name: str, current: dict[str, str]) -> dict[str, Any]:
    """The parameter's value in a history entry or failed proposal, plus the other values that
    differed from the current ones then (so a change made elsewhere is not mistaken for this one's)."""
    also = [{"name": k, "value": v} for k, v in sorted(values.items()) if k != name and current.get(k) != v]
    return {"value": values.get(name, current.get(name, "")), "also": also}


def _values_key(values: dict[str, str]) -> tuple:
    return tuple(sorted(values.items()))


def _feedback_groups(items: list[FeedbackItem], samples: dict[str, dict]) -> list[dict]:
    """Feedback grouped per example, worst example first; within one example in topological
    order, then call order (time-sequential gradients of one node stay in call order)."""
    ordered = sorted(items, key=lambda f: (f.score, f.example_id, f.topo_index, f.call_index, f.node, f.feedback))
    groups: dict[str, dict] = {}
    for f in ordered:
        group = groups.get(f.example_id)
        if group is None:
            sample = samples.get(f.example_id)
            group = groups[f.example_id] = {"example_id": f.example_id, "score": _score(f.score),
                                            "sample": sample, "entries": []}
        group["entries"].append({"label": f"[example {f.example_id} | node {f.node} | call {f.call_index}]",
                               "node": f.node, "call_index": f.call_index, "feedback": f.feedback.strip()})
    return list(groups.values())


def _sample(s: SampleView) -> dict[str, Any]:
    inputs = s.inputs if isinstance(s.inputs, dict) else {"input": s.inputs}
    return {
        "example_id": s.example_id,
        "score": _score(s.score),
        "inputs": [{"name": str(k), "value": _show(v)} for k, v in sorted(inputs.items(), key=lambda kv: str(kv[0]))],
        "output": _show(s.output),
        "target": _show(s.target),
    }


def _show(value: Any) -> str:
    if value is None:
        text = "(none)"
    elif isinstance(value, str):
        text = value
    else:
        text = json.dumps(value, ensure_ascii=False, sort_keys=True, default=str)
    text = text.strip()
    if len(text) > FIELD_LIMIT:
        text = text[:FIELD_LIMIT].rstrip() + f" ... [{len(text) - FIELD_LIMIT} more characters]"
    return text


def _score(score: float | None) -> str:
    return "not measured" if score is None else f"{score:.3f}"


# --- parsing -----------------------------------------------------------------------------------

_NEW_VALUE_BLOCK = re.compile(r"<NEW_VALUE>(.*?)</NEW_VALUE>", re.IGNORECASE | re.DOTALL)
_DECODER = json.JSONDecoder(strict=False)  # small models put raw newlines inside JSON strings
_MAX_OBJECT_STARTS = 200


def parse_proposal(raw: str) -> tuple[str | None, str | None, str]:
    """(new_value, method, reason) from the optimizer's reply.

    Accepts the JSON object alone, in a code fence, or surrounded by prose, or else a
    <NEW_VALUE>...</NEW_VALUE> block. When new_value is None, `reason` says why; otherwise it is
    the optimizer's reasoning ("" if it gave none). Never falls back to the raw reply itself.
    """
    objects = _json_objects(raw or "")
    chosen = next((o for o in objects if "new_value" in o), None)
    if chosen is not None:
        method = _method(chosen.get("method"))
        reasoning = chosen.get("reasoning")
        reasoning = reasoning.strip() if isinstance(reasoning, str) else ""
        value = chosen["new_value"]
        if not isinstance(value, str):
            return None, method, f"`new_value` is not text (got {type(value).__name__})"
        value = _unwrap(value)
        if not value:
            return None, method, "the proposed value is empty"
        return value, method, reasoning
    block = _NEW_VALUE_BLOCK.search(raw or "")
    if block is not None:
        value = block.group(1).strip()
        if not value:
            return None, None, "the proposed value is empty"
        return value, None, ""
    if objects:
        return None, _method(objects[0].get("method")), "the reply's JSON object has no `new_value`"
    return None, None, "unparseable reply: no JSON object with `new_value` and no <NEW_VALUE> block"


_VALUE_TAG = re.compile(r"^\s*<VALUE>\s*|\s*</VALUE>\s*$", re.IGNORECASE)


def _unwrap(value: str) -> str:
    """Drop the <VALUE> delimiters the meta-prompt shows values in, if the model copied them."""
    return _VALUE_TAG.sub("", value.strip()).strip()


def _json_objects(text: str) -> list[dict]:
    """Every JSON object found in the text: the whole text, then from each `{` left to right."""
    found: list[dict] = []
    stripped = text.strip()
    try:
        whole = _DECODER.decode(stripped)
    except (ValueError, RecursionError):  # a reply nested thousands deep is no proposal
        whole = None
    if isinstance(whole, dict):
        return [whole]
    position, starts = 0, 0
    while starts < _MAX_OBJECT_STARTS:
        start = text.find("{", position)
        if start < 0:
            break
        starts += 1
        try:
            obj, end = _DECODER.raw_decode(text, start)
        except (ValueError, RecursionError):
            position = start + 1
            continue
        if isinstance(obj, dict):
            found.append(obj)
            position = end
        else:
            position = start + 1
    return found


def _method(value: Any) -> str | None:
    if not isinstance(value, str) or not value.strip():
        return None
    return re.sub(r"[\s\-/]+", "_", value.strip().lower())


# --- leaks of the meta-prompt ------------------------------------------------------------------


def _template_texts() -> tuple[str, ...]:
    folder = resources.files("autodiff_cli.prompts")
    return tuple(entry.read_text(encoding="utf-8") for entry in sorted(folder.iterdir(), key=lambda e: e.name)
                 if entry.name.endswith(".j2"))


@lru_cache(maxsize=64)
def _static_ngrams(source: str, n: int) -> frozenset[tuple[str, ...]]:
    """The n-word runs of a template's static text: each stretch of literal text between two
    Jinja tags, and each string constant inside a tag, taken apart (values are not static)."""
    chunks: list[str] = []
    current: list[str] = []
    try:
        tokens = list(Environment().lex(source))
    except TemplateSyntaxError:
        tokens = [(0, "data", source)]
    for _, kind, value in tokens:
        if kind == "data":
            current.append(value)
            continue
        if current:
            chunks.append("".join(current))
            current = []
        if kind == "string":
            chunks.append(value)
    if current:
        chunks.append("".join(current))
    grams: set[tuple[str, ...]] = set()
    for chunk in chunks:
        grams |= ngrams(words(chunk), n)
    return frozenset(grams)


def leaks_meta_prompt(value: str, n: int = LEAK_WORDS, *, ignore: str | None = None) -> str | None:
    """The first run of n consecutive words (case and punctuation ignored) that `value` shares
    with the static text of a meta-prompt template in autodiff_cli/prompts/, or None.

    Runs that also occur in `ignore` (e.g. the parameter's current value) are not leaks.
    """
    static: set[tuple[str, ...]] = set()
    for source in _template_texts():
        static |= _static_ngrams(source, n)
    return shared_run(value, static, n, ngrams(words(ignore), n) if ignore else frozenset())


# --- one proposal ------------------------------------------------------------------------------


def copy_sources(request: ProposalRequest) -> dict[str, str]:
    """What a proposal must not paste: each shown example's inputs and target, and each diagnosis."""
    sources: dict[str, str] = {}
    for s in request.samples:
        for name, value in sorted(s.inputs.items()) if isinstance(s.inputs, dict) else []:
            sources[f"training example {s.example_id}'s {name}"] = _show(value)
        if s.target is not None:
            sources[f"training example {s.example_id}'s target"] = _show(s.target)
    for f in request.feedback:
        diagnosis = diagnosis_of(f.feedback)
        if diagnosis:
            sources.setdefault(f"the diagnosis of example {f.example_id}", diagnosis)
    return sources


def _same(a: str, b: str) -> bool:
    return " ".join(a.split()) == " ".join(b.split())


async def propose(client, model_name: str, request: ProposalRequest, *, salt: str | None = None) -> Proposal:
    """Ask the optimizer model for a new value of `request.param`.

    Returns a Proposal whose value is None (with the reason) when the reply is unparseable or
    empty, leaves the value unchanged, copies the optimizer's instructions, or repeats a failed
    proposal of this step. A model call that fails after retries raises ModelCallError: that is
    the caller's to count, never a proposal. `salt` joins the cache key (asking again after an
    unusable reply to the same request).
    """
    name = request.param.name
    messages = render_optimizer_messages(request)
    extra = {} if salt is None else {"salt": salt}
    completion = await client.complete(model_name, messages, role="optimizer", json_schema=PROPOSAL_SCHEMA, **extra)
    raw = completion.text
    value, method, reason = parse_proposal(raw)
    if value is None:
        if reason.startswith("unparseable") or "no `new_value`" in reason or "not text" in reason:
            log.warning("optimizer reply for %s not parsed (%s): %s", name, reason, raw[:RAW_LOG_LIMIT])
        return Proposal(name, None, reason, method, raw)
    if _same(value, request.param.value):
        return Proposal(name, None, "the proposed value is unchanged", method, raw)
    leaked = leaks_meta_prompt(value, ignore=request.param.value)
    if leaked is not None:
        return Proposal(name, None, f"shares {LEAK_WORDS} words with the optimizer's instructions: \"{leaked}\"",
                        method, raw)
    copied = copied_span(value, copy_sources(request), ignore=[p.value for p in (request.param, *request.peers,
                                                                                 *request.others)])
    if copied is not None:
        source, run = copied
        return Proposal(name, None, f"refused: it copies {COPY_WORDS} words of {source} (\"{run}\"); "
                                    "write a rule that holds for every example instead", method, raw, refused=value)
    for failed in request.failed:
        if name in failed.values and _same(value, failed.values[name]):
            return Proposal(name, None, "identical to a failed proposal of this step", method, raw)
    return Proposal(name, value, reason, method, raw)


# --- the optimizer -----------------------------------------------------------------------------

OPTIMIZER_CALL_FAILED = "optimizer call failed"  # a proposal's reason when its call failed after retries


def param_role(spec) -> str | None:
    """The role shown for a param whose spec gives none (a demos param has a standard one)."""
    return DEMOS_ROLE if spec.kind == "demos" else None


class GDPO(Optimizer):
    """The paper's optimizer: per step, a new value for each prompt param that received feedback
    (no_gradient mode: that the failed examples used), one optimizer call per param and proposal;
    `train.propose: joint` changes them all in one proposal, `one_at_a_time` one per proposal."""

    name = "gdpo"
    param_kind = "prompt"
    step_kind = "text"
    uses_gradients = True

    def __init__(self, env: OptimizerEnv, options=None) -> None:
        super().__init__(env, options)
        self._unusable: dict[str, int] = {}
        self._calls: int = 0
        self._errors: list[str] = []

    async def begin_step(self, ctx: StepContext) -> str | None:
        self._unusable, self._calls, self._errors = {}, 0, []
        trainable = set(self.trainable())
        order = list(self.env.program.params)
        if ctx.with_gradients:
            with_feedback = {g.target.removeprefix("param:") for g in ctx.gradients if g.target.startswith("param:")}
            self.targets = [p for p in order if p in trainable and p in with_feedback]
        else:  # the optimizer sees samples only: the params the failed examples used
            used = {p for e in ctx.failed for c in e.trace.calls for p in c.params}
            self.targets = [p for p in order if p in trainable and p in used]
        return None if self.targets else "no parameter received feedback"

    async def propose(self, ctx: StepContext) -> Candidate | NoCandidate:
        targets = self.targets
        changing = targets if self.env.cfg.propose == "joint" else [targets[(ctx.attempt - 1) % len(targets)]]
        # A proposal with no value (unparseable, unchanged, ...) leaves the next request identical:
        # a salt then makes it a new call instead of a cache hit of the same unusable reply.
        proposals = await asyncio.gather(*(
            self._propose(self.request(ctx, p), salt=f"again-{self._unusable[p]}" if self._unusable.get(p) else None)
            for p in changing))
        for p in proposals:
            if p.value is None:
                self._unusable[p.param] = self._unusable.get(p.param, 0) + 1
            if p.reason.startswith(OPTIMIZER_CALL_FAILED):
                self._errors.append(p.reason)
        self._calls += len(proposals)
        ctx.trace_rows += [{"kind": "proposal", "step": ctx.step, "attempt": ctx.attempt, "param": p.param,
                            "value": p.value, "method": p.method, "reason": p.reason, "raw": p.raw} for p in proposals]
        refused = {p.param: p.refused for p in proposals if p.refused is not None}
        if refused:  # the whole proposal: its other values were written with the copy in mind
            return NoCandidate("; ".join(p.reason for p in proposals if p.refused is not None), values=refused)
        new = {p.param: p.value for p in proposals if p.value is not None}
        if not new:
            return NoCandidate("no usable proposal: " + "; ".join(p.reason for p in proposals))
        return Candidate(new)

    def step_call_errors(self) -> tuple[list[str], int]:
        return list(self._errors), self._calls

    async def _propose(self, request: ProposalRequest, salt: str | None = None) -> Proposal:
        try:
            return await propose(self.env.client, self.env.optimizer_model, request, salt=salt)
        except ModelCallError as e:  # counted in usage; this attempt just has no proposal
            return Proposal(request.param.name, None, f"{OPTIMIZER_CALL_FAILED}: {e.message}", None, "")

    def request(self, ctx: StepContext, param: str) -> ProposalRequest:
        """Everything the meta-prompt shows for `param`, from the step's context."""
        program, state, cfg = self.env.program, ctx.state, self.env.cfg
        specs = program.params
        trainable = set(self.trainable())
        values = ctx.base  # the values the step started from (a population's parent, else the current ones)
        view = lambda n: ParamView(n, values[n], specs[n].role or param_role(specs[n]))
        peers = sorted({p for node in program.all_nodes() if param in node.params for p in node.params
                        if in_prompt(specs[p], values[p])} - {param})
        others = [p for p in specs if p in trainable and p != param and p not in peers]
        feedback = [FeedbackItem(g.example_id, g.score, g.node, g.call_index, g.topo_index, g.feedback)
                    for g in ctx.gradients if g.target == f"param:{param}"]
        inputs = sorted(program.input_fields)
        samples = sorted((SampleView(e.example.id, {f: e.example.fields.get(f) for f in inputs}, e.trace.output,
                                     ctx.evaluations[e.example.id].target, e.score) for e in ctx.subset),
                         key=lambda s: (s.score, s.example_id))
        history = sorted(state.history, key=lambda h: (-(h["val_score"] or 0), h["step"]))[: cfg.history_k]
        failed = [FailedProposal(r.params, r.subset_score, r.val_score, r.reason) for r in ctx.rejected if r.params]
        return ProposalRequest(
            param=view(param), peers=[view(p) for p in peers], others=[view(p) for p in others],
            history=[HistoryEntry(h["step"], h["values"], h["val_score"]) for h in history],
            failed=failed, feedback=feedback, samples=samples, constraints=list(program.spec.constraints),
            steps_since_improvement=state.steps_since_improvement,
            mode="autodiff" if ctx.with_gradients else "no_gradient", current=dict(values))

    def max_calls(self, plan: Plan, mode) -> dict[str, int]:
        per_proposal = len(self.trainable()) if self.env.cfg.propose == "joint" else 1
        return {"optimizer": len(plan.steps) * self.max_proposals(mode) * per_proposal}
