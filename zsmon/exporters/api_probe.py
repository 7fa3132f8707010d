"""Exporter ``api_probe``: is the ZeroState API answering its health endpoints?

Each collection sends one GET to every configured URL, all in parallel, and
waits at most ``timeout_seconds`` in total: a target that has not answered by
then (refused, unresolvable, hanging, trickling) is ``up 0``. A target is up
when it answers 2xx or 3xx; redirects are not followed and the body is not
read. The ``target`` label is the configured URL without any user:password part,
so the label set is exactly the configured list.

Defaults follow the deployment guide: the API listens on 8080 and is the compose
service ``api``, with ``/health`` (liveness) and ``/ready`` (readiness). Set
``exporters.api_probe.settings.targets`` to where the API really is (in
Kubernetes, its Service, e.g. ``http://zerostate-api.NAMESPACE.svc:8080/health``).
"""
from __future__ import annotations

import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor, wait
from typing import Iterable
from urllib.parse import urlsplit, urlunsplit

import requests
from prometheus_client.core import GaugeMetricFamily, Metric
from pydantic import Field, field_validator

import zsmon
from zsmon.core.exporter import CollectContext, Exporter, ExporterSettings


def target_label(url: str) -> str:
    """The URL as a label value: credentials never become a label."""
    parts = urlsplit(url)
    if parts.username is None and parts.password is None:
        return url
    host = parts.hostname or ""
    if ":" in host:
        host = f"[{host}]"
    netloc = host + (f":{parts.port}" if parts.port else "")
    return urlunsplit((parts.scheme, netloc, parts.path, parts.query, parts.fragment))


class ApiProbeSettings(ExporterSettings):
    targets: list[str] = Field(
        default_factory=lambda: ["http://api:8080/health", "http://api:8080/ready"],
        max_length=50,
        description="URLs to probe with GET; each becomes one target label value. Default: the deployment "
                    "guide's API (compose service `api`, port 8080) /health and /ready.")
    timeout_seconds: float = Field(
        2.0, gt=0, le=60,
        description="Longest wait for a target's response headers, connection and name lookup included; "
                    "past it the target is down.")
    verify_tls: bool = Field(True, description="Verify the certificate of https targets.")

    @field_validator("targets")
    @classmethod
    def _urls(cls, targets: list[str]) -> list[str]:
        for url in targets:
            parts = urlsplit(url)
            if parts.scheme not in ("http", "https") or not parts.hostname:
                raise ValueError(f"{url!r} is not an http(s) URL with a host")
        if len({target_label(u) for u in targets}) != len(targets):
            raise ValueError("targets must be distinct")
        return targets


class _Outcome:
    __slots__ = ("status", "seconds", "error")

    def __init__(self, status: int, seconds: float, error: str | None) -> None:
        self.status, self.seconds, self.error = status, seconds, error


class ApiProbeExporter(Exporter):
    name = "api_probe"
    description = "Probes the ZeroState API's health URLs in parallel: up, latency and status code per target."
    Settings = ApiProbeSettings
    default_interval_seconds = 15.0
    needs_database = False

    def __init__(self, settings: ApiProbeSettings | None = None) -> None:
        super().__init__(settings)
        self._pool: ThreadPoolExecutor | None = None
        self._pool_lock = threading.Lock()
        self._headers = {"User-Agent": f"zsmon/{zsmon.__version__} api_probe"}
        self._down: dict[str, str] = {}

    def _executor(self) -> ThreadPoolExecutor:
        with self._pool_lock:
            if self._pool is None:
                # One worker per target, so no probe queues behind a hanging one.
                self._pool = ThreadPoolExecutor(max_workers=max(1, len(self.settings.targets)),
                                                thread_name_prefix="zsmon-api-probe")
            return self._pool

    def _probe(self, url: str) -> _Outcome:
        timeout = self.settings.timeout_seconds
        t0 = time.perf_counter()
        try:
            with requests.get(url, timeout=(timeout, timeout), stream=True, allow_redirects=False,
                              verify=self.settings.verify_tls, headers=self._headers) as response:
                return _Outcome(response.status_code, time.perf_counter() - t0, None)
        except requests.Timeout:  # connect or read: one reason, so a flapping cause does not log twice
            return _Outcome(0, time.perf_counter() - t0, "Timeout")
        except requests.RequestException as exc:
            return _Outcome(0, time.perf_counter() - t0, type(exc).__name__)

    def collect(self, ctx: CollectContext) -> Iterable[Metric]:
        targets = self.settings.targets
        timeout = self.settings.timeout_seconds
        t0 = time.perf_counter()
        pool = self._executor()
        futures: dict[str, Future[_Outcome]] = {url: pool.submit(self._probe, url) for url in targets}
        wait(futures.values(), timeout=timeout)
        up = GaugeMetricFamily("zerostate_api_up", "1 when the target answered 2xx/3xx within the timeout.",
                               labels=["target"])
        duration = GaugeMetricFamily("zerostate_api_probe_duration_seconds",
                                     "Time to the target's response headers (the timeout when it did not answer).",
                                     labels=["target"])
        status = GaugeMetricFamily("zerostate_api_probe_status_code",
                                   "HTTP status code of the latest probe, 0 when there was no response.",
                                   labels=["target"])
        for url, future in futures.items():
            if future.done():
                outcome = future.result()
            else:
                # Still running past the deadline: down now; the worker ends at its own socket timeout.
                outcome = _Outcome(0, max(timeout, time.perf_counter() - t0), "Timeout")
            label = target_label(url)
            ok = outcome.error is None and 200 <= outcome.status < 400
            up.add_metric([label], 1.0 if ok else 0.0)
            duration.add_metric([label], min(outcome.seconds, timeout) if not ok else outcome.seconds)
            status.add_metric([label], float(outcome.status))
            self._log_change(ctx, label, None if ok else (outcome.error or f"HTTP {outcome.status}"))
        return [up, duration, status]

    def _log_change(self, ctx: CollectContext, label: str, problem: str | None) -> None:
        """One line when a target goes down (or changes why), one when it comes back: not one per probe."""
        before = self._down.get(label)
        if problem == before:
            return
        if problem is None:
            self._down.pop(label, None)
            ctx.log.info("api_target_up", exporter=self.name, target=label)
        else:
            self._down[label] = problem
            ctx.log.warning("api_target_down", exporter=self.name, target=label, reason=problem)

    def on_error(self, exc: BaseException) -> Iterable[Metric]:
        up = GaugeMetricFamily("zerostate_api_up", "1 when the target answered 2xx/3xx within the timeout.",
                               labels=["target"])
        for url in self.settings.targets:
            up.add_metric([target_label(url)], 0.0)
        return [up]
