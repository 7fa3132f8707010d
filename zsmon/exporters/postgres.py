"""Exporter ``postgres``: the health of the monitored PostgreSQL.

Everything is read from the statistics views and catalog, never from the
platform's tables, inside the runner's one read-only transaction:

- ``pg_stat_activity``: client connections by state (cluster-wide, against
  ``max_connections``), the oldest open transaction and the oldest running query;
- ``pg_locks``: lock requests waiting;
- ``pg_stat_database`` of the current database: commits, rollbacks, deadlocks,
  cache hits and reads;
- on a replica (``pg_is_in_recovery()``): replication lag, also as
  ``zsmon_database_replication_lag_seconds`` (how far behind the primary zsmon's checks read);
- with ``pg_stat_statements`` installed: the top N statements by mean execution
  time, labelled by ``queryid`` (never by query text, which is unbounded and may
  carry literals).

An optional family that cannot be read (extension missing, not preloaded, no
privilege) is left out and logged once with the reason, not every interval. Its
query runs under a savepoint (``conn.transaction()`` nests; savepoints are
allowed in a read-only transaction) so a failure there cannot abort the rest.
"""
from __future__ import annotations

from typing import Iterable

import psycopg
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from psycopg import sql
from pydantic import Field

from zsmon.core.db import explain
from zsmon.core.exporter import CollectContext, Exporter, ExporterSettings

# pg_stat_activity.state values (PostgreSQL 10+); exported at 0 when absent so series never vanish.
# A NULL state (a backend of another role, read without pg_read_all_stats) is counted as "unknown".
CONNECTION_STATES = ("active", "idle", "idle in transaction", "idle in transaction (aborted)",
                     "fastpath function call", "disabled", "unknown")

_DATABASE_SQL = """
SELECT current_setting('max_connections')::int AS max_connections,
       pg_database_size(current_database()) AS size_bytes,
       pg_is_in_recovery() AS in_recovery,
       (SELECT count(*) FROM pg_locks WHERE NOT granted) AS locks_waiting,
       d.xact_commit, d.xact_rollback, d.deadlocks, d.blks_hit, d.blks_read
FROM pg_stat_database d
WHERE d.datname = current_database()
"""

_ACTIVITY_SQL = """
SELECT coalesce(state, 'unknown') AS state, count(*) AS n,
       max(extract(epoch FROM clock_timestamp() - xact_start))
           FILTER (WHERE xact_start IS NOT NULL AND pid <> pg_backend_pid()) AS longest_xact,
       max(extract(epoch FROM clock_timestamp() - query_start))
           FILTER (WHERE state = 'active' AND pid <> pg_backend_pid()) AS longest_query
FROM pg_stat_activity
WHERE backend_type = 'client backend'
GROUP BY 1
"""

# On a standby: how old the newest replayed commit is. Caught up (a WAL receiver streaming and everything it
# received replayed) means no lag, however long ago the primary last committed; a standby whose WAL receiver
# is gone is judged by its last replayed commit alone, so a broken stream shows as growing lag.
_REPLICATION_SQL = """
SELECT CASE WHEN EXISTS (SELECT 1 FROM pg_stat_wal_receiver)
             AND pg_last_wal_receive_lsn() IS NOT NULL
             AND pg_last_wal_receive_lsn() = pg_last_wal_replay_lsn() THEN 0
            ELSE greatest(0, coalesce(extract(epoch FROM clock_timestamp() - pg_last_xact_replay_timestamp()), 0))
       END AS lag_seconds
"""

_EXTENSION_SQL = """
SELECT n.nspname AS schema, e.extversion AS version,
       pg_has_role(current_user, 'pg_read_all_stats', 'USAGE') AS read_all_stats
FROM pg_extension e JOIN pg_namespace n ON n.oid = e.extnamespace
WHERE e.extname = 'pg_stat_statements'
"""

_STATEMENTS_SQL = """
SELECT s.queryid::text AS queryid, sum(s.calls) AS calls,
       sum(s.{total}) / nullif(sum(s.calls), 0) / 1000.0 AS mean_seconds
FROM {view} s
WHERE s.dbid = (SELECT oid FROM pg_database WHERE datname = current_database())
  AND s.queryid IS NOT NULL
GROUP BY s.queryid
HAVING sum(s.calls) >= %s
ORDER BY mean_seconds DESC NULLS LAST, s.queryid
LIMIT %s
"""


def _version(text: str) -> tuple[int, ...]:
    return tuple(int(p) for p in text.split(".") if p.isdigit())


class PostgresSettings(ExporterSettings):
    top_statements: int = Field(
        10, ge=0, le=100,
        description="How many statements of pg_stat_statements to export, the slowest by mean execution time "
                    "first (labelled by queryid, never by text). 0 turns the statement families off.")
    statement_min_calls: int = Field(
        1, ge=1,
        description="Only statements called at least this many times compete for the top list "
                    "(raise it to keep one-off maintenance statements out).")


class PostgresExporter(Exporter):
    name = "postgres"
    description = ("Health of the monitored PostgreSQL: connections by state, long transactions and queries, "
                   "waiting locks, size, cache hit ratio, commits/rollbacks/deadlocks, replication lag and the "
                   "slowest statements of pg_stat_statements.")
    Settings = PostgresSettings
    default_interval_seconds = 15.0
    needs_database = True

    def __init__(self, settings: PostgresSettings | None = None) -> None:
        super().__init__(settings)
        # family -> reason it is absent, so the reason is logged once, not every interval.
        self._absent: dict[str, str] = {}

    # ---- logging an absent family once -------------------------------------------
    def _absent_family(self, ctx: CollectContext, family: str, reason: str,
                       event: str = "exporter_family_absent") -> None:
        if self._absent.get(family) != reason:
            self._absent[family] = reason
            ctx.log.warning(event, exporter=self.name, family=family, reason=reason)

    def _present_family(self, ctx: CollectContext, family: str) -> None:
        if self._absent.pop(family, None) is not None:
            ctx.log.info("exporter_family_available", exporter=self.name, family=family)

    # ---- collection -------------------------------------------------------------
    def collect(self, ctx: CollectContext) -> Iterable[Metric]:
        out: list[Metric] = []
        [db] = ctx.query(_DATABASE_SQL)
        activity = ctx.query(_ACTIVITY_SQL)

        up = GaugeMetricFamily("zerostate_postgres_up", "1 when the monitored PostgreSQL answered the latest "
                                                         "collection, 0 when it did not.")
        up.add_metric([], 1.0)
        out.append(up)

        by_state = {state: 0 for state in CONNECTION_STATES}
        longest_xact = longest_query = 0.0
        for row in activity:
            by_state[row["state"]] = by_state.get(row["state"], 0) + int(row["n"])
            longest_xact = max(longest_xact, float(row["longest_xact"] or 0))
            longest_query = max(longest_query, float(row["longest_query"] or 0))
        conns = GaugeMetricFamily("zerostate_postgres_connections",
                                  "Client connections of the whole server by pg_stat_activity state.",
                                  labels=["state"])
        for state, n in by_state.items():
            conns.add_metric([state], float(n))
        out.append(conns)
        out.append(GaugeMetricFamily("zerostate_postgres_max_connections",
                                     "The server's max_connections setting.", value=float(db["max_connections"])))
        out.append(GaugeMetricFamily(
            "zerostate_postgres_longest_transaction_seconds",
            "Age of the oldest open transaction of any other client backend (0 when none).", value=longest_xact))
        out.append(GaugeMetricFamily(
            "zerostate_postgres_longest_query_seconds",
            "Run time of the longest running query of any other client backend (0 when none).",
            value=longest_query))
        out.append(GaugeMetricFamily("zerostate_postgres_locks_waiting", "Lock requests not yet granted.",
                                     value=float(db["locks_waiting"])))
        out.append(GaugeMetricFamily("zerostate_postgres_database_size_bytes", "Size of the monitored database.",
                                     value=float(db["size_bytes"])))
        hit, read = int(db["blks_hit"] or 0), int(db["blks_read"] or 0)
        out.append(GaugeMetricFamily(
            "zerostate_postgres_cache_hit_ratio",
            "Share of block reads served from shared buffers since the statistics reset (1 before any read). "
            "For a windowed ratio use the blocks_hit/blocks_read counters.",
            value=hit / (hit + read) if hit + read else 1.0))
        for metric, column, help_text in (
            ("zerostate_postgres_blocks_hit", "blks_hit", "Block reads served from shared buffers."),
            ("zerostate_postgres_blocks_read", "blks_read", "Block reads that went to the operating system."),
            ("zerostate_postgres_commits", "xact_commit", "Transactions committed in the monitored database."),
            ("zerostate_postgres_rollbacks", "xact_rollback", "Transactions rolled back in the monitored database."),
            ("zerostate_postgres_deadlocks", "deadlocks", "Deadlocks detected in the monitored database."),
        ):
            out.append(CounterMetricFamily(metric, help_text, value=float(db[column] or 0)))

        if db["in_recovery"]:  # absent on a primary: no series rather than a reassuring 0
            [lag] = ctx.query(_REPLICATION_SQL)
            seconds = float(lag["lag_seconds"] or 0)
            out.append(GaugeMetricFamily(
                "zerostate_postgres_replication_lag_seconds",
                "On a replica: time since the last replayed transaction, 0 when all received WAL is replayed.",
                value=seconds))
            # The same figure as zsmon's own: its checks read this standby, so they see the primary this late.
            out.append(GaugeMetricFamily(
                "zsmon_database_replication_lag_seconds",
                "zsmon reads a hot standby: how far behind the primary its checks read (now() minus the last "
                "replayed commit; 0 when all received WAL is replayed). Absent on a primary.",
                value=seconds))

        if self.settings.top_statements > 0:
            out.extend(self._statements(ctx))
        return out

    def _statements(self, ctx: CollectContext) -> list[Metric]:
        family = "statements"
        ext = ctx.query(_EXTENSION_SQL)
        if not ext:
            self._absent_family(ctx, family, "pg_stat_statements is not installed in this database "
                                             "(CREATE EXTENSION pg_stat_statements; it must also be in "
                                             "shared_preload_libraries)")
            return []
        info = ext[0]
        total = "total_exec_time" if _version(info["version"]) >= (1, 8) else "total_time"
        query = sql.SQL(_STATEMENTS_SQL).format(
            total=sql.Identifier(total), view=sql.Identifier(info["schema"], "pg_stat_statements"))
        assert ctx.conn is not None
        try:
            with ctx.conn.transaction():  # a savepoint: a failure here leaves the snapshot usable
                rows = ctx.query(query, (self.settings.statement_min_calls, self.settings.top_statements))
        except psycopg.Error as exc:
            self._absent_family(ctx, family, f"pg_stat_statements cannot be read: {explain(exc)}")
            return []
        if not info["read_all_stats"]:
            # Readable, but other roles' statements come back without a queryid: say so once.
            self._absent_family(ctx, "statements_of_other_roles",
                                "only this role's own statements are visible in pg_stat_statements "
                                "(GRANT pg_read_all_stats TO the zsmon role to see the platform's)",
                                event="exporter_family_partial")
        else:
            self._present_family(ctx, "statements_of_other_roles")
        self._present_family(ctx, family)
        mean = GaugeMetricFamily(
            "zerostate_postgres_statement_mean_seconds",
            f"Mean execution time of the top {self.settings.top_statements} statements by mean time "
            "(pg_stat_statements, current database).", labels=["queryid"])
        calls = CounterMetricFamily(
            "zerostate_postgres_statement_calls",
            "Calls of the statements in the top list by mean time (pg_stat_statements).", labels=["queryid"])
        for row in rows:
            mean.add_metric([row["queryid"]], float(row["mean_seconds"] or 0))
            calls.add_metric([row["queryid"]], float(row["calls"]))
        return [mean, calls]

    def on_error(self, exc: BaseException) -> Iterable[Metric]:
        up = GaugeMetricFamily("zerostate_postgres_up", "1 when the monitored PostgreSQL answered the latest "
                                                         "collection, 0 when it did not.")
        up.add_metric([], 0.0)
        return [up]
