"""The platform exporters (postgres, redis, api_probe) and zsmon's self-metrics, against real services.

Real PostgreSQL and Redis only: the session database, a private PostgreSQL cluster
with pg_stat_statements preloaded (and a streaming replica of it), a private
redis-server the test starts and stops, and small HTTP servers on 127.0.0.1.
"""
from __future__ import annotations

import http.server
import os
import shutil
import subprocess
import tempfile
import threading
import time
from typing import Any, Iterator

import psycopg
import pytest
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families
from structlog.testing import capture_logs

from zsmon.app import build_registry
from zsmon.core.config import ConfigError
from zsmon.core.logging import get_logger
from zsmon.core.redis import make_redis
from zsmon.core.service import build_runner
from zsmon.exporters.api_probe import ApiProbeExporter, ApiProbeSettings, target_label
from zsmon.core.exporter import CollectContext
from zsmon.testing import free_port, running_service, wait_for

HTTP = {"metrics_listen": "127.0.0.1:0", "api_listen": "127.0.0.1:0"}
PG_BIN = os.environ.get("ZSMON_PG_BIN", "/usr/lib/postgresql/15/bin")
PROMTOOL = os.environ.get("ZSMON_PROMTOOL", "/usr/bin/promtool")


# ---- helpers -----------------------------------------------------------------------------
def samples(text: str) -> dict[tuple[str, tuple], float]:
    """Exposition text -> {(sample name, sorted labels): value}."""
    out = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def value(found: dict, name: str, **labels: str) -> float | None:
    return found.get((name, tuple(sorted(labels.items()))))


def names(found: dict, prefix: str) -> set[str]:
    return {name for name, _ in found if name.startswith(prefix)}


def exposition(families: list) -> str:
    class _Fixed:
        def collect(self):
            return families

    registry = CollectorRegistry()
    registry.register(_Fixed())
    return generate_latest(registry).decode()


def promtool_lint(text: str) -> str:
    assert os.path.exists(PROMTOOL), f"{PROMTOOL} missing: install Debian's prometheus package (.ci/run does)"
    proc = subprocess.run([PROMTOOL, "check", "metrics"], input=text, capture_output=True, text=True, timeout=30)
    return (proc.stdout + proc.stderr).strip() if proc.returncode or proc.stdout or proc.stderr else ""


class running(running_service):
    """The real sidecar in-process on ephemeral ports, scraped as parsed samples."""

    def scrape(self) -> dict:
        return samples(self.metrics_text())


def fast(**exporters: Any) -> dict:
    """Config sections that collect every half second."""
    ex = {name: {"interval_seconds": 0.5, **cfg} for name, cfg in exporters.items()}
    return {"http": HTTP, "scheduler": {"health_interval_seconds": 0.5}, "exporters": ex}


# ---- private servers -----------------------------------------------------------------------
class PrivateCluster:
    """initdb + pg_ctl on a free port, pg_stat_statements preloaded; ``replica()`` streams from it."""

    def __init__(self, root: str, data: str | None = None, port: int | None = None) -> None:
        self.root = root
        self.data = data or os.path.join(root, "primary")
        self.port = port or free_port()
        self.dsn = f"postgresql://postgres@127.0.0.1:{self.port}/postgres"

    def _run(self, tool: str, *args: str) -> None:
        cmd = [os.path.join(PG_BIN, tool), *args]
        if os.geteuid() == 0:
            cmd = ["runuser", "-u", "postgres", "--", *cmd]
        subprocess.run(cmd, check=True, capture_output=True, timeout=60)

    def init(self) -> "PrivateCluster":
        self._run("initdb", "-D", self.data, "-A", "trust", "-U", "postgres", "--no-sync")
        return self

    def start(self) -> "PrivateCluster":
        self._run("pg_ctl", "-D", self.data, "-l", self.data + ".log", "-w", "-o",
                  f"-p {self.port} -k {self.root} -c listen_addresses=127.0.0.1 -c fsync=off "
                  "-c shared_preload_libraries=pg_stat_statements", "start")
        return self

    def replica(self) -> "PrivateCluster":
        rep = PrivateCluster(self.root, os.path.join(self.root, "replica"))
        self._run("pg_basebackup", "-h", "127.0.0.1", "-p", str(self.port), "-U", "postgres", "-D", rep.data,
                  "-R", "-X", "stream", "-c", "fast", "--no-sync")
        return rep.start()

    def stop(self) -> None:
        try:
            self._run("pg_ctl", "-D", self.data, "-m", "immediate", "-w", "stop")
        except Exception:
            pass


@pytest.fixture(scope="module")
def cluster() -> Iterator[tuple[PrivateCluster, PrivateCluster]]:
    root = tempfile.mkdtemp(prefix="zsmon-pgx-")
    if os.geteuid() == 0:
        shutil.chown(root, "postgres", "postgres")
    primary = PrivateCluster(root).init().start()
    replica = None
    try:
        with psycopg.connect(primary.dsn, autocommit=True) as conn:
            conn.execute("CREATE EXTENSION pg_stat_statements")
        replica = primary.replica()
        yield primary, replica
    finally:
        if replica is not None:
            replica.stop()
        primary.stop()
        shutil.rmtree(root, ignore_errors=True)


class _Handler(http.server.BaseHTTPRequestHandler):
    def do_GET(self) -> None:  # noqa: N802
        if self.path.startswith("/slow"):
            time.sleep(5)
        code = 503 if self.path.startswith("/ready") else 200
        self.send_response(code)
        self.send_header("Content-Length", "2")
        self.end_headers()
        self.wfile.write(b"ok")

    def log_message(self, *args: Any) -> None:
        pass


@pytest.fixture(scope="module")
def http_server() -> Iterator[str]:
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


# ---- postgres ------------------------------------------------------------------------------
def _hold_open_transaction(db_url: str, started: threading.Event, done: threading.Event) -> None:
    with psycopg.connect(db_url) as conn:  # not autocommit: the SELECT opens a transaction left idle
        conn.execute("SELECT 1")
        started.set()
        done.wait(30)
        conn.rollback()


def _deadlock(db_url: str) -> None:
    """Two sessions take two advisory locks in opposite order: PostgreSQL breaks the cycle (deadlock_timeout 1 s)."""
    barrier = threading.Barrier(2)

    def side(first: int, second: int) -> None:
        with psycopg.connect(db_url) as conn:
            try:
                conn.execute("SELECT pg_advisory_xact_lock(%s)", (first,))
                barrier.wait(10)
                conn.execute("SELECT pg_advisory_xact_lock(%s)", (second,))
            except psycopg.errors.DeadlockDetected:
                pass
            conn.rollback()

    threads = [threading.Thread(target=side, args=(9001, 9002)), threading.Thread(target=side, args=(9002, 9001))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)


def test_postgres_families_have_sane_values(make_config, db_url, writer):
    # Activity to observe: an idle open transaction, a running query, a waiting lock, a rollback, a deadlock.
    _deadlock(db_url)
    writer.execute("SELECT pg_advisory_lock(4242)")
    idle_started, release = threading.Event(), threading.Event()
    holders = [threading.Thread(target=_hold_open_transaction, args=(db_url, idle_started, release))]

    def blocked() -> None:
        with psycopg.connect(db_url, autocommit=True) as conn:
            conn.execute("SELECT pg_advisory_lock(4242), pg_advisory_unlock(4242)")

    holders.append(threading.Thread(target=blocked))  # an active query waiting on the lock as long as we hold it
    for t in holders:
        t.start()
    idle_started.wait(10)
    try:
        cfg = make_config(redis=False, **fast(postgres={}, redis={"enabled": False}, api_probe={"enabled": False}))
        with running(cfg) as svc:
            def ready():
                found = svc.scrape()
                return found if (value(found, "zerostate_postgres_locks_waiting") or 0) >= 1 \
                    and (value(found, "zerostate_postgres_longest_query_seconds") or 0) >= 1 \
                    and (value(found, "zerostate_postgres_deadlocks_total") or 0) >= 1 else None

            found = wait_for(ready, timeout=15)
    finally:
        writer.execute("SELECT pg_advisory_unlock(4242)")
        release.set()
        for t in holders:
            t.join(30)

    assert value(found, "zerostate_postgres_up") == 1
    max_conn = value(found, "zerostate_postgres_max_connections")
    assert max_conn and max_conn >= 10
    states = {dict(labels)["state"]: v for (name, labels), v in found.items()
              if name == "zerostate_postgres_connections"}
    assert {"active", "idle", "idle in transaction"} <= set(states)
    assert states["active"] >= 2  # the blocked session and zsmon's own collecting session at least
    assert states["idle in transaction"] >= 1
    assert 0 < sum(states.values()) <= max_conn
    assert value(found, "zerostate_postgres_longest_transaction_seconds") >= 1
    assert 0 < value(found, "zerostate_postgres_database_size_bytes") < 10 * 2**30
    assert 0 < value(found, "zerostate_postgres_cache_hit_ratio") <= 1
    assert value(found, "zerostate_postgres_commits_total") > 0
    assert value(found, "zerostate_postgres_rollbacks_total") >= 1
    # Not a replica, and pg_stat_statements is not installed here: both families are absent.
    assert "zerostate_postgres_replication_lag_seconds" not in names(found, "zerostate_postgres_")
    assert not names(found, "zerostate_postgres_statement")
    # Self-metrics beside them.
    assert value(found, "zsmon_up") == 1 and value(found, "zsmon_database_up") == 1
    assert value(found, "zsmon_redis_up") == 0  # Redis disabled in this config
    assert value(found, "zsmon_exporter_errors_total", exporter="postgres") == 0
    assert value(found, "zsmon_exporter_duration_seconds", exporter="postgres") > 0
    assert value(found, "zsmon_exporter_last_success_timestamp_seconds", exporter="postgres") > time.time() - 60
    assert value(found, "zsmon_job_runs_total", scheduler_job="export:postgres") >= 1
    assert value(found, "zsmon_job_lag_seconds", scheduler_job="export:postgres") >= 0
    assert any(name == "zsmon_build_info" for name, _ in found)


def test_postgres_statements_and_replica(make_config, cluster):
    primary, replica = cluster
    with psycopg.connect(primary.dsn, autocommit=True) as conn:
        conn.execute("SELECT pg_stat_statements_reset()")
        for i in range(5):
            conn.execute("SELECT pg_sleep(0.02)")
            conn.execute("SELECT count(*) FROM pg_class WHERE relpages > %s", (i,))
    runner = build_runner(build_registry(make_config(redis=False, env={"ZSMON_DATABASE_URL": primary.dsn},
                                                     exporters={"postgres": {"settings": {"top_statements": 3}}})),
                          only=[], exporters=["postgres"])
    try:
        families = runner._collect(runner.exporters["postgres"].exporter)
    finally:
        runner.db.close()
    text = exposition(families)
    found = samples(text)
    means = {dict(l)["queryid"]: v for (n, l), v in found.items() if n == "zerostate_postgres_statement_mean_seconds"}
    calls = {dict(l)["queryid"]: v for (n, l), v in found.items()
             if n == "zerostate_postgres_statement_calls_total"}
    assert 1 <= len(means) <= 3 and set(means) == set(calls)
    assert all(q.lstrip("-").isdigit() for q in means), "queryid, never query text"
    assert max(means.values()) >= 0.015  # the pg_sleep(0.02) statement leads the list
    assert all(c >= 1 for c in calls.values())
    assert "zerostate_postgres_replication_lag_seconds" not in names(found, "zerostate_postgres_")
    assert promtool_lint(text) == ""

    # The replica: in recovery, so the lag appears (0 when caught up, never negative).
    with psycopg.connect(primary.dsn, autocommit=True) as conn:
        conn.execute("CREATE TABLE IF NOT EXISTS lagprobe (x int)")
        conn.execute("INSERT INTO lagprobe VALUES (1)")
    runner = build_runner(build_registry(make_config(redis=False, env={"ZSMON_DATABASE_URL": replica.dsn})),
                          only=[], exporters=["postgres"])
    try:
        found = samples(exposition(runner._collect(runner.exporters["postgres"].exporter)))
    finally:
        runner.db.close()
    lag = value(found, "zerostate_postgres_replication_lag_seconds")
    assert lag is not None and 0 <= lag < 60
    assert value(found, "zerostate_postgres_up") == 1


def test_postgres_unreadable_statements_family_is_absent_and_logged_once(make_config, db_url):
    # Installed but not preloaded: the view raises on every read. The savepoint keeps the rest of the collection.
    with psycopg.connect(db_url, autocommit=True) as conn:
        conn.execute("CREATE EXTENSION IF NOT EXISTS pg_stat_statements")
    runner = build_runner(build_registry(make_config(redis=False)), only=[], exporters=["postgres"])
    try:
        with capture_logs() as logs:
            for _ in range(3):
                runner.collect("postgres")  # no metrics object: must not raise either
            found = samples(exposition(runner._collect(runner.exporters["postgres"].exporter)))
    finally:
        runner.db.close()
        with psycopg.connect(db_url, autocommit=True) as conn:
            conn.execute("DROP EXTENSION IF EXISTS pg_stat_statements")
    assert value(found, "zerostate_postgres_up") == 1
    assert value(found, "zerostate_postgres_commits_total") > 0
    assert not names(found, "zerostate_postgres_statement")
    absent = [e for e in logs if e["event"] == "exporter_family_absent"]
    assert len(absent) == 1, absent
    assert absent[0]["family"] == "statements" and "shared_preload_libraries" in absent[0]["reason"]
    assert not [e for e in logs if e["event"] == "export_error"]


def test_postgres_down_serves_up_zero(make_config):
    dead = f"postgresql://postgres@127.0.0.1:{free_port()}/postgres"
    cfg = make_config(redis=False, env={"ZSMON_DATABASE_URL": dead}, database={"connect_timeout_seconds": 1})
    from zsmon.core.metrics import Metrics
    from zsmon.core.store import ResultStore

    metrics = Metrics(ResultStore(), exporter_names=["postgres"])
    runner = build_runner(build_registry(cfg), only=[], metrics=metrics, exporters=["postgres"])
    try:
        runner.collect("postgres")
    finally:
        runner.db.close()
    found = samples(metrics.exposition(None)[0].decode())
    assert value(found, "zerostate_postgres_up") == 0
    assert names(found, "zerostate_postgres_") == {"zerostate_postgres_up"}
    assert value(found, "zsmon_exporter_errors_total", exporter="postgres") == 1


# ---- redis ---------------------------------------------------------------------------------
def test_redis_families_then_redis_stopped(make_config, private_redis):
    client = private_redis.client()
    client.mset({f"ratelimit:user:{i}": 1 for i in range(25)})
    client.mset({f"other:{i}": 1 for i in range(40)})
    client.set("rate[x]:1", 1)  # glob characters in a prefix are literal
    client.get("ratelimit:user:1")
    client.get("missing-key")
    client.config_set("maxmemory", str(256 * 2**20))
    cfg = make_config(env={"REDIS_PORT": str(private_redis.port)},
                      **fast(redis={}, postgres={}, api_probe={"enabled": False}))
    with running(cfg) as svc:
        found = wait_for(lambda: (lambda f: f if value(f, "zerostate_redis_up") == 1
                                  and value(f, "zsmon_redis_up") == 1 else None)(svc.scrape()))
        assert 0 < value(found, "zerostate_redis_ping_seconds") < 1
        assert value(found, "zerostate_redis_memory_used_bytes") > 100_000
        assert value(found, "zerostate_redis_memory_max_bytes") == 256 * 2**20
        assert value(found, "zerostate_redis_connected_clients") >= 2
        assert value(found, "zerostate_redis_evicted_keys_total") == 0
        assert value(found, "zerostate_redis_keyspace_hits_total") >= 1
        assert value(found, "zerostate_redis_keyspace_misses_total") >= 1
        assert value(found, "zerostate_redis_ratelimit_keys") == 25
        assert value(found, "zerostate_redis_ratelimit_keys_truncated") == 0

        private_redis.stop()
        found = wait_for(lambda: (lambda f: f if value(f, "zerostate_redis_up") == 0
                                  and value(f, "zsmon_redis_up") == 0 else None)(svc.scrape()), timeout=15)
        assert names(found, "zerostate_redis_") == {"zerostate_redis_up"}
        assert value(found, "zsmon_exporter_errors_total", exporter="redis") >= 1
        # The rest keeps working: the postgres exporter still collects, the database is up.
        before = value(found, "zsmon_exporter_last_success_timestamp_seconds", exporter="postgres")
        later = wait_for(lambda: (lambda f: f if value(
            f, "zsmon_exporter_last_success_timestamp_seconds", exporter="postgres") > before else None)(
            svc.scrape()), timeout=10)
        assert value(later, "zerostate_postgres_up") == 1 and value(later, "zsmon_database_up") == 1
        assert value(later, "zsmon_up") == 1


def test_redis_ratelimit_count_is_bounded(make_config, private_redis):
    private_redis.client().mset({f"rl:{i}": 1 for i in range(500)})
    cfg = make_config(env={"REDIS_PORT": str(private_redis.port)},
                      exporters={"redis": {"settings": {"ratelimit_prefix": "rl:", "ratelimit_max_keys": 100,
                                                        "ratelimit_scan_count": 50}}})
    client = make_redis(cfg.redis)
    try:
        exporter = build_registry(cfg).exporters["redis"].exporter
        found = samples(exposition(list(exporter.collect(CollectContext(exporter, None, client, cfg,
                                                                          get_logger("test"))))))
    finally:
        client.close()
    assert value(found, "zerostate_redis_ratelimit_keys") == 100
    assert value(found, "zerostate_redis_ratelimit_keys_truncated") == 1


# ---- api probe -----------------------------------------------------------------------------
def test_api_probe_up_down_and_timeouts(http_server):
    closed = f"http://127.0.0.1:{free_port()}/health"
    targets = [f"{http_server}/health", f"{http_server}/ready", closed, f"{http_server}/slow",
               "http://user:s3cret@127.0.0.1:1/health"]
    exporter = ApiProbeExporter(ApiProbeSettings(targets=targets, timeout_seconds=0.5))
    ctx = CollectContext(exporter, None, None, None, get_logger("test"))
    with capture_logs() as logs:
        t0 = time.perf_counter()
        families = list(exporter.collect(ctx))
        elapsed = time.perf_counter() - t0
        exporter.collect(ctx)  # a second round: no new log lines for targets still down
    assert elapsed < 0.5 + 0.3, f"probing took {elapsed:.2f}s with a 0.5s timeout"
    text = exposition(families)
    found = samples(text)
    up = {dict(l)["target"]: v for (n, l), v in found.items() if n == "zerostate_api_up"}
    status = {dict(l)["target"]: v for (n, l), v in found.items() if n == "zerostate_api_probe_status_code"}
    took = {dict(l)["target"]: v for (n, l), v in found.items() if n == "zerostate_api_probe_duration_seconds"}
    assert up == {f"{http_server}/health": 1, f"{http_server}/ready": 0, closed: 0, f"{http_server}/slow": 0,
                  "http://127.0.0.1:1/health": 0}
    assert "s3cret" not in text
    assert status[f"{http_server}/health"] == 200 and status[f"{http_server}/ready"] == 503
    assert status[closed] == 0 and status[f"{http_server}/slow"] == 0
    assert 0 < took[f"{http_server}/health"] < 0.5 and 0.4 <= took[f"{http_server}/slow"] <= 0.5
    down = [e for e in logs if e["event"] == "api_target_down"]
    assert len(down) == 4 and all("s3cret" not in str(e) for e in down)
    assert promtool_lint(text) == ""


def test_api_probe_settings_are_validated(make_config):
    with pytest.raises(ConfigError, match="targets"):
        build_registry(make_config(exporters={"api_probe": {"settings": {"targets": ["ftp://x/health"]}}}))
    with pytest.raises(ConfigError, match="timeout_seconds"):
        build_registry(make_config(exporters={"api_probe": {"settings": {"timeout_seconds": 0}}}))
    assert target_label("https://a:b@host:8443/ready?x=1") == "https://host:8443/ready?x=1"


def test_api_probe_on_metrics_through_the_service(make_config, http_server):
    cfg = make_config(redis=False, **fast(api_probe={"settings": {"targets": [f"{http_server}/health"],
                                                                  "timeout_seconds": 1}},
                                          postgres={"enabled": False}, redis={"enabled": False}))
    with running(cfg) as svc:
        found = wait_for(lambda: (lambda f: f if value(f, "zerostate_api_up", target=f"{http_server}/health") == 1
                                  else None)(svc.scrape()))
    assert value(found, "zerostate_api_probe_status_code", target=f"{http_server}/health") == 200
    assert value(found, "zsmon_exporter_errors_total", exporter="api_probe") == 0


def test_postgres_statements_without_privileges(make_config, cluster):
    """A role without pg_read_all_stats sees only its own statements (said once); without SELECT, no family."""
    primary, _ = cluster
    with psycopg.connect(primary.dsn, autocommit=True) as conn:
        conn.execute("DROP ROLE IF EXISTS zsmon_ro; CREATE ROLE zsmon_ro LOGIN")
    runner = build_runner(build_registry(make_config(
        redis=False, env={"ZSMON_DATABASE_URL": primary.dsn.replace("postgres@", "zsmon_ro@")})),
        only=[], exporters=["postgres"])
    try:
        with capture_logs() as logs:
            for _ in range(2):
                runner.collect("postgres")
            families = runner._collect(runner.exporters["postgres"].exporter)
        assert {f.name for f in families} >= {"zerostate_postgres_statement_mean_seconds", "zerostate_postgres_up"}
        partial = [e for e in logs if e["event"] == "exporter_family_partial"]
        assert len(partial) == 1 and "pg_read_all_stats" in partial[0]["reason"]

        with psycopg.connect(primary.dsn, autocommit=True) as conn:
            conn.execute("REVOKE SELECT ON pg_stat_statements FROM PUBLIC")
        with capture_logs() as logs:
            for _ in range(2):
                runner.collect("postgres")
            found = samples(exposition(runner._collect(runner.exporters["postgres"].exporter)))
        assert value(found, "zerostate_postgres_up") == 1 and value(found, "zerostate_postgres_commits_total") > 0
        assert not names(found, "zerostate_postgres_statement")
        absent = [e for e in logs if e["event"] == "exporter_family_absent"]
        assert len(absent) == 1 and "permission denied" in absent[0]["reason"], absent
    finally:
        runner.db.close()
        with psycopg.connect(primary.dsn, autocommit=True) as conn:
            conn.execute("GRANT SELECT ON pg_stat_statements TO PUBLIC")
            conn.execute("DROP ROLE IF EXISTS zsmon_ro")
