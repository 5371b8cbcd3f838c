"""The per-worker health state machine (pure, no clock)."""

from __future__ import annotations

import pytest

from pdxfer.proxy.health import HealthEvent, HealthState, HealthTracker


def test_starts_up() -> None:
    h = HealthTracker()
    assert h.up and h.state is HealthState.UP


def test_probe_failures_take_it_down_after_threshold() -> None:
    h = HealthTracker(unhealthy_after=3, healthy_after=2)
    assert h.probe_failed("x") is None
    assert h.probe_failed("x") is None
    t = h.probe_failed("refused")
    assert t is not None and (t.old, t.new, t.event) == (HealthState.UP, HealthState.DOWN, HealthEvent.PROBE_FAILED)
    assert not h.up and h.last_error == "refused"


def test_a_good_probe_resets_the_failure_streak() -> None:
    h = HealthTracker(unhealthy_after=2)
    h.probe_failed("x")
    h.probe_ok()
    assert h.probe_failed("x") is None
    assert h.up


def test_request_failure_takes_it_down_at_once() -> None:
    h = HealthTracker(unhealthy_after=5)
    t = h.request_failed("connection refused")
    assert t is not None and t.new is HealthState.DOWN and t.event is HealthEvent.REQUEST_FAILED
    assert h.request_failed("again") is None  # already down: no transition


def test_comes_back_after_healthy_streak() -> None:
    h = HealthTracker(unhealthy_after=1, healthy_after=2)
    h.probe_failed("x")
    assert not h.up
    assert h.probe_ok() is None
    h.probe_failed("flap")  # resets the good streak
    assert h.probe_ok() is None
    t = h.probe_ok()
    assert t is not None and t.new is HealthState.UP
    assert h.up and h.last_error is None


def test_full_cycle_counts_reset_on_transition() -> None:
    h = HealthTracker(unhealthy_after=2, healthy_after=1)
    for _ in range(3):
        h.probe_failed("a")
        h.probe_failed("b")
        assert not h.up
        h.probe_ok()
        assert h.up
        assert h.fail_streak == 0 and h.ok_streak == 0


def test_thresholds_validated() -> None:
    with pytest.raises(ValueError):
        HealthTracker(unhealthy_after=0)
    with pytest.raises(ValueError):
        HealthTracker(healthy_after=0)
