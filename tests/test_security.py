"""Security: read-only sessions and the minimal role, API auth, size and rate limits, TLS,
no secret in any log, error or response, and bad input answered with one line (exit 2)."""
from __future__ import annotations

import base64
import json
import os
import subprocess
import sys
import time
import uuid
from pathlib import Path

import psycopg
import pytest
import requests
import yaml
from psycopg import sql
from psycopg.conninfo import conninfo_to_dict, make_conninfo

from zsmon.app import build_registry
from zsmon.core.checker import Checker, CheckContext, Invariant
from zsmon.core.config import Config
from zsmon.core.service import build_runner
from zsmon.testing import LOCAL_HTTP, PLATFORM_TABLES, PrivateRedis, bind_checker, free_port, running_service, \
    wait_for

TOKEN = "sec-token-3b9f0c"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
PY = [sys.executable, "-m", "zsmon.cli"]


# ---- read-only -----------------------------------------------------------------------------
class WriteChecker(Checker):
    """Test-only: tries to write with whatever SQL it is given."""

    name = "writer"
    description = "test-only: attempts a write"
    invariants = (Invariant("wrote", "never reached", "system"),)

    def __init__(self, statement: str, how: str = "execute") -> None:
        super().__init__()
        self.statement, self.how = statement, how

    def run(self, ctx: CheckContext) -> None:
        if self.how == "find":  # as a declared query would be run
            ctx.find("wrote", self.statement)
        else:
            ctx.conn.execute(self.statement)
        ctx.report("wrote", [])


WRITES = [
    ("INSERT INTO agents (did, name) VALUES ('did:evil', 'x')", "tried to write in zsmon's read-only session"),
    ("UPDATE accounts SET balance = 0", "tried to write in zsmon's read-only session"),
    ("DELETE FROM payment_channels", "tried to write in zsmon's read-only session"),
    ("CREATE TABLE zsmon_evil (x int)", "tried to write in zsmon's read-only session"),
    ("SELECT 1; COMMIT; BEGIN READ WRITE; CREATE TABLE zsmon_evil (x int); COMMIT", "several statements"),
    ("COMMIT", None),  # ending the snapshot early: refused or harmless, never a write
]


@pytest.mark.parametrize("statement, reason", WRITES)
def test_a_checker_cannot_write(make_config, writer, statement, reason):
    cfg = make_config(redis=False)
    runner = build_runner(build_registry(cfg), only=["schema"])
    runner.checkers["writer"] = bind_checker(WriteChecker(statement), cfg)
    try:
        result = runner.run_check("writer")
    finally:
        runner.db.close()
    if reason is not None:
        assert result.status == "error" and reason in result.error, result.error
    assert writer.execute("SELECT count(*) FROM agents").fetchone()[0] == 0
    assert writer.execute("SELECT to_regclass('zsmon_evil')").fetchone()[0] is None


def test_declared_sql_cannot_write_either(make_config, writer):
    cfg = make_config(redis=False)
    runner = build_runner(build_registry(cfg), only=["schema"])
    try:
        for query in [
            "WITH x AS (INSERT INTO agents (did, name) VALUES ('did:evil', 'x') RETURNING did) "
            "SELECT did AS entity_id, NULL::numeric AS expected, NULL::numeric AS actual, NULL::numeric AS difference, "
            "'' AS detail FROM x",
            "SELECT 'a' AS entity_id, NULL::numeric AS expected, NULL::numeric AS actual, NULL::numeric AS difference, "
            "'' AS detail) AS v; COMMIT; BEGIN READ WRITE; INSERT INTO agents (did, name) VALUES ('did:evil', 'x'); "
            "SELECT * FROM (SELECT 1",
        ]:
            runner.checkers["writer"] = bind_checker(WriteChecker(query, how="find"), cfg)
            result = runner.run_check("writer")
            assert result.status == "error", result
    finally:
        runner.db.close()
    assert writer.execute("SELECT count(*) FROM agents").fetchone()[0] == 0


@pytest.fixture
def minimal_role(db_url):
    """The role docs/deployment.md prescribes, created in the test database; dropped afterwards."""
    role = f"zsmon_ro_{uuid.uuid4().hex[:8]}"
    dbname = conninfo_to_dict(db_url)["dbname"]
    with psycopg.connect(db_url, autocommit=True) as admin:
        admin.execute(sql.SQL("CREATE ROLE {} LOGIN PASSWORD 'unused-with-trust'").format(sql.Identifier(role)))
        admin.execute(sql.SQL("GRANT CONNECT ON DATABASE {} TO {}").format(sql.Identifier(dbname), sql.Identifier(role)))
        admin.execute(sql.SQL("GRANT USAGE ON SCHEMA public TO {}").format(sql.Identifier(role)))
        admin.execute(sql.SQL("GRANT SELECT ON {} TO {}").format(
            sql.SQL(", ").join(map(sql.Identifier, PLATFORM_TABLES)), sql.Identifier(role)))
        admin.execute(sql.SQL("GRANT pg_monitor TO {}").format(sql.Identifier(role)))
    params = conninfo_to_dict(db_url)
    params["user"] = role
    try:
        yield make_conninfo(**params)
    finally:
        with psycopg.connect(db_url, autocommit=True) as admin:
            admin.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE usename = %s", (role,))
            admin.execute(sql.SQL("DROP OWNED BY {}").format(sql.Identifier(role)))
            admin.execute(sql.SQL("DROP ROLE {}").format(sql.Identifier(role)))


def test_zsmon_runs_every_checker_and_exporter_as_the_minimal_role(make_config, writer, minimal_role):
    from zsmon.core.metrics import Metrics
    from zsmon.core.store import ResultStore

    cfg = make_config(env={"ZSMON_DATABASE_URL": minimal_role})
    registry = build_registry(cfg)
    exporters = [n for n in registry.enabled_exporters() if n != "api_probe"]  # api_probe reads no table
    metrics = Metrics(ResultStore(), exporter_names=exporters)
    runner = build_runner(registry, only=list(registry.checker_classes), exporters=exporters, metrics=metrics)
    try:
        for name in runner.checkers:
            result = runner.run_check(name)
            assert result.status != "error", f"{name} as the minimal role: {result.error}"
        for name in runner.exporters:
            runner.collect(name)
            assert metrics.exporter_errors.labels(name)._value.get() == 0, name
        # The role is the boundary for code, too: even a deliberate escape from the session guard fails.
        runner.checkers["writer"] = bind_checker(WriteChecker("SET SESSION CHARACTERISTICS AS TRANSACTION READ WRITE"),
                                                 cfg)
        runner.run_check("writer")
        with runner.db.pool.connection() as conn:
            conn.autocommit = True
            conn.execute("SET default_transaction_read_only = off")
            with pytest.raises(psycopg.errors.InsufficientPrivilege):
                conn.execute("INSERT INTO agents (did, name) VALUES ('did:evil', 'x')")
            conn.autocommit = False
            conn.rollback()
    finally:
        runner.db.close()
    assert writer.execute("SELECT count(*) FROM agents").fetchone()[0] == 0


# ---- API auth --------------------------------------------------------------------------------
PROTECTED = [("GET", "/api/v1/checks"), ("GET", "/api/v1/checks/schema"), ("POST", "/api/v1/checks/schema/run"),
             ("GET", "/api/v1/violations"), ("GET", "/api/v1/checkers"), ("POST", "/admin/verify-balances")]


def _svc_config(make_config, **http):
    return make_config(http={**LOCAL_HTTP, "admin_token": TOKEN, **http}, scheduler={"health_interval_seconds": 0.5},
                       checkers={"schema": {"interval_seconds": 60}})


def test_every_protected_route_needs_exactly_the_token(make_config):
    wrong = [None, {"Authorization": "Bearer"}, {"Authorization": "Bearer wrong"},
             {"Authorization": f"Bearer {TOKEN[:-1]}"}, {"Authorization": f"Bearer {TOKEN}x"},
             {"Authorization": f"Bearer {TOKEN.upper()}"}, {"Authorization": f"Token {TOKEN}"},
             {"Authorization": "Basic " + base64.b64encode(f"admin:{TOKEN}".encode()).decode()},
             {"X-Admin-Token": TOKEN}]
    with running_service(_svc_config(make_config)) as svc:
        for method, path in PROTECTED:
            for headers in wrong:
                r = requests.request(method, svc.url("api", path), headers=headers, timeout=10)
                assert r.status_code == 401, (method, path, headers, r.status_code)
                assert r.headers.get("www-authenticate") == "Bearer"
                assert TOKEN not in r.text
            ok = requests.request(method, svc.url("api", path), headers=AUTH, timeout=30)
            assert ok.status_code in (200, 404, 409), (method, path, ok.status_code, ok.text)
            lower = requests.request(method, svc.url("api", path), headers={"Authorization": f"bearer {TOKEN}"},
                                     timeout=30)
            assert lower.status_code == ok.status_code  # the auth scheme is case-insensitive (RFC 7235)
        # Open routes: health, readiness, the OpenAPI document. Nothing else.
        assert requests.get(svc.url("api", "/health"), timeout=5).status_code == 200
        assert requests.get(svc.url("api", "/ready"), timeout=5).status_code in (200, 503)
        assert requests.get(svc.url("api", "/api/v1/openapi.json"), timeout=5).status_code == 200
        assert requests.get(svc.url("api", "/docs"), timeout=5).status_code == 404
        # The metrics listener serves no API route.
        assert requests.get(svc.url("metrics", "/api/v1/checks"), headers=AUTH, timeout=5).status_code == 404


def test_without_a_token_every_protected_route_is_off(make_config):
    cfg = make_config(http=LOCAL_HTTP, checkers={"schema": {"interval_seconds": 60}})
    with running_service(cfg) as svc:
        for method, path in PROTECTED:
            for headers in (None, {"Authorization": "Bearer "}, {"Authorization": "Bearer anything"}):
                r = requests.request(method, svc.url("api", path), headers=headers, timeout=5)
                assert r.status_code == 403 and "ADMIN_TOKEN" in r.json()["detail"], (method, path, r.status_code)


def test_the_token_is_compared_in_constant_time():
    import inspect

    from zsmon.core import http

    source = inspect.getsource(http.create_api_app)
    assert "hmac.compare_digest" in source and "==" not in source.split("def require_token")[1].split("\n\n")[0]


def test_request_size_limit(make_config):
    with running_service(_svc_config(make_config, max_body_bytes=4096)) as svc:
        url = svc.url("api", "/api/v1/checks/schema/run")
        r = requests.post(url, headers=AUTH, data=b"x" * 5000, timeout=10)
        assert r.status_code == 413 and "4096" in r.json()["detail"]
        r = requests.post(url, data=b"x" * 5000, timeout=10)  # refused before the token is even looked at
        assert r.status_code == 413

        def chunks():
            for _ in range(10):
                yield b"y" * 1000

        r = requests.post(url, headers=AUTH, data=chunks(), timeout=10)  # no Content-Length
        assert r.status_code < 500
        assert requests.post(url, headers=AUTH, data=b"x" * 100, timeout=30).status_code == 200


def test_rate_limit_on_api_and_admin_only(make_config):
    with running_service(_svc_config(make_config, rate_limit_per_minute=5)) as svc:
        codes = [requests.get(svc.url("api", "/api/v1/checks"), headers=AUTH, timeout=5).status_code for _ in range(5)]
        assert codes == [200] * 5
        r = requests.get(svc.url("api", "/api/v1/checks"), headers=AUTH, timeout=5)
        assert r.status_code == 429 and int(r.headers["retry-after"]) >= 1 and "rate limit" in r.json()["detail"]
        # Wrong tokens are throttled too: the limit applies before authentication.
        assert requests.post(svc.url("api", "/admin/verify-balances"), timeout=5).status_code == 429
        # Probes and scrapes are never limited.
        for _ in range(20):
            assert requests.get(svc.url("api", "/health"), timeout=5).status_code == 200
            assert requests.get(svc.url("metrics", "/metrics"), timeout=5).status_code == 200
        assert requests.get(svc.url("api", "/ready"), timeout=5).status_code in (200, 503)


def test_rate_limit_refills_and_stays_bounded():
    from zsmon.core.http import RateLimit

    limiter = RateLimit(None, per_minute=60)  # one per second, burst 60
    assert all(limiter._take("10.0.0.1") == 0 for _ in range(60))
    wait = limiter._take("10.0.0.1")
    assert 0.9 < wait <= 1.0
    assert limiter._take("10.0.0.2") == 0  # per client
    time.sleep(1.05)
    assert limiter._take("10.0.0.1") == 0
    for i in range(RateLimit.MAX_CLIENTS + 50):
        limiter._take(f"c{i}")
    assert len(limiter._buckets) <= RateLimit.MAX_CLIENTS


# ---- TLS -----------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def self_signed(tmp_path_factory):
    d = tmp_path_factory.mktemp("tls")
    cert, key = d / "cert.pem", d / "key.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", str(key), "-out", str(cert),
                    "-days", "1", "-subj", "/CN=127.0.0.1", "-addext", "subjectAltName=IP:127.0.0.1"],
                   check=True, capture_output=True, timeout=60)
    return cert, key


def test_tls_on_both_listeners_from_the_deployment_env_vars(make_config, self_signed):
    cert, key = self_signed
    cfg = make_config(http={**LOCAL_HTTP, "admin_token": TOKEN}, checkers={"schema": {"interval_seconds": 60}},
                      env={"TLS_CERT_FILE": str(cert), "TLS_KEY_FILE": str(key)})
    with running_service(cfg) as svc:
        ports = svc.service.ports
        assert requests.get(f"https://127.0.0.1:{ports['metrics']}/metrics", verify=str(cert), timeout=5).status_code == 200
        assert requests.get(f"https://127.0.0.1:{ports['metrics']}/health", verify=str(cert), timeout=5).status_code == 200
        r = requests.get(f"https://127.0.0.1:{ports['api']}/api/v1/checks", headers=AUTH, verify=str(cert), timeout=5)
        assert r.status_code == 200
        for port in ports.values():
            with pytest.raises(requests.exceptions.SSLError):  # an untrusted certificate is refused by clients
                requests.get(f"https://127.0.0.1:{port}/health", timeout=5)
            with pytest.raises(requests.exceptions.ConnectionError):  # no plain HTTP on a TLS listener
                requests.get(f"http://127.0.0.1:{port}/health", timeout=5)


@pytest.mark.parametrize("cert_exists, key_set", [(False, True), (True, False)])
def test_tls_misconfiguration_is_one_line_and_exit_2(tmp_path, self_signed, cert_exists, key_set):
    cert, key = self_signed
    env = {"PATH": os.environ.get("PATH", ""), "REDIS_HOST": "", "ZSMON_DATABASE_URL": "postgresql://u@127.0.0.1:1/x",
           "TLS_CERT_FILE": str(cert if cert_exists else tmp_path / "missing.pem")}
    if key_set:
        env["TLS_KEY_FILE"] = str(key)
    cfg = tmp_path / "c.yml"
    cfg.write_text(yaml.safe_dump({"http": LOCAL_HTTP}))
    proc = subprocess.run([*PY, "--config", str(cfg), "run"], env=env, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2
    errors = [line for line in proc.stderr.splitlines() if line.startswith("zsmon: error:")]
    assert len(errors) == 1 and "TLS" in errors[0] and "Traceback" not in proc.stderr, proc.stderr


# ---- no secret leaks ----------------------------------------------------------------------------
DB_PASSWORD = "db-Pass-Secr3t-7319"
REDIS_PASSWORD = "redis-Pass-Secr3t-5521"
SECRETS = (DB_PASSWORD, REDIS_PASSWORD, TOKEN)


def _leak_run(tmp_path: Path, fmt: str, redis_port: int, extra_env: dict | None = None) -> tuple[str, list[str]]:
    """`zsmon run` against an unreachable database and a Redis with another password; returns stderr and
    every response body and header it served."""
    mport, aport = free_port(), free_port()
    builtin = build_registry(Config())
    cfg = tmp_path / f"{fmt}.yml"
    cfg.write_text(yaml.safe_dump({
        "http": {"metrics_listen": f"127.0.0.1:{mport}", "api_listen": f"127.0.0.1:{aport}"},
        "scheduler": {"health_interval_seconds": 0.5},
        "database": {"connect_timeout_seconds": 1},
        "ha": {"enabled": True, "lease_seconds": 1},  # leases need Redis: its failure is logged too
        "checkers": {n: {"interval_seconds": 1} for n in builtin.checker_classes},
        "exporters": {n: {"interval_seconds": 1} for n in builtin.exporter_classes},
    }))
    env = {"PATH": os.environ.get("PATH", ""), "LOG_FORMAT": fmt, "LOG_LEVEL": "debug" if fmt == "json" else "info",
           "ZSMON_DATABASE_URL": f"postgresql://zsmon:{DB_PASSWORD}@127.0.0.1:{free_port()}/zerostate",
           "REDIS_HOST": "127.0.0.1", "REDIS_PORT": str(redis_port), "REDIS_PASSWORD": REDIS_PASSWORD,
           "ADMIN_TOKEN": TOKEN, **(extra_env or {})}
    proc = subprocess.Popen([*PY, "--config", str(cfg), "run"], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    seen: list[str] = []
    try:
        base_m, base_a = f"http://127.0.0.1:{mport}", f"http://127.0.0.1:{aport}"
        wait_for(lambda: _get(f"{base_m}/health") is not None, timeout=20)
        time.sleep(3)  # several failing runs, health probes and collections
        for method, url, headers in [
            ("GET", f"{base_m}/metrics", None), ("GET", f"{base_m}/ready", None), ("GET", f"{base_a}/ready", None),
            ("GET", f"{base_a}/api/v1/checks", AUTH), ("GET", f"{base_a}/api/v1/checkers", AUTH),
            ("GET", f"{base_a}/api/v1/violations", AUTH), ("GET", f"{base_a}/api/v1/openapi.json", None),
            ("POST", f"{base_a}/api/v1/checks/schema/run", AUTH), ("POST", f"{base_a}/admin/verify-balances", AUTH),
            ("GET", f"{base_a}/api/v1/checks", {"Authorization": "Bearer not-the-token"}),
            ("GET", f"{base_a}/", None), ("GET", f"{base_a}/status", None),
        ]:
            r = requests.request(method, url, headers=headers, timeout=30)
            seen.append(f"{r.status_code} {dict(r.headers)} {r.text}")
        checks = json.loads(seen[3].split(" ", 1)[1].split("} ", 1)[1])["checks"]
        assert checks and all(c["status"] == "error" for c in checks), checks
    finally:
        proc.terminate()
        out, err = proc.communicate(timeout=20)
    return out + err, seen


def _get(url: str):
    try:
        return requests.get(url, timeout=2)
    except requests.RequestException:
        return None


@pytest.mark.parametrize("fmt", ["json", "console"])
def test_no_secret_in_logs_errors_metrics_or_responses_when_connections_fail(tmp_path, fmt):
    server = PrivateRedis(password="the-real-redis-password")  # zsmon is given another one
    try:
        logs, responses = _leak_run(tmp_path, fmt, server.port)
    finally:
        server.stop()
    # The failures happened and were logged ...
    assert "database_down" in logs or "unavailable" in logs
    assert "ha_degraded" in logs and ("WRONGPASS" in logs or "invalid username-password" in logs
                                      or "Authentication" in logs), logs[-3000:]
    if fmt == "json":
        for line in logs.splitlines():
            if line.startswith("{"):
                json.loads(line)  # one JSON object per line
    # ... and no secret is anywhere.
    for secret in SECRETS:
        assert secret not in logs, f"{secret} leaked into the {fmt} logs"
        for body in responses:
            assert secret not in body, f"{secret} leaked into a response: {body[:300]}"


def test_no_secret_in_check_once_output_or_config_errors(tmp_path):
    cfg = tmp_path / "c.yml"
    cfg.write_text(yaml.safe_dump({"database": {"connect_timeout_seconds": 1}}))
    env = {"PATH": os.environ.get("PATH", ""), "ZSMON_CONFIG": str(cfg), "REDIS_HOST": "127.0.0.1", "REDIS_PORT": str(free_port()),
           "REDIS_PASSWORD": REDIS_PASSWORD, "ADMIN_TOKEN": TOKEN, "LOG_FORMAT": "json", "LOG_LEVEL": "debug",
           "ZSMON_DATABASE_URL": f"postgresql://zsmon:{DB_PASSWORD}@127.0.0.1:{free_port()}/zerostate"}
    runs = [
        [*PY, "check", "--once", "--only", "schema", "--format", "json"],
        [*PY, "check", "--once", "--only", "schema", "--format", "text"],
        [*PY, "config", "check"],
    ]
    bad = [
        {**env, "DB_PORT": "not-a-port", "DB_PASSWORD": DB_PASSWORD},
        {**env, "ZSMON_DATABASE_URL": f"postgresql://zsmon:{DB_PASSWORD}@127.0.0.1:notaport/x"},
        {**env, "ZSMON_DATABASE_URL": f"host=127.0.0.1 password={DB_PASSWORD} port=1 dbname=x connect_timeout=oops"},
        {**env, "REDIS_PORT": "x"},
    ]
    jobs = [(cmd, env) for cmd in runs] + [([*PY, "check", "--once", "--only", "schema"], e) for e in bad]
    procs = [subprocess.Popen(cmd, env=e, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for cmd, e in jobs]
    outputs = []
    for proc in procs:
        proc.stdout_text, proc.stderr_text = proc.communicate(timeout=60)
        outputs.append(proc)
    assert outputs[0].returncode == 2 and json.loads(outputs[0].stdout_text)["checks"]
    for proc in outputs[len(runs):]:
        assert proc.returncode == 2 and "Traceback" not in proc.stderr_text, proc.stderr_text
    for proc in outputs:
        for secret in SECRETS:
            assert secret not in proc.stdout_text + proc.stderr_text, (proc.args, proc.stderr_text[-500:])


# ---- bad input -------------------------------------------------------------------------------------
BAD_CONFIGS = [
    ("database: [1, 2\n", "invalid YAML"),
    ("a: b: c\n", "invalid YAML"),
    ("database:\n  port: 1\n  port: 2\n", "line 3: database.port: duplicate key"),
    ("checkers: [payments]\n", "checkers: Input should be a valid dictionary"),
    ("database: 5\n", "database: Input should be a valid dictionary"),
    ("http:\n  rate_limit_per_minute: 0\n", "http.rate_limit_per_minute"),
    ("ha:\n  lease_seconds: soon\n", "ha.lease_seconds"),
    ("ha:\n  on_redis_down: panic\n", "ha.on_redis_down"),
    ("checkers:\n  no_such_checker: {}\n", "checkers.no_such_checker: unknown name"),
    ("exporters:\n  nope: {}\n", "exporters.nope: unknown name"),
    ("checkers:\n  schema:\n    interval_seconds: -1\n", "checkers.schema.interval_seconds"),
    (b"\xff\xfe\x00\x01", "not UTF-8"),
    (None, "cannot be read: Is a directory"),
    ("", None),  # an empty file is a valid, empty config
]


@pytest.mark.parametrize("content, expected", BAD_CONFIGS)
def test_bad_config_is_one_clear_line_and_exit_2(tmp_path, content, expected):
    path = tmp_path / "zsmon.yml"
    if content is None:
        path.mkdir()
    elif isinstance(content, bytes):
        path.write_bytes(content)
    else:
        path.write_text(content)
    from click.testing import CliRunner

    from zsmon.cli import cli

    import logging

    root = logging.getLogger()
    saved = root.handlers[:], root.level
    try:  # in process (fast); the command configures logging onto the runner's stream, so put it back after
        result = CliRunner().invoke(cli, ["--config", str(path), "config", "check"], obj={}, env={"REDIS_HOST": ""})
    finally:
        root.handlers[:] = saved[0]
        root.setLevel(saved[1])
    if expected is None:
        assert result.exit_code == 0, result.stderr
        return
    assert result.exit_code == 2 and result.exception is None or isinstance(result.exception, SystemExit)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("zsmon: error: ") and expected in lines[0], result.stderr


@pytest.mark.parametrize("args, expected", [
    (["check", "--once", "--only", "no_such_checker"], "unknown checker 'no_such_checker'"),
    (["check", "--once", "--only", "schema", "--only", "bogus"], "unknown checker 'bogus'"),
    (["--config", "/nonexistent/zsmon.yml", "check", "--once"], "does not exist"),
])
def test_bad_cli_arguments_are_one_clear_line_and_exit_2(args, expected):
    env = {"PATH": os.environ.get("PATH", ""), "REDIS_HOST": "", "ZSMON_DATABASE_URL": "postgresql://u@127.0.0.1:1/x"}
    proc = subprocess.run([*PY, *args], env=env, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and expected in lines[0], proc.stderr


def test_run_with_a_port_in_use_is_one_line_and_exit_2(tmp_path):
    import socket

    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        cfg = tmp_path / "c.yml"
        cfg.write_text(yaml.safe_dump({"http": {"metrics_listen": f"127.0.0.1:{port}", "api_listen": "127.0.0.1:0"}}))
        env = {"PATH": os.environ.get("PATH", ""), "REDIS_HOST": "",
               "ZSMON_DATABASE_URL": "postgresql://u@127.0.0.1:1/x"}
        proc = subprocess.run([*PY, "--config", str(cfg), "run"], env=env, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2
    errors = [line for line in proc.stderr.splitlines() if line.startswith("zsmon: error:")]
    assert len(errors) == 1 and f"port {port} is already in use" in errors[0] and "Traceback" not in proc.stderr, \
        proc.stderr
