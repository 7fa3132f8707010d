"""Python plugins: the example package, installed (CI runs `pip install -e examples/plugin`), is found
through its `zsmon.checkers` entry point and goes from package to CLI, check run, metrics, API and
status page with no edit to zsmon. A broken plugin is one clear line and exit 2, not a traceback."""
import json
import os
import subprocess
import sys
from importlib.metadata import PackageNotFoundError, distribution
from pathlib import Path

import pytest
import requests

from zsmon.app import build_registry
from zsmon.core.config import Config
from zsmon.testing import LOCAL_HTTP, running_service

ROOT = Path(__file__).resolve().parents[1]
ZSMON = str(Path(sys.executable).with_name("zsmon"))
TOKEN = "plugin-token-93be"


def _installed() -> bool:
    try:
        distribution("zsmon-example-plugin")
        return True
    except PackageNotFoundError:
        return False


if not _installed():
    if os.environ.get("CI"):
        raise RuntimeError("CI must install the example plugin: .venv/bin/pip install -e examples/plugin")
    pytest.skip("the example plugin is not installed: .venv/bin/pip install -e examples/plugin",
                allow_module_level=True)


def _zsmon(*args, env=None, config=None):
    cmd = [ZSMON, *(["--config", str(config)] if config else []), *args]
    return subprocess.run(cmd, env={**os.environ, **(env or {})}, capture_output=True, text=True, timeout=60)


def _plant_silent_agent(writer):
    writer.execute("""INSERT INTO agents (did, name, status, last_seen_at) VALUES
                        ('did:agent:ok', 'ok', 'online', now()),
                        ('did:agent:gone', 'gone', 'busy', now() - interval '2 hours')""")


def test_entry_point_registers_the_checker_as_a_plugin():
    cls = build_registry(Config()).checker_classes["agent_liveness"]
    assert cls.__module__ == "zsmon_example_plugin.checker" and cls.source == "plugin"
    assert [i.id for i in cls.invariants] == ["silent_active_agent"]


def test_checkers_list_and_explain_show_it(tmp_path):
    out = _zsmon("checkers", "list", env={"ZSMON_CHECKERS_PATH": ""})
    assert out.returncode == 0, out.stderr
    row = next(line.split() for line in out.stdout.splitlines() if line.startswith("agent_liveness "))
    assert row == ["agent_liveness", "plugin", "60s", "silent_active_agent"]
    listed = json.loads(_zsmon("checkers", "list", "--format", "json").stdout)["checkers"]
    assert {c["name"]: c["source"] for c in listed}["agent_liveness"] == "plugin"
    cfg = tmp_path / "zsmon.yml"
    cfg.write_text("checkers:\n  agent_liveness:\n    settings:\n      max_silence_seconds: 90\n")
    explained = _zsmon("checkers", "explain", "agent_liveness", config=cfg)
    assert explained.returncode == 0, explained.stderr
    assert "agent_liveness (plugin, zsmon_example_plugin.checker)" in explained.stdout
    assert "silent_active_agent  [warning, entity agent]" in explained.stdout
    assert "max_silence_seconds = 90 (default 300)" in explained.stdout
    data = json.loads(_zsmon("checkers", "explain", "agent_liveness", "--format", "json", config=cfg).stdout)
    assert {s["key"]: s["value"] for s in data["settings"]}["max_silence_seconds"] == 90
    assert data["sql"] is None and data["source"] == "plugin"


def test_check_once_runs_the_plugin(tmp_path, db_url, writer, redis_prefix):
    _plant_silent_agent(writer)
    cfg = tmp_path / "zsmon.yml"
    cfg.write_text(f"redis:\n  key_prefix: '{redis_prefix}'\n")
    out = _zsmon("check", "--once", "--only", "agent_liveness", "--format", "json", config=cfg,
                 env={"ZSMON_DATABASE_URL": db_url, "REDIS_HOST": "127.0.0.1"})
    assert out.returncode == 1, out.stderr
    (check,) = json.loads(out.stdout)["checks"]
    assert check["violation_counts"] == {"silent_active_agent": 1}
    assert check["violations"][0]["entity_id"] == "did:agent:gone"


def test_plugin_reaches_metrics_api_and_status_page(writer, make_config):
    _plant_silent_agent(writer)
    config = make_config(http={**LOCAL_HTTP, "admin_token": TOKEN}, scheduler={"health_interval_seconds": 0.5},
                         checkers={"agent_liveness": {"interval_seconds": 1}})
    with running_service(config) as svc:
        text = svc.wait_for_metrics('zerostate_invariant_violations{checker="agent_liveness"')
        assert 'zerostate_invariant_violations{checker="agent_liveness",invariant="silent_active_agent"} 1.0' in text
        auth = {"Authorization": f"Bearer {TOKEN}"}
        check = requests.get(svc.url("api", "/api/v1/checks/agent_liveness"), headers=auth, timeout=5).json()
        assert check["violations"][0]["entity_id"] == "did:agent:gone"
        checkers = requests.get(svc.url("api", "/api/v1/checkers"), headers=auth, timeout=5).json()["checkers"]
        assert {c["name"]: c["source"] for c in checkers}["agent_liveness"] == "plugin"
        assert "agent_liveness" in requests.get(svc.url("api", "/"), timeout=5).text


def test_a_broken_plugin_is_one_line_and_exit_2(tmp_path):
    # What `pip install` leaves for a package whose entry point names a module that is not there.
    dist = tmp_path / "broken_zsmon_plugin-0.1.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: broken-zsmon-plugin\nVersion: 0.1\n")
    (dist / "entry_points.txt").write_text("[zsmon.checkers]\nbroken = no_such_module.checker:Broken\n")
    out = _zsmon("checkers", "list", env={"PYTHONPATH": str(tmp_path)})
    assert out.returncode == 2 and out.stdout == ""
    (line,) = out.stderr.strip().splitlines()
    assert line.startswith("zsmon: error: plugin entry point 'broken' (no_such_module.checker:Broken) failed "
                           "to load: No module named 'no_such_module'"), line


def test_plugin_gets_its_alert_and_panel_from_render(make_config):
    from zsmon.alerts.model import build_model
    from zsmon.alerts.render import alert_rules, render_files, runbook_pages

    files = render_files(build_registry(make_config(redis=False)))
    alerts = {r["alert"]: r for r in alert_rules(files)}
    alert = alerts["AgentLivenessSilentActiveAgentViolation"]
    assert alert["labels"]["invariant"] == "silent_active_agent" and alert["labels"]["severity"] == "warning"
    # Its runbook is generated (with the plugin's runbook_text) and served by zsmon.
    assert alert["annotations"]["runbook_url"] == "http://localhost:8080/runbooks/AgentLivenessSilentActiveAgentViolation"
    pages = runbook_pages(build_model(build_registry(make_config(redis=False))))
    assert "mark it offline through the platform" in pages["AgentLivenessSilentActiveAgentViolation"]
    board = json.loads(files["grafana/dashboards/zsmon-invariants.json"])
    assert any("agent_liveness" in p.get("title", "") for p in board["panels"])
