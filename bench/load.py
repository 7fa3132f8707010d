"""Benchmark: zsmon's HTTP under concurrent clients while checks run, and its memory over a soak.

    .venv/bin/python bench/load.py                          # load: 16 clients for 30 s, then a 10-min soak
    .venv/bin/python bench/load.py --clients 32 --seconds 60 --no-soak
    .venv/bin/python bench/load.py --no-load --minutes 3    # a short soak only

Load
  Creates its own database on the local PostgreSQL (dropped at the end) with the
  platform schema and ``--channels`` channels (plus agents, reputation, auctions:
  ``bench/scrape.py``'s consistent generator), starts ``zsmon run`` as a subprocess
  with every checker and exporter on a short interval (``--check-interval``), and
  drives ``/metrics`` (metrics listener) and ``/api/v1/checks`` (API, with the token)
  from ``--clients`` threads, each on its own keep-alive connection, for
  ``--seconds``. Prints throughput, p50/p99/max per endpoint, errors, and how many
  check runs completed during the window (the scrapes overlap real runs).

Soak
  Keeps the same sidecar running for ``--minutes`` while a writer grows the database
  (``--grow-channels`` more channels and their agents, ledger and auctions every
  ``--grow-every`` seconds) and a Prometheus-like client scrapes every second. Records
  the sidecar's RSS (``/proc/PID/status``) and the database size every
  ``--sample-every`` seconds; prints the series, first/last/max RSS and the RSS slope
  over the second half (after warm-up) in MiB per hour.

Figures are printed, never asserted: this is a benchmark, not a test.
"""
from __future__ import annotations

import argparse
import http.client
import os
import re
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path

import psycopg
import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from scrape import grow  # noqa: E402  (the consistent set-based data generator)

from zsmon.testing import create_platform_database, drop_database, free_port  # noqa: E402

TOKEN = "bench-load-token"


# ---- the database and the sidecar ------------------------------------------------------------
def start_zsmon(workdir: Path, dsn: str, interval: float, prefix: str) -> tuple[subprocess.Popen, int, int]:
    from zsmon.app import build_registry
    from zsmon.core.config import Config

    builtin = build_registry(Config())  # names only: every built-in checker and exporter, and installed plugins
    mport, aport = free_port(), free_port()
    cfg = workdir / "zsmon.yml"
    cfg.write_text(yaml.safe_dump({
        "redis": {"key_prefix": prefix},
        "http": {"metrics_listen": f"127.0.0.1:{mport}", "api_listen": f"127.0.0.1:{aport}", "admin_token": TOKEN},
        "checkers": {n: {"interval_seconds": interval} for n in builtin.checker_classes},
        "exporters": {n: {"interval_seconds": interval, "enabled": n != "api_probe"}
                      for n in builtin.exporter_classes},
    }))
    env = {**os.environ, "ZSMON_DATABASE_URL": dsn, "LOG_FORMAT": "json", "LOG_LEVEL": "warning"}
    log = open(workdir / "zsmon.log", "w")
    proc = subprocess.Popen([sys.executable, "-m", "zsmon.cli", "--config", str(cfg), "run"], env=env,
                            stdout=log, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"zsmon exited (rc {proc.returncode}); see {workdir / 'zsmon.log'}")
        try:
            status, body = get(aport, "/api/v1/checks", auth=True)
            if status == 200 and body.count(b'"checker"') >= len(builtin.checker_classes):
                return proc, mport, aport
        except OSError:
            pass
        time.sleep(0.5)
    raise SystemExit("zsmon did not produce a result for every checker within 120 s")


def get(port: int, path: str, auth: bool = False, conn: http.client.HTTPConnection | None = None,
        timeout: float = 30) -> tuple[int, bytes]:
    own = conn is None
    conn = conn or http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        conn.request("GET", path, headers={"Authorization": f"Bearer {TOKEN}"} if auth else {})
        response = conn.getresponse()
        return response.status, response.read()
    finally:
        if own:
            conn.close()


def rss_mib(pid: int) -> float:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def runs_total(mport: int) -> float:
    _, body = get(mport, "/metrics")
    return sum(float(m.group(1)) for m in re.finditer(
        rb'^zerostate_invariant_check_runs_total\{[^}]*\} ([0-9.e+]+)$', body, re.M))


def pct(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    values = sorted(values)
    return values[min(len(values) - 1, int(round(q * (len(values) - 1))))]


# ---- load -----------------------------------------------------------------------------------
def load(mport: int, aport: int, clients: int, seconds: float) -> None:
    targets = {"/metrics": (mport, False), "/api/v1/checks": (aport, True)}
    latencies: dict[str, list[float]] = {p: [] for p in targets}
    errors: dict[str, int] = {p: 0 for p in targets}
    sizes: dict[str, int] = {p: 0 for p in targets}
    lock = threading.Lock()
    stop = time.monotonic() + seconds

    def client(i: int) -> None:
        conns = {p: http.client.HTTPConnection("127.0.0.1", port, timeout=30) for p, (port, _) in targets.items()}
        paths = list(targets)
        n = i
        mine: dict[str, list[float]] = {p: [] for p in targets}
        bad: dict[str, int] = {p: 0 for p in targets}
        while time.monotonic() < stop:
            path = paths[n % 2]
            n += 1
            port, auth = targets[path]
            t0 = time.perf_counter()
            try:
                status, body = get(port, path, auth=auth, conn=conns[path])
                ok = status == 200
            except (OSError, http.client.HTTPException):
                ok = False
                conns[path] = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
            mine[path].append(time.perf_counter() - t0)
            if not ok:
                bad[path] += 1
            else:
                sizes[path] = len(body)
        with lock:
            for p in targets:
                latencies[p].extend(mine[p])
                errors[p] += bad[p]

    runs_before = runs_total(mport)
    threads = [threading.Thread(target=client, args=(i,)) for i in range(clients)]
    t0 = time.monotonic()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    elapsed = time.monotonic() - t0
    runs = runs_total(mport) - runs_before
    print(f"\nload: {clients} concurrent clients for {elapsed:.1f} s (keep-alive; each alternates the two endpoints);"
          f" {runs:.0f} check runs completed meanwhile")
    print(f"{'endpoint':<18} {'requests':>9} {'req/s':>8} {'p50 ms':>8} {'p99 ms':>8} {'max ms':>8} {'errors':>7}"
          f" {'body KiB':>9}")
    total = 0
    for p in targets:
        lat = latencies[p]
        total += len(lat)
        print(f"{p:<18} {len(lat):>9} {len(lat) / elapsed:>8.0f} {pct(lat, .5) * 1000:>8.1f} "
              f"{pct(lat, .99) * 1000:>8.1f} {max(lat, default=0) * 1000:>8.1f} {errors[p]:>7} {sizes[p] / 1024:>9.1f}")
    print(f"{'both':<18} {total:>9} {total / elapsed:>8.0f}")


# ---- soak -----------------------------------------------------------------------------------
def soak(proc: subprocess.Popen, mport: int, aport: int, dsn: str, minutes: float, sample_every: float,
         grow_every: float, grow_channels: int, start: tuple[int, int]) -> None:
    stop = threading.Event()
    channels, agents = start
    grown = {"channels": channels}
    scrape_errors = [0]

    def writer() -> None:
        nonlocal channels, agents
        with psycopg.connect(dsn, autocommit=True) as conn:
            while not stop.wait(grow_every):
                new_agents = agents + max(1, grow_channels // 20)
                grow(conn, (channels, channels + grow_channels), (agents, new_agents), users=1000)
                channels, agents = channels + grow_channels, new_agents
                grown["channels"] = channels

    def scraper() -> None:  # Prometheus-like: both endpoints every second
        while not stop.wait(1.0):
            for port, path, auth in ((mport, "/metrics", False), (aport, "/api/v1/checks", True)):
                try:
                    status, _ = get(port, path, auth=auth)
                    scrape_errors[0] += status != 200
                except OSError:
                    scrape_errors[0] += 1

    threads = [threading.Thread(target=writer, daemon=True), threading.Thread(target=scraper, daemon=True)]
    for t in threads:
        t.start()
    samples: list[tuple[float, float, int, int, float]] = []
    t0 = time.monotonic()
    print(f"\nsoak: {minutes:g} min, database growing by {grow_channels} channels every {grow_every:g} s;"
          f" RSS sampled every {sample_every:g} s")
    print(f"{'t (s)':>7} {'RSS MiB':>8} {'channels':>9} {'db MiB':>7} {'runs':>6}")
    with psycopg.connect(dsn, autocommit=True) as conn:
        while True:
            now = time.monotonic() - t0
            size = conn.execute("SELECT pg_database_size(current_database())").fetchone()[0] / 2**20
            sample = (now, rss_mib(proc.pid), grown["channels"], int(size), runs_total(mport))
            samples.append(sample)
            print(f"{sample[0]:>7.0f} {sample[1]:>8.1f} {sample[2]:>9} {sample[3]:>7} {sample[4]:>6.0f}", flush=True)
            if now >= minutes * 60 or proc.poll() is not None:
                break
            time.sleep(max(0.0, sample_every - (time.monotonic() - t0 - now)))
    stop.set()
    for t in threads:
        t.join(30)
    rss = [s[1] for s in samples]
    half = samples[len(samples) // 2:]
    slope = float("nan")
    if len(half) >= 3:
        xs, ys = [s[0] / 3600 for s in half], [s[1] for s in half]
        mx, my = statistics.fmean(xs), statistics.fmean(ys)
        slope = sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sum((x - mx) ** 2 for x in xs)
    print(f"soak result: RSS first {rss[0]:.1f} MiB, last {rss[-1]:.1f} MiB, max {max(rss):.1f} MiB; "
          f"slope over the second half {slope:+.1f} MiB/h; database {samples[0][3]} -> {samples[-1][3]} MiB "
          f"({samples[0][2]} -> {samples[-1][2]} channels); {samples[-1][4] - samples[0][4]:.0f} check runs; "
          f"scrape errors {scrape_errors[0]}; zsmon {'alive' if proc.poll() is None else 'EXITED'}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--admin-dsn", default=os.environ.get("ZSMON_TEST_DSN",
                                                           "postgresql://postgres@127.0.0.1:5432/postgres"))
    ap.add_argument("--channels", type=int, default=100_000, help="channels in the database at start")
    ap.add_argument("--agents", type=int, default=5_000)
    ap.add_argument("--check-interval", type=float, default=5.0, help="interval of every checker and exporter")
    ap.add_argument("--clients", type=int, default=16)
    ap.add_argument("--seconds", type=float, default=30.0)
    ap.add_argument("--minutes", type=float, default=10.0, help="soak length")
    ap.add_argument("--sample-every", type=float, default=15.0)
    ap.add_argument("--grow-every", type=float, default=5.0)
    ap.add_argument("--grow-channels", type=int, default=2_000)
    ap.add_argument("--no-load", action="store_true")
    ap.add_argument("--no-soak", action="store_true")
    args = ap.parse_args()

    name, dsn = create_platform_database("zsmon_load", args.admin_dsn)
    workdir = Path(tempfile.mkdtemp(prefix="zsmon-load-"))
    proc = None
    prefix = f"zsmon-bench-load-{uuid.uuid4().hex[:6]}:"
    try:
        t0 = time.monotonic()
        with psycopg.connect(dsn, autocommit=True) as conn:
            grow(conn, (0, args.channels), (0, args.agents), users=1000)
            size = conn.execute("SELECT pg_size_pretty(pg_database_size(current_database()))").fetchone()[0]
        print(f"database: {args.channels} channels, {args.agents} agents, {size} (filled in "
              f"{time.monotonic() - t0:.1f} s)")
        proc, mport, aport = start_zsmon(workdir, dsn, args.check_interval, prefix)
        print(f"zsmon pid {proc.pid}: every checker and exporter every {args.check_interval:g} s; "
              f"RSS {rss_mib(proc.pid):.1f} MiB after the first runs")
        if not args.no_load:
            load(mport, aport, args.clients, args.seconds)
            print(f"RSS after the load: {rss_mib(proc.pid):.1f} MiB")
        if not args.no_soak:
            soak(proc, mport, aport, dsn, args.minutes, args.sample_every, args.grow_every, args.grow_channels,
                 (args.channels, args.agents))
    finally:
        if proc is not None and proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(20)
            except subprocess.TimeoutExpired:
                proc.kill()
        drop_database(name, args.admin_dsn)
        try:
            import redis

            client = redis.Redis()
            keys = list(client.scan_iter(match=prefix + "*"))
            if keys:
                client.delete(*keys)
        except Exception:
            pass
        print(f"(zsmon's log: {workdir / 'zsmon.log'})")


if __name__ == "__main__":
    main()
