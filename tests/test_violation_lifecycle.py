"""Violations stay reported until repaired, across incremental runs, with the sidecar running for real.

A world with planted payments, auctions and reputation faults and live correct traffic; ``zsmon run``'s
service with the shipped defaults scaled down only through settings (intervals of 1 s, incremental
watermark margins of 2 s, full sweeps only once an hour): every planted violation must stay above 0
in every scrape, long past the watermark margin, and leave within a run of its repair.
"""
from __future__ import annotations

import re
import threading
import time
from decimal import Decimal

import psycopg
import pytest
import requests

from zsmon.demo.simulator.auctions import AuctionSimulator
from zsmon.demo.simulator.payments import FAULTS, PaymentSimulator, inject_fault
from zsmon.demo.simulator.reputation import ReputationSimulator
from zsmon.testing import LOCAL_HTTP, running_service, wait_for

pytestmark = pytest.mark.slow  # pytest -m 'not slow' leaves it out (README)

WATCH_SECONDS = 45          # 22 watermark margins, ~45 incremental payments runs
PAYMENT_FAULTS = ("money_from_nowhere", "overdrawn_escrow", "negative_withdrawal", "one_unit_leak",
                  "close_with_escrow_locked", "escrowed_without_lock", "double_release",
                  "account_credited_from_nowhere")
SERIES = re.compile(r'^zerostate_invariant_violations\{checker="([^"]+)",invariant="([^"]+)"\} (\S+)$', re.M)
TOKEN = "lifecycle-token-7f3a"


class Traffic(threading.Thread):
    """Correct payment traffic of its own channels, so incremental runs always have something to judge."""

    def __init__(self, dsn: str) -> None:
        super().__init__(daemon=True)
        self.dsn, self.halt, self.steps = dsn, threading.Event(), 0

    def run(self) -> None:
        with psycopg.connect(self.dsn, autocommit=True) as conn:
            sim = PaymentSimulator(conn, seed=21, prefix="did:traffic")
            while not self.halt.wait(0.05):
                sim.step()
                self.steps += 1


def counts(text: str) -> dict[tuple[str, str], float]:
    return {(c, i): float(v) for c, i, v in SERIES.findall(text)}


def test_violations_stay_until_repaired_across_incremental_runs(db_url, writer, make_config):
    pay = PaymentSimulator(writer, seed=3)
    pay.run(300)
    payer, payee = pay.users[0], pay.agents[0]
    pay.deposit(payer, Decimal("500"))
    for amount in ("50", "40", "30", "20"):  # channels in every state the faults need
        pay.open_channel(payer, payee, Decimal(amount))
    planted = {}
    for name in PAYMENT_FAULTS:
        planted[name] = inject_fault(writer, name)
    expected = {("payments", FAULTS[name].invariant) for name in PAYMENT_FAULTS}
    auctions = AuctionSimulator(writer, seed=7).run_until(auctions=30)
    auctions.inject("awarded_has_winner")
    auctions.inject("bid_after_expiry")
    expected |= {("auctions", "awarded_has_winner"), ("auctions", "bid_after_expiry")}
    with writer.transaction():
        reputation = ReputationSimulator(writer, seed=7, agents=20)
        reputation.run(200)
    reputation.inject_score_out_of_range()
    expected.add(("reputation", "score_bounds"))

    config = make_config(http={**LOCAL_HTTP, "admin_token": TOKEN}, scheduler={"health_interval_seconds": 0.5}, checkers={
        "payments": {"interval_seconds": 1, "full_interval_seconds": 3600,
                     "settings": {"watermark_safety_seconds": 2}},
        "auctions": {"interval_seconds": 1, "full_interval_seconds": 3600,
                     "settings": {"incremental_overlap_seconds": 2}},
        "reputation": {"interval_seconds": 1, "settings": {"settle_seconds": 1}},
        "schema": {"enabled": False}})
    traffic = Traffic(db_url)
    with running_service(config) as svc:
        traffic.start()
        try:
            wait_for(lambda: expected <= {k for k, v in counts(svc.metrics_text()).items() if v > 0}, 30)
            modes, low = set(), {}
            deadline = time.monotonic() + WATCH_SECONDS
            while time.monotonic() < deadline:
                seen = counts(svc.metrics_text())
                for key in expected:
                    if seen.get(key, 0) <= 0:
                        low[key] = seen.get(key)
                checks = requests.get(svc.url("api", "/api/v1/checks"), timeout=5,
                                      headers={"Authorization": f"Bearer {TOKEN}"}).json()["checks"]
                modes |= {(c["checker"], c["mode"]) for c in checks}
                time.sleep(0.5)
            assert not low, f"planted violations dropped out of a scrape: {low}"
            # The point: most of those runs were incremental, and each still stated every violation.
            assert {("payments", "incremental"), ("auctions", "incremental")} <= modes, modes
            assert traffic.steps > 100

            # Repaired: gone within a run (1 s), while the others stay.
            writer.execute("UPDATE payment_channels SET current_balance = current_balance - 5, updated_at = now() "
                           "WHERE id = %s", (planted["money_from_nowhere"],))
            fixed = time.monotonic()
            wait_for(lambda: counts(svc.metrics_text()).get(("payments", "channel_conservation")) == 0, 10)
            assert time.monotonic() - fixed < 5
            still = counts(svc.metrics_text())
            assert all(still[k] > 0 for k in expected - {("payments", "channel_conservation")}), still
        finally:
            traffic.halt.set()
            traffic.join(10)
