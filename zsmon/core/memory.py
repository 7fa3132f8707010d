"""Memory across runs, in Redis: a column's value per entity, and small JSON state objects.

Both are written only after the run's result is published (``CheckContext.after_success``),
so a run that fails or is discarded changes nothing the next run compares with.
"""
from __future__ import annotations

import heapq
import itertools
import json
import queue
import threading
import uuid
from dataclasses import dataclass, field
from decimal import Decimal
from typing import Any, Callable, Literal

import hiredis
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
                recorded: str, changes_only: bool = False) -> Observation | None:
        """Compare the (entity id, value) rows of ``sql`` with the memory; ``breaks(previous, current)``
        says which break ``invariant``.

        ``changes_only``: an unchanged value never breaks (a regression, a jump), so only values whose text
        differs from the remembered text are parsed and judged: a million unchanged rows then cost one
        string comparison each instead of a parse and a call (Python time that holds the GIL).

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
            obs = self._compare(ctx.redis, sql, params, breaks, changes_only)
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

    def _compare(self, r: Any, sql: str, params: Any, breaks: Callable[[Any, Any], bool],
                 changes_only: bool = False) -> Observation:
        # The worst are kept up to the tracked limit: the sample shows the largest, the lifecycle tracks all.
        limit, parse, highest = self.ctx.track_limit, self.parse, self.highest
        first = not r.exists(self.live)
        previous_at = None if first else _epoch(r.hget(self.live, OBSERVED_FIELD))
        # The field makes the memory exist after a first observation, even of no rows at all.
        r.hset(self.staging, OBSERVED_FIELD, repr(self.ctx.snapshot_time))
        r.expire(self.staging, STAGING_TTL_SECONDS)
        seen = compared = count = 0
        worst: list[tuple[str, Any, Any]] = []
        if changes_only:  # the values as text, compared with the remembered text before any parsing
            sql = f"SELECT q.k, q.v::text FROM ({sql}) AS q(k, v)"
        for rows in self.ctx.batches(sql, params, self.batch):
            seen += len(rows)
            before = [None] * len(rows) if first else r.hmget(self.live, [row[0] for row in rows])
            if changes_only and not first:
                pairs = [(row, prev) for row, prev in zip(rows, before) if row[1] != prev or prev is None]
                compared += len(rows) - len(pairs)  # unchanged: compared, never breaking, nothing to write
                rows, before = [row for row, _ in pairs], [prev for _, prev in pairs]
            changed: dict[str, str] = {}
            for (eid, cur), prev in zip(rows, before):
                if cur is None:
                    continue
                if prev is None:
                    changed[eid] = str(cur)
                    continue
                if changes_only:
                    cur = parse(cur)
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


# Header field of an ``AnchoredMemory`` set once its parts are wholly written (and unset while they are not).
READY_FIELD = "ready"
# Field every part hash of an ``AnchoredMemory`` holds, so an empty part still exists (and its loss is seen).
ANCHOR_FIELD = "_anchor"


class AnchoredMemory:
    """Values per entity kept in Redis between runs, tied to one *anchor* (the full sweep that wrote them).

    A header hash (``ctx.key(name)``) names the anchor, the snapshot time the values are as of (``as_of``)
    and whatever totals the checker keeps beside them; each *part* (e.g. ``channels``) is one hash entity
    id -> value under ``ctx.key(name, anchor, part)``. A full sweep fills fresh parts while it runs (with a
    TTL, so an abandoned fill goes away by itself) and, once its result is published, points the header at
    them and drops the previous anchor's parts. An incremental run reads only the entities it touched and,
    once published, writes their new values and the new header. The header's ready mark is set only once
    everything it describes is written (no MULTI: the documented Redis ACL grants none), so a write that
    fails half-way leaves nothing a reader trusts. Redis evicts whole keys, so a part that lost anything is
    missing as a whole and ``load`` says so.
    """

    def __init__(self, ctx: Any, name: str, parts: tuple[str, ...]) -> None:
        self.ctx = ctx
        self.name = name
        self.parts = parts
        self.header_key = ctx.key(name)

    def part_key(self, anchor: str, part: str) -> str:
        return self.ctx.key(self.name, anchor, part)

    def load(self) -> dict[str, str] | None:
        """The header when the anchor it names is whole, else None. Raises ``redis.RedisError``."""
        r = self.ctx.redis
        if r is None:
            return None
        header = {_text(k): _text(v) for k, v in r.hgetall(self.header_key).items()}
        anchor = header.pop("anchor", None)
        if not anchor or header.pop(READY_FIELD, None) != "1":
            return None  # never published, or an update failed half-way
        if r.exists(*(self.part_key(anchor, p) for p in self.parts)) != len(self.parts):
            return None
        return {**header, "anchor": anchor}

    def get(self, anchor: str, part: str, ids: list[str], batch: int = 10_000) -> list[str | None]:
        """The remembered values of ``ids`` (None: not remembered). Raises ``redis.RedisError``."""
        key, out = self.part_key(anchor, part), []
        for i in range(0, len(ids), batch):
            out.extend(_text(v) if v is not None else None for v in self.ctx.redis.hmget(key, ids[i:i + batch]))
        return out

    def begin(self) -> str:
        """A new anchor id for a full sweep to ``fill``."""
        return uuid.uuid4().hex

    def fill(self, anchor: str, part: str, sql: str, params: Any = None, batch: int = 10_000) -> int:
        """Write the (entity id, value) rows of ``sql`` (text columns) to ``part`` of the new ``anchor``; the
        number written. Raises ``redis.RedisError`` (``abandon`` then removes what was written) and
        ``UnkeyedRow`` (a NULL id or value: such a row cannot be remembered).

        Each batch goes to Redis as one HSET packed by hiredis in C (``_hset_command``), not argument by
        argument in redis-py: a million entities then hold the GIL, which serving ``/metrics`` needs, for
        0.6 s instead of 2.8 s, in slices of under a millisecond."""
        r, key = self.ctx.redis, self.part_key(anchor, part)
        r.hset(key, ANCHOR_FIELD, anchor)
        r.expire(key, STAGING_TTL_SECONDS)
        # A writer thread sends each batch while the next one is fetched (both wait on sockets, GIL released).
        pending: queue.Queue[Any] = queue.Queue(maxsize=2)
        failed: list[BaseException] = []

        def send() -> None:
            while (rows := pending.get()) is not None:
                if not failed:
                    try:
                        _send_packed(r, _hset_command(key, rows))
                    except Exception as exc:  # noqa: BLE001 - raised in the caller's thread below
                        failed.append(exc)

        writer = threading.Thread(target=send, name="zsmon-anchor-fill", daemon=True)
        writer.start()
        n = 0
        try:
            for rows in self.ctx.batches(sql, params, batch):
                if failed:
                    break
                if any(k is None or v is None for k, v in rows):
                    raise UnkeyedRow(f"a row of {part} has no id or no value")
                pending.put(rows)
                n += len(rows)
        finally:
            pending.put(None)
            writer.join()
        if failed:
            raise failed[0]
        return n

    def abandon(self, anchor: str) -> None:
        try:
            self.ctx.redis.delete(*(self.part_key(anchor, p) for p in self.parts))
        except redis.RedisError:
            pass  # the TTL removes them

    def publish(self, anchor: str, header: dict[str, str]) -> None:
        """After success: make ``anchor`` (filled) the remembered state, with ``header``; drop the old one."""
        def commit() -> None:
            r = self.ctx.redis
            old = _text(r.hget(self.header_key, "anchor"))
            pipe = r.pipeline(transaction=False)
            for p in self.parts:
                pipe.persist(self.part_key(anchor, p))
            pipe.delete(self.header_key)
            pipe.execute()  # raises on any error: no header, so no reader trusts a half-published anchor
            r.hset(self.header_key, mapping={**header, "anchor": anchor, READY_FIELD: "1"})
            if old and old != anchor:
                r.unlink(*(self.part_key(old, p) for p in self.parts))
            # Parts no header names any more (the header alone was deleted, e.g. ``zsmon checkers
            # reset-memory payments sums``): published parts have no TTL; a fill in progress has one.
            mine = {self.part_key(anchor, p) for p in self.parts}
            for key in r.scan_iter(match=self.header_key + ":*", count=1000):
                key = _text(key)
                if key not in mine and r.ttl(key) == -1:
                    r.unlink(key)
        self.ctx.after_success(commit)

    def update(self, anchor: str, changes: dict[str, dict[str, str | None]], header: dict[str, str]) -> None:
        """After success: write ``changes`` (part -> entity id -> new value, None: forget it) and ``header``,
        only if the header still names ``anchor`` (else nothing: another sweep re-anchored meanwhile).

        No MULTI (the documented Redis ACL grants none): the header loses its ready mark first and gets it
        back only once every change is written, so a write that fails half-way leaves a state no reader
        trusts (until the next full sweep re-anchors)."""
        def commit() -> None:
            r = self.ctx.redis
            if _text(r.hget(self.header_key, "anchor")) != anchor:
                return
            r.hdel(self.header_key, READY_FIELD)
            pipe = r.pipeline(transaction=False)
            for part, values in changes.items():
                key = self.part_key(anchor, part)
                gone = [k for k, v in values.items() if v is None]
                kept = {k: v for k, v in values.items() if v is not None}
                if kept:
                    pipe.hset(key, mapping=kept)
                if gone:
                    pipe.hdel(key, *gone)
            pipe.execute()  # raises on any error: the ready mark stays off
            r.hset(self.header_key, mapping={**header, "anchor": anchor, READY_FIELD: "1"})
        self.ctx.after_success(commit)


class UnkeyedRow(ValueError):
    """A row to remember without entity id or value."""


def _hset_command(key: str, rows: list[tuple[str, str]], slice_rows: int = 1_000) -> list[bytes]:
    """``HSET key id value ...`` for every (id, value) row, in Redis' protocol, as parts to send in order.
    hiredis packs each slice of rows in C without releasing the GIL (~0.4 ms per 1,000 rows), so slices
    keep every hold short; one array header counts the arguments of all the slices."""
    parts = [b"*%d\r\n" % (2 + 2 * len(rows)), _arguments(("HSET", key))]
    parts += [_arguments(tuple(itertools.chain.from_iterable(rows[i:i + slice_rows])))
              for i in range(0, len(rows), slice_rows)]
    return parts


def _arguments(args: tuple[str, ...]) -> bytes:
    """``args`` in Redis' protocol without the array header hiredis puts before them."""
    packed = hiredis.pack_command(args)
    return packed[packed.index(b"\r\n") + 2:]


def _send_packed(r: Any, command: list[bytes]) -> None:
    """Send one command already in Redis' protocol (its parts, in order) and read its reply (raises
    ``redis.RedisError``), on a connection of the client's pool (its authentication and TLS)."""
    pool = r.connection_pool
    conn = pool.get_connection()
    try:
        conn.send_packed_command(command)
        conn.read_response()
    except BaseException:
        conn.disconnect()  # the protocol state is unknown: never hand this socket to another command
        raise
    finally:
        pool.release(conn)


def _text(value: Any) -> Any:
    return value.decode() if isinstance(value, bytes) else value
