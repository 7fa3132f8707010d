from __future__ import annotations

import uuid
from collections.abc import Iterator

import psycopg
import pytest
from psycopg import sql
from psycopg.conninfo import conninfo_to_dict, make_conninfo

from zsmon.core.privileges import minimal_role_statements

pytest_plugins = ["zsmon.testing"]


@pytest.fixture
def minimal_role(db_url: str) -> Iterator[str]:
    """A DSN of the role docs/deployment.md prescribes, created in the test database with exactly zsmon's
    own statements (``minimal_role_statements``); dropped afterwards."""
    role = f"zsmon_ro_{uuid.uuid4().hex[:8]}"
    dbname = conninfo_to_dict(db_url)["dbname"]
    with psycopg.connect(db_url, autocommit=True) as admin:
        for statement in minimal_role_statements(role, dbname):
            admin.execute(statement)
    params = conninfo_to_dict(db_url)
    params["user"] = role
    try:
        yield make_conninfo(**params)
    finally:
        with psycopg.connect(db_url, autocommit=True) as admin:
            admin.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE usename = %s", (role,))
            admin.execute(sql.SQL("DROP OWNED BY {}").format(sql.Identifier(role)))
            admin.execute(sql.SQL("DROP ROLE {}").format(sql.Identifier(role)))
