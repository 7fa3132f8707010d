"""APScheduler jobs: one per checker, one per exporter, one health probe.

Every job has ``max_instances=1`` and ``coalesce``: a slow run is never stacked
on itself, missed runs collapse into one. Jitter spreads replicas and jobs.
Overlaps and errors are counted by listeners, not logged once per tick.
"""
from __future__ import annotations

import random
import time
from datetime import datetime, timedelta, timezone
from typing import Any, Callable

from apscheduler.events import (EVENT_JOB_ERROR, EVENT_JOB_EXECUTED, EVENT_JOB_MAX_INSTANCES,
                                EVENT_JOB_SUBMITTED, JobExecutionEvent, JobSubmissionEvent)
from apscheduler.executors.pool import ThreadPoolExecutor
from apscheduler.schedulers.background import BackgroundScheduler
from apscheduler.triggers.interval import IntervalTrigger

from zsmon.core.logging import get_logger

log = get_logger("zsmon.scheduler")


class Scheduler:
    def __init__(self, max_workers: int, jitter_ratio: float, misfire_grace_seconds: float, metrics: Any = None) -> None:
        self.metrics = metrics
        self.jitter_ratio = jitter_ratio
        self._sched = BackgroundScheduler(
            executors={"default": ThreadPoolExecutor(max_workers), "health": ThreadPoolExecutor(1)},
            job_defaults={"coalesce": True, "max_instances": 1, "misfire_grace_time": int(misfire_grace_seconds)},
            timezone=timezone.utc,
        )
        self._sched.add_listener(self._on_event, EVENT_JOB_SUBMITTED | EVENT_JOB_EXECUTED | EVENT_JOB_ERROR
                                 | EVENT_JOB_MAX_INSTANCES)
        self.intervals: dict[str, float] = {}
        self._running: set[str] = set()

    def add(self, job_id: str, fn: Callable[[], Any], interval_seconds: float, *, executor: str = "default",
            first_run_delay: float = 0.0) -> None:
        jitter = interval_seconds * self.jitter_ratio
        self.intervals[job_id] = interval_seconds
        self._sched.add_job(
            fn, IntervalTrigger(seconds=interval_seconds, jitter=jitter or None), id=job_id, name=job_id,
            executor=executor, next_run_time=datetime.now(timezone.utc) + timedelta(seconds=first_run_delay),
        )

    def _on_event(self, event: Any) -> None:
        if event.code == EVENT_JOB_SUBMITTED:
            self._running.add(event.job_id)
        elif event.code in (EVENT_JOB_EXECUTED, EVENT_JOB_ERROR):
            self._running.discard(event.job_id)
        m = self.metrics
        if m is None:
            return
        job = event.job_id
        if event.code == EVENT_JOB_SUBMITTED and isinstance(event, JobSubmissionEvent):
            if event.scheduled_run_times:
                lag = time.time() - event.scheduled_run_times[-1].timestamp()
                m.job_lag.labels(job).set(max(0.0, lag))
        elif event.code == EVENT_JOB_EXECUTED:
            m.job_runs.labels(job).inc()
        elif event.code == EVENT_JOB_ERROR and isinstance(event, JobExecutionEvent):
            m.job_runs.labels(job).inc()
            m.job_errors.labels(job).inc()
            log.error("job_failed", job=job, error=f"{type(event.exception).__name__}: {event.exception}")
        elif event.code == EVENT_JOB_MAX_INSTANCES:
            m.job_skipped.labels(job).inc()
        if event.code != EVENT_JOB_SUBMITTED:
            m.refresh()  # a job changed metrics: render /metrics now, not on the next scrape

    def run_now(self, job_id: str, within_seconds: float = 0.0) -> None:
        """Bring a job's next run forward to now, or to a random moment within ``within_seconds`` (spreads
        many jobs brought forward at once, e.g. every checker after a database outage)."""
        if job_id in self._running:  # it is running now: a second run would only be skipped
            return
        if self._sched.running and self._sched.get_job(job_id) is not None:
            when = datetime.now(timezone.utc) + timedelta(seconds=random.uniform(0, within_seconds))
            self._sched.modify_job(job_id, next_run_time=when)

    @property
    def running(self) -> bool:
        return bool(self._sched.running)

    def start(self) -> None:
        self._sched.start()

    def shutdown(self) -> None:
        if self._sched.running:
            self._sched.shutdown(wait=False)
