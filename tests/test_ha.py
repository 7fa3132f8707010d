"""High availability: Redis leases with fencing, shared results, and two real `zsmon run` replicas."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import requests
import yaml

from zsmon.app import build_registry
from zsmon.core.config import Config
from zsmon.core.ha import LOCAL, RedisCoordinator
from zsmon.core.results import CheckResult
from zsmon.core.service import build_runner
from zsmon.core.store import ResultStore
from zsmon.testing import bind_checker, free_port, wait_for

from test_failures import SlowChecker, metric

pytestmark = pytest.mark.slow  # pytest -m 'not slow' leaves it out (README)

TOKEN = "ha-token-77aa-e31c"
AUTH = {"Authorization": f"Bearer {TOKEN}"}


def coordinator(server, prefix: str, identity: str, lease: float = 1.0, **kw) -> RedisCoordinator:
    from redis.backoff import NoBackoff
    from redis.retry import Retry

    client = server.client(retry=Retry(NoBackoff(), 1))  # as zsmon.core.redis.make_redis builds it
    return RedisCoordinator(client, key_prefix=prefix, lease_seconds=lease, identity=identity, **kw)


# ---- the lease itself ---------------------------------------------------------------------------
def test_one_holder_fencing_tokens_grow_and_a_stale_leader_cannot_publish(private_redis):
    a = coordinator(private_redis, "t1:", "a", lease=1.0)
    b = coordinator(private_redis, "t1:", "b", lease=1.0)
    ta = a.acquire("check:x")
    assert ta and ta.startswith("a|") and a.leads("check:x")
    assert b.acquire("check:x") is None and not b.leads("check:x")
    assert a.acquire("check:x") == ta  # the holder keeps its token
    assert a.publish("check:x", ta, CheckResult("x", "pass", producer="a"))

    time.sleep(1.1)  # a is "paused": no renewal, the lease expires
    assert not a.leads("check:x")  # the local view gives up first (monotonic clock)
    tb = b.acquire("check:x")
    assert tb and int(tb.split("|")[1]) > int(ta.split("|")[1])
    assert not a.still_leader("check:x", ta)
    assert not a.publish("check:x", ta, CheckResult("x", "fail", producer="a"))  # fenced
    assert b.publish("check:x", tb, CheckResult("x", "pass", producer="b"))
    store = ResultStore()
    a.store = store
    a.watch(["check:x"])
    a.sync()
    assert store.state("x").latest.producer == "b"


def test_renewal_keeps_the_lease_through_long_runs_and_stop_hands_it_over(private_redis):
    a = coordinator(private_redis, "t2:", "a", lease=0.6)
    b = coordinator(private_redis, "t2:", "b", lease=0.6)
    a.watch(["check:x"])
    a.start()
    try:
        wait_for(lambda: a.leads("check:x"), timeout=5)
        time.sleep(2.0)  # more than three leases
        assert b.acquire("check:x") is None and a.leads("check:x")
    finally:
        a.stop()
    assert b.acquire("check:x")  # released on a clean stop: no wait for the expiry


def test_a_paused_runner_discards_its_result(make_config, private_redis, redis_prefix):
    """The lease expires while the run is in progress (no renewal: the process is 'paused')."""
    cfg = make_config(redis=True, env=private_redis.env())
    a = coordinator(private_redis, redis_prefix, "a", lease=0.5)
    b = coordinator(private_redis, redis_prefix, "b", lease=5)
    runner = build_runner(build_registry(cfg), only=["schema"], coordinator=a)
    runner.checkers["slow"] = bind_checker(SlowChecker(sleep=1.5), cfg)
    try:
        import threading

        out: list = []
        worker = threading.Thread(target=lambda: out.append(runner.run_check("slow")))
        worker.start()
        time.sleep(0.8)
        assert b.acquire("check:slow")  # the lease has expired: b takes over mid-run
        worker.join(10)
        assert out[0] is not None and out[0].status == "pass"  # computed ...
        assert runner.store.state("slow").latest is None  # ... but never published
        assert private_redis.client().get(f"{redis_prefix}ha:result:slow") is None
    finally:
        runner.db.close()


@pytest.mark.parametrize("policy, runs", [("run_locally", True), ("stand_by", False)])
def test_without_redis_the_policy_decides(private_redis, policy, runs):
    a = coordinator(private_redis, "t3:", "a", lease=1.0, on_redis_down=policy)
    a.watch(["check:x"])
    assert a.acquire("check:x") not in (None, LOCAL)
    private_redis.stop()
    assert (a.acquire("check:x") == LOCAL) is runs
    assert a.degraded and a.leads("check:x") is runs
    assert a.publish("check:x", LOCAL, CheckResult("x", "pass")) is True  # a local run's result stays local
    text = "".join(f"{f.name} {s.value}\n" for f in a.collect() for s in f.samples)
    assert "zsmon_ha_degraded 1.0" in text
    private_redis.start()
    a.tick()
    assert not a.degraded
    token = a.acquire("check:x")
    assert token and token != LOCAL


# ---- two real replicas ------------------------------------------------------------------------
class Replica:
    def __init__(self, name: str, tmp_path: Path, db_url: str, redis_env: dict, prefix: str,
                 interval: float, lease: float) -> None:
        self.name = name
        self.metrics_port, self.api_port = free_port(), free_port()
        builtin = build_registry(Config())
        config = {
            "redis": {"key_prefix": prefix},
            "ha": {"enabled": True, "lease_seconds": lease, "identity": name},
            "http": {"metrics_listen": f"127.0.0.1:{self.metrics_port}", "api_listen": f"127.0.0.1:{self.api_port}",
                     "admin_token": TOKEN},
            "scheduler": {"health_interval_seconds": 1, "jitter_ratio": 0.1},
            "checkers": {n: {"enabled": n == "schema", **({"interval_seconds": interval} if n == "schema" else {})}
                         for n in builtin.checker_classes},
            "exporters": {n: {"enabled": n == "postgres", "interval_seconds": interval}
                          for n in builtin.exporter_classes},
        }
        path = tmp_path / f"{name}.yml"
        path.write_text(yaml.safe_dump(config))
        env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "ZSMON_DATABASE_URL": db_url, "LOG_FORMAT": "json",
               **redis_env}
        self.log = open(tmp_path / f"{name}.log", "w")
        self.proc = subprocess.Popen([sys.executable, "-m", "zsmon.cli", "--config", str(path), "run"],
                                     env=env, stdout=self.log, stderr=subprocess.STDOUT)

    def scrape(self) -> str:
        try:
            return requests.get(f"http://127.0.0.1:{self.metrics_port}/metrics", timeout=2).text
        except requests.RequestException:
            return ""

    def runs(self) -> float:
        text = self.scrape()
        return sum(metric(text, "zerostate_invariant_check_runs_total", checker="schema", status=s) or 0
                   for s in ("pass", "fail", "error"))

    def schema_result(self) -> dict:
        r = requests.get(f"http://127.0.0.1:{self.api_port}/api/v1/checks/schema", headers=AUTH, timeout=2)
        return r.json() if r.status_code == 200 else {}

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGCONT)
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
        self.log.close()


def test_two_replicas_run_each_check_once_per_interval_and_fail_over(tmp_path, db_url, private_redis, redis_prefix):
    interval, lease = 2.0, 1.5
    a = Replica("replica-a", tmp_path, db_url, private_redis.env(), redis_prefix, interval, lease)
    time.sleep(0.5)  # a starts first, so it is the leader; b is the standby
    b = Replica("replica-b", tmp_path, db_url, private_redis.env(), redis_prefix, interval, lease)
    try:
        wait_for(lambda: a.runs() >= 1 and b.scrape(), timeout=20)
        wait_for(lambda: b.schema_result().get("producer") == "replica-a", timeout=10)

        # Once per interval across both: count runs over a window of several intervals.
        start = a.runs() + b.runs()
        window = 5 * interval
        time.sleep(window)
        ran = a.runs() + b.runs() - start
        assert window / interval - 2 <= ran <= window / interval + 1, ran

        # Only the holder exports the invariant results and the exporter's families: no double counting.
        ta, tb = a.scrape(), b.scrape()
        assert 'zerostate_invariant_violations{checker="schema"' in ta
        assert 'zerostate_invariant_violations{checker="schema"' not in tb
        assert "zerostate_postgres_up" in ta and "zerostate_postgres_up" not in tb
        assert metric(ta, "zsmon_ha_leader", scheduler_job="check:schema") == 1
        assert metric(tb, "zsmon_ha_leader", scheduler_job="check:schema") == 0
        # ... while the API answers the same on both, naming the producer. The standby pulls the shared
        # result every HA tick, so between two of the leader's runs both serve the very same run.
        def same_run() -> bool:
            ra, rb = a.schema_result(), b.schema_result()
            return bool(ra) and ra.get("started_at") == rb.get("started_at") and rb.get("producer") == "replica-a"
        wait_for(same_run, timeout=3 * interval)
        r = requests.post(f"http://127.0.0.1:{b.api_port}/api/v1/checks/schema/run", headers=AUTH, timeout=5)
        assert r.status_code == 409  # the standby does not run the leader's checks on demand

        # Kill the leader: b takes over within two intervals.
        b_runs = b.runs()
        a.proc.kill()
        killed = time.monotonic()
        wait_for(lambda: b.runs() > b_runs, timeout=4 * interval)
        took = time.monotonic() - killed
        assert took <= 2 * interval, f"takeover took {took:.1f}s"
        wait_for(lambda: b.schema_result().get("producer") == "replica-b", timeout=interval)
        tb = b.scrape()
        assert 'zerostate_invariant_violations{checker="schema"' in tb
        assert metric(tb, "zsmon_ha_leader", scheduler_job="check:schema") == 1
    finally:
        a.stop()
        b.stop()
    for replica in (a, b):
        assert "Traceback" not in (tmp_path / f"{replica.name}.log").read_text()


def test_a_paused_leader_gives_way_and_stops_exporting(tmp_path, db_url, private_redis, redis_prefix):
    interval, lease = 2.0, 1.0
    a = Replica("replica-a", tmp_path, db_url, private_redis.env(), redis_prefix, interval, lease)
    time.sleep(0.5)
    b = Replica("replica-b", tmp_path, db_url, private_redis.env(), redis_prefix, interval, lease)
    try:
        wait_for(lambda: a.runs() >= 1 and b.scrape(), timeout=20)
        a.proc.send_signal(signal.SIGSTOP)  # a frozen leader: it cannot renew
        b_runs = b.runs()
        wait_for(lambda: b.runs() > b_runs, timeout=3 * interval)
        a.proc.send_signal(signal.SIGCONT)
        # a wakes up, finds its lease gone and stops exporting and running the check.
        wait_for(lambda: 'zerostate_invariant_violations{checker="schema"' not in a.scrape(), timeout=lease * 2)
        a_runs = a.runs()
        time.sleep(2 * interval)
        assert a.runs() == a_runs
        assert b.schema_result()["producer"] == "replica-b"
        assert metric(a.scrape(), "zsmon_ha_leader", scheduler_job="check:schema") == 0
    finally:
        a.stop()
        b.stop()


def test_a_replica_keeps_checking_while_redis_is_down_then_resumes_leases(make_config, private_redis):
    from zsmon.testing import LOCAL_HTTP, running_service

    cfg = make_config(env=private_redis.env(), http=LOCAL_HTTP, ha={"enabled": True, "lease_seconds": 0.6},
                      scheduler={"health_interval_seconds": 0.5},
                      checkers={n: {"enabled": n == "schema", "interval_seconds": 0.5}
                                for n in build_registry(Config()).checker_classes})
    cfg.redis.socket_timeout_seconds = 0.3
    with running_service(cfg) as svc:
        def scrape():
            return requests.get(svc.url("metrics", "/metrics"), timeout=5).text

        def runs():
            return metric(scrape(), "zerostate_invariant_check_runs_total", checker="schema", status="pass") or 0

        wait_for(lambda: metric(scrape(), "zsmon_ha_leader", scheduler_job="check:schema") == 1)
        private_redis.stop()
        wait_for(lambda: metric(scrape(), "zsmon_ha_degraded") == 1, timeout=10)
        before = runs()
        wait_for(lambda: runs() >= before + 2, timeout=10)  # run_locally: no blind spot
        assert 'zerostate_invariant_violations{checker="schema"' in scrape()
        private_redis.start()
        wait_for(lambda: metric(scrape(), "zsmon_ha_degraded") == 0, timeout=10)
        # The lease lives under the deployment's prefix (the monitored database's identity).
        leases = f"{svc.service.runner.deployment.prefix}ha:lease:check:schema"
        wait_for(lambda: private_redis.client().get(leases), timeout=10)
        before = runs()
        wait_for(lambda: runs() >= before + 2, timeout=10)
