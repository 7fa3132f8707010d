"""The rendered alerting and recording rules: house rules, and promtool test rules proving each alert.

House rules (ENGINEERING.md, "Metrics, dashboards, alerts"), enforced here because the mixin
linters cannot be installed: CamelCase alert names; severity in {critical, warning, info};
summary, description and runbook_url on every alert; descriptions templated with $labels/$value
and humanize; no template in a label; never a raw counter compared to a number; absent() alerts
with a `for` of at least two scrapes; recording rules named level:metric:operations; ratios of
rates as sum/sum; burn-rate factors computed from the SLO.
"""
from __future__ import annotations

import re
import subprocess
from concurrent.futures import ThreadPoolExecutor
from decimal import Decimal
from pathlib import Path

import promql_parser
import pytest
import yaml

from zsmon.alerts.model import build_model, invariant_alert, seconds_of
from zsmon.alerts.render import render_all, render_model
from zsmon.alerts.rule_tests import covered_alerts, expand, humanize_duration, rule_test_files
from zsmon.app import build_registry
from zsmon.core.config import Config

PROMTOOL = "promtool"
COMPARISONS = {">", "<", ">=", "<=", "==", "!="}
RATE_FUNCS = {"rate", "irate", "increase"}


@pytest.fixture(scope="module")
def model():
    return build_model(build_registry(Config()))


@pytest.fixture(scope="module")
def files(model):
    return render_model(model)


@pytest.fixture(scope="module")
def groups(files):
    out = []
    for path, text in sorted(files.items()):
        if path.startswith("prometheus/rules/"):
            out += yaml.safe_load(text)["groups"]
    return out


@pytest.fixture(scope="module")
def alerts(groups):
    return [r for g in groups for r in g["rules"] if "alert" in r]


@pytest.fixture(scope="module")
def out_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("rules") / "out"
    render_all(build_registry(Config()), out)
    return out


def _nodes(expr):
    found = []
    promql_parser.walk(expr, lambda n: found.append(n))
    return found


def _strip(node):
    while isinstance(node, promql_parser.ParenExpr):
        node = node.expr
    return node


def _bare_counter(node) -> str | None:
    """The name of a counter reached without rate()/increase() (through parens and aggregations)."""
    node = _strip(node)
    if isinstance(node, promql_parser.VectorSelector):
        return node.name if (node.name or "").endswith("_total") else None
    if isinstance(node, promql_parser.AggregateExpr):
        return _bare_counter(node.expr)
    if isinstance(node, promql_parser.BinaryExpr):
        return _bare_counter(node.lhs) or _bare_counter(node.rhs)
    return None


def _has_rate(node) -> bool:
    return any(isinstance(n, promql_parser.Call) and n.func.name in RATE_FUNCS for n in _nodes(node))


def _sum_of_rates(node) -> bool:
    """`sum(rate(...))`, or sums added together."""
    node = _strip(node)
    if isinstance(node, promql_parser.AggregateExpr):
        return str(node.op) == "sum"
    if isinstance(node, promql_parser.BinaryExpr) and str(node.op) == "+":
        return _sum_of_rates(node.lhs) and _sum_of_rates(node.rhs)
    return False


def counter_histograms() -> frozenset[str]:
    """Histogram families whose buckets, _sum and _count are counters (observations since start), so rate()
    applies: zsmon's own (typed ``histogram`` in its registry) and the platform API's request durations.

    Not the gauge histograms (``zerostate_reputation_score``, ``zerostate_auction_bids_per_auction``,
    ``zerostate_auction_time_to_award_seconds``): snapshots of a population or a window, whose buckets fall.
    """
    from zsmon.core.metrics import Metrics
    from zsmon.core.store import ResultStore

    own = {f.name for f in Metrics(ResultStore()).registry.collect() if f.type == "histogram"}
    return frozenset(own | {Config().render.http_duration_metric})


COUNTER_HISTOGRAMS = counter_histograms()


def is_counter(name: str | None, histograms: frozenset[str] = COUNTER_HISTOGRAMS) -> bool:
    """A series rate()/increase()/irate() may read: a ``_total`` counter, or a counter histogram's series."""
    if not name:
        return False
    if name.endswith("_total"):
        return True
    base, _, suffix = name.rpartition("_")
    return suffix in {"bucket", "sum", "count"} and base in histograms


def lint_expr(expr: str) -> list[str]:
    """House-rule problems of one PromQL expression (rules and dashboards share this)."""
    problems = []
    tree = promql_parser.parse(expr)
    for n in _nodes(tree):
        if isinstance(n, promql_parser.Call) and n.func.name in RATE_FUNCS:
            inner = _strip(n.args[0])
            if isinstance(inner, promql_parser.MatrixSelector) and not is_counter(inner.vector_selector.name):
                problems.append(f"{n.func.name}() over {inner.vector_selector.name or inner}, which is not a "
                                f"counter: a gauge (or gauge histogram) is read as it is, without rate()")
    for n in _nodes(tree):
        if isinstance(n, promql_parser.BinaryExpr) and str(n.op) in COMPARISONS:
            for side in (n.lhs, n.rhs):
                counter = _bare_counter(side)
                if counter:
                    problems.append(f"raw counter {counter} compared with {n.op}: take rate()/increase() first")
        if isinstance(n, promql_parser.BinaryExpr) and str(n.op) == "/" and _has_rate(n.lhs) and _has_rate(n.rhs):
            if not (_sum_of_rates(n.lhs) and _sum_of_rates(n.rhs)):
                problems.append(f"ratio of rates must be sum(rate(...)) / sum(rate(...)): {n}")
        if isinstance(n, promql_parser.AggregateExpr) and str(n.op) == "avg" and any(
                isinstance(m, promql_parser.BinaryExpr) and str(m.op) == "/" for m in _nodes(n.expr)):
            problems.append("average of ratios: aggregate numerator and denominator, then divide")
        if isinstance(n, promql_parser.Call) and n.func.name in RATE_FUNCS:
            inner = _strip(n.args[0])
            if isinstance(inner, promql_parser.SubqueryExpr):
                problems.append(f"{n.func.name} over a subquery: rate before sum")
    return problems


# ---- house rules ------------------------------------------------------------------------------------


def test_linter_refuses_rate_over_what_is_not_a_counter():
    assert lint_expr("histogram_quantile(0.5, sum by (le) (rate(zerostate_auction_bids_per_auction_bucket[5m])))")
    assert lint_expr("rate(zerostate_auction_time_to_award_seconds_bucket[5m])")
    assert lint_expr("increase(zerostate_reputation_score_bucket[1h])")
    assert lint_expr("irate(zerostate_auctions[5m])")
    assert lint_expr("sum(rate(zerostate_postgres_connections[5m]))")
    assert not lint_expr("histogram_quantile(0.5, sum by (le) (zerostate_auction_bids_per_auction_bucket))")
    assert not lint_expr("sum by (le) (rate(zerostate_invariant_check_duration_seconds_bucket[5m]))")
    assert not lint_expr("sum(rate(http_request_duration_seconds_count[5m]))")
    assert not lint_expr("sum(rate(zerostate_auction_bids_total[5m]))")
    assert "zerostate_invariant_check_duration_seconds" in COUNTER_HISTOGRAMS
    assert not {"zerostate_reputation_score", "zerostate_auction_bids_per_auction",
                "zerostate_auction_time_to_award_seconds"} & COUNTER_HISTOGRAMS


def test_linter_catches_what_it_should():
    assert lint_expr("zerostate_payment_balance_check_failures_total > 0")
    assert lint_expr("sum(zerostate_payment_balance_check_failures_total) > 0")
    assert not lint_expr("sum(increase(zerostate_payment_balance_check_failures_total[1m])) > 0")
    assert lint_expr('rate(http_requests_total{status=~"5.."}[5m]) / rate(http_requests_total[5m]) > 0.05')
    assert not lint_expr('sum(rate(http_requests_total{status=~"5.."}[5m])) / sum(rate(http_requests_total[5m]))')
    assert lint_expr("avg(a / b)")


def test_every_alert_follows_the_house_rules(alerts, model):
    scrape = model.scrape
    for rule in alerts:
        name = rule["alert"]
        assert re.fullmatch(r"(?:[A-Z][a-z0-9]+)+", name), f"{name}: alert names are CamelCase"
        labels, ann = rule.get("labels", {}), rule.get("annotations", {})
        assert labels.get("severity") in {"critical", "warning", "info"}, f"{name}: severity"
        for key in ("summary", "description", "runbook_url"):
            assert ann.get(key), f"{name}: needs annotation {key}"
        assert "{{" not in ann["summary"], f"{name}: summary is plain text"
        assert re.match(r"https?://", ann["runbook_url"]), name
        if name != "Watchdog":
            assert "$labels" in ann["description"] or "$value" in ann["description"], f"{name}: template it"
        if "$value" in ann["description"]:
            assert re.search(r"\$value \| humanize", ann["description"]), f"{name}: humanize $value"
        expand(ann["description"], {}, "1")  # only template actions the tests can expand (and Go accepts)
        assert not re.search(r"\}\}\s*\{\{", ann["description"]), f"{name}: two values glued together"
        for key, value in labels.items():
            assert "{{" not in str(value) and "$value" not in str(value), f"{name}: no query value in label {key}"
        assert not lint_expr(rule["expr"]), f"{name}: {lint_expr(rule['expr'])}"
        tree = promql_parser.parse(rule["expr"])
        if any(isinstance(n, promql_parser.Call) and n.func.name == "absent" for n in _nodes(tree)):
            assert seconds_of(rule.get("for", "0s")) >= 2 * scrape, f"{name}: absent() needs for >= 2 scrapes"


def test_recording_rules_are_named_level_metric_operations(groups):
    records = [r for g in groups for r in g["rules"] if "record" in r]
    assert records
    for rule in records:
        assert re.fullmatch(r"[a-z_]+:[a-z0-9_]+:[a-z0-9_]+", rule["record"]), rule["record"]
        assert not lint_expr(rule["expr"]), rule["record"]


def test_the_guides_three_alerts_done_right(alerts, model):
    by = {}
    for r in alerts:
        by.setdefault(r["alert"], []).append(r)
    hi = by["HighErrorRate"][0]["expr"]
    assert re.match(r"sum\(rate\(http_requests_total\{.*status=~\"5\.\.\"\}\[5m\]\)\) / sum\(rate\(", hi)
    # DatabaseDown reads what says PostgreSQL is down (pg_up from postgres-exporter, zsmon's own probe), never
    # whether postgres-exporter can be scraped (`up`, that is ExporterDown), and fires once, not per replica.
    [db] = by["DatabaseDown"]
    tree = promql_parser.parse(db["expr"])
    names = {n.name for n in _nodes(tree) if isinstance(n, promql_parser.VectorSelector)}
    assert names == {"pg_up", "zsmon_database_up"}, db["expr"]
    top = _strip(tree)
    assert isinstance(top, promql_parser.AggregateExpr) and str(top.op) == "max", db["expr"]
    assert {"instance", "pod"} <= set(top.modifier.labels) and "without" in str(top.modifier.type).lower()
    assert db["labels"]["severity"] == "critical"
    [exporter_down] = by["ExporterDown"]
    assert re.search(r'up\{job=~"[^"]*\bpostgres\b', exporter_down["expr"]), "ExporterDown covers postgres-exporter"
    # ApiDown: one rule per branch, each with its own sentence.
    api = {r["expr"]: r["annotations"]["description"] for r in by["ApiDown"]}
    probe = "max without (instance, pod) (zerostate_api_up) == 0"
    assert set(api) == {'up{job="zerostate-api"} == 0', probe}
    assert "target" not in api['up{job="zerostate-api"} == 0'] and "$labels.target" in api[probe]
    money = by["BalanceInvariantViolation"][0]
    # Pages on money violations nobody acknowledged, never on the passage of time (a counter's window).
    assert money["expr"].strip() == 'max(zerostate_invariant_violations_unacknowledged{checker="payments"}) > 0'
    assert "increase(" not in money["expr"]
    assert money["labels"]["severity"] == "critical" and seconds_of(money["for"]) <= 60


def _grouped_without_instance(node, inside: bool = False) -> list[str]:
    """Names of the zsmon leader-only series (``zerostate_*``, ``zsmon_exporter_*``) read by ``node`` outside
    any aggregation that drops ``instance`` (``without (instance, ...)``, or ``by`` not naming it)."""
    node = _strip(node)
    if isinstance(node, promql_parser.VectorSelector):
        name = node.name or ""
        leader_only = name.startswith(("zerostate_", "zsmon_exporter_", "zsmon_ha_leader"))
        return [name] if leader_only and not inside else []
    if isinstance(node, promql_parser.AggregateExpr):
        labels = set(node.modifier.labels) if node.modifier is not None else set()
        without = node.modifier is not None and "without" in str(node.modifier.type).lower()
        drops = ("instance" in labels) if without else ("instance" not in labels)
        return _grouped_without_instance(node.expr, inside or drops)
    if isinstance(node, promql_parser.BinaryExpr):
        return _grouped_without_instance(node.lhs, inside) + _grouped_without_instance(node.rhs, inside)
    if isinstance(node, promql_parser.Call):  # absent() keeps only its selector's equality labels
        inside = inside or node.func.name in ("absent", "absent_over_time")
        return [n for a in node.args for n in _grouped_without_instance(a, inside)]
    if isinstance(node, promql_parser.MatrixSelector):
        return _grouped_without_instance(node.vector_selector, inside)
    return []


def test_rules_on_leader_only_series_survive_a_takeover(alerts):
    """With HA, a job's series come from whichever replica holds its lease: a takeover moves them to another
    `instance`. A rule that kept `instance` would resolve and fire again, restarting its `for`; every rule
    reading such series aggregates `instance` away (the promtool cases include takeovers)."""
    offenders = {r["alert"]: names for r in alerts
                 if (names := _grouped_without_instance(promql_parser.parse(r["expr"])))}
    assert offenders == {}


def test_per_invariant_alerts_follow_each_invariants_severity(alerts):
    by = {(r["labels"].get("checker"), r["labels"].get("invariant")): r for r in alerts if "invariant" in r["labels"]}
    count = 0
    for name, cls in build_registry(Config()).checker_classes.items():
        for inv in cls.invariants:
            rule = by[(name, inv.id)]
            assert rule["labels"]["severity"] == inv.severity
            if name == "payments":
                assert inv.severity == "critical", f"money invariant {inv.id} must page"
            if inv.severity == "critical":
                assert rule["for"] == "0s"
            count += 1
    assert count == len(by)


def test_burn_rate_factors_are_computed_from_the_slo(files):
    for slo, budget in ((0.999, "0.001"), (0.995, "0.005")):
        config = Config.model_validate({"render": {"availability_slo": slo, "slo_period_days": 28}})
        m = build_model(build_registry(config))
        text = render_model(m)["prometheus/rules/zerostate-slo.rules.yml"]
        for b in m.burn_rates:
            expected = b.share * Decimal(28 * 24) / (Decimal(seconds_of(b.long)) / 3600)
            assert abs(b.factor - expected) < Decimal("1e-8")  # rendered with 9 decimals at most
            assert f"ratio_rate{b.long} > ({b.factor} * {budget})" in text
    m = build_model(build_registry(Config()))
    assert [str(b.factor) for b in m.burn_rates] == ["14.4", "6", "3", "1"]
    assert [(b.long, b.short, b.severity) for b in m.burn_rates] == [
        ("1h", "5m", "critical"), ("6h", "30m", "critical"), ("1d", "2h", "warning"), ("3d", "6h", "warning")]


def test_time_from_bad_commit_to_page_is_under_a_minute(model):
    """Worst case with the shipped defaults: a run just missed the change, then scrape, evaluation, for, group_wait.

    The checker's own run time comes on top (it is small next to its interval on a healthy database).
    """
    r = Config().render
    jitter = Config().scheduler.jitter_ratio
    alerting = r.scrape_interval_seconds + r.evaluation_interval_seconds + r.critical_invariant_for_seconds \
        + r.pager_group_wait_seconds
    assert alerting <= 30
    for c in model.checkers:
        if any(inv.severity == "critical" for inv in c.invariants):
            worst = c.interval_seconds * (1 + jitter) + alerting
            assert worst < 60, (f"checker {c.name}: a money violation can take {worst:.0f} s to page "
                                f"({c.interval_seconds:g} s interval + {alerting} s alerting): lower its interval")


# ---- promtool test rules ----------------------------------------------------------------------------


def test_every_alert_has_a_firing_and_a_quiet_case(model, files, alerts):
    docs = {p.split("/")[-1]: yaml.safe_load(t) for p, t in files.items() if p.startswith("prometheus/tests/")}
    covered = covered_alerts(docs)
    for name in {r["alert"] for r in alerts}:
        assert covered.get(name, {}).get("fires"), f"no promtool case proves {name} fires"
        if name != "Watchdog":  # always firing by design
            assert covered[name]["quiet"], f"no promtool case proves {name} stays quiet"


def _promtool_test(path: Path) -> subprocess.CompletedProcess:
    return subprocess.run([PROMTOOL, "test", "rules", path.name], cwd=path.parent, capture_output=True, text=True,
                          timeout=120)


def test_promtool_test_rules_pass(out_dir):
    tests = sorted((out_dir / "prometheus/tests").glob("*.test.yml"))
    assert len(tests) >= 5
    with ThreadPoolExecutor(max_workers=4) as pool:
        results = list(pool.map(_promtool_test, tests))
    failed = {t.name: r.stdout[-3000:] + r.stderr[-1000:] for t, r in zip(tests, results) if r.returncode}
    assert not failed, failed


@pytest.mark.parametrize("expr", [
    "zerostate_payment_balance_check_failures_total > 0",  # the deployment guide's: pages forever
    'max(zerostate_invariant_violations{checker="payments"}) > 0',  # blind to acknowledgements
    'sum(increase(zerostate_payment_balance_check_failures_total[1m])) > 0',  # pages on the passage of time
])
def test_promtool_catches_balance_alerts_that_page_on_known_violations(out_dir, tmp_path, expr):
    """The tests have teeth: an alert that pages on acknowledged violations fails the quiet case."""
    mutated = tmp_path / "prometheus"
    (mutated / "rules").mkdir(parents=True)
    (mutated / "tests").mkdir()
    rules = yaml.safe_load((out_dir / "prometheus/rules/zsmon-money.rules.yml").read_text())
    rules["groups"][0]["rules"][0]["expr"] = expr
    (mutated / "rules/zsmon-money.rules.yml").write_text(yaml.safe_dump(rules))
    test = out_dir / "prometheus/tests/zsmon-money.test.yml"
    (mutated / "tests" / test.name).write_text(test.read_text())
    proc = _promtool_test(mutated / "tests" / test.name)
    assert proc.returncode != 0
    assert "stays quiet on known, acknowledged violations" in proc.stdout + proc.stderr


@pytest.mark.parametrize("expr, case", [
    # The old rule: an exporter outage paged as DatabaseDown.
    ('up{job="postgres"} == 0 or zsmon_database_up == 0',
     "DatabaseDown stays quiet when only postgres-exporter is down"),
    # Blind to postgres-exporter's view of the database.
    ("max without (instance, pod, job) (zsmon_database_up == 0)", "DatabaseDown fires when postgres-exporter sees"),
    # One alert per zsmon replica.
    ('pg_up{job="postgres"} == 0 or zsmon_database_up == 0', "DatabaseDown fires once"),
])
def test_promtool_catches_database_down_rules_that_misdiagnose(out_dir, tmp_path, expr, case):
    mutated = tmp_path / "prometheus"
    (mutated / "rules").mkdir(parents=True)
    (mutated / "tests").mkdir()
    rules = yaml.safe_load((out_dir / "prometheus/rules/zerostate-platform.rules.yml").read_text())
    [db] = [r for g in rules["groups"] for r in g["rules"] if r.get("alert") == "DatabaseDown"]
    db["expr"] = expr
    (mutated / "rules/zerostate-platform.rules.yml").write_text(yaml.safe_dump(rules))
    test = out_dir / "prometheus/tests/zerostate-platform.test.yml"
    (mutated / "tests" / test.name).write_text(test.read_text())
    proc = _promtool_test(mutated / "tests" / test.name)
    assert proc.returncode != 0
    assert case in proc.stdout + proc.stderr


def test_generated_cases_follow_the_config():
    """Other intervals and thresholds: the generated tests still pass against the rules rendered with them."""
    config = Config.model_validate({"render": {
        "scrape_interval_seconds": 15, "evaluation_interval_seconds": 15, "critical_invariant_for_seconds": 30,
        "warning_invariant_for_seconds": 120, "high_error_rate_ratio": 0.1, "availability_slo": 0.995},
        "checkers": {"schema": {"interval_seconds": 45}}})
    m = build_model(build_registry(config))
    assert {c.name: c.interval_seconds for c in m.checkers}["schema"] == 45
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "out"
        render_all(build_registry(config), out)
        tests = [out / "prometheus/tests" / n for n in
                 ("zsmon-money.test.yml", "zsmon-checker-schema.test.yml", "zerostate-platform.test.yml",
                  "zerostate-slo.test.yml")]
        with ThreadPoolExecutor(max_workers=4) as pool:
            results = list(pool.map(_promtool_test, tests))
        failed = {t.name: r.stdout[-3000:] for t, r in zip(tests, results) if r.returncode}
        assert not failed, failed


def test_humanize_duration_matches_prometheus():
    assert humanize_duration(0) == "0s"
    assert humanize_duration(45) == "45s"
    assert humanize_duration(920) == "15m 20s"
    assert humanize_duration(3600) == "1h 0m 0s"
    assert humanize_duration(90061) == "1d 1h 1m 1s"


def test_rule_test_files_name_their_rule_files(model, files):
    rules = {p.split("/")[-1]: yaml.safe_load(t) for p, t in files.items() if p.startswith("prometheus/rules/")}
    for name, doc in rule_test_files(model, rules).items():
        for rf in doc["rule_files"]:
            assert f"prometheus/rules/{rf.split('/')[-1]}" in files, f"{name} loads missing {rf}"


def test_alert_names_never_repeat_the_checker_name(tmp_path):
    """A YAML checker without `invariant:` names its invariant after itself: the alert says it once."""
    (tmp_path / "c.yml").write_text(
        "name: completed_without_time\ndescription: Completed tasks have a completion time.\nseverity: warning\n"
        "entity_type: task\nrunbook_url: https://runbooks.example/completed\n"
        "query: SELECT task_id AS entity_id FROM tasks WHERE status = 'completed' AND completed_at IS NULL\n")
    config = Config.model_validate({"checks": {"paths": [str(tmp_path)]}})
    alerts = {i.alert for c in build_model(build_registry(config)).checkers for i in c.invariants
              if c.name == "completed_without_time"}
    assert alerts == {"CompletedWithoutTimeViolation"}
    assert invariant_alert("reputation", "reputation_score_floor") == "ReputationScoreFloorViolation"
    assert invariant_alert("payments", "channel_conservation") == "PaymentsChannelConservationViolation"
