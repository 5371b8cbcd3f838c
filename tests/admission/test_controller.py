"""AdmissionController: one test per rule, plus a 1,000-transfer scenario (leases and
deadlines: test_controller_deadlines.py).

Time is a plain float passed in; no test looks at the wall clock.
"""

from __future__ import annotations

import json
import random

import pytest

from pdxfer.admission import (
    AdmissionController,
    AdmissionStateError,
    Ended,
    EndReason,
    Grant,
    Granted,
    Queued,
    Rejected,
)
from pdxfer.errors import PdxferError, RejectReason
from tests.admission.controller_support import A, S, ctl, ended, grant, granted, queue


# -- reserve ---------------------------------------------------------------------------


def test_grant_reports_offset_requested_and_allocated_sizes() -> None:
    c = ctl()
    g = grant(c, "t1", 5000, now=1.0)
    assert g == Grant("t1", "p", 0, 5000, 11.0)
    v = c.get("t1")
    assert v is not None and v.state is S.GRANTED and v.nbytes == 5000 and v.allocated == 2 * A
    assert v.lease_deadline == 11.0 and v.deadline == 100.0 and v.claim_deadline is None
    g2 = grant(c, "t2", 1)
    assert g2.offset == 2 * A
    led = c.snapshot()
    assert led.reserved_bytes == 3 * A and led.free_bytes == 7 * A and led.granted_count == 2
    assert led.counters["granted_total"] == 2


@pytest.mark.parametrize(
    ("tid", "nbytes", "now", "deadline"),
    [
        ("t", 0, 0.0, 1.0),
        ("t", -1, 0.0, 1.0),
        ("t", 1.5, 0.0, 1.0),
        ("t", True, 0.0, 1.0),
        ("t", 10, 5.0, 5.0),  # deadline == now
        ("t", 10, 5.0, 4.0),  # deadline in the past
        ("t", 10, 0.0, float("nan")),
        ("t", 10, 0.0, float("inf")),  # everything has a deadline
        ("", 10, 0.0, 1.0),
    ],
)
def test_bad_requests_are_rejected(tid: str, nbytes: int, now: float, deadline: float) -> None:
    c = ctl()
    r = c.reserve(tid, "p", nbytes, now=now, deadline=deadline)
    assert isinstance(r, Rejected) and r.reason is RejectReason.BAD_REQUEST and r.detail
    assert c.snapshot().counters["rejected_bad_request"] == 1
    assert c.snapshot().reservations == ()
    c._check_invariants()


def test_duplicate_in_every_live_state_but_ids_of_ended_ones_are_reusable() -> None:
    c = ctl(2)
    grant(c, "g", A)
    grant(c, "d", A)
    c.deliver("d", now=0, claim_deadline=50)
    queue(c, "q", A)
    for tid in ("g", "d", "q"):
        r = c.reserve(tid, "other", 1, now=0, deadline=10)
        assert isinstance(r, Rejected) and r.reason is RejectReason.DUPLICATE
    assert c.snapshot().counters["rejected_duplicate"] == 3
    c.abort("q", EndReason.ABORTED, now=1)
    assert isinstance(c.reserve("q", "p", A, now=1, deadline=10), Queued)
    events = c.abort("g", EndReason.ABORTED, now=1)
    assert granted(events) == ["q"]
    assert isinstance(c.reserve("g", "p", A, now=1, deadline=10), Queued)
    c._check_invariants()


def test_too_large_is_rejected_at_once_even_by_one_byte() -> None:
    c = ctl(4)
    r = c.reserve("big", "p", 4 * A + 1, now=0, deadline=10)
    assert isinstance(r, Rejected) and r.reason is RejectReason.TOO_LARGE
    assert c.snapshot().waiting_count == 0
    grant(c, "exact", 4 * A)  # the whole region is fine


def test_too_large_uses_the_aligned_size() -> None:
    c = AdmissionController(3 * A + 100)  # unaligned capacity
    r = c.reserve("t", "p", 3 * A + 50, now=0, deadline=10)  # fits bytes, not aligned size
    assert isinstance(r, Rejected) and r.reason is RejectReason.TOO_LARGE


def test_queue_full() -> None:
    c = ctl(1, max_queue=2)
    grant(c, "a", A)
    queue(c, "b", 1)
    queue(c, "c", 1)
    r = c.reserve("d", "p", 1, now=0, deadline=10)
    assert isinstance(r, Rejected) and r.reason is RejectReason.QUEUE_FULL
    assert c.get("d") is None
    c._check_invariants()


def test_max_queue_zero_still_grants_what_fits() -> None:
    c = ctl(1, max_queue=0)
    grant(c, "a", A)
    r = c.reserve("b", "p", 1, now=0, deadline=10)
    assert isinstance(r, Rejected) and r.reason is RejectReason.QUEUE_FULL


def test_shutting_down_rejects_and_counts() -> None:
    c = ctl()
    c.shutdown(now=0)
    r = c.reserve("t", "p", 1, now=0, deadline=10)
    assert isinstance(r, Rejected) and r.reason is RejectReason.SHUTTING_DOWN
    assert c.snapshot().counters["rejected_shutting_down"] == 1 == c.snapshot().counters["rejected_total"]


# -- FIFO ------------------------------------------------------------------------------


def test_fits_now_but_waiters_ahead_means_queued() -> None:
    c = ctl(4)
    grant(c, "a", 3 * A)
    assert queue(c, "big", 2 * A).position == 0
    assert queue(c, "small", 1).position == 1  # one page is free, but big is ahead
    assert c.snapshot().free_bytes == A
    assert c.snapshot().waiting_bytes == 3 * A


def test_head_of_line_blocks_and_release_admits_in_order_on_the_same_call() -> None:
    c = ctl(4)
    grant(c, "a", 2 * A)
    grant(c, "b", 2 * A)
    queue(c, "big", 3 * A)
    queue(c, "s1", A)
    queue(c, "s2", A)
    c.deliver("a", now=1, claim_deadline=50)
    ev = c.release("a", now=2)  # 2 pages free: big (3) still blocked, so s1/s2 must wait too
    assert [type(e) for e in ev] == [Ended] and granted(ev) == []
    assert c.get("s1").state is S.QUEUED  # type: ignore[union-attr]
    ev = c.abort("b", EndReason.ABORTED, now=3)
    assert granted(ev) == ["big", "s1"]  # both on this very call, FIFO order
    g = ev[1].grant
    assert g.lease_deadline == 13.0
    assert c.get("s2").state is S.QUEUED  # type: ignore[union-attr]
    c._check_invariants()


def test_aborting_a_blocked_head_unblocks_the_next_waiter() -> None:
    c = ctl(4)
    grant(c, "a", 3 * A)
    queue(c, "big", 4 * A)
    queue(c, "small", A)
    ev = c.abort("big", EndReason.ABORTED, now=1)
    assert ended(ev)["big"].state is S.QUEUED and ended(ev)["big"].nbytes_freed == 0
    assert granted(ev) == ["small"]
    c._check_invariants()


def test_queue_positions_count_from_zero() -> None:
    c = ctl(1)
    grant(c, "a", A)
    assert [queue(c, f"q{i}", 1).position for i in range(4)] == [0, 1, 2, 3]


# -- peer loss and shutdown ------------------------------------------------------------


def test_peer_lost_ends_queued_and_granted_but_leaves_delivered() -> None:
    c = ctl(3)
    grant(c, "x_g", A, peer="X")
    grant(c, "x_d", A, peer="X")
    grant(c, "y_g", A, peer="Y")
    c.deliver("x_d", now=0, claim_deadline=100)
    queue(c, "x_q", 2 * A, peer="X")
    queue(c, "y_q", A, peer="Y")
    ev = c.peer_lost("X", now=1)
    e = ended(ev)
    assert set(e) == {"x_g", "x_q"}
    assert e["x_g"] == Ended("x_g", "X", EndReason.PEER_LOST, S.GRANTED, A)
    assert e["x_q"].state is S.QUEUED and e["x_q"].nbytes_freed == 0
    assert granted(ev) == ["y_q"]  # room freed by the lost peer is used on the same call
    assert c.get("x_d").state is S.DELIVERED  # type: ignore[union-attr]
    assert c.peer_lost("X", now=2) == []
    c._check_invariants()


def test_shutdown_ends_everything_exactly_once() -> None:
    c = ctl(2)
    grant(c, "g", A)
    grant(c, "d", A)
    c.deliver("d", now=0, claim_deadline=10)
    grant_claimed = "d"
    c.claim(grant_claimed)
    queue(c, "q", A)
    ev = c.shutdown(now=1)
    assert [(e.transfer_id, e.state, e.reason, e.nbytes_freed) for e in ev] == [
        ("g", S.GRANTED, EndReason.SHUTDOWN, A),
        ("d", S.DELIVERED, EndReason.SHUTDOWN, A),
        ("q", S.QUEUED, EndReason.SHUTDOWN, 0),
    ]
    assert c.shutdown(now=2) == []
    assert c.tick(100) == [] and c.next_deadline() is None
    led = c.snapshot()
    assert led.reserved_bytes == 0 and led.free_bytes == 2 * A and led.reservations == ()
    assert led.counters["ended_shutdown"] == 3 == led.counters["ended_total"]
    c._check_invariants()


# -- state errors ------------------------------------------------------------------------


_CALLS = {
    "deliver": lambda c: c.deliver("t", now=0, claim_deadline=5),
    "claim": lambda c: c.claim("t"),
    "release": lambda c: c.release("t", now=0),
    "abort": lambda c: c.abort("t", EndReason.ABORTED, now=0),
}


@pytest.mark.parametrize(
    ("setup", "method", "state"),
    [
        ("queued", "deliver", "QUEUED"),
        ("queued", "claim", "QUEUED"),
        ("queued", "release", "QUEUED"),
        ("granted", "claim", "GRANTED"),
        ("granted", "release", "GRANTED"),
        ("delivered", "deliver", "DELIVERED"),
        ("unknown", "release", "UNKNOWN"),
        ("unknown", "abort", "UNKNOWN"),
        ("unknown", "deliver", "UNKNOWN"),
        ("unknown", "claim", "UNKNOWN"),
    ],
)
def test_disallowed_calls_raise_naming_transfer_state_and_method(setup: str, method: str, state: str) -> None:
    c = ctl(1)
    if setup != "unknown":
        grant(c, "blocker" if setup == "queued" else "t", A)
        if setup == "queued":
            queue(c, "t", 1)
        if setup == "delivered":
            c.deliver("t", now=0, claim_deadline=5)
    before = c.snapshot()
    with pytest.raises(AdmissionStateError) as ei:
        _CALLS[method](c)
    err = ei.value
    assert isinstance(err, PdxferError) and err.transfer_id == "t"
    assert err.method == method
    msg = str(err)
    assert "transfer=t" in msg and state in msg and f"{method}()" in msg
    assert (err.state.name if err.state else "UNKNOWN") == state
    assert c.snapshot() == before  # a refused call changes nothing
    c._check_invariants()


def test_claim_twice_raises_and_ended_transfers_are_unknown() -> None:
    c = ctl(1)
    grant(c, "t", A)
    c.deliver("t", now=0, claim_deadline=5)
    c.claim("t")
    with pytest.raises(AdmissionStateError, match="already claimed"):
        c.claim("t")
    c.release("t", now=1)
    with pytest.raises(AdmissionStateError, match="UNKNOWN"):
        c.release("t", now=1)
    assert c.get("t") is None


def test_abort_works_in_every_live_state() -> None:
    c = ctl(3)
    grant(c, "g", A)
    grant(c, "d", A)
    c.deliver("d", now=0, claim_deadline=9)
    grant(c, "c", A)
    c.deliver("c", now=0, claim_deadline=9)
    c.claim("c")
    queue(c, "q", A)
    for tid, st in [("q", S.QUEUED), ("g", S.GRANTED), ("d", S.DELIVERED), ("c", S.DELIVERED)]:
        ev = c.abort(tid, EndReason.ABORTED, now=1)
        assert ended(ev)[tid].state is st and ended(ev)[tid].reason is EndReason.ABORTED
        c._check_invariants()
    assert c.snapshot().counters["ended_aborted"] == 4


def test_bad_constructor_arguments() -> None:
    for kw in [dict(lease_s=0), dict(lease_s=float("inf")), dict(max_queue=-1), dict(alignment=0)]:
        with pytest.raises(ValueError):
            AdmissionController(A, **kw)  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        AdmissionController(0)


def test_ledger_to_dict_is_json() -> None:
    c = ctl(2)
    grant(c, "g", 10)
    queue(c, "q", 2 * A)
    d = json.loads(json.dumps(c.snapshot().to_dict()))
    assert d["reserved_bytes"] == A and d["waiting_count"] == 1 and d["waiting_bytes"] == 2 * A
    assert [r["state"] for r in d["reservations"]] == ["granted", "queued"]
    assert d["counters"]["granted_total"] == 1 and d["counters"]["queued_total"] == 1


# -- load ------------------------------------------------------------------------------


def test_thousand_transfers_at_five_percent_capacity() -> None:
    """1,000 transfers of random size into a region of 5% of their total bytes, all
    reserved at once; every granted one is driven through deliver -> claim -> release (in
    random order) until all are done. Reserved never exceeds capacity, grants follow
    arrival order, every transfer ends exactly once, and the pool is empty at the end."""
    rng = random.Random(1234)
    sizes = {f"t{i:04d}": rng.randint(1, 64 * A) for i in range(1000)}
    cap = -(-sum(sizes.values()) * 5 // 100 // A) * A
    c = AdmissionController(cap, lease_s=30)
    now = 0.0
    grant_order: list[str] = []
    granted_now: list[str] = []
    ends: dict[str, Ended] = {}
    for tid, n in sizes.items():
        r = c.reserve(tid, f"peer{rng.randrange(8)}", n, now=now, deadline=1e6)
        assert not isinstance(r, Rejected)
        if isinstance(r, Grant):
            grant_order.append(tid)
            granted_now.append(tid)
    assert c.snapshot().waiting_count > 800
    delivered: list[str] = []
    steps = 0
    while len(ends) < len(sizes):
        steps += 1
        assert steps < 10_000
        now += 0.01
        if granted_now and (not delivered or rng.random() < 0.6):
            tid = granted_now.pop(rng.randrange(len(granted_now)))
            c.renew(tid, now=now)
            c.deliver(tid, now=now, claim_deadline=now + 60)
            c.claim(tid)
            delivered.append(tid)
            ev: list = []
        else:
            tid = delivered.pop(rng.randrange(len(delivered)))
            ev = c.release(tid, now=now)
        for e in ev:
            if isinstance(e, Granted):
                grant_order.append(e.grant.transfer_id)
                granted_now.append(e.grant.transfer_id)
            else:
                assert e.transfer_id not in ends
                ends[e.transfer_id] = e
        led = c.snapshot()
        assert led.reserved_bytes <= cap
        if steps % 50 == 0:
            c._check_invariants()
    assert grant_order == list(sizes)  # strict FIFO: granted in arrival order
    assert all(e.reason is EndReason.RELEASED for e in ends.values())
    led = c.snapshot()
    assert led.reserved_bytes == 0 and led.free_bytes == cap and led.largest_free_extent == cap
    assert led.counters["granted_total"] == 1000 == led.counters["ended_released"]
    assert c.next_deadline() is None
    c._check_invariants()
