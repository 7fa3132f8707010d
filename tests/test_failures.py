"""Failure semantics against real, misbehaving servers.

A private PostgreSQL cluster and a private redis-server are stopped, paused (SIGSTOP)
and restarted under zsmon. Whatever happens, a run is ``error`` with a one-line
reason (never ``pass``), ``/ready`` says 503 while the database is gone, the metrics
show it, the scheduler keeps ticking (the process never hangs or exits), and
everything recovers on its own within one interval.
"""
from __future__ import annotations

import re
import threading
import time

import psycopg
import requests

from zsmon.core.checker import Checker, CheckContext, Invariant
from zsmon.app import build_registry
from zsmon.core.service import build_runner
from zsmon.testing import LOCAL_HTTP, bind_checker, running_service, wait_for

TOKEN = "failures-token-5e1d"
AUTH = {"Authorization": f"Bearer {TOKEN}"}


class SlowChecker(Checker):
    """Test-only: one query that sleeps ``sleep`` seconds in the server."""

    name = "slow"
    description = "test-only: a query that takes as long as we say"
    invariants = (Invariant("slow_query_answers", "the slow query returns", "system"),)
    default_interval_seconds = 1.0

    def __init__(self, sleep: float = 0.0) -> None:
        super().__init__()
        self.sleep = sleep

    def run(self, ctx: CheckContext) -> None:
        ctx.scalar("SELECT pg_sleep(%s)", (self.sleep,))
        ctx.report("slow_query_answers", [])


class MemoryChecker(Checker):
    """Test-only: one plain invariant, one that needs Redis, and an incremental mode."""

    name = "memory"
    description = "test-only: memory across runs"
    invariants = (
        Invariant("plain", "judged from the snapshot alone", "system"),
        Invariant("remembered", "needs the previous run's observation", "system", needs_memory=True),
    )
    supports_incremental = True
    default_full_interval_seconds = 3600.0

    def run(self, ctx: CheckContext) -> None:
        ctx.find("plain", "SELECT 'x' AS entity_id, NULL::numeric AS expected, NULL::numeric AS actual, "
                          "NULL::numeric AS difference, '' AS detail WHERE false")
        if ctx.redis is not None:
            ctx.redis.set(ctx.key("seen"), "1")
            ctx.report("remembered", [])


def metric(text: str, name: str, **labels: str) -> float | None:
    """The value of one sample in a text exposition, or None."""
    want = ",".join(f'{k}="{v}"' for k, v in labels.items())
    pattern = re.escape(name) + (r"\{" + re.escape(want) + r"\}" if labels else "") + r" ([0-9.eE+-]+)$"
    m = re.search(pattern, text, re.M)
    return float(m.group(1)) if m else None


def scrape(svc) -> str:
    return requests.get(svc.url("metrics", "/metrics"), timeout=5).text


def latest(svc, checker: str) -> dict:
    checks = requests.get(svc.url("api", "/api/v1/checks"), headers=AUTH, timeout=5).json()["checks"]
    return next((c for c in checks if c["checker"] == checker), {})


def ready(svc) -> requests.Response:
    return requests.get(svc.url("metrics", "/ready"), timeout=5)


def fast_config(make_config, dsn: str, **extra):
    """A service config with 1 s timeouts, a 0.5 s health probe and schema every second."""
    return make_config(http={**LOCAL_HTTP, "admin_token": TOKEN},
                       scheduler={"health_interval_seconds": 0.5, "jitter_ratio": 0},
                       database={"connect_timeout_seconds": 1, "statement_timeout_seconds": 1},
                       checkers={"schema": {"interval_seconds": 1}}, env={"ZSMON_DATABASE_URL": dsn}, **extra)


class SlowRunInProgress:
    """A runner whose SlowChecker run is in flight in a thread, so the server can be hurt under it."""

    def __init__(self, cfg, sleep: float) -> None:
        self.runner = build_runner(build_registry(cfg), only=["schema"])
        self.slow = SlowChecker(sleep=sleep)
        self.runner.checkers["slow"] = bind_checker(self.slow, cfg)
        self._out: list = []
        self._worker = threading.Thread(target=lambda: self._out.append(self.runner.run_check("slow")))

    def __enter__(self) -> "SlowRunInProgress":
        self._worker.start()
        return self

    def result(self, within: float):
        """The run's result; fails the test if the run has not ended within ``within`` seconds."""
        self._worker.join(within)
        assert not self._worker.is_alive(), f"the run hung for more than {within}s"
        return self._out[0]

    def __exit__(self, *exc) -> None:
        self._worker.join(15)
        self.runner.db.close()


# ---- the database --------------------------------------------------------------------------
def test_unreachable_database_is_an_error_within_connect_timeout(make_config):
    from zsmon.testing import free_port

    cfg = make_config(database={"connect_timeout_seconds": 1}, redis=False,
                      env={"ZSMON_DATABASE_URL": f"postgresql://postgres@127.0.0.1:{free_port()}/nowhere"})
    runner = build_runner(build_registry(cfg), only=["schema"])
    try:
        t0 = time.monotonic()
        result = runner.run_check("schema")
        assert time.monotonic() - t0 < 3
        assert result.status == "error" and "unavailable" in result.error and result.violation_counts == {}
    finally:
        runner.db.close()


def test_statement_timeout_makes_the_run_an_error_and_the_next_run_is_fine(make_config, db_url):
    cfg = make_config(database={"statement_timeout_seconds": 1}, redis=False)
    runner = build_runner(build_registry(cfg), only=["schema"])
    slow = SlowChecker(sleep=5)
    runner.checkers["slow"] = bind_checker(slow, cfg)
    try:
        t0 = time.monotonic()
        result = runner.run_check("slow")
        assert 0.9 < time.monotonic() - t0 < 3
        assert result.status == "error" and "statement_timeout exceeded" in result.error
        slow.sleep = 0
        assert runner.run_check("slow").status == "pass"
        assert runner.run_check("schema").status == "pass"
    finally:
        runner.db.close()


def _kill_zsmon_backend(admin_dsn: str, pattern: str = "%pg_sleep%") -> int:
    with psycopg.connect(admin_dsn, autocommit=True) as admin:
        def victim():
            return admin.execute("SELECT pid FROM pg_stat_activity WHERE application_name = 'zsmon' "
                                 "AND state = 'active' AND query LIKE %s", (pattern,)).fetchone()

        (pid,) = wait_for(victim, timeout=10, interval=0.05)
        admin.execute("SELECT pg_terminate_backend(%s)", (pid,))
        return pid


def test_backend_terminated_mid_query_is_an_error_then_recovers(make_config, db_url):
    with SlowRunInProgress(make_config(redis=False), sleep=10) as run:
        _kill_zsmon_backend(db_url)
        result = run.result(within=10)
        assert result.status == "error" and "terminated by the server mid-query" in result.error
        run.slow.sleep = 0
        assert run.runner.run_check("slow").status == "pass"  # the pool replaced the dead connection


def test_server_shut_down_mid_query_then_restarted(make_config, private_pg):
    cfg = make_config(redis=False, database={"connect_timeout_seconds": 1},
                      env={"ZSMON_DATABASE_URL": private_pg.dsn})
    with SlowRunInProgress(cfg, sleep=10) as run:
        wait_for(lambda: _active_sleep(private_pg.dsn), timeout=10, interval=0.05)
        private_pg.stop()  # -m immediate, during the query
        result = run.result(within=10)
        assert result.status == "error", result
        assert run.runner.run_check("schema").status == "error"  # still down: error, not a hang
        private_pg.start()
        run.slow.sleep = 0
        assert wait_for(lambda: run.runner.run_check("schema").status == "pass", timeout=10)
        assert run.runner.run_check("slow").status == "pass"


def _active_sleep(dsn: str) -> bool:
    with psycopg.connect(dsn, autocommit=True) as admin:
        return bool(admin.execute("SELECT 1 FROM pg_stat_activity WHERE application_name = 'zsmon' "
                                  "AND state = 'active' AND query LIKE '%pg_sleep%'").fetchone())


def test_paused_database_errors_within_the_timeouts_ready_503_then_recovers(make_config, private_pg):
    """SIGSTOP: TCP still connects but nothing answers. Runs must error, not hang."""
    with running_service(fast_config(make_config, private_pg.dsn)) as svc:
        wait_for(lambda: ready(svc).status_code == 200)
        wait_for(lambda: latest(svc, "schema").get("status") == "pass")
        runs_before = metric(scrape(svc), "zsmon_job_runs_total", scheduler_job="check:schema")
        private_pg.pause()
        try:
            paused_at = time.monotonic()
            not_ready = wait_for(lambda: ready(svc).status_code == 503 and ready(svc).json(), timeout=10)
            assert any("unavailable" in r for r in not_ready["reasons"]), not_ready
            result = wait_for(lambda: latest(svc, "schema").get("status") == "error" and latest(svc, "schema"),
                              timeout=10)
            # connect_timeout 1 s + statement_timeout 1 s bound each run: the error comes in seconds.
            assert time.monotonic() - paused_at < 6
            assert "unavailable" in result["error"] or "no answer" in result["error"], result["error"]
            text = scrape(svc)
            assert metric(text, "zerostate_invariant_check_up", checker="schema") == 0
            assert metric(text, "zsmon_database_up") == 0
            assert metric(text, "zerostate_invariant_check_runs_total", checker="schema", status="error") >= 1
            # The scheduler keeps ticking: runs finish (as errors) instead of piling up behind a hung one.
            wait_for(lambda: metric(scrape(svc), "zsmon_job_runs_total", scheduler_job="check:schema") >= runs_before + 3,
                     timeout=15)
            assert svc.service.scheduler.running
        finally:
            private_pg.resume()
        resumed = time.monotonic()
        wait_for(lambda: ready(svc).status_code == 200, timeout=10)
        wait_for(lambda: latest(svc, "schema").get("status") == "pass", timeout=10)
        assert time.monotonic() - resumed < 1 + 2 + 1.5  # one interval + one bounded run + slack
        text = scrape(svc)
        assert metric(text, "zerostate_invariant_check_up", checker="schema") == 1
        assert metric(text, "zsmon_database_up") == 1


def test_paused_mid_query_drops_the_connection_after_statement_plus_connect_timeout(make_config, private_pg):
    cfg = make_config(redis=False, database={"connect_timeout_seconds": 1, "statement_timeout_seconds": 2},
                      env={"ZSMON_DATABASE_URL": private_pg.dsn})
    with SlowRunInProgress(cfg, sleep=10) as run:
        wait_for(lambda: _active_sleep(private_pg.dsn), timeout=10, interval=0.05)
        private_pg.pause()
        try:
            result = run.result(within=8)  # a run against a paused server must not hang
        finally:
            private_pg.resume()
        assert result.status == "error" and "no answer from the database within 3s" in result.error
        assert 2.5 < result.duration_seconds < 5
        run.slow.sleep = 0
        assert wait_for(lambda: run.runner.run_check("slow").status == "pass", timeout=10)


def test_slow_and_killed_runs_in_the_service_show_in_metrics_and_recover(make_config, db_url):
    with running_service(fast_config(make_config, db_url)) as svc:
        slow = SlowChecker(sleep=5)
        svc.service.runner.checkers["slow"] = bind_checker(slow, svc.service.config)
        svc.service.scheduler.add("check:slow", lambda: svc.service.runner.run_check("slow"), 1.0)
        err = wait_for(lambda: latest(svc, "slow").get("status") == "error" and latest(svc, "slow"), timeout=10)
        assert "statement_timeout exceeded" in err["error"]
        text = scrape(svc)
        assert metric(text, "zerostate_invariant_check_up", checker="slow") == 0
        assert metric(text, "zerostate_invariant_check_runs_total", checker="slow", status="error") >= 1
        # Slow beyond statement_timeout: /ready says so while it lasts (issue 9) ...
        not_ready = ready(svc)
        assert not_ready.status_code == 503
        assert any(r.startswith("checker slow: ") and "statement_timeout" in r for r in not_ready.json()["reasons"])
        # ... unless the operator keeps the replica in service through checker errors.
        svc.service.config.http.ready_requires_checks = False
        assert ready(svc).status_code == 200
        svc.service.config.http.ready_requires_checks = True
        assert latest(svc, "schema")["status"] == "pass"
        slow.sleep = 0
        wait_for(lambda: latest(svc, "slow").get("status") == "pass", timeout=5)
        assert metric(scrape(svc), "zerostate_invariant_check_up", checker="slow") == 1
        assert ready(svc).status_code == 200


# ---- Redis -----------------------------------------------------------------------------------
def test_redis_down_skips_memory_invariants_and_falls_back_to_full(make_config, private_redis):
    cfg = make_config(redis=True, env=private_redis.env())
    runner = build_runner(build_registry(cfg), only=["schema"])
    runner.checkers["memory"] = bind_checker(MemoryChecker(), cfg)
    try:
        first = runner.run_check("memory")
        assert (first.status, first.mode) == ("pass", "full") and first.violation_counts == {"plain": 0, "remembered": 0}
        second = runner.run_check("memory")
        assert second.mode == "incremental" and second.skipped == {}

        private_redis.stop()
        down = runner.run_check("memory")
        assert down.status == "pass" and down.mode == "full"  # no watermarks without Redis: sweep everything
        assert down.violation_counts == {"plain": 0}
        assert "remembered" in down.skipped and "Redis unreachable" in down.skipped["remembered"]

        private_redis.start()
        back = runner.run_check("memory")
        assert back.mode == "incremental" and back.skipped == {} and back.violation_counts["remembered"] == 0
    finally:
        runner.db.close()


def test_paused_redis_costs_at_most_its_socket_timeout(make_config, private_redis):
    cfg = make_config(redis=True, env=private_redis.env())
    cfg.redis.socket_timeout_seconds = 0.5
    runner = build_runner(build_registry(cfg), only=["schema"])
    runner.checkers["memory"] = bind_checker(MemoryChecker(), cfg)
    try:
        assert runner.run_check("memory").skipped == {}
        private_redis.pause()
        try:
            t0 = time.monotonic()
            result = runner.run_check("memory")
            assert time.monotonic() - t0 < 2.5
        finally:
            private_redis.resume()
        assert result.status == "pass" and result.mode == "full"
        assert "Redis unreachable" in result.skipped["remembered"]
    finally:
        runner.db.close()


def test_service_keeps_checking_while_redis_is_down(make_config, db_url, private_redis):
    cfg = make_config(http={**LOCAL_HTTP, "admin_token": TOKEN}, scheduler={"health_interval_seconds": 0.5},
                      checkers={"schema": {"interval_seconds": 1}}, env=private_redis.env())
    cfg.redis.socket_timeout_seconds = 0.5
    with running_service(cfg) as svc:
        wait_for(lambda: metric(scrape(svc), "zsmon_redis_up") == 1)
        private_redis.stop()
        wait_for(lambda: metric(scrape(svc), "zsmon_redis_up") == 0, timeout=10)
        runs = metric(scrape(svc), "zerostate_invariant_check_runs_total", checker="schema", status="pass")
        wait_for(lambda: metric(scrape(svc), "zerostate_invariant_check_runs_total", checker="schema",
                                status="pass") >= runs + 2, timeout=10)
        assert ready(svc).status_code == 200  # Redis is optional: the replica stays ready
        private_redis.start()
        wait_for(lambda: metric(scrape(svc), "zsmon_redis_up") == 1, timeout=10)
