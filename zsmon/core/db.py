"""The read-only PostgreSQL pool.

Every session zsmon opens is read-only at two levels (``default_transaction_read_only``
and ``READ ONLY`` transactions), time-bounded (``statement_timeout``,
``lock_timeout``, ``idle_in_transaction_session_timeout``) and named
``application_name=zsmon`` so a DBA can see it. psycopg-pool reconnects with
exponential backoff after the database goes away. No error text built here
carries the password: we only ever show host, port, database and user.

A server that is paused (SIGSTOP, a frozen VM) or cut off by a partition that
drops packets still accepts TCP and acknowledges data, so neither
``statement_timeout`` (server side) nor TCP keepalives ever fire. Every
round trip on a zsmon connection is therefore also bounded on the client: a
wait longer than the statement timeout plus ``connect_timeout`` drops the
connection and raises ``DatabaseUnresponsive`` (the run is ``error``; the pool
opens a fresh connection once the server answers again).
"""
from __future__ import annotations

from contextlib import contextmanager, suppress
from typing import Any, Iterator

import psycopg
from psycopg import IsolationLevel
from psycopg.conninfo import conninfo_to_dict, make_conninfo
from psycopg_pool import ConnectionPool, PoolTimeout

from zsmon.core.config import ConfigError, DatabaseConfig


class DatabaseUnavailable(Exception):
    """The database could not be reached or a query failed for reasons outside the checker."""


class DatabaseUnresponsive(psycopg.OperationalError):
    """The server did not answer a round trip in time; the connection was dropped."""


class BoundedConnection(psycopg.Connection):
    """A connection whose every wait on the server is bounded by ``op_timeout`` seconds (client side)."""

    op_timeout: float | None = None

    def wait(self, gen: Any, interval: float = 0.1, timeout: float | None = None) -> Any:
        if timeout is not None or not self.op_timeout:
            return super().wait(gen, interval=interval, timeout=timeout)
        try:
            return super().wait(gen, interval=interval, timeout=self.op_timeout)
        except psycopg.errors._WaitTimeout:  # noqa: SLF001 - psycopg's own signal for an expired wait
            # The protocol state is unknown now: the connection cannot be reused.
            with suppress(Exception):
                self.pgconn.finish()
            raise DatabaseUnresponsive(f"no answer from the database within {self.op_timeout:g}s "
                                       "(server paused, overloaded or unreachable)") from None


class SingleStatementCursor(psycopg.Cursor):
    """Every query goes through the extended protocol, which refuses a string of several statements.

    psycopg sends parameterless queries with the simple protocol, where
    ``SELECT 1; COMMIT; BEGIN READ WRITE; INSERT ...`` would end zsmon's read-only
    transaction and write; a declared query spliced into a wrapper could do just that.
    (``_execute_send`` is psycopg's own switch between the two protocols.)
    """

    def _execute_send(self, query: Any, *, force_extended: bool = False, binary: bool | None = None) -> None:
        super()._execute_send(query, force_extended=True, binary=binary)


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
    conn.cursor_factory = SingleStatementCursor


@contextmanager
def _bounded(conn: Any, seconds: float) -> Iterator[None]:
    """Bound every round trip on ``conn`` by ``seconds`` for the duration of the block."""
    before = getattr(conn, "op_timeout", None)
    conn.op_timeout = seconds
    try:
        yield
    finally:
        conn.op_timeout = before


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
            # No background backoff that could outlast an outage by minutes: a failed reconnect is
            # retried once, then the next request (every run, every health probe) opens a new attempt,
            # so zsmon reconnects within one interval of the database coming back.
            reconnect_timeout=0,
            configure=self._configure,
            check=self._check,
            connection_class=BoundedConnection,
            max_idle=300,
        )

    def _configure(self, conn: psycopg.Connection) -> None:
        _configure(conn)
        # Round trips outside a snapshot (pool check, rollback on return) get the connect timeout.
        conn.op_timeout = self.cfg.connect_timeout_seconds  # type: ignore[attr-defined]

    def _check(self, conn: psycopg.Connection) -> None:
        # A pooled connection to a paused server would hang its check forever: bound it.
        with _bounded(conn, self.cfg.connect_timeout_seconds):
            ConnectionPool.check_connection(conn)

    def open(self) -> None:
        self.pool.open(wait=False)

    def close(self) -> None:
        self.pool.close(timeout=2)

    @contextmanager
    def snapshot(self, statement_timeout_seconds: float | None = None) -> Iterator[psycopg.Connection]:
        """One REPEATABLE READ READ ONLY transaction; rolled back at the end (nothing to commit)."""
        timeout = statement_timeout_seconds or self.cfg.statement_timeout_seconds
        try:
            with self.pool.connection(timeout=self.cfg.connect_timeout_seconds) as conn:
                # The server cancels a statement at statement_timeout; if it does not answer by then
                # plus connect_timeout, it is not answering at all.
                with _bounded(conn, timeout + self.cfg.connect_timeout_seconds):
                    with conn.transaction(force_rollback=True):
                        conn.execute("SELECT set_config('statement_timeout', %s, true)", (f"{_ms(timeout)}ms",))
                        yield conn
        except PoolTimeout:
            raise DatabaseUnavailable(f"database {self.where} unavailable: no connection within "
                                      f"{self.cfg.connect_timeout_seconds:g}s") from None

    def identity(self, timeout: float = 5.0) -> tuple[str, str]:
        """(system identifier, database name): who this database is, whatever address reaches it."""
        try:
            with self.pool.connection(timeout=timeout) as conn, _bounded(conn, timeout):
                row = conn.execute("SELECT system_identifier::text, current_database() FROM pg_control_system()"
                                   ).fetchone()
        except PoolTimeout:
            raise DatabaseUnavailable(f"database {self.where} unavailable: no connection within {timeout:g}s") from None
        except psycopg.Error as exc:
            raise DatabaseUnavailable(f"database {self.where} unavailable: {explain(exc)}") from None
        return str(row[0]), str(row[1])

    def ping(self, timeout: float = 2.0) -> None:
        try:
            with self.pool.connection(timeout=timeout) as conn, _bounded(conn, timeout):
                conn.execute("SELECT 1")
        except PoolTimeout:
            raise DatabaseUnavailable(f"database {self.where} unavailable: no connection within {timeout:g}s") from None
        except psycopg.Error as exc:
            raise DatabaseUnavailable(f"database {self.where} unavailable: {explain(exc)}") from None


def explain(exc: BaseException) -> str:
    """A one-line reason for a database error, suitable for results, logs and the API."""
    if isinstance(exc, DatabaseUnresponsive):
        return str(exc)
    if isinstance(exc, psycopg.errors.AdminShutdown):
        return "connection terminated by the server mid-query (pg_terminate_backend, restart or shutdown)"
    if isinstance(exc, psycopg.errors.QueryCanceled):
        return "query cancelled: statement_timeout exceeded (raise checkers.<name>.statement_timeout_seconds or add an index)"
    if isinstance(exc, psycopg.errors.LockNotAvailable):
        return "lock_timeout exceeded waiting for a lock"
    if "cannot insert multiple commands into a prepared statement" in str(exc):
        return ("a query held several statements: zsmon runs one statement per query, so SQL cannot end its "
                "read-only transaction")
    if isinstance(exc, psycopg.errors.ReadOnlySqlTransaction):
        return "a statement tried to write in zsmon's read-only session (checkers must only read)"
    if isinstance(exc, psycopg.errors.InsufficientPrivilege):
        return f"permission denied: {str(exc).strip().splitlines()[0]} (see docs/deployment.md for the grants)"
    if isinstance(exc, psycopg.errors.UndefinedTable):
        return f"{str(exc).strip().splitlines()[0]} (is this the ZeroState database?)"
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    return f"{type(exc).__name__}: {text}"
