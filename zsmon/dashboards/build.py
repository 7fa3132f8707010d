"""Grafana dashboards from compact Jinja2 specs.

A spec (``templates/<name>.dashboard.yml.j2``) says what an on-call engineer
sees: rows of panels with a title, a unit, a description, PromQL targets and
the runbooks they relate to. This module adds what Grafana needs around it
(ids, grid positions, the ``${datasource}`` variable, field config, options),
so every dashboard is built the same way and stays valid.
"""
from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from zsmon.alerts.model import Model, build_model
from zsmon.alerts.templating import environment, render_yaml
from zsmon.core.registry import Registry

TEMPLATES = Path(__file__).parent / "templates"
DATASOURCE = {"type": "prometheus", "uid": "${datasource}"}
SCHEMA_VERSION = 38
GRID_WIDTH = 24
PANEL_TYPES = {"timeseries", "stat", "gauge", "table", "heatmap", "text", "bargauge"}


# Dashboards for more than one deployment: every dashboard has `job` and `instance` variables (multi-select,
# "All" = `.+`, as Grafana's dashboard-linter expects) and every series selector of every query is filtered
# by them. A job-level recording rule (`job:...`) has no instance label and is filtered by job alone.
SCOPE_VARIABLES = ("job", "instance")
_KEYWORDS = {"by", "without", "on", "ignoring", "group_left", "group_right", "bool", "and", "or", "unless",
             "offset", "atan2", "inf", "nan"}
_AGGREGATIONS = {"sum", "min", "max", "avg", "group", "stddev", "stdvar", "count", "count_values", "bottomk", "topk",
                 "quantile"}
_TOKEN = re.compile(r'"(?:[^"\\]|\\.)*"|\'(?:[^\'\\]|\\.)*\'|\[[^\]]*\]|[A-Za-z_:][A-Za-z0-9_:]*|\s+|.')


def scoped(expr: str) -> str:
    """``expr`` with ``job=~"$job", instance=~"$instance"`` added to every series selector.

    A small scanner over the PromQL zsmon writes: an identifier is a series name unless it is a keyword, a
    function or aggregation (followed by ``(``), a label inside ``{...}`` or in a ``by (...)``-style list;
    strings and ``[...]`` ranges are skipped whole. The tests check the result with a real PromQL parser."""
    tokens = _TOKEN.findall(expr)
    out: list[str] = []
    depth_braces, label_list, expect_list = 0, 0, False
    i = 0
    while i < len(tokens):
        tok = tokens[i]
        nxt = next((t for t in tokens[i + 1:] if not t.isspace()), "")
        if tok == "{":
            depth_braces += 1
        elif tok == "}":
            depth_braces -= 1
        elif tok == "(" and expect_list:
            label_list, expect_list = 1, False
        elif tok == "(" and label_list:
            label_list += 1
        elif tok == ")" and label_list:
            label_list -= 1
        elif re.fullmatch(r"[A-Za-z_:][A-Za-z0-9_:]*", tok) and not depth_braces and not label_list:
            if tok in _KEYWORDS:
                expect_list = tok in ("by", "without", "on", "ignoring", "group_left", "group_right")
            elif nxt != "(" and tok not in _AGGREGATIONS:
                matchers = ", ".join(f'{v}=~"${v}"' for v in SCOPE_VARIABLES
                                     if not (v == "instance" and tok.startswith("job:")))
                out.append(tok)
                if nxt == "{":
                    j = tokens.index("{", i + 1)
                    out.extend(tokens[i + 1:j + 1])
                    inner = next((t for t in tokens[j + 1:] if not t.isspace()), "}")
                    out.append(matchers + ("" if inner == "}" else ", "))
                    depth_braces += 1
                    i = j + 1
                    continue
                out.append("{" + matchers + "}")
                i += 1
                continue
        out.append(tok)
        i += 1
    return "".join(out)


def _scope_variable(name: str, datasource: str) -> dict[str, Any]:
    source = "up" if name == "job" else 'up{job=~"$job"}'
    return {"name": name, "label": name.capitalize(), "type": "query",
            "datasource": {"type": "prometheus", "uid": "${datasource}"},
            "query": {"query": f"label_values({source}, {name})", "refId": f"{name}-values"},
            "current": {"selected": True, "text": ["All"], "value": ["$__all"]},
            "includeAll": True, "allValue": ".+", "multi": True, "refresh": 2, "regex": "", "sort": 1, "hide": 0,
            "options": []}


class SpecError(ValueError):
    """A dashboard spec is missing something every panel must have."""


def dashboard_specs() -> list[str]:
    return sorted(p.name for p in TEMPLATES.glob("*.dashboard.yml.j2"))


OVERVIEW_UID = "zsmon-invariants"


def build_dashboards(model: Model) -> dict[str, dict[str, Any]]:
    """Every dashboard, keyed by uid. Fills ``model.evidence``: the panel each alert links as its evidence
    (a spec panel's ``evidence:`` list), preferring a checker's own dashboard over the overview."""
    env = environment(TEMPLATES)
    out: dict[str, dict[str, Any]] = {}
    evidence: dict[str, tuple[str, int]] = {}
    for name in dashboard_specs():
        spec = render_yaml(env, name, model.context())
        board = build_dashboard(spec, model, evidence)
        if board["uid"] in out:
            raise SpecError(f"{name}: uid {board['uid']} is used twice")
        out[board["uid"]] = board
    model.evidence.clear()
    model.evidence.update(evidence)
    return out


def build_dashboard(spec: dict[str, Any], model: Model,
                    evidence: dict[str, tuple[str, int]] | None = None) -> dict[str, Any]:
    uid = spec["uid"]
    evidence = {} if evidence is None else evidence
    panels: list[dict[str, Any]] = []
    next_id = 1
    y = 0
    for row in spec.get("rows", []):
        panels.append({"id": next_id, "type": "row", "title": row["title"], "collapsed": False,
                       "gridPos": {"h": 1, "w": GRID_WIDTH, "x": 0, "y": y}, "panels": []})
        next_id += 1
        y += 1
        for line in _lines(row.get("panels") or [], f"dashboard {uid}, row {row['title']!r}"):
            x = 0
            height = max(h for _, _, h in line)
            for p, w, _ in line:
                panels.append(_panel(p, next_id, {"h": height, "w": w, "x": x, "y": y}, model, uid))
                for key in p.get("evidence") or []:
                    if key not in evidence or evidence[key][0] == OVERVIEW_UID:
                        evidence[key] = (uid, next_id)
                next_id += 1
                x += w
            y += height
    links = [{"title": "Runbooks", "type": "link", "url": model.runbook_index(),
              "targetBlank": True, "icon": "doc"},
             {"title": "ZeroState dashboards", "type": "dashboards", "tags": ["zerostate"], "asDropdown": True,
              "includeVars": True, "keepTime": True}]
    for alert in spec.get("runbooks", []):
        links.append({"title": f"Runbook: {alert}", "type": "link", "url": model.runbook(alert), "targetBlank": True,
                      "icon": "doc"})
    return {
        "uid": uid,
        "title": spec["title"],
        "description": spec["description"],
        "tags": sorted({"zerostate", "zsmon", *spec.get("tags", [])}),
        "editable": False,
        "graphTooltip": 1,
        "links": links,
        "panels": panels,
        "refresh": "30s",
        "schemaVersion": SCHEMA_VERSION,
        "time": {"from": spec.get("from", "now-6h"), "to": "now"},
        "timepicker": {},
        "timezone": "utc",
        "version": 1,
        "annotations": {"list": [{
            "builtIn": 1, "datasource": {"type": "grafana", "uid": "-- Grafana --"}, "enable": True, "hide": True,
            "iconColor": "rgba(0, 211, 255, 1)", "name": "Annotations & Alerts", "type": "dashboard"}]},
        "templating": {"list": [{
            "name": "datasource", "label": "Data source", "type": "datasource", "query": "prometheus",
            "current": {"selected": False, "text": model.config.render.grafana_datasource,
                        "value": model.config.render.grafana_datasource},
            "hide": 0, "refresh": 1, "regex": "", "options": [], "includeAll": False, "multi": False},
            *(_scope_variable(v, model.config.render.grafana_datasource) for v in SCOPE_VARIABLES)]},
    }


def _lines(specs: list[dict[str, Any]], where: str) -> list[list[tuple[dict[str, Any], int, int]]]:
    """Panels in lines of the 24-column grid, with no holes: a line takes panels while they fit, then its
    widths are stretched to fill the line (the spare columns go to its last panels, one each) and every panel
    of it gets the line's tallest height. Returns (spec, width, height) per panel."""
    lines: list[list[tuple[dict[str, Any], int, int]]] = [[]]
    for p in specs:
        w, h = int(p.get("w", 12)), int(p.get("h", 8))
        if not 1 <= w <= GRID_WIDTH or h < 1:
            raise SpecError(f"{where}, panel {p.get('title')!r}: w must be 1-{GRID_WIDTH} and h at least 1")
        if sum(pw for _, pw, _ in lines[-1]) + w > GRID_WIDTH:
            lines.append([])
        lines[-1].append((p, w, h))
    out = []
    for line in lines:
        if not line:
            continue
        spare = GRID_WIDTH - sum(w for _, w, _ in line)
        widths = [w + spare // len(line) for _, w, _ in line]
        for i in range(spare % len(line)):
            widths[-1 - i] += 1
        out.append([(p, w, h) for (p, _, h), w in zip(line, widths)])
    return out


def _thresholds(pairs: list[Any]) -> dict[str, Any]:
    steps: list[dict[str, Any]] = [{"color": "green", "value": None}]
    steps += [{"color": color, "value": value} for color, value in pairs]
    return {"mode": "absolute", "steps": steps}


def _panel(p: dict[str, Any], pid: int, grid: dict[str, int], model: Model, uid: str) -> dict[str, Any]:
    kind = p.get("type", "timeseries")
    where = f"dashboard {uid}, panel {p.get('title')!r}"
    if kind not in PANEL_TYPES:
        raise SpecError(f"{where}: unknown panel type {kind!r}")
    for key in ("title", "description", "unit"):
        if not p.get(key):
            raise SpecError(f"{where}: every panel needs a {key}")
    panel: dict[str, Any] = {
        "id": pid, "type": kind, "title": p["title"], "description": " ".join(str(p["description"]).split()),
        "gridPos": grid, "datasource": DATASOURCE,
    }
    links = [{"title": f"Runbook: {a}", "url": model.runbook(a), "targetBlank": True} for a in p.get("runbooks", [])]
    if links:
        panel["links"] = links
    defaults: dict[str, Any] = {"unit": p["unit"]}
    for key in ("min", "max", "decimals"):
        if key in p:
            defaults[key] = p[key]
    defaults["thresholds"] = _thresholds(p.get("thresholds", []))
    if p.get("mappings"):
        defaults["mappings"] = p["mappings"]
    defaults["color"] = {"mode": "thresholds" if kind in ("stat", "gauge", "bargauge") else "palette-classic"}
    if kind == "timeseries":
        defaults["custom"] = {"drawStyle": "line", "lineWidth": 1, "fillOpacity": 10, "showPoints": "never",
                              "spanNulls": False,
                              "stacking": {"mode": "normal" if p.get("stack") else "none", "group": "A"},
                              "thresholdsStyle": {"mode": "line" if p.get("thresholds") else "off"}}
    # Per-series thresholds (``overrides: [{name: <series>, thresholds: [[color, value], ...]}]``): e.g. a
    # staleness bar per checker, orange and red at that checker's own limits.
    overrides = [{"matcher": {"id": "byName", "options": o["name"]},
                  "properties": [{"id": "thresholds", "value": _thresholds(o["thresholds"])}]}
                 for o in p.get("overrides", [])]
    panel["fieldConfig"] = {"defaults": defaults, "overrides": overrides}
    panel["options"] = _options(kind, p)
    if kind == "text":
        panel.pop("datasource")
        return panel
    targets = p.get("targets") or []
    if not targets:
        raise SpecError(f"{where}: a {kind} panel needs at least one target")
    panel["targets"] = []
    for i, t in enumerate(targets):
        target = {"refId": chr(ord("A") + i), "datasource": DATASOURCE, "expr": scoped(" ".join(t["expr"].split())),
                  "legendFormat": t.get("legend", "__auto"), "range": not t.get("instant", False),
                  "instant": bool(t.get("instant", False)), "editorMode": "code"}
        if kind == "heatmap":
            target["format"] = "heatmap"
        elif kind == "table" or t.get("format") == "table":
            target["format"] = "table"
        else:
            target["format"] = "time_series"
        panel["targets"].append(target)
    if kind == "table":
        panel["transformations"] = [{"id": "merge", "options": {}},
                                    {"id": "organize", "options": {"excludeByName": {"Time": True}}}]
    return panel


def _options(kind: str, p: dict[str, Any]) -> dict[str, Any]:
    if kind == "text":
        return {"mode": "markdown", "content": p["content"].strip() + "\n"}
    if kind == "timeseries":
        return {"legend": {"displayMode": "table" if p.get("legend_table") else "list", "placement": "bottom",
                           "showLegend": True, "calcs": ["lastNotNull", "max"] if p.get("legend_table") else []},
                "tooltip": {"mode": "multi", "sort": "desc"}}
    if kind in ("stat", "gauge", "bargauge"):
        opts = {"reduceOptions": {"calcs": ["lastNotNull"], "fields": "", "values": False},
                "orientation": "auto", "text": {}}
        if kind == "stat":
            opts.update({"colorMode": "background", "graphMode": "none", "justifyMode": "auto", "textMode": "auto"})
        if kind == "gauge":
            opts.update({"showThresholdLabels": False, "showThresholdMarkers": True})
        if kind == "bargauge":
            opts.update({"displayMode": "gradient", "showUnfilled": True})
        return opts
    if kind == "heatmap":
        return {"calculate": False, "cellGap": 1, "color": {"mode": "scheme", "scheme": "Oranges", "steps": 64,
                                                           "exponent": 0.5, "fill": "dark-orange", "reverse": False},
                "yAxis": {"axisPlacement": "left", "unit": p.get("y_unit", "short")},
                "rowsFrame": {"layout": "auto"}, "legend": {"show": True},
                "tooltip": {"yHistogram": True}, "exemplars": {"color": "rgba(255,0,255,0.7)"},
                "cellValues": {}, "filterValues": {"le": 1e-9}, "showValue": "never"}
    if kind == "table":
        return {"showHeader": True, "cellHeight": "sm", "footer": {"show": False, "reducer": ["sum"]}}
    return {}


def dashboard_links(registry: Registry) -> list[dict[str, str]]:
    """Links to the Grafana dashboards ``zsmon render`` provisions (by uid), else to the Grafana base URL."""
    grafana_url = registry.config.http.grafana_url
    if not grafana_url:
        return []
    base = grafana_url.rstrip("/")
    # The same model render uses: the uids on the status page are the ones Grafana was given.
    boards = build_dashboards(build_model(registry))
    links = [{"title": str(b.get("title") or uid), "url": f"{base}/d/{uid}"} for uid, b in boards.items()]
    return sorted(links, key=lambda d: d["title"]) or [{"title": "Grafana", "url": base + "/"}]
