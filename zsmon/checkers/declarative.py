"""Declarative checkers: one YAML file, one SQL query, one invariant.

A file such as ``examples/checkers/stuck_tasks.yml``::

    name: stuck_tasks                  # the checker's name (metrics label, API, config key)
    invariant: stuck_executing_task    # optional; default: the name
    description: No task stays in executing past its timeout_at.
    severity: warning                  # critical | warning | info
    entity_type: task
    interval_seconds: 60
    runbook_url: https://.../docs/runbooks/stuck_tasks.md
    params:                            # optional thresholds -> checkers.<name>.settings.<param>
      grace_seconds: {default: 60, description: Seconds past timeout_at before a task counts.}
    columns:                           # optional renames; these are the defaults
      entity_id: entity_id
    query: |
      SELECT task_id AS entity_id, ... FROM tasks WHERE ... > %(grace_seconds)s

becomes, at load, a ``Checker`` subclass (``source = "yaml"``) whose ``run`` hands
the query to ``ctx.find``: it runs in the same ``REPEATABLE READ READ ONLY``
snapshot under the same ``statement_timeout`` (``checkers.<name>.statement_timeout_seconds``)
as any built-in checker, and its result goes to the same metrics, API, status
page, rules and dashboards, because all of them read ``checker_classes()``.

Every row the query returns is one violation. Its columns are read by name:
``entity_id`` (required), ``expected``, ``actual``, ``difference`` (numeric: the
sample keeps the largest ``|difference|``) and ``detail``; a column the query
does not return is NULL. ``columns:`` maps these to other names.

Where the files come from (the registry is called without arguments in many
places, so the search path is module state, set in one place):

* ``configure(paths)`` — ``load_config`` calls it with ``checks.paths`` (a list of
  directories or files; ``ZSMON_CHECKERS_PATH``, colon-separated, overrides it
  like every other environment variable) before it validates ``checkers.<name>``.
* before any config was loaded (``zsmon config reference``, a plain
  ``checker_classes()``), ``ZSMON_CHECKERS_PATH`` from the process environment.

A directory contributes its ``*.yml`` and ``*.yaml`` files (not recursively).
Loaded classes are cached per file and modification time, so a class keeps its
identity across calls and an edited file is reloaded. Any mistake is a
``ConfigError`` naming the file, the line and the key (exit code 2).
"""
from __future__ import annotations

import os
import re
import threading
from pathlib import Path
from typing import Any, ClassVar, Iterable, Literal, Union

import psycopg
import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, create_model, field_validator

from zsmon.checkers.base import Checker, CheckContext, CheckerSettings, Invariant
from zsmon.core.config import ConfigError, _line_of

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
class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ParamSpec(_Strict):
    """A threshold of the query: ``%(name)s`` in the SQL, ``checkers.<name>.settings.<param>`` in the config."""

    default: Union[bool, int, float, str] = Field(description="Value used unless the config overrides it; "
                                                  "its type (bool, int, float, str) is the setting's type.")
    description: str = Field(min_length=1, description="What the threshold means (shown in docs and explain).")


class ColumnsSpec(_Strict):
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


class CheckerSpec(_Strict):
    """One declarative checker."""

    name: str = Field(pattern=_NAME, description="Checker name: lower case, digits, underscore.")
    invariant: str | None = Field(None, pattern=_NAME, description="Invariant id (default: the name).")
    description: str = Field(min_length=1, description="What must hold, in one or two sentences.")
    severity: Literal["critical", "warning", "info"] = Field(description="critical pages; warning does not.")
    entity_type: str = Field(pattern=_NAME, description="What a violating row names (task, agent, ...).")
    interval_seconds: float = Field(60.0, gt=0, description="Seconds between runs (config may override).")
    runbook_url: str = Field(min_length=1, description="Runbook linked from the alert and the status page.")
    params: dict[str, ParamSpec] = Field(default_factory=dict, description="Thresholds used by the query.")
    columns: ColumnsSpec = Field(default_factory=ColumnsSpec, description="Column renames.")
    query: str = Field(min_length=1, description="One read-only SELECT; each row is a violation.")

    @field_validator("params")
    @classmethod
    def _param_names(cls, v: dict[str, ParamSpec]) -> dict[str, ParamSpec]:
        for key in v:
            if not re.match(_NAME, key):
                raise ValueError(f"parameter name {key!r}: expected lower case, digits, underscore")
        return v

    @field_validator("runbook_url")
    @classmethod
    def _url(cls, v: str) -> str:
        if re.search(r"\s", v):
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


def _check_query(spec: CheckerSpec) -> tuple[str, int | None] | None:
    """Why a query is refused before it ever runs, with the offset in the query to point at (None: fine)."""
    statements = _statements(spec.query)
    if len(statements) != 1:
        return f"expected exactly one SQL statement, found {len(statements)}", None
    if not _QUERY_START.match(statements[0]):
        return "expected a query (SELECT, WITH, VALUES or TABLE): declarative checkers only read", None
    used: dict[str, int] = {}
    i = spec.query.find("%")
    while i >= 0:
        token = _PLACEHOLDER.match(spec.query, i)
        if token is None:
            return ("a lone % in the query: write %% for a literal percent sign, "
                    "%(param)s for a threshold declared under params"), i
        if token.group("name"):
            used.setdefault(token.group("name"), i)
        i = spec.query.find("%", token.end())
    for name, at in used.items():
        if name not in spec.params:
            return f"the query uses %({name})s but params declares no {name!r}", at
    return None


def _query_line(node: Any, offset: int | None) -> int | None:
    """The file line of ``offset`` in the query's text: exact for block scalars (``|``, ``>``), else the key's line."""
    key_line = _line_of(node, ("query",))
    if offset is None or not isinstance(node, yaml.MappingNode):
        return key_line
    for key, value in node.value:
        if key.value == "query" and isinstance(value, yaml.ScalarNode) and value.style == "|":
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
    invariant = Invariant(spec.invariant or spec.name, spec.description.strip(), spec.entity_type, spec.severity)
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
        "source": "yaml",
        "spec": spec,
        "path": path,
        "query": query,
    }
    return type(f"{_camel(spec.name)}Checker", (DeclarativeChecker,), attrs)


# ---- loading ---------------------------------------------------------------------------------
def _fail(path: Path, line: int | None, key: str, message: str) -> DeclarativeError:
    where = f"checker file {path}" + (f" line {line}" if line else "")
    return DeclarativeError(f"{where}: {key + ': ' if key else ''}{message}")


def _duplicate_key(node: Any) -> tuple[str, int] | None:
    if isinstance(node, yaml.MappingNode):
        seen: set[str] = set()
        for key, value in node.value:
            if key.value in seen:
                return key.value, key.start_mark.line + 1
            seen.add(key.value)
            found = _duplicate_key(value)
            if found:
                return found
    return None


def load_file(path: Path) -> type[DeclarativeChecker]:
    """Parse and validate one file; raises ``DeclarativeError`` naming file, line and key."""
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise _fail(path, None, "", f"cannot be read: {exc.strerror}") from None
    try:
        node = yaml.compose(text)
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        problem = getattr(exc, "problem", None) or str(exc)
        raise _fail(path, mark.line + 1 if mark else None, "", f"invalid YAML: {problem}") from None
    if not isinstance(data, dict):
        raise _fail(path, None, "", "the top level must be a mapping with name, description, severity, "
                    "entity_type, runbook_url and query")
    dup = _duplicate_key(node)
    if dup:
        raise _fail(path, dup[1], dup[0], "duplicate key")
    try:
        spec = CheckerSpec.model_validate(data)
    except ValidationError as exc:
        err = exc.errors()[0]
        loc = tuple(str(p) for p in err["loc"])
        msg = "unknown key" if err["type"] == "extra_forbidden" else err["msg"]
        if err["type"] == "missing":
            msg = "required key is missing"
        shown = err.get("input")
        if err["type"] not in ("missing", "extra_forbidden") and isinstance(shown, (str, int, float, bool)) \
                and len(str(shown)) < 80:
            msg += f" (got {shown!r})"
        line = _line_of(node, loc) if loc else None
        if err["type"] == "missing" or line is None:
            line = _line_of(node, loc[:-1]) if len(loc) > 1 else None
        raise _fail(path, line, ".".join(loc) or "(top level)", msg) from None
    problem = _check_query(spec)
    if problem:
        raise _fail(path, _query_line(node, problem[1]), "query", problem[0])
    return build_class(spec, path)


# The search path: None until a config was loaded, then that config's checks.paths.
_configured: list[Path] | None = None
_cache: dict[Path, tuple[tuple[int, int], type[DeclarativeChecker]]] = {}
_lock = threading.Lock()


def configure(paths: Iterable[str | Path] | None) -> None:
    """Set the directories/files to load (``None``: fall back to ``$ZSMON_CHECKERS_PATH``)."""
    global _configured
    _configured = None if paths is None else [Path(p) for p in paths]


def search_path() -> list[Path]:
    if _configured is not None:
        return list(_configured)
    return split_path(os.environ.get(ENV_VAR, ""))


def split_path(value: str) -> list[Path]:
    return [Path(p) for p in value.split(os.pathsep) if p.strip()]


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


def load(paths: Iterable[Path] | None = None) -> dict[str, type[DeclarativeChecker]]:
    """Every YAML checker on the search path, by name; cached per file and mtime."""
    found: dict[str, type[DeclarativeChecker]] = {}
    with _lock:
        for f in files(search_path() if paths is None else paths):
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
