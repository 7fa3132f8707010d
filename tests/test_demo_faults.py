"""The demo's bookkeeping of planted faults, its config on the demo's time scale, and its --duration."""
from __future__ import annotations

import io
import time
from types import SimpleNamespace

from zsmon.app import build_registry
from zsmon.core.config import Config
from zsmon.core.results import CheckResult, Violation
from zsmon.demo.run import (DEMO_GRACE, FULL_SWEEP_EVERY_RUNS, FaultTracker, Options, Planted, Printer, demo_config,
                            show_within)


def _tracker(results, planted, within=10.0):
    out = io.StringIO()
    service = SimpleNamespace(latest_results=lambda: results)
    traffic = SimpleNamespace(planted=planted)
    return FaultTracker(service, traffic, Printer(out), within), out


def test_a_fault_is_shown_by_the_first_later_run_that_names_its_entity():
    t = time.time()
    fault = Planted("auctions", "inject_stuck_open_auction", "a-1", None, t - 4)
    before = CheckResult("auctions", "fail", "full", 0.1, {"stale_open_auction": 1},
                         [Violation("stale_open_auction", "auction", "a-1")], started_at=t - 5)
    tracker, out = _tracker([before], [fault])
    tracker.poll()
    assert fault.shown_as is None and out.getvalue() == ""  # a run that began before the fault proves nothing
    after = CheckResult("auctions", "fail", "incremental", 0.1, {"stale_open_auction": 1},
                        [Violation("stale_open_auction", "auction", "a-1")], started_at=t - 1)
    tracker.service.latest_results = lambda: [after]
    tracker.poll()
    assert fault.shown_as == "auctions/stale_open_auction" and 2.9 < fault.after < 3.1
    assert "FAULT shown: auctions.inject_stuck_open_auction as auctions/stale_open_auction (a-1)" in out.getvalue()
    assert tracker.summary(time.time()) == "; 1 of them shown (within 3.0 s)"


def test_a_global_entity_is_matched_in_its_own_checker_and_a_catalogue_invariant_anywhere():
    t = time.time()
    drift = Planted("reputation", "inject_population_shift", "global", None, t - 3)
    leak = Planted("payments", "global_leak", None, "global_conservation", t - 3)
    results = [CheckResult("payments", "fail", "full", 0.1, {"global_conservation": 1},
                           [Violation("global_conservation", "system", "global")], started_at=t - 1),
               CheckResult("reputation", "fail", "full", 0.1, {"distribution_drift": 1},
                           [Violation("distribution_drift", "system", "global")], started_at=t - 1)]
    tracker, _ = _tracker(results, [drift, leak])
    tracker.poll()
    assert drift.shown_as == "reputation/distribution_drift"
    assert leak.shown_as == "payments/global_conservation"


def test_a_fault_whose_invariant_is_known_is_not_shown_by_another_faults_violation():
    """Seen in a demo: an auction awarded without its channel shows only on the next full sweep; meanwhile a
    stuck auction planted after it was reported, and then the first award's own violation was there when a
    second award was planted. Neither may stand for a fault whose broken invariant the simulator names."""
    t = time.time()
    first = Planted("auctions", "inject_awarded_without_channel", "a-1", "awarded_without_channel", t - 9)
    stuck = Violation("stale_open_auction", "auction", "s-1", lifecycle={"first_seen": t - 6})
    tracker, out = _tracker([CheckResult("auctions", "fail", "incremental", 0.1, {"stale_open_auction": 1},
                                         [stuck], started_at=t - 7)], [first])
    tracker.poll()
    assert first.shown_as is None and out.getvalue() == ""
    second = Planted("auctions", "inject_awarded_without_channel", "a-2", "awarded_without_channel", t - 4)
    tracker.traffic.planted.append(second)
    own = Violation("awarded_without_channel", "auction", "a-1", lifecycle={"first_seen": t - 5})
    tracker.service.latest_results = lambda: [CheckResult("auctions", "fail", "full", 0.1,
                                                          {"awarded_without_channel": 1, "stale_open_auction": 1},
                                                          [stuck, own], started_at=t - 3)]
    tracker.poll()
    assert first.shown_as == "auctions/awarded_without_channel" and second.shown_as is None, out.getvalue()
    assert "(a-1)" in out.getvalue() and "(s-1)" not in out.getvalue()


def test_a_fault_not_shown_in_time_is_said_once_with_the_reason_and_in_the_summary():
    t = time.time()
    late = Planted("payments", "sequence_going_back", "c-9", "sequence_regression", t - 30)
    results = [CheckResult("payments", "pass", "incremental", 0.1, {"sequence_regression": 0}, [],
                           {"sequence_regression": "needs memory across runs: Redis is unavailable"}, started_at=t)]
    tracker, out = _tracker(results, [late], within=10)
    tracker.poll()
    tracker.poll()
    lines = [line for line in out.getvalue().splitlines() if "not shown yet" in line]
    assert len(lines) == 1, out.getvalue()
    assert "payments.sequence_going_back planted 30 s ago" in lines[0]
    assert "payments/sequence_regression is skipped: needs memory across runs: Redis is unavailable" in lines[0]
    just_planted = Planted("payments", "one_unit_leak", "c-1", "ledger_reconciliation", t - 2)
    tracker.traffic.planted.append(just_planted)
    summary = tracker.summary(t)
    assert summary.startswith("; 0 of them shown; not shown: payments.sequence_going_back (payments/sequence_regres")
    assert "payments.one_unit_leak (planted 2 s before the end: too late to show)" in summary


def test_the_demo_config_scales_grace_periods_and_full_sweeps(tmp_path):
    options = Options(check_interval=4)
    config = demo_config(str(tmp_path), "postgresql://u@127.0.0.1:1/x", 6379, "demo-token-for-a-test", options)
    registry = build_registry(config)
    builtin = build_registry(Config())
    scaled = 0
    for name, bound in registry.checkers.items():
        cls = builtin.checker_classes[name]
        assert bound.interval_seconds == 4
        if cls.supports_incremental:
            assert bound.full_interval_seconds == FULL_SWEEP_EVERY_RUNS * 4 < cls.default_full_interval_seconds
        for key, value in DEMO_GRACE.get(name, {}).items():
            if key in cls.Settings.model_fields:
                assert getattr(bound.checker.settings, key) == value < cls.Settings.model_fields[key].default
                scaled += 1
    assert scaled >= 1  # at least one production grace period is shortened for the demo
    # A planted fault is promised within a full sweep and a run, not the production defaults.
    assert show_within(options) == (FULL_SWEEP_EVERY_RUNS + 1) * 4 + 3 < 30
