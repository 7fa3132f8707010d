"""The exporter framework: a collection that runs on the scheduler.

An exporter reads state (PostgreSQL, Redis, HTTP) on its own interval and
returns finished metric families; ``/metrics`` serves the last ones it
returned, so a scrape never waits on the database.
"""
from __future__ import annotations

from typing import Any, ClassVar, Iterable

import psycopg
from prometheus_client.core import Metric
from psycopg.rows import dict_row

from zsmon.core.yamlfile import Strict


class ExporterSettings(Strict):
    """Base for an exporter's own settings (``exporters.<name>.settings``)."""


class CollectContext:
    """What one collection sees. ``conn`` is a read-only connection or None (no database)."""

    def __init__(self, exporter: "Exporter", conn: psycopg.Connection | None, redis: Any, config: Any, log: Any) -> None:
        self.exporter = exporter
        self.conn = conn
        self.redis = redis
        self.config = config
        self.settings = exporter.settings
        self.log = log

    def query(self, sql: str, params: Any = None) -> list[dict[str, Any]]:
        if self.conn is None:
            raise RuntimeError("this exporter needs the database but none is available")
        with self.conn.cursor(row_factory=dict_row) as cur:
            cur.execute(sql, params)
            return cur.fetchall() if cur.description else []


class Exporter:
    """Base class: set ``name`` and implement ``collect``."""

    name: ClassVar[str]
    description: ClassVar[str] = ""
    Settings: ClassVar[type[ExporterSettings]] = ExporterSettings
    default_interval_seconds: ClassVar[float] = 15.0
    # Whether collect() needs a database connection (the runner lends one, read-only).
    needs_database: ClassVar[bool] = True

    def __init__(self, settings: ExporterSettings | None = None) -> None:
        self.settings = settings if settings is not None else self.Settings()

    def collect(self, ctx: CollectContext) -> Iterable[Metric]:  # pragma: no cover - abstract
        raise NotImplementedError

    def on_error(self, exc: BaseException) -> Iterable[Metric]:
        """Families to serve when collection failed (e.g. an ``up`` gauge at 0). Default: none."""
        return ()
