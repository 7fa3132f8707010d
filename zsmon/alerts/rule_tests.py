"""``promtool test rules`` files proving each alert fires on what should page and stays quiet otherwise.

The cases are data: input series, an evaluation time and the alerts expected
then (labels and the value the description shows). The expected annotations
are the rule's own templates expanded with those labels and that value, so a
test also proves every annotation template renders. Per-invariant, per-checker
and per-exporter cases are generated from the same model as the rules: a new
checker is tested the moment it is registered.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

from zsmon.alerts.model import API_JOB, POSTGRES_JOB, REDIS_JOB, ZSMON_JOB, Model, duration, CheckerView

ZSMON = f'job="{ZSMON_JOB}", instance="zsmon:9090"'


def _replica(name: str) -> str:
    """Labels of one of several zsmon replicas (HA): a takeover moves a series from one to another."""
    return f'job="{ZSMON_JOB}", instance="zsmon-{name}:9090", pod="zsmon-{name}"'
_TEMPLATE = re.compile(r"\{\{\s*(.*?)\s*\}\}")


@dataclass
class Fire:
    labels: dict[str, str]  # the alert's labels from its expression (static labels are added from the rule)
    value: str  # the value as the description's humanize function prints it
    # When several rules share the alert name and static labels (ApiDown's two branches): a piece of the
    # expression of the rule that fires.
    rule: str | None = None


@dataclass
class Case:
    name: str
    alert: str
    series: list[tuple[str, str]]
    eval_time: int  # seconds
    fires: list[Fire] = field(default_factory=list)
    # Further checks on the same series: (eval time, alerts expected then).
    later: list[tuple[int, list[Fire]]] = field(default_factory=list)


def humanize_duration(seconds: int) -> str:
    """Prometheus' ``humanizeDuration`` for whole seconds."""
    if seconds == 0:
        return "0s"
    days, rest = divmod(seconds, 86400)
    hours, rest = divmod(rest, 3600)
    minutes, secs = divmod(rest, 60)
    if days:
        return f"{days}d {hours}h {minutes}m {secs}s"
    if hours:
        return f"{hours}h {minutes}m {secs}s"
    if minutes:
        return f"{minutes}m {secs}s"
    return f"{secs}s"


def expand(template: str, labels: dict[str, str], value: str) -> str:
    """Expand the few Go template forms our annotations use (anything else is an error)."""

    def one(m: re.Match) -> str:
        action = m.group(1)
        if action.startswith("$labels."):
            return labels.get(action[len("$labels."):], "")
        if re.fullmatch(r"\$value(\s*\|\s*(humanize|humanizePercentage|humanizeDuration))?", action):
            return value
        raise ValueError(f"annotation template action {{{{ {action} }}}} is not one the tests can expand")

    return _TEMPLATE.sub(one, template)


def _rules_by_alert(rule_files: dict[str, Any]) -> dict[str, list[dict[str, Any]]]:
    out: dict[str, list[dict[str, Any]]] = {}
    for doc in rule_files.values():
        for group in doc["groups"]:
            for rule in group["rules"]:
                if "alert" in rule:
                    out.setdefault(rule["alert"], []).append(rule)
    return out


def _expected(rules: list[dict[str, Any]], fire: Fire) -> dict[str, Any]:
    # Several rules may share an alert name (one per checker): the one whose static labels match.
    matching = [r for r in rules if all(fire.labels.get(k, v) == v for k, v in r.get("labels", {}).items())
                and (fire.rule is None or fire.rule in r["expr"])]
    if len(matching) != 1:
        raise ValueError(f"{len(matching)} rules of alert {rules[0]['alert']} match labels {fire.labels}")
    rule = matching[0]
    labels = {**fire.labels, **rule.get("labels", {})}
    return {"exp_labels": labels,
            "exp_annotations": {k: expand(v, labels, fire.value) for k, v in rule.get("annotations", {}).items()}}


def _group(case: Case, rules: dict[str, list[dict[str, Any]]], step: int) -> dict[str, Any]:
    if case.alert not in rules:
        raise ValueError(f"case {case.name!r}: no rule for alert {case.alert}")
    return {
        "name": case.name,
        "interval": duration(step),
        "input_series": [{"series": s, "values": v} for s, v in case.series],
        "alert_rule_test": [{"eval_time": duration(t), "alertname": case.alert,
                             "exp_alerts": [_expected(rules[case.alert], f) for f in fires]}
                            for t, fires in [(case.eval_time, case.fires), *case.later]],
    }


def _steps(seconds: int, step: int) -> int:
    """Samples needed to cover ``seconds`` plus a margin."""
    return seconds // step + 3


# ---- the cases -------------------------------------------------------------------------------------


def checker_cases(model: Model, c: CheckerView) -> list[Case]:
    step = model.scrape
    cases: list[Case] = []
    for inv in c.invariants:
        labels = {"checker": c.name, "invariant": inv.id}
        cases.append(lifecycle_case(inv.alert, inv.selector, inv.for_seconds, step, labels))
        sel = f"zerostate_invariant_violations_unacknowledged{{{inv.selector}, {ZSMON}}}"
        t = inv.for_seconds + 3 * step
        n = _steps(t, step)
        other = f'zerostate_invariant_violations_unacknowledged{{checker="{c.name}", invariant="zz_other_{inv.id}", ' \
                f'{ZSMON}}}'
        cases.append(Case(f"{inv.alert} stays quiet when it holds and another invariant fails", inv.alert,
                          [(sel, f"0x{n}"), (other, f"5x{n}")], t))
    up = f"zerostate_invariant_check_up{{{c.selector}, {ZSMON}}}"
    t = c.failing_for_seconds + 3 * step
    n = _steps(t, step)
    blip = max(1, (c.failing_for_seconds // step) // 2)
    cases.append(Case(f"InvariantCheckFailing stays quiet on one short error of {c.name}, fires when it keeps "
                      f"erroring", "InvariantCheckFailing", [(up, f"1 0x{blip} 1x{n} 0x{n}")], t,
                      later=[((blip + n + 2) * step + t, [Fire({"checker": c.name}, "0")])]))
    last = f"zerostate_invariant_check_last_success_timestamp_seconds{{{c.selector}, {ZSMON}}}"
    t = (c.stale_after_seconds // step + 2) * step
    n = _steps(t, step)
    stop = n * step  # the last completed run, then nothing more
    cases.append(Case(f"InvariantCheckStale stays quiet while {c.name} completes runs, fires when it stops",
                      "InvariantCheckStale", [(up, f"1x{3 * n}"), (last, f"0+{step}x{n} {stop}x{2 * n}")], t,
                      later=[(stop + t, [Fire({"checker": c.name}, humanize_duration(t))])]))
    if c.unverified_after_seconds:
        t = (c.unverified_after_seconds // step + 2) * step
        n = _steps(t, step)
        stop = n * step  # the last completed run; then runs keep failing, then one succeeds again
        cases.append(Case(f"CriticalInvariantsUnverified stays quiet while {c.name} completes runs, pages when it "
                          f"stops, resolves on the next completed run", "CriticalInvariantsUnverified",
                          [(last, f"0+{step}x{n} {stop}x{n} {stop + (n + 1) * step}+{step}x{n}")], stop - step,
                          later=[(stop + t, [Fire({"checker": c.name}, humanize_duration(t))]),
                                 (stop + (n + 2) * step, [])]))
    t = max(c.stale_after_seconds, 2 * step) + 3 * step
    n = _steps(t, step)
    cases.append(Case(f"InvariantCheckMissing fires when zsmon has no result for {c.name}", "InvariantCheckMissing",
                      [(f"zsmon_up{{{ZSMON}}}", f"1x{n}")], t, [Fire({"checker": c.name}, "1")]))
    cases.append(Case(f"InvariantCheckMissing stays quiet while {c.name} reports", "InvariantCheckMissing",
                      [(f"zsmon_up{{{ZSMON}}}", f"1x{n}"), (up, f"0x{n}")], t))
    skipped = f'zerostate_invariant_skipped{{{c.selector}, invariant="some_invariant", {ZSMON}}}'
    skip_for = max(1800, 2 * int(c.interval_seconds))
    t = skip_for + 3 * step
    n = _steps(t, step)
    half = skip_for // 2 // step
    cases.append(Case(f"InvariantSkipped stays quiet when {c.name} skips for a while, fires when an invariant "
                      f"is never judged", "InvariantSkipped", [(skipped, f"1x{half} 0 1x{n}")], half * step,
                      later=[((half + 1) * step + t, [Fire({"checker": c.name, "invariant": "some_invariant"},
                                                            "1")])]))
    return cases


def lifecycle_case(alert: str, selector: str, for_seconds: int, step: int, labels: dict[str, str]) -> Case:
    """One violation's life as the alert sees it, a phase per transition: new -> fires; acknowledged ->
    quiet (the violation is still there); its difference grows after the acknowledgement -> fires; the
    acknowledgement expires -> fires; repaired -> resolves."""
    phase = _steps(for_seconds + 3 * step, step)    # samples per phase, enough for the alert's `for`
    #                 new  acknowledged  changed  expired  repaired
    unacked = [0] + [3] * phase + [0] * phase + [1] * phase + [3] * phase + [0] * phase
    total = [0] + [3] * phase + [3] * phase + [3] * phase + [3] * phase + [0] * phase
    end = [(1 + (k + 1) * phase - 1) * step for k in range(5)]   # the last sample of each phase
    series = [(f"zerostate_invariant_violations_unacknowledged{{{selector}, {ZSMON}}}", " ".join(map(str, unacked))),
              (f"zerostate_invariant_violations{{{selector}, {ZSMON}}}", " ".join(map(str, total)))]
    return Case(f"{alert} fires on a new violation, is quiet once acknowledged, fires when it changes after the "
                f"acknowledgement or the acknowledgement expires, resolves once repaired", alert, series,
                end[0], [Fire(labels, "3")],
                later=[(end[1], []), (end[2], [Fire(labels, "1")]), (end[3], [Fire(labels, "3")]), (end[4], [])])


def money_cases(model: Model) -> list[Case]:
    step = model.scrape
    for_s = model.config.render.critical_invariant_for_seconds
    counter = f"zerostate_payment_balance_check_failures_total{{{ZSMON}}}"
    acked = f'zerostate_invariant_violations{{checker="payments", invariant="ledger_reconciliation", {ZSMON}}}'
    acked_un = f'zerostate_invariant_violations_unacknowledged{{checker="payments", ' \
               f'invariant="ledger_reconciliation", {ZSMON}}}'
    n = _steps(for_s + 10 * step, step)
    return [
        lifecycle_case("BalanceInvariantViolation", 'checker="payments", invariant="channel_conservation"', for_s,
                       step, {"checker": "payments"}),
        Case("BalanceInvariantViolation stays quiet on known, acknowledged violations and a counter that keeps "
             "counting them", "BalanceInvariantViolation",
             [(acked, f"250x{n}"), (acked_un, f"0x{n}"), (counter, f"0+1x{n}")], n * step - step),
        Case("BalanceInvariantViolation pages for a new violation beside acknowledged ones",
             "BalanceInvariantViolation",
             [(acked, f"250x{n}"), (acked_un, f"0 1x{n}"), (counter, f"0+1x{n}")], 2 * step + for_s,
             [Fire({"checker": "payments"}, "1")]),
    ]


def exporter_cases(model: Model) -> list[Case]:
    step = model.scrape
    cases = []
    for col in model.exporters:
        last = f"zsmon_exporter_last_success_timestamp_seconds{{{col.selector}, {ZSMON}}}"
        t = (col.stale_after_seconds // step + 2) * step
        n = _steps(t, step)
        stop = n * step
        cases.append(Case(f"ZsmonExporterFailing stays quiet while {col.name} succeeds, fires when it stops",
                          "ZsmonExporterFailing", [(last, f"0+{step}x{n} {stop}x{2 * n}")], t,
                          later=[(stop + t, [Fire({"exporter": col.name}, humanize_duration(t))])]))
    return cases


def self_cases(model: Model) -> list[Case]:
    step = model.scrape
    absent_for = max(2 * step, 60)
    t = absent_for + 3 * step
    n = _steps(t, step)
    return ha_cases(model) + [
        Case("Watchdog always fires", "Watchdog", [(f"zsmon_up{{{ZSMON}}}", f"1x{n}")], 2 * step, [Fire({}, "1")]),
        Case("ZsmonDown fires when zsmon is gone", "ZsmonDown", [(f'up{{job="{ZSMON_JOB}", instance="zsmon:9090"}}',
                                                                  f"0x{n}")], t, [Fire({"job": ZSMON_JOB}, "1")]),
        Case("ZsmonDown stays quiet while zsmon is scraped", "ZsmonDown", [(f"zsmon_up{{{ZSMON}}}", f"1x{n}")], t),
        Case("ZsmonDatabaseRolePrivileged fires while zsmon's role can do more than read, once for all replicas",
             "ZsmonDatabaseRolePrivileged",
             [(f'zsmon_database_role_privileged{{job="{ZSMON_JOB}", instance="10.0.0.1:9090", pod="zsmon-0"}}',
               f"1x{n}"),
              (f'zsmon_database_role_privileged{{job="{ZSMON_JOB}", instance="10.0.0.2:9090", pod="zsmon-1"}}',
               f"1x{n}")], 2 * step, [Fire({"job": ZSMON_JOB}, "1")]),
        Case("ZsmonDatabaseRolePrivileged stays quiet as the minimal role, and before the role is known",
             "ZsmonDatabaseRolePrivileged",
             [(f"zsmon_database_role_privileged{{{ZSMON}}}", f"_x{n // 2} 0x{n}"), (f"zsmon_up{{{ZSMON}}}", f"1x{n}")],
             2 * step, later=[(n * step, [])]),
        Case("ZsmonDatabaseRolePrivileged resolves once zsmon connects as the minimal role",
             "ZsmonDatabaseRolePrivileged", [(f"zsmon_database_role_privileged{{{ZSMON}}}", f"1x{n} 0x{n}")],
             step, [Fire({"job": ZSMON_JOB}, "1")], later=[((n + 3) * step, [])]),
        *replication_lag_cases(model),
    ]


def replication_lag_cases(model: Model) -> list[Case]:
    """ZsmonReplicationLag: fires after 2 minutes over the limit, once for all replicas; quiet under it, and on a
    primary (no series)."""
    step, limit = model.scrape, model.config.render.replication_lag_seconds
    t = 120 + 3 * step
    n = _steps(2 * t, step)
    over = limit + 15 * step  # constant: the value the description shows is known
    lag = "zsmon_database_replication_lag_seconds"
    return [
        Case("ZsmonReplicationLag fires when zsmon's standby stays behind the primary, once for all replicas",
             "ZsmonReplicationLag",
             [(f'{lag}{{job="{ZSMON_JOB}", instance="10.0.0.1:9090", pod="zsmon-0"}}', f"{over}x{n}"),
              (f'{lag}{{job="{ZSMON_JOB}", instance="10.0.0.2:9090", pod="zsmon-1"}}', f"{limit}x{n}")],
             60, later=[(t, [Fire({"job": ZSMON_JOB}, humanize_duration(over))])]),
        Case("ZsmonReplicationLag stays quiet at the limit, and on a primary (no series)", "ZsmonReplicationLag",
             [(f"{lag}{{{ZSMON}}}", f"{limit}x{n} _x{n}"), (f"zsmon_up{{{ZSMON}}}", f"1x{2 * n}")],
             t, later=[(n * step + t, [])]),
        Case("ZsmonReplicationLag resolves when the standby catches up", "ZsmonReplicationLag",
             [(f"{lag}{{{ZSMON}}}", f"{over}x{n} 0x{n}")], t,
             [Fire({"job": ZSMON_JOB}, humanize_duration(over))], later=[((n + 2) * step, [])]),
    ]


def ha_cases(model: Model) -> list[Case]:
    """Replicas' own HA series: leases moving between replicas are no alert; no replica leading is."""
    step = model.scrape
    hold = model.ha_for_seconds
    n = _steps(2 * hold + 600, step)
    k = _steps(hold, step)  # the leader's samples before it goes
    job = 'scheduler_job="check:payments"'
    a, b = (f"zsmon_ha_leader{{{_replica(x)}, {job}}}" for x in ("a", "b"))
    degraded_a, degraded_b = (f"zsmon_ha_degraded{{{_replica(x)}}}" for x in ("a", "b"))
    return [
        # a leads, then dies (its series end); b takes the lease two scrapes later and leads from then on.
        Case("ZsmonChecksNotRunning stays quiet through a takeover", "ZsmonChecksNotRunning",
             [(a, f"1x{k} stale"), (b, f"0x{k + 2} 1x{n}")], (k + 2) * step + hold,
             later=[((k + 1) * step, []), (n * step, [])]),
        # Redis down under ha.on_redis_down stand_by (or no replica reaching the database): nobody leads.
        Case("ZsmonChecksNotRunning fires when no replica leads a job", "ZsmonChecksNotRunning",
             [(a, f"1x{k} 0x{n}"), (b, f"0x{n + k}")], (k + 1) * step + hold + 2 * step,
             [Fire({"job": ZSMON_JOB, "scheduler_job": "check:payments"}, "0")],
             later=[((k + 1) * step + hold // 2, [])]),
        Case("ZsmonChecksNotRunning fires through a takeover that never completes", "ZsmonChecksNotRunning",
             [(a, f"1x{k} 0x{k} stale"), (b, f"0x{n}")], (k + 1) * step + hold + 2 * step,
             [Fire({"job": ZSMON_JOB, "scheduler_job": "check:payments"}, "0")]),
        Case("ZsmonHaDegraded fires when a replica cannot reach Redis", "ZsmonHaDegraded",
             [(degraded_a, f"0 1x{n}"), (degraded_b, f"0x{n}")], 120 + 3 * step, [Fire({"job": ZSMON_JOB}, "1")]),
        Case("ZsmonHaDegraded stays quiet on a short Redis blip and without HA trouble", "ZsmonHaDegraded",
             [(degraded_a, f"0 1x{60 // step} 0x{n}"), (degraded_b, f"0x{n}")], 120 + 3 * step),
    ]


def platform_cases(model: Model) -> list[Case]:
    step = model.scrape
    r = model.config.render
    api = f'job="{API_JOB}", instance="api:9090"'
    req = r.http_requests_metric
    ok = f'{req}{{{api}, method="GET", path="/api/v1/tasks", status="200"}}'
    # A status the configured matcher counts as failed: the default matcher is status=~"5..".
    bad = f'{req}{{{api}, method="POST", path="/api/v1/payments", status="503"}}'
    pg = f'job="{POSTGRES_JOB}", instance="postgres-exporter:9187"'
    rd = f'job="{REDIS_JOB}", instance="redis-exporter:9121"'
    n10, n15 = _steps(600, step), _steps(900, step)
    half, t3, t10 = 60 // step, 180 // step, 300 // step  # samples before a takeover, mid-`for`
    threshold = r.high_error_rate_ratio
    # HighErrorRate: per step, `fail` failed and `100 - fail` good requests, so the ratio is fail %.
    fail_hi = min(99, int(threshold * 100) * 2 or 1)
    fail_lo = max(0, int(threshold * 100) // 5)
    return [
        Case("HighErrorRate fires when failures exceed the threshold", "HighErrorRate",
             [(ok, f"0+{100 - fail_hi}x{n15}"), (bad, f"0+{fail_hi}x{n15}")], 660, [Fire({}, f"{fail_hi}%")]),
        Case("HighErrorRate stays quiet below the threshold", "HighErrorRate",
             [(ok, f"0+{100 - fail_lo}x{n15}"), (bad, f"0+{fail_lo}x{n15}")], 660),
        Case("HighErrorRate stays quiet without traffic", "HighErrorRate", [(ok, f"0x{n15}"), (bad, f"0x{n15}")], 660),
        Case("ApiDown fires when the API cannot be scraped", "ApiDown", [(f"up{{{api}}}", f"0x{n10}")], 180,
             [Fire({"job": API_JOB, "instance": "api:9090"}, "0", rule="up{")]),
        Case("ApiDown fires when zsmon's probe fails", "ApiDown",
             [(f"up{{{api}}}", f"1x{n10}"),
              (f'zerostate_api_up{{{ZSMON}, target="http://api:8080/health"}}', f"0x{n10}")], 180,
             [Fire({"job": ZSMON_JOB, "target": "http://api:8080/health"}, "0", rule="zerostate_api_up")]),
        # The probe's series moves to another replica mid-`for` (a takeover): the alert keeps its timer.
        Case("ApiDown fires on time through a takeover of zsmon's probe", "ApiDown",
             [(f"up{{{api}}}", f"1x{n10}"),
              (f'zerostate_api_up{{{_replica("a")}, target="http://api:8080/health"}}', f"0x{half} stale"),
              (f'zerostate_api_up{{{_replica("b")}, target="http://api:8080/health"}}', f"_x{half + 1} 0x{n10}")],
             120 + 2 * step,
             [Fire({"job": ZSMON_JOB, "target": "http://api:8080/health"}, "0", rule="zerostate_api_up")]),
        Case("ApiDown fires once per branch when the scrape and the probe both fail", "ApiDown",
             [(f"up{{{api}}}", f"0x{n10}"),
              (f'zerostate_api_up{{{ZSMON}, target="http://api:8080/health"}}', f"0x{n10}")], 180,
             [Fire({"job": API_JOB, "instance": "api:9090"}, "0", rule="up{"),
              Fire({"job": ZSMON_JOB, "target": "http://api:8080/health"}, "0", rule="zerostate_api_up")]),
        Case("ApiDown stays quiet while the API answers", "ApiDown",
             [(f"up{{{api}}}", f"1x{n10}"), (f'zerostate_api_up{{{ZSMON}, target="http://api:8080/health"}}',
                                              f"1x{n10}")], 180),
        # postgres-exporter answers but PostgreSQL does not: pg_up 0 (its scrape, up, is fine).
        Case("DatabaseDown fires when postgres-exporter sees the database down", "DatabaseDown",
             [(f"up{{{pg}}}", f"1x{n10}"), (f"pg_up{{{pg}}}", f"0x{n10}"), (f"zsmon_database_up{{{ZSMON}}}",
                                                                             f"1x{n10}")],
             120, [Fire({}, "0")]),
        Case("DatabaseDown fires when only zsmon cannot reach it", "DatabaseDown",
             [(f"up{{{pg}}}", f"1x{n10}"), (f"pg_up{{{pg}}}", f"1x{n10}"), (f"zsmon_database_up{{{ZSMON}}}",
                                                                             f"0x{n10}")],
             120, [Fire({}, "0")]),
        Case("DatabaseDown fires once, however many zsmon replicas and exporters see it", "DatabaseDown",
             [(f"up{{{pg}}}", f"1x{n10}"), (f"pg_up{{{pg}}}", f"0x{n10}"),
              (f'zsmon_database_up{{job="{ZSMON_JOB}", instance="10.0.0.1:9090", pod="zsmon-0"}}', f"0x{n10}"),
              (f'zsmon_database_up{{job="{ZSMON_JOB}", instance="10.0.0.2:9090", pod="zsmon-1"}}', f"0x{n10}")],
             120, [Fire({}, "0")]),
        # postgres-exporter cannot be scraped (so no pg_up at all) while PostgreSQL answers zsmon: the exporter
        # is down, not the database.
        Case("DatabaseDown stays quiet when only postgres-exporter is down", "DatabaseDown",
             [(f"up{{{pg}}}", f"0x{n10}"), (f"zsmon_database_up{{{ZSMON}}}", f"1x{n10}")], 360),
        Case("ExporterDown fires when postgres-exporter cannot be scraped while the database is up", "ExporterDown",
             [(f"up{{{pg}}}", f"0x{n10}"), (f"zsmon_database_up{{{ZSMON}}}", f"1x{n10}")], 360,
             [Fire({"job": POSTGRES_JOB, "instance": "postgres-exporter:9187"}, "0")]),
        Case("DatabaseDown stays quiet on a short blip", "DatabaseDown",
             [(f"up{{{pg}}}", f"1x{n10}"), (f"pg_up{{{pg}}}", f"1 0 0 1x{n10}"),
              (f"zsmon_database_up{{{ZSMON}}}", f"1 1 0 0 1x{n10}")], 120),
        Case("PostgresConnectionsNearLimit fires above 80%", "PostgresConnectionsNearLimit",
             [(f'zerostate_postgres_connections{{{ZSMON}, state="active"}}', f"90x{n15}"),
              (f'zerostate_postgres_connections{{{ZSMON}, state="idle"}}', f"5x{n15}"),
              (f"zerostate_postgres_max_connections{{{ZSMON}}}", f"100x{n15}")], 660,
             [Fire({"job": ZSMON_JOB}, "95%")]),
        Case("PostgresConnectionsNearLimit fires on time through a takeover of the postgres exporter",
             "PostgresConnectionsNearLimit",
             [(f'zerostate_postgres_connections{{{_replica("a")}, state="active"}}', f"90x{t10} stale"),
              (f'zerostate_postgres_max_connections{{{_replica("a")}}}', f"100x{t10} stale"),
              (f'zerostate_postgres_connections{{{_replica("b")}, state="active"}}', f"_x{t10 + 1} 90x{n15}"),
              (f'zerostate_postgres_max_connections{{{_replica("b")}}}', f"_x{t10 + 1} 100x{n15}")],
             600 + 3 * step, [Fire({"job": ZSMON_JOB}, "90%")]),
        Case("PostgresConnectionsNearLimit stays quiet at half", "PostgresConnectionsNearLimit",
             [(f'zerostate_postgres_connections{{{ZSMON}, state="active"}}', f"50x{n15}"),
              (f"zerostate_postgres_max_connections{{{ZSMON}}}", f"100x{n15}")], 660),
        Case("PostgresLongRunningTransaction fires on a 10-minute transaction", "PostgresLongRunningTransaction",
             [(f"zerostate_postgres_longest_transaction_seconds{{{ZSMON}}}", f"600x{n10}")], 360,
             [Fire({"job": ZSMON_JOB}, "10m 0s")]),
        # Half-way through its `for`, the series moves from replica a to replica b: grouped by instance, the
        # timer would restart and the page come 3 minutes late.
        Case("PostgresLongRunningTransaction fires on time through a takeover of the postgres exporter",
             "PostgresLongRunningTransaction",
             [(f"zerostate_postgres_longest_transaction_seconds{{{_replica('a')}}}", f"600x{t3} stale"),
              (f"zerostate_postgres_longest_transaction_seconds{{{_replica('b')}}}", f"_x{t3 + 1} 600x{n10}")],
             300 + 3 * step, [Fire({"job": ZSMON_JOB}, "10m 0s")]),
        Case("PostgresLongRunningTransaction stays quiet on short transactions", "PostgresLongRunningTransaction",
             [(f"zerostate_postgres_longest_transaction_seconds{{{ZSMON}}}", f"20x{n10}")], 360),
        Case("RedisDown fires when redis-exporter reports it down", "RedisDown",
             [(f"redis_up{{{rd}}}", f"0x{n10}")], 180, [Fire({"job": REDIS_JOB,
                                                               "instance": "redis-exporter:9121"}, "0")]),
        Case("RedisDown fires when zsmon cannot reach it", "RedisDown",
             [(f"zerostate_redis_up{{{ZSMON}}}", f"0x{n10}")], 180, [Fire({"job": ZSMON_JOB}, "0")]),
        Case("RedisDown stays quiet while Redis answers", "RedisDown",
             [(f"redis_up{{{rd}}}", f"1x{n10}"), (f"zerostate_redis_up{{{ZSMON}}}", f"1x{n10}")], 180),
        Case("RedisMemoryNearLimit fires above 90% of maxmemory", "RedisMemoryNearLimit",
             [(f"zerostate_redis_memory_used_bytes{{{ZSMON}}}", f"95x{n15}"),
              (f"zerostate_redis_memory_max_bytes{{{ZSMON}}}", f"100x{n15}")], 660,
             [Fire({"job": ZSMON_JOB}, "95%")]),
        Case("RedisMemoryNearLimit stays quiet without maxmemory", "RedisMemoryNearLimit",
             [(f"zerostate_redis_memory_used_bytes{{{ZSMON}}}", f"95x{n15}"),
              (f"zerostate_redis_memory_max_bytes{{{ZSMON}}}", f"0x{n15}")], 660),
        Case("ExporterDown fires when redis-exporter cannot be scraped", "ExporterDown",
             [(f"up{{{rd}}}", f"0x{n10}")], 360, [Fire({"job": REDIS_JOB, "instance": "redis-exporter:9121"}, "0")]),
        Case("ExporterDown stays quiet for other jobs", "ExporterDown",
             [(f"up{{{api}}}", f"0x{n10}"), (f"up{{{rd}}}", f"1x{n10}")], 360),
    ]


def slo_cases(model: Model) -> list[Case]:
    """Failure ratios in per-mille of requests, per minute (the SLO test file steps by one minute)."""
    r = model.config.render
    api = f'job="{API_JOB}", instance="api:9090"'
    ok = f'{r.http_requests_metric}{{{api}, method="GET", path="/api/v1/tasks", status="200"}}'
    bad = f'{r.http_requests_metric}{{{api}, method="POST", path="/api/v1/payments", status="503"}}'
    budget = float(model.slo_budget)
    fast = [b for b in model.burn_rates if b.severity == "critical"]
    slow = [b for b in model.burn_rates if b.severity != "critical"]
    n = 240

    per_min = 100_000

    def traffic(ratio: float) -> list[tuple[str, str]]:
        failed = round(per_min * ratio)
        return [(ok, f"0+{per_min - failed}x{n}"), (bad, f"0+{failed}x{n}")]

    def pct(ratio: float) -> str:  # humanizePercentage of the ratio the traffic really has
        return f"{round(per_min * ratio) / per_min * 100:.4g}%"

    first, second = fast[0], fast[1]
    both = budget * float(first.factor) * 1.4  # above the first window pair's factor (and so the second's)
    only_second = budget * (float(second.factor) + float(first.factor)) / 2  # between the two factors
    slow_only = budget * (float(slow[0].factor) + float(second.factor)) / 2 if float(slow[0].factor) < float(
        second.factor) else budget * float(slow[0].factor) * 1.2
    quiet = budget * float(min(b.factor for b in model.burn_rates)) / 2
    return [
        Case("ApiErrorBudgetFastBurn fires on a fast burn (both window pairs)", "ApiErrorBudgetFastBurn",
             traffic(both), 1200, [Fire({"job": API_JOB}, pct(both))]),
        Case("ApiErrorBudgetFastBurn fires on the second window pair alone", "ApiErrorBudgetFastBurn",
             traffic(only_second), 1200, [Fire({"job": API_JOB}, pct(only_second))]),
        Case("ApiErrorBudgetFastBurn stays quiet on a slow burn", "ApiErrorBudgetFastBurn", traffic(slow_only), 1200),
        Case("ApiErrorBudgetSlowBurn fires on a slow burn", "ApiErrorBudgetSlowBurn", traffic(slow_only), 3600,
             [Fire({"job": API_JOB}, pct(slow_only))]),
        Case("ApiErrorBudgetSlowBurn stays quiet within budget", "ApiErrorBudgetSlowBurn", traffic(quiet), 3600),
        Case("ApiErrorBudgetFastBurn stays quiet within budget", "ApiErrorBudgetFastBurn", traffic(quiet), 3600),
    ]


def rule_test_files(model: Model, rule_files: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """promtool test documents by file name; ``rule_files`` maps a rules file name to its parsed content."""
    rules = _rules_by_alert(rule_files)
    step = model.scrape
    ev = duration(model.config.render.evaluation_interval_seconds)

    def doc(rule_file: str, cases: list[Case], case_step: int, eval_interval: str) -> dict[str, Any]:
        return {"rule_files": [f"../rules/{rule_file}"], "evaluation_interval": eval_interval,
                "tests": [_group(c, rules, case_step) for c in cases]}

    out = {"zsmon-money.test.yml": doc("zsmon-money.rules.yml", money_cases(model), step, ev)}
    for c in model.checkers:
        out[f"zsmon-checker-{c.name}.test.yml"] = doc(f"zsmon-checker-{c.name}.rules.yml", checker_cases(model, c),
                                                      step, ev)
    return {
        **out,
        "zsmon-self.test.yml": doc("zsmon-self.rules.yml", self_cases(model) + exporter_cases(model), step, ev),
        "zerostate-platform.test.yml": doc("zerostate-platform.rules.yml", platform_cases(model), step, ev),
        "zerostate-slo.test.yml": doc("zerostate-slo.rules.yml", slo_cases(model), 60, "1m"),
    }


def covered_alerts(tests: dict[str, dict[str, Any]]) -> dict[str, dict[str, int]]:
    """For each alert: how many cases expect it to fire and how many expect silence."""
    out: dict[str, dict[str, int]] = {}
    for doc in tests.values():
        for group in doc["tests"]:
            for t in group["alert_rule_test"]:
                counts = out.setdefault(t["alertname"], {"fires": 0, "quiet": 0})
                counts["fires" if t["exp_alerts"] else "quiet"] += 1
    return out
