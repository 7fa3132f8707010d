"""Benchmark of the ``payments`` checker on a large, consistent world.

Builds (set-based, ``INSERT ... SELECT generate_series``) a world of N channels
(default 1,000,000) with 10 ledger rows each (default 10,000,000) in a database
of its own, created here and dropped at the end, then prints:

- the full check's seconds (the whole checker run, sequence memory included) for each
  ``--connections`` count (the channel, double-release and account passes split over that many
  connections sharing one snapshot; the results are asserted identical),
- the seconds of a bare ``SELECT channel_id, sum(amount) FROM channel_transactions
  GROUP BY channel_id`` over the same ledger, and the ratio of the two,
- the seconds of an incremental run after 10,000 new ledger rows (5,000 tasks
  escrowed and released on 5,000 random channels, applied as the platform does),
- the peak RSS of this (the checker's) process.

Targets: full <= 1.5 x bare scan, incremental <= 2 % of full, RSS <= 150 MB, full with 2
connections <= 0.65 x full with 1.
Not a test: it prints figures and never fails on timing.

    .venv/bin/python bench/payments.py                 # 1M channels, 10M ledger rows
    .venv/bin/python bench/payments.py --channels 100000
    .venv/bin/python bench/payments.py --channels 5000000 --build-only   # build, keep, time nothing
    .venv/bin/python bench/payments.py --reuse DBNAME --connections 1,2,4 --no-bare

The world: users (payers, one per 10 channels) and agents (payees, one per 20
channels). Each channel got a deposit and four escrows, each released (3 of 4
tasks succeed) or refunded; then even channels were closed and odd ones hold a
fifth, active escrow. Accounts are derived so that every invariant holds.
"""
from __future__ import annotations

import argparse
import os
import resource
import statistics
import sys
import time
import uuid
from pathlib import Path

import psycopg
from psycopg.conninfo import conninfo_to_dict, make_conninfo

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from zsmon.demo import schema_sql  # noqa: E402
from zsmon.testing import create_platform_database, drop_database  # noqa: E402

ADMIN_DSN = os.environ.get("ZSMON_BENCH_DSN", "postgresql://postgres@127.0.0.1:5432/postgres")

# Deterministic amounts of channel c: deposit, and escrow i (1..5); task i succeeds unless (c + i) % 4 = 0.
_FUNCTIONS = """
CREATE FUNCTION pg_temp.dep(c bigint) RETURNS numeric LANGUAGE sql IMMUTABLE
    AS $$ SELECT (100 + c % 97)::numeric + 0.5 $$;
CREATE FUNCTION pg_temp.amt(c bigint, i int) RETURNS numeric LANGUAGE sql IMMUTABLE
    AS $$ SELECT (1 + (c * 31 + i * 17) % 13)::numeric + 0.12345678 $$;
CREATE FUNCTION pg_temp.ok(c bigint, i int) RETURNS boolean LANGUAGE sql IMMUTABLE
    AS $$ SELECT (c + i) % 4 <> 0 $$;
CREATE FUNCTION pg_temp.cid(c bigint) RETURNS uuid LANGUAGE sql IMMUTABLE
    AS $$ SELECT md5('channel' || c)::uuid $$;
"""

_CHANNELS = """
INSERT INTO payment_channels (id, payer_did, payee_did, auction_id, total_deposit, current_balance,
    escrowed_amount, total_settled, pending_refund, state, task_id, escrow_released, sequence_number,
    created_at, updated_at, closed_at)
SELECT pg_temp.cid(c), 'did:bench:user:' || (c %% %(users)s), 'did:bench:agent:' || ((c * 7919) %% %(agents)s),
       'auction-' || c, d,
       CASE WHEN c %% 2 = 0 THEN 0 ELSE d - esc4 + ref4 - a5 END,
       CASE WHEN c %% 2 = 0 THEN 0 ELSE a5 END,
       rel4,
       CASE WHEN c %% 2 = 0 THEN d - esc4 + ref4 ELSE 0 END,
       CASE WHEN c %% 2 = 0 THEN 'closed' ELSE 'escrowed' END,
       CASE WHEN c %% 2 = 0 THEN NULL ELSE 'task-' || c || '-5' END,
       c %% 2 = 0,
       CASE WHEN c %% 2 = 0 THEN 8 ELSE 9 END,
       %(base)s::timestamptz + c * interval '1 ms',
       %(base)s::timestamptz + (9 * %(n)s + c) * interval '1 ms',
       CASE WHEN c %% 2 = 0 THEN %(base)s::timestamptz + (9 * %(n)s + c) * interval '1 ms' END
FROM generate_series(1::bigint, %(n)s) AS c,
     LATERAL (SELECT pg_temp.dep(c) AS d, pg_temp.amt(c, 5) AS a5,
                     sum(pg_temp.amt(c, i)) AS esc4,
                     coalesce(sum(pg_temp.amt(c, i)) FILTER (WHERE NOT pg_temp.ok(c, i)), 0) AS ref4,
                     coalesce(sum(pg_temp.amt(c, i)) FILTER (WHERE pg_temp.ok(c, i)), 0) AS rel4
              FROM generate_series(1, 4) AS i) AS m
"""

# Row s (0..9) of every channel, interleaved in time the way traffic arrives: s = 0 deposit,
# odd s escrow of task (s+1)/2, even s release/refund of task s/2, s = 9 close (even c) or escrow 5.
_LEDGER = """
INSERT INTO channel_transactions (id, channel_id, transaction_type, amount, task_id, reason, created_at)
SELECT gen_random_uuid(), pg_temp.cid(c),
       CASE WHEN s = 0 THEN 'deposit'
            WHEN s = 9 AND c %% 2 = 0 THEN 'close'
            WHEN s %% 2 = 1 THEN 'escrow'
            WHEN pg_temp.ok(c, s / 2) THEN 'release' ELSE 'refund' END,
       CASE WHEN s = 0 THEN pg_temp.dep(c)
            WHEN s = 9 AND c %% 2 = 0 THEN pg_temp.dep(c) - (SELECT sum(pg_temp.amt(c, i))
                 FILTER (WHERE pg_temp.ok(c, i)) FROM generate_series(1, 4) i)
            ELSE pg_temp.amt(c, (s + 1) / 2) END,
       CASE WHEN s = 0 OR (s = 9 AND c %% 2 = 0) THEN NULL ELSE 'task-' || c || '-' || ((s + 1) / 2) END,
       NULL,
       %(base)s::timestamptz + (s * %(n)s + c) * interval '1 ms'
FROM generate_series(0, 9) AS s, generate_series(1::bigint, %(n)s) AS c
"""

_ACCOUNTS = """
INSERT INTO accounts (did, balance, total_deposited, total_withdrawn, created_at, updated_at)
SELECT did, dep - wd + net, dep, wd, %(base)s, %(base)s
FROM (
    SELECT did, sum(net) AS net,
           CASE WHEN did LIKE 'did:bench:user:%%' THEN -sum(net) + 1000 ELSE 0 END AS dep,
           CASE WHEN did LIKE 'did:bench:user:%%' THEN 100 ELSE trunc(sum(net) / 2, 8) END AS wd
    FROM payment_channels c,
         LATERAL (VALUES (c.payer_did, c.pending_refund - c.total_deposit), (c.payee_did, c.total_settled)) AS v(did, net)
    GROUP BY did
) AS t
"""

# The platform's own ledger indexes (zsmon/demo/schema.sql), built after the load.
_INDEXES = """
CREATE INDEX IF NOT EXISTS idx_channel_txs_channel ON channel_transactions (channel_id);
CREATE INDEX IF NOT EXISTS idx_channel_txs_type ON channel_transactions (transaction_type);
CREATE INDEX IF NOT EXISTS idx_channel_txs_created ON channel_transactions (created_at);
"""

# What zsmon recommends for incremental runs (PaymentsChecker.recommended_indexes; the platform has no index on
# updated_at): the statements without CONCURRENTLY, which the benchmark does not need.
def recommended_indexes() -> list[str]:
    from zsmon.checkers.payments import PaymentsChecker

    return [a.statement.replace("CONCURRENTLY ", "").replace("CREATE INDEX ", "CREATE INDEX IF NOT EXISTS ")
            for a in PaymentsChecker.recommended_indexes]


# Two shapes of 10,000 new ledger rows, both applied as the platform does (the world stays consistent):
# "new": 2,500 channels opened for an auction and run to the end (deposit, escrow, release or refund,
#        close): the common life of an auction channel; their rows are recent and close together.
# "old": 5,000 tasks on 5,000 random long-lived escrowed channels (release or refund the active escrow,
#        lock a new one): each touched channel's whole history, scattered over the ledger, is re-read.
_TRAFFIC_NEW = """
WITH n AS (
    SELECT md5('new-' || %(salt)s || i)::uuid AS id, 'did:bench:user:' || (i %% %(users)s) AS payer,
           'did:bench:agent:' || ((i * 7) %% %(agents)s) AS payee, 10::numeric AS d, 2.5::numeric AS a,
           i %% 4 <> 0 AS success, 'task-new-' || %(salt)s || '-' || i AS task
    FROM generate_series(1, %(channels)s) AS i
), ch AS (
    INSERT INTO payment_channels (id, payer_did, payee_did, total_deposit, current_balance, escrowed_amount,
        total_settled, pending_refund, state, escrow_released, sequence_number, closed_at)
    SELECT id, payer, payee, d, 0, 0, CASE WHEN success THEN a ELSE 0 END,
           CASE WHEN success THEN d - a ELSE d END, 'closed', true, 2, now()
    FROM n RETURNING id
), led AS (
    INSERT INTO channel_transactions (channel_id, transaction_type, amount, task_id)
    SELECT n.id, v.t, v.amount, v.task
    FROM n JOIN ch ON ch.id = n.id
    CROSS JOIN LATERAL (VALUES ('deposit', n.d, NULL), ('escrow', n.a, n.task),
                               (CASE WHEN n.success THEN 'release' ELSE 'refund' END, n.a, n.task),
                               ('close', CASE WHEN n.success THEN n.d - n.a ELSE n.d END, NULL)) AS v(t, amount, task)
), pay AS (
    UPDATE accounts acc SET balance = acc.balance - s.amount, updated_at = now()
    FROM (SELECT payer, sum(a) AS amount FROM n WHERE success GROUP BY payer) AS s WHERE acc.did = s.payer
)
UPDATE accounts acc SET balance = acc.balance + s.amount, updated_at = now()
FROM (SELECT payee, sum(a) AS amount FROM n WHERE success GROUP BY payee) AS s WHERE acc.did = s.payee
"""

_TRAFFIC_OLD = """
WITH pick AS (
    SELECT id, escrowed_amount AS e, task_id, payee_did, least(current_balance, 1.5) AS a,
           (hashtext(id::text) %% 4) <> 0 AS success
    FROM payment_channels WHERE state = 'escrowed' ORDER BY md5(id::text || %(salt)s) LIMIT %(tasks)s
), led AS (
    INSERT INTO channel_transactions (channel_id, transaction_type, amount, task_id, created_at)
    SELECT id, CASE WHEN success THEN 'release' ELSE 'refund' END, e, task_id, now() FROM pick
    UNION ALL
    SELECT id, 'escrow', a, task_id || '-next', now() FROM pick
), ch AS (
    UPDATE payment_channels c
    SET current_balance = c.current_balance + CASE WHEN p.success THEN 0 ELSE p.e END - p.a,
        escrowed_amount = p.a, total_settled = c.total_settled + CASE WHEN p.success THEN p.e ELSE 0 END,
        task_id = p.task_id || '-next', escrow_released = false, sequence_number = c.sequence_number + 2,
        updated_at = now()
    FROM pick p WHERE c.id = p.id
)
UPDATE accounts a SET balance = a.balance + s.amount, updated_at = now()
FROM (SELECT payee_did, sum(e) AS amount FROM pick WHERE success GROUP BY payee_did) AS s
WHERE a.did = s.payee_did
"""


def build(dsn: str, n: int) -> None:
    users, agents = max(1, n // 10), max(1, n // 20)
    base = "2025-01-01T00:00:00Z"
    params = {"n": n, "users": users, "agents": agents, "base": base}
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute(schema_sql())
        conn.execute("DROP INDEX idx_channel_txs_channel, idx_channel_txs_created, idx_channel_txs_type")
        conn.execute("SET session_replication_role = replica")  # skip the FK trigger while loading
        conn.execute("SET maintenance_work_mem = '512MB'")
        conn.execute(_FUNCTIONS)
        for label, stmt in (("channels", _CHANNELS), ("ledger", _LEDGER), ("accounts", _ACCOUNTS),
                            ("indexes", _INDEXES)):
            t0 = time.perf_counter()
            conn.execute(stmt, params if "%(" in stmt else None)
            print(f"  built {label} in {time.perf_counter() - t0:.1f}s", flush=True)
        t0 = time.perf_counter()
        conn.execute("VACUUM (ANALYZE, FREEZE) accounts, payment_channels, channel_transactions")
        print(f"  vacuum analyze in {time.perf_counter() - t0:.1f}s", flush=True)


def traffic(dsn: str, kind: str, rows: int = 10_000) -> None:
    """Append ``rows`` ledger rows of the given shape ("new" or "old"), consistently."""
    with psycopg.connect(dsn, autocommit=True) as conn:
        users, agents = conn.execute(
            "SELECT count(*) FILTER (WHERE did LIKE 'did:bench:user:%'), count(*) FILTER (WHERE did LIKE "
            "'did:bench:agent:%') FROM accounts").fetchone()
        params = {"salt": uuid.uuid4().hex, "users": users, "agents": agents}
        if kind == "new":
            conn.execute(_TRAFFIC_NEW, {**params, "channels": rows // 4})
        else:
            conn.execute(_TRAFFIC_OLD, {**params, "tasks": rows // 2})


def rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--channels", type=int, default=1_000_000, help="channels to build (10 ledger rows each)")
    ap.add_argument("--keep", action="store_true", help="keep the database afterwards (prints its DSN)")
    ap.add_argument("--reuse", metavar="DBNAME", help="use an existing bench database instead of building one")
    ap.add_argument("--repeat", type=int, default=2, help="runs of each timed full check; the best is reported")
    ap.add_argument("--incremental-repeat", type=int, default=None,
                    help="rounds of the two incremental runs (default: --repeat); the best and the median are "
                         "reported")
    ap.add_argument("--recommended-indexes", action="store_true",
                    help="add the updated_at indexes docs/deployment.md recommends before timing (the platform's "
                         "schema has none: incremental runs then scan payment_channels and accounts)")
    ap.add_argument("--connections", default="1,2,4",
                    help="comma-separated connection counts to time the full check with (1 first: the reference)")
    ap.add_argument("--no-bare", action="store_true", help="skip the bare GROUP BY scans (a minute at 1M)")
    ap.add_argument("--no-incremental", action="store_true", help="skip the incremental runs (and their traffic)")
    ap.add_argument("--log-level", default="warning",
                    help="the checker's log level (debug: each split part's and step's seconds)")
    ap.add_argument("--build-only", action="store_true",
                    help="build the world, keep it and time nothing (then time it with --reuse)")
    args = ap.parse_args()
    try:
        counts = [int(c) for c in args.connections.split(",")]
        assert counts and all(c >= 1 for c in counts)
    except (ValueError, AssertionError):
        ap.error(f"--connections: expected comma-separated counts >= 1 like 1,2,4, got {args.connections!r}")

    if args.reuse:
        name, dsn = args.reuse, make_conninfo(**{**conninfo_to_dict(ADMIN_DSN), "dbname": args.reuse})
    else:  # build() loads the schema itself, without the ledger indexes while it fills the tables
        name, dsn = create_platform_database("zsmon_bench", ADMIN_DSN, schema=False)
    try:
        if not args.reuse:
            print(f"building {args.channels:,} channels and {10 * args.channels:,} ledger rows in {name}", flush=True)
            t0 = time.perf_counter()
            build(dsn, args.channels)
            print(f"built in {time.perf_counter() - t0:.1f}s", flush=True)
        if args.build_only:
            return
        with psycopg.connect(dsn, autocommit=True) as conn:
            if args.recommended_indexes:
                for statement in recommended_indexes():
                    conn.execute(statement)
            else:
                conn.execute("DROP INDEX IF EXISTS zsmon_payment_channels_updated_at, zsmon_accounts_updated_at")
            conn.execute("ANALYZE payment_channels, accounts")
        print(f"recommended updated_at indexes: {'yes' if args.recommended_indexes else 'no (the platform schema)'}",
              flush=True)
        run_bench(dsn, args.repeat, counts, bare=not args.no_bare,
                  incremental=0 if args.no_incremental else args.incremental_repeat or args.repeat,
                  log_level=args.log_level)
    finally:
        if args.keep or args.reuse or args.build_only:
            print(f"kept database {name}: {dsn}")
        else:
            drop_database(name, ADMIN_DSN)


BARE_SQL = "SELECT channel_id, sum(amount) FROM channel_transactions GROUP BY channel_id"


def bare_scan(dsn: str, settings: dict[str, str]) -> float:
    """Seconds to run the bare per-channel sum and read every row it returns (in a read-only snapshot)."""
    with psycopg.connect(dsn) as conn:
        conn.isolation_level = psycopg.IsolationLevel.REPEATABLE_READ
        conn.read_only = True
        with conn.transaction():
            for k, v in settings.items():
                conn.execute("SELECT set_config(%s, %s, true)", (k, v))
            t0 = time.perf_counter()
            with conn.cursor(name="bare") as cur:
                cur.execute(BARE_SQL)
                while cur.fetchmany(50_000):
                    pass
            return time.perf_counter() - t0


def _same(result) -> dict:
    """What must not depend on the number of connections: counts, summaries, the sample in order."""
    out = result.to_dict()
    return {k: out[k] for k in ("status", "violation_counts", "violations", "summaries", "skipped")}


def run_bench(dsn: str, repeat: int, connections: list[int], bare: bool = True, incremental: int = 2,
              log_level: str = "warning") -> None:
    """``incremental``: rounds of the two incremental runs (0: none)."""
    import redis
    import yaml

    from zsmon.app import build_registry
    from zsmon.core.config import load_config
    from zsmon.core.logging import configure_logging
    from zsmon.core.service import build_runner

    prefix = f"zsmon-bench-{uuid.uuid4().hex[:8]}:"
    configure_logging(log_level)
    confs: list[Path] = []

    def runner_with(n: int):
        conf = Path(f"/tmp/{prefix.rstrip(':')}-{n}.yml")
        confs.append(conf)
        conf.write_text(yaml.safe_dump({
            "redis": {"key_prefix": prefix},
            # The bench's writes are single statements: a 2 s margin (default 60 s) keeps each incremental run
            # to the 10,000 rows written since the previous run instead of re-checking the previous batches too.
            "checkers": {"payments": {"settings": {"watermark_safety_seconds": 2, "full_sweep_connections": n}}},
            "database": {"statement_timeout_seconds": 900},
        }))
        config = load_config(conf, env={"ZSMON_DATABASE_URL": dsn, "REDIS_HOST": "127.0.0.1"})
        return build_runner(build_registry(config), only=["payments"])

    print(f"load average at start: {' '.join(f'{x:.2f}' for x in os.getloadavg())}", flush=True)
    runners = {n: runner_with(n) for n in dict.fromkeys(connections)}
    runner = runners[connections[0]]
    fulls: dict[int, list[float]] = {n: [] for n in runners}
    try:
        print("warm-up: first full check (records the sequence memory)", flush=True)
        first = runner.run_check("payments", mode="full")
        print(f"  {first.status} in {first.duration_seconds:.2f}s; skipped: {sorted(first.skipped)}", flush=True)
        reference = None
        for _ in range(repeat):
            for n, r_n in runners.items():
                r = r_n.run_check("payments", mode="full")
                assert r.status != "error", r.to_dict()
                if reference is None:
                    reference = _same(r)
                assert _same(r) == reference, f"{n} connections found something else than {connections[0]}"
                fulls[n].append(r.duration_seconds)
                print(f"  full check, {n} connection(s): {r.duration_seconds:.2f}s ({r.status}, "
                      f"{sum(r.violation_counts.values())} violations, load {os.getloadavg()[0]:.2f})", flush=True)
        incs: dict[str, list[float]] = {"new": [], "old": []}
        for _ in range(incremental):
            for kind in incs:
                traffic(dsn, kind)
                time.sleep(3)  # let these rows age past the 2 s margin: the next run re-checks only its own batch
                r = runner.run_check("payments", mode="incremental")
                assert r.status == "pass" and r.mode == "incremental", r.to_dict()
                incs[kind].append(r.duration_seconds)
                print(f"  incremental after 10,000 new ledger rows ({kind} channels): {r.duration_seconds:.3f}s",
                      flush=True)
        rss = rss_mb()
    finally:
        for r_n in runners.values():
            r_n.db.close()
        client = redis.Redis()
        keys = list(client.scan_iter(match=prefix + "*"))
        if keys:
            client.delete(*keys)
        for conf in confs:
            conf.unlink(missing_ok=True)

    full = min(fulls[connections[0]])
    print()
    print("figures (best of %d)" % repeat)
    print(f"  load average at the end                      {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    for n, times in fulls.items():
        best = min(times)
        print(f"  full check seconds, {n} connection(s)          {best:8.2f}   {best / full:5.2f} x {connections[0]}"
              + ("  (target <= 0.65 x 1)" if n == 2 and connections[0] == 1 else ""))
    if bare:
        sweep = {"enable_indexscan": "off", "enable_bitmapscan": "off", "max_parallel_workers_per_gather": "0"}
        bare_default = min(bare_scan(dsn, {}) for _ in range(repeat))
        bare_tuned = min(bare_scan(dsn, sweep) for _ in range(repeat))
        print(f"  bare GROUP BY scan seconds (server defaults) {bare_default:8.2f}   ratio full/bare "
              f"{full / bare_default:5.2f}  (target <= 1.5)")
        print(f"  bare GROUP BY scan seconds (sweep settings)  {bare_tuned:8.2f}   ratio full/bare "
              f"{full / bare_tuned:5.2f}")
    if incremental:
        inc_new, inc_old = min(incs["new"]), min(incs["old"])
        print(f"  incremental seconds after 10k ledger rows (best of {incremental}; median),")
        print(f"    2,500 new auction channels run to close   {inc_new:8.3f}   {100 * inc_new / full:5.2f}% of full  "
              f"(target <= 2%); median {statistics.median(incs['new']):.3f}")
        print(f"    5,000 tasks on random old channels         {inc_old:8.3f}   {100 * inc_old / full:5.2f}% of full; "
              f"median {statistics.median(incs['old']):.3f}")
    print(f"  peak RSS of the checker process (MB)        {rss:8.1f}   (target <= 150)")


if __name__ == "__main__":
    main()
