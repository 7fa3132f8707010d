"""Exporter ``redis``: the health of the platform's Redis.

zsmon uses the same Redis as the platform (``redis.*`` in the config, the
platform's ``REDIS_HOST``/``REDIS_PORT``), so this exporter watches it through
zsmon's own client: up, ping latency, memory against ``maxmemory``, clients,
evictions, keyspace hits and misses, and the number of rate-limiter keys.

When Redis is unreachable the collection fails and only ``zerostate_redis_up 0``
is served. The rate-limiter count is a bounded ``SCAN`` (a cap on keys counted
and on time spent): on a huge keyspace it reports a lower bound and says so in
``zerostate_redis_ratelimit_keys_truncated``, it never blocks Redis with ``KEYS``.
"""
from __future__ import annotations

import re
import time
from typing import Iterable

import redis
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from pydantic import Field

from zsmon.core.exporter import CollectContext, Exporter, ExporterSettings

_GLOB_SPECIAL = re.compile(r"([*?\[\]\\])")


class RedisSettings(ExporterSettings):
    ratelimit_prefix: str = Field(
        "ratelimit:", min_length=1,
        description="Key prefix of the platform's rate limiter; keys starting with it are counted "
                    "(glob characters in it are matched literally).")
    ratelimit_max_keys: int = Field(
        100_000, ge=1,
        description="Stop counting rate-limiter keys at this many; the count is then a lower bound and "
                    "zerostate_redis_ratelimit_keys_truncated is 1.")
    ratelimit_scan_count: int = Field(
        1000, ge=1, le=100_000,
        description="COUNT hint of each SCAN call (keys Redis examines per call).")
    ratelimit_scan_timeout_seconds: float = Field(
        1.0, gt=0,
        description="Longest time one collection spends scanning for rate-limiter keys; past it the count "
                    "is a lower bound and zerostate_redis_ratelimit_keys_truncated is 1.")


def _up(value: float) -> GaugeMetricFamily:
    return GaugeMetricFamily("zerostate_redis_up", "1 when the platform's Redis answered the latest collection.",
                             value=value)


class RedisExporter(Exporter):
    name = "redis"
    description = ("Health of the platform's Redis (the one in zsmon's redis config): ping latency, memory, "
                   "clients, evictions, keyspace hits/misses and the rate limiter's key count.")
    Settings = RedisSettings
    default_interval_seconds = 15.0
    needs_database = False

    def __init__(self, settings: RedisSettings | None = None) -> None:
        super().__init__(settings)
        self._disabled_logged = False

    def collect(self, ctx: CollectContext) -> Iterable[Metric]:
        client = ctx.redis
        if client is None:
            if not self._disabled_logged:
                self._disabled_logged = True
                ctx.log.warning("exporter_family_absent", exporter=self.name, family="redis",
                                reason="Redis is not configured (redis.enabled is false or REDIS_HOST is empty): "
                                       "zerostate_redis_up stays 0; disable exporters.redis to drop it")
            return [_up(0.0)]
        t0 = time.perf_counter()
        client.ping()
        ping_seconds = time.perf_counter() - t0
        info = client.info()
        keys, truncated = self._count_ratelimit_keys(client)

        s = self.settings
        return [
            _up(1.0),
            GaugeMetricFamily("zerostate_redis_ping_seconds", "Round trip of a PING from zsmon.", value=ping_seconds),
            GaugeMetricFamily("zerostate_redis_memory_used_bytes", "Memory Redis has allocated (used_memory).",
                              value=float(info.get("used_memory", 0))),
            GaugeMetricFamily("zerostate_redis_memory_max_bytes",
                              "The maxmemory limit (0 means no limit).", value=float(info.get("maxmemory", 0))),
            GaugeMetricFamily("zerostate_redis_connected_clients", "Client connections.",
                              value=float(info.get("connected_clients", 0))),
            CounterMetricFamily("zerostate_redis_evicted_keys", "Keys evicted because of maxmemory.",
                                value=float(info.get("evicted_keys", 0))),
            CounterMetricFamily("zerostate_redis_keyspace_hits", "Successful key lookups.",
                                value=float(info.get("keyspace_hits", 0))),
            CounterMetricFamily("zerostate_redis_keyspace_misses", "Failed key lookups.",
                                value=float(info.get("keyspace_misses", 0))),
            GaugeMetricFamily("zerostate_redis_ratelimit_keys",
                              f"Keys of the platform's rate limiter (prefix {s.ratelimit_prefix!r}), by a bounded "
                              "SCAN.", value=float(keys)),
            GaugeMetricFamily("zerostate_redis_ratelimit_keys_truncated",
                              "1 when the rate-limiter key count stopped at its key or time cap (a lower bound).",
                              value=1.0 if truncated else 0.0),
        ]

    def _count_ratelimit_keys(self, client: redis.Redis) -> tuple[int, bool]:
        s = self.settings
        pattern = _GLOB_SPECIAL.sub(r"\\\1", s.ratelimit_prefix) + "*"
        deadline = time.monotonic() + s.ratelimit_scan_timeout_seconds
        cursor, count = 0, 0
        while True:
            cursor, keys = client.scan(cursor=cursor, match=pattern, count=s.ratelimit_scan_count)
            count += len(keys)
            if cursor == 0:
                return min(count, s.ratelimit_max_keys), count > s.ratelimit_max_keys
            if count >= s.ratelimit_max_keys or time.monotonic() >= deadline:
                return min(count, s.ratelimit_max_keys), True

    def on_error(self, exc: BaseException) -> Iterable[Metric]:
        return [_up(0.0)]
