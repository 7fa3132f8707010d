"""Assembles the sidecar: config -> pools -> checkers/exporters -> runner -> scheduler -> HTTP."""
from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import signal
import sys
import threading
import time
from typing import Any, Iterable

import uvicorn
from prometheus_client import CollectorRegistry

from zsmon.core.config import ConfigError
from zsmon.core.db import Database, DatabaseUnavailable
from zsmon.core.ha import LeasedFamilies, LeaderOnly, make_coordinator
from zsmon.core.http import BodyLimit, RateLimit, create_api_app, create_metrics_app
from zsmon.core.lifecycle import Ack, Lifecycle, LifecycleError, list_violations, validate_target
from zsmon.core.logging import get_logger
from zsmon.core.metrics import Metrics
from zsmon.core.registry import BoundChecker, Registry
from zsmon.core.redis import make_redis
from zsmon.core.redis import ping as redis_ping
from zsmon.core.results import CheckResult
from zsmon.core.runner import Runner
from zsmon.core.scheduler import Scheduler
from zsmon.core.store import ResultStore

log = get_logger("zsmon.service")


def build_runner(registry: Registry, only: Iterable[str] | None = None, *, exporters: Iterable[str] = (),
                 metrics: Any = None, store: ResultStore | None = None, coordinator: Any = None) -> Runner:
    """A runner over the registry's enabled checkers (or ``only`` these) and the named ``exporters``,
    with the database pool open."""
    config = registry.config
    db = Database(config.database)
    db.open()
    chosen = {name: registry.exporters[name] for name in exporters}
    return Runner(config, db, make_redis(config.redis), registry.enabled_checkers(only), chosen,
                  store or ResultStore(), metrics, coordinator)


class _EmbeddedServer(uvicorn.Server):
    """uvicorn without its own signal handling: the service owns SIGINT/SIGTERM."""

    def install_signal_handlers(self) -> None:  # uvicorn < 0.29
        pass

    @contextlib.contextmanager
    def capture_signals(self):  # uvicorn >= 0.29
        yield


def _split(listen: str) -> tuple[str, int]:
    host, _, port = listen.rpartition(":")
    return host.strip("[]") or "0.0.0.0", int(port)


class Service:
    """The running sidecar. ``start()`` returns once the listeners are bound; ``stop()`` ends everything."""

    def __init__(self, registry: Registry, dashboard_links: list[dict[str, str]] | None = None) -> None:
        config = self.config = registry.config
        self.registry = registry
        # Links to the Grafana dashboards for the status page (the composition root renders them).
        self.dashboard_links = dashboard_links or []
        self.store = ResultStore()
        checkers = registry.enabled_checkers()
        exporters = registry.enabled_exporters()
        self.coordinator: Any = None
        if config.ha.enabled:  # N replicas: leases per job, shared results, series only from the holder
            # Leases live under the deployment's prefix, known once the database answered (the runner's).
            self.coordinator = make_coordinator(
                config, self.store, key_prefix=lambda: self.runner.deployment.prefix if hasattr(self, "runner")
                else None, on_acquired=self._on_acquired)
        self.metrics = Metrics(self.store, checkers, [f"check:{n}" for n in checkers]
                               + [f"export:{n}" for n in exporters] + ["health"], exporter_names=exporters,
                               leads=self.coordinator.leads if self.coordinator is not None else None,
                               invariants=[(n, inv.id) for n, b in checkers.items() for inv in b.invariants],
                               valid_until=self.coordinator.valid_until if self.coordinator is not None else None)
        if self.coordinator is not None:
            self.coordinator.on_change = self.metrics.refresh

            prom = self.metrics.registry
            prom.unregister(self.metrics.families)
            self.metrics.families = LeasedFamilies(self.coordinator.leads)
            prom.register(self.metrics.families)
            prom.register(self.coordinator)
        for name, bound in checkers.items():
            if self.coordinator is None:
                bound.checker.register_metrics(self.metrics.registry)
            else:
                self._register_leader_only(name, bound)
        self.runner = build_runner(registry, exporters=exporters, metrics=self.metrics, store=self.store,
                                   coordinator=self.coordinator)
        if self.coordinator is not None:
            self.coordinator.on_lost = self.runner.abandon  # a run whose lease lapsed stops early
        self.scheduler = Scheduler(config.scheduler.max_workers, config.scheduler.jitter_ratio,
                                   config.scheduler.misfire_grace_seconds, self.metrics)
        self._db_reason: str | None = "database not checked yet"
        self._health_at = 0.0
        self._servers: list[_EmbeddedServer] = []
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self.ports: dict[str, int] = {}

    def _register_leader_only(self, name: str, bound: BoundChecker) -> None:
        own = CollectorRegistry(auto_describe=True)
        bound.checker.register_metrics(own)
        self.metrics.registry.register(LeaderOnly(own, lambda: self.coordinator.leads(f"check:{name}")))

    def _on_acquired(self, job: str) -> None:
        """This replica just took a job over: run it now unless its latest shared result is fresh and good
        (an error, e.g. from a leader that lost its database, is re-run at once)."""
        kind, _, name = job.partition(":")
        if kind == "check" and name in self.runner.checkers and not self.coordinator.result_due(
                name, self.runner.checkers[name].interval_seconds):
            return
        self.scheduler.run_now(job)

    # ---- what the HTTP layer reads (zsmon.core.view.ServiceView) ------------------
    @property
    def checkers(self) -> dict[str, BoundChecker]:
        return self.runner.checkers

    def latest_results(self) -> list[CheckResult]:
        return self.store.latest()

    def run_check_now(self, name: str) -> CheckResult | None:
        result = self.runner.run_check(name)
        self.metrics.refresh()
        return result

    def exposition(self, accept: str | None) -> tuple[bytes, str]:
        return self.metrics.exposition(accept)

    # ---- violations and acknowledgements ------------------------------------------
    def _lifecycle(self) -> Lifecycle:
        reason = redis_ping(self.runner.redis)
        if self.runner.lifecycle is None or reason:
            raise LifecycleError(f"violations' lifecycle and acknowledgements live in Redis: {reason}")
        return self.runner.lifecycle

    def violations(self, checker: str | None = None, invariant: str | None = None, state: str | None = None,
                   since: float | None = None, cursor: str | None = None,
                   limit: int = 100) -> tuple[list[dict[str, Any]], str | None]:
        """Tracked violations, oldest first within an invariant, with the latest sample's detail."""
        pairs = [(n, inv.id) for n, b in self.checkers.items() for inv in b.invariants
                 if (checker is None or n == checker) and (invariant is None or inv.id == invariant)]
        rows, next_cursor = list_violations(self._lifecycle(), pairs, state=state, since=since, cursor=cursor,
                                            limit=limit)
        sampled = {(r.checker, v.invariant, v.entity_id): v for r in self.latest_results() for v in r.violations}
        for row in rows:
            v = sampled.get((row["checker"], row["invariant"], row["entity_id"]))
            inv = self.checkers[row["checker"]].checker.invariant(row["invariant"])
            row.update(entity_type=v.entity_type if v else inv.entity_type,
                       expected=v.to_dict()["expected"] if v else None, actual=v.to_dict()["actual"] if v else None,
                       detail=v.detail if v else "")
        return rows, next_cursor

    def acks(self) -> list[Ack]:
        return self._lifecycle().acks()

    def ack_events(self) -> list[dict[str, Any]]:
        return self._lifecycle().ack_events()

    def acknowledge(self, checker: str, invariant: str, entities: list[str] | None, reason: str,
                    expires_in: float | None = None, author: str | None = None) -> Ack:
        """Acknowledge current violations (``entities`` None: all of them now); their page stops at once."""
        validate_target({n: [i.id for i in b.invariants] for n, b in self.checkers.items()}, checker, invariant)
        ack = self._lifecycle().acknowledge(checker, invariant, entities, reason, author or self.config.http.admin_name,
                                            expires_in)
        self.runner.reannotate(checker)
        self.metrics.refresh()
        return ack

    def revoke(self, ack_id: str, author: str | None = None) -> Ack:
        ack = self._lifecycle().revoke(ack_id, author or self.config.http.admin_name)
        self.runner.reannotate(ack.checker)
        self.metrics.refresh()
        return ack

    def describe_checker(self, name: str) -> dict[str, Any]:
        bound = self.runner.checkers[name]
        checker = bound.checker
        return {
            "name": name, "description": checker.description, "source": checker.source,
            "interval_seconds": bound.interval_seconds,
            "supports_incremental": checker.supports_incremental,
            "invariants": [dataclasses.asdict(i) for i in checker.invariants],
        }

    def readiness(self) -> list[str]:
        reasons = []
        if self.runner.stopping:
            reasons.append("shutting down")
        if not self.scheduler.running:
            reasons.append("scheduler is not running")
        if self.coordinator is not None and self.coordinator.problem:
            reasons.append(self.coordinator.problem)
        stale_after = 3 * self.config.scheduler.health_interval_seconds + 5
        if self._db_reason:
            reasons.append(self._db_reason)
        elif time.time() - self._health_at > stale_after:
            reasons.append(f"database health unknown: no probe for {stale_after:g}s")
        if self.config.http.ready_requires_checks:
            reasons += [f"checker {name}: {why}" for name, why in sorted(self.runner.database_errors.items())]
        return reasons

    def memory_skipped(self) -> list[str]:
        """``checker/invariant: reason`` for every invariant the latest run skipped for want of memory (Redis
        down): judged again at the first run after it returns."""
        return [f"{r.checker}/{inv}: {why}" for r in self.latest_results() for inv, why in sorted(r.skipped.items())
                if why.startswith("needs memory across runs")]

    # ---- jobs -----------------------------------------------------------------
    def health(self) -> None:
        try:
            self.runner.db.ping(timeout=min(2.0, self.config.database.connect_timeout_seconds))
            was_down = self._db_reason is not None
            if self._db_reason:
                log.info("database_up", database=self.runner.db.where)
            self._db_reason = None
            deployment = self.runner.deployment
            if deployment.name is None and deployment.resolve() is not None:
                log.info("deployment_identity", deployment=deployment.name, key_prefix=deployment.prefix,
                         source=deployment.source, detail="memory, acknowledgements and HA leases in Redis "
                         "belong to this deployment only")
            if self.coordinator is not None:
                self.coordinator.database_up()
            if was_down:
                self._recover()
        except DatabaseUnavailable as exc:
            if self._db_reason is None or self._db_reason.startswith("database not checked"):
                log.warning("database_down", error=str(exc))
            self._db_reason = str(exc)
            if self.coordinator is not None:  # leases go to a replica that can reach the database
                self.coordinator.database_down(str(exc))
        self._health_at = time.time()
        self.metrics.database_up.set(0 if self._db_reason else 1)
        self.metrics.redis_up.set(0 if redis_ping(self.runner.redis) else 1)

    def _recover(self) -> None:
        """The database answers: re-run now every checker whose latest run failed because of it, rather than
        at its next interval (the schema checker's is 5 minutes), so /ready and the results recover within
        a probe interval. Spread over a second; the scheduler's workers bound how many run at once."""
        failed = sorted(self.runner.database_errors)
        if not failed or not self.scheduler.running:
            return
        log.info("database_recovered_rerun", checkers=failed)
        spread = min(1.0, self.config.scheduler.health_interval_seconds)
        for name in failed:
            self.scheduler.run_now(f"check:{name}", within_seconds=spread)

    def _schedule(self) -> None:
        cfg = self.config
        self.scheduler.add("health", self.health, cfg.scheduler.health_interval_seconds, executor="health")
        for i, (name, bound) in enumerate(self.runner.checkers.items()):
            self.scheduler.add(f"check:{name}", lambda n=name: self.runner.run_check(n), bound.interval_seconds,
                               first_run_delay=0.2 * i)
        for name, exported in self.runner.exporters.items():
            self.scheduler.add(f"export:{name}", lambda n=name: self.runner.collect(n), exported.interval_seconds)

    # ---- lifecycle --------------------------------------------------------------
    def _server(self, app: Any, listen: str) -> _EmbeddedServer:
        host, port = _split(listen)
        http = self.config.http
        ssl = {}
        if http.tls_cert_file or http.tls_key_file:
            if not (http.tls_cert_file and http.tls_key_file):
                raise ConfigError("TLS needs both TLS_CERT_FILE and TLS_KEY_FILE (http.tls_cert_file/tls_key_file)")
            for f in (http.tls_cert_file, http.tls_key_file):
                if not f.is_file():
                    raise ConfigError(f"TLS file {f} does not exist or is not a file")
            ssl = {"ssl_certfile": str(http.tls_cert_file), "ssl_keyfile": str(http.tls_key_file)}
        wrapped = BodyLimit(app, http.max_body_bytes)
        if http.rate_limit_per_minute:
            wrapped = RateLimit(wrapped, http.rate_limit_per_minute)
        cfg = uvicorn.Config(wrapped, host=host, port=port, log_config=None, access_log=False,
                             lifespan="off", server_header=False, timeout_graceful_shutdown=2, **ssl)
        return _EmbeddedServer(cfg)

    def start(self) -> None:
        # The GIL is handed between threads every switch interval: a short one bounds how long a scrape
        # waits behind a checker decoding rows. Process-wide, so only the serving process sets it.
        sys.setswitchinterval(self.config.http.switch_interval_ms / 1000)
        self.health()
        self._servers = [self._server(create_metrics_app(self), self.config.http.metrics_listen),
                         self._server(create_api_app(self), self.config.http.api_listen)]
        started = threading.Event()
        failure: list[BaseException] = []

        async def serve() -> None:
            tasks = [asyncio.create_task(s.serve()) for s in self._servers]
            while not all(s.started for s in self._servers):
                if any(t.done() for t in tasks):
                    failure.append(ConfigError("could not bind the HTTP listeners "
                                               f"({self.config.http.metrics_listen}, {self.config.http.api_listen}): "
                                               "address in use or not permitted"))
                    for s in self._servers:
                        s.should_exit = True
                    started.set()
                    await asyncio.gather(*tasks, return_exceptions=True)
                    return
                await asyncio.sleep(0.01)
            started.set()
            await asyncio.gather(*tasks, return_exceptions=True)

        def thread_main() -> None:
            self._loop = asyncio.new_event_loop()
            try:
                self._loop.run_until_complete(serve())
            except SystemExit:  # uvicorn exits when it cannot bind
                failure.append(ConfigError("could not bind the HTTP listeners "
                                           f"({self.config.http.metrics_listen}, {self.config.http.api_listen}): "
                                           "address in use or not permitted"))
                started.set()
            except BaseException as exc:  # noqa: BLE001 - reported to start()
                failure.append(exc)
                started.set()

        self._thread = threading.Thread(target=thread_main, name="zsmon-http", daemon=True)
        self._thread.start()
        started.wait(30)
        if failure:
            self.stop()
            raise failure[0] if isinstance(failure[0], ConfigError) else ConfigError(str(failure[0]))
        for name, server in zip(("metrics", "api"), self._servers):
            self.ports[name] = server.servers[0].sockets[0].getsockname()[1]
        self._schedule()
        self.scheduler.start()
        if self.coordinator is not None:
            jobs = {j: every for j, every in self.scheduler.intervals.items() if j != "health"}
            self.coordinator.watch(jobs)
            self.coordinator.start()
            shortest = min(jobs.items(), key=lambda kv: kv[1], default=None)
            if shortest is not None and self.config.ha.lease_seconds > shortest[1]:
                log.warning("ha_lease_longer_than_interval", lease_seconds=self.config.ha.lease_seconds,
                            job=shortest[0], interval_seconds=shortest[1],
                            detail="a dead leader's jobs wait up to a lease before another replica runs them, "
                                   "so takeover takes more than one interval of this job: set ha.lease_seconds "
                                   "to at most the shortest interval")
        log.info("zsmon_started", database=self.runner.db.where, checkers=list(self.runner.checkers),
                 exporters=list(self.runner.exporters), metrics_port=self.ports["metrics"],
                 api_port=self.ports["api"], redis="on" if self.runner.redis is not None else "off",
                 ha=self.coordinator.identity if self.coordinator is not None else "off",
                 deployment=self.runner.deployment.prefix or "unknown until the database answers")
        incremental = [n for n, b in self.runner.checkers.items() if b.full_interval_seconds is not None]
        no_redis = redis_ping(self.runner.redis)
        if incremental and no_redis:
            log.warning("incremental_runs_off", checkers=incremental, reason=no_redis,
                        detail="without Redis every run is a full sweep (its result says mode full), violations "
                               "have no lifecycle and cannot be acknowledged: every one pages")

    def stop(self) -> None:
        """Stop within ``scheduler.shutdown_grace_seconds``: no new run, the running queries cancelled on the
        server, the leases released only once no run of this process can still publish (else they lapse),
        then the listeners and pools closed."""
        grace = self.config.scheduler.shutdown_grace_seconds
        began = time.monotonic()
        deadline = began + grace
        runs_deadline = deadline - min(2.0, grace / 3)  # what is left is for the listeners and the pools

        def left(until: float = deadline) -> float:
            return max(0.0, until - time.monotonic())

        log.info("zsmon_stopping", grace_seconds=grace)
        self.scheduler.shutdown()  # no new scheduled run
        self.runner.stopping = True  # no run starts (on demand either); one cut short publishes nothing
        if self.coordinator is not None:
            self.coordinator.close()  # no new lease; the held ones are still renewed while runs end
        cancelled = 0
        idle = self.runner.wait_idle(0)
        while not idle and left(runs_deadline) > 0:
            # Again each round: a run between two queries starts its next one after a cancel.
            cancelled += self.runner.db.cancel_running(min(1.0, left(runs_deadline)))
            idle = self.runner.wait_idle(min(0.25, left(runs_deadline)))
        if self.coordinator is not None:
            # Released only when nothing can publish any more: otherwise the next holder's run would overlap
            # this one's; a lease left to lapse hands over after lease_seconds.
            self.coordinator.stop(release=idle)
        for s in self._servers:
            s.should_exit = True
        if self._thread is not None:
            self._thread.join(min(2.0, left()))
        self.runner.db.close(timeout=min(1.0, left()))
        if self.runner.redis is not None:
            self.runner.redis.close()
        log.info("zsmon_stopped", seconds=round(time.monotonic() - began, 2), queries_cancelled=cancelled,
                 runs_finished=idle)

    def run_forever(self) -> None:
        """Start, then block until SIGINT/SIGTERM; stop cleanly."""
        stop = threading.Event()
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, lambda *_: stop.set())
        self.start()
        try:
            while not stop.wait(1):
                pass
        finally:
            self.stop()
