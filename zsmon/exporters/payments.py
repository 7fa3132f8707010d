"""Exporter ``payments``: where the platform's money is, for dashboards (cached, never at scrape time).

- ``zerostate_payment_channels{state}``: channels by state (all four states, 0 when none);
- ``zerostate_payment_money{bucket}``: money by bucket: ``current`` (spendable in channels that are not
  closed), ``escrowed`` (locked for running tasks in channels that are not closed), ``stranded`` (still held
  by closed channels: exactly what ``closed_channel_drained`` reports), ``overdrawn`` (the sum of negative
  channel balances, as a positive amount: what ``channel_non_negative`` reports; negative balances are kept
  out of the other buckets rather than netted into them), ``settled`` (paid to payees), ``refunded``
  (returned at close: pending_refund), ``available`` (accounts' balances);
- ``zerostate_payment_escrows_active``: channels with money locked in escrow;
- ``zerostate_payment_deposited_total`` / ``zerostate_payment_withdrawn_total``: money paid in from and out
  to the outside world (sums of the accounts' totals);
- ``zerostate_payment_channel_transactions_total{type}``: ledger rows by type (``settle`` rows count as
  ``settlement``: a direct settlement, not an escrow release; unknown types as ``other``).

Money is exported as float samples (Prometheus samples are floats): fine for a gauge; exact
comparisons are the ``payments`` checker's job, in ``numeric``.

The ledger is append-only and can be large, so its row counts are kept incrementally: rows older
than a mark (the snapshot time minus ``ledger_safety_seconds``) are counted once and remembered;
each collection counts only the rows since the mark through the ``created_at`` index, and the whole
ledger is recounted every ``ledger_recount_seconds``.
"""
from __future__ import annotations

import threading
import time
from typing import Any, Iterable

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from pydantic import Field

from zsmon.core.exporter import CollectContext, Exporter, ExporterSettings

CHANNEL_STATES = ("open", "escrowed", "settling", "closed")
MONEY_BUCKETS = ("current", "escrowed", "stranded", "overdrawn", "settled", "refunded", "available")
TRANSACTION_TYPES = ("deposit", "escrow", "release", "settlement", "refund", "close", "other")

# Per state; positive and negative amounts apart, so an overdrawn channel is never netted into a total.
_CHANNELS_SQL = """
SELECT state, count(*) AS n, count(*) FILTER (WHERE escrowed_amount > 0) AS escrows,
       coalesce(sum(greatest(current_balance, 0)), 0) AS current,
       coalesce(sum(greatest(escrowed_amount, 0)), 0) AS escrowed,
       coalesce(sum(least(current_balance, 0) + least(escrowed_amount, 0)), 0) AS negative,
       coalesce(sum(total_settled), 0) AS settled, coalesce(sum(pending_refund), 0) AS refunded
FROM payment_channels GROUP BY state
"""

_ACCOUNTS_SQL = """
SELECT coalesce(sum(balance), 0) AS available, coalesce(sum(total_deposited), 0) AS deposited,
       coalesce(sum(total_withdrawn), 0) AS withdrawn
FROM accounts
"""

_LEDGER_SQL = """
SELECT k, count(*) FILTER (WHERE created_at < %(new_mark)s) AS settled, count(*) AS total
FROM (
    SELECT CASE WHEN transaction_type IN ('settlement', 'settle') THEN 'settlement'
                WHEN transaction_type IN ('deposit', 'escrow', 'release', 'refund', 'close') THEN transaction_type
                ELSE 'other' END AS k,
           -- created_at is nullable on the real schema: such a row counts as old (counted once, kept).
           coalesce(created_at, '-infinity') AS created_at
    FROM channel_transactions
    {where}
) AS t
GROUP BY k
"""


class PaymentsExporterSettings(ExporterSettings):
    ledger_safety_seconds: float = Field(
        300.0, ge=0, description="Ledger rows younger than this are recounted at every collection (a write "
                                 "committed late, stamped earlier, is still counted).")
    ledger_recount_seconds: float = Field(
        3600.0, gt=0, description="Recount the whole ledger by type this often (otherwise only rows since the mark).")


class PaymentsExporter(Exporter):
    name = "payments"
    description = "Channels by state, money by bucket, active escrows, deposits/withdrawals and ledger rows by type."
    Settings = PaymentsExporterSettings
    default_interval_seconds = 15.0

    settings: PaymentsExporterSettings

    def __init__(self, settings: ExporterSettings | None = None) -> None:
        super().__init__(settings)
        self._lock = threading.Lock()
        self._base: dict[str, int] = {}
        self._mark: Any = None          # rows with created_at < mark are counted in _base
        self._recounted_at = 0.0

    def collect(self, ctx: CollectContext) -> Iterable[Metric]:
        channels = ctx.query(_CHANNELS_SQL)
        accounts = ctx.query(_ACCOUNTS_SQL)[0]
        ledger = self._ledger_counts(ctx)

        states = GaugeMetricFamily("zerostate_payment_channels", "Payment channels by state.", labels=["state"])
        by_state = {r["state"]: r for r in channels}
        for state in CHANNEL_STATES + tuple(sorted(set(by_state) - set(CHANNEL_STATES))):
            states.add_metric([state], float(by_state[state]["n"]) if state in by_state else 0.0)

        money = GaugeMetricFamily(
            "zerostate_payment_money",
            "Money by bucket: current (spendable in channels not closed), escrowed (locked for tasks), stranded "
            "(still held by closed channels), overdrawn (negative channel balances, as a positive sum), settled "
            "(paid to payees), refunded (returned at close), available (accounts' balances).", labels=["bucket"])
        live = [r for r in channels if r["state"] != "closed"]
        closed = [r for r in channels if r["state"] == "closed"]
        money.add_metric(["current"], float(sum(r["current"] for r in live)))
        money.add_metric(["escrowed"], float(sum(r["escrowed"] for r in live)))
        money.add_metric(["stranded"], float(sum(r["current"] + r["escrowed"] for r in closed)))
        money.add_metric(["overdrawn"], float(-sum(r["negative"] for r in channels)))
        for bucket in ("settled", "refunded"):
            money.add_metric([bucket], float(sum(r[bucket] for r in channels)))
        money.add_metric(["available"], float(accounts["available"]))

        escrows = GaugeMetricFamily("zerostate_payment_escrows_active", "Channels with money locked in escrow.",
                                    value=float(sum(r["escrows"] for r in channels)))
        deposited = CounterMetricFamily("zerostate_payment_deposited", "Money paid into accounts from outside.",
                                        value=float(accounts["deposited"]))
        withdrawn = CounterMetricFamily("zerostate_payment_withdrawn", "Money paid out of accounts to outside.",
                                        value=float(accounts["withdrawn"]))
        rows = CounterMetricFamily("zerostate_payment_channel_transactions",
                                   "Ledger rows by type (settle rows count as settlement).", labels=["type"])
        for kind in TRANSACTION_TYPES:
            rows.add_metric([kind], float(ledger.get(kind, 0)))
        return [states, money, escrows, deposited, withdrawn, rows]

    def _ledger_counts(self, ctx: CollectContext) -> dict[str, int]:
        new_mark = ctx.query("SELECT transaction_timestamp() - make_interval(secs => %s) AS m",
                             (self.settings.ledger_safety_seconds,))[0]["m"]
        with self._lock:
            recount = self._mark is None or time.monotonic() - self._recounted_at >= self.settings.ledger_recount_seconds
            base = {} if recount else dict(self._base)
            mark = None if recount else self._mark
        where = "" if mark is None else "WHERE created_at >= %(mark)s"
        found = ctx.query(_LEDGER_SQL.format(where=where), {"new_mark": new_mark, "mark": mark})
        emitted = dict(base)
        for r in found:
            emitted[r["k"]] = emitted.get(r["k"], 0) + int(r["total"])
            base[r["k"]] = base.get(r["k"], 0) + int(r["settled"])
        with self._lock:  # remembered only once the whole collection succeeded this far
            self._base, self._mark = base, new_mark
            if recount:
                self._recounted_at = time.monotonic()
        return emitted
