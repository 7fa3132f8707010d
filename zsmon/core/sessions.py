"""Status-page sessions: random ids with a server-side expiry, revoked at sign-out.

A session id is 32 random bytes (``secrets.token_urlsafe``), unrelated to the admin
token: a leaked cookie says nothing about the token and stops working at sign-out or
expiry. The store keeps only the SHA-256 of each id, so whoever reads the store (Redis,
a memory dump) cannot sign in with what it finds.

Where sessions live: in Redis under the deployment's prefix (``<prefix>session:<sha256>``,
with a TTL) when Redis is configured and the deployment is known, so every replica
behind one Service honours a sign-in made on another and a sign-out revokes everywhere;
otherwise (no Redis, Redis down, the database not yet asked who it is) in this
process's memory. A session created in memory stays valid on this replica only.
"""
from __future__ import annotations

import hashlib
import secrets
import threading
import time
from collections.abc import Callable
from typing import Any

from zsmon.core.logging import get_logger

log = get_logger("zsmon.sessions")

MAX_LOCAL = 10_000  # bounded memory: the oldest sessions are dropped first


def _digest(session_id: str) -> str:
    return hashlib.sha256(session_id.encode("utf-8", "replace")).hexdigest()


class SessionStore:
    """Create, check and revoke sessions. ``redis`` and ``prefix`` are read at every call (both may change)."""

    def __init__(self, ttl_seconds: float, redis: Callable[[], Any] = lambda: None,
                 prefix: Callable[[], str | None] = lambda: None) -> None:
        self.ttl = ttl_seconds
        self._redis, self._prefix = redis, prefix
        self._local: dict[str, float] = {}  # digest -> expiry (time.time())
        self._lock = threading.Lock()

    def _key(self, digest: str) -> tuple[Any, str] | None:
        client, prefix = self._redis(), self._prefix()
        if client is None or prefix is None:
            return None
        return client, f"{prefix}session:{digest}"

    def create(self) -> str:
        """A new session id, valid for ``ttl_seconds``."""
        session_id = secrets.token_urlsafe(32)
        digest = _digest(session_id)
        where = self._key(digest)
        if where is not None:
            client, key = where
            try:
                client.set(key, "1", px=max(1, int(self.ttl * 1000)))
                return session_id
            except Exception as exc:  # noqa: BLE001 - Redis down: this replica still signs in
                log.warning("session_store_degraded", error=f"{type(exc).__name__}: {exc}",
                            detail="session kept in this replica's memory only")
        with self._lock:
            self._expire()
            self._local[digest] = time.time() + self.ttl
            while len(self._local) > MAX_LOCAL:
                del self._local[next(iter(self._local))]
        return session_id

    def valid(self, session_id: str | None) -> bool:
        if not session_id or len(session_id) > 200:
            return False
        digest = _digest(session_id)
        with self._lock:
            expiry = self._local.get(digest)
            if expiry is not None:
                if expiry > time.time():
                    return True
                del self._local[digest]
        where = self._key(digest)
        if where is None:
            return False
        client, key = where
        try:
            return bool(client.exists(key))
        except Exception:  # noqa: BLE001 - Redis down: sessions kept there cannot be checked; signed out
            return False

    def revoke(self, session_id: str | None) -> None:
        if not session_id or len(session_id) > 200:
            return
        digest = _digest(session_id)
        with self._lock:
            self._local.pop(digest, None)
        where = self._key(digest)
        if where is not None:
            client, key = where
            try:
                client.delete(key)
            except Exception as exc:  # noqa: BLE001
                log.warning("session_revoke_failed", error=f"{type(exc).__name__}: {exc}",
                            detail="the session expires at its end of life instead")

    def _expire(self) -> None:
        now = time.time()
        for digest in [d for d, expiry in self._local.items() if expiry <= now]:
            del self._local[digest]
