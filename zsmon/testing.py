"""pytest fixtures for zsmon and for anyone writing a checker (``pytest_plugins = ["zsmon.testing"]``).

Real services only: each test session creates its own database on the local
PostgreSQL (``ZSMON_TEST_DSN``, default ``postgresql://postgres@127.0.0.1:5432/postgres``),
loads the platform schema and drops the database at the end. Redis tests get
their own key prefix on the local Redis (``ZSMON_TEST_REDIS``, default
``redis://127.0.0.1:6379/0``), deleted afterwards.
"""
from __future__ import annotations

import os
from contextlib import contextmanager
import uuid
from typing import Any, Callable, Iterator

import psycopg
import pytest
from psycopg import sql
from psycopg.conninfo import conninfo_to_dict, make_conninfo

import yaml

from zsmon.app import build_registry, build_service
from zsmon.core.config import load_config
from zsmon.core.deployment import prefix_of
from zsmon.core.registry import BoundChecker
from zsmon.core.service import build_runner
from zsmon.demo import schema_sql

ADMIN_DSN = os.environ.get("ZSMON_TEST_DSN", "postgresql://postgres@127.0.0.1:5432/postgres")
REDIS_URL = os.environ.get("ZSMON_TEST_REDIS", "redis://127.0.0.1:6379/0")
PLATFORM_TABLES = ("channel_transactions", "payment_channels", "accounts", "bids", "auctions",
                   "reputation_events", "reputation_scores", "tasks", "agents", "audit_logs")


def create_platform_database(prefix: str, admin_dsn: str = ADMIN_DSN, schema: bool = True) -> tuple[str, str]:
    """Create a database of its own (``<prefix>_<pid>_<random>``) holding the platform schema.

    Returns (name, DSN); drop it with ``drop_database(name)``. Used by the tests and the benchmarks.
    """
    name = f"{prefix}_{os.getpid()}_{uuid.uuid4().hex[:8]}"
    with psycopg.connect(admin_dsn, autocommit=True) as admin:
        admin.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    url = make_conninfo(**{**conninfo_to_dict(admin_dsn), "dbname": name})
    if schema:
        try:
            with psycopg.connect(url, autocommit=True) as conn:
                conn.execute(schema_sql())
        except BaseException:
            drop_database(name, admin_dsn)
            raise
    return name, url


def drop_database(name: str, admin_dsn: str = ADMIN_DSN) -> None:
    with psycopg.connect(admin_dsn, autocommit=True) as admin:
        admin.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name)))


@pytest.fixture(scope="session")
def db_url() -> Iterator[str]:
    """DSN of a fresh database holding the platform schema, dropped after the session."""
    name, url = create_platform_database("zsmon_test")
    try:
        yield url
    finally:
        drop_database(name)


@pytest.fixture
def writer(db_url: str) -> Iterator[psycopg.Connection]:
    """A read-write connection to the test database, as the platform would have; tables start empty."""
    with psycopg.connect(db_url, autocommit=True) as conn:
        conn.execute(sql.SQL("TRUNCATE {} CASCADE").format(sql.SQL(", ").join(map(sql.Identifier, PLATFORM_TABLES))))
        yield conn


@pytest.fixture
def redis_prefix() -> Iterator[str]:
    """A key prefix of this test's own on the local Redis; its keys are deleted afterwards."""
    import redis

    prefix = f"zsmon-test-{uuid.uuid4().hex[:10]}:"
    yield prefix
    client = redis.Redis.from_url(REDIS_URL)
    try:
        keys = list(client.scan_iter(match=prefix + "*", count=1000))
        if keys:
            client.delete(*keys)
    finally:
        client.close()


def _redis_env() -> dict[str, str]:
    import redis

    kw = redis.Redis.from_url(REDIS_URL).connection_pool.connection_kwargs
    return {"REDIS_HOST": str(kw.get("host", "127.0.0.1")), "REDIS_PORT": str(kw.get("port", 6379))}


@pytest.fixture
def make_config(db_url: str, redis_prefix: str, tmp_path) -> Callable[..., Any]:
    """Build a real Config (YAML file + env) pointing at the test database and Redis.

    ``make_config(checkers={"payments": {"settings": {...}}}, redis=False)``
    """
    def build(redis: bool = True, env: dict[str, str] | None = None, **sections: Any) -> Any:
        data: dict[str, Any] = {"redis": {"key_prefix": redis_prefix}, **sections}
        if not redis:
            data["redis"] = {"enabled": False}
        path = tmp_path / f"zsmon-{uuid.uuid4().hex[:6]}.yml"
        path.write_text(yaml.safe_dump(data))
        full_env = {"ZSMON_DATABASE_URL": db_url, **(_redis_env() if redis else {}), **(env or {})}
        return load_config(path, env=full_env)

    return build


@pytest.fixture
def run_check(make_config) -> Iterator[Callable[..., Any]]:
    """Run one checker once against the test database: ``run_check("payments", mode="full", **config)``.

    Returns the ``CheckResult``. Runners are reused per config so memory across runs
    (Redis) and the last-full timestamp behave as in the sidecar when the same
    ``config`` object is passed again via ``config=``.
    """
    opened: list[Any] = []

    def run(name: str, mode: str | None = None, config: Any = None, **sections: Any) -> Any:
        cfg = config if config is not None else make_config(**sections)
        runner = next((r for r in opened if r.config is cfg), None)
        if runner is None:
            runner = build_runner(build_registry(cfg), only=[name])
            opened.append(runner)
        return runner.run_check(name, mode=mode)

    yield run
    for runner in opened:
        runner.db.close()


def deployment_prefix(config: Any) -> str:
    """The Redis prefix of ``config``'s deployment (``redis.key_prefix`` + the database's identity + ``:``)."""
    prefix = prefix_of(config)
    assert prefix is not None, "the test database does not answer"
    return prefix


def bind_checker(checker: Any, config: Any) -> BoundChecker:
    """A test-only checker instance bound as the registry binds a found one: its schedule and
    statement timeout from ``checkers.<name>`` in ``config``, else from the class and the database section.

    ``runner.checkers["slow"] = bind_checker(SlowChecker(sleep=5), runner.config)`` hands a runner a
    checker no package declares (the registry only finds those of its packages, plugins and YAML files).
    """
    cls = type(checker)
    cfg = config.checker(cls.name)
    return BoundChecker(
        checker=checker, enabled=cfg.enabled,
        interval_seconds=cfg.interval_seconds or cls.default_interval_seconds,
        full_interval_seconds=(cfg.full_interval_seconds or cls.default_full_interval_seconds)
        if cls.supports_incremental else None,
        statement_timeout_seconds=cfg.statement_timeout_seconds or config.database.statement_timeout_seconds)


# ---- a private PostgreSQL cluster a test may stop, pause and restart -------------------
@contextmanager
def every_job_ran(config: Any, who: str) -> Iterator[Any]:
    """Run every checker once and collect every exporter that reads the database against ``config``, asserting
    none errors (``who``: the role, in the message); yields the runner, closed afterwards."""
    from zsmon.core.metrics import Metrics
    from zsmon.core.store import ResultStore

    registry = build_registry(config)
    exporters = [n for n in registry.enabled_exporters() if n != "api_probe"]  # api_probe reads no table
    metrics = Metrics(ResultStore(), exporter_names=exporters)
    runner = build_runner(registry, only=list(registry.checker_classes), exporters=exporters, metrics=metrics)
    try:
        for name in runner.checkers:
            result = runner.run_check(name)
            assert result.status != "error", f"{name} as {who}: {result.error}"
        for name in runner.exporters:
            runner.collect(name)
            assert metrics.exporter_errors.labels(name)._value.get() == 0, name
        yield runner
    finally:
        runner.db.close()


def collect_families(exporter: Any, config: Any) -> dict[str, Any]:
    """One collection of ``exporter`` against ``config``'s database in a read-only snapshot, as the runner
    does it: its metric families by name."""
    from zsmon.core.db import Database
    from zsmon.core.exporter import CollectContext

    db = Database(config.database)
    db.open()
    try:
        with db.snapshot() as conn:
            return {f.name: f for f in exporter.collect(CollectContext(exporter, conn, None, config, None))}
    finally:
        db.close()


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class PrivatePostgres:
    """A throw-away cluster (initdb + pg_ctl from Debian's PostgreSQL) on its own port.

    ``settings`` are extra server settings (``-c name=value``). ``primary.standby()`` makes a hot standby
    of it (``pg_basebackup -R``, streaming), another ``PrivatePostgres`` on a port and directory of its own.
    """

    BIN = os.environ.get("ZSMON_PG_BIN", "/usr/lib/postgresql/15/bin")

    def __init__(self, settings: dict[str, str] | None = None, *, primary: PrivatePostgres | None = None) -> None:
        import tempfile

        self.dir = tempfile.mkdtemp(prefix="zsmon-pg-")
        self.data = os.path.join(self.dir, "data")
        self.port = free_port()
        self.dsn = f"postgresql://postgres@127.0.0.1:{self.port}/postgres"
        self.settings = dict(settings or {})
        self.primary = primary
        self._as_postgres = os.geteuid() == 0  # initdb and postgres refuse to run as root
        if self._as_postgres:
            import shutil

            shutil.chown(self.dir, "postgres", "postgres")
        try:
            if primary is None:
                self._run("initdb", "-D", self.data, "-A", "trust", "-U", "postgres", "--no-sync")
                self.start()
                with psycopg.connect(self.dsn, autocommit=True) as conn:
                    conn.execute(schema_sql())
            else:
                # -R writes standby.signal and primary_conninfo; -X stream copies the WAL the backup needs.
                self._run("pg_basebackup", "-h", "127.0.0.1", "-p", str(primary.port), "-U", "postgres",
                          "-D", self.data, "-R", "-X", "stream", "--checkpoint=fast", "--no-sync")
                self.start()
        except BaseException:
            self.destroy()
            raise

    def standby(self, **settings: str) -> PrivatePostgres:
        """A hot standby streaming from this cluster, answering read-only queries once this returns."""
        return PrivatePostgres({"hot_standby": "on", **settings}, primary=self)

    def wait_for_replay(self, timeout: float = 30.0) -> None:
        """On a standby: wait until it has replayed everything its primary has written so far."""
        import time

        assert self.primary is not None, "wait_for_replay is for a standby"
        with psycopg.connect(self.primary.dsn, autocommit=True) as conn:
            target = conn.execute("SELECT pg_current_wal_lsn()").fetchone()[0]
        deadline = time.monotonic() + timeout
        with psycopg.connect(self.dsn, autocommit=True) as conn:
            while not conn.execute("SELECT pg_last_wal_replay_lsn() >= %s::pg_lsn", (target,)).fetchone()[0]:
                if time.monotonic() > deadline:
                    raise TimeoutError(f"standby on port {self.port} did not replay up to {target} in {timeout:g}s")
                time.sleep(0.02)

    def _run(self, tool: str, *args: str) -> None:
        import subprocess

        cmd = [os.path.join(self.BIN, tool), *args]
        if self._as_postgres:
            cmd = ["runuser", "-u", "postgres", "--", *cmd]
        done = subprocess.run(cmd, check=False, capture_output=True, text=True, timeout=60)
        if done.returncode != 0:
            raise RuntimeError(f"{tool} failed ({done.returncode}): {done.stderr.strip() or done.stdout.strip()}")

    def start(self) -> None:
        extra = "".join(f" -c {k}={v}" for k, v in self.settings.items())
        self._run("pg_ctl", "-D", self.data, "-l", os.path.join(self.dir, "log"), "-w", "-o",
                  f"-p {self.port} -k {self.dir} -c listen_addresses=127.0.0.1 -c fsync=off{extra}", "start")

    def stop(self) -> None:
        self._run("pg_ctl", "-D", self.data, "-m", "immediate", "-w", "stop")

    def pid(self) -> int:
        with open(os.path.join(self.data, "postmaster.pid")) as f:
            return int(f.readline())

    def pids(self) -> list[int]:
        """The postmaster and every backend and auxiliary process it forked."""
        root = self.pid()
        children: dict[int, list[int]] = {}
        for entry in os.listdir("/proc"):
            if entry.isdigit():
                try:
                    with open(f"/proc/{entry}/stat") as f:
                        ppid = int(f.read().rsplit(")", 1)[1].split()[1])
                except (OSError, IndexError, ValueError):
                    continue
                children.setdefault(ppid, []).append(int(entry))
        out, todo = [], [root]
        while todo:
            pid = todo.pop()
            out.append(pid)
            todo.extend(children.get(pid, []))
        return out

    def pause(self) -> None:
        """SIGSTOP the whole server, as a frozen VM: TCP still connects, nothing answers."""
        import signal

        self._paused = self.pids()  # the postmaster first: once stopped it forks nothing new
        for pid in self._paused:
            try:
                os.kill(pid, signal.SIGSTOP)
            except ProcessLookupError:  # a backend that was just exiting (a closed connection)
                pass

    def resume(self) -> None:
        import signal

        for pid in getattr(self, "_paused", []):
            try:
                os.kill(pid, signal.SIGCONT)
            except ProcessLookupError:
                pass
        self._paused = []

    def destroy(self) -> None:
        import shutil

        self.resume()
        try:
            self.stop()
        except Exception:
            pass
        shutil.rmtree(self.dir, ignore_errors=True)


@pytest.fixture
def private_pg() -> Iterator[PrivatePostgres]:
    pg = PrivatePostgres()
    try:
        yield pg
    finally:
        pg.destroy()


@pytest.fixture
def hot_standby() -> Iterator[Callable[..., tuple[PrivatePostgres, PrivatePostgres]]]:
    """``primary, standby = hot_standby(primary={...settings}, standby={...settings})``: a private primary
    holding the platform schema and a streaming hot standby of it, both destroyed after the test."""
    made: list[PrivatePostgres] = []

    def make(primary: dict[str, str] | None = None,
             standby: dict[str, str] | None = None) -> tuple[PrivatePostgres, PrivatePostgres]:
        p = PrivatePostgres(primary)
        made.append(p)
        s = p.standby(**(standby or {}))
        made.append(s)
        return p, s

    yield make
    for pg in reversed(made):  # standbys first
        pg.destroy()


# ---- a private redis-server a test may stop, pause and restart ----------------------------
class PrivateRedis:
    """Debian's ``redis-server`` on its own port, no persistence; optionally password-protected.

    ``stop()`` ends it, ``start()`` brings it back on the same port (empty), ``pause()``/``resume()``
    send SIGSTOP/SIGCONT, ``client()`` returns a redis-py client.
    """

    BIN = os.environ.get("ZSMON_REDIS_SERVER", "/usr/bin/redis-server")

    def __init__(self, password: str | None = None) -> None:
        self.port = free_port()
        self.password = password
        self.proc: Any = None
        self.start()

    def start(self) -> None:
        import subprocess
        import time

        cmd = [self.BIN, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
               "--daemonize", "no", "--loglevel", "warning"]
        if self.password:
            cmd += ["--requirepass", self.password]
        self.proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 10
        while True:
            try:
                self.client().ping()
                return
            except Exception:
                if time.monotonic() > deadline or self.proc.poll() is not None:
                    raise RuntimeError(f"redis-server did not start on port {self.port}")
                time.sleep(0.05)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.resume()
            self.proc.kill()
            self.proc.wait(10)

    def pause(self) -> None:
        import signal

        self.proc.send_signal(signal.SIGSTOP)

    def resume(self) -> None:
        import signal

        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGCONT)

    def client(self, **kw: Any) -> Any:
        import redis

        return redis.Redis(host="127.0.0.1", port=self.port, password=self.password, socket_timeout=2,
                           decode_responses=True, **kw)

    def env(self) -> dict[str, str]:
        """The environment variables pointing zsmon at this server."""
        out = {"REDIS_HOST": "127.0.0.1", "REDIS_PORT": str(self.port)}
        if self.password:
            out["REDIS_PASSWORD"] = self.password
        return out


@pytest.fixture
def private_redis() -> Iterator[PrivateRedis]:
    server = PrivateRedis()
    try:
        yield server
    finally:
        server.stop()


# ---- the whole sidecar, in process ----------------------------------------------------
LOCAL_HTTP = {"metrics_listen": "127.0.0.1:0", "api_listen": "127.0.0.1:0"}


class running_service:
    """``with running_service(config) as svc:`` starts the sidecar on ephemeral ports.

    ``svc.url("metrics", "/metrics")`` and ``svc.url("api", "/api/v1/checks")`` build URLs.
    """

    def __init__(self, config: Any) -> None:
        self.service = build_service(config)

    def __enter__(self) -> "running_service":
        self.service.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.service.stop()

    def url(self, listener: str, path: str) -> str:
        return f"http://127.0.0.1:{self.service.ports[listener]}{path}"

    def metrics_text(self) -> str:
        import requests

        r = requests.get(self.url("metrics", "/metrics"), timeout=5)
        r.raise_for_status()
        return r.text

    def wait_for_metrics(self, needle: str, timeout: float = 15.0) -> str:
        """The ``/metrics`` text once it contains ``needle`` (e.g. a checker's first published result)."""
        return wait_for(lambda: (lambda t: t if needle in t else None)(self.metrics_text()), timeout=timeout)


def wait_for(predicate: Callable[[], Any], timeout: float = 15.0, interval: float = 0.1) -> Any:
    """Poll until ``predicate()`` is truthy; return its value or fail with the timeout."""
    import time

    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not met within {timeout}s")
        time.sleep(interval)
