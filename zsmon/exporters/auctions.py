"""Exporter ``auctions``: the state of the auction market, collected on a schedule and served from cache.

* ``zerostate_auctions{status}`` — auctions by status (all five statuses always
  present; any status the platform invents is counted under ``other``);
* ``zerostate_auction_bids_total`` — bid rows observed (bids are append-only, so
  the row count is a counter; a truncate shows as a counter reset);
* ``zerostate_auction_bids_per_auction`` — *gauge histogram* of bids per auction
  over the auctions that ended in the window;
* ``zerostate_auction_time_to_award_seconds`` — *gauge histogram* of ``updated_at −
  created_at`` over the auctions awarded in the window;
* ``zerostate_auction_allocation_success_ratio`` — the awarded share of the
  auctions that ended in the window, exactly as the ``auctions`` checker judges it
  (same window, grace period and definition of "ended", read from
  ``checkers.auctions.settings``); absent while no auction ended in the window.

Both histograms are snapshots of the last window, not streams of observations: their buckets fall
when auctions leave the window, so they are OpenMetrics gauge histograms (as
``zerostate_reputation_score``), read as they are — ``histogram_quantile(0.5, sum by (le)
(zerostate_auction_bids_per_auction_bucket))`` — never through ``rate()``, which would take every fall
for a counter reset. Both exposition formats serve the same series: ``_bucket{le}`` for the buckets,
``_gcount`` (auctions in the window) and ``_gsum`` as gauges; there is no ``_count``/``_sum``.

Labels are bounded: ``status`` only.
"""
from __future__ import annotations

from typing import Any, Iterable

from prometheus_client.core import CounterMetricFamily, GaugeHistogramMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.utils import floatToGoString

from zsmon.checkers.auctions import AUCTION_STATUSES, AuctionsSettings, ended_predicate
from zsmon.core.exporter import CollectContext, Exporter

BIDS_PER_AUCTION_BUCKETS = (0, 1, 2, 3, 5, 8, 13, 21)
TIME_TO_AWARD_BUCKETS = (1, 2, 5, 10, 15, 30, 60, 120, 300, 600, 1200, 1800, 3600)


def _checker_settings(config: Any) -> AuctionsSettings:
    """The auctions checker's settings (window, grace, "ended"), so the ratio here equals the one judged."""
    if config is None:
        return AuctionsSettings()
    raw = config.checker("auctions").settings
    return raw if isinstance(raw, AuctionsSettings) else AuctionsSettings.model_validate(raw or {})


def _bucket_columns(expr: str, bounds: Iterable[float]) -> str:
    return ", ".join(f"count(*) FILTER (WHERE {expr} <= {b}) AS le_{i}" for i, b in enumerate(bounds))


def _histogram(name: str, doc: str, row: dict[str, Any], bounds: tuple, total: int, sum_value: float) -> Metric:
    """A gauge histogram of the window now (its buckets may fall), not a counter histogram."""
    buckets = [(floatToGoString(b), float(row[f"le_{i}"])) for i, b in enumerate(bounds)]
    buckets.append(("+Inf", float(total)))
    return GaugeHistogramMetricFamily(name, doc, buckets=buckets, gsum_value=sum_value)


class AuctionsExporter(Exporter):
    name = "auctions"
    description = "Auctions by status, bids, bids per auction, time to award and the allocation success ratio."
    default_interval_seconds = 15.0

    def collect(self, ctx: CollectContext) -> Iterable[Metric]:
        s = _checker_settings(ctx.config)

        by_status = {st: 0 for st in AUCTION_STATUSES}
        other = 0
        for r in ctx.query("SELECT status, count(*) AS n FROM auctions GROUP BY status"):
            if r["status"] in by_status:
                by_status[r["status"]] = int(r["n"])
            else:
                other += int(r["n"])
        g = GaugeMetricFamily("zerostate_auctions", "Auctions by status.", labels=["status"])
        for st in AUCTION_STATUSES:
            g.add_metric([st], float(by_status[st]))
        if other:
            g.add_metric(["other"], float(other))
        yield g

        bids = ctx.query("SELECT count(*) AS n FROM bids")[0]["n"]
        yield CounterMetricFamily("zerostate_auction_bids_total", "Bid rows observed in the bids table.",
                                  value=float(bids))

        where, params = ended_predicate(s)
        ended = ctx.query(
            f"""
            SELECT count(*) AS ended, count(*) FILTER (WHERE e.status = 'awarded') AS awarded,
                   coalesce(sum(e.n), 0) AS bids, {_bucket_columns('e.n', BIDS_PER_AUCTION_BUCKETS)}
            FROM (
                SELECT a.status, (SELECT count(*) FROM bids b WHERE b.auction_id = a.id) AS n
                FROM auctions a WHERE {where}
            ) e
            """,
            params,
        )[0]
        yield _histogram("zerostate_auction_bids_per_auction",
                         "Bids per auction, over the auctions that ended in the success window.",
                         ended, BIDS_PER_AUCTION_BUCKETS, int(ended["ended"]), float(ended["bids"]))

        award = ctx.query(
            f"""
            SELECT count(*) AS n, coalesce(sum(t.s), 0) AS total, {_bucket_columns('t.s', TIME_TO_AWARD_BUCKETS)}
            FROM (
                SELECT greatest(0, extract(epoch FROM a.updated_at - a.created_at))::float8 AS s
                FROM auctions a
                WHERE a.status = 'awarded' AND a.updated_at > now() - make_interval(secs => %(window)s)
                  AND a.updated_at <= now()
                  AND a.created_at IS NOT NULL  -- nullable on the real schema: unknown, not 0 s
            ) t
            """,
            {"window": float(s.success_window_seconds)},
        )[0]
        yield _histogram("zerostate_auction_time_to_award_seconds",
                         "Seconds from an auction's creation to its award, over the auctions awarded in the "
                         "success window.", award, TIME_TO_AWARD_BUCKETS, int(award["n"]), float(award["total"]))

        if int(ended["ended"]) > 0:
            yield GaugeMetricFamily(
                "zerostate_auction_allocation_success_ratio",
                "Share of the auctions that ended in the success window that were awarded.",
                value=int(ended["awarded"]) / int(ended["ended"]))
