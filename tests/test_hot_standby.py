"""zsmon reading a hot standby: a real primary and a real streaming replica (pg_basebackup -R), private ports.

A fault written on the primary is found by zsmon connected to the standby once the standby replayed it;
a sweep cancelled by a real recovery conflict is retried on a fresh snapshot, and one that keeps being
cancelled is an error that says so and names the standby setting to raise; replication lag is exported.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time

import psycopg
import pytest
import yaml

from zsmon.app import build_registry
from zsmon.core.checker import CheckContext, Checker, Invariant
from zsmon.core.service import build_runner
from zsmon.demo.simulator.payments import FAULTS, PaymentSimulator, inject_fault
from zsmon.testing import PrivatePostgres, bind_checker, wait_for

pytestmark = pytest.mark.slow


def _collect_postgres(make_config, dsn: str) -> dict[str, float]:
    runner = build_runner(build_registry(make_config(redis=False, env={"ZSMON_DATABASE_URL": dsn})),
                          only=[], exporters=["postgres"])
    try:
        families = runner._collect(runner.exporters["postgres"].exporter)
    finally:
        runner.db.close()
    return {s.name: s.value for f in families for s in f.samples if not s.labels}


def test_zsmon_on_a_standby_finds_a_fault_planted_on_the_primary(hot_standby, make_config, run_check,
                                                                 redis_prefix, tmp_path):
    primary, standby = hot_standby()
    with psycopg.connect(primary.dsn, autocommit=True) as conn:
        PaymentSimulator(conn, seed=7).run(200)
    standby.wait_for_replay()
    cfg = make_config(redis=False, env={"ZSMON_DATABASE_URL": standby.dsn})
    with psycopg.connect(standby.dsn) as conn:
        assert conn.execute("SELECT pg_is_in_recovery()").fetchone()[0] is True
        assert conn.execute("SELECT count(*) FROM channel_transactions").fetchone()[0] > 0

    # zsmon's REPEATABLE READ READ ONLY snapshots work on the standby as they are.
    clean = run_check("payments", mode="full", config=cfg)
    assert clean.status == "pass", clean.to_dict()

    with psycopg.connect(primary.dsn, autocommit=True) as conn:
        channel = inject_fault(conn, "one_unit_leak")
    standby.wait_for_replay()
    found = run_check("payments", mode="full", config=cfg)
    assert found.status == "fail", found.to_dict()
    assert {(v.invariant, v.entity_id) for v in found.violations} == {(FAULTS["one_unit_leak"].invariant, channel)}

    # The command line too (role inspection, deployment identity, Redis memory) against the standby.
    conf = tmp_path / "zsmon.yml"
    conf.write_text(yaml.safe_dump({"redis": {"key_prefix": redis_prefix}}))
    env = {**os.environ, "ZSMON_DATABASE_URL": standby.dsn, "REDIS_HOST": "127.0.0.1", "LOG_FORMAT": "json"}
    cli = subprocess.run([sys.executable, "-m", "zsmon.cli", "--config", str(conf), "check", "--once",
                          "--only", "payments", "--format", "json"], check=False, env=env, capture_output=True,
                         text=True, timeout=60)
    assert cli.returncode == 1, cli.stdout + cli.stderr
    (check,) = json.loads(cli.stdout)["checks"]
    assert check["status"] == "fail" and check["error"] is None
    assert {(v["invariant"], v["entity_id"]) for v in check["violations"]} == {(FAULTS["one_unit_leak"].invariant,
                                                                                channel)}

    # Lag is exported when zsmon reads the standby, never on the primary.
    on_standby = _collect_postgres(make_config, standby.dsn)
    assert 0 <= on_standby["zsmon_database_replication_lag_seconds"] < 60
    on_primary = _collect_postgres(make_config, primary.dsn)
    assert on_primary["zerostate_postgres_up"] == 1
    assert "zsmon_database_replication_lag_seconds" not in on_primary


def test_lag_grows_while_the_standby_stops_replaying(hot_standby, make_config):
    primary, standby = hot_standby()
    with psycopg.connect(primary.dsn, autocommit=True) as conn:
        conn.execute("CREATE TABLE lagprobe (x int)")
        conn.execute("INSERT INTO lagprobe VALUES (1)")
    standby.wait_for_replay()
    assert _collect_postgres(make_config, standby.dsn)["zsmon_database_replication_lag_seconds"] == 0  # caught up
    with psycopg.connect(standby.dsn, autocommit=True) as conn:
        conn.execute("SELECT pg_wal_replay_pause()")
    with psycopg.connect(primary.dsn, autocommit=True) as conn:
        conn.execute("INSERT INTO lagprobe VALUES (2)")
        conn.execute("SELECT pg_sleep(1.2)")
        conn.execute("INSERT INTO lagprobe VALUES (3)")
    with psycopg.connect(standby.dsn, autocommit=True) as conn:
        # Received but not replayed: the last replayed commit (the first INSERT) is over a second old.
        conn.execute("SELECT pg_sleep(0.3)")
        lag = _collect_postgres(make_config, standby.dsn)["zsmon_database_replication_lag_seconds"]
        assert lag >= 1.2
        conn.execute("SELECT pg_wal_replay_resume()")
    standby.wait_for_replay()
    assert _collect_postgres(make_config, standby.dsn)["zsmon_database_replication_lag_seconds"] == 0


class ConflictedChecker(Checker):
    """Test-only: reads a table, then makes the primary VACUUM away rows its snapshot may still see.

    With ``max_standby_streaming_delay=0`` on the standby (and no ``hot_standby_feedback``), replaying that
    VACUUM cancels this run's session at once: its next query fails with a real recovery conflict. It does
    so on its first ``conflicts`` runs, then reads quietly."""

    name = "conflicted"
    description = "test-only: a sweep a hot standby's replay cancels"
    invariants = (Invariant("conflicted_reads", "the sweep reads its table", "system"),)

    def __init__(self, primary: PrivatePostgres, standby: PrivatePostgres, conflicts: int,
                 mid_query: bool = False) -> None:
        super().__init__()
        self.primary, self.standby, self.conflicts, self.runs = primary, standby, conflicts, 0
        self.mid_query = mid_query  # provoke it while a long statement runs, not between statements
        self.cancelled_after = 0.0  # how long the cancelled statement ran

    def vacuum_on_primary(self) -> None:
        with psycopg.connect(self.primary.dsn, autocommit=True) as conn:
            conn.execute("DELETE FROM conflict_rows")
            # Removes rows this run's snapshot still sees. No truncation: its lock would be a second conflict
            # record, replayed a moment later, that could cancel the retry as well.
            conn.execute("VACUUM (TRUNCATE false) conflict_rows")
            conn.execute("INSERT INTO conflict_rows SELECT generate_series(1, 100)")

    def vacuum_once_the_sweep_runs(self) -> None:
        with psycopg.connect(self.standby.dsn, autocommit=True) as conn:
            wait_for(lambda: conn.execute(
                "SELECT 1 FROM pg_stat_activity WHERE application_name = 'zsmon' AND state = 'active' "
                "AND query LIKE '%pg_sleep%'").fetchone(), timeout=10, interval=0.02)
        self.vacuum_on_primary()

    def run(self, ctx: CheckContext) -> None:
        if self.runs:
            # A retry: what the last run's provocation wrote is replayed before this one reads, so a
            # retry conflicts only when it provokes a conflict itself.
            self.standby.wait_for_replay()
        self.runs += 1
        before = ctx.scalar("SELECT count(*) FROM conflict_rows")
        conflict, self.conflicts = self.conflicts > 0, max(0, self.conflicts - 1)
        if conflict and self.mid_query:
            # A long statement (5 s) that replay cancels as soon as the VACUUM arrives.
            provoker = threading.Thread(target=self.vacuum_once_the_sweep_runs, daemon=True)
            provoker.start()
            t0 = time.perf_counter()
            try:
                ctx.scalar("SELECT count(*) FROM conflict_rows, pg_sleep(5)")
            finally:
                self.cancelled_after = time.perf_counter() - t0
                provoker.join(15)
        elif conflict:
            self.vacuum_on_primary()
            self.standby.wait_for_replay()
        after = ctx.scalar("SELECT count(*) FROM conflict_rows")
        assert before == after  # one snapshot
        ctx.report("conflicted_reads", [])


@pytest.fixture
def conflicting(hot_standby, make_config):
    # No autovacuum on the primary: the only VACUUM replayed is the checker's own.
    primary, standby = hot_standby(primary={"autovacuum": "off"},
                                   standby={"max_standby_streaming_delay": "0", "hot_standby_feedback": "off"})
    with psycopg.connect(primary.dsn, autocommit=True) as conn:
        conn.execute("CREATE TABLE conflict_rows (x int)")
        conn.execute("INSERT INTO conflict_rows SELECT generate_series(1, 100)")
    standby.wait_for_replay()

    def make(conflicts: int, mid_query: bool = False, **database):
        cfg = make_config(redis=False, env={"ZSMON_DATABASE_URL": standby.dsn}, database=database)
        runner = build_runner(build_registry(cfg), only=[])
        checker = ConflictedChecker(primary, standby, conflicts, mid_query)
        runner.checkers["conflicted"] = bind_checker(checker, cfg)
        made.append(runner)
        return runner, checker

    made: list = []
    yield make
    for runner in made:
        runner.db.close()


def test_a_recovery_conflict_is_retried_on_a_fresh_snapshot(conflicting):
    runner, checker = conflicting(conflicts=2)  # the default allows 2 retries
    result = runner.run_check("conflicted")
    assert result.status == "pass", result.to_dict()
    assert checker.runs == 3 and checker.conflicts == 0
    assert "conflicted" not in runner.database_errors


def test_a_sweep_that_keeps_conflicting_is_an_error_naming_the_standby_setting(conflicting):
    runner, checker = conflicting(conflicts=10, recovery_conflict_retries=1)
    result = runner.run_check("conflicted")
    assert checker.runs == 2  # the run and its one retry, no more
    assert result.status == "error"
    assert "conflict with recovery" in result.error and "[2 attempts]" in result.error
    assert "hot_standby_feedback=on" in result.error and "max_standby_streaming_delay" in result.error
    assert "\n" not in result.error
    # Not the database being down: /ready is not turned away by it, and the next run is fine.
    assert "conflicted" not in runner.database_errors
    checker.conflicts = 0
    assert runner.run_check("conflicted").status == "pass"


def test_a_long_statement_cancelled_by_replay_is_retried(conflicting):
    """The long-sweep case: replay cancels a running statement ("canceling statement due to conflict with
    recovery"), not an idle transaction."""
    runner, checker = conflicting(conflicts=1, mid_query=True)
    t0 = time.monotonic()
    result = runner.run_check("conflicted")
    assert result.status == "pass", result.to_dict()
    assert checker.runs == 2
    elapsed = time.monotonic() - t0
    assert elapsed < 4.5  # cancelled, not waited out: the statement would sleep 5 s
    # The run's duration counts the cancelled try too (it waited for the standby to show the statement).
    assert 0 < result.duration_seconds <= elapsed
    assert result.duration_seconds > checker.cancelled_after
