"""What zsmon's database role may do beyond reading, and the minimal role it should have instead.

zsmon's sessions are read-only, but that guard stops mistakes, not intent: a plugin's Python code or a
YAML checker's SQL runs as the connecting role, and a superuser (the ``postgres`` default) can write
through ``dblink_exec``, write and read server files, run shell commands with ``COPY ... TO PROGRAM``,
reload the configuration or terminate sessions. The role is the real boundary.

At start-up (``zsmon run``, ``zsmon check``) zsmon inspects its role: superuser, ``CREATEROLE`` (which
can grant itself the roles below), membership in the predefined roles that reach the server's files,
programs and sessions, and any INSERT/UPDATE/DELETE/TRUNCATE privilege on a table of the database.
Anything found is said once, loudly (one warning line naming it and the GRANTs of the minimal role, the
``zsmon_database_role_privileged`` gauge, the ``ZsmonDatabaseRolePrivileged`` alert), or, with
``database.require_minimal_role: true``, zsmon refuses to start.

``minimal_role_statements`` is the one source of the minimal role's SQL: docs/deployment.md shows it
(a test holds the two together) and the tests create their minimal role with exactly these statements.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from zsmon.core.config import ConfigError
from zsmon.core.logging import get_logger

log = get_logger("zsmon.privileges")

# The platform tables zsmon's checkers and exporters read (docs/invariants.md): the minimal role's SELECT.
READ_TABLES = ("accounts", "payment_channels", "channel_transactions", "auctions", "bids", "reputation_scores",
               "reputation_events", "agents", "tasks", "audit_logs")
# Predefined roles that reach beyond the database's rows: server files, programs on the database host,
# other sessions, every table for writing (PostgreSQL 14+). Roles a server does not have are ignored.
EXCESSIVE_ROLES = ("pg_execute_server_program", "pg_write_server_files", "pg_read_server_files",
                   "pg_signal_backend", "pg_write_all_data")
WRITE_PRIVILEGES = ("INSERT", "UPDATE", "DELETE", "TRUNCATE")
# Tables named in the warning; the rest are counted.
_SHOWN_TABLES = 10
_PLAIN_IDENT = re.compile(r"^[a-z_][a-z0-9_]*$")


def _ident(name: str) -> str:
    """An SQL identifier as it must be written: bare when plain, double-quoted otherwise."""
    return name if _PLAIN_IDENT.match(name) else '"' + name.replace('"', '""') + '"'


def minimal_role_statements(role: str = "zsmon", database: str = "zerostate") -> list[str]:
    """The minimal role zsmon needs, as SQL statements (without their ``;``): it reads, and nothing else."""
    r = _ident(role)
    return [
        f"CREATE ROLE {r} LOGIN PASSWORD '...'",
        f"GRANT CONNECT ON DATABASE {_ident(database)} TO {r}",
        f"GRANT USAGE ON SCHEMA public TO {r}",
        f"GRANT SELECT ON {', '.join(READ_TABLES)} TO {r}",
        # pg_stat_* for the postgres exporter (PostgreSQL 10+): statistics, no data and no server access.
        f"GRANT pg_monitor TO {r}",
    ]


def minimal_role_sql(role: str = "zsmon", database: str = "zerostate") -> str:
    """The minimal role's statements on one line (for a log line or an error)."""
    return " ".join(f"{s};" for s in minimal_role_statements(role, database))


@dataclass(frozen=True)
class RoleReport:
    """What zsmon's role (``current_user``) can do beyond reading."""

    role: str
    database: str
    superuser: bool = False
    createrole: bool = False
    member_of: tuple[str, ...] = ()
    # (schema-qualified table, its write privileges) for each table the role can write
    writable: tuple[tuple[str, tuple[str, ...]], ...] = ()

    @property
    def privileged(self) -> bool:
        return bool(self.superuser or self.createrole or self.member_of or self.writable)

    def excessive(self) -> list[str]:
        """Each excessive privilege in words; a superuser is named alone (it implies the rest)."""
        if self.superuser:
            return ["superuser"]
        items = []
        if self.createrole:
            items.append("CREATEROLE (it can grant itself any of the roles below)")
        items += [f"member of {r}" for r in self.member_of]
        for table, privileges in self.writable[:_SHOWN_TABLES]:
            items.append(f"{', '.join(privileges)} on {table}")
        if len(self.writable) > _SHOWN_TABLES:
            items.append(f"write privileges on {len(self.writable) - _SHOWN_TABLES} more tables")
        return items

    def summary(self) -> str:
        return "; ".join(self.excessive())

    def refusal(self) -> str:
        """The one-line error of ``database.require_minimal_role``."""
        return (f"database role {self.role} can do more than read ({self.summary()}) and "
                f"database.require_minimal_role is true: connect as a read-only role instead "
                f"(docs/deployment.md): {minimal_role_sql(database=self.database)}")


_ROLE_QUERY = """
SELECT current_user::text, current_database()::text, r.rolsuper, r.rolcreaterole,
       ARRAY(SELECT g.rolname::text FROM pg_roles g
             WHERE g.rolname = ANY(%(roles)s::text[]) AND pg_has_role(current_user, g.oid, 'MEMBER')
             ORDER BY array_position(%(roles)s::text[], g.rolname::text))
FROM pg_roles r WHERE r.rolname = current_user
"""
_TABLES_QUERY = r"""
SELECT format('%%I.%%I', n.nspname, c.relname) AS tbl,
       array_agg(p ORDER BY array_position(%(privileges)s::text[], p)) AS privileges
FROM pg_class c
JOIN pg_namespace n ON n.oid = c.relnamespace
CROSS JOIN unnest(%(privileges)s::text[]) AS p
WHERE c.relkind IN ('r', 'p') AND n.nspname NOT IN ('pg_catalog', 'information_schema')
  AND n.nspname NOT LIKE 'pg\_%%' AND has_table_privilege(c.oid, p)
GROUP BY 1 ORDER BY 1
"""


def read_role(conn: Any) -> RoleReport:
    """Inspect the connection's role (any role may ask all of this: catalogs and ``has_*_privilege``)."""
    role, database, superuser, createrole, member_of = conn.execute(
        _ROLE_QUERY, {"roles": list(EXCESSIVE_ROLES)}).fetchone()
    writable: list[tuple[str, tuple[str, ...]]] = []
    if not superuser:  # a superuser can write every table: no need to list them
        writable = [(t, tuple(p)) for t, p in conn.execute(
            _TABLES_QUERY, {"privileges": list(WRITE_PRIVILEGES)}).fetchall()]
    return RoleReport(role, database, bool(superuser), bool(createrole), tuple(member_of), tuple(writable))


NOT_VERIFIED = ("the database role has not been inspected yet (database.require_minimal_role: nothing runs "
                "until the database answers and the role proves read-only)")


class PrivilegedRole(ConfigError):
    """``database.require_minimal_role`` is set and the role can do more than read."""


class RoleGuard:
    """Inspects zsmon's role, reports it once per change, and enforces ``database.require_minimal_role``.

    With the requirement set, nothing reaches the database through ``Database.snapshot`` (no checker, no
    exporter) until the role has been inspected and found read-only. ``expected`` names why a privileged
    role is fine here (the demo's embedded superuser): then it is said as information, not a warning.
    """

    def __init__(self, db: Any, require_minimal: bool, expected: str | None = None,
                 on_report: Any = None) -> None:
        self.db = db
        self.require_minimal = require_minimal
        self.expected = expected
        self.on_report = on_report  # called with each report (the gauge)
        self.report: RoleReport | None = None
        if require_minimal:
            db.blocked = NOT_VERIFIED

    def check(self, timeout: float) -> RoleReport:
        """Inspect the role now. Raises ``PrivilegedRole`` (a one-line message) when refused;
        ``DatabaseUnavailable`` when the database cannot be asked."""
        report = self.db.role(timeout)
        changed = report != self.report
        self.report = report
        if self.on_report is not None:
            self.on_report(report)
        if report.privileged and self.require_minimal:
            self.db.blocked = report.refusal()
            raise PrivilegedRole(report.refusal())  # the caller stops with this one line
        self.db.blocked = None
        if changed:
            self._announce(report)
        return report

    def _announce(self, report: RoleReport) -> None:
        if not report.privileged:
            log.debug("database_role_minimal", role=report.role)
        elif self.expected:
            log.info("database_role_privileged", role=report.role, excessive=report.summary(),
                     detail=f"expected: {self.expected}; a deployment connects as the read-only role of "
                            "docs/deployment.md")
        else:
            log.warning("database_role_privileged", role=report.role, excessive=report.summary(),
                        minimal_role=minimal_role_sql(database=report.database),
                        detail="zsmon only reads, but a checker or plugin runs as this role: it could write, read "
                               "server files or run programs on the database host. Connect as the minimal role "
                               "(docs/deployment.md) and set database.require_minimal_role: true")
