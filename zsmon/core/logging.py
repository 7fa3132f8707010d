"""Structured logs: JSON (one object per line) or console, always on stderr.

Secrets are removed by a processor, not by care: known secret values (set from
the config at start-up), secret-looking keys, DSN passwords and bearer tokens
are replaced before any renderer sees the event. Standard-library loggers
(psycopg_pool, apscheduler, uvicorn) go through the same chain.
"""
from __future__ import annotations

import logging
import re
import sys
from typing import Any, Iterable

import structlog

REDACTED = "***"
_SECRET_KEYS = re.compile(r"pass(word|wd)?|secret|token|authorization|api_?key|dsn", re.I)
_PATTERNS = [
    # The whole userinfo of any URL (``scheme://user:password@host``, ``https://TOKEN@host``), up to the
    # last ``@`` of the authority: a password with an unescaped ``@`` is hidden whole, not from its ``@`` on.
    # (``user:`` then anything but a space up to an ``@``: an unescaped ``/`` in the password too).
    (re.compile(r"(?P<pre>\b[a-z][a-z0-9+.-]*://)(?:[^\s/?#@:]*:[^\s@]*|[^\s/?#@]*)@(?:[^\s/?#@]*@)*", re.I),
     r"\g<pre>***@"),
    (re.compile(r"(?P<pre>\bBearer\s+)\S+", re.I), r"\g<pre>***"),
    # key=value DSNs and query strings: password=..., passwd=..., token=..., secret=...
    (re.compile(r"(?P<pre>\b(?:(?:password|passwd|pwd)\s*[=:]|(?:token|secret|api_?key)\s*=)\s*)"
                r"('(?:[^'\\]|\\.)*'|\"[^\"]*\"|[^\s&,;]+)", re.I), r"\g<pre>***"),
]


def redact(text: str) -> str:
    """``text`` with anything that looks like a credential replaced by ``***``: the userinfo of any URL,
    ``password=``/``token=`` values, bearer tokens. Needs no configuration, so it also guards errors
    printed before the config (and its secrets) is known."""
    for pattern, repl in _PATTERNS:
        text = pattern.sub(repl, text)
    return text


class Redactor:
    """A structlog processor that scrubs secrets from every value of an event."""

    def __init__(self) -> None:
        self.secrets: list[str] = []

    def set_secrets(self, secrets: Iterable[str]) -> None:
        # Longest first, so a secret that contains another is replaced whole.
        self.secrets = sorted({s for s in secrets if s and len(s) >= 3}, key=len, reverse=True)

    def scrub(self, value: Any) -> Any:
        if isinstance(value, str):
            for secret in self.secrets:
                if secret in value:
                    value = value.replace(secret, REDACTED)
            return redact(value)
        if isinstance(value, dict):
            return {k: (REDACTED if _SECRET_KEYS.search(str(k)) and v else self.scrub(v)) for k, v in value.items()}
        if isinstance(value, (list, tuple)):
            return type(value)(self.scrub(v) for v in value)
        if isinstance(value, BaseException):
            return self.scrub(f"{type(value).__name__}: {value}")
        return value

    def __call__(self, logger: Any, method: str, event: dict[str, Any]) -> dict[str, Any]:
        return self.scrub(event)


redactor = Redactor()


def _render_exc_then_scrub(logger: Any, method: str, event: dict[str, Any]) -> dict[str, Any]:
    # Tracebacks can quote connection strings: render them first, then scrub the text.
    return redactor(logger, method, structlog.processors.format_exc_info(logger, method, event))


def configure_logging(level: str = "info", fmt: str = "console", secrets: Iterable[str] = (), stream: Any = None) -> None:
    redactor.set_secrets(secrets)
    stream = stream or sys.stderr
    shared = [
        structlog.contextvars.merge_contextvars,
        structlog.stdlib.add_log_level,
        structlog.stdlib.add_logger_name,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
        _render_exc_then_scrub,
    ]
    renderer: Any = (
        structlog.processors.JSONRenderer(sort_keys=True)
        if fmt == "json"
        else structlog.dev.ConsoleRenderer(colors=False)
    )
    handler = logging.StreamHandler(stream)
    handler.setFormatter(
        structlog.stdlib.ProcessorFormatter(
            foreign_pre_chain=shared,
            processors=[structlog.stdlib.ProcessorFormatter.remove_processors_meta, renderer],
        )
    )
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(getattr(logging, level.upper()))
    # Skipped overlapping runs are counted by a listener, not logged one per tick.
    logging.getLogger("apscheduler.scheduler").setLevel(logging.ERROR)
    logging.getLogger("apscheduler.executors").setLevel(logging.ERROR)
    logging.getLogger("uvicorn.access").setLevel(logging.WARNING)
    # The pool logs every failed reconnect; the health job logs the outage once (database_down).
    logging.getLogger("psycopg.pool").setLevel(logging.ERROR)
    structlog.configure(
        processors=[*shared, structlog.stdlib.ProcessorFormatter.wrap_for_formatter],
        logger_factory=structlog.stdlib.LoggerFactory(),
        wrapper_class=structlog.stdlib.BoundLogger,
        cache_logger_on_first_use=False,
    )


def get_logger(name: str = "zsmon") -> Any:
    return structlog.get_logger(name)
