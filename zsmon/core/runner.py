"""Runs checkers and exporter collections, and publishes what they produce.

A checker run is one read-only snapshot transaction. Whatever goes wrong
outside the checker's logic (database gone, timeout, a bug) makes the run
``error`` with a one-line reason; it is never reported as ``pass``.
"""
from __future__ import annotations

import threading
import time
from collections import defaultdict
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import psycopg
from redis import RedisError

from zsmon.core.checker import Checker, CheckContext
from zsmon.core.config import Config
from zsmon.core.db import Database, DatabaseUnavailable, explain, recovery_conflict
from zsmon.core.deployment import Deployment
from zsmon.core.lifecycle import Lifecycle, Observed
from zsmon.core.logging import get_logger, redactor
from zsmon.core.redis import ping as redis_ping
from zsmon.core.redis import redis_error
from zsmon.core.results import CheckResult
from zsmon.core.exporter import CollectContext, Exporter
from zsmon.core.registry import BoundChecker, BoundExporter
from zsmon.core.store import ResultStore

log = get_logger("zsmon.runner")


class LocalCoordinator:
    """Single replica: always the leader. core/ha.py provides the Redis-lease version."""

    identity = "local"

    def acquire(self, job: str) -> Any:
        return True

    def still_leader(self, job: str, token: Any) -> bool:
        return True

    def publish(self, job: str, token: Any, result: CheckResult) -> bool:
        """Called before a result is published: False discards it (fencing)."""
        return self.still_leader(job, token)


class Runner:
    def __init__(
        self,
        config: Config,
        db: Database,
        redis: Any,
        checkers: dict[str, BoundChecker],
        exporters: dict[str, BoundExporter] | None = None,
        store: ResultStore | None = None,
        metrics: Any = None,
        coordinator: Any = None,
    ) -> None:
        self.config = config
        self.db = db
        self.redis = redis
        self.checkers = checkers
        self.exporters = exporters or {}
        self.store = store or ResultStore()
        self.metrics = metrics
        self.coordinator = coordinator or LocalCoordinator()
        self._locks: dict[str, threading.Lock] = defaultdict(threading.Lock)
        self.database_errors: dict[str, str] = {}
        # Every Redis key lives under the monitored database's identity (zsmon.core.deployment).
        self.deployment = Deployment(config, db)
        self._lifecycle: Lifecycle | None = None
        # Shutdown: no run starts once set; runs in progress are counted so the service can wait for them.
        self.stopping = False
        self._busy = 0
        self._idle = threading.Condition()
        # A checker's run in progress: its connection, and whether it was abandoned (its lease lost).
        self._running_on: dict[str, Any] = {}
        self._abandoned: set[str] = set()

    @property
    def lifecycle(self) -> Lifecycle | None:
        """Violations' lifecycle and acknowledgements, in Redis under this deployment; None without Redis
        or before the database told who it is (every violation pages)."""
        prefix = self.deployment.prefix
        if self.redis is None or prefix is None:
            return None
        if self._lifecycle is None:
            self._lifecycle = Lifecycle(self.redis, prefix, self.config.checks.track_limit)
        return self._lifecycle

    # ---- checkers ------------------------------------------------------------
    def choose_mode(self, name: str) -> str:
        full_every = self.checkers[name].full_interval_seconds
        if full_every is None:
            return "full"
        last_full = self.store.state(name).last_full_timestamp
        if last_full is None or time.time() - last_full >= full_every:
            return "full"
        return "incremental"

    def run_check(self, name: str, mode: str | None = None, *, publish: bool = True) -> CheckResult | None:
        """Run one checker now. Returns None when another replica holds this checker's lease (or the
        process is shutting down)."""
        bound = self.checkers[name]
        with self._running():
            token = None if self.stopping else self.coordinator.acquire(f"check:{name}")
            if not token:
                # Another replica runs it: an error of this replica's own last run describes nothing now.
                self.database_errors.pop(name, None)
                return None
            with self._locks[name]:
                result, ctx = self._execute(bound, mode or self.choose_mode(name))
                if publish:
                    return self._publish(bound.checker, result, ctx, token)
                return result

    # ---- shutdown ----------------------------------------------------------------
    @contextmanager
    def _running(self) -> Iterator[None]:
        with self._idle:
            self._busy += 1
        try:
            yield
        finally:
            with self._idle:
                self._busy -= 1
                self._idle.notify_all()

    def abandon(self, job: str) -> None:
        """This replica lost ``job``'s lease mid-run: cancel the run's query on the server now. The run ends
        as an error that is never published (fenced), instead of running to completion for nobody."""
        kind, _, name = job.partition(":")
        conn = self._running_on.get(name) if kind == "check" else None
        if conn is None:
            return
        self._abandoned.add(name)
        log.warning("run_abandoned_lease_lost", checker=name)
        self.db.cancel_with_helpers(conn, 1.0)

    def wait_idle(self, timeout: float) -> bool:
        """Wait until no run of this process is in progress (so none can still publish); False on timeout."""
        with self._idle:
            return self._idle.wait_for(lambda: self._busy == 0, timeout=max(0.0, timeout))

    def run_checks(self, names: list[str] | None = None, mode: str | None = None,
                   on_reachable: Callable[[], Any] | None = None) -> list[CheckResult]:
        """Run these checkers (all by default) one after another, as the command line does.

        The database is asked once up front, with one direct connection attempt: when it cannot be
        reached, every checker's run is an error with that one reason at once, instead of each checker
        waiting out the connect timeout in turn. ``on_reachable`` is called once it answered, before any
        checker runs (the role inspection: it may raise to stop everything)."""
        names = list(self.checkers) if names is None else names
        reason = self.db.unreachable()
        if reason is None:
            if on_reachable is not None:
                on_reachable()
            return [r for r in (self.run_check(n, mode) for n in names) if r is not None]
        log.warning("check_error", checkers=len(names), error=reason)
        results = []
        for name in names:
            bound = self.checkers[name]
            token = self.coordinator.acquire(f"check:{name}")
            if not token:
                continue
            self.database_errors[name] = reason
            result = CheckResult(name, "error", mode or self.choose_mode(name), 0.0, error=reason,
                                 started_at=time.time(), producer=self.coordinator.identity)
            results.append(self._publish(bound.checker, result, None, token))
        return results

    def _execute(self, bound: BoundChecker, mode: str, attempt: int = 1) -> tuple[CheckResult, CheckContext | None]:
        checker = bound.checker
        started = time.time()
        t0 = time.perf_counter()
        redis_reason = redis_ping(self.redis)
        prefix = self.deployment.resolve()
        if redis_reason is None and prefix is None:
            redis_reason = "the deployment identity is not known yet (the database has not answered)"
        redis = self.redis if redis_reason is None else None
        if redis is None and mode == "incremental":
            mode = "full"  # watermarks live in Redis: without it, sweep everything
        ctx: CheckContext | None = None
        error = db_error = None
        try:
            with self.db.snapshot(bound.statement_timeout_seconds) as conn:
                self._abandoned.discard(checker.name)
                self._running_on[checker.name] = conn
                ctx = CheckContext(checker, conn, mode=mode, sample_limit=self.config.checks.sample_limit,
                                   redis=redis, redis_reason=redis_reason, key_prefix=prefix or self.config.redis.key_prefix,
                                   log=log.bind(checker=checker.name), track_limit=self.config.checks.track_limit,
                                   lifecycle=self.lifecycle if redis is not None else None,
                                   share=self._sharing(conn, bound.statement_timeout_seconds),
                                   max_connections=self.split_connections)
                ctx.inspect_schema()
                checker.run(ctx)
        except DatabaseUnavailable as exc:
            error = db_error = str(exc)
        except psycopg.OperationalError as exc:  # timeout, killed backend, unresponsive server
            if not recovery_conflict(exc):
                error = db_error = explain(exc)
            elif attempt <= self.config.database.recovery_conflict_retries:
                # A hot standby cancelled the sweep so that replay could go on: again, on a fresh snapshot.
                log.warning("check_retry_recovery_conflict", checker=checker.name, attempt=attempt,
                            error=f"{type(exc).__name__}: {str(exc).strip().splitlines()[0]}")
                spent = time.perf_counter() - t0
                result, ctx = self._execute(bound, mode, attempt + 1)
                result.duration_seconds += spent  # the run's time and start include the cancelled tries
                result.started_at = started
                return result, ctx
            else:  # not the database's fault: /ready stays up, the reason names the standby setting
                error = f"{explain(exc)} [{attempt} attempts]"
        except psycopg.Error as exc:
            error = explain(exc)
        except Exception as exc:  # a bug in a checker is an error result, not a dead scheduler
            error = f"checker raised {type(exc).__name__}: {redactor.scrub(str(exc))}"
            log.exception("checker_crashed", checker=checker.name)
        finally:
            self._running_on.pop(checker.name, None)
        if checker.name in self._abandoned:
            self._abandoned.discard(checker.name)
            error, db_error = "abandoned: this replica lost the lease mid-run (another replica runs it)", None
        duration = time.perf_counter() - t0
        # What /ready reports while it lasts: the database failed this checker (not the checker's own bug).
        if db_error is not None:
            self.database_errors[checker.name] = db_error
        else:
            self.database_errors.pop(checker.name, None)
        if error is not None or ctx is None:
            log.warning("check_error", checker=checker.name, error=error)
            return CheckResult(checker.name, "error", ctx.mode if ctx is not None else mode, duration,
                               error=error or "checker did not run", started_at=started,
                               producer=self.coordinator.identity), None
        for inv in checker.invariants:
            if inv.id in ctx.unavailable:
                continue
            if inv.needs_memory and redis is None:
                ctx.skip(inv.id, f"needs memory across runs: {redis_reason}")
            elif inv.id not in ctx.counts and inv.id not in ctx.skipped:
                ctx.skip(inv.id, f"not judged by this run (mode {ctx.mode})")
        counts = {k: ctx.counts[k] for k in (i.id for i in checker.invariants) if k in ctx.counts}
        sample = [v for inv in checker.invariants for v in ctx.samples.get(inv.id, [])]
        status = "fail" if any(counts.values()) else "pass"
        # In the order of the invariants (the passes of a split sweep finish in any order).
        skipped = {i.id: ctx.skipped[i.id] for i in checker.invariants if i.id in ctx.skipped}
        summaries = {i.id: ctx.summaries[i.id] for i in checker.invariants if i.id in ctx.summaries}
        return CheckResult(checker.name, status, ctx.mode, duration, counts, sample, skipped,
                           summaries, None, started, self.coordinator.identity), ctx

    @property
    def split_connections(self) -> int:
        """How many connections a split pass uses by default: two, leaving a pool slot of
        ``database.max_connections`` for the other runs (1 with a pool of one or two: no split)."""
        return max(1, min(2, self.config.database.max_connections - 1))

    def _sharing(self, conn: Any, timeout: float | None) -> Callable[[int], Any]:
        def share(helpers: int) -> Any:
            return self.db.shared_snapshot(conn, helpers, timeout)
        return share

    def _publish(self, checker: Checker, result: CheckResult, ctx: CheckContext | None, token: Any) -> CheckResult:
        """Publish a finished run (fenced); returns it as published, with its violations' lifecycle."""
        if ctx is not None and result.status != "error":
            result = self._with_lifecycle(result, ctx)
        if self.stopping and result.status == "error":
            # Cancelled by the shutdown (or failed during it): not a finding about the database.
            log.info("result_discarded_shutdown", checker=checker.name, error=result.error)
            return result
        # Fencing: a replica that lost its lease while it ran (paused, partitioned) publishes nothing; the
        # coordinator logs why (lease lost, Redis gone under stand_by).
        if not self.coordinator.publish(f"check:{checker.name}", token, result):
            return result
        self.store.put(result)
        if self.metrics is not None:
            self.metrics.observe_result(result)
        try:
            checker.observe(result)
        except Exception:
            log.exception("checker_observe_failed", checker=checker.name)
        if self.metrics is not None:
            # Now, not when the job ends: what follows (memory committed to Redis) can take seconds at scale,
            # and until /metrics is rendered again every scrape renders it itself, in this busy process.
            self.metrics.refresh()
        if ctx is not None and result.status != "error":
            ctx.run_after_success()
        log.info("check_done", checker=checker.name, status=result.status, mode=result.mode,
                 duration_seconds=round(result.duration_seconds, 4), violations=result.total_violations,
                 new=sum(result.new_counts.values()), skipped=len(result.skipped))
        return result

    def _with_lifecycle(self, result: CheckResult, ctx: CheckContext) -> CheckResult:
        """Fold the run into its violations' lifecycle (first seen, resolved, acknowledgements)."""
        if ctx.lifecycle is None:
            return result
        observed = {inv: Observed(n, ctx.tracked.get(inv, {}), ctx.checker.invariant(inv).difference_is_age)
                    for inv, n in result.violation_counts.items()}
        try:
            new = ctx.lifecycle.record(result, observed)
            return ctx.lifecycle.annotate(result, new)
        except RedisError as exc:  # fails safe: without the lifecycle every violation pages
            log.warning("lifecycle_unavailable", checker=result.checker, error=redis_error(exc))
            return result

    def reannotate(self, checker: str) -> None:
        """Show a change of acknowledgements in the latest result at once, not at the next run."""
        latest = self.store.state(checker).latest
        if self.lifecycle is None or latest is None or latest.status == "error":
            return
        self.store.put(self.lifecycle.annotate(latest))

    # ---- exporters -----------------------------------------------------------
    def collect(self, name: str) -> None:
        with self._running():
            if not self.stopping:
                self._collect_one(name)

    def _collect_one(self, name: str) -> None:
        exporter = self.exporters[name].exporter
        if not self.coordinator.acquire(f"export:{name}"):
            # Another replica collects and exports these families (HA); this one's own gauges go away.
            if self.metrics is not None:
                for gauge in (self.metrics.exporter_duration, self.metrics.exporter_last_success):
                    try:
                        gauge.remove(name)
                    except KeyError:
                        pass
            return
        t0 = time.perf_counter()
        try:
            families = self._collect(exporter)
            ok = True
        except Exception as exc:
            ok = False
            reason = explain(exc) if isinstance(exc, psycopg.Error) else f"{type(exc).__name__}: {exc}"
            log.warning("export_error", exporter=name, error=redactor.scrub(reason))
            families = list(exporter.on_error(exc))
        if self.metrics is not None:
            self.metrics.families.set(name, families)
            self.metrics.exporter_duration.labels(name).set(time.perf_counter() - t0)
            if ok:
                self.metrics.exporter_last_success.labels(name).set(time.time())
            else:
                self.metrics.exporter_errors.labels(name).inc()

    def _collect(self, exporter: Exporter) -> list:
        if not exporter.needs_database:
            return list(exporter.collect(CollectContext(exporter, None, self.redis, self.config, log)))
        # Exporters get a short timeout of their own: a slow stats query must not hold a pool slot for 30 s.
        with self.db.snapshot(min(10.0, self.config.database.statement_timeout_seconds)) as conn:
            return list(exporter.collect(CollectContext(exporter, conn, self.redis, self.config, log)))
