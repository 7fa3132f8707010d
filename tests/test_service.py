"""The sidecar end to end against the real database: health, readiness, metrics, API auth, recovery."""
import json
import subprocess
import sys

import requests

from zsmon.testing import LOCAL_HTTP, running_service, wait_for

TOKEN = "test-token-8c1f-a5d9"


def _config(make_config, **extra):
    http = {**LOCAL_HTTP, "admin_token": TOKEN}
    return make_config(http=http, scheduler={"health_interval_seconds": 0.5},
                       checkers={"schema": {"interval_seconds": 1}}, **extra)


def test_health_ready_metrics_and_checks(make_config):
    with running_service(_config(make_config)) as svc:
        assert requests.get(svc.url("metrics", "/health"), timeout=5).status_code == 200
        assert requests.get(svc.url("api", "/health"), timeout=5).status_code == 200
        wait_for(lambda: requests.get(svc.url("metrics", "/ready"), timeout=5).status_code == 200)
        text = svc.wait_for_metrics('zerostate_invariant_violations{checker="schema"')
        assert 'zerostate_invariant_violations{checker="schema",invariant="required_columns_present"} 0.0' in text
        assert 'zerostate_invariant_check_runs_total{checker="schema",status="pass"}' in text
        assert "zerostate_invariant_check_duration_seconds_bucket" in text
        assert 'zerostate_invariant_check_last_success_timestamp_seconds{checker="schema"}' in text
        assert "zsmon_database_up 1.0" in text and "zsmon_up 1.0" in text
        # OpenMetrics when the scraper asks for it.
        om = requests.get(svc.url("metrics", "/metrics"), timeout=5,
                          headers={"Accept": "application/openmetrics-text; version=1.0.0"})
        assert om.headers["content-type"].startswith("application/openmetrics-text") and om.text.endswith("# EOF\n")


def test_serving_shortens_the_thread_switch_interval(make_config):
    before = sys.getswitchinterval()
    try:
        sys.setswitchinterval(0.005)  # Python's default
        with running_service(make_config(http={**LOCAL_HTTP, "switch_interval_ms": 2})):
            assert sys.getswitchinterval() == 0.002
        with running_service(_config(make_config)):
            assert sys.getswitchinterval() == 0.0005  # the shipped default
    finally:
        sys.setswitchinterval(before)


def test_api_needs_the_bearer_token(make_config):
    with running_service(_config(make_config)) as svc:
        for path in ("/api/v1/checks", "/api/v1/violations", "/api/v1/checkers"):
            assert requests.get(svc.url("api", path), timeout=5).status_code == 401
            assert requests.get(svc.url("api", path), headers={"Authorization": "Bearer wrong"},
                                timeout=5).status_code == 401
        r = requests.post(svc.url("api", "/admin/verify-balances"), timeout=30)
        assert r.status_code == 401 and r.headers.get("www-authenticate") == "Bearer"
        ok = {"Authorization": f"Bearer {TOKEN}"}
        run = requests.post(svc.url("api", "/api/v1/checks/schema/run"), headers=ok, timeout=30)
        assert run.status_code == 200 and run.json()["checker"] == "schema" and run.json()["status"] == "pass"
        checks = requests.get(svc.url("api", "/api/v1/checks"), headers=ok, timeout=5).json()["checks"]
        assert {c["checker"] for c in checks} >= {"schema"}
        assert set(checks[0]) >= {"checker", "status", "mode", "duration_seconds", "violation_counts", "violations",
                                  "skipped", "error"}
        assert requests.post(svc.url("api", "/api/v1/checks/nosuch/run"), headers=ok, timeout=5).status_code == 404
        spec = requests.get(svc.url("api", "/api/v1/openapi.json"), timeout=5).json()
        assert "/admin/verify-balances" in spec["paths"] and "/api/v1/checks" in spec["paths"]
        big = requests.post(svc.url("api", "/api/v1/checks/schema/run"), headers=ok, data=b"x" * 200_000, timeout=5)
        assert big.status_code == 413


def test_admin_routes_are_off_without_a_token(make_config):
    cfg = make_config(http=LOCAL_HTTP)
    with running_service(cfg) as svc:
        r = requests.get(svc.url("api", "/api/v1/checks"), headers={"Authorization": "Bearer "}, timeout=5)
        assert r.status_code == 403 and "ADMIN_TOKEN" in r.json()["detail"]
        assert requests.post(svc.url("api", "/admin/verify-balances"), timeout=5).status_code == 403


def test_database_down_turns_ready_503_and_checks_error_then_recovers(make_config, private_pg):
    cfg = make_config(http={**LOCAL_HTTP, "admin_token": TOKEN}, scheduler={"health_interval_seconds": 0.5},
                      checkers={"schema": {"interval_seconds": 1}}, database={"connect_timeout_seconds": 1},
                      env={"ZSMON_DATABASE_URL": private_pg.dsn})
    ok = {"Authorization": f"Bearer {TOKEN}"}

    def schema_status():
        checks = requests.get(svc.url("api", "/api/v1/checks"), headers=ok, timeout=5).json()["checks"]
        return next((c for c in checks if c["checker"] == "schema"), {}).get("status")

    with running_service(cfg) as svc:
        wait_for(lambda: requests.get(svc.url("api", "/ready"), timeout=5).status_code == 200)
        wait_for(lambda: schema_status() == "pass")
        private_pg.stop()
        def not_ready():
            r = requests.get(svc.url("api", "/ready"), timeout=5)
            return r.json() if r.status_code == 503 else None

        assert any("unavailable" in reason for reason in wait_for(not_ready)["reasons"])
        wait_for(lambda: schema_status() == "error", timeout=20)
        metrics = requests.get(svc.url("metrics", "/metrics"), timeout=5).text
        assert 'zerostate_invariant_check_up{checker="schema"} 0.0' in metrics and "zsmon_database_up 0.0" in metrics
        private_pg.start()
        wait_for(lambda: requests.get(svc.url("api", "/ready"), timeout=5).status_code == 200, timeout=30)
        wait_for(lambda: schema_status() == "pass", timeout=30)


def test_check_once_json_follows_the_output_contract(db_url, redis_prefix, tmp_path):
    f = tmp_path / "c.yml"
    f.write_text(f"redis:\n  key_prefix: '{redis_prefix}'\n")
    env = {"ZSMON_DATABASE_URL": db_url, "PATH": "/usr/bin:/bin"}
    proc = subprocess.run([sys.executable, "-m", "zsmon.cli", "--config", str(f), "check", "--once",
                           "--only", "schema", "--format", "json"], capture_output=True, text=True, env=env, timeout=60)
    assert proc.returncode == 0, proc.stderr
    doc = json.loads(proc.stdout)
    (check,) = doc["checks"]
    assert check["checker"] == "schema" and check["status"] == "pass" and check["mode"] == "full"
    assert check["violation_counts"] == {"required_columns_present": 0, "column_types": 0}
    assert check["violations"] == []
    assert check["error"] is None and isinstance(check["duration_seconds"], float)
    bad = subprocess.run([sys.executable, "-m", "zsmon.cli", "check", "--once", "--only", "nosuch"],
                         capture_output=True, text=True, env=env, timeout=60)
    assert bad.returncode == 2 and "unknown checker 'nosuch'" in bad.stderr


def test_check_once_exits_2_when_the_database_is_unreachable(tmp_path):
    from zsmon.testing import free_port

    env = {"ZSMON_DATABASE_URL": f"postgresql://postgres:pw-should-not-leak@127.0.0.1:{free_port()}/x",
           "REDIS_HOST": "", "PATH": "/usr/bin:/bin"}
    proc = subprocess.run([sys.executable, "-m", "zsmon.cli", "check", "--once", "--only", "schema",
                           "--format", "json"], capture_output=True, text=True, env=env, timeout=60)
    assert proc.returncode == 2
    (check,) = json.loads(proc.stdout)["checks"]
    assert check["status"] == "error" and "unavailable" in check["error"]
    assert "pw-should-not-leak" not in proc.stdout + proc.stderr


def test_metrics_never_lag_the_result_store():
    """The API reads the store; /metrics serves bytes rendered after each job. A scrape in between
    must not show an older run than the API just did (it renders then, once)."""
    from zsmon.core.metrics import Metrics
    from zsmon.core.results import CheckResult
    from zsmon.core.store import ResultStore

    store = ResultStore()
    metrics = Metrics(store, ["x"])
    store.put(CheckResult("x", "pass"))
    metrics.refresh()
    cached = metrics.exposition(None)[0]
    assert 'zerostate_invariant_check_up{checker="x"} 1.0' in cached.decode()
    assert metrics.exposition(None)[0] is cached  # served from the render, not encoded per scrape
    store.put(CheckResult("x", "error", error="database unavailable"))  # the job's refresh has not run yet
    assert 'zerostate_invariant_check_up{checker="x"} 0.0' in metrics.exposition(None)[0].decode()
    metrics.refresh()
    again = metrics.exposition(None)[0]
    assert metrics.exposition(None)[0] is again and 'check_up{checker="x"} 0.0' in again.decode()
