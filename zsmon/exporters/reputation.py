"""Exporter ``reputation``: the agents' score distribution and the reputation event counts.

* ``zerostate_reputation_score`` - an OpenMetrics *gauge histogram*: the
  distribution of ``overall_score`` over agents right now, buckets every 10
  points. A gauge histogram (not a histogram) because it is a snapshot of a
  population that can move both ways, not a stream of observations; its
  ``_gcount`` is the agent count and ``_gsum`` the sum of scores.
* ``zerostate_reputation_score_quantile{quantile}`` - p10/p50/p90 computed
  by PostgreSQL (``percentile_cont``), typed ``summary`` with quantile samples
  only: ``promtool check metrics`` rejects a ``quantile`` label on a gauge.
* ``zerostate_reputation_agents`` - agents with a reputation row.
* ``zerostate_reputation_events_total{event_type}`` - events by type, the type
  bounded to ``task_completed``, ``task_failed`` and ``other``; use ``rate()``.

The latest Kolmogorov-Smirnov drift statistic,
``zerostate_reputation_drift_ks_statistic``, is served by the ``reputation``
checker itself (it computes it), not here. No metric carries an agent label.
Collected on the scheduler (default every 30 s) inside one read-only snapshot;
``/metrics`` serves the cached families.
"""
from __future__ import annotations

from typing import Iterable

from prometheus_client.core import CounterMetricFamily, GaugeHistogramMetricFamily, GaugeMetricFamily, Metric

from zsmon.core.exporter import CollectContext, Exporter, ExporterSettings

BUCKETS = tuple(range(10, 101, 10))
QUANTILES = ("0.1", "0.5", "0.9")
EVENT_TYPES = ("task_completed", "task_failed", "other")

_DISTRIBUTION = (
    "SELECT count(*) AS agents, coalesce(sum(overall_score), 0) AS score_sum, "
    + ", ".join(f"count(*) FILTER (WHERE overall_score <= {le}) AS le_{le}" for le in BUCKETS)
    + ", percentile_cont(ARRAY[" + ", ".join(QUANTILES)
    + "]::float8[]) WITHIN GROUP (ORDER BY overall_score) AS quantiles FROM reputation_scores"
)

_EVENTS = """
SELECT CASE WHEN event_type IN ('task_completed', 'task_failed') THEN event_type ELSE 'other' END AS event_type,
       count(*) AS n
FROM reputation_events
GROUP BY 1
"""


class ReputationExporter(Exporter):
    name = "reputation"
    description = "Distribution of agents' reputation scores (gauge histogram, quantiles) and reputation events."
    Settings = ExporterSettings
    default_interval_seconds = 30.0

    def collect(self, ctx: CollectContext) -> Iterable[Metric]:
        row = ctx.query(_DISTRIBUTION)[0]
        agents = int(row["agents"])
        buckets = [(str(float(le)), float(row[f"le_{le}"])) for le in BUCKETS] + [("+Inf", float(agents))]
        yield GaugeHistogramMetricFamily(
            "zerostate_reputation_score",
            "Agents by overall reputation score now (0-100, buckets every 10 points).",
            buckets=buckets, gsum_value=float(row["score_sum"]))

        # Typed summary, not gauge: promtool rejects a ``quantile`` label on anything else. It carries
        # only quantile samples: a summary's _count/_sum are counters, and a population's are not
        # (the gauge histogram's _gcount/_gsum already say them).
        quantiles = Metric("zerostate_reputation_score_quantile",
                           "Quantiles of agents' overall reputation score now (percentile_cont over all agents).",
                           "summary")
        for q, value in zip(QUANTILES, row["quantiles"] or ()):
            if value is not None:
                quantiles.add_sample("zerostate_reputation_score_quantile", {"quantile": q}, round(float(value), 4))
        yield quantiles

        yield GaugeMetricFamily("zerostate_reputation_agents", "Agents with a reputation score row.", value=agents)

        counts = {t: 0 for t in EVENT_TYPES}
        for r in ctx.query(_EVENTS):
            counts[r["event_type"]] += int(r["n"])
        events = CounterMetricFamily(
            "zerostate_reputation_events_total",
            "Reputation events recorded by the platform, by type (task_completed, task_failed, other).",
            labels=["event_type"])
        for t in EVENT_TYPES:
            events.add_metric([t], float(counts[t]))
        yield events
