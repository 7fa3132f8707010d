"""Checker ``schema``: the tables and columns zsmon reads exist, with types of the right family.

A platform migration that renames a column would otherwise surface as a
checker error far from its cause; this names the missing column directly (the
other checkers skip only the invariants that read it). A column of the wrong
type — money stored as text, a timestamp as text — would make comparisons
silently wrong ('9' > '10'), so it is named too.
"""
from __future__ import annotations

from zsmon.checkers.platform import COLUMNS
from zsmon.core.checker import Checker, CheckContext, Invariant
from zsmon.core.results import Violation

# The family of each type name zsmon declares, and of what PostgreSQL reports (format_type without modifiers).
FAMILIES = {
    "numeric": "numeric", "text": "text", "character varying": "text", "character": "text", "uuid": "uuid",
    "boolean": "boolean", "smallint": "integer", "integer": "integer", "bigint": "integer",
    "timestamptz": "timestamp", "timestamp with time zone": "timestamp",
    "timestamp without time zone": "timestamp", "json": "json", "jsonb": "json",
}


class SchemaChecker(Checker):
    name = "schema"
    description = ("The platform tables and columns zsmon reads are present in the monitored database, with "
                   "types of the expected family.")
    invariants = (
        Invariant("required_columns_present",
                  "Every table and column zsmon reads exists (a migration renamed or dropped one otherwise).",
                  entity_type="column", severity="warning"),
        Invariant("column_types",
                  "Every column zsmon reads has a type of the expected family (money numeric, times timestamps, "
                  "ids uuid, counters integers): compared as text, '9' > '10'.",
                  entity_type="column", severity="warning"),
    )
    default_interval_seconds = 300.0

    def run(self, ctx: CheckContext) -> None:
        tables = [t for t, cols in COLUMNS.items() for _ in cols]
        columns = [c for cols in COLUMNS.values() for c in cols]
        expected = [FAMILIES[typ] for cols in COLUMNS.values() for typ in cols.values()]
        rows = ctx.query(
            """
            SELECT r.tbl, r.col, r.family, to_regclass(r.tbl) IS NOT NULL AS table_exists,
                   regexp_replace(format_type(a.atttypid, NULL), '\\[\\]$', '') AS actual_type
            FROM unnest(%s::text[], %s::text[], %s::text[]) AS r(tbl, col, family)
            LEFT JOIN pg_attribute a ON a.attrelid = to_regclass(r.tbl) AND a.attname = r.col
                                     AND a.attnum > 0 AND NOT a.attisdropped
            """,
            (tables, columns, expected))
        missing, wrong = [], []
        for r in rows:
            entity = f"{r['tbl']}.{r['col']}"
            if r["actual_type"] is None:
                where = "" if r["table_exists"] else f" (table {r['tbl']} itself is missing)"
                missing.append(Violation(
                    "required_columns_present", "column", entity, "present", "missing", None,
                    f"column {r['col']} of table {r['tbl']} is missing{where}: the invariants that read it are "
                    f"skipped until it is back"))
            elif FAMILIES.get(r["actual_type"], r["actual_type"]) != r["family"]:
                wrong.append(Violation(
                    "column_types", "column", entity, r["family"], r["actual_type"], None,
                    f"{entity} is {r['actual_type']}, expected a {r['family']} type: zsmon's comparisons of it "
                    f"would be wrong (text compares '9' > '10'); fix the column's type"))
        ctx.report("required_columns_present", missing)
        ctx.report("column_types", wrong)
