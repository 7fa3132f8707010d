"""Checker ``auctions``: every auction was allocated by the platform's rules, and most auctions get allocated.

Reverse auctions (docs/invariants.md): a user posts a task with a budget, agents bid
the price they want, the bid with the best ``composite_score`` wins and the price
paid follows the auction type. This checker proves, in one read-only snapshot:

* per auction: an awarded auction names one of its own bids and a final price,
  an unawarded one names neither, the winner is top-ranked (ties allowed), the
  final price follows the type's rule (unknown types pay like ``first_price``),
  the final price stays within the budget, an auction awarded longer ago than the
  grace period has its payment channel, and no auction stays open past its expiry
  plus the grace period (the closer job is stuck);
* per bid: price within ``max_price``/``reserve_price``, reputation at least
  ``min_reputation``, placed before the auction expired;
* globally: of the auctions that ended in the window, the awarded share reaches
  the threshold (judged only with a minimum sample, otherwise skipped).

Incremental mode
----------------
A full sweep joins every auction with its bids. In between, an incremental run
re-judges only the auctions touched since the watermark (``auctions.updated_at``,
``bids.created_at``, awarded auctions young enough to cross the grace period since)
**plus every auction that violated an invariant at the previous run**, kept in
Redis. So the counts of an incremental run are the same complete counts a full
sweep would give: ``zerostate_invariant_violations`` does not flap between modes.
When more than ``incremental_max_tracked`` auctions violate, incremental runs fall
back to full sweeps (a systemic bug is better re-proved whole). ``stale_open_auction``
and ``allocation_success_rate`` read indexed columns and are judged on every run.
The watermark is the snapshot's ``now()`` minus ``incremental_overlap_seconds``, so
platform transactions that committed after the snapshot with an older
``updated_at`` are still seen. The platform indexes neither ``auctions.updated_at`` nor
``bids.created_at``: without the indexes zsmon recommends (``recommended_indexes``; zsmon never
runs DDL) the incremental scope scans both tables.

Readings of the domain (docs/invariants.md) made here
-------------------------------
* ``max_price`` is "set" when it is > 0: NULL and 0 both mean no budget (a budget of
  0 would refuse every bid, so a 0 can only be a Go zero value for "none").
* "Ended in the window" is ``expires_at`` in the window and status not
  ``open``/``canceled`` — plus, by default (``stale_open_counts_as_ended``), auctions
  still ``open`` more than the grace period after expiry: they failed to allocate,
  and docs/invariants.md states the deployed platform's ratio is 0 although it never closes
  an auction. Open auctions within the grace period are not counted yet.
* Ties: the winner may tie the best score; a second-price auction may pay any of
  the prices tied at the second rank (the best score among the other bids).
* The award time is ``updated_at`` of the awarded auction (there is no awarded_at).

What the deployed platform writes (docs/invariants.md) — auctions that are never closed,
no ``max_price``, bids accepted below the reserve — yields full counts, a capped
sample and one summary line per invariant, never a flood.
"""
from __future__ import annotations

from dataclasses import replace
from decimal import Decimal
from typing import Any, Literal

from pydantic import Field

from zsmon.checkers.platform import COLUMNS, reads
from zsmon.core.checker import Checker, CheckContext, CheckerSettings, Found, IndexAdvice, Invariant
from zsmon.core.results import Violation

AUCTION_STATUSES = ("open", "closed", "awarded", "canceled", "expired")
AUCTION_TYPES = ("first_price", "second_price", "reserve")

# Invariants judged per auction/bid in one pass (full or incremental scope).
ENTITY_INVARIANTS = (
    "awarded_has_winner", "unawarded_has_no_winner", "winner_is_top_ranked", "final_price_rule",
    "price_within_bounds", "bid_meets_min_reputation", "bid_after_expiry", "awarded_without_channel",
)
ENTITY_PLURAL = {"auction": "auctions", "bid": "bids"}


class AuctionsSettings(CheckerSettings):
    ranking: Literal["highest_composite", "lowest_composite"] = Field(
        "highest_composite",
        description="Which composite_score wins: highest_composite (higher is better) or lowest_composite "
                    "(lower is better). The platform's two code paths disagree; set it to the one deployed.")
    grace_period_seconds: float = Field(
        300.0, ge=0,
        description="Seconds an auction may stay open past expires_at (stale_open_auction), and an awarded "
                    "auction may wait for its payment channel (awarded_without_channel).")
    success_window_seconds: float = Field(
        3600.0, gt=0,
        description="Window of allocation_success_rate: auctions whose expires_at lies in the last N seconds.")
    success_threshold: float = Field(
        0.8, ge=0, le=1,
        description="Minimum share of the auctions that ended in the window that must be awarded.")
    min_sample: int = Field(
        20, ge=1,
        description="allocation_success_rate is judged only when at least this many auctions ended in the "
                    "window; below it the invariant is reported as skipped.")
    stale_open_counts_as_ended: bool = Field(
        True,
        description="Count an auction still open more than grace_period_seconds after expires_at as ended and "
                    "not awarded in allocation_success_rate (the deployed platform never closes auctions, so "
                    "its success ratio is 0). False counts only closed/awarded/expired auctions.")
    incremental_overlap_seconds: float = Field(
        120.0, ge=0,
        description="Incremental runs re-read rows touched up to this many seconds before the previous "
                    "snapshot (covers clock skew and long platform transactions).")
    incremental_max_tracked: int = Field(
        10000, ge=0,
        description="Incremental runs re-judge the auctions that violated at the previous run; when more than "
                    "this many did, they fall back to full sweeps.")


def ended_predicate(settings: AuctionsSettings, alias: str = "a") -> tuple[str, dict[str, Any]]:
    """SQL (and its params) for "ended in the window", shared by the checker and the exporter."""
    a = alias
    stale = (f" OR ({a}.status = 'open' AND {a}.expires_at < now() - make_interval(secs => %(grace)s))"
             if settings.stale_open_counts_as_ended else "")
    text = (f"{a}.expires_at > now() - make_interval(secs => %(window)s) AND {a}.expires_at <= now()"
            f" AND ({a}.status NOT IN ('open', 'canceled'){stale})")
    return text, {"window": float(settings.success_window_seconds), "grace": float(settings.grace_period_seconds)}


_ISO = "YYYY-MM-DD\"T\"HH24:MI:SS.US\"Z\""

# One pass over auctions and bids. {A} is the auction source (the whole table or the
# incremental scope); {BEST}/{WORSE}/{DIR} follow the ranking direction. Each violation is
# tagged with its kind (counted per kind for the summary); the side rows ``_tracked`` name the
# violating auctions, which the next incremental run re-judges.
_ENTITY_SQL = """
{SCOPE}
bid_stats AS (
    SELECT b.auction_id, {BEST}(b.composite_score) AS best_score
    FROM {bids} b JOIN {A} a ON a.id = b.auction_id AND a.status = 'awarded'
    GROUP BY b.auction_id
),
second_ranked AS (
    SELECT o.auction_id, array_agg(o.price ORDER BY o.price) AS prices
    FROM (
        SELECT b.auction_id, b.price,
               rank() OVER (PARTITION BY b.auction_id ORDER BY b.composite_score {DIR}) AS r
        FROM {bids} b
        JOIN {A} a ON a.id = b.auction_id AND a.status = 'awarded' AND a.auction_type = 'second_price'
        WHERE b.id IS DISTINCT FROM a.winning_bid_id
    ) o
    WHERE o.r = 1
    GROUP BY o.auction_id
),
au AS (
    SELECT a.id, a.status, a.auction_type, a.final_price, a.winning_bid_id, a.max_price, a.reserve_price,
           w.id AS w_id, w.price AS w_price, w.composite_score AS w_score, s.best_score, sr.prices AS second_prices,
           CASE a.auction_type
               WHEN 'second_price' THEN coalesce(sr.prices[1], w.price)
               WHEN 'reserve' THEN greatest(w.price, a.reserve_price)
               ELSE w.price
           END AS rule_price
    FROM {A} a
    LEFT JOIN {bids} w ON w.id = a.winning_bid_id AND w.auction_id = a.id
    LEFT JOIN bid_stats s ON s.auction_id = a.id
    LEFT JOIN second_ranked sr ON sr.auction_id = a.id
),
-- Cheap boolean tests first; detail text is built only for the auctions that fail one.
af AS (
    SELECT au.*,
           au.status = 'awarded' AND (au.winning_bid_id IS NULL OR au.w_id IS NULL OR au.final_price IS NULL)
               AS f_no_winner,
           au.status IS DISTINCT FROM 'awarded' AND (au.winning_bid_id IS NOT NULL OR au.final_price IS NOT NULL)
               AS f_stray_winner,
           au.status = 'awarded' AND au.w_id IS NOT NULL AND au.w_score {WORSE} au.best_score AS f_not_top,
           au.status = 'awarded' AND au.w_id IS NOT NULL AND au.final_price IS NOT NULL
               AND au.final_price IS DISTINCT FROM au.rule_price
               AND NOT (au.auction_type = 'second_price'
                        AND coalesce(au.final_price = ANY (au.second_prices), false)) AS f_price_rule,
           au.final_price IS NOT NULL AND au.max_price > 0 AND au.final_price > au.max_price AS f_over_budget
    FROM au
),
found AS (
SELECT x.invariant, 'auction' AS entity_type, au.id::text AS entity_id, au.id AS auction_id, x.kind AS tag,
       x.expected, x.actual, x.difference, x.detail
FROM (SELECT * FROM af WHERE f_no_winner OR f_stray_winner OR f_not_top OR f_price_rule OR f_over_budget) au
CROSS JOIN LATERAL (VALUES
    ('awarded_has_winner', au.f_no_winner,
     CASE WHEN au.winning_bid_id IS NULL THEN 'awarded auctions with no winning_bid_id'
          WHEN au.w_id IS NULL THEN 'awarded auctions whose winning_bid_id is not one of their bids'
          ELSE 'awarded auctions with no final_price' END,
     'a winning bid of this auction and a final_price',
     'winning_bid_id ' || coalesce(au.winning_bid_id::text, 'not set') || ', final_price '
         || coalesce(au.final_price::text, 'not set'),
     NULL::numeric,
     CASE WHEN au.winning_bid_id IS NULL THEN 'auction is awarded but names no winning bid'
          WHEN au.w_id IS NULL THEN 'auction is awarded to bid ' || au.winning_bid_id
               || ', which is not a bid of this auction'
          ELSE 'auction is awarded to bid ' || au.winning_bid_id || ' but has no final_price' END
         || ': the award was written incompletely; nothing defines what the payment channel should hold '
         || '(no numeric difference: a value is missing, not off)'),
    ('unawarded_has_no_winner', au.f_stray_winner,
     'unawarded auctions carrying a winner or final price',
     'winning_bid_id and final_price not set',
     'winning_bid_id ' || coalesce(au.winning_bid_id::text, 'not set') || ', final_price '
         || coalesce(au.final_price::text, 'not set'),
     au.final_price,
     'auction is ' || au.status || ' yet carries a winner or final price: either its status or its award '
         || 'is wrong (a payment may follow an auction that was never awarded)'),
    ('winner_is_top_ranked', au.f_not_top,
     'awarded auctions whose winner is not top-ranked',
     au.best_score::text, au.w_score::text, au.w_score - au.best_score,
     'winning bid ' || au.w_id || ' has composite_score ' || au.w_score || ' but the best bid of the auction has '
         || au.best_score || ' ({RANKING}): the award went to the wrong agent (or the ranking setting '
         || 'does not match the deployed platform)'),
    ('final_price_rule', au.f_price_rule,
     coalesce(au.auction_type, 'untyped') || ' auctions paying the wrong final_price',
     au.rule_price::text, au.final_price::text, au.final_price - au.rule_price,
     CASE au.auction_type
         WHEN 'second_price' THEN 'second_price auction must pay the second-ranked bid''s price '
              || coalesce(array_to_string(au.second_prices, ' or '), au.w_price::text || ' (the only bid)')
         WHEN 'reserve' THEN 'reserve auction must pay the winner''s price ' || au.w_price
              || ' raised to reserve_price ' || coalesce(au.reserve_price::text, 'not set')
         WHEN 'first_price' THEN 'first_price auction must pay the winner''s price ' || au.w_price
         ELSE 'auction of unknown type ' || coalesce(au.auction_type, 'not set')
              || ' pays like first_price: the winner''s price ' || au.w_price
     END || ', but final_price is ' || au.final_price || ': the user is charged the wrong amount'),
    ('price_within_bounds', au.f_over_budget,
     'auctions whose final_price exceeds max_price',
     au.max_price::text, au.final_price::text, au.final_price - au.max_price,
     'final_price ' || au.final_price || ' exceeds the auction''s budget max_price ' || au.max_price
         || ': the user is charged more than they allowed')
) AS x(invariant, bad, kind, expected, actual, difference, detail)
WHERE x.bad

UNION ALL

SELECT x.invariant, 'bid', b.id::text, b.auction_id, x.kind, x.expected, x.actual, x.difference, x.detail
FROM (
    SELECT b.id, b.auction_id, b.agent_did, b.price, b.reputation_score, b.created_at,
           a.id AS a_id, a.max_price, a.reserve_price, a.min_reputation, a.expires_at,
           a.max_price > 0 AND b.price > a.max_price AS f_above,
           a.reserve_price > 0 AND b.price < a.reserve_price AS f_below,
           a.min_reputation > 0 AND b.reputation_score < a.min_reputation AS f_low_rep,
           b.created_at > a.expires_at AS f_late
    FROM {bids} b
    JOIN {A} a ON a.id = b.auction_id
    WHERE (a.max_price > 0 AND b.price > a.max_price) OR (a.reserve_price > 0 AND b.price < a.reserve_price)
       OR (a.min_reputation > 0 AND b.reputation_score < a.min_reputation) OR b.created_at > a.expires_at
) b
CROSS JOIN LATERAL (VALUES
    ('price_within_bounds', b.f_above OR b.f_below,
     CASE WHEN b.f_above THEN 'bids priced above their auction''s max_price'
          ELSE 'bids priced below their auction''s reserve_price' END,
     CASE WHEN b.f_above THEN b.max_price ELSE b.reserve_price END::text,
     b.price::text,
     b.price - CASE WHEN b.f_above THEN b.max_price ELSE b.reserve_price END,
     CASE WHEN b.f_above
          THEN 'bid price ' || b.price || ' exceeds max_price ' || b.max_price || ' of auction ' || b.a_id
               || ': the platform must refuse bids above the budget'
          ELSE 'bid price ' || b.price || ' is below reserve_price ' || b.reserve_price || ' of auction ' || b.a_id
               || ': the platform must refuse bids under the reserve' END),
    ('bid_meets_min_reputation', b.f_low_rep,
     'bids from agents below the auction''s min_reputation',
     b.min_reputation::text, b.reputation_score::text, b.reputation_score - b.min_reputation,
     'agent ' || b.agent_did || ' bid with reputation ' || b.reputation_score || ' on auction ' || b.a_id
         || ' which requires ' || b.min_reputation || ': the platform must refuse it'),
    ('bid_after_expiry', b.f_late,
     'bids placed after their auction expired',
     to_char(b.expires_at AT TIME ZONE 'UTC', '{ISO}'), to_char(b.created_at AT TIME ZONE 'UTC', '{ISO}'),
     round(extract(epoch FROM b.created_at - b.expires_at)::numeric, 3),
     'bid placed ' || round(extract(epoch FROM b.created_at - b.expires_at)::numeric, 3)
         || ' s after auction ' || b.a_id || ' expired: the platform must refuse late bids')
) AS x(invariant, bad, kind, expected, actual, difference, detail)
WHERE x.bad

UNION ALL

SELECT 'awarded_without_channel', 'auction', a.id::text, a.id,
       'awarded auctions with no payment channel',
       'a payment channel with auction_id ' || a.id, 'none',
       round(extract(epoch FROM now() - a.updated_at)::numeric, 3),
       'auction was awarded ' || round(extract(epoch FROM now() - a.updated_at)::numeric)
           || ' s ago (grace ' || %(grace)s || ' s) and no payment channel names it: the winner '
           || coalesce(a.winning_bid_id::text, '(none)') || ' cannot be paid'
FROM {A} a
WHERE a.status = 'awarded' AND a.updated_at < now() - make_interval(secs => %(grace)s)
  AND NOT EXISTS (SELECT 1 FROM {payment_channels} pc WHERE pc.auction_id = a.id::text)
)
SELECT invariant, entity_type, entity_id, expected, actual, difference, detail, tag FROM found
UNION ALL
SELECT '_tracked', 'auction', t.auction_id::text, NULL, NULL, NULL, NULL, NULL
FROM (SELECT DISTINCT auction_id FROM found LIMIT %(cap)s) AS t
"""

_SCOPE_SQL = """
WITH scope AS MATERIALIZED (
    SELECT id FROM {auctions} WHERE updated_at > %(since)s
    UNION SELECT auction_id FROM {bids} WHERE created_at > %(since)s
    UNION SELECT id FROM {auctions}
          WHERE status = 'awarded' AND updated_at > %(since)s - make_interval(secs => %(grace)s)
    UNION SELECT unnest(%(tracked)s::uuid[])
),
"""

class AuctionsChecker(Checker):
    name = "auctions"
    description = ("Auctions are awarded by the platform's rules (winner, ranking, price, budget, reputation, "
                   "expiry, payment channel) and most auctions that end get allocated.")
    invariants = (
        Invariant("awarded_has_winner",
                  "status = awarded ⇒ winning_bid_id names a bid of this auction and final_price is set.",
                  entity_type="auction", severity="warning",
                  reads=reads("auctions", "id", "status", "winning_bid_id", "final_price")
                  + reads("bids", "id", "auction_id")),
        Invariant("unawarded_has_no_winner",
                  "status ≠ awarded ⇒ winning_bid_id and final_price are null.",
                  entity_type="auction", severity="warning",
                  reads=reads("auctions", "id", "status", "winning_bid_id", "final_price")),
        Invariant("winner_is_top_ranked",
                  "The winning bid has the best composite_score of the auction's bids (ties allowed).",
                  entity_type="auction", severity="warning",
                  reads=reads("auctions", "id", "status", "winning_bid_id")
                  + reads("bids", "id", "auction_id", "composite_score")),
        # Critical: a wrong final price is a wrong amount of money charged to the user and paid to the agent.
        Invariant("final_price_rule",
                  "final_price follows the auction type's rule (first_price: winner's price; second_price: "
                  "second-ranked bid's price; reserve: winner's price raised to reserve_price; unknown types "
                  "pay like first_price).",
                  entity_type="auction", severity="critical",
                  reads=reads("auctions", "id", "status", "auction_type", "winning_bid_id", "final_price",
                              "reserve_price")
                  + reads("bids", "id", "auction_id", "price", "composite_score")),
        Invariant("price_within_bounds",
                  "Bid price ≤ max_price when set and ≥ reserve_price when > 0 (entity: the bid); "
                  "final_price ≤ max_price (entity: the auction).",
                  entity_type="bid", severity="warning",
                  reads=reads("auctions", "id", "max_price", "reserve_price", "final_price")
                  + reads("bids", "id", "auction_id", "price")),
        Invariant("bid_meets_min_reputation",
                  "A bid's reputation_score ≥ its auction's min_reputation when that is > 0.",
                  entity_type="bid", severity="warning",
                  reads=reads("auctions", "id", "min_reputation")
                  + reads("bids", "id", "auction_id", "reputation_score")),
        Invariant("bid_after_expiry",
                  "A bid's created_at ≤ its auction's expires_at.",
                  entity_type="bid", severity="warning",
                  reads=reads("auctions", "id", "expires_at") + reads("bids", "id", "auction_id", "created_at")),
        Invariant("stale_open_auction",
                  "No auction stays open longer than the grace period past expires_at (the closer job is stuck).",
                  entity_type="auction", severity="warning", difference_is_age=True,
                  reads=reads("auctions", "id", "status", "expires_at")),
        Invariant("awarded_without_channel",
                  "An auction awarded longer ago than the grace period has a payment channel with its id.",
                  entity_type="auction", severity="warning",
                  reads=reads("auctions", "id", "status", "updated_at", "winning_bid_id")
                  + reads("payment_channels", "auction_id")),
        Invariant("allocation_success_rate",
                  "Of the auctions that ended in the window, the awarded share is ≥ the threshold "
                  "(judged only with at least min_sample auctions).",
                  entity_type="global", severity="warning",
                  reads=reads("auctions", "status", "expires_at")),
    )
    columns = {t: COLUMNS[t] for t in ("auctions", "bids", "payment_channels")}
    Settings = AuctionsSettings
    default_interval_seconds = 30.0
    supports_incremental = True
    default_full_interval_seconds = 900.0
    recommended_indexes = (
        IndexAdvice("auctions", "updated_at",
                    "incremental auctions runs find the auctions changed since the watermark without scanning "
                    "every auction"),
        IndexAdvice("bids", "created_at",
                    "incremental auctions runs find the new bids without scanning every bid"),
    )

    settings: AuctionsSettings

    # ---- run ---------------------------------------------------------------------------
    def run(self, ctx: CheckContext) -> None:
        s = self.settings
        state = ctx.state()
        previous = state.resume()
        if previous is not None and previous.get("overflow"):
            ctx.fall_back_to_full(f"more than {s.incremental_max_tracked} auctions violated at the previous run "
                                  "(incremental_max_tracked)")
            previous = None
        tracked = self._judge_entities(ctx, previous)
        self._judge_stale(ctx)
        self._judge_allocation(ctx)
        overflow = len(tracked) > s.incremental_max_tracked
        state.save({"watermark": ctx.snapshot_time, "overflow": overflow, "tracked": [] if overflow else tracked})

    def _direction(self) -> dict[str, str]:
        if self.settings.ranking == "lowest_composite":
            return {"BEST": "min", "WORSE": ">", "DIR": "ASC", "RANKING": "lowest_composite: lower is better"}
        return {"BEST": "max", "WORSE": "<", "DIR": "DESC", "RANKING": "highest_composite: higher is better"}

    def entity_sql(self, incremental: bool) -> str:
        text = _ENTITY_SQL
        subs = dict(self._direction(), ISO=_ISO)
        if incremental:
            subs["SCOPE"] = _SCOPE_SQL.strip()
            subs["A"] = "(SELECT a0.* FROM {auctions} a0 WHERE a0.id IN (SELECT id FROM scope))"
        else:
            subs["SCOPE"] = "WITH"
            subs["A"] = "{auctions}"
        for k, v in subs.items():
            text = text.replace("{" + k + "}", v)
        return text

    def _judge_entities(self, ctx: CheckContext, previous: dict[str, Any] | None) -> list[str]:
        """Judge the per-auction and per-bid invariants; returns the violating auctions to track."""
        s = self.settings
        params: dict[str, Any] = {"grace": float(s.grace_period_seconds), "cap": s.incremental_max_tracked + 1}
        incremental = previous is not None
        inner = self.entity_sql(incremental)
        if incremental:
            params["since"] = float(previous["watermark"]) - s.incremental_overlap_seconds
            params["tracked"] = [str(t) for t in previous.get("tracked", [])]
            # to_timestamp(...) keeps the parameter a plain float on the wire.
            inner = inner.replace("%(since)s", "to_timestamp(%(since)s)")
        found = ctx.find_many(inner, ENTITY_INVARIANTS, params, tags=True)
        for inv in ENTITY_INVARIANTS:
            f = found[inv]
            # Expected/actual are text (one column type across invariants): money back to Decimal.
            ctx.report(inv, [replace(v, expected=_num(v.expected), actual=_num(v.actual)) for v in f.sample], f.count)
            if f.count:
                parts = sorted(f.tags.items(), key=lambda kv: (-kv[1], kv[0]))
                ctx.summarize(inv, "; ".join(f"{n} {kind}" for kind, n in parts))
        return [v.entity_id for v in found.get("_tracked", Found()).sample]

    def _judge_stale(self, ctx: CheckContext) -> None:
        grace = float(self.settings.grace_period_seconds)
        n = ctx.find(
            "stale_open_auction",
            f"""
            SELECT a.id AS entity_id,
                   to_char(a.expires_at AT TIME ZONE 'UTC', '{_ISO}') AS expected,
                   'open' AS actual,
                   round(extract(epoch FROM now() - a.expires_at)::numeric, 3) AS difference,
                   'auction is still open ' || round(extract(epoch FROM now() - a.expires_at)::numeric)
                       || ' s after it expired (grace ' || %(grace)s || ' s): the platform''s auction closer '
                       || 'is not running or skips it' AS detail
            FROM {{auctions}} a
            WHERE a.status = 'open' AND a.expires_at < now() - make_interval(secs => %(grace)s)
            """,
            {"grace": grace},
        )
        if n:
            open_total = ctx.scalar("SELECT count(*) FROM {auctions} WHERE status = 'open'")
            oldest = ctx.samples["stale_open_auction"][0].difference
            ctx.summarize("stale_open_auction",
                          f"{n} of {open_total} open auctions are more than {grace:g} s past expires_at "
                          f"(oldest expired {oldest} s ago): the auction closer is not running")

    def _judge_allocation(self, ctx: CheckContext) -> None:
        s = self.settings
        where, params = ended_predicate(s)
        row = ctx.query(
            f"""
            SELECT count(*) AS ended,
                   count(*) FILTER (WHERE a.status = 'awarded') AS awarded,
                   count(*) FILTER (WHERE a.status = 'closed') AS closed,
                   count(*) FILTER (WHERE a.status = 'expired') AS expired,
                   count(*) FILTER (WHERE a.status = 'open') AS stuck_open,
                   count(*) FILTER (WHERE a.status NOT IN ('open', 'closed', 'awarded', 'expired')) AS other
            FROM {{auctions}} a WHERE {where}
            """,
            params,
        )[0]
        ended, awarded = int(row["ended"]), int(row["awarded"])
        window = f"{s.success_window_seconds:g} s"
        if ended < s.min_sample:
            ctx.skip("allocation_success_rate",
                     f"only {ended} auctions ended in the window; needs ≥ {s.min_sample}")
            return
        ratio = (Decimal(awarded) / Decimal(ended)).quantize(Decimal("0.0001"))
        threshold = Decimal(str(s.success_threshold)).quantize(Decimal("0.0001"))
        breakdown = ", ".join(f"{int(row[k])} {label}" for k, label in (
            ("closed", "closed without bids"), ("expired", "expired"),
            ("stuck_open", "still open past expiry + grace"), ("other", "in another status")) if int(row[k]))
        line = (f"{awarded} of {ended} auctions that ended in the last {window} were awarded "
                f"({ratio} {'<' if ratio < threshold else '≥'} threshold {threshold})"
                + (f"; not awarded: {breakdown}" if breakdown else ""))
        ctx.summarize("allocation_success_rate", line)
        found = []
        if ratio < threshold:
            found.append(Violation("allocation_success_rate", "global", "global", threshold, ratio,
                                   ratio - threshold, line + ": agents are not winning the auctions users post"))
        ctx.report("allocation_success_rate", found, len(found))


def _num(value: Any) -> Any:
    if isinstance(value, str):
        try:
            return Decimal(value)
        except Exception:
            return value
    return value
