"""The values a checker run produces: violations and one result per run.

These objects are the output contract of ``docs/invariants.md``: the CLI's JSON,
the HTTP API and the status page all serialise them with ``to_dict``.
Money stays ``Decimal`` until it is written out as a decimal string.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from decimal import Decimal
from typing import Any, Literal

Status = Literal["pass", "fail", "error"]
Mode = Literal["full", "incremental"]


def _out(value: Any) -> Any:
    """Decimal and other scalars as they appear in JSON: money as strings, never floats."""
    if value is None or isinstance(value, (str, bool, int)):
        return value
    if isinstance(value, Decimal):
        return format(value, "f")  # plain digits: 0.00000001, never 1E-8
    return str(value)


MISSING = "—"  # how a value that is not there reads in human text (never "None")


def describe_violation(v: dict[str, Any]) -> str:
    """One violation (``Violation.to_dict()``) as people read it: "expected X, actual Y, difference Z - detail".

    A value that is not there is written as "—"; a violation without a numeric difference says so."""
    def shown(value: Any) -> str:
        return MISSING if value is None or value == "" else str(value)

    difference = "no numeric difference" if v.get("difference") is None else f"difference {v['difference']}"
    line = f"expected {shown(v.get('expected'))}, actual {shown(v.get('actual'))}, {difference}"
    return f"{line} - {v['detail']}" if v.get("detail") else line


_LIFECYCLE_KEYS = ("first_seen", "last_seen", "runs_seen", "first_difference", "acknowledgement")


@dataclass(frozen=True)
class Violation:
    invariant: str
    entity_type: str
    entity_id: str
    expected: Decimal | str | None = None
    actual: Decimal | str | None = None
    difference: Decimal | None = None
    detail: str = ""
    # Its lifecycle (zsmon.core.lifecycle), when memory is available: first_seen, last_seen (Unix
    # seconds), runs_seen, first_difference, acknowledgement ({id, reason, author, created_at, expires_at}).
    lifecycle: dict[str, Any] | None = field(default=None, compare=False, hash=False)

    def to_dict(self) -> dict[str, Any]:
        life = self.lifecycle or {}
        return {
            "invariant": self.invariant,
            "entity_type": self.entity_type,
            "entity_id": self.entity_id,
            "expected": _out(self.expected),
            "actual": _out(self.actual),
            "difference": _out(self.difference),
            "detail": self.detail,
            "first_seen": life.get("first_seen"),
            "last_seen": life.get("last_seen"),
            "runs_seen": life.get("runs_seen"),
            "first_difference": life.get("first_difference"),
            "acknowledgement": life.get("acknowledgement"),
        }


@dataclass
class CheckResult:
    checker: str
    status: Status
    mode: Mode = "full"
    duration_seconds: float = 0.0
    violation_counts: dict[str, int] = field(default_factory=dict)
    violations: list[Violation] = field(default_factory=list)
    skipped: dict[str, str] = field(default_factory=dict)
    summaries: dict[str, str] = field(default_factory=dict)
    error: str | None = None
    started_at: float = field(default_factory=time.time)
    # Which replica produced the result (HA: results carry their producer's identity).
    producer: str | None = None
    # The lifecycle (zsmon.core.lifecycle): per invariant, violations acknowledged, violations first
    # seen in this run, and when the oldest unacknowledged one was first seen (Unix seconds).
    acknowledged_counts: dict[str, int] = field(default_factory=dict)
    new_counts: dict[str, int] = field(default_factory=dict)
    oldest_unacknowledged: dict[str, float] = field(default_factory=dict)

    @property
    def unacknowledged_counts(self) -> dict[str, int]:
        """Violations that page: all of them, less the acknowledged ones."""
        return {inv: max(0, n - self.acknowledged_counts.get(inv, 0)) for inv, n in self.violation_counts.items()}

    @property
    def total_violations(self) -> int:
        return sum(self.violation_counts.values())

    def to_dict(self) -> dict[str, Any]:
        return {
            "checker": self.checker,
            "status": self.status,
            "mode": self.mode,
            "duration_seconds": round(self.duration_seconds, 6),
            "violation_counts": dict(self.violation_counts),
            "violations": [v.to_dict() for v in self.violations],
            "skipped": dict(self.skipped),
            "summaries": dict(self.summaries),
            "error": self.error,
            "started_at": self.started_at,
            "producer": self.producer,
            "unacknowledged_counts": self.unacknowledged_counts,
            "acknowledged_counts": dict(self.acknowledged_counts),
            "new_violation_counts": dict(self.new_counts),
            "oldest_unacknowledged_at": dict(self.oldest_unacknowledged),
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "CheckResult":
        def dec(v: Any) -> Any:
            if v is None:
                return None
            try:
                return Decimal(v)
            except Exception:
                return v

        return cls(
            checker=data["checker"],
            status=data["status"],
            mode=data.get("mode", "full"),
            duration_seconds=float(data.get("duration_seconds", 0.0)),
            violation_counts={k: int(v) for k, v in data.get("violation_counts", {}).items()},
            violations=[
                Violation(
                    invariant=v["invariant"], entity_type=v["entity_type"], entity_id=v["entity_id"],
                    expected=dec(v.get("expected")), actual=dec(v.get("actual")),
                    difference=dec(v.get("difference")), detail=v.get("detail", ""),
                    lifecycle={k: v[k] for k in _LIFECYCLE_KEYS if v.get(k) is not None} or None,
                )
                for v in data.get("violations", [])
            ],
            skipped=dict(data.get("skipped", {})),
            summaries=dict(data.get("summaries", {})),
            error=data.get("error"),
            started_at=float(data.get("started_at", 0.0)),
            producer=data.get("producer"),
            acknowledged_counts={k: int(v) for k, v in data.get("acknowledged_counts", {}).items()},
            new_counts={k: int(v) for k, v in data.get("new_violation_counts", {}).items()},
            oldest_unacknowledged={k: float(v) for k, v in data.get("oldest_unacknowledged_at", {}).items()},
        )
