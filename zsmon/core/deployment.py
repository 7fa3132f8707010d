"""The deployment identity: which monitored database zsmon's memory in Redis belongs to.

Every Redis key zsmon writes (memory across runs, watermarks, the violations' lifecycle and
acknowledgements, HA leases, fencing tokens and shared results) lives under
``<redis.key_prefix><deployment>:``. The deployment is the monitored cluster's system identifier
plus the database name, read from the database itself, so two databases (a staging copy, a restore
into a new cluster, a second zsmon pointed elsewhere) never read or judge against each other's
memory, and two deployments sharing one Redis never contend for one lease; replicas of one
deployment share everything. The ``deployment`` setting names it instead, for a name that must
survive a change of cluster (a major-version upgrade builds a new cluster with a new identifier).
"""
from __future__ import annotations

import re
import threading
import time

from zsmon.core.config import Config
from zsmon.core.db import Database, DatabaseUnavailable
from zsmon.core.logging import get_logger

log = get_logger("zsmon.deployment")

_UNSAFE = re.compile(r"[^A-Za-z0-9_.-]")
RETRY_SECONDS = 2.0


def identity_of(system_identifier: str, database: str) -> str:
    """``<system identifier>-<database>``, the database name reduced to characters safe in a key."""
    return f"{system_identifier}-{_UNSAFE.sub('_', database)}"


class Deployment:
    """Resolves, once, the prefix of every Redis key of this deployment."""

    def __init__(self, config: Config, db: Database) -> None:
        self.config = config
        self.db = db
        self._lock = threading.Lock()
        self._retry_at = 0.0
        self.name: str | None = config.deployment
        self.source = "the deployment setting" if config.deployment else None
        if self.name is not None:
            self._announce()

    @property
    def prefix(self) -> str | None:
        """``<redis.key_prefix><deployment>:``, or None while the database has not told who it is."""
        return None if self.name is None else f"{self.config.redis.key_prefix}{self.name}:"

    def resolve(self) -> str | None:
        """The prefix, asking the database on first use; None while it does not answer.

        One caller asks at a time and a failed answer is not asked again for ``RETRY_SECONDS``: while the
        database is down, runs and probes do not queue behind identity lookups."""
        if self.name is not None:
            return self.prefix
        if not self._lock.acquire(blocking=False):
            return None  # another thread is asking now
        try:
            if self.name is None and time.monotonic() >= self._retry_at:
                try:
                    sysid, database = self.db.identity(timeout=min(2.0, self.config.database.connect_timeout_seconds))
                except DatabaseUnavailable:
                    self._retry_at = time.monotonic() + RETRY_SECONDS
                    return None
                self.name, self.source = identity_of(sysid, database), "the monitored database"
                self._announce()
        finally:
            self._lock.release()
        return self.prefix

    def _announce(self) -> None:
        # Debug here: the command line asks often; the service says it once at info when it learns it.
        log.debug("deployment_identity", deployment=self.name, key_prefix=self.prefix, source=self.source,
                 detail="memory, acknowledgements and HA leases in Redis belong to this deployment only")


def prefix_of(config: Config) -> str | None:
    """The deployment's prefix for a one-off command (zsmon ack, reset-memory): one short-lived pool."""
    if config.deployment:
        return f"{config.redis.key_prefix}{config.deployment}:"
    db = Database(config.database)
    db.open()
    try:
        return Deployment(config, db).resolve()
    finally:
        db.close()
