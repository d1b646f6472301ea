"""Figure 2 of issue 6: one training step of autodiff against AdalFlow 1.1.3, same pipelines, same fake server.

    python benchmarks/perf/run.py --only adalflow [--write] [--adalflow-venv DIR]

What is compared. The same two pipelines are trained by both tools for a few steps against ONE fake
OpenAI-compatible server (tests/support/fake_server.py, subclassed here, in a thread of the runner):

  single  one LLM node `count` with a trainable instruction, a parser (last integer), exact match;
  chain   three LLM nodes `listing` -> `tally` -> `answer`, each with its own trainable instruction,
          then the parser and exact match.

Both tools get the same data files, the same latency, batch size, proposals per step, error/correct
subset sizes, validation set and worker count (AdalFlow's `num_workers` = our `concurrency`). autodiff
runs as `autodiff train` (a subprocess with a fresh call cache); AdalFlow runs `Trainer.fit` (strategy
"constrained", the paper's) in its own virtual environment (`ensure_venv`), through its stock
`OpenAIClient` (which speaks the Responses API: the server answers `POST /v1/responses` too), by
benchmarks/perf/adalflow_step.py.

The fake model (`respond`) answers each tool in its own format: task nodes by node marker, the
backward engines (autodiff: a JSON object keyed by the predecessors its prompt lists; AdalFlow:
free text, or a JSON list when it asks for one) and the optimizers (autodiff: {"reasoning",
"method", "new_value"}; AdalFlow: the <response><proposed_variable> XML its parser reads). A
proposal is the current instruction plus one sentence and a tag `(round S, rev K)`: K = 1 + the
highest K in the optimizer's prompt (the second proposal of a step sees the first among the failed
proposals of the step, in both tools, so it is rev 2), S = the "steps since the last improvement"
both optimizers are told (it keeps the proposals of different steps apart, so no step is answered
from the call cache of an earlier one). The task model's answers depend on the asked category and
on the highest K in the request (upstream outputs carry their node's tag):

  rev 0 (initial prompts)  fruits right, vegetables wrong (off by one), musical instruments right
  odd revisions            fruits right, vegetables right, musical instruments wrong
  even revisions >= 2      fruits wrong, vegetables wrong, musical instruments right

The training set asks about fruits (1/3) and vegetables (2/3), so two thirds of it fails at first.
Two scenarios (`SCENARIOS`, `--adalflow-scenario tie|worse|both`) differ ONLY in the validation file's
mix of categories; the training file, the fake model, the pipelines and every setting are the same:

  tie    the validation set asks about the three categories equally (fruits, vegetables, musical
         instruments in turn: every third example is a musical instrument, the last one too). In
         both tools and in every step, proposal 1 (rev 1) beats the subset and then exactly TIES the
         validation score (rejected), and proposal 2 (rev 2) fails the subset check. The worst case
         for autodiff's early stop: a tie is only known when the last musical instrument is scored.
  worse  the validation set asks fruits, musical instruments, vegetables, musical instruments in turn:
         half of it (every other example, from the second on) asks about the category proposal 1
         breaks, so proposal 1 beats the subset and is then clearly WORSE on validation (1/2 against
         the initial prompts' 3/4); proposal 2 fails the subset check as in `tie`. The bound is
         crossed partway through: with the best at 3/4 of 24, after the sixth musical instrument.

Each step does the same logical work in both tools (forward, backward, two optimizer rounds, two
subset checks, one validation of the whole set), nothing is ever accepted, and the comparison is of
identical steps (with the default 2 proposals). autodiff's validation stops as soon as a proposal can
no longer end strictly above the best score (autodiff_cli/engine/evaluate.py, `stop_unless_above`: the
outstanding calls are cancelled); AdalFlow 1.1.3's own early stop is on as its code has it (the
constrained proposal step passes `minimum_score=last_val_score` to `validation_step`; `pred_step`
stops scoring once the best possible score falls below it, but it leaves its `with ThreadPoolExecutor`
block, which waits for every submitted example, so all its validation calls are still made: its
script records how many examples it scored). The validation order is the deterministic interleave
above (no shuffle): the broken category is spread evenly through the file, so neither tool meets it
all at the start or all at the end.

The server sees every request a client sends; a request whose client closes the connection before
the answer is due (autodiff cancelling a doomed validation) is logged as cancelled, with its end at
the moment the client went away: it still counts as a call received.

Requests are classified by role on the server, by the fixed first words of each tool's meta-prompts
(`classify`): backward = autodiff's "You are the backward engine of a prompt optimizer" / "You evaluate
the final output of an LLM pipeline" (LLM loss) and AdalFlow's "You MUST determining the root cause of
a system error" (its backward engine, which also writes the loss feedback); optimizer = autodiff's "You
are the optimizer of an LLM pipeline" and AdalFlow's "You are an excellent prompt engineer"; task = a
request carrying a node marker ([count], [listing], [tally], [answer]) and none of those. Anything else
is "unknown" (and fails the benchmark). Each request is logged with its arrival and answer time, so
calls and busy time per role are counted per step window: AdalFlow's step windows are recorded
inside its process (from `train_step` to the end of the proposal step, which saves its checkpoint),
autodiff's from its run directory (between two versions of checkpoint.json, written after the
initial validation and at the end of every step with the step's other files).
"""
from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import hashlib
import importlib.util
import json
import os
import random
import re
import shutil
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from aiohttp import web

from autodiff_cli.io.files import read_jsonl
from autodiff_cli.llm import fake
from tests.support import fake_server as fs

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent.parent
STEP_SCRIPT = HERE / "adalflow_step.py"
DEFAULT_VENV = ROOT / "benchmarks" / "work" / "adalflow-venv"
ADALFLOW_VERSION = "1.1.3"
# AdalFlow 1.1.3 asks for openai>=1.97.1; 1.x is the series it was released against
VENV_REQUIREMENTS = (f"adalflow=={ADALFLOW_VERSION}", "openai>=1.97.1,<2")
KEY_ENV = "AUTODIFF_PERF_KEY"
ROLES = ("task", "backward", "optimizer")
TARGET_RATIO = 3.0

# ---------------------------------------------------------------- the task: counting objects of one category

CATEGORIES = {
    "fruits": ("apple", "banana", "pear", "plum", "mango"),
    "vegetables": ("carrot", "onion", "turnip", "leek", "beet"),
    "musical instruments": ("flute", "drum", "violin", "trumpet", "cello"),
}
NOUN_CATEGORY = {noun: cat for cat, nouns in CATEGORIES.items() for noun in nouns}
QUESTION_RE = re.compile(r"I have (.+?)\. How many ([a-z ]+?) do I have\?")
REV_RE = re.compile(r"\(round \d+, rev (\d+)\)")
# the optimizers' "steps since the last improvement" (autodiff / AdalFlow): a round number that keeps
# the proposals of different steps apart (no step can reuse another step's cached calls)
ROUND_RE = re.compile(r"Steps since the last improvement: (\d+)|You are (\d+) steps since your last improvement")
REVISION_SENTENCE = "Check each object against the category the question asks about before you count."

PIPELINES: dict[str, dict[str, Any]] = {
    "single": {
        "params": {"instruction": "[count] Count the objects of the category the question asks about. "
                                  "End with `Answer: N`."},
        # nodes: (name, param, user text with {question} / {upstream}, upstream node or None)
        "nodes": [("count", "instruction", "{question}", None)],
    },
    "chain": {
        "params": {
            "listing_instruction": "[listing] List every object the question mentions, with its number.",
            "tally_instruction": "[tally] Add up the listed objects that belong to the asked category.",
            "answer_instruction": "[answer] Give the final count as `Answer: N`.",
        },
        "nodes": [("listing", "listing_instruction", "{question}", None),
                  ("tally", "tally_instruction", "Question: {question}\nList: {upstream}", "listing"),
                  ("answer", "answer_instruction", "Question: {question}\nTally: {upstream}", "tally")],
    },
}
NODE_MARKERS = ("[answer]", "[tally]", "[listing]", "[count]")


# the validation file of each scenario asks about these categories in turn, in file order (no shuffle)
SCENARIOS: dict[str, dict[str, Any]] = {
    "tie": {"val_categories": ("fruits", "vegetables", "musical instruments"),
            "summary": "proposal 1 beats the subset, then ties the validation score"},
    "worse": {"val_categories": ("fruits", "musical instruments", "vegetables", "musical instruments"),
              "summary": "proposal 1 beats the subset, then is clearly worse on validation"},
}
TRAIN_CATEGORIES = ("fruits", "vegetables", "vegetables")


def make_examples(prefix: str, n: int, categories: list[str], seed: int, shuffle: bool = True) -> list[dict]:
    """n questions "I have 2 apples, 1 carrot, ... How many <category> do I have?", categories in turn,
    then shuffled (seeded) unless `shuffle` is False (the validation files: the categories stay
    interleaved in file order)."""
    rng = random.Random(f"{seed}:{prefix}")
    rows = []
    for i in range(n):
        category = categories[i % len(categories)]
        nouns = [rng.choice(CATEGORIES[category])]
        nouns += rng.sample([x for x in NOUN_CATEGORY if x not in nouns], 3)
        rng.shuffle(nouns)
        counts = [rng.randint(1, 3) for _ in nouns]
        items = [f"{c} {noun}{'s' if c > 1 else ''}" for c, noun in zip(counts, nouns)]
        listing = ", ".join(items[:-1]) + " and " + items[-1]
        answer = sum(c for c, noun in zip(counts, nouns) if NOUN_CATEGORY[noun] == category)
        rows.append({"id": f"{prefix}{i:03d}", "question": f"I have {listing}. How many {category} do I have?",
                     "answer": str(answer), "category": category})
    if shuffle:
        rng.shuffle(rows)
    return rows


def val_examples(n_val: int, seed: int = 0, scenario: str = "tie") -> list[dict]:
    """The validation examples of a scenario, in file order."""
    return make_examples("val", n_val, list(SCENARIOS[scenario]["val_categories"]), seed, shuffle=False)


def write_data(work: Path, n_train: int, n_val: int, seed: int = 0, scenario: str = "tie") -> tuple[Path, Path]:
    work.mkdir(parents=True, exist_ok=True)
    train = make_examples("train", n_train, list(TRAIN_CATEGORIES), seed)
    val = val_examples(n_val, seed, scenario)
    if {r["question"] for r in train} & {r["question"] for r in val}:
        raise RuntimeError("a validation question is also a training question: pick another seed")
    paths = []
    for name, rows in (("train", train), ("val", val)):
        path = work / f"{name}.jsonl"
        path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
        paths.append(path)
    return paths[0], paths[1]


def val_questions(n_val: int, seed: int = 0, scenario: str = "tie") -> set[str]:
    """The validation questions as QUESTION_RE finds them in a prompt."""
    return {QUESTION_RE.search(r["question"]).group(0) for r in val_examples(n_val, seed, scenario)}


def parse_question(text: str) -> tuple[str, int] | None:
    """(asked category, true count) of the first question in `text`."""
    m = QUESTION_RE.search(text)
    if m is None:
        return None
    listing, category = m.group(1), m.group(2)
    total = 0
    for count, word in re.findall(r"(\d+) ([a-z]+)", listing):
        noun = word[:-1] if int(count) > 1 and word.endswith("s") else word
        if NOUN_CATEGORY.get(noun) == category:
            total += int(count)
    return category, total


def answers_right(revision: int, category: str) -> bool:
    """The fake task model's behaviour (see the module docstring)."""
    if revision == 0:
        return category != "vegetables"
    if revision % 2:
        return category != "musical instruments"
    return category == "musical instruments"


def revision_of(text: str) -> int:
    return max((int(k) for k in REV_RE.findall(text)), default=0)


def round_of(text: str) -> int:
    m = ROUND_RE.search(text)
    return int(m.group(1) or m.group(2)) if m else 0


def tag(text: str) -> str:
    """The tag of a new proposal made from an optimizer prompt `text`."""
    return f"(round {round_of(text)}, rev {revision_of(text) + 1})"


def revise(current: str, new_tag: str) -> str:
    base = current.split(" " + REVISION_SENTENCE)[0].strip()
    return f"{base} {REVISION_SENTENCE} {new_tag}"


# ---------------------------------------------------------------- the fake model of this benchmark

MARKERS = (  # (tool, role, fixed words of the tool's meta-prompt)
    ("autodiff", "backward", "You are the backward engine of a prompt optimizer"),
    ("autodiff", "backward", "You evaluate the final output of an LLM pipeline"),
    ("autodiff", "optimizer", "You are the optimizer of an LLM pipeline"),
    ("adalflow", "backward", "You MUST determining the root cause of a system error"),
    ("adalflow", "optimizer", "You are an excellent prompt engineer"),
)
AUTODIFF_FEEDBACK = ("The instruction should tell the model to check each object against the category the "
                     "question asks about before counting: it counted an object of another category.")
AUTODIFF_UPSTREAM = "This input should list each object with its category so the count can be checked."
ADALFLOW_FEEDBACK = ("The count is off by one because an object of another category was counted; the variable "
                     "should make the model check each object against the asked category.")


def classify(text: str) -> tuple[str | None, str]:
    """(tool or None, role) of a request from the text of all its messages."""
    for tool, role, marker in MARKERS:
        if marker in text:
            return tool, role
    if any(m in text for m in NODE_MARKERS):
        return None, "task"
    return None, "unknown"


def task_reply(text: str) -> str:
    node = next(m for m in NODE_MARKERS if m in text)
    q = parse_question(text)
    if q is None:
        return "I cannot find the question."
    category, truth = q
    revision = revision_of(text)
    tags = REV_RE.search(text)
    tag = f" {tags.group(0)}" if tags else ""
    n = truth if answers_right(revision, category) else truth + 1
    if node == "[count]":
        return f"I count {n} {category}. Answer: {n}"
    if node == "[listing]":
        return f"Objects: {QUESTION_RE.search(text).group(1)}.{tag}"
    if node == "[tally]":
        return f"The {category} add up to {n}.{tag}"
    m = re.search(r"add up to (\d+)", text)  # [answer]: restates the tally
    return f"Answer: {m.group(1) if m else 0}"


def autodiff_backward_reply(text: str) -> str:
    m = re.search(r"## (?:Predecessors|Inputs) \(the keys of your JSON reply\)\n(.*)", text, re.DOTALL)
    keys = re.findall(r'^- "([^"]+)":', m.group(1), re.MULTILINE) if m else []
    reply = {"diagnosis": "The count includes an object of another category."}
    for key in keys:
        reply[key] = AUTODIFF_FEEDBACK if key.startswith("param:") else AUTODIFF_UPSTREAM
    return json.dumps(reply)


def adalflow_backward_reply(text: str) -> str:
    if "SAME LENGTH as the <VARIABLES> list" in text:  # BackwardPassSetup(all_pred_at_once=True)
        m = re.search(r"Length of the list: (\d+)", text)
        return json.dumps([ADALFLOW_FEEDBACK] * (int(m.group(1)) if m else 1))
    return ADALFLOW_FEEDBACK


def autodiff_optimizer_reply(text: str) -> str:
    m = re.search(r"Current value:\n<VALUE>\n(.*?)\n</VALUE>", text, re.DOTALL)
    new_tag = tag(text)
    new = revise(m.group(1) if m else "", new_tag)
    return json.dumps({"reasoning": f"The feedback says objects of other categories were counted {new_tag}.",
                       "method": "add_instruction", "new_value": new})


def adalflow_optimizer_reply(text: str) -> str:
    m = re.search(r"<START_OF_VARIABLE_DESC>.*?<VARIABLE>(.*?)</VARIABLE>", text, re.DOTALL)
    new_tag = tag(text)
    new = revise(m.group(1).strip() if m else "", new_tag)
    return ("<response>\n"
            f"<reasoning>The feedback says objects of other categories were counted {new_tag}.</reasoning>\n"
            f"<method>ADD new elements, Be Specific {new_tag}</method>\n"
            f"<proposed_variable>{new}</proposed_variable>\n"
            "</response>")


def respond(text: str) -> tuple[str | None, str, str]:
    """(tool, role, reply) for a request whose messages' text is `text`."""
    tool, role = classify(text)
    if role == "task":
        return tool, role, task_reply(text)
    if role == "backward":
        return tool, role, (autodiff_backward_reply if tool == "autodiff" else adalflow_backward_reply)(text)
    if role == "optimizer":
        return tool, role, (autodiff_optimizer_reply if tool == "autodiff" else adalflow_optimizer_reply)(text)
    return tool, role, "I don't know."


# ---------------------------------------------------------------- the server: fake_server + /v1/responses + roles


@dataclass(frozen=True)
class Request:
    start: float  # time.time() on arrival
    end: float  # arrival + the delay before the answer
    role: str
    tool: str | None
    api: str  # "chat" or "responses"
    validation: bool = False  # a task call on a validation question
    cancelled: bool = False  # the client closed the connection before the answer (`end` = that moment)
    node: str | None = None  # a task call's node marker without brackets ("count", "listing", ...)


def _responses_messages(data: dict) -> list[dict]:
    """Chat messages equivalent to a Responses API body (`instructions` + `input` as text or messages)."""
    messages = []
    if data.get("instructions"):
        messages.append({"role": "system", "content": str(data["instructions"])})
    given = data.get("input")
    if isinstance(given, str):
        messages.append({"role": "user", "content": given})
    elif isinstance(given, list):
        for item in given:
            content = item.get("content") if isinstance(item, dict) else item
            if isinstance(content, list):
                content = "\n".join(str(c.get("text", "")) for c in content if isinstance(c, dict))
            messages.append({"role": (item.get("role") if isinstance(item, dict) else None) or "user",
                             "content": str(content)})
    return messages


class BenchServer(fs.FakeServer):
    """The fake server with this benchmark's model (`respond`), the Responses API, and a request log."""

    def __init__(self, *, latency: float, jitter: float = 0.0, seed: int = 0, port: int = 0) -> None:
        super().__init__(_empty_script(), latency=latency, jitter=jitter, seed=seed, port=port)
        self.requests: list[Request] = []
        self.val_questions: set[str] = set()  # task calls on these are logged as validation calls

    def stats(self) -> dict[str, Any]:
        out = super().stats()
        with self._lock:
            by_role: dict[str, int] = {}
            for r in self.requests:
                by_role[r.role] = by_role.get(r.role, 0) + 1
        out["by_role"] = by_role
        return out

    def reset(self) -> None:
        super().reset()
        with self._lock:
            self.requests = []

    def log(self) -> list[Request]:
        with self._lock:
            return list(self.requests)

    def _routes(self):
        return [web.post(path, self._chat) for path in ("/v1/responses", "/responses")] + super()._routes()

    async def _chat(self, request: web.Request) -> web.StreamResponse:
        """As FakeServer._chat (this benchmark has no faults), but a request whose client goes away
        before the answer is due (the server then cancels this handler) is logged as cancelled."""
        body = await request.read()
        self._enter()
        try:
            answer, delay, index = self._decide_logged(body)
            if answer.kind is not None:
                self._count_error(answer.kind)
            try:
                await asyncio.sleep(delay)
            except asyncio.CancelledError:
                if index is not None and not self._closing.is_set():
                    with self._lock:
                        r = self.requests[index]
                        self.requests[index] = dataclasses.replace(r, end=min(r.end, time.time()), cancelled=True)
                raise
        finally:
            self._leave()
        return self._response(answer)

    def _decide(self, body: bytes):
        answer, delay, _ = self._decide_logged(body)
        return answer, delay

    def _decide_logged(self, body: bytes):
        """(answer, delay, index of the request in the log or None)."""
        arrival = time.time()
        _, _, delay = self._arrive(body)
        try:
            data = json.loads(body or b"{}")
            api = "chat" if "messages" in data else "responses"
            messages = data["messages"] if api == "chat" else _responses_messages(data)
            if not isinstance(messages, list) or not messages:
                raise TypeError
        except (ValueError, KeyError, TypeError, AttributeError):
            return fs._Answer(400, fs._error_obj("expected `messages` or `input`", "invalid_request_error"),
                              kind="400"), 0.0, None
        if data.get("stream"):
            return fs._Answer(400, fs._error_obj("streaming is not supported", "invalid_request_error"),
                              kind="400"), 0.0, None
        text = "\n".join(fake._content(m) for m in messages)
        tool, role, reply = respond(text)
        q = QUESTION_RE.search(text) if role == "task" else None
        validation = q is not None and q.group(0) in self.val_questions
        node = next((m.strip("[]") for m in NODE_MARKERS if m in text), None) if role == "task" else None
        prompt = sum(fake.count_tokens(fake._content(m)) for m in messages)
        completion = fake.count_tokens(reply)
        with self._lock:
            self._ids += 1
            ident = self._ids
            self._stats["replies"] += 1
            self._stats["prompt_tokens"] += prompt
            self._stats["completion_tokens"] += completion
            index = len(self.requests)
            self.requests.append(Request(arrival, arrival + delay, role, tool, api, validation, node=node))
        model = str(data.get("model") or "fake")
        if api == "chat":
            payload = {"id": f"chatcmpl-bench-{ident}", "object": "chat.completion", "created": int(arrival),
                       "model": model,
                       "choices": [{"index": 0, "message": {"role": "assistant", "content": reply},
                                    "finish_reason": "stop", "logprobs": None}],
                       "usage": {"prompt_tokens": prompt, "completion_tokens": completion,
                                 "total_tokens": prompt + completion}}
        else:
            payload = {"id": f"resp_bench_{ident}", "object": "response", "created_at": int(arrival),
                       "model": model, "status": "completed", "error": None, "incomplete_details": None,
                       "instructions": None, "metadata": {}, "parallel_tool_calls": True, "temperature": 1.0,
                       "top_p": 1.0, "tool_choice": "auto", "tools": [],
                       "output": [{"type": "message", "id": f"msg_bench_{ident}", "status": "completed",
                                   "role": "assistant",
                                   "content": [{"type": "output_text", "text": reply, "annotations": []}]}],
                       "usage": {"input_tokens": prompt, "output_tokens": completion,
                                 "total_tokens": prompt + completion,
                                 "input_tokens_details": {"cached_tokens": 0},
                                 "output_tokens_details": {"reasoning_tokens": 0}}}
        return fs._Answer(200, payload), delay, index


def _empty_script() -> Path:
    """FakeServer wants a script file; this benchmark's replies come from `respond` instead."""
    path = Path(os.environ.get("TMPDIR", "/tmp")) / "autodiff-perf-bench-empty-script.yaml"
    if not path.exists():
        path.write_text("rules: []\ndefault: ''\n", encoding="utf-8")
    return path


# ---------------------------------------------------------------- per-step accounting from the request log


def _union(intervals: list[tuple[float, float]]) -> float:
    total, end = 0.0, None
    for a, b in sorted(intervals):
        if end is None or a > end:
            total += b - a
            end = b
        elif b > end:
            total += b - end
            end = b
    return total


def step_accounting(log: list[Request], windows: list[dict]) -> list[dict]:
    """Per step window: requests by role (arrival inside the window; a request the client cancelled
    counts, and is also counted apart), busy seconds per role (the union of that role's request
    intervals, clipped to the window; a cancelled request's interval ends when its client went away),
    the seconds with no request in flight (the client's own work: prompts, parsing, bookkeeping,
    thread and event-loop scheduling) and the most requests of each role in flight at once."""
    out = []
    for w in windows:
        start, end = w["start"], w["end"]
        inside = [r for r in log if start <= r.start <= end]
        clipped = {role: [(max(r.start, start), min(r.end, end)) for r in inside if r.role == role] for role in ROLES}
        calls = {role: len(clipped[role]) for role in ROLES}
        busy = {role: _union(clipped[role]) for role in ROLES}
        idle = (end - start) - _union([i for role in ROLES for i in clipped[role]])
        val = [(max(r.start, start), min(r.end, end)) for r in inside if r.role == "task" and r.validation]
        # the order of a chain's validation calls: how many first-node calls were sent before the first
        # last-node call (all of them = breadth-first over the examples; about the workers = one example
        # after another)
        val_nodes = [r.node for r in sorted(inside, key=lambda r: r.start) if r.role == "task" and r.validation]
        first_before_last = (val_nodes.index("answer") if "answer" in val_nodes else len(val_nodes))
        first_before_last = sum(1 for x in val_nodes[:first_before_last] if x == "listing") if "listing" in val_nodes else None
        out.append({"step": w["step"], "wall_s": end - start, "calls": calls,
                    "cancelled": {role: sum(1 for r in inside if r.role == role and r.cancelled) for role in ROLES},
                    "val_cancelled": sum(1 for r in inside if r.role == "task" and r.validation and r.cancelled),
                    "val_first_before_last": first_before_last,
                    "unknown_calls": sum(1 for r in inside if r.role not in ROLES), "busy_s": busy,
                    "idle_s": max(0.0, idle), "val_calls": len(val), "val_busy_s": _union(val),
                    "max_in_flight": {role: _max_in_flight([r for r in inside if r.role == role]) for role in ROLES}})
    return out


def _max_in_flight(requests: list[Request]) -> int:
    events = sorted([(r.start, 1) for r in requests] + [(r.end, -1) for r in requests], key=lambda e: (e[0], e[1]))
    best = now = 0
    for _, d in events:
        now += d
        best = max(best, now)
    return best


# ---------------------------------------------------------------- autodiff side


@dataclass(frozen=True)
class Settings:
    latency: float = 0.3
    train: int = 24
    val: int = 24
    steps: int = 4
    batch: int = 4
    proposals: int = 2
    max_error: int = 4
    max_correct: int = 2
    workers: int = 4
    seed: int = 0

    def to_dict(self) -> dict:
        return dict(self.__dict__)


def autodiff_spec(pipeline: str, url: str, s: Settings) -> dict:
    p = PIPELINES[pipeline]
    model = {"model": "openai/fake", "api_base": f"{url}/v1", "api_key_env": KEY_ENV, "concurrency": s.workers,
             "timeout": 120, "max_retries": 2}
    nodes: dict[str, Any] = {}
    for name, param, user, upstream in p["nodes"]:
        nodes[name] = {"kind": "llm", "model": "task", "system": "{{ " + param + " }}",
                       "user": user.replace("{question}", "{{ input.question }}").replace(
                           "{upstream}", "{{ " + (upstream or "") + " }}")}
    last = p["nodes"][-1][0]
    nodes["parse"] = {"kind": "function", "fn": "last_integer", "args": {"text": last}}
    return {
        "name": f"perf_adalflow_{pipeline}",
        "models": {"task": dict(model), "backward": dict(model), "optimizer": dict(model)},
        "data": {"train": "train.jsonl", "val": "val.jsonl"},
        "params": {k: {"value": v, "role": "task instruction"} for k, v in p["params"].items()},
        "nodes": nodes,
        "output": "parse",
        "metric": {"fn": "exact_match", "args": {"pred": "parse", "target": "input.answer"}},
        "train": {"max_steps": s.steps, "batch_size": s.batch, "max_proposals": s.proposals,
                  "max_error_samples": s.max_error, "max_correct_samples": s.max_correct, "seed": s.seed},
    }


def run_autodiff(pipeline: str, srv: BenchServer, s: Settings, work: Path, log=lambda m: None,
                 scenario: str = "tie") -> dict:
    """`autodiff train` of one pipeline against `srv`; per-step windows from checkpoint.json's versions."""
    work = work / f"autodiff-{pipeline}"
    if work.exists():
        shutil.rmtree(work)
    write_data(work, s.train, s.val, s.seed, scenario)
    spec = work / "spec.yaml"
    spec.write_text(yaml.safe_dump(autodiff_spec(pipeline, srv.url, s), sort_keys=False), encoding="utf-8")
    runs = work / "runs"
    runs.mkdir()
    env = {**os.environ, "AUTODIFF_CACHE": str(work / "cache"), KEY_ENV: "perf-any-key",
           "LITELLM_LOCAL_MODEL_COST_MAP": "True"}
    cmd = [sys.executable, "-m", "autodiff_cli.app.cli", "train", str(spec), "--runs-dir", str(runs), "--quiet"]
    log(f"adalflow: [{scenario}] autodiff train {pipeline} ({s.steps} steps)")
    first = len(srv.log())
    # `autodiff train` rewrites checkpoint.json (atomically: a new file each time) once after the initial
    # validation and once at the end of every step: step k runs between versions k-1 and k
    versions: list[float] = []
    stop = threading.Event()

    def watch() -> None:
        last = None
        while not stop.is_set():
            for ckpt in runs.glob("*/checkpoint.json"):
                with contextlib.suppress(OSError):
                    st = ckpt.stat()
                    key = (st.st_ino, st.st_mtime_ns, st.st_size)
                    if key != last:
                        versions.append(time.time())
                        last = key
            time.sleep(0.001)

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    t0 = time.time()
    try:
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    finally:
        stop.set()
        watcher.join()
    process_wall = time.time() - t0
    if proc.returncode != 0:
        raise RuntimeError(f"autodiff train exited {proc.returncode}: {proc.stderr[-3000:]}")
    run_dir = Path(proc.stdout.strip().splitlines()[-1])
    rows = read_jsonl(run_dir / "metrics.jsonl") or []
    summary = json.loads((run_dir / "summary.json").read_text(encoding="utf-8"))
    if len(versions) != len(rows) + 1:
        raise RuntimeError(f"saw {len(versions)} versions of checkpoint.json for {len(rows)} steps (expected one more)")
    windows = [{"step": r["step"], "start": versions[i], "end": versions[i + 1]} for i, r in enumerate(rows)]
    steps = step_accounting(srv.log()[first:], windows)
    for st, r in zip(steps, rows):
        st["own_wall_s"] = r["wall_seconds"]  # Trainer.step alone, without the run directory's writes
        st["client_calls"] = {role: r["usage"][role]["calls"] for role in ROLES}
        st["cached_calls"] = sum(r["usage"][role]["cached_calls"] for role in ROLES)
        st["skipped"] = r.get("skipped")
        st["proposals"] = [{"subset": p.get("subset_score"), "val": p.get("val_score"), "accepted": p["accepted"],
                            "reason": p.get("reason"), "stopped_early": "stopped early" in (p.get("reason") or "")}
                           for p in r["proposals"]]
    total = {role: summary["usage"][role]["calls"] for role in ROLES}
    return {"tool": "autodiff", "pipeline": pipeline, "scenario": scenario, "steps": steps,
            "process_wall_s": process_wall,
            "status": summary["status"], "initial_val": summary["initial"]["val"],
            "best_val": summary["best"]["val"], "client_calls_total": total,
            "server_calls_total": _count(srv.log()[first:]), "run_dir": str(run_dir)}


def _count(log: list[Request]) -> dict[str, int]:
    out = {role: 0 for role in ROLES}
    for r in log:
        out[r.role] = out.get(r.role, 0) + 1
    return out


# ---------------------------------------------------------------- AdalFlow side


def _litellm_cl100k() -> Path | None:
    """litellm (a dependency of autodiff) ships tiktoken's cl100k_base file under the cache name tiktoken
    looks for (sha1 of its download URL)."""
    spec = importlib.util.find_spec("litellm")
    if spec is None or not spec.submodule_search_locations:
        return None
    name = hashlib.sha1(b"https://openaipublic.blob.core.windows.net/encodings/cl100k_base.tiktoken").hexdigest()
    path = Path(list(spec.submodule_search_locations)[0]) / "litellm_core_utils" / "tokenizers" / name
    return path if path.exists() else None


def tiktoken_cache(work: Path) -> Path:
    """A TIKTOKEN_CACHE_DIR holding the real cl100k_base encoding (AdalFlow builds a tiktoken Tokenizer
    when it is imported, which would otherwise download it). tiktoken checks the file's sha256."""
    src = _litellm_cl100k()
    if src is None:
        raise RuntimeError("no offline copy of tiktoken's cl100k_base encoding (looked in litellm's package "
                           "data); AdalFlow downloads it on import and this machine has no internet")
    cache = work / "tiktoken-cache"
    cache.mkdir(parents=True, exist_ok=True)
    if not (cache / src.name).exists():
        shutil.copyfile(src, cache / src.name)
    return cache


def venv_python(venv: Path) -> Path:
    return venv / "bin" / "python"


def venv_versions(venv: Path) -> dict | None:
    code = ("import json, platform, importlib.metadata as m\n"
            "out = {'python': platform.python_version()}\n"
            "for d in ('adalflow', 'openai', 'httpx', 'tiktoken'):\n"
            "    try: out[d] = m.version(d)\n"
            "    except m.PackageNotFoundError: out[d] = None\n"
            "print(json.dumps(out))")
    try:
        proc = subprocess.run([str(venv_python(venv)), "-c", code], capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired):
        return None
    if proc.returncode != 0:
        return None
    return json.loads(proc.stdout.strip().splitlines()[-1])


def ensure_venv(venv: Path, log=lambda m: None) -> dict:
    """Create (or reuse) the AdalFlow virtual environment; returns its package versions."""
    versions = venv_versions(venv) if venv_python(venv).exists() else None
    if versions and versions.get("adalflow") == ADALFLOW_VERSION and (versions.get("openai") or "").startswith("1."):
        return versions
    if not venv_python(venv).exists():
        log(f"adalflow: creating the virtual environment {venv}")
        base = getattr(sys, "_base_executable", None) or sys.executable
        subprocess.run([base, "-m", "venv", str(venv)], check=True)
    log(f"adalflow: pip install {' '.join(VENV_REQUIREMENTS)}")
    proc = subprocess.run([str(venv_python(venv)), "-m", "pip", "install", "-q", *VENV_REQUIREMENTS],
                          capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"pip install into {venv} failed: {proc.stderr[-2000:]}")
    versions = venv_versions(venv)
    if not versions or versions.get("adalflow") != ADALFLOW_VERSION:
        raise RuntimeError(f"{venv} does not hold adalflow {ADALFLOW_VERSION}: {versions}")
    return versions


def run_adalflow(pipeline: str, srv: BenchServer, s: Settings, work: Path, venv: Path, log=lambda m: None,
                 scenario: str = "tie") -> dict:
    """AdalFlow's Trainer.fit on one pipeline against `srv`, in the AdalFlow venv."""
    work = work / f"adalflow-{pipeline}"
    if work.exists():
        shutil.rmtree(work)
    train, val = write_data(work, s.train, s.val, s.seed, scenario)
    home = work / "home"  # AdalFlow keeps its call cache and checkpoints under ~/.adalflow: a fresh one
    home.mkdir()
    config = {"pipeline": pipeline, "base_url": f"{srv.url}/v1/", "train": str(train), "val": str(val),
              "params": PIPELINES[pipeline]["params"],
              "nodes": [list(n) for n in PIPELINES[pipeline]["nodes"]],
              "settings": s.to_dict(), "out": str(work / "result.json"), "ckpt": str(work / "ckpt")}
    (work / "config.json").write_text(json.dumps(config, indent=2), encoding="utf-8")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTHON", "VIRTUAL_ENV"))}
    env.update(HOME=str(home), OPENAI_API_KEY="perf-any-key", TIKTOKEN_CACHE_DIR=str(tiktoken_cache(work.parent)),
               TQDM_DISABLE="1", PYTHONUNBUFFERED="1", NO_PROXY="127.0.0.1,localhost")
    log(f"adalflow: [{scenario}] AdalFlow Trainer.fit {pipeline} ({s.steps} steps)")
    first = len(srv.log())
    t0 = time.time()
    with (work / "stdout.log").open("w") as out, (work / "stderr.log").open("w") as err:
        proc = subprocess.run([str(venv_python(venv)), str(STEP_SCRIPT), str(work / "config.json")],
                              env=env, stdout=out, stderr=err, cwd=str(work))
    process_wall = time.time() - t0
    if proc.returncode != 0:
        tail = (work / "stderr.log").read_text(errors="replace")[-3000:]
        raise RuntimeError(f"adalflow_step.py exited {proc.returncode} (logs in {work}): {tail}")
    result = json.loads((work / "result.json").read_text(encoding="utf-8"))
    log_part = srv.log()[first:]
    steps = step_accounting(log_part, result["windows"])
    for st, w in zip(steps, result["windows"]):
        st["own_wall_s"] = w["end"] - w["start"]
        st["proposals"] = w.get("proposals")
        st["validations"] = w.get("validations", [])
    return {"tool": "adalflow", "pipeline": pipeline, "scenario": scenario, "steps": steps,
            "process_wall_s": process_wall,
            "import_s": result["import_s"], "initial_val": result.get("initial_val"),
            "val_scores": result.get("val_scores"), "effective": result.get("effective"),
            "server_calls_total": _count(log_part), "versions": result.get("versions")}


# ---------------------------------------------------------------- the whole comparison


def autodiff_source() -> str:
    """Which autodiff was measured: the commit, and whether autodiff_cli/ had uncommitted changes."""
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                              timeout=30).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--", "autodiff_cli"], cwd=ROOT, capture_output=True,
                               text=True, timeout=30).stdout.strip()
    except (OSError, subprocess.TimeoutExpired):
        return "unknown"
    if not head:
        return "unknown"
    return f"commit {head}" + (" with uncommitted changes in autodiff_cli/" if dirty else "")


def mean_step(run: dict) -> dict:
    steps = run["steps"]
    n = len(steps) or 1
    walls = [st["wall_s"] for st in steps]
    return {"steps": len(steps), "wall_s": sum(walls) / n, "min_s": min(walls, default=0.0),
            "max_s": max(walls, default=0.0),
            "calls": {role: sum(st["calls"][role] for st in steps) / n for role in ROLES},
            "cancelled": {role: sum(st["cancelled"][role] for st in steps) / n for role in ROLES},
            "cancelled_total": sum(sum(st["cancelled"].values()) for st in steps),
            "val_cancelled": sum(st["val_cancelled"] for st in steps) / n,
            "busy_s": {role: sum(st["busy_s"][role] for st in steps) / n for role in ROLES},
            "idle_s": sum(st["idle_s"] for st in steps) / n,
            "val_calls": sum(st["val_calls"] for st in steps) / n,
            "val_busy_s": sum(st["val_busy_s"] for st in steps) / n,
            "val_first_before_last": (sum(st["val_first_before_last"] for st in steps) / n
                                      if steps and all(st.get("val_first_before_last") is not None for st in steps)
                                      else None),
            "max_in_flight": {role: max((st["max_in_flight"][role] for st in steps), default=0) for role in ROLES},
            "unknown_calls": sum(st["unknown_calls"] for st in steps)}


def compare(s: Settings, work: Path, venv: Path | None = None, pipelines=("single", "chain"),
            tools=("adalflow", "autodiff"), log=lambda m: None, scenarios=tuple(SCENARIOS)) -> dict:
    """Both tools on both pipelines in each scenario against one server; the raw runs
    (runs[scenario][pipeline][tool]) and per-scenario, per-pipeline ratios."""
    unknown_scenarios = [x for x in scenarios if x not in SCENARIOS]
    if unknown_scenarios:
        raise ValueError(f"unknown scenario(s) {unknown_scenarios}: expected some of {list(SCENARIOS)}")
    work.mkdir(parents=True, exist_ok=True)
    versions = None
    if "adalflow" in tools:
        venv = (venv or DEFAULT_VENV).resolve()
        versions = ensure_venv(venv, log)
    runs: dict[str, dict[str, dict[str, dict]]] = {}
    with BenchServer(latency=s.latency).in_thread() as srv:
        for scenario in scenarios:
            srv.val_questions = val_questions(s.val, s.seed, scenario)
            runs[scenario] = {}
            for pipeline in pipelines:
                runs[scenario][pipeline] = {}
                for tool in tools:
                    if tool == "adalflow":
                        run = run_adalflow(pipeline, srv, s, work / scenario, venv, log, scenario)
                    else:
                        run = run_autodiff(pipeline, srv, s, work / scenario, log, scenario)
                    runs[scenario][pipeline][tool] = run
        unknown = [r for r in srv.log() if r.role == "unknown"]
    if unknown:
        raise RuntimeError(f"{len(unknown)} requests the role classifier did not recognise (see classify())")
    result: dict[str, Any] = {"settings": s.to_dict(), "scenarios": list(scenarios), "adalflow_versions": versions,
                              "runs": runs, "autodiff_source": autodiff_source(),
                              "unknown_requests": len(unknown), "venv": str(venv) if venv else None}
    ratios: dict[str, dict[str, dict]] = {}
    for scenario, by_pipeline in runs.items():
        for pipeline, by_tool in by_pipeline.items():
            if "adalflow" in by_tool and "autodiff" in by_tool:
                a, b = mean_step(by_tool["adalflow"]), mean_step(by_tool["autodiff"])
                ratio = a["wall_s"] / b["wall_s"] if b["wall_s"] else None
                ratios.setdefault(scenario, {})[pipeline] = {
                    "wall_ratio": ratio, "backward_fewer": b["calls"]["backward"] < a["calls"]["backward"],
                    "met": ratio is not None and ratio >= TARGET_RATIO
                    and b["calls"]["backward"] < a["calls"]["backward"]}
    result["ratios"] = ratios
    return result
