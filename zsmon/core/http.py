"""The HTTP service: a metrics listener and an API listener (FastAPI on uvicorn).

Metrics listener: ``/metrics`` (from cached results only), ``/health``, ``/ready``.
API listener: the checks API, ``/admin/verify-balances``, ``/health``, ``/ready`` and
the OpenAPI document at ``/api/v1/openapi.json``. Every ``/api`` and ``/admin``
route needs ``Authorization: Bearer $ADMIN_TOKEN`` (constant-time comparison);
with no token configured those routes answer 403, never open.
"""
from __future__ import annotations

import asyncio
import hmac
from typing import Any, Literal

import anyio
from fastapi import Depends, FastAPI, HTTPException, Query, Request
from fastapi.responses import JSONResponse, Response
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from pydantic import BaseModel, ConfigDict, Field

import zsmon
from zsmon.core.lifecycle import LifecycleError, parse_duration
from zsmon.core.ratelimit import Buckets, retry_after
from zsmon.core.status import register_status_page
from zsmon.core.view import ServiceView


class OnDemand:
    """On-demand runs (``POST /api/v1/checks/{name}/run``, ``/admin/verify-balances``), coalesced.

    Requests for a checker whose on-demand run is in flight wait for that run and share its result:
    one run per checker at a time, however many ask. At most ``max_waiting`` requests wait per
    checker; beyond that, 429 with ``Retry-After`` (about one run's duration). The run happens in a
    worker thread and the waiting happens on the event loop, so waiting requests hold no thread, and
    ``/health`` and ``/ready`` (answered on the loop) never queue behind them. A client that gives
    up does not cancel the run the others wait for."""

    def __init__(self, run: Any, max_waiting: int, duration: Any = lambda name: None) -> None:
        self._run, self.max_waiting, self._duration = run, max_waiting, duration
        self._inflight: dict[str, asyncio.Future[Any]] = {}
        self._waiting: dict[str, int] = {}
        self.runs = 0  # on-demand runs started (for tests and figures)

    async def __call__(self, name: str) -> Any:
        future = self._inflight.get(name)
        if future is None:
            self.runs += 1
            future = asyncio.ensure_future(anyio.to_thread.run_sync(self._run, name))
            self._inflight[name] = future
            future.add_done_callback(lambda _f, n=name: self._inflight.pop(n, None))
        elif self._waiting.get(name, 0) >= self.max_waiting:
            retry = retry_after(self._duration(name) or 1.0)
            raise HTTPException(429, f"{self._waiting[name]} requests already wait for {name!r}'s on-demand run: "
                                     f"retry in {retry}s", headers={"Retry-After": retry})
        self._waiting[name] = self._waiting.get(name, 0) + 1
        try:
            return await asyncio.shield(future)
        finally:
            self._waiting[name] -= 1


# ---- response models (they make the OpenAPI document exact) --------------------
class AckBriefOut(BaseModel):
    id: str
    reason: str
    author: str
    created_at: float
    expires_at: float | None


class ViolationOut(BaseModel):
    invariant: str
    entity_type: str
    entity_id: str
    expected: str | None
    actual: str | None
    difference: str | None
    detail: str
    # The lifecycle (null without Redis): Unix seconds, runs in a row, the first difference, the acknowledgement.
    first_seen: float | None = None
    last_seen: float | None = None
    runs_seen: int | None = None
    first_difference: str | None = None
    acknowledgement: AckBriefOut | None = None


class CheckOut(BaseModel):
    checker: str
    status: str
    mode: str
    duration_seconds: float
    violation_counts: dict[str, int]
    violations: list[ViolationOut]
    skipped: dict[str, str]
    summaries: dict[str, str]
    error: str | None
    started_at: float
    producer: str | None
    unacknowledged_counts: dict[str, int] = {}
    acknowledged_counts: dict[str, int] = {}
    new_violation_counts: dict[str, int] = {}
    oldest_unacknowledged_at: dict[str, float] = {}


class ChecksOut(BaseModel):
    checks: list[CheckOut]


class CheckerViolationOut(ViolationOut):
    checker: str
    state: str = "open"   # open (pages), acknowledged, resolved
    resolved_at: float | None = None


class ViolationsOut(BaseModel):
    violations: list[CheckerViolationOut]
    violation_counts: dict[str, dict[str, int]]
    next_cursor: str | None = None


class AckIn(BaseModel):
    model_config = ConfigDict(extra="forbid")
    checker: str = Field(max_length=200)
    invariant: str = Field(max_length=200)
    entities: list[str] | None = Field(None, max_length=100_000, description="Entity ids violating now; "
                                       "null with all_current: every entity violating now.")
    all_current: bool = False
    reason: str = Field(min_length=1, max_length=1000)
    expires: str | None = Field(None, max_length=20, description="e.g. 12h, 3d, 1w; null: until revoked.")


class AckOut(BaseModel):
    id: str
    checker: str
    invariant: str
    entities: dict[str, str | None]
    reason: str
    author: str
    created_at: float
    expires_at: float | None


class AcksOut(BaseModel):
    acks: list[AckOut]


class InvariantOut(BaseModel):
    id: str
    description: str
    entity_type: str
    severity: str
    needs_memory: bool


class CheckerOut(BaseModel):
    name: str
    description: str
    source: str
    interval_seconds: float
    supports_incremental: bool
    invariants: list[InvariantOut]


class CheckersOut(BaseModel):
    checkers: list[CheckerOut]


class Problem(BaseModel):
    detail: str


class Readiness(BaseModel):
    status: str
    reasons: list[str]
    # Invariants the latest runs could not judge for want of memory (Redis): ready, but not all proven.
    skipped: list[str] = []


_bearer = HTTPBearer(auto_error=False, description="ADMIN_TOKEN")
_AUTH_RESPONSES: dict[int | str, dict[str, Any]] = {
    401: {"model": Problem, "description": "missing or wrong bearer token"},
    403: {"model": Problem, "description": "the admin API is off: no ADMIN_TOKEN configured"},
    429: {"model": Problem, "description": "over http.rate_limit_per_minute, or too many failed attempts "
                                           "(http.auth_failure_limit_per_minute), for this client; see Retry-After"},
}


def _health_routes(app: FastAPI, service: ServiceView, failures: Buckets | None) -> None:
    """``/health`` and ``/ready``. Plain ``async`` routes: answered on the event loop itself, never queued
    behind checker work in the thread pool. Readiness reasons name the database as ``user@host:port/db``
    only to a caller with the bearer token; probes and everyone else see them without host and database."""

    @app.get("/health", response_model=Readiness, tags=["health"])
    async def health() -> dict[str, Any]:
        """Liveness: the process serves requests."""
        return {"status": "ok", "reasons": []}

    @app.get("/ready", response_model=Readiness, tags=["health"],
             responses={503: {"model": Readiness, "description": "not ready"}})
    async def ready(request: Request) -> Any:
        """Readiness: the database answers and the scheduler runs."""
        reasons = service.readiness()
        if not _bearer_matches(service, request, failures):
            reasons = [service.conceal(r) for r in reasons]
        skipped = service.memory_skipped()
        if reasons:
            return JSONResponse({"status": "not ready", "reasons": reasons, "skipped": skipped}, status_code=503)
        return {"status": "ready", "reasons": [], "skipped": skipped}


def _admin_token(service: ServiceView) -> str:
    http = service.config.http
    return http.admin_token.get_secret_value() if http.admin_token else ""


def _bearer_matches(service: ServiceView, request: Request, failures: Buckets | None) -> bool:
    """Whether the request carries the admin token. A wrong one spends the client's failed-attempt budget,
    and once it is spent the header is not even compared: no endpoint is an unlimited token oracle."""
    token = _admin_token(service)
    header = request.headers.get("authorization", "")
    if not token or not header:
        return False
    client = request.client.host if request.client else "unknown"
    if failures is not None and failures.wait(client) > 0:
        return False
    scheme, _, given = header.partition(" ")
    if scheme.lower() == "bearer" and hmac.compare_digest(given.strip().encode(), token.encode()):
        return True
    if failures is not None:
        failures.take(client)
    return False


def create_api_app(service: ServiceView) -> FastAPI:
    http = service.config.http
    app = FastAPI(title="zsmon API", version=zsmon.__version__, docs_url=None, redoc_url=None,
                  openapi_url="/api/v1/openapi.json", redirect_slashes=False,
                  description="Invariant results of the ZeroState platform and on-demand checks.")
    # Failed bearer-token and sign-in attempts per client: beyond the budget, 429 before any comparison.
    failures = Buckets(http.auth_failure_limit_per_minute) if http.auth_failure_limit_per_minute else None

    async def require_token(request: Request, creds: HTTPAuthorizationCredentials | None = Depends(_bearer)) -> None:
        # On the event loop (no thread hop): a comparison and a bucket, nothing that blocks.
        token = _admin_token(service)
        if not token:
            raise HTTPException(403, "the admin API is off: set ADMIN_TOKEN (or http.admin_token) to enable it")
        client = request.client.host if request.client else "unknown"
        if failures is not None and (wait := failures.wait(client)) > 0:
            retry = retry_after(wait)
            raise HTTPException(429, f"too many failed token attempts from this client: retry in {retry}s",
                                headers={"Retry-After": retry})
        given = creds.credentials if creds is not None else ""
        if not hmac.compare_digest(given.encode(), token.encode()):
            if failures is not None:
                failures.take(client)
            raise HTTPException(401, "missing or wrong bearer token", headers={"WWW-Authenticate": "Bearer"})

    _health_routes(app, service, failures)
    register_status_page(app, service, failures)
    auth = [Depends(require_token)]

    def _duration(name: str) -> float | None:
        return next((r.duration_seconds for r in service.latest_results() if r.checker == name), None)

    on_demand = app.state.on_demand = OnDemand(service.run_check_now, http.on_demand_queue, _duration)

    async def _run(name: str) -> dict[str, Any]:
        if name not in service.checkers:
            raise HTTPException(404, f"no checker named {name!r}; known: {', '.join(service.checkers)}")
        result = await on_demand(name)
        if result is None:
            raise HTTPException(409, f"another replica holds the lease for {name!r}; its latest result is at "
                                     f"GET /api/v1/checks")
        return result.to_dict()

    @app.get("/api/v1/checks", response_model=ChecksOut, dependencies=auth, responses=_AUTH_RESPONSES,
             tags=["checks"])
    def list_checks() -> dict[str, Any]:
        """The latest result of every checker (the output contract's objects)."""
        return {"checks": [r.to_dict() for r in service.latest_results()]}

    @app.get("/api/v1/checks/{name}", response_model=CheckOut, dependencies=auth, tags=["checks"],
             responses={**_AUTH_RESPONSES, 404: {"model": Problem, "description": "unknown checker or no run yet"}})
    def get_check(name: str) -> dict[str, Any]:
        for r in service.latest_results():
            if r.checker == name:
                return r.to_dict()
        raise HTTPException(404, f"no result for checker {name!r} yet")

    @app.post("/api/v1/checks/{name}/run", response_model=CheckOut, dependencies=auth, tags=["checks"],
              responses={**_AUTH_RESPONSES, 404: {"model": Problem, "description": "unknown checker"},
                         409: {"model": Problem, "description": "another replica holds the lease"},
                         429: {"model": Problem, "description": "over the rate limits, or http.on_demand_queue "
                                                                "requests already wait for this checker's run"}})
    async def run_check(name: str) -> dict[str, Any]:
        """Run a checker now and return its result. Requests made while the checker's on-demand run is in
        flight share that run's result."""
        return await _run(name)

    @app.get("/api/v1/violations", response_model=ViolationsOut, dependencies=auth, tags=["checks"],
             responses={**_AUTH_RESPONSES, 400: {"model": Problem, "description": "a bad filter or cursor"}})
    def violations(checker: str | None = Query(None, max_length=200),
                   invariant: str | None = Query(None, max_length=200),
                   state: Literal["open", "acknowledged", "resolved"] | None = Query(
                       None, description="open (pages), acknowledged, resolved (recent history); default: "
                                         "open and acknowledged"),
                   since: float | None = Query(None, ge=0, description="Unix seconds: first seen (resolved: "
                                                                       "resolved) at or after"),
                   cursor: str | None = Query(None, max_length=500, description="next_cursor of the previous page"),
                   limit: int = Query(100, ge=1, le=1000)) -> dict[str, Any]:
        """Current violations with their lifecycle, oldest first within an invariant (paged), and full counts."""
        counts = {r.checker: {k: v for k, v in r.violation_counts.items() if v and (not invariant or k == invariant)}
                  for r in service.latest_results() if r.status != "error" and (not checker or r.checker == checker)}
        try:
            rows, next_cursor = service.violations(checker, invariant, state, since, cursor, limit)
        except LifecycleError as exc:
            if cursor or state == "resolved":
                raise HTTPException(400, str(exc)) from None
            # Without Redis there is no lifecycle: the latest runs' samples, every one of them paging.
            rows = [{**v.to_dict(), "checker": r.checker} for r in service.latest_results()
                    if r.status != "error" and (not checker or r.checker == checker)
                    for v in r.violations if not invariant or v.invariant == invariant]
            next_cursor = None
        return {"violations": rows, "violation_counts": counts, "next_cursor": next_cursor}

    @app.get("/api/v1/acks", response_model=AcksOut, dependencies=auth, tags=["acknowledgements"],
             responses={**_AUTH_RESPONSES, 503: {"model": Problem, "description": "Redis unavailable"}})
    def list_acks() -> dict[str, Any]:
        """Every acknowledgement in force."""
        try:
            return {"acks": [a.to_dict() for a in service.acks()]}
        except LifecycleError as exc:
            raise HTTPException(503, str(exc)) from None

    @app.post("/api/v1/acks", response_model=AckOut, status_code=201, dependencies=auth,
              tags=["acknowledgements"],
              responses={**_AUTH_RESPONSES, 400: {"model": Problem, "description": "unknown checker, invariant, "
                                                                                  "entity or duration"},
                         503: {"model": Problem, "description": "Redis unavailable"}})
    def create_ack(body: AckIn) -> dict[str, Any]:
        """Acknowledge current violations: they stay visible and stop paging until they change, the
        acknowledgement expires or is revoked, or they resolve and come back."""
        if (body.entities is None) == (not body.all_current):
            raise HTTPException(400, "give entities or all_current: true (not both)")
        try:
            expires = parse_duration(body.expires) if body.expires else None
            return service.acknowledge(body.checker, body.invariant, None if body.all_current else body.entities,
                                       body.reason, expires).to_dict()
        except LifecycleError as exc:
            raise HTTPException(503 if "live in Redis" in str(exc) else 400, str(exc)) from None

    @app.delete("/api/v1/acks/{ack_id}", response_model=AckOut, dependencies=auth, tags=["acknowledgements"],
                responses={**_AUTH_RESPONSES, 404: {"model": Problem, "description": "no such acknowledgement"},
                           503: {"model": Problem, "description": "Redis unavailable"}})
    def revoke_ack(ack_id: str) -> dict[str, Any]:
        """Revoke an acknowledgement: its violations page again."""
        try:
            return service.revoke(ack_id).to_dict()
        except LifecycleError as exc:
            raise HTTPException(503 if "live in Redis" in str(exc) else 404, str(exc)) from None

    @app.get("/api/v1/checkers", response_model=CheckersOut, dependencies=auth, responses=_AUTH_RESPONSES,
             tags=["checks"])
    def checkers() -> dict[str, Any]:
        """The registry: every checker with its invariants."""
        return {"checkers": [service.describe_checker(n) for n in service.checkers]}

    @app.post("/admin/verify-balances", response_model=CheckOut, dependencies=auth, tags=["admin"],
              responses={**_AUTH_RESPONSES, 404: {"model": Problem, "description": "payments checker not enabled"},
                         409: {"model": Problem, "description": "another replica holds the lease"}})
    async def verify_balances() -> dict[str, Any]:
        """The deployment guide's manual verification: run the payments checker now."""
        return await _run("payments")

    return app


def create_metrics_app(service: ServiceView) -> FastAPI:
    http = service.config.http
    app = FastAPI(title="zsmon metrics", docs_url=None, redoc_url=None, openapi_url=None, redirect_slashes=False)
    limit = http.auth_failure_limit_per_minute
    _health_routes(app, service, Buckets(limit) if limit else None)

    @app.get("/metrics")
    async def metrics(request: Request) -> Response:  # CPU only: no thread hop needed
        body, content_type = service.exposition(request.headers.get("accept"))
        return Response(body, media_type=content_type)

    return app
