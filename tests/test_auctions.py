"""The ``auctions`` checker and exporter against the real database, worlds built by the simulator."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from decimal import Decimal
from pathlib import Path

import pytest
import yaml

from zsmon.checkers.auctions import AuctionsChecker
from zsmon.demo.simulator.auctions import AuctionSimulator

INVARIANTS = [i.id for i in AuctionsChecker.invariants]
ENTITY = {i.id: i.entity_type for i in AuctionsChecker.invariants}
WORLD = 32  # auctions: enough that >= 20 end in the window (min_sample 20) whatever the random durations


def world(writer, seed: int = 7, ranking: str = "highest_composite") -> AuctionSimulator:
    return AuctionSimulator(writer, seed=seed, ranking=ranking).run_until(auctions=WORLD)


def assert_clean(result) -> None:
    assert result.status == "pass", result.to_dict()
    assert result.violation_counts == {i: 0 for i in INVARIANTS}, result.to_dict()
    assert result.skipped == {}


def only(result, invariant: str) -> list:
    """The counts other than ``invariant`` are all zero; returns its violations."""
    others = {k: v for k, v in result.violation_counts.items() if k != invariant and v}
    assert others == {}, result.to_dict()
    return [v for v in result.violations if v.invariant == invariant]


@pytest.mark.parametrize("invariant", INVARIANTS)
def test_clean_world_then_one_fault(writer, run_check, make_config, invariant):
    sim = world(writer)
    config = make_config(redis=False)
    assert_clean(run_check("auctions", config=config))

    entity_id = sim.inject(invariant)
    result = run_check("auctions", config=config)
    assert result.status == "fail"
    found = only(result, invariant)
    assert result.violation_counts[invariant] == 1, result.to_dict()
    assert [(v.entity_type, v.entity_id) for v in found] == [(ENTITY[invariant], entity_id)]
    assert found[0].detail


def test_final_price_above_budget_names_the_auction(writer, run_check):
    sim = world(writer)
    auction_id = sim.inject_final_price_above_budget()
    result = run_check("auctions", redis=False)
    found = only(result, "price_within_bounds")
    kinds = sorted((v.entity_type, v.expected, v.actual) for v in found)
    assert kinds == [("auction", Decimal("80.00000000"), Decimal("90.00000000")),
                     ("bid", Decimal("80.00000000"), Decimal("90.00000000"))]
    assert next(v for v in found if v.entity_type == "auction").entity_id == auction_id


def test_both_ranking_directions(writer, run_check, make_config):
    AuctionSimulator(writer, seed=3, ranking="lowest_composite").run_until(auctions=WORLD)
    lowest = make_config(redis=False, checkers={"auctions": {"settings": {"ranking": "lowest_composite"}}})
    assert_clean(run_check("auctions", config=lowest))

    result = run_check("auctions", redis=False)  # default: highest_composite
    fired = {k for k, v in result.violation_counts.items() if v}
    # Under the wrong direction a second_price auction's "second-ranked" price moves as well.
    assert fired <= {"winner_is_top_ranked", "final_price_rule"} and "winner_is_top_ranked" in fired
    found = [v for v in result.violations if v.invariant == "winner_is_top_ranked"]
    assert found and all(v.difference < 0 for v in found)  # the winner scored below the best bid
    priced = {v.entity_id for v in result.violations if v.invariant == "final_price_rule"}
    if priced:
        types = {r[0] for r in writer.execute("SELECT DISTINCT auction_type FROM auctions WHERE id::text = ANY(%s)",
                                               (list(priced),))}
        assert types == {"second_price"}


def test_allocation_rate_needs_minimum_sample(writer, run_check):
    sim = AuctionSimulator(writer, seed=5)
    sim.inject_unallocated_burst(5)  # 5 of 5 ended auctions unawarded, but too few to judge
    result = run_check("auctions", redis=False)
    assert result.status == "pass"
    assert result.skipped == {"allocation_success_rate": "only 5 auctions ended in the window; needs ≥ 20"}
    assert "allocation_success_rate" not in result.violation_counts


def test_allocation_rate_violation_values(writer, run_check):
    world(writer).inject_unallocated_burst(25)
    result = run_check("auctions", redis=False)
    (v,) = only(result, "allocation_success_rate")
    assert (v.entity_type, v.entity_id, v.expected) == ("global", "global", Decimal("0.8000"))
    assert v.actual < Decimal("0.8") and v.difference == v.actual - v.expected
    assert "were awarded" in result.summaries["allocation_success_rate"]


def test_deployed_platform_counts_and_summaries_without_flood(writer, run_check):
    sim = AuctionSimulator(writer, seed=11)
    ids = sim.deployed_platform_traffic(120, bids_per_auction=3)
    result = run_check("auctions", redis=False, checks={"sample_limit": 10})
    counts = result.violation_counts
    assert counts["stale_open_auction"] == 120
    below = writer.execute("SELECT count(*) FROM bids b JOIN auctions a ON a.id = b.auction_id "
                           "WHERE b.price < a.reserve_price").fetchone()[0]
    assert counts["price_within_bounds"] == below > 0
    assert counts["allocation_success_rate"] == 1  # every ended auction is stuck open: ratio 0
    v = next(v for v in result.violations if v.invariant == "allocation_success_rate")
    assert v.actual == 0
    for inv in ("stale_open_auction", "price_within_bounds"):
        assert len([v for v in result.violations if v.invariant == inv]) == 10
    stale = [v for v in result.violations if v.invariant == "stale_open_auction"]
    assert stale[0].entity_id == ids[-1]  # the oldest first
    assert result.summaries["stale_open_auction"].startswith("120 of 120 open auctions")
    assert "below their auction's reserve_price" in result.summaries["price_within_bounds"]
    assert result.summaries["allocation_success_rate"].startswith("0 of ")
    # With the literal reading of "ended" (status not open), nothing ended: the ratio is not judged.
    literal = run_check("auctions", redis=False,
                        checkers={"auctions": {"settings": {"stale_open_counts_as_ended": False}}})
    assert literal.skipped["allocation_success_rate"].startswith("only 0 auctions")


def test_incremental_sees_new_faults_and_keeps_old_ones(writer, run_check, make_config):
    sim = world(writer)
    config = make_config()  # with Redis: watermark and tracked violators
    old = sim.inject_awarded_without_channel()  # planted in the past: only a full sweep can find it
    first = run_check("auctions", mode="full", config=config)
    assert first.mode == "full" and first.violation_counts["awarded_without_channel"] == 1

    again = run_check("auctions", mode="incremental", config=config)
    assert again.mode == "incremental"
    assert again.violation_counts["awarded_without_channel"] == 1  # tracked: no flapping between modes
    assert [v.entity_id for v in again.violations] == [old]

    bid = sim.inject_bid_above_budget()
    wrong = sim.inject_wrong_second_price()
    third = run_check("auctions", mode="incremental", config=config)
    assert third.mode == "incremental"
    assert {k: v for k, v in third.violation_counts.items() if v} == {
        "awarded_without_channel": 1, "price_within_bounds": 1, "final_price_rule": 1}
    assert {v.entity_id for v in third.violations} == {old, bid, wrong}

    # The missing channel appears: the tracked auction is re-judged and clears.
    writer.execute("INSERT INTO payment_channels (payer_did, payee_did, auction_id, total_deposit, current_balance, "
                   "state) VALUES ('p', 'q', %s, 10, 10, 'open')", (old,))
    fourth = run_check("auctions", mode="incremental", config=config)
    assert fourth.violation_counts["awarded_without_channel"] == 0


def test_incremental_without_state_falls_back_to_full(writer, run_check, make_config):
    world(writer)
    result = run_check("auctions", mode="incremental", config=make_config())
    assert result.mode == "full"
    assert_clean(result)


def test_exporter_families(writer, make_config):
    from prometheus_client import generate_latest
    from prometheus_client.openmetrics.exposition import generate_latest as openmetrics_latest
    from prometheus_client.openmetrics.parser import text_string_to_metric_families as openmetrics_families
    from prometheus_client.parser import text_string_to_metric_families

    from zsmon.core.metrics import Metrics
    from zsmon.app import build_registry
    from zsmon.core.service import build_runner
    from zsmon.core.store import ResultStore

    world(writer)
    AuctionSimulator(writer, seed=99).inject_unallocated_burst(3)
    config = make_config(redis=False)
    store = ResultStore()
    metrics = Metrics(store)
    runner = build_runner(build_registry(config), only=["auctions"], metrics=metrics, store=store,
                          exporters=["auctions"])
    try:
        runner.collect("auctions")
    finally:
        runner.db.close()
    text = generate_latest(metrics.registry).decode()
    fams = {f.name: f for f in text_string_to_metric_families(text)}
    status = {s.labels["status"]: s.value for s in fams["zerostate_auctions"].samples}
    db = dict(writer.execute("SELECT status, count(*) FROM auctions GROUP BY status").fetchall())
    assert set(status) == {"open", "closed", "awarded", "canceled", "expired"}
    assert all(status[k] == db.get(k, 0) for k in status)
    bids = writer.execute("SELECT count(*) FROM bids").fetchone()[0]
    assert [s.value for s in fams["zerostate_auction_bids"].samples if s.name.endswith("_total")] == [bids]
    per = {s.labels.get("le"): s.value for s in fams["zerostate_auction_bids_per_auction"].samples
           if s.name.endswith("_bucket")}
    assert list(per) == ["0.0", "1.0", "2.0", "3.0", "5.0", "8.0", "13.0", "21.0", "+Inf"]
    assert per["0.0"] >= 3  # the burst's auctions had no bids
    # Snapshots of the window, whose buckets fall as auctions leave it: gauge histograms, never counter ones
    # (rate() would read every fall as a counter reset). Text format: the buckets, then _gcount/_gsum gauges.
    assert fams["zerostate_auction_time_to_award_seconds_gcount"].type == "gauge"
    assert fams["zerostate_auction_time_to_award_seconds_gcount"].samples[0].value > 0
    assert fams["zerostate_auction_bids_per_auction_gcount"].samples[0].value == per["+Inf"]
    ended_bids = writer.execute(
        "SELECT count(*) FROM bids b JOIN auctions a ON a.id = b.auction_id "
        "WHERE a.expires_at > now() - interval '1 hour' AND a.expires_at <= now() "
        "AND a.status NOT IN ('open', 'canceled')").fetchone()[0]
    assert fams["zerostate_auction_bids_per_auction_gsum"].samples[0].value == ended_bids
    for family in ("zerostate_auction_bids_per_auction", "zerostate_auction_time_to_award_seconds"):
        assert {s.name for s in fams[family].samples} == {f"{family}_bucket"}, "no counter _count/_sum"
    om = openmetrics_latest(metrics.registry).decode()
    om_fams = {f.name: f for f in openmetrics_families(om)}
    for family in ("zerostate_auction_bids_per_auction", "zerostate_auction_time_to_award_seconds"):
        assert om_fams[family].type == "gaugehistogram", family
        assert {s.name for s in om_fams[family].samples} == {f"{family}_bucket", f"{family}_gcount",
                                                               f"{family}_gsum"}
    ratio = fams["zerostate_auction_allocation_success_ratio"].samples[0].value
    ended, awarded = writer.execute(
        "SELECT count(*), count(*) FILTER (WHERE status = 'awarded') FROM auctions "
        "WHERE expires_at > now() - interval '1 hour' AND expires_at <= now() "
        "AND status NOT IN ('open', 'canceled')").fetchone()
    assert ratio == pytest.approx(awarded / ended)
    promtool = "/usr/bin/promtool"
    if os.path.exists(promtool):
        lint = subprocess.run([promtool, "check", "metrics"], input=text.encode(), capture_output=True)
        assert b"zerostate_auction" not in lint.stdout + lint.stderr, lint.stdout + lint.stderr


def test_exporter_omits_ratio_without_ended_auctions(writer, make_config):
    from zsmon.exporters.auctions import AuctionsExporter
    from zsmon.core.exporter import CollectContext
    import psycopg

    config = make_config(redis=False)
    exporter = AuctionsExporter()
    with psycopg.connect(config.database.url.get_secret_value()) as conn:
        names = [f.name for f in exporter.collect(CollectContext(exporter, conn, None, config, None))]
    assert "zerostate_auction_allocation_success_ratio" not in names
    assert {"zerostate_auctions", "zerostate_auction_bids", "zerostate_auction_bids_per_auction",
            "zerostate_auction_time_to_award_seconds"} <= set(names)


def test_cli_exit_codes(writer, db_url, redis_prefix, tmp_path):
    sim = world(writer)
    cfg = tmp_path / "zsmon.yml"
    cfg.write_text(yaml.safe_dump({"redis": {"key_prefix": redis_prefix}}))
    env = {**os.environ, "ZSMON_DATABASE_URL": db_url, "REDIS_HOST": "127.0.0.1"}
    zsmon = str(Path(sys.executable).with_name("zsmon"))
    cmd = [zsmon, "--config", str(cfg), "check", "--once", "--only", "auctions", "--format", "json"]

    clean = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=60)
    assert clean.returncode == 0, clean.stderr
    assert json.loads(clean.stdout)["checks"][0]["status"] == "pass"

    stuck = sim.inject_stuck_open_auction()
    dirty = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=60)
    assert dirty.returncode == 1, dirty.stderr
    (check,) = json.loads(dirty.stdout)["checks"]
    assert check["violation_counts"]["stale_open_auction"] == 1
    assert [v["entity_id"] for v in check["violations"]] == [stuck]


def test_live_steps_follow_the_wall_clock(writer, run_check):
    sim = AuctionSimulator(writer, seed=13)  # a demo loop: bare step()s are live traffic
    for _ in range(40):
        sim.step()
    oldest = writer.execute("SELECT min(created_at) > now() - interval '1 minute' FROM auctions").fetchone()[0]
    assert oldest is True
    result = run_check("auctions", redis=False)
    assert result.status == "pass", result.to_dict()
    assert len(sim.open) <= sim.concurrency + 1


def test_auction_worlds_keep_the_payments_checker_clean(writer, run_check):
    from zsmon.app import build_registry
    from zsmon.core.config import Config

    if "payments" not in build_registry(Config()).checker_classes:
        pytest.skip("payments checker not in this build")
    world(writer)
    result = run_check("payments", redis=False)
    assert result.status == "pass", result.to_dict()
