"""How a zsmon listener serves HTTP: uvicorn's settings and the ASGI middleware every listener wears.

Shared by the service (core/service.py) and the metrics listener's own process (core/metrics_front.py),
so it imports neither FastAPI nor the configuration: that process starts in a fraction of a second.
"""
from __future__ import annotations

import asyncio
import contextlib
import dataclasses
from typing import Any

import uvicorn
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.responses import JSONResponse
from starlette.types import ASGIApp, Receive, Scope, Send
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from zsmon.core.ratelimit import Buckets, retry_after


@dataclasses.dataclass(frozen=True)
class ServerSettings:
    """What a listener's server needs of ``http.*``: no secret, so it can cross into another process."""

    tls_cert_file: str | None = None
    tls_key_file: str | None = None
    max_body_bytes: int = 65536
    rate_limit_per_minute: int | None = None
    trusted_proxies: tuple[str, ...] = ()
    header_timeout_seconds: float = 10.0
    keep_alive_timeout_seconds: int = 5
    max_concurrent_requests: int = 200

    @classmethod
    def of(cls, http: Any) -> ServerSettings:
        """From an ``HttpConfig``."""
        return cls(str(http.tls_cert_file) if http.tls_cert_file else None,
                   str(http.tls_key_file) if http.tls_key_file else None,
                   http.max_body_bytes, http.rate_limit_per_minute, tuple(http.trusted_proxies),
                   http.header_timeout_seconds, http.keep_alive_timeout_seconds, http.max_concurrent_requests)

    @property
    def tls(self) -> bool:
        return bool(self.tls_cert_file or self.tls_key_file)


def make_server(app: ASGIApp, settings: ServerSettings, *, wrap: bool = True) -> EmbeddedServer:
    """A uvicorn server for ``app`` (served on sockets the caller bound). ``wrap``: with the body limit,
    the rate limit and the security headers; the service's internal listener behind the metrics process
    goes without, that process wears them."""
    ssl = {"ssl_certfile": settings.tls_cert_file, "ssl_keyfile": settings.tls_key_file} if settings.tls else {}
    if wrap:
        app = BodyLimit(app, settings.max_body_bytes)
        if settings.rate_limit_per_minute:
            app = RateLimit(app, settings.rate_limit_per_minute)
        app = SecurityHeaders(app, tls=settings.tls)
    cfg = uvicorn.Config(app, log_config=None, access_log=False, lifespan="off", server_header=False,
                         timeout_graceful_shutdown=2, http=_protocol(settings), **_proxy_settings(settings),
                         timeout_keep_alive=settings.keep_alive_timeout_seconds,
                         limit_concurrency=settings.max_concurrent_requests, **ssl)
    return EmbeddedServer(cfg)


def _protocol(settings: ServerSettings) -> type:
    # httptools (C) rather than h11 (Python): half of what a /metrics scrape costs the metrics process.
    return type("HeaderTimeoutHttpTools", (HeaderTimeout, HttpToolsProtocol),
                {"header_timeout": settings.header_timeout_seconds})


def _proxy_settings(settings: ServerSettings) -> dict[str, Any]:
    """Forwarded headers are believed only from ``http.trusted_proxies``; by default from nobody (uvicorn
    would otherwise trust any X-Forwarded-For sent from 127.0.0.1, letting a local client pick its address)."""
    if not settings.trusted_proxies:
        return {"proxy_headers": False, "forwarded_allow_ips": []}
    return {"proxy_headers": True, "forwarded_allow_ips": list(settings.trusted_proxies)}


class EmbeddedServer(uvicorn.Server):
    """uvicorn without its own signal handling: the service owns SIGINT/SIGTERM."""

    def install_signal_handlers(self) -> None:  # uvicorn < 0.29
        pass

    @contextlib.contextmanager
    def capture_signals(self):  # uvicorn >= 0.29
        yield


class HeaderTimeout:
    """Mixed into a uvicorn HTTP protocol: a connection that has not sent a request's complete headers within
    ``header_timeout`` seconds of its first byte (or of connecting) is closed. uvicorn bounds only idle
    keep-alive connections; without this a client trickling header bytes holds a connection for ever."""

    header_timeout = 10.0
    _header_timer: asyncio.TimerHandle | None = None

    def _waiting_for_headers(self) -> bool:
        return self.cycle is None or self.cycle.response_complete

    def _arm(self) -> None:
        if self._header_timer is None:
            self._header_timer = self.loop.call_later(self.header_timeout, self._headers_too_slow)

    def _disarm(self) -> None:
        if self._header_timer is not None:
            self._header_timer.cancel()
            self._header_timer = None

    def _headers_too_slow(self) -> None:
        self._header_timer = None
        if self._waiting_for_headers() and not self.transport.is_closing():
            self.transport.close()

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._arm()

    def data_received(self, data: bytes) -> None:
        if self._waiting_for_headers():
            self._arm()
        super().data_received(data)
        if not self._waiting_for_headers():
            self._disarm()

    def on_response_complete(self) -> None:
        self._disarm()  # idle now: uvicorn's keep-alive timeout takes over until the next byte
        super().on_response_complete()

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        super().connection_lost(exc)



class BodyLimit:
    """ASGI middleware: 413 for request bodies over the configured size."""

    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes
        self.detail = f"request body over {max_bytes} bytes"

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        for name, value in scope.get("headers", []):
            if name == b"content-length" and value.isdigit() and int(value) > self.max_bytes:
                return await self._refuse(scope, receive, send)
        seen, started = 0, False

        async def limited() -> Any:
            nonlocal seen
            message = await receive()
            seen += len(message.get("body", b""))
            if seen > self.max_bytes:
                raise StarletteHTTPException(413, self.detail)
            return message

        async def sending(message: Any) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            return await self.app(scope, limited, sending)
        except StarletteHTTPException as exc:
            # A FastAPI app answers this itself; a plain ASGI app (the metrics process) lets it through.
            if started or exc.status_code != 413:
                raise
            return await self._refuse(scope, receive, send)

    async def _refuse(self, scope: Scope, receive: Receive, send: Send) -> None:
        await JSONResponse({"detail": self.detail}, status_code=413)(scope, receive, send)


class RateLimit:
    """ASGI middleware: at most ``per_minute`` requests per client on the given path prefixes.

    A token bucket per client (burst = the per-minute budget, refilled continuously);
    over the limit a request gets 429 with ``Retry-After`` before any route or token
    check runs, which also throttles token guessing. The client is the connection's
    address, or the one a trusted proxy forwards (``http.trusted_proxies``).
    """

    def __init__(self, app: ASGIApp, per_minute: int, prefixes: tuple[str, ...] = ("/api", "/admin", "/login")) -> None:
        self.app = app
        self.buckets = Buckets(per_minute)
        self.prefixes = prefixes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope.get("path", "").startswith(self.prefixes):
            wait = self.buckets.take(client_of(scope))
            if wait > 0:
                retry = retry_after(wait)
                return await JSONResponse({"detail": f"rate limit exceeded: retry in {retry}s"}, status_code=429,
                                          headers={"Retry-After": retry})(scope, receive, send)
        return await self.app(scope, receive, send)


class SecurityHeaders:
    """ASGI middleware: every response says ``nosniff`` and, unless the route chose otherwise, ``no-store``
    (JSON and /metrics are live data, never to be cached by a proxy); under TLS, HSTS."""

    def __init__(self, app: ASGIApp, tls: bool) -> None:
        self.app = app
        self.extra = [(b"strict-transport-security", b"max-age=31536000")] if tls else []

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)

        async def with_headers(message: Any) -> None:
            if message["type"] == "http.response.start":
                headers = list(message.get("headers", []))
                names = {name.lower() for name, _ in headers}
                for name, value in [(b"x-content-type-options", b"nosniff"), (b"cache-control", b"no-store"),
                                    *self.extra]:
                    if name not in names:
                        headers.append((name, value))
                message = {**message, "headers": headers}
            await send(message)

        return await self.app(scope, receive, with_headers)


def client_of(scope: Scope) -> str:
    """The client's address (after uvicorn's trusted-proxy rewrite, if any)."""
    return (scope.get("client") or ("unknown", 0))[0]
