"""Incremental payments runs judge account_reconciliation and global_conservation from exact deltas of the
remembered sums (zsmon.core.memory.AnchoredMemory): property-tested against full sweeps of the same snapshot,
on the real schema, with random traffic (the simulator's and the deployed platform's writes) and planted
faults, against the real PostgreSQL and Redis."""
from __future__ import annotations

import json
import random
from decimal import Decimal

import pytest
import redis as redis_lib
from test_payments import world

from zsmon.demo.simulator.payments import (
    FAULTS,
    DeployedPayments,
    PaymentSimulator,
    inject_fault,
)
from zsmon.testing import REDIS_URL, deployment_prefix

# Judged from the remembered sums in an incremental run; the rest is compared too (same snapshot).
SUMMED = ("account_non_negative", "account_reconciliation", "global_conservation")
EXACT_SETTINGS = {"watermark_safety_seconds": 0}  # each run re-reads only what changed since the last one


def judged(result) -> tuple[dict[str, int], set[tuple]]:
    """What a result says, beyond sequence_regression (which needs the memory the reference has not)."""
    counts = {k: v for k, v in result.violation_counts.items() if v and k != "sequence_regression"}
    found = {(v.invariant, v.entity_id, Decimal(str(v.expected)) if v.invariant in SUMMED else None,
              Decimal(str(v.actual)) if v.invariant in SUMMED else None)
             for v in result.violations if v.invariant != "sequence_regression"}
    return counts, found


def header(cfg) -> dict[str, str]:
    client = redis_lib.Redis.from_url(REDIS_URL, decode_responses=True)
    try:
        return client.hgetall(deployment_prefix(cfg) + "payments:sums")
    finally:
        client.close()


def reassign_payer(conn, rnd: random.Random, dids: list[str]) -> str:
    """A channel's payer_did rewritten to another DID (the money it holds now counts for the other one)."""
    row = rnd.choice(conn.execute("SELECT id::text, payer_did FROM payment_channels ORDER BY id").fetchall())
    other = rnd.choice([d for d in dids if d != row[1]])
    conn.execute("UPDATE payment_channels SET payer_did = %s, updated_at = now() WHERE id = %s", (other, row[0]))
    return other


def traffic(conn, sim: PaymentSimulator, deployed: DeployedPayments, rnd: random.Random, faults: bool) -> None:
    """One round of random writes: correct simulator traffic, the deployed platform's opens and settles,
    and (sometimes) one planted fault."""
    for _ in range(rnd.randint(1, 4)):
        action = rnd.random()
        if action < 0.5:
            sim.run(rnd.randint(1, 15))
        elif action < 0.7:
            deployed.open_channel(rnd.choice(sim.agents), Decimal(rnd.randint(1, 9000)) / 100)
        else:
            rows = conn.execute("SELECT id::text FROM payment_channels WHERE state <> 'closed' ORDER BY id").fetchall()
            if rows:  # picked by the seeded generator, not the database's random()
                deployed.settle(rnd.choice(rows)[0], Decimal(rnd.randint(1, 12000)) / 100)
    if faults:  # one planted fault per faulty round
        if rnd.random() < 0.3:
            reassign_payer(conn, rnd, sim.users + sim.agents)
        else:
            inject_fault(conn, rnd.choice(sorted(FAULTS)))


@pytest.mark.parametrize("connections", [1, 2])
def test_incremental_sums_agree_with_full_sweeps_on_random_traffic(writer, make_config, run_check, connections):
    """The sums are anchored by a full sweep on one connection or split over two sharing its snapshot."""
    reference = make_config(redis=False)  # full sweeps with no memory at all: the proof
    for seed in (11, 12, 13):
        writer.execute("TRUNCATE accounts, payment_channels, channel_transactions CASCADE")
        rnd = random.Random(seed)
        sim = world(writer, seed=seed, steps=60)
        deployed = DeployedPayments(writer)
        cfg = make_config(checkers={"payments": {"settings": {**EXACT_SETTINGS,
                                                              "full_sweep_connections": connections}}})
        assert run_check("payments", mode="full", config=cfg).mode == "full"
        anchored = header(cfg)
        assert anchored.get("anchor") and anchored.get("as_of")
        for round_no in range(10):
            traffic(writer, sim, deployed, rnd, faults=round_no % 2 == 1)
            before = header(cfg)["as_of"]
            inc = run_check("payments", mode="incremental", config=cfg)
            full = run_check("payments", mode="full", config=reference)
            assert inc.mode == "incremental" and full.mode == "full", (seed, round_no)
            assert judged(inc) == judged(full), (seed, round_no)
            after = header(cfg)
            # The deltas were used and remembered (same anchor, newer snapshot).
            assert after["anchor"] == anchored["anchor"] and float(after["as_of"]) > float(before), (seed, round_no)
        assert any(judged(full)[0].get(i) for i in SUMMED), "the faults planted must break a summed invariant"


def test_sums_missing_or_behind_never_give_a_wrong_answer(writer, make_config, run_check):
    """Sums gone, partly evicted or half-written: the run is a full sweep, which re-anchors them (the exact
    SQL alone would not judge the old DID of a rewritten payer_did). Sums that could not be anchored: the
    exact SQL, not a full sweep every run. Sums older than the watermark (their update was lost after a
    published run): the run re-reads everything changed since them, so the deltas still cover every change."""
    rnd = random.Random(5)
    sim = world(writer, seed=5, steps=60)
    deployed = DeployedPayments(writer)
    cfg = make_config(checkers={"payments": {"settings": EXACT_SETTINGS}})
    reference = make_config(redis=False)
    run_check("payments", mode="full", config=cfg)
    client = redis_lib.Redis.from_url(REDIS_URL)
    key = deployment_prefix(cfg) + "payments:sums"

    def parts() -> list[bytes]:
        anchor = client.hget(key, "anchor").decode()
        return [f"{key}:{anchor}:channels".encode(), f"{key}:{anchor}:dids".encode()]

    try:
        for lose in (lambda: client.delete(key), lambda: client.delete(parts()[1]),
                     lambda: client.hdel(key, "ready")):
            lose()
            traffic(writer, sim, deployed, rnd, faults=True)
            run = run_check("payments", mode="incremental", config=cfg)
            assert run.mode == "full"
            assert judged(run) == judged(run_check("payments", mode="full", config=reference))
            assert client.hget(key, "ready") == b"1" and all(client.ttl(p) == -1 for p in parts())
            inc = run_check("payments", mode="incremental", config=cfg)  # and the next run uses them again
            assert inc.mode == "incremental" and judged(inc) == judged(run_check("payments", mode="full",
                                                                                 config=reference))

        # Behind: save the sums, let an incremental run move them on, put the old ones back.
        traffic(writer, sim, deployed, rnd, faults=True)
        saved = {k: client.dump(k) for k in (key.encode(), *parts())}
        inc = run_check("payments", mode="incremental", config=cfg)
        assert judged(inc) == judged(run_check("payments", mode="full", config=reference))
        for k, v in saved.items():
            client.restore(k, 0, v, replace=True)
        inject_fault(writer, "account_credited_from_nowhere")
        traffic(writer, sim, deployed, rnd, faults=False)
        inc = run_check("payments", mode="incremental", config=cfg)
        full = run_check("payments", mode="full", config=reference)
        assert inc.mode == "incremental" and judged(inc) == judged(full)
        assert full.violation_counts["global_conservation"] == 1

        # Not anchorable at the last full sweep (the state says so): the exact SQL, no full sweep.
        state = deployment_prefix(cfg) + "payments:incremental"
        client.set(state, json.dumps({**json.loads(client.get(state)), "sums": False}))
        client.delete(key)
        inject_fault(writer, "global_leak")
        inc = run_check("payments", mode="incremental", config=cfg)
        assert inc.mode == "incremental" and not client.exists(key)
        assert judged(inc) == judged(run_check("payments", mode="full", config=reference))
    finally:
        client.close()


def test_a_full_sweep_re_anchors_and_drops_the_old_anchor(writer, make_config, run_check):
    world(writer, seed=8, steps=30)
    cfg = make_config()
    run_check("payments", mode="full", config=cfg)
    first = header(cfg)
    run_check("payments", mode="full", config=cfg)
    second = header(cfg)
    assert first["anchor"] != second["anchor"]
    client = redis_lib.Redis.from_url(REDIS_URL)
    try:
        prefix = deployment_prefix(cfg) + "payments:sums:"
        assert {k.decode() for k in client.scan_iter(match=prefix + "*")} == {
            f"{prefix}{second['anchor']}:channels", f"{prefix}{second['anchor']}:dids"}
        n = writer.execute("SELECT count(*) FROM payment_channels").fetchone()[0]
        assert client.hlen(f"{prefix}{second['anchor']}:channels") == n + 1  # + the anchor field
        # The header alone forgotten (reset-memory payments sums): the next full sweep drops the orphaned parts.
        client.delete(deployment_prefix(cfg) + "payments:sums")
        run_check("payments", mode="full", config=cfg)
        third = header(cfg)["anchor"]
        assert {k.decode() for k in client.scan_iter(match=prefix + "*")} == {
            f"{prefix}{third}:channels", f"{prefix}{third}:dids"}
    finally:
        client.close()
    # Without the setting nothing is remembered and incremental runs judge with the exact SQL.
    off = make_config(checkers={"payments": {"settings": {"incremental_sums": False}}})
    run_check("payments", mode="full", config=off)
    kept = header(off)
    assert kept["anchor"] == third
    inject_fault(writer, "account_credited_from_nowhere")
    inc = run_check("payments", mode="incremental", config=off)
    assert inc.mode == "incremental" and inc.violation_counts["global_conservation"] == 1
    assert header(off) == kept


def test_concurrent_traffic_never_shows_a_violation_through_the_sums(writer, db_url, make_config, run_check):
    """Writers commit while incremental runs judge from the remembered sums (a 5 s margin covers their
    transactions, which last milliseconds even on a loaded machine): correct traffic never shows a violation, and once it stops the
    sums still give what a full sweep gives."""
    import threading
    import time

    import psycopg

    world(writer, seed=21, steps=60)
    cfg = make_config(checkers={"payments": {"settings": {"watermark_safety_seconds": 5}}})
    assert run_check("payments", mode="full", config=cfg).status == "pass"
    stop = threading.Event()
    errors: list[Exception] = []

    def write(seed: int) -> None:
        try:
            with psycopg.connect(db_url, autocommit=True) as conn:
                sim = PaymentSimulator(conn, seed=seed, users=6, agents=3)  # shared accounts: contention
                while not stop.is_set():
                    sim.step()
        except Exception as exc:  # noqa: BLE001 - surfaced below
            errors.append(exc)

    threads = [threading.Thread(target=write, args=(seed,)) for seed in range(200, 204)]
    for t in threads:
        t.start()
    results = []
    try:
        t0 = time.monotonic()
        while time.monotonic() - t0 < 8:
            results.append(run_check("payments", mode="incremental", config=cfg))
    finally:
        stop.set()
        for t in threads:
            t.join()
    assert not errors, errors
    assert len(results) >= 5 and {r.mode for r in results} == {"incremental"}
    for r in results:
        assert r.status == "pass", r.to_dict()
    inject_fault(writer, "global_leak")
    inc = run_check("payments", mode="incremental", config=cfg)
    full = run_check("payments", mode="full", config=make_config(redis=False))
    assert inc.mode == "incremental" and judged(inc) == judged(full)
    assert inc.violation_counts["global_conservation"] == 1


@pytest.mark.parametrize("connections", [1, 2])
def test_the_anchor_keeps_any_did_byte_for_byte(writer, make_config, run_check, connections):
    """The anchor's pairs are packed in Redis' protocol by zsmon (length-prefixed, in slices): DIDs with
    multi-byte characters and protocol bytes (CR LF, $, *) are remembered exactly and judged like a full sweep judges
    them; a channel without payer cannot be remembered: nothing half-filled is left, the exact SQL judges. With
    two connections the anchor's parts are filled beside the sweep's passes, on a connection of their own."""
    world(writer, seed=21, steps=40)
    odd = "did:zs:ünïcødé:日本\r\n$3\r\n*9"
    cid = writer.execute("UPDATE payment_channels SET payer_did = %s WHERE id = (SELECT id FROM payment_channels "
                         "ORDER BY id LIMIT 1) RETURNING id::text", (odd,)).fetchone()[0]
    cfg = make_config(checkers={"payments": {"settings": {**EXACT_SETTINGS, "full_sweep_connections": connections}}})
    reference = make_config(redis=False)
    run_check("payments", mode="full", config=cfg)
    anchored = header(cfg)
    assert anchored.get("ready") == "1"
    client = redis_lib.Redis.from_url(REDIS_URL, decode_responses=True)
    prefix = deployment_prefix(cfg) + "payments:sums:" + anchored["anchor"]
    try:
        channel = json.loads(client.hget(prefix + ":channels", cid))
        assert channel[0] == odd
        assert json.loads(client.hget(prefix + ":dids", odd))[0] is False  # remembered, without account row
        n = writer.execute("SELECT count(*) FROM payment_channels").fetchone()[0]
        assert client.hlen(prefix + ":channels") == n + 1  # + the anchor field: no pair ran into another
        inject_fault(writer, "account_credited_from_nowhere")
        writer.execute("UPDATE payment_channels SET current_balance = current_balance + 1, updated_at = now() "
                       "WHERE id = %s", (cid,))
        inc = run_check("payments", mode="incremental", config=cfg)
        full = run_check("payments", mode="full", config=reference)
        assert inc.mode == "incremental" and judged(inc) == judged(full)
        assert ("account_reconciliation", odd) in {(i, e) for i, e, _, _ in judged(inc)[1]}

        # A drifted schema that allows a channel without payer (the platform's has NOT NULL).
        writer.execute("ALTER TABLE payment_channels ALTER COLUMN payer_did DROP NOT NULL")
        writer.execute("UPDATE payment_channels SET payer_did = NULL WHERE id = %s", (cid,))
        run_check("payments", mode="full", config=cfg)
        assert {k for k in client.scan_iter(match=deployment_prefix(cfg) + "payments:sums:*")} == {
            prefix + ":channels", prefix + ":dids"}  # the failed fill's parts are gone
        state = json.loads(client.get(deployment_prefix(cfg) + "payments:incremental"))
        assert state["sums"] is False
        # Touched, that channel's money held for nobody is judged by a full sweep; then repaired, by the sums
        # again once a full sweep re-anchors them, and the DID-less violation resolves.
        writer.execute("UPDATE payment_channels SET updated_at = now() WHERE id = %s", (cid,))
        run = run_check("payments", mode="incremental", config=cfg)
        assert run.mode == "full" and judged(run) == judged(run_check("payments", mode="full", config=reference))
        assert ("account_reconciliation", "(NULL)") in {(i, e) for i, e, _, _ in judged(run)[1]}
        writer.execute("UPDATE payment_channels SET payer_did = %s, updated_at = now() WHERE id = %s", (odd, cid))
        inject_fault(writer, "global_leak")
        for _ in range(2):
            inc = run_check("payments", mode="incremental", config=cfg)
            assert inc.mode == "incremental" and judged(inc) == judged(run_check("payments", mode="full",
                                                                                 config=reference))
            assert "(NULL)" not in {e for _, e, _, _ in judged(inc)[1]}
    finally:
        client.close()
        writer.execute("UPDATE payment_channels SET payer_did = %s WHERE payer_did IS NULL", (odd,))
        writer.execute("ALTER TABLE payment_channels ALTER COLUMN payer_did SET NOT NULL")


def test_a_sliced_hset_reaches_redis_whole():
    """The anchor's HSET packed in slices (one array header for all of them) is one command to Redis: every
    pair arrives, in order, byte for byte."""
    from zsmon.core.memory import _hset_command

    rows = [(f"did:zs:ü{i}\r\n$*", "🙂" * (i % 3)) for i in range(7)]
    client = redis_lib.Redis.from_url(REDIS_URL, decode_responses=True)
    key = f"zsmon-test-sliced-hset-{random.getrandbits(64):x}"
    conn = client.connection_pool.get_connection()
    try:
        conn.send_packed_command(_hset_command(key, rows, slice_rows=2))
        assert conn.read_response() == len(rows)
        assert client.hgetall(key) == dict(rows)
    finally:
        client.connection_pool.release(conn)
        client.delete(key)
        client.close()
