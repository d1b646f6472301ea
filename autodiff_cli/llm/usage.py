"""Model usage accounted per role (the `usage` object of summary.json and metrics.jsonl)."""
from __future__ import annotations

import json
from pathlib import Path
from typing import IO, Any

# The roles under which model usage is accounted (summary.json lists all four); specs name them too.
ROLES = ("task", "backward", "optimizer", "teacher")


# Key order of one role's entry; to_dict() always emits it in this order (`unsent` was added last:
# older summaries and checkpoints lack it, and from_dict reads them as 0).
FIELDS = ("calls", "cached_calls", "errors", "prompt_tokens", "completion_tokens", "cost_usd", "unsent")


def _empty() -> dict[str, Any]:
    return {f: (0.0 if f == "cost_usd" else 0) for f in FIELDS}


class Usage:
    """Counters per role; all four roles are always present.

    `calls` counts every request that reached a provider (failed ones included), `errors` those of
    them that failed (an error answer, an empty reply, no reply within the timeout), `cached_calls`
    the replies served from the call cache (they cost nothing). `unsent` counts attempts that never
    reached the provider: the connection was refused or could not be made, or litellm failed before
    sending; they cost nothing, are not in `calls` or `errors`, and are retried like connection errors.
    So `calls` is what the provider saw and `calls - errors` the replies it gave.
    """

    def __init__(self) -> None:
        self._roles: dict[str, dict[str, Any]] = {role: _empty() for role in ROLES}
        self._journal: IO[str] | None = None

    # ---------------------------------------------------------------- the journal of a run

    def journal_to(self, path: Path) -> None:
        """Append every later `record` to `path`, one JSON line of the changes each. A training run keeps
        its journal in the run directory, so its usage survives a SIGKILL: the client records a call when
        its request is handed over, and `from_journal` sums what every process of the run recorded. No
        fsync per line: a killed process's writes are in the kernel already; only a power cut loses some."""
        self.close_journal()
        self._journal = open(path, "a", encoding="utf-8")

    def close_journal(self) -> None:
        if self._journal is not None:
            self._journal.close()
            self._journal = None

    @classmethod
    def from_journal(cls, path: Path) -> Usage | None:
        """The usage a journal adds up to, or None when there is none. A line cut short by a crash (only the
        last one can be) is skipped."""
        try:
            text = Path(path).read_text(encoding="utf-8")
        except FileNotFoundError:
            return None
        usage = cls()
        for line in text.split("\n"):
            try:
                entry = json.loads(line)
            except ValueError:
                continue
            if isinstance(entry, dict) and entry.get("role") in ROLES:
                usage._add(entry["role"], {f: entry[f] for f in FIELDS if isinstance(entry.get(f), (int, float))})
        return usage

    def record(
        self,
        role: str,
        *,
        calls: int = 0,
        cached_calls: int = 0,
        errors: int = 0,
        prompt_tokens: int = 0,
        completion_tokens: int = 0,
        cost_usd: float = 0.0,
        unsent: int = 0,
    ) -> None:
        delta = {"calls": calls, "cached_calls": cached_calls, "errors": errors, "prompt_tokens": prompt_tokens,
                 "completion_tokens": completion_tokens, "cost_usd": cost_usd, "unsent": unsent}
        self._add(role, delta)
        if self._journal is not None:
            self._journal.write(json.dumps({"role": role, **{k: v for k, v in delta.items() if v}}) + "\n")
            self._journal.flush()

    def _add(self, role: str, delta: dict[str, Any]) -> None:
        entry = self._entry(role)
        for key, value in delta.items():
            entry[key] += value

    def role(self, role: str) -> dict[str, Any]:
        return dict(self._entry(role))

    def total_calls(self) -> int:
        return sum(e["calls"] for e in self._roles.values())

    def total_tokens(self) -> int:
        return sum(e["prompt_tokens"] + e["completion_tokens"] for e in self._roles.values())

    def total_cost(self) -> float:
        return sum(e["cost_usd"] for e in self._roles.values())

    def add(self, other: Usage) -> Usage:
        """Add `other`'s counters to this one (in place); returns self."""
        for role, entry in other._roles.items():
            self.record(role, **entry)
        return self

    def to_dict(self) -> dict[str, dict[str, Any]]:
        return {role: {f: self._roles[role][f] for f in FIELDS} for role in ROLES}

    @classmethod
    def from_dict(cls, data: dict[str, dict[str, Any]] | None) -> Usage:
        usage = cls()
        for role, entry in (data or {}).items():
            usage.record(role, **{f: entry[f] for f in FIELDS if f in entry})
        return usage

    def copy(self) -> Usage:
        return Usage.from_dict(self.to_dict())

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Usage) and self.to_dict() == other.to_dict()

    def __repr__(self) -> str:
        return f"Usage({self.to_dict()!r})"

    def _entry(self, role: str) -> dict[str, Any]:
        try:
            return self._roles[role]
        except KeyError:
            raise ValueError(f"unknown usage role {role!r}; expected one of {', '.join(ROLES)}") from None
