"""Schema drift degrades per invariant, not per checker: each invariant declares the columns it reads;
a missing column skips only those invariants (naming table and column), a missing table gets one
table-level reason, and the ``schema`` checker names the drift, wrong types included."""
from collections.abc import Iterator

import psycopg
import pytest

from zsmon.demo.simulator.reputation import ReputationSimulator
from zsmon.testing import create_platform_database, drop_database


@pytest.fixture
def drifted() -> Iterator[tuple[psycopg.Connection, str]]:
    """A database of its own holding the platform schema, to alter: (read-write connection, DSN)."""
    name, url = create_platform_database("zsmon_drift")
    try:
        with psycopg.connect(url, autocommit=True) as conn:
            yield conn, url
    finally:
        drop_database(name)


def _run(run_check, make_config, url: str, checker: str, **sections):
    return run_check(checker, config=make_config(env={"ZSMON_DATABASE_URL": url}, **sections))


def test_a_missing_column_skips_only_the_invariants_that_read_it(drifted, run_check, make_config):
    conn, url = drifted
    ReputationSimulator(conn, seed=4, agents=12).run(80)
    conn.execute("ALTER TABLE reputation_events DROP COLUMN score_delta")
    # A fault another invariant of the same checker must still find.
    broken = conn.execute("UPDATE reputation_scores SET total_tasks = total_tasks + 3 WHERE agent_did = "
                          "(SELECT min(agent_did) FROM reputation_scores) RETURNING agent_did").fetchone()[0]
    result = _run(run_check, make_config, url, "reputation", redis=False)
    assert result.status == "fail" and result.error is None
    for inv in ("score_replay", "score_delta_range"):
        assert result.skipped[inv].startswith("column reputation_events.score_delta is missing in the monitored "
                                              "database"), result.skipped
        assert inv not in result.violation_counts
    judged = {"score_bounds", "task_counters", "event_counter_reconciliation"}
    assert judged <= set(result.violation_counts)
    assert result.violation_counts["task_counters"] == 1
    assert [v.entity_id for v in result.violations if v.invariant == "task_counters"] == [broken]
    assert result.violation_counts["event_counter_reconciliation"] == 0


def test_a_missing_table_gets_one_table_level_reason(drifted, run_check, make_config):
    conn, url = drifted
    ReputationSimulator(conn, seed=5, agents=8).run(30)
    conn.execute("DROP TABLE reputation_events")
    result = _run(run_check, make_config, url, "reputation", redis=False)
    assert result.error is None
    reasons = {inv: r for inv, r in result.skipped.items() if "missing" in r}
    assert set(reasons) == {"event_counter_reconciliation", "score_replay", "score_delta_range"}
    assert all(r.startswith("table reputation_events is missing in the monitored database") for r in reasons.values())
    assert result.violation_counts == {"score_bounds": 0, "task_counters": 0}


def test_payments_without_escrow_released_judges_the_rest(drifted, run_check, make_config):
    conn, url = drifted
    conn.execute("ALTER TABLE payment_channels DROP COLUMN escrow_released")
    conn.execute("INSERT INTO payment_channels (payer_did, payee_did, total_deposit, current_balance, state) "
                 "VALUES ('did:u', 'did:a', 10, 11, 'open')")  # conserves nothing: 1 appeared
    result = _run(run_check, make_config, url, "payments", redis=False)
    assert result.error is None
    assert result.skipped["escrow_state"].startswith("column payment_channels.escrow_released is missing")
    assert result.violation_counts["channel_conservation"] == 1
    assert "escrow_state" not in result.violation_counts


def test_incremental_runs_need_their_watermark_columns(drifted, run_check, make_config):
    conn, url = drifted
    conn.execute("ALTER TABLE payment_channels DROP COLUMN updated_at CASCADE")
    config = make_config(env={"ZSMON_DATABASE_URL": url})
    assert run_check("payments", mode="full", config=config).error is None
    again = run_check("payments", mode="incremental", config=config)
    assert again.error is None and again.mode == "full"  # fell back: what changed cannot be told apart


def test_the_schema_checker_names_missing_columns_and_wrong_types(drifted, run_check, make_config):
    conn, url = drifted
    clean = _run(run_check, make_config, url, "schema", redis=False)
    assert clean.status == "pass" and clean.violation_counts == {"required_columns_present": 0, "column_types": 0}
    conn.execute("ALTER TABLE reputation_events DROP COLUMN score_delta")
    conn.execute("ALTER TABLE payment_channels ALTER COLUMN total_deposit TYPE text")
    conn.execute("ALTER TABLE auctions ALTER COLUMN expires_at TYPE text")
    result = _run(run_check, make_config, url, "schema", redis=False)
    assert result.violation_counts == {"required_columns_present": 1, "column_types": 2}
    by = {(v.invariant, v.entity_id): v for v in result.violations}
    missing = by[("required_columns_present", "reputation_events.score_delta")]
    assert "the invariants that read it are skipped" in missing.detail
    money = by[("column_types", "payment_channels.total_deposit")]
    assert (money.expected, money.actual) == ("numeric", "text")
    assert "expected a numeric type" in money.detail
    assert by[("column_types", "auctions.expires_at")].expected == "timestamp"


def test_an_advised_index_once_created_is_no_longer_advised(drifted):
    from zsmon.checkers.payments import PaymentsChecker
    from zsmon.core.checker import missing_indexes

    conn, _ = drifted
    advice = PaymentsChecker.recommended_indexes
    assert [(a.table, a.column) for a in missing_indexes(conn, advice)] == [
        ("payment_channels", "updated_at"), ("accounts", "updated_at")]
    conn.execute(advice[0].statement)
    assert [(a.table, a.column) for a in missing_indexes(conn, advice)] == [("accounts", "updated_at")]
