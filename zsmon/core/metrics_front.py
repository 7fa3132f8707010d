"""The metrics listener's own process: ``/metrics`` answered without the service's GIL.

A full sweep decodes millions of rows in the service's threads; a scrape answered in that process waits
for the GIL behind them (p99 14 ms against the host's 5-7 ms, docs/performance.md). So the service renders
``/metrics`` after every job, as before, and hands the bytes to this small process, which owns the
metrics socket and answers a scrape from them. It answers from them only while they are exactly what the
service would answer:

- no result was stored since they were rendered (the store's generation, shared through a mapped file,
  equals theirs), so ``/metrics`` never shows an older run than the API;
- every HA lease they were rendered under is still held (their ``until``, on the system-wide monotonic
  clock), so a paused replica never serves series it no longer leads;
- the service proved within ``ALIVE_SECONDS`` that it runs, so a hung or stopped service fails its
  scrapes (``up`` drops) as it did when it answered them itself.

A scrape that finds a result stored but not rendered yet waits (briefly) for the render the service makes
right after storing it. Anything else (``/health``, ``/ready``, another path, a render that does not come)
is passed to the service over a private Unix socket, with the client's address, so the service answers it
as before: the token concealment and the failed-token budget still see the real client. The process ends
when the service closes its end of the feed, or dies.

It asks the kernel for a short scheduler slice (``SLICE_NS``): its work per scrape is a fraction of a
millisecond, and a shorter slice lets it take a CPU from a sweeping database backend as soon as a scrape
arrives (docs/performance.md).
"""
from __future__ import annotations

import asyncio
import ctypes
import json
import math
import mmap
import os
import platform
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import asdict
from multiprocessing.connection import Connection
from typing import Any

from starlette.responses import JSONResponse

from zsmon.core.logging import get_logger
from zsmon.core.serving import ServerSettings, make_server

log = get_logger("zsmon.metrics")

# Shared with the process through a mapped file: the store's generation, and when the service last
# proved it runs (its feeding thread writes it every second, on the system-wide monotonic clock).
_SHARED = struct.Struct("qd")
ALIVE_SECONDS = 5.0  # older than this, the bytes are not served: a hung service must look down, not fine
CLIENT_HEADER = b"x-zsmon-client"  # host:port of the real client, set by the front and nobody else
SCHEME_HEADER = b"x-zsmon-scheme"
_HOP = {b"connection", b"keep-alive", b"transfer-encoding", b"te", b"upgrade", b"proxy-connection",
        b"proxy-authorization", b"trailer"}
START_SECONDS = 30.0
RENDER_WAIT_SECONDS = 1.0  # a scrape waits this long for a due render before the service is asked
# Linux 6.12+ (EEVDF): a thread may ask for a shorter time slice than the default (0.75-3 ms). Its virtual
# deadline comes sooner, so when a scrape wakes it, it preempts a busy CPU's task (a database backend in a
# sweep) instead of queueing behind it; its share of the CPU is unchanged, so no privilege is needed.
SLICE_NS = 300_000
_SCHED_SETATTR = {"x86_64": 314, "aarch64": 274}  # the syscall's number (glibc has no wrapper)


class MetricsFront:
    """The service's side: starts the process on the bound metrics socket, feeds it rendered bytes and the
    store's generation, and restarts it if it dies."""

    def __init__(self, listener: socket.socket, settings: ServerSettings) -> None:
        self.listener, self.settings = listener, settings
        self._dir = tempfile.mkdtemp(prefix="zsmon-metrics-")  # 0700: only this user reaches the socket
        self.backend_path = os.path.join(self._dir, "service.sock")
        self.backend = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.backend.bind(self.backend_path)
        self.backend.listen(128)
        self._shared_path = os.path.join(self._dir, "shared")
        with open(self._shared_path, "wb") as f:
            f.write(_SHARED.pack(0, time.monotonic()))
        self._shared_file = open(self._shared_path, "r+b")  # noqa: SIM115 - mapped until close()
        self._shared = mmap.mmap(self._shared_file.fileno(), _SHARED.size)
        self._cond = threading.Condition()
        self._latest: list[bytes] | None = None  # the newest render not yet sent (older ones are dropped)
        self._sent: list[bytes] | None = None  # the last one sent, for a restarted process
        self._closing = False
        self._proc: subprocess.Popen[bytes] | None = None
        self._feed: Connection | None = None
        self._sender: threading.Thread | None = None
        self.restarts = 0

    # ---- fed by the service ------------------------------------------------
    def stored(self, generation: int) -> None:
        """The result store's generation moved (called under the store's lock)."""
        struct.pack_into("q", self._shared, 0, generation)

    def rendered(self, generation: int, until: float, bodies: dict[str, bytes]) -> None:
        """New bytes: sent by the feeding thread, never by the job that rendered them (a stuck process
        must not stall the scheduler)."""
        header = json.dumps({"generation": generation, "until": None if math.isinf(until) else until,
                             "types": list(bodies)}).encode()
        with self._cond:
            self._latest = [header, *bodies.values()]
            self._cond.notify()

    # ---- lifecycle ---------------------------------------------------------
    def start(self) -> None:
        self._spawn()
        self._sender = threading.Thread(target=self._feed_loop, name="zsmon-metrics-feed", daemon=True)
        self._sender.start()

    def _spawn(self) -> None:
        ours, theirs = socket.socketpair()
        fds = (self.listener.fileno(), theirs.fileno())
        self._proc = subprocess.Popen([sys.executable, "-m", "zsmon.core.metrics_front", *map(str, fds)],
                                      pass_fds=fds, stdin=subprocess.DEVNULL)
        theirs.close()
        feed = Connection(ours.detach())
        settings = {**asdict(self.settings), "backend": self.backend_path, "shared": self._shared_path}
        try:
            feed.send_bytes(json.dumps(settings).encode())
            if not feed.poll(START_SECONDS):
                raise EOFError
            started = json.loads(feed.recv_bytes())
        except (EOFError, OSError):
            feed.close()
            code = self._proc.poll()
            self._proc.kill()
            self._proc.wait()
            raise RuntimeError("the metrics listener's process did not start"
                               + (f" (exit code {code}; its error is above)" if code is not None else
                                  f" within {START_SECONDS:g}s")) from None
        self._feed = feed
        log.debug("metrics_process_started", pid=self._proc.pid, scheduler_slice=started["slice"])

    def _send(self, parts: list[bytes]) -> None:
        assert self._feed is not None
        for part in parts:
            self._feed.send_bytes(part)

    def _feed_loop(self) -> None:
        while True:
            with self._cond:
                self._cond.wait_for(lambda: self._latest is not None or self._closing, timeout=1.0)
                if self._closing:
                    return
                parts, self._latest = self._latest, None
            struct.pack_into("d", self._shared, 8, time.monotonic())
            try:
                if self._proc is not None and self._proc.poll() is not None:
                    raise OSError(f"exited with code {self._proc.returncode}")
                if parts is not None:
                    self._send(parts)
                    self._sent = parts
            except OSError as exc:
                if self._closing:
                    return
                self._restart(str(exc), parts)

    def _restart(self, why: str, unsent: list[bytes] | None) -> None:
        log.error("metrics_process_restarted", error=why,
                  detail="the metrics listener's process ended; scrapes wait until it is back")
        self.restarts += 1
        if self._feed is not None:
            self._feed.close()
        if self._proc is not None and self._proc.poll() is None:
            self._proc.kill()  # alive but its feed broke: start afresh
            self._proc.wait()
        try:
            self._spawn()
        except RuntimeError as failed:  # tried again by the next round of the loop (it finds the process gone)
            log.error("metrics_process_restart_failed", error=str(failed))
            time.sleep(1.0)
        with self._cond:  # the new process's first bytes: the newest there are
            if self._latest is None:
                self._latest = unsent if unsent is not None else self._sent

    def stop(self, timeout: float = 2.0) -> None:
        """Close the feed (the process stops serving and exits), then clean up."""
        with self._cond:
            self._closing = True
            self._cond.notify()
        if self._sender is not None:
            self._sender.join(timeout)
        if self._feed is not None:
            self._feed.close()
        if self._proc is not None:
            try:
                self._proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait()
        self.backend.close()
        self._shared.close()
        self._shared_file.close()
        shutil.rmtree(self._dir, ignore_errors=True)

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None else None


def from_front(app: Any) -> Any:
    """ASGI middleware of the service's internal listener: the request's client and scheme are the ones
    the front process saw (only it can reach the private socket)."""

    async def asgi(scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] == "http":
            headers, client, scheme = [], None, scope.get("scheme", "http")
            for name, value in scope["headers"]:
                if name == CLIENT_HEADER:
                    host, _, port = value.decode("latin-1").rpartition(":")
                    client = (host, int(port) if port.isdigit() else 0)
                elif name == SCHEME_HEADER:
                    scheme = value.decode("latin-1")
                else:
                    headers.append((name, value))
            scope = {**scope, "headers": headers, "client": client, "scheme": scheme}
        await app(scope, receive, send)

    return asgi


# ---- the process ----------------------------------------------------------------
class _Front:
    """The front's ASGI app: ``GET /metrics`` from the fed bytes while they are current, the rest passed on."""

    def __init__(self, backend: str, shared_path: str) -> None:
        import httpx
        from prometheus_client.exposition import choose_encoder

        self._choose = choose_encoder
        self.rendered: tuple[int, float, dict[str, bytes]] = (-1, -math.inf, {})
        with open(shared_path, "rb") as f:
            self._shared = mmap.mmap(f.fileno(), _SHARED.size, access=mmap.ACCESS_READ)
        self._loop: Any = None  # the serving loop (attach(), before the feed starts)
        self._waiters: list[Any] = []  # scrapes waiting for the next render (futures of that loop)
        self._client = httpx.AsyncClient(transport=httpx.AsyncHTTPTransport(uds=backend), base_url="http://zsmon",
                                         timeout=httpx.Timeout(60.0, connect=5.0))
        self._httpx = httpx

    def _standing(self, generation: int, until: float) -> str:
        """Bytes of ``generation`` rendered under leases held ``until``: ``fresh`` (what the service would
        answer), ``due`` (only a result stored since stands in the way, and the service renders right after
        storing one: its bytes are a moment away) or ``stale`` (a lease lapsed, or the service has not
        proved it runs)."""
        stored, alive = _SHARED.unpack_from(self._shared, 0)
        now = time.monotonic()
        if now >= until or now - alive > ALIVE_SECONDS:
            return "stale"
        return "fresh" if generation == stored else "due"

    def current(self, accept: str) -> tuple[bytes, str] | None:
        generation, until, bodies = self.rendered
        if self._standing(generation, until) != "fresh":
            return None
        content_type = self._choose(accept)[1]
        body = bodies.get(content_type)
        return None if body is None else (body, content_type)

    def _render_due(self) -> bool:
        generation, until, _ = self.rendered
        return self._standing(generation, until) == "due"

    def attach(self, loop: Any) -> None:
        """The event loop scrapes are served on: the feed wakes the ones waiting for a render there."""
        self._loop = loop

    def update(self, generation: int, until: float, bodies: dict[str, bytes]) -> None:
        """New bytes from the feed (its thread): wakes the scrapes waiting for them."""
        self.rendered = (generation, until, bodies)
        if self._loop is not None:
            try:
                self._loop.call_soon_threadsafe(self._wake)
            except RuntimeError:  # the loop has closed: the process is ending
                pass

    def _wake(self) -> None:
        waiters, self._waiters = self._waiters, []
        for waiter in waiters:
            if not waiter.done():
                waiter.set_result(None)

    async def _fresh(self, accept: str) -> tuple[bytes, str] | None:
        """Wait (at most ``RENDER_WAIT_SECONDS``) for the render of the result just stored. Passing the scrape
        on instead would have the busy service render the same bytes again, behind its own GIL."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + RENDER_WAIT_SECONDS
        while self._render_due() and loop.time() < deadline:
            waiter = loop.create_future()
            self._waiters.append(waiter)
            try:
                await asyncio.wait_for(waiter, deadline - loop.time())
            except asyncio.TimeoutError:
                break
        return self.current(accept)

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return
        if scope["path"] == "/metrics" and scope["method"] == "GET":
            accept = next((v.decode("latin-1") for k, v in scope["headers"] if k == b"accept"), "")
            found = self.current(accept)
            if found is None and self._render_due():
                found = await self._fresh(accept)
            if found is not None:
                body, content_type = found
                await send({"type": "http.response.start", "status": 200,
                            "headers": [(b"content-type", content_type.encode()),
                                        (b"content-length", str(len(body)).encode())]})
                await send({"type": "http.response.body", "body": body})
                return
        await self._pass_on(scope, receive, send)

    async def _pass_on(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        body, more = b"", True
        while more:  # bounded by the BodyLimit this app is wrapped in (make_server)
            message = await receive()
            body += message.get("body", b"")
            more = message.get("more_body", False)
        client = scope.get("client") or ("unknown", 0)
        headers = [(k, v) for k, v in scope["headers"] if k not in _HOP and not k.startswith(b"x-zsmon-")]
        headers += [(CLIENT_HEADER, f"{client[0]}:{client[1]}".encode()), (SCHEME_HEADER, scope["scheme"].encode())]
        target = scope.get("raw_path") or scope["path"].encode()
        if scope.get("query_string"):
            target += b"?" + scope["query_string"]
        try:
            response = await self._client.send(
                self._client.build_request(scope["method"], target.decode("latin-1"), headers=headers,
                                           content=body), stream=True)
            try:
                content = b"".join([chunk async for chunk in response.aiter_raw()])
            finally:
                await response.aclose()
        except self._httpx.HTTPError:
            return await JSONResponse({"detail": "zsmon's service process did not answer"},
                                      status_code=502)(scope, receive, send)
        await send({"type": "http.response.start", "status": response.status_code,
                    "headers": [(k, v) for k, v in response.headers.raw
                                if k.lower() not in _HOP and k.lower() != b"content-length"]
                    + [(b"content-length", str(len(content)).encode())]})
        await send({"type": "http.response.body", "body": content})


class _SchedAttr(ctypes.Structure):
    _fields_ = [("size", ctypes.c_uint32), ("sched_policy", ctypes.c_uint32), ("sched_flags", ctypes.c_uint64),
                ("sched_nice", ctypes.c_int32), ("sched_priority", ctypes.c_uint32),
                ("sched_runtime", ctypes.c_uint64), ("sched_deadline", ctypes.c_uint64),
                ("sched_period", ctypes.c_uint64), ("sched_util_min", ctypes.c_uint32),
                ("sched_util_max", ctypes.c_uint32)]


def ask_short_slice(ns: int = SLICE_NS) -> str:
    """Ask for a ``ns`` scheduler slice for the calling thread, keeping its policy and nice value. Returns
    what happened, for the log: a kernel before 6.12 takes the request and ignores it; one that refuses
    it (another platform, a seccomp filter) leaves the thread as it was."""
    number = _SCHED_SETATTR.get(platform.machine()) if sys.platform == "linux" else None
    if number is None:
        return f"not asked: no sched_setattr on {sys.platform}/{platform.machine()}"
    policy = os.sched_getscheduler(0)
    if policy not in (os.SCHED_OTHER, os.SCHED_BATCH):
        return f"not asked: the thread runs under scheduling policy {policy}, not the fair one"
    attr = _SchedAttr(size=ctypes.sizeof(_SchedAttr), sched_policy=policy,
                      sched_nice=os.getpriority(os.PRIO_PROCESS, 0), sched_runtime=ns)
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.syscall(number, 0, ctypes.byref(attr), 0) != 0:
        return f"refused: {os.strerror(ctypes.get_errno())}"
    return f"{ns / 1e6:g} ms asked (honoured from Linux 6.12; running {platform.release()})"


def main(listen_fd: int, feed_fd: int) -> int:
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the service decides when this ends (it closes the feed)
    slice_answer = ask_short_slice()  # this (main) thread serves the scrapes
    feed = Connection(feed_fd)
    settings = json.loads(feed.recv_bytes())
    backend, shared_path = settings.pop("backend"), settings.pop("shared")
    settings["trusted_proxies"] = tuple(settings["trusted_proxies"])
    server_settings = ServerSettings(**settings)
    front = _Front(backend, shared_path)
    server = make_server(front, server_settings)
    listener = socket.socket(fileno=listen_fd)

    def read_feed() -> None:
        try:
            while True:
                header = json.loads(feed.recv_bytes())
                bodies = {t: feed.recv_bytes() for t in header["types"]}
                until = math.inf if header["until"] is None else header["until"]
                front.update(header["generation"], until, bodies)
        except (EOFError, OSError):
            server.should_exit = True  # the service stopped or died

    async def serve() -> None:
        front.attach(asyncio.get_running_loop())
        task = asyncio.create_task(server.serve(sockets=[listener]))
        while not server.started and not task.done():
            await asyncio.sleep(0.01)
        if server.started:
            feed.send_bytes(json.dumps({"slice": slice_answer}).encode())
            threading.Thread(target=read_feed, name="zsmon-metrics-feed", daemon=True).start()
        await task

    asyncio.run(serve())
    return 0 if server.started else 1


if __name__ == "__main__":
    sys.exit(main(int(sys.argv[1]), int(sys.argv[2])))
