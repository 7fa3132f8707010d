"""End to end: a real violation reaches a pager through real Prometheus and Alertmanager.

The stack (one per module): a private PostgreSQL with pg_stat_statements, a private
redis-server, the sidecar (``running_service``) checking and collecting every second,
``zsmon render`` output for it with 1 s scrape/evaluation and 1 s pager group_wait,
Debian's ``prometheus`` and ``prometheus-alertmanager`` on 127.0.0.1, a webhook receiver
in this process, fake scrape targets for what the platform runs beside zsmon (its API's
own /metrics, postgres-exporter, redis-exporter: see ``zsmon.testing_stack.FakePlatform``)
and the simulators making correct traffic on the platform tables.

For a test that ends in about a minute, ``speed_up`` shortens Alertmanager's
``group_interval`` to 1 s (it only spaces re-notifications, resolved ones included) and
DatabaseDown's ``for`` from 1m to 2s, and Prometheus runs with ``--rules.alert.resend-delay=1s``
(the Watchdog fires before Prometheus has found Alertmanager; with the default 1m it would be
resent only a minute later); expressions, labels, routing and inhibition are
as rendered. ``bench/detection_latency.py`` measures the shipped defaults.

Dashboard queries that cannot have data here (``EXEMPT``): the replication lag panels (only a
replica reports them; ``tests/test_exporters.py`` and ``tests/test_hot_standby.py`` cover them with a
streaming replica) and the
"Skipped invariants" table, which by design lists nothing while every invariant is judged.
"""
from __future__ import annotations

import os
import shutil
import threading
import time

import psycopg
import pytest
import requests
import yaml

from zsmon.dashboards.build import scoped
from zsmon.testing import PrivatePostgres, PrivateRedis, running_service
from zsmon.testing_stack import (ALERTMANAGER, PROMETHEUS, FakePlatform, PrometheusStack, WebhookReceiver,
                                 GRAFANA_VARIABLES, dashboard_queries, free_port, plant_money_from_nowhere, speed_up,
                                 stack_render_settings)

pytestmark = pytest.mark.skipif(not (os.path.exists(PROMETHEUS) and os.path.exists(ALERTMANAGER)),
                                reason="prometheus / prometheus-alertmanager not installed (.ci/run installs them)")
pytestmark = [pytestmark, pytest.mark.slow]  # pytest -m 'not slow' leaves it out (README)

def _queried(expr: str) -> str:
    """A panel's expression as the dashboards hold it and Prometheus gets it (job and instance at "All")."""
    expr = scoped(expr)
    for var in sorted(GRAFANA_VARIABLES, key=len, reverse=True):
        expr = expr.replace(var, GRAFANA_VARIABLES[var])
    return expr


EXEMPT = {_queried(e) for e in (
    # Only a replica reports them; tests/test_exporters.py and tests/test_hot_standby.py cover them with a
    # streaming replica.
    "max(zerostate_postgres_replication_lag_seconds)",
    "max(zsmon_database_replication_lag_seconds)",
    # Only replicas with ha.enabled report them; tests/test_ha.py runs replicas with HA.
    "sum by (scheduler_job) (zsmon_ha_leader)",
    "max(zsmon_ha_degraded)",
    # Lists only the invariants being skipped (`> 0`): empty while every invariant is judged, as here.
    "max by (checker, invariant) (zerostate_invariant_skipped) > 0",
)}
# The panels of acknowledged, unacknowledged and new violations show data only while such violations
# exist: test_acknowledging_silences_the_page_and_a_new_violation_pages_again queries them in that state.
LIFECYCLE_PANELS = {_queried(e) for e in (
    "max by (checker, invariant) (zerostate_invariant_violations_acknowledged) > 0",
    "time() - min by (checker, invariant) (zerostate_invariant_oldest_unacknowledged_violation_timestamp_seconds)",
)}
# ... and the violations first seen in the last hour: once a violation appears.
NEW_VIOLATIONS_PANEL = _queried("sum by (checker, invariant) (increase(zerostate_invariant_new_violations_total[1h])) > 0")
LIFECYCLE_PANELS.add(NEW_VIOLATIONS_PANEL)


class StatementsPostgres(PrivatePostgres):
    """A private cluster with pg_stat_statements preloaded, so the statements panels have data too."""

    def start(self) -> None:
        self._run("pg_ctl", "-D", self.data, "-l", os.path.join(self.dir, "log"), "-w", "-o",
                  f"-p {self.port} -k {self.dir} -c listen_addresses=127.0.0.1 -c fsync=off "
                  "-c shared_preload_libraries=pg_stat_statements", "start")


class Traffic(threading.Thread):
    """Correct platform traffic from the simulators until stopped."""

    def __init__(self, dsn: str) -> None:
        super().__init__(name="e2e-traffic", daemon=True)
        self.dsn = dsn
        self.halt = threading.Event()
        self.steps = 0
        self.errors: list[str] = []

    def run(self) -> None:
        from zsmon.demo.simulator.auctions import AuctionSimulator
        from zsmon.demo.simulator.payments import PaymentSimulator
        from zsmon.demo.simulator.reputation import ReputationSimulator

        conns = [psycopg.connect(self.dsn, autocommit=True) for _ in range(3)]
        try:
            sims = [PaymentSimulator(conns[0], seed=11), AuctionSimulator(conns[1], seed=11),
                    ReputationSimulator(conns[2], seed=11)]
            # Enough ended auctions at once for allocation_success_rate to be judged (it needs 20).
            sims[1].run_until(auctions=25)
            while not self.halt.wait(0.02):
                for sim in sims:
                    try:
                        sim.step()
                        self.steps += 1
                    except Exception as exc:  # recorded; the dashboards check shows what it cost
                        self.errors.append(f"{type(sim).__name__}: {type(exc).__name__}: {exc}")
        finally:
            for c in conns:
                c.close()


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    from zsmon.alerts.render import render_all
    from zsmon.app import build_registry
    from zsmon.core.config import Config, load_config

    tmp = tmp_path_factory.mktemp("e2e")
    pg = StatementsPostgres()
    redis = PrivateRedis()
    platform = FakePlatform()
    receiver = WebhookReceiver()
    started: list = []
    try:
        with psycopg.connect(pg.dsn, autocommit=True) as conn:
            conn.execute("CREATE EXTENSION IF NOT EXISTS pg_stat_statements")
        redis.client().config_set("maxmemory", "256mb")  # so the memory-limit panel has a limit to show
        metrics_port, am_port = free_port(), free_port()
        builtin = build_registry(Config())
        data = {
            "http": {"metrics_listen": f"127.0.0.1:{metrics_port}", "api_listen": "127.0.0.1:0"},
            "scheduler": {"health_interval_seconds": 0.5},
            "database": {"connect_timeout_seconds": 1},
            "checkers": {n: {"interval_seconds": 1} for n in builtin.checker_classes},
            "exporters": {n: {"interval_seconds": 1} for n in builtin.exporter_classes},
            "render": stack_render_settings(f"127.0.0.1:{metrics_port}", platform, receiver, am_port),
        }
        data["exporters"].setdefault("api_probe", {})["settings"] = {
            "targets": [f"http://{platform.api.address}/health"]}
        path = tmp / "zsmon.yml"
        path.write_text(yaml.safe_dump(data))
        config = load_config(path, env={"ZSMON_DATABASE_URL": pg.dsn, **redis.env(), "ADMIN_TOKEN": "e2e-token-4f8a91c2"})

        out = tmp / "rendered"
        render_all(build_registry(config), out)
        speed_up(out, group_interval="1s", alert_for={"DatabaseDown": "2s"})

        svc = running_service(config).__enter__()
        started.append(svc)
        # Alerts that fire before Prometheus has found its Alertmanager are dropped and, by default, resent
        # only after --rules.alert.resend-delay (1m): 1s here so the always-firing Watchdog arrives at once.
        prom = PrometheusStack(out, alertmanager_port=am_port, prometheus_args=("--rules.alert.resend-delay=1s",)).start()
        started.append(prom)
        traffic = Traffic(pg.dsn)
        traffic.start()
        started.append(traffic)
        yield {"pg": pg, "svc": svc, "prom": prom, "receiver": receiver, "traffic": traffic, "out": out}
    finally:
        for thing in reversed(started):
            if isinstance(thing, Traffic):
                thing.halt.set()
                thing.join(10)
            elif isinstance(thing, PrometheusStack):
                thing.stop()
            else:
                thing.__exit__(None, None, None)
        receiver.stop()
        platform.stop()
        redis.stop()
        pg.destroy()
        shutil.rmtree(tmp, ignore_errors=True)


def _payments_world(dsn: str, seed: int = 5) -> str:
    """A consistent world of our own, made by the simulator's transitions: returns an open channel id.

    The traffic simulator only moves channels it opened itself, so this one stays as planted.
    """
    from zsmon.demo.simulator.payments import PaymentSimulator

    with psycopg.connect(dsn, autocommit=True) as conn:
        sim = PaymentSimulator(conn, seed=seed, prefix=f"did:e2e{seed}")
        sim.deposit(f"did:e2e{seed}:payer", 100)
        channel = sim.open_channel(f"did:e2e{seed}:payer", f"did:e2e{seed}:agent", 40)
        assert channel is not None
        assert sim.lock_escrow(channel, 10) and sim.release_escrow(channel, success=True)
        return channel


def _has_payments() -> bool:
    from zsmon.app import build_registry
    from zsmon.core.config import Config

    return "payments" in build_registry(Config()).checker_classes


def test_targets_up_and_watchdog_reaches_its_receiver(stack):
    prom, receiver = stack["prom"], stack["receiver"]
    targets = prom.wait_targets_up({"zsmon", "zerostate-api", "postgres", "redis"}, timeout=30)
    assert {t["labels"]["job"] for t in targets} == {"zsmon", "zerostate-api", "postgres", "redis"}
    # The dead man's switch reaches its own receiver, never the pager.
    receiver.wait_for("Watchdog", "firing", path="/watchdog", timeout=20)
    assert not [a for _, _, a in receiver.alerts("/pager") if a["labels"]["alertname"] == "Watchdog"]


def test_payment_violation_pages_then_resolves(stack):
    if not _has_payments():
        pytest.skip("the payments checker is not in this build")
    prom, receiver, pg = stack["prom"], stack["receiver"], stack["pg"]
    prom.wait_targets_up({"zsmon"})
    channel = _payments_world(pg.dsn)
    # Clean first: the payments checker has judged our world and Prometheus has the zero.
    prom.wait(lambda: prom.query('zerostate_invariant_violations{checker="payments",'
                                 'invariant="channel_conservation"} == 0'), 20, "a clean payments run")
    committed = plant_money_from_nowhere(pg.dsn, channel, 5)
    paged_at, alert = receiver.wait_for("BalanceInvariantViolation", "firing", path="/pager", timeout=30,
                                        since=committed)
    assert alert["labels"]["severity"] == "critical" and alert["annotations"]["runbook_url"].endswith(
        "/runbooks/BalanceInvariantViolation")
    # The page carries its evidence: the status page filtered to payments, and the dashboard panel.
    assert "/?checker=payments#checker-payments" in alert["annotations"]["status_url"]
    assert "/d/zsmon-payments?viewPanel=" in alert["annotations"]["dashboard_url"]
    print(f"\ncommit -> page: {paged_at - committed:.1f}s")
    stack["repaired"] = plant_money_from_nowhere(pg.dsn, channel, -5)


def test_every_dashboard_query_returns_data(stack):
    """Runs while the repaired violation resolves (the money alert keeps firing for its increase() window)."""
    prom = stack["prom"]
    exempt = set(EXEMPT) | LIFECYCLE_PANELS
    queries = dashboard_queries(stack["out"])
    assert len(queries) > 50
    if not _has_payments():  # its panels read the payments checker's and exporter's series
        exempt |= {expr for _, _, expr in queries if "payment" in expr}

    def missing() -> list[str]:
        return [f"{uid} / {title}: {expr}" for uid, title, expr in queries
                if expr not in exempt and not prom.query(expr)]

    left = missing()
    deadline = time.monotonic() + 30
    while left and time.monotonic() < deadline:
        time.sleep(2)
        left = missing()
    assert not left, "dashboard queries without data:\n" + "\n".join(left) + (
        f"\ntraffic errors: {stack['traffic'].errors[-5:]}")


def test_repaired_payment_violation_resolves(stack):
    if "repaired" not in stack:
        pytest.skip("no payment violation was planted (see test_payment_violation_pages_then_resolves)")
    resolved_at, _ = stack["receiver"].wait_for("BalanceInvariantViolation", "resolved", path="/pager", timeout=90,
                                                since=stack["repaired"])
    print(f"\nrepair -> resolved: {resolved_at - stack['repaired']:.1f}s")


def _escrow_state_fault(dsn: str, channel: str, planted: bool) -> float:
    """Mark an open channel escrowed with nothing locked (an escrow_state violation, no money moved), or undo it."""
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute("UPDATE payment_channels SET state = %s, updated_at = now() WHERE id = %s",
                     ("escrowed" if planted else "open", channel))
    return time.monotonic()


def test_acknowledging_silences_the_page_and_a_new_violation_pages_again(stack):
    if not _has_payments():
        pytest.skip("the payments checker is not in this build")
    prom, receiver, pg, svc = stack["prom"], stack["receiver"], stack["pg"], stack["svc"]
    alert = "PaymentsEscrowStateViolation"
    known, later = _payments_world(pg.dsn, seed=6), _payments_world(pg.dsn, seed=8)
    api = svc.url("api", "/api/v1/acks")
    auth = {"Authorization": "Bearer e2e-token-4f8a91c2"}

    planted = _escrow_state_fault(pg.dsn, known, True)
    receiver.wait_for(alert, "firing", path="/pager", timeout=30, since=planted)
    # Acknowledge every current violation of the invariant: the page resolves although the row is still wrong.
    prom.wait(lambda: prom.query('zerostate_invariant_violations_unacknowledged{invariant="escrow_state"} > 0'),
              20, "the violation in Prometheus")
    r = requests.post(api, json={"checker": "payments", "invariant": "escrow_state", "all_current": True,
                                 "reason": "ZS-123 known", "expires": "1d"}, headers=auth, timeout=10)
    assert r.status_code == 201, r.text
    assert list(r.json()["entities"]) == [known]
    acked = time.monotonic()
    receiver.wait_for(alert, "resolved", path="/pager", timeout=30, since=acked)
    assert prom.query('zerostate_invariant_violations{invariant="escrow_state"} > 0'), "still visible"

    # A new violation of the same invariant pages again; the acknowledged one stays quiet.
    second = _escrow_state_fault(pg.dsn, later, True)
    prom.wait(lambda: prom.query(NEW_VIOLATIONS_PANEL), 20, "the new violation on its panel")
    _, fired = receiver.wait_for(alert, "firing", path="/pager", timeout=30, since=second)
    assert fired["labels"]["invariant"] == "escrow_state"
    for expr in LIFECYCLE_PANELS - {NEW_VIOLATIONS_PANEL}:  # the lifecycle panels have data now
        prom.wait(lambda e=expr: prom.query(e), 20, f"data for {expr}")
    listed = requests.get(svc.url("api", "/api/v1/violations"), params={"invariant": "escrow_state"},
                          headers=auth, timeout=10).json()["violations"]
    assert {(v["entity_id"], v["state"]) for v in listed} == {(known, "acknowledged"), (later, "open")}

    repaired = _escrow_state_fault(pg.dsn, later, False)
    receiver.wait_for(alert, "resolved", path="/pager", timeout=30, since=repaired)


def test_database_down_pages(stack):
    prom, receiver, pg = stack["prom"], stack["receiver"], stack["pg"]
    prom.wait_targets_up({"zsmon"})
    stack["traffic"].halt.set()
    stack["traffic"].join(10)
    stopped = time.monotonic()
    pg.stop()
    paged_at, alert = receiver.wait_for("DatabaseDown", "firing", path="/pager", timeout=30, since=stopped)
    assert alert["labels"]["severity"] == "critical"
    print(f"\ndatabase stopped -> DatabaseDown page: {paged_at - stopped:.1f}s")
    # Inhibition: with the database down, the checkers' failures do not page on top of it.
    time.sleep(3)
    noisy = {a["labels"]["alertname"] for t, _, a in receiver.alerts("/pager") if t > stopped
             and a["status"] == "firing"} & {"InvariantCheckFailing", "InvariantCheckStale", "InvariantCheckMissing"}
    assert not noisy, noisy
