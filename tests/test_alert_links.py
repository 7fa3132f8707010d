"""From page to evidence in one click: every alert's runbook, status-page and dashboard links, followed.

zsmon is started for real (with the example YAML checkers and the example plugin), the rules are rendered
with ``render.zsmon_url`` pointing at it, and every link every alert carries is followed: the runbook is
served (200, the alert's own page, escaped, under the status page's CSP), the status page shows the
alert's checker and invariant (and, signed in, the violating entity), and the dashboard link names a
panel that exists and queries that checker and invariant. Grafana cannot run here, so the dashboard link is
followed into the rendered dashboards rather than over HTTP.
"""
from __future__ import annotations

import json
import re
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

import requests
from test_status_page import PLANTED_ENTITY, renamed_column

from zsmon.alerts.render import alert_rules, render_files
from zsmon.app import build_registry
from zsmon.testing import LOCAL_HTTP, running_service, wait_for

TOKEN = "links-token-2c1f"
EXAMPLES = Path(__file__).resolve().parents[1] / "examples" / "checkers"


def test_every_alert_links_its_runbook_status_and_panel(make_config, db_url, tmp_path):
    cfg = make_config(http={**LOCAL_HTTP, "admin_token": TOKEN}, scheduler={"health_interval_seconds": 0.5},
                      checks={"paths": [str(EXAMPLES)]}, checkers={"schema": {"interval_seconds": 0.5}})
    with running_service(cfg) as svc, renamed_column(db_url):
        base = svc.url("api", "")
        cfg_render = cfg.model_copy(update={"render": cfg.render.model_copy(update={
            "zsmon_url": base, "grafana_url": "http://grafana.test:3000"})})
        files = render_files(build_registry(cfg_render))
        rules = alert_rules(files)
        boards = {json.loads(t)["uid"]: json.loads(t) for p, t in files.items() if p.startswith("grafana/dashboards/")}
        checkers = set(svc.service.checkers)
        assert {"stuck_tasks", "agent_capacity", "payment_audit_trail", "agent_liveness"} <= checkers
        signed_in = requests.post(base + "/login", data={"token": TOKEN}, allow_redirects=False, timeout=5)
        assert signed_in.status_code == 303
        cookies = signed_in.cookies
        # The planted fault is seen before the links are followed, so its entity must be behind its status link.
        wait_for(lambda: "required_columns_present</code>: 1" in requests.get(base + "/", timeout=5).text, timeout=20)

        seen_runbooks: dict[str, str] = {}
        followed = 0
        for rule in rules:
            name, ann = rule["alert"], rule["annotations"]
            # The runbook: served by this zsmon, the alert's own page.
            url = ann["runbook_url"]
            assert url == f"{base}/runbooks/{name}", (name, url)
            if url not in seen_runbooks:
                page = requests.get(url, timeout=5)
                assert page.status_code == 200, (name, page.status_code)
                assert page.headers["content-type"].startswith("text/html")
                assert "default-src 'none'" in page.headers["content-security-policy"]
                assert f"<h1>{name}</h1>" in page.text, name
                assert "<script" not in page.text and "<!--" not in page.text, name
                seen_runbooks[url] = page.text
            if name == "Watchdog":  # the dead man's switch: no evidence to show
                assert "dashboard_url" not in ann
                continue
            # The dashboard panel: it exists and is the alert's own (it links the alert's runbook, or it shows
            # the alert's checker and invariant - below).
            dash = urlsplit(ann["dashboard_url"])
            assert f"{dash.scheme}://{dash.netloc}" == "http://grafana.test:3000"
            uid = dash.path.removeprefix("/d/")
            panel_id = int(parse_qs(dash.query)["viewPanel"][0])
            panel = next(p for p in boards[uid]["panels"] if p["id"] == panel_id)
            if "checker" not in rule["labels"]:
                assert url in [link["url"] for link in panel.get("links", [])], (name, uid, panel["title"])
                followed += 1
                continue
            checker = rule["labels"]["checker"]
            invariant = rule["labels"].get("invariant")
            # The status page, filtered to the alert's checker (and invariant).
            status = ann["status_url"]
            parts = urlsplit(status)
            assert f"{parts.scheme}://{parts.netloc}" == base and parts.path == "/"
            assert parse_qs(parts.query) == {"checker": [checker], **({"invariant": [invariant]} if invariant else {})}
            assert parts.fragment == f"checker-{checker}"
            html = requests.get(status, cookies=cookies, timeout=5).text
            cards = re.findall(r'<section class="card [a-z]+" id="checker-([a-z0-9_]+)">', html)
            assert cards == [checker], (name, cards)
            assert f"Showing checker <code>{checker}</code>" in html
            if invariant:
                assert f"invariant <code>{invariant}</code>" in html
            exprs = " ".join(t["expr"] for t in panel["targets"])
            assert f'checker="{checker}"' in exprs, (name, uid, panel["title"])
            if invariant:
                assert f'invariant="{invariant}"' in exprs, (name, uid, panel["title"])
            followed += 1
        assert followed == len(rules) - 1 and len(seen_runbooks) > 40

        # The planted violation's own link shows the violating entity once signed in, and nothing of it before.
        alert = next(r for r in rules if r["alert"] == "SchemaRequiredColumnsPresentViolation")
        shown = requests.get(alert["annotations"]["status_url"], cookies=cookies, timeout=5).text
        assert f'<td data-label="entity" class="entity">column <span class="entity-id">{PLANTED_ENTITY}</span></td>' in shown
        anonymous = requests.get(alert["annotations"]["status_url"], timeout=5).text
        assert PLANTED_ENTITY not in anonymous and "required_columns_present</code>: 1" in anonymous
        # Signing in from the filtered page comes back to it.
        login = re.search(r'href="(/login\?next=[^"]+)"', anonymous).group(1)
        form = requests.get(base + login.replace("&amp;", "&"), timeout=5).text
        back = re.search(r'name="next" value="([^"]+)"', form).group(1).replace("&amp;", "&")
        done = requests.post(base + "/login", data={"token": TOKEN, "next": back}, allow_redirects=False, timeout=5)
        assert done.status_code == 303 and done.headers["location"] == "/?checker=schema&invariant=required_columns_present"
        # ... and never to another site.
        away = requests.post(base + "/login", data={"token": TOKEN, "next": "//evil.example/"}, allow_redirects=False,
                             timeout=5)
        assert away.headers["location"] == "/"

        # The status page's own runbook links (per checker, and the index) work too.
        root = requests.get(base + "/", timeout=5).text
        for link in set(re.findall(r'href="(/runbooks/[^"]*)"', root)):
            page = requests.get(base + link, timeout=5)
            assert page.status_code == 200, link
        index = requests.get(base + "/runbooks/", timeout=5).text
        for link in set(re.findall(r'<a href="([A-Za-z]+)">', index)):
            assert requests.get(f"{base}/runbooks/{link}", timeout=5).status_code == 200, link


def test_a_yaml_checkers_runbook_shows_its_query_and_its_words_escaped(make_config, tmp_path):
    """A YAML checker without a runbook_url gets zsmon's page: its query, its `runbook` text - as text, never
    markup - and an unknown page is a 404 that says so."""
    (tmp_path / "checkers").mkdir()
    (tmp_path / "checkers" / "zz_stuck.yml").write_text(
        "name: zz_stuck\ndescription: No zz task is stuck.\nseverity: warning\nentity_type: task\n"
        "runbook: |\n  1. Restart the <script>alert(1)</script> sweeper; see [the docs](javascript:alert(1)).\n"
        "query: SELECT task_id AS entity_id FROM tasks WHERE status = 'zz'\n")
    cfg = make_config(http=LOCAL_HTTP, checks={"paths": [str(tmp_path / "checkers")]})
    with running_service(cfg) as svc:
        page = requests.get(svc.url("api", "/runbooks/ZzStuckViolation"), timeout=5)
        assert page.status_code == 200
        assert "FROM tasks WHERE status = &#x27;zz&#x27;" in page.text or "FROM tasks WHERE status = 'zz'" in page.text
        assert "Restart the &lt;script&gt;alert(1)&lt;/script&gt; sweeper" in page.text
        assert "<script" not in page.text and 'href="javascript:' not in page.text
        # The checker's page and the index name it; the index links it by its served name.
        assert requests.get(svc.url("api", "/runbooks/zz_stuck"), timeout=5).status_code == 200
        assert 'href="ZzStuckViolation"' in requests.get(svc.url("api", "/runbooks/"), timeout=5).text
        missing = requests.get(svc.url("api", "/runbooks/NoSuchAlert"), timeout=5)
        assert missing.status_code == 404 and "no runbook named <code>NoSuchAlert</code>" in missing.text
        assert requests.get(svc.url("api", "/runbooks/..%2Fstatus.py"), timeout=5).status_code == 404


def test_runbooks_kept_elsewhere_are_linked_there(make_config):
    """http.runbook_base_url overrides zsmon's own pages, in the alerts and on the status page."""
    cfg = make_config(http={**LOCAL_HTTP, "runbook_base_url": "https://wiki.example/ops/runbooks/"},
                      render={"zsmon_url": "https://zsmon.example"})
    rules = {r["alert"]: r for r in alert_rules(render_files(build_registry(cfg)))}
    assert rules["DatabaseDown"]["annotations"]["runbook_url"] == "https://wiki.example/ops/runbooks/DatabaseDown.md"
    inv = rules["PaymentsChannelConservationViolation"]["annotations"]
    assert inv["runbook_url"] == "https://wiki.example/ops/runbooks/PaymentsChannelConservationViolation.md"
    assert inv["status_url"].startswith("https://zsmon.example/?checker=payments&invariant=channel_conservation")
    with running_service(cfg) as svc:
        html = requests.get(svc.url("api", "/"), timeout=5).text
        assert 'href="https://wiki.example/ops/runbooks/payments.md"' in html
        # zsmon still serves its own copies.
        assert requests.get(svc.url("api", "/runbooks/DatabaseDown"), timeout=5).status_code == 200
