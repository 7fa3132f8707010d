"""Checker ``reputation``: agent scores, their task counters and their event log agree.

The platform updates ``reputation_scores`` (clamped score, counters) and then
inserts a ``reputation_events`` row carrying the unclamped delta, in two
statements outside one transaction. This checker proves the two stay in step
and that the population's score distribution has not shifted suddenly.

How each invariant is judged:

* ``score_bounds``, ``task_counters``, ``event_counter_reconciliation`` and
  ``score_replay`` come out of ONE set-based pass (``find_many``) over the
  scores joined with a per-agent aggregate of the task events.
* ``score_replay`` needs the clamped running sum ``x_k = clamp(x_{k-1} + d_k, 0, 100)``
  from ``x_0 = 50``. Clamping is not a plain window sum, but its final value has
  a closed form (the explicit Skorokhod map on ``[0, a]``, Kruk, Lehoczky,
  Ramanan & Shreve, Ann. Probab. 2007). With the free path ``p_k = 50 + d_1 + ... + d_k``::

      x_n = p_n - max( min(0, min_k p_k),  max_s min(p_s - 100, min_{u >= s} p_u) )

  i.e. one running sum, one suffix minimum (a running minimum in reverse order)
  and a ``GROUP BY``: exact ``numeric`` arithmetic, no per-agent query, no
  recursion, no rows pulled into Python. The tests compare it with a literal
  step-by-step replay on random paths that hit both bounds.
* Settle window: a run that lands between the platform's score update and its
  event insert sees the agent's counters one task ahead of its events and a
  score that does not replay, although nothing is wrong. Such an agent is not
  judged for ``event_counter_reconciliation`` and ``score_replay`` in this run
  when its ``updated_at`` or its latest task event is within ``settle_seconds``
  of the snapshot time *and* its disagreement has the in-between shape
  (counters ahead of the events, never behind). A crash leaves the pair out of
  step for good, so it is reported once the agent's last write is older than the
  window; anything else (events without an update, a score that differs with
  counters in step) is judged at once. The deferred agents are counted in the
  summary: deferred, not passed. The same pass decides it (the latest task
  event per agent is one more aggregate), so the window costs nothing.
  A busy agent is always "written lately", so a crash gap in its counters would
  hide behind the window for good: with Redis, the agents in the in-between
  shape are remembered (first seen, consecutive runs), and one that keeps it in
  3 consecutive runs spanning ``settle_seconds`` is judged anyway. A write in
  flight lasts milliseconds and closes by the next run; an agent caught between
  writes now and then (a different task each time) starts the count again.
* ``score_delta_range`` is one scan of the events.
* ``score_jump`` compares every agent's ``overall_score`` with its previous
  observation, kept in one Redis hash (``zsmon.core.memory.ColumnMemory``:
  streamed in batches, changes merged only when the result is published).
* ``distribution_drift`` keeps its baseline in Redis as the exact histogram of
  ``overall_score`` values (value -> agent count). Scores are ``DECIMAL(5,2)``,
  so there are at most 10,001 distinct values in [0, 100] whatever the number
  of agents: the baseline is small, and the two-sample Kolmogorov-Smirnov
  statistic computed from it is exact, not a sketch's approximation. KS is a
  dozen lines of integer arithmetic here (``ks_statistic``) rather than a SciPy
  dependency for one statistic; it is also exact where SciPy works in floats.
  The baseline is kept until it is reset (``reset_baseline`` below, exposed as
  a CLI command by the core), so a drift keeps reporting until an operator
  accepts the new population.
"""
from __future__ import annotations

import math
from datetime import datetime, timezone
from decimal import ROUND_CEILING, Decimal
from fractions import Fraction
from typing import Any, Iterable, Sequence

import redis
from pydantic import Field

from zsmon.checkers.platform import COLUMNS, reads
from zsmon.core.checker import Checker, CheckContext, CheckerSettings, Invariant
from zsmon.core.memory import StoredState
from zsmon.core.redis import redis_error
from zsmon.core.results import Violation

START_SCORE = Decimal(50)
TASK_EVENT_TYPES = ("task_completed", "task_failed")
KS_METRIC = "zerostate_reputation_drift_ks_statistic"
BASELINE_KEY = "drift_baseline"
LAST_SCORES_KEY = "last_scores"
SETTLING_KEY = "settling"  # JSON: agent -> [first seen, runs] while its counters stay ahead of its events
SETTLING_RUNS = 3          # consecutive runs (spanning settle_seconds) before such an agent is judged anyway


def baseline_key(key_prefix: str) -> str:
    """The Redis key of the drift baseline under zsmon's key prefix (``CheckContext.key`` layout)."""
    return f"{key_prefix}reputation:{BASELINE_KEY}"


def reset_baseline(redis: Any, key_prefix: str) -> bool:
    """Forget the drift baseline: the next run records the population it sees as the new one.

    Returns True when a baseline existed. Used by the CLI (``key_prefix`` is ``redis.key_prefix``).
    """
    return bool(redis.delete(baseline_key(key_prefix)))


def drift_limit(threshold: float, significance: float | None, n: int, m: int) -> tuple[Decimal, str]:
    """The KS statistic above which two populations of n and m agents count as drifted, and why.

    ``threshold`` alone, or the asymptotic two-sample critical value at ``significance``
    when that is larger (rounded up to 6 places, so the limit is never below it).
    """
    limit = Decimal(str(threshold))
    if significance is None:
        return limit, ""
    critical = math.sqrt(-math.log(significance / 2) / 2) * math.sqrt((n + m) / (n * m))
    critical_dec = Decimal(critical).quantize(Decimal("0.000001"), rounding=ROUND_CEILING)
    if critical_dec > limit:
        return critical_dec, f" (KS critical value at significance {significance:g} for {n} and {m} agents)"
    return limit, ""


def ks_statistic(a: Sequence[tuple[Decimal, int]], b: Sequence[tuple[Decimal, int]]) -> Fraction:
    """Exact two-sample Kolmogorov-Smirnov statistic ``sup_x |F_a(x) - F_b(x)|``.

    ``a`` and ``b`` are histograms: ``(value, count)`` pairs sorted by value, values
    distinct. The empirical CDFs only step at sample values, so the supremum is
    reached at one of them; ``|ca/na - cb/nb|`` is compared as ``|ca*nb - cb*na|``
    in integers and returned as a ``Fraction``.
    """
    na = sum(c for _, c in a)
    nb = sum(c for _, c in b)
    if na == 0 or nb == 0:
        raise ValueError("KS statistic needs two non-empty samples")
    i = j = ca = cb = best = 0
    while i < len(a) or j < len(b):
        if j == len(b) or (i < len(a) and a[i][0] < b[j][0]):
            x = a[i][0]
        else:
            x = b[j][0]
        while i < len(a) and a[i][0] == x:
            ca += a[i][1]
            i += 1
        while j < len(b) and b[j][0] == x:
            cb += b[j][1]
            j += 1
        best = max(best, abs(ca * nb - cb * na))
    return Fraction(best, na * nb)


def _median(hist: Sequence[tuple[Decimal, int]]) -> Decimal | None:
    n = sum(c for _, c in hist)
    if n == 0:
        return None
    seen = 0
    for value, count in hist:
        seen += count
        if 2 * seen >= n:
            return value
    return hist[-1][0]


class ReputationSettings(CheckerSettings):
    jump_limit: Decimal = Field(Decimal(20), gt=0, description=(
        "score_jump: the most overall_score may move (up or down, in points) between two observations "
        "of the same agent (two runs of this checker)."))
    drift_threshold: float = Field(0.25, gt=0, le=1, description=(
        "distribution_drift: the two-sample Kolmogorov-Smirnov statistic between the baseline and the "
        "current overall_score distribution above which the population has drifted."))
    drift_significance: float | None = Field(None, gt=0, lt=1, description=(
        "distribution_drift: when set (e.g. 0.01), the limit is raised to the two-sample KS critical value "
        "at this significance for the two population sizes, c(a)*sqrt((n+m)/(n*m)) with "
        "c(a) = sqrt(-ln(a/2)/2), whenever that exceeds drift_threshold: a few dozen agents then do not "
        "alert on sampling noise. Unset: drift_threshold alone (docs/invariants.md)."))
    drift_min_sample: int = Field(30, ge=2, description=(
        "distribution_drift: fewest agents (in the baseline and now) for the KS statistic to be judged; "
        "below it the invariant is skipped."))
    delta_completed_min: Decimal = Field(Decimal("0.5"), description=(
        "score_delta_range: smallest score_delta a task_completed event may carry "
        "(2 - 1 for a poor rating - 0.5 for a slow response)."))
    delta_completed_max: Decimal = Field(Decimal(5), description=(
        "score_delta_range: largest score_delta a task_completed event may carry "
        "(2 + 2 for a high rating + 1 for a fast response)."))
    delta_failed: Decimal = Field(Decimal(-5), description=(
        "score_delta_range: the score_delta every task_failed event carries."))
    settle_seconds: float = Field(60.0, ge=0, description=(
        "event_counter_reconciliation and score_replay: an agent whose counters are ahead of its task events "
        "(a score update whose event is not written yet) and whose updated_at or latest task event is this "
        "recent (seconds before the snapshot) is not judged in this run, since the platform may be between "
        "its two writes; a crash that leaves them so is reported once older, or (with Redis) once the agent "
        "kept that shape in 3 consecutive runs spanning this long. Counted as deferred in the summary. "
        "0 judges every agent at once."))


# One pass over the scores and a per-agent aggregate of the task events; the
# score_replay expression is the closed-form clamped replay (see the module doc).
_AGENT_PASS = """
WITH task_events AS (
    SELECT agent_did, event_type, score_delta, created_at, id,
           50 + sum(score_delta) OVER (PARTITION BY agent_did ORDER BY created_at, id
                                       ROWS UNBOUNDED PRECEDING) AS path
    FROM {reputation_events}
    WHERE event_type IN ('task_completed', 'task_failed')
), with_suffix AS (
    SELECT agent_did, event_type, score_delta, created_at, path,
           min(path) OVER (PARTITION BY agent_did ORDER BY created_at DESC, id DESC
                           ROWS UNBOUNDED PRECEDING) AS suffix_min
    FROM task_events
), replayed AS (
    SELECT agent_did,
           count(*) FILTER (WHERE event_type = 'task_completed') AS completed_events,
           count(*) FILTER (WHERE event_type = 'task_failed') AS failed_events,
           count(*) AS task_events,
           50 + sum(score_delta)
             - greatest(least(0, min(path)), max(least(path - 100, suffix_min))) AS replayed_score,
           50 + sum(score_delta) AS unclamped_score,
           max(created_at) AS last_event_at
    FROM with_suffix
    GROUP BY agent_did
), agents0 AS (
    SELECT coalesce(s.agent_did, r.agent_did) AS agent_did,
           s.agent_did IS NOT NULL AS has_row,
           s.overall_score, s.reliability_score, s.quality_score, s.speed_score,
           s.total_tasks, s.successful_tasks, s.failed_tasks,
           coalesce(r.completed_events, 0) AS completed_events,
           coalesce(r.failed_events, 0) AS failed_events,
           coalesce(r.task_events, 0) AS task_events,
           coalesce(r.replayed_score, 50) AS replayed_score,
           coalesce(r.unclamped_score, 50) AS unclamped_score,
           -- Settle window (module doc): written lately, and the counters ahead of the task events as
           -- between the score update and its event insert (never behind them, never without a row).
           -- Agents that kept this shape too long across runs (%(overdue)s) are judged all the same.
           (%(settle)s > 0 AND s.agent_did IS NOT NULL
            AND s.successful_tasks >= coalesce(r.completed_events, 0)
            AND s.failed_tasks >= coalesce(r.failed_events, 0)
            AND s.successful_tasks + s.failed_tasks > coalesce(r.task_events, 0)
            AND (s.updated_at >= transaction_timestamp() - make_interval(secs => %(settle)s)
                 OR r.last_event_at >= transaction_timestamp() - make_interval(secs => %(settle)s)))
             IS TRUE AS shape
    FROM {reputation_scores} s
    FULL OUTER JOIN replayed r ON r.agent_did = s.agent_did
), agents AS (
    SELECT a0.*, a0.shape AND a0.agent_did <> ALL(%(overdue)s::text[]) AS settling
    FROM agents0 a0
)
SELECT 'score_bounds' AS invariant, 'agent' AS entity_type, a.agent_did AS entity_id,
       (CASE WHEN w.val < 0 THEN 0 ELSE 100 END)::text AS expected, w.val::text AS actual,
       w.val - CASE WHEN w.val < 0 THEN 0 ELSE 100 END AS difference,
       w.col || ' = ' || w.val || ' is outside [0, 100]'
         || CASE WHEN w.n > 1 THEN ' (' || w.n || ' of the four scores are)' ELSE '' END AS detail
FROM agents a
CROSS JOIN LATERAL (
    SELECT v.col, v.val, count(*) OVER () AS n
    FROM (VALUES ('overall_score', a.overall_score), ('reliability_score', a.reliability_score),
                 ('quality_score', a.quality_score), ('speed_score', a.speed_score)) AS v(col, val)
    WHERE v.val < 0 OR v.val > 100
    ORDER BY greatest(-v.val, v.val - 100) DESC
    LIMIT 1
) AS w
WHERE a.has_row

UNION ALL
SELECT 'task_counters', 'agent', a.agent_did,
       (a.successful_tasks + a.failed_tasks)::text, a.total_tasks::text,
       CASE WHEN a.total_tasks <> a.successful_tasks + a.failed_tasks
            THEN (a.total_tasks - a.successful_tasks - a.failed_tasks)::numeric
            ELSE least(a.total_tasks, a.successful_tasks, a.failed_tasks)::numeric END,
       'total_tasks = ' || a.total_tasks || ', successful_tasks = ' || a.successful_tasks
         || ', failed_tasks = ' || a.failed_tasks
         || CASE WHEN least(a.total_tasks, a.successful_tasks, a.failed_tasks) < 0
                 THEN ': a counter is negative' ELSE '' END
         || CASE WHEN a.total_tasks <> a.successful_tasks + a.failed_tasks
                 THEN ': successful + failed <> total' ELSE '' END
FROM agents a
WHERE a.has_row
  AND (a.total_tasks < 0 OR a.successful_tasks < 0 OR a.failed_tasks < 0
       OR a.total_tasks <> a.successful_tasks + a.failed_tasks)

UNION ALL
SELECT 'event_counter_reconciliation', 'agent', a.agent_did,
       CASE WHEN abs(a.successful_tasks - a.completed_events) >= abs(a.failed_tasks - a.failed_events)
            THEN a.completed_events ELSE a.failed_events END::text,
       CASE WHEN NOT a.has_row THEN NULL
            WHEN abs(a.successful_tasks - a.completed_events) >= abs(a.failed_tasks - a.failed_events)
            THEN a.successful_tasks ELSE a.failed_tasks END::text,
       CASE WHEN NOT a.has_row THEN NULL
            WHEN abs(a.successful_tasks - a.completed_events) >= abs(a.failed_tasks - a.failed_events)
            THEN a.successful_tasks - a.completed_events ELSE a.failed_tasks - a.failed_events END::numeric,
       CASE WHEN NOT a.has_row
            THEN 'no reputation_scores row for an agent with ' || a.completed_events
                 || ' task_completed and ' || a.failed_events || ' task_failed events'
            ELSE 'successful_tasks = ' || a.successful_tasks || ' vs ' || a.completed_events
                 || ' task_completed events; failed_tasks = ' || a.failed_tasks || ' vs '
                 || a.failed_events || ' task_failed events' END
FROM agents a
WHERE (NOT a.has_row
       OR a.successful_tasks <> a.completed_events OR a.failed_tasks <> a.failed_events)
  AND NOT a.settling

UNION ALL
SELECT 'score_replay', 'agent', a.agent_did,
       a.replayed_score::text, a.overall_score::text,
       a.overall_score - a.replayed_score,
       CASE WHEN NOT a.has_row
            THEN 'no reputation_scores row; its ' || a.task_events || ' task events replay to '
                 || a.replayed_score
            ELSE 'replaying ' || a.task_events || ' task events from 50 (clamped to [0, 100]) gives '
                 || a.replayed_score || ', the row says ' || a.overall_score
                 || CASE WHEN a.unclamped_score <> a.replayed_score
                         THEN ' (unclamped sum ' || a.unclamped_score || ')' ELSE '' END END
FROM agents a
WHERE (NOT a.has_row OR a.overall_score <> a.replayed_score)
  AND NOT a.settling

UNION ALL
SELECT '_deferred', 'agent', a.agent_did,
       a.task_events::text, (a.successful_tasks + a.failed_tasks)::text,
       (a.successful_tasks + a.failed_tasks - a.task_events)::numeric,
       'deferred: ' || (a.successful_tasks + a.failed_tasks - a.task_events) || ' task(s) counted without an event'
FROM agents a
WHERE a.settling

UNION ALL
SELECT '_settling', 'agent', a.agent_did, NULL, NULL, NULL::numeric, NULL
FROM agents a
WHERE a.shape
"""

_DELTA_RANGE = """
SELECT e.id AS entity_id,
       CASE WHEN e.event_type = 'task_failed' THEN %(failed)s::text
            ELSE '[' || %(cmin)s::text || ', ' || %(cmax)s::text || ']' END AS expected,
       e.score_delta::text AS actual,
       CASE WHEN e.event_type = 'task_failed' THEN e.score_delta - %(failed)s
            WHEN e.score_delta < %(cmin)s THEN e.score_delta - %(cmin)s
            ELSE e.score_delta - %(cmax)s END AS difference,
       e.event_type || ' event of ' || e.agent_did
         || coalesce(' for task ' || e.task_id, '') || ' at ' || e.created_at
         || ' carries ' || e.score_delta || CASE WHEN e.event_type = 'task_failed'
              THEN ', not ' || %(failed)s::text
              ELSE ', outside [' || %(cmin)s::text || ', ' || %(cmax)s::text || ']' END AS detail
FROM {reputation_events} e
WHERE (e.event_type = 'task_failed' AND e.score_delta <> %(failed)s)
   OR (e.event_type = 'task_completed' AND (e.score_delta < %(cmin)s OR e.score_delta > %(cmax)s))
"""

_AGENT_INVARIANTS = ("score_bounds", "task_counters", "event_counter_reconciliation", "score_replay")

_SETTLED_INVARIANTS = ("event_counter_reconciliation", "score_replay")

_SUMMARY = {
    "score_bounds": "{n} of {agents} agents have a score outside [0, 100]",
    "task_counters": "{n} of {agents} agents have task counters that do not add up",
    "event_counter_reconciliation": "{n} of {agents} agents' counters disagree with their task events "
                                    "(a crash between the score update and the event insert leaves this)",
    "score_replay": "{n} of {agents} agents' overall_score does not replay from their task events",
}


class _KsGauge:
    """Serves ``zerostate_reputation_drift_ks_statistic`` only while a fresh value is known."""

    def __init__(self) -> None:
        self.value: float | None = None

    def _family(self) -> Any:
        from prometheus_client.core import GaugeMetricFamily

        return GaugeMetricFamily(
            KS_METRIC, "Two-sample Kolmogorov-Smirnov statistic between the stored baseline and the current "
                       "distribution of agents' overall_score, from the latest reputation check that judged it.")

    def describe(self) -> Iterable[Any]:
        yield self._family()

    def collect(self) -> Iterable[Any]:
        value = self.value
        if value is None:  # not judged by the latest run: the series goes stale, not frozen
            return
        family = self._family()
        family.add_metric([], value)
        yield family


class ReputationChecker(Checker):
    name = "reputation"
    description = ("Agents' reputation scores stay in range, agree with their task counters and replay exactly "
                   "from their task events; scores do not jump and the population does not drift suddenly.")
    _SCORES = ("agent_did", "overall_score")
    _COUNTERS = ("agent_did", "successful_tasks", "failed_tasks", "updated_at")
    _EVENTS = ("agent_did", "event_type", "created_at", "id")
    invariants = (
        Invariant("score_bounds", "All four scores of an agent (overall, reliability, quality, speed) are in "
                  "[0, 100].", entity_type="agent", severity="warning",
                  reads=reads("reputation_scores", "agent_did", "overall_score", "reliability_score",
                              "quality_score", "speed_score")),
        Invariant("task_counters", "Task counters are >= 0 and successful_tasks + failed_tasks = total_tasks.",
                  entity_type="agent", severity="warning",
                  reads=reads("reputation_scores", "agent_did", "total_tasks", "successful_tasks", "failed_tasks")),
        Invariant("event_counter_reconciliation", "successful_tasks equals the agent's task_completed events "
                  "and failed_tasks its task_failed events.", entity_type="agent", severity="warning",
                  reads=reads("reputation_scores", *_COUNTERS) + reads("reputation_events", *_EVENTS)),
        Invariant("score_replay", "Replaying the agent's task events in order from 50, clamping to [0, 100] "
                  "after each, gives overall_score.", entity_type="agent", severity="warning",
                  reads=reads("reputation_scores", "overall_score", *_COUNTERS)
                  + reads("reputation_events", "score_delta", *_EVENTS)),
        Invariant("score_delta_range", "A task_failed event carries -5; a task_completed event carries a delta "
                  "in [0.5, 5].", entity_type="event", severity="warning",
                  reads=reads("reputation_events", "task_id", "score_delta", *_EVENTS)),
        Invariant("score_jump", "overall_score moves by no more than the limit (default 20 points) between two "
                  "observations.", entity_type="agent", severity="warning", needs_memory=True,
                  reads=reads("reputation_scores", *_SCORES)),
        Invariant("distribution_drift", "The distribution of overall_score over agents has not drifted from the "
                  "stored baseline beyond the limit (two-sample Kolmogorov-Smirnov statistic, default 0.25, "
                  "judged with at least 30 agents).", entity_type="system", severity="warning",
                  needs_memory=True, reads=reads("reputation_scores", "overall_score")),
    )
    columns = {t: COLUMNS[t] for t in ("reputation_scores", "reputation_events")}
    Settings = ReputationSettings
    default_interval_seconds = 60.0

    def __init__(self, settings: CheckerSettings | None = None) -> None:
        super().__init__(settings)
        self._ks = _KsGauge()

    # ---- metrics ---------------------------------------------------------------
    def register_metrics(self, registry: Any) -> None:
        registry.register(self._ks)

    def _set_ks(self, value: float | None) -> None:
        self._ks.value = value

    # ---- run -------------------------------------------------------------------
    def run(self, ctx: CheckContext) -> None:
        s: ReputationSettings = ctx.settings  # type: ignore[assignment]
        counts, deferred, example, overdue = self._agent_pass(ctx, s)
        if overdue and ctx.log is not None:
            ctx.log.info("reputation_settle_overdue", agents=len(overdue), example=overdue[0])
        if any(counts.values()) or deferred:
            agents = ctx.scalar("SELECT count(*) FROM {reputation_scores}")
            for inv, n in counts.items():
                text = [_SUMMARY[inv].format(n=n, agents=agents)] if n else []
                if overdue and inv in _SETTLED_INVARIANTS:
                    text.append(f"{len(overdue)} agents judged although written lately (e.g. {overdue[0]}): "
                                f"their counters stayed ahead of their task events in {SETTLING_RUNS} runs over "
                                f"{s.settle_seconds:g} s, longer than a write in flight (a crash gap their "
                                f"traffic kept hiding)")
                if deferred and inv in _SETTLED_INVARIANTS:
                    text.append(self._deferred_text(deferred, example, agents, s.settle_seconds))
                if text:
                    ctx.summarize(inv, "; ".join(text))
        ctx.find("score_delta_range", _DELTA_RANGE,
                 {"failed": s.delta_failed, "cmin": s.delta_completed_min, "cmax": s.delta_completed_max})
        self._judge_jump(ctx, s)
        if ctx.redis is None:
            # The runner marks drift as skipped with the reason; the gauge must not freeze at an old value.
            ctx.after_success(lambda: self._set_ks(None))
            return
        try:
            self._judge_drift(ctx, s)
        except redis.RedisError as exc:  # Redis lost mid-run: the SQL invariants still stand
            ctx.skip("distribution_drift", f"needs memory across runs: {redis_error(exc)}")
            ctx.after_success(lambda: self._set_ks(None))

    def _agent_pass(self, ctx: CheckContext, s: ReputationSettings
                    ) -> tuple[dict[str, int], int, str | None, list[str]]:
        """Judge the four per-agent invariants in one pass, and count the agents the settle window
        deferred (the pass's ``_deferred`` rows). Returns (counts per invariant, deferred, one deferred
        agent, the agents judged although in the window because their in-between shape outlasted it)."""
        now = ctx.snapshot_time
        settling = ctx.state(SETTLING_KEY)
        memory = self._read_settling(ctx, settling)
        overdue = sorted(d for d, (since, runs) in memory.items()
                         if runs >= SETTLING_RUNS - 1 and now - since >= s.settle_seconds)
        found = ctx.find_many(_AGENT_PASS, _AGENT_INVARIANTS, {"settle": s.settle_seconds, "overdue": overdue})
        deferred = [v.entity_id for v in found["_deferred"].sample] if "_deferred" in found else []
        shaped = [v.entity_id for v in found["_settling"].sample] if "_settling" in found else []
        kept = {d: (memory[d][0], memory[d][1] + 1) if d in memory else (now, 1) for d in shaped}
        settling.save(kept)
        counts = {inv: found[inv].count for inv in _AGENT_INVARIANTS}
        return counts, len(deferred), min(deferred, default=None), overdue

    @staticmethod
    def _read_settling(ctx: CheckContext, settling: StoredState) -> dict[str, tuple[float, int]]:
        """Agents in the in-between shape at the previous runs: did -> (first seen, consecutive runs)."""
        try:
            return {d: (float(v[0]), int(v[1])) for d, v in (settling.load() or {}).items()}
        except redis.RedisError:
            return {}  # without the memory every such agent is deferred, as without Redis
        except (ValueError, TypeError, KeyError, IndexError):
            if ctx.log is not None:
                ctx.log.warning("settling_memory_unreadable", key=settling.key)
            return {}

    @staticmethod
    def _deferred_text(n: int, example: str | None, agents: int, settle: float) -> str:
        example = f" (e.g. {example})" if example else ""
        return (f"{n} of {agents} agents deferred, not judged in this run{example}: their counters are ahead of "
                f"their task events and they were written in the last {settle:g} s (settle_seconds), as between "
                f"the platform's score update and its event insert; a crash that leaves them so is reported once "
                f"their last write is older")

    # ---- score_jump --------------------------------------------------------------
    def _judge_jump(self, ctx: CheckContext, s: ReputationSettings) -> None:
        limit = s.jump_limit
        obs = ctx.memory(LAST_SCORES_KEY, parse=Decimal).observe(
            "score_jump", "SELECT agent_did, overall_score FROM {reputation_scores}",
            breaks=lambda prev, cur: abs(cur - prev) > limit, recorded="the scores of {n} agents", changes_only=True)
        if obs is None or obs.first:  # a first observation is skipped (ColumnMemory says why), never a pass
            return
        since = (" since the observation at "
                 + datetime.fromtimestamp(obs.previous_at, timezone.utc).isoformat(timespec="seconds")
                 if obs.previous_at is not None else "")
        ctx.report("score_jump", [
            Violation("score_jump", "agent", did, old, now, now - old,
                      f"overall_score moved {now - old:+} points ({old} -> {now}){since}; the limit is {limit}")
            for did, old, now in obs.worst], obs.count)
        if obs.count:
            ctx.summarize("score_jump", f"{obs.count} of {obs.compared} agents observed twice moved more than "
                                        f"{limit} points{since}")

    # ---- distribution_drift -----------------------------------------------------------
    def _judge_drift(self, ctx: CheckContext, s: ReputationSettings) -> None:
        stored = ctx.state(BASELINE_KEY)
        current = [(row["overall_score"], int(row["n"])) for row in ctx.query(
            "SELECT overall_score, count(*) AS n FROM {reputation_scores} GROUP BY overall_score ORDER BY overall_score")]
        n_now = sum(c for _, c in current)
        data = stored.load()
        baseline = None
        if data is not None:
            try:
                baseline = ([(Decimal(v), int(c)) for v, c in zip(data["values"], data["counts"])],
                            float(data["recorded_at"]))
            except (ArithmeticError, ValueError, KeyError, TypeError):
                if ctx.log is not None:
                    ctx.log.warning("drift_baseline_unreadable", key=stored.key)
        if n_now < s.drift_min_sample:
            ctx.skip("distribution_drift", f"only {n_now} agents have a score, fewer than drift_min_sample "
                                           f"({s.drift_min_sample}): too few to judge a distribution")
            ctx.after_success(lambda: self._set_ks(None))
            return
        if baseline is None:
            stored.save({"recorded_at": ctx.snapshot_time, "agents": n_now,
                         "values": [str(v) for v, _ in current], "counts": [c for _, c in current]})
            ctx.after_success(lambda: self._set_ks(None))
            ctx.skip("distribution_drift", "baseline recorded now; drift judged from the next run")
            return
        hist, recorded_at = baseline
        n_base = sum(c for _, c in hist)
        when = datetime.fromtimestamp(recorded_at, timezone.utc).isoformat(timespec="seconds")
        if n_base < s.drift_min_sample:
            ctx.skip("distribution_drift", f"the baseline recorded at {when} holds only {n_base} agents, fewer than "
                                           f"drift_min_sample ({s.drift_min_sample}): reset it")
            ctx.after_success(lambda: self._set_ks(None))
            return
        d = ks_statistic(hist, current)
        expected, why = drift_limit(s.drift_threshold, s.drift_significance, n_base, n_now)
        shown = Decimal(d.numerator) / Decimal(d.denominator)
        shown = shown.quantize(Decimal("0.000001"))
        text = (f"KS statistic {shown} between {n_now} agents now (median {_median(current)}) and the baseline "
                f"of {n_base} agents recorded at {when} (median {_median(hist)}); limit {expected}{why}")
        violations = []
        if d > Fraction(expected):
            violations.append(Violation("distribution_drift", "system", "global", expected, shown,
                                        shown - expected, text))
        ctx.report("distribution_drift", violations)
        ctx.summarize("distribution_drift", text)
        value = float(d)
        ctx.after_success(lambda: self._set_ks(value))
