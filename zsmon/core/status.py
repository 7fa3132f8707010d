"""The status page at ``GET /`` of the API listener: the break-glass view when Grafana is down.

Server-rendered (Jinja2, autoescape, ``StrictUndefined``), no JavaScript and no
external assets, refreshes itself every few seconds and fits a phone.

Anyone who can reach the listener sees every checker's status, mode, last run,
duration and violation *counts* (the same numbers ``/metrics`` already serves).
The violation details (entities, amounts), summaries, skipped reasons and error
texts need the admin token.

How the token is given: a login form (``GET /login``) POSTs it once; the answer
sets an ``HttpOnly; SameSite=Strict`` cookie (``Secure`` when TLS is on) and
redirects to ``/``. A token in a query parameter would end up in proxy access
logs, browser history and Referer headers, so there is no ``?token=``. The cookie
holds ``HMAC-SHA256(admin token, "zsmon status session")``, not the token itself:
a leaked cookie opens the status page but is no bearer token for ``/api`` or
``/admin``, and changing ``ADMIN_TOKEN`` invalidates every session. Both the
login and the cookie are compared with ``hmac.compare_digest``.
"""
from __future__ import annotations

import hashlib
import hmac
import re
import time
from datetime import datetime, timezone
from decimal import Decimal, InvalidOperation
from importlib.resources import files
from typing import Any
from urllib.parse import parse_qs

import jinja2
import markupsafe
from fastapi import FastAPI, Request
from fastapi.responses import HTMLResponse, RedirectResponse, Response

import zsmon
from zsmon.core.lifecycle import LifecycleError
from zsmon.core.view import ServiceView

COOKIE = "zsmon_status"
SESSION_SECONDS = 12 * 3600
REFRESH_SECONDS = 10
_SESSION_MESSAGE = b"zsmon status session v1"
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


def session_value(token: str) -> str:
    """The cookie value for a valid login: derived from the admin token, never the token itself."""
    return hmac.new(token.encode(), _SESSION_MESSAGE, hashlib.sha256).hexdigest()


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


def runbook_url(base: str, checker: str) -> str:
    """The checker's runbook page (``docs/runbooks/<checker>.md``, generated by ``zsmon render``)."""
    return f"{base.rstrip('/')}/{checker}.md"


def _view(service: ServiceView, details: bool, links: list[dict[str, str]]) -> dict[str, Any]:
    now = time.time()
    results = {r.checker: r for r in service.latest_results()}
    checkers = {name: bound.checker for name, bound in service.checkers.items()}
    http = service.config.http
    rows = []
    for name in sorted(set(checkers) | set(results)):
        checker = checkers.get(name)
        r = results.get(name)
        severities = {i.id: i.severity for i in checker.invariants} if checker is not None else {}
        entities = {i.id: i.entity_type for i in checker.invariants} if checker is not None else {}
        ages = {i.id for i in checker.invariants if i.difference_is_age} if checker is not None else set()
        finished = r.started_at + r.duration_seconds if r is not None else None
        counts = dict(r.violation_counts) if r is not None and r.status != "error" else {}
        acked = dict(r.acknowledged_counts) if r is not None and r.status != "error" else {}
        order = {i.id: n for n, i in enumerate(checker.invariants)} if checker is not None else {}
        shown = []
        if details and r is not None and counts:
            for v in r.violations:  # oldest first within an invariant: what has paged longest leads
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
    acks, events = [], []
    if details:
        try:
            acks = [{**a.to_dict(), "entities": len(a.entities),
                     "expires": _utc(a.expires_at) if a.expires_at else "until revoked"} for a in service.acks()]
            events = [{**e, "when": _utc(e["at"])} for e in service.ack_events()]
        except LifecycleError:
            pass  # without Redis there are no acknowledgements: every violation pages
    return {
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
        "runbooks": http.runbook_base_url,
    }


def register_status_page(app: FastAPI, service: ServiceView) -> None:
    """Add ``GET /``, ``GET``/``POST /login`` and ``POST /logout`` to the API app."""
    http = service.config.http
    secure = bool(http.tls_cert_file)
    links = service.dashboard_links

    def token() -> str:
        return http.admin_token.get_secret_value() if http.admin_token else ""

    def logged_in(request: Request) -> bool:
        t = token()
        given = request.cookies.get(COOKIE, "")
        return bool(t) and bool(given) and hmac.compare_digest(given.encode(), session_value(t).encode())

    def page(template: str, status_code: int = 200, **context: Any) -> HTMLResponse:
        body = _env.get_template(template).render(**context)
        return HTMLResponse(body, status_code=status_code, headers=_HEADERS)

    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    def status_page(request: Request) -> HTMLResponse:
        return page("status.html.j2", view=_view(service, logged_in(request), links), login=None)

    @app.get("/login", response_class=HTMLResponse, include_in_schema=False)
    def login_form(request: Request) -> HTMLResponse:
        return page("status.html.j2", view=_view(service, False, links), login={"failed": False})

    @app.post("/login", include_in_schema=False)
    async def login(request: Request) -> Response:
        form = parse_qs((await request.body()).decode("utf-8", "replace"), max_num_fields=4)
        given = (form.get("token") or [""])[0]
        t = token()
        if not t or not hmac.compare_digest(given.encode(), t.encode()):
            return page("status.html.j2", status_code=401 if t else 403, view=_view(service, False, links),
                        login={"failed": True})
        response = RedirectResponse("/", status_code=303, headers=_HEADERS)
        response.set_cookie(COOKIE, session_value(t), max_age=SESSION_SECONDS, path="/", httponly=True,
                            samesite="strict", secure=secure)
        return response

    @app.post("/logout", include_in_schema=False)
    def logout() -> Response:
        response = RedirectResponse("/", status_code=303, headers=_HEADERS)
        response.delete_cookie(COOKIE, path="/", httponly=True, samesite="strict", secure=secure)
        return response
