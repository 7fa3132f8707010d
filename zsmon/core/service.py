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

from zsmon.checkers.base import Checker
from zsmon.checkers.registry import checker_classes
from zsmon.core.config import Config, ConfigError
from zsmon.core.db import Database, DatabaseUnavailable
from zsmon.core.http import create_api_app, create_metrics_app
from zsmon.core.logging import get_logger
from zsmon.core.metrics import Metrics
from zsmon.core.redis import make_redis
from zsmon.core.redis import ping as redis_ping
from zsmon.core.results import CheckResult
from zsmon.core.runner import Runner
from zsmon.core.scheduler import Scheduler
from zsmon.core.store import ResultStore
from zsmon.exporters.base import Exporter
from zsmon.exporters.registry import exporter_classes

log = get_logger("zsmon.service")


def build_checkers(config: Config, only: Iterable[str] | None = None) -> dict[str, Checker]:
    classes = checker_classes()
    only = list(only or [])
    unknown = [n for n in only if n not in classes]
    if unknown:
        raise ConfigError(f"unknown checker {', '.join(map(repr, unknown))}; known: {', '.join(classes)}")
    out: dict[str, Checker] = {}
    for name, cls in classes.items():
        cfg = config.checker(name)
        if only and name not in only:
            continue
        if not only and not cfg.enabled:
            continue
        settings = cfg.settings if isinstance(cfg.settings, cls.Settings) else cls.Settings.model_validate(cfg.settings)
        out[name] = cls(settings)
    return out


def build_exporters(config: Config) -> dict[str, Exporter]:
    out: dict[str, Exporter] = {}
    for name, cls in exporter_classes().items():
        cfg = config.exporter(name)
        if cfg.enabled:
            settings = cfg.settings if isinstance(cfg.settings, cls.Settings) else cls.Settings.model_validate(cfg.settings)
            out[name] = cls(settings)
    return out


def build_runner(config: Config, only: Iterable[str] | None = None, metrics: Any = None,
                 store: ResultStore | None = None, exporters: dict[str, Exporter] | None = None,
                 checkers: dict[str, Checker] | None = None, coordinator: Any = None) -> Runner:
    db = Database(config.database)
    db.open()
    return Runner(config, db, make_redis(config.redis), checkers if checkers is not None else build_checkers(config, only),
                  exporters or {}, store or ResultStore(), metrics, coordinator)


def _interval(cls_default: float, configured: float | None) -> float:
    return configured if configured is not None else cls_default


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

    def __init__(self, config: Config) -> None:
        self.config = config
        self.store = ResultStore()
        checkers = build_checkers(config)
        exporters = build_exporters(config)
        self.coordinator: Any = None
        exported: Any = self.store
        if config.ha.enabled:  # N replicas: leases per job, shared results, series only from the holder
            from zsmon.core.ha import LeaderView, make_coordinator

            self.coordinator = make_coordinator(config, self.store, on_acquired=self._on_acquired)
            exported = LeaderView(self.store, self.coordinator.leads)
        self.metrics = Metrics(exported, checkers, [f"check:{n}" for n in checkers]
                               + [f"collect:{n}" for n in exporters] + ["health"], collector_names=exporters)
        if self.coordinator is not None:
            from zsmon.core.ha import LeasedFamilies

            self.coordinator.on_change = self.metrics.refresh

            registry = self.metrics.registry
            registry.unregister(self.metrics.families)
            self.metrics.families = LeasedFamilies(self.coordinator.leads)
            registry.register(self.metrics.families)
            registry.register(self.coordinator)
        for name, checker in checkers.items():
            if self.coordinator is None:
                checker.register_metrics(self.metrics.registry)
            else:
                self._register_leader_only(name, checker)
        self.runner = build_runner(config, metrics=self.metrics, store=self.store, exporters=exporters,
                                   checkers=checkers, coordinator=self.coordinator)
        self.scheduler = Scheduler(config.scheduler.max_workers, config.scheduler.jitter_ratio,
                                   config.scheduler.misfire_grace_seconds, self.metrics)
        self._db_reason: str | None = "database not checked yet"
        self._health_at = 0.0
        self._servers: list[_EmbeddedServer] = []
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self.ports: dict[str, int] = {}

    def _register_leader_only(self, name: str, checker: Checker) -> None:
        from prometheus_client import CollectorRegistry

        from zsmon.core.ha import LeaderOnly

        own = CollectorRegistry(auto_describe=True)
        checker.register_metrics(own)
        self.metrics.registry.register(LeaderOnly(own, lambda: self.coordinator.leads(f"check:{name}")))

    def _on_acquired(self, job: str) -> None:
        """This replica just took a job over: run it now unless its latest shared result is still fresh."""
        kind, _, name = job.partition(":")
        if kind == "check" and name in self.runner.checkers:
            every = _interval(self.runner.checkers[name].default_interval_seconds,
                              self.config.checker(name).interval_seconds)
            latest = self.store.state(name).latest
            if latest is not None and time.time() - latest.started_at < every:
                return
        self.scheduler.run_now(job)

    # ---- state the HTTP layer reads ----------------------------------------------
    def latest_results(self) -> list[CheckResult]:
        return self.store.latest()

    def describe_checker(self, name: str) -> dict[str, Any]:
        checker = self.runner.checkers[name]
        return {
            "name": name, "description": checker.description, "source": checker.source,
            "interval_seconds": _interval(checker.default_interval_seconds, self.config.checker(name).interval_seconds),
            "supports_incremental": checker.supports_incremental,
            "invariants": [dataclasses.asdict(i) for i in checker.invariants],
        }

    def readiness(self) -> list[str]:
        reasons = []
        if not self.scheduler.running:
            reasons.append("scheduler is not running")
        stale_after = 3 * self.config.scheduler.health_interval_seconds + 5
        if self._db_reason:
            reasons.append(self._db_reason)
        elif time.time() - self._health_at > stale_after:
            reasons.append(f"database health unknown: no probe for {stale_after:g}s")
        if self.config.http.ready_requires_checks:
            reasons += [f"checker {name}: {why}" for name, why in sorted(self.runner.database_errors.items())]
        return reasons

    # ---- jobs -----------------------------------------------------------------
    def health(self) -> None:
        try:
            self.runner.db.ping(timeout=min(2.0, self.config.database.connect_timeout_seconds))
            if self._db_reason:
                log.info("database_up", database=self.runner.db.where)
            self._db_reason = None
        except DatabaseUnavailable as exc:
            if self._db_reason is None or self._db_reason.startswith("database not checked"):
                log.warning("database_down", error=str(exc))
            self._db_reason = str(exc)
        self._health_at = time.time()
        self.metrics.database_up.set(0 if self._db_reason else 1)
        self.metrics.redis_up.set(0 if redis_ping(self.runner.redis) else 1)

    def _schedule(self) -> None:
        cfg = self.config
        self.scheduler.add("health", self.health, cfg.scheduler.health_interval_seconds, executor="health")
        for i, (name, checker) in enumerate(self.runner.checkers.items()):
            every = _interval(checker.default_interval_seconds, cfg.checker(name).interval_seconds)
            self.scheduler.add(f"check:{name}", lambda n=name: self.runner.run_check(n), every,
                               first_run_delay=0.2 * i)
        for name, exporter in self.runner.exporters.items():
            every = _interval(exporter.default_interval_seconds, cfg.exporter(name).interval_seconds)
            self.scheduler.add(f"collect:{name}", lambda n=name: self.runner.collect(n), every)

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
        from zsmon.core.http import BodyLimit, RateLimit

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
            self.coordinator.watch(j for j in self.scheduler.intervals if j != "health")
            self.coordinator.start()
        log.info("zsmon_started", database=self.runner.db.where, checkers=list(self.runner.checkers),
                 exporters=list(self.runner.exporters), metrics_port=self.ports["metrics"],
                 api_port=self.ports["api"], redis="on" if self.runner.redis is not None else "off",
                 ha=self.coordinator.identity if self.coordinator is not None else "off")

    def stop(self) -> None:
        self.scheduler.shutdown()
        if self.coordinator is not None:
            self.coordinator.stop()  # releases the leases: another replica takes over at once
        for s in self._servers:
            s.should_exit = True
        if self._thread is not None:
            self._thread.join(5)
        self.runner.db.close()
        if self.runner.redis is not None:
            self.runner.redis.close()
        log.info("zsmon_stopped")

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
