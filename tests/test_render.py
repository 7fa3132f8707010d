"""`zsmon render`: what it writes, that the real tools accept it, and that the registry drives it.

Goldens: `tests/golden` holds the output for the default config and the built-in checkers, and
`docs/runbooks` the generated runbook pages. After changing a template or adding a checker, run
`.venv/bin/python -m zsmon.alerts.render --update-golden` and review the diff.
"""
from __future__ import annotations

import importlib
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import textwrap
import time
import uuid
from pathlib import Path
from types import ModuleType

import pytest
import requests
import yaml

import zsmon.checkers
import zsmon.exporters
from zsmon.alerts.model import build_model
from zsmon.alerts.render import GOLDEN, MARKER, RUNBOOKS, alert_rules, docs_runbooks, golden_files, \
    golden_model, render_all, render_files, render_model
from zsmon.alerts.runbooks import GENERATED_MARK
from zsmon.app import build_registry
from zsmon.core.config import Config, ConfigError
from zsmon.core.registry import Registry

ROOT = Path(__file__).resolve().parents[1]
ZSMON = str(Path(sys.executable).with_name("zsmon"))
PROMTOOL = shutil.which("promtool") or "/usr/bin/promtool"
AMTOOL = shutil.which("amtool") or "/usr/bin/amtool"
ALERTMANAGER = shutil.which("prometheus-alertmanager") or shutil.which("alertmanager")
UPDATE = ".venv/bin/python -m zsmon.alerts.render --update-golden"


@pytest.fixture(scope="module")
def rendered(tmp_path_factory) -> Path:
    """The default config rendered through the CLI, with whatever the registry holds now."""
    out = tmp_path_factory.mktemp("render") / "monitoring"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("ZSMON_", "DB_", "REDIS_"))}
    proc = subprocess.run([ZSMON, "render", "--out", str(out)], capture_output=True, text=True, env=env, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert re.fullmatch(r"checkers: .*\(built in\).*\nwrote \d+ files to .*\n", proc.stdout)
    return out


def _run(*cmd: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(list(cmd), capture_output=True, text=True, cwd=cwd, timeout=60)


# ---- layout and the real tools ----------------------------------------------------------------------


def test_render_writes_every_part(rendered: Path):
    files = {p.relative_to(rendered).as_posix() for p in rendered.rglob("*") if p.is_file()}
    assert {"prometheus/prometheus.yml", "alertmanager/alertmanager.yml",
            "grafana/provisioning/datasources/zsmon.yml", "grafana/provisioning/dashboards/zsmon.yml",
            "prometheus/rules/zsmon-money.rules.yml", "prometheus/rules/zerostate-platform.rules.yml",
            "prometheus/rules/zerostate-slo.rules.yml", "prometheus/rules/zsmon-self.rules.yml", MARKER} <= files
    for name in build_registry(Config()).checker_classes:
        assert f"prometheus/rules/zsmon-checker-{name}.rules.yml" in files
        assert f"prometheus/tests/zsmon-checker-{name}.test.yml" in files
    boards = {f for f in files if f.startswith("grafana/dashboards/")}
    assert boards == {f"grafana/dashboards/zsmon-{u}.json" for u in
                      ("api", "database", "payments", "auctions", "reputation", "invariants", "self")}


def test_promtool_accepts_config_and_rules(rendered: Path):
    proc = _run(PROMTOOL, "check", "config", "prometheus.yml", cwd=rendered / "prometheus")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    rules = sorted(str(p) for p in (rendered / "prometheus/rules").glob("*.yml"))
    proc = _run(PROMTOOL, "check", "rules", *rules)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_prometheus_scrapes_the_four_jobs_and_sends_to_alertmanager(rendered: Path):
    prom = yaml.safe_load((rendered / "prometheus/prometheus.yml").read_text())
    jobs = {j["job_name"]: j["static_configs"][0]["targets"] for j in prom["scrape_configs"]}
    assert jobs == {"zsmon": ["zsmon:9090"], "zerostate-api": ["api:9090"],
                    "postgres": ["postgres-exporter:9187"], "redis": ["redis-exporter:9121"]}
    assert prom["alerting"]["alertmanagers"][0]["static_configs"][0]["targets"] == ["alertmanager:9093"]
    assert sorted(prom["rule_files"]) == sorted(f"rules/{p.name}" for p in (rendered / "prometheus/rules").iterdir())


def test_amtool_accepts_alertmanager_config(rendered: Path):
    proc = _run(AMTOOL, "check-config", str(rendered / "alertmanager/alertmanager.yml"))
    assert proc.returncode == 0, proc.stdout + proc.stderr


@pytest.mark.parametrize("labels, receiver", [
    (["severity=critical", "alertname=DatabaseDown"], "pager"),
    (["severity=critical", "alertname=BalanceInvariantViolation", "checker=payments"], "pager"),
    (["severity=critical", "alertname=PaymentsChannelConservationViolation", "checker=payments",
      "invariant=channel_conservation"], "pager"),
    (["severity=warning", "alertname=HighErrorRate"], "chat"),
    (["severity=warning", "alertname=InvariantCheckStale", "checker=schema"], "chat"),
    (["severity=info", "alertname=Something"], "null"),
    (["alertname=NoSeverity"], "null"),
    (["severity=info", "alertname=Watchdog"], "watchdog"),
])
def test_amtool_routes(rendered: Path, labels: list[str], receiver: str):
    """critical pages, warning goes to chat, info goes nowhere; Watchdog feeds the dead man's switch."""
    proc = _run(AMTOOL, "config", "routes", "test", f"--config.file={rendered / 'alertmanager/alertmanager.yml'}",
                f"--verify.receivers={receiver}", *labels)
    assert proc.returncode == 0, f"{labels} routed to {proc.stdout.strip()}, expected {receiver}: {proc.stderr}"


def test_money_alerts_of_one_checker_are_one_page(rendered: Path):
    am = yaml.safe_load((rendered / "alertmanager/alertmanager.yml").read_text())
    pager = next(r for r in am["route"]["routes"] if r["receiver"] == "pager")
    assert pager["routes"][0]["matchers"] == ['checker=~".+"'] and pager["routes"][0]["group_by"] == ["checker"]
    receivers = {r["name"]: r for r in am["receivers"]}
    assert receivers["pager"]["webhook_configs"][0]["url"] == Config().render.pager_webhook_url
    assert receivers["chat"]["webhook_configs"][0]["url"] == Config().render.chat_webhook_url


def _inhibited(am: dict, source: dict[str, str], target: dict[str, str]) -> bool:
    """Alertmanager's inhibition semantics (equality and regex matchers, `equal` labels)."""

    def matches(matchers: list[str], labels: dict[str, str]) -> bool:
        for m in matchers:
            name, op, value = re.fullmatch(r'(\w+)(=~|!~|!=|=)"(.*)"', m).groups()
            got = labels.get(name, "")
            ok = {"=": got == value, "!=": got != value, "=~": re.fullmatch(value, got) is not None,
                  "!~": re.fullmatch(value, got) is None}[op]
            if not ok:
                return False
        return True

    return any(matches(r["source_matchers"], source) and matches(r["target_matchers"], target)
               and all(source.get(k) == target.get(k) for k in r.get("equal", []))
               for r in am["inhibit_rules"])


def test_inhibition_rules_silence_consequences_not_money(rendered: Path):
    am = yaml.safe_load((rendered / "alertmanager/alertmanager.yml").read_text())
    # DatabaseDown carries no job or instance: one alert per database, whoever saw it (pg_up or zsmon).
    db_down = {"alertname": "DatabaseDown", "severity": "critical"}
    for name in ("InvariantCheckFailing", "InvariantCheckStale", "InvariantCheckMissing"):
        assert _inhibited(am, db_down, {"alertname": name, "severity": "warning", "checker": "payments"})
    assert _inhibited(am, db_down, {"alertname": "ZsmonExporterFailing", "exporter": "postgres"})
    assert not _inhibited(am, db_down, {"alertname": "ZsmonExporterFailing", "exporter": "redis"})
    exporter_down = {"alertname": "ExporterDown", "severity": "warning", "job": "postgres",
                     "instance": "postgres-exporter:9187"}
    assert _inhibited(am, db_down, exporter_down)
    assert not _inhibited(am, db_down, {**exporter_down, "job": "redis", "instance": "redis-exporter:9121"})
    # With the database up, postgres-exporter down is ExporterDown and nothing silences it.
    for rule in alert_rules(render_files(build_registry(Config()))):
        if rule["alert"] != "DatabaseDown":
            source = {"alertname": rule["alert"], **rule["labels"], "job": "postgres",
                      "instance": "postgres-exporter:9187", "exporter": "postgres", "checker": "payments"}
            assert not _inhibited(am, source, exporter_down), f"{rule['alert']} inhibits ExporterDown of postgres"
    # A database outage never hides a money violation, nor any invariant's own alert.
    assert not _inhibited(am, db_down, {"alertname": "BalanceInvariantViolation", "checker": "payments"})
    for inv in golden_model().invariants:
        assert not _inhibited(am, db_down, {"alertname": inv.alert, "checker": inv.checker, "invariant": inv.id})
    fast = {"alertname": "ApiErrorBudgetFastBurn", "severity": "critical", "job": "zerostate-api"}
    assert _inhibited(am, fast, {"alertname": "ApiErrorBudgetSlowBurn", "job": "zerostate-api"})
    failing = {"alertname": "InvariantCheckFailing", "checker": "auctions"}
    assert _inhibited(am, failing, {"alertname": "InvariantCheckStale", "checker": "auctions"})
    assert not _inhibited(am, failing, {"alertname": "InvariantCheckStale", "checker": "schema"})
    # Every alert an inhibit rule names exists.
    names = {r["alert"] for r in alert_rules(render_files(build_registry(Config())))}
    for rule in am["inhibit_rules"]:
        for m in rule["source_matchers"] + rule["target_matchers"]:
            if m.startswith("alertname"):
                pattern = re.fullmatch(r'alertname=~?"(.*)"', m).group(1)
                for part in pattern.split("|"):
                    assert part in names, f"inhibit rule names unknown alert {part}"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.skipif(ALERTMANAGER is None, reason="prometheus-alertmanager is not installed")
def test_real_alertmanager_inhibits_what_database_down_causes(rendered: Path, tmp_path: Path):
    port = _free_port()
    proc = subprocess.Popen([ALERTMANAGER, f"--config.file={rendered / 'alertmanager/alertmanager.yml'}",
                             f"--storage.path={tmp_path}", f"--web.listen-address=127.0.0.1:{port}",
                             "--cluster.listen-address="], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 15
        while True:
            try:
                if requests.get(f"{base}/-/ready", timeout=1).ok:
                    break
            except requests.ConnectionError:
                pass
            assert time.monotonic() < deadline, "alertmanager did not start"
            time.sleep(0.1)

        def post(alerts: list[dict[str, str]], ends_at: str | None = None) -> None:
            body = [{"labels": a, "annotations": {}, **({"endsAt": ends_at} if ends_at else {})} for a in alerts]
            r = requests.post(f"{base}/api/v2/alerts", json=body, timeout=5)
            assert r.ok, r.text

        def inhibited_when(expect: dict[tuple[str, str], bool | None]) -> dict[tuple[str, str], bool]:
            """The active alerts and whether each is inhibited, once they are as expected (None: either)."""
            deadline = time.monotonic() + 15
            while True:
                active = requests.get(f"{base}/api/v2/alerts", timeout=5).json()
                got = {(a["labels"]["alertname"], a["labels"].get("exporter") or a["labels"].get("job", "")):
                       bool(a["status"]["inhibitedBy"]) for a in active}
                if all(got.get(k) == v for k, v in expect.items() if v is not None) and set(got) == set(expect) \
                        or time.monotonic() > deadline:
                    return got
                time.sleep(0.1)

        # postgres-exporter down, the database up: ExporterDown is the true alert and nothing hides it, whatever
        # else fires (every other alert that inhibits anything, with the labels of postgres-exporter).
        am = yaml.safe_load((rendered / "alertmanager/alertmanager.yml").read_text())
        others = sorted({re.fullmatch(r'alertname="(\w+)"', m).group(1) for r in am["inhibit_rules"]
                         for m in r["source_matchers"] if m.startswith("alertname=")} - {"DatabaseDown"})
        assert others
        sources = [{"alertname": name, "severity": "critical", "job": "postgres", "instance": "postgres-exporter:9187",
                    "checker": "payments"} for name in others]
        exporter_down = {"alertname": "ExporterDown", "severity": "warning", "job": "postgres",
                         "instance": "postgres-exporter:9187"}
        post([exporter_down, *sources])
        # (Those others may inhibit each other: only ExporterDown matters here.)
        expect = {("ExporterDown", "postgres"): False, **{(name, "postgres"): None for name in others}}
        got = inhibited_when(expect)
        assert set(got) == set(expect) and got[("ExporterDown", "postgres")] is False, got
        post(sources, ends_at="2000-01-01T00:00:00Z")  # resolved: they take no part in what follows
        expect = {("ExporterDown", "postgres"): False}
        assert inhibited_when(expect) == expect
        # A real database outage (the labels DatabaseDown really has: none but its own): it silences what it
        # causes, the postgres exporter's noise included, never a money violation nor another exporter.
        post([
            {"alertname": "DatabaseDown", "severity": "critical"},
            {"alertname": "InvariantCheckFailing", "severity": "warning", "checker": "payments"},
            exporter_down,
            {"alertname": "ZsmonExporterFailing", "severity": "warning", "exporter": "postgres",
             "job": "zsmon", "instance": "zsmon:9090"},
            {"alertname": "ExporterDown", "severity": "warning", "job": "redis", "instance": "redis:9121"},
            {"alertname": "BalanceInvariantViolation", "severity": "critical", "checker": "payments"},
        ])
        expect = {("InvariantCheckFailing", ""): True, ("ExporterDown", "postgres"): True,
                  ("ZsmonExporterFailing", "postgres"): True, ("ExporterDown", "redis"): False,
                  ("BalanceInvariantViolation", ""): False, ("DatabaseDown", ""): False}
        assert inhibited_when(expect) == expect
    finally:
        proc.terminate()
        proc.wait(timeout=10)


# ---- goldens, atomic writes, mistakes ---------------------------------------------------------------


def test_golden_copies_are_current():
    files = golden_files()
    on_disk = {p.relative_to(GOLDEN).as_posix(): p.read_text(encoding="utf-8")
               for p in GOLDEN.rglob("*") if p.is_file()}
    stale = sorted(set(files) ^ set(on_disk)) + sorted(f for f in files if f in on_disk and files[f] != on_disk[f])
    assert not stale, f"tests/golden is stale ({stale[:5]}...): run `{UPDATE}` and review the diff"


def test_docs_runbooks_are_current_and_every_alert_has_one():
    pages = docs_runbooks(golden_model())
    for name, text in pages.items():
        path = RUNBOOKS / name
        assert path.exists() and path.read_text(encoding="utf-8") == text, \
            f"docs/runbooks/{name} is stale: run `{UPDATE}`"
    generated = {p.name for p in RUNBOOKS.glob("*.md") if p.read_text(encoding="utf-8").startswith(GENERATED_MARK)}
    assert generated == set(pages), f"docs/runbooks has generated pages for no current alert: run `{UPDATE}`"
    config = Config()
    for rule in alert_rules(render_model(golden_model())):
        name = rule["alert"]
        page = RUNBOOKS / f"{name}.md"
        assert page.exists(), f"alert {name} has no runbook docs/runbooks/{name}.md"
        assert rule["annotations"]["runbook_url"] == f"{config.render.zsmon_url}/runbooks/{name}"
        text = page.read_text(encoding="utf-8")
        for section in ("## What it means", "## First checks", "## How to resolve"):
            assert section in text, f"docs/runbooks/{name}.md lacks {section!r}"


def test_invariant_runbooks_give_the_command_and_the_sql():
    model = golden_model()
    for inv in model.invariants:
        text = (RUNBOOKS / f"{inv.alert}.md").read_text(encoding="utf-8")
        assert f"zsmon check --once --only {inv.checker} --format json" in text
        assert f'select(.invariant == "{inv.id}")' in text
        assert "SELECT" in text
    for c in model.checkers:
        assert (RUNBOOKS / f"{c.name}.md").exists(), "the status page links docs/runbooks/<checker>.md"


def test_double_counting_note_on_payment_dashboard_and_runbook(rendered: Path):
    board = json.loads((rendered / "grafana/dashboards/zsmon-payments.json").read_text())
    texts = [p["options"]["content"] for p in board["panels"] if p["type"] == "text"]
    assert any("double-counts settled money" in t and "global_conservation" in t for t in texts)
    runbook = (RUNBOOKS / "BalanceInvariantViolation.md").read_text()
    assert "counts\nsettled money twice" in runbook or "settled money twice" in runbook.replace("\n", " ")


def test_render_replaces_its_own_output_atomically(tmp_path: Path):
    out = tmp_path / "out"
    first = render_all(build_registry(Config()), out)
    assert first and all(p.is_file() for p in first) and (out / MARKER).exists()
    (out / "prometheus/rules/leftover.yml").write_text("stale")
    config = Config.model_validate({"render": {"pager_webhook_url": "http://127.0.0.1:9/page"}})
    second = render_all(build_registry(config), out)
    assert sorted(second) == sorted(first)
    assert not (out / "prometheus/rules/leftover.yml").exists()
    assert "http://127.0.0.1:9/page" in (out / "alertmanager/alertmanager.yml").read_text()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"], "temporary directories were left behind"
    assert oct(out.stat().st_mode & 0o777) == "0o755"


def test_render_refuses_a_foreign_directory(tmp_path: Path):
    foreign = tmp_path / "etc"
    foreign.mkdir()
    (foreign / "passwd").write_text("keep me")
    with pytest.raises(ConfigError, match="not empty and was not written by zsmon render"):
        render_all(build_registry(Config()), foreign)
    assert (foreign / "passwd").read_text() == "keep me"
    (tmp_path / "file").write_text("x")
    with pytest.raises(ConfigError, match="not a directory"):
        render_all(build_registry(Config()), tmp_path / "file")


def test_render_unwritable_directory_is_one_line(tmp_path: Path):
    # A file where the parent directory should be: unwritable for root too (a 0500 directory is not).
    blocker = tmp_path / "blocker"
    blocker.write_text("x")
    with pytest.raises(ConfigError, match="cannot create files in .*blocker"):
        render_all(build_registry(Config()), blocker / "sub" / "out")
    assert blocker.read_text() == "x"


def test_cli_unwritable_directory_is_one_line_exit_2(tmp_path: Path):
    blocker = tmp_path / "blocker"
    blocker.write_text("a file where a directory is needed")
    proc = subprocess.run([ZSMON, "render", "--out", str(blocker / "out")], capture_output=True, text=True,
                          timeout=60)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("zsmon: error: render --out"), proc.stderr


def test_bad_render_config_is_one_line(tmp_path: Path):
    cfg = tmp_path / "zsmon.yml"
    cfg.write_text('render:\n  http_error_matcher: "status 5xx"\n')
    proc = subprocess.run([ZSMON, "--config", str(cfg), "render", "--out", str(tmp_path / "o")],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2
    assert "render.http_error_matcher" in proc.stderr and len(proc.stderr.strip().splitlines()) == 1


def test_config_values_reach_the_output():
    config = Config.model_validate({"render": {
        "http_requests_metric": "zerostate_http_requests_total", "http_error_matcher": 'status!~"OK|2.."',
        "availability_slo": 0.99, "api_targets": ["api-1:9090", "api-2:9090"], "scrape_interval_seconds": 15,
        "grafana_datasource": "Mimir"}})
    files = render_files(build_registry(config))
    platform = files["prometheus/rules/zerostate-platform.rules.yml"]
    assert 'zerostate_http_requests_total{job="zerostate-api", status!~"OK|2.."}' in platform
    slo = files["prometheus/rules/zerostate-slo.rules.yml"]
    assert "(14.4 * 0.01)" in slo and "(6 * 0.01)" in slo and "(3 * 0.01)" in slo and "(1 * 0.01)" in slo
    assert "api-2:9090" in files["prometheus/prometheus.yml"] and "scrape_interval: 15s" in files[
        "prometheus/prometheus.yml"]
    assert "Mimir" in files["grafana/provisioning/datasources/zsmon.yml"]
    board = json.loads(files["grafana/dashboards/zsmon-api.json"])
    assert board["templating"]["list"][0]["current"]["value"] == "Mimir"


def test_disabled_checker_renders_nothing():
    config = Config.model_validate({"checkers": {"schema": {"enabled": False}}})
    files = render_files(build_registry(config))
    assert "prometheus/rules/zsmon-checker-schema.rules.yml" not in files
    assert "SchemaRequiredColumnsPresentViolation" not in files["grafana/dashboards/zsmon-invariants.json"]


# ---- the registry drives everything -----------------------------------------------------------------


@pytest.fixture
def checker_package(tmp_path_factory, monkeypatch):
    """``checker_package(source)``: a throwaway package of checkers (one module holding ``source``), importable
    for this test only, to hand to a ``Registry`` beside (or instead of) the built-in ``zsmon.checkers``.

    Nothing global changes: the registry only counts classes of the packages it is given, so the
    real one (``build_registry``) never sees these, and the modules are forgotten afterwards.
    """
    made: list[str] = []

    def make(source: str) -> ModuleType:
        name = f"zz_test_checkers_{uuid.uuid4().hex[:8]}"
        root = tmp_path_factory.mktemp("pkg")
        (root / name).mkdir()
        (root / name / "__init__.py").write_text("")
        (root / name / "probe.py").write_text(textwrap.dedent(source))
        monkeypatch.syspath_prepend(str(root))
        made.append(name)
        return importlib.import_module(name)

    yield make
    for module in [m for m in sys.modules if m.split(".")[0] in made]:
        del sys.modules[module]


PROBE_CHECKER = """
    from zsmon.sdk import Checker, Invariant


    class ProbeChecker(Checker):
        name = "zz_probe"
        description = "A checker that exists only inside a test."
        invariants = (
            Invariant("widget_conservation", "Widgets in equal widgets out.", entity_type="widget",
                      severity="critical"),
            Invariant("gadget_freshness", "Gadgets are fresh.", entity_type="gadget", severity="warning"),
        )
        default_interval_seconds = 20.0

        def run(self, ctx):  # pragma: no cover - never run
            raise AssertionError
"""


def test_new_checker_appears_everywhere_with_no_other_edit(checker_package, tmp_path: Path):
    probe = checker_package(PROBE_CHECKER)
    registry = Registry(Config(), checker_packages=[zsmon.checkers, probe], exporter_packages=[zsmon.exporters])
    assert "zz_probe" in registry.checker_classes
    assert set(build_registry(Config()).checker_classes) | {"zz_probe"} == set(registry.checker_classes)
    assert "zz_probe" not in build_registry(Config()).checker_classes, "the throwaway checker leaked"
    files = render_files(registry)
    rules = yaml.safe_load(files["prometheus/rules/zsmon-checker-zz_probe.rules.yml"])["groups"][0]["rules"]
    by_name = {r["alert"]: r for r in rules}
    crit, warn = by_name["ZzProbeWidgetConservationViolation"], by_name["ZzProbeGadgetFreshnessViolation"]
    assert crit["labels"]["severity"] == "critical" and crit["for"] == "0s"
    assert warn["labels"]["severity"] == "warning"
    assert 'invariant="widget_conservation"' in crit["expr"]
    stale = next(r for r in rules if r["alert"] == "InvariantCheckStale")
    assert stale["expr"].endswith("> 70"), "stale after the 20 s interval + the 30 s statement timeout + two 10 s scrapes"
    assert "rules/zsmon-checker-zz_probe.rules.yml" in files["prometheus/prometheus.yml"]
    overview = json.loads(files["grafana/dashboards/zsmon-invariants.json"])
    exprs = [t["expr"] for p in overview["panels"] for t in p.get("targets", [])]
    assert any('invariant="widget_conservation"' in e for e in exprs)
    assert any('checker="zz_probe"' in e and "last_success" in e for e in exprs)
    links = [link["url"] for p in overview["panels"] for link in p.get("links", [])]
    assert any(u.endswith("/runbooks/ZzProbeWidgetConservationViolation") for u in links)
    # Its alerts link their evidence: the status page filtered to it, and its panel on the overview.
    assert crit["annotations"]["status_url"] == \
        "http://localhost:8080/?checker=zz_probe&invariant=widget_conservation#checker-zz_probe"
    uid, _, panel_id = crit["annotations"]["dashboard_url"].removeprefix("http://localhost:3000/d/").partition(
        "?viewPanel=")
    panel = next(p for p in overview["panels"] if p["id"] == int(panel_id))
    assert uid == "zsmon-invariants" and 'invariant="widget_conservation"' in panel["targets"][0]["expr"]
    pages = docs_runbooks(build_model(registry))
    assert "ZzProbeWidgetConservationViolation.md" in pages and "zz_probe.md" in pages
    # Its promtool tests are generated and pass with the real promtool.
    out = tmp_path / "out"
    render_all(registry, out)
    proc = _run(PROMTOOL, "test", "rules", "tests/zsmon-checker-zz_probe.test.yml", cwd=out / "prometheus")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    # ... and it pages: critical goes to the pager receiver.
    proc = _run(AMTOOL, "config", "routes", "test", f"--config.file={out / 'alertmanager/alertmanager.yml'}",
                "--verify.receivers=pager", "alertname=ZzProbeWidgetConservationViolation", "severity=critical",
                "checker=zz_probe")
    assert proc.returncode == 0, proc.stdout


def test_yaml_checker_gets_alerts_linking_its_own_runbook(tmp_path: Path):
    (tmp_path / "stuck.yml").write_text(
        "name: zz_stuck\ninvariant: stuck_thing\ndescription: Nothing stays stuck.\nseverity: critical\n"
        "entity_type: task\ninterval_seconds: 30\nrunbook_url: https://runbooks.example/zz_stuck.md\n"
        "query: SELECT task_id AS entity_id FROM tasks WHERE false\n")
    out = tmp_path / "out"
    env = {**os.environ, "ZSMON_CHECKERS_PATH": str(tmp_path)}
    proc = subprocess.run([ZSMON, "render", "--out", str(out)], capture_output=True, text=True, env=env, timeout=60)
    assert proc.returncode == 0, proc.stderr
    rules = yaml.safe_load((out / "prometheus/rules/zsmon-checker-zz_stuck.rules.yml").read_text())
    alert = rules["groups"][0]["rules"][0]
    assert alert["alert"] == "ZzStuckStuckThingViolation" and alert["labels"]["severity"] == "critical"
    assert alert["annotations"]["runbook_url"] == "https://runbooks.example/zz_stuck.md"


def test_two_invariants_that_would_share_an_alert_name_are_refused(checker_package):
    # Two checkers of a throwaway package, and only those (no exporters): a_b/c and a/b_c.
    clash = checker_package("""
        from zsmon.sdk import Checker, Invariant


        class A(Checker):
            name, description, default_interval_seconds = "a_b", "", 60.0
            invariants = (Invariant("c", "x", entity_type="e"),)

            def run(self, ctx):  # pragma: no cover - never run
                raise AssertionError


        class B(A):
            name = "a"
            invariants = (Invariant("b_c", "x", entity_type="e"),)
    """)
    registry = Registry(Config(), checker_packages=[clash])
    assert {"a_b", "a"} <= set(registry.checker_classes) and not registry.exporter_classes
    with pytest.raises(ConfigError, match="alert name ABCViolation is derived from both"):
        build_model(registry)


def test_render_says_which_checkers_and_warns_of_a_plugin(tmp_path: Path):
    """`zsmon render` renders the checkers the config enables and names each with its origin; a plugin
    installed on this machine is named in a warning (a deployed zsmon without it would leave its
    InvariantCheckMissing firing forever), and --checkers leaves it out."""
    from importlib.metadata import entry_points

    assert any(ep.name == "agent_liveness" for ep in entry_points(group="zsmon.checkers")), \
        "the example plugin is installed (pip install -e examples/plugin)"
    cfg = tmp_path / "zsmon.yml"
    cfg.write_text(yaml.safe_dump({"checkers": {"reputation": {"enabled": False}},
                                   "checks": {"paths": [str(ROOT / "examples" / "checkers" / "stuck_tasks.yml")]}}))
    proc = subprocess.run([ZSMON, "render", "--config", str(cfg), "--out", str(tmp_path / "all")], check=False, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    listed = proc.stdout.splitlines()[0]
    assert listed.startswith("checkers: agent_liveness (plugin zsmon-example-plugin")
    assert "payments (built in)" in listed and "stuck_tasks (yaml " in listed and "reputation" not in listed
    warnings = [line for line in proc.stderr.splitlines() if line.startswith("warning:")]
    assert len(warnings) == 1 and "agent_liveness" in warnings[0] and "InvariantCheckMissing" in warnings[0]
    rules = {p.name for p in (tmp_path / "all" / "prometheus" / "rules").iterdir()}
    assert {"zsmon-checker-agent_liveness.rules.yml", "zsmon-checker-stuck_tasks.rules.yml"} <= rules
    assert "zsmon-checker-reputation.rules.yml" not in rules

    proc = subprocess.run([ZSMON, "render", "--config", str(cfg), "--out", str(tmp_path / "some"),
                           "--checkers", "payments, stuck_tasks"], check=False, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.splitlines()[0] == \
        f"checkers: payments (built in), stuck_tasks (yaml {ROOT / 'examples' / 'checkers' / 'stuck_tasks.yml'})"
    assert "warning" not in proc.stderr
    rules = {p.name for p in (tmp_path / "some" / "prometheus" / "rules").iterdir()}
    assert {r for r in rules if r.startswith("zsmon-checker-")} == {"zsmon-checker-payments.rules.yml",
                                                                    "zsmon-checker-stuck_tasks.rules.yml"}
    overview = json.loads((tmp_path / "some" / "grafana" / "dashboards" / "zsmon-invariants.json").read_text())
    assert 'checker="agent_liveness"' not in json.dumps(overview)

    for bad in ("payments,reputation", "nope", ","):  # disabled in the config, unknown, nothing
        proc = subprocess.run([ZSMON, "render", "--config", str(cfg), "--out", str(tmp_path / "x"), "--checkers", bad],
                              check=False, capture_output=True, text=True, timeout=120)
        lines = proc.stderr.strip().splitlines()
        assert proc.returncode == 2 and len(lines) == 1 and lines[0].startswith("zsmon: error: render --checkers:"), \
            (bad, proc.stderr)
        assert "among the enabled checkers (agent_liveness, auctions, payments, schema, stuck_tasks)" in lines[0]
    assert not (tmp_path / "x").exists()
