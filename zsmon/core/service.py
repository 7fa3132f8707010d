"""Assembles the sidecar: config -> pools -> checkers/exporters -> runner -> scheduler -> HTTP."""
from __future__ import annotations

import asyncio
import dataclasses
import errno
import re
import signal
import socket
import sys
import threading
import time
from collections.abc import Callable, Mapping
from typing import Any, Iterable

import psycopg
from prometheus_client import CollectorRegistry
from psycopg.conninfo import conninfo_to_dict

from zsmon.core.checker import missing_indexes
from zsmon.core.config import ConfigError
from zsmon.core.db import Database, DatabaseUnavailable, conninfo
from zsmon.core.ha import LeasedFamilies, LeaderOnly, make_coordinator
from zsmon.core.http import create_api_app, create_metrics_app
from zsmon.core.lifecycle import Ack, Lifecycle, LifecycleError, list_violations, validate_target
from zsmon.core.logging import get_logger, redactor
from zsmon.core.metrics import Metrics
from zsmon.core.metrics_front import MetricsFront, from_front
from zsmon.core.privileges import PrivilegedRole, RoleGuard
from zsmon.core.registry import BoundChecker, Registry
from zsmon.core.redis import make_redis
from zsmon.core.redis import ping as redis_ping
from zsmon.core.results import CheckResult
from zsmon.core.runner import Runner
from zsmon.core.scheduler import Scheduler
from zsmon.core.serving import EmbeddedServer, ServerSettings, make_server
from zsmon.core.sessions import SessionStore
from zsmon.core.status import SESSION_SECONDS
from zsmon.core.store import ResultStore
from zsmon.core.tls import check_tls

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


def _split(listen: str) -> tuple[str, int]:
    host, _, port = listen.rpartition(":")
    return host.strip("[]") or "0.0.0.0", int(port)


def _database_names(config: Any) -> list[tuple[str, str]]:
    """(value, placeholder) of the monitored database's host and name, longest first."""
    try:
        params = conninfo_to_dict(conninfo(config.database))
    except Exception:  # noqa: BLE001 - an invalid DSN is reported elsewhere
        return []
    found = [(str(params.get("host") or ""), "<host>"), (str(params.get("hostaddr") or ""), "<host>"),
             (str(params.get("dbname") or ""), "<database>")]
    return sorted({(v, label) for v, label in found if len(v) >= 2}, key=lambda p: -len(p[0]))


@dataclasses.dataclass(frozen=True)
class BusyListener:
    listener: str  # "metrics" or "api"
    address: str   # HOST:PORT as configured
    reason: str    # e.g. "port 9090 is already in use by another process"


class ListenError(ConfigError):
    """A listener could not bind. Names only the listeners that failed; callers that know the user's flags
    (``zsmon run``, ``zsmon demo``) say how to pick another address in their own words."""

    def __init__(self, failures: list[BusyListener]) -> None:
        self.failures = failures
        super().__init__("; ".join(f"the {f.listener} listener cannot listen on {f.address}: {f.reason} "
                                   f"(set http.{f.listener}_listen or ZSMON_{f.listener.upper()}_LISTEN to a free "
                                   "HOST:PORT)" for f in failures))


def bind_listener(listener: str, listen: str) -> socket.socket:
    """A TCP socket bound to ``listen`` (HOST:PORT; port 0: any free one), not yet listening."""
    host, port = _split(listen)
    try:
        family, kind, proto, _, addr = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM,
                                                          flags=socket.AI_PASSIVE)[0]
    except socket.gaierror as exc:
        raise ListenError([BusyListener(listener, listen, f"cannot resolve {host!r} ({exc.strerror})")]) from None
    sock = socket.socket(family, kind, proto)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind(addr)
    except OSError as exc:
        sock.close()
        reason = {errno.EADDRINUSE: f"port {port} is already in use by another process",
                  errno.EACCES: f"permission denied (port {port} needs privileges)",
                  errno.EADDRNOTAVAIL: f"{host} is not an address of this machine"}.get(exc.errno, exc.strerror)
        raise ListenError([BusyListener(listener, listen, str(reason))]) from None
    return sock


def bind_listeners(listens: dict[str, str]) -> dict[str, socket.socket]:
    """Every listener bound, or a ``ListenError`` naming each one that could not bind (and only those)."""
    bound: dict[str, socket.socket] = {}
    failures: list[BusyListener] = []
    for listener, listen in listens.items():
        try:
            bound[listener] = bind_listener(listener, listen)
        except ListenError as exc:
            failures += exc.failures
    if failures:
        for sock in bound.values():
            sock.close()
        raise ListenError(failures)
    return bound


class Service:
    """The running sidecar. ``start()`` returns once the listeners are bound; ``stop()`` ends everything."""

    def __init__(self, registry: Registry, dashboard_links: list[dict[str, str]] | None = None,
                 runbooks: Callable[[], Mapping[str, str]] | None = None,
                 privileged_role_expected: str | None = None) -> None:
        """``privileged_role_expected``: why a role that can do more than read is expected here (the demo's
        embedded superuser): said as information rather than warned about."""
        config = self.config = registry.config
        self.registry = registry
        # Links to the Grafana dashboards for the status page (the composition root renders them).
        self.dashboard_links = dashboard_links or []
        # The runbooks served at /runbooks/<name> (the composition root renders them, once, when first asked).
        self._runbooks = runbooks
        self._runbook_pages: Mapping[str, str] | None = None
        self.store = ResultStore()
        # Status-page sessions: in Redis under the deployment's prefix when both are known, so replicas
        # share them; in this process's memory otherwise.
        self.sessions = SessionStore(SESSION_SECONDS, redis=lambda: self.runner.redis if hasattr(self, "runner")
                                     else None, prefix=lambda: self.runner.deployment.prefix
                                     if hasattr(self, "runner") else None)
        self._hidden = _database_names(config)
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
        # The role is inspected whenever the database (again) answers: a failover may land on another server.
        self.role_guard = RoleGuard(self.runner.db, config.database.require_minimal_role,
                                    expected=privileged_role_expected,
                                    on_report=lambda report: self.metrics.set_role_privileged(report.privileged))
        # Set when database.require_minimal_role refuses the role: the service stops with this one line.
        self.refused: str | None = None
        self._db_reason: str | None = "database not checked yet"
        self._health_at = 0.0
        self._servers: list[EmbeddedServer] = []
        self._threads: list[threading.Thread] = []
        self._sockets: list[socket.socket] = []
        self.front: MetricsFront | None = None  # the metrics listener's own process (http.metrics_process)
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

    def runbook(self, name: str) -> str | None:
        if self._runbooks is None:
            return None
        if self._runbook_pages is None:
            self._runbook_pages = self._runbooks()
        return self._runbook_pages.get(name)

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

    def conceal(self, text: str) -> str:
        """``text`` without the monitored database's address and name: ``database unavailable: ...``."""
        where = self.runner.db.where
        text = text.replace(f"database {where} ", "database ").replace(where, "the database")
        for value, label in self._hidden:
            text = re.sub(rf'(?<![\w.-]){re.escape(value)}(?![\w-])', label, text)
        return text

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
            if was_down:
                try:
                    self.role_guard.check(min(5.0, self.config.database.connect_timeout_seconds))
                except PrivilegedRole as exc:
                    self.refused = str(exc)  # nothing reaches the database any more (Database.blocked)
                    return
            deployment = self.runner.deployment
            if deployment.name is None and deployment.resolve() is not None:
                log.info("deployment_identity", deployment=deployment.name, key_prefix=deployment.prefix,
                         source=deployment.source, detail="memory, acknowledgements and HA leases in Redis "
                         "belong to this deployment only")
            if self.coordinator is not None:
                self.coordinator.database_up()
            if was_down:
                self._advise_indexes()
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

    def _advise_indexes(self) -> None:
        """Say once per database-up which index an incremental checker relies on and the schema lacks (zsmon
        runs no DDL): one warning line each, with the statement to run."""
        advice = {(b.name, a) for b in self.runner.checkers.values() if b.full_interval_seconds is not None
                  for a in b.checker.recommended_indexes}
        if not advice:
            return
        try:
            with self.runner.db.snapshot(min(5.0, self.config.database.statement_timeout_seconds)) as conn:
                missing = set(missing_indexes(conn, {a for _, a in advice}))
        except (DatabaseUnavailable, psycopg.Error) as exc:
            log.debug("index_advice_unavailable", error=redactor.scrub(str(exc)))
            return
        for checker, a in sorted(advice, key=lambda ca: (ca[0], ca[1].table, ca[1].column)):
            if a in missing:
                log.warning("index_recommended", checker=checker, table=a.table, column=a.column,
                            statement=a.statement, saves=a.saves,
                            detail="zsmon runs no DDL; docs/deployment.md (Indexes) has the figures")

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
    def _server(self, app: Any) -> EmbeddedServer:
        http = self.config.http
        if http.tls_cert_file or http.tls_key_file:
            check_tls(http.tls_cert_file, http.tls_key_file)  # the real cause, before uvicorn tries (and prompts)
        return make_server(app, ServerSettings.of(http))

    def start(self) -> None:
        # The listeners first: a busy port is reported at once, before any database probe.
        http = self.config.http
        sockets = bind_listeners({"metrics": http.metrics_listen, "api": http.api_listen})
        self._sockets = list(sockets.values())
        self.ports = {name: sock.getsockname()[1] for name, sock in sockets.items()}
        # The GIL is handed between threads every switch interval: a short one bounds how long a scrape
        # waits behind a checker decoding rows. Process-wide, so only the serving process sets it.
        sys.setswitchinterval(http.switch_interval_ms / 1000)
        served = dict(sockets)  # the sockets this process's own servers accept on
        try:
            api_server = self._server(create_api_app(self))
            if http.metrics_process:
                # The metrics socket is the front process's; this process answers what it passes on, on a
                # private Unix socket, without TLS or the listener's middleware (the front wears them).
                self.front = MetricsFront(sockets["metrics"], ServerSettings.of(http))
                served["metrics"] = self.front.backend
                internal = dataclasses.replace(ServerSettings.of(http), tls_cert_file=None, tls_key_file=None,
                                               trusted_proxies=())
                metrics_server = make_server(from_front(create_metrics_app(self)), internal, wrap=False)
            else:
                metrics_server = self._server(create_metrics_app(self))
            self._servers = [metrics_server, api_server]
        except BaseException:
            for sock in sockets.values():
                sock.close()
            if self.front is not None:
                self.front.stop()
                self.front = None
            raise
        self.health()
        if self.refused:  # database.require_minimal_role: no listener serves, no job runs
            self.stop()
            raise PrivilegedRole(self.refused)
        # One thread and event loop per listener: a burst on the API (on-demand runs, a scan) never delays
        # the probes and scrapes the metrics listener answers.
        failure: list[BaseException] = []

        def thread_main(server: EmbeddedServer, sock: socket.socket, started: threading.Event) -> None:
            async def serve() -> None:
                task = asyncio.create_task(server.serve(sockets=[sock]))
                while not server.started:
                    if task.done():
                        failure.append(ConfigError("the HTTP listeners stopped while starting"))
                        started.set()
                        await asyncio.gather(task, return_exceptions=True)
                        return
                    await asyncio.sleep(0.01)
                started.set()
                await asyncio.gather(task, return_exceptions=True)

            loop = asyncio.new_event_loop()
            try:
                loop.run_until_complete(serve())
            except BaseException as exc:  # noqa: BLE001 - reported to start()
                failure.append(exc)
            finally:
                started.set()
                loop.close()

        self._threads = []
        # The metrics listener (and its process) first: once the API answers, both do.
        for (name, sock), server in zip(served.items(), self._servers):
            started = threading.Event()
            thread = threading.Thread(target=thread_main, args=(server, sock, started), name=f"zsmon-http-{name}",
                                      daemon=True)
            thread.start()
            self._threads.append(thread)
            started.wait(30)
            if not failure and name == "metrics" and self.front is not None:
                try:
                    self.front.start()
                except RuntimeError as exc:
                    failure.append(ConfigError(str(exc)))
            if failure:
                self.stop()
                raise failure[0] if isinstance(failure[0], ConfigError) else ConfigError(str(failure[0]))
        if self.front is not None:
            self.store.on_put = self.front.stored
            self.front.stored(self.store.generation)
            self.metrics.on_render = self.front.rendered
            self.metrics.refresh()
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
        if self.front is not None:  # first: it passes requests on to the servers below
            self.store.on_put = self.metrics.on_render = None
            self.front.stop(min(2.0, left()))
            self.front = None
        for s in self._servers:
            s.should_exit = True
        for thread in self._threads:
            thread.join(min(2.0, left()))
        for sock in self._sockets:  # uvicorn closes them; these are the ones it never served
            sock.close()
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
            while not stop.wait(1) and not self.refused:
                pass
        finally:
            self.stop()
        if self.refused:  # the database answered only after start-up, as a role require_minimal_role refuses
            raise PrivilegedRole(self.refused)
