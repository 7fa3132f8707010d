"""The reputation checker, exporter and simulator against the real PostgreSQL and Redis."""
from __future__ import annotations

import json
import os
import random
import subprocess
import sys
import time
import uuid
from datetime import datetime, timedelta, timezone
from decimal import Decimal
from fractions import Fraction
from pathlib import Path

import psycopg
import pytest
import redis as redis_lib
import yaml
from prometheus_client import CollectorRegistry
from prometheus_client.exposition import generate_latest
from prometheus_client.openmetrics.exposition import generate_latest as generate_openmetrics
from prometheus_client.openmetrics.parser import text_string_to_metric_families

from zsmon.checkers.reputation import ReputationChecker, drift_limit, ks_statistic, reset_baseline
from zsmon.app import build_registry
from zsmon.core.service import build_runner
from zsmon.demo.simulator.reputation import ReputationSimulator
from zsmon.core.exporter import CollectContext
from zsmon.exporters.reputation import ReputationExporter
from zsmon.testing import REDIS_URL

ALL = ("score_bounds", "task_counters", "event_counter_reconciliation", "score_replay", "score_delta_range",
       "score_jump", "distribution_drift")


def world(writer, agents: int = 40, steps: int = 600, idle: int = 5, seed: int = 7) -> ReputationSimulator:
    with writer.transaction():  # one commit for the whole history: 25 times faster than one per statement
        sim = ReputationSimulator(writer, seed=seed, agents=agents, idle_agents=idle)
        sim.run(steps)
    return sim


def age(writer, seconds: float) -> None:
    """Move every reputation write ``seconds`` into the past (order kept): history, not writes in flight."""
    writer.execute("UPDATE reputation_scores SET created_at = created_at - make_interval(secs => %(s)s), "
                   "updated_at = updated_at - make_interval(secs => %(s)s)", {"s": seconds})
    writer.execute("UPDATE reputation_events SET created_at = created_at - make_interval(secs => %s)", (seconds,))


def found(result) -> dict[str, set[tuple[str, str]]]:
    out: dict[str, set[tuple[str, str]]] = {}
    for v in result.violations:
        out.setdefault(v.invariant, set()).add((v.entity_type, v.entity_id))
    return out


def nonzero(result) -> dict[str, int]:
    return {k: v for k, v in result.violation_counts.items() if v}


# ---- clean worlds ----------------------------------------------------------------------------

def test_clean_world_twice_no_violations(writer, make_config, run_check):
    sim = world(writer, steps=1500)
    # The unclamped running sum of some agents left [0, 100] on both sides: clamping mattered.
    bounds = writer.execute("""
        SELECT count(*) FILTER (WHERE lo < 0), count(*) FILTER (WHERE hi > 100)
        FROM (SELECT agent_did, min(path) AS lo, max(path) AS hi
              FROM (SELECT agent_did, 50 + sum(score_delta) OVER (PARTITION BY agent_did ORDER BY created_at, id)
                           AS path
                    FROM reputation_events WHERE event_type LIKE 'task_%') AS e
              GROUP BY agent_did) AS a""").fetchone()
    assert bounds[0] > 0 and bounds[1] > 0, "the world must exercise clamping at both bounds"
    cfg = make_config()
    first = run_check("reputation", config=cfg)
    assert first.status == "pass", first.to_dict()
    assert nonzero(first) == {}
    # Every invariant that needs memory skips its first observation, saying why.
    assert set(first.violation_counts) == set(ALL) - {"distribution_drift", "score_jump"}
    assert first.skipped["distribution_drift"] == "baseline recorded now; drift judged from the next run"
    agents = writer.execute("SELECT count(*) FROM reputation_scores").fetchone()[0]
    assert first.skipped["score_jump"] == (f"first observation: recorded the scores of {agents} agents; "
                                           "judged from the next run")
    sim.run(20)  # a slightly evolved population
    second = run_check("reputation", config=cfg)
    assert second.status == "pass", second.to_dict()
    assert set(second.violation_counts) == set(ALL) and nonzero(second) == {}
    assert second.skipped == {}
    assert "KS statistic" in second.summaries["distribution_drift"]


def test_platform_day_one_lazy_rows_are_clean(writer, run_check):
    """What the deployed platform writes first: rows created at 50 by reads, no events at all."""
    ReputationSimulator(writer, seed=3, agents=0, idle_agents=35)
    result = run_check("reputation")
    assert result.status == "pass" and nonzero(result) == {}
    assert "distribution_drift" in result.skipped


def test_replay_matches_stepwise_on_violent_paths(writer, run_check):
    """The closed-form clamped replay in SQL equals a literal replay, bounds hit often, timestamps tied."""
    rng = random.Random(11)
    base = datetime(2026, 1, 1, tzinfo=timezone.utc)
    agents, events = [], []
    for a in range(60):
        did = f"did:test:violent-{a:03d}"
        rows = []
        for k in range(rng.randint(0, 40)):
            failed = rng.random() < 0.4
            delta = Decimal(rng.choice([-5, -40, 70, rng.randint(-3000, 3000) / 100])).quantize(Decimal("0.01"))
            # Several events share a timestamp: the order is then (created_at, id).
            at = base + timedelta(seconds=k // 3)
            rows.append((uuid.UUID(int=rng.getrandbits(128), version=4), did,
                         "task_failed" if failed else "task_completed", delta, at))
        rows.append((uuid.uuid4(), did, "quality_feedback", Decimal("-99.00"), base))  # ignored by the replay
        score = Decimal(50)
        for row in sorted((r for r in rows if r[2] != "quality_feedback"), key=lambda r: (r[4], str(r[0]))):
            score = min(Decimal(100), max(Decimal(0), score + row[3]))
        ok = sum(1 for r in rows if r[2] == "task_completed")
        bad = sum(1 for r in rows if r[2] == "task_failed")
        agents.append((did, score, ok + bad, ok, bad))
        events.extend(rows)
    with writer.cursor() as cur:
        cur.executemany("INSERT INTO reputation_scores (agent_did, overall_score, total_tasks, successful_tasks, "
                        "failed_tasks) VALUES (%s, %s, %s, %s, %s)", agents)
        cur.executemany("INSERT INTO reputation_events (id, agent_did, event_type, score_delta, created_at) "
                        "VALUES (%s, %s, %s, %s, %s)", events)
    result = run_check("reputation", redis=False)
    for inv in ("score_bounds", "task_counters", "event_counter_reconciliation", "score_replay"):
        assert result.violation_counts[inv] == 0, [v.to_dict() for v in result.violations if v.invariant == inv]
    assert result.violation_counts["score_delta_range"] > 0  # the violent deltas themselves are out of range


# ---- one fault, exactly its invariant ----------------------------------------------------------

FAULTS = [
    ("inject_score_out_of_range", {"score_bounds": "agent"}),
    ("inject_counter_drift", {"task_counters": "agent"}),
    # A crash between the two writes breaks the counters' and the score's agreement with the events.
    ("inject_update_without_event", {"event_counter_reconciliation": "agent", "score_replay": "agent"}),
    ("inject_event_without_update", {"event_counter_reconciliation": "agent", "score_replay": "agent"}),
    ("inject_score_tamper", {"score_replay": "agent"}),
    ("inject_out_of_range_delta", {"score_delta_range": "event"}),
]


@pytest.mark.parametrize("fault,expected", FAULTS, ids=[f for f, _ in FAULTS])
def test_one_fault_reports_exactly_its_invariant(writer, make_config, run_check, fault, expected):
    sim = world(writer, seed=sum(map(ord, fault)))
    cfg = make_config()
    clean = run_check("reputation", config=cfg)
    assert nonzero(clean) == {}, clean.to_dict()
    entity = getattr(sim, fault)()
    age(writer, 120)  # planted two minutes ago: older than the settle window, as a crash seen later is
    result = run_check("reputation", config=cfg)
    assert result.status == "fail"
    assert nonzero(result) == {inv: 1 for inv in expected}, result.to_dict()
    assert found(result) == {inv: {(etype, entity)} for inv, etype in expected.items()}


def test_between_the_two_writes_is_deferred_not_reported(writer, run_check):
    """A run landing between the platform's score update and its event insert reports nothing for the agent;
    the same state older than settle_seconds is a crash and is reported."""
    sim = world(writer, steps=200)
    age(writer, 3600)  # history, an hour old
    did = sim._mid_agent()
    sim.outcome(did, True, event=False)  # the score update just committed; its event is not written yet
    now = run_check("reputation", redis=False)
    assert now.status == "pass" and nonzero(now) == {}, now.to_dict()
    for inv in ("event_counter_reconciliation", "score_replay"):
        assert now.summaries[inv].startswith("1 of 45 agents deferred, not judged in this run"), now.summaries
        assert did in now.summaries[inv]
    assert "deferred" not in now.summaries.get("task_counters", "")
    # A longer window defers it as well; no window reports it at once.
    assert nonzero(run_check("reputation", redis=False, checkers={
        "reputation": {"settings": {"settle_seconds": 600}}})) == {}
    at_once = run_check("reputation", redis=False, checkers={"reputation": {"settings": {"settle_seconds": 0}}})
    assert found(at_once) == {"event_counter_reconciliation": {("agent", did)}, "score_replay": {("agent", did)}}
    assert not any("deferred" in text for text in at_once.summaries.values())

    # The event never came: 61 s later the pair is still out of step, a crash.
    writer.execute("UPDATE reputation_scores SET updated_at = transaction_timestamp() - interval '61 seconds' "
                   "WHERE agent_did = %s", (did,))
    later = run_check("reputation", redis=False)
    assert later.status == "fail"
    assert found(later) == {"event_counter_reconciliation": {("agent", did)}, "score_replay": {("agent", did)}}
    assert not any("deferred" in text for text in later.summaries.values())


def test_a_crash_gap_hidden_by_traffic_is_judged_after_three_runs_over_the_window(writer, make_config):
    """A busy agent is always 'written lately': a crash gap in its counters must not hide behind that forever,
    while an agent caught between its two writes now and then (a different task each time) stays deferred."""
    sim = world(writer, steps=200)
    age(writer, 3600)
    agents = sorted(writer.execute("SELECT agent_did FROM reputation_scores WHERE agent_did = ANY(%s) "
                                   "AND overall_score BETWEEN 20 AND 80", (sim.agents,)).fetchall())
    (crashed,), (flapping,) = agents[:2]
    sim.outcome(crashed, True, Decimal(2), event=False)  # the crash: this update's event never comes
    runner = build_runner(build_registry(make_config(checkers={"reputation": {"settings": {"settle_seconds": 1}}})),
                          only=["reputation"])
    try:
        def run_busy(flapping_in_flight: bool):
            sim.outcome(crashed, True, Decimal(2))  # traffic keeps the crashed agent 'written lately'
            if flapping_in_flight:
                sim.outcome(flapping, True, Decimal(2), event=False)  # caught between its two writes
            result = runner.run_check("reputation")
            if flapping_in_flight:  # ... and its event lands right after the run
                sim.outcome(flapping, True, Decimal(2), update=False)
            return result

        first = run_busy(True)
        assert nonzero(first) == {}
        assert first.summaries["event_counter_reconciliation"].startswith("2 of 45 agents deferred")
        time.sleep(1.1)
        second = run_busy(False)  # still inside the rule: two runs, not three
        assert nonzero(second) == {}
        assert second.summaries["event_counter_reconciliation"].startswith("1 of 45 agents deferred")
        third = run_busy(True)  # the flapping agent starts over; the crashed one is judged
        assert found(third) == {"event_counter_reconciliation": {("agent", crashed)},
                                "score_replay": {("agent", crashed)}}, third.to_dict()
        (v,) = [v for v in third.violations if v.invariant == "event_counter_reconciliation"]
        assert v.difference == 1
        text = third.summaries["event_counter_reconciliation"]
        assert f"1 agents judged although written lately (e.g. {crashed})" in text
        assert "1 of 45 agents deferred" in text  # the flapping agent, deferred again
        assert nonzero(run_busy(False)) == {"event_counter_reconciliation": 1, "score_replay": 1}  # and stays
        # Repaired (the missing event written): judged clean, and forgotten.
        sim.outcome(crashed, True, Decimal(2), update=False)
        repaired = runner.run_check("reputation")
        assert nonzero(repaired) == {}, repaired.to_dict()
    finally:
        runner.db.close()


def test_settle_window_defers_only_the_in_between_shape(writer, run_check):
    """Recent faults that no in-flight write explains are reported at once; a recent task event defers too."""
    sim = world(writer, steps=200)
    age(writer, 3600)
    agents = sorted(writer.execute("SELECT agent_did FROM reputation_scores WHERE agent_did = ANY(%s) "
                                   "AND overall_score BETWEEN 10 AND 90", (sim.agents,)).fetchall())
    (early,), (tampered,), (pending,), (quiet,) = agents[:4]
    sim.inject_event_without_update(early)   # events ahead of the counters: never an in-flight state
    sim.inject_score_tamper(tampered)        # counters in step, score off: never an in-flight state
    # Two overlapping outcomes: both updates, then the first event; the row's updated_at is not bumped
    # (the platform's lazy rows may keep it), only the recent event tells the agent is busy.
    sim.outcome(pending, True, Decimal(2), event=False)
    sim.outcome(pending, False, event=False)
    sim.outcome(pending, True, Decimal(2), update=False)
    writer.execute("UPDATE reputation_scores SET updated_at = created_at WHERE agent_did = %s", (pending,))
    # Counters ahead and old on both sides: reported.
    sim.outcome(quiet, True, event=False)
    writer.execute("UPDATE reputation_scores SET updated_at = created_at WHERE agent_did = %s", (quiet,))
    result = run_check("reputation", redis=False)
    assert found(result) == {"event_counter_reconciliation": {("agent", early), ("agent", quiet)},
                             "score_replay": {("agent", early), ("agent", tampered), ("agent", quiet)}}
    assert f"1 of 45 agents deferred, not judged in this run (e.g. {pending})" in \
        result.summaries["event_counter_reconciliation"]


def test_overall_score_out_of_range_names_the_column(writer, run_check):
    sim = world(writer, steps=200)
    did = sim.inject_score_out_of_range(column="overall_score", value=Decimal("-3.00"))
    result = run_check("reputation", redis=False)
    bounds = [v for v in result.violations if v.invariant == "score_bounds"]
    assert [(v.entity_id, v.actual, v.difference) for v in bounds] == [(did, "-3.00", Decimal("-3.00"))]
    assert "overall_score = -3.00" in bounds[0].detail


def test_score_jump_across_two_runs(writer, make_config, run_check):
    sim = world(writer)
    cfg = make_config()
    first = run_check("reputation", config=cfg)
    # A first observation is never a pass: skipped, saying what it recorded.
    assert "score_jump" not in first.violation_counts
    assert first.skipped["score_jump"].startswith("first observation: recorded the scores of ")
    did = sim.inject_sudden_jump()
    second = run_check("reputation", config=cfg)
    assert nonzero(second) == {"score_jump": 1}, second.to_dict()
    (v,) = second.violations
    assert (v.entity_type, v.entity_id) == ("agent", did) and v.difference > 20
    # Every agent was compared, the unchanged ones without being parsed (changes_only): the count says so.
    agents = writer.execute("SELECT count(*) FROM reputation_scores").fetchone()[0]
    assert second.summaries["score_jump"].startswith(f"1 of {agents} agents observed twice moved more than 20")
    third = run_check("reputation", config=cfg)  # the jump is now the last observation
    assert nonzero(third) == {}
    # A higher limit from the config lets the same jump pass.
    sim.inject_sudden_jump(points=Decimal(25))
    relaxed = make_config(checkers={"reputation": {"settings": {"jump_limit": 30}}})  # same Redis prefix
    assert run_check("reputation", config=relaxed).violation_counts["score_jump"] == 0


def test_memory_invariants_skipped_without_redis(writer, run_check):
    world(writer, steps=100)
    result = run_check("reputation", redis=False)
    assert set(result.skipped) == {"score_jump", "distribution_drift"}
    assert all("needs memory" in reason for reason in result.skipped.values())
    assert set(result.violation_counts) == set(ALL) - {"score_jump", "distribution_drift"}


# ---- distribution drift -------------------------------------------------------------------------

def test_drift_quiet_when_stationary_fires_on_shift_and_resets(writer, make_config, redis_prefix):
    sim = world(writer, agents=60, steps=900)
    cfg = make_config()
    runner = build_runner(build_registry(cfg), only=["reputation"])
    checker = runner.checkers["reputation"].checker
    registry = CollectorRegistry()
    checker.register_metrics(registry)
    ks = lambda: registry.get_sample_value("zerostate_reputation_drift_ks_statistic")  # noqa: E731
    try:
        first = runner.run_check("reputation")
        assert "distribution_drift" in first.skipped and ks() is None
        sim.run(30)
        stationary = runner.run_check("reputation")
        assert nonzero(stationary) == {} and stationary.violation_counts["distribution_drift"] == 0
        assert 0 <= ks() < 0.25

        assert sim.inject_population_shift() == "global"
        shifted = runner.run_check("reputation")
        assert nonzero(shifted) == {"distribution_drift": 1}, shifted.to_dict()
        (v,) = shifted.violations
        assert (v.entity_type, v.entity_id) == ("system", "global") and v.actual > Decimal("0.25")
        assert ks() == pytest.approx(float(v.actual), abs=1e-6)
        # It keeps firing against the old baseline until an operator resets it.
        assert runner.run_check("reputation").violation_counts["distribution_drift"] == 1

        client = redis_lib.Redis.from_url(REDIS_URL, decode_responses=True)
        assert reset_baseline(client, runner.deployment.prefix) is True
        assert reset_baseline(client, runner.deployment.prefix) is False
        client.close()
        after_reset = runner.run_check("reputation")
        assert after_reset.skipped == {"distribution_drift": "baseline recorded now; drift judged from the next run"}
        assert nonzero(after_reset) == {} and ks() is None
        assert runner.run_check("reputation").violation_counts["distribution_drift"] == 0
    finally:
        runner.db.close()


def test_drift_significance_keeps_sampling_noise_quiet_and_still_fires_on_a_shift(writer, make_config,
                                                                                  redis_prefix):
    sim = world(writer, agents=40, idle=0, steps=600, seed=11)
    fixed = build_runner(build_registry(make_config()), only=["reputation"])
    scaled = build_runner(build_registry(make_config(checkers={"reputation": {"settings": {
        "drift_significance": 0.01}}})), only=["reputation"])
    critical = drift_limit(0.25, 0.01, 40, 40)[0]
    assert Decimal("0.36") < critical < Decimal("0.37")  # 1.628 * sqrt(80 / 1600)
    try:
        assert "distribution_drift" in fixed.run_check("reputation").skipped  # the baseline (shared key)
        # Most agents gain 18 points: a statistic (0.275) a 40-agent population reaches by chance.
        sim.inject_population_shift(share=0.75)
        small = fixed.run_check("reputation")
        (v,) = small.violations
        assert Decimal("0.25") < v.actual < critical, v  # the world is seeded: the statistic lands here
        assert v.expected == Decimal("0.25")
        quiet = scaled.run_check("reputation")
        assert nonzero(quiet) == {} and quiet.violation_counts["distribution_drift"] == 0
        assert f"limit {critical} (KS critical value at significance 0.01 for 40 and 40 agents)" in \
            quiet.summaries["distribution_drift"]
        # Every agent moves: far above the critical value, so the scaled limit fires too.
        sim.inject_population_shift(share=1.0)
        (big,) = scaled.run_check("reputation").violations
        assert big.actual > critical and big.expected == critical
    finally:
        fixed.db.close()
        scaled.db.close()


def test_drift_limit_is_the_larger_of_threshold_and_critical_value():
    assert drift_limit(0.25, None, 30, 30) == (Decimal("0.25"), "")
    assert drift_limit(0.25, 0.05, 10_000, 10_000) == (Decimal("0.25"), "")  # large N: the threshold rules
    limit, why = drift_limit(0.25, 0.05, 30, 30)
    assert limit == Decimal("0.350661") and "significance 0.05 for 30 and 30" in why  # 1.3581 * sqrt(2/30)


def test_drift_skipped_below_min_sample(writer, make_config, run_check):
    world(writer, agents=10, idle=0, steps=100)
    result = run_check("reputation")
    assert "fewer than drift_min_sample (30)" in result.skipped["distribution_drift"]
    lowered = run_check("reputation", checkers={"reputation": {"settings": {"drift_min_sample": 5}}})
    assert lowered.skipped == {"distribution_drift": "baseline recorded now; drift judged from the next run"}


def test_ks_statistic_is_exact():
    rng = random.Random(5)

    def brute(a: list[Decimal], b: list[Decimal]) -> Fraction:
        points = sorted(set(a) | set(b))
        return max(abs(Fraction(sum(x <= p for x in a), len(a)) - Fraction(sum(x <= p for x in b), len(b)))
                   for p in points)

    def hist(xs: list[Decimal]) -> list[tuple[Decimal, int]]:
        return sorted((v, xs.count(v)) for v in set(xs))

    for _ in range(300):
        a = [Decimal(rng.randint(0, 40)) / 4 for _ in range(rng.randint(1, 40))]
        b = [Decimal(rng.randint(0, 40)) / 4 + rng.choice([0, 1]) for _ in range(rng.randint(1, 40))]
        assert ks_statistic(hist(a), hist(b)) == brute(a, b)
    assert ks_statistic([(Decimal(1), 5)], [(Decimal(1), 7)]) == 0
    assert ks_statistic([(Decimal(1), 5)], [(Decimal(2), 7)]) == 1


# ---- CLI ---------------------------------------------------------------------------------------

def test_cli_exit_codes(writer, db_url, redis_prefix, tmp_path):
    sim = world(writer, steps=200)
    config = tmp_path / "zsmon.yml"
    config.write_text(yaml.safe_dump({"redis": {"key_prefix": redis_prefix}}))
    kw = redis_lib.Redis.from_url(REDIS_URL).connection_pool.connection_kwargs
    env = {**os.environ, "ZSMON_DATABASE_URL": db_url, "REDIS_HOST": str(kw.get("host", "127.0.0.1")),
           "REDIS_PORT": str(kw.get("port", 6379)), "ZSMON_CONFIG": str(config)}
    cmd = [str(Path(sys.executable).parent / "zsmon"), "check", "--once", "--only", "reputation", "--format", "json"]
    clean = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=60)
    assert clean.returncode == 0, clean.stderr
    did = sim.inject_counter_drift()
    broken = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=60)
    assert broken.returncode == 1, broken.stderr
    (check,) = json.loads(broken.stdout)["checks"]
    assert check["checker"] == "reputation" and check["status"] == "fail"
    assert check["violation_counts"]["task_counters"] == 1
    assert [(v["invariant"], v["entity_id"]) for v in check["violations"]] == [("task_counters", did)]


# ---- exporter ----------------------------------------------------------------------------------

def test_exporter_families_render_and_pass_promtool(writer, db_url, tmp_path):
    world(writer, steps=300)
    exporter = ReputationExporter()
    with psycopg.connect(db_url) as conn:
        conn.read_only = True
        families = list(exporter.collect(CollectContext(exporter, conn, None, None, None)))
        agents, total, below_50 = conn.execute(
            "SELECT count(*), sum(overall_score), count(*) FILTER (WHERE overall_score <= 50) "
            "FROM reputation_scores").fetchone()
        events = dict(conn.execute("SELECT event_type, count(*) FROM reputation_events GROUP BY 1").fetchall())
    registry = CollectorRegistry()
    registry.register(type("Cached", (), {"collect": lambda self: families})())
    checker = ReputationChecker()
    checker.register_metrics(registry)
    checker._set_ks(0.125)

    get = registry.get_sample_value
    assert get("zerostate_reputation_agents") == agents
    assert get("zerostate_reputation_score_gcount") == agents
    assert get("zerostate_reputation_score_gsum") == pytest.approx(float(total))
    assert get("zerostate_reputation_score_bucket", {"le": "50.0"}) == below_50
    assert get("zerostate_reputation_score_bucket", {"le": "+Inf"}) == agents
    buckets = [get("zerostate_reputation_score_bucket", {"le": f"{le}.0"}) for le in range(10, 101, 10)]
    assert buckets == sorted(buckets)
    p = [get("zerostate_reputation_score_quantile", {"quantile": q}) for q in ("0.1", "0.5", "0.9")]
    assert p == sorted(p) and 0 <= p[0] and p[2] <= 100
    assert get("zerostate_reputation_events_total", {"event_type": "task_completed"}) == events["task_completed"]
    assert get("zerostate_reputation_events_total", {"event_type": "other"}) == events.get("quality_feedback", 0)
    assert get("zerostate_reputation_drift_ks_statistic") == 0.125

    text = generate_latest(registry).decode()
    om = generate_openmetrics(registry).decode()
    assert "did:" not in text  # never a per-agent label
    types = {f.name: f.type for f in text_string_to_metric_families(om)}
    assert types == {"zerostate_reputation_score": "gaugehistogram", "zerostate_reputation_score_quantile": "summary",
                     "zerostate_reputation_agents": "gauge", "zerostate_reputation_events": "counter",
                     "zerostate_reputation_drift_ks_statistic": "gauge"}
    promtool = subprocess.run(["promtool", "check", "metrics"], input=text, capture_output=True, text=True,
                              timeout=30)
    assert promtool.returncode == 0, promtool.stdout + promtool.stderr


def test_exporter_on_empty_tables(writer, db_url):
    exporter = ReputationExporter()
    with psycopg.connect(db_url) as conn:
        families = {f.name: f for f in exporter.collect(CollectContext(exporter, conn, None, None, None))}
    assert families["zerostate_reputation_agents"].samples[0].value == 0
    assert families["zerostate_reputation_score_quantile"].samples == []
    assert {s.labels["event_type"]: s.value for s in families["zerostate_reputation_events"].samples} == {
        "task_completed": 0, "task_failed": 0, "other": 0}
