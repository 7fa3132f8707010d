"""Reading a YAML file a person wrote: the data, where each key stands, and errors that say so.

One reader for the config file and the YAML checker files: a syntax error, a
duplicate key (YAML would silently keep the later one) or a value that fails
validation becomes one line naming the file, the line and the dotted key.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, ValidationError

from zsmon.core.logging import redact


class ConfigError(Exception):
    """A user mistake in configuration: one line, exit code 2."""


@dataclass(frozen=True)
class YamlDoc:
    """A parsed file: ``data`` (plain Python) and ``node`` (the composed tree, for line numbers)."""

    path: Path | None
    what: str            # how messages name the file: "config file", "checker file"
    data: Any
    node: Any = None

    def line_of(self, loc: tuple[Any, ...]) -> int | None:
        """The 1-based line of the key at ``loc``, or of its nearest parent that exists."""
        node, line = self.node, None
        for part in loc:
            if not isinstance(node, yaml.MappingNode):
                break
            for key, value in node.value:
                if key.value == str(part):
                    line, node = key.start_mark.line + 1, value
                    break
            else:
                break
        return line

    def where(self, line: int | None = None) -> str:
        if self.path is None:
            return "configuration"
        return f"{self.what} {self.path}" + (f" line {line}" if line else "")

    def error(self, loc: tuple[Any, ...], message: str, line: int | None = None) -> str:
        """``<file> line N: a.b.c: message``."""
        key = ".".join(map(str, loc))
        at = line if line is not None else self.line_of(loc)
        return f"{self.where(at)}: {key + ': ' if key else ''}{message}"


def read_yaml(path: Path, what: str, error: type[Exception] = ConfigError, hint: str = "") -> YamlDoc:
    """Parse ``path``; any problem raises ``error`` with one line (``hint`` follows a missing file)."""
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise error(f"{what} {path} does not exist{hint}") from None
    except OSError as exc:
        raise error(f"{what} {path} cannot be read: {exc.strerror}") from None
    except UnicodeDecodeError as exc:
        raise error(f"{what} {path} is not UTF-8 text (byte {exc.start}): is it the YAML file?") from None
    try:
        node = yaml.compose(text)
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        problem = getattr(exc, "problem", None) or str(exc)
        doc = YamlDoc(path, what, None)
        raise error(f"{doc.where(mark.line + 1 if mark else None)}: invalid YAML: {problem}") from None
    doc = YamlDoc(path, what, data, node)
    dup = _duplicate_key(node, ())
    if dup:
        raise error(doc.error(dup[0], "duplicate key", line=dup[1]))
    return doc


def _duplicate_key(node: Any, path: tuple[str, ...]) -> tuple[tuple[str, ...], int] | None:
    if isinstance(node, yaml.MappingNode):
        seen: set[str] = set()
        for key, value in node.value:
            name = str(key.value)
            if name in seen:
                return (*path, name), key.start_mark.line + 1
            seen.add(name)
            if found := _duplicate_key(value, (*path, name)):
                return found
    elif isinstance(node, yaml.SequenceNode):
        for item in node.value:
            if found := _duplicate_key(item, path):
                return found
    return None


# Keys whose values are never echoed in an error, whatever they hold.
SECRET_KEYS = {"password", "url", "admin_token"}


def explain(exc: ValidationError, doc: YamlDoc, prefix: tuple[str, ...] = (), unknown_hint: str = "") -> str:
    """The first validation error as one line: file, line, dotted key, what was expected (and what was given).

    ``prefix`` places a sub-document (``checkers.payments.settings``) inside the file.
    """
    loc, msg, missing = describe(exc, prefix, unknown_hint)
    # A missing key has no line of its own: point at its parent.
    line = doc.line_of(loc[:-1] if missing else loc) if doc.node is not None else None
    return doc.error(loc or ("(top level)",), msg, line=line)


def describe(exc: ValidationError, prefix: tuple[str, ...] = (), unknown_hint: str = "") -> tuple[tuple[str, ...], str, bool]:
    """(dotted location, message, whether the key is missing) of the first validation error."""
    err = exc.errors()[0]
    loc = (*prefix, *(str(p) for p in err["loc"]))
    kind = err["type"]
    if kind == "extra_forbidden":
        msg = "unknown key" + unknown_hint
    elif kind == "missing":
        msg = "required key is missing"
    else:
        msg = err["msg"]
        shown = err.get("input")
        if loc and loc[-1] not in SECRET_KEYS and isinstance(shown, (str, int, float, bool)) and len(str(shown)) < 80:
            msg += f" (got {shown!r})"
    if len(exc.errors()) > 1:
        msg += f" (and {len(exc.errors()) - 1} more)"
    # Whatever the key is called, a value that looks like a credential (a URL's userinfo, password=) is hidden.
    return loc, redact(msg), kind == "missing"


class Strict(BaseModel):
    """Base of every model a person writes (config sections, settings, YAML checkers): unknown keys are errors."""

    model_config = ConfigDict(extra="forbid")
