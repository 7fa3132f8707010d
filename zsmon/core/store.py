"""The latest results, per checker, that /metrics, the API and the status page read.

Single-process by default; the HA coordinator (core/ha.py) can mirror results
through Redis so every replica serves the leader's results.
"""
from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

from zsmon.core.results import CheckResult


@dataclass
class CheckerState:
    latest: CheckResult | None = None
    # The latest run that completed (pass or fail): its counts are the current truth.
    completed: CheckResult | None = None
    last_success_timestamp: float | None = None
    last_full_timestamp: float | None = None


class ResultStore:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._states: dict[str, CheckerState] = {}
        self.generation = 0  # grows with every put: lets /metrics tell its rendered bytes are behind
        self.on_put: Callable[[int], None] | None = None  # told each new generation, under the lock

    def put(self, result: CheckResult) -> None:
        with self._lock:
            self.generation += 1
            if self.on_put is not None:
                self.on_put(self.generation)
            state = self._states.setdefault(result.checker, CheckerState())
            state.latest = result
            if result.status != "error":
                state.completed = result
                state.last_success_timestamp = result.started_at + result.duration_seconds
                if result.mode == "full":
                    state.last_full_timestamp = result.started_at
            self._states[result.checker] = state

    def state(self, checker: str) -> CheckerState:
        with self._lock:
            s = self._states.get(checker)
            return CheckerState(s.latest, s.completed, s.last_success_timestamp, s.last_full_timestamp) if s else CheckerState()

    def states(self) -> dict[str, CheckerState]:
        with self._lock:
            return {k: CheckerState(v.latest, v.completed, v.last_success_timestamp, v.last_full_timestamp)
                    for k, v in self._states.items()}

    def latest(self) -> list[CheckResult]:
        return [s.latest for _, s in sorted(self.states().items()) if s.latest is not None]

    def age(self, checker: str) -> float | None:
        s = self.state(checker)
        return None if s.last_success_timestamp is None else time.time() - s.last_success_timestamp
