"""``zsmon demo`` as a newcomer runs it: a subprocess that finds violations and leaves nothing running."""
from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

import psycopg
import pytest
import requests
from psycopg import sql
from psycopg.conninfo import conninfo_to_dict, make_conninfo

from zsmon.demo import schema_sql
from zsmon.demo.run import process_gone
from zsmon.testing import ADMIN_DSN

pytestmark = pytest.mark.slow  # pytest -m 'not slow' leaves it out (README)

ZSMON = str(Path(sys.executable).with_name("zsmon"))
PID = re.compile(r"\(pid (\d+)")


class Demo:
    """The demo in a subprocess; its stdout is read line by line on a thread."""

    def __init__(self, *args: str) -> None:
        env = {k: v for k, v in os.environ.items() if k not in ("ADMIN_TOKEN", "ZSMON_CONFIG")}
        self.proc = subprocess.Popen([ZSMON, "demo", "--metrics-port", "0", "--api-port", "0", *args],
                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
        self.lines: list[str] = []
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.append(line.rstrip("\n"))

    @property
    def text(self) -> str:
        return "\n".join(self.lines)

    def wait_for(self, pattern: str, timeout: float) -> re.Match:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            m = re.search(pattern, self.text)
            if m:
                return m
            if self.proc.poll() is not None:
                self.reader.join(5)
                m = re.search(pattern, self.text)
                if m:
                    return m
                raise AssertionError(f"demo exited {self.proc.returncode} before {pattern!r}:\n{self.text}\n"
                                     f"{self.proc.stderr.read() if self.proc.stderr else ''}")
            time.sleep(0.1)
        raise AssertionError(f"no {pattern!r} within {timeout}s:\n{self.text}")

    def finish(self, timeout: float) -> int:
        try:
            rc = self.proc.wait(timeout)
        finally:
            if self.proc.poll() is None:
                self.proc.kill()
                self.proc.wait(10)
        self.reader.join(5)
        return rc

    def pids(self) -> list[int]:
        """The embedded PostgreSQL's and Redis's server pids, as the demo printed them."""
        return [int(p) for p in PID.findall(self.text)]


def _gone(pids: list[int], timeout: float = 10) -> bool:
    deadline = time.monotonic() + timeout
    while not all(process_gone(p) for p in pids):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.1)
    return True


def test_demo_finds_a_violation_and_leaves_nothing_running():
    """Runs until the acknowledgement was shown, then Ctrl-C: a slow warm-up on a busy machine costs time,
    never the test (a fixed --duration left room for one fault only when the warm-up took 14 s)."""
    demo = Demo("--duration", "150", "--seed", "1", "--fault-every", "3")
    demo.wait_for(r"admin token\s+(\S+)", 30)
    pids = demo.pids()
    assert len(pids) == 2 and not any(process_gone(p) for p in pids), demo.text
    base = re.search(r"data in (/\S+?)/pgdata\)", demo.text).group(1)
    assert Path(base).is_dir() and not base.startswith(str(Path.home()))
    # Where to look works while it runs.
    metrics = demo.wait_for(r"metrics\s+(http://\S+/metrics)", 1).group(1)
    status = demo.wait_for(r"status page\s+(http://\S+/)", 1).group(1)
    demo.wait_for(r"VIOLATION \S+/\S+ ", 25)
    assert "zerostate_invariant_violations" in requests.get(metrics, timeout=5).text
    page = requests.get(status, timeout=5)
    assert page.status_code == 200 and "zsmon status" in page.text
    # Once two invariants page, the demo acknowledges the one paging longest: its page stops, the rest page on.
    demo.wait_for(r"ACK \w+/\w+: its page stopped .*; still paging: \w+/\w+ \(\d+\)", 90)
    assert re.search(r"ACK \w+/\w+: \d+ violation\(s\) acknowledged as \w+", demo.text), demo.text
    demo.proc.send_signal(signal.SIGINT)
    rc = demo.finish(60)
    assert rc == 0, demo.text + (demo.proc.stderr.read() if demo.proc.stderr else "")
    assert "FAULT planted" in demo.text and re.search(r"summary: \d+ faults planted, [1-9]\d* violations found",
                                                     demo.text)
    assert _gone(pids), f"left running: {[p for p in pids if not process_gone(p)]}"
    assert not Path(base).exists()


def test_no_faults_reports_nothing():
    """Without faults every checker passes and judges every invariant: the warm-up gives the drift baseline a
    settled population and the auctions window enough history, and the agents keep sending heartbeats."""
    demo = Demo("--no-faults", "--duration", "35", "--seed", "1")
    token = demo.wait_for(r"\n\s*admin token\s+(\S+)", 40).group(1)
    api = demo.wait_for(r"status page\s+(http://\S+/)", 1).group(1)
    assert re.search(r"warm-up: reputation \d+ steps of history", demo.text), demo.text
    checks: dict = {}
    deadline = time.monotonic() + 18
    while time.monotonic() < deadline:  # until distribution_drift was judged against the baseline
        reply = requests.get(f"{api}api/v1/checks", headers={"Authorization": f"Bearer {token}"}, timeout=5)
        assert reply.status_code == 200, (reply.status_code, reply.text)
        body = reply.json()
        checks = {c["checker"]: c for c in body["checks"]}
        if "distribution_drift" in checks.get("reputation", {}).get("violation_counts", {}):
            break
        time.sleep(0.5)
    assert {"auctions", "payments", "reputation", "schema"} <= set(checks), checks
    for name, check in checks.items():
        assert check["status"] == "pass" and not check["skipped"], check
        assert not any(check["violation_counts"].values()), check
    assert "KS statistic" in checks["reputation"]["summaries"]["distribution_drift"]
    assert demo.finish(60) == 0, demo.text
    assert "VIOLATION" not in demo.text and "FAULT" not in demo.text, demo.text
    assert re.search(r"summary: 0 faults planted, 0 violations found", demo.text), demo.text


def test_ctrl_c_stops_everything():
    demo = Demo("--seed", "2", "--no-faults")
    demo.wait_for(r"Ctrl-C stops it", 30)
    pids = demo.pids()
    assert len(pids) == 2
    demo.proc.send_signal(signal.SIGINT)
    t0 = time.monotonic()
    assert demo.finish(30) == 0
    assert time.monotonic() - t0 < 15
    assert "stopped: nothing left running" in demo.text and "FAULT" not in demo.text
    assert _gone(pids), f"left running: {[p for p in pids if not process_gone(p)]}"


def test_an_existing_database_keeps_its_schema():
    name = f"zsmon_demo_{uuid.uuid4().hex[:8]}"
    with psycopg.connect(ADMIN_DSN, autocommit=True) as admin:
        admin.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    url = make_conninfo(**{**conninfo_to_dict(ADMIN_DSN), "dbname": name})
    try:
        with psycopg.connect(url, autocommit=True) as conn:
            conn.execute(schema_sql())
        demo = Demo("--duration", "3", "--no-faults", "--database-url", url)
        assert demo.finish(60) == 0, demo.text
        assert "schema not loaded" in demo.text and "embedded PostgreSQL" not in demo.text
        with psycopg.connect(url) as conn:  # the simulators' traffic went there
            assert conn.execute("SELECT count(*) FROM reputation_scores").fetchone()[0] > 0
        bad = subprocess.run([ZSMON, "demo", "--duration", "1", "--metrics-port", "0", "--api-port", "0",
                              "--database-url", "postgresql://postgres@127.0.0.1:1/nope"],
                             capture_output=True, text=True, timeout=60)
        assert bad.returncode == 2 and "zsmon: error: cannot connect to --database-url" in bad.stderr
        assert "Traceback" not in bad.stderr
    finally:
        with psycopg.connect(ADMIN_DSN, autocommit=True) as admin:
            admin.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name)))


def test_every_planted_fault_shows_within_the_run_and_duration_counts_the_warm_up():
    """Faults that need a full sweep (an auction awarded 20 minutes ago without its channel), an old stale
    auction and one that needs memory across runs: each shows within the demo's own run; --duration is the
    whole run, warm-up included."""
    t0 = time.monotonic()
    # 55 s with a fault every 3 s: room for three faults before the last 18 s even after a 20 s warm-up.
    demo = Demo("--duration", "55", "--seed", "4", "--fault-every", "3", "--fault", "inject_awarded_without_channel",
                "--fault", "inject_stuck_open_auction", "--fault", "sequence_going_back")
    assert demo.finish(100) == 0, demo.text
    summary_at = float(re.search(r"\[\s*([\d.]+)s\] summary:", demo.text).group(1))
    assert 54 <= summary_at <= 58, demo.text  # 55 s from the start, not 55 s after the warm-up
    assert time.monotonic() - t0 < 55 + 20
    planted = re.findall(r"FAULT planted: (\S+) -> (\S+)", demo.text)
    assert len(planted) >= 3 and {name for name, _ in planted} <= {
        "auctions.inject_awarded_without_channel", "auctions.inject_stuck_open_auction",
        "payments.sequence_going_back"}, planted
    shown = dict(re.findall(r"FAULT shown: \S+ as \S+ \((\S+)\) by the run ([\d.]+) s after", demo.text))
    for name, entity in planted:
        assert entity in shown, f"{name} -> {entity} never shown:\n{demo.text}"
        assert float(shown[entity]) < 18, (name, shown[entity])
    assert "not shown yet" not in demo.text
    assert re.search(rf"summary: {len(planted)} faults planted, \d+ violations found; {len(planted)} of them shown",
                     demo.text), demo.text
    assert "no more faults: one planted now could not show" in demo.text
