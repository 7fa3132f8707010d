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
opens a fresh connection once the server answers again). Before it is dropped, the
query is cancelled on the server (a cancel request on a side connection), which would
otherwise keep running it.

A run leaves nothing on its pooled connection: the pool's reset runs ``DISCARD ALL``
when the connection comes back (advisory locks, session settings, prepared statements).

A long pass may be split over helper connections that share the run's snapshot
(``Database.shared_snapshot``): the run's transaction exports it
(``pg_export_snapshot()``), each helper is a short-lived connection with the same
read-only, time-bounded session settings whose ``REPEATABLE READ READ ONLY``
transaction imports it (``SET TRANSACTION SNAPSHOT``) before any query. Helpers are
cancelled and closed when the pass ends or fails, and a shutdown cancels them too.
"""
from __future__ import annotations

import re
import threading
from contextlib import contextmanager, suppress
from typing import Any, Iterator

import psycopg
from psycopg import IsolationLevel
from psycopg import sql as pgsql
from psycopg.conninfo import conninfo_to_dict, make_conninfo
from psycopg_pool import ConnectionPool, PoolTimeout

from zsmon.core.config import ConfigError, DatabaseConfig
from zsmon.core.logging import REDACTED, redactor
from zsmon.core.privileges import RoleReport, read_role


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
            # Dropping the socket alone leaves the query running in its backend: cancel it on the server
            # first (a cancel request on a side connection; bounded, as the server may not answer at all).
            cancel_on_server(self, min(1.0, self.op_timeout))
            # The protocol state is unknown now: the connection cannot be reused.
            with suppress(Exception):
                self.pgconn.finish()
            raise DatabaseUnresponsive(f"no answer from the database within {self.op_timeout:g}s "
                                       "(server paused, overloaded or unreachable)") from None


def cancel_on_server(conn: psycopg.Connection, timeout: float) -> bool:
    """Ask the server to cancel the statement running on ``conn``; False when that could not be sent in
    ``timeout`` seconds (server paused or unreachable)."""
    try:
        conn.cancel_safe(timeout=timeout)
    except Exception:  # noqa: BLE001 - best effort: the caller drops the connection either way
        return False
    return True


class SharedSnapshot:
    """The run's connection and the helper connections that imported its snapshot."""

    def __init__(self, conn: psycopg.Connection, helpers: list[psycopg.Connection]) -> None:
        self.conn = conn
        self.helpers = helpers

    def cancel(self) -> None:
        """Cancel on the server whatever the run's connection and the helpers are running now."""
        for c in [self.conn, *self.helpers]:
            if c.pgconn.transaction_status == psycopg.pq.TransactionStatus.ACTIVE:
                cancel_on_server(c, 1.0)


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
        self._conninfo = conninfo(cfg)
        # The pool retries in the background and, on a timeout, says only that no connection came; the
        # real reason (PostgreSQL's or the network's) is what its last connection attempt raised.
        self.last_connect_error: str | None = None
        # Why no snapshot may be taken now (zsmon.core.privileges.RoleGuard: a role not yet proven
        # read-only under database.require_minimal_role); None when runs may go ahead.
        self.blocked: str | None = None
        # Connections inside a snapshot now: what a shutdown cancels on the server.
        self._busy: set[psycopg.Connection] = set()
        self._busy_lock = threading.Lock()
        # A run's connection -> the helper connections sharing its snapshot now (a lost lease cancels them too).
        self._helpers: dict[int, list[psycopg.Connection]] = {}
        self.pool = ConnectionPool(
            self._conninfo,
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
            reset=self._reset,
            check=self._check,
            connection_class=_recording(self),
            max_idle=300,
        )

    def _configure(self, conn: psycopg.Connection) -> None:
        _configure(conn)
        # Round trips outside a snapshot (pool check, rollback on return) get the connect timeout.
        conn.op_timeout = self.cfg.connect_timeout_seconds  # type: ignore[attr-defined]

    def _reset(self, conn: psycopg.Connection) -> None:
        """A run leaves nothing behind on its pooled connection: session settings, advisory locks (which could
        block a platform migration), prepared statements, LISTENs all go (``DISCARD ALL``). The settings zsmon
        connects with (read-only, timeouts) are the session's defaults, so they stay. If this fails, the pool
        discards the connection."""
        with _bounded(conn, self.cfg.connect_timeout_seconds):
            conn.autocommit = True  # DISCARD ALL cannot run inside a transaction block
            try:
                conn.execute("DISCARD ALL")
            finally:
                conn.autocommit = False

    def _check(self, conn: psycopg.Connection) -> None:
        # A pooled connection to a paused server would hang its check forever: bound it.
        with _bounded(conn, self.cfg.connect_timeout_seconds):
            ConnectionPool.check_connection(conn)

    def open(self) -> None:
        self.pool.open(wait=False)

    def close(self, timeout: float = 2.0) -> None:
        self.pool.close(timeout=timeout)

    @contextmanager
    def snapshot(self, statement_timeout_seconds: float | None = None) -> Iterator[psycopg.Connection]:
        """One REPEATABLE READ READ ONLY transaction; rolled back at the end (nothing to commit)."""
        timeout = statement_timeout_seconds or self.cfg.statement_timeout_seconds
        if self.blocked is not None:
            raise DatabaseUnavailable(self.blocked)
        try:
            with self.pool.connection(timeout=self.cfg.connect_timeout_seconds) as conn:
                # The server cancels a statement at statement_timeout; if it does not answer by then
                # plus connect_timeout, it is not answering at all.
                with self._busy_lock:
                    self._busy.add(conn)
                try:
                    with _bounded(conn, timeout + self.cfg.connect_timeout_seconds):
                        with conn.transaction(force_rollback=True):
                            conn.execute("SELECT set_config('statement_timeout', %s, true)", (f"{_ms(timeout)}ms",))
                            yield conn
                finally:
                    with self._busy_lock:
                        self._busy.discard(conn)
        except PoolTimeout:
            raise DatabaseUnavailable(self._timed_out(self.cfg.connect_timeout_seconds)) from None

    @contextmanager
    def shared_snapshot(self, conn: psycopg.Connection, helpers: int,
                        statement_timeout_seconds: float | None = None) -> Iterator[SharedSnapshot]:
        """``helpers`` more connections that see exactly ``conn``'s snapshot (``conn`` is inside
        ``snapshot()``): short-lived, read-only at both levels, with the run's statement timeout. All are
        cancelled (if still running) and closed on the way out."""
        timeout = statement_timeout_seconds or self.cfg.statement_timeout_seconds
        snapshot_id = conn.execute("SELECT pg_export_snapshot()").fetchone()[0]
        opened: list[psycopg.Connection] = []
        shared = SharedSnapshot(conn, opened)
        self._helpers[id(conn)] = opened
        try:
            for _ in range(helpers):
                try:
                    helper = BoundedConnection.connect(self._conninfo)
                except psycopg.Error as exc:
                    raise DatabaseUnavailable(f"database {self.where} unavailable: a helper connection of a split "
                                              f"pass could not connect: {self.connect_reason(exc)}") from None
                opened.append(helper)
                _configure(helper)
                with self._busy_lock:
                    self._busy.add(helper)
                helper.op_timeout = timeout + self.cfg.connect_timeout_seconds  # type: ignore[attr-defined]
                # psycopg opens the REPEATABLE READ READ ONLY transaction first: the import is its first statement.
                helper.execute(pgsql.SQL("SET TRANSACTION SNAPSHOT {}").format(pgsql.Literal(snapshot_id)))
                helper.execute("SELECT set_config('statement_timeout', %s, true)", (f"{_ms(timeout)}ms",))
            yield shared
        finally:
            self._helpers.pop(id(conn), None)
            for helper in opened:
                if helper.pgconn.transaction_status == psycopg.pq.TransactionStatus.ACTIVE:
                    cancel_on_server(helper, 1.0)
                with suppress(Exception):
                    helper.close()  # ends (rolls back) its transaction
                with self._busy_lock:
                    self._busy.discard(helper)

    def cancel_with_helpers(self, conn: psycopg.Connection, timeout: float = 1.0) -> None:
        """Cancel what ``conn`` and the helpers sharing its snapshot are running (a run abandoned)."""
        for c in [conn, *self._helpers.get(id(conn), [])]:
            cancel_on_server(c, timeout)

    def cancel_running(self, timeout: float) -> int:
        """Cancel on the server every query a snapshot of this process is running (shutdown); waits at most
        ``timeout`` seconds. Returns how many were asked to stop."""
        with self._busy_lock:
            busy = list(self._busy)
        threads = [threading.Thread(target=cancel_on_server, args=(c, timeout), daemon=True) for c in busy]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout)
        return len(busy)

    def identity(self, timeout: float = 5.0) -> tuple[str, str]:
        """(system identifier, database name): who this database is, whatever address reaches it."""
        try:
            with self.pool.connection(timeout=timeout) as conn, _bounded(conn, timeout):
                row = conn.execute("SELECT system_identifier::text, current_database() FROM pg_control_system()"
                                   ).fetchone()
        except PoolTimeout:
            raise DatabaseUnavailable(self._timed_out(timeout)) from None
        except psycopg.Error as exc:
            raise DatabaseUnavailable(f"database {self.where} unavailable: {explain(exc)}") from None
        return str(row[0]), str(row[1])

    def role(self, timeout: float = 5.0) -> RoleReport:
        """What zsmon's role can do beyond reading (zsmon.core.privileges), asked in a read-only transaction."""
        try:
            with self.pool.connection(timeout=timeout) as conn, _bounded(conn, timeout), \
                    conn.transaction(force_rollback=True):
                return read_role(conn)
        except PoolTimeout:
            raise DatabaseUnavailable(self._timed_out(timeout)) from None
        except psycopg.Error as exc:
            raise DatabaseUnavailable(f"database {self.where} unavailable: {explain(exc)}") from None

    def _timed_out(self, timeout: float) -> str:
        """Why the pool gave no connection in time: the last attempt's own error, when there was one."""
        if self.last_connect_error is not None:
            return f"database {self.where} unavailable: {self.last_connect_error}"
        return (f"database {self.where} unavailable: no connection within {timeout:g}s "
                f"(all {self.cfg.max_connections} pooled connections busy, or the server is slow to answer)")

    def _record(self, exc: BaseException | None) -> None:
        self.last_connect_error = None if exc is None else self.connect_reason(exc)

    def connect_reason(self, exc: BaseException) -> str:
        """A failed connection attempt as one line: PostgreSQL's (or the network's) reason and what to check."""
        return self._scrub(connect_reason(exc, self.cfg))

    def _scrub(self, text: str) -> str:
        secrets = [self.cfg.password.get_secret_value()]
        if self.cfg.url is not None:
            with suppress(psycopg.ProgrammingError):
                secrets.append(str(conninfo_to_dict(self.cfg.url.get_secret_value()).get("password") or ""))
        for secret in filter(None, secrets):
            text = text.replace(secret, REDACTED)
        return str(redactor.scrub(text))

    def unreachable(self, timeout: float | None = None) -> str | None:
        """One direct connection attempt, outside the pool, bounded by ``connect_timeout``: None when the
        database answers, else the one-line reason (``database X unavailable: <cause> (<what to check>)``).

        Used up front by one-shot commands, so N checkers do not each wait out the pool's timeout in turn."""
        seconds = timeout if timeout is not None else self.cfg.connect_timeout_seconds
        try:
            psycopg.connect(self._conninfo, connect_timeout=max(1, round(seconds))).close()
        except psycopg.Error as exc:
            self._record(exc)
            return f"database {self.where} unavailable: {self.last_connect_error}"
        return None

    def ping(self, timeout: float = 2.0) -> None:
        try:
            with self.pool.connection(timeout=timeout) as conn, _bounded(conn, timeout):
                conn.execute("SELECT 1")
        except PoolTimeout:
            raise DatabaseUnavailable(self._timed_out(timeout)) from None
        except psycopg.Error as exc:
            raise DatabaseUnavailable(f"database {self.where} unavailable: {explain(exc)}") from None


def _recording(db: Database) -> type[BoundedConnection]:
    """A connection class that tells ``db`` how each of the pool's connection attempts ended."""

    class RecordingConnection(BoundedConnection):
        @classmethod
        def connect(cls, conninfo: str = "", **kwargs: Any) -> Any:  # type: ignore[override]
            try:
                conn = super().connect(conninfo, **kwargs)
            except psycopg.Error as exc:
                db._record(exc)
                raise
            db._record(None)
            return conn

    return RecordingConnection


_PREFIXES = (
    re.compile(r"^connection failed:\s*"),
    re.compile(r'^connection to server at "[^"]*"(?: \([^)]*\))?, port \d+ failed:\s*'),
    re.compile(r'^connection to server on socket "[^"]*" failed:\s*'),
    re.compile(r"^(?:FATAL|ERROR):\s*"),
)


def _setting(cfg: DatabaseConfig, env: str, part: str) -> str:
    """Where the user sets ``part`` of the connection: the DSN when database.url is used, else the env var."""
    return f"the {part} in ZSMON_DATABASE_URL" if cfg.url is not None else env


def connect_reason(exc: BaseException, cfg: DatabaseConfig) -> str:
    """PostgreSQL's (or the network's) own reason a connection failed, on one line, and what to check."""
    raw = str(exc).strip()
    # libpq: 'connection failed: connection to server at "h", port p failed: FATAL:  <reason>\n\t<its hint>'
    lines = [line.strip() for line in raw.splitlines() if line.strip()]
    text = lines[0] if lines else type(exc).__name__
    if text.lower().startswith("multiple connection attempts failed") and len(lines) > 1:
        text = lines[-1].lstrip("- ")  # the last address tried; the others failed the same way or worse
        text = re.sub(r"^host: [^,]*, port: [^,]*(?:, hostaddr: [^:]*)?:\s*", "", text)
    for prefix in _PREFIXES:
        text = prefix.sub("", text)
    text = " ".join(text.split()) or type(exc).__name__
    low = text.lower()
    host = _setting(cfg, "DB_HOST", "host")
    address = "host and port in ZSMON_DATABASE_URL" if cfg.url is not None else "DB_HOST and DB_PORT"
    if "does not exist" in low and low.startswith("database"):
        hint = f"check {_setting(cfg, 'DB_NAME', 'database name')}"
    elif "does not exist" in low and low.startswith("role"):
        hint = f"check {_setting(cfg, 'DB_USER', 'user')}, or create the role (docs/deployment.md)"
    elif "password authentication failed" in low or "authentication failed" in low:
        hint = f"check {_setting(cfg, 'DB_PASSWORD', 'password')} and {_setting(cfg, 'DB_USER', 'user')}"
    elif "no password supplied" in low or "password is required" in low:
        hint = f"the server asks for a password: set {_setting(cfg, 'DB_PASSWORD', 'password')}"
    elif "no pg_hba.conf entry" in low:
        hint = "the server's pg_hba.conf does not admit this user, database and address (or SSL mode)"
    elif "ssl" in low and ("not support" in low or "required" in low or "negotiation" in low):
        hint = (f"the server does not offer SSL: enable ssl on it, or set {_setting(cfg, 'DB_SSLMODE', 'sslmode')} "
                "to prefer or disable")
    elif "ssl" in low or "certificate" in low:
        hint = f"check the server's certificate and {_setting(cfg, 'DB_SSLMODE', 'sslmode')}"
    elif "connection refused" in low:
        hint = f"is PostgreSQL running and listening on that address? check {address}"
    elif "resolve host" in low or "translate host name" in low or "name or service not known" in low:
        hint = f"the host name does not resolve: check {host}"
    elif "timeout" in low or "timed out" in low:
        hint = (f"no answer within {cfg.connect_timeout_seconds:g}s: check {address} and firewalls, or raise "
                "database.connect_timeout_seconds")
    elif "too many" in low and "connections" in low:
        hint = "the server is out of connection slots: lower database.max_connections or raise max_connections"
    elif "starting up" in low or "shutting down" in low or "recovery mode" in low:
        hint = "the server is restarting: zsmon retries at the next run"
    else:
        return text
    return f"{text} ({hint})"


RECOVERY_CONFLICT = ("cancelled by a conflict with recovery on the hot standby: replaying the primary's changes "
                     "(VACUUM removing rows this snapshot still reads) could not wait for it; on the standby set "
                     "hot_standby_feedback=on or raise max_standby_streaming_delay above the longest sweep "
                     "(docs/deployment.md, Hot standby)")


def recovery_conflict(exc: BaseException) -> bool:
    """A hot standby cancelled the statement (or ended the session) so that replay could go on.

    PostgreSQL reports it as SQLSTATE 40001 ("canceling statement due to conflict with recovery", or
    "terminating connection ..." when the transaction was idle), 40P01 for a buffer-pin deadlock with
    recovery. zsmon's transactions are REPEATABLE READ READ ONLY, which never fail serialization
    otherwise: on them, 40001 is a recovery conflict whatever the server's message language."""
    if not isinstance(exc, psycopg.Error):
        return False
    return getattr(exc, "sqlstate", None) == "40001" or "conflict with recovery" in str(exc)


def explain(exc: BaseException) -> str:
    """A one-line reason for a database error, suitable for results, logs and the API."""
    if isinstance(exc, DatabaseUnresponsive):
        return str(exc)
    if recovery_conflict(exc):
        return RECOVERY_CONFLICT
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
