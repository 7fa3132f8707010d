"""Benchmark: /metrics latency of zsmon against query-exporter, on a small and a large database.

    .venv/bin/python bench/scrape.py                       # 10k -> 1M channels, 1,000 scrapes each
    .venv/bin/python bench/scrape.py --large-channels 200000 --scrapes 300 --no-query-exporter

What it does:
1. Creates its own database on the local PostgreSQL (dropped at the end) holding the
   platform schema, and fills it set-based (generate_series, no row loop): the small
   size first, then grows it to the large one (default 1M channels with their ledger,
   10k agents with reputation rows and events, auctions with bids).
2. At each size, starts ``zsmon run`` as a subprocess with every checker and exporter
   (exporters collecting every second, so collections overlap the scrapes), waits
   until every checker and exporter has run, then times 1,000 scrapes of ``/metrics``
   paced evenly over 60 s (``--spread``; 0 for back-to-back) over one keep-alive
   connection and reports p50/p99/max.
3. The same for query-exporter (installed from PyPI into its own venv under /tmp),
   configured with the very SQL zsmon's database exporters run: the statements are
   recorded from one real collection of each exporter, parameters bound, and every
   numeric column becomes a gauge, every text column a label. It runs twice: queries
   on every scrape (query-exporter's default, no ``interval``) and on the same interval as zsmon
   (cached, like zsmon).

Figures are printed, never asserted: this is a benchmark, not a test.
"""
from __future__ import annotations

import argparse
import http.client
import os
import re
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psycopg
import yaml
from psycopg.conninfo import conninfo_to_dict, make_conninfo

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


from zsmon.testing import create_platform_database, drop_database  # noqa: E402

ADMIN_DSN = os.environ.get("ZSMON_BENCH_DSN", "postgresql://postgres@127.0.0.1:5432/postgres")
ZSMON = str(ROOT / ".venv" / "bin" / "zsmon")
REDIS_PREFIX = f"zsmon-bench-scrape-{os.getpid()}:"  # zsmon's memory across runs; deleted at the end


# ---- data --------------------------------------------------------------------------------
def grow(conn: psycopg.Connection, channels: tuple[int, int], agents: tuple[int, int], users: int) -> None:
    """Add channels (lo, hi] and agents (lo, hi] set-based; everything consistent with the platform's transitions."""
    c_lo, c_hi = channels
    a_lo, a_hi = agents
    conn.execute("""
        INSERT INTO agents (did, name, status, max_capacity, current_load, region, last_seen_at)
        SELECT 'did:bench:agent:' || i, 'agent ' || i, CASE WHEN i %% 10 = 0 THEN 'offline' ELSE 'online' END,
               10, i %% 10, (ARRAY['eu', 'us', 'ap'])[1 + i %% 3], now() - (i %% 600) * interval '1 second'
        FROM generate_series(%(lo)s + 1, %(hi)s) i
    """, {"lo": a_lo, "hi": a_hi})
    # Ten task outcomes per agent: 8 successes (+2) and 2 failures (-5) from 50 -> 56.
    conn.execute("""
        INSERT INTO reputation_scores (agent_did, overall_score, total_tasks, successful_tasks, failed_tasks)
        SELECT 'did:bench:agent:' || i, 56, 10, 8, 2 FROM generate_series(%(lo)s + 1, %(hi)s) i
    """, {"lo": a_lo, "hi": a_hi})
    conn.execute("""
        INSERT INTO reputation_events (agent_did, event_type, task_id, score_delta, created_at)
        SELECT 'did:bench:agent:' || i, CASE WHEN k <= 8 THEN 'task_completed' ELSE 'task_failed' END,
               'task-' || i || '-' || k, CASE WHEN k <= 8 THEN 2 ELSE -5 END,
               now() - interval '1 day' + k * interval '1 minute'
        FROM generate_series(%(lo)s + 1, %(hi)s) i, generate_series(1, 10) k
    """, {"lo": a_lo, "hi": a_hi})
    # Channels opened with a deposit (ledger row), a fifth of them with a settled task.
    conn.execute("""
        WITH c AS (
            INSERT INTO payment_channels (payer_did, payee_did, total_deposit, current_balance, total_settled,
                                          state, sequence_number, created_at, updated_at)
            SELECT 'did:bench:user:' || (i %% %(users)s), 'did:bench:agent:' || (1 + i %% %(agents)s),
                   100, CASE WHEN i %% 5 = 0 THEN 90 ELSE 100 END, CASE WHEN i %% 5 = 0 THEN 10 ELSE 0 END,
                   'open', CASE WHEN i %% 5 = 0 THEN 2 ELSE 0 END,
                   now() - interval '2 days' + (i %% 86400) * interval '1 second', now() - interval '1 day'
            FROM generate_series(%(lo)s + 1, %(hi)s) i
            RETURNING id, total_settled, created_at
        )
        INSERT INTO channel_transactions (channel_id, transaction_type, amount, task_id, created_at)
        SELECT id, 'deposit', 100, NULL, created_at FROM c
        UNION ALL SELECT id, 'escrow', 10, 'task-' || id, created_at + interval '1 minute' FROM c WHERE total_settled > 0
        UNION ALL SELECT id, 'release', 10, 'task-' || id, created_at + interval '2 minutes' FROM c
                  WHERE total_settled > 0
    """, {"lo": c_lo, "hi": c_hi, "users": users, "agents": a_hi})
    # One auction per ten channels, closed without a winner, with three bids each.
    conn.execute("""
        WITH a AS (
            INSERT INTO auctions (task_id, user_id, auction_type, status, duration_seconds, expires_at,
                                  reserve_price, max_price, created_at, updated_at)
            SELECT 'auction-task-' || i, 'did:bench:user:' || (i %% %(users)s), 'first_price', 'closed', 30,
                   now() - interval '1 day', 0, 50, now() - interval '1 day' - interval '30 seconds',
                   now() - interval '1 day'
            FROM generate_series(%(lo)s / 10 + 1, %(hi)s / 10) i
            RETURNING id, created_at
        )
        INSERT INTO bids (auction_id, agent_did, price, reputation_score, composite_score, created_at)
        SELECT a.id, 'did:bench:agent:' || (1 + (abs(hashtext(a.id::text)) + k) %% %(agents)s), 10 + k, 56, 50 + k,
               a.created_at + k * interval '1 second'
        FROM a, generate_series(1, 3) k
    """, {"lo": c_lo, "hi": c_hi, "users": users, "agents": a_hi})
    conn.execute("VACUUM ANALYZE")


def count(conn: psycopg.Connection, table: str) -> int:
    return conn.execute(f"SELECT count(*) FROM {table}").fetchone()[0]


def db_size(conn: psycopg.Connection) -> str:
    return conn.execute("SELECT pg_size_pretty(pg_database_size(current_database()))").fetchone()[0]


# ---- processes -----------------------------------------------------------------------------
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def get(port: int, path: str = "/metrics", timeout: float = 10) -> tuple[int, bytes]:
    c = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        c.request("GET", path)
        r = c.getresponse()
        return r.status, r.read()
    finally:
        c.close()


def wait_until(predicate, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if predicate():
                return
        except OSError:
            pass
        time.sleep(0.25)
    raise SystemExit(f"bench: {what} not ready within {timeout:g}s")


def stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)


@dataclass
class Figures:
    p50_ms: float
    p99_ms: float
    max_ms: float
    mean_ms: float
    body_bytes: int


def measure(port: int, scrapes: int, spread: float = 0.0, warmup: int = 20, floor: int | None = None
            ) -> Figures | tuple[Figures, Figures]:
    """Scrapes over one keep-alive connection, as Prometheus does; time to the full body.

    With ``spread`` > 0 the scrapes are paced evenly over that many seconds, so they sample
    every phase of the jobs running beside them (back-to-back, 1,000 scrapes last under a
    second and the tail depends on which job happened to run in it). With ``floor`` (the port of
    ``floor_server``), each scrape is followed by one of that bare server, in the same moment:
    (zsmon's figures, the floor's), what the host alone costs any process beside what zsmon adds.
    """
    ports = [port] if floor is None else [port, floor]
    conns = [http.client.HTTPConnection("127.0.0.1", p, timeout=120) for p in ports]
    times: list[list[float]] = [[] for _ in ports]
    sizes = [0 for _ in ports]
    pace = spread / scrapes
    start = 0.0
    for i in range(warmup + scrapes):
        if i == warmup:
            start = time.perf_counter()
        if pace and i >= warmup:
            time.sleep(max(0.0, start + (i - warmup) * pace - time.perf_counter()))
        for k, conn in enumerate(conns):
            t0 = time.perf_counter()
            conn.request("GET", "/metrics")
            r = conn.getresponse()
            body = r.read()
            dt = time.perf_counter() - t0
            if r.status != 200:
                raise SystemExit(f"bench: /metrics answered {r.status}: {body[:200]!r}")
            if i >= warmup:
                times[k].append(dt)
                sizes[k] = len(body)
    for conn in conns:
        conn.close()
    figures = [_figures(t, size) for t, size in zip(times, sizes)]
    return figures[0] if floor is None else (figures[0], figures[1])


def _figures(times: list[float], size: int) -> Figures:
    times = sorted(times)
    pick = lambda q: times[min(len(times) - 1, max(0, round(q * len(times)) - 1))]  # noqa: E731 - nearest rank
    return Figures(pick(0.50) * 1000, pick(0.99) * 1000, times[-1] * 1000, statistics.fmean(times) * 1000, size)


# The floor: a bare HTTP server in a process of its own, serving fixed bytes of /metrics' size and doing
# nothing else. Scraped in the same moments as zsmon, its tail is what the host (CPUs shared with the
# database's sweeps) costs any process; zsmon's tail above it is zsmon's own (its GIL, its work).
_FLOOR_SERVER = """
import sys
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
body = b"#" * int(sys.argv[2])
class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    disable_nagle_algorithm = True
    def do_GET(self):
        self.send_response(200)
        self.send_header("Content-Type", "text/plain")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)
    def log_message(self, *args):
        pass
ThreadingHTTPServer(("127.0.0.1", int(sys.argv[1])), Handler).serve_forever()
"""


def floor_server(size: int) -> tuple[subprocess.Popen, int]:
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-c", _FLOOR_SERVER, str(port), str(size)])
    wait_until(lambda: get(port)[0] == 200, 30, "the floor server")
    return proc, port


# ---- zsmon -----------------------------------------------------------------------------------
def zsmon_config(workdir: Path, dsn: str, metrics_port: int, api_port: int, interval: float,
                 switch_ms: float | None, connections: int | None = None, sums: bool | None = None,
                 front: bool | None = None) -> Path:
    builtin = _builtin()
    exporters: dict[str, Any] = {name: {"interval_seconds": interval} for name in builtin.exporter_classes}
    exporters.setdefault("api_probe", {})["settings"] = {"targets": [f"http://127.0.0.1:{api_port}/health"]}
    cfg = {
        "http": {"metrics_listen": f"127.0.0.1:{metrics_port}", "api_listen": f"127.0.0.1:{api_port}",
                 **({"switch_interval_ms": switch_ms} if switch_ms else {}),
                 **({"metrics_process": front} if front is not None else {})},
        "redis": {"key_prefix": REDIS_PREFIX},
        "logging": {"level": "warning", "format": "console"},
        "exporters": exporters,
        "checkers": {name: {"statement_timeout_seconds": 600} for name in builtin.checker_classes},
    }
    # Every payments run a full sweep (the remembered state cannot replace one here): the scrapes are timed
    # while sweeps run, not between them.
    cfg["checkers"]["payments"]["full_interval_seconds"] = builtin.checker_classes["payments"].default_interval_seconds
    payments: dict[str, Any] = cfg["checkers"]["payments"].setdefault("settings", {})
    if connections:  # the payments full sweep on this many connections (default: the checker's own)
        payments["full_sweep_connections"] = connections
    if sums is not None:  # remembered sums on or off (default: the checker's own)
        payments["incremental_sums"] = sums
    path = workdir / "zsmon.yml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def _builtin() -> Any:
    """The registry of the default config: every built-in checker and exporter, and installed plugins (names only)."""
    from zsmon.app import build_registry
    from zsmon.core.config import Config

    return build_registry(Config())


def _zsmon_ready(port: int) -> bool:
    from prometheus_client.parser import text_string_to_metric_families

    status, body = get(port)
    if status != 200:
        return False
    checkers, collectors = set(), set()
    for family in text_string_to_metric_families(body.decode()):
        for s in family.samples:
            if s.name == "zerostate_invariant_check_up":
                checkers.add(s.labels["checker"])
            elif s.name == "zsmon_exporter_last_success_timestamp_seconds":
                collectors.add(s.labels["exporter"])
    builtin = _builtin()
    return set(builtin.checker_classes) <= checkers and set(builtin.exporter_classes) <= collectors


def collection_costs(port: int) -> str:
    """The latest duration of every collector and checker, from zsmon's own metrics."""
    from prometheus_client.parser import text_string_to_metric_families

    _, body = get(port)
    out = []
    for family in text_string_to_metric_families(body.decode()):
        for s in family.samples:
            if s.name == "zsmon_exporter_duration_seconds":
                out.append(f"collect:{s.labels['exporter']}={s.value * 1000:.0f}ms")
            elif s.name == "zerostate_invariant_check_duration_seconds_sum":
                out.append(f"check:{s.labels['checker']}(sum)={s.value:.2f}s")
    return ", ".join(sorted(out))


def bench_zsmon(workdir: Path, dsn: str, scrapes: int, interval: float, spread: float,
                switch_ms: float | None = None, connections: int | None = None,
                sums: bool | None = None, front: bool | None = None) -> tuple[Figures, Figures, str]:
    """zsmon's figures, the floor's (scraped in the same moments) and zsmon's latest collection costs."""
    mport, aport = free_port(), free_port()
    cfg = zsmon_config(workdir, dsn, mport, aport, interval, switch_ms, connections, sums, front)
    env = {**os.environ, "ZSMON_DATABASE_URL": dsn, "REDIS_HOST": os.environ.get("REDIS_HOST", "127.0.0.1")}
    log = open(workdir / "zsmon.log", "ab")
    proc = subprocess.Popen([ZSMON, "--config", str(cfg), "run"], env=env, stdout=log, stderr=log)
    try:
        wait_until(lambda: _zsmon_ready(mport), 900, "zsmon (every checker and exporter once)")
        floor, fport = floor_server(len(get(mport)[1]))
        try:
            figures, floor_figures = measure(mport, scrapes, spread, floor=fport)
        finally:
            stop(floor)
        return figures, floor_figures, collection_costs(mport)
    finally:
        stop(proc)
        log.close()


# ---- query-exporter ------------------------------------------------------------------------
NUMERIC_OIDS = {20, 21, 23, 26, 700, 701, 1700}  # int8, int2, int4, oid, float4, float8, numeric
BOOL_OID = 16
TEXT_OIDS = {19, 25, 1043}  # name, text, varchar


class _Quiet:
    """A logger that drops everything: recording runs the exporters outside the service."""

    def __getattr__(self, name: str) -> Any:
        return lambda *a, **k: None


def recorded_queries(dsn: str) -> list[tuple[str, str, dict[str, int]]]:
    """(exporter, SQL with parameters bound, {column: type oid}) for every query zsmon's database exporters run."""
    from pydantic import SecretStr

    from zsmon.core.config import DatabaseConfig
    from zsmon.core.db import Database
    from zsmon.core.exporter import CollectContext

    recorded: list[tuple[str, str, dict[str, int]]] = []

    class Recording(CollectContext):
        def query(self, statement: Any, params: Any = None) -> list[dict[str, Any]]:
            rows = super().query(statement, params)
            bound = psycopg.ClientCursor(self.conn).mogrify(statement, params)
            with self.conn.cursor() as cur:
                cur.execute(f"SELECT * FROM ({bound}) AS q LIMIT 0")
                types = {c.name: c.type_code for c in cur.description}
            recorded.append((self.exporter.name, bound, types))
            return rows

    db = Database(DatabaseConfig(url=SecretStr(dsn)))
    db.open()
    try:
        for name, cls in _builtin().exporter_classes.items():
            if not cls.needs_database:
                continue
            exporter = cls()
            with db.snapshot(60) as conn:
                list(exporter.collect(Recording(exporter, conn, None, None, _Quiet())))
    finally:
        db.close()
    return recorded


def query_exporter_config(dsn: str, interval: int | None) -> dict[str, Any]:
    params = conninfo_to_dict(dsn)
    url = f"postgresql+psycopg2://{params.get('user', 'postgres')}@{params.get('host', '127.0.0.1')}:" \
          f"{params.get('port', 5432)}/{params['dbname']}"
    metrics: dict[str, Any] = {}
    queries: dict[str, Any] = {}
    for i, (exporter, statement, types) in enumerate(recorded_queries(dsn)):
        numeric = [k for k, t in types.items() if t in NUMERIC_OIDS or t == BOOL_OID]
        labels = [k for k, t in types.items() if t in TEXT_OIDS]
        if not numeric:
            continue
        names = {k: re.sub(r"\W", "_", f"qe_{exporter}_{i}_{k}") for k in numeric}
        for k, metric in names.items():
            metrics[metric] = {"type": "gauge", "description": f"{exporter} query {i}: {k}",
                               **({"labels": labels} if labels else {})}
        values = [f'coalesce(q."{k}"::int, 0)::float8 AS {names[k]}' if types[k] == BOOL_OID
                  else f'coalesce(q."{k}"::float8, 0) AS {names[k]}' for k in numeric]
        select = ", ".join(values + [f'coalesce(q."{k}"::text, \'\') AS "{k}"' for k in labels])
        queries[f"{exporter}_{i}"] = {
            "databases": ["bench"], "metrics": list(names.values()),
            "sql": f"SELECT {select} FROM (\n{statement.strip()}\n) AS q",
            **({"interval": interval} if interval else {}),
        }
    return {"databases": {"bench": {"dsn": url}}, "metrics": metrics, "queries": queries}


def install_query_exporter(venv: Path) -> Path:
    exe = venv / "bin" / "query-exporter"
    if not exe.exists():
        print(f"bench: installing query-exporter into {venv} ...", flush=True)
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
        proc = subprocess.run([str(venv / "bin" / "pip"), "install", "-q", "query-exporter", "psycopg2-binary"],
                              capture_output=True, text=True)
        if proc.returncode:
            raise OSError(f"pip install query-exporter failed: {proc.stderr.strip().splitlines()[-1:]}")
    return exe


def bench_query_exporter(exe: Path, workdir: Path, dsn: str, scrapes: int, interval: int | None,
                         spread: float) -> Figures:
    cfg = query_exporter_config(dsn, interval)
    path = workdir / f"query-exporter-{interval or 'scrape'}.yml"
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    port = free_port()
    log = open(workdir / "query-exporter.log", "ab")
    proc = subprocess.Popen([str(exe), "--config", str(path), "-H", "127.0.0.1", "-p", str(port), "-L", "warning"],
                            stdout=log, stderr=log)
    first_metric = next(iter(cfg["metrics"]))
    try:
        wait_until(lambda: first_metric.encode() + b"{" in get(port, timeout=120)[1]
                   or (first_metric.encode() + b" ") in get(port, timeout=120)[1], 120, "query-exporter")
        return measure(port, scrapes, spread)
    finally:
        stop(proc)
        log.close()


def drop_redis_keys() -> None:
    import redis

    try:
        client = redis.Redis(host=os.environ.get("REDIS_HOST", "127.0.0.1"), socket_timeout=5)
        keys = list(client.scan_iter(match=REDIS_PREFIX + "*", count=1000))
        if keys:
            client.delete(*keys)
        client.close()
    except redis.RedisError:
        pass


# ---- main ----------------------------------------------------------------------------------
def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--small-channels", type=int, default=10_000)
    ap.add_argument("--small-agents", type=int, default=100)
    ap.add_argument("--large-channels", type=int, default=1_000_000)
    ap.add_argument("--large-agents", type=int, default=10_000)
    ap.add_argument("--scrapes", type=int, default=1000)
    ap.add_argument("--spread", type=float, default=60.0,
                    help="seconds over which the scrapes are paced evenly (0: back to back)")
    ap.add_argument("--interval", type=float, default=1.0,
                    help="collection interval of every exporter, zsmon's and query-exporter's (s); short, so "
                         "collections overlap the scrapes")
    ap.add_argument("--switch-interval-ms", type=float, action="append", default=None,
                    help="run zsmon once per value of http.switch_interval_ms (repeatable; default: the "
                         "shipped setting only)")
    ap.add_argument("--full-sweep-connections", type=int, action="append", default=None,
                    help="payments full sweep on this many connections (repeatable: one zsmon run each)")
    ap.add_argument("--incremental-sums", choices=["on", "off"], action="append", default=None,
                    help="payments remembered sums on or off (repeatable: one zsmon run each; default: the "
                         "shipped setting)")
    ap.add_argument("--metrics-process", choices=["on", "off"], action="append", default=None,
                    help="/metrics served by its own process or by the service's (repeatable: one zsmon run "
                         "each; default: zsmon's own, on)")
    ap.add_argument("--reuse", metavar="DBNAME",
                    help="measure an existing benchmark database (kept with --keep-db) as the large size, "
                         "without building or growing it")
    ap.add_argument("--no-query-exporter", action="store_true")
    ap.add_argument("--qe-venv", type=Path, default=Path(tempfile.gettempdir()) / "zsmon-bench-query-exporter")
    ap.add_argument("--keep-db", action="store_true", help="do not drop the benchmark database")
    args = ap.parse_args()

    workdir = Path(tempfile.mkdtemp(prefix="zsmon-bench-"))
    exe = None
    if not args.no_query_exporter:
        try:
            exe = install_query_exporter(args.qe_venv)
        except (subprocess.CalledProcessError, OSError) as exc:
            print(f"bench: query-exporter could not be installed ({exc}); measuring zsmon only")
    if args.reuse:
        name, dsn = args.reuse, make_conninfo(**{**conninfo_to_dict(ADMIN_DSN), "dbname": args.reuse})
    else:
        name, dsn = create_platform_database("zsmon_bench", ADMIN_DSN)
    rows: list[tuple[str, str, str, Figures]] = []
    notes: list[str] = []
    try:
        with psycopg.connect(dsn, autocommit=True) as conn:
            sizes = [("small", args.small_channels, args.small_agents),
                     ("large", args.large_channels, args.large_agents)]
            if args.reuse:
                sizes = [("large", count(conn, "payment_channels"), count(conn, "agents"))]
            have = (0, 0)
            for label, channels, agents in sizes:
                t0 = time.perf_counter()
                if not args.reuse:
                    grow(conn, (have[0], channels), (have[1], agents), users=max(100, channels // 10))
                have = (channels, agents)
                size = db_size(conn)
                where = f"{channels:,} channels, {agents:,} agents, {size}"
                print(f"bench: {label} database ready ({where}) in {time.perf_counter() - t0:.1f}s", flush=True)
                for switch_ms, conns, sums, front in [(s, c, u, f) for s in args.switch_interval_ms or [None]
                                                      for c in args.full_sweep_connections or [None]
                                                      for u in args.incremental_sums or [None]
                                                      for f in args.metrics_process or [None]]:
                    tool = "zsmon" + (f" (switch interval {switch_ms:g} ms)" if switch_ms else "") + (
                        f" (full sweep on {conns} connection{'s' if conns > 1 else ''})" if conns else "") + (
                        f" (sums {sums})" if sums else "") + (f" (metrics process {front})" if front else "")
                    fig, floor, costs = bench_zsmon(workdir, dsn, args.scrapes, args.interval, args.spread,
                                                    switch_ms, conns, None if sums is None else sums == "on",
                                                    None if front is None else front == "on")
                    rows.append((label, where, tool, fig))
                    rows.append((label, where, "  floor (bare server, same moments)", floor))
                    notes.append(f"{label}: {tool} latest collection costs: {costs}")
                    print(f"bench:   {tool} p50 {fig.p50_ms:.2f} ms, p99 {fig.p99_ms:.2f} ms; floor p50 "
                          f"{floor.p50_ms:.2f} ms, p99 {floor.p99_ms:.2f} ms "
                          f"(load average {os.getloadavg()[0]:.2f} on {os.cpu_count()} CPUs)", flush=True)
                if exe is not None:
                    for interval, tool in ((None, "query-exporter (queries on scrape)"),
                                           (max(1, round(args.interval)),
                                            f"query-exporter (interval {max(1, round(args.interval))}s)")):
                        try:
                            fig = bench_query_exporter(exe, workdir, dsn, args.scrapes, interval, args.spread)
                        except SystemExit as exc:
                            notes.append(f"{label}: {tool} failed: {exc} (log: {workdir / 'query-exporter.log'})")
                            continue
                        rows.append((label, where, tool, fig))
                        print(f"bench:   {tool} p50 {fig.p50_ms:.2f} ms, p99 {fig.p99_ms:.2f} ms "
                              f"(load average {os.getloadavg()[0]:.2f})", flush=True)
    finally:
        drop_redis_keys()
        if not args.keep_db and not args.reuse:
            drop_database(name, ADMIN_DSN)
        elif not args.reuse:
            print(f"bench: database kept: {name} (--reuse {name})")

    print()
    paced = f"paced over {args.spread:g}s" if args.spread else "back-to-back"
    print(f"/metrics latency over {args.scrapes} scrapes {paced} (keep-alive, time to full body); "
          f"collections every {args.interval:g}s; {os.cpu_count()} CPUs")
    print(f"{'size':<6} {'tool':<50} {'p50 ms':>8} {'p99 ms':>8} {'max ms':>8} {'mean ms':>8} {'bytes':>8}")
    for label, where, tool, f in rows:
        print(f"{label:<6} {tool:<50} {f.p50_ms:>8.2f} {f.p99_ms:>8.2f} {f.max_ms:>8.2f} {f.mean_ms:>8.2f} "
              f"{f.body_bytes:>8}")
    print()
    for label, where in dict((r[0], r[1]) for r in rows).items():
        print(f"{label}: {where}")
    for note in notes:
        print(note)
    print(f"logs: {workdir}")


if __name__ == "__main__":
    main()
