"""The payments checker, its exporter and simulator against the real PostgreSQL and Redis."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from decimal import Decimal
from pathlib import Path

import psycopg
import pytest
import yaml
from prometheus_client import CollectorRegistry
from prometheus_client.exposition import generate_latest

from zsmon.checkers.payments import PaymentsChecker
from zsmon.core.results import CheckResult
from zsmon.demo.simulator.payments import FAULTS, UNIT, PaymentSimulator, inject_fault
from zsmon.testing import collect_families
from zsmon.exporters.payments import PaymentsExporter

ROOT = Path(__file__).resolve().parents[1]
ALL = tuple(i.id for i in PaymentsChecker.invariants)


def world(writer, seed: int = 3, steps: int = 300) -> PaymentSimulator:
    """Random correct traffic, then one channel in each state the faults need."""
    sim = PaymentSimulator(writer, seed=seed)
    sim.run(steps)
    payer, payee = sim.users[0], sim.agents[0]
    sim.deposit(payer, Decimal("500"))
    a = sim.open_channel(payer, payee, Decimal("50"))
    assert sim.lock_escrow(a, Decimal("7.5")) and sim.release_escrow(a, success=True) == Decimal("7.5")
    b = sim.open_channel(payer, payee, Decimal("40"))
    assert sim.lock_escrow(b, Decimal("3")) and sim.release_escrow(b, success=False) == Decimal("3")
    c = sim.open_channel(payer, payee, Decimal("30"))
    assert sim.lock_escrow(c, Decimal("12.25"))
    assert sim.open_channel(payer, payee, Decimal("20"))
    return sim


def failing(result) -> dict[str, int]:
    return {k: v for k, v in result.violation_counts.items() if v}


def entities(result, invariant: str) -> set[str]:
    return {v.entity_id for v in result.violations if v.invariant == invariant}


def pairs(result) -> set[tuple[str, str]]:
    return {(v.invariant, v.entity_id) for v in result.violations}


# ---- consistent worlds -------------------------------------------------------------------------

def test_consistent_world_is_clean_full_then_incremental(writer, make_config, run_check):
    world(writer)
    cfg = make_config()
    first = run_check("payments", config=cfg)
    assert first.mode == "full" and first.status == "pass", first.to_dict()
    assert set(first.violation_counts) == set(ALL) - {"sequence_regression"}
    assert "first observation" in first.skipped["sequence_regression"]
    second = run_check("payments", config=cfg)  # the runner picks incremental: a full sweep just ran
    assert second.mode == "incremental" and second.status == "pass", second.to_dict()
    assert set(second.violation_counts) == set(ALL) and not second.skipped
    assert not first.summaries and not second.summaries


def test_many_settled_tasks_stay_clean_where_the_platform_formula_fires(writer, run_check):
    sim = PaymentSimulator(writer, seed=11)
    sim.settle_tasks(150)
    sim.run(200)
    result = run_check("payments", mode="full")
    assert result.status == "pass" and not failing(result), result.to_dict()
    # The platform's own check: deposits = withdrawals + balances + channel balances + escrowed + settled.
    dep, wd, bal = writer.execute(
        "SELECT sum(total_deposited), sum(total_withdrawn), sum(balance) FROM accounts").fetchone()
    cb, e, s = writer.execute(
        "SELECT sum(current_balance), sum(escrowed_amount), sum(total_settled) FROM payment_channels").fetchone()
    assert s >= 150 * Decimal("1.5") and dep != wd + bal + cb + e + s  # it counts settled money twice


# ---- one fault each: exactly that invariant and entity ---------------------------------------------

@pytest.mark.parametrize("history", [True, False], ids=["world", "empty"])
@pytest.mark.parametrize("fault", [f for f in FAULTS if f != "sequence_going_back"])
def test_each_fault_is_reported_by_its_invariant_and_entity(fault, history, writer, run_check):
    if history:
        world(writer)
    # Empty: the fault makes what it needs with the platform's transitions first, as in a fresh demo.
    clean = run_check("payments", mode="full", redis=False)
    assert clean.status == "pass", clean.to_dict()
    entity = inject_fault(writer, fault)
    result = run_check("payments", mode="full", redis=False)
    spec = FAULTS[fault]
    assert result.status == "fail"
    assert result.violation_counts[spec.invariant] == 1
    assert entities(result, spec.invariant) == {entity}
    assert set(failing(result)) <= {spec.invariant} | spec.also, failing(result)
    v = next(v for v in result.violations if v.invariant == spec.invariant)
    assert v.detail and "\n" not in v.detail
    d = v.to_dict()
    assert all(isinstance(d[k], (str, type(None))) for k in ("expected", "actual", "difference"))


def test_a_one_unit_leak_is_exact(writer, run_check):
    world(writer)
    channel = inject_fault(writer, "one_unit_leak")
    result = run_check("payments", mode="full", redis=False)
    (v,) = [v for v in result.violations if v.invariant == "ledger_reconciliation"]
    assert v.entity_id == channel and abs(v.difference) == UNIT
    assert failing(result) == {"ledger_reconciliation": 1}, result.to_dict()
    g = inject_fault(writer, "global_leak")
    result = run_check("payments", mode="full", redis=False)
    (v,) = [v for v in result.violations if v.invariant == "global_conservation"]
    assert (g, v.entity_id, v.difference, v.to_dict()["difference"]) == ("global", "global", -UNIT, "-0.00000001")


def test_sequence_regression_needs_two_observations_and_redis(writer, make_config, run_check):
    world(writer)
    cfg = make_config()
    assert run_check("payments", mode="full", config=cfg).status == "pass"
    assert run_check("payments", mode="full", config=cfg).violation_counts["sequence_regression"] == 0
    channel = inject_fault(writer, "sequence_going_back")
    for mode in ("incremental", "full"):  # the regression stays visible until the sequence climbs back
        result = run_check("payments", mode=mode, config=cfg)
        assert failing(result) == {"sequence_regression": 1}, (mode, result.to_dict())
        (v,) = result.violations
        assert v.entity_id == channel and v.difference == -1 and v.actual == v.expected - 1
    no_redis = run_check("payments", mode="full", redis=False)
    assert "sequence_regression" in no_redis.skipped and "sequence_regression" not in no_redis.violation_counts
    assert no_redis.status == "pass" and no_redis.mode == "full"


def test_cli_exit_codes_and_json(writer, db_url, redis_prefix, tmp_path):
    world(writer)
    conf = tmp_path / "zsmon.yml"
    conf.write_text(yaml.safe_dump({"redis": {"key_prefix": redis_prefix}}))
    env = {**os.environ, "ZSMON_DATABASE_URL": db_url, "REDIS_HOST": "127.0.0.1", "LOG_FORMAT": "json"}
    cmd = [str(ROOT / ".venv/bin/zsmon"), "--config", str(conf), "check", "--once", "--only", "payments",
           "--format", "json"]
    if not Path(cmd[0]).exists():
        cmd = [sys.executable, "-m", "zsmon.cli", *cmd[1:]]
    ok = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=60)
    assert ok.returncode == 0, ok.stdout + ok.stderr
    channel = inject_fault(writer, "money_from_nowhere")
    bad = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=60)
    assert bad.returncode == 1, bad.stdout + bad.stderr
    (check,) = json.loads(bad.stdout)["checks"]
    assert check["checker"] == "payments" and check["status"] == "fail"
    hit = [v for v in check["violations"] if v["invariant"] == "channel_conservation"]
    assert [v["entity_id"] for v in hit] == [channel]
    assert hit[0]["difference"] == "5.00000000" and hit[0]["entity_type"] == "channel"


# ---- incremental -----------------------------------------------------------------------------------

def test_incremental_finds_faults_after_the_watermark_like_a_full_sweep(writer, make_config, run_check):
    world(writer)
    cfg = make_config()
    assert run_check("payments", mode="full", config=cfg).status == "pass"
    assert run_check("payments", mode="full", config=cfg).status == "pass"  # sequence memory recorded
    planted = {name: inject_fault(writer, name) for name in FAULTS}
    inc = run_check("payments", mode="incremental", config=cfg)
    full = run_check("payments", mode="full", config=cfg)
    assert inc.mode == "incremental" and full.mode == "full"
    for name, entity in planted.items():
        assert (FAULTS[name].invariant, entity) in pairs(inc), name
    assert pairs(inc) == pairs(full)
    assert inc.violation_counts == full.violation_counts


def test_incremental_falls_back_to_full_without_watermark_or_redis(writer, make_config, run_check):
    world(writer, steps=50)
    assert run_check("payments", mode="incremental").mode == "full"  # no watermark yet
    assert run_check("payments", mode="incremental", redis=False).mode == "full"
    cfg = make_config(checkers={"payments": {"settings": {"incremental_max_channels": 1}}})
    assert run_check("payments", mode="full", config=cfg).status == "pass"
    sim = PaymentSimulator(writer, seed=99)
    sim.run(40)
    assert run_check("payments", mode="incremental", config=cfg).mode == "full"  # too many touched


# ---- live traffic -----------------------------------------------------------------------------------

def test_live_traffic_never_shows_a_violation(writer, db_url, make_config, run_check):
    world(writer, steps=100)
    cfg = make_config()
    stop = threading.Event()
    done: list[int] = []
    errors: list[BaseException] = []

    def write(seed: int) -> None:
        try:
            with psycopg.connect(db_url, autocommit=True) as conn:
                sim = PaymentSimulator(conn, seed=seed, users=6, agents=3)  # shared accounts: real contention
                n = 0
                while not stop.is_set() and n < 1500:
                    sim.step()
                    n += 1
                done.append(n)
        except BaseException as exc:  # surfaced below
            errors.append(exc)

    threads = [threading.Thread(target=write, args=(seed,)) for seed in range(100, 104)]
    for t in threads:
        t.start()
    results = []
    t0 = time.monotonic()
    try:
        while any(t.is_alive() for t in threads) and time.monotonic() - t0 < 25:
            results.append(run_check("payments", config=cfg))
            results.append(run_check("payments", mode="full", config=cfg))
    finally:
        stop.set()
        for t in threads:
            t.join()
    assert not errors, errors
    assert sum(done) >= 2000 and len(results) >= 6
    for r in results:
        assert r.status == "pass", r.to_dict()
    assert {r.mode for r in results} == {"full", "incremental"}
    final = run_check("payments", mode="full", config=cfg)
    assert final.status == "pass" and not final.skipped


# ---- metrics and exporter ----------------------------------------------------------------------------------

def test_failure_counter_counts_runs_with_violations():
    checker = PaymentsChecker()
    registry = CollectorRegistry()
    checker.register_metrics(registry)
    assert registry.get_sample_value("zerostate_payment_balance_check_failures_total") == 0
    checker.observe(CheckResult("payments", "pass", violation_counts={"channel_conservation": 0}))
    checker.observe(CheckResult("payments", "error", error="db down"))
    checker.observe(CheckResult("payments", "fail", violation_counts={"double_release": 2}))
    assert registry.get_sample_value("zerostate_payment_balance_check_failures_total") == 1


def test_exporter_families(writer, db_url, make_config):
    sim = world(writer, steps=120)
    sim.withdraw(sim.users[0], Decimal("1.5"))
    families = collect_families(PaymentsExporter(), make_config())

    def samples(name):
        return {tuple(sorted(s.labels.items())): s.value for s in families[name].samples}

    states = samples("zerostate_payment_channels")
    assert {dict(k)["state"] for k in states} == {"open", "escrowed", "settling", "closed"}
    expect = dict(writer.execute("SELECT state, count(*) FROM payment_channels GROUP BY state").fetchall())
    assert all(states[(("state", s),)] == expect.get(s, 0) for s in ("open", "escrowed", "settling", "closed"))
    money = {dict(k)["bucket"]: v for k, v in samples("zerostate_payment_money").items()}
    assert set(money) == {"current", "escrowed", "stranded", "overdrawn", "settled", "refunded", "available"}
    bal = writer.execute("SELECT sum(balance) FROM accounts").fetchone()[0]
    assert money["available"] == pytest.approx(float(bal))
    assert samples("zerostate_payment_escrows_active")[()] == writer.execute(
        "SELECT count(*) FROM payment_channels WHERE escrowed_amount > 0").fetchone()[0]
    wd = writer.execute("SELECT sum(total_withdrawn) FROM accounts").fetchone()[0]
    assert families["zerostate_payment_withdrawn"].samples[0].value == pytest.approx(float(wd))
    types = {dict(k)["type"]: v for k, v in samples("zerostate_payment_channel_transactions").items()}
    assert set(types) == {"deposit", "escrow", "release", "settlement", "refund", "close", "other"}
    assert sum(types.values()) == writer.execute("SELECT count(*) FROM channel_transactions").fetchone()[0]
    registry = CollectorRegistry()

    class Fixed:
        def collect(self):
            return list(families.values())
    registry.register(Fixed())
    text = generate_latest(registry).decode()
    for name in ("zerostate_payment_deposited_total", "zerostate_payment_withdrawn_total",
                 "zerostate_payment_channel_transactions_total{type=\"release\"}", "zerostate_payment_escrows_active"):
        assert name in text


def test_verify_balances_endpoint_runs_the_checker_now(writer, make_config):
    import requests

    from zsmon.app import build_registry
    from zsmon.core.config import Config
    from zsmon.testing import LOCAL_HTTP, running_service

    world(writer, steps=60)
    channel = inject_fault(writer, "escrowed_without_lock")
    token = "payments-test-token"
    others = {name: {"enabled": False} for name in build_registry(Config()).checker_classes if name != "payments"}
    cfg = make_config(http={**LOCAL_HTTP, "admin_token": token},
                      checkers={**others, "payments": {"interval_seconds": 3600}})
    with running_service(cfg) as svc:
        r = requests.post(svc.url("api", "/admin/verify-balances"), headers={"Authorization": f"Bearer {token}"},
                          timeout=60)
        assert r.status_code == 200, r.text
        body = r.json()
        assert body["checker"] == "payments" and body["status"] == "fail"
        assert [v["entity_id"] for v in body["violations"] if v["invariant"] == "escrow_state"] == [channel]
        text = requests.get(svc.url("metrics", "/metrics"), timeout=5).text
        (line,) = [x for x in text.splitlines() if x.startswith("zerostate_payment_balance_check_failures_total ")]
        assert float(line.split()[1]) >= 1  # the scheduled run and this one both found the fault


def test_faults_plant_themselves_on_an_empty_world(writer, run_check):
    """The demo plants faults from its first seconds: each fault makes what it needs with correct transitions."""
    for name in FAULTS:
        assert inject_fault(writer, name)
    result = run_check("payments", mode="full", redis=False)
    assert set(failing(result)) >= {f.invariant for f in FAULTS.values()} - {"sequence_regression"}
    with pytest.raises(KeyError, match="unknown payment fault"):
        inject_fault(writer, "nope")


def test_traffic_goes_on_over_a_fault_the_schema_refuses_to_follow(writer, run_check):
    """An overdrawn escrow, paid out, leaves an open channel at -1: closing it would refund -1 to a payer
    with nothing, which the accounts CHECK refuses. The simulator takes that as the platform's refusal (None,
    nothing written) instead of stopping the traffic, and the fault is still there to be found."""
    sim = PaymentSimulator(writer, seed=9, users=1, agents=1)
    payer = sim.users[0]
    sim.deposit(payer, Decimal("10"))
    cid = sim.open_channel(payer, sim.agents[0], Decimal("10"))
    sim.channels.pop(cid)  # the fault moves it behind the simulator's back
    assert inject_fault(writer, "overdrawn_escrow") == cid
    assert sim.release_escrow(cid, success=True) == Decimal("11")
    assert writer.execute("SELECT current_balance FROM payment_channels WHERE id = %s", (cid,)).fetchone()[0] == -1
    rows = writer.execute("SELECT count(*) FROM channel_transactions").fetchone()[0]
    assert sim.close_channel(cid) is None
    assert writer.execute("SELECT state, current_balance FROM payment_channels WHERE id = %s",
                          (cid,)).fetchone() == ("open", -1)
    assert writer.execute("SELECT count(*) FROM channel_transactions").fetchone()[0] == rows
    assert sim.run(20)
    assert "channel_non_negative" in failing(run_check("payments", mode="full", redis=False))
