"""The status page at ``GET /`` of the API listener: the break-glass view when Grafana is down.

Server-rendered (Jinja2, autoescape, ``StrictUndefined``), no JavaScript and no
external assets, refreshes itself every few seconds and fits a phone.

Anyone who can reach the listener sees every checker's status, mode, last run,
duration and violation *counts* (the same numbers ``/metrics`` already serves).
The violation details (entities, amounts), summaries, skipped reasons and error
texts need the admin token.

How the token is given: a login form (``GET /login``) POSTs it once; the answer
sets an ``HttpOnly; SameSite=Strict`` cookie and redirects to ``/``. Under TLS the
cookie is ``Secure`` and named ``__Host-zsmon_status`` (the browser then refuses it
from plain HTTP or for another path or domain). A token in a query parameter would
end up in proxy access logs, browser history and Referer headers, so there is no
``?token=``. The cookie holds a random session id (``zsmon.core.sessions``), not the
token nor anything derived from it: it expires after 12 hours on the server, sign-out
revokes it, and a leaked cookie tells nothing about the token and opens neither
``/api`` nor ``/admin``. Sign-in attempts are limited per client
(``http.login_limit_per_minute``, ``http.auth_failure_limit_per_minute``); any
malformed form is a 400, never an error page.
"""
from __future__ import annotations

import hmac
import re
import time
from datetime import datetime, timezone
from decimal import Decimal, InvalidOperation
from importlib.resources import files
from typing import Any
from urllib.parse import parse_qs, urlencode

import jinja2
import markupsafe
from fastapi import FastAPI, Request
from fastapi.responses import HTMLResponse, RedirectResponse, Response

import zsmon
from zsmon.core.lifecycle import LifecycleError
from zsmon.core.ratelimit import Buckets, retry_after
from zsmon.core.runbook_page import register_runbooks
from zsmon.core.view import ServiceView

COOKIE = "zsmon_status"
TLS_COOKIE = "__Host-zsmon_status"  # the __Host- prefix: Secure, Path=/, no Domain, enforced by the browser
SESSION_SECONDS = 12 * 3600
REFRESH_SECONDS = 10
MAX_FORM_FIELDS = 4
# The page is self-contained: inline CSS only, nothing loaded from elsewhere, never framed.
_HEADERS = {
    "Cache-Control": "no-store",
    "Content-Security-Policy": "default-src 'none'; style-src 'unsafe-inline'; form-action 'self'; "
                               "frame-ancestors 'none'; base-uri 'none'",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "X-Frame-Options": "DENY",
}

_env = jinja2.Environment(
    loader=jinja2.FileSystemLoader(str(files("zsmon.core").joinpath("templates"))),
    autoescape=True,
    undefined=jinja2.StrictUndefined,
    trim_blocks=True,
    lstrip_blocks=True,
)


def cookie_name(service: ServiceView) -> str:
    return TLS_COOKIE if service.config.http.tls_cert_file else COOKIE


def signed_in(service: ServiceView, request: Request) -> bool:
    """A live session cookie (and an admin token still configured)."""
    http = service.config.http
    if not (http.admin_token and http.admin_token.get_secret_value()):
        return False
    return service.sessions.valid(request.cookies.get(cookie_name(service)))


_CODE = re.compile(r"`+([^`]+?)`+")


def code_spans(text: str | None) -> markupsafe.Markup:
    """Text with its `backticked` (or ``double``) spans as <code>, everything escaped first."""
    escaped = str(markupsafe.escape(text or ""))
    return markupsafe.Markup(_CODE.sub(lambda m: f"<code>{m.group(1)}</code>", escaped))


def plural(n: int, word: str) -> str:
    """``1 auction``, ``2 auctions``, ``3 entities``, ``2 matches``."""
    if n == 1 or not word:
        return f"{n} {word}".rstrip()
    if word.endswith("y") and word[-2:-1] not in "aeiou":
        return f"{n} {word[:-1]}ies"
    if word.endswith(("s", "x", "z", "ch", "sh")):
        return f"{n} {word}es"
    return f"{n} {word}s"


_env.filters["code"] = code_spans
_env.filters["plural"] = lambda word, n: plural(n, word)


def _is_amount(value: Any) -> bool:
    if value is None:
        return True
    try:
        Decimal(str(value))
    except (InvalidOperation, ValueError):
        return False
    return True


def _labelled(d: dict[str, Any], age: bool) -> list[dict[str, str]]:
    """The values of a violation that are not amounts (a deadline and a state, an age), each with its label;
    empty when expected, actual and difference are plain amounts (the table's number columns show them)."""
    if not age and all(_is_amount(d[k]) for k in ("expected", "actual")):
        return []
    out = []
    if d["expected"] is not None:
        out.append({"label": "expected", "value": str(d["expected"])})
    if d["actual"] is not None:
        out.append({"label": "actual", "value": str(d["actual"])})
    if d["difference"] is not None:
        if age:
            out.append({"label": "late by", "value": _since(float(d["difference"]))})
        else:
            out.append({"label": "difference", "value": str(d["difference"])})
    return out


def _overall(rows: list[dict[str, Any]], reasons: list[str]) -> list[dict[str, str]]:
    """The header's badges, worst first: failing, erroring, not ready, pending; all good only when nothing
    is worse. The readiness of the sidecar itself shows muted beside failing checkers, never as all good."""
    failing = sum(1 for c in rows if c["status"] == "fail")
    erroring = sum(1 for c in rows if c["status"] == "error")
    pending = sum(1 for c in rows if c["status"] == "pending")
    badges = []
    if failing:
        badges.append({"class": "fail", "text": f"{plural(failing, 'checker')} failing"})
    if erroring:
        badges.append({"class": "error", "text": f"{plural(erroring, 'checker')} erroring"})
    if reasons:
        badges.append({"class": "notready", "text": "not ready"})
    if pending:
        badges.append({"class": "pending", "text": f"{pending} pending"})
    if not badges:
        badges.append({"class": "ready", "text": "ready · all passing" if rows else "ready"})
    elif not reasons:
        badges.append({"class": "muted", "text": "sidecar ready"})
    return badges



def _age(seconds: float | None) -> str:
    if seconds is None:
        return "never"
    seconds = max(0.0, seconds)
    if seconds < 90:
        return f"{seconds:.0f} s ago"
    if seconds < 90 * 60:
        return f"{seconds / 60:.0f} min ago"
    if seconds < 36 * 3600:
        return f"{seconds / 3600:.1f} h ago"
    return f"{seconds / 86400:.1f} d ago"


def _since(seconds: float) -> str:
    """How long a violation has been seen: ``3 h 12 min``, ``2 d 4 h``, ``45 s``."""
    s = int(max(0.0, seconds))
    days, hours, minutes = s // 86400, s % 86400 // 3600, s % 3600 // 60
    if days:
        return f"{days} d {hours} h"
    if hours:
        return f"{hours} h {minutes} min"
    return f"{minutes} min" if minutes else f"{s} s"


def _utc(ts: float) -> str:
    return datetime.fromtimestamp(ts, timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")


def runbook_url(base: str | None, checker: str) -> str:
    """The checker's runbook page: served by this zsmon at ``/runbooks/<checker>``, or
    ``<http.runbook_base_url>/<checker>.md`` when runbooks are kept elsewhere."""
    return f"{base.rstrip('/')}/{checker}.md" if base else f"/runbooks/{checker}"


def _filter(request: Request) -> dict[str, str]:
    """``?checker=NAME&invariant=ID`` (what an alert's status_url carries): the page shows that checker only,
    and of it that invariant's counts and violations."""
    out = {}
    for key in ("checker", "invariant"):
        value = request.query_params.get(key, "")
        if value and len(value) <= 200:
            out[key] = value
    return out


def _view(service: ServiceView, details: bool, links: list[dict[str, str]],
          only: dict[str, str] | None = None) -> dict[str, Any]:
    now = time.time()
    only = only or {}
    results = {r.checker: r for r in service.latest_results()}
    checkers = {name: bound.checker for name, bound in service.checkers.items()}
    http = service.config.http
    rows = []
    for name in sorted(set(checkers) | set(results)):
        if "checker" in only and name != only["checker"]:
            continue
        checker = checkers.get(name)
        r = results.get(name)
        severities = {i.id: i.severity for i in checker.invariants} if checker is not None else {}
        entities = {i.id: i.entity_type for i in checker.invariants} if checker is not None else {}
        ages = {i.id for i in checker.invariants if i.difference_is_age} if checker is not None else set()
        finished = r.started_at + r.duration_seconds if r is not None else None
        counts = dict(r.violation_counts) if r is not None and r.status != "error" else {}
        if "invariant" in only:
            counts = {k: v for k, v in counts.items() if k == only["invariant"]}
        acked = dict(r.acknowledged_counts) if r is not None and r.status != "error" else {}
        order = {i.id: n for n, i in enumerate(checker.invariants)} if checker is not None else {}
        shown = []
        if details and r is not None and counts:
            for v in r.violations:  # oldest first within an invariant: what has paged longest leads
                if "invariant" in only and v.invariant != only["invariant"]:
                    continue
                d = v.to_dict()
                d["since"] = _since(now - d["first_seen"]) if d["first_seen"] is not None else ""
                ack = d["acknowledgement"]
                d["ack"] = (f"acknowledged by {ack['author']}: {ack['reason']}"
                            + (f" (until {_utc(ack['expires_at'])})" if ack["expires_at"] else "")) if ack else ""
                d["labelled"] = _labelled(d, d["invariant"] in ages)
                shown.append(d)
            shown.sort(key=lambda d: (order.get(d["invariant"], len(order)), d["invariant"],
                                      d["first_seen"] if d["first_seen"] is not None else now, d["entity_id"]))
        rows.append({
            "name": name,
            "description": checker.description if checker is not None else "",
            "status": r.status if r is not None else "pending",
            "mode": r.mode if r is not None else "-",
            "age": _age(now - finished) if finished is not None else "not run yet",
            "finished_utc": _utc(finished) if finished is not None else "",
            "duration": f"{r.duration_seconds:.3f} s" if r is not None else "-",
            "total": sum(counts.values()),
            "counts": [{"invariant": k, "count": v, "severity": severities.get(k, ""), "acknowledged": acked.get(k, 0),
                        "entity_type": entities.get(k, ""),
                        "oldest": _since(now - r.oldest_unacknowledged[k]) if k in r.oldest_unacknowledged else ""}
                       for k, v in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0])) if v],
            "invariants": len(severities) or len(counts),
            "violations": shown,
            "summaries": dict(r.summaries) if details and r is not None else {},
            "skipped": dict(r.skipped) if details and r is not None else {},
            "skipped_count": len(r.skipped) if r is not None else 0,
            "error": r.error if details and r is not None and r.error else "",
            "runbook": getattr(checker, "runbook_url", None) or runbook_url(http.runbook_base_url, name),
        })
    # Break-glass order: what is failing or cannot run comes first.
    rows.sort(key=lambda c: ({"fail": 0, "error": 1, "pending": 2}.get(c["status"], 3), c["name"]))
    reasons = service.readiness()
    if not details:  # the database's host and name only for signed-in eyes
        reasons = [service.conceal(r) for r in reasons]
    acks, events = [], []
    if details:
        try:
            acks = [{**a.to_dict(), "entities": len(a.entities),
                     "expires": _utc(a.expires_at) if a.expires_at else "until revoked"} for a in service.acks()]
            events = [{**e, "when": _utc(e["at"])} for e in service.ack_events()]
        except LifecycleError:
            pass  # without Redis there are no acknowledgements: every violation pages
    if "invariant" in only:
        acks = [a for a in acks if a["invariant"] == only["invariant"]]
    if "checker" in only:
        acks = [a for a in acks if a["checker"] == only["checker"]]
    return {
        "only": {"checker": only.get("checker", ""), "invariant": only.get("invariant", "")},
        "acks": acks,
        "ack_events": events,
        "version": zsmon.__version__,
        "generated_utc": _utc(now),
        "refresh": REFRESH_SECONDS,
        "details": details,
        "ready": not reasons,
        "badges": _overall(rows, reasons),
        "reasons": reasons,
        "checkers": rows,
        "failing": sum(1 for c in rows if c["status"] == "fail"),
        "erroring": sum(1 for c in rows if c["status"] == "error"),
        "token_configured": bool(http.admin_token and http.admin_token.get_secret_value()),
        "dashboards": links,
        "runbooks": http.runbook_base_url or "/runbooks/",
    }


def register_status_page(app: FastAPI, service: ServiceView, failures: Buckets | None = None) -> None:
    """Add ``GET /``, ``GET``/``POST /login`` and ``POST /logout`` to the API app.

    ``failures``: the per-client budget of failed attempts, shared with the bearer-token check."""
    http = service.config.http
    secure = bool(http.tls_cert_file)
    cookie = cookie_name(service)
    links = service.dashboard_links
    logins = Buckets(http.login_limit_per_minute) if http.login_limit_per_minute else None

    def token() -> str:
        return http.admin_token.get_secret_value() if http.admin_token else ""

    def page(template: str, status_code: int = 200, headers: dict[str, str] | None = None,
             **context: Any) -> HTMLResponse:
        body = _env.get_template(template).render(**context)
        return HTMLResponse(body, status_code=status_code, headers={**_HEADERS, **(headers or {})})

    def login_page(status_code: int, message: str, headers: dict[str, str] | None = None,
                   next_page: str = "/") -> HTMLResponse:
        return page("status.html.j2", status_code=status_code, headers=headers, view=_view(service, False, links),
                    login={"failed": message}, next=next_page)

    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    def status_page(request: Request) -> HTMLResponse:
        only = _filter(request)
        return page("status.html.j2", view=_view(service, signed_in(service, request), links, only), login=None,
                    next=_back_to(only))

    @app.get("/login", response_class=HTMLResponse, include_in_schema=False)
    def login_form(request: Request) -> HTMLResponse:
        return page("status.html.j2", view=_view(service, False, links), login={"failed": ""},
                    next=_safe_next(request.query_params.get("next")))

    @app.post("/login", include_in_schema=False)
    async def login(request: Request) -> Response:
        client = request.client.host if request.client else "unknown"
        for bucket, spend in ((logins, True), (failures, False)):
            wait = (bucket.take(client) if spend else bucket.wait(client)) if bucket is not None else 0.0
            if wait > 0:
                retry = retry_after(wait)
                return login_page(429, f"Too many sign-in attempts: try again in {retry} s.",
                                  headers={"Retry-After": retry})
        try:
            body = (await request.body()).decode("utf-8")
            form = parse_qs(body, max_num_fields=MAX_FORM_FIELDS, strict_parsing=bool(body))
        except (ValueError, UnicodeDecodeError):  # too many fields, not a form, not UTF-8: the client's mistake
            return login_page(400, "Bad request: the sign-in form takes the fields token and next.")
        given = (form.get("token") or [""])[0]
        back = _safe_next((form.get("next") or [""])[0])
        t = token()
        if not t or not hmac.compare_digest(given.encode(), t.encode()):
            if t and failures is not None:
                failures.take(client)
            return login_page(401 if t else 403, "Wrong token.", next_page=back)
        response = RedirectResponse(back, status_code=303, headers=_HEADERS)
        response.set_cookie(cookie, service.sessions.create(), max_age=SESSION_SECONDS, path="/", httponly=True,
                            samesite="strict", secure=secure)
        return response

    @app.post("/logout", include_in_schema=False)
    def logout(request: Request) -> Response:
        service.sessions.revoke(request.cookies.get(cookie))
        response = RedirectResponse("/", status_code=303, headers=_HEADERS)
        response.delete_cookie(cookie, path="/", httponly=True, samesite="strict", secure=secure)
        return response

    register_runbooks(app, lambda name: service.runbook(name), page)


def _back_to(only: dict[str, str]) -> str:
    """Where signing in returns to: the same (filtered) status page."""
    return "/?" + urlencode(only) if only else "/"


def _safe_next(value: str | None) -> str:
    """Only a path on this listener's status page (``/`` or ``/?checker=...``): never another site."""
    if value and (value == "/" or value.startswith("/?")) and "\\" not in value and not any(
            c in value for c in "\r\n"):
        return value
    return "/"
