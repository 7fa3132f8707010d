"""Benchmark of the auctions checker and exporter on a large synthetic market (prints figures, never fails).

    .venv/bin/python bench/bench_auctions.py [AUCTIONS]   # default 200000 auctions, ~5 bids each

Builds a throwaway database on ZSMON_TEST_DSN (default postgresql://postgres@127.0.0.1:5432/postgres)
with set-based INSERTs, then times a full sweep, an incremental run after 100 new bids, and one
exporter collection. The database is dropped at the end.
"""
from __future__ import annotations

import sys
import time
import uuid

import psycopg

from zsmon.app import build_registry
from zsmon.core.config import load_config
from zsmon.core.service import build_runner
from zsmon.testing import create_platform_database, drop_database


POPULATE = """
INSERT INTO auctions (id, task_id, user_id, auction_type, status, duration_seconds, expires_at, reserve_price,
                      max_price, min_reputation, created_at, updated_at)
SELECT gen_random_uuid(), 't' || g, 'did:u:' || (g % 1000),
       (ARRAY['first_price','second_price','reserve'])[1 + g % 3], 'open', 60,
       now() - make_interval(secs => g * 0.05) + interval '60 seconds', 0, 200, 0,
       now() - make_interval(secs => g * 0.05), now() - make_interval(secs => g * 0.05)
FROM generate_series(1, {n}) g;
INSERT INTO bids (auction_id, agent_did, price, reputation_score, composite_score, created_at)
SELECT a.id, 'did:a:' || k, 20 + k * 10, 50, 50 + k, a.created_at + make_interval(secs => k)
FROM auctions a CROSS JOIN generate_series(1, 5) k ORDER BY a.created_at DESC, k;
-- Close by the rules (highest composite wins: k = 5, price 70; second price: k = 4, 60).
UPDATE auctions a SET status = 'awarded', winning_bid_id = b.id,
       final_price = CASE a.auction_type WHEN 'second_price' THEN 60 ELSE 70 END,
       updated_at = a.expires_at
FROM bids b WHERE b.auction_id = a.id AND b.composite_score = 55 AND a.expires_at < now();
INSERT INTO payment_channels (payer_did, payee_did, auction_id, total_deposit, current_balance, state, created_at)
SELECT a.user_id, 'did:a:5', a.id::text, a.final_price, a.final_price, 'open', a.updated_at
FROM auctions a WHERE a.status = 'awarded';
ANALYZE;
"""


def main() -> None:
    n = int(sys.argv[1]) if len(sys.argv) > 1 else 200_000
    name, url = create_platform_database("zsmon_bench_auctions")
    try:
        with psycopg.connect(url, autocommit=True) as conn:
            t = time.perf_counter()
            conn.execute(POPULATE.replace("{n}", str(n)).encode())
            counts = conn.execute("SELECT (SELECT count(*) FROM auctions), (SELECT count(*) FROM bids)").fetchone()
            print(f"populated {counts[0]} auctions, {counts[1]} bids in {time.perf_counter() - t:.1f} s")
        config = load_config(None, env={"ZSMON_DATABASE_URL": url, "REDIS_HOST": "127.0.0.1"})
        config.redis.key_prefix = f"zsmon-bench-{uuid.uuid4().hex[:6]}:"
        registry = build_registry(config)
        runner = build_runner(registry, only=["auctions"], exporters=registry.enabled_exporters())
        try:
            for mode in ("full", "full"):
                r = runner.run_check("auctions", mode=mode)
                print(f"{r.mode:<12} {r.duration_seconds:7.3f} s  status={r.status} violations={r.total_violations}")
            with psycopg.connect(url, autocommit=True) as conn:
                conn.execute("INSERT INTO bids (auction_id, agent_did, price, composite_score) "
                             "SELECT id, 'did:a:new', 10, 1 FROM auctions WHERE status = 'open' LIMIT 100")
            r = runner.run_check("auctions", mode="incremental")
            print(f"{r.mode:<12} {r.duration_seconds:7.3f} s  status={r.status} violations={r.total_violations} "
                  f"(after 100 new bids)")
            t = time.perf_counter()
            runner.collect("auctions")
            print(f"exporter     {time.perf_counter() - t:7.3f} s")
        finally:
            runner.db.close()
            if runner.redis is not None:
                for k in runner.redis.scan_iter(match=config.redis.key_prefix + "*"):
                    runner.redis.delete(k)
    finally:
        drop_database(name)


if __name__ == "__main__":
    main()
