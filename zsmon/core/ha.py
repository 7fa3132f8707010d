"""High availability: N replicas, each job run by exactly one of them, through Redis leases.

Leases
  Every scheduled job (``check:<name>``, ``export:<name>``) has a lease: the Redis
  key ``<prefix>ha:lease:<job>`` holding ``<identity>#<instance>|<token>`` (the
  instance token is new for every process, so a second live process with the same
  identity is noticed and takes no lease), set with
  ``NX PX lease_ms``. The token comes from ``INCR <prefix>ha:fence:<job>``, so every
  new holder gets a larger one; a counter lost with Redis' data is seeded again from
  Redis' clock (microseconds), so tokens stay monotonic across a restart. Leadership
  is sticky: the holder renews all its
  leases every third of ``lease_seconds`` from a background thread (so a run longer
  than the lease keeps it), and a replica whose turn comes while another holds the
  lease skips the run. The same thread acquires free leases, so when a holder dies
  (or is paused past its lease) another replica takes its jobs over within
  ``lease_seconds`` plus a third of it, and runs them at once if their latest result
  is older than one interval.

Health
  A lease goes to who can do the work: a replica whose database health probe fails
  releases its leases and takes none until the probe succeeds (``database_down``), so a
  replica whose database answers takes the jobs over. On shutdown (``close``/``stop``)
  no lease is taken, held ones are renewed until the process's runs have ended and only
  then released (else left to lapse): the next holder's run never overlaps.

Fencing
  A paused or partitioned leader may wake up with a result computed under a lease it
  has lost. Publishing is conditional on the lease still holding its token, checked
  and written in one Lua script: a stale leader's result is discarded, never shown.
  Locally, a replica also stops considering itself leader once the lease it last
  renewed would have expired (monotonic clock), even before Redis tells it so.

Publishing without double counting
  The leader writes each result to ``<prefix>ha:result:<checker>``; every replica
  pulls those into its result store, so the API and the status page answer the same
  on every replica, with the producing replica's identity in ``producer``.
  ``/metrics`` is different: Prometheus scrapes every replica, so the platform-state
  series (invariant results, exporter families, a checker's own metrics) are
  exported only by the replica holding that job's lease. ``sum``/``max`` over
  instances therefore count each violation once. Counters of runs
  (``zerostate_invariant_check_runs_total``) are per replica and only grow where runs
  happen, so ``sum(rate(...))`` is the cluster's rate. ``zsmon_*`` series describe
  each replica itself and are exported by all.

Without Redis
  Leases cannot be held. ``ha.on_redis_down: run_locally`` (default) keeps every
  replica running every job on its own, exporting its own results (duplicated series
  until Redis is back, ``zsmon_ha_degraded 1``): a monitor that goes blind during a
  Redis outage would miss the very violation it exists for, while running a
  read-only check twice costs only database time. ``stand_by`` runs nothing until
  Redis answers, for deployments where duplicate load is the worse evil.
"""
from __future__ import annotations

import json
import math
import os
import secrets
import socket
import threading
import time
from typing import Any, Callable, Iterable

import redis
from prometheus_client.core import GaugeMetricFamily

from zsmon.core.config import Config, ConfigError
from zsmon.core.logging import get_logger
from zsmon.core.metrics import CachedFamilies
from zsmon.core.redis import make_redis, redis_error
from zsmon.core.results import CheckResult
from zsmon.core.store import ResultStore

log = get_logger("zsmon.ha")

# KEYS[1] lease, KEYS[2] fence counter; ARGV[1] owner (identity#instance), ARGV[2] lease ms.
# Returns the lease's value: ours if we got (or already had) it, the holder's otherwise.
_ACQUIRE = """
local cur = redis.call('GET', KEYS[1])
if cur then
  if string.sub(cur, 1, #ARGV[1] + 1) == ARGV[1] .. '|' then
    redis.call('PEXPIRE', KEYS[1], ARGV[2])
  end
  return cur
end
if redis.call('EXISTS', KEYS[2]) == 0 then
  -- A fence counter that is gone (Redis restarted empty) starts again above every token handed out before:
  -- at Redis' clock in microseconds, which no count of takeovers since an earlier seed can have reached.
  if redis.replicate_commands then redis.replicate_commands() end
  local now = redis.call('TIME')
  redis.call('SET', KEYS[2], string.format('%d', tonumber(now[1]) * 1000000 + tonumber(now[2])))
end
local token = redis.call('INCR', KEYS[2])
local value = ARGV[1] .. '|' .. string.format('%d', token)
redis.call('SET', KEYS[1], value, 'PX', ARGV[2])
return value
"""
# KEYS[1] lease; ARGV[1] expected value, ARGV[2] lease ms.
_RENEW = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('PEXPIRE', KEYS[1], ARGV[2])
end
return 0
"""
_STILL = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return 1 end
return 0
"""
# KEYS[1] lease, KEYS[2] result; ARGV[1] expected lease value, ARGV[2] result JSON, ARGV[3] ttl ms.
_PUBLISH = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
  redis.call('SET', KEYS[2], ARGV[2], 'PX', ARGV[3])
  return 1
end
return 0
"""
_RELEASE = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""

RESULT_TTL_MS = 7 * 24 * 3600 * 1000
LOCAL = "local"  # the token of a run made without Redis (on_redis_down: run_locally)


def default_identity() -> str:
    return f"{socket.gethostname()}-{os.getpid()}"


def new_instance() -> str:
    """This process's token beside its identity in every lease value: start time (ms, hex) then random.

    Two processes configured with one ``ha.identity`` are told apart by it, and the comparison of two
    tokens says which started later (that one refuses to lead: ``RedisCoordinator._foreign``)."""
    return f"{int(time.time() * 1000):012x}{secrets.token_hex(4)}"


class RedisCoordinator:
    """Per-job Redis leases with fencing tokens; the runner's ``coordinator``."""

    def __init__(self, client: redis.Redis, *, key_prefix: str | Callable[[], str | None], lease_seconds: float,
                 identity: str | None = None,
                 on_redis_down: str = "run_locally", store: ResultStore | None = None,
                 on_acquired: Callable[[str], None] | None = None) -> None:
        self.redis = client
        # The deployment's key prefix, or what resolves it: no lease is taken before it is known, so two
        # deployments sharing a Redis never contend (zsmon.core.deployment).
        self._prefix = key_prefix
        self.lease_seconds = lease_seconds
        self.lease_ms = max(1, int(lease_seconds * 1000))
        self.identity = identity or default_identity()
        # The lease's owner is the identity plus this process's instance token: a second process started
        # with the same ha.identity is seen, not silently taken for this one.
        self.instance = new_instance()
        self.owner = f"{self.identity}#{self.instance}"
        self.on_redis_down = on_redis_down
        self.store = store
        self.on_acquired = on_acquired
        # Called when what this replica exports changes (a lease taken or lost, Redis lost or back):
        # the service re-renders /metrics, which is otherwise rendered only after jobs.
        self.on_change: Callable[[], None] | None = None
        # Called with a job whose lease this replica found lost (lapsed or taken over) while it may still be
        # running it: the runner abandons that run rather than finishing work nobody will see.
        self.on_lost: Callable[[str], None] | None = None
        self.tick_seconds = max(0.1, lease_seconds / 3)
        self._lock = threading.Lock()
        self._held: dict[str, tuple[str, float]] = {}  # job -> (lease value, valid until on the monotonic clock)
        self._jobs: set[str] = set()
        self._degraded: str | None = None  # the reason, while Redis does not answer
        self._blind: str | None = None  # why this replica's own database probe fails, while it does
        self._duplicate: str | None = None  # set once another live process holds leases under our identity
        self._foreign_seen: dict[str, tuple[str, float]] = {}  # job -> (a lease of our identity, other instance;
        #                                                         first seen, monotonic)
        self._duplicate_warned = False
        self._closing = False  # shutting down: no new lease, held ones renewed until released
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._scripts = {name: client.register_script(src) for name, src in (
            ("acquire", _ACQUIRE), ("renew", _RENEW), ("still", _STILL), ("publish", _PUBLISH),
            ("release", _RELEASE))}

    # ---- keys ------------------------------------------------------------------
    @property
    def prefix(self) -> str | None:
        return self._prefix() if callable(self._prefix) else self._prefix

    def _lease_key(self, job: str) -> str:
        return f"{self.prefix}ha:lease:{job}"

    def _fence_key(self, job: str) -> str:
        return f"{self.prefix}ha:fence:{job}"

    def _result_key(self, checker: str) -> str:
        return f"{self.prefix}ha:result:{checker}"

    # ---- Redis health ------------------------------------------------------------
    def _redis_failed(self, exc: BaseException) -> None:
        reason = redis_error(exc)
        if self._degraded is None:
            what = ("every replica runs every job on its own until it is back" if self.on_redis_down == "run_locally"
                    else "this replica runs nothing until it is back (ha.on_redis_down: stand_by)")
            log.error("ha_degraded", error=reason, policy=self.on_redis_down,
                      detail=f"leases unavailable: {what}")
        changed = self._degraded is None or bool(self._held)
        self._degraded = reason
        with self._lock:
            self._held.clear()
        if changed:
            self._changed()

    def _redis_ok(self) -> None:
        if self._degraded is not None:
            log.warning("ha_restored", detail="Redis answers again: leases resume")
            self._degraded = None
            self._changed()

    def _changed(self) -> None:
        if self.on_change is not None:
            try:
                self.on_change()
            except Exception:
                log.exception("ha_on_change_failed")

    @property
    def degraded(self) -> bool:
        return self._degraded is not None

    @property
    def problem(self) -> str | None:
        """Why this replica will not lead at all (for /ready), or None."""
        return self._duplicate

    # ---- this replica's own path to the database ------------------------------------------
    def database_down(self, reason: str) -> None:
        """This replica's database probe failed: give up every lease now, so a replica whose database
        answers takes the jobs over at its next tick, and take none until the probe succeeds again.

        Leases are about who can do the work: a leader that cannot reach the database would otherwise
        renew them forever and produce only errors while a healthy replica stands by."""
        if self._blind is None:
            with self._lock:
                held = sorted(self._held)
            log.error("ha_leases_released_database_down", error=reason, jobs=held,
                      detail="this replica cannot reach the database: it gives up its leases and takes none "
                             "until its database answers again")
        self._blind = reason
        self._release_all()

    def database_up(self) -> None:
        if self._blind is not None:
            log.info("ha_database_back", detail="the database answers this replica again: it takes free "
                                                "leases again")
            self._blind = None

    def _release_all(self) -> None:
        with self._lock:
            held = dict(self._held)
            self._held.clear()
        if self.prefix is not None:
            for job, (value, _) in held.items():
                try:
                    self._scripts["release"](keys=[self._lease_key(job)], args=[value])
                except redis.RedisError as exc:
                    self._redis_failed(exc)
                    break
        if held:
            self._changed()

    # ---- the runner's contract -------------------------------------------------------
    def acquire(self, job: str) -> Any:
        """A token when this replica may run ``job`` now, else None."""
        with self._lock:
            self._jobs.add(job)
        if self._closing or self._duplicate is not None:
            return None
        if self._degraded is not None:
            return LOCAL if self.on_redis_down == "run_locally" else None
        if self.prefix is None:
            # The database has never answered, so whose lease this is is unknown. Run locally: the run
            # fails on the database and says so (check_up 0, /ready), which is better than a blind spot.
            return LOCAL
        if self._blind is not None:
            return None  # left to a replica whose database answers
        sent = time.monotonic()
        try:
            value = self._scripts["acquire"](keys=[self._lease_key(job), self._fence_key(job)],
                                             args=[self.owner, self.lease_ms])
        except redis.RedisError as exc:
            self._redis_failed(exc)
            return LOCAL if self.on_redis_down == "run_locally" else None
        self._redis_ok()
        if value.rsplit("|", 1)[0] != self.owner:
            with self._lock:
                lost = self._held.pop(job, None) is not None
            if lost:
                self._changed()
            self._foreign(job, value)
            return None
        with self._lock:
            new = job not in self._held
            self._held[job] = (value, sent + self.lease_seconds * 0.9)
            self._foreign_seen.pop(job, None)
        if new:
            log.info("ha_lease_acquired", job=job, fence=int(value.rsplit("|", 1)[1]), identity=self.identity)
            self._changed()
        return value

    def _foreign(self, job: str, value: str) -> None:
        """Another holder: nothing to do, unless it is another live process with this replica's identity."""
        identity, _, instance = value.rsplit("|", 1)[0].rpartition("#")
        if identity != self.identity or self._duplicate is not None:
            self._foreign_seen.pop(job, None)
            return
        now = time.monotonic()
        seen = self._foreign_seen.get(job)
        if seen is None or seen[0] != value:
            self._foreign_seen[job] = (value, now)
            return
        # The very same lease value again after more than a lease: it was renewed, so its holder is alive
        # (a dead process's lease, e.g. this pod's previous container, expires within lease_seconds).
        if now - seen[1] <= self.lease_seconds * 1.1:
            return
        if instance < self.instance:  # the other process started first: this one gives way
            self._duplicate = (f"another running zsmon process uses ha.identity {self.identity!r}: "
                               "this one takes no lease (give every replica its own identity)")
            log.error("ha_duplicate_identity", identity=self.identity, detail=self._duplicate)
            self._release_all()
        elif not self._duplicate_warned:
            self._duplicate_warned = True
            log.error("ha_duplicate_identity", identity=self.identity,
                      detail="a later zsmon process uses this replica's ha.identity: it takes no lease; give "
                             "every replica its own identity")

    def still_leader(self, job: str, token: Any) -> bool:
        if token == LOCAL:
            return True
        try:
            return bool(self._scripts["still"](keys=[self._lease_key(job)], args=[token]))
        except redis.RedisError as exc:
            self._redis_failed(exc)
            return False

    def publish(self, job: str, token: Any, result: CheckResult) -> bool:
        """Fenced publish: write the shared result only while the lease still holds ``token``.

        False when the result must not be shown; the reason is logged here, where it is known."""
        if token == LOCAL:
            return True
        try:
            ok = bool(self._scripts["publish"](
                keys=[self._lease_key(job), self._result_key(result.checker)],
                args=[token, json.dumps(result.to_dict(), sort_keys=True), RESULT_TTL_MS]))
        except redis.RedisError as exc:
            self._redis_failed(exc)
            cause = f"Redis unavailable at publish: {redis_error(exc)}"
            if self.on_redis_down == "run_locally":
                # Like a run that started after Redis died: every replica now runs and shows its own.
                log.warning("result_kept_locally", checker=result.checker, cause=cause,
                            detail="ha.on_redis_down: run_locally: shown by this replica, not shared")
                return True
            # The lease cannot be confirmed: publishing could show a stale result next to a new leader's.
            log.warning("result_discarded", checker=result.checker, cause=f"{cause} (ha.on_redis_down: stand_by)")
            return False
        if not ok:
            with self._lock:
                self._held.pop(job, None)
            log.warning("ha_lease_lost", job=job, checker=result.checker,
                        detail="result discarded: the lease lapsed while it ran and another replica may hold it "
                               "(this replica was paused, partitioned or gave the lease up)")
            self._changed()
        return ok

    def result_due(self, checker: str, every: float) -> bool:
        """Whether a replica taking ``checker`` over should run it at once: no good result started within
        the last ``every`` seconds. Another replica's result is aged on Redis' clock (its key's TTL counts
        down from publishing), never by comparing two machines' wall clocks."""
        latest = self.store.state(checker).latest if self.store is not None else None
        if latest is None or latest.status == "error":
            return True
        started_ago = time.time() - latest.started_at
        if latest.producer != self.identity and self.prefix is not None:
            try:
                ttl = self.redis.pttl(self._result_key(checker))
            except redis.RedisError:
                ttl = None
            if isinstance(ttl, int) and ttl >= 0:
                started_ago = (RESULT_TTL_MS - ttl) / 1000 + latest.duration_seconds
        return started_ago >= every

    def leads(self, job: str) -> bool:
        """Whether this replica exports ``job``'s series now (local view, no Redis round trip)."""
        if self._degraded is not None:
            return self.on_redis_down == "run_locally"
        with self._lock:
            held = self._held.get(job)
        return held is not None and time.monotonic() < held[1]

    def valid_until(self) -> float:
        """Monotonic time at which the first lease held now lapses unless renewed (inf: none held). What
        this replica exports may change then without any event: /metrics renders again past it."""
        if self._degraded is not None:
            return math.inf
        now = time.monotonic()
        with self._lock:
            return min((until for _, until in self._held.values() if until > now), default=math.inf)

    # ---- the background loop: renew, take over, share results ------------------------------
    def watch(self, jobs: Iterable[str]) -> None:
        with self._lock:
            self._jobs.update(jobs)

    def start(self) -> None:
        self._thread = threading.Thread(target=self._loop, name="zsmon-ha", daemon=True)
        self._thread.start()

    def close(self) -> None:
        """Shutdown begins: take no new lease; the held ones are still renewed until ``stop``."""
        self._closing = True

    def stop(self, release: bool = True) -> None:
        """Stop renewing; ``release`` hands the leases over at once (only when no run of this replica can
        still publish), else they lapse after ``lease_seconds``."""
        self._closing = True
        self._stop.set()
        if self._thread is not None:
            self._thread.join(5)
        if release:
            self._release_all()
        else:
            with self._lock:
                held = sorted(self._held)
            if held:
                log.warning("ha_leases_left_to_lapse", jobs=held, lease_seconds=self.lease_seconds,
                            detail="a run was still in progress: its leases expire instead of being released")
        self.redis.close()

    def _loop(self) -> None:
        while not self._stop.is_set():
            try:
                self.tick()
            except Exception:  # never let the HA thread die
                log.exception("ha_tick_failed")
            self._stop.wait(self.tick_seconds)

    def tick(self) -> None:
        """One round: renew held leases, acquire free ones, pull shared results."""
        if self._degraded is not None:
            try:
                self.redis.ping()
            except redis.RedisError as exc:
                self._redis_failed(exc)
                return
            self._redis_ok()
        with self._lock:
            jobs = sorted(self._jobs)
            held = dict(self._held)
        if self.prefix is None:  # no lease before the deployment is known; Redis' health is still watched
            try:
                self.redis.ping()
            except redis.RedisError as exc:
                self._redis_failed(exc)
            return
        try:
            for job in jobs:
                if job in held:
                    sent = time.monotonic()
                    if self._scripts["renew"](keys=[self._lease_key(job)], args=[held[job][0], self.lease_ms]):
                        with self._lock:
                            if job in self._held:
                                self._held[job] = (held[job][0], sent + self.lease_seconds * 0.9)
                        continue
                    with self._lock:
                        self._held.pop(job, None)
                    log.warning("ha_lease_lost", job=job, detail="lease expired or taken over (paused?)")
                    self._changed()
                    if self.on_lost is not None:
                        try:
                            self.on_lost(job)
                        except Exception:
                            log.exception("ha_on_lost_failed", job=job)
                if self.acquire(job) and job not in held and self.on_acquired is not None:
                    try:
                        self.on_acquired(job)
                    except Exception:
                        log.exception("ha_on_acquired_failed", job=job)
            self.sync()
        except redis.RedisError as exc:
            self._redis_failed(exc)

    def sync(self) -> None:
        """Pull the leaders' latest results into this replica's store."""
        if self.store is None or self.prefix is None:
            return
        checkers = [j.split(":", 1)[1] for j in self._jobs if j.startswith("check:")]
        if not checkers:
            return
        values = self.redis.mget([self._result_key(c) for c in checkers])
        for checker, raw in zip(checkers, values):
            if not raw:
                continue
            try:
                shared = CheckResult.from_dict(json.loads(raw))
            except (ValueError, KeyError, TypeError):
                log.warning("ha_bad_shared_result", checker=checker)
                continue
            mine = self.store.state(checker).latest
            if mine is None or shared.started_at > mine.started_at:
                self.store.put(shared)

    # ---- metrics -------------------------------------------------------------------
    def collect(self) -> Iterable[Any]:
        leader = GaugeMetricFamily("zsmon_ha_leader", "1 when this replica holds the job's lease and exports its "
                                   "series.", labels=["scheduler_job"])
        with self._lock:
            jobs = sorted(self._jobs)
        for job in jobs:
            leader.add_metric([job], 1.0 if self.leads(job) else 0.0)
        degraded = GaugeMetricFamily("zsmon_ha_degraded", "1 while Redis is unreachable and leases cannot be held.")
        degraded.add_metric([], 1.0 if self.degraded else 0.0)
        yield leader
        yield degraded


# ---- exporting only what this replica leads ----------------------------------------------------
class LeasedFamilies(CachedFamilies):
    """Exporter families, served only by the replica holding the exporter's lease."""

    def __init__(self, leads: Callable[[str], bool]) -> None:
        super().__init__()
        self.leads = leads

    def collect(self) -> Iterable[Any]:
        with self._lock:
            snapshot = list(self._families.items())
        for name, families in sorted(snapshot, key=lambda kv: kv[0]):
            if self.leads(f"export:{name}"):
                yield from families


class LeaderOnly:
    """Wraps a checker's own metrics (a registry of its own) so only the lease holder exports them."""

    def __init__(self, registry: Any, leads: Callable[[], bool]) -> None:
        self.registry = registry
        self.leads = leads

    def collect(self) -> Iterable[Any]:
        if self.leads():
            yield from self.registry.collect()


def make_coordinator(config: Config, store: ResultStore, key_prefix: Callable[[], str | None],
                     on_acquired: Callable[[str], None] | None = None) -> RedisCoordinator:
    """The Redis coordinator; ``key_prefix`` resolves the deployment's prefix (zsmon.core.deployment)."""
    client = make_redis(config.redis)
    if client is None:
        raise ConfigError("ha.enabled needs Redis: set REDIS_HOST (redis.enabled must be true)")
    return RedisCoordinator(client, key_prefix=key_prefix, lease_seconds=config.ha.lease_seconds,
                            identity=config.ha.identity, on_redis_down=config.ha.on_redis_down, store=store,
                            on_acquired=on_acquired)
