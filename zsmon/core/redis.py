"""The optional Redis client: memory across runs, watermarks, HA leases.

Redis is optional: when it is disabled or unreachable zsmon keeps running and
the invariants that need memory report ``skipped`` with the reason.
"""
from __future__ import annotations

from typing import Any

import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from zsmon.core.config import RedisConfig


def make_redis(cfg: RedisConfig) -> redis.Redis | None:
    if not cfg.enabled:
        return None
    return redis.Redis(
        host=cfg.host,
        port=cfg.port,
        db=cfg.db,
        password=cfg.password.get_secret_value() if cfg.password else None,
        ssl=cfg.tls,
        socket_timeout=cfg.socket_timeout_seconds,
        socket_connect_timeout=cfg.socket_timeout_seconds,
        health_check_interval=30,
        # redis-py's default (10 retries, exponential backoff) turns a Redis outage into ~10 s stalls of
        # every run; one immediate retry covers a stale pooled socket, then the run goes on without Redis.
        retry=Retry(NoBackoff(), 1),
        decode_responses=True,
    )


def redis_error(exc: BaseException) -> str:
    # redis-py messages name host and port, never the password.
    return f"Redis unreachable: {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}".rstrip(": ")


def ping(client: Any) -> str | None:
    """None when Redis answers, otherwise the reason it does not."""
    if client is None:
        return "Redis is not configured (redis.enabled is false or REDIS_HOST is empty)"
    try:
        client.ping()
        return None
    except redis.RedisError as exc:
        return redis_error(exc)
