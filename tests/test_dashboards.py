"""Rendered Grafana dashboards: shape, stable uids, the datasource variable, runbook links, and queries that parse.

Grafana cannot be installed here, so the JSON is checked by shape and every target's expr is
parsed by promql-parser after Grafana's variables are substituted.
"""
from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path

import promql_parser
import pytest
import yaml
from test_alert_rules import lint_expr

from zsmon.alerts.model import build_model
from zsmon.alerts.render import golden_files, render_model
from zsmon.app import build_registry
from zsmon.core.config import Config
from zsmon.dashboards.build import SpecError, build_dashboard, build_dashboards

GRAFANA_VARS = {"$__rate_interval": "5m", "$__interval": "1m", "$__range": "1h", "$job": ".+", "$instance": ".+"}
UIDS = {"zsmon-api", "zsmon-database", "zsmon-payments", "zsmon-auctions", "zsmon-reputation", "zsmon-invariants",
        "zsmon-self"}


@pytest.fixture(scope="module")
def files():
    return render_model(build_model(build_registry(Config())))


@pytest.fixture(scope="module")
def boards(files):
    return {json.loads(t)["uid"]: json.loads(t) for p, t in files.items() if p.startswith("grafana/dashboards/")}


def _panels(board):
    return [p for p in board["panels"] if p["type"] != "row"]


def _exprs(board):
    return [(p["title"], t["expr"]) for p in _panels(board) for t in p.get("targets", [])]


def test_stable_uids_and_file_names(files, boards):
    assert set(boards) == UIDS
    for uid in boards:
        assert f"grafana/dashboards/{uid}.json" in files
    assert set(json.loads(t)["uid"] for p, t in golden_files().items() if p.endswith(".json")) == UIDS


def test_every_dashboard_uses_the_datasource_variable(boards):
    for uid, board in boards.items():
        var = board["templating"]["list"][0]
        assert (var["name"], var["type"], var["query"]) == ("datasource", "datasource", "prometheus"), uid
        for p in _panels(board):
            if p["type"] == "text":
                continue
            assert p["datasource"] == {"type": "prometheus", "uid": "${datasource}"}, (uid, p["title"])
            for t in p["targets"]:
                assert t["datasource"]["uid"] == "${datasource}"


def test_every_panel_has_title_unit_description(boards):
    for uid, board in boards.items():
        ids = [p["id"] for p in board["panels"]]
        assert len(ids) == len(set(ids)), uid
        for p in _panels(board):
            assert p["title"] and p["description"] and p["fieldConfig"]["defaults"]["unit"], (uid, p)
            g = p["gridPos"]
            assert 0 <= g["x"] and g["x"] + g["w"] <= 24, (uid, p["title"])


# A window that must not change with the zoom (counts of events: new violations, failing runs, deadlocks) is
# fixed and says so in the legend; every other range is $__rate_interval.
FIXED_WINDOWS = {"1h": "(last hour)"}


def test_every_query_parses_and_uses_rate_interval(boards):
    count = 0
    for uid, board in boards.items():
        for p in _panels(board):
            for t in p.get("targets", []):
                title, expr = p["title"], t["expr"]
                for rng in re.findall(r"\[([^\]]+)\]", expr):
                    if rng in FIXED_WINDOWS:
                        assert "increase(" in expr and FIXED_WINDOWS[rng] in t["legendFormat"], \
                            f"{uid} / {title}: a fixed [{rng}] window is an increase() labelled {FIXED_WINDOWS[rng]}"
                    else:
                        assert rng == "$__rate_interval", f"{uid} / {title}: range [{rng}] must be [$__rate_interval]"
                if "increase(" in expr:
                    assert "[$__rate_interval]" not in expr, f"{uid} / {title}: increase() over a zoom-dependent window"
        for title, expr in _exprs(board):
            text = expr
            for var, value in GRAFANA_VARS.items():
                text = text.replace(var, value)
            assert "$" not in text, f"{uid} / {title}: unknown variable in {expr}"
            promql_parser.parse(text)  # raises on a query that does not parse
            assert not lint_expr(text), (uid, title, lint_expr(text))
            count += 1
    assert count > 60


def test_dashboards_serve_more_than_one_deployment(boards):
    """`job` and `instance` variables as Grafana's dashboard-linter wants them (a Prometheus query on the
    datasource variable, multi-select, All = `.+`), and every series selector of every target - found by a
    real PromQL parser - filtered by both (a job-level recording rule, which has no instance, by job)."""
    import promql_parser
    from test_alert_rules import _nodes

    checked = 0
    for uid, board in boards.items():
        variables = {v["name"]: v for v in board["templating"]["list"]}
        for name in ("job", "instance"):
            v = variables[name]
            assert (v["type"], v["label"], v["datasource"]["uid"], v["multi"], v["includeAll"], v["allValue"]) == \
                ("query", name.capitalize(), "${datasource}", True, True, ".+"), (uid, name)
            assert re.fullmatch(rf"label_values\(up(\{{job=~\"\$job\"\}})?, {name}\)", v["query"]["query"]), v
        for title, expr in _exprs(board):
            text = expr
            for var, value in GRAFANA_VARS.items():
                if var.startswith("$__"):
                    text = text.replace(var, value)
            selectors = [n for n in _nodes(promql_parser.parse(text)) if isinstance(n, promql_parser.VectorSelector)]
            assert selectors, (uid, title, expr)
            for sel in selectors:
                matchers = {(m.name, str(m.op), m.value) for m in sel.matchers.matchers}
                assert ("job", "MatchOp.Re", "$job") in matchers, (uid, title, expr)
                if not sel.name.startswith("job:"):
                    assert ("instance", "MatchOp.Re", "$instance") in matchers, (uid, title, expr)
                checked += 1
    assert checked > 100


def test_panels_tile_their_rows_without_holes_or_overlaps(boards):
    """Each row's panels fill the 24 columns line by line: no column empty, none covered twice, no panel
    reaching under the next line or the next row."""
    for uid, board in boards.items():
        rows: list[list[dict]] = []
        for p in board["panels"]:
            if p["type"] == "row":
                rows.append([])
            else:
                rows[-1].append(p)
        y = 0
        for header, row_panels in zip([p for p in board["panels"] if p["type"] == "row"], rows):
            assert header["gridPos"]["y"] == y, (uid, header["title"], "row header not right below the last row")
            y += 1
            cells: dict[tuple[int, int], str] = {}
            for p in row_panels:
                g = p["gridPos"]
                for cy in range(g["y"], g["y"] + g["h"]):
                    for cx in range(g["x"], g["x"] + g["w"]):
                        assert (cx, cy) not in cells, (uid, p["title"], "overlaps", cells[(cx, cy)])
                        cells[(cx, cy)] = p["title"]
            bottom = max((p["gridPos"]["y"] + p["gridPos"]["h"] for p in row_panels), default=y)
            holes = [(cx, cy) for cy in range(y, bottom) for cx in range(24) if (cx, cy) not in cells]
            assert not holes, (uid, header["title"], "holes at", holes[:5])
            y = bottom


def test_staleness_bars_turn_at_each_checkers_and_exporters_own_limits(boards):
    model = build_model(build_registry(Config()))
    bars = {p["title"]: p for b in boards.values() for p in _panels(b)}
    for title, items in (("Since last completed run", model.checkers), ("Since last successful collection",
                                                                        model.exporters)):
        overrides = {o["matcher"]["options"]: o["properties"][0]["value"]["steps"]
                     for o in bars[title]["fieldConfig"]["overrides"]}
        assert set(overrides) == {i.name for i in items}, title
        for i in items:
            assert overrides[i.name] == [{"color": "green", "value": None},
                                         {"color": "orange", "value": int(i.interval_seconds * 1.5)},
                                         {"color": "red", "value": i.stale_after_seconds}], (title, i.name)
            assert i.stale_after_seconds > i.interval_seconds * 1.5
    # A checker on a 5-minute interval gets its own, later limits.
    slow = build_model(build_registry(Config.model_validate({"checkers": {"payments": {"interval_seconds": 300}}})))
    steps = {o["matcher"]["options"]: o["properties"][0]["value"]["steps"] for b in build_dashboards(slow).values()
             for p in _panels(b) if p["title"] == "Since last completed run" for o in p["fieldConfig"]["overrides"]}
    assert steps["payments"][1]["value"] == 450 and steps["payments"][2]["value"] == slow.checker(
        "payments").stale_after_seconds


def test_money_is_shown_in_a_money_unit(boards):
    money = [p for p in _panels(boards["zsmon-payments"]) if p["title"] in ("Money by bucket",
                                                                           "Deposits and withdrawals per second")]
    assert len(money) == 2 and all(p["fieldConfig"]["defaults"]["unit"] == "currencyUSD" for p in money)
    euro = render_model(build_model(build_registry(Config.model_validate({"render": {"money_unit": "currencyEUR"}}))))
    board = json.loads(euro["grafana/dashboards/zsmon-payments.json"])
    assert {p["fieldConfig"]["defaults"]["unit"] for p in _panels(board) if p["title"] == "Money by bucket"} == \
        {"currencyEUR"}


def test_dashboards_link_runbooks(boards):
    """Served by zsmon (render.zsmon_url) by default; under http.runbook_base_url when runbooks live elsewhere."""
    base = Config().render.zsmon_url + "/runbooks/"
    for uid, board in boards.items():
        assert any(link.get("url") == base for link in board["links"]), uid
    panel_links = [link["url"] for b in boards.values() for p in _panels(b) for link in p.get("links", [])]
    assert panel_links and all(re.fullmatch(re.escape(base) + r"[A-Z][A-Za-z]+", u) for u in panel_links)
    wiki = Config.model_validate({"http": {"runbook_base_url": "https://wiki.example/runbooks/"}})
    other = render_model(build_model(build_registry(wiki)))
    links = [link["url"] for p, t in other.items() if p.endswith(".json")
             for panel in _panels(json.loads(t)) for link in panel.get("links", [])]
    assert links and all(re.fullmatch(r"https://wiki\.example/runbooks/[A-Z][A-Za-z]+\.md", u) for u in links)


def test_the_panels_the_guide_names(boards):
    def titles(uid):
        return {p["title"] for p in _panels(boards[uid])}

    assert {"Request rate by status", "Latency percentiles", "Error rate"} <= titles("zsmon-api")
    assert {"Connections vs max_connections", "Slowest statements (mean time)", "Busiest statements",
            "Longest transaction and query"} <= titles("zsmon-database")
    assert {"Channel operations", "Money by bucket", "Violations by invariant",
            "Failing balance checks (last hour)"} <= titles("zsmon-payments")
    assert {"Open auctions", "Bid rate", "Allocation success"} <= titles("zsmon-auctions")
    assert {"Score distribution", "Reputation events", "Drift from baseline"} <= titles("zsmon-reputation")
    heat = next(p for p in _panels(boards["zsmon-reputation"]) if p["type"] == "heatmap")
    assert heat["targets"][0]["expr"] == 'sum by (le) (zerostate_reputation_score_bucket{job=~"$job", instance=~"$instance"})'
    assert heat["targets"][0]["format"] == "heatmap" and heat["options"]["calculate"] is False
    api = json.dumps(boards["zsmon-api"])
    assert "histogram_quantile(0.99, sum by (le) (rate(http_request_duration_seconds_bucket" in api


def test_invariants_overview_shows_every_invariant_with_last_success_and_duration(boards):
    board = boards["zsmon-invariants"]
    exprs = [e for _, e in _exprs(board)]
    for name, cls in build_registry(Config()).checker_classes.items():
        for inv in cls.invariants:
            assert any(f'invariant="{inv.id}"' in e and f'checker="{name}"' in e for e in exprs), (name, inv.id)
        assert any(f'checker="{name}"' in e and "last_success_timestamp" in e for e in exprs), name
        assert any(f'checker="{name}"' in e and "check_duration_seconds_bucket" in e for e in exprs), name
    for panel in _panels(board):
        if panel["type"] == "stat" and "invariant=" in panel["targets"][0]["expr"]:
            assert panel.get("links"), f"invariant panel {panel['title']} links its runbook"


def test_domain_dashboards_get_their_checkers_invariants(boards):
    for uid, checker in (("zsmon-payments", "payments"), ("zsmon-auctions", "auctions"),
                         ("zsmon-reputation", "reputation")):
        cls = build_registry(Config()).checker_classes.get(checker)
        if cls is None:
            continue
        exprs = [e for _, e in _exprs(boards[uid])]
        for inv in cls.invariants:
            assert any(f'invariant="{inv.id}"' in e for e in exprs), (uid, inv.id)


def test_grafana_provisioning(files):
    ds = yaml.safe_load(files["grafana/provisioning/datasources/zsmon.yml"])
    assert ds["datasources"][0]["name"] == "Prometheus" and ds["datasources"][0]["url"] == "http://prometheus:9090"
    prov = yaml.safe_load(files["grafana/provisioning/dashboards/zsmon.yml"])
    assert prov["providers"][0]["options"]["path"] == "/var/lib/grafana/dashboards/zsmon"


def test_a_panel_without_a_unit_is_refused():
    spec = {"uid": "x", "title": "x", "description": "x",
            "rows": [{"title": "r", "panels": [{"title": "p", "description": "d", "targets": [{"expr": "up"}]}]}]}
    with pytest.raises(SpecError, match="unit"):
        build_dashboard(spec, build_model(build_registry(Config())))


# ---- the windowed auction histograms, read as gauge histograms ---------------------------------------

BIDS_BOUNDS = (0, 1, 2, 3, 5, 8, 13, 21, float("inf"))


def _buckets(bids: list[int]) -> list[int]:
    """The exporter's cumulative buckets for the auctions in the window now."""
    return [sum(1 for n in bids if n <= b) for b in BIDS_BOUNDS]


def _histogram_quantile(q: float, buckets: list[int]) -> float:
    """Prometheus' histogram_quantile (linear interpolation within the bucket holding the rank)."""
    rank = q * buckets[-1]
    for i, count in enumerate(buckets):
        if count >= rank:
            lower, below = (BIDS_BOUNDS[i - 1], buckets[i - 1]) if i else (0.0, 0)
            return lower + (BIDS_BOUNDS[i] - lower) * (rank - below) / (count - below)
    raise AssertionError("unreachable")


def _promtool_expr_test(tmp_path, exprs: dict[str, dict[int, float]], series: list[tuple[str, str]]) -> str:
    """Run ``promtool test rules`` on expressions expected to have a value (no labels) at given minutes;
    returns promtool's complaints, empty when every expectation held."""
    doc = {"rule_files": [], "evaluation_interval": "1m", "tests": [{
        "interval": "1m",
        "input_series": [{"series": s, "values": v} for s, v in series],
        "promql_expr_test": [{"expr": e, "eval_time": f"{t}m", "exp_samples": [{"labels": "{}", "value": v}]}
                             for e, at in exprs.items() for t, v in at.items()]}]}
    path = tmp_path / f"t{len(list(tmp_path.iterdir()))}.test.yml"
    path.write_text(yaml.safe_dump(doc))
    proc = subprocess.run(["promtool", "test", "rules", path.name], cwd=tmp_path, capture_output=True, text=True,
                          timeout=60)
    return "" if proc.returncode == 0 else proc.stdout + proc.stderr


def test_auction_histogram_panels_read_the_window_without_rate(boards, tmp_path):
    """The panel's query gives the window's quantile while auctions leave the window and its buckets fall.

    Minutes 0-9: ten auctions in the window with 2 bids each; minutes 10-19 they have left it and four
    auctions with 8 bids each are in it; minutes 20-29 one more with 1 bid joins them. Two zsmon replicas
    export the same snapshot. The old query (rate() over the buckets) reads each fall as a counter reset and
    shows nothing at all while the window does not change (NaN), and a wrong value when it grows (0.5 bids).
    """
    phases = [[2] * 10, [8] * 4, [8] * 4 + [1]]
    per_phase = [_buckets(bids) for bids in phases]
    series = []
    for pod in ("zsmon-0", "zsmon-1"):
        for i, bound in enumerate(BIDS_BOUNDS):
            le = "+Inf" if bound == float("inf") else f"{float(bound)}"
            values = " ".join(f"{b[i]}x9" for b in per_phase)  # 10 samples a phase
            labels = f'job="zsmon", instance="{pod}:9090", pod="{pod}", le="{le}"'
            series.append((f"zerostate_auction_bids_per_auction_bucket{{{labels}}}", values))
    panel = next(p for p in _panels(boards["zsmon-auctions"]) if p["title"] == "Bids per auction")
    # Grafana's "All" for the job and instance variables.
    queries = {t["legendFormat"]: t["expr"].replace("$job", ".+").replace("$instance", ".+") for t in panel["targets"]}
    assert set(queries) == {"p50", "p90"}
    expect = {}
    for legend, q in (("p50", 0.5), ("p90", 0.9)):
        assert "rate(" not in queries[legend]
        expect[queries[legend]] = {m: _histogram_quantile(q, per_phase[m // 10]) for m in (2, 9, 10, 15, 20, 29)}
    # The window's quantile, in the bucket of the true one: a median of 2 bids, then of 8.
    assert expect[queries["p50"]][9] == 1.5 and expect[queries["p50"]][15] == 6.5
    assert _promtool_expr_test(tmp_path, expect, series) == ""
    old = {re.sub(r"\((zerostate_auction_bids_per_auction_bucket\{[^}]*\})\)", r"(rate(\1[5m]))", q): at
           for q, at in expect.items()}
    assert "rate(" in next(iter(old))
    assert _promtool_expr_test(tmp_path, old, series), "rate() over the window's buckets should be wrong"


# ---- Grafana's own schema: grafana-foundation-sdk, the build for the Grafana the compose file ships ---------

def _compose_grafana_version() -> str:
    compose = yaml.safe_load((Path(__file__).resolve().parents[1] / "docker-compose.monitoring.yml").read_text())
    image = compose["services"]["grafana"]["image"]
    return re.fullmatch(r"grafana/grafana(?:-oss)?:(\d+\.\d+)\.\d+", image).group(1)


def _dropped_or_changed(original, back, path=""):
    """What the round trip lost: keys missing afterwards, values changed (keys the SDK adds with defaults
    are no loss)."""
    if isinstance(original, dict):
        if not isinstance(back, dict):
            return [f"{path}: became {type(back).__name__}"]
        out = []
        for key, value in original.items():
            out += [f"{path}.{key}: dropped"] if key not in back else _dropped_or_changed(value, back[key],
                                                                                         f"{path}.{key}")
        return out
    if isinstance(original, list):
        if not isinstance(back, list) or len(back) != len(original):
            return [f"{path}: list changed"]
        return [p for i, (a, b) in enumerate(zip(original, back)) for p in _dropped_or_changed(a, b, f"{path}[{i}]")]
    return [] if original == back else [f"{path}: {original!r} became {back!r}"]


def _illegal_enums(obj, path=""):
    """Every value of an enum-typed (or Literal-typed) field of the decoded model that the enum does not allow:
    from_json copies strings as they come, so Grafana's enums are checked here against the SDK's types."""
    import enum
    import typing

    if isinstance(obj, list):
        return [p for i, x in enumerate(obj) for p in _illegal_enums(x, f"{path}[{i}]")]
    if isinstance(obj, dict):
        return [p for k, x in obj.items() for p in _illegal_enums(x, f"{path}.{k}")]
    if not hasattr(obj, "__dict__") or not type(obj).__module__.startswith("grafana_foundation_sdk"):
        return []
    try:
        hints = typing.get_type_hints(type(obj).__init__)
    except Exception:  # noqa: BLE001 - a model whose hints do not resolve is walked without them
        hints = {}
    out = []
    for name, value in vars(obj).items():
        where = f"{path}.{name}"
        allowed = set()
        for t in [hints.get(name)]:
            stack = [t]
            while stack:
                t = stack.pop()
                if isinstance(t, type) and issubclass(t, enum.Enum):
                    allowed |= {m.value for m in t}
                elif typing.get_origin(t) is typing.Literal:
                    allowed |= set(typing.get_args(t))
                else:
                    stack += [a for a in typing.get_args(t) if a is not type(None)]
        if allowed and value is not None:
            values = value if isinstance(value, list) else [value]
            out += [f"{where}: {v!r} not in {sorted(map(str, allowed))}" for v in values
                    if (v.value if isinstance(v, enum.Enum) else v) not in allowed]
        out += _illegal_enums(value, where)
    return out


def test_every_dashboard_round_trips_through_grafanas_schema(boards):
    """grafana-foundation-sdk's Dashboard.from_json parses a dashboard into Grafana's typed models (panel
    options and queries included, by plugin); a key Grafana does not know is dropped on the way back, and an
    enum value it does not allow is caught by the SDK's types. The SDK build is the compose file's Grafana."""
    from importlib.metadata import version

    from grafana_foundation_sdk.cog.encoder import JSONEncoder
    from grafana_foundation_sdk.cog.plugins import register_default_plugins
    from grafana_foundation_sdk.models.dashboard import Dashboard

    grafana = _compose_grafana_version()
    assert version("grafana-foundation-sdk").split("!")[-1].startswith(grafana + "."), \
        f"the test extra pins grafana-foundation-sdk for Grafana {version('grafana-foundation-sdk')}, compose " \
        f"ships {grafana}"
    register_default_plugins()
    for uid, board in boards.items():
        model = Dashboard.from_json(board)
        back = json.loads(json.dumps(model, cls=JSONEncoder))
        assert not _dropped_or_changed(board, back), (uid, _dropped_or_changed(board, back)[:10])
        assert not _illegal_enums(model), (uid, _illegal_enums(model)[:10])
        decoded = [p for p in model.panels if type(p).__name__ == "Panel"]
        assert all(not isinstance(p.options, dict) for p in decoded), f"{uid}: a panel's options were not typed"


def test_the_schema_check_catches_an_unknown_key_and_an_illegal_enum(boards):
    from grafana_foundation_sdk.cog.encoder import JSONEncoder
    from grafana_foundation_sdk.cog.plugins import register_default_plugins
    from grafana_foundation_sdk.models.dashboard import Dashboard

    register_default_plugins()
    board = json.loads(json.dumps(boards["zsmon-reputation"]))
    heat = next(p for p in board["panels"] if p["type"] == "heatmap")
    heat["options"]["tooltip"]["show"] = True  # Grafana 10.4's heatmap tooltip has no `show`
    stat = next(p for p in board["panels"] if p["type"] == "stat")
    stat["options"]["colorMode"] = "rainbow"
    back = json.loads(json.dumps(Dashboard.from_json(board), cls=JSONEncoder))
    assert any(p.endswith(".options.tooltip.show: dropped") for p in _dropped_or_changed(board, back))
    assert any("'rainbow'" in p for p in _illegal_enums(Dashboard.from_json(board)))
