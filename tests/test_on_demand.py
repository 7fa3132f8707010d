"""On-demand runs never freeze the probes (#20): concurrent requests for one checker share one run,
a bounded number wait (429 + Retry-After beyond it), and /health answers promptly throughout.

The sidecar runs as `zsmon run` (its own process, as deployed) with a YAML checker whose query takes
two seconds; the probe is timed from another process, so neither the 100 client threads nor the server
share an interpreter with the clock that measures it.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
import requests
import yaml

from zsmon.testing import free_port, wait_for

TOKEN = "on-demand-token-6f2b91"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
SLOW = """
name: slow_probe
description: One row-less query that takes two seconds.
severity: warning
entity_type: thing
runbook_url: https://example.invalid/runbooks/slow_probe.md
interval_seconds: 3600
query: |
  SELECT 'x' AS entity_id FROM pg_sleep(2) AS slept WHERE random() < 0
"""
# Times GET /health every 20 ms until told to stop (a line on stdin), then prints the latencies as JSON.
PROBE = textwrap.dedent("""
    import json, sys, threading, time, urllib.request
    url, stop, seen = sys.argv[1], threading.Event(), []
    threading.Thread(target=lambda: (sys.stdin.readline(), stop.set()), daemon=True).start()
    while not stop.is_set():
        t0 = time.perf_counter()
        with urllib.request.urlopen(url, timeout=10) as r:
            r.read()
        seen.append(time.perf_counter() - t0)
        time.sleep(0.02)
    print(json.dumps(seen))
""")


def _runs(base_metrics: str) -> float:
    text = requests.get(f"{base_metrics}/metrics", timeout=5).text
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
               if line.startswith("zerostate_invariant_check_runs_total{") and 'checker="slow_probe"' in line)


@pytest.fixture
def sidecar(tmp_path, db_url):
    checks = tmp_path / "checks"
    checks.mkdir()
    (checks / "slow.yml").write_text(SLOW)
    mport, aport = free_port(), free_port()
    cfg = tmp_path / "zsmon.yml"
    cfg.write_text(yaml.safe_dump({
        "http": {"metrics_listen": f"127.0.0.1:{mport}", "api_listen": f"127.0.0.1:{aport}", "on_demand_queue": 40},
        "checks": {"paths": [str(checks)]},
        "checkers": {"slow_probe": {"interval_seconds": 3600}, "schema": {"interval_seconds": 3600},
                     "payments": {"enabled": False}, "auctions": {"enabled": False},
                     "reputation": {"enabled": False}, "agent_liveness": {"enabled": False}},
        "exporters": {n: {"enabled": False} for n in ("api_probe", "payments", "auctions", "reputation",
                                                       "postgres", "redis")},
    }))
    env = {"PATH": os.environ.get("PATH", ""), "ZSMON_DATABASE_URL": db_url, "REDIS_HOST": "", "ADMIN_TOKEN": TOKEN}
    proc = subprocess.Popen([sys.executable, "-m", "zsmon.cli", "--config", str(cfg), "run"], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    base_m, base_a = f"http://127.0.0.1:{mport}", f"http://127.0.0.1:{aport}"
    try:
        wait_for(lambda: _runs(base_m) >= 1 if _up(f"{base_a}/health") else None, timeout=30)
        yield base_m, base_a
    finally:
        proc.terminate()
        _, err = proc.communicate(timeout=20)
        assert "Traceback" not in err, err[-3000:]


def _up(url: str) -> bool:
    try:
        return requests.get(url, timeout=2).status_code == 200
    except requests.RequestException:
        return False


def test_100_concurrent_runs_of_one_checker_share_a_few_runs_and_health_stays_prompt(sidecar):
    base_m, base_a = sidecar
    before = _runs(base_m)
    probe = subprocess.Popen([sys.executable, "-c", PROBE, f"{base_m}/health"], stdin=subprocess.PIPE,
                             stdout=subprocess.PIPE, text=True)
    time.sleep(0.5)  # the probe's own start-up, outside the measured burst

    def run(_: int) -> requests.Response:
        return requests.post(f"{base_a}/api/v1/checks/slow_probe/run", headers=AUTH, timeout=60)

    t0 = time.monotonic()
    with ThreadPoolExecutor(100) as pool:
        answers = list(pool.map(run, range(100)))
    burst = time.monotonic() - t0
    time.sleep(0.3)
    out, _ = probe.communicate("stop\n", timeout=30)
    latencies = json.loads(out)

    codes = [r.status_code for r in answers]
    ran = _runs(base_m) - before
    ok = [r for r in answers if r.status_code == 200]
    refused = [r for r in answers if r.status_code == 429]
    assert len(ok) + len(refused) == 100, sorted(set(codes))
    assert ok and all(r.json()["checker"] == "slow_probe" and r.json()["status"] == "pass" for r in ok)
    assert all(int(r.headers["retry-after"]) >= 1 for r in refused)
    # One run per wave of requests: 100 requests, a handful of runs (a request arriving as a run ends starts
    # the next one), never one per request.
    assert 1 <= ran <= 5, (ran, codes)
    assert len({r.json()["started_at"] for r in ok}) == ran
    # /health answered within 100 ms throughout the burst (a run takes two seconds). On a shared, loaded
    # machine the operating system alone delays the odd probe process by tens of milliseconds (the same
    # probe against an idle sidecar measured p50 1.5 ms, max 55-89 ms at load 4-6 on 2 cores), so: no
    # probe over half a second (before the fix: 30 s), and at most one in fifty over 100 ms.
    latencies.sort()
    print(f"runs={ran:g} ok={len(ok)} refused={len(refused)} burst={burst:.2f}s probes={len(latencies)} "
          f"p50={latencies[len(latencies) // 2] * 1000:.1f}ms max={latencies[-1] * 1000:.1f}ms")
    assert len(latencies) >= burst / 0.2, len(latencies)
    assert latencies[-1] < 0.5, latencies[-5:]
    assert sum(t > 0.1 for t in latencies) <= len(latencies) / 50, latencies[-5:]


def test_beyond_the_queue_a_request_is_told_when_to_retry(sidecar):
    _, base_a = sidecar
    with ThreadPoolExecutor(60) as pool:  # on_demand_queue is 40: at least 20 wait their turn elsewhere
        answers = list(pool.map(lambda _: requests.post(f"{base_a}/api/v1/checks/slow_probe/run", headers=AUTH,
                                                        timeout=60), range(60)))
    refused = [r for r in answers if r.status_code == 429]
    assert refused, [r.status_code for r in answers]
    assert all(r.headers["retry-after"] in ("2", "3") and "on-demand run" in r.json()["detail"] for r in refused), \
        [(r.headers["retry-after"], r.text) for r in refused][:3]
    # The probes were never part of it.
    assert requests.get(f"{base_a}/ready", timeout=5).status_code == 200
