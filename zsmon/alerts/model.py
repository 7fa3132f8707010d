"""What the renderers render: the config and the registries of checkers and exporters, as plain values.

Rules, Alertmanager routing, dashboards, runbooks and the promtool tests all read
one ``Model``, so a checker or invariant added to the registry appears in every
one of them without a list to edit anywhere.
"""
from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field
from decimal import Decimal
from typing import Any
from urllib.parse import urlencode

from zsmon.core.config import Config, ConfigError
from zsmon.core.registry import Registry

API_JOB = "zerostate-api"
ZSMON_JOB = "zsmon"
POSTGRES_JOB = "postgres"
REDIS_JOB = "redis"

# Multi-window, multi-burn-rate alerts (Google SRE workbook, chapter 5): the share of the
# period's error budget that may burn within the long window before the alert fires.
# The factor is computed, never written down: share x period / long window.
BURN_WINDOWS = (
    # (alert, severity, long, short, budget share)
    ("ApiErrorBudgetFastBurn", "critical", "1h", "5m", Decimal("0.02")),
    ("ApiErrorBudgetFastBurn", "critical", "6h", "30m", Decimal("0.05")),
    ("ApiErrorBudgetSlowBurn", "warning", "1d", "2h", Decimal("0.10")),
    ("ApiErrorBudgetSlowBurn", "warning", "3d", "6h", Decimal("0.10")),
)

_UNITS = (("d", 86400), ("h", 3600), ("m", 60), ("s", 1))


def seconds_of(duration: str) -> int:
    """``"1h30m"`` -> 5400 (the subset of Prometheus durations this package writes)."""
    total, rest = 0, duration
    for unit, size in _UNITS:
        m = re.match(rf"^(\d+){unit}", rest)
        if m:
            total += int(m.group(1)) * size
            rest = rest[m.end():]
    if rest:
        raise ValueError(f"unsupported duration {duration!r}")
    return total


def duration(seconds: float) -> str:
    """A Prometheus duration for ``seconds`` (rounded up to whole seconds): 90 -> ``1m30s``, 0 -> ``0s``."""
    left = int(math.ceil(seconds))
    if left <= 0:
        return "0s"
    out = ""
    for unit, size in _UNITS:
        if left >= size:
            out += f"{left // size}{unit}"
            left %= size
    return out


def camel(snake: str) -> str:
    """``channel_conservation`` -> ``ChannelConservation``."""
    return "".join(part[:1].upper() + part[1:] for part in re.split(r"[^A-Za-z0-9]+", snake) if part)


def promql_string(value: str) -> str:
    """A PromQL double-quoted string literal."""
    return json.dumps(value)


def safe_prom_text(text: str) -> str:
    """Text copied into an alert annotation must not open a Go template action."""
    return text.replace("{{", "{ {").replace("}}", "} }")


@dataclass(frozen=True)
class InvariantView:
    checker: str
    id: str
    description: str
    entity_type: str
    severity: str
    needs_memory: bool
    alert: str
    for_seconds: int
    runbook_url: str

    @property
    def selector(self) -> str:
        return f"checker={promql_string(self.checker)}, invariant={promql_string(self.id)}"


@dataclass(frozen=True)
class CheckerView:
    name: str
    description: str
    interval_seconds: float
    stale_after_seconds: int
    failing_for_seconds: int
    invariants: tuple[InvariantView, ...]
    # The checker's own runbook (plugins, YAML checkers); None: zsmon generates one per invariant.
    own_runbook: str | None = None
    # With a critical invariant: how long without a completed run pages (CriticalInvariantsUnverified).
    unverified_after_seconds: int | None = None
    # Where it comes from (builtin, plugin, yaml); a YAML checker's query and its own "how to resolve".
    source: str = "builtin"
    query: str | None = None
    resolve: str | None = None

    @property
    def critical_invariants(self) -> list[str]:
        return [i.id for i in self.invariants if i.severity == "critical"]

    @property
    def selector(self) -> str:
        return f"checker={promql_string(self.name)}"

    @property
    def worst_severity(self) -> str:
        order = {"critical": 0, "warning": 1, "info": 2}
        return min((i.severity for i in self.invariants), key=order.__getitem__, default="info")


@dataclass(frozen=True)
class ExporterView:
    name: str
    interval_seconds: float
    stale_after_seconds: int

    @property
    def selector(self) -> str:
        return f"exporter={promql_string(self.name)}"


@dataclass(frozen=True)
class BurnRate:
    alert: str
    severity: str
    long: str
    short: str
    share: Decimal
    factor: Decimal
    period_days: int

    @property
    def budget_gone_in(self) -> str:
        """How long the whole period's budget lasts at this burn rate, e.g. ``2d 2h``."""
        hours = int(Decimal(self.period_days * 24) / self.factor)
        days, hours = divmod(hours, 24)
        return (f"{days}d " if days else "") + f"{hours}h"


@dataclass
class Model:
    config: Config
    checkers: list[CheckerView]
    exporters: list[ExporterView]
    burn_rates: list[BurnRate]
    slo_budget: str  # 1 - objective, as an exact decimal string ("0.001")
    static: dict[str, Any] = field(default_factory=dict)
    # Alert name (or ``checker:<name>``) -> (dashboard uid, panel id) of the panel showing its evidence.
    evidence: dict[str, tuple[str, int]] = field(default_factory=dict)

    # ---- lookups the templates use ------------------------------------------------
    def checker(self, name: str) -> CheckerView | None:
        return next((c for c in self.checkers if c.name == name), None)

    def runbook(self, alert: str) -> str:
        return runbook_url(self.config, alert)

    def runbook_index(self) -> str:
        base = self.config.http.runbook_base_url
        return f"{base.rstrip('/')}/README.md" if base else f"{self.config.render.zsmon_url.rstrip('/')}/runbooks/"

    def status(self, checker: str, invariant: str | None = None) -> str:
        return status_url(self.config, checker, invariant)

    def dashboard(self, key: str) -> str:
        """The Grafana panel that shows the evidence for ``key`` (an alert name, or ``checker:<name>`` for a
        checker's health), as ``render.grafana_url``/d/<uid>?viewPanel=<id>; the dashboards are built first
        (``evidence``, filled by the renderer), so the link names a panel that exists."""
        uid, panel = self.evidence[key]
        return f"{self.config.render.grafana_url.rstrip('/')}/d/{uid}?viewPanel={panel}"

    @property
    def invariants(self) -> list[InvariantView]:
        return [inv for c in self.checkers for inv in c.invariants]

    @property
    def scrape(self) -> int:
        return self.config.render.scrape_interval_seconds

    @property
    def absent_for(self) -> str:
        """`for` of absent() alerts: at least two scrapes, and never under a minute."""
        return duration(max(2 * self.scrape, 60))

    @property
    def ha_for_seconds(self) -> int:
        """`for` of ZsmonChecksNotRunning: longer than a takeover (a lease, a third of it to be taken, a
        scrape on each side), never under two minutes."""
        return max(120, math.ceil(4 * self.config.ha.lease_seconds + 2 * self.scrape))

    @property
    def ha_for(self) -> str:
        return duration(self.ha_for_seconds)

    def slo_windows(self) -> list[str]:
        """Every window a recording rule must provide, shortest first."""
        names = {"5m"} | {b.long for b in self.burn_rates} | {b.short for b in self.burn_rates}
        return sorted(names, key=seconds_of)

    def context(self) -> dict[str, Any]:
        r = self.config.render
        return {
            "model": self,
            "render": r,
            "checkers": self.checkers,
            "exporters": self.exporters,
            "burn_rates": self.burn_rates,
            "slo": {
                "objective": r.availability_slo,
                "objective_percent": percent(r.availability_slo),
                "budget": self.slo_budget,
                "period_days": r.slo_period_days,
                "windows": self.slo_windows(),
            },
            "jobs": {"api": API_JOB, "zsmon": ZSMON_JOB, "postgres": POSTGRES_JOB, "redis": REDIS_JOB},
            "http": {
                "requests": r.http_requests_metric,
                "duration_bucket": r.http_duration_metric + "_bucket",
                "all": f'{r.http_requests_metric}{{job="{API_JOB}"}}',
                "errors": f'{r.http_requests_metric}{{job="{API_JOB}", {r.http_error_matcher}}}',
                "error_matcher": r.http_error_matcher,
                "api_sel": f'job="{API_JOB}"',
            },
            "runbook": self.runbook,
            "status_page": self.status,
            "dashboard": self.dashboard,
            "checker": self.checker,
            "invariants": self.invariants,
            "dur": duration,
            "scrape": self.scrape,
            "absent_for": self.absent_for,
            "ha_for": self.ha_for,
        }


def percent(ratio: float) -> str:
    return format(Decimal(str(ratio)) * 100, "f").rstrip("0").rstrip(".") + "%"


# Money never goes unverified longer than this without a page, whatever the checker's interval.
UNVERIFIED_AT_MOST = 600


def runbook_url(config: Config, alert: str) -> str:
    """The alert's runbook: served by zsmon itself (``render.zsmon_url``/runbooks/<Alert>), or
    ``<http.runbook_base_url>/<Alert>.md`` when runbooks are kept elsewhere."""
    base = config.http.runbook_base_url
    if base:
        return f"{base.rstrip('/')}/{alert}.md"
    return f"{config.render.zsmon_url.rstrip('/')}/runbooks/{alert}"


def status_url(config: Config, checker: str, invariant: str | None = None) -> str:
    """zsmon's status page filtered to one checker (and one of its invariants): the violating entities,
    how long each has been seen, their acknowledgements."""
    query = {"checker": checker, **({"invariant": invariant} if invariant else {})}
    return f"{config.render.zsmon_url.rstrip('/')}/?{urlencode(query)}#checker-{checker}"


def invariant_alert(checker: str, invariant: str) -> str:
    """``PaymentsChannelConservationViolation``; a name never repeats: an invariant named like its checker
    (a YAML checker without ``invariant:``) or starting with it gives ``StuckTasksViolation``."""
    if invariant == checker:
        return f"{camel(checker)}Violation"
    return f"{camel(checker)}{camel(invariant.removeprefix(checker + '_'))}Violation"


def build_model(registry: Registry, *, builtin_only: bool = False) -> Model:
    """The model of what ``registry`` runs (``builtin_only``: without plugins and YAML checkers)."""
    config = registry.config
    r = config.render
    checkers: list[CheckerView] = []
    seen_alerts: dict[str, str] = {}
    for name, bound in sorted(registry.enabled_checkers().items()):
        cls = bound.cls
        if builtin_only and cls.source != "builtin":
            continue
        interval = float(bound.interval_seconds)
        # A run may legitimately last up to its statement_timeout (a full sweep on a large
        # database): stale only once that, an interval and two scrapes have passed too.
        timeout = float(bound.statement_timeout_seconds)
        stale = int(math.ceil(max(r.staleness_factor * interval, 2 * r.scrape_interval_seconds,
                                  interval + timeout + 2 * r.scrape_interval_seconds)))
        failing_for = int(math.ceil(max(1.5 * interval, 60)))
        own = getattr(cls, "runbook_url", None) or None
        invs = []
        for inv in cls.invariants:
            alert = invariant_alert(name, inv.id)
            if alert in seen_alerts:
                raise ConfigError(f"alert name {alert} is derived from both {seen_alerts[alert]} and {name}.{inv.id}: "
                                  f"rename one invariant")
            seen_alerts[alert] = f"{name}.{inv.id}"
            severity = inv.severity if inv.severity in ("critical", "warning", "info") else "warning"
            for_s = r.critical_invariant_for_seconds if severity == "critical" else r.warning_invariant_for_seconds
            invs.append(InvariantView(
                checker=name, id=inv.id, description=safe_prom_text(" ".join(inv.description.split())),
                entity_type=inv.entity_type, severity=severity, needs_memory=inv.needs_memory, alert=alert,
                for_seconds=for_s, runbook_url=own or runbook_url(config, alert)))
        unverified = None
        if any(i.severity == "critical" for i in invs):
            unverified = r.unverified_after_seconds or min(stale, UNVERIFIED_AT_MOST)
        checkers.append(CheckerView(name=name, description=safe_prom_text(" ".join(cls.description.split())),
                                    interval_seconds=interval, stale_after_seconds=stale,
                                    failing_for_seconds=failing_for, invariants=tuple(invs), own_runbook=own,
                                    unverified_after_seconds=unverified, source=cls.source,
                                    query=getattr(cls, "query", None) if cls.source == "yaml" else None,
                                    resolve=getattr(cls, "runbook_text", None)))
    exporters = []
    for name, exported in sorted(registry.enabled_exporters().items()):
        interval = float(exported.interval_seconds)
        exporters.append(ExporterView(name, interval, int(math.ceil(
            max(r.staleness_factor * interval, 2 * r.scrape_interval_seconds)))))
    budget = Decimal(1) - Decimal(str(r.availability_slo))
    period_hours = Decimal(r.slo_period_days * 24)
    burn_rates = []
    for alert, severity, long, short, share in BURN_WINDOWS:
        factor = share * period_hours / (Decimal(seconds_of(long)) / Decimal(3600))
        burn_rates.append(BurnRate(alert, severity, long, short, share, _exact(factor), r.slo_period_days))
    return Model(config=config, checkers=checkers, exporters=exporters, burn_rates=burn_rates,
                 slo_budget=format(_exact(budget), "f"))


def _exact(value: Decimal) -> Decimal:
    """A decimal without trailing zeros or exponent noise: 14.400 -> 14.4."""
    value = value.quantize(Decimal("1e-9")).normalize()
    return value.quantize(Decimal(1)) if value == value.to_integral() else value
