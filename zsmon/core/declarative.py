"""Declarative checkers: one YAML file, one SQL query, one invariant.

A file such as ``examples/checkers/stuck_tasks.yml``::

    name: stuck_tasks                  # the checker's name (metrics label, API, config key)
    invariant: stuck_task    # optional; default: the name
    description: No task stays in executing past its timeout_at.
    severity: warning                  # critical | warning | info
    entity_type: task
    interval_seconds: 60
    runbook: |                         # optional: what to do (Markdown), in the runbook zsmon serves
      1. Find the stuck tasks' agents ...
    params:                            # optional thresholds -> checkers.<name>.settings.<param>
      grace_seconds: {default: 60, description: Seconds past timeout_at before a task counts.}
    columns:                           # optional renames; these are the defaults
      entity_id: entity_id
    query: |
      SELECT task_id AS entity_id, ... FROM tasks WHERE ... > %(grace_seconds)s
    skip_when: |                       # optional: a row here means "cannot be judged", its first column says why
      SELECT 'no task has a timeout_at' WHERE NOT EXISTS (SELECT 1 FROM tasks WHERE timeout_at IS NOT NULL)

becomes, at load, a ``Checker`` subclass (``source = "yaml"``) whose ``run`` hands
the query to ``ctx.find``: it runs in the same ``REPEATABLE READ READ ONLY``
snapshot under the same ``statement_timeout`` (``checkers.<name>.statement_timeout_seconds``)
as any built-in checker, and its result goes to the same metrics, API, status
page, rules and dashboards, because all of them read the registry.

Every row the query returns is one violation. Its columns are read by name:
``entity_id`` (required), ``expected``, ``actual``, ``difference`` (numeric: the
sample keeps the largest ``|difference|``) and ``detail``; a column the query
does not return is NULL. ``columns:`` maps these to other names.

The files come from the config's ``checks.paths`` (a list of directories or
files; ``ZSMON_CHECKERS_PATH``, colon-separated, overrides it like every other
environment variable), which the registry hands to ``load(paths)``.

A directory contributes its ``*.yml`` and ``*.yaml`` files (not recursively).
Loaded classes are cached per file and modification time, so a class keeps its
identity across calls and an edited file is reloaded. Any mistake is a
``ConfigError`` naming the file, the line and the key (exit code 2).
"""
from __future__ import annotations

import re
import threading
from pathlib import Path
from typing import Any, ClassVar, Iterable, Literal, Union

import psycopg
import yaml
from pydantic import Field, ValidationError, create_model, field_validator

from zsmon.core.checker import Checker, CheckContext, CheckerSettings, Invariant
from zsmon.core.yamlfile import ConfigError, Strict, YamlDoc, explain, read_yaml

ENV_VAR = "ZSMON_CHECKERS_PATH"
SUFFIXES = (".yml", ".yaml")
# Generated classes live outside the ``zsmon.checkers.`` namespace on purpose: the
# registry's scan of built-in modules must not pick them up; it asks ``load()``.
GENERATED_MODULE = "zsmon.yaml_checkers"

_NAME = r"^[a-z][a-z0-9_]{0,62}$"
_COLUMN = re.compile(r"^[A-Za-z_][A-Za-z0-9_]{0,62}$")
_PLACEHOLDER = re.compile(r"%(?:%|\((?P<name>[A-Za-z_][A-Za-z0-9_]*)\)s)")
_QUERY_START = re.compile(r"^\s*(\(|select\b|with\b|values\b|table\b)", re.IGNORECASE)
VIOLATION_COLUMNS = ("entity_id", "expected", "actual", "difference", "detail")


class DeclarativeError(ConfigError):
    """A YAML checker file is invalid: one line naming the file, line and key."""


# ---- the file format --------------------------------------------------------------


class ParamSpec(Strict):
    """A threshold of the query: ``%(name)s`` in the SQL, ``checkers.<name>.settings.<param>`` in the config."""

    default: Union[bool, int, float, str] = Field(description="Value used unless the config overrides it; "
                                                  "its type (bool, int, float, str) is the setting's type.")
    description: str = Field(min_length=1, description="What the threshold means (shown in docs and explain).")


class ColumnsSpec(Strict):
    """Which column of the query's rows holds each part of a violation."""

    entity_id: str = Field("entity_id", description="Column naming the violating entity (required in the rows).")
    expected: str = Field("expected", description="Column with the expected value (NULL if absent).")
    actual: str = Field("actual", description="Column with the actual value (NULL if absent).")
    difference: str = Field("difference", description="Numeric column: actual - expected (NULL if absent).")
    detail: str = Field("detail", description="Column with a one-line explanation (empty if absent).")

    @field_validator("*")
    @classmethod
    def _identifier(cls, v: str) -> str:
        if not _COLUMN.match(v):
            raise ValueError("expected a column name (letters, digits, underscore)")
        return v.lower()  # PostgreSQL folds unquoted aliases to lower case


class CheckerSpec(Strict):
    """One declarative checker."""

    name: str = Field(pattern=_NAME, description="Checker name: lower case, digits, underscore.")
    invariant: str | None = Field(None, pattern=_NAME, description="Invariant id (default: the name).")
    description: str = Field(min_length=1, description="What must hold, in one or two sentences.")
    severity: Literal["critical", "warning", "info"] = Field(description="critical pages; warning does not.")
    entity_type: str = Field(pattern=_NAME, description="What a violating row names (task, agent, ...).")
    difference_is_age: bool = Field(False, description="The difference is a duration that grows while the "
                                    "violation stands (seconds past a deadline): its growth alone does not undo "
                                    "an acknowledgement.")
    interval_seconds: float = Field(60.0, gt=0, description="Seconds between runs (config may override).")
    runbook_url: str | None = Field(None, min_length=1, description="A runbook of your own, linked from the "
                                    "alert and the status page instead of the one zsmon generates and serves at "
                                    "/runbooks/<Alert> (which shows the query and `runbook`).")
    runbook: str | None = Field(None, min_length=1, description="What to do when it fires (Markdown): the "
                                "'How to resolve' part of the runbook zsmon generates for this checker.")
    params: dict[str, ParamSpec] = Field(default_factory=dict, description="Thresholds used by the query.")
    columns: ColumnsSpec = Field(default_factory=ColumnsSpec, description="Column renames.")
    query: str = Field(min_length=1, description="One read-only SELECT; each row is a violation.")
    skip_when: str | None = Field(None, min_length=1, description=(
        "Optional read-only SELECT run first: when it returns a row, the invariant is not judged in this run "
        "and is listed as skipped with the row's first column as the reason (e.g. the table it audits is empty "
        "on this platform, so every row would be a violation)."))

    @field_validator("params")
    @classmethod
    def _param_names(cls, v: dict[str, ParamSpec]) -> dict[str, ParamSpec]:
        for key in v:
            if not re.match(_NAME, key):
                raise ValueError(f"parameter name {key!r}: expected lower case, digits, underscore")
        return v

    @field_validator("runbook_url")
    @classmethod
    def _url(cls, v: str | None) -> str | None:
        if v is not None and re.search(r"\s", v):
            raise ValueError("expected a URL (no spaces)")
        return v


def _statements(sql: str) -> list[str]:
    """Split on ``;`` outside quotes and comments (enough to refuse a second statement)."""
    parts, buf, i, n = [], [], 0, len(sql)
    while i < n:
        c = sql[i]
        if c in "'\"":
            j = i + 1
            while j < n:
                if sql[j] == c:
                    if j + 1 < n and sql[j + 1] == c:  # doubled quote inside the literal
                        j += 2
                        continue
                    break
                j += 1
            buf.append(sql[i:j + 1])
            i = j + 1
        elif sql.startswith("--", i):
            j = sql.find("\n", i)
            i = n if j < 0 else j
        elif sql.startswith("/*", i):
            j = sql.find("*/", i + 2)
            i = n if j < 0 else j + 2
            buf.append(" ")
        elif sql.startswith("$", i) and (m := re.match(r"\$[A-Za-z_]*\$", sql[i:])):
            tag = m.group(0)
            j = sql.find(tag, i + len(tag))
            j = n if j < 0 else j + len(tag)
            buf.append(sql[i:j])
            i = j
        elif c == ";":
            parts.append("".join(buf))
            buf = []
            i += 1
        else:
            buf.append(c)
            i += 1
    parts.append("".join(buf))
    return [p for p in parts if p.strip()]


def _check_query(spec: CheckerSpec, query: str) -> tuple[str, int | None] | None:
    """Why a query is refused before it ever runs, with the offset in the query to point at (None: fine)."""
    statements = _statements(query)
    if len(statements) != 1:
        return f"expected exactly one SQL statement, found {len(statements)}", None
    if not _QUERY_START.match(statements[0]):
        return "expected a query (SELECT, WITH, VALUES or TABLE): declarative checkers only read", None
    used: dict[str, int] = {}
    i = query.find("%")
    while i >= 0:
        token = _PLACEHOLDER.match(query, i)
        if token is None:
            return ("a lone % in the query: write %% for a literal percent sign, "
                    "%(param)s for a threshold declared under params"), i
        if token.group("name"):
            used.setdefault(token.group("name"), i)
        i = query.find("%", token.end())
    for name, at in used.items():
        if name not in spec.params:
            return f"the query uses %({name})s but params declares no {name!r}", at
    return None


def _query_line(doc: YamlDoc, offset: int | None, key_name: str = "query") -> int | None:
    """The file line of ``offset`` in the query's text: exact for block scalars (``|``, ``>``), else the key's line."""
    key_line = doc.line_of((key_name,))
    if offset is None or not isinstance(doc.node, yaml.MappingNode):
        return key_line
    for key, value in doc.node.value:
        if key.value == key_name and isinstance(value, yaml.ScalarNode) and value.style == "|":
            return value.start_mark.line + 2 + value.value.count("\n", 0, offset)
    return key_line


# ---- the generated checker ------------------------------------------------------------
def _quote(column: str) -> str:
    return '"' + column.replace('"', '""') + '"'


class DeclarativeChecker(Checker):
    """Base of the classes generated from YAML files; sets no ``name`` so it is never registered itself."""

    source: ClassVar[str] = "yaml"
    spec: ClassVar[CheckerSpec]
    path: ClassVar[Path]
    query: ClassVar[str]

    def params(self) -> dict[str, Any]:
        return {key: getattr(self.settings, key) for key in self.spec.params}

    def run(self, ctx: CheckContext) -> None:
        try:
            self._run(ctx)
        except psycopg.Error as exc:
            # SQLSTATE class 42 (syntax error, unknown column or function): name the file. Privileges,
            # missing tables, timeouts and writes keep their own explanation (zsmon.core.db.explain).
            if not (exc.sqlstate or "").startswith("42") or isinstance(
                    exc, (psycopg.errors.InsufficientPrivilege, psycopg.errors.UndefinedTable, DeclarativeQueryError)):
                raise
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise DeclarativeQueryError(f"{self.path}: the query fails: {first}") from exc

    def _run(self, ctx: CheckContext) -> None:
        inv = self.invariants[0]
        params = self.params()
        if self.spec.skip_when is not None:
            row = ctx.conn.execute(_statements(self.spec.skip_when)[0], params).fetchone()
            if row is not None:
                ctx.skip(inv.id, str(row[0]) if row and row[0] is not None else "skip_when returned a row")
                return
        # Learn the query's columns without running it (LIMIT 0 plans and stops).
        with ctx.conn.cursor() as cur:
            cur.execute(f"SELECT * FROM ({self.query}) AS q LIMIT 0", params)
            returned = [d.name for d in cur.description or []]
        cols = self.spec.columns
        renamed = cols.model_fields_set
        select = []
        for part in VIOLATION_COLUMNS:
            column = getattr(cols, part)
            if column in returned:
                cast = "::numeric" if part == "difference" else "::text"
                select.append(f"q.{_quote(column)}{cast} AS {part}")
            elif part == "entity_id" or part in renamed:
                raise DeclarativeQueryError(
                    f"{self.path}: the query returns no column {column!r} for {part} "
                    f"(it returns: {', '.join(returned) or 'nothing'})")
            else:
                select.append(f"NULL::{'numeric' if part == 'difference' else 'text'} AS {part}")
        ctx.find(inv.id, f"SELECT {', '.join(select)} FROM ({self.query}) AS q", params)


class DeclarativeQueryError(psycopg.ProgrammingError):
    """The file's query is wrong for this database (a run error naming the file, not a crash)."""


def _settings_model(spec: CheckerSpec) -> type[CheckerSettings]:
    fields: dict[str, Any] = {}
    for key, p in spec.params.items():
        fields[key] = (type(p.default), Field(p.default, description=p.description))
    model = create_model(f"{_camel(spec.name)}Settings", __base__=CheckerSettings, **fields)
    model.__doc__ = f"Thresholds of the YAML checker {spec.name!r}."
    return model


def _camel(name: str) -> str:
    return "".join(part.capitalize() for part in name.split("_"))


def build_class(spec: CheckerSpec, path: Path) -> type[DeclarativeChecker]:
    invariant = Invariant(spec.invariant or spec.name, spec.description.strip(), spec.entity_type, spec.severity,
                          difference_is_age=spec.difference_is_age)
    query = _statements(spec.query)[0].strip()
    attrs = {
        "__module__": GENERATED_MODULE,
        "__qualname__": f"{_camel(spec.name)}Checker",
        "__doc__": f"YAML checker {spec.name!r} from {path}.",
        "name": spec.name,
        "description": spec.description.strip(),
        "invariants": (invariant,),
        "Settings": _settings_model(spec),
        "default_interval_seconds": float(spec.interval_seconds),
        "runbook_url": spec.runbook_url,
        "runbook_text": spec.runbook.strip() if spec.runbook else None,
        "source": "yaml",
        "spec": spec,
        "path": path,
        "query": query,
    }
    return type(f"{_camel(spec.name)}Checker", (DeclarativeChecker,), attrs)


# ---- loading ---------------------------------------------------------------------------------
def load_file(path: Path) -> type[DeclarativeChecker]:
    """Parse and validate one file; raises ``DeclarativeError`` naming file, line and key."""
    doc = read_yaml(path, "checker file", DeclarativeError)
    if not isinstance(doc.data, dict):
        raise DeclarativeError(f"{doc.where()}: the top level must be a mapping with name, description, severity, "
                               "entity_type and query")
    try:
        spec = CheckerSpec.model_validate(doc.data)
    except ValidationError as exc:
        raise DeclarativeError(explain(exc, doc)) from None
    for key in ("query", "skip_when"):
        text = getattr(spec, key)
        problem = _check_query(spec, text) if text is not None else None
        if problem:
            raise DeclarativeError(doc.error((key,), problem[0], line=_query_line(doc, problem[1], key)))
    return build_class(spec, path)


# Classes cached per file and modification time: a class keeps its identity across registries.
_cache: dict[Path, tuple[tuple[int, int], type[DeclarativeChecker]]] = {}
_lock = threading.Lock()


def files(paths: Iterable[Path]) -> list[Path]:
    out: list[Path] = []
    for p in paths:
        if p.is_dir():
            out += sorted(f for f in p.iterdir() if f.suffix in SUFFIXES and f.is_file())
        elif p.is_file():
            out.append(p)
        else:
            raise DeclarativeError(f"checks.paths ({ENV_VAR}): {p} is neither a directory nor a file of "
                                   "YAML checkers")
    return out


def load(paths: Iterable[Path]) -> dict[str, type[DeclarativeChecker]]:
    """Every YAML checker in ``paths`` (directories or files), by name."""
    found: dict[str, type[DeclarativeChecker]] = {}
    with _lock:
        for f in files(paths):
            resolved = f.resolve()
            st = resolved.stat()
            stamp = (st.st_mtime_ns, st.st_size)
            cached = _cache.get(resolved)
            if cached is None or cached[0] != stamp:
                cls = load_file(f)
                _cache[resolved] = (stamp, cls)
            else:
                cls = cached[1]
            if cls.name in found:
                raise DeclarativeError(f"checker file {f}: name: {cls.name!r} is also declared by "
                                       f"{found[cls.name].path}")
            found[cls.name] = cls
    return found
