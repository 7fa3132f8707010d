"""Full sweeps split over several connections that share one snapshot (issue 19), against real PostgreSQL."""
from __future__ import annotations

import itertools
import threading
import time
from contextlib import contextmanager
from typing import Any

import psycopg
import pytest

from zsmon.app import build_registry
from zsmon.checkers.payments import PaymentsChecker
from zsmon.core.checker import CheckContext, Checker, Invariant
from zsmon.core.db import Database
from zsmon.core.service import build_runner
from zsmon.testing import bind_checker, wait_for

# 400 consistent channels (ids spread over the whole uuid space), each with its deposit row; payers'
# accounts hold what they did not put into channels.
_WORLD = """
INSERT INTO payment_channels (id, payer_did, payee_did, total_deposit, current_balance, state, sequence_number)
SELECT md5('split-' || i)::uuid, 'did:split:u' || (i % 20), 'did:split:a' || (i % 10), 100, 100, 'open', 1
FROM generate_series(1, 400) AS i;
"""
_LEDGER = """
INSERT INTO channel_transactions (channel_id, transaction_type, amount)
SELECT id, 'deposit', total_deposit FROM payment_channels
"""
_ACCOUNTS = """
INSERT INTO accounts (did, balance, total_deposited, total_withdrawn)
SELECT did, 50, sum(paid) + 50, 0 FROM (
    SELECT payer_did AS did, total_deposit AS paid FROM payment_channels
    UNION ALL SELECT payee_did, 0 FROM payment_channels) AS t
GROUP BY did
"""
# Faults all over the id space: conservation breaks with four sizes only (ties broken by id), deposit rows
# missing (a lower-priority kind of ledger_reconciliation), doubled releases and settles, closed channels
# still holding money, accounts off by one or two, channels paid by DIDs that have no account.
_FAULTS = [
    ("UPDATE payment_channels SET current_balance = current_balance + (hashtext(id::text) & 3) + 1 "
     "WHERE hashtext(id::text) % 5 = 0"),
    ("DELETE FROM channel_transactions WHERE channel_id IN "
     "(SELECT id FROM payment_channels WHERE hashtext(id::text) % 11 = 1)"),
    ("INSERT INTO channel_transactions (channel_id, transaction_type, amount, task_id) "
     "SELECT id, t, 2, 'task-' || id FROM payment_channels, (VALUES ('release'), ('refund')) AS v(t) "
     "WHERE hashtext(id::text) % 13 = 2"),
    ("INSERT INTO channel_transactions (channel_id, transaction_type, amount) "
     "SELECT id, 'settlement', 1 + (hashtext(id::text) & 1) FROM payment_channels, generate_series(1, 2) "
     "WHERE hashtext(id::text) % 17 = 3"),
    "UPDATE payment_channels SET state = 'closed' WHERE hashtext(id::text) % 19 = 4",
    "UPDATE accounts SET balance = balance + 1 + (hashtext(did) & 1) WHERE hashtext(did) % 3 = 0",
    ("UPDATE payment_channels SET payer_did = 'did:split:ghost' || (hashtext(id::text) & 15) "
     "WHERE hashtext(id::text) % 23 = 5"),
]


def planted(writer: psycopg.Connection) -> None:
    for stmt in (_WORLD, _LEDGER, _ACCOUNTS, *_FAULTS):
        writer.execute(stmt)
    writer.execute("ANALYZE payment_channels, channel_transactions, accounts")


def sweep(make_config, connections: int, **checks: Any) -> tuple[dict, dict]:
    """A full payments run with ``connections``: the result (timing left out) and the tracked violators."""
    cfg = make_config(redis=False, checks=checks or {"sample_limit": 5, "track_limit": 12},
                      checkers={"payments": {"settings": {"full_sweep_connections": connections}}})
    runner = build_runner(build_registry(cfg), only=["payments"])
    try:
        result, ctx = runner._execute(runner.checkers["payments"], "full")
    finally:
        runner.db.close()
    assert result.status == "fail" and ctx is not None, result.to_dict()
    out = result.to_dict()
    for key in ("duration_seconds", "started_at"):
        out.pop(key)
    return out, {k: list(v.items()) for k, v in ctx.tracked.items()}


def test_split_sweep_finds_exactly_what_one_connection_finds(writer, make_config):
    planted(writer)
    one, tracked_one = sweep(make_config, 1)
    counts = one["violation_counts"]
    # The world is worth the comparison: more violators than the sample and the tracking limit, ties, tags.
    assert counts["channel_conservation"] > 12 and counts["ledger_reconciliation"] > 12, counts
    assert counts["double_release"] > 12 and counts["closed_channel_drained"] > 5, counts
    assert counts["account_reconciliation"] > 12, counts
    diffs = [v["difference"] for v in one["violations"] if v["invariant"] == "channel_conservation"]
    assert len(diffs) == 5 and len(set(diffs)) < 5, diffs  # ties in the sample, broken by id
    assert len(tracked_one["channel_conservation"]) == 12
    assert one["summaries"]["ledger_reconciliation"] and one["summaries"]["double_release"]
    assert one["summaries"]["account_reconciliation"]  # DIDs without an account row
    for n in (2, 4):
        split, tracked = sweep(make_config, n)
        assert split == one, n
        assert tracked == tracked_one, n
    # Limits above the counts: every violator, in the same order.
    whole, tracked_whole = sweep(make_config, 1, sample_limit=1000, track_limit=1000)
    split, tracked = sweep(make_config, 3, sample_limit=1000, track_limit=1000)
    assert split == whole and tracked == tracked_whole


def test_split_sweep_actually_splits(writer, make_config):
    """The payments full sweep runs on a helper connection beside the run's own."""
    planted(writer)
    cfg = make_config(redis=False, database={"max_connections": 4})
    runner = build_runner(build_registry(cfg), only=["payments"])
    assert runner.split_connections == 2
    opened: list[tuple[int, list[int]]] = []
    share = runner.db.shared_snapshot

    def recording(conn, helpers, timeout=None):  # the real shared_snapshot, with who took part written down
        with share(conn, helpers, timeout) as shared:
            opened.append((conn.info.backend_pid, [h.info.backend_pid for h in shared.helpers]))
            yield shared

    runner.db.shared_snapshot = contextmanager(recording)
    try:
        assert runner.run_check("payments", mode="full").status == "fail"
    finally:
        runner.db.close()
    assert len(opened) == 1, opened  # one set of helpers for the whole sweep
    for main, helpers in opened:
        assert len(helpers) == 1 and main not in helpers


class _Probe(Checker):
    name = "split_probe"
    invariants = (Invariant("probe_ok", "never violated", entity_type="x"),)

    def __init__(self, fail: bool = False, sleep: bool = False) -> None:
        super().__init__()
        self.fail, self.sleep = fail, sleep
        self.pids: list[int] = []
        self.main = 0
        self.started = threading.Event()

    def run(self, ctx: CheckContext) -> None:
        self.main = ctx.scalar("SELECT pg_backend_pid()")
        barrier = threading.Barrier(3, timeout=20)

        def part(c: CheckContext, k: int) -> int:
            self.pids.append(c.scalar("SELECT pg_backend_pid()"))
            barrier.wait()  # three parts at once: three connections
            if self.fail and k == 1:
                c.scalar("SELECT 1 / (%s - 1)", (k,))
            self.started.set()
            return c.scalar("SELECT pg_sleep(60)") if self.fail or self.sleep else k

        ctx.parallel([0, 1, 2], part, connections=3)
        ctx.report("probe_ok", [])


def _leftovers(db_url: str, main: int, pids: list[int]) -> list[tuple]:
    """The helpers still connected, and the run's own connection unless it is idle (back in the pool)."""
    with psycopg.connect(db_url, autocommit=True) as conn:
        return conn.execute("SELECT pid, state, query FROM pg_stat_activity WHERE pid = ANY(%s) "
                            "AND (state <> 'idle' OR pid <> %s)", (pids, main)).fetchall()


def test_a_failing_part_fails_the_run_and_leaves_nothing_behind(make_config, db_url):
    cfg = make_config(redis=False)
    runner = build_runner(build_registry(cfg), only=["payments"])
    probe = _Probe(fail=True)
    runner.checkers["split_probe"] = bind_checker(probe, cfg)
    try:
        t0 = time.perf_counter()
        result = runner.run_check("split_probe")
        assert time.perf_counter() - t0 < 15  # the sleeping parts were cancelled, not waited for
        assert result.status == "error"
        assert result.error == "DivisionByZero: division by zero", result.error
        assert len(set(probe.pids)) == 3 and probe.main in probe.pids
        # The helpers are closed and nothing runs any more; the run's own connection is back in the pool, idle.
        wait_for(lambda: not _leftovers(db_url, probe.main, probe.pids), timeout=10)
        probe.fail, probe.pids = False, []
        assert runner.run_check("split_probe").status == "pass"  # the pool's connection is fine
    finally:
        runner.db.close()


def test_every_part_sees_the_runs_snapshot_read_only(writer, make_config, db_url):
    writer.execute(_WORLD)
    cfg = make_config(redis=False)
    db = Database(cfg.database)
    db.open()
    try:
        with db.snapshot(7.5) as conn:
            ctx = CheckContext(PaymentsChecker(), conn, share=lambda k: db.shared_snapshot(conn, k, 7.5),
                               max_connections=3)
            before = ctx.scalar("SELECT count(*) FROM payment_channels")
            # Committed after the snapshot was taken: invisible to the run and to every part.
            writer.execute("DELETE FROM payment_channels WHERE id IN (SELECT id FROM payment_channels LIMIT 7)")
            writer.execute("INSERT INTO payment_channels (payer_did, payee_did, total_deposit, current_balance, "
                           "state) VALUES ('x', 'y', 1, 1, 'open')")
            barrier = threading.Barrier(3, timeout=20)

            def part(c: CheckContext, k: int) -> tuple:
                barrier.wait()
                return (c.scalar("SELECT pg_backend_pid()"), c.scalar("SELECT count(*) FROM payment_channels"),
                        c.scalar("SELECT current_setting('transaction_read_only')"),
                        c.scalar("SELECT current_setting('statement_timeout')"),
                        c.scalar("SELECT current_setting('transaction_isolation')"))

            got = ctx.parallel([0, 1, 2], part)
            assert len({g[0] for g in got}) == 3
            assert [g[1:] for g in got] == [(before, "on", "7500ms", "repeatable read")] * 3
            assert before == 400
            with pytest.raises(psycopg.errors.ReadOnlySqlTransaction):
                ctx.parallel([0, 1], lambda c, k: c.scalar("CREATE TEMP TABLE zsmon_split_w (x int)"),
                             connections=2)
    finally:
        db.close()
    with psycopg.connect(db_url) as conn:
        assert conn.execute("SELECT count(*) FROM payment_channels").fetchone()[0] == 394


def test_find_many_split_merges_exactly_what_find_many_finds(writer, make_config):
    """The framework's generic split pass, on the payments channel query: the same findings in the same order,
    whatever the cuts (even an empty part)."""
    from zsmon.checkers import payments as p

    planted(writer)
    cfg = make_config(redis=False)
    db = Database(cfg.database)
    db.open()
    whole_sql = p._CHANNELS_SQL.format(ledger_from=p._ALL_LEDGER, channels_from=p._ALL_CHANNELS)
    part_sql = p._CHANNELS_SQL.format(ledger_from=p._PART_LEDGER, channels_from=p._PART_CHANNELS)
    try:
        with db.snapshot() as conn:
            def context() -> CheckContext:
                return CheckContext(PaymentsChecker(), conn, sample_limit=4, track_limit=9,
                                    share=lambda k: db.shared_snapshot(conn, k), max_connections=3)

            one = context()
            found = one.find_many(whole_sql, p._CHANNEL_INVARIANTS, {"ids": None}, tags=True, priority=True)
            cuts = [None, *(str(x) for x in one.split_points("payment_channels", "id", 3)), "ffffffff-0000-0000-0000-000000000000", None]
            assert len(cuts) == 5
            split = context()
            merged = split.find_many_split(part_sql, p._CHANNEL_INVARIANTS,
                                           [{"lo": lo, "hi": hi} for lo, hi in itertools.pairwise(cuts)],
                                           {"ids": None}, tags=True, priority=True)
            assert merged == found
            assert (split.counts, split.samples, split.tracked) == (one.counts, one.samples, one.tracked)
            assert [list(t) for t in split.tracked.values()] == [list(t) for t in one.tracked.values()]  # order too
            assert sum(f.count for f in found.values()) > 40
    finally:
        db.close()


def _sleeping(db_url: str, pids: list[int]) -> int:
    with psycopg.connect(db_url, autocommit=True) as conn:
        return conn.execute("SELECT count(*) FROM pg_stat_activity WHERE pid = ANY(%s) AND state = 'active' "
                            "AND query LIKE '%%pg_sleep%%'", (pids,)).fetchone()[0]


@pytest.mark.parametrize("stop", ["shutdown", "lease lost"])
def test_stopping_a_split_run_cancels_every_part(make_config, db_url, stop):
    """A shutdown (``cancel_running``) or a lost lease (``abandon``) stops the helpers' queries too."""
    cfg = make_config(redis=False)
    runner = build_runner(build_registry(cfg), only=["payments"])
    probe = _Probe(sleep=True)
    runner.checkers["split_probe"] = bind_checker(probe, cfg)
    results: list[Any] = []
    t = threading.Thread(target=lambda: results.append(runner.run_check("split_probe")))
    try:
        t.start()
        assert probe.started.wait(20)
        wait_for(lambda: _sleeping(db_url, probe.pids) == 3)  # all three parts in pg_sleep
        t0 = time.perf_counter()
        if stop == "shutdown":
            assert runner.db.cancel_running(2.0) >= 3
        else:
            runner.abandon("check:split_probe")
        t.join(20)
        assert not t.is_alive() and time.perf_counter() - t0 < 15
        assert results[0].status == "error"
        wait_for(lambda: not _leftovers(db_url, probe.main, probe.pids), timeout=10)
    finally:
        t.join(60)
        runner.db.close()
