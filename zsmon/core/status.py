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
import json
import time
from datetime import datetime, timezone
from importlib.resources import files
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs

import jinja2
from fastapi import FastAPI, Request
from fastapi.responses import HTMLResponse, RedirectResponse, Response

import zsmon

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


def _utc(ts: float) -> str:
    return datetime.fromtimestamp(ts, timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")


def _dashboard_files() -> list[Path]:
    """Dashboard JSON the renderer ships inside the package (golden copies), if any."""
    found: list[Path] = []
    for package in ("zsmon.dashboards", "zsmon.alerts"):
        try:
            root = Path(str(files(package)))
        except (ModuleNotFoundError, TypeError):
            continue
        found.extend(p for p in root.rglob("*.json") if p.is_file())
    return sorted(found)


def dashboards(grafana_url: str | None) -> list[dict[str, str]]:
    """Links to the Grafana dashboards: one per dashboard uid found, else the Grafana base URL."""
    if not grafana_url:
        return []
    base = grafana_url.rstrip("/")
    out: dict[str, dict[str, str]] = {}
    for path in _dashboard_files():
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            continue
        data = data.get("dashboard", data) if isinstance(data, dict) else None
        if isinstance(data, dict) and isinstance(data.get("uid"), str) and data["uid"] not in out:
            out[data["uid"]] = {"title": str(data.get("title") or data["uid"]), "url": f"{base}/d/{data['uid']}"}
    return sorted(out.values(), key=lambda d: d["title"]) or [{"title": "Grafana", "url": base + "/"}]


def runbook_url(base: str, checker: str) -> str:
    return f"{base.rstrip('/')}/{checker}.md"


def _view(service: Any, details: bool) -> dict[str, Any]:
    now = time.time()
    results = {r.checker: r for r in service.latest_results()}
    checkers = dict(service.runner.checkers)
    http = service.config.http
    rows = []
    for name in sorted(set(checkers) | set(results)):
        checker = checkers.get(name)
        r = results.get(name)
        severities = {i.id: i.severity for i in checker.invariants} if checker is not None else {}
        finished = r.started_at + r.duration_seconds if r is not None else None
        counts = dict(r.violation_counts) if r is not None and r.status != "error" else {}
        rows.append({
            "name": name,
            "description": checker.description if checker is not None else "",
            "status": r.status if r is not None else "pending",
            "mode": r.mode if r is not None else "-",
            "age": _age(now - finished) if finished is not None else "not run yet",
            "finished_utc": _utc(finished) if finished is not None else "",
            "duration": f"{r.duration_seconds:.3f} s" if r is not None else "-",
            "total": sum(counts.values()),
            "counts": [{"invariant": k, "count": v, "severity": severities.get(k, "")}
                       for k, v in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0])) if v],
            "invariants": len(severities) or len(counts),
            "violations": [v.to_dict() for v in r.violations] if details and r is not None and counts else [],
            "summaries": dict(r.summaries) if details and r is not None else {},
            "skipped": dict(r.skipped) if details and r is not None else {},
            "skipped_count": len(r.skipped) if r is not None else 0,
            "error": r.error if details and r is not None and r.error else "",
            "runbook": runbook_url(http.runbook_base_url, name),
        })
    reasons = service.readiness()
    return {
        "version": zsmon.__version__,
        "generated_utc": _utc(now),
        "refresh": REFRESH_SECONDS,
        "details": details,
        "ready": not reasons,
        "reasons": reasons,
        "checkers": rows,
        "failing": sum(1 for c in rows if c["status"] == "fail"),
        "erroring": sum(1 for c in rows if c["status"] == "error"),
        "token_configured": bool(http.admin_token and http.admin_token.get_secret_value()),
        "dashboards": dashboards(http.grafana_url),
        "runbooks": http.runbook_base_url,
    }


def register_status_page(app: FastAPI, service: Any) -> None:
    """Add ``GET /``, ``GET``/``POST /login`` and ``POST /logout`` to the API app."""
    http = service.config.http
    secure = bool(http.tls_cert_file)

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
        return page("status.html.j2", view=_view(service, logged_in(request)), login=None)

    @app.get("/login", response_class=HTMLResponse, include_in_schema=False)
    def login_form(request: Request) -> HTMLResponse:
        return page("status.html.j2", view=_view(service, False), login={"failed": False})

    @app.post("/login", include_in_schema=False)
    async def login(request: Request) -> Response:
        form = parse_qs((await request.body()).decode("utf-8", "replace"), max_num_fields=4)
        given = (form.get("token") or [""])[0]
        t = token()
        if not t or not hmac.compare_digest(given.encode(), t.encode()):
            return page("status.html.j2", status_code=401 if t else 403, view=_view(service, False),
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
