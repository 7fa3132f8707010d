"""The metrics listener's own process (``http.metrics_process``, on by default), with a real ``zsmon run``.

It answers ``/metrics`` from the bytes the service rendered, so a scrape does not wait for the service's
GIL; everything else it passes to the service with the client's real address. A frozen service still
fails its scrapes once it has stopped proving it runs; the process is restarted if it dies and ends with
the service.
"""
from __future__ import annotations

import asyncio
import http.client
import importlib.metadata
import math
import os
import platform
import re
import signal
import subprocess
import sys
import threading
import time
import tomllib
from pathlib import Path

import pytest
import requests
import yaml

from prometheus_client.exposition import choose_encoder

from zsmon.core.metrics_front import _SHARED, ALIVE_SECONDS, RENDER_WAIT_SECONDS, SLICE_NS, _Front
from zsmon.testing import free_port, wait_for

pytestmark = pytest.mark.slow

TOKEN = "front-test-token-0123456789abcdef"
SCHEMA_PASSED = 'zerostate_invariant_check_runs_total{checker="schema",status="pass"} 1.0'
PROMETHEUS_ACCEPT = {  # the Accept header each sends when it scrapes
    "Prometheus 2": "application/openmetrics-text;version=1.0.0,application/openmetrics-text;version=0.0.1;q=0.75,"
                    "text/plain;version=0.0.4;q=0.5,*/*;q=0.1",
    "Prometheus 3": "application/openmetrics-text;version=1.0.0;escaping=allow-utf-8;q=0.5,"
                    "application/openmetrics-text;version=0.0.1;q=0.4,text/plain;version=1.0.0;escaping=allow-utf-8;"
                    "q=0.3,text/plain;version=0.0.4;q=0.2,*/*;q=0.1",
}


class Sidecar:
    def __init__(self, tmp_path: Path, database_url: str, extra_env: dict[str, str] | None = None,
                 **http: object) -> None:
        self.metrics_port, self.api_port = free_port(), free_port()
        cfg = tmp_path / "zsmon.yml"
        cfg.write_text(yaml.safe_dump({
            "http": {"metrics_listen": f"127.0.0.1:{self.metrics_port}", "api_listen": f"127.0.0.1:{self.api_port}",
                     **http},
            "database": {"connect_timeout_seconds": 1},
            "checkers": {"schema": {"interval_seconds": 3600}, "payments": {"enabled": False},
                         "auctions": {"enabled": False}, "reputation": {"enabled": False},
                         "agent_liveness": {"enabled": False}},
            "exporters": {n: {"enabled": False} for n in ("api_probe", "payments", "auctions", "reputation",
                                                           "postgres", "redis")},
        }))
        env = {"PATH": os.environ.get("PATH", ""), "ZSMON_DATABASE_URL": database_url, "REDIS_HOST": "",
               "ADMIN_TOKEN": TOKEN, "LOG_FORMAT": "json", **(extra_env or {})}
        self.log = tmp_path / "zsmon.log"
        with open(self.log, "w") as out:
            self.proc = subprocess.Popen([sys.executable, "-m", "zsmon.cli", "--config", str(cfg), "run"],
                                         env=env, stdout=out, stderr=subprocess.STDOUT)
        self.base = f"http://127.0.0.1:{self.metrics_port}"

    def scrape(self, timeout: float = 5.0) -> requests.Response:
        return requests.get(f"{self.base}/metrics", timeout=timeout)

    def front_pid(self) -> int | None:
        """The service's child process that serves the metrics socket."""
        children = [int(p) for p in _children(self.proc.pid)]
        return children[0] if len(children) == 1 else None

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGCONT)
            self.proc.terminate()
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        assert "Traceback" not in self.log.read_text(), self.log.read_text()[-3000:]


def _children(pid: int) -> list[str]:
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                stat = Path(f"/proc/{entry}/stat").read_text()
            except OSError:
                continue
            if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
                found.append(entry)
    return found


def _alive(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


@pytest.fixture
def sidecar(tmp_path, db_url):
    made: list[Sidecar] = []

    def make(database_url: str = db_url, extra_env: dict[str, str] | None = None, **http: object) -> Sidecar:
        made.append(Sidecar(tmp_path, database_url, extra_env, **http))
        return made[-1]

    yield make
    for s in made:
        s.stop()


def _checked(s: Sidecar) -> str | None:
    try:
        text = s.scrape().text
    except requests.RequestException:
        return None
    return text if SCHEMA_PASSED in text else None


def test_a_frozen_service_is_still_scraped_until_it_stops_proving_it_runs(sidecar):
    s = sidecar()
    wait_for(lambda: _checked(s), timeout=30)  # rendered once the result was stored; nothing stored after it
    assert s.front_pid() is not None
    s.proc.send_signal(signal.SIGSTOP)
    try:
        # The front answers from the bytes the service rendered: the frozen service is not asked.
        frozen = s.scrape(timeout=2)
        assert frozen.status_code == 200 and SCHEMA_PASSED in frozen.text
        assert frozen.headers["cache-control"] == "no-store"
        for prometheus, accept in PROMETHEUS_ACCEPT.items():  # what real scrapers ask for is ready too
            scraped = requests.get(f"{s.base}/metrics", headers={"Accept": accept}, timeout=2)
            assert scraped.status_code == 200, prometheus
            assert scraped.headers["content-type"].startswith("application/openmetrics-text"), prometheus
            assert scraped.text.rstrip().endswith("# EOF"), prometheus
        # /ready is the service's to answer: it waits for the frozen service.
        with pytest.raises(requests.Timeout):
            requests.get(f"{s.base}/ready", timeout=1)
        # Once the service has not proved for ALIVE_SECONDS that it runs, scrapes go to it too, and fail:
        # a hung service looks down to Prometheus, as it did when it answered scrapes itself.
        time.sleep(ALIVE_SECONDS + 0.5)
        with pytest.raises(requests.Timeout):
            s.scrape(timeout=1)
    finally:
        s.proc.send_signal(signal.SIGCONT)
    assert wait_for(lambda: _checked(s), timeout=15)
    assert requests.get(f"{s.base}/ready", timeout=5).status_code == 200


def _slice_ns(pid: int) -> int:
    """The scheduler slice of a process's main thread, as the kernel shows it."""
    return int(re.search(r"^se\.slice\s*:\s*(\d+)", Path(f"/proc/{pid}/sched").read_text(), re.M).group(1))


def _asked_a_short_slice(front: int, service: int) -> None:
    """The metrics process runs with SLICE_NS (honoured from Linux 6.12), so a scrape preempts a busy CPU's
    task sooner; the service keeps the default."""
    if tuple(int(x) for x in re.findall(r"\d+", platform.release())[:2]) >= (6, 12):
        assert _slice_ns(front) == SLICE_NS != _slice_ns(service)


def test_the_front_is_restarted_when_it_dies_and_ends_with_the_service(sidecar):
    s = sidecar()
    wait_for(lambda: _checked(s), timeout=30)
    first = s.front_pid()
    assert first is not None
    _asked_a_short_slice(first, s.proc.pid)
    os.kill(first, signal.SIGKILL)
    second = wait_for(lambda: (lambda p: p if p not in (None, first) else None)(s.front_pid()), timeout=15)
    assert wait_for(lambda: _checked(s), timeout=15)
    _asked_a_short_slice(second, s.proc.pid)  # a restarted process asks again
    assert '"event": "metrics_process_restarted"' in s.log.read_text()
    # The service dies without a word (no stop): its front sees the feed close and ends too.
    s.proc.kill()
    s.proc.wait()
    wait_for(lambda: not _alive(second), timeout=10)
    with pytest.raises(requests.ConnectionError):
        s.scrape(timeout=2)


def _answers(url: str) -> bool:
    try:
        return requests.get(url, timeout=2).ok
    except requests.RequestException:
        return False


def _ready(port: int, source: str, token: str, forged: str | None = None) -> tuple[int, str]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10, source_address=(source, 0))
    headers = {"Authorization": f"Bearer {token}"}
    if forged:
        headers["X-Zsmon-Client"] = forged
    try:
        conn.request("GET", "/ready", headers=headers)
        response = conn.getresponse()
        return response.status, response.read().decode()
    finally:
        conn.close()


def test_the_service_judges_tokens_per_real_client_and_the_client_cannot_be_forged(sidecar):
    # Not ready (nothing listens on port 1): with the token, /ready names the database; without, it hides it.
    s = sidecar("postgresql://zsmon@127.0.0.1:1/ledger_behind_front", auth_failure_limit_per_minute=3)
    wait_for(lambda: _answers(f"{s.base}/health"), timeout=30)
    status, body = _ready(s.metrics_port, "127.0.0.1", TOKEN)
    assert status == 503 and "ledger_behind_front" in body, body
    # 127.0.0.1 spends its failed-token budget, each time claiming to be 127.0.0.2 in the front's own header.
    for _ in range(3):
        status, body = _ready(s.metrics_port, "127.0.0.1", "wrong-token", forged="127.0.0.2:1")
        assert status == 503 and "ledger_behind_front" not in body
    # The budget spent was 127.0.0.1's: even the right token is not compared for it any more ...
    status, body = _ready(s.metrics_port, "127.0.0.1", TOKEN)
    assert status == 503 and "ledger_behind_front" not in body, body
    # ... while 127.0.0.2, a client of its own, still has all of its budget.
    status, body = _ready(s.metrics_port, "127.0.0.2", TOKEN)
    assert status == 503 and "ledger_behind_front" in body, body


def _test_only_modules() -> set[str]:
    """The top-level modules of the distributions only the ``test`` extra installs (pytest, httpx, ...)."""
    project = tomllib.loads((Path(__file__).resolve().parents[1] / "pyproject.toml").read_text())["project"]

    def dist(requirement: str) -> str:  # "Foo_Bar>=1" -> "foo-bar"
        return re.match(r"[A-Za-z0-9._-]+", requirement).group(0).lower().replace("_", "-")

    test_only = {dist(d) for d in project["optional-dependencies"]["test"]} - {dist(d) for d in project["dependencies"]}
    return {module for module, dists in importlib.metadata.packages_distributions().items()
            if any(dist(d) in test_only for d in dists)}


def test_the_sidecar_serves_on_its_runtime_dependencies_alone(sidecar, tmp_path):
    """A plain ``pip install .`` (the container image) has none of the test extra: the service and the metrics
    process must not need any of it (the metrics process once passed requests on with the test extra's httpx)."""
    blocked = _test_only_modules()
    assert {"pytest", "jsonschema"} <= blocked  # the test extra as declared today
    site = tmp_path / "site"
    site.mkdir()
    (site / "sitecustomize.py").write_text(
        "import sys\n"
        f"BLOCKED = {sorted(blocked)!r}\n"
        "class _TestOnly:\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name.split('.')[0] in BLOCKED:\n"
        "            raise ModuleNotFoundError(f'No module named {name!r} (test extra only)')\n"
        "sys.meta_path.insert(0, _TestOnly())\n")
    s = sidecar(extra_env={"PYTHONPATH": str(site)})
    assert wait_for(lambda: _checked(s), timeout=30)
    front = s.front_pid()
    assert front is not None
    # Passed on to the service by the metrics process: its client is the part that needs more than uvicorn.
    assert requests.get(f"{s.base}/health", timeout=5).status_code == 200
    assert requests.get(f"{s.base}/ready", timeout=5).status_code == 200
    assert s.front_pid() == front and "metrics_process_restarted" not in s.log.read_text()


def _asgi_get(app, path: str = "/metrics") -> tuple[int, bytes]:
    """One GET through an ASGI app, on the running loop."""
    sent: list[dict] = []

    async def receive() -> dict:
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message: dict) -> None:
        sent.append(message)

    async def go() -> tuple[int, bytes]:
        await app({"type": "http", "method": "GET", "path": path, "raw_path": path.encode(), "query_string": b"",
                   "headers": [], "scheme": "http", "client": ("127.0.0.1", 5)}, receive, send)
        return sent[0]["status"], b"".join(m.get("body", b"") for m in sent[1:])

    return go()


def test_a_scrape_waits_for_the_render_of_a_result_just_stored_instead_of_asking_the_service(tmp_path):
    """A result stored, its render a moment away: the scrape gets the new render, not the busy service
    (nothing listens on the service's socket here, so asking it would answer 502). A render that never
    comes: the service is asked after RENDER_WAIT_SECONDS."""
    shared = tmp_path / "shared"
    shared.write_bytes(_SHARED.pack(2, time.monotonic()))  # generation 2 stored, the service alive now
    front = _Front(str(tmp_path / "nobody.sock"), str(shared))
    plain = choose_encoder("")[1]
    front.update(1, math.inf, {plain: b"render of generation 1"})

    async def scenario() -> None:
        front.attach(asyncio.get_running_loop())
        threading.Timer(0.2, front.update, (2, math.inf, {plain: b"render of generation 2"})).start()
        assert await _asgi_get(front) == (200, b"render of generation 2")
        with open(shared, "r+b") as f:  # generation 3 stored; its render never arrives
            f.write(_SHARED.pack(3, time.monotonic()))
        t0 = time.monotonic()
        status, _ = await _asgi_get(front)
        assert status == 502 and time.monotonic() - t0 >= RENDER_WAIT_SECONDS

    asyncio.run(scenario())
