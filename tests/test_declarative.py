"""Declarative YAML checkers: loading with precise errors, the three shipped examples
against the real database (clean world, then each planted fault), read-only and
timeout guarantees, and the way from a file to metrics, API and status page."""
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import requests

from zsmon.app import build_registry
from zsmon.core import declarative
from zsmon.core.config import Config, ConfigError, load_config
from zsmon.testing import LOCAL_HTTP, running_service

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "examples" / "checkers"
ZSMON = str(Path(sys.executable).with_name("zsmon"))
TOKEN = "decl-token-5d2a-c81e"


@pytest.fixture
def run_yaml():
    """Like ``run_check`` but one runner per config for all its checkers: ``run_yaml(name, config)``."""
    from zsmon.core.service import build_runner

    runners = {}

    def run(name, config):
        if id(config) not in runners:
            runners[id(config)] = (config, build_runner(build_registry(config)))
        return runners[id(config)][1].run_check(name)

    yield run
    for _, runner in runners.values():
        runner.db.close()


def _yaml_config(make_config, *paths, **sections):
    checks = {"paths": [str(p) for p in paths]}
    return make_config(checks=checks, **sections)


def _write(dirpath: Path, name: str, body: str) -> Path:
    dirpath.mkdir(parents=True, exist_ok=True)
    path = dirpath / name
    path.write_text(textwrap.dedent(body).lstrip())
    return path


MINIMAL = """
    name: {name}
    description: Rows of the probe query are violations.
    severity: warning
    entity_type: thing
    runbook_url: https://example.invalid/runbooks/{name}.md
    query: |
      {query}
"""


# ---- the shipped examples -------------------------------------------------------------------
def test_examples_load_as_checkers():
    found = declarative.load([EXAMPLES])
    assert set(found) == {"stuck_tasks", "agent_capacity", "payment_audit_trail"}
    stuck = found["stuck_tasks"]
    assert stuck.source == "yaml" and stuck.invariants[0].id == "stuck_task"
    assert stuck.invariants[0].entity_type == "task" and stuck.invariants[0].severity == "warning"
    assert stuck.default_interval_seconds == 60 and stuck.runbook_url is None
    assert "timeout sweeper" in stuck.runbook_text  # the "how to resolve" of the runbook zsmon serves
    assert stuck.Settings().grace_seconds == 60
    assert stuck.Settings.model_fields["grace_seconds"].description
    assert found["payment_audit_trail"].Settings().model_dump() == {"window_seconds": 3600, "tolerance_seconds": 60}
    # Cached per file: the same class comes back, so metrics and the registry agree on identity.
    assert declarative.load([EXAMPLES])["stuck_tasks"] is stuck


def _clean_world(w):
    """Agents, tasks and a ledger with its audit trail, all as the platform leaves them."""
    w.execute("""
        INSERT INTO agents (did, name, status, max_capacity, current_load) VALUES
          ('did:agent:a', 'alpha', 'online', 10, 3),
          ('did:agent:b', 'beta',  'busy', 4, 4),        -- exactly at capacity is fine
          ('did:agent:c', 'gamma', 'offline', 5, 0);
        INSERT INTO tasks (task_id, user_did, agent_did, task_type, input, status, timeout_at, created_at,
                           completed_at) VALUES
          ('t-running',  'did:user:1', 'did:agent:a', 'chat', '{}', 'executing', now() + interval '10 minutes',
                         now(), NULL),
          ('t-in-grace', 'did:user:1', 'did:agent:a', 'chat', '{}', 'executing', now() - interval '20 seconds',
                         now(), NULL),
          ('t-no-limit', 'did:user:2', 'did:agent:b', 'chat', '{}', 'executing', NULL, now(), NULL),
          ('t-queued',   'did:user:2', NULL, 'chat', '{}', 'queued', NULL, now() - interval '5 minutes', NULL),
          ('t-done',     'did:user:2', 'did:agent:b', 'chat', '{}', 'completed', now() - interval '1 hour',
                         now() - interval '2 hours', now() - interval '90 minutes');
        INSERT INTO payment_channels (id, payer_did, payee_did, total_deposit, current_balance, state)
        VALUES ('11111111-1111-1111-1111-111111111111', 'did:user:1', 'did:agent:a', 100, 100, 'open');
        -- A deposit ten minutes ago, audited two seconds later.
        INSERT INTO channel_transactions (channel_id, transaction_type, amount, created_at)
        VALUES ('11111111-1111-1111-1111-111111111111', 'deposit', 100, now() - interval '10 minutes');
        INSERT INTO audit_logs (action, resource_type, resource_id, status_code, created_at)
        VALUES ('open_channel', 'payment_channel', '11111111-1111-1111-1111-111111111111', 201,
                now() - interval '10 minutes' + interval '2 seconds');
        -- Too young to judge yet, and too old to matter: neither is a gap.
        INSERT INTO channel_transactions (channel_id, transaction_type, amount, created_at) VALUES
          ('11111111-1111-1111-1111-111111111111', 'escrow', 5, now() - interval '10 seconds'),
          ('11111111-1111-1111-1111-111111111111', 'escrow', 7, now() - interval '3 hours');
    """)


FAULTS = {
    "stuck_tasks": ("""INSERT INTO tasks (task_id, user_did, agent_did, task_type, input, status, timeout_at)
                       VALUES ('t-stuck', 'did:user:3', 'did:agent:a', 'chat', '{}', 'executing',
                               now() - interval '5 minutes')""",
                    "stuck_task", "t-stuck"),
    "agent_capacity": ("UPDATE agents SET current_load = 12 WHERE did = 'did:agent:a'",
                       "agent_over_capacity", "did:agent:a"),
    "payment_audit_trail": ("""INSERT INTO channel_transactions (id, channel_id, transaction_type, amount, created_at)
                               VALUES ('22222222-2222-2222-2222-222222222222', '11111111-1111-1111-1111-111111111111',
                                       'release', 42.5, now() - interval '20 minutes')""",
                            "payment_audit_gap", "22222222-2222-2222-2222-222222222222"),
}


@pytest.mark.parametrize("name", sorted(FAULTS))
def test_example_finds_its_planted_fault_and_stays_quiet_on_a_clean_world(name, writer, make_config, run_check):
    _clean_world(writer)
    config = _yaml_config(make_config, EXAMPLES, redis=False)
    clean = run_check(name, config=config)
    assert clean.status == "pass", clean.to_dict()
    assert clean.violation_counts == {FAULTS[name][1]: 0} and not clean.skipped
    sql, invariant, entity = FAULTS[name]
    writer.execute(sql)
    found = run_check(name, config=config)
    assert found.status == "fail" and found.violation_counts == {invariant: 1}, found.to_dict()
    (v,) = found.violations
    assert (v.invariant, v.entity_id) == (invariant, entity) and v.detail


def test_example_values(writer, make_config, run_yaml):
    _clean_world(writer)
    for sql, _, _ in FAULTS.values():
        writer.execute(sql)
    config = _yaml_config(make_config, EXAMPLES, redis=False)
    (over,) = run_yaml("agent_capacity", config).violations
    assert (over.expected, over.actual, str(over.difference)) == ("10", "12", "2")
    assert "alpha" in over.detail
    (stuck,) = run_yaml("stuck_tasks", config).violations
    assert stuck.actual == "executing" and 239 < stuck.difference < 340  # past timeout + grace
    (gap,) = run_yaml("payment_audit_trail", config).violations
    assert gap.actual == "none" and gap.difference is None and "release of 42.5" in gap.detail
    # An audit row more than the tolerance away does not cover the ledger row ...
    writer.execute("""INSERT INTO audit_logs (action, resource_type, resource_id, created_at)
                      VALUES ('settle', 'payment_channel', '11111111-1111-1111-1111-111111111111',
                              now() - interval '17 minutes')""")
    assert run_yaml("payment_audit_trail", config).violation_counts == {"payment_audit_gap": 1}
    # ... one within it does; and the thresholds are settings.
    writer.execute("""INSERT INTO audit_logs (action, resource_type, resource_id, created_at)
                      VALUES ('settle', 'payment_channel', '11111111-1111-1111-1111-111111111111',
                              now() - interval '20 minutes' + interval '30 seconds')""")
    assert run_yaml("payment_audit_trail", config).status == "pass"
    strict = _yaml_config(make_config, EXAMPLES, redis=False,
                          checkers={"stuck_tasks": {"settings": {"grace_seconds": 10}}})
    assert {v.entity_id for v in run_yaml("stuck_tasks", strict).violations} == {"t-stuck", "t-in-grace"}


# ---- read-only, timeout, columns --------------------------------------------------------------
def test_a_query_that_writes_fails_the_run_and_writes_nothing(writer, make_config, run_yaml, tmp_path):
    writer.execute("""
        CREATE OR REPLACE FUNCTION zsmon_test_sneaky_write() RETURNS int LANGUAGE sql AS
        $$ INSERT INTO audit_logs (action) VALUES ('written by a checker') RETURNING 1 $$;
        CREATE SEQUENCE IF NOT EXISTS zsmon_test_seq;
    """)
    _write(tmp_path / "checks", "sneaky.yml", MINIMAL.format(
        name="sneaky", query="SELECT 'x' AS entity_id WHERE zsmon_test_sneaky_write() = 1"))
    _write(tmp_path / "checks", "counter.yml", MINIMAL.format(
        name="counter", query="SELECT nextval('zsmon_test_seq')::text AS entity_id"))
    config = _yaml_config(make_config, tmp_path / "checks", redis=False)
    for name in ("sneaky", "counter"):
        result = run_yaml(name, config)
        assert result.status == "error", result.to_dict()
        assert "read-only" in result.error and "tried to write" in result.error
    assert writer.execute("SELECT count(*) FROM audit_logs").fetchone()[0] == 0
    assert writer.execute("SELECT last_value, is_called FROM zsmon_test_seq").fetchone() == (1, False)


def test_statement_timeout_of_the_checker_applies(writer, make_config, run_check, tmp_path):
    _write(tmp_path / "checks", "slow.yml", MINIMAL.format(name="slow", query="SELECT 'x' AS entity_id FROM pg_sleep(5)"))
    config = _yaml_config(make_config, tmp_path / "checks", redis=False,
                          checkers={"slow": {"statement_timeout_seconds": 0.3}})
    result = run_check("slow", config=config)
    assert result.status == "error" and "statement_timeout" in result.error
    assert result.duration_seconds < 3


def test_columns_are_mapped_and_missing_ones_are_null(writer, make_config, run_yaml, tmp_path):
    _clean_world(writer)
    _write(tmp_path / "checks", "renamed.yml", """
        name: offline_agents
        invariant: agent_offline
        description: Agents reported offline.
        severity: info
        entity_type: agent
        runbook_url: https://example.invalid/offline.md
        columns: {entity_id: did, detail: why}
        query: SELECT did, 'offline since ever' AS why, 100 %% 7 AS unused FROM agents WHERE status = 'offline'
    """)
    _write(tmp_path / "checks", "broken.yml", """
        name: broken_mapping
        description: Maps a column its query does not return.
        severity: info
        entity_type: agent
        runbook_url: https://example.invalid/broken.md
        columns: {actual: load}
        query: SELECT did AS entity_id FROM agents
    """)
    typo = _write(tmp_path / "checks", "typo.yml", MINIMAL.format(name="typo",
                                                                  query="SELECT dids AS entity_id FROM agents"))
    config = _yaml_config(make_config, tmp_path / "checks", redis=False)
    failed = run_yaml("typo", config)
    assert failed.status == "error" and failed.error.startswith(
        f'DeclarativeQueryError: {typo}: the query fails: column "dids" does not exist'), failed.error
    result = run_yaml("offline_agents", config)
    (v,) = result.violations
    assert (v.invariant, v.entity_type, v.entity_id, v.detail) == ("agent_offline", "agent", "did:agent:c",
                                                                   "offline since ever")
    assert v.expected is None and v.actual is None and v.difference is None
    broken = run_yaml("broken_mapping", config)
    assert broken.status == "error" and "no column 'load' for actual" in broken.error
    assert broken.error.startswith("DeclarativeQueryError: ")


# ---- validation at load ------------------------------------------------------------------------
BAD = [
    ("severity", "severity: high", "severity", 3, "Input should be 'critical', 'warning' or 'info'"),
    ("unknown key", "colour: red", "colour", 6, "unknown key"),
    ("bad name", "name: Stuck-Tasks", "name", 1, "should match pattern"),
    ("negative interval", "interval_seconds: -5", "interval_seconds", 6, "greater than 0"),
    ("param without description", "params: {limit: {default: 3}}", "params.limit.description", 6,
     "required key is missing"),
]


@pytest.mark.parametrize("case,line_text,key,line,message", BAD, ids=[b[0] for b in BAD])
def test_invalid_files_name_file_line_and_key(tmp_path, case, line_text, key, line, message):
    body = textwrap.dedent(MINIMAL.format(name="probe", query="SELECT 1 AS entity_id")).lstrip().splitlines()
    field = line_text.split(":")[0]
    idx = next((i for i, text in enumerate(body) if text.startswith(field + ":")), None)
    if idx is None:
        body.insert(5, line_text)
    else:
        body[idx] = line_text
    path = tmp_path / "probe.yml"
    path.write_text("\n".join(body) + "\n")
    with pytest.raises(ConfigError) as err:
        declarative.load([path])
    text = str(err.value)
    assert text.startswith(f"checker file {path} line {line}: {key}: "), text
    assert message in text


QUERY_BAD = [
    ("two statements", "SELECT 1 AS entity_id; SELECT 2", 6, "expected exactly one SQL statement, found 2"),
    ("a write", "DELETE FROM tasks RETURNING task_id AS entity_id", 6, "declarative checkers only read"),
    ("lone percent", "SELECT 1 AS entity_id\n      WHERE 'a' LIKE 'a%'", 8, "write %% for a literal percent sign"),
    ("unknown param", "SELECT %(nope)s::text AS entity_id", 7, "declares no 'nope'"),
]


@pytest.mark.parametrize("case,query,line,message", QUERY_BAD, ids=[q[0] for q in QUERY_BAD])
def test_queries_are_refused_before_they_run(tmp_path, case, query, line, message):
    path = _write(tmp_path, "probe.yml", MINIMAL.format(name="probe", query=query))
    with pytest.raises(ConfigError) as err:
        declarative.load([path])
    assert str(err.value).startswith(f"checker file {path} line {line}: query: "), str(err.value)
    assert message in str(err.value)


def test_semicolons_in_literals_and_comments_are_one_statement(tmp_path):
    path = _write(tmp_path, "probe.yml", MINIMAL.format(
        name="probe", query="SELECT 'a;b' AS entity_id, $$x;y$$ AS detail -- trailing; comment\n      ;"))
    assert declarative.load([path])["probe"].query.startswith("SELECT 'a;b'")


def test_yaml_syntax_duplicates_and_name_clashes(tmp_path):
    broken = _write(tmp_path / "a", "broken.yml", "name: x\nquery: [unclosed\n")
    with pytest.raises(ConfigError, match=rf"checker file {broken} line 3: invalid YAML"):
        declarative.load([broken])
    dup = _write(tmp_path / "b", "dup.yml", textwrap.dedent(MINIMAL.format(name="dup", query="SELECT 1 AS entity_id"))
                 + "severity: info\n")
    with pytest.raises(ConfigError, match=rf"checker file {dup} line 8: severity: duplicate key"):
        declarative.load([dup])
    one = _write(tmp_path / "c", "one.yml", MINIMAL.format(name="same", query="SELECT 1 AS entity_id"))
    two = _write(tmp_path / "c", "two.yml", MINIMAL.format(name="same", query="SELECT 1 AS entity_id"))
    with pytest.raises(ConfigError, match=rf"checker file {two}: name: 'same' is also declared by {one}"):
        declarative.load([tmp_path / "c"])
    clash = _write(tmp_path / "d", "schema.yml", MINIMAL.format(name="schema", query="SELECT 1 AS entity_id"))
    with pytest.raises(ConfigError, match=rf"checker file {clash}: name: 'schema' is already taken by the builtin"):
        build_registry(Config.model_validate({"checks": {"paths": [tmp_path / "d"]}}))
    with pytest.raises(ConfigError, match="is neither a directory nor a file"):
        declarative.load([tmp_path / "missing"])


def test_config_paths_are_relative_to_the_config_file_and_env_overrides(tmp_path, make_config, monkeypatch):
    _write(tmp_path / "conf" / "checks", "probe.yml", MINIMAL.format(name="probe", query="SELECT 1 AS entity_id"))
    cfg_file = tmp_path / "conf" / "zsmon.yml"
    cfg_file.write_text("checks:\n  paths: [checks]\ncheckers:\n  probe:\n    interval_seconds: 5\n")
    config = load_config(cfg_file, env={})
    registry = build_registry(config)
    assert config.checks.paths == [tmp_path / "conf" / "checks"] and "probe" in registry.checker_classes
    assert registry.checkers["probe"].interval_seconds == 5
    # The environment variable replaces the file's list (colon-separated), like every other variable.
    config = load_config(None, env={"ZSMON_CHECKERS_PATH": f"{EXAMPLES}:{tmp_path / 'conf' / 'checks'}"})
    assert {"stuck_tasks", "probe"} <= set(build_registry(config).checker_classes)
    # No search path outlives its config: one without paths has no YAML checkers, whatever was loaded before ...
    assert "probe" not in build_registry(Config()).checker_classes
    assert "probe" not in build_registry(load_config(None, env={})).checker_classes
    # ... and the process environment is read through load_config, as every other variable.
    monkeypatch.setenv("ZSMON_CHECKERS_PATH", str(tmp_path / "conf" / "checks"))
    assert "probe" not in build_registry(Config()).checker_classes
    assert "probe" in build_registry(load_config(None)).checker_classes


def test_cli_exit_codes(tmp_path, db_url, writer, redis_prefix):
    _clean_world(writer)
    writer.execute(FAULTS["agent_capacity"][0])
    cfg = tmp_path / "zsmon.yml"
    cfg.write_text(f"redis:\n  key_prefix: '{redis_prefix}'\n")
    env = {**os.environ, "ZSMON_DATABASE_URL": db_url, "REDIS_HOST": "127.0.0.1",
           "ZSMON_CHECKERS_PATH": str(EXAMPLES)}
    out = subprocess.run([ZSMON, "--config", str(cfg), "check", "--once", "--only", "agent_capacity",
                          "--format", "json"], env=env, capture_output=True, text=True, timeout=60)
    assert out.returncode == 1, out.stderr
    (check,) = json.loads(out.stdout)["checks"]
    assert check["violation_counts"] == {"agent_over_capacity": 1}
    assert check["violations"][0]["entity_id"] == "did:agent:a"
    bad = _write(tmp_path / "bad", "bad.yml", MINIMAL.format(name="bad", query="SELECT 1 AS entity_id")
                 .replace("severity: warning", "severity: loud"))
    env["ZSMON_CHECKERS_PATH"] = str(bad.parent)
    out = subprocess.run([ZSMON, "--config", str(cfg), "check", "--once"], env=env, capture_output=True,
                         text=True, timeout=60)
    assert out.returncode == 2 and out.stdout == ""
    assert out.stderr.strip().splitlines() == [
        f"zsmon: error: checker file {bad} line 3: severity: Input should be 'critical', 'warning' or 'info' "
        "(got 'loud')"]


# ---- from a file to metrics, API and the status page, with no other edit -----------------------
def test_a_yaml_checker_reaches_metrics_api_and_status_page(writer, make_config):
    _clean_world(writer)
    writer.execute(FAULTS["agent_capacity"][0])
    config = _yaml_config(make_config, EXAMPLES, http={**LOCAL_HTTP, "admin_token": TOKEN},
                          scheduler={"health_interval_seconds": 0.5},
                          checkers={"agent_capacity": {"interval_seconds": 1}})
    with running_service(config) as svc:
        text = svc.wait_for_metrics('zerostate_invariant_violations{checker="agent_capacity"')
        assert 'zerostate_invariant_violations{checker="agent_capacity",invariant="agent_over_capacity"} 1.0' in text, [l for l in text.splitlines() if "agent_capacity" in l]
        auth = {"Authorization": f"Bearer {TOKEN}"}
        check = requests.get(svc.url("api", "/api/v1/checks/agent_capacity"), headers=auth, timeout=5).json()
        assert check["violation_counts"] == {"agent_over_capacity": 1}
        assert check["violations"][0]["entity_id"] == "did:agent:a"
        checkers = requests.get(svc.url("api", "/api/v1/checkers"), headers=auth, timeout=5).json()["checkers"]
        described = {c["name"]: c for c in checkers}
        assert described["agent_capacity"]["source"] == "yaml"
        assert described["stuck_tasks"]["invariants"][0]["id"] == "stuck_task"
        page = requests.get(svc.url("api", "/"), timeout=5).text
        assert "agent_capacity" in page and "payment_audit_trail" in page


def test_a_yaml_checker_gets_its_alert_and_panel_from_render(make_config):
    from zsmon.alerts.render import alert_rules, render_files

    config = _yaml_config(make_config, EXAMPLES, redis=False)
    files = render_files(build_registry(config))
    alerts = {r["alert"]: r for r in alert_rules(files)}
    alert = alerts["AgentCapacityAgentOverCapacityViolation"]
    assert alert["labels"] == {"severity": "warning", "checker": "agent_capacity", "invariant": "agent_over_capacity"}
    assert 'checker="agent_capacity", invariant="agent_over_capacity"' in alert["expr"]
    # No runbook_url of its own: the page zsmon generates and serves, with the file's `runbook` words.
    assert alert["annotations"]["runbook_url"] == "http://localhost:8080/runbooks/AgentCapacityAgentOverCapacityViolation"
    assert "prometheus/rules/zsmon-checker-agent_capacity.rules.yml" in files
    board = json.loads(files["grafana/dashboards/zsmon-invariants.json"])
    titles = [p.get("title", "") for p in board["panels"]]
    assert any("agent_capacity" in t for t in titles), titles
