"""Token buckets per client: the HTTP rate limits and the budget of failed sign-in attempts.

A client is the connection's address; a forwarded header names it instead only when the
connection comes from one of ``http.trusted_proxies`` (uvicorn rewrites the address then),
so a client cannot pick a fresh identity per request by varying ``X-Forwarded-For``.
"""
from __future__ import annotations

import math
import threading
import time


class Buckets:
    """``per_minute`` tokens per client (the burst), refilled continuously; bounded memory."""

    MAX_CLIENTS = 10_000  # the least recently seen clients are forgotten

    def __init__(self, per_minute: int) -> None:
        self.capacity = float(per_minute)
        self.rate = per_minute / 60.0
        self._buckets: dict[str, tuple[float, float]] = {}  # client -> (tokens, monotonic time)
        self._lock = threading.Lock()

    def _level(self, client: str, now: float) -> float:
        tokens, then = self._buckets.pop(client, (self.capacity, now))
        return min(self.capacity, tokens + (now - then) * self.rate)

    def _store(self, client: str, tokens: float, now: float) -> None:
        self._buckets[client] = (tokens, now)  # re-inserted: dict order is recency order
        if len(self._buckets) > self.MAX_CLIENTS:
            del self._buckets[next(iter(self._buckets))]

    def take(self, client: str) -> float:
        """Spend one token: 0 when there was one, else the seconds until there will be (nothing spent)."""
        with self._lock:
            now = time.monotonic()
            tokens = self._level(client, now)
            wait = 0.0
            if tokens >= 1:
                tokens -= 1
            else:
                wait = (1 - tokens) / self.rate
            self._store(client, tokens, now)
            return wait

    def wait(self, client: str) -> float:
        """Like ``take`` without spending: 0 when a token is there."""
        with self._lock:
            now = time.monotonic()
            tokens = self._level(client, now)
            self._store(client, tokens, now)
            return 0.0 if tokens >= 1 else (1 - tokens) / self.rate


def retry_after(wait: float) -> str:
    """A ``Retry-After`` value (whole seconds, at least 1)."""
    return str(max(1, math.ceil(wait)))
