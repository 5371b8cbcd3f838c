"""Per-worker health: a small state machine, written as a table, with no I/O and no clock.

Everything that changes a worker's health state lives in ``_TRANSITIONS``. Inputs:

* ``probe_ok`` / ``probe_failed`` — the active checker's ``GET /health`` result;
* ``request_failed`` — a request could not reach the worker, or the worker dropped a
  connection mid-response (passive evidence: it takes the worker out at once; the active
  checker, woken at once, brings it back when it answers again).

States: ``UP`` (routable) and ``DOWN`` (not routable). A worker starts ``UP`` (the proxy
probes every worker when it starts, before the first request normally arrives).
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum


class HealthState(str, Enum):
    UP = "up"
    DOWN = "down"


class HealthEvent(str, Enum):
    PROBE_OK = "probe_ok"
    PROBE_FAILED = "probe_failed"
    REQUEST_FAILED = "request_failed"


# (state, event) -> what to do: "reset" counters and stay, "count_fail" / "count_ok"
# (move when the streak reaches its threshold), or "down" (move at once).
_TRANSITIONS: dict[tuple[HealthState, HealthEvent], str] = {
    (HealthState.UP, HealthEvent.PROBE_OK): "reset",
    (HealthState.UP, HealthEvent.PROBE_FAILED): "count_fail",
    (HealthState.UP, HealthEvent.REQUEST_FAILED): "down",
    (HealthState.DOWN, HealthEvent.PROBE_OK): "count_ok",
    (HealthState.DOWN, HealthEvent.PROBE_FAILED): "reset",
    (HealthState.DOWN, HealthEvent.REQUEST_FAILED): "reset",
}


@dataclass(frozen=True)
class Transition:
    old: HealthState
    new: HealthState
    event: HealthEvent
    reason: str | None


class HealthTracker:
    def __init__(self, unhealthy_after: int = 2, healthy_after: int = 1) -> None:
        if unhealthy_after < 1 or healthy_after < 1:
            raise ValueError("thresholds must be >= 1")
        self.unhealthy_after = unhealthy_after
        self.healthy_after = healthy_after
        self.state = HealthState.UP
        self.fail_streak = 0
        self.ok_streak = 0
        self.last_error: str | None = None

    @property
    def up(self) -> bool:
        return self.state is HealthState.UP

    def probe_ok(self) -> Transition | None:
        return self._apply(HealthEvent.PROBE_OK, None)

    def probe_failed(self, reason: str) -> Transition | None:
        return self._apply(HealthEvent.PROBE_FAILED, reason)

    def request_failed(self, reason: str) -> Transition | None:
        return self._apply(HealthEvent.REQUEST_FAILED, reason)

    def _apply(self, event: HealthEvent, reason: str | None) -> Transition | None:
        action = _TRANSITIONS[(self.state, event)]
        if reason is not None:
            self.last_error = reason
        old = self.state
        if action == "reset":
            self.fail_streak = 0
            self.ok_streak = 0
        elif action == "count_fail":
            self.fail_streak += 1
            if self.fail_streak >= self.unhealthy_after:
                self.state = HealthState.DOWN
        elif action == "count_ok":
            self.ok_streak += 1
            if self.ok_streak >= self.healthy_after:
                self.state = HealthState.UP
        elif action == "down":
            self.state = HealthState.DOWN
        else:  # pragma: no cover - the table only holds the actions above
            raise AssertionError(action)
        if self.state is old:
            return None
        self.fail_streak = 0
        self.ok_streak = 0
        if self.state is HealthState.UP:
            self.last_error = None
        return Transition(old, self.state, event, reason)
