"""Security: read-only sessions and the minimal role, API auth, size and rate limits, TLS,
no secret in any log, error or response, and bad input answered with one line (exit 2)."""
from __future__ import annotations

import base64
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import psycopg
import pytest
import requests
import yaml

from zsmon.app import build_registry
from zsmon.core.checker import Checker, CheckContext, Invariant
from zsmon.core.config import Config
from zsmon.core.service import build_runner
from zsmon.testing import LOCAL_HTTP, PrivateRedis, bind_checker, every_job_ran, free_port, running_service, \
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


def test_zsmon_runs_every_checker_and_exporter_as_the_minimal_role(make_config, writer, minimal_role):
    cfg = make_config(env={"ZSMON_DATABASE_URL": minimal_role})
    with every_job_ran(cfg, "the minimal role") as runner:
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
    # Dozens of wrong tokens from one client: lift the failed-attempt budget to see every answer.
    with running_service(_svc_config(make_config, auth_failure_limit_per_minute=10_000)) as svc:
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


def test_every_token_comparison_is_constant_time(make_config, monkeypatch):
    """Each place a presented token meets the admin token (the API's bearer, /ready's bearer, the status
    page's sign-in form) compares them with hmac.compare_digest, whose time does not depend on where they
    differ: seen by a spy on it as each request is answered, right token and wrong."""
    import hmac

    compared: list[tuple[bytes, bytes]] = []
    real = hmac.compare_digest

    def spy(a, b):
        compared.append((bytes(a), bytes(b)))
        return real(a, b)

    monkeypatch.setattr(hmac, "compare_digest", spy)
    wrong = TOKEN[:-1] + "x"  # differs only in its last character
    with running_service(_svc_config(make_config)) as svc:
        asks = {
            "API bearer": lambda t: requests.get(svc.url("api", "/api/v1/checkers"), timeout=10,
                                                 headers={"Authorization": f"Bearer {t}"}).status_code,
            "/ready bearer": lambda t: requests.get(svc.url("api", "/ready"), timeout=10,
                                                   headers={"Authorization": f"Bearer {t}"}).status_code,
            "sign-in form": lambda t: requests.post(svc.url("api", "/login"), data={"token": t}, timeout=10,
                                                    allow_redirects=False).status_code,
        }
        for where, ask in asks.items():
            for given in (wrong, TOKEN):
                compared.clear()
                ask(given)
                assert (given.encode(), TOKEN.encode()) in compared, (where, given, compared)
        assert asks["API bearer"](TOKEN) == 200 and asks["API bearer"](wrong) == 401
        assert asks["sign-in form"](TOKEN) == 303 and asks["sign-in form"](wrong) == 401


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

        r = requests.post(url, headers=AUTH, data=chunks(), timeout=10)  # no Content-Length; the route reads none
        assert r.status_code < 500
        # The metrics listener's process reads a POST's body to pass it on to the service.
        r = requests.post(svc.url("metrics", "/metrics"), data=chunks(), timeout=10)
        assert r.status_code == 413 and "4096" in r.json()["detail"]
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
    from zsmon.core.ratelimit import Buckets

    limiter = Buckets(per_minute=60)  # one per second, burst 60
    assert all(limiter.take("10.0.0.1") == 0 for _ in range(60))
    assert 0.9 < limiter.wait("10.0.0.1") <= 1.0  # looking spends nothing
    wait = limiter.take("10.0.0.1")
    assert 0.9 < wait <= 1.0
    assert limiter.take("10.0.0.2") == 0  # per client
    time.sleep(1.05)
    assert limiter.take("10.0.0.1") == 0
    for i in range(Buckets.MAX_CLIENTS + 50):
        limiter.take(f"c{i}")
    assert len(limiter._buckets) <= Buckets.MAX_CLIENTS


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
            ("GET", f"{base_a}/", None), ("GET", f"{base_a}/status", None), ("GET", f"{base_a}/ready", AUTH),
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


# ---- sessions, sign-in and limits (#20) -----------------------------------------------------------
def _sign_in(svc) -> str:
    from zsmon.core.status import COOKIE

    r = requests.post(svc.url("api", "/login"), data={"token": TOKEN}, allow_redirects=False, timeout=5)
    assert r.status_code == 303, (r.status_code, r.text[:300])
    return r.cookies[COOKIE]


def _details(svc, session: str) -> bool:
    from zsmon.core.status import COOKIE

    return "Sign out" in requests.get(svc.url("api", "/"), cookies={COOKIE: session}, timeout=5).text


def test_a_revoked_session_stops_working_on_every_replica(make_config):
    """Sessions are random ids kept (hashed) in Redis under the deployment's prefix: a sign-in on one
    replica holds on another, and signing out on either revokes the cookie everywhere, even when the
    browser (or whoever copied the cookie) keeps sending it."""
    import redis as redis_lib

    from zsmon.core.status import COOKIE

    cfg = _svc_config(make_config)
    with running_service(cfg) as a, running_service(_svc_config(make_config)) as b:
        first, second = _sign_in(a), _sign_in(a)
        assert first != second and TOKEN not in first
        assert _details(a, first) and _details(b, first) and _details(b, second)
        prefix = a.service.runner.deployment.prefix
        client = redis_lib.Redis.from_url(os.environ.get("ZSMON_TEST_REDIS", "redis://127.0.0.1:6379/0"))
        keys = [k.decode() for k in client.scan_iter(match=f"{prefix}session:*")]
        assert len(keys) == 2 and all(first not in k and second not in k for k in keys)  # only digests stored
        assert 0 < client.pttl(keys[0]) <= 12 * 3600 * 1000  # the server-side expiry

        out = requests.post(b.url("api", "/logout"), cookies={COOKIE: first}, allow_redirects=False, timeout=5)
        assert out.status_code == 303
        assert not _details(a, first) and not _details(b, first)  # the copied cookie is dead everywhere
        assert _details(a, second)  # another session lives on
        assert not _details(a, "forged-" + second[7:])


def test_sessions_without_redis_live_in_memory_and_are_revoked(make_config):
    from zsmon.core.status import COOKIE

    cfg = make_config(redis=False, http={**LOCAL_HTTP, "admin_token": TOKEN}, checkers={"schema": {"interval_seconds": 60}})
    with running_service(cfg) as svc:
        session = _sign_in(svc)
        assert _details(svc, session)
        requests.post(svc.url("api", "/logout"), cookies={COOKIE: session}, allow_redirects=False, timeout=5)
        assert not _details(svc, session)


def test_a_tls_session_cookie_has_the_host_prefix(make_config, self_signed):
    cert, key = self_signed
    cfg = make_config(http={**LOCAL_HTTP, "admin_token": TOKEN}, checkers={"schema": {"interval_seconds": 60}},
                      env={"TLS_CERT_FILE": str(cert), "TLS_KEY_FILE": str(key)})
    with running_service(cfg) as svc:
        base = f"https://127.0.0.1:{svc.service.ports['api']}"
        r = requests.post(f"{base}/login", data={"token": TOKEN}, allow_redirects=False, verify=str(cert), timeout=5)
        cookie = r.headers["set-cookie"]
        assert r.status_code == 303 and cookie.startswith("__Host-zsmon_status=") and "Secure" in cookie
        assert "Path=/" in cookie and "Domain" not in cookie
        assert r.headers["strict-transport-security"].startswith("max-age=")
        session = r.cookies["__Host-zsmon_status"]
        page = requests.get(f"{base}/", cookies={"__Host-zsmon_status": session}, verify=str(cert), timeout=5)
        assert "Sign out" in page.text


@pytest.mark.parametrize("token, rule", [("0123456789abcdef", None), ("0123456789abcde", "at least 16 characters"),
                                          ("abababababababababab", "at least 5 different characters")])
def test_a_weak_admin_token_is_refused_with_the_rule(tmp_path, token, rule):
    from zsmon.core.config import ConfigError, load_config

    if rule is None:  # 16 characters: accepted
        assert load_config(env={"ADMIN_TOKEN": token}).http.admin_token.get_secret_value() == token
        return
    with pytest.raises(ConfigError) as err:
        load_config(env={"ADMIN_TOKEN": token})
    assert "ADMIN_TOKEN" in str(err.value) and "http.admin_token" in str(err.value) and rule in str(err.value)
    assert token not in str(err.value)
    cfg = tmp_path / "c.yml"
    cfg.write_text(yaml.safe_dump({"http": {"admin_token": token}}))
    proc = subprocess.run([*PY, "--config", str(cfg), "config", "check"], capture_output=True, check=False, text=True, timeout=60,
                          env={"PATH": os.environ.get("PATH", ""), "REDIS_HOST": ""})
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(lines) == 1 and "http.admin_token" in lines[0] and rule in lines[0], proc.stderr
    assert token not in proc.stderr


def test_login_with_malformed_forms_is_400_never_a_traceback(make_config, capfd):
    with running_service(_svc_config(make_config)) as svc:
        url = svc.url("api", "/login")
        bad = [
            ("a=1&b=2&c=3&d=4&token=x", "application/x-www-form-urlencoded"),  # 5 fields
            ("&".join(f"f{i}=1" for i in range(500)), "application/x-www-form-urlencoded"),
            (b"token=\xff\xfe", "application/x-www-form-urlencoded"),  # not UTF-8
            ("just some text", "text/plain"),
            ('{"token": "x"}', "application/json"),
        ]
        for body, ctype in bad:
            r = requests.post(url, data=body, headers={"Content-Type": ctype}, allow_redirects=False, timeout=5)
            assert r.status_code == 400, (body, r.status_code, r.text[:200])
            assert "Bad request" in r.text and "Traceback" not in r.text
        # Four fields, the token among them, still sign in; the malformed ones spent no failed-attempt budget.
        ok = requests.post(url, data="a=1&b=2&c=3&token=" + TOKEN, allow_redirects=False, timeout=5,
                           headers={"Content-Type": "application/x-www-form-urlencoded"})
        assert ok.status_code == 303
    out, err = capfd.readouterr()
    assert "Traceback" not in out + err and "Exception in ASGI" not in out + err


def test_forwarded_headers_do_not_escape_the_limits(make_config):
    """By default no proxy is trusted: a client on 127.0.0.1 that varies X-Forwarded-For (or Forwarded)
    is still one client, for failed tokens and for sign-ins alike."""
    with running_service(_svc_config(make_config, auth_failure_limit_per_minute=5, login_limit_per_minute=8)) as svc:
        codes = [requests.get(svc.url("api", "/api/v1/checks"), timeout=5,
                              headers={"Authorization": "Bearer wrong", "X-Forwarded-For": f"10.9.{i}.{i}",
                                       "X-Real-IP": f"10.8.{i}.1", "Forwarded": f"for=10.7.{i}.1"}).status_code
                 for i in range(8)]
        assert codes == [401] * 5 + [429] * 3, codes
        # Over the budget even the right token waits: guessing cannot go on between two real attempts.
        r = requests.get(svc.url("api", "/api/v1/checks"), headers={**AUTH, "X-Forwarded-For": "10.1.1.1"}, timeout=5)
        assert r.status_code == 429 and int(r.headers["retry-after"]) >= 1
        # Sign-in attempts share the failed budget (spent) and have their own limit.
        r = requests.post(svc.url("api", "/login"), data={"token": TOKEN}, headers={"X-Forwarded-For": "10.2.2.2"},
                          allow_redirects=False, timeout=5)
        assert r.status_code == 429 and "Too many sign-in attempts" in r.text
        # Probes and scrapes are never limited.
        assert requests.get(svc.url("api", "/health"), timeout=5).status_code == 200
        assert requests.get(svc.url("metrics", "/metrics"), timeout=5).status_code == 200


def test_login_is_limited_by_default(make_config):
    with running_service(_svc_config(make_config)) as svc:  # no limit configured: the defaults
        codes = [requests.post(svc.url("api", "/login"), data={"token": "guess"}, allow_redirects=False, timeout=5,
                               headers={"X-Forwarded-For": f"192.0.2.{i}"}).status_code for i in range(12)]
        assert codes[:10] == [401] * 10 and codes[10:] == [429, 429], codes


def test_a_trusted_proxy_names_the_client(make_config):
    """With the proxy's address in http.trusted_proxies, each forwarded client has its own budget."""
    cfg = _svc_config(make_config, auth_failure_limit_per_minute=2, trusted_proxies=["127.0.0.1/32"])
    with running_service(cfg) as svc:
        def attempt(client: str) -> int:
            return requests.get(svc.url("api", "/api/v1/checks"), timeout=5, headers={
                "Authorization": "Bearer wrong", "X-Forwarded-For": client}).status_code

        assert [attempt("198.51.100.7") for _ in range(3)] == [401, 401, 429]
        assert [attempt("198.51.100.8") for _ in range(2)] == [401, 401]


def test_responses_are_not_sniffed_cached_or_redirected_by_host(make_config):
    with running_service(_svc_config(make_config)) as svc:
        for url, headers in [(svc.url("api", "/api/v1/checks"), AUTH), (svc.url("metrics", "/metrics"), None),
                             (svc.url("api", "/ready"), None), (svc.url("api", "/api/v1/openapi.json"), None),
                             (svc.url("api", "/api/v1/checks"), None)]:
            r = requests.get(url, headers=headers, timeout=5)
            assert r.headers["x-content-type-options"] == "nosniff", url
            assert r.headers["cache-control"] == "no-store", url
            assert "strict-transport-security" not in r.headers  # plain HTTP: no HSTS
        # No redirect built from the Host header: a trailing slash is simply not a route.
        r = requests.get(svc.url("api", "/api/v1/checks/"), headers={**AUTH, "Host": "evil.example"},
                         allow_redirects=False, timeout=5)
        assert r.status_code == 404 and "location" not in r.headers


def test_a_slow_client_is_disconnected(make_config):
    """A connection that trickles its headers is closed after http.header_timeout_seconds."""
    import socket

    with running_service(_svc_config(make_config, header_timeout_seconds=1)) as svc:
        with socket.create_connection(("127.0.0.1", svc.service.ports["api"]), timeout=10) as sock:
            start = time.monotonic()
            sock.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n")
            try:
                for _ in range(20):
                    time.sleep(0.2)
                    sock.sendall(b"X-Slow: 1\r\n")
            except OSError:
                pass  # closed by the server while we were still sending
            sock.settimeout(5)
            try:
                data = sock.recv(1024)
            except OSError:
                data = b""
            assert data == b"", data
            assert time.monotonic() - start < 4.5
        # A prompt client is served as usual.
        assert requests.get(svc.url("api", "/health"), timeout=5).status_code == 200


# ---- TLS files that cannot work (#20) ------------------------------------------------------------------
@pytest.fixture(scope="module")
def bad_tls(tmp_path_factory, self_signed):
    d = tmp_path_factory.mktemp("badtls")
    other_key = d / "other-key.pem"
    subprocess.run(["openssl", "genpkey", "-algorithm", "RSA", "-pkeyopt", "rsa_keygen_bits:2048", "-out",
                    str(other_key)], check=True, capture_output=True, timeout=60)
    encrypted = d / "encrypted-key.pem"
    subprocess.run(["openssl", "pkey", "-in", str(self_signed[1]), "-aes256", "-passout", "pass:hunter2-xyz",
                    "-out", str(encrypted)], check=True, capture_output=True, timeout=60)
    garbage = d / "garbage.pem"
    garbage.write_text("this is not a certificate\n")
    return {"other_key": other_key, "encrypted": encrypted, "garbage": garbage}


@pytest.mark.parametrize("cert, key, expected", [
    ("cert", "other_key", "does not match the certificate"),
    ("garbage", "key", "holds no PEM certificate"),
    ("cert", "garbage", "holds no PEM private key"),
    ("cert", "encrypted", "is encrypted with a passphrase"),
])
def test_tls_file_mistakes_name_their_real_cause(tmp_path, self_signed, bad_tls, cert, key, expected):
    files = {"cert": self_signed[0], "key": self_signed[1], **bad_tls}
    cfg = tmp_path / "c.yml"
    cfg.write_text(yaml.safe_dump({"http": LOCAL_HTTP}))
    env = {"PATH": os.environ.get("PATH", ""), "REDIS_HOST": "", "ZSMON_DATABASE_URL": "postgresql://u@127.0.0.1:1/x",
           "TLS_CERT_FILE": str(files[cert]), "TLS_KEY_FILE": str(files[key])}
    # No terminal to prompt on, and stdin closed: a passphrase prompt would hang or fail differently.
    proc = subprocess.run([*PY, "--config", str(cfg), "run"], env=env, capture_output=True, check=False, text=True, timeout=60,
                          stdin=subprocess.DEVNULL, start_new_session=True)
    errors = [line for line in proc.stderr.splitlines() if line.startswith("zsmon: error:")]
    assert proc.returncode == 2 and len(errors) == 1 and expected in errors[0], proc.stderr
    assert "could not bind" not in proc.stderr and "Traceback" not in proc.stderr and "PEM pass" not in proc.stderr


# ---- credentials that must never be printed (#20) ------------------------------------------------------
AT_PASSWORD = "Db@Pw-Secr3t-8841"  # an '@' in a password, as people write them


def test_a_dsn_with_an_unescaped_at_is_refused_without_printing_any_of_it(tmp_path):
    dsn = f"postgresql://zsmon:{AT_PASSWORD}@127.0.0.1:{free_port()}/zerostate"
    cfg = tmp_path / "c.yml"
    cfg.write_text(yaml.safe_dump({"http": LOCAL_HTTP, "database": {"connect_timeout_seconds": 1}}))
    env = {"PATH": os.environ.get("PATH", ""), "REDIS_HOST": "", "ZSMON_DATABASE_URL": dsn, "LOG_FORMAT": "json",
           "LOG_LEVEL": "debug"}
    for args in (["run"], ["check", "--once"], ["config", "check"], ["render", "--out", str(tmp_path / "r")]):
        proc = subprocess.run([*PY, "--config", str(cfg), *args], env=env, capture_output=True, check=False, text=True,
                              timeout=60)
        errors = [line for line in proc.stderr.splitlines() if line.startswith("zsmon: error:")]
        assert proc.returncode == 2 and len(errors) == 1, (args, proc.stderr)
        assert "ZSMON_DATABASE_URL" in errors[0] and "unescaped '@'" in errors[0] and "%40" in errors[0]
        for fragment in ("Db@", "Pw-Secr3t", "Secr3t-8841", AT_PASSWORD):
            assert fragment not in proc.stdout + proc.stderr, (args, fragment, proc.stderr)


CREDENTIAL_VALUES = [
    # (YAML, the secret that must not appear) - keys not called password/url/admin_token.
    ({"render": {"prometheus_url": "http://grafana:Graf-Secr3t-77@prom:9090"}}, "Graf-Secr3t-77"),
    ({"render": {"pager_webhook_url": "https://hooks:Hook-Secr3t-12@pager.example/x y"}}, "Hook-Secr3t-12"),
    ({"render": {"zsmon_targets": ["postgresql://zsmon:Tgt-Secr3t-31@db:5432/zerostate"]}}, "Tgt-Secr3t-31"),
    ({"database": {"sslmode": "postgresql://zsmon:Mode-Secr3t-45@db/zerostate"}}, "Mode-Secr3t-45"),
    ({"database": {"sslmode": "host=db password=Kv-Secr3t-58 dbname=z"}}, "Kv-Secr3t-58"),
    ({"http": {"api_listen": "https://ghp_Tok3nSecr3t99@github.com"}}, "ghp_Tok3nSecr3t99"),
]


@pytest.mark.parametrize("data, secret", CREDENTIAL_VALUES)
def test_credential_looking_config_values_are_redacted_in_errors(tmp_path, data, secret):
    cfg = tmp_path / "c.yml"
    cfg.write_text(yaml.safe_dump(data))
    env = {"PATH": os.environ.get("PATH", ""), "REDIS_HOST": ""}
    proc = subprocess.run([*PY, "--config", str(cfg), "config", "check"], env=env, capture_output=True, check=False, text=True,
                          timeout=60)
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(lines) == 1 and lines[0].startswith("zsmon: error: "), proc.stderr
    assert secret not in proc.stderr and secret[:6] not in proc.stderr, proc.stderr
    # The same value through the environment (before logging is configured) is hidden as well.
    if "sslmode" in data.get("database", {}):
        proc = subprocess.run([*PY, "config", "check"], capture_output=True, check=False, text=True, timeout=60,
                              env={**env, "DB_SSLMODE": data["database"]["sslmode"]})
        assert proc.returncode == 2 and "DB_SSLMODE" in proc.stderr and secret not in proc.stderr, proc.stderr


def test_a_percent_encoded_at_password_and_the_database_address_stay_private(tmp_path):
    """The '@' written correctly (%40): zsmon connects with it and prints it nowhere; /ready and the status
    page name the database's host and name only to a caller with the token."""
    server = PrivateRedis(password="the-real-redis-password")
    try:
        logs, responses = _leak_run(tmp_path, "json", server.port, extra_env={
            "ZSMON_DATABASE_URL": f"postgresql://zsmon:{AT_PASSWORD.replace('@', '%40')}@127.0.0.1:{free_port()}"
                                  "/ledger_private_db"})
    finally:
        server.stop()
    assert "database_down" in logs
    for fragment in (AT_PASSWORD, "Db%40Pw", "Pw-Secr3t", "Secr3t-8841"):
        assert fragment not in logs, fragment
        for body in responses:
            assert fragment not in body, (fragment, body[:300])
    public = [responses[1], responses[2], responses[10]]  # /ready on both listeners, the status page
    for body in public:
        assert "not ready" in body and "127.0.0.1" not in body and "ledger_private_db" not in body, body[-800:]
        assert "database unavailable" in body
    assert "zsmon@127.0.0.1:" in responses[-1] and "/ledger_private_db" in responses[-1]  # /ready with the token


def test_ready_names_the_database_only_for_the_token_and_is_no_token_oracle():
    """/ready shows user@host:port/db to a caller with the token; wrong tokens spend the same failed-attempt
    budget as on /api, and once it is spent the header is not even compared."""
    from types import SimpleNamespace

    from fastapi.testclient import TestClient

    from zsmon.core.config import load_config
    from zsmon.core.http import create_metrics_app

    config = load_config(env={"ADMIN_TOKEN": TOKEN})  # the default budget: 30 failures a minute
    where = "zsmon@db.internal:5432/ledger"
    service = SimpleNamespace(config=config, readiness=lambda: [f"database {where} unavailable: refused"],
                              conceal=lambda text: text.replace(f"database {where} ", "database "),
                              memory_skipped=list)
    client = TestClient(create_metrics_app(service))
    assert client.get("/ready").json()["reasons"] == ["database unavailable: refused"]
    assert client.get("/ready", headers=AUTH).json()["reasons"] == [f"database {where} unavailable: refused"]
    for _ in range(30):
        assert where not in client.get("/ready", headers={"Authorization": "Bearer wrong-guess"}).text
    assert where not in client.get("/ready", headers=AUTH).text
    assert client.get("/ready").status_code == 503  # the probe itself is never limited
