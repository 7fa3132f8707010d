"""High availability: Redis leases with fencing, shared results, and two real `zsmon run` replicas."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import requests
import yaml
from structlog.testing import capture_logs

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
    assert ta and ta.startswith(f"a#{a.instance}|") and a.leads("check:x")
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


def test_fencing_tokens_keep_growing_across_a_redis_restart(private_redis):
    """Redis restarts empty (no persistence): the fence counters are gone, yet the next token is larger
    than every one handed out before (seeded from Redis' clock, not from 1)."""
    a = coordinator(private_redis, "t5:", "a", lease=5)
    first = int(a.acquire("check:x").rsplit("|", 1)[1])
    a.publish("check:x", a.acquire("check:x"), CheckResult("x", "pass", producer="a"))
    b = coordinator(private_redis, "t5:", "b", lease=5)
    private_redis.client().delete("t5:ha:lease:check:x")  # a lets go; b takes over: the next token
    second = int(b.acquire("check:x").rsplit("|", 1)[1])
    assert second == first + 1
    private_redis.stop()
    private_redis.start()
    b.tick()  # b notices the restart (its lease is gone) and takes the lease again
    third = int(b.acquire("check:x").rsplit("|", 1)[1])
    assert third > second


def test_a_new_leader_ages_the_old_leaders_result_on_redis_clock(private_redis):
    """The old leader's clock runs 10 s ahead: its result's started_at lies in the new leader's future. Judged
    by wall clocks it would look fresh for 10 s more and the takeover run would wait; aged on Redis' clock it
    is due as soon as one interval has passed since it was published."""
    every = 0.5
    old = coordinator(private_redis, "t6:", "old", lease=5)
    skewed = CheckResult("x", "pass", duration_seconds=0.1, started_at=time.time() + 10, producer="old")
    assert old.publish("check:x", old.acquire("check:x"), skewed)
    new = coordinator(private_redis, "t6:", "new", lease=5, store=ResultStore())
    new.watch(["check:x"])
    new.sync()
    assert new.store.state("x").latest.producer == "old"
    assert not new.result_due("x", every)  # just published: fresh
    time.sleep(every)
    assert new.result_due("x", every)
    # Its own result is aged on its own clock; an error is always due.
    new.store.put(CheckResult("x", "pass", started_at=time.time(), producer="new"))
    assert not new.result_due("x", every)
    new.store.put(CheckResult("x", "error", started_at=time.time() + 1, producer="new", error="boom"))
    assert new.result_due("x", every)


def test_a_run_whose_lease_is_lost_is_abandoned_early(make_config, private_redis, redis_prefix):
    """The lease is taken over 1 s into a 6 s run: the run stops within a renewal tick (its query cancelled on
    the server), publishes nothing, and does not count as a database failure."""
    import threading

    cfg = make_config(redis=True, env=private_redis.env())
    a = coordinator(private_redis, redis_prefix, "a", lease=0.6)
    b = coordinator(private_redis, redis_prefix, "b", lease=5)
    runner = build_runner(build_registry(cfg), only=["schema"], coordinator=a)
    runner.checkers["slow"] = bind_checker(SlowChecker(sleep=6), cfg)
    a.on_lost = runner.abandon
    a.watch(["check:slow"])
    try:
        out: list = []
        worker = threading.Thread(target=lambda: out.append(runner.run_check("slow")))
        worker.start()
        wait_for(lambda: a.leads("check:slow"), timeout=3)
        a.start()  # renewals: a keeps the lease while it runs ...
        time.sleep(1.0)
        private_redis.client().delete(f"{redis_prefix}ha:lease:check:slow")  # ... until b takes it over
        assert b.acquire("check:slow")
        taken = time.monotonic()
        worker.join(10)
        assert time.monotonic() - taken < 1.5
        assert out[0].status == "error" and "lost the lease" in out[0].error
        assert runner.store.state("slow").latest is None and "slow" not in runner.database_errors
    finally:
        a.stop(release=False)
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


def test_a_second_process_with_the_same_identity_takes_no_lease(private_redis):
    """Two live processes configured with one ha.identity: the later one refuses to lead (and says so); the
    earlier keeps its leases. A restart under the same identity (the old lease still there, but nobody
    renewing it) is no duplicate: the new process takes over once the old lease lapses."""
    lease = 0.5
    first = coordinator(private_redis, "t4:", "zsmon-0", lease=lease)
    first.watch(["check:x", "export:y"])
    first.start()
    try:
        wait_for(lambda: first.leads("check:x") and first.leads("export:y"), timeout=5)
        time.sleep(0.01)  # a later start time
        second = coordinator(private_redis, "t4:", "zsmon-0", lease=lease)
        second.watch(["check:x", "export:y"])
        with capture_logs() as logs:
            second.start()
            wait_for(lambda: second.problem is not None, timeout=4 * lease + 2)
            time.sleep(2 * lease)
        assert "ha.identity 'zsmon-0'" in second.problem
        assert not second.leads("check:x") and second.acquire("check:x") is None
        assert first.leads("check:x") and first.leads("export:y") and first.problem is None
        assert any(e["event"] == "ha_duplicate_identity" and e["log_level"] == "error" for e in logs)
        second.stop()
    finally:
        first._stop.set()  # SIGKILL, as it were: no release, the leases lapse by themselves
        first._thread.join(5)
    restarted = coordinator(private_redis, "t4:", "zsmon-0", lease=lease)
    restarted.watch(["check:x"])
    restarted.start()
    try:
        wait_for(lambda: restarted.leads("check:x"), timeout=4 * lease + 2)
        assert restarted.problem is None
    finally:
        restarted.stop()


@pytest.mark.parametrize("policy", ["run_locally", "stand_by"])
def test_redis_dying_mid_run_keeps_the_result_under_run_locally(make_config, private_redis, redis_prefix, policy):
    """The run started under a Redis lease; Redis is killed before it publishes. run_locally keeps the
    finished result on this replica (as for a run that started after Redis died); stand_by discards it;
    either way the log names Redis, not a lost lease."""
    cfg = make_config(redis=True, env=private_redis.env())
    a = coordinator(private_redis, redis_prefix, "a", lease=5, on_redis_down=policy)
    runner = build_runner(build_registry(cfg), only=["schema"], coordinator=a)
    runner.checkers["slow"] = bind_checker(SlowChecker(sleep=1.0), cfg)
    try:
        import threading

        out: list = []
        with capture_logs() as logs:
            worker = threading.Thread(target=lambda: out.append(runner.run_check("slow")))
            worker.start()
            time.sleep(0.4)
            private_redis.stop()
            worker.join(15)
        assert out[0] is not None and out[0].status == "pass"
        events = {e["event"]: e for e in logs}
        assert "result_discarded_lost_lease" not in events and "ha_lease_lost" not in events
        if policy == "run_locally":
            assert runner.store.state("slow").latest is out[0]
            assert "Redis unavailable at publish" in events["result_kept_locally"]["cause"]
        else:
            assert runner.store.state("slow").latest is None
            assert "Redis unavailable at publish" in events["result_discarded"]["cause"]
    finally:
        runner.db.close()


# ---- two real replicas ------------------------------------------------------------------------
class Replica:
    def __init__(self, name: str, tmp_path: Path, db_url: str, redis_env: dict, prefix: str,
                 interval: float, lease: float, **sections: dict) -> None:
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
        for section, values in sections.items():
            config[section] = {**config.get(section, {}), **values}
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

    def runs(self, statuses: tuple[str, ...] = ("pass", "fail", "error"), checker: str = "schema") -> float:
        text = self.scrape()
        return sum(metric(text, "zerostate_invariant_check_runs_total", checker=checker, status=s) or 0
                   for s in statuses)

    def leads(self, job: str = "check:schema") -> bool:
        return metric(self.scrape(), "zsmon_ha_leader", scheduler_job=job) == 1

    def logged(self) -> list[dict]:
        out = []
        for line in Path(self.log.name).read_text().splitlines():
            try:
                out.append(json.loads(line))
            except ValueError:
                pass
        return out

    def schema_result(self) -> dict:
        try:
            r = requests.get(f"http://127.0.0.1:{self.api_port}/api/v1/checks/schema", headers=AUTH, timeout=2)
        except requests.RequestException:
            return {}
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
        # a wakes up with its leases lapsed. Redis is held for a moment, so a's HA thread cannot learn that
        # from Redis first: not even the first scrape may show the leader's series (the scrape path checks the
        # leases' local deadlines itself).
        # The hold stays well under b's lease (1 s), so b keeps leading through it.
        private_redis.pause()
        try:
            a.proc.send_signal(signal.SIGCONT)
            first = requests.get(f"http://127.0.0.1:{a.metrics_port}/metrics", timeout=0.5).text
        finally:
            private_redis.resume()
        assert "zsmon_up 1.0" in first
        for text in [first] + [a.scrape() for _ in range(5)]:
            assert 'zerostate_invariant_violations{checker="schema"' not in text
            assert "zerostate_postgres_up" not in text
            assert metric(text, "zsmon_ha_leader", scheduler_job="check:schema") == 0
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
    with capture_logs() as logs, running_service(cfg) as svc:
        # A lease (0.6 s) longer than the shortest interval (0.5 s) makes takeovers slower than an interval.
        warned = [e for e in logs if e["event"] == "ha_lease_longer_than_interval"]
        assert warned and warned[0]["log_level"] == "warning" and warned[0]["interval_seconds"] == 0.5
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


# ---- a path to the database the test can cut ----------------------------------------------------
_FORWARDER = r"""
import socket, sys, threading
listen, target = int(sys.argv[1]), int(sys.argv[2])
server = socket.socket()
server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
server.bind(("127.0.0.1", listen))
server.listen(64)
print("ready", flush=True)

def pipe(src, dst):
    try:
        while data := src.recv(65536):
            dst.sendall(data)
    except OSError:
        pass
    for s in (src, dst):
        try:
            s.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass

while True:
    client, _ = server.accept()
    try:
        upstream = socket.create_connection(("127.0.0.1", target))
    except OSError:
        client.close()
        continue
    for a, b in ((client, upstream), (upstream, client)):
        threading.Thread(target=pipe, args=(a, b), daemon=True).start()
"""


class Forwarder:
    """A TCP forwarder to PostgreSQL in a process of its own: ``kill()`` cuts every connection through it
    and refuses new ones (the path is gone, the database is fine); ``start()`` restores it."""

    def __init__(self, tmp_path: Path, db_url: str) -> None:
        from psycopg.conninfo import conninfo_to_dict, make_conninfo

        params = conninfo_to_dict(db_url)
        self.target = int(params.get("port") or 5432)
        self.port = free_port()
        self.dsn = make_conninfo(**{**params, "host": "127.0.0.1", "port": str(self.port)})
        self.script = tmp_path / "forwarder.py"
        self.script.write_text(_FORWARDER)
        self.proc: subprocess.Popen | None = None
        self.start()

    def start(self) -> None:
        self.proc = subprocess.Popen([sys.executable, str(self.script), str(self.port), str(self.target)],
                                     stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
        assert self.proc.stdout.readline().strip() == "ready"

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(5)


def _ready(replica: Replica) -> bool:
    try:
        return requests.get(f"http://127.0.0.1:{replica.metrics_port}/ready", timeout=2).status_code == 200
    except requests.RequestException:
        return False


def test_a_leader_that_cannot_reach_the_database_hands_its_jobs_over(tmp_path, db_url, private_redis,
                                                                    redis_prefix):
    """The leader's own path to PostgreSQL is cut (Redis fine): it gives its leases up and the other replica,
    whose database answers, completes the checks within two intervals. The cut-off replica takes none back
    while its database does not answer, and leads again once it does (when the other is gone)."""
    interval, lease = 3.0, 1.5
    fast = {"scheduler": {"health_interval_seconds": 0.5, "jitter_ratio": 0.1},
            "database": {"connect_timeout_seconds": 1}}
    path = Forwarder(tmp_path, db_url)
    a = Replica("replica-a", tmp_path, path.dsn, private_redis.env(), redis_prefix, interval, lease, **fast)
    b = None
    try:
        wait_for(lambda: a.leads() and a.leads("export:postgres"), timeout=20)
        b = Replica("replica-b", tmp_path, db_url, private_redis.env(), redis_prefix, interval, lease, **fast)
        wait_for(lambda: b.schema_result().get("producer") == "replica-a", timeout=20)
        done = ("pass", "fail")
        b_runs = b.runs(done)

        path.kill()
        cut = time.monotonic()
        wait_for(lambda: b.runs(done) > b_runs, timeout=4 * interval)
        took = time.monotonic() - cut
        assert took <= 2 * interval, f"takeover took {took:.1f}s"
        wait_for(lambda: b.leads("export:postgres") and b.schema_result().get("producer") == "replica-b",
                 timeout=interval)
        assert not a.leads() and not a.leads("export:postgres")
        # a keeps its hands off: no lease, no run, for longer than a lease and an interval.
        a_runs = a.runs()
        time.sleep(interval + lease)
        assert a.runs() == a_runs and not a.leads() and not a.leads("export:postgres")
        assert b.leads()
        assert any(e.get("event") == "ha_leases_released_database_down" for e in a.logged())
        assert not any(e.get("event") == "ha_lease_longer_than_interval" for e in a.logged())  # 1.5 s < 3 s

        # Its database answers again: a is ready, follows b's results, and is the one to take over from b.
        path.start()
        wait_for(lambda: _ready(a), timeout=10)
        assert b.leads() and not a.leads()
        a_done = a.runs(done)
        b.proc.kill()
        wait_for(lambda: a.runs(done) > a_done, timeout=lease + 2 * interval)
        assert a.leads()
    finally:
        a.stop()
        if b is not None:
            b.stop()
        path.kill()
    for name in ("replica-a", "replica-b"):
        assert "Traceback" not in (tmp_path / f"{name}.log").read_text()


SWEEP = """\
name: sweep
invariant: sweep_answers
description: test-only, a sweep that takes a while in the server
severity: warning
entity_type: system
runbook_url: https://example.invalid/runbooks/sweep.md
interval_seconds: 12
query: |
  SELECT 'x'::text AS entity_id FROM pg_sleep(8) WHERE random() < 0
"""


def test_sigterm_mid_sweep_cancels_the_query_and_hands_over_without_overlap(tmp_path, db_url, private_redis,
                                                                          redis_prefix):
    """SIGTERM while the leader's sweep runs: it exits within its grace, its query is cancelled on the server
    (not left running), the lease is handed over only once its run has ended, so the other replica's sweep
    never overlaps it, and zsmon_stopped is the last thing it logs."""
    import threading

    import psycopg

    (tmp_path / "checks").mkdir()
    (tmp_path / "checks" / "sweep.yml").write_text(SWEEP)
    interval, lease, grace = 12.0, 1.5, 4.0
    # No jitter: the sweep cut short is the next one after a completed sweep exactly one interval earlier, so
    # the replica taking over finds the latest result due and runs at once.
    extra = {"checks": {"paths": [str(tmp_path / "checks")]},
             "scheduler": {"health_interval_seconds": 1, "jitter_ratio": 0, "shutdown_grace_seconds": grace}}
    seen: list[tuple[float, list[int]]] = []  # (when, backends running a sweep query)
    started: set[tuple[int, float]] = set()  # (backend, query start, Unix time): every sweep query seen
    watching = threading.Event()

    def watch() -> None:  # every sweep (zsmon sleeping in the server), by backend, 20 times a second
        with psycopg.connect(db_url, autocommit=True) as conn:
            while not watching.is_set():
                rows = conn.execute(
                    "SELECT pid, extract(epoch FROM query_start) FROM pg_stat_activity WHERE state = 'active' "
                    "AND datname = current_database() AND application_name = 'zsmon' AND wait_event = 'PgSleep'").fetchall()
                seen.append((time.monotonic(), [r[0] for r in rows]))
                started.update((r[0], float(r[1])) for r in rows)
                time.sleep(0.05)

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    a = Replica("replica-a", tmp_path, db_url, private_redis.env(), redis_prefix, interval, lease, **extra)
    b = None
    try:
        wait_for(lambda: a.leads("check:sweep"), timeout=20)
        b = Replica("replica-b", tmp_path, db_url, private_redis.env(), redis_prefix, interval, lease, **extra)
        wait_for(lambda: b.scrape(), timeout=20)
        b_up = time.time()
        # A sweep of a's that began after b was up (so the latest completed one is an interval old).
        a_pid = wait_for(lambda: next((pid for pid, at in list(started) if at > b_up), None), timeout=interval + 5)
        time.sleep(1.0)  # mid-sweep
        a.proc.send_signal(signal.SIGTERM)
        sent = time.monotonic()
        a.proc.wait(grace + 5)
        took = time.monotonic() - sent
        assert took <= grace + 1, f"exit took {took:.1f}s (grace {grace:g}s)"
        # Its query was cancelled on the server before it exited, not left to run out its 8 s.
        time.sleep(0.2)
        assert all(a_pid not in pids for t, pids in seen if t > sent + took)
        # The other replica takes the sweep over at once (the lease was released, not left to lapse)...
        wait_for(lambda: any(p != a_pid for _, ps in seen for p in ps), timeout=lease + 3)
        b_started = next(t for t, ps in seen if any(p != a_pid for p in ps))
        assert b_started - sent < lease + 2
    finally:
        a.stop()
        if b is not None:
            b.stop()
        watching.set()
        watcher.join(5)
    # ... and never while a's still ran: at most one sweep on the server at any moment.
    assert max(len(pids) for _, pids in seen) == 1
    events = [e for e in a.logged() if "event" in e]
    stopped = [i for i, e in enumerate(events) if e["event"] == "zsmon_stopped"]
    assert stopped and stopped[0] == len(events) - 1, [e["event"] for e in events[-5:]]
    assert events[-1]["runs_finished"] is True and events[-1]["queries_cancelled"] >= 1
    after = [e["event"] for e in events[[e["event"] for e in events].index("zsmon_stopping"):]]
    assert "result_discarded_shutdown" in after and "check_done" not in after  # the cut sweep is not shown
