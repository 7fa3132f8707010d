"""A run leaves nothing behind on the database: no query outliving zsmon's own timeout, no session state."""
from __future__ import annotations

import time

import psycopg

from zsmon.app import build_registry
from zsmon.core.checker import Checker, CheckContext, Invariant
from zsmon.core.service import build_runner
from zsmon.testing import bind_checker, wait_for

LOCK_KEY = 720_331  # an advisory lock key of this test's own


class OutlivingChecker(Checker):
    """Test-only: switches the server's statement_timeout off for its transaction, then sleeps, so only
    zsmon's client-side bound can end the wait."""

    name = "outliving"
    description = "test-only: a query the server would let run"
    invariants = (Invariant("answers", "the query returns", "system"),)

    def run(self, ctx: CheckContext) -> None:
        ctx.scalar("SELECT set_config('statement_timeout', '0', true)")
        ctx.scalar("SELECT pg_sleep(30) /* zsmon-test-outliving */")
        ctx.report("answers", [])


class LockingChecker(Checker):
    """Test-only: takes a session-level advisory lock and changes a session setting, and says nothing."""

    name = "locking"
    description = "test-only: leaves session state behind"
    invariants = (Invariant("answers", "the query returns", "system"),)

    def run(self, ctx: CheckContext) -> None:
        ctx.scalar("SELECT pg_advisory_lock(%s)", (LOCK_KEY,))
        ctx.scalar("SELECT set_config('work_mem', '7MB', false)")  # session-wide, not for the transaction
        ctx.report("answers", [])


def _runner(make_config, checker: Checker, **database):
    cfg = make_config(redis=False, database={"connect_timeout_seconds": 1, "statement_timeout_seconds": 1,
                                             **database})
    runner = build_runner(build_registry(cfg), only=["schema"])
    runner.checkers = {checker.name: bind_checker(checker, cfg)}
    return runner


def test_a_query_past_the_client_timeout_is_cancelled_on_the_server(make_config, db_url):
    runner = _runner(make_config, OutlivingChecker())
    try:
        t0 = time.monotonic()
        result = runner.run_check("outliving")
        gave_up = time.monotonic()
        assert result.status == "error" and "no answer from the database within 2s" in result.error
        assert gave_up - t0 < 4

        def still_running() -> int:
            with psycopg.connect(db_url, autocommit=True) as conn:
                return conn.execute("SELECT count(*) FROM pg_stat_activity WHERE state = 'active' "
                                    "AND query LIKE '%%zsmon-test-outliving%%' AND pid <> pg_backend_pid()"
                                    ).fetchone()[0]

        wait_for(lambda: still_running() == 0, timeout=1.0, interval=0.05)
        assert time.monotonic() - gave_up < 1.0
    finally:
        runner.db.close()


def test_a_run_leaves_no_advisory_lock_or_setting_on_its_pooled_connection(make_config, db_url):
    runner = _runner(make_config, LockingChecker(), max_connections=1)  # one connection: the same one is reused
    try:
        assert runner.run_check("locking").status == "pass"
        with psycopg.connect(db_url, autocommit=True) as other:
            held = other.execute("SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND objid = %s",
                                 (LOCK_KEY,)).fetchone()[0]
            assert held == 0
            assert other.execute("SELECT pg_try_advisory_lock(%s)", (LOCK_KEY,)).fetchone()[0] is True
        # The pooled connection is still zsmon's read-only, time-bounded session, with the run's setting gone.
        with runner.db.snapshot() as conn:
            assert conn.execute("SHOW work_mem").fetchone()[0] != "7MB"
            assert conn.execute("SHOW default_transaction_read_only").fetchone()[0] == "on"
            assert conn.execute("SHOW application_name").fetchone()[0] == "zsmon"
        assert runner.run_check("locking").status == "pass"  # and it runs again on it
    finally:
        runner.db.close()
