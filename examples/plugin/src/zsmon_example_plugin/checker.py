"""Checker ``agent_liveness``: an agent that says it is active keeps sending heartbeats.

The platform sets ``agents.last_seen_at`` on every heartbeat. An ``online``
or ``busy`` agent that has not been seen for longer than ``max_silence_seconds`` still
receives auctions and tasks it will never run: the scheduler should have
marked it offline. One set-based query, judged in zsmon's read-only snapshot.

The file imports nothing of zsmon but ``zsmon.sdk``: it knows neither the
registry nor the config. zsmon finds it through the ``zsmon.checkers`` entry
point, validates ``checkers.agent_liveness.settings`` against ``Settings`` and
hands the instance its settings.
"""
from __future__ import annotations

from pydantic import Field

from zsmon.sdk import Checker, CheckContext, CheckerSettings, Invariant


class AgentLivenessSettings(CheckerSettings):
    # Every field: Field(default, description=...); `zsmon checkers explain` shows them.
    max_silence_seconds: float = Field(300.0, gt=0, description="An active agent silent for longer than this "
                                       "(or never seen) is a violation.")
    statuses: list[str] = Field(["online", "busy"], min_length=1, description="Agent statuses that promise heartbeats.")


class AgentLivenessChecker(Checker):
    name = "agent_liveness"
    description = "Agents that claim to be active have sent a heartbeat recently."
    invariants = (
        Invariant("silent_active_agent",
                  "An agent whose status promises heartbeats was seen within max_silence_seconds "
                  "(otherwise it is still offered work it will never run).",
                  # The difference is the silence beyond the limit: it grows with the clock, so its growth
                  # alone must not undo an acknowledgement of a known-dead agent.
                  entity_type="agent", severity="warning", difference_is_age=True),
    )
    Settings = AgentLivenessSettings
    default_interval_seconds = 60.0
    # The "how to resolve" of the runbook zsmon generates and serves at /runbooks/<Alert> (Markdown);
    # `runbook_url = "https://..."` would link a runbook of your own instead.
    runbook_text = """\
1. Is the agent process alive? Its host's monitoring and the platform's logs for its DID tell.
2. If it died, mark it offline through the platform so the scheduler stops assigning it tasks;
   if it runs but stopped reporting, restart its heartbeat.
The alert resolves at the first run that sees a recent `last_seen_at` or a non-active status."""

    settings: AgentLivenessSettings

    def run(self, ctx: CheckContext) -> None:
        ctx.find(
            "silent_active_agent",
            """
            SELECT a.did AS entity_id,
                   'a heartbeat within ' || %(limit)s || ' s' AS expected,
                   coalesce(to_char(a.last_seen_at AT TIME ZONE 'UTC', 'YYYY-MM-DD"T"HH24:MI:SS"Z"'), 'never')
                       AS actual,
                   round(extract(epoch FROM now() - a.last_seen_at)::numeric - %(limit)s::numeric, 3) AS difference,
                   'agent ' || coalesce(nullif(a.name, ''), a.did) || ' is ' || a.status || ' but '
                       || CASE WHEN a.last_seen_at IS NULL THEN 'has never sent a heartbeat'
                               ELSE 'sent no heartbeat for '
                                    || round(extract(epoch FROM now() - a.last_seen_at)) || ' s' END AS detail
            FROM agents a
            WHERE a.status = ANY(%(statuses)s)
              AND (a.last_seen_at IS NULL
                   OR a.last_seen_at < now() - make_interval(secs => %(limit)s))
            """,
            {"limit": self.settings.max_silence_seconds, "statuses": list(self.settings.statuses)},
        )
