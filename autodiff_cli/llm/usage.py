"""Model usage accounted per role (the `usage` object of summary.json and metrics.jsonl)."""
from __future__ import annotations

from typing import Any

from autodiff_cli.spec.models import ROLES

# Key order of one role's entry; to_dict() always emits it in this order.
FIELDS = ("calls", "cached_calls", "errors", "prompt_tokens", "completion_tokens", "cost_usd")


def _empty() -> dict[str, Any]:
    return {f: (0.0 if f == "cost_usd" else 0) for f in FIELDS}


class Usage:
    """Counters per role; all four roles are always present.

    `calls` counts every attempt sent to a provider (failed ones included), `errors` the failed
    attempts, `cached_calls` the replies served from the call cache (they cost nothing).
    """

    def __init__(self) -> None:
        self._roles: dict[str, dict[str, Any]] = {role: _empty() for role in ROLES}

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
    ) -> None:
        entry = self._entry(role)
        entry["calls"] += calls
        entry["cached_calls"] += cached_calls
        entry["errors"] += errors
        entry["prompt_tokens"] += prompt_tokens
        entry["completion_tokens"] += completion_tokens
        entry["cost_usd"] += cost_usd

    def role(self, role: str) -> dict[str, Any]:
        return dict(self._entry(role))

    def total_calls(self) -> int:
        return sum(e["calls"] for e in self._roles.values())

    def total_tokens(self) -> int:
        return sum(e["prompt_tokens"] + e["completion_tokens"] for e in self._roles.values())

    def total_cost(self) -> float:
        return sum(e["cost_usd"] for e in self._roles.values())

    def add(self, other: "Usage") -> "Usage":
        """Add `other`'s counters to this one (in place); returns self."""
        for role, entry in other._roles.items():
            self.record(role, **entry)
        return self

    def to_dict(self) -> dict[str, dict[str, Any]]:
        return {role: {f: self._roles[role][f] for f in FIELDS} for role in ROLES}

    @classmethod
    def from_dict(cls, data: dict[str, dict[str, Any]] | None) -> "Usage":
        usage = cls()
        for role, entry in (data or {}).items():
            usage.record(role, **{f: entry[f] for f in FIELDS if f in entry})
        return usage

    def copy(self) -> "Usage":
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
