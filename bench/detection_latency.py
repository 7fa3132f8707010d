"""Detection latency: from the commit that breaks money to the page, with the shipped default intervals.

Each run starts a fresh stack: the sidecar (every interval at its default) on a fresh
database of the local PostgreSQL, ``zsmon render`` output with the default
``render.*`` settings (10 s scrape and evaluation, 5 s pager group_wait) and no test
speed-ups, Debian's prometheus and prometheus-alertmanager on 127.0.0.1, and a webhook
receiver. Once Prometheus has scraped a clean payments run, the benchmark waits a
random 0-20 s (so the commit lands at a random phase of the checker, scrape and
evaluation cycles), commits a conservation fault on one channel, and times:

    commit -> the sidecar's result shows it -> Prometheus fires a critical payments alert
    (BalanceInvariantViolation or the per-invariant one, whichever first) -> the pager webhook

Prints every run, then the median and the maximum of commit -> webhook. Target: <= 45 s.
Not a test: it never fails on timing.

    .venv/bin/python bench/detection_latency.py [--runs 5] [--seed 1]
"""
from __future__ import annotations

import argparse
import os
import random
import statistics
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path

import psycopg
import requests
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from zsmon.testing import REDIS_URL, create_platform_database, drop_database, running_service  # noqa: E402
from zsmon.testing_stack import (FakePlatform, PrometheusStack, WebhookReceiver, free_port,  # noqa: E402
                                 plant_money_from_nowhere, stack_render_settings)

TARGET_SECONDS = 45.0


def _world(url: str, seed: int) -> str:
    """A consistent payment world made by the simulator; returns a channel that only we will move."""
    from zsmon.demo.simulator.payments import PaymentSimulator

    with psycopg.connect(url, autocommit=True) as conn:
        PaymentSimulator(conn, seed=seed).run(300)
        sim = PaymentSimulator(conn, seed=seed + 1, prefix="did:bench")
        sim.deposit("did:bench:payer", 100)
        channel = sim.open_channel("did:bench:payer", "did:bench:agent", 40)
        assert channel is not None
        return channel


def one_run(url: str, channel: str, rng: random.Random, tmp: Path, redis_prefix: str) -> dict[str, float]:
    from zsmon.alerts.render import render_all
    from zsmon.app import build_registry
    from zsmon.core.config import load_config

    platform, receiver = FakePlatform(), WebhookReceiver()
    metrics_port, am_port = free_port(), free_port()
    render = stack_render_settings(f"127.0.0.1:{metrics_port}", platform, receiver, am_port)
    for shipped in ("scrape_interval_seconds", "evaluation_interval_seconds", "pager_group_wait_seconds"):
        render.pop(shipped)  # the defaults, as shipped
    data = {"http": {"metrics_listen": f"127.0.0.1:{metrics_port}", "api_listen": "127.0.0.1:0"},
            "redis": {"key_prefix": redis_prefix}, "logging": {"level": "warning"}, "render": render,
            "exporters": {"api_probe": {"settings": {"targets": [f"http://{platform.api.address}/health"]}}}}
    path = tmp / f"zsmon-{uuid.uuid4().hex[:6]}.yml"
    path.write_text(yaml.safe_dump(data))
    kw = __import__("redis").Redis.from_url(REDIS_URL).connection_pool.connection_kwargs
    config = load_config(path, env={"ZSMON_DATABASE_URL": url, "REDIS_HOST": str(kw.get("host", "127.0.0.1")),
                                    "REDIS_PORT": str(kw.get("port", 6379))})
    out = tmp / f"rendered-{uuid.uuid4().hex[:6]}"
    render_all(build_registry(config), out)
    try:
        with running_service(config) as svc, PrometheusStack(out, alertmanager_port=am_port) as prom:
            prom.wait_targets_up({"zsmon"}, timeout=60)
            prom.wait(lambda: prom.query('zerostate_invariant_violations{checker="payments",'
                                         'invariant="channel_conservation"} == 0'), 180, "a clean payments run")
            time.sleep(rng.uniform(0, 20))
            seen: dict[str, float] = {}
            halt = threading.Event()

            def watch() -> None:  # when the sidecar and Prometheus first show it
                while not halt.is_set():
                    now = time.monotonic()
                    if "sidecar" not in seen and any(
                            r.checker == "payments" and r.violation_counts.get("channel_conservation")
                            for r in svc.service.latest_results()):
                        seen["sidecar"] = now
                    if "prometheus" not in seen:
                        try:
                            alerts = requests.get(f"{prom.prometheus}/api/v1/alerts", timeout=2).json()
                            if any(a["labels"].get("checker") == "payments" and a["labels"].get("severity")
                                   == "critical" and a["state"] == "firing" for a in alerts["data"]["alerts"]):
                                seen["prometheus"] = now
                        except requests.RequestException:
                            pass
                    halt.wait(0.1)

            watcher = threading.Thread(target=watch, daemon=True)
            committed = plant_money_from_nowhere(url, channel, 5)
            watcher.start()
            try:
                # BalanceInvariantViolation and the per-invariant alert share one page group per
                # checker: whichever fires first pages, the other joins the group later.
                paged, _ = receiver.wait_for(None, "firing", path="/pager", timeout=240, since=committed,
                                             match=lambda a: a["labels"].get("checker") == "payments")
            finally:
                halt.set()
                watcher.join(5)
                plant_money_from_nowhere(url, channel, -5)
            return {"sidecar": seen.get("sidecar", float("nan")) - committed,
                    "prometheus": seen.get("prometheus", float("nan")) - committed,
                    "webhook": paged - committed}
    finally:
        receiver.stop()
        platform.stop()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--seed", type=int, default=1)
    args = parser.parse_args()
    from zsmon.app import build_registry
    from zsmon.core.config import Config
    from zsmon.core.logging import configure_logging

    configure_logging("error")
    classes = build_registry(Config()).checker_classes
    if "payments" not in classes:
        print("the payments checker is not in this build: nothing to measure")
        return 2
    render = Config().render
    print(f"shipped defaults: payments checker every {classes['payments'].default_interval_seconds:g}s, "
          f"scrape {render.scrape_interval_seconds}s, evaluation {render.evaluation_interval_seconds}s, "
          f"pager group_wait {render.pager_group_wait_seconds}s, "
          f"BalanceInvariantViolation for {render.critical_invariant_for_seconds}s")
    rng = random.Random(args.seed)
    name, url = create_platform_database("zsmon_bench_latency")
    prefix = f"zsmon-bench-latency-{uuid.uuid4().hex[:8]}:"
    results = []
    try:
        channel = _world(url, args.seed)
        with tempfile.TemporaryDirectory(prefix="zsmon-bench-latency-") as tmp:
            for i in range(args.runs):
                r = one_run(url, channel, rng, Path(tmp), prefix)
                results.append(r)
                print(f"run {i + 1}: commit -> sidecar {r['sidecar']:5.1f}s -> Prometheus firing "
                      f"{r['prometheus']:5.1f}s -> webhook {r['webhook']:5.1f}s", flush=True)
    finally:
        drop_database(name)
        try:
            import redis

            client = redis.Redis.from_url(REDIS_URL)
            keys = list(client.scan_iter(match=prefix + "*"))
            if keys:
                client.delete(*keys)
        except Exception:
            pass
    hooks = [r["webhook"] for r in results]
    print(f"commit -> webhook over {len(hooks)} runs: median {statistics.median(hooks):.1f}s, "
          f"max {max(hooks):.1f}s (target <= {TARGET_SECONDS:g}s: "
          f"{'met' if max(hooks) <= TARGET_SECONDS else 'NOT met'})")
    return 0


if __name__ == "__main__":
    os.environ.setdefault("LOG_LEVEL", "error")
    sys.exit(main())
