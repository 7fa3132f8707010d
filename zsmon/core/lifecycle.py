"""Violations as facts with a lifecycle: first seen, still there, acknowledged, resolved.

Per (checker, invariant, entity) zsmon remembers in Redis when the violation was
first seen, in which run, and its first and latest difference. An entity leaves
when a run that judged it no longer finds it (``resolved_at``, kept in a short
history). A person may acknowledge violations (a reason, an optional expiry): an
acknowledged violation stays visible everywhere but stops counting toward paging,
until its difference grows beyond what was acknowledged, the acknowledgement
expires or is revoked, or the violation resolves (if it comes back, it pages).

Writes per run are proportional to what changed (new entities, changed
differences, resolved ones), not to the number of violations: an entity's
``last_seen`` and ``runs_seen`` come from the invariant's run counter.

Bounded: at most ``track_limit`` entities per invariant are remembered; the count
beyond them is kept exactly (and counts as unacknowledged). Losing Redis fails
safe: everything pages again.

Keys (under the deployment's prefix):
  ``lc:<checker>:<invariant>``          hash entity id -> {"f": first seen, "i": first run, "fd", "d"}
  ``lc:<checker>:<invariant>:meta``     hash {"run", "at", "total", "complete"}
  ``lc:<checker>:resolved``             list of resolved entries, newest first (capped)
  ``acks``                              hash ack id -> acknowledgement
  ``acks:events``                       list of acknowledgement events, newest first (capped)
"""
from __future__ import annotations

import base64
import json
import re
import secrets
import time
from dataclasses import dataclass, field, replace
from decimal import Decimal, InvalidOperation
from typing import Any, Iterable, Mapping

from zsmon.core.logging import get_logger
from zsmon.core.results import CheckResult

log = get_logger("zsmon.lifecycle")

RESOLVED_HISTORY = 1000   # resolved entries kept per checker, for the API's state=resolved
ACK_HISTORY = 200         # acknowledgement events (created, revoked, expired, ...) kept for the status page
WRITE_BATCH = 5000


def _dec(value: str | None) -> Decimal | None:
    if value is None:
        return None
    try:
        return Decimal(value)
    except (InvalidOperation, ValueError):
        return None


def _text(value: Any) -> str | None:
    if value is None:
        return None
    return format(value, "f") if isinstance(value, Decimal) else str(value)


def grew_beyond(acknowledged: str | None, current: str | None) -> bool:
    """Whether a difference moved beyond what was acknowledged: larger in size, or of the other sign."""
    if acknowledged == current:
        return False
    a, c = _dec(acknowledged), _dec(current)
    if a is None or c is None:
        return True
    return abs(c) > abs(a) or (a * c) < 0


@dataclass(frozen=True)
class Ack:
    """An acknowledgement: these entities of one invariant are known; do not page for them."""

    id: str
    checker: str
    invariant: str
    entities: dict[str, str | None]      # entity id -> its difference when acknowledged
    reason: str
    author: str
    created_at: float
    expires_at: float | None = None

    def expired(self, now: float) -> bool:
        return self.expires_at is not None and now >= self.expires_at

    def to_dict(self) -> dict[str, Any]:
        return {"id": self.id, "checker": self.checker, "invariant": self.invariant,
                "entities": dict(self.entities), "reason": self.reason, "author": self.author,
                "created_at": self.created_at, "expires_at": self.expires_at}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "Ack":
        return cls(d["id"], d["checker"], d["invariant"], dict(d.get("entities") or {}), d.get("reason", ""),
                   d.get("author", "admin"), float(d.get("created_at", 0)), d.get("expires_at"))

    def brief(self) -> dict[str, Any]:
        """What a violation carries of the acknowledgement that covers it."""
        return {"id": self.id, "reason": self.reason, "author": self.author, "created_at": self.created_at,
                "expires_at": self.expires_at}


@dataclass
class Observed:
    """What one run found for one invariant: every tracked violator's difference, and the full count."""

    total: int
    tracked: dict[str, Any] = field(default_factory=dict)   # entity id -> difference (Decimal or None)
    # The difference grows with the clock (an age): growth does not undo an acknowledgement.
    age: bool = False

    @property
    def complete(self) -> bool:
        return len(self.tracked) >= self.total


class LifecycleError(Exception):
    """A request about violations or acknowledgements that cannot be honoured (unknown id, no Redis)."""


class Lifecycle:
    """The lifecycle of every violation, and the acknowledgements, in Redis under ``prefix``."""

    def __init__(self, redis: Any, prefix: str, track_limit: int = 10_000) -> None:
        self.redis = redis
        self.prefix = prefix
        self.track_limit = track_limit

    # ---- keys ----------------------------------------------------------------------------------
    def _entries_key(self, checker: str, invariant: str) -> str:
        return f"{self.prefix}lc:{checker}:{invariant}"

    def _meta_key(self, checker: str, invariant: str) -> str:
        return f"{self.prefix}lc:{checker}:{invariant}:meta"

    def _resolved_key(self, checker: str) -> str:
        return f"{self.prefix}lc:{checker}:resolved"

    @property
    def _acks_key(self) -> str:
        return f"{self.prefix}acks"

    def _event(self, event: str, ack: Ack, level: str = "warning", **extra: Any) -> None:
        """One acknowledgement event: a structured log line, and the history the status page shows."""
        getattr(log, level)(event, ack=ack.id, checker=ack.checker, invariant=ack.invariant, **extra)
        record = {"at": time.time(), "event": event.removeprefix("ack_"), "ack": ack.id, "checker": ack.checker,
                  "invariant": ack.invariant, **{k: v for k, v in extra.items() if isinstance(v, (str, int, float))}}
        pipe = self.redis.pipeline(transaction=False)
        pipe.lpush(self._acks_key + ":events", json.dumps(record))
        pipe.ltrim(self._acks_key + ":events", 0, ACK_HISTORY - 1)
        pipe.execute()

    def ack_events(self, limit: int = 20) -> list[dict[str, Any]]:
        """The latest acknowledgement events, newest first."""
        return [json.loads(x) for x in self.redis.lrange(self._acks_key + ":events", 0, limit - 1)]

    # ---- what the last runs left -----------------------------------------------------------------
    def violators(self, checker: str, invariants: Iterable[str]) -> set[str] | None:
        """Every entity known to violate one of ``invariants`` (for an incremental run to re-judge).

        None when that set is not known completely (more violators than are tracked, or no memory of
        any of them: a lost lifecycle): the caller must sweep everything. An invariant never judged yet
        (a first observation) has no violators to carry.
        """
        out: set[str] = set()
        remembered = False
        for inv in invariants:
            meta = self.redis.hgetall(self._meta_key(checker, inv))
            if not meta:
                continue
            if meta.get("complete") != "1":
                return None
            remembered = True
            out.update(self.redis.hkeys(self._entries_key(checker, inv)))
        return out if remembered else None

    # ---- a published run -------------------------------------------------------------------------
    def record(self, result: CheckResult, observed: Mapping[str, Observed]) -> dict[str, list[str]]:
        """Fold one published run into the lifecycle; returns the entities new in this run, per invariant."""
        now = result.started_at
        acks = self.acks(result.checker)
        new: dict[str, list[str]] = {}
        for inv, seen in observed.items():
            new[inv] = self._record_invariant(result.checker, inv, seen, now, acks)
        self._settle_acks(acks, now)
        return new

    def _record_invariant(self, checker: str, inv: str, seen: Observed, now: float,
                          acks: list[Ack]) -> list[str]:
        r = self.redis
        ekey, mkey = self._entries_key(checker, inv), self._meta_key(checker, inv)
        meta = r.hgetall(mkey)
        run = int(meta.get("run", 0)) + 1
        previous = r.hgetall(ekey)
        tracked = dict(list(seen.tracked.items())[: self.track_limit])
        complete = len(tracked) >= seen.total
        writes: dict[str, str] = {}
        fresh: list[str] = []
        for entity, diff in tracked.items():
            d = _text(diff)
            old = previous.get(entity)
            if old is None:
                fresh.append(entity)
                writes[entity] = json.dumps({"f": now, "i": run, "fd": d, "d": d})
                continue
            entry = json.loads(old)
            if entry.get("d") != d:
                entry["d"] = d
                writes[entity] = json.dumps(entry)
        gone = [e for e in previous if e not in tracked]
        pipe = r.pipeline(transaction=False)
        if gone:
            # Without the complete set, an untracked entity may still violate: forget it, do not call it resolved.
            for i in range(0, len(gone), WRITE_BATCH):
                pipe.hdel(ekey, *gone[i:i + WRITE_BATCH])
            if complete:
                last_at = float(meta.get("at", now))
                last_run = int(meta.get("run", run - 1))
                history = []
                for e in gone:
                    entry = json.loads(previous[e])
                    history.append(json.dumps({
                        "invariant": inv, "entity_id": e, "first_seen": entry["f"], "last_seen": last_at,
                        "runs_seen": last_run - int(entry["i"]) + 1, "first_difference": entry.get("fd"),
                        "difference": entry.get("d"), "resolved_at": now}))
                for ack in acks:
                    if ack.invariant == inv:
                        for e in gone:
                            ack.entities.pop(e, None)
                pipe.lpush(self._resolved_key(checker), *history[-RESOLVED_HISTORY:])
                pipe.ltrim(self._resolved_key(checker), 0, RESOLVED_HISTORY - 1)
        items = list(writes.items())
        for i in range(0, len(items), WRITE_BATCH):
            pipe.hset(ekey, mapping=dict(items[i:i + WRITE_BATCH]))
        pipe.hset(mkey, mapping={"run": run, "at": now, "total": seen.total, "complete": "1" if complete else "0"})
        pipe.execute()
        # An acknowledged difference that grew: the acknowledgement no longer covers that entity.
        for ack in acks:
            if ack.invariant != inv or seen.age:
                continue
            for e, acked in list(ack.entities.items()):
                if e in tracked and grew_beyond(acked, _text(tracked[e])):
                    ack.entities.pop(e)
                    self._event("ack_invalidated", ack, entity=e, acknowledged_difference=acked or "",
                                difference=_text(tracked[e]) or "",
                                detail="the difference grew beyond what was acknowledged: it pages again")
        return fresh

    def _settle_acks(self, acks: list[Ack], now: float) -> None:
        """Write back acknowledgements that changed; drop expired and exhausted ones (logged)."""
        stored = {a.id: a for a in self._load_acks()}
        for ack in acks:
            before = stored.get(ack.id)
            if before is None:
                continue
            if ack.expired(now):
                self.redis.hdel(self._acks_key, ack.id)
                self._event("ack_expired", ack, entities=len(ack.entities), reason=ack.reason,
                            detail="its violations page again")
            elif not ack.entities:
                self.redis.hdel(self._acks_key, ack.id)
                self._event("ack_closed", ack, level="info", reason=ack.reason,
                            detail="every acknowledged violation resolved or changed")
            elif ack.entities != before.entities:
                self.redis.hset(self._acks_key, ack.id, json.dumps(ack.to_dict()))

    # ---- reading: what a result shows ------------------------------------------------------------
    def annotate(self, result: CheckResult, new: Mapping[str, list[str]] | None = None,
                 now: float | None = None) -> CheckResult:
        """``result`` with its lifecycle: per violation first/last seen, runs, acknowledgement; per
        invariant the acknowledged count and the oldest unacknowledged violation."""
        if result.status == "error":
            return result
        now = time.time() if now is None else now
        acks = [a for a in self.acks(result.checker) if not a.expired(now)]
        acked_counts: dict[str, int] = {}
        oldest: dict[str, float] = {}
        entries_by_inv: dict[str, dict[str, dict[str, Any]]] = {}
        for inv, total in result.violation_counts.items():
            if not total:
                acked_counts[inv] = 0
                continue
            entries = self.entries(result.checker, inv)
            entries_by_inv[inv] = entries
            covering = {e: a for a in acks if a.invariant == inv for e in a.entities if e in entries}
            acked_counts[inv] = len(covering)
            unacked = [v["first_seen"] for e, v in entries.items() if e not in covering]
            if unacked:
                oldest[inv] = min(unacked)
            elif total > len(covering):   # untracked violators beyond the cap: seen at least since the last run
                oldest[inv] = now
        violations = []
        for v in result.violations:
            entry = entries_by_inv.get(v.invariant, {}).get(v.entity_id)
            if entry is None:
                violations.append(v)
                continue
            ack = next((a for a in acks if a.invariant == v.invariant and v.entity_id in a.entities), None)
            violations.append(replace(v, lifecycle={
                "first_seen": entry["first_seen"], "last_seen": entry["last_seen"],
                "runs_seen": entry["runs_seen"], "first_difference": entry["first_difference"],
                "acknowledgement": ack.brief() if ack is not None else None}))
        return replace(result, violations=violations, acknowledged_counts=acked_counts,
                       oldest_unacknowledged=oldest,
                       new_counts={k: len(v) for k, v in (new or {}).items()} if new is not None
                       else result.new_counts)

    def entries(self, checker: str, invariant: str) -> dict[str, dict[str, Any]]:
        """The tracked violators of one invariant: entity id -> first/last seen, runs, differences."""
        raw, meta = self.redis.hgetall(self._entries_key(checker, invariant)), \
            self.redis.hgetall(self._meta_key(checker, invariant))
        run, at = int(meta.get("run", 0)), float(meta.get("at", 0))
        out = {}
        for e, js in raw.items():
            entry = json.loads(js)
            out[e] = {"first_seen": entry["f"], "last_seen": at, "runs_seen": run - int(entry["i"]) + 1,
                      "first_difference": entry.get("fd"), "difference": entry.get("d")}
        return out

    def resolved(self, checker: str) -> list[dict[str, Any]]:
        return [json.loads(x) for x in self.redis.lrange(self._resolved_key(checker), 0, RESOLVED_HISTORY - 1)]

    # ---- acknowledgements ------------------------------------------------------------------------
    def _load_acks(self) -> list[Ack]:
        return [Ack.from_dict(json.loads(v)) for v in self.redis.hvals(self._acks_key)]

    def acks(self, checker: str | None = None) -> list[Ack]:
        return sorted((a for a in self._load_acks() if checker is None or a.checker == checker),
                      key=lambda a: (a.created_at, a.id))

    def acknowledge(self, checker: str, invariant: str, entities: Iterable[str] | None, reason: str, author: str,
                    expires_in: float | None = None, now: float | None = None) -> Ack:
        """Acknowledge ``entities`` (None: every entity violating now) of one invariant.

        Only entities that violate now can be acknowledged: a future violation pages.
        """
        now = time.time() if now is None else now
        current = self.entries(checker, invariant)
        if entities is None:
            chosen = list(current)
            if not chosen:
                raise LifecycleError(f"{checker} {invariant}: nothing violates now; nothing to acknowledge")
        else:
            chosen = list(dict.fromkeys(entities))
            unknown = [e for e in chosen if e not in current]
            if unknown:
                raise LifecycleError(f"{checker} {invariant}: {', '.join(unknown[:5])}"
                                     f"{' and more' if len(unknown) > 5 else ''} "
                                     f"{'does' if len(unknown) == 1 else 'do'} not violate it now "
                                     "(zsmon acknowledges current violations only)")
        ack = Ack(id=secrets.token_hex(4), checker=checker, invariant=invariant,
                  entities={e: current[e]["difference"] for e in chosen}, reason=reason, author=author,
                  created_at=now, expires_at=now + expires_in if expires_in else None)
        self.redis.hset(self._acks_key, ack.id, json.dumps(ack.to_dict()))
        self._event("ack_created", ack, entities=len(chosen), reason=reason, author=author,
                    expires_at=ack.expires_at or "never")
        return ack

    def revoke(self, ack_id: str, author: str) -> Ack:
        raw = self.redis.hget(self._acks_key, ack_id)
        if raw is None:
            raise LifecycleError(f"no acknowledgement {ack_id!r} (zsmon ack list shows them)")
        ack = Ack.from_dict(json.loads(raw))
        self.redis.hdel(self._acks_key, ack_id)
        self._event("ack_revoked", ack, author=author, reason=ack.reason, detail="its violations page again")
        return ack


# ---- listing and input -----------------------------------------------------------------------------
STATES = ("open", "acknowledged", "resolved")
_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}
_DURATION = re.compile(r"^(?:(\d+)([smhdw]))+$")


def parse_duration(text: str) -> float:
    """``90m``, ``12h``, ``3d``, ``1w``, ``1h30m`` -> seconds; a clear error otherwise."""
    value = text.strip().lower()
    if not _DURATION.match(value):
        raise LifecycleError(f"duration {text!r}: expected a number and a unit (s, m, h, d, w), e.g. 90m, 12h, "
                             "3d or 1h30m")
    seconds = sum(int(n) * _UNITS[u] for n, u in re.findall(r"(\d+)([smhdw])", value))
    if seconds <= 0:
        raise LifecycleError(f"duration {text!r}: must be longer than 0 s")
    return float(seconds)


def validate_target(invariants: Mapping[str, Iterable[str]], checker: str, invariant: str) -> None:
    """``checker`` and ``invariant`` must exist (``invariants``: checker -> its invariant ids)."""
    if checker not in invariants:
        raise LifecycleError(f"unknown checker {checker!r}; known: {', '.join(sorted(invariants)) or 'none'}")
    ids = list(invariants[checker])
    if invariant not in ids:
        raise LifecycleError(f"checker {checker} has no invariant {invariant!r}; its invariants: {', '.join(ids)}")


def encode_cursor(key: tuple[Any, ...]) -> str:
    return base64.urlsafe_b64encode(json.dumps(key).encode()).decode().rstrip("=")


def decode_cursor(cursor: str) -> tuple[Any, ...]:
    try:
        raw = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4))
        key = json.loads(raw)
        if not isinstance(key, list) or len(key) != 5:
            raise ValueError
        return tuple(key)
    except (ValueError, TypeError):
        raise LifecycleError("cursor: not a cursor this API returned (start again without it)") from None


def list_violations(lc: Lifecycle, pairs: Iterable[tuple[str, str]], *, state: str | None = None,
                    since: float | None = None, cursor: str | None = None, limit: int = 100,
                    now: float | None = None) -> tuple[list[dict[str, Any]], str | None]:
    """Tracked violations of ``pairs`` (checker, invariant), oldest first within an invariant.

    ``state``: open (paging), acknowledged or resolved (the recent history); None: open and
    acknowledged. ``since``: first seen (resolved: resolved) at or after this Unix time. Returns one
    page and the cursor of the next (None at the end).
    """
    now = time.time() if now is None else now
    pairs = sorted(set(pairs))
    acks = [a for a in lc.acks() if not a.expired(now)]
    rows: list[dict[str, Any]] = []
    if state == "resolved":
        for checker in sorted({c for c, _ in pairs}):
            wanted = {i for c, i in pairs if c == checker}
            for r in lc.resolved(checker):
                if r["invariant"] in wanted and (since is None or r["resolved_at"] >= since):
                    rows.append({"checker": checker, "state": "resolved", "acknowledgement": None, **r})
    else:
        for checker, inv in pairs:
            covering = {e: a for a in acks if a.checker == checker and a.invariant == inv for e in a.entities}
            for entity, e in lc.entries(checker, inv).items():
                ack = covering.get(entity)
                row_state = "acknowledged" if ack is not None else "open"
                if state is not None and row_state != state:
                    continue
                if since is not None and e["first_seen"] < since:
                    continue
                rows.append({"checker": checker, "invariant": inv, "entity_id": entity, "state": row_state,
                             **e, "resolved_at": None, "acknowledgement": ack.brief() if ack else None})

    def key(r: dict[str, Any]) -> tuple[Any, ...]:
        when = r["resolved_at"] if state == "resolved" else r["first_seen"]
        return (r["checker"], r["invariant"], -when if state == "resolved" else when, r["entity_id"], r["state"])

    rows.sort(key=key)
    if cursor:
        after = decode_cursor(cursor)
        rows = [r for r in rows if list(key(r)) > list(after)]
    page = rows[:limit]
    return page, encode_cursor(key(page[-1])) if len(rows) > limit else None
