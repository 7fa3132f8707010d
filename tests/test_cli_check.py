"""``zsmon check``: a database it cannot use names PostgreSQL's own reason at once (exit 2, no secret);
``--config`` after the subcommand; the text output's totals line and ``--sample``."""
from __future__ import annotations

import os
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import psycopg
import pytest
import yaml

from zsmon.testing import free_port

PY = [sys.executable, "-m", "zsmon.cli"]
PASSWORD = "Wr0ng-Pass-5521-secret"


def _check(url: str, *args: str, config: dict | None = None, tmp_path: Path,
           env: dict[str, str] | None = None) -> tuple[subprocess.CompletedProcess, float]:
    cfg = tmp_path / "zsmon.yml"
    cfg.write_text(yaml.safe_dump(config or {}))
    full_env = {"PATH": os.environ.get("PATH", ""), "REDIS_HOST": "", **({"ZSMON_DATABASE_URL": url} if url else {}),
                **(env or {})}
    t0 = time.monotonic()
    proc = subprocess.run([*PY, "check", "--once", "--config", str(cfg), *args], env=full_env,
                          capture_output=True, text=True, timeout=120)
    return proc, time.monotonic() - t0


def _assert_cause(proc: subprocess.CompletedProcess, elapsed: float, *cause: str, limit: float = 8.0) -> None:
    out = proc.stdout + proc.stderr
    assert elapsed < limit, f"took {elapsed:.1f}s: {out[-800:]}"
    assert proc.returncode == 2, out
    assert "Traceback" not in out and PASSWORD not in out, out
    errors = [line for line in proc.stdout.splitlines() if line.strip().startswith("error:")]
    assert len(errors) == 5, proc.stdout  # every checker, each with the one reason on one line
    for line in errors:
        assert all(c in line for c in cause), (cause, line)
        assert "no connection within" not in line, line


# ---- each cause of a failed connection, against the real local PostgreSQL ---------------------------
@pytest.mark.parametrize("url, cause", [
    ("postgresql://postgres@127.0.0.1:5432/zsmon_no_such_db", ('database "zsmon_no_such_db" does not exist',
                                                              "check the database name")),
    # The local server trusts 127.0.0.1 (no password asked): a role that does not exist is its auth failure;
    # a wrong password is proven against a private cluster with scram-sha-256 below.
    ("postgresql://zsmon_no_such_role@127.0.0.1:5432/postgres", ('role "zsmon_no_such_role" does not exist',
                                                                 "check the user")),
    ("postgresql://postgres@127.0.0.1:5432/postgres?sslmode=require",
     ("server does not support SSL, but SSL was required", "sslmode")),
    ("postgresql://postgres:{pw}@127.0.0.1:{closed}/postgres", ("Connection refused", "host and port")),
    ("postgresql://postgres:{pw}@nonexistent.invalid:5432/postgres",
     ("failed to resolve host 'nonexistent.invalid'", "does not resolve")),
], ids=["no-database", "no-role", "ssl-required", "refused", "dns"])
def test_connection_failure_names_the_real_cause_fast(tmp_path, url, cause):
    proc, elapsed = _check(url.format(pw=PASSWORD, closed=free_port()), tmp_path=tmp_path)
    _assert_cause(proc, elapsed, *cause)


def test_db_env_vars_are_named_in_the_advice(tmp_path):
    proc, elapsed = _check("", tmp_path=tmp_path, env={"DB_HOST": "127.0.0.1",
                                                       "DB_PORT": str(free_port()), "DB_PASSWORD": PASSWORD})
    _assert_cause(proc, elapsed, "Connection refused", "check DB_HOST and DB_PORT")


def test_wrong_password_names_the_real_cause(tmp_path, private_pg):
    with psycopg.connect(private_pg.dsn, autocommit=True) as conn:
        conn.execute("CREATE ROLE zsmon_pw LOGIN PASSWORD 'the-right-one'")
        hba = Path(conn.execute("SHOW hba_file").fetchone()[0])
        hba.write_text("local all all trust\nhost all all 127.0.0.1/32 scram-sha-256\n")
        conn.execute("SELECT pg_reload_conf()")
    url = f"postgresql://zsmon_pw:{PASSWORD}@127.0.0.1:{private_pg.port}/postgres"
    proc, elapsed = _check(url, tmp_path=tmp_path)
    _assert_cause(proc, elapsed, 'password authentication failed for user "zsmon_pw"', "check the password")
    # the same through the DB_* variables: the advice names them
    proc, elapsed = _check("", tmp_path=tmp_path, env={
        "DB_HOST": "127.0.0.1", "DB_PORT": str(private_pg.port), "DB_USER": "zsmon_pw",
        "DB_NAME": "postgres", "DB_PASSWORD": PASSWORD})
    _assert_cause(proc, elapsed, "password authentication failed", "check DB_PASSWORD and DB_USER")


# ---- fail fast: all checkers together, not connect_timeout per checker in turn ------------------------
@pytest.fixture
def silent_server():
    """Accepts TCP connections and never answers (a frozen server, a half-open middlebox)."""
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(64)
    held: list[socket.socket] = []
    stop = threading.Event()

    def accept() -> None:
        server.settimeout(0.2)
        while not stop.is_set():
            try:
                held.append(server.accept()[0])
            except OSError:
                continue

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    yield server.getsockname()[1]
    stop.set()
    thread.join(2)
    for s in held:
        s.close()
    server.close()


def test_unreachable_database_answers_for_all_checkers_at_once(tmp_path, silent_server):
    # Five checkers; the old code waited the pool's timeout (plus an identity lookup) once per checker: ~15 s here.
    url = f"postgresql://postgres@127.0.0.1:{silent_server}/postgres"
    proc, elapsed = _check(url, config={"database": {"connect_timeout_seconds": 2}}, tmp_path=tmp_path)
    _assert_cause(proc, elapsed, "timeout", "connect_timeout_seconds", limit=6.0)
    assert proc.stdout.strip().splitlines()[-1].startswith("total: 5 checkers, 0 failing, 5 errors"), proc.stdout


def test_closed_port_with_the_default_timeout_is_fast(tmp_path):
    proc, elapsed = _check(f"postgresql://postgres@127.0.0.1:{free_port()}/postgres", tmp_path=tmp_path)
    _assert_cause(proc, elapsed, "Connection refused", limit=8.0)


# ---- --config after the subcommand ----------------------------------------------------------------
def test_config_option_after_the_subcommand(tmp_path):
    env = {"PATH": os.environ.get("PATH", ""), "REDIS_HOST": ""}
    first, second = tmp_path / "first.yml", tmp_path / "second.yml"
    port = free_port()
    first.write_text("")
    second.write_text(yaml.safe_dump({"database": {"port": port}}))

    def run(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([*PY, *args], env=env, capture_output=True, text=True, timeout=60)

    assert run("config", "check", "--config", str(second)).stdout.strip() == f"ok: {second}"
    # after the subcommand wins over before it, and over $ZSMON_CONFIG
    assert run("--config", str(first), "config", "check", "--config", str(second)).stdout.strip() == f"ok: {second}"
    env["ZSMON_CONFIG"] = str(first)
    assert run("config", "check", "--config", str(second)).stdout.strip() == f"ok: {second}"
    assert run("config", "check").stdout.strip() == f"ok: {first}"
    proc = run("check", "--once", "--only", "schema", "--config", str(second))
    assert proc.returncode == 2 and f"127.0.0.1:{port}/zerostate unavailable: Connection refused" in proc.stdout, \
        proc.stdout + proc.stderr
    missing = run("check", "--once", "--config", str(tmp_path / "nope.yml"))
    assert missing.returncode == 2 and len(missing.stderr.strip().splitlines()) == 1, missing.stderr
    assert "nope.yml" in missing.stderr


# ---- text output for people -------------------------------------------------------------------------
def _result(checker: str, status: str, counts: dict[str, int], rows: int = 0, skipped: dict | None = None,
            unacked: dict[str, int] | None = None, error: str | None = None) -> dict:
    inv = next(iter(counts), "x")
    return {"checker": checker, "status": status, "mode": "full", "duration_seconds": 0.1, "error": error,
            "violation_counts": counts, "unacknowledged_counts": unacked if unacked is not None else counts,
            "violations": [{"invariant": inv, "entity_type": "channel", "entity_id": f"c{i}", "expected": 1,
                            "actual": 2, "difference": 1, "detail": "d"} for i in range(rows)],
            "skipped": skipped or {}, "summaries": {}}


def test_totals_line_and_sample_limit_in_the_text_output():
    from zsmon.cli import _text, _totals

    results = [
        _result("payments", "fail", {"escrow_state": 5, "channel_conservation": 0}, rows=5,
                unacked={"escrow_state": 3, "channel_conservation": 0}),
        _result("reputation", "fail", {"score_range": 2}, rows=2, skipped={"score_jump": "needs memory"}),
        _result("schema", "pass", {"columns": 0}, skipped={"drift": "needs memory"}),
        _result("auctions", "error", {}, error="database x unavailable: Connection refused"),
    ]
    assert _totals(results) == ("total: 4 checkers, 2 failing, 1 error; 7 violations (5 unacknowledged), "
                                "2 invariants skipped (not judged: see the 'skipped' lines above)")
    assert _totals(results[2:3]) .startswith("total: 1 checker, 0 failing, 0 errors; 0 violations (0 unacknowledged)")
    assert "skipped" not in _totals([_result("schema", "pass", {"columns": 0})])

    text = _text(results[0], sample=2)
    assert [line.split(":")[0].strip() for line in text.splitlines() if "expected" in line] == ["channel c0",
                                                                                                 "channel c1"]
    assert "    ... and 3 more not shown (raise --sample to see more)" in text.splitlines()
    assert text.count("expected") == 5 - 3 and "more" not in _text(results[0])
    assert "... and 5 more not shown" in _text(results[0], sample=0)
    capped = _result("payments", "fail", {"escrow_state": 40}, rows=5)  # the checker sampled 5 of 40
    assert "    ... and 35 more not shown (checks.sample_limit caps the sample)" in _text(capped).splitlines()


def test_check_text_output_end_to_end(tmp_path, db_url, writer):
    from zsmon.demo.simulator.payments import PaymentSimulator

    PaymentSimulator(writer, seed=5).run(200)
    # money_from_nowhere (zsmon.demo.simulator.payments) on three channels at once
    planted = writer.execute("UPDATE payment_channels SET current_balance = current_balance + 5, updated_at = now() "
                             "WHERE id IN (SELECT id FROM payment_channels WHERE state <> 'closed' LIMIT 3)").rowcount
    assert planted == 3
    proc, _ = _check(db_url, "--only", "payments", "--only", "schema", "--sample", "1", tmp_path=tmp_path)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    lines = proc.stdout.strip().splitlines()
    at = lines.index("  channel_conservation: 3 violations")
    assert lines[at + 1].startswith("    channel ") and lines[at + 2].startswith("    ... and 2 more"), proc.stdout
    # Without Redis the memory invariants were skipped: the last line is the totals and says so.
    assert lines[-1].startswith("total: 2 checkers, 1 failing, 0 errors; ") and "1 invariant skipped" in lines[-1], \
        proc.stdout
