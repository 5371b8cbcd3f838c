"""Helpers shared by the AdmissionController tests: a small controller, and reserve
calls that assert their outcome and re-check every invariant."""

from __future__ import annotations

from pdxfer.admission import AdmissionController, Ended, Grant, Granted, Queued, ReservationState

A = 4096
S = ReservationState


def ctl(pages: int = 10, **kw: object) -> AdmissionController:
    return AdmissionController(pages * A, **kw)  # type: ignore[arg-type]


def grant(c: AdmissionController, tid: str, nbytes: int, *, peer: str = "p", now: float = 0.0, deadline: float = 100.0) -> Grant:
    r = c.reserve(tid, peer, nbytes, now=now, deadline=deadline)
    assert isinstance(r, Grant), r
    c._check_invariants()
    return r


def queue(c: AdmissionController, tid: str, nbytes: int, *, peer: str = "p", now: float = 0.0, deadline: float = 100.0) -> Queued:
    r = c.reserve(tid, peer, nbytes, now=now, deadline=deadline)
    assert isinstance(r, Queued), r
    c._check_invariants()
    return r


def ended(events: list) -> dict[str, Ended]:
    return {e.transfer_id: e for e in events if isinstance(e, Ended)}


def granted(events: list) -> list[str]:
    return [e.grant.transfer_id for e in events if isinstance(e, Granted)]
