"""The checker framework: what a checker declares and the context it runs in.

A checker is one class in one module of this package (or of an installed plugin
package, see ``zsmon.checkers`` entry points). It declares its invariants and,
in ``run``, hands set-based SQL to the context, which keeps the count of every
violating entity and a capped sample of the largest ones.

The context's connection is inside one ``REPEATABLE READ READ ONLY``
transaction opened by the runner: every query of a run sees the same snapshot.
A long pass can be split over several connections that import that very snapshot
(``CheckContext.parallel`` / ``find_many_split``): it is still one snapshot, and the
parts' findings merge exactly into what one connection would have found.
"""
from __future__ import annotations

import copy
import itertools
import re
import threading
import time
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field
from decimal import Decimal
from typing import Any, Callable, ClassVar, Iterable, Iterator, Literal, Mapping, Protocol, Sequence, TypeVar

import psycopg
import redis
from psycopg import sql as pgsql
from psycopg.rows import dict_row, tuple_row

from zsmon.core.logging import redactor
from zsmon.core.memory import ColumnMemory, StoredState
from zsmon.core.results import Violation
from zsmon.core.yamlfile import Strict

Severity = Literal["critical", "warning", "info"]

_cursor_ids = itertools.count()  # names of server-side cursors, unique per process
# ``{table}`` and the word after it (its alias, or the next keyword).
_TABLE = re.compile(r"\{([a-z_][a-z0-9_]*)\}(?:\s+(?:AS\s+)?([A-Za-z_][A-Za-z0-9_]*))?")
_KEYWORDS = {"WHERE", "GROUP", "ORDER", "JOIN", "LEFT", "RIGHT", "INNER", "FULL", "CROSS", "NATURAL", "ON",
             "USING", "LIMIT", "OFFSET", "UNION", "INTERSECT", "EXCEPT", "WINDOW", "HAVING", "FOR", "TABLESAMPLE"}


@dataclass(frozen=True)
class Invariant:
    """One property a checker proves. ``id`` is canonical (docs/invariants.md lists them)."""

    id: str
    description: str
    entity_type: str
    severity: Severity = "warning"
    # True when judging it needs memory across runs (Redis); without Redis it is skipped.
    needs_memory: bool = False
    # True when the difference is a duration that grows while the violation stands (seconds past a
    # deadline): its growth alone does not undo an acknowledgement.
    difference_is_age: bool = False
    # The platform columns judging it reads ("table.column"). When one is missing from the monitored
    # database, this invariant alone is skipped with the reason; the rest of the checker still runs.
    reads: tuple[str, ...] = ()


@dataclass(frozen=True)
class IndexAdvice:
    """An index the monitored schema may lack that keeps this checker's incremental runs proportional to what
    changed (zsmon runs no DDL: it says so at start-up, in ``zsmon checkers explain`` and in the docs)."""

    table: str
    column: str
    saves: str  # what it saves, in words

    @property
    def statement(self) -> str:
        return f"CREATE INDEX CONCURRENTLY zsmon_{self.table}_{self.column} ON {self.table} ({self.column})"


def missing_indexes(conn: psycopg.Connection, advice: Iterable[IndexAdvice]) -> list[IndexAdvice]:
    """The advised indexes of which no index of the table has the column as its first key."""
    advice = list(advice)
    if not advice:
        return []
    rows = conn.execute(
        "SELECT t.tbl, t.col, EXISTS (SELECT 1 FROM pg_index i JOIN pg_attribute a ON a.attrelid = i.indrelid "
        "AND a.attnum = i.indkey[0] WHERE i.indrelid = to_regclass(t.tbl) AND a.attname = t.col) "
        "FROM unnest(%s::text[], %s::text[]) AS t(tbl, col)",
        ([a.table for a in advice], [a.column for a in advice])).fetchall()
    present = {(t, c) for t, c, ok in rows if ok}
    return [a for a in advice if (a.table, a.column) not in present]


class CheckerSettings(Strict):
    """Base for a checker's own settings (``checkers.<name>.settings`` in the config)."""


class Checker:
    """Base class of every checker. Subclasses set the class attributes and implement ``run``."""

    name: ClassVar[str]
    description: ClassVar[str] = ""
    invariants: ClassVar[tuple[Invariant, ...]] = ()
    Settings: ClassVar[type[CheckerSettings]] = CheckerSettings
    default_interval_seconds: ClassVar[float] = 60.0
    # Checkers that can re-check only what changed since a watermark set this.
    supports_incremental: ClassVar[bool] = False
    # Indexes its incremental runs rely on that the platform's schema may lack (IndexAdvice).
    recommended_indexes: ClassVar[tuple[IndexAdvice, ...]] = ()
    default_full_interval_seconds: ClassVar[float] = 3600.0
    # Where the checker came from: builtin, plugin (entry point) or yaml.
    source: ClassVar[str] = "builtin"
    # A runbook of the checker's own (YAML checkers, plugins); None: the default page under
    # http.runbook_base_url. Alerts and the status page link to it.
    runbook_url: ClassVar[str | None] = None
    # The SQL types of the platform tables' columns its queries read (table -> column -> type). A query
    # names a table as ``{table}``: when the table lacks one of these columns (schema drift) the context
    # stands a typed NULL in for it, so the invariants that do not read it are still judged.
    columns: ClassVar[Mapping[str, Mapping[str, str]]] = {}

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


# Ranks and caps the violations of one pass in SQL, so a million violating rows cost one sort, not a
# transfer. Rows are ranked within each (invariant, tag) group first: the full count per tag and the top
# {track} of each come out of that one sort; the top {track} of the invariant are among them. The top
# {limit} come whole (the sample); the rest up to {track} only as entity id and difference (the violators
# the lifecycle tracks). With a ``priority`` column, lower priorities rank first (a rare, genuine kind
# before a systemic one, so the sample shows it). Side rows (invariant "_...") get a group each, so they all pass. Ties: entity id
# in byte order, as in ``report``.
_RANK = """
SELECT invariant, entity_type, entity_id, difference, tag, priority, tag_total, total, rn,
       CASE WHEN rn <= {limit} OR starts_with(invariant, '_') THEN expected END AS expected,
       CASE WHEN rn <= {limit} OR starts_with(invariant, '_') THEN actual END AS actual,
       CASE WHEN rn <= {limit} OR starts_with(invariant, '_') THEN detail END AS detail
FROM (
    SELECT t.*, sum(t.tag_total) FILTER (WHERE t.tag_rn = 1) OVER (PARTITION BY t.invariant) AS total,
           row_number() OVER (PARTITION BY t.invariant
                              ORDER BY t.priority, abs(t.difference) DESC NULLS LAST, t.entity_id COLLATE "C") AS rn
    FROM (
        SELECT v.invariant::text AS invariant, v.entity_type::text AS entity_type,
               v.entity_id::text AS entity_id, v.expected, v.actual, v.difference, v.detail,
               {tag}::text AS tag, {priority}::int AS priority, count(*) OVER w AS tag_total,
               row_number() OVER (w ORDER BY abs(v.difference) DESC NULLS LAST,
                                  v.entity_id::text COLLATE "C") AS tag_rn
        FROM ({inner}) AS v
        WINDOW w AS (PARTITION BY v.invariant, {tag},
                     CASE WHEN starts_with(v.invariant::text, '_') THEN v.entity_id::text END)
    ) AS t
    WHERE t.tag_rn <= {track}
) AS ranked
WHERE rn <= {track} OR tag_rn = 1 OR starts_with(invariant, '_')
ORDER BY invariant, rn
"""

# ``find``'s rows name no invariant: the one judged is added as a constant.
_ONE = "SELECT {invariant}::text AS invariant, NULL::text AS entity_type, q.* FROM ({inner}) AS q"


@dataclass(frozen=True)
class Found:
    """What one set-based pass found for one invariant (or one side set ``_...``)."""

    count: int = 0
    # The largest |difference| first, at most ``sample_limit`` (side sets: every row).
    sample: list[Violation] = field(default_factory=list)
    # The count per value of the query's ``tag`` column (as text: "true"/"false" for a boolean).
    tags: dict[str | None, int] = field(default_factory=dict)

    @property
    def tagged(self) -> int:
        """How many rows a boolean ``tag`` marked."""
        return self.tags.get("true", 0)


@dataclass
class Ranked:
    """What one ranked pass (``_RANK``) returned, before it is recorded: per invariant (and side set) the
    count, the count per tag and its rows in rank order (at most ``track_limit`` per invariant; every row
    of a side set). The rows of the top ``sample_limit`` carry their whole ``Violation``; the others only
    entity id and difference. Rankings of disjoint parts of the entities merge exactly (``merge_ranked``)."""

    totals: dict[str, int]
    tags: dict[str, dict[str | None, int]]
    # name -> [(rank key, tag, entity id, difference, Violation or None)], in rank order
    rows: dict[str, list[tuple[tuple, str | None, str, Any, Violation | None]]]


def _rank_key(priority: Any, difference: Any, entity_id: str) -> tuple:
    """``_RANK``'s order in Python: priority (NULLS LAST), |difference| descending (NULLS LAST), entity id in
    byte order (``COLLATE "C"``: for UTF-8 text, code-point order is byte order)."""
    missing = difference is None
    return (priority is None, 0 if priority is None else priority, missing,
            0 if missing else -abs(difference), entity_id)


def merge_ranked(parts: Sequence[Ranked], sample_limit: int, track_limit: int) -> Ranked:
    """The ranking of the union of disjoint parts (each entity judged in exactly one part): counts and tag
    counts summed, rows re-ranked and capped as ``_RANK`` caps them. Exact when ``priority`` is the same for
    every row of one (invariant, tag) group (the rows ``_RANK`` keeps per tag are then a part's top rows)."""
    totals: dict[str, int] = {}
    tags: dict[str, dict[str | None, int]] = {}
    rows: dict[str, list] = {}
    for part in parts:
        for name, n in part.totals.items():
            totals[name] = totals.get(name, 0) + n
        for name, counts in part.tags.items():
            merged = tags.setdefault(name, {})
            for tag, n in counts.items():
                merged[tag] = merged.get(tag, 0) + n
        for name, got in part.rows.items():
            rows.setdefault(name, []).extend(got)
    for name, got in rows.items():
        got.sort(key=lambda r: r[0])
        if name.startswith("_"):
            continue  # a side set: every row
        priorities: dict[str | None, tuple] = {}
        for key, tag, *_ in got:
            if priorities.setdefault(tag, key[:2]) != key[:2]:
                raise ValueError(f"a split pass needs one priority per (invariant, tag): {name!r} tag {tag!r} "
                                 "has several")
        del got[track_limit:]
        for i in range(min(sample_limit, len(got)), len(got)):
            got[i] = (*got[i][:4], None)
    return Ranked(totals, tags, rows)


class SharedSnapshot(Protocol):
    """Helper connections inside transactions that imported the run's snapshot (``zsmon.core.db``)."""

    helpers: list[psycopg.Connection]

    def cancel(self) -> None:
        """Cancel on the server whatever the run's connection and the helpers are running."""


Part = TypeVar("Part")
Result = TypeVar("Result")


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
        redis_reason: str | None = None,
        key_prefix: str = "zsmon:",
        log: Any = None,
        track_limit: int = 10_000,
        lifecycle: Any = None,
        share: Callable[[int], AbstractContextManager[SharedSnapshot]] | None = None,
        max_connections: int = 1,
    ) -> None:
        self.checker = checker
        self.conn = conn
        self._mode = mode
        self.settings = checker.settings
        self.sample_limit = sample_limit
        self.redis = redis
        # Why ``redis`` is None (shown in the reasons of skipped memory invariants).
        self.redis_reason = redis_reason
        self._key_prefix = key_prefix
        self.log = log
        # Violators remembered per invariant (zsmon.core.lifecycle), beyond the sample: id -> difference.
        self.track_limit = max(track_limit, sample_limit)
        self.lifecycle = lifecycle
        self.counts: dict[str, int] = {}
        self.samples: dict[str, list[Violation]] = {}
        self.tracked: dict[str, dict[str, Any]] = {}
        self.skipped: dict[str, str] = {}
        self.summaries: dict[str, str] = {}
        self.fallback_reason: str | None = None
        self._snapshot_time: float | None = None
        self._after_success: list[Callable[[], None]] = []
        # Schema drift (``inspect_schema``): invariants that cannot be judged here -> why; the
        # "table.column"s missing; what ``{table}`` stands for in this checker's queries.
        self.unavailable: dict[str, str] = {}
        self.missing: set[str] = set()
        self._relations: dict[str, str] = {t: t for t in checker.columns}
        # Split passes: ``share(n)`` opens n helper connections on this snapshot (None: this context cannot
        # split); how many connections a split pass uses unless the checker says otherwise.
        self._share = share
        self.max_connections = max(1, max_connections)

    # ---- mode ----------------------------------------------------------------
    @property
    def mode(self) -> str:
        """``full`` or ``incremental``: what this run does (and what its result says it did)."""
        return self._mode

    def fall_back_to_full(self, reason: str) -> None:
        """Sweep everything although an incremental run was asked (no state to resume, too much changed)."""
        if self._mode == "full":
            return
        self._mode = "full"
        self.fallback_reason = reason
        if self.log is not None:
            self.log.debug("incremental_fell_back_to_full", reason=reason)

    # ---- schema drift ----------------------------------------------------
    def inspect_schema(self) -> None:
        """Find the declared columns missing from the monitored database (one catalog query): skip the
        invariants that read them, with the reason, and stand typed NULLs in for them in ``{table}``."""
        wanted: dict[str, set[str]] = {t: set(cols) for t, cols in self.checker.columns.items()}
        for inv in self.checker.invariants:
            for ref in inv.reads:
                table, _, column = ref.partition(".")
                wanted.setdefault(table, set()).add(column)
        if not wanted:
            return
        present: dict[str, set[str]] = {}
        with self.conn.cursor() as cur:
            cur.execute("SELECT t.name, a.attname FROM unnest(%s::text[]) AS t(name) "
                        "LEFT JOIN pg_attribute a ON a.attrelid = to_regclass(t.name) AND a.attnum > 0 "
                        "AND NOT a.attisdropped", (sorted(wanted),))
            for table, column in cur.fetchall():
                cols = present.setdefault(table, set())
                if column is not None:
                    cols.add(column)
        missing_tables = {t for t, cols in present.items() if not cols}
        self.missing = {f"{t}.{c}" for t, cols in wanted.items() for c in cols
                        if t in missing_tables or c not in present.get(t, set())}
        for inv in self.checker.invariants:
            tables = sorted({r.partition(".")[0] for r in inv.reads} & missing_tables)
            columns = sorted(r for r in inv.reads if r in self.missing and r.partition(".")[0] not in missing_tables)
            reason = "; ".join(
                ([f"table {', '.join(tables)} is missing"] if tables else [])
                + ([f"column{'s' if len(columns) > 1 else ''} {', '.join(columns)} "
                    f"{'are' if len(columns) > 1 else 'is'} missing"] if columns else []))
            if reason:
                self.skip(inv.id, f"{reason} in the monitored database (renamed or dropped by a migration?): "
                                  "not judged; the schema checker names every drift")
                self.unavailable[inv.id] = self.skipped[inv.id]
        for table, types in self.checker.columns.items():
            if table in missing_tables:
                stand_in = ", ".join(f"NULL::{typ} AS {col}" for col, typ in types.items())
                self._relations[table] = f"(SELECT {stand_in} WHERE false)"
            else:
                absent = [f"NULL::{typ} AS {col}" for col, typ in types.items() if f"{table}.{col}" in self.missing]
                if absent:
                    self._relations[table] = f"(SELECT *, {', '.join(absent)} FROM {table})"

    def judged(self, *invariant_ids: str) -> bool:
        """Whether any of these invariants can be judged on this database (their columns exist)."""
        return any(i not in self.unavailable for i in invariant_ids)

    def sql(self, text: str) -> str:
        """``text`` with each ``{table}`` of the checker's declared tables replaced by what it stands for:
        the table itself, or the table with typed NULLs for its missing columns. Other braces are left."""
        def stand_in(m: re.Match[str]) -> str:
            table, word = m.group(1), m.group(2)
            rest = m.group(0)[len(table) + 2:]  # what followed the placeholder, kept as written
            relation = self._relations.get(table)
            if relation is None:
                return m.group(0)  # not a table this checker declares: left alone
            if relation == table or (word is not None and word.upper() not in _KEYWORDS):
                return relation + rest  # the table itself, or a stand-in under the query's own alias
            return f"{relation} AS {table}{rest}"  # a subquery needs an alias: the table's name

        return _TABLE.sub(stand_in, text)

    # ---- reading -------------------------------------------------------
    @property
    def snapshot_time(self) -> float:
        """The snapshot's ``transaction_timestamp()`` in epoch seconds: the time every query of the run sees."""
        if self._snapshot_time is None:
            self._snapshot_time = float(self.scalar("SELECT extract(epoch FROM transaction_timestamp())::float8"))
        return self._snapshot_time

    def query(self, sql: str | pgsql.Composable, params: Any = None) -> list[dict[str, Any]]:
        with self.conn.cursor(row_factory=dict_row) as cur:
            cur.execute(self.sql(sql) if isinstance(sql, str) else sql, params)
            return cur.fetchall() if cur.description else []

    def scalar(self, sql: str | pgsql.Composable, params: Any = None) -> Any:
        with self.conn.cursor() as cur:
            cur.execute(self.sql(sql) if isinstance(sql, str) else sql, params)
            row = cur.fetchone()
            return row[0] if row else None

    def batches(self, sql: str, params: Any = None, size: int = 10_000, row_factory: Any = tuple_row
                ) -> Iterator[list[Any]]:
        """Rows in lists of ``size`` through a server-side cursor: memory stays flat however large the result."""
        with self.conn.cursor(name=f"zsmon_stream_{next(_cursor_ids)}", row_factory=row_factory) as cur:
            cur.itersize = size
            cur.execute(self.sql(sql), params)
            while rows := cur.fetchmany(size):
                yield rows

    def stream(self, sql: str, params: Any = None, batch: int = 10_000) -> Iterator[dict[str, Any]]:
        """Rows one by one (as dicts) through a server-side cursor."""
        for rows in self.batches(sql, params, batch, dict_row):
            yield from rows

    # ---- judging -------------------------------------------------------
    def find(self, invariant_id: str, sql: str, params: Any = None) -> int:
        """Judge one invariant with one set-based query.

        ``sql`` returns one row per violating entity with the columns
        ``entity_id, expected, actual, difference, detail``; the context keeps the
        count and the ``sample_limit`` largest ``|difference|`` rows. Returns the count.
        """
        inv = self.checker.invariant(invariant_id)
        if inv.id in self.unavailable:
            return 0
        inner = pgsql.SQL(_ONE).format(invariant=pgsql.Literal(inv.id), inner=pgsql.SQL(self.sql(sql)))
        return self.find_many(inner, [inv.id], params)[inv.id].count

    def find_many(self, sql: str | pgsql.Composable, invariants: Iterable[str], params: Any = None, *,
                  tags: bool = False, priority: bool = False) -> dict[str, Found]:
        """Judge several invariants in one pass over the data; returns what was found per invariant.

        ``sql`` returns ``invariant, entity_type, entity_id, expected, actual,
        difference, detail`` (``entity_type`` may be NULL: the invariant's own is
        used), and with ``tags`` a ``tag`` column too, counted per value (``Found.tags``):
        how many violations share a pattern worth a summary line. With ``priority`` an integer
        ``priority`` column ranks rows before ``|difference|`` does (lower first). Every id in
        ``invariants`` counts as judged, with 0 when no row names it.

        Rows whose ``invariant`` starts with ``_`` are not violations but a side set the
        same pass produces (e.g. ``_deferred`` entities): they come back under that name,
        all of them (keep such sets small), and are not recorded.
        """
        return self.record_ranked(
            [self.checker.invariant(i).id for i in invariants],
            self.rank(sql, invariants, params, tags=tags, priority=priority))

    def rank(self, sql: str | pgsql.Composable, invariants: Iterable[str], params: Any = None, *,
             tags: bool = False, priority: bool = False) -> Ranked:
        """``find_many``'s pass without recording what it found (a part of a split pass)."""
        ids = [self.checker.invariant(i).id for i in invariants]
        inner = pgsql.SQL(self.sql(sql)) if isinstance(sql, str) else sql
        ranked = pgsql.SQL(_RANK).format(inner=inner, limit=pgsql.Literal(self.sample_limit),
                                         track=pgsql.Literal(self.track_limit),
                                         tag=pgsql.SQL("v.tag" if tags else "NULL"),
                                         priority=pgsql.SQL("v.priority" if priority else "0"))
        out = Ranked({i: 0 for i in ids}, {i: {} for i in ids}, {i: [] for i in ids})
        for r in self.query(ranked, params):
            name = r["invariant"]
            side = name.startswith("_")
            if not side and name not in out.totals:
                raise ValueError(f"query returned invariant {name!r} not listed in invariants=")
            out.totals[name] = int(r["total"])
            if not side:
                out.tags[name][r["tag"]] = int(r["tag_total"])
                if r["rn"] > self.track_limit:
                    continue  # the row only carried its tag's count
            violation = None
            if side or r["rn"] <= self.sample_limit:
                entity_type = r["entity_type"] or ("" if side else self.checker.invariant(name).entity_type)
                violation = Violation(name, entity_type, r["entity_id"], r["expected"], r["actual"],
                                      r["difference"], r["detail"] or "")
            out.rows.setdefault(name, []).append(
                (_rank_key(r["priority"], r["difference"], r["entity_id"]), r["tag"], r["entity_id"],
                 r["difference"], violation))
        return out

    def record_ranked(self, ids: list[str], ranked: Ranked) -> dict[str, Found]:
        """Record a ranking (``rank``, or ``merge_ranked`` of the parts) as ``find_many`` does; what was found."""
        samples: dict[str, list[Violation]] = {}
        for name, rows in ranked.rows.items():
            samples[name] = [v for *_, v in rows if v is not None]
        for i in ids:
            rows = ranked.rows.get(i, [])
            self._record(i, ranked.totals.get(i, 0), samples.get(i, []),
                         {entity: diff for _, _, entity, diff, _ in rows[: self.track_limit]})
        return {name: Found(n, samples.get(name, []), ranked.tags.get(name, {}))
                for name, n in ranked.totals.items()}

    # ---- split passes: several connections, one snapshot ------------------------------------------
    def parallel(self, parts: Sequence[Part], fn: Callable[[CheckContext, Part], Result],
                 connections: int | None = None) -> list[Result]:
        """``fn(ctx, part)`` for every part, on up to ``connections`` (default ``max_connections``) connections
        that all see this run's snapshot: this context's and helpers that imported it. Each connection takes
        the next part in list order (put the longest first). ``ctx`` is this context or this context on a
        helper connection: a part may rank (``rank``) and return, or judge and record as a run does. Results
        come back in the order of ``parts``. When a part fails, the others are cancelled on the server,
        every helper is closed, and the first failure is raised. One connection (or no way to share the
        snapshot): the parts run one after another on this context."""
        parts = list(parts)
        n = min(len(parts), connections if connections is not None else self.max_connections)
        if n <= 1 or self._share is None:
            return [fn(self, p) for p in parts]
        with self._share(n - 1) as shared:
            contexts = [self] + [self._helper(c) for c in shared.helpers]
            if len(contexts) == 1:
                return [fn(self, p) for p in parts]
            return self._run_parts(parts, fn, contexts, shared)

    def _run_parts(self, parts: list[Part], fn: Callable[[CheckContext, Part], Result],
                   contexts: list[CheckContext], shared: SharedSnapshot) -> list[Result]:
        results: list[Any] = [None] * len(parts)
        todo = list(range(len(parts)))
        lock = threading.Lock()
        failures: list[tuple[int, BaseException]] = []

        def work(c: CheckContext) -> None:
            while True:
                with lock:
                    if failures or not todo:
                        return
                    i = todo.pop(0)
                started = time.perf_counter()
                try:
                    results[i] = fn(c, parts[i])
                except BaseException as exc:  # noqa: BLE001 - handed to the calling thread
                    with lock:
                        failures.append((i, exc))
                    return
                if self.log is not None:  # which part holds the split pass up
                    self.log.debug("split_part_done", part=i + 1, parts=len(parts),
                                   connection=contexts.index(c) + 1, seconds=round(time.perf_counter() - started, 3))

        threads = [threading.Thread(target=work, args=(c,), name=f"zsmon-part-{k}", daemon=True)
                   for k, c in enumerate(contexts)]
        for t in threads:
            t.start()
        t0 = time.perf_counter()
        try:
            cancelled = 0.0
            while any(t.is_alive() for t in threads):
                for t in threads:
                    t.join(0.05)
                # A part failed: stop the others now (again every second: a cancel that arrived between two
                # statements of a part stops nothing).
                if failures and time.perf_counter() - cancelled > 1.0:
                    shared.cancel()
                    cancelled = time.perf_counter()
        except BaseException:
            shared.cancel()
            raise
        if failures:
            i, exc = failures[0]
            if self.log is not None:
                self.log.warning("split_part_failed", part=i + 1, parts=len(parts),
                                 error=redactor.scrub(str(exc).strip().splitlines()[0] if str(exc).strip()
                                                      else type(exc).__name__))
            raise exc
        if self.log is not None:
            self.log.debug("split_pass_done", parts=len(parts), connections=len(contexts),
                           seconds=round(time.perf_counter() - t0, 3))
        return results

    def _helper(self, conn: psycopg.Connection) -> CheckContext:
        """This context on a helper connection: what a part records, skips or summarizes lands in this run
        (the same dicts, memory and after-success steps); it cannot split further."""
        snapshot_time = self.snapshot_time  # the run's, not the helper transaction's own start
        c = copy.copy(self)
        c.conn, c._share, c.max_connections, c._snapshot_time = conn, None, 1, snapshot_time
        return c

    def find_many_split(self, sql: str | pgsql.Composable, invariants: Iterable[str], parts: Sequence[Mapping[str, Any]],
                        params: Mapping[str, Any] | None = None, *, tags: bool = False, priority: bool = False,
                        prepare: Callable[[CheckContext], AbstractContextManager[Any]] | None = None,
                        connections: int | None = None) -> dict[str, Found]:
        """``find_many`` over disjoint parts of the entities, judged in parallel on connections sharing this
        snapshot (``parallel``), merged exactly: the same counts, tag counts, sample and tracked violators,
        in the same order, as one pass over everything.

        Each part's parameters (e.g. a range of ids: ``split_points``) are merged into ``params``; every
        entity must fall in exactly one part, and ``priority`` must be the same for all the rows of one
        (invariant, tag). ``prepare(ctx)`` wraps each part's query on its own connection (planner settings
        are per connection)."""
        ids = [self.checker.invariant(i).id for i in invariants]

        def one(c: CheckContext, part: Mapping[str, Any]) -> Ranked:
            with prepare(c) if prepare is not None else nullcontext():
                return c.rank(sql, ids, {**(params or {}), **part}, tags=tags, priority=priority)

        ranked = self.parallel(parts, one, connections)
        return self.record_ranked(ids, merge_ranked(ranked, self.sample_limit, self.track_limit))

    def split_points(self, table: str, column: str, parts: int, sample_rows: int = 30_000) -> list[Any]:
        """Up to ``parts - 1`` ascending values of ``table.column`` that cut the table into parts of about
        the same number of rows, read from a block sample (``TABLESAMPLE SYSTEM``) of about ``sample_rows``
        rows. Any points give an exact split pass; these balance it. [] when the table is a stand-in
        (schema drift) or empty."""
        if parts <= 1 or self._relations.get(table, table) != table:
            return []
        estimate = self.scalar("SELECT reltuples FROM pg_class WHERE oid = to_regclass(%s)", (table,))
        percent = 100.0 if not estimate or estimate <= sample_rows else max(0.001, 100.0 * sample_rows / estimate)
        points = self.scalar(
            pgsql.SQL("SELECT percentile_disc(%s::float8[]) WITHIN GROUP (ORDER BY {col}) "
                      "FROM {tbl} TABLESAMPLE SYSTEM (%s)").format(col=pgsql.Identifier(column),
                                                                   tbl=pgsql.Identifier(table)),
            ([k / parts for k in range(1, parts)], percent))
        return sorted({p for p in points or [] if p is not None})

    def report(self, invariant_id: str, violations: Iterable[Violation], count: int | None = None) -> int:
        """Judge an invariant computed in Python (streamed or across runs)."""
        inv = self.checker.invariant(invariant_id)
        found = sorted(violations, key=_sort_key)
        total = len(found) if count is None else count
        self._record(inv.id, total, found[: self.sample_limit],
                     {v.entity_id: v.difference for v in found[: self.track_limit]})
        return total

    def skip(self, invariant_id: str, reason: str) -> None:
        """This run could not judge the invariant: it is listed as skipped, never as passed."""
        inv = self.checker.invariant(invariant_id)
        if inv.id in self.unavailable:
            return  # the missing column is the reason that stands
        self.counts.pop(inv.id, None)
        self.samples.pop(inv.id, None)
        self.tracked.pop(inv.id, None)
        self.skipped[inv.id] = reason

    def summarize(self, invariant_id: str, text: str) -> None:
        """One line that explains a systemic pattern (e.g. "N of N channels have no deposit")."""
        if invariant_id not in self.unavailable:
            self.summaries[self.checker.invariant(invariant_id).id] = text

    # ---- memory across runs ------------------------------------------------
    def after_success(self, fn: Callable[[], None]) -> None:
        """Run ``fn`` only if this run completes and its result is published (watermarks, memory)."""
        self._after_success.append(fn)

    def run_after_success(self) -> None:
        """Called by the runner once the result is published. A failing step is logged, the others still run."""
        steps, self._after_success = self._after_success, []
        for fn in steps:
            try:
                fn()
            except Exception as exc:
                if self.log is not None:
                    self.log.warning("after_success_failed", error=redactor.scrub(str(exc)))

    def key(self, *parts: str) -> str:
        """A Redis key under zsmon's prefix, namespaced by checker."""
        return self._key_prefix + ":".join((self.checker.name, *parts))

    def memory(self, name: str, **options: Any) -> ColumnMemory:
        """A column's value per entity kept between runs (see ``ColumnMemory``)."""
        return ColumnMemory(self, name, **options)

    def state(self, name: str = "incremental") -> StoredState:
        """A JSON object kept between runs, e.g. where the next incremental run resumes (see ``StoredState``)."""
        return StoredState(self, name)

    def violators(self, *invariants: str) -> set[str] | None:
        """Every entity the previous runs found violating one of ``invariants``: an incremental run
        judges them again beside what changed, so its result stays complete (a violation leaves only when
        re-judged clean). None when that set is not completely known (no Redis, never judged, more
        violators than ``checks.track_limit``): sweep everything instead."""
        if self.lifecycle is None:
            return None
        try:
            return self.lifecycle.violators(self.checker.name, [self.checker.invariant(i).id for i in invariants])
        except redis.RedisError:
            return None

    def _record(self, invariant_id: str, total: int, sample: list[Violation], tracked: dict[str, Any]) -> None:
        if invariant_id in self.unavailable:
            return  # its columns are missing: what a query computed for it from stand-ins means nothing
        self.counts[invariant_id] = total
        self.samples[invariant_id] = sample
        self.tracked[invariant_id] = tracked
        self.skipped.pop(invariant_id, None)
