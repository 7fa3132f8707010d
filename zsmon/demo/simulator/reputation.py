"""Reputation traffic the platform's way, and faults that break each reputation invariant.

What the platform does on a task outcome (docs/invariants.md): one ``UPDATE`` of
``reputation_scores`` (``overall_score = clamp(overall_score + delta, 0, 100)``,
``total_tasks += 1``, ``successful_tasks`` or ``failed_tasks += 1``), then, as a
separate statement, one ``reputation_events`` row carrying the *unclamped*
delta. Rows are created lazily at 50 by any read, and only ``overall_score``
ever moves. The simulator writes exactly that, deterministically from a seed
(ids and timestamps aside), on an autocommit read-write connection.

Every ``inject_*`` method plants one fault and returns the entity id it broke
(an agent DID, an event id, or ``"global"``).
"""
from __future__ import annotations

import random
import uuid
from datetime import datetime, timedelta, timezone
from decimal import ROUND_HALF_UP, Decimal
from typing import Any

import psycopg

FAILED_DELTA = Decimal("-5.00")
CENT = Decimal("0.01")
START = Decimal(50)


def _clamp(x: Decimal) -> Decimal:
    return min(Decimal(100), max(Decimal(0), x))


class ReputationSimulator:
    """Agents doing tasks. ``step()`` is one task outcome; ``run(n)`` is n of them."""

    def __init__(self, conn: psycopg.Connection, seed: int = 0, agents: int = 40,
                 idle_agents: int = 0, feedback_share: float = 0.05) -> None:
        self.conn = conn
        self.rng = random.Random(seed)
        self.seed = seed
        self.feedback_share = feedback_share
        self._clock = datetime.now(timezone.utc)
        self.skill: dict[str, float] = {}
        self.agents: list[str] = []
        self._made = 0
        self.add_agents(agents)
        # Agents the platform created lazily (a read of their score) that never did a task.
        for _ in range(idle_agents):
            self._ensure_row(self._new_agent())

    # ---- time and agents ---------------------------------------------------
    def _now(self) -> datetime:
        """Strictly increasing timestamps, never behind the wall clock: (created_at, id) order = write order."""
        self._clock = max(datetime.now(timezone.utc), self._clock + timedelta(microseconds=1))
        return self._clock

    def _new_agent(self) -> str:
        self._made += 1
        did = f"did:zerostate:agent:{self.seed}-{self._made:05d}-{self.rng.getrandbits(32):08x}"
        self.conn.execute(
            "INSERT INTO agents (did, name, status, region, last_seen_at) VALUES (%s, %s, 'online', %s, %s)",
            (did, f"agent-{self._made}", self.rng.choice(["eu-west", "us-east", "ap-south"]), self._now()))
        return did

    def add_agents(self, n: int) -> list[str]:
        added = []
        for _ in range(n):
            did = self._new_agent()
            self.skill[did] = self.rng.uniform(0.4, 0.95)
            self._ensure_row(did)
            self.agents.append(did)
            added.append(did)
        return added

    def _ensure_row(self, did: str) -> None:
        """What the platform's lazy read does: a row at 50 with zero counters when none exists."""
        self.conn.execute("INSERT INTO reputation_scores (agent_did) VALUES (%s) ON CONFLICT (agent_did) DO NOTHING",
                          (did,))

    # ---- the platform's task outcome ------------------------------------------
    def success_delta(self) -> Decimal:
        """2, plus up to 2 for a high rating and 1 for a fast response, minus up to 1 and 0.5 for poor ones."""
        quality = self.rng.random()
        rating = 2 * (quality - 0.5) / 0.5 if quality >= 0.5 else -(0.5 - quality) / 0.5
        speed = self.rng.random()
        timing = 1.0 if speed < 0.4 else (-0.5 if speed > 0.7 else 0.0)
        delta = Decimal(repr(2 + rating + timing)).quantize(CENT, ROUND_HALF_UP)
        return min(Decimal(5), max(Decimal("0.5"), delta))

    def outcome(self, did: str, success: bool, delta: Decimal | None = None, *,
                update: bool = True, event: bool = True) -> str | None:
        """One task outcome: the score/counter update, then the event (each can be left out for faults).

        Returns the event id when an event was written.
        """
        if delta is None:
            delta = self.success_delta() if success else FAILED_DELTA
        self._ensure_row(did)
        at = self._now()
        if update:
            column = "successful_tasks" if success else "failed_tasks"
            self.conn.execute(
                f"UPDATE reputation_scores SET overall_score = LEAST(100, GREATEST(0, overall_score + %s)), "
                f"total_tasks = total_tasks + 1, {column} = {column} + 1, updated_at = %s WHERE agent_did = %s",
                (delta, at, did))
        if not event:
            return None
        event_id = uuid.UUID(int=self.rng.getrandbits(128), version=4)
        self.conn.execute(
            "INSERT INTO reputation_events (id, agent_did, event_type, task_id, score_delta, created_at) "
            "VALUES (%s, %s, %s, %s, %s, %s)",
            (event_id, did, "task_completed" if success else "task_failed", f"task-{event_id.hex[:12]}",
             delta, self._now()))
        return str(event_id)

    def feedback(self, did: str) -> str:
        """A non-task event (``quality_feedback``): the platform logs it but no score moves."""
        event_id = uuid.UUID(int=self.rng.getrandbits(128), version=4)
        self.conn.execute(
            "INSERT INTO reputation_events (id, agent_did, event_type, score_delta, created_at, metadata) "
            "VALUES (%s, %s, 'quality_feedback', %s, %s, '{\"rating\": 4}')",
            (event_id, did, Decimal(self.rng.randint(-300, 300)) / 100, self._now()))
        return str(event_id)

    def step(self) -> None:
        did = self.rng.choice(self.agents)
        if self.rng.random() < self.feedback_share:
            self.feedback(did)
            return
        self.outcome(did, self.rng.random() < self.skill[did])

    def run(self, n: int) -> None:
        for _ in range(n):
            self.step()

    # ---- reading back ------------------------------------------------------------
    def score(self, did: str) -> Decimal:
        row = self.conn.execute("SELECT overall_score FROM reputation_scores WHERE agent_did = %s", (did,)).fetchone()
        return row[0]

    def pick(self) -> str:
        return self.rng.choice(self.agents)

    def _mid_agent(self, low: Decimal = Decimal(10), high: Decimal = Decimal(90)) -> str:
        """An agent whose score is in [low, high] (well inside the bounds, so clamping never hides a fault)."""
        row = self.conn.execute(
            "SELECT agent_did FROM reputation_scores WHERE agent_did = ANY(%s) AND overall_score BETWEEN %s AND %s "
            "ORDER BY agent_did LIMIT 1", (self.agents, low, high)).fetchone()
        if row is None:
            raise RuntimeError(f"no agent with a score in [{low}, {high}] to plant a fault on")
        return row[0]

    # ---- faults (each returns the entity it broke) -------------------------------------
    def inject_score_out_of_range(self, did: str | None = None, column: str = "speed_score",
                                  value: Decimal = Decimal("112.00")) -> str:
        """score_bounds: one score column outside [0, 100] (a column the replay does not read, by default)."""
        if column not in ("overall_score", "reliability_score", "quality_score", "speed_score"):
            raise ValueError(f"not a score column: {column}")
        did = did or self.pick()
        self.conn.execute(f"UPDATE reputation_scores SET {column} = %s WHERE agent_did = %s", (value, did))
        return did

    def inject_counter_drift(self, did: str | None = None) -> str:
        """task_counters: total_tasks bumped without successful/failed (no event, no score change)."""
        did = did or self.pick()
        self.conn.execute("UPDATE reputation_scores SET total_tasks = total_tasks + 1 WHERE agent_did = %s", (did,))
        return did

    def inject_update_without_event(self, did: str | None = None, success: bool = True) -> str:
        """A crash after the score update, before the event insert.

        Breaks ``event_counter_reconciliation`` and (the score moved) ``score_replay`` for the agent.
        """
        did = did or self._mid_agent()
        self.outcome(did, success, event=False)
        return did

    def inject_event_without_update(self, did: str | None = None, success: bool = False) -> str:
        """An event whose score update never happened.

        Breaks ``event_counter_reconciliation`` and ``score_replay`` for the agent.
        """
        did = did or self._mid_agent()
        self.outcome(did, success, update=False)
        return did

    def inject_score_tamper(self, did: str | None = None, points: Decimal = Decimal("3.00")) -> str:
        """score_replay alone: overall_score changed directly, counters and events untouched."""
        did = did or self._mid_agent()
        self.conn.execute("UPDATE reputation_scores SET overall_score = overall_score + %s WHERE agent_did = %s",
                          (points, did))
        return did

    def inject_out_of_range_delta(self, did: str | None = None, delta: Decimal = Decimal("7.50")) -> str:
        """score_delta_range: a success applied and logged consistently, but with a delta above 5.

        Returns the event id.
        """
        did = did or self._mid_agent()
        event_id = self.outcome(did, True, delta)
        assert event_id is not None
        return event_id

    def inject_sudden_jump(self, did: str | None = None, points: Decimal = Decimal(30)) -> str:
        """score_jump: a burst of consistent +5 successes (events included) moving one agent by ``points``.

        Plant it between two checker runs; only ``score_jump`` fires.
        """
        did = did or self._mid_agent(Decimal(0), Decimal(100) - points)
        target = _clamp(self.score(did) + points)
        if target - self.score(did) <= Decimal(20):
            raise RuntimeError(f"agent {did} cannot move {points} points without clamping")
        while self.score(did) < target:
            self.outcome(did, True, min(Decimal(5), target - self.score(did)).max(Decimal("0.5")))
        return did

    def inject_population_shift(self, share: float = 1.0, points: Decimal = Decimal(18)) -> str:
        """distribution_drift: most agents gain about ``points`` through consistent +5 successes.

        Every write is the platform's own, so only the distribution moves (each agent by
        less than the default jump limit). Returns ``"global"``.
        """
        chosen = [d for d in self.agents if self.rng.random() < share]
        for did in chosen:
            remaining = points
            while remaining > 0:
                delta = min(Decimal(5), remaining).max(Decimal("0.5"))
                self.outcome(did, True, delta)
                remaining -= delta
        return "global"


def summary(conn: psycopg.Connection) -> dict[str, Any]:
    """A few figures for the demo's log line."""
    row = conn.execute("SELECT count(*), avg(overall_score)::numeric(6,2) FROM reputation_scores").fetchone()
    events = conn.execute("SELECT count(*) FROM reputation_events").fetchone()[0]
    return {"agents": row[0], "mean_score": row[1], "events": events}
