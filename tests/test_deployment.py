"""Memory belongs to the monitored database; recovery from an outage is prompt; against real PostgreSQL and Redis."""
from __future__ import annotations

import time

import psycopg
import requests

from zsmon.app import build_registry
from zsmon.core.config import Config
from zsmon.demo.simulator.payments import PaymentSimulator, inject_fault
from zsmon.testing import (LOCAL_HTTP, create_platform_database, deployment_prefix, drop_database, running_service,
                           wait_for)

TOKEN = "deployment-token-9c1e"


def _world(url: str, steps: int) -> None:
    """The same seed in two databases: the same channel ids, sequence numbers as far as the traffic got."""
    with psycopg.connect(url, autocommit=True) as conn:
        PaymentSimulator(conn, seed=4).run(steps)


def test_two_databases_with_the_same_channel_ids_keep_their_own_memory(make_config, run_check):
    name_a, url_a = create_platform_database("zsmon_dep_a")
    name_b, url_b = create_platform_database("zsmon_dep_b")
    try:
        _world(url_a, 400)   # further along: higher sequence numbers than b's copies of the same channels
        _world(url_b, 150)
        a = make_config(env={"ZSMON_DATABASE_URL": url_a})
        b = make_config(env={"ZSMON_DATABASE_URL": url_b})  # the same Redis and the same redis.key_prefix
        assert a.redis.key_prefix == b.redis.key_prefix
        assert deployment_prefix(a) != deployment_prefix(b)
        assert run_check("payments", config=a).skipped["sequence_regression"].startswith("first observation")
        assert run_check("payments", config=a).violation_counts["sequence_regression"] == 0

        # b never judges against a's memory: its first run is a first observation, its second is clean.
        first_b = run_check("payments", config=b)
        assert first_b.skipped["sequence_regression"].startswith("first observation"), first_b.to_dict()
        assert run_check("payments", config=b, mode="full").violation_counts["sequence_regression"] == 0

        # A real regression in a is still found against a's own memory.
        with psycopg.connect(url_a, autocommit=True) as conn:
            regressed = inject_fault(conn, "sequence_going_back")
        found = run_check("payments", config=a, mode="full")
        assert found.violation_counts["sequence_regression"] == 1
        assert [v.entity_id for v in found.violations if v.invariant == "sequence_regression"] == [regressed]
    finally:
        drop_database(name_a)
        drop_database(name_b)


def test_two_deployments_in_ha_on_one_redis_both_run_their_checks(make_config):
    name_b, url_b = create_platform_database("zsmon_dep_ha")
    only_schema = {n: {"enabled": n == "schema", "interval_seconds": 0.5}
                   for n in build_registry(Config()).checker_classes}
    common = dict(http=LOCAL_HTTP, ha={"enabled": True, "lease_seconds": 1}, checkers=only_schema,
                  scheduler={"health_interval_seconds": 0.5})
    try:
        a = make_config(**common)
        b = make_config(env={"ZSMON_DATABASE_URL": url_b}, **common)
        with running_service(a) as one, running_service(b) as two:
            def ran(svc) -> bool:
                state = svc.service.store.state("schema")
                return state.latest is not None and state.latest.status == "pass"
            # Each holds its own deployment's lease: neither waits for the other.
            wait_for(lambda: ran(one) and ran(two), timeout=15)
            assert one.service.coordinator.leads("check:schema") and two.service.coordinator.leads("check:schema")
            assert one.service.runner.deployment.prefix != two.service.runner.deployment.prefix
    finally:
        drop_database(name_b)


def test_checkers_failed_by_an_outage_rerun_when_the_database_answers(make_config, private_pg):
    with psycopg.connect(private_pg.dsn, autocommit=True) as conn:
        conn.execute("CREATE TABLE IF NOT EXISTS zz_probe (x int)")
    only = {n: {"enabled": n in ("schema", "reputation")} for n in build_registry(Config()).checker_classes}
    cfg = make_config(env={"ZSMON_DATABASE_URL": private_pg.dsn}, http={**LOCAL_HTTP, "admin_token": TOKEN},
                      checkers=only, scheduler={"health_interval_seconds": 0.5},
                      database={"connect_timeout_seconds": 1})
    auth = {"Authorization": f"Bearer {TOKEN}"}
    with running_service(cfg) as svc:
        ready = lambda: requests.get(svc.url("metrics", "/ready"), timeout=5).status_code == 200  # noqa: E731
        wait_for(lambda: all(svc.service.store.state(n).latest is not None for n in ("schema", "reputation")), 15)
        private_pg.stop()
        for name in ("schema", "reputation"):  # both fail on the database (intervals 300 s and 60 s)
            r = requests.post(svc.url("api", f"/api/v1/checks/{name}/run"), headers=auth, timeout=30)
            assert r.json()["status"] == "error", r.text
        wait_for(lambda: not ready(), timeout=10)
        private_pg.start()
        answered = time.time()
        wait_for(ready, timeout=10)
        assert time.time() - answered < 10
        for name in ("schema", "reputation"):
            latest = svc.service.store.state(name).latest
            assert latest.status != "error" and latest.started_at >= answered - 1, latest.to_dict()
