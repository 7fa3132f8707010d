"""Real Prometheus and Alertmanager around a running sidecar, for the end-to-end test and the benchmarks.

Debian's ``/usr/bin/prometheus`` and ``/usr/bin/prometheus-alertmanager`` run on
127.0.0.1 with the output of ``zsmon render``; a webhook receiver in this
process records every notification; small fake endpoints stand in for what
the platform runs beside zsmon (the API's own ``/metrics``, postgres-exporter,
redis-exporter), so every scrape job has a live target.

    receiver = WebhookReceiver(); platform = FakePlatform()
    render_config = make_config(render=stack_render_settings(metrics_port, platform, receiver, am_port))
    render_all(build_registry(render_config), out); speed_up(out)   # only for tests: see speed_up()
    with PrometheusStack(out, prom_port, am_port) as stack:
        stack.wait_targets_up(); receiver.wait_for("BalanceInvariantViolation", "firing")
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import tempfile
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, Callable

import requests

from zsmon.testing import free_port  # noqa: F401 - re-exported for the stack's users

PROMETHEUS = os.environ.get("ZSMON_PROMETHEUS", "/usr/bin/prometheus")
ALERTMANAGER = os.environ.get("ZSMON_ALERTMANAGER", "/usr/bin/prometheus-alertmanager")


def plant_money_from_nowhere(dsn: str, channel: str, amount: int) -> float:
    """Change a channel's spendable balance with no ledger row (money from nowhere); returns the commit time.

    A negative ``amount`` repairs what a positive one planted.
    """
    import psycopg

    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute("UPDATE payment_channels SET current_balance = current_balance + %s, updated_at = now() "
                     "WHERE id = %s", (amount, channel))
    return time.monotonic()


class _Server:
    """A ThreadingHTTPServer on 127.0.0.1 and an ephemeral port, served from a daemon thread."""

    def __init__(self, handler: type[BaseHTTPRequestHandler]) -> None:
        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), handler)
        self.httpd.daemon_threads = True
        self.port = self.httpd.server_address[1]
        self.thread = threading.Thread(target=self.httpd.serve_forever, name=f"http-{self.port}", daemon=True)
        self.thread.start()

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def stop(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


# ---- the webhook receiver -------------------------------------------------------------
class WebhookReceiver:
    """Records Alertmanager webhook notifications: ``(monotonic time, path, payload)`` per POST."""

    def __init__(self) -> None:
        self.notifications: list[tuple[float, str, dict[str, Any]]] = []
        self.cond = threading.Condition()
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802 - http.server's naming
                body = self.rfile.read(int(self.headers.get("content-length") or 0))
                try:
                    payload = json.loads(body)
                except ValueError:
                    payload = {"unparsed": body.decode("utf-8", "replace")}
                with receiver.cond:
                    receiver.notifications.append((time.monotonic(), self.path, payload))
                    receiver.cond.notify_all()
                self.send_response(200)
                self.end_headers()

            def log_message(self, *args: Any) -> None:
                pass

        self.server = _Server(Handler)

    def url(self, path: str) -> str:
        return f"http://{self.server.address}{path}"

    def alerts(self, path: str | None = None) -> list[tuple[float, str, dict[str, Any]]]:
        """Every alert received, as ``(time, path, alert)`` (one notification carries several)."""
        with self.cond:
            return [(t, p, a) for t, p, n in self.notifications if path is None or p == path
                    for a in n.get("alerts", [])]

    def wait_for(self, alertname: str | None, status: str = "firing", path: str | None = None, timeout: float = 30,
                 since: float = 0.0, match: Callable[[dict[str, Any]], bool] | None = None) -> tuple[float, dict]:
        """Block until an alert ``alertname`` (None: any alert ``match`` accepts) with ``status`` arrives
        (after ``since``); return (time, alert)."""
        deadline = time.monotonic() + timeout
        with self.cond:
            while True:
                for t, p, n in self.notifications:
                    if t < since or (path is not None and p != path):
                        continue
                    for a in n.get("alerts", []):
                        if alertname in (None, a.get("labels", {}).get("alertname")) and a.get("status") == status \
                                and (match is None or match(a)):
                            return t, a
                left = deadline - time.monotonic()
                if left <= 0:
                    seen = sorted({(p, a["labels"].get("alertname"), a.get("status")) for _, p, a in
                                   ((t, p, a) for t, p, n in self.notifications for a in n.get("alerts", []))})
                    raise AssertionError(f"no {status} {alertname or 'matching alert'} within {timeout}s; "
                                         f"received: {seen}")
                self.cond.wait(min(left, 0.5))

    def stop(self) -> None:
        self.server.stop()


# ---- what the platform runs beside zsmon ------------------------------------------------------
class FakePlatform:
    """Scrape targets for the jobs zsmon does not serve itself.

    * ``api``: the platform API's own ``/metrics`` (``http_requests_total{method,path,status}`` and the
      ``http_request_duration_seconds`` histogram, growing at every scrape as traffic would, with some
      5xx), plus ``/health`` and ``/ready`` for zsmon's api_probe exporter;
    * ``postgres`` and ``redis``: postgres-exporter and redis-exporter, reduced to ``pg_up``/``redis_up``.
    """

    PATHS = (("GET", "/api/v1/auctions"), ("POST", "/api/v1/auctions/{id}/bids"), ("POST", "/api/v1/payments/settle"))
    BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)

    def __init__(self, requests_metric: str = "http_requests_total",
                 duration_metric: str = "http_request_duration_seconds") -> None:
        self.requests_metric = requests_metric
        self.duration_metric = duration_metric
        self.lock = threading.Lock()
        self.scrapes = 0
        self.api = _Server(self._handler(self._api_metrics, health=True))
        self.postgres_exporter = _Server(self._handler(lambda: "# TYPE pg_up gauge\npg_up 1\n"))
        self.redis_exporter = _Server(self._handler(lambda: "# TYPE redis_up gauge\nredis_up 1\n"))

    def _handler(self, metrics: Callable[[], str], health: bool = False) -> type[BaseHTTPRequestHandler]:
        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802
                if self.path == "/metrics":
                    body, ctype = metrics().encode(), "text/plain; version=0.0.4"
                elif health and self.path in ("/health", "/ready"):
                    body, ctype = b'{"status":"ok"}', "application/json"
                else:
                    self.send_response(404)
                    self.end_headers()
                    return
                self.send_response(200)
                self.send_header("content-type", ctype)
                self.send_header("content-length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args: Any) -> None:
                pass

        return Handler

    def _api_metrics(self) -> str:
        with self.lock:
            self.scrapes += 1
            n = self.scrapes
        req, dur = self.requests_metric, self.duration_metric
        lines = [f"# TYPE {req} counter"]
        for i, (method, path) in enumerate(self.PATHS):
            ok, failed = 100 * n * (i + 1), n * (i + 1)  # about 1% 5xx
            lines.append(f'{req}{{method="{method}",path="{path}",status="200"}} {ok}')
            lines.append(f'{req}{{method="{method}",path="{path}",status="500"}} {failed}')
        lines.append(f"# TYPE {dur} histogram")
        for i, (method, path) in enumerate(self.PATHS):
            count = 101 * n * (i + 1)
            labels = f'method="{method}",path="{path}"'
            for j, le in enumerate(self.BUCKETS):
                share = min(1.0, (j + 1) / len(self.BUCKETS) + 0.05 * i)
                lines.append(f'{dur}_bucket{{{labels},le="{le}"}} {int(count * share)}')
            lines.append(f'{dur}_bucket{{{labels},le="+Inf"}} {count}')
            lines.append(f"{dur}_sum{{{labels}}} {count * 0.08 * (i + 1):.3f}")
            lines.append(f"{dur}_count{{{labels}}} {count}")
        return "\n".join(lines) + "\n"

    def stop(self) -> None:
        for s in (self.api, self.postgres_exporter, self.redis_exporter):
            s.stop()


def stack_render_settings(zsmon_metrics: str, platform: FakePlatform, receiver: WebhookReceiver,
                          alertmanager_port: int, scrape_seconds: int = 1, evaluation_seconds: int = 1,
                          pager_group_wait_seconds: int = 1) -> dict[str, Any]:
    """The ``render`` config section pointing the rendered configuration at this stack."""
    return {
        "scrape_interval_seconds": scrape_seconds,
        "evaluation_interval_seconds": evaluation_seconds,
        "zsmon_targets": [zsmon_metrics],
        "api_targets": [platform.api.address],
        "postgres_exporter_targets": [platform.postgres_exporter.address],
        "redis_exporter_targets": [platform.redis_exporter.address],
        "alertmanager_targets": [f"127.0.0.1:{alertmanager_port}"],
        "pager_webhook_url": receiver.url("/pager"),
        "chat_webhook_url": receiver.url("/chat"),
        "watchdog_webhook_url": receiver.url("/watchdog"),
        "pager_group_wait_seconds": pager_group_wait_seconds,
    }


def speed_up(out: Path, group_interval: str = "1s", alert_for: dict[str, str] | None = None) -> None:
    """Shorten waits that only bound how often a human is re-notified, for a test that must finish in seconds.

    Alertmanager's ``group_interval`` (how long before a group's next notification, and so its resolved
    one: 1m-5m shipped) becomes ``group_interval`` on every route, and the ``for`` of the alerts named in
    ``alert_for`` is replaced (e.g. DatabaseDown's 1m). Expressions, labels, receivers, routing and
    inhibition stay exactly as rendered. The detection-latency benchmark measures the shipped values.
    """
    import yaml

    am_path = out / "alertmanager" / "alertmanager.yml"
    am = yaml.safe_load(am_path.read_text())

    def walk(route: dict[str, Any]) -> None:
        if "group_interval" in route or route is am["route"]:
            route["group_interval"] = group_interval
        for child in route.get("routes", []) or []:
            walk(child)

    walk(am["route"])
    am_path.write_text(yaml.safe_dump(am, sort_keys=False))
    if alert_for:
        for path in (out / "prometheus" / "rules").glob("*.yml"):
            doc = yaml.safe_load(path.read_text())
            changed = False
            for group in doc.get("groups", []):
                for rule in group.get("rules", []):
                    if rule.get("alert") in alert_for:
                        rule["for"] = alert_for[rule["alert"]]
                        changed = True
            if changed:
                path.write_text(yaml.safe_dump(doc, sort_keys=False))


# ---- Prometheus and Alertmanager ------------------------------------------------------------
class PrometheusStack:
    """``/usr/bin/prometheus`` and ``/usr/bin/prometheus-alertmanager`` on 127.0.0.1 with rendered config."""

    def __init__(self, rendered: Path, prometheus_port: int | None = None, alertmanager_port: int | None = None,
                 prometheus_args: tuple[str, ...] = ()) -> None:
        self.rendered = Path(rendered)
        self.prometheus_args = tuple(prometheus_args)
        self.prometheus_port = prometheus_port or free_port()
        self.alertmanager_port = alertmanager_port or free_port()
        self.dir = tempfile.mkdtemp(prefix="zsmon-e2e-")
        self.procs: list[subprocess.Popen] = []
        self.logs: dict[str, Path] = {}

    @property
    def prometheus(self) -> str:
        return f"http://127.0.0.1:{self.prometheus_port}"

    @property
    def alertmanager(self) -> str:
        return f"http://127.0.0.1:{self.alertmanager_port}"

    def _spawn(self, name: str, cmd: list[str]) -> None:
        log = Path(self.dir) / f"{name}.log"
        self.logs[name] = log
        with open(log, "wb") as f:
            self.procs.append(subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, cwd=self.dir))

    def start(self) -> "PrometheusStack":
        self._spawn("alertmanager", [
            ALERTMANAGER, f"--config.file={self.rendered / 'alertmanager' / 'alertmanager.yml'}",
            f"--storage.path={Path(self.dir) / 'am'}", f"--web.listen-address=127.0.0.1:{self.alertmanager_port}",
            "--cluster.listen-address=", "--log.level=warn"])
        self._spawn("prometheus", [
            PROMETHEUS, f"--config.file={self.rendered / 'prometheus' / 'prometheus.yml'}",
            f"--storage.tsdb.path={Path(self.dir) / 'tsdb'}", f"--web.listen-address=127.0.0.1:{self.prometheus_port}",
            "--log.level=warn", *self.prometheus_args])
        self.wait(lambda: self._ok(f"{self.alertmanager}/-/ready") and self._ok(f"{self.prometheus}/-/ready"), 30,
                  "Prometheus and Alertmanager to be ready")
        return self

    @staticmethod
    def _ok(url: str) -> bool:
        try:
            return requests.get(url, timeout=1).status_code == 200
        except requests.RequestException:
            return False

    def wait(self, predicate: Callable[[], Any], timeout: float, what: str) -> Any:
        deadline = time.monotonic() + timeout
        while True:
            for p in self.procs:
                if p.poll() is not None:
                    raise AssertionError(f"a server exited ({p.args[0]} rc {p.returncode}) while waiting for {what}:"
                                         f"\n{self.log_tail()}")
            value = predicate()
            if value:
                return value
            if time.monotonic() > deadline:
                raise AssertionError(f"timed out after {timeout}s waiting for {what}\n{self.log_tail()}")
            time.sleep(0.2)

    def log_tail(self, chars: int = 3000) -> str:
        return "\n".join(f"--- {n}\n{p.read_text(errors='replace')[-chars:]}" for n, p in self.logs.items() if p.exists())

    def targets(self) -> list[dict[str, Any]]:
        return requests.get(f"{self.prometheus}/api/v1/targets", timeout=5).json()["data"]["activeTargets"]

    def wait_targets_up(self, jobs: set[str] | None = None, timeout: float = 30) -> list[dict[str, Any]]:
        """Poll ``/api/v1/targets`` until every target (of ``jobs``) has been scraped successfully."""
        def up() -> list[dict[str, Any]] | None:
            ts = [t for t in self.targets() if jobs is None or t["labels"]["job"] in jobs]
            return ts if ts and all(t["health"] == "up" for t in ts) else None

        return self.wait(up, timeout, f"targets of {sorted(jobs) if jobs else 'every job'} to be up")

    def query(self, expr: str) -> list[dict[str, Any]]:
        r = requests.get(f"{self.prometheus}/api/v1/query", params={"query": expr}, timeout=10)
        body = r.json()
        if body.get("status") != "success":
            raise AssertionError(f"query failed: {expr}: {body.get('error')}")
        return body["data"]["result"]

    def stop(self) -> None:
        for p in self.procs:
            if p.poll() is None:
                p.terminate()
        for p in self.procs:
            try:
                p.wait(10)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait(5)
        shutil.rmtree(self.dir, ignore_errors=True)

    def __enter__(self) -> "PrometheusStack":
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.stop()


# ---- dashboards -------------------------------------------------------------------------------------
GRAFANA_VARIABLES = {
    # What Grafana substitutes for a 1 s scrape interval and a ~10 s panel step ($__rate_interval =
    # max($__interval + scrape interval, 4 x scrape interval)); longest names first.
    "$__rate_interval": "10s", "${__rate_interval}": "10s",
    "$__interval_ms": "2000", "$__interval": "2s", "${__interval}": "2s",
    "$__range": "1m", "${__range}": "1m",
    # The job and instance variables at "All" (their allValue).
    "$job": ".+", "$instance": ".+",
}


def dashboard_queries(out: Path) -> list[tuple[str, str, str]]:
    """``(dashboard uid, panel title, expr)`` for every target of every rendered dashboard, variables substituted."""
    found = []
    for path in sorted((out / "grafana" / "dashboards").glob("*.json")):
        board = json.loads(path.read_text())

        def panels(items: list[dict[str, Any]]) -> Any:
            for p in items:
                yield p
                yield from panels(p.get("panels", []) or [])

        for panel in panels(board.get("panels", [])):
            for target in panel.get("targets", []) or []:
                expr = target.get("expr")
                if not expr:
                    continue
                for var in sorted(GRAFANA_VARIABLES, key=len, reverse=True):
                    expr = expr.replace(var, GRAFANA_VARIABLES[var])
                found.append((board["uid"], panel.get("title", ""), expr))
    return found
