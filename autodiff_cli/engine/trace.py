"""The per-example dynamic graph that a forward pass records, and the values it moves.

A Trace is a list of Calls (one per node invocation, loops unrolled) whose inputs name the
ids of the calls they came from, so the backward pass can walk it in reverse like
micrograd walks its values. Call ids are `<node>#<call_index>`; the call index counts the
invocations of one node within one example (0, 1, ... across loop iterations).

Values move between nodes as Slots: the value plus the ids of the calls it came from, so
every call's inputs name their sources (loop state included) and the trace is a DAG even
when the program has loops. A node whose `when` was false (or whose inputs were all skipped)
leaves a skipped Call and a skipped Slot: value None, no sources, so nothing downstream can
send it feedback.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any


@dataclass
class Slot:
    value: Any
    sources: list[str] = field(default_factory=list)
    fields: dict[str, Slot] | None = None  # per-field provenance (loop state, loop outputs)
    skipped: bool = False  # the output of a node that did not run


def _index(value: Any, part: str | int) -> Any:
    if isinstance(value, dict):
        return value.get(part if part in value else str(part))
    if isinstance(value, (list, tuple, str)) and isinstance(part, int):
        return value[part] if -len(value) <= part < len(value) else None
    return None


def resolve(env: dict[str, Slot], ref: Any) -> Slot:
    """The value `ref` (an engine.program.Ref) names in `env`, with the call ids it came from."""
    slot = env[ref.root]
    path = list(ref.path)
    if path and slot.fields is not None and str(path[0]) in slot.fields:
        slot = slot.fields[str(path.pop(0))]
    value = slot.value
    for part in path:
        value = _index(value, part)
    return Slot(value, list(slot.sources), skipped=slot.skipped)


@dataclass
class InputValue:
    value: Any
    sources: list[str]  # ids of the calls this value came from ([] for data and constants)
    condition: bool = False  # read by the node's `when`, not by its template or args


@dataclass
class Call:
    id: str
    node: str  # qualified node name, e.g. "hops.query" inside a loop
    kind: str  # llm | function | loop
    call_index: int
    topo_index: int  # the node's position in the program's topological order
    iteration: int | None  # loop iteration (innermost loop) or None
    inputs: dict[str, InputValue] = field(default_factory=dict)
    params: dict[str, str] = field(default_factory=dict)  # params used, with the values used
    messages: list[dict[str, str]] | None = None
    output: Any = None
    model: str | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    latency_s: float = 0.0
    cache_hit: bool = False
    error: str | None = None
    when: str | None = None  # the node's condition, if it has one
    skipped: bool = False  # the condition was false, or every node it reads was skipped: nothing ran

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["inputs"] = {k: {"value": v.value, "from": v.sources, **({"condition": True} if v.condition else {})}
                          for k, v in self.inputs.items()}
        return data


@dataclass
class Trace:
    example_id: str
    calls: list[Call] = field(default_factory=list)
    output: Any = None
    output_sources: list[str] = field(default_factory=list)
    error: str | None = None  # a model call failed after retries, or a `when` failed: the example is not scored

    def call(self, call_id: str) -> Call:
        for c in self.calls:
            if c.id == call_id:
                return c
        raise KeyError(call_id)

    def calls_of(self, node: str) -> list[Call]:
        return [c for c in self.calls if c.node == node]

    def predecessors(self, call: Call) -> list[Call]:
        """The calls whose outputs fed `call`, in a deterministic order."""
        ids = sorted({s for v in call.inputs.values() for s in v.sources})
        return [self.call(i) for i in ids]

    def to_dict(self) -> dict[str, Any]:
        return {
            "example_id": self.example_id,
            "output": self.output,
            "output_from": self.output_sources,
            "error": self.error,
            "calls": [c.to_dict() for c in self.calls],
        }
