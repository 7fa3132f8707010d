"""The read-only PostgreSQL pool.

Every session zsmon opens is read-only at two levels (``default_transaction_read_only``
and ``READ ONLY`` transactions), time-bounded (``statement_timeout``,
``lock_timeout``, ``idle_in_transaction_session_timeout``) and named
``application_name=zsmon`` so a DBA can see it. psycopg-pool reconnects with
exponential backoff after the database goes away. No error text built here
carries the password: we only ever show host, port, database and user.
"""
from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

import psycopg
from psycopg import IsolationLevel
from psycopg.conninfo import conninfo_to_dict, make_conninfo
from psycopg_pool import ConnectionPool, PoolTimeout

from zsmon.core.config import ConfigError, DatabaseConfig


class DatabaseUnavailable(Exception):
    """The database could not be reached or a query failed for reasons outside the checker."""


def _ms(seconds: float) -> int:
    return max(1, int(seconds * 1000))


def conninfo(cfg: DatabaseConfig) -> str:
    if cfg.url is not None:
        try:
            params = conninfo_to_dict(cfg.url.get_secret_value())
        except psycopg.ProgrammingError:
            raise ConfigError("database.url (ZSMON_DATABASE_URL): not a valid PostgreSQL DSN "
                              "(expected postgresql://USER@HOST:PORT/DBNAME or 'host=... dbname=...')") from None
    else:
        params = {"host": cfg.host, "port": cfg.port, "user": cfg.user, "dbname": cfg.name, "sslmode": cfg.sslmode}
        if cfg.password.get_secret_value():
            params["password"] = cfg.password.get_secret_value()
    options = " ".join([
        str(params.get("options") or ""),
        "-c default_transaction_read_only=on",
        f"-c statement_timeout={_ms(cfg.statement_timeout_seconds)}",
        f"-c lock_timeout={_ms(cfg.lock_timeout_seconds)}",
        f"-c idle_in_transaction_session_timeout={_ms(cfg.statement_timeout_seconds * 2)}",
    ]).strip()
    params.update(application_name="zsmon", connect_timeout=max(1, int(cfg.connect_timeout_seconds)), options=options)
    return make_conninfo(**params)


def describe(cfg: DatabaseConfig) -> str:
    """Where we connect, safe to log (never the password)."""
    if cfg.url is not None:
        try:
            p = conninfo_to_dict(cfg.url.get_secret_value())
        except psycopg.ProgrammingError:
            return "(invalid DSN)"
        return f"{p.get('user', '?')}@{p.get('host', 'localhost')}:{p.get('port', 5432)}/{p.get('dbname', '?')}"
    return f"{cfg.user}@{cfg.host}:{cfg.port}/{cfg.name}"


def _configure(conn: psycopg.Connection) -> None:
    # Every transaction a pooled connection runs is a REPEATABLE READ READ ONLY snapshot.
    conn.isolation_level = IsolationLevel.REPEATABLE_READ
    conn.read_only = True


class Database:
    def __init__(self, cfg: DatabaseConfig) -> None:
        self.cfg = cfg
        self.where = describe(cfg)
        self.pool = ConnectionPool(
            conninfo(cfg),
            min_size=1,
            max_size=cfg.max_connections,
            open=False,
            name="zsmon",
            timeout=cfg.connect_timeout_seconds,
            reconnect_timeout=0,  # never give up: keep retrying with backoff
            configure=_configure,
            check=ConnectionPool.check_connection,
            max_idle=300,
        )

    def open(self) -> None:
        self.pool.open(wait=False)

    def close(self) -> None:
        self.pool.close(timeout=2)

    @contextmanager
    def snapshot(self, statement_timeout_seconds: float | None = None) -> Iterator[psycopg.Connection]:
        """One REPEATABLE READ READ ONLY transaction; rolled back at the end (nothing to commit)."""
        try:
            with self.pool.connection(timeout=self.cfg.connect_timeout_seconds) as conn:
                with conn.transaction(force_rollback=True):
                    timeout = statement_timeout_seconds or self.cfg.statement_timeout_seconds
                    conn.execute("SELECT set_config('statement_timeout', %s, true)", (f"{_ms(timeout)}ms",))
                    yield conn
        except PoolTimeout:
            raise DatabaseUnavailable(f"database {self.where} unavailable: no connection within "
                                      f"{self.cfg.connect_timeout_seconds:g}s") from None

    def ping(self, timeout: float = 2.0) -> None:
        try:
            with self.pool.connection(timeout=timeout) as conn:
                conn.execute("SELECT 1")
        except PoolTimeout:
            raise DatabaseUnavailable(f"database {self.where} unavailable: no connection within {timeout:g}s") from None
        except psycopg.Error as exc:
            raise DatabaseUnavailable(f"database {self.where} unavailable: {explain(exc)}") from None


def explain(exc: BaseException) -> str:
    """A one-line reason for a database error, suitable for results, logs and the API."""
    if isinstance(exc, psycopg.errors.QueryCanceled):
        return "query cancelled: statement_timeout exceeded (raise checkers.<name>.statement_timeout_seconds or add an index)"
    if isinstance(exc, psycopg.errors.LockNotAvailable):
        return "lock_timeout exceeded waiting for a lock"
    if isinstance(exc, psycopg.errors.ReadOnlySqlTransaction):
        return "a statement tried to write in zsmon's read-only session (checkers must only read)"
    if isinstance(exc, psycopg.errors.InsufficientPrivilege):
        return f"permission denied: {str(exc).strip().splitlines()[0]} (see docs/deployment.md for the grants)"
    if isinstance(exc, psycopg.errors.UndefinedTable):
        return f"{str(exc).strip().splitlines()[0]} (is this the ZeroState database?)"
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    return f"{type(exc).__name__}: {text}"
