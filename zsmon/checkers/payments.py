"""Checker ``payments``: money is conserved per channel, per account and globally.

The ten invariants of ``docs/invariants.md`` ("Payments"), judged in
PostgreSQL with set-based SQL inside the runner's one ``REPEATABLE READ READ
ONLY`` snapshot, so correct concurrent traffic never shows up as a violation:

- one pass over the ledger, aggregated per channel and joined to the channels,
  judges ``channel_conservation``, ``channel_non_negative``,
  ``ledger_reconciliation``, ``closed_channel_drained`` and ``escrow_state``;
- one pass over the ledger's release/refund/settlement rows judges
  ``double_release``: one release or refund per (channel, task) escrow, one
  settlement (``settlement`` or ``settle`` row) per channel, since a settle
  pays the payee out of the spendable balance and closes the channel;
- one pass over the channels grouped by DID, joined to the accounts, judges
  ``account_non_negative`` and ``account_reconciliation`` (a DID that channels
  pay or are paid by but that has no account row is judged as an empty account);
- one aggregate judges ``global_conservation`` in full sweeps; incremental runs judge it, and
  ``account_reconciliation``, from exact deltas of remembered sums (below);
- ``sequence_regression`` compares every channel's ``sequence_number`` with the
  highest one seen before, kept in one Redis hash (channel id -> sequence
  number; ``zsmon.core.memory.ColumnMemory``). Without Redis it is reported
  skipped; on the very first observation too (nothing to compare with yet).

Money stays ``numeric`` in SQL and ``Decimal`` in Python: a leak of 0.00000001
is a violation.

Modes. A full sweep reads everything. An incremental run re-checks only the
channels touched since the watermark (ledger rows by ``created_at``, channels by
``updated_at``) and the accounts of their payers and payees plus accounts whose
``updated_at`` moved, since the previous snapshot's time (kept in the checker's
incremental state, written only when the run's result is published) minus
``watermark_safety_seconds`` (so a write that committed just after that snapshot,
stamped a little before it, is still seen). No watermark, no Redis, or more touched
channels than ``incremental_max_channels``: the run is a full sweep.

Remembered sums (``incremental_sums``). Every full sweep anchors in Redis, in its own snapshot, what each
channel contributes to the global and per-DID sums (payer, payee, total_deposit, pending_refund,
total_settled, current_balance + escrowed_amount), each DID's account row and channel sums, and the
global totals (``zsmon.core.memory.AnchoredMemory``, written only once the result is published). An
incremental run reads only the touched channels and the judged DIDs' accounts and takes every sum as
remembered + (now - remembered) of those rows, exactly (Decimal, rounding trapped); the remembered payer
and payee of a touched channel are judged too (a rewritten payer_did moves money off the old DID). The
touched set covers every change since the sums' own snapshot (when their update was lost, since then).
Sums gone, partly evicted or half-written: the run is a full sweep, which re-anchors them. Sums that the
last full sweep could not anchor (Redis failing, a channel without payer), unreadable, or not exact: the
exact SQL judges instead, as without the setting; it re-sums the judged DIDs' channels but cannot know
the previous payer or payee of a channel whose payer_did or payee_did was rewritten, so that old DID is
judged at the next full sweep only. With the sums, the same snapshot gives the same verdicts as a full
sweep, as long as rows are changed with their ``updated_at`` and never deleted (a deleted channel or
account stays in the sums until the next full sweep, which is the proof).

Full sweeps are steered to sequential, single-process plans (no index scans, no
parallel workers, per-channel grouping by sort) for their whole-table aggregates:
on a ledger much larger than shared_buffers an index-ordered aggregate reads the
heap in random order (about 9x slower in bench/payments.py), parallel workers
must ship numeric partial sums between processes, which costs more than they
save, and a hash table of a million numeric states spills in many batches where a
sort spills once. Incremental runs turn JIT off. See docs/performance.md.

A full sweep's channel pass and double-release pass are split by ranges of channel
id (cut from a block sample of ``payment_channels``) over
``full_sweep_connections`` connections that share the run's snapshot
(``CheckContext.parallel``): each connection sweeps one range at a time with the
planner settings above, and the rankings merge exactly into those of one pass
(``merge_ranked``).
The sequence memory, the account pass and the global aggregate run whole
beside them on the same connections (the global aggregate is one query, on
one snapshot).
"""
from __future__ import annotations

import itertools
import json
import time
from contextlib import contextmanager
from dataclasses import dataclass, replace
from decimal import Context, Decimal, Inexact, InvalidOperation, Rounded, localcontext
from typing import Any, Iterator

import redis
from prometheus_client import Counter
from pydantic import Field

from zsmon.checkers.platform import COLUMNS, reads
from zsmon.core.checker import Checker, CheckContext, CheckerSettings, IndexAdvice, Invariant, merge_ranked
from zsmon.core.memory import AnchoredMemory, UnkeyedRow
from zsmon.core.redis import redis_error
from zsmon.core.results import Violation

SETTLE_TYPES = ("settlement", "settle")  # the settle endpoint writes 'settlement', older rows 'settle'

SEQUENCE_KEY = "sequence"      # hash: channel id -> highest sequence_number observed
# The remembered sums (zsmon.core.memory.AnchoredMemory): a header (anchor, as_of, the global totals) and
# two parts: channel id -> JSON [payer_did, payee_did, total_deposit, pending_refund, total_settled,
# current_balance + escrowed_amount]; DID -> JSON [has an account row, balance, total_deposited,
# total_withdrawn, sum of total_deposit of the channels it pays, of their pending_refund, sum of
# total_settled of the channels it is paid by]. Money as numeric text, never floats.
SUMS_KEY = "sums"
SUMS_PARTS = ("channels", "dids")
TOTALS = ("deposited", "withdrawn", "balance", "held")
# Sums are exact or not used: any rounding raises (and the run judges with the exact SQL instead).
_EXACT = Context(prec=100, traps=[Inexact, Rounded, InvalidOperation])
_ZERO = Decimal(0)
_encode = json.JSONEncoder(separators=(",", ":")).encode

# ledger_reconciliation's kinds (the ``tag`` of its rows): only the deposit row is missing (the deployed
# platform opens channels without one: systemic), the deposit row is missing and the ledger disagrees
# otherwise too, or the ledger disagrees although the deposit row is there.
NO_DEPOSIT, NO_DEPOSIT_AND_MORE, MISMATCH = "no_deposit", "no_deposit_and_more", "mismatch"

# ---- SQL -----------------------------------------------------------------------------------------
# {ledger_from} / {channels_from} / {scope}: the whole tables (full sweep), or only the touched channels
# (incremental), joined as a relation (unnest) so that the planner sizes them and probes the indexes.
_ALL_LEDGER = "{channel_transactions} t"
_TOUCHED_LEDGER = "unnest(%(ids)s::uuid[]) AS k(id) JOIN {channel_transactions} t ON t.channel_id = k.id"
# Incremental double_release: the touched channels' rows through the channel_id index, one probe per channel
# (joined plainly, the planner reads every release/refund row of the ledger through the type index instead).
_PROBED_LEDGER = ("unnest(%(ids)s::uuid[]) AS k(id) CROSS JOIN LATERAL "
                  "(SELECT * FROM {channel_transactions} t0 WHERE t0.channel_id = k.id OFFSET 0) AS t")
_ALL_CHANNELS = "{payment_channels} c"
_TOUCHED_CHANNELS = "unnest(%(ids)s::uuid[]) AS k(id) JOIN {payment_channels} c ON c.id = k.id"
# One part of a split full sweep: the channels with lo <= id < hi (NULL: no bound), and their ledger rows.
_IN_PART = "(%(lo)s::uuid IS NULL OR {col} >= %(lo)s::uuid) AND (%(hi)s::uuid IS NULL OR {col} < %(hi)s::uuid)"
_PART_LEDGER = f"(SELECT * FROM {{channel_transactions}} t0 WHERE {_IN_PART.format(col='t0.channel_id')}) AS t"
_PART_CHANNELS = f"(SELECT * FROM {{payment_channels}} c0 WHERE {_IN_PART.format(col='c0.id')}) AS c"

# The ledger rebuilds a channel (docs/invariants.md): total_deposit = deposits; escrowed_amount = escrows -
# releases - refunds; total_settled = releases + settlements; pending_refund = closes; current_balance =
# deposits - escrows + refunds - closes - settlements. A settlement pays the payee out of the spendable
# balance, never through escrow. When the channel has no deposit row, the comparison is also made as if
# total_deposit had been deposited (``v_*``): what still disagrees then is a genuine mismatch.
_CHANNELS_SQL = """
WITH l AS (
    SELECT t.channel_id,
           coalesce(sum(t.amount) FILTER (WHERE t.transaction_type = 'deposit'), 0) AS dep,
           count(*) FILTER (WHERE t.transaction_type = 'deposit') AS n_dep,
           coalesce(sum(t.amount) FILTER (WHERE t.transaction_type = 'escrow'), 0) AS esc,
           coalesce(sum(t.amount) FILTER (WHERE t.transaction_type = 'release'), 0) AS rel,
           coalesce(sum(t.amount) FILTER (WHERE t.transaction_type IN ('settlement', 'settle')), 0) AS stl,
           count(*) FILTER (WHERE t.transaction_type IN ('settlement', 'settle')) AS n_stl,
           coalesce(sum(t.amount) FILTER (WHERE t.transaction_type = 'refund'), 0) AS ref,
           coalesce(sum(t.amount) FILTER (WHERE t.transaction_type = 'close'), 0) AS cls
    FROM {ledger_from}
    GROUP BY t.channel_id
), x AS (
    SELECT c.id, c.payer_did, c.state, c.task_id, coalesce(c.escrow_released, false) AS escrow_released,
           c.closed_at, c.updated_at,
           c.total_deposit AS td, c.current_balance AS cb, c.escrowed_amount AS e,
           c.total_settled AS s, c.pending_refund AS pr,
           coalesce(l.n_dep, 0) AS n_dep, coalesce(l.n_stl, 0) AS n_stl, coalesce(l.stl, 0) AS l_stl,
           coalesce(l.dep, 0) AS l_td,
           coalesce(l.dep, 0) - coalesce(l.esc, 0) + coalesce(l.ref, 0) - coalesce(l.cls, 0)
             - coalesce(l.stl, 0) AS l_cb,
           coalesce(l.esc, 0) - coalesce(l.rel, 0) - coalesce(l.ref, 0) AS l_e,
           coalesce(l.rel, 0) + coalesce(l.stl, 0) AS l_s,
           coalesce(l.cls, 0) AS l_pr
    FROM {channels_from}
    LEFT JOIN l ON l.channel_id = c.id
), y AS (
    SELECT x.*,
           x.n_dep = 0 AND x.td <> 0 AS no_dep,
           -- As if the missing deposit row had been written.
           CASE WHEN x.n_dep = 0 THEN x.td ELSE x.l_td END AS v_td,
           CASE WHEN x.n_dep = 0 THEN x.l_cb + x.td ELSE x.l_cb END AS v_cb
    FROM x
), f AS (
    SELECT y.*,
           y.cb + y.e + y.s + y.pr AS held,
           least(y.td, y.cb, y.e, y.s, y.pr) AS lowest,
           y.td <> y.cb + y.e + y.s + y.pr AS f_cons,
           least(y.td, y.cb, y.e, y.s, y.pr) < 0 AS f_neg,
           (y.l_td <> y.td OR y.l_cb <> y.cb OR y.l_e <> y.e OR y.l_s <> y.s OR y.l_pr <> y.pr) AS f_ledger,
           (y.v_td <> y.td OR y.v_cb <> y.cb OR y.l_e <> y.e OR y.l_s <> y.s OR y.l_pr <> y.pr) AS genuine,
           (y.state = 'closed' AND (y.cb <> 0 OR y.e <> 0 OR y.closed_at IS NULL)) AS f_closed,
           ((y.state = 'escrowed') <> (y.e > 0)
            OR (y.e > 0 AND (y.task_id IS NULL OR y.escrow_released))) AS f_escrow
    FROM y
)
SELECT v.invariant, NULL AS entity_type, f.id AS entity_id, v.expected, v.actual, v.difference,
       v.detail, v.tag, CASE WHEN v.tag = 'no_deposit' THEN 1 ELSE 0 END AS priority
FROM f
CROSS JOIN LATERAL (VALUES
    ('channel_conservation', f.f_cons, f.td::text, f.held::text, f.held - f.td,
     format('total_deposit %%s but current %%s + escrowed %%s + settled %%s + refund %%s = %%s: %%s %%s %%s; '
            'audit the channel''s last write%%s',
            f.td, f.cb, f.e, f.s, f.pr, f.held, abs(f.held - f.td),
            CASE WHEN f.held > f.td THEN 'appeared' ELSE 'vanished' END,
            CASE WHEN f.held > f.td THEN 'from nowhere' ELSE 'without a ledger row' END,
            coalesce(' (updated_at ' || f.updated_at || ')', '')),
     NULL),
    ('channel_non_negative', f.f_neg, '0', f.lowest::text, f.lowest,
     concat_ws(', ',
               CASE WHEN f.td < 0 THEN 'total_deposit ' || f.td END,
               CASE WHEN f.cb < 0 THEN 'current_balance ' || f.cb END,
               CASE WHEN f.e < 0 THEN 'escrowed_amount ' || f.e END,
               CASE WHEN f.s < 0 THEN 'total_settled ' || f.s END,
               CASE WHEN f.pr < 0 THEN 'pending_refund ' || f.pr END)
       || ' below zero: '
       || CASE WHEN f.cb < 0 AND f.n_stl > 0
               THEN format('settled %%s out of a deposit of %%s (the settle endpoint does not check the amount '
                           'against the deposit); recover the excess from the payee', f.s, f.td)
               ELSE 'a debit skipped its balance check (overdrawn escrow or settle beyond the deposit); '
                    || 'freeze the channel and trace its last escrow/settle' END,
     NULL),
    ('ledger_reconciliation', f.f_ledger,
     -- The first column that disagrees (genuinely, when the deposit row is only missing).
     (CASE WHEN NOT f.genuine THEN f.l_td
           WHEN f.v_td <> f.td THEN f.v_td WHEN f.v_cb <> f.cb THEN f.v_cb WHEN f.l_e <> f.e THEN f.l_e
           WHEN f.l_s <> f.s THEN f.l_s ELSE f.l_pr END)::text,
     (CASE WHEN NOT f.genuine THEN f.td
           WHEN f.v_td <> f.td THEN f.td WHEN f.v_cb <> f.cb THEN f.cb WHEN f.l_e <> f.e THEN f.e
           WHEN f.l_s <> f.s THEN f.s ELSE f.pr END)::text,
     CASE WHEN NOT f.genuine THEN f.td - f.l_td
          WHEN f.v_td <> f.td THEN f.td - f.v_td WHEN f.v_cb <> f.cb THEN f.cb - f.v_cb
          WHEN f.l_e <> f.e THEN f.e - f.l_e WHEN f.l_s <> f.s THEN f.s - f.l_s ELSE f.pr - f.l_pr END,
     CASE WHEN NOT f.genuine
          THEN format('no deposit row in the ledger: total_deposit %%s was never written as a deposit (the '
                      'deployed platform opens channels without one); the rest of the ledger agrees', f.td)
          ELSE CASE WHEN f.no_dep THEN 'no deposit row in the ledger, and beyond it: ' ELSE '' END
               || 'table vs ledger: '
               || concat_ws('; ',
                   CASE WHEN f.v_td <> f.td THEN format('total_deposit %%s vs %%s', f.td, f.v_td) END,
                   CASE WHEN f.v_cb <> f.cb THEN format('current_balance %%s vs %%s', f.cb, f.v_cb) END,
                   CASE WHEN f.l_e <> f.e THEN format('escrowed_amount %%s vs %%s', f.e, f.l_e) END,
                   CASE WHEN f.l_s <> f.s THEN format('total_settled %%s vs %%s', f.s, f.l_s) END,
                   CASE WHEN f.l_pr <> f.pr THEN format('pending_refund %%s vs %%s', f.pr, f.l_pr) END)
               || CASE WHEN f.n_stl > 1 AND f.l_s <> f.s
                       THEN format(': %%s settlement rows move %%s but total_settled holds %%s (a racing double '
                                   'settle overwrote the first); recover the excess paid to the payee',
                                   f.n_stl, f.l_stl, f.s)
                       ELSE ': a movement was written to one side only; replay channel_transactions for this '
                            || 'channel' END
     END,
     CASE WHEN NOT f.genuine THEN 'no_deposit' WHEN f.no_dep THEN 'no_deposit_and_more' ELSE 'mismatch' END),
    ('closed_channel_drained', f.f_closed,
     CASE WHEN f.cb <> 0 OR f.e <> 0 THEN '0' ELSE 'closed_at set' END,
     CASE WHEN f.cb <> 0 OR f.e <> 0 THEN (f.cb + f.e)::text ELSE 'closed_at not set' END,
     CASE WHEN f.cb <> 0 OR f.e <> 0 THEN f.cb + f.e END,
     CASE WHEN f.cb <> 0 OR f.e <> 0
          THEN format('closed channel still holds current_balance %%s and escrowed %%s%%s: %%s', f.cb, f.e,
                      CASE WHEN f.closed_at IS NULL THEN ', and closed_at is not set' ELSE '' END,
                      CASE WHEN f.n_stl > 0 AND f.e = 0
                           THEN 'the settle endpoint closed it without returning the rest to payer '
                                || f.payer_did
                           ELSE 'return it to payer ' || f.payer_did
                                || ' (close moves current_balance to pending_refund)' END)
          ELSE 'closed channel has no closed_at: the close path did not stamp it' END,
     CASE WHEN f.cb <> 0 AND f.e = 0 THEN 'true' ELSE 'false' END),
    ('escrow_state', f.f_escrow,
     CASE WHEN f.state = 'escrowed' AND f.e <= 0 THEN 'escrowed_amount > 0'
          WHEN f.e > 0 AND f.state IS DISTINCT FROM 'escrowed' THEN 'state escrowed'
          WHEN f.e > 0 AND f.task_id IS NULL THEN 'task_id set'
          ELSE 'escrow_released false' END,
     CASE WHEN f.state = 'escrowed' AND f.e <= 0 THEN f.e::text
          WHEN f.e > 0 AND f.state IS DISTINCT FROM 'escrowed' THEN 'state ' || f.state
          WHEN f.e > 0 AND f.task_id IS NULL THEN 'task_id not set'
          ELSE 'escrow_released true' END,
     f.e,
     concat_ws('; ',
               CASE WHEN f.state = 'escrowed' AND f.e <= 0 THEN 'state escrowed with nothing locked' END,
               CASE WHEN f.e > 0 AND f.state IS DISTINCT FROM 'escrowed'
                    THEN format('%%s locked but state %%s', f.e, f.state) END,
               CASE WHEN f.e > 0 AND f.task_id IS NULL THEN format('%%s locked for no task', f.e) END,
               CASE WHEN f.e > 0 AND f.escrow_released THEN format('%%s locked but escrow_released is true', f.e) END)
       || ': the escrow and the channel state disagree; resolve the task''s escrow before new ones',
     NULL)
) AS v(invariant, bad, expected, actual, difference, detail, tag)
WHERE (f.f_cons OR f.f_neg OR f.f_ledger OR f.f_closed OR f.f_escrow) AND v.bad
"""

_MONEY = ("total_deposit", "current_balance", "escrowed_amount", "total_settled", "pending_refund")

_CHANNEL_INVARIANTS = ("channel_conservation", "channel_non_negative", "ledger_reconciliation",
                       "closed_channel_drained", "escrow_state")

# More than one release/refund row for one (channel, task_id) escrow, or more than one settlement/settle row
# on one channel (a settle closes the channel); counts only (cheap over the whole ledger). The tag marks
# the channels settled more than once.
_DOUBLE_RELEASE_SQL = """
SELECT 'double_release' AS invariant, NULL AS entity_type, d.channel_id AS entity_id, '1' AS expected,
       max(d.n)::text AS actual, (max(d.n) - 1)::numeric AS difference,
       '' AS detail, bool_or(d.settle)::text AS tag
FROM (
    SELECT t.channel_id, false AS settle, count(*) AS n
    FROM {ledger_from}
    WHERE t.transaction_type IN ('release', 'refund')
    GROUP BY t.channel_id, t.task_id
    HAVING count(*) > 1
    UNION ALL
    SELECT t.channel_id, true, count(*)
    FROM {ledger_from}
    WHERE t.transaction_type IN ('settlement', 'settle')
    GROUP BY t.channel_id
    HAVING count(*) > 1
) AS d
GROUP BY d.channel_id
"""

# The money behind each sampled double release or settle (index lookups on a handful of channels).
_DOUBLE_RELEASE_DETAIL_SQL = """
SELECT g.channel_id::text AS channel_id, g.settle, g.task_id, g.n, g.paid, g.once, g.amounts, g.types,
       c.total_settled
FROM (
    SELECT t.channel_id, t.transaction_type IN ('settlement', 'settle') AS settle,
           CASE WHEN t.transaction_type IN ('settlement', 'settle') THEN NULL ELSE t.task_id END AS task_id,
           count(*) AS n, sum(t.amount) AS paid, max(t.amount) AS once,
           string_agg(t.amount::text, ' + ' ORDER BY t.created_at, t.id) AS amounts,
           string_agg(t.transaction_type, ', ' ORDER BY t.created_at, t.id) AS types
    FROM unnest(%(ids)s::uuid[]) AS k(id)
    JOIN {channel_transactions} t ON t.channel_id = k.id
    WHERE t.transaction_type IN ('release', 'refund', 'settlement', 'settle')
    GROUP BY 1, 2, 3
    HAVING count(*) > 1
) AS g
JOIN {payment_channels} c ON c.id = g.channel_id
ORDER BY g.channel_id, g.n DESC, g.settle DESC, g.task_id NULLS FIRST
"""

_ACCOUNTS_SQL = """
WITH ch AS (
    SELECT v.did, sum(v.paid) AS paid, sum(v.refunded) AS refunded, sum(v.earned) AS earned
    FROM ({channel_rows}) AS v(did, paid, refunded, earned)
    GROUP BY v.did
), a AS (
    SELECT coalesce(acc.did, ch.did) AS did, acc.did IS NULL AS missing,
           coalesce(acc.balance, 0) AS bal, coalesce(acc.total_deposited, 0) AS dep,
           coalesce(acc.total_withdrawn, 0) AS wd,
           coalesce(ch.paid, 0) AS paid, coalesce(ch.refunded, 0) AS refunded, coalesce(ch.earned, 0) AS earned
    FROM (SELECT acc0.did, acc0.balance, acc0.total_deposited, acc0.total_withdrawn FROM {accounts_from}) AS acc
    FULL JOIN ch ON ch.did = acc.did
), f AS (
    SELECT a.*, a.dep - a.wd - a.paid + a.refunded + a.earned AS expected_bal,
           least(a.bal, a.dep, a.wd) AS lowest
    FROM a
)
SELECT v.invariant, NULL AS entity_type, coalesce(f.did, '(NULL)') AS entity_id, v.expected, v.actual,
       v.difference, v.detail, v.tag
FROM f
CROSS JOIN LATERAL (VALUES
    ('account_non_negative', NOT f.missing AND f.lowest < 0, '0', f.lowest::text, f.lowest,
     concat_ws(', ',
               CASE WHEN f.bal < 0 THEN 'balance ' || f.bal END,
               CASE WHEN f.dep < 0 THEN 'total_deposited ' || f.dep END,
               CASE WHEN f.wd < 0 THEN 'total_withdrawn ' || f.wd END)
       || ' below zero: a debit or a refund was booked with the wrong sign; audit the account''s recent writes',
     false),
    ('account_reconciliation', f.bal <> f.expected_bal, f.expected_bal::text, f.bal::text, f.bal - f.expected_bal,
     CASE WHEN f.missing THEN
          format('no account row for this DID, yet its channels move %%s (paid into channels %%s, refunded %%s, '
                 'earned %%s): create the account or fix the channels'' payer_did/payee_did',
                 f.earned + f.refunded - f.paid, f.paid, f.refunded, f.earned)
     ELSE format('balance %%s but deposited %%s - withdrawn %%s - paid into channels %%s + refunded %%s + earned %%s = %%s: '
                 '%%s %%s; audit the account''s writes since its last deposit',
                 f.bal, f.dep, f.wd, f.paid, f.refunded, f.earned, f.expected_bal, abs(f.bal - f.expected_bal),
                 CASE WHEN f.bal > f.expected_bal THEN 'credited from nowhere' ELSE 'missing' END)
     END,
     f.missing)
) AS v(invariant, bad, expected, actual, difference, detail, tag)
WHERE (f.bal <> f.expected_bal OR (NOT f.missing AND f.lowest < 0)) AND v.bad
"""

_ACCOUNT_INVARIANTS = ("account_non_negative", "account_reconciliation")

_ALL_CHANNEL_ROWS = """
    SELECT r.did, r.paid, r.refunded, r.earned
    FROM {payment_channels} c
    CROSS JOIN LATERAL (VALUES (c.payer_did, c.total_deposit, c.pending_refund, NULL::numeric),
                               (c.payee_did, NULL::numeric, NULL::numeric, c.total_settled)) AS r(did, paid, refunded, earned)
"""

# Incremental: each side through its own index (payer_did, payee_did). The DIDs are joined as a
# relation (unnest) rather than compared with = ANY: the planner then sizes them and probes the indexes.
_DID_CHANNEL_ROWS = """
    SELECT c.payer_did, c.total_deposit, c.pending_refund, NULL::numeric
    FROM unnest(%(dids)s::text[]) AS k(did) JOIN {payment_channels} c ON c.payer_did = k.did
    UNION ALL
    SELECT c.payee_did, NULL::numeric, NULL::numeric, c.total_settled
    FROM unnest(%(dids)s::text[]) AS k(did) JOIN {payment_channels} c ON c.payee_did = k.did
"""

_GLOBAL_SQL = """
SELECT a.deposited - a.withdrawn AS expected, a.balance + c.held AS actual,
       a.deposited, a.withdrawn, a.balance, c.held, c.settled
FROM (SELECT coalesce(sum(total_deposited), 0) AS deposited, coalesce(sum(total_withdrawn), 0) AS withdrawn,
             coalesce(sum(balance), 0) AS balance FROM {accounts}) AS a,
     (SELECT coalesce(sum(current_balance + escrowed_amount), 0) AS held,
             coalesce(sum(total_settled), 0) AS settled FROM {payment_channels}) AS c
"""

# ---- remembered sums (exact deltas) --------------------------------------------------------------
# A full sweep re-anchors them (same snapshot as its judgements): every channel's contribution, and per DID
# its account row and its channels' sums (the ``a`` relation of _ACCOUNTS_SQL). trim_scale: "100", not
# "100.00000000" (the same number, a third less Redis).
_ANCHOR_CHANNELS_SQL = """
SELECT c.id::text,
       json_build_array(c.payer_did, c.payee_did, trim_scale(coalesce(c.total_deposit, 0))::text,
                        trim_scale(coalesce(c.pending_refund, 0))::text, trim_scale(coalesce(c.total_settled, 0))::text,
                        trim_scale(coalesce(c.current_balance + c.escrowed_amount, 0))::text)::text
FROM {payment_channels} c
"""

_ANCHOR_DIDS_SQL = f"""
WITH ch AS (
    SELECT v.did, sum(v.paid) AS paid, sum(v.refunded) AS refunded, sum(v.earned) AS earned
    FROM ({_ALL_CHANNEL_ROWS}) AS v(did, paid, refunded, earned)
    GROUP BY v.did
)
SELECT coalesce(acc.did, ch.did) AS did,
       json_build_array(acc.did IS NOT NULL, trim_scale(coalesce(acc.balance, 0))::text,
                        trim_scale(coalesce(acc.total_deposited, 0))::text, trim_scale(coalesce(acc.total_withdrawn, 0))::text,
                        trim_scale(coalesce(ch.paid, 0))::text, trim_scale(coalesce(ch.refunded, 0))::text,
                        trim_scale(coalesce(ch.earned, 0))::text)::text
FROM {{accounts}} acc
FULL JOIN ch ON ch.did = acc.did
"""

# An incremental run: the touched channels' contributions and the judged DIDs' accounts, by index.
_TOUCHED_SUMS_SQL = """
SELECT c.id::text AS id, c.payer_did, c.payee_did, coalesce(c.total_deposit, 0) AS td,
       coalesce(c.pending_refund, 0) AS pr, coalesce(c.total_settled, 0) AS ts,
       coalesce(c.current_balance + c.escrowed_amount, 0) AS held
FROM unnest(%(ids)s::uuid[]) AS k(id) JOIN {payment_channels} c ON c.id = k.id
"""

# The judged DIDs' accounts, one probe of the did index each (joined plainly to a few thousand DIDs, the
# planner hashes the whole accounts table).
_SOME_ACCOUNTS = ("unnest(%(dids)s::text[]) AS k(did) CROSS JOIN LATERAL "
                  "(SELECT * FROM {accounts} a0 WHERE a0.did = k.did OFFSET 0) AS acc0")

_DID_ACCOUNTS_SQL = f"""
SELECT acc0.did, coalesce(acc0.balance, 0) AS bal, coalesce(acc0.total_deposited, 0) AS dep,
       coalesce(acc0.total_withdrawn, 0) AS wd
FROM {_SOME_ACCOUNTS}
"""

# The judged DIDs' channel sums, computed from the remembered sums plus the touched channels' deltas.
_GIVEN_CHANNEL_ROWS = """
    SELECT * FROM unnest(%(dids)s::text[], %(paid)s::text[]::numeric[], %(refunded)s::text[]::numeric[],
                         %(earned)s::text[]::numeric[])
"""

_SUMS_COLUMNS = frozenset(
    [f"accounts.{c}" for c in ("did", "balance", "total_deposited", "total_withdrawn")]
    + [f"payment_channels.{c}" for c in ("id", "payer_did", "payee_did", *_MONEY)])


@dataclass(frozen=True)
class _Delta:
    """An incremental run's exact sums: per judged DID its channels' sums, and the global totals."""

    dids: list[str]
    paid: list[Decimal]
    refunded: list[Decimal]
    earned: list[Decimal]
    totals: dict[str, Decimal]


class _Unusable(Exception):
    """The remembered sums cannot be trusted for this run (the exact SQL judges instead)."""


# The columns that tell an incremental run what changed.
_WATERMARK_COLUMNS = ("channel_transactions.created_at", "payment_channels.updated_at", "accounts.updated_at")

_TOUCHED_CHANNELS_SQL = """
SELECT id::text FROM (
    SELECT channel_id AS id FROM {channel_transactions} WHERE created_at >= to_timestamp(%(since)s)
    UNION
    SELECT id FROM {payment_channels} WHERE updated_at >= to_timestamp(%(since)s)
) AS t
LIMIT %(cap)s
"""

_TOUCHED_DIDS_SQL = """
SELECT did FROM {accounts} WHERE updated_at >= to_timestamp(%(since)s)
UNION
SELECT d.did
FROM unnest(%(ids)s::uuid[]) AS k(id)
JOIN {payment_channels} c ON c.id = k.id
CROSS JOIN LATERAL (VALUES (c.payer_did), (c.payee_did)) AS d(did)
"""

class PaymentsSettings(CheckerSettings):
    watermark_safety_seconds: float = Field(
        60.0, ge=0, description="An incremental run re-checks what changed since the previous run's snapshot time "
                                "minus this many seconds, so writes committed just after a snapshot (stamped a "
                                "little before it) are not missed. Longer than the platform's longest transaction.")
    incremental_max_channels: int = Field(
        200_000, ge=1, description="When more channels than this were touched since the watermark, the run is a "
                                   "full sweep instead (cheaper than probing that many channels one by one).")
    full_sweep_sequential: bool = Field(
        True, description="In full sweeps, disable index and bitmap scans for this transaction so whole-table "
                          "aggregates read the ledger sequentially (index order reads the heap at random).")
    full_sweep_parallel_workers: int = Field(
        0, ge=0, le=64, description="max_parallel_workers_per_gather for full sweeps (0: one backend; parallel "
                                    "numeric sums cost more to combine than they save).")
    full_sweep_connections: int | None = Field(
        None, ge=1, le=16, description="Connections a full sweep runs on, all sharing the run's snapshot: the "
                                       "channel and double-release passes split by ranges of channel id, the other "
                                       "passes beside them (unset: min(2, database.max_connections - 1); 1: one "
                                       "connection, one pass after another). Each is a backend of its own, with "
                                       "its own work_mem.")
    work_mem_mb: int | None = Field(
        None, ge=1, description="work_mem for this checker's transaction in MB (unset: the server's default).")
    incremental_sums: bool = Field(
        True, description="Remember in Redis each channel's and each DID's contribution to the global and "
                          "per-DID sums (re-anchored by every full sweep), so incremental runs judge "
                          "account_reconciliation and global_conservation from exact deltas of the touched "
                          "rows instead of re-summing the world (about 200 bytes of Redis per channel).")
    sequence_batch: int = Field(
        10_000, ge=100, description="Channels compared with the Redis sequence memory per round trip.")
    summary_examples: int = Field(
        3, ge=0, le=20, description="Example ids quoted in a systemic-pattern summary line.")


class PaymentsChecker(Checker):
    name = "payments"
    description = ("Money is conserved per channel, per account and globally; the ledger rebuilds every channel; "
                   "escrows are released once; sequence numbers never go back.")
    invariants = (
        Invariant("channel_conservation",
                  "total_deposit = current_balance + escrowed_amount + total_settled + pending_refund.",
                  entity_type="channel", severity="critical",
                  reads=reads("payment_channels", "id", *_MONEY)),
        Invariant("channel_non_negative", "Every money column of the channel is >= 0.",
                  entity_type="channel", severity="critical",
                  reads=reads("payment_channels", "id", *_MONEY)),
        Invariant("account_non_negative", "balance, total_deposited and total_withdrawn are >= 0.",
                  entity_type="account", severity="critical",
                  reads=reads("accounts", "did", "balance", "total_deposited", "total_withdrawn")),
        Invariant("ledger_reconciliation",
                  "The ledger rebuilds the channel: deposits give total_deposit; escrows - releases - refunds "
                  "give escrowed_amount; releases + settlements give total_settled; closes give pending_refund; "
                  "deposits - escrows + refunds - closes - settlements give current_balance (a settlement pays "
                  "the payee out of the spendable balance, never through escrow).",
                  entity_type="channel", severity="critical",
                  reads=reads("payment_channels", "id", *_MONEY)
                  + reads("channel_transactions", "channel_id", "transaction_type", "amount")),
        Invariant("closed_channel_drained",
                  "A closed channel holds nothing (current_balance = escrowed_amount = 0) and has closed_at.",
                  entity_type="channel", severity="critical",
                  reads=reads("payment_channels", "id", "payer_did", "state", "current_balance", "escrowed_amount",
                              "closed_at")),
        Invariant("escrow_state",
                  "state = escrowed exactly when escrowed_amount > 0; a locked escrow names its task and is not "
                  "marked released.",
                  entity_type="channel", severity="critical",
                  reads=reads("payment_channels", "id", "state", "escrowed_amount", "task_id", "escrow_released")),
        Invariant("double_release",
                  "At most one release/refund ledger row per (channel, task_id) escrow, and at most one "
                  "settlement/settle row per channel (a settle closes the channel).",
                  entity_type="channel", severity="critical",
                  reads=reads("channel_transactions", "channel_id", "transaction_type", "amount", "task_id")),
        Invariant("sequence_regression",
                  "A channel's sequence_number never goes below the highest value seen before.",
                  entity_type="channel", severity="critical", needs_memory=True,
                  reads=reads("payment_channels", "id", "sequence_number")),
        Invariant("account_reconciliation",
                  "balance = total_deposited - total_withdrawn - deposits into channels it pays + their refunds "
                  "+ settlements of channels it is paid by.",
                  entity_type="account", severity="critical",
                  reads=reads("accounts", "did", "balance", "total_deposited", "total_withdrawn")
                  + reads("payment_channels", "payer_did", "payee_did", "total_deposit", "pending_refund",
                          "total_settled")),
        Invariant("global_conservation",
                  "Money in = money out + money held: sum(total_deposited) - sum(total_withdrawn) = "
                  "sum(balance) + sum(current_balance + escrowed_amount).",
                  entity_type="system", severity="critical",
                  reads=reads("accounts", "balance", "total_deposited", "total_withdrawn")
                  + reads("payment_channels", "current_balance", "escrowed_amount")),
    )
    columns = {t: COLUMNS[t] for t in ("accounts", "payment_channels", "channel_transactions")}
    Settings = PaymentsSettings
    # 15 s bounds commit-to-page by ~43 s with the shipped scrape/evaluation intervals;
    # an incremental run costs ~0.25 s (new channels) to ~1.1 s (old ones) even on 1M channels (docs/performance.md).
    default_interval_seconds = 15.0
    supports_incremental = True
    default_full_interval_seconds = 3600.0
    # The platform indexes neither: without them each incremental run scans both tables to find what
    # changed (docs/performance.md has the figures at 1M channels).
    recommended_indexes = (
        IndexAdvice("payment_channels", "updated_at",
                    "incremental payments runs find the channels changed since the watermark without scanning "
                    "every channel"),
        IndexAdvice("accounts", "updated_at",
                    "incremental payments runs find the accounts changed since the watermark without scanning "
                    "every account"),
    )

    settings: PaymentsSettings

    def __init__(self, settings: CheckerSettings | None = None) -> None:
        super().__init__(settings)
        self._failures: Counter | None = None

    # ---- metrics --------------------------------------------------------------------------------
    def register_metrics(self, registry: Any) -> None:
        self._failures = Counter(
            "zerostate_payment_balance_check_failures",
            "Payment check runs that found at least one payment invariant violation (deployment guide's name).",
            registry=registry)

    def observe(self, result: Any) -> None:
        if self._failures is not None and result.status == "fail" and result.total_violations > 0:
            self._failures.inc()

    # ---- the run ----------------------------------------------------------------------------------
    def run(self, ctx: CheckContext) -> None:
        s = self.settings
        if s.work_mem_mb:
            ctx.scalar("SELECT set_config('work_mem', %s, true)", (f"{s.work_mem_mb}MB",))
        state = ctx.state()
        previous = state.resume()
        sums = self._remembered_sums(ctx, previous)
        if previous is not None and ctx.mode == "full":
            previous = None  # the remembered sums are gone: a full sweep re-anchors them
        ids, dids = self._touched(ctx, previous, None if sums is None else float(sums[1]["as_of"]))
        if ids is None and self._connections(ctx) > 1:
            # A full sweep on several connections sharing this snapshot; the sums are anchored beside it.
            state.save({"watermark": ctx.snapshot_time, "sums": self._sweep_split(ctx)})
            return
        self._judge_channels(ctx, ids)
        self._judge_double_release(ctx, ids)
        delta = self._delta(ctx, sums, ids, dids) if sums is not None and ids is not None else None
        self._judge_accounts(ctx, dids if delta is None else delta.dids, delta)
        totals = self._judge_global(ctx, delta)
        # Whether the sums can be anchored here: when a full sweep could not (Redis failing, a channel
        # without payer), incremental runs use the exact SQL until the next scheduled full sweep rather than
        # turning every run into a full sweep.
        anchored = self._anchor_sums(ctx, totals) if ids is None else bool(previous and previous.get("sums", True))
        state.save({"watermark": ctx.snapshot_time, "sums": anchored})
        self._judge_sequences(ctx, ids)

    # ---- scope --------------------------------------------------------------------------------------
    def _touched(self, ctx: CheckContext, previous: dict[str, Any] | None, sums_as_of: float | None = None
                 ) -> tuple[list[str] | None, list[str] | None]:
        """Channels and DIDs to judge: those changed since the previous run and those that violated at it
        (so the result stays complete: a violation leaves only when re-judged clean); (None, None): a full
        sweep. ``sums_as_of``: the snapshot time of the remembered sums, when older than the watermark (their
        update failed after a published run): what changed since then is touched too, so that the deltas
        cover every change since the sums."""
        if previous is None:
            return None, None
        stamps = sorted(ctx.missing & set(_WATERMARK_COLUMNS))
        if stamps:
            ctx.fall_back_to_full(f"{', '.join(stamps)} missing: what changed cannot be told apart")
            return None, None
        known_channels = ctx.violators(*_CHANNEL_INVARIANTS, "double_release", "sequence_regression")
        known_dids = ctx.violators(*_ACCOUNT_INVARIANTS)
        if known_channels is None or known_dids is None:
            ctx.fall_back_to_full("the previous run's violators are not all known (checks.track_limit)")
            return None, None
        since = min(previous["watermark"], sums_as_of if sums_as_of is not None else previous["watermark"])
        since -= self.settings.watermark_safety_seconds
        cap = self.settings.incremental_max_channels
        ids = [r["id"] for r in ctx.query(_TOUCHED_CHANNELS_SQL, {"since": since, "cap": cap + 1})]
        ids = sorted(set(ids) | known_channels)
        if len(ids) > cap:
            ctx.fall_back_to_full(f"more than {cap} channels touched or violating (incremental_max_channels)")
            return None, None
        dids = [r["did"] for r in ctx.query(_TOUCHED_DIDS_SQL, {"since": since, "ids": ids})]
        if None in dids:  # only where the schema drifted from the platform's NOT NULL
            ctx.fall_back_to_full("a touched channel has no payer_did or payee_did: money held for nobody is "
                                  "judged by a full sweep")
            return None, None
        dids = sorted(set(dids) | known_dids)
        if ctx.log is not None:
            ctx.log.debug("payments_incremental_scope", since=since, channels=len(ids), dids=len(dids),
                          carried_channels=len(known_channels), carried_dids=len(known_dids))
        return ids, dids

    @contextmanager
    def _sweep_plan(self, ctx: CheckContext, full: bool, sort: bool = False) -> Iterator[None]:
        """Planner settings for one query, local to this transaction, restored afterwards.

        Full sweeps: sequential, single-process whole-table aggregates (settings). Incremental runs: no
        JIT, whose compilation (50-100 ms a query) costs more than the few thousand rows it would speed up.
        ``sort``: group by sorting rather than hashing (per-channel groups of the whole ledger: a hash table
        of a million numeric states spills in many batches; a sort spills once and streams the groups).
        """
        s = self.settings
        if not full:
            wanted = {"jit": "off"}
        else:
            wanted = {"max_parallel_workers_per_gather": str(s.full_sweep_parallel_workers)}
            if s.full_sweep_sequential:
                wanted.update(enable_indexscan="off", enable_bitmapscan="off")
                if sort:
                    wanted.update(enable_hashagg="off", enable_hashjoin="off")
        before = {k: ctx.scalar("SELECT current_setting(%s)", (k,)) for k in wanted}
        for k, v in wanted.items():
            ctx.scalar("SELECT set_config(%s, %s, true)", (k, v))
        yield  # on an exception the transaction is aborted and rolled back: nothing to restore
        for k, v in before.items():
            ctx.scalar("SELECT set_config(%s, %s, true)", (k, v))

    # ---- judging ------------------------------------------------------------------------------------
    def _examples(self, sample: list[Violation], ids: list[str] | None = None) -> str:
        n = self.settings.summary_examples
        chosen = (ids if ids is not None else [v.entity_id for v in sample])[:n]
        return f" (e.g. {', '.join(chosen)})" if chosen else ""

    # ---- a full sweep over several connections ------------------------------------------------------
    def _connections(self, ctx: CheckContext) -> int:
        return self.settings.full_sweep_connections or ctx.max_connections

    def _parts(self, ctx: CheckContext, n: int) -> list[dict[str, Any]]:
        """The channel-id ranges (lo <= id < hi) a split pass covers: n of about the same size (NULL: open)."""
        bounds = [None, *(str(p) for p in ctx.split_points("payment_channels", "id", n)), None]
        return [{"ids": None, "lo": lo, "hi": hi} for lo, hi in itertools.pairwise(bounds)]

    def _sweep_split(self, ctx: CheckContext) -> bool:
        """The full sweep on several connections sharing the run's snapshot (``CheckContext.parallel``), longest
        task first; whether the remembered sums were anchored. The channel pass is split into one channel-id
        range per connection, the double-release pass into one per two connections (each part scans the whole
        ledger twice: on two connections it costs less whole, beside the channel parts); their rankings merge
        exactly. The sequence memory, the account pass, the global aggregate and the anchor's two fills run
        whole beside them (global_conservation stays one query: a one-snapshot proof; the anchor is published
        with its totals once every part is done)."""
        n = self._connections(ctx)
        memory = AnchoredMemory(ctx, SUMS_KEY, SUMS_PARTS) if self._sums_usable(ctx) else None
        anchor = memory.begin() if memory is not None else ""
        parts = self._parts(ctx, n)
        channel_sql = _CHANNELS_SQL.format(ledger_from=_PART_LEDGER, channels_from=_PART_CHANNELS)
        double_sql = _DOUBLE_RELEASE_SQL.format(ledger_from=_PART_LEDGER)
        prepare = self._split_plan(sort=True)

        def channels(c: CheckContext, part: dict[str, Any]) -> Any:
            with prepare(c):
                return c.rank(channel_sql, _CHANNEL_INVARIANTS, part, tags=True, priority=True)

        def double(c: CheckContext, part: dict[str, Any]) -> Any:
            with prepare(c):
                return c.rank(double_sql, ["double_release"], part, tags=True)

        tasks: list[tuple[str, Any]] = [("channels", p) for p in parts]
        tasks.append(("sequences", None))
        tasks += [("double", p) for p in (self._parts(ctx, n // 2) if n >= 4 else self._parts(ctx, 1))]
        tasks += [("accounts", None), ("global", None)]
        if memory is not None:
            tasks += [("sums", part) for part in SUMS_PARTS]
        run = {"channels": channels, "double": double,
               "sequences": lambda c, _: self._judge_sequences(c, None),
               "accounts": lambda c, _: self._judge_accounts(c, None),
               "global": lambda c, _: self._judge_global(c),
               "sums": lambda c, part: self._fill_sums(c, anchor, part)}
        results = ctx.parallel(tasks, lambda c, task: run[task[0]](c, task[1]), connections=n)

        def of(kind: str) -> list[Any]:  # the results of one kind of task, in task order
            return [r for (k, _), r in zip(tasks, results) if k == kind]

        def merged(kind: str, ids: Any) -> dict[str, Any]:
            return ctx.record_ranked(list(ids), merge_ranked(of(kind), ctx.sample_limit, ctx.track_limit))

        self._summarize_channels(ctx, merged("channels", _CHANNEL_INVARIANTS), None)
        self._summarize_double_release(ctx, merged("double", ["double_release"])["double_release"], None)
        if memory is None:
            return False
        failed = next((why for why in of("sums") if why is not None), None)
        return self._publish_sums(ctx, memory, anchor, of("global")[0], failed)

    def _split_plan(self, sort: bool) -> Any:
        """What each connection of a split full sweep sets first: work_mem and the full sweep's plan."""
        @contextmanager
        def prepare(part: CheckContext) -> Iterator[None]:
            if self.settings.work_mem_mb:
                part.scalar("SELECT set_config('work_mem', %s, true)", (f"{self.settings.work_mem_mb}MB",))
            with self._sweep_plan(part, True, sort=sort):
                yield
        return prepare

    # ---- judging, one connection ----------------------------------------------------------------------
    def _judge_channels(self, ctx: CheckContext, ids: list[str] | None) -> None:
        if ids is None:
            inner = _CHANNELS_SQL.format(ledger_from=_ALL_LEDGER, channels_from=_ALL_CHANNELS)
        else:
            inner = _CHANNELS_SQL.format(ledger_from=_TOUCHED_LEDGER, channels_from=_TOUCHED_CHANNELS)
        with self._sweep_plan(ctx, ids is None, sort=True):
            found = ctx.find_many(inner, _CHANNEL_INVARIANTS, {"ids": ids}, tags=True, priority=True)
        self._summarize_channels(ctx, found, ids)

    def _summarize_channels(self, ctx: CheckContext, found: dict[str, Any], ids: list[str] | None) -> None:
        scope = "channels" if ids is None else "channels touched since the watermark"

        ledger = found["ledger_reconciliation"]
        no_dep, more = ledger.tags.get(NO_DEPOSIT, 0), ledger.tags.get(NO_DEPOSIT_AND_MORE, 0)
        mismatch = ledger.tags.get(MISMATCH, 0)
        if ledger.count:
            checked = ctx.scalar("SELECT count(*) FROM {payment_channels}") if ids is None else len(ids)
            genuine = [v.entity_id for v in ledger.sample if not v.detail.startswith("no deposit row in the ledger:")]
            parts = []
            if no_dep + more:
                parts.append(f"{no_dep + more} of {checked} {scope} have no deposit row in the ledger (opened "
                             f"without one, as the deployed platform's open path does); {more} of them also "
                             f"disagree otherwise")
            if mismatch:
                parts.append(f"{mismatch} of {checked} {scope} have their deposit row and still disagree with "
                             f"the ledger")
            if more + mismatch:
                parts[-1] += f": genuine mismatches{self._examples(ledger.sample, genuine)}"
            ctx.summarize("ledger_reconciliation", "; ".join(parts))
        drained = found["closed_channel_drained"]
        if drained.tagged:
            closed = ctx.scalar(f"SELECT count(*) FROM {_ALL_CHANNELS if ids is None else _TOUCHED_CHANNELS} "
                                "WHERE c.state = 'closed'", {"ids": ids})
            ctx.summarize("closed_channel_drained",
                          f"{drained.tagged} of {closed} closed {scope} still hold a current_balance (closed "
                          f"without draining, as the deployed settle endpoint does){self._examples(drained.sample)}")

    def _judge_double_release(self, ctx: CheckContext, ids: list[str] | None) -> None:
        inner = _DOUBLE_RELEASE_SQL.format(ledger_from=_ALL_LEDGER if ids is None else _PROBED_LEDGER)
        with self._sweep_plan(ctx, ids is None, sort=True):
            found = ctx.find_many(inner, ["double_release"], {"ids": ids}, tags=True)["double_release"]
        self._summarize_double_release(ctx, found, ids)

    def _summarize_double_release(self, ctx: CheckContext, found: Any, ids: list[str] | None) -> None:
        if not found.count:
            return
        details: dict[str, str] = {}
        for d in ctx.query(_DOUBLE_RELEASE_DETAIL_SQL, {"ids": [v.entity_id for v in found.sample]}):
            if d["channel_id"] in details:
                continue  # the worst group of the channel is enough for the line
            excess = d["paid"] - d["once"]
            if d["settle"]:
                details[d["channel_id"]] = (
                    f"settled {d['n']} times (settlement rows {d['amounts']} = {d['paid']}) but a settle pays "
                    f"once and closes the channel; total_settled holds {d['total_settled']}: a racing double "
                    f"settle (the settle endpoint has no guard); recover up to {excess} from the payee and make "
                    f"settle idempotent")
            else:
                task = f"task {d['task_id']}" if d["task_id"] is not None else "an escrow with no task_id"
                details[d["channel_id"]] = (
                    f"{task} has {d['n']} release/refund rows ({d['types']}) moving {d['paid']} where one "
                    f"escrow pays {d['once']} once: recover {excess} and make release idempotent")
        sample = [replace(v, detail=details.get(v.entity_id, "more than one release/refund row for one escrow"))
                  for v in found.sample]
        ctx.report("double_release", sample, count=found.count)
        settled_twice = found.tagged
        parts = []
        if settled_twice:
            parts.append(f"{settled_twice} channels were settled more than once (concurrent calls of the settle "
                         f"endpoint, which has no guard)")
        if found.count - settled_twice:
            parts.append(f"{found.count - settled_twice} channels released or refunded one escrow more than once")
        ctx.summarize("double_release", "; ".join(parts) + self._examples(sample))

    def _judge_accounts(self, ctx: CheckContext, dids: list[str] | None, delta: _Delta | None = None) -> None:
        params: dict[str, Any] = {"dids": dids}
        some_accounts = _SOME_ACCOUNTS
        if dids is None:
            inner = _ACCOUNTS_SQL.format(channel_rows=_ALL_CHANNEL_ROWS, accounts_from="{accounts} acc0")
        elif delta is None:  # re-sum every channel of each judged DID
            inner = _ACCOUNTS_SQL.format(channel_rows=_DID_CHANNEL_ROWS, accounts_from=some_accounts)
        else:  # their channels' sums are known exactly from the remembered sums and the touched rows
            inner = _ACCOUNTS_SQL.format(channel_rows=_GIVEN_CHANNEL_ROWS, accounts_from=some_accounts)
            # As text: exact, and cheaper to send than Decimal objects.
            params.update(paid=[str(x) for x in delta.paid], refunded=[str(x) for x in delta.refunded],
                          earned=[str(x) for x in delta.earned])
        with self._sweep_plan(ctx, dids is None):
            found = ctx.find_many(inner, _ACCOUNT_INVARIANTS, params, tags=True)["account_reconciliation"]
        if found.tagged:
            missing = [v.entity_id for v in found.sample if v.detail.startswith("no account row")]
            ctx.summarize("account_reconciliation",
                          f"{found.tagged} DIDs named by channels have no account row, so money moved for nobody "
                          f"(e.g. a placeholder payer_did){self._examples(found.sample, missing)}")

    def _judge_global(self, ctx: CheckContext, delta: _Delta | None = None) -> dict[str, Any]:
        """Judge ``global_conservation``, from the exact SQL aggregate or from ``delta``'s totals; the totals."""
        if delta is None:
            g = ctx.query(_GLOBAL_SQL)[0]
        else:
            t = delta.totals
            with localcontext(_EXACT):
                g = {**t, "expected": t["deposited"] - t["withdrawn"], "actual": t["balance"] + t["held"]}
        expected, actual = g["expected"], g["actual"]
        if expected == actual:
            ctx.report("global_conservation", [], count=0)
            return g
        diff = actual - expected
        detail = (f"deposited {g['deposited']} - withdrawn {g['withdrawn']} = {expected}, but accounts hold "
                  f"{g['balance']} and channels {g['held']} = {actual}: {abs(diff)} "
                  f"{'created' if diff > 0 else 'lost'}; the account_reconciliation and channel_conservation "
                  f"violations name where")
        ctx.report("global_conservation",
                   [Violation("global_conservation", "system", "global", expected, actual, diff, detail)], count=1)
        return g

    # ---- remembered sums: exact deltas ------------------------------------------------------------------
    def _sums_usable(self, ctx: CheckContext) -> bool:
        return (self.settings.incremental_sums and ctx.redis is not None and not (ctx.missing & _SUMS_COLUMNS)
                and not {"account_reconciliation", "global_conservation"} & set(ctx.unavailable))

    def _remembered_sums(self, ctx: CheckContext, previous: dict[str, Any] | None
                         ) -> tuple[AnchoredMemory, dict[str, str]] | None:
        """For an incremental run: the remembered sums when whole (None: judge with the exact SQL)."""
        if previous is None or not self._sums_usable(ctx):
            return None
        memory = AnchoredMemory(ctx, SUMS_KEY, SUMS_PARTS)
        why, readable = None, True
        try:
            header = memory.load()
            if header is None:
                why = "no remembered sums, or half-written"
            else:
                float(header["as_of"])
                if not all(Decimal(header[k]).is_finite() for k in TOTALS):
                    raise ValueError("not a finite total")
        except redis.RedisError as exc:
            why, readable = f"remembered sums unreadable: {redis_error(exc)}", False
        except (KeyError, ValueError, ArithmeticError):
            why = "remembered sums incomplete"
        if why is not None:
            if readable and previous.get("sums", True):
                # Gone or half-written (not a read error): without them a rewritten payer_did would leave its
                # old DID unjudged; a full sweep judges everything and re-anchors them.
                ctx.fall_back_to_full(why)
            elif ctx.log is not None:
                ctx.log.debug("payments_sums_unused", reason=why)
            return None
        return memory, header

    def _delta(self, ctx: CheckContext, sums: tuple[AnchoredMemory, dict[str, str]], ids: list[str],
               dids: list[str]) -> _Delta | None:
        """The exact sums of this snapshot, as remembered + (now - remembered) of every touched channel and
        judged account; the judged DIDs grow by the remembered payers and payees of the touched channels (a
        channel whose payer_did changed moves its money off the old DID). None: use the exact SQL."""
        memory, header = sums
        anchor = header["anchor"]
        try:
            with localcontext(_EXACT):
                totals = {k: Decimal(header[k]) for k in TOTALS}
                moved: dict[str, list[Decimal]] = {}  # DID -> deltas of [paid, refunded, earned]

                def add(did: str, paid: Decimal, refunded: Decimal, earned: Decimal, sign: int) -> None:
                    d = moved.setdefault(did, [_ZERO, _ZERO, _ZERO])
                    d[0] += sign * paid
                    d[1] += sign * refunded
                    d[2] += sign * earned

                now = {r["id"]: r for r in ctx.query(_TOUCHED_SUMS_SQL, {"ids": ids})}
                channels: dict[str, str | None] = {}
                for cid, raw in zip(ids, memory.get(anchor, "channels", ids)):
                    if raw is not None:
                        payer, payee, td, pr, ts, held = json.loads(raw)
                        add(payer, _finite(td), _finite(pr), _ZERO, -1)
                        add(payee, _ZERO, _ZERO, _finite(ts), -1)
                        totals["held"] -= _finite(held)
                    row = now.get(cid)
                    if row is None:  # the channel row is gone: it contributes nothing any more
                        channels[cid] = None
                        continue
                    if row["payer_did"] is None or row["payee_did"] is None:
                        raise _Unusable(f"channel {cid} has no payer_did or payee_did")
                    add(row["payer_did"], _finite(row["td"]), _finite(row["pr"]), _ZERO, 1)
                    add(row["payee_did"], _ZERO, _ZERO, _finite(row["ts"]), 1)
                    totals["held"] += _finite(row["held"])
                    channels[cid] = _encode([row["payer_did"], row["payee_did"], str(row["td"]), str(row["pr"]),
                                                str(row["ts"]), str(row["held"])])
                judged = sorted(set(dids) | set(moved))
                accounts = {r["did"]: r for r in ctx.query(_DID_ACCOUNTS_SQL, {"dids": judged})}
                paid, refunded, earned, people = [], [], [], {}
                for did, raw in zip(judged, memory.get(anchor, "dids", judged)):
                    _has, bal, dep, wd, p, rf, e = json.loads(raw) if raw is not None else (
                        False, "0", "0", "0", "0", "0", "0")
                    acc = accounts.get(did)
                    n_bal, n_dep, n_wd = ((_finite(acc["bal"]), _finite(acc["dep"]), _finite(acc["wd"])) if acc
                                          else (_ZERO, _ZERO, _ZERO))
                    totals["balance"] += n_bal - _finite(bal)
                    totals["deposited"] += n_dep - _finite(dep)
                    totals["withdrawn"] += n_wd - _finite(wd)
                    d = moved.get(did, (_ZERO, _ZERO, _ZERO))
                    sums_now = (_finite(p) + d[0], _finite(rf) + d[1], _finite(e) + d[2])
                    paid.append(sums_now[0])
                    refunded.append(sums_now[1])
                    earned.append(sums_now[2])
                    people[did] = _encode([acc is not None, str(n_bal), str(n_dep), str(n_wd),
                                              *(str(x) for x in sums_now)])
        except (redis.RedisError, ValueError, TypeError, ArithmeticError, _Unusable) as exc:
            reason = redis_error(exc) if isinstance(exc, redis.RedisError) else str(exc) or type(exc).__name__
            if ctx.log is not None:
                ctx.log.warning("payments_sums_unused", reason=reason)
            return None
        memory.update(anchor, {"channels": channels, "dids": people},
                      {"as_of": repr(ctx.snapshot_time), **{k: str(v) for k, v in totals.items()}})
        if ctx.log is not None:
            ctx.log.debug("payments_sums_delta", channels=len(ids), dids=len(judged))
        return _Delta(judged, paid, refunded, earned, totals)

    def _anchor_sums(self, ctx: CheckContext, totals: dict[str, Any]) -> bool:
        """A full sweep on one connection: remember every channel's and DID's contribution in this snapshot (a
        new anchor); whether it was."""
        if not self._sums_usable(ctx):
            return False
        memory = AnchoredMemory(ctx, SUMS_KEY, SUMS_PARTS)
        anchor = memory.begin()
        failed = None
        for part in SUMS_PARTS:
            failed = self._fill_sums(ctx, anchor, part)
            if failed is not None:
                break
        return self._publish_sums(ctx, memory, anchor, totals, failed)

    def _fill_sums(self, ctx: CheckContext, anchor: str, part: str) -> str | None:
        """Write one part of a new anchor (on any connection of the run's snapshot); why it failed, or None."""
        sql = _ANCHOR_CHANNELS_SQL if part == "channels" else _ANCHOR_DIDS_SQL
        started = time.perf_counter()
        with self._sweep_plan(ctx, True):
            try:
                memory = AnchoredMemory(ctx, SUMS_KEY, SUMS_PARTS)
                n = memory.fill(anchor, part, sql, batch=self.settings.sequence_batch)
            except redis.RedisError as exc:
                return redis_error(exc)
            except UnkeyedRow:
                return "a channel has no payer_did or payee_did"
        if ctx.log is not None:
            ctx.log.debug("payments_sums_filled", part=part, entities=n,
                          seconds=round(time.perf_counter() - started, 3))
        return None

    def _publish_sums(self, ctx: CheckContext, memory: AnchoredMemory, anchor: str, totals: dict[str, Any],
                      failed: str | None) -> bool:
        """Publish the filled anchor with the global totals of its snapshot (after success), or drop it."""
        if failed is not None:
            memory.abandon(anchor)
            if ctx.log is not None:
                ctx.log.warning("payments_sums_not_anchored", reason=failed)
            return False
        memory.publish(anchor, {"as_of": repr(ctx.snapshot_time), **{k: str(totals[k]) for k in TOTALS}})
        return True

    # ---- sequence memory ----------------------------------------------------------------------------
    def _judge_sequences(self, ctx: CheckContext, ids: list[str] | None) -> None:
        if ids is None:
            sql, params = "SELECT id::text, sequence_number FROM {payment_channels}", None
        else:
            sql, params = f"SELECT c.id::text, c.sequence_number FROM {_TOUCHED_CHANNELS}", {"ids": ids}
        memory = ctx.memory(SEQUENCE_KEY, parse=int, keep="highest", batch=self.settings.sequence_batch)
        obs = memory.observe("sequence_regression", sql, params, breaks=lambda prev, cur: cur < prev,
                              recorded="the sequence numbers of {n} channels", changes_only=True)
        if obs is None or obs.first:
            return
        ctx.report("sequence_regression", [
            Violation("sequence_regression", "channel", cid, Decimal(prev), Decimal(cur), Decimal(cur - prev),
                      f"sequence_number went back from {prev} (seen before) to {cur}: a stale or replayed "
                      f"write overwrote this channel; compare its row with its latest ledger rows")
            for cid, prev, cur in obs.worst], count=obs.count)


def _finite(value: Any) -> Decimal:
    """A remembered or read amount as a Decimal; NaN (numeric allows it) or garbage: the sums are not used."""
    amount = Decimal(value)
    if not amount.is_finite():
        raise _Unusable(f"a non-finite amount ({value})")
    return amount
