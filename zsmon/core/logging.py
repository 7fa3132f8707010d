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
    (re.compile(r"(?P<pre>\b[a-z][a-z0-9+.-]*://[^:/@\s]*:)[^@\s]+(?P<post>@)", re.I), r"\g<pre>***\g<post>"),
    (re.compile(r"(?P<pre>\bBearer\s+)\S+", re.I), r"\g<pre>***"),
    (re.compile(r"(?P<pre>\bpassword\s*=\s*)('[^']*'|\S+)", re.I), r"\g<pre>***"),
]


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
            for pattern, repl in _PATTERNS:
                value = pattern.sub(repl, value)
            return value
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
