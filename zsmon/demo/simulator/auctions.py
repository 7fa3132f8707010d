"""Auction traffic as the platform makes it, deterministic from a seed, with fault injection.

``AuctionSimulator(conn, seed=1, ranking="highest_composite")`` writes through a
read-write connection (autocommit) exactly what the platform's correct code paths
write (docs/invariants.md):

* ``create_auction`` — an open auction with a budget (``max_price``), maybe a
  reserve and a minimum reputation;
* ``place_bid`` — refused (returns None, reason in ``last_refusal``) when the
  auction is not open or has expired, ``price > max_price``, ``price <
  reserve_price`` with a reserve, or the bidder's reputation is below
  ``min_reputation``; otherwise a bid with its ``composite_score``;
* ``close_auction`` — no bids: ``closed`` (``expired`` once past ``expires_at``);
  otherwise ``awarded`` to the best composite (per ``ranking``), final price per
  type, and a payment channel for it: the payer's account is credited and debited
  by the deposit (so the payments checker stays clean), the channel holds
  ``final_price``, and the ledger has its ``deposit`` row;
* ``step()``/``run(n)``/``run_until(auctions=n)`` — a traffic driver with rates per
  second of simulated time. ``run``/``run_until`` build *history* on a virtual clock
  (default: starting 50 minutes ago, so everything lands in the success window
  without sleeping) and close what they opened; a bare ``step()`` is *live* traffic
  on the database clock (what a demo loop wants). ``realtime=True`` makes
  everything live, ``realtime=False`` everything virtual.

Each ``inject_*`` plants one invariant's violation and returns the id of the
entity the checker must name (``"global"`` for the allocation burst). Faults stamp
their writes with recent times, as the platform would, so incremental runs see them.
``deployed_platform_traffic`` writes what the deployed platform really writes.
"""
from __future__ import annotations

import random
from dataclasses import dataclass
from datetime import datetime, timedelta
from decimal import Decimal
from typing import Any

import psycopg

Q8 = Decimal("0.00000001")
Q4 = Decimal("0.0001")
TYPES = ("first_price", "second_price", "reserve")


def _money(x: float | Decimal) -> Decimal:
    return Decimal(str(x)).quantize(Q8)


@dataclass(frozen=True)
class Agent:
    did: str
    reputation: Decimal
    quality: Decimal


class AuctionSimulator:
    # Traffic rates, per second of simulated time.
    EXTRA_AUCTIONS_PER_SECOND = 0.03   # beyond keeping ``concurrency`` auctions open
    BIDS_PER_AUCTION_SECOND = 0.15
    CANCELS_PER_SECOND = 0.003

    def __init__(self, conn: psycopg.Connection, seed: int = 0, ranking: str = "highest_composite", *,
                 start: datetime | None = None, realtime: bool | None = None, concurrency: int = 4,
                 agents: int = 12, users: int = 5, unknown_type_share: float = 0.05) -> None:
        if ranking not in ("highest_composite", "lowest_composite"):
            raise ValueError(f"ranking must be highest_composite or lowest_composite, not {ranking!r}")
        self.conn = conn
        self.rng = random.Random(seed)
        self.ranking = ranking
        self.realtime = realtime
        self.concurrency = concurrency
        self.unknown_type_share = unknown_type_share
        self.t0 = self._db_now()
        self.clock = self.t0 if realtime else (start or self.t0 - timedelta(minutes=50))
        self._live = False  # whether the clock has switched to the database's
        # The virtual clock never gets closer to the real one than this, so every auction it opens has
        # expired (and been closed by finish()) before the checker looks.
        self._clock_cap = self.t0 - timedelta(seconds=150)
        self.agents = [Agent(f"did:zs:agent:{seed}:{i:03d}",
                             Decimal(str(round(self.rng.uniform(10, 95), 2))),
                             Decimal(str(round(self.rng.uniform(30, 95), 2)))) for i in range(agents)]
        self.users = [f"did:zs:user:{seed}:{i:02d}" for i in range(users)]
        self.open: dict[str, datetime] = {}  # auction id -> expires_at, for the driver
        self.created = 0
        self.last_refusal: str | None = None
        self._seq = 0
        with conn.cursor() as cur:
            cur.executemany("INSERT INTO agents (did, name, status) VALUES (%s, %s, 'online') "
                            "ON CONFLICT (did) DO NOTHING", [(a.did, a.did.rsplit(':', 1)[-1]) for a in self.agents])

    # ---- clock -------------------------------------------------------------------
    def _db_now(self) -> datetime:
        return self.conn.execute("SELECT now()").fetchone()[0]  # type: ignore[index]

    def _tick(self, live: bool) -> float:
        """Advance the clock; returns the seconds that passed."""
        before = self.clock
        if live:
            if not self._live:  # the jump from history (or from construction) to the wall clock is no traffic
                self._live, before = True, max(self.clock, self._db_now())
            self.clock = max(self.clock, self._db_now())
            return min(10.0, max(0.0, (self.clock - before).total_seconds()))
        else:
            if self._live:
                raise RuntimeError("history (run/run_until on the virtual clock) must be built before live step()s")
            self.clock = min(self.clock + timedelta(seconds=self.rng.uniform(1.0, 5.0)), self._clock_cap)
        return max(0.0, (self.clock - before).total_seconds())

    def _chance(self, rate: float, dt: float) -> bool:
        return self.rng.random() < min(1.0, rate * dt)

    # ---- the platform's operations ---------------------------------------------------
    def composite(self, price: Decimal, budget: Decimal | None, reputation: Decimal, quality: Decimal) -> Decimal:
        """The ranking score: reputation, quality and cheapness. Which end wins is the ``ranking``."""
        ref = budget if budget and budget > 0 else Decimal(200)
        cheap = max(Decimal(0), 1 - price / ref)
        return (Decimal("0.4") * reputation + Decimal("0.3") * quality + 30 * cheap).quantize(Q4)

    def create_auction(self, auction_type: str | None = None, *, max_price: Decimal | float | None = None,
                       reserve_price: Decimal | float = 0, min_reputation: Decimal | float = 0,
                       duration_seconds: int | None = None, at: datetime | None = None,
                       user_id: str | None = None, track: bool = True) -> str:
        at = at or self.clock
        if auction_type is None:
            auction_type = ("sealed_bid" if self.rng.random() < self.unknown_type_share
                            else self.rng.choice(TYPES))
        duration = duration_seconds or self.rng.choice((30, 60, 90, 120))
        self._seq += 1
        row = self.conn.execute(
            """INSERT INTO auctions (task_id, user_id, auction_type, status, duration_seconds, expires_at,
                                     reserve_price, max_price, min_reputation, created_at, updated_at)
               VALUES (%s, %s, %s, 'open', %s, %s, %s, %s, %s, %s, %s) RETURNING id""",
            (f"task-{self._seq:06d}-{self.rng.getrandbits(32):08x}", user_id or self.rng.choice(self.users),
             auction_type, duration, at + timedelta(seconds=duration), _money(reserve_price),
             None if max_price is None else _money(max_price), Decimal(str(min_reputation)), at, at),
        ).fetchone()
        aid = str(row[0])  # type: ignore[index]
        self.created += 1
        if track:
            self.open[aid] = at + timedelta(seconds=duration)
        return aid

    def place_bid(self, auction_id: str, agent: Agent | None = None, price: Decimal | float | None = None, *,
                  at: datetime | None = None, composite: Decimal | float | None = None) -> str | None:
        """A bid the platform accepts, or None (``last_refusal`` says why) when its rules refuse it."""
        at = at or self.clock
        agent = agent or self.rng.choice(self.agents)
        a = self.conn.execute("SELECT status, expires_at, max_price, reserve_price, min_reputation "
                              "FROM auctions WHERE id = %s", (auction_id,)).fetchone()
        if a is None:
            raise KeyError(f"no auction {auction_id}")
        status, expires_at, max_price, reserve, min_rep = a
        if price is None:
            ref = max_price if max_price and max_price > 0 else Decimal(100)
            price = ref * Decimal(str(round(self.rng.uniform(0.3, 1.05), 4)))
        price = _money(price)
        refusal = None
        if status != "open" or at > expires_at:
            refusal = "auction not open or expired"
        elif max_price is not None and max_price > 0 and price > max_price:
            refusal = "price above max_price"
        elif reserve > 0 and price < reserve:
            refusal = "price below reserve_price"
        elif min_rep > 0 and agent.reputation < min_rep:
            refusal = "reputation below min_reputation"
        self.last_refusal = refusal
        if refusal:
            return None
        score = (Decimal(str(composite)).quantize(Q4) if composite is not None
                 else self.composite(price, max_price, agent.reputation, agent.quality))
        return self._insert_bid(auction_id, agent, price, score, at)

    def _insert_bid(self, auction_id: str, agent: Agent, price: Decimal, composite: Decimal,
                    at: datetime | None, reputation: Decimal | None = None) -> str:
        row = self.conn.execute(
            """INSERT INTO bids (auction_id, agent_did, price, estimated_time_seconds, reputation_score,
                                 quality_score, composite_score, created_at)
               VALUES (%s, %s, %s, %s, %s, %s, %s, coalesce(%s, now())) RETURNING id""",
            (auction_id, agent.did, _money(price), self.rng.randint(10, 600),
             agent.reputation if reputation is None else reputation, agent.quality, composite, at),
        ).fetchone()
        return str(row[0])  # type: ignore[index]

    def ranked_bids(self, auction_id: str) -> list[tuple[str, Decimal, Decimal, str]]:
        """(bid id, price, composite, agent) best first under this simulator's ranking."""
        direction = "DESC" if self.ranking == "highest_composite" else "ASC"
        return [(str(r[0]), r[1], r[2], r[3]) for r in self.conn.execute(
            f"SELECT id, price, composite_score, agent_did FROM bids WHERE auction_id = %s "
            f"ORDER BY composite_score {direction}, created_at, id", (auction_id,))]

    def close_auction(self, auction_id: str, at: datetime | None = None, *, open_channel: bool = True) -> str:
        """The platform's close: award the best bid at the type's price and fund its channel; returns the status."""
        at = at or self.clock
        self.open.pop(auction_id, None)
        with self.conn.transaction():
            atype, expires_at, reserve, user_id = self.conn.execute(
                "SELECT auction_type, expires_at, reserve_price, user_id FROM auctions WHERE id = %s FOR UPDATE",
                (auction_id,)).fetchone()  # type: ignore[misc]
            bids = self.ranked_bids(auction_id)
            if not bids:
                status = "expired" if at >= expires_at else "closed"
                self.conn.execute("UPDATE auctions SET status = %s, updated_at = %s WHERE id = %s",
                                  (status, at, auction_id))
                return status
            win_id, win_price, _, win_agent = bids[0]
            if atype == "second_price":
                final = bids[1][1] if len(bids) > 1 else win_price
            elif atype == "reserve":
                final = max(win_price, reserve)
            else:  # first_price, and anything unknown pays like it
                final = win_price
            self.conn.execute("UPDATE auctions SET status = 'awarded', winning_bid_id = %s, final_price = %s, "
                              "updated_at = %s WHERE id = %s", (win_id, final, at, auction_id))
            if open_channel:
                self._open_channel(auction_id, user_id or "did:zs:user:unknown", win_agent, final, at)
        return "awarded"

    def _open_channel(self, auction_id: str, payer: str, payee: str, amount: Decimal, at: datetime) -> str:
        # The payer pays the deposit in from outside, then the channel open debits it: balance unchanged.
        self.conn.execute(
            """INSERT INTO accounts (did, balance, total_deposited, created_at, updated_at)
               VALUES (%s, 0, %s, %s, %s)
               ON CONFLICT (did) DO UPDATE SET total_deposited = accounts.total_deposited + EXCLUDED.total_deposited,
                                               updated_at = EXCLUDED.updated_at""",
            (payer, amount, at, at))
        cid = self.conn.execute(
            """INSERT INTO payment_channels (payer_did, payee_did, auction_id, total_deposit, current_balance,
                                             state, sequence_number, created_at, updated_at)
               VALUES (%s, %s, %s, %s, %s, 'open', 0, %s, %s) RETURNING id""",
            (payer, payee, auction_id, amount, amount, at, at)).fetchone()[0]  # type: ignore[index]
        self.conn.execute("INSERT INTO channel_transactions (channel_id, transaction_type, amount, reason, created_at) "
                          "VALUES (%s, 'deposit', %s, 'auction award', %s)", (cid, amount, at))
        return str(cid)

    def cancel_auction(self, auction_id: str, at: datetime | None = None) -> None:
        self.open.pop(auction_id, None)
        self.conn.execute("UPDATE auctions SET status = 'canceled', updated_at = %s WHERE id = %s AND status = 'open'",
                          (at or self.clock, auction_id))

    # ---- traffic driver -----------------------------------------------------------------
    def _random_auction(self) -> str:
        budget = _money(self.rng.choice((50, 80, 100, 150, 200, 400)))
        atype = ("sealed_bid" if self.rng.random() < self.unknown_type_share else self.rng.choice(TYPES))
        reserve = Decimal(0)
        if atype == "reserve":
            reserve = _money(budget * Decimal("0.4"))
        elif self.rng.random() < 0.15:  # other types may carry a reserve too: bids below it are refused
            reserve = _money(budget * Decimal("0.2"))
        max_price = None if self.rng.random() < 0.1 else budget
        min_rep = Decimal(self.rng.choice((0, 0, 0, 20, 40, 60)))
        return self.create_auction(atype, max_price=max_price, reserve_price=reserve, min_reputation=min_rep)

    def step(self) -> None:
        """One tick of live traffic (virtual when ``realtime=False``): close what expired, maybe open an
        auction, let agents bid on the open ones."""
        self._step(live=self.realtime is not False)

    def _step(self, live: bool) -> None:
        dt = self._tick(live)
        now = self.clock
        for aid, expires in sorted(self.open.items(), key=lambda kv: kv[1]):
            if expires <= now:
                # The closer job runs a little after expiry; live, it runs now.
                self.close_auction(aid, at=now if live else expires + timedelta(seconds=self.rng.uniform(0, 5)))
        if len(self.open) < self.concurrency or self._chance(self.EXTRA_AUCTIONS_PER_SECOND, dt):
            self._random_auction()
        for aid in sorted(self.open):
            if self._chance(self.BIDS_PER_AUCTION_SECOND, dt):
                self.place_bid(aid)
        if self.open and self._chance(self.CANCELS_PER_SECOND, dt):
            self.cancel_auction(self.rng.choice(sorted(self.open)))

    def finish(self) -> None:
        """Close every auction the driver left open: at its expiry on the virtual clock, now when live."""
        for aid, expires in sorted(self.open.items(), key=lambda kv: kv[1]):
            self.close_auction(aid, at=max(self.clock, self._db_now()) if self._live
                               else expires + timedelta(seconds=1))

    def run(self, steps: int, finish: bool = True) -> "AuctionSimulator":
        """``steps`` ticks of history on the virtual clock (live with ``realtime=True``), then close the rest."""
        for _ in range(steps):
            self._step(live=self.realtime is True)
        if finish:
            self.finish()
        return self

    def run_until(self, auctions: int, finish: bool = True, max_steps: int = 100_000) -> "AuctionSimulator":
        """Drive history until ``auctions`` auctions were created (then close the rest)."""
        steps = 0
        while self.created < auctions and steps < max_steps:
            self._step(live=self.realtime is True)
            steps += 1
        if finish:
            self.finish()
        return self

    # ---- building blocks for faults --------------------------------------------------------
    def _score(self, rank: int) -> Decimal:
        """A composite score that ranks ``rank``-th (0 = best) under this simulator's ranking."""
        return Decimal(90 - 10 * rank if self.ranking == "highest_composite" else 10 + 10 * rank).quantize(Q4)

    def _awarded(self, auction_type: str, prices: list[float], *, max_price: float = 200, reserve: float = 0,
                 ago_seconds: float = 1200, open_channel: bool = True) -> tuple[str, list[str]]:
        """A fresh auction that ended ``ago_seconds`` ago, awarded by the rules; bids ranked in list order."""
        now = self._db_now()
        start = now - timedelta(seconds=ago_seconds + 90)
        aid = self.create_auction(auction_type, max_price=max_price, reserve_price=reserve, duration_seconds=60,
                                  at=start, track=False)
        bids = []
        for i, price in enumerate(prices):
            bid = self.place_bid(aid, self.agents[i % len(self.agents)], price, at=start + timedelta(seconds=5 + i),
                                 composite=self._score(i))
            if bid is None:
                raise RuntimeError(f"fault builder's bid was refused: {self.last_refusal}")
            bids.append(bid)
        self.close_auction(aid, at=start + timedelta(seconds=61), open_channel=open_channel)
        return aid, bids

    def _open_recent(self, **kw: Any) -> str:
        """A fresh auction opened a moment ago and still running (the driver closes it when it expires)."""
        now = self._db_now()
        return self.create_auction("first_price", duration_seconds=120, at=now - timedelta(seconds=10), **kw)

    def _touch(self, auction_id: str, assignments: str, params: tuple = ()) -> None:
        self.conn.execute(f"UPDATE auctions SET {assignments}, updated_at = now() WHERE id = %s",
                          (*params, auction_id))

    # ---- fault injection: each returns the entity id the checker must report ---------------
    def inject_awarded_without_winner(self) -> str:
        aid, _ = self._awarded("first_price", [40, 60])
        self._touch(aid, "winning_bid_id = NULL")
        return aid

    def inject_unawarded_with_winner(self) -> str:
        aid, _ = self._awarded("first_price", [])  # no bids: expired
        self._touch(aid, "final_price = %s", (_money(42),))
        return aid

    def inject_winner_not_top_ranked(self) -> str:
        aid, bids = self._awarded("first_price", [40, 60, 80])
        worst = bids[-1]
        price = self.conn.execute("SELECT price FROM bids WHERE id = %s", (worst,)).fetchone()[0]  # type: ignore[index]
        self._touch(aid, "winning_bid_id = %s, final_price = %s", (worst, price))  # price consistent with it
        return aid

    def inject_wrong_second_price(self) -> str:
        aid, _ = self._awarded("second_price", [40, 70, 90])
        self._touch(aid, "final_price = %s", (_money(40),))  # the winner's own price, not the second's 70
        return aid

    def inject_final_price_above_budget(self) -> str:
        """A second-price award above a (later lowered) budget: the auction and the second bid exceed it."""
        aid, _ = self._awarded("second_price", [50, 90], max_price=100)
        self._touch(aid, "max_price = %s", (_money(80),))
        return aid

    def inject_bid_above_budget(self) -> str:
        aid = self._open_recent(max_price=100)
        return self._insert_bid(aid, self.agents[0], _money(150), self._score(0), None)

    def inject_bid_below_min_reputation(self) -> str:
        aid = self._open_recent(max_price=100, min_reputation=60)
        return self._insert_bid(aid, self.agents[0], _money(50), self._score(0), None, reputation=Decimal("30.00"))

    def inject_bid_after_expiry(self) -> str:
        aid, bids = self._awarded("first_price", [40, 60])
        # A late bid tying the winner's score: it breaks only the expiry rule.
        return self._insert_bid(aid, self.agents[2], _money(50), self._score(0), None)

    def inject_stuck_open_auction(self) -> str:
        # Expired two hours ago: stale, and outside the allocation window, so this one stuck
        # auction cannot also tip allocation_success_rate (which counts stale ones as ended).
        now = self._db_now()
        aid = self.create_auction("first_price", max_price=100, duration_seconds=60,
                                  at=now - timedelta(hours=2), track=False)
        self.place_bid(aid, self.agents[0], 50, at=now - timedelta(hours=2) + timedelta(seconds=5))
        return aid

    def inject_awarded_without_channel(self) -> str:
        aid, _ = self._awarded("first_price", [40, 60], open_channel=False)
        return aid

    def inject_unallocated_burst(self, n: int = 25) -> str:
        now = self._db_now()
        for i in range(n):
            start = now - timedelta(minutes=30, seconds=i * 7)
            aid = self.create_auction("first_price", max_price=100, duration_seconds=60, at=start, track=False)
            self.close_auction(aid, at=start + timedelta(seconds=61))
        return "global"

    FAULTS = {
        "awarded_has_winner": "inject_awarded_without_winner",
        "unawarded_has_no_winner": "inject_unawarded_with_winner",
        "winner_is_top_ranked": "inject_winner_not_top_ranked",
        "final_price_rule": "inject_wrong_second_price",
        "price_within_bounds": "inject_bid_above_budget",
        "bid_meets_min_reputation": "inject_bid_below_min_reputation",
        "bid_after_expiry": "inject_bid_after_expiry",
        "stale_open_auction": "inject_stuck_open_auction",
        "awarded_without_channel": "inject_awarded_without_channel",
        "allocation_success_rate": "inject_unallocated_burst",
    }

    def inject(self, invariant_id: str) -> str:
        """Plant the fault of one invariant; returns the entity id to expect."""
        return getattr(self, self.FAULTS[invariant_id])()

    # ---- what the deployed platform really writes -------------------------------------------
    def deployed_platform_traffic(self, auctions: int, bids_per_auction: int = 3,
                                  spread_seconds: float = 3000) -> list[str]:
        """Auctions as the deployed platform writes them: first_price, reserve_price from the minimum bid, no
        max_price, bids accepted below the reserve, never closed. All expired long ago; returns their ids."""
        now = self._db_now()
        out = []
        for i in range(auctions):
            start = now - timedelta(seconds=600 + spread_seconds * i / max(1, auctions))
            aid = self.create_auction("first_price", max_price=None, reserve_price=10, duration_seconds=30,
                                      at=start, track=False)
            for j in range(bids_per_auction):
                agent = self.agents[(i + j) % len(self.agents)]
                price = _money(self.rng.uniform(5, 40))  # accepted even below the reserve of 10
                self._insert_bid(aid, agent, price, self.composite(price, None, agent.reputation, agent.quality),
                                 start + timedelta(seconds=1 + j))
            out.append(aid)
        return out
