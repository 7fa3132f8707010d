"""The checker framework: what a checker declares and the context it runs in.

A checker is one class in one module of this package (or of an installed plugin
package, see ``zsmon.checkers`` entry points). It declares its invariants and,
in ``run``, hands set-based SQL to the context, which keeps the count of every
violating entity and a capped sample of the largest ones.

The context's connection is inside one ``REPEATABLE READ READ ONLY``
transaction opened by the runner: every query of a run sees the same snapshot.
"""
from __future__ import annotations

from dataclasses import dataclass
from decimal import Decimal
from typing import Any, Callable, ClassVar, Iterable, Iterator, Literal

import psycopg
from psycopg import sql as pgsql
from psycopg.rows import dict_row
from pydantic import BaseModel, ConfigDict

from zsmon.core.results import Violation

Severity = Literal["critical", "warning", "info"]


@dataclass(frozen=True)
class Invariant:
    """One property a checker proves. ``id`` is canonical (see domain.md)."""

    id: str
    description: str
    entity_type: str
    severity: Severity = "warning"
    # True when judging it needs memory across runs (Redis); without Redis it is skipped.
    needs_memory: bool = False


class CheckerSettings(BaseModel):
    """Base for a checker's own settings (``checkers.<name>.settings`` in the config)."""

    model_config = ConfigDict(extra="forbid")


class Checker:
    """Base class of every checker. Subclasses set the class attributes and implement ``run``."""

    name: ClassVar[str]
    description: ClassVar[str] = ""
    invariants: ClassVar[tuple[Invariant, ...]] = ()
    Settings: ClassVar[type[CheckerSettings]] = CheckerSettings
    default_interval_seconds: ClassVar[float] = 60.0
    # Checkers that can re-check only what changed since a watermark set this.
    supports_incremental: ClassVar[bool] = False
    default_full_interval_seconds: ClassVar[float] = 3600.0
    # Where the checker came from: builtin, plugin (entry point) or yaml.
    source: ClassVar[str] = "builtin"
    # A runbook of the checker's own (YAML checkers, plugins); None: the default page under
    # http.runbook_base_url. Alerts and the status page link to it.
    runbook_url: ClassVar[str | None] = None

    def __init__(self, settings: CheckerSettings | None = None) -> None:
        self.settings = settings if settings is not None else self.Settings()

    def run(self, ctx: "CheckContext") -> None:  # pragma: no cover - abstract
        raise NotImplementedError

    # Hooks for checker-specific metrics (e.g. the payments failure counter).
    def register_metrics(self, registry: Any) -> None:
        """Create extra metrics on ``registry`` once, when the service starts."""

    def observe(self, result: Any) -> None:
        """Called with every published result of this checker."""

    @classmethod
    def invariant(cls, invariant_id: str) -> Invariant:
        for inv in cls.invariants:
            if inv.id == invariant_id:
                return inv
        raise KeyError(f"checker {cls.name!r} declares no invariant {invariant_id!r}")


_WRAP_ONE = """
SELECT entity_id::text AS entity_id, expected, actual, difference, detail,
       count(*) OVER () AS total
FROM ({inner}) AS v
ORDER BY abs(difference) DESC NULLS LAST, entity_id
LIMIT {limit}
"""

_WRAP_MANY = """
SELECT invariant, entity_type, entity_id, expected, actual, difference, detail, total
FROM (
    SELECT v.invariant::text AS invariant, v.entity_type::text AS entity_type,
           v.entity_id::text AS entity_id, v.expected, v.actual, v.difference, v.detail,
           count(*) OVER (PARTITION BY v.invariant) AS total,
           row_number() OVER (PARTITION BY v.invariant
                              ORDER BY abs(v.difference) DESC NULLS LAST, v.entity_id::text) AS rn
    FROM ({inner}) AS v
) AS ranked
WHERE rn <= {limit} OR starts_with(invariant, '_')
"""


def _sort_key(v: Violation) -> tuple:
    diff = v.difference
    magnitude = abs(diff) if isinstance(diff, Decimal) else Decimal(-1)
    return (-magnitude, v.entity_id)


class CheckContext:
    """What a checker run sees: one snapshot, its settings, optional Redis memory."""

    def __init__(
        self,
        checker: Checker,
        conn: psycopg.Connection,
        *,
        mode: str = "full",
        sample_limit: int = 100,
        redis: Any = None,
        key_prefix: str = "zsmon:",
        log: Any = None,
    ) -> None:
        self.checker = checker
        self.conn = conn
        self.mode = mode
        self.settings = checker.settings
        self.sample_limit = sample_limit
        self.redis = redis
        self._key_prefix = key_prefix
        self.log = log
        self.counts: dict[str, int] = {}
        self.samples: dict[str, list[Violation]] = {}
        self.skipped: dict[str, str] = {}
        self.summaries: dict[str, str] = {}
        # Side counts of find_many passes (rows named "_..."): entity ids sampled per name.
        self.side: dict[str, list[str]] = {}
        self._after_success: list[Callable[[], None]] = []

    # ---- reading -------------------------------------------------------
    def query(self, sql: str | pgsql.Composable, params: Any = None) -> list[dict[str, Any]]:
        with self.conn.cursor(row_factory=dict_row) as cur:
            cur.execute(sql, params)
            return cur.fetchall() if cur.description else []

    def scalar(self, sql: str | pgsql.Composable, params: Any = None) -> Any:
        with self.conn.cursor() as cur:
            cur.execute(sql, params)
            row = cur.fetchone()
            return row[0] if row else None

    def stream(self, sql: str, params: Any = None, batch: int = 10_000) -> Iterator[dict[str, Any]]:
        """Rows through a server-side cursor: memory stays flat however large the result."""
        with self.conn.cursor(name=f"zsmon_stream_{id(self)}", row_factory=dict_row) as cur:
            cur.itersize = batch
            cur.execute(sql, params)
            yield from cur

    # ---- judging -------------------------------------------------------
    def find(self, invariant_id: str, sql: str, params: Any = None) -> int:
        """Judge one invariant with one set-based query.

        ``sql`` returns one row per violating entity with the columns
        ``entity_id, expected, actual, difference, detail``; the context keeps the
        count and the ``sample_limit`` largest ``|difference|`` rows. Returns the count.
        """
        inv = self.checker.invariant(invariant_id)
        wrapped = pgsql.SQL(_WRAP_ONE).format(inner=pgsql.SQL(sql), limit=pgsql.Literal(self.sample_limit))
        rows = self.query(wrapped, params)
        total = int(rows[0]["total"]) if rows else 0
        sample = [
            Violation(inv.id, inv.entity_type, r["entity_id"], r["expected"], r["actual"],
                      r["difference"], r["detail"] or "")
            for r in rows
        ]
        self._record(inv.id, total, sample)
        return total

    def find_many(self, sql: str, invariants: Iterable[str], params: Any = None) -> dict[str, int]:
        """Judge several invariants in one pass over the data.

        ``sql`` returns ``invariant, entity_type, entity_id, expected, actual,
        difference, detail`` (``entity_type`` may be NULL: the invariant's own is
        used). Every id in ``invariants`` counts as judged, with 0 when no row names it.

        Rows whose ``invariant`` starts with ``_`` are not violations but a side set the
        same pass produces (e.g. ``_deferred`` entities): their total is returned under that
        name and all their entity ids are in ``ctx.side[name]`` (keep such sets small).
        """
        ids = [self.checker.invariant(i).id for i in invariants]
        wrapped = pgsql.SQL(_WRAP_MANY).format(inner=pgsql.SQL(sql), limit=pgsql.Literal(self.sample_limit))
        rows = self.query(wrapped, params)
        totals: dict[str, int] = {i: 0 for i in ids}
        samples: dict[str, list[Violation]] = {i: [] for i in ids}
        for r in rows:
            if r["invariant"].startswith("_"):
                totals[r["invariant"]] = int(r["total"])
                self.side.setdefault(r["invariant"], []).append(r["entity_id"])
                continue
            inv = self.checker.invariant(r["invariant"])
            if inv.id not in totals:
                raise ValueError(f"query returned invariant {inv.id!r} not listed in invariants=")
            totals[inv.id] = int(r["total"])
            samples[inv.id].append(
                Violation(inv.id, r["entity_type"] or inv.entity_type, r["entity_id"], r["expected"],
                          r["actual"], r["difference"], r["detail"] or "")
            )
        for i in ids:
            self._record(i, totals[i], sorted(samples[i], key=_sort_key))
        return totals

    def report(self, invariant_id: str, violations: Iterable[Violation], count: int | None = None) -> int:
        """Judge an invariant computed in Python (streamed or across runs)."""
        inv = self.checker.invariant(invariant_id)
        found = list(violations)
        total = len(found) if count is None else count
        self._record(inv.id, total, sorted(found, key=_sort_key)[: self.sample_limit])
        return total

    def skip(self, invariant_id: str, reason: str) -> None:
        """This run could not judge the invariant: it is listed as skipped, never as passed."""
        inv = self.checker.invariant(invariant_id)
        self.counts.pop(inv.id, None)
        self.samples.pop(inv.id, None)
        self.skipped[inv.id] = reason

    def summarize(self, invariant_id: str, text: str) -> None:
        """One line that explains a systemic pattern (e.g. "N of N channels have no deposit")."""
        self.summaries[self.checker.invariant(invariant_id).id] = text

    def after_success(self, fn: Callable[[], None]) -> None:
        """Run ``fn`` only if this run completes and its result is published (watermarks, memory)."""
        self._after_success.append(fn)

    # ---- memory across runs ------------------------------------------------
    def key(self, *parts: str) -> str:
        """A Redis key under zsmon's prefix, namespaced by checker."""
        return self._key_prefix + ":".join((self.checker.name, *parts))

    def _record(self, invariant_id: str, total: int, sample: list[Violation]) -> None:
        self.counts[invariant_id] = total
        self.samples[invariant_id] = sample
        self.skipped.pop(invariant_id, None)
