"""zsmon's Prometheus registry: invariant results, cached exporter families, self-health.

Nothing here touches the database: collectors read the result store and the
exporters' cached families, so a scrape costs the same however large the
monitored database is.
"""
from __future__ import annotations

import math
import platform
import threading
import time
from typing import Callable, Iterable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, disable_created_metrics
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.exposition import choose_encoder

import zsmon
from zsmon.core.store import ResultStore

# No ``<counter>_created`` / ``<histogram>_created`` series: Prometheus does not use them (without
# created-timestamp ingestion) and they double the series of every counter and histogram. The switch is
# prometheus_client's own, process-wide; zsmon's registry is the only one a zsmon process serves.
disable_created_metrics()

CHECK_STATUSES = ("pass", "fail", "error")
# What scrapers ask for, rendered after every job: text, OpenMetrics (Prometheus 2), and OpenMetrics with
# UTF-8 names allowed (Prometheus 3's first choice). Any other Accept is rendered when it is asked.
_FORMATS = ("text/plain", "application/openmetrics-text; version=1.0.0",
            "application/openmetrics-text; version=1.0.0; escaping=allow-utf-8")
DURATION_BUCKETS = (0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)


class ResultsCollector:
    """Gauges computed from the latest results at scrape time.

    ``leads(job)`` says which checkers' series this process exports: all of them
    alone (None), only those whose lease it holds among HA replicas (``check:<name>``).
    """

    def __init__(self, store: ResultStore, leads: Callable[[str], bool] | None = None) -> None:
        self.store = store
        self.leads = leads

    def collect(self) -> Iterable[Metric]:
        violations = GaugeMetricFamily(
            "zerostate_invariant_violations", "Violations found by the latest completed run of each invariant.",
            labels=["checker", "invariant"])
        skipped = GaugeMetricFamily(
            "zerostate_invariant_skipped", "1 when the latest run could not judge the invariant (see the API for why).",
            labels=["checker", "invariant"])
        last_success = GaugeMetricFamily(
            "zerostate_invariant_check_last_success_timestamp_seconds",
            "Unix time at which the checker last completed a run (pass or fail).", labels=["checker"])
        up = GaugeMetricFamily(
            "zerostate_invariant_check_up", "1 when the checker's latest run completed, 0 when it errored.",
            labels=["checker"])
        unacked = GaugeMetricFamily(
            "zerostate_invariant_violations_unacknowledged",
            "Current violations nobody acknowledged: what pages (zsmon ack).", labels=["checker", "invariant"])
        acked = GaugeMetricFamily(
            "zerostate_invariant_violations_acknowledged",
            "Current violations covered by an acknowledgement: visible, not paging.", labels=["checker", "invariant"])
        oldest = GaugeMetricFamily(
            "zerostate_invariant_oldest_unacknowledged_violation_timestamp_seconds",
            "Unix time the oldest unacknowledged violation of the invariant was first seen (age: time() - this).",
            labels=["checker", "invariant"])
        for name, state in sorted(self.store.states().items()):
            latest = state.latest
            if latest is None or (self.leads is not None and not self.leads(f"check:{name}")):
                continue
            up.add_metric([name], 0.0 if latest.status == "error" else 1.0)
            if state.last_success_timestamp is not None:
                last_success.add_metric([name], state.last_success_timestamp)
            # An errored run exports no counts: the series go stale rather than freeze.
            if latest.status != "error":
                for inv, count in sorted(latest.violation_counts.items()):
                    violations.add_metric([name, inv], float(count))
                for inv, count in sorted(latest.unacknowledged_counts.items()):
                    unacked.add_metric([name, inv], float(count))
                    acked.add_metric([name, inv], float(latest.acknowledged_counts.get(inv, 0)))
                for inv, first_seen in sorted(latest.oldest_unacknowledged.items()):
                    oldest.add_metric([name, inv], first_seen)
                for inv in sorted(latest.skipped):
                    skipped.add_metric([name, inv], 1.0)
        yield from (violations, unacked, acked, oldest, skipped, last_success, up)


class CachedFamilies:
    """The last families each exporter returned; swapped atomically per exporter."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._families: dict[str, list[Metric]] = {}

    def set(self, exporter: str, families: list[Metric]) -> None:
        with self._lock:
            self._families[exporter] = families

    def collect(self) -> Iterable[Metric]:
        with self._lock:
            snapshot = list(self._families.items())
        for _, families in sorted(snapshot, key=lambda kv: kv[0]):
            yield from families


class Metrics:
    def __init__(self, store: ResultStore, checker_names: Iterable[str] = (), job_names: Iterable[str] = (),
                 exporter_names: Iterable[str] = (), leads: Callable[[str], bool] | None = None,
                 invariants: Iterable[tuple[str, str]] = (),
                 valid_until: Callable[[], float] | None = None) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.check_runs = Counter("zerostate_invariant_check_runs", "Checker runs by outcome.",
                                  ["checker", "status"], registry=r)
        self.check_duration = Histogram("zerostate_invariant_check_duration_seconds", "Checker run duration.",
                                        ["checker"], buckets=DURATION_BUCKETS, registry=r)
        self.up = Gauge("zsmon_up", "1 while the zsmon process runs.", registry=r)
        self.database_up = Gauge("zsmon_database_up", "1 when the monitored PostgreSQL answers zsmon.", registry=r)
        self.redis_up = Gauge("zsmon_redis_up", "1 when zsmon's Redis answers (0 when down or not configured).",
                              registry=r)
        self.job_runs = Counter("zsmon_job_runs", "Scheduled job executions.", ["scheduler_job"], registry=r)
        self.job_errors = Counter("zsmon_job_errors", "Scheduled jobs that raised.", ["scheduler_job"], registry=r)
        self.job_skipped = Counter("zsmon_job_skipped", "Runs skipped because the previous one still ran.",
                                   ["scheduler_job"], registry=r)
        self.job_lag = Gauge("zsmon_job_lag_seconds", "Delay between a job's scheduled and actual start.",
                             ["scheduler_job"], registry=r)
        self.exporter_duration = Gauge("zsmon_exporter_duration_seconds", "Duration of the latest collection.",
                                        ["exporter"], registry=r)
        self.exporter_errors = Counter("zsmon_exporter_errors", "Collections that failed.", ["exporter"],
                                        registry=r)
        self.exporter_last_success = Gauge("zsmon_exporter_last_success_timestamp_seconds",
                                            "Unix time of the exporter's latest successful collection.",
                                            ["exporter"], registry=r)
        self.new_violations = Counter("zerostate_invariant_new_violations",
                                      "Violations first seen by a run (an entity that resolved and came back "
                                      "counts again).", ["checker", "invariant"], registry=r)
        build = Gauge("zsmon_build_info", "zsmon build information.", ["version", "python"], registry=r)
        build.labels(zsmon.__version__, platform.python_version()).set(1)
        self.up.set(1)
        for checker, invariant in invariants:  # at 0 from the start, so increase() sees the first one
            self.new_violations.labels(checker, invariant)
        for name in checker_names:
            for status in CHECK_STATUSES:
                self.check_runs.labels(name, status)
            self.check_duration.labels(name)
        for job in job_names:
            self.job_runs.labels(job)
            self.job_errors.labels(job)
            self.job_skipped.labels(job)
        for name in exporter_names:  # errors at 0 from the start, so rate() works before the first failure
            self.exporter_errors.labels(name)
        self.role_privileged: Gauge | None = None
        self._role_lock = threading.Lock()
        self._store = store
        self._rendered: tuple[int, dict[str, bytes]] = (-1, {})  # (store generation, body per content type)
        # HA: the monotonic time the first lease held at the last render lapses; past it, the cached bytes may
        # hold series this replica no longer leads (it was paused, say) and a scrape renders afresh.
        self._valid_until = valid_until
        self._rendered_until = math.inf
        # Told (generation, valid until, body per content type) after every render: the metrics process.
        self.on_render: Callable[[int, float, dict[str, bytes]], None] | None = None
        self.families = CachedFamilies()
        r.register(ResultsCollector(store, leads))
        r.register(self.families)

    def set_role_privileged(self, privileged: bool) -> None:
        """``zsmon_database_role_privileged``: exported once the role has been inspected (unknown before:
        no series rather than a reassuring 0)."""
        with self._role_lock:
            if self.role_privileged is None:
                self.role_privileged = Gauge(
                    "zsmon_database_role_privileged", "1 when zsmon's database role can do more than read "
                    "(superuser, server file or program roles, write privileges; the start-up log names what): "
                    "connect as the minimal role of docs/deployment.md.", registry=self.registry)
        self.role_privileged.set(1 if privileged else 0)

    def observe_result(self, result) -> None:
        self.check_runs.labels(result.checker, result.status).inc()
        self.check_duration.labels(result.checker).observe(result.duration_seconds)
        for inv, n in result.new_counts.items():
            self.new_violations.labels(result.checker, inv).inc(n)

    def refresh(self) -> None:
        """Render both exposition formats now, off the scrape path.

        Every metric changes inside a scheduler job or a published result, and both
        call this when they finish; a scrape then returns ready bytes.
        """
        generation = self._store.generation  # read first: a result stored meanwhile marks these bytes stale
        until = self._valid_until() if self._valid_until is not None else math.inf  # idem, before rendering
        rendered = {}
        for accept in _FORMATS:
            encoder, content_type = choose_encoder(accept)
            rendered[content_type] = encoder(self.registry)
        self._rendered = (generation, rendered)
        self._rendered_until = until
        if self.on_render is not None:
            self.on_render(generation, until, rendered)

    def exposition(self, accept: str | None) -> tuple[bytes, str]:
        encoder, content_type = choose_encoder(accept or "")
        generation, rendered = self._rendered
        cached = rendered.get(content_type)
        if time.monotonic() >= self._rendered_until:
            # A lease held when these bytes were rendered has lapsed since (nobody renewed it: the process
            # was paused, say): render now, never serving another replica's series as ours.
            self.refresh()
            return self._rendered[1][content_type], content_type
        if cached is None or generation != self._store.generation:
            # A result was stored after the last render (the job's refresh is a moment away): render
            # now, so /metrics never shows an older run than the API already does.
            return encoder(self.registry), content_type
        return cached, content_type
