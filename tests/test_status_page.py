"""The status page at GET / of the API listener: counts for everyone, details only after signing in."""
from __future__ import annotations

import contextlib
import re
import time
from decimal import Decimal
from types import SimpleNamespace

import psycopg
import requests

from zsmon.core.lifecycle import Ack
from zsmon.core.results import CheckResult, Violation
from zsmon.core.sessions import SessionStore
from zsmon.core.status import COOKIE, SESSION_SECONDS, register_status_page
from zsmon.testing import LOCAL_HTTP, running_service, wait_for

TOKEN = "status-token-5e0b"
# The planted fault: a column the schema checker requires, renamed away (restored afterwards).
PLANTED_ENTITY = "reputation_events.score_delta"


@contextlib.contextmanager
def renamed_column(db_url: str):
    with psycopg.connect(db_url, autocommit=True) as conn:
        conn.execute("ALTER TABLE reputation_events RENAME COLUMN score_delta TO score_delta_gone")
        try:
            yield
        finally:
            conn.execute("ALTER TABLE reputation_events RENAME COLUMN score_delta_gone TO score_delta")


def _config(make_config, **http):
    return make_config(http={**LOCAL_HTTP, "admin_token": TOKEN, "grafana_url": "http://grafana.example:3000",
                             **http},
                       scheduler={"health_interval_seconds": 0.5}, checkers={"schema": {"interval_seconds": 0.5}})


def _schema_failing(svc, cookies=None):
    page = requests.get(svc.url("api", "/"), cookies=cookies, timeout=5)
    return page if re.search(r'id="checker-schema">\s*<h2>schema</h2> <span class="badge fail">', page.text) else None


def test_without_token_no_details_with_token_the_planted_entity(make_config, db_url):
    with running_service(_config(make_config)) as svc, renamed_column(db_url):
        page = wait_for(lambda: _schema_failing(svc), timeout=20)
        assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
        html = page.text
        # What everyone sees: the checker, its status and counts, the links; never the entities.
        assert '<meta http-equiv="refresh" content="10">' in html and 'name="viewport"' in html
        assert "required_columns_present</code>: 1" in html and "mode full" in html and "last run" in html
        assert 'href="http://grafana.example:3000/' in html and 'href="/runbooks/schema"' in html  # served by zsmon itself
        assert 'href="http://grafana.example:3000/d/zsmon-payments"' in html  # dashboards linked by uid
        assert PLANTED_ENTITY not in html and "score_delta" not in html and "skipped (" not in html
        assert 'href="/login"' in html
        assert "no-store" in page.headers["cache-control"] and "default-src 'none'" in page.headers[
            "content-security-policy"]
        assert "<script" not in html and "http://" not in html.replace("http://grafana.example:3000", "")

        # A wrong token: 401, no cookie, still no details.
        bad = requests.post(svc.url("api", "/login"), data={"token": "wrong"}, allow_redirects=False, timeout=5)
        assert bad.status_code == 401 and COOKIE not in bad.cookies and "Wrong token" in bad.text
        # The token itself as a cookie is no session.
        assert PLANTED_ENTITY not in requests.get(svc.url("api", "/"), cookies={COOKIE: TOKEN}, timeout=5).text

        # Signing in: a 303 to / with an HttpOnly, SameSite=Strict cookie that is not the token.
        ok = requests.post(svc.url("api", "/login"), data={"token": TOKEN}, allow_redirects=False, timeout=5)
        assert ok.status_code == 303 and ok.headers["location"] == "/"
        set_cookie = ok.headers["set-cookie"]
        assert "HttpOnly" in set_cookie and "SameSite=strict" in set_cookie.replace("Strict", "strict")
        assert TOKEN not in set_cookie and len(ok.cookies[COOKIE]) >= 40
        # A random session per sign-in: a second sign-in gets another cookie.
        again = requests.post(svc.url("api", "/login"), data={"token": TOKEN}, allow_redirects=False, timeout=5)
        assert again.cookies[COOKIE] != ok.cookies[COOKIE]
        detailed = requests.get(svc.url("api", "/"), cookies=ok.cookies, timeout=5).text
        assert f'<td data-label="entity" class="entity">column <span class="entity-id">{PLANTED_ENTITY}</span></td>' in detailed
        # Not amounts: labelled values, not number columns.
        assert '<span><span class="label">expected</span> present</span>' in detailed
        assert '<span><span class="label">actual</span> missing</span>' in detailed
        assert "Sign out" in detailed
        # The login form never refreshes itself (it would wipe a half-typed token).
        form = requests.get(svc.url("api", "/login"), timeout=5).text
        assert 'http-equiv="refresh"' not in form and 'type="password"' in form

        out = requests.post(svc.url("api", "/logout"), cookies=ok.cookies, allow_redirects=False, timeout=5)
        assert out.status_code == 303 and 'zsmon_status=""' in out.headers["set-cookie"]


def test_without_a_configured_token_nobody_signs_in(make_config):
    cfg = make_config(http=LOCAL_HTTP, checkers={"schema": {"interval_seconds": 0.5}})
    with running_service(cfg) as svc:
        page = requests.get(svc.url("api", "/"), timeout=5)
        assert page.status_code == 200 and 'id="checker-schema"' in page.text
        r = requests.post(svc.url("api", "/login"), data={"token": ""}, allow_redirects=False, timeout=5)
        assert r.status_code == 403 and "No admin token is configured" in r.text and COOKIE not in r.cookies
        # A forged cookie opens nothing.
        assert "Sign out" not in requests.get(svc.url("api", "/"), cookies={COOKIE: "x" * 43}, timeout=5).text


def test_login_is_rate_limited_like_the_api(make_config):
    """The form takes the admin token, so guessing it there is throttled as on /api (http.rate_limit_per_minute)."""
    with running_service(_config(make_config, rate_limit_per_minute=3)) as svc:
        codes = [requests.post(svc.url("api", "/login"), data={"token": "guess"}, allow_redirects=False,
                               timeout=5).status_code for _ in range(4)]
        assert codes == [401, 401, 401, 429]
        assert requests.get(svc.url("api", "/"), timeout=5).status_code == 200  # the page itself stays readable


def test_violation_text_is_escaped_and_error_and_skipped_need_the_session(tmp_path):
    """Entity ids and details come from the monitored database: they are escaped, never markup."""
    from fastapi import FastAPI
    from fastapi.testclient import TestClient

    from zsmon.app import build_registry
    from zsmon.core.config import load_config

    config = load_config(env={"ADMIN_TOKEN": TOKEN})
    now = time.time()
    evil = Violation("channel_conservation", "channel", "<script>alert(1)</script>", Decimal("100.00000000"),
                     Decimal("105.00000000"), Decimal("5.00000000"), 'detail "<b>x</b>"',
                     lifecycle={"first_seen": now - 3 * 3600 - 12 * 60, "last_seen": now, "runs_seen": 700,
                                "first_difference": "5.00000000", "acknowledgement": None})
    known = Violation("channel_conservation", "channel", "c-known", Decimal("1"), Decimal("2"), Decimal("1"),
                      "known gap", lifecycle={"first_seen": now - 60, "last_seen": now, "runs_seen": 4,
                                              "first_difference": "1", "acknowledgement": {
                                                  "id": "ab12cd34", "reason": "ZS-123 <i>until friday</i>",
                                                  "author": "oncall", "created_at": now, "expires_at": None}})
    results = [
        CheckResult("payments", "fail", "full", 0.25, {"channel_conservation": 2}, [known, evil],
                    {"sequence_regression": "needs memory across runs: Redis is off"},
                    acknowledged_counts={"channel_conservation": 1},
                    oldest_unacknowledged={"channel_conservation": now - 3 * 3600 - 12 * 60}),
        CheckResult("auctions", "error", "full", 0.1, error="database unreachable at db:5432"),
    ]
    registry = build_registry(config)
    checkers = {name: registry.checkers[name] for name in ("payments", "auctions", "reputation")}
    # What the page reads of a service (zsmon.core.view.ServiceView): config, links, checkers, results, readiness.
    ack = Ack("ab12cd34", "payments", "channel_conservation", {"c-known": "1"}, "ZS-123 <i>until friday</i>",
              "oncall", now)
    sessions = SessionStore(SESSION_SECONDS)
    service = SimpleNamespace(config=config, dashboard_links=[], checkers=checkers, latest_results=lambda: results,
                              readiness=lambda: ["scheduler is not running"], acks=lambda: [ack],
                              sessions=sessions, conceal=lambda text: text,
                              ack_events=lambda: [{"at": now, "event": "created", "ack": "ab12cd34",
                                                   "checker": "payments", "invariant": "channel_conservation",
                                                   "author": "oncall"}])
    app = FastAPI()
    register_status_page(app, service)
    client = TestClient(app)
    anonymous = client.get("/").text
    assert "not ready" in anonymous and "scheduler is not running" in anonymous
    assert 'id="checker-reputation"' in anonymous and "not run yet" in anonymous
    assert "alert(1)" not in anonymous and "database unreachable" not in anonymous and "Redis is off" not in anonymous
    client.cookies.set(COOKIE, sessions.create())
    detailed = client.get("/").text
    assert "<script>alert(1)</script>" not in detailed and "&lt;script&gt;alert(1)&lt;/script&gt;" in detailed
    assert "&lt;b&gt;x&lt;/b&gt;" in detailed and "105.00000000" in detailed and "5.00000000" in detailed
    assert "error: database unreachable at db:5432" in detailed
    assert "Redis is off" in detailed
    assert "<title>FAIL (1) - zsmon status</title>" in detailed
    # The lifecycle: how long each violation has paged (oldest first within its invariant), who acknowledged
    # which, and the acknowledgements in force - escaped like everything else.
    assert "1 acknowledged" in detailed and "oldest paging since 3 h 12 min" in detailed
    assert detailed.index("&lt;script&gt;alert(1)") < detailed.index("c-known")
    assert "acknowledged by oncall: ZS-123 &lt;i&gt;until friday&lt;/i&gt;" in detailed
    assert "<code>ab12cd34</code> payments/channel_conservation: 1 entity, by oncall, until revoked" in detailed
    assert "ab12cd34" not in anonymous


def _page(results, readiness=(), details=True, config_env=None):
    """The page over a stand-in service (zsmon.core.view.ServiceView) holding ``results``."""
    from fastapi import FastAPI
    from fastapi.testclient import TestClient

    from zsmon.app import build_registry
    from zsmon.core.config import load_config

    config = load_config(env={"ADMIN_TOKEN": TOKEN, **(config_env or {})})
    registry = build_registry(config)
    checkers = {r.checker: registry.checkers[r.checker] for r in results if r.checker in registry.checkers}
    sessions = SessionStore(SESSION_SECONDS)
    service = SimpleNamespace(config=config, dashboard_links=[], checkers=checkers, latest_results=lambda: results,
                              readiness=lambda: list(readiness), acks=lambda: [], ack_events=lambda: [],
                              sessions=sessions, conceal=lambda text: text)
    app = FastAPI()
    register_status_page(app, service)
    client = TestClient(app)
    if details:
        client.cookies.set(COOKIE, sessions.create())
    return client.get("/").text


def _badges(html: str) -> list[str]:
    state = re.search(r'<span id="state">(.*?)</span>\s*<span class="meta">', html, re.S).group(1)
    return re.findall(r'<span class="badge (\w+)">([^<]*)</span>', state)


def test_the_header_shows_the_worst_state_first_never_all_good_beside_failures():
    passing = CheckResult("schema", "pass", "full", 0.1)
    failing = CheckResult("payments", "fail", "full", 0.2, {"channel_conservation": 1},
                          [Violation("channel_conservation", "channel", "c1", Decimal("1"), Decimal("2"), Decimal("1"))])
    erroring = CheckResult("auctions", "error", "full", 0.1, error="database unreachable")
    assert _badges(_page([passing])) == [("ready", "ready · all passing")]
    badges = _badges(_page([passing, failing]))
    assert badges == [("fail", "1 checker failing"), ("muted", "sidecar ready")]
    assert not any(cls == "ready" for cls, _ in badges)
    badges = _badges(_page([failing, erroring, passing], readiness=["checker auctions: database unreachable"]))
    assert badges == [("fail", "1 checker failing"), ("error", "1 checker erroring"), ("notready", "not ready")]
    assert _badges(_page([erroring], readiness=["x"]))[0] == ("error", "1 checker erroring")


def test_counts_are_pluralised_with_the_entity():
    one = CheckResult("auctions", "fail", "full", 0.1, {"stale_open_auction": 1, "winner_is_top_ranked": 2}, [])
    html = _page([one])
    assert '<code class="invariant">stale_open_auction</code>: 1 auction (' in html
    assert '<code class="invariant">winner_is_top_ranked</code>: 2 auctions (' in html
    assert "1 checker ·" in html and "1 checkers" not in html
    from zsmon.core.status import plural

    assert [plural(1, "entity"), plural(2, "entity"), plural(2, "key"), plural(0, "match")] == \
        ["1 entity", "2 entities", "2 keys", "0 matches"]


def test_rows_that_are_not_amounts_show_labelled_values():
    stale = Violation("stale_open_auction", "auction", "7f0c1c8e-8a0e-4c43-9b8e-0d1f2a3b4c5d", "2026-12-02T09:00:00Z",
                      "open", Decimal("7384.125"), "still open 2 h after expiry")
    money = Violation("winner_is_top_ranked", "auction", "a-2", Decimal("40.00000000"), Decimal("60.00000000"),
                      Decimal("20.00000000"), "")
    html = _page([CheckResult("auctions", "fail", "full", 0.1, {"stale_open_auction": 1, "winner_is_top_ranked": 1},
                              [stale, money])])
    row = html[html.index(stale.entity_id):].split("</tr>")[0]
    assert '<span class="label">expected</span> 2026-12-02T09:00:00Z' in row
    assert '<span class="label">actual</span> open' in row
    assert '<span class="label">late by</span> 2 h 3 min' in row  # an age, said as one (difference_is_age)
    assert 'class="num"' not in row
    row = html[html.index(">a-2<"):].split("</tr>")[0]
    assert 'data-label="expected" class="num">40.00000000</td>' in row and 'class="label"' not in row


def test_backticks_render_as_code_and_stay_escaped():
    from zsmon.core.status import code_spans

    assert str(code_spans("set `grace_period_seconds` or ``x``")) == \
        "set <code>grace_period_seconds</code> or <code>x</code>"
    assert str(code_spans("`<script>alert(1)</script>` & <b>")) == \
        "<code>&lt;script&gt;alert(1)&lt;/script&gt;</code> &amp; &lt;b&gt;"
    v = Violation("channel_conservation", "channel", "c1", Decimal("1"), Decimal("2"), Decimal("1"),
                  "see `channel_transactions` <i>now</i>")
    html = _page([CheckResult("payments", "fail", "full", 0.1, {"channel_conservation": 1}, [v])])
    assert "see <code>channel_transactions</code> &lt;i&gt;now&lt;/i&gt;" in html
    assert "`" not in html.split("<main>")[1].split("</main>")[0]
