"""Day one on the real ZeroState: worlds written the way the deployed platform's code writes them
(docs/invariants.md, "What the deployed platform really writes"), on the schema its migrations create.

Each scenario asserts the exact counts, and that every human line — details, summaries, skip reasons,
the text output — tells the true story: the right kind of mismatch, no escrow where none was used, and
never ``None``, ``nan`` or a Python repr.
"""
import json
import os
import re
import subprocess
import sys
from decimal import Decimal
from pathlib import Path

import pytest
import yaml

from zsmon.core.results import describe_violation
from zsmon.demo.simulator.auctions import AuctionSimulator
from zsmon.demo.simulator.payments import DeployedPayments
from zsmon.demo.simulator.reputation import ReputationSimulator
from zsmon.testing import collect_families

ROOT = Path(__file__).resolve().parents[1]
ZSMON = str(Path(sys.executable).with_name("zsmon"))
# What must never appear in text written for people.
_NOT_FOR_PEOPLE = re.compile(r"\bNone\b|\bnan\b|\bNaN\b|Decimal\(|datetime\.|\bnull\b")


def assert_true_story(result) -> None:
    """No missing value leaks into any human text of ``result`` as None/nan/null/a repr."""
    texts = [*result.summaries.values(), *result.skipped.values(), result.error or ""]
    for v in result.violations:
        texts += [v.detail, describe_violation(v.to_dict())]
    for text in texts:
        assert not _NOT_FOR_PEOPLE.search(text), text


def counts(result) -> dict[str, int]:
    return {k: v for k, v in result.violation_counts.items() if v}


def only(result, invariant: str) -> list:
    return [v for v in result.violations if v.invariant == invariant]


# ---- payments -------------------------------------------------------------------------------------

def _payments_world(writer) -> dict[str, list[str]]:
    """250 channels opened the platform's way (no deposit row, placeholder payer, no account anywhere):
    100 settled below their deposit, 3 settled above it, 5 settled once and then retried (refused),
    4 settled twice concurrently (both writes land), the rest never settled."""
    platform = DeployedPayments(writer)
    ids = [platform.open_channel(f"did:agent:{i % 10}", 10 + i % 7) for i in range(250)]
    for cid in ids[:100]:
        assert platform.settle(cid, 3)
    for cid in ids[100:103]:
        deposit = writer.execute("SELECT total_deposit FROM payment_channels WHERE id = %s", (cid,)).fetchone()[0]
        assert platform.settle(cid, deposit + 5)
    for cid in ids[103:108]:
        assert platform.settle(cid, 2)
        assert not platform.settle(cid, 2)  # the sequential retry sees the channel closed: refused
    for cid in ids[108:112]:
        platform.racing_settles(cid, 2, 4)
    return {"all": ids, "above": ids[100:103], "retried": ids[103:108], "racing": ids[108:112]}


def test_payments_on_the_deployed_platform_tell_each_story_once(writer, make_config, run_check):
    world = _payments_world(writer)
    result = run_check("payments", mode="full", config=make_config(checks={"sample_limit": 5}))
    assert counts(result) == {
        "ledger_reconciliation": 250,   # every channel: no deposit row
        "closed_channel_drained": 112,  # every settled channel keeps total_deposit - amount
        "channel_non_negative": 3,      # the settles above the deposit
        "double_release": 4,            # the racing double settles, and only them (retries were refused)
        "account_reconciliation": 11,   # the placeholder payer and the 10 payees have no account row
        "global_conservation": 1,       # accounts are empty, channels hold money nobody paid in
    }
    assert result.error is None
    # The first observation of the sequence numbers is recorded, not passed.
    assert result.skipped["sequence_regression"].startswith("first observation: recorded the sequence numbers of "
                                                            "250 channels")
    assert_true_story(result)

    # ledger_reconciliation: the systemic gap and the genuine mismatches, told apart at a glance.
    summary = result.summaries["ledger_reconciliation"]
    assert summary.startswith("250 of 250 channels have no deposit row in the ledger")
    assert "4 of them also disagree otherwise: genuine mismatches (e.g. " in summary
    sample = only(result, "ledger_reconciliation")
    assert len(sample) == 5
    genuine = [v for v in sample if "racing double settle" in v.detail]
    assert {v.entity_id for v in genuine} == set(world["racing"])  # the rare kind is sampled first
    for v in genuine:
        assert v.detail.startswith("no deposit row in the ledger, and beyond it: table vs ledger:")
        assert "2 settlement rows move 6.00000000 but total_settled holds 4.00000000" in v.detail
        assert "escrow" not in v.detail  # a settle never touches escrow
    (gap,) = [v for v in sample if v not in genuine]
    assert gap.detail.startswith("no deposit row in the ledger: total_deposit ")
    assert "the rest of the ledger agrees" in gap.detail and "escrow" not in gap.detail
    assert gap.difference == Decimal(gap.actual) and Decimal(gap.expected) == 0

    doubles = only(result, "double_release")
    assert {v.entity_id for v in doubles} == set(world["racing"])
    for v in doubles:
        assert v.detail.startswith("settled 2 times (settlement rows 2.00000000 + 4.00000000 = 6.00000000)")
        assert "total_settled holds 4.00000000" in v.detail and "escrow" not in v.detail
    assert result.summaries["double_release"].startswith("4 channels were settled more than once")

    negative = only(result, "channel_non_negative")
    assert {v.entity_id for v in negative} == set(world["above"])
    assert all("the settle endpoint does not check the amount against the deposit" in v.detail for v in negative)
    assert result.summaries["closed_channel_drained"].startswith("112 of 112 closed channels still hold")
    assert "payer_did" in result.summaries["account_reconciliation"]


def test_the_command_line_on_the_deployed_platform(writer, db_url, redis_prefix, tmp_path):
    """`zsmon check --once` as an operator runs it: no checker error, the JSON counts above, text for people."""
    _payments_world(writer)
    ReputationSimulator(writer, seed=5, agents=35).run(150)
    AuctionSimulator(writer, seed=5).deployed_platform_traffic(20)
    path = tmp_path / "zsmon.yml"
    path.write_text(yaml.safe_dump({"redis": {"key_prefix": redis_prefix}, "checks": {"sample_limit": 3}}))
    env = {"PATH": os.environ.get("PATH", ""), "ZSMON_DATABASE_URL": db_url, "REDIS_HOST": "127.0.0.1",
           "REDIS_PORT": "6379"}
    out = subprocess.run([ZSMON, "--config", str(path), "check", "--once", "--format", "json"],
                         capture_output=True, text=True, timeout=120, env=env)
    assert out.returncode == 1, out.stderr  # violations found, no error
    checks = {c["checker"]: c for c in json.loads(out.stdout)["checks"]}
    assert {c["status"] for c in checks.values()} <= {"pass", "fail"}, checks
    assert checks["payments"]["violation_counts"]["double_release"] == 4
    assert checks["payments"]["violation_counts"]["channel_non_negative"] == 3
    for memory_invariant in ("sequence_regression", "score_jump", "distribution_drift"):
        checker = "payments" if memory_invariant == "sequence_regression" else "reputation"
        assert checks[checker]["skipped"][memory_invariant].startswith(("first observation", "baseline recorded"))
    text = subprocess.run([ZSMON, "--config", str(path), "check", "--once"], capture_output=True, text=True,
                          timeout=120, env=env)
    assert text.returncode == 1
    assert not _NOT_FOR_PEOPLE.search(text.stdout), text.stdout


def test_money_buckets_tell_the_truth_on_the_deployed_platform(writer, make_config):
    """Spendable money excludes closed channels; what closed channels still hold is "stranded"; a settle
    above the deposit shows as "overdrawn", never netted into another bucket."""
    from zsmon.exporters.payments import PaymentsExporter

    platform = DeployedPayments(writer)
    open_ids = [platform.open_channel("did:agent:1", 10) for _ in range(3)]          # 30 spendable
    settled = [platform.open_channel("did:agent:2", 10) for _ in range(2)]
    for cid in settled:
        platform.settle(cid, 4)                                                       # 2 x 6 stranded
    above = platform.open_channel("did:agent:3", 10)
    platform.settle(above, 15)                                                        # -5 overdrawn
    assert len(open_ids) == 3
    families = collect_families(PaymentsExporter(), make_config(redis=False))
    money = {s.labels["bucket"]: s.value for s in families["zerostate_payment_money"].samples}
    assert money == {"current": 30.0, "escrowed": 0.0, "stranded": 12.0, "overdrawn": 5.0, "settled": 23.0,
                     "refunded": 0.0, "available": 0.0}
    types = {s.labels["type"]: s.value for s in families["zerostate_payment_channel_transactions"].samples}
    assert types["settlement"] == 3 and types["release"] == 0 and types["deposit"] == 0


# ---- reputation -----------------------------------------------------------------------------------

def test_reputation_first_observation_and_crash_gaps(writer, make_config, run_check):
    """Rows created lazily at 50 by reads, task outcomes the platform's way, and three crashes between the
    score update and the event insert. Every memory invariant skips its first observation."""
    sim = ReputationSimulator(writer, seed=8, agents=30, idle_agents=6)
    sim.run(240)
    crashed = set()
    for did in sim.agents[:3]:
        crashed.add(sim.inject_update_without_event(did))
    config = make_config(checkers={"reputation": {"settings": {"settle_seconds": 0}}})
    first = run_check("reputation", config=config)
    assert counts(first) == {"event_counter_reconciliation": 3, "score_replay": 3}
    assert {v.entity_id for v in only(first, "score_replay")} == crashed
    assert set(first.skipped) == {"score_jump", "distribution_drift"}
    assert first.skipped["score_jump"] == "first observation: recorded the scores of 36 agents; judged from the next run"
    assert_true_story(first)
    second = run_check("reputation", config=config)
    assert "score_jump" in second.violation_counts and "distribution_drift" in second.violation_counts


def test_null_score_deltas_are_not_set_not_violations(writer, run_check):
    """score_delta is nullable on the real schema: an event without one is "not set", never a violation."""
    writer.execute("INSERT INTO reputation_scores (agent_did) VALUES ('did:agent:quiet')")
    writer.execute("INSERT INTO reputation_events (agent_did, event_type, task_id, score_delta) "
                   "VALUES ('did:agent:quiet', 'quality_feedback', 't-1', NULL)")
    result = run_check("reputation", redis=False)
    assert counts(result) == {}
    assert result.status == "pass"
    assert_true_story(result)


# ---- auctions -------------------------------------------------------------------------------------

def test_auctions_with_unset_reserve_reputation_and_scores_stay_clean(writer, run_check):
    """reserve_price, min_reputation and the bid scores are NULL on the real schema when not set."""
    auction = writer.execute(
        "INSERT INTO auctions (task_id, user_id, auction_type, status, duration_seconds, expires_at) "
        "VALUES ('t-1', 'user_id', 'reserve', 'open', 60, now() + interval '1 minute') RETURNING id").fetchone()[0]
    bid = writer.execute("INSERT INTO bids (auction_id, agent_did, price) VALUES (%s, 'did:agent:1', 7) "
                         "RETURNING id", (auction,)).fetchone()[0]
    writer.execute("UPDATE auctions SET status = 'awarded', winning_bid_id = %s, final_price = 7 WHERE id = %s",
                   (bid, auction))
    writer.execute("INSERT INTO payment_channels (payer_did, payee_did, auction_id, total_deposit, current_balance, "
                   "state) VALUES ('payer_did', 'did:agent:1', %s, 7, 7, 'open')", (str(auction),))
    result = run_check("auctions", redis=False)
    assert counts(result) == {}, result.to_dict()
    # Awarded without a winner: no numeric difference, and the line says so.
    writer.execute("UPDATE auctions SET winning_bid_id = NULL WHERE id = %s", (auction,))
    broken = run_check("auctions", redis=False)
    (v,) = only(broken, "awarded_has_winner")
    assert v.difference is None and v.actual == "winning_bid_id not set, final_price 7.00000000"
    assert "no numeric difference" in describe_violation(v.to_dict())
    assert_true_story(broken)


def test_time_to_award_skips_auctions_without_a_creation_time(writer, make_config):
    """created_at is nullable on the real schema: such an auction's time to award is unknown, not 0 s."""
    from zsmon.exporters.auctions import AuctionsExporter

    for created in ("now() - interval '30 seconds'", "NULL"):
        writer.execute("INSERT INTO auctions (task_id, user_id, auction_type, status, duration_seconds, expires_at, "
                       f"created_at, updated_at) VALUES ('t', 'user_id', 'first_price', 'awarded', 30, now(), "
                       f"{created}, now() - interval '1 second')")
    families = collect_families(AuctionsExporter(), make_config(redis=False))
    samples = {s.name: s.value for s in families["zerostate_auction_time_to_award_seconds"].samples
               if not s.labels.get("le")}
    count = next(v for k, v in samples.items() if k.endswith("_gcount"))
    total = next(v for k, v in samples.items() if k.endswith("_gsum"))
    assert count == 1 and 28 <= total <= 32


# ---- YAML examples on the platform's own data ------------------------------------------------------

def test_yaml_examples_say_something_useful_on_real_data(writer, make_config, run_check):
    """Nothing writes audit_logs, and tasks stay queued: the examples say so instead of N of N gaps."""
    platform = DeployedPayments(writer)
    cid = platform.open_channel("did:agent:1", 10)
    platform.settle(cid, 4)
    writer.execute("UPDATE channel_transactions SET created_at = now() - interval '10 minutes'")
    writer.execute("""INSERT INTO tasks (task_id, user_did, task_type, status, input, created_at) VALUES
                      ('t-old', 'did:user:1', 'chat', 'queued', '{}', now() - interval '3 hours'),
                      ('t-new', 'did:user:1', 'chat', 'queued', '{}', now() - interval '5 minutes')""")
    writer.execute("INSERT INTO agents (did, name) VALUES ('did:agent:1', 'one')")
    def run(name):
        return run_check(name, config=make_config(checks={"paths": [str(ROOT / "examples" / "checkers")]},
                                                  redis=False))

    audit = run("payment_audit_trail")
    assert audit.violation_counts == {} and audit.status == "pass"
    assert audit.skipped["payment_audit_gap"].startswith("audit_logs holds no payment_channel row at all")
    stuck = run("stuck_tasks")
    (v,) = stuck.violations
    assert v.entity_id == "t-old" and v.actual == "queued" and "never picked up by an agent" in v.detail
    capacity = run("agent_capacity")
    assert capacity.status == "pass" and capacity.violation_counts == {"agent_over_capacity": 0}
    for result in (audit, stuck, capacity):
        assert_true_story(result)


@pytest.mark.parametrize("table", ["accounts", "audit_logs"])
def test_empty_tables_are_judged_not_crashed(writer, run_check, table):
    count = writer.execute(f"SELECT count(*) FROM {table}").fetchone()[0]
    assert count == 0
    result = run_check("payments", redis=False)
    assert result.status == "pass" and result.error is None
