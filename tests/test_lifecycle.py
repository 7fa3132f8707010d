"""The lifecycle of violations and acknowledgements, on the real Redis."""
from __future__ import annotations

from decimal import Decimal

import pytest
import redis as redis_lib

from zsmon.core.lifecycle import Lifecycle, LifecycleError, Observed, grew_beyond
from zsmon.core.results import CheckResult, Violation
from zsmon.testing import REDIS_URL

INV = "channel_conservation"


@pytest.fixture
def lc(redis_prefix: str):
    client = redis_lib.Redis.from_url(REDIS_URL, decode_responses=True)
    yield Lifecycle(client, redis_prefix, track_limit=3)
    client.close()


def run(lc: Lifecycle, at: float, found: dict[str, str], total: int | None = None) -> CheckResult:
    """One published payments run that found ``found`` (entity -> difference) of INV."""
    total = len(found) if total is None else total
    result = CheckResult("payments", "fail" if total else "pass", started_at=at, violation_counts={INV: total},
                         violations=[Violation(INV, "channel", e, difference=Decimal(d)) for e, d in found.items()])
    new = lc.record(result, {INV: Observed(total, {e: Decimal(d) for e, d in found.items()})})
    return lc.annotate(result, new, now=at)


def test_first_seen_runs_and_resolution(lc: Lifecycle) -> None:
    assert lc.violators("payments", [INV]) is None  # nothing remembered: an incremental run must sweep
    first = run(lc, 100.0, {"a": "5", "b": "-2"})
    assert first.new_counts == {INV: 2} and first.oldest_unacknowledged == {INV: 100.0}
    (va,) = [v for v in first.violations if v.entity_id == "a"]
    assert va.to_dict()["first_seen"] == 100.0 and va.to_dict()["runs_seen"] == 1

    second = run(lc, 115.0, {"a": "7", "b": "-2"})
    assert second.new_counts == {INV: 0}
    (va,) = [v for v in second.violations if v.entity_id == "a"]
    life = va.to_dict()
    assert (life["first_seen"], life["last_seen"], life["runs_seen"], life["first_difference"]) == \
        (100.0, 115.0, 2, "5")
    assert lc.violators("payments", [INV]) == {"a", "b"}
    # an invariant never judged yet (a first observation) has nothing to carry beside one that was
    assert lc.violators("payments", [INV, "sequence_regression"]) == {"a", "b"}

    third = run(lc, 130.0, {"a": "7"})
    assert third.violation_counts == {INV: 1} and lc.violators("payments", [INV]) == {"a"}
    (gone,) = lc.resolved("payments")
    assert (gone["entity_id"], gone["first_seen"], gone["last_seen"], gone["resolved_at"], gone["runs_seen"]) == \
        ("b", 100.0, 115.0, 130.0, 2)


def test_beyond_the_cap_nothing_is_called_resolved(lc: Lifecycle) -> None:
    run(lc, 100.0, {"a": "1", "b": "1", "c": "1"}, total=3)
    # 5 violators, only 3 tracked: the set is incomplete, so an incremental run must sweep everything,
    # and an entity missing from the tracked few is not "resolved".
    result = run(lc, 115.0, {"d": "9", "e": "8", "a": "1"}, total=5)
    assert lc.violators("payments", [INV]) is None
    assert lc.resolved("payments") == []
    assert result.unacknowledged_counts == {INV: 5}


def test_acknowledgement_silences_until_it_grows_expires_or_comes_back(lc: Lifecycle) -> None:
    run(lc, 100.0, {"a": "5", "b": "-2"})
    with pytest.raises(LifecycleError, match="zz does not violate it now"):
        lc.acknowledge("payments", INV, ["zz"], reason="r", author="t")
    ack = lc.acknowledge("payments", INV, None, reason="ZS-123 known gap", author="oncall", now=101.0)
    assert set(ack.entities) == {"a", "b"}

    quiet = run(lc, 115.0, {"a": "5", "b": "-2"})
    assert quiet.violation_counts == {INV: 2} and quiet.unacknowledged_counts == {INV: 0}
    assert quiet.oldest_unacknowledged == {}
    assert all(v.to_dict()["acknowledgement"]["reason"] == "ZS-123 known gap" for v in quiet.violations)

    # a new violator of the same invariant pages, the acknowledged ones stay quiet
    with_new = run(lc, 130.0, {"a": "5", "b": "-2", "c": "1"})
    assert with_new.unacknowledged_counts == {INV: 1} and with_new.oldest_unacknowledged == {INV: 130.0}

    # b's difference grows beyond what was acknowledged: it pages again
    grown = run(lc, 145.0, {"a": "4", "b": "-3", "c": "1"})
    assert grown.acknowledged_counts == {INV: 1}  # a shrank: still acknowledged
    assert [a.entities for a in lc.acks("payments")] == [{"a": "5"}]

    # a resolves and comes back: the acknowledgement no longer covers it
    run(lc, 160.0, {"b": "-3", "c": "1"})
    assert lc.acks("payments") == []  # every acknowledged entity left: the acknowledgement is closed
    back = run(lc, 175.0, {"a": "5", "b": "-3", "c": "1"})
    assert back.unacknowledged_counts == {INV: 3}


def test_expiry_and_revocation(lc: Lifecycle) -> None:
    run(lc, 100.0, {"a": "5"})
    ack = lc.acknowledge("payments", INV, ["a"], reason="until friday", author="oncall", expires_in=60, now=100.0)
    assert run(lc, 115.0, {"a": "5"}).unacknowledged_counts == {INV: 0}
    expired = run(lc, 161.0, {"a": "5"})
    assert expired.unacknowledged_counts == {INV: 1}
    assert lc.acks() == []  # the expiry removed it (and logged ack_expired)

    ack = lc.acknowledge("payments", INV, ["a"], reason="again", author="oncall", now=170.0)
    assert run(lc, 175.0, {"a": "5"}).unacknowledged_counts == {INV: 0}
    lc.revoke(ack.id, author="lead")
    assert run(lc, 190.0, {"a": "5"}).unacknowledged_counts == {INV: 1}
    with pytest.raises(LifecycleError, match="no acknowledgement"):
        lc.revoke(ack.id, author="lead")


def test_an_age_that_grows_keeps_its_acknowledgement(lc: Lifecycle) -> None:
    """An invariant whose difference is an age (seconds past a deadline): growth alone does not page."""
    def aged(at: float, diff: str) -> CheckResult:
        result = CheckResult("auctions", "fail", started_at=at, violation_counts={"stale_open_auction": 1},
                             violations=[Violation("stale_open_auction", "auction", "a1", difference=Decimal(diff))])
        new = lc.record(result, {"stale_open_auction": Observed(1, {"a1": Decimal(diff)}, age=True)})
        return lc.annotate(result, new, now=at)

    aged(100.0, "600")
    lc.acknowledge("auctions", "stale_open_auction", ["a1"], reason="closer replaced Friday", author="t", now=100.0)
    assert aged(130.0, "630").unacknowledged_counts == {"stale_open_auction": 0}
    assert [a.entities for a in lc.acks("auctions")] == [{"a1": "600"}]


@pytest.mark.parametrize("acked, now, grew", [
    ("5", "5", False), ("5", "4", False), ("5", "6", True), ("-5", "-6", True), ("5", "-1", True),
    (None, None, False), (None, "1", True), ("1", None, True),
])
def test_grew_beyond(acked, now, grew) -> None:
    assert grew_beyond(acked, now) is grew
