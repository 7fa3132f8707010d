"""Memory across runs, in Redis: a column's value per entity, and small JSON state objects.

Both are written only after the run's result is published (``CheckContext.after_success``),
so a run that fails or is discarded changes nothing the next run compares with.
"""
from __future__ import annotations

import heapq
import json
import uuid
from dataclasses import dataclass, field
from decimal import Decimal
from typing import Any, Callable, Literal

import redis

from zsmon.core.redis import redis_error

# Field of a memory hash holding when it was observed (epoch seconds); entity ids never start with "_".
OBSERVED_FIELD = "_observed_at"
# A staging key outlives any run that fills it; one left behind by a crash goes away by itself.
STAGING_TTL_SECONDS = 3600


@dataclass(frozen=True)
class Observation:
    """One comparison of a column with its memory."""

    first: bool             # nothing remembered yet: nothing was compared
    previous_at: float | None  # when the remembered values were observed (epoch seconds)
    seen: int               # rows read
    compared: int           # rows that had a remembered value
    count: int              # rows that broke the invariant
    # The worst (entity id, previous, current), largest |current - previous| first, at most track_limit.
    worst: list[tuple[str, Any, Any]] = field(default_factory=list)


class ColumnMemory:
    """A column's value per entity, remembered in one Redis hash (entity id -> value) between runs.

    ``keep="latest"`` remembers the last value seen, ``"highest"`` the highest (a value that went down
    keeps being reported until it climbs back). Only changed values are written, to a staging key
    merged into the hash after success: a run re-reading a subset (incremental) leaves the rest alone.
    """

    # ``ctx`` is the run's CheckContext (``ctx.memory(...)`` makes one); not imported: the context builds these.
    def __init__(self, ctx: Any, name: str, *, parse: Callable[[str], Any] = Decimal,
                 keep: Literal["latest", "highest"] = "latest", batch: int = 10_000) -> None:
        self.ctx = ctx
        self.live = ctx.key(name)
        self.staging = ctx.key(name, "staging", uuid.uuid4().hex)
        self.parse = parse
        self.highest = keep == "highest"
        self.batch = batch

    def observe(self, invariant: str, sql: str, params: Any = None, *, breaks: Callable[[Any, Any], bool],
                recorded: str) -> Observation | None:
        """Compare the (entity id, value) rows of ``sql`` with the memory; ``breaks(previous, current)``
        says which break ``invariant``.

        None when the invariant could not be judged: Redis is missing or failed mid-run (it is skipped;
        the SQL invariants of the run still stand). On a first observation the invariant is skipped too,
        with ``recorded`` (``{n}``: rows read) saying what was recorded; the values are kept all the same.
        """
        ctx = self.ctx
        if invariant in ctx.unavailable:
            return None  # its columns are missing (skipped with that reason)
        if ctx.redis is None:
            ctx.skip(invariant, f"needs memory across runs: {ctx.redis_reason or 'no Redis'}")
            return None
        try:
            obs = self._compare(ctx.redis, sql, params, breaks)
        except redis.RedisError as exc:
            try:
                ctx.redis.delete(self.staging)
            except redis.RedisError:
                pass  # its TTL removes it
            ctx.skip(invariant, f"needs memory across runs: {redis_error(exc)}")
            return None
        ctx.after_success(self._commit)
        if obs.first:
            ctx.skip(invariant, f"first observation: recorded {recorded.format(n=obs.seen)}; "
                                "judged from the next run")
        return obs

    def _compare(self, r: Any, sql: str, params: Any, breaks: Callable[[Any, Any], bool]) -> Observation:
        # The worst are kept up to the tracked limit: the sample shows the largest, the lifecycle tracks all.
        limit, parse, highest = self.ctx.track_limit, self.parse, self.highest
        first = not r.exists(self.live)
        previous_at = None if first else _epoch(r.hget(self.live, OBSERVED_FIELD))
        # The field makes the memory exist after a first observation, even of no rows at all.
        r.hset(self.staging, OBSERVED_FIELD, repr(self.ctx.snapshot_time))
        r.expire(self.staging, STAGING_TTL_SECONDS)
        seen = compared = count = 0
        worst: list[tuple[str, Any, Any]] = []
        for rows in self.ctx.batches(sql, params, self.batch):
            seen += len(rows)
            before = [None] * len(rows) if first else r.hmget(self.live, [row[0] for row in rows])
            changed: dict[str, str] = {}
            for (eid, cur), prev in zip(rows, before):
                if cur is None:
                    continue
                if prev is None:
                    changed[eid] = str(cur)
                    continue
                prev = parse(prev)
                compared += 1
                if breaks(prev, cur):
                    count += 1
                    worst.append((eid, prev, cur))
                if cur > prev if highest else cur != prev:
                    changed[eid] = str(cur)
            if len(worst) > limit:
                worst = _worst(worst, limit)
            if changed:
                pipe = r.pipeline(transaction=False)
                pipe.hset(self.staging, mapping=changed)
                pipe.expire(self.staging, STAGING_TTL_SECONDS)
                pipe.execute()
        return Observation(first, previous_at, seen, compared, count, _worst(worst, limit))

    def _commit(self) -> None:
        r = self.ctx.redis
        if not r.exists(self.live):
            r.rename(self.staging, self.live)
            r.persist(self.live)
            return
        cursor = 0
        while True:
            cursor, chunk = r.hscan(self.staging, cursor, count=self.batch)
            if chunk:
                r.hset(self.live, mapping=chunk)
            if cursor == 0:
                break
        r.delete(self.staging)


class StoredState:
    """One JSON object a checker keeps in Redis between runs (watermarks, tracked entities, baselines).

    Times in it are epoch seconds. ``save`` writes after success; ``load`` reads what the last
    published run saved, None when there is nothing readable (an old encoding counts as nothing).
    """

    def __init__(self, ctx: Any, name: str) -> None:
        self.ctx = ctx
        self.key = ctx.key(name)

    def load(self) -> dict[str, Any] | None:
        """The saved object, or None. Raises ``redis.RedisError`` when Redis fails (callers choose)."""
        if self.ctx.redis is None:
            return None
        raw = self.ctx.redis.get(self.key)
        if raw is None:
            return None
        try:
            data = json.loads(raw)
        except ValueError:
            data = None
        if not isinstance(data, dict):
            if self.ctx.log is not None:
                self.ctx.log.warning("stored_state_unreadable", key=self.key)
            return None
        return data

    def resume(self) -> dict[str, Any] | None:
        """For an incremental run: the saved object with its numeric ``watermark``. Without one, the run
        falls back to a full sweep and None is returned (also in a full run)."""
        if self.ctx.mode != "incremental":
            return None
        try:
            data = self.load()
        except redis.RedisError as exc:
            self.ctx.fall_back_to_full(f"incremental state unreadable: {redis_error(exc)}")
            return None
        if data is None or not isinstance(data.get("watermark"), (int, float)):
            self.ctx.fall_back_to_full(f"no incremental state at {self.key}")
            return None
        return data

    def save(self, data: dict[str, Any]) -> None:
        """Write ``data`` once the run's result is published (nothing without Redis)."""
        r = self.ctx.redis
        if r is None:
            return
        payload = json.dumps(data, separators=(",", ":"), sort_keys=True)
        self.ctx.after_success(lambda: r.set(self.key, payload))


def _worst(items: list[tuple[str, Any, Any]], limit: int) -> list[tuple[str, Any, Any]]:
    """The ``limit`` largest |current - previous|, ties by entity id (the order of ``CheckContext.report``)."""
    return heapq.nsmallest(limit, items, key=lambda w: (-abs(w[2] - w[1]), w[0]))


def _epoch(value: Any) -> float | None:
    try:
        return float(value) if value is not None else None
    except ValueError:
        return None  # an older encoding (an ISO timestamp): when is unknown
