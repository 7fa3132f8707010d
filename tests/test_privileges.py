"""zsmon inspects its database role at start-up: a role that can do more than read is named in one warning
line (with the minimal role's GRANTs), a gauge and an alert, or refused with ``database.require_minimal_role``;
the documented minimal role passes silently. Against the real PostgreSQL: the test database's superuser,
and roles created with exactly the documented statements."""
from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import psycopg
import requests
import yaml
from psycopg import sql
from structlog.testing import capture_logs

from zsmon.app import build_service
from zsmon.core.db import Database
from zsmon.core.privileges import READ_TABLES, minimal_role_sql, minimal_role_statements
from zsmon.testing import LOCAL_HTTP, free_port, wait_for

ROOT = Path(__file__).resolve().parents[1]
PY = [sys.executable, "-m", "zsmon.cli"]


def role_name(dsn: str) -> str:
    """The role of a ``minimal_role`` DSN (tests/conftest.py)."""
    return str(psycopg.conninfo.conninfo_to_dict(dsn)["user"])


def _sql_block(markdown: str, heading: str) -> str:
    section = markdown.split(heading, 1)[1].split("\n## ", 1)[0]
    return re.search(r"```sql\n(.*?)```", section, re.DOTALL).group(1)


def _statements(block: str) -> list[str]:
    """The statements of an SQL block: comments dropped, whitespace folded, split at ``;``."""
    text = " ".join(line.split("--", 1)[0] for line in block.splitlines())
    return [" ".join(s.split()) for s in text.split(";") if s.strip()]


def test_the_documented_minimal_role_is_zsmon_s_own():
    block = _sql_block((ROOT / "docs" / "deployment.md").read_text(encoding="utf-8"), "## The database role")
    assert _statements(block) == minimal_role_statements()
    # The one line the warning and the refusal print is the same role.
    assert _statements(minimal_role_sql()) == minimal_role_statements()
    assert all(t in minimal_role_statements()[3] for t in READ_TABLES)


# ---- the inspection, in-process --------------------------------------------------------------------
def _role(make_config, dsn: str):
    db = Database(make_config(redis=False, env={"ZSMON_DATABASE_URL": dsn}).database)
    db.open()
    try:
        return db.role(timeout=10)
    finally:
        db.close()


def test_superuser_is_named_alone(make_config, db_url):
    report = _role(make_config, db_url)
    assert report.superuser and report.privileged
    assert report.excessive() == ["superuser"]


def test_the_minimal_role_has_nothing_excessive(make_config, minimal_role):
    report = _role(make_config, minimal_role)
    assert report.role == role_name(minimal_role)
    assert not report.privileged and report.excessive() == []


def test_each_excess_is_named(make_config, db_url, minimal_role):
    role = sql.Identifier(role_name(minimal_role))
    with psycopg.connect(db_url, autocommit=True) as admin:
        admin.execute(sql.SQL("GRANT INSERT ON agents TO {}").format(role))
        report = _role(make_config, minimal_role)
        assert report.writable == (("public.agents", ("INSERT",)),)
        assert report.excessive() == ["INSERT on public.agents"]
        admin.execute(sql.SQL("GRANT UPDATE, TRUNCATE ON accounts TO {}").format(role))
        admin.execute(sql.SQL("GRANT pg_write_server_files, pg_execute_server_program TO {}").format(role))
        admin.execute(sql.SQL("ALTER ROLE {} CREATEROLE").format(role))
        report = _role(make_config, minimal_role)
    assert report.excessive() == ["CREATEROLE (it can grant itself any of the roles below)",
                                  "member of pg_execute_server_program", "member of pg_write_server_files",
                                  "UPDATE, TRUNCATE on public.accounts", "INSERT on public.agents"]
    assert not report.superuser


# ---- zsmon run ---------------------------------------------------------------------------------------
def _env(dsn: str, **extra: str) -> dict[str, str]:
    return {"PATH": os.environ.get("PATH", ""), "REDIS_HOST": "", "ZSMON_DATABASE_URL": dsn, "LOG_FORMAT": "json",
            **extra}


def _config(tmp_path: Path) -> tuple[Path, int]:
    port = free_port()
    cfg = tmp_path / "zsmon.yml"
    cfg.write_text(yaml.safe_dump({"http": {**LOCAL_HTTP, "metrics_listen": f"127.0.0.1:{port}"},
                                   "checkers": {"schema": {"interval_seconds": 60}}}))
    return cfg, port


def _events(stderr: str) -> list[dict]:
    return [json.loads(line) for line in stderr.splitlines() if line.startswith("{")]


def _gauge(port: int) -> str | None:
    try:
        text = requests.get(f"http://127.0.0.1:{port}/metrics", timeout=5).text
    except requests.ConnectionError:
        return None
    found = re.search(r"^zsmon_database_role_privileged (\S+)$", text, re.MULTILINE)
    return found.group(1) if found else None


def _run_until_gauge(tmp_path: Path, dsn: str) -> tuple[str, list[dict]]:
    """``zsmon run`` until its gauge is exported; then SIGTERM. (gauge value, log events)"""
    cfg, port = _config(tmp_path)
    proc = subprocess.Popen([*PY, "--config", str(cfg), "run"], env=_env(dsn), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    try:
        value = wait_for(lambda: _gauge(port), timeout=30)
    finally:
        proc.send_signal(signal.SIGTERM)
        _, stderr = proc.communicate(timeout=30)
    assert proc.returncode == 0, stderr
    return value, _events(stderr)


def test_run_as_a_superuser_warns_in_one_line_and_exports_the_gauge(tmp_path, db_url):
    value, events = _run_until_gauge(tmp_path, db_url)
    assert value == "1.0"
    warned = [e for e in events if e["event"] == "database_role_privileged"]
    assert len(warned) == 1 and warned[0]["level"] == "warning", warned
    dbname = psycopg.conninfo.conninfo_to_dict(db_url)["dbname"]
    assert warned[0]["role"] == "postgres" and warned[0]["excessive"] == "superuser"
    assert warned[0]["minimal_role"] == minimal_role_sql(database=dbname)
    assert "require_minimal_role" in warned[0]["detail"]


def test_run_as_the_minimal_role_passes_silently(tmp_path, minimal_role):
    value, events = _run_until_gauge(tmp_path, minimal_role)
    assert value == "0.0"
    said = [e for e in events if "role" in e["event"] or "excessive" in e or "minimal_role" in e]
    assert all(e["level"] == "debug" for e in said), said  # (other warnings here: no Redis, no pg_stat_statements)


def test_require_minimal_role_refuses_a_superuser_in_one_line(tmp_path, db_url):
    cfg, _ = _config(tmp_path)
    proc = subprocess.run([*PY, "--config", str(cfg), "run"], capture_output=True, text=True, timeout=60, check=False,
                          env=_env(db_url, ZSMON_DATABASE_REQUIRE_MINIMAL_ROLE="true"))
    assert proc.returncode == 2, proc.stderr
    errors = [line for line in proc.stderr.splitlines() if line.startswith("zsmon: error:")]
    assert errors == [proc.stderr.strip().splitlines()[-1]] and "Traceback" not in proc.stderr, proc.stderr
    assert errors[0].startswith("zsmon: error: database role postgres can do more than read (superuser) and "
                                "database.require_minimal_role is true"), errors
    assert "GRANT SELECT ON accounts" in errors[0]
    assert not [e for e in _events(proc.stderr) if e["event"] in ("check_done", "zsmon_started")]


def test_require_minimal_role_starts_as_the_minimal_role(tmp_path, minimal_role):
    cfg, port = _config(tmp_path)
    proc = subprocess.Popen([*PY, "--config", str(cfg), "run"], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env=_env(minimal_role, ZSMON_DATABASE_REQUIRE_MINIMAL_ROLE="true"))
    try:
        assert wait_for(lambda: _gauge(port), timeout=30) == "0.0"
        # ... and its checkers run: nothing holds them back once the role proved read-only.
        wait_for(lambda: 'zerostate_invariant_check_up{checker="schema"} 1.0' in
                 requests.get(f"http://127.0.0.1:{port}/metrics", timeout=5).text, timeout=30)
    finally:
        proc.send_signal(signal.SIGTERM)
        _, stderr = proc.communicate(timeout=30)
    assert proc.returncode == 0, stderr


# ---- zsmon check ----------------------------------------------------------------------------------
def _check(dsn: str, **extra: str) -> subprocess.CompletedProcess:
    return subprocess.run([*PY, "check", "--once", "--only", "schema", "--format", "json"], capture_output=True,
                          text=True, timeout=60, check=False, env=_env(dsn, **extra))


def test_check_names_a_write_privilege_on_one_table(db_url, minimal_role):
    with psycopg.connect(db_url, autocommit=True) as admin:
        admin.execute(sql.SQL("GRANT INSERT ON agents TO {}").format(sql.Identifier(role_name(minimal_role))))
    proc = _check(minimal_role)
    assert proc.returncode == 0, proc.stderr  # it warns, and checks
    warned = [e for e in _events(proc.stderr) if e["event"] == "database_role_privileged"]
    assert len(warned) == 1 and warned[0]["level"] == "warning" and warned[0]["excessive"] == "INSERT on public.agents"
    refused = _check(minimal_role, ZSMON_DATABASE_REQUIRE_MINIMAL_ROLE="true")
    assert refused.returncode == 2 and refused.stdout == "", refused.stdout + refused.stderr
    assert refused.stderr.strip().splitlines()[-1].startswith(
        f"zsmon: error: database role {role_name(minimal_role)} can do more than read (INSERT on public.agents)")


def test_check_as_the_minimal_role_is_silent(minimal_role):
    proc = _check(minimal_role, ZSMON_DATABASE_REQUIRE_MINIMAL_ROLE="true")
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["checks"][0]["status"] == "pass"
    said = [e for e in _events(proc.stderr) if "role" in e["event"] or "excessive" in e or "minimal_role" in e]
    assert all(e["level"] == "debug" for e in said), said
    assert "Traceback" not in proc.stderr


# ---- a database that answers only after start-up ----------------------------------------------------------
def test_require_minimal_role_holds_every_run_until_the_role_is_known(make_config, private_pg):
    """Fail closed: while the role is unknown nothing queries the database; once it answers as a superuser
    the service refuses (and its run_forever raises the one-line error)."""
    private_pg.stop()
    config = make_config(redis=False, env={"ZSMON_DATABASE_URL": private_pg.dsn,
                                           "ZSMON_DATABASE_REQUIRE_MINIMAL_ROLE": "true"},
                         http=LOCAL_HTTP, scheduler={"health_interval_seconds": 0.5},
                         database={"connect_timeout_seconds": 1},
                         checkers={"schema": {"interval_seconds": 0.5}})
    service = build_service(config)
    service.start()
    try:
        first = wait_for(lambda: service.store.state("schema").latest, timeout=15)
        assert first.status == "error" and "has not been inspected yet" in first.error, first.error
        private_pg.start()
        wait_for(lambda: service.refused, timeout=15)
        assert service.refused.startswith("database role postgres can do more than read (superuser)")

        def later_run():
            latest = service.store.state("schema").latest
            return latest if latest.started_at > first.started_at else None

        seen = wait_for(later_run, timeout=15)
        assert seen.status == "error" and "require_minimal_role" in seen.error, seen.error
    finally:
        service.stop()
    assert _gauge(service.ports["metrics"]) is None  # stopped


# ---- the demo ----------------------------------------------------------------------------------------
def test_the_demo_s_superuser_is_said_to_be_expected(make_config):
    config = make_config(redis=False, http=LOCAL_HTTP, checkers={"schema": {"interval_seconds": 60}})
    with capture_logs() as logs:
        service = build_service(config, privileged_role_expected="the demo's own database")
        service.start()
        service.stop()
    said = [e for e in logs if e["event"] == "database_role_privileged"]
    assert len(said) == 1 and said[0]["log_level"] == "info", said
    assert said[0]["detail"].startswith("expected: the demo's own database")
    assert service.metrics.role_privileged._value.get() == 1  # the gauge still tells the truth


def test_startup_names_the_indexes_incremental_runs_lack(tmp_path, db_url):
    """The platform's schema has no index on payment_channels/accounts/auctions.updated_at or bids.created_at:
    the service says once, at start-up, which index each incremental checker relies on (zsmon runs no DDL)."""
    _, events = _run_until_gauge(tmp_path, db_url)
    advised = sorted((e["checker"], e["table"], e["column"]) for e in events if e["event"] == "index_recommended")
    assert advised == [("auctions", "auctions", "updated_at"), ("auctions", "bids", "created_at"),
                       ("payments", "accounts", "updated_at"), ("payments", "payment_channels", "updated_at")]
    line = next(e for e in events if e["event"] == "index_recommended" and e["table"] == "payment_channels")
    assert line["level"] == "warning"
    assert line["statement"] == ("CREATE INDEX CONCURRENTLY zsmon_payment_channels_updated_at ON payment_channels "
                                 "(updated_at)")
