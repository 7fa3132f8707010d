"""What the HTTP API, /metrics and the status page may read of the running service, and nothing more.

``Service`` implements it; the HTTP layer is written against this protocol, so it
cannot reach into the runner, the scheduler or the HA coordinator.
"""
from __future__ import annotations

from typing import Any, Mapping, Protocol

from zsmon.core.config import Config
from zsmon.core.lifecycle import Ack
from zsmon.core.registry import BoundChecker
from zsmon.core.results import CheckResult
from zsmon.core.sessions import SessionStore


class ServiceView(Protocol):
    config: Config
    # Links to the Grafana dashboards, for the status page.
    dashboard_links: list[dict[str, str]]
    # The status page's sign-in sessions.
    sessions: SessionStore

    @property
    def checkers(self) -> Mapping[str, BoundChecker]:
        """The checkers this deployment runs, by name."""

    def latest_results(self) -> list[CheckResult]: ...

    def runbook(self, name: str) -> str | None:
        """The Markdown of runbook ``name`` (an alert, a checker, ``README`` for the index), None if unknown."""

    def readiness(self) -> list[str]:
        """Why this replica is not ready (empty: ready)."""

    def conceal(self, text: str) -> str:
        """``text`` without the monitored database's host and name (for readers not signed in)."""

    def memory_skipped(self) -> list[str]:
        """Invariants the latest runs skipped for want of memory (Redis): ready, but not all proven."""

    def describe_checker(self, name: str) -> dict[str, Any]: ...

    def run_check_now(self, name: str) -> CheckResult | None:
        """Run a checker now and publish its result; None when another replica holds its lease."""

    def exposition(self, accept: str | None) -> tuple[bytes, str]:
        """The /metrics body and content type for an Accept header."""

    def violations(self, checker: str | None = None, invariant: str | None = None, state: str | None = None,
                   since: float | None = None, cursor: str | None = None,
                   limit: int = 100) -> tuple[list[dict[str, Any]], str | None]:
        """Tracked violations and the cursor of the next page; raises LifecycleError without Redis."""

    def acks(self) -> list[Ack]: ...

    def ack_events(self) -> list[dict[str, Any]]:
        """The latest acknowledgement events (created, revoked, expired, ...), newest first."""

    def acknowledge(self, checker: str, invariant: str, entities: list[str] | None, reason: str,
                    expires_in: float | None = None, author: str | None = None) -> Ack: ...

    def revoke(self, ack_id: str, author: str | None = None) -> Ack: ...
