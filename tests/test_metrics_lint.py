"""``promtool check metrics`` on zsmon's own ``/metrics``: every checker and exporter that exists, after each ran.

The service runs in-process against the session database (with a few platform rows so
result families carry samples), the local Redis and a local HTTP target for the API
probe, plus one target that refuses, so both the up and the down shapes are linted.
Any finding promtool prints (naming, units, help text, counters) fails the test.
"""
from __future__ import annotations

import http.server
import os
import socket
import subprocess
import threading
import time
from typing import Any, Iterator

import pytest
import requests
from prometheus_client.parser import text_string_to_metric_families

from zsmon.app import build_service

PROMTOOL = os.environ.get("ZSMON_PROMTOOL", "/usr/bin/promtool")


class _Ok(http.server.BaseHTTPRequestHandler):
    def do_GET(self) -> None:  # noqa: N802
        self.send_response(200)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, *args: Any) -> None:
        pass


@pytest.fixture
def health_url() -> Iterator[str]:
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Ok)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}/health"
    server.shutdown()
    server.server_close()


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _seed(writer) -> None:
    """A few platform rows, so families that describe data have samples to lint."""
    writer.execute("""
        INSERT INTO agents (did, name, status) SELECT 'did:lint:' || i, 'a' || i, 'online' FROM generate_series(1, 5) i;
        INSERT INTO reputation_scores (agent_did, overall_score)
            SELECT 'did:lint:' || i, 40 + i * 5 FROM generate_series(1, 5) i;
        INSERT INTO payment_channels (payer_did, payee_did, total_deposit, current_balance, state)
            VALUES ('did:lint:payer', 'did:lint:1', 10, 10, 'open');
        INSERT INTO auctions (task_id, user_id, auction_type, status, duration_seconds, expires_at)
            VALUES ('t-lint', 'user_id', 'first_price', 'open', 3600, now() + interval '1 hour');
    """)


def _collected_everything(text: str, checkers: list[str], exporters: list[str]) -> bool:
    seen_checkers, seen_exporters = set(), set()
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if s.name == "zerostate_invariant_check_up":
                seen_checkers.add(s.labels["checker"])
            elif s.name == "zsmon_exporter_duration_seconds":
                seen_exporters.add(s.labels["exporter"])
    return set(checkers) <= seen_checkers and set(exporters) <= seen_exporters


def test_promtool_check_metrics_is_clean(make_config, writer, health_url):
    assert os.path.exists(PROMTOOL), f"{PROMTOOL} missing: install Debian's prometheus package (.ci/run does)"
    _seed(writer)
    targets = [health_url, f"http://127.0.0.1:{_closed_port()}/ready"]
    config = make_config(http={"metrics_listen": "127.0.0.1:0", "api_listen": "127.0.0.1:0"},
                         scheduler={"health_interval_seconds": 0.5},
                         exporters={"api_probe": {"settings": {"targets": targets, "timeout_seconds": 1}}})
    service = build_service(config)
    service.start()
    try:
        checkers, exporters = list(service.runner.checkers), list(service.runner.exporters)
        assert {"postgres", "redis", "api_probe"} <= set(exporters)
        url = f"http://127.0.0.1:{service.ports['metrics']}/metrics"
        deadline = time.monotonic() + 45
        while True:
            text = requests.get(url, timeout=5).text
            if _collected_everything(text, checkers, exporters):
                break
            assert time.monotonic() < deadline, "not every checker and exporter ran within 45 s"
            time.sleep(0.2)
    finally:
        service.stop()
    for prefix in ("zerostate_postgres_up", "zerostate_redis_up", "zerostate_api_up", "zsmon_up",
                   "zsmon_build_info"):
        assert prefix in text
    assert "_created" not in text, [line for line in text.splitlines() if "_created" in line][:5]
    proc = subprocess.run([PROMTOOL, "check", "metrics"], input=text, capture_output=True, text=True, timeout=30)
    findings = (proc.stdout + proc.stderr).strip()
    assert proc.returncode == 0 and findings == "", f"promtool check metrics:\n{findings}"


def test_no_created_series_in_either_exposition_format():
    """prometheus_client adds ``<name>_created`` to every counter and histogram; zsmon serves none."""
    from zsmon.core.metrics import Metrics
    from zsmon.core.results import CheckResult
    from zsmon.core.store import ResultStore

    store = ResultStore()
    metrics = Metrics(store, checker_names=["payments"], job_names=["check:payments"], exporter_names=["postgres"],
                      invariants=[("payments", "escrow_state")])
    result = CheckResult("payments", "fail", violation_counts={"escrow_state": 2}, new_counts={"escrow_state": 2})
    store.put(result)
    metrics.observe_result(result)
    metrics.job_runs.labels("check:payments").inc()
    for accept in ("text/plain", "application/openmetrics-text; version=1.0.0"):
        body, _ = metrics.exposition(accept)
        text = body.decode()
        assert "zerostate_invariant_check_runs_total" in text and "zerostate_invariant_check_duration_seconds_count" \
            in text, text
        assert "_created" not in text, [line for line in text.splitlines() if "_created" in line][:5]
