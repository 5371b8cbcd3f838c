"""AdmissionController: one test per rule, plus a 1,000-transfer scenario.

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
    ReservationState,
)
from pdxfer.errors import PdxferError, RejectReason

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


# -- deadlines -------------------------------------------------------------------------


def test_lease_expiry_reclaims_bytes_and_admits_a_waiter() -> None:
    c = ctl(2, lease_s=5)
    grant(c, "a", 2 * A, now=0)
    queue(c, "w", 2 * A, now=1, deadline=50)
    assert c.next_deadline() == 5.0
    assert c.tick(4.999) == []
    ev = c.tick(5.0)
    e = ended(ev)["a"]
    assert e == Ended("a", "p", EndReason.LEASE_EXPIRED, S.GRANTED, 2 * A)
    assert granted(ev) == ["w"]
    assert ev[1].grant.lease_deadline == 10.0
    assert c.get("a") is None
    assert c.snapshot().counters["ended_lease_expired"] == 1
    c._check_invariants()


def test_renew_extends_the_lease_and_never_shortens_it() -> None:
    c = ctl(lease_s=5)
    grant(c, "a", 1, now=0)
    assert c.renew("a", now=3) is True
    assert c.get("a").lease_deadline == 8.0  # type: ignore[union-attr]
    assert c.next_deadline() == 8.0
    assert c.renew("a", now=1) is True  # an older timestamp does not pull it back
    assert c.get("a").lease_deadline == 8.0  # type: ignore[union-attr]
    assert c.tick(5.0) == []
    assert ended(c.tick(8.0))["a"].reason is EndReason.LEASE_EXPIRED


def test_renew_is_false_for_unknown_queued_and_delivered() -> None:
    c = ctl(1)
    grant(c, "a", A)
    queue(c, "q", A)
    assert c.renew("nope", now=1) is False
    assert c.renew("q", now=1) is False
    c.deliver("a", now=1, claim_deadline=9)
    assert c.renew("a", now=2) is False
    assert c.get("a").lease_deadline is None  # type: ignore[union-attr]


def test_renew_peer_renews_only_that_peers_granted() -> None:
    c = ctl(4, lease_s=5)
    grant(c, "a1", A, peer="A")
    grant(c, "a2", A, peer="A")
    grant(c, "a3", A, peer="A")
    grant(c, "b1", A, peer="B")
    c.deliver("a3", now=0, claim_deadline=100)
    queue(c, "a4", A, peer="A")
    assert c.renew_peer("A", now=4) == 2
    assert c.renew_peer("nobody", now=4) == 0
    ev = c.tick(5)
    assert set(ended(ev)) == {"b1"} and granted(ev) == ["a4"]
    assert set(ended(c.tick(9))) == {"a1", "a2"}  # renewed at 4
    assert set(ended(c.tick(10))) == {"a4"}  # granted at 5


def test_hard_deadline_while_granted_beats_a_renewed_lease() -> None:
    c = ctl(lease_s=5)
    grant(c, "a", 1, now=0, deadline=7)
    c.renew("a", now=4)  # lease 9, deadline 7
    assert c.next_deadline() == 7
    e = ended(c.tick(7))["a"]
    assert e.reason is EndReason.DEADLINE and e.state is S.GRANTED and e.nbytes_freed == A


def test_lease_and_hard_deadline_at_the_same_instant_is_reported_as_deadline() -> None:
    c = ctl(lease_s=5)
    grant(c, "a", 1, now=0, deadline=5)
    assert ended(c.tick(5))["a"].reason is EndReason.DEADLINE


def test_calls_after_a_deadline_but_before_the_tick_still_count() -> None:
    """A tick that runs first wins; until it runs, the bytes were handed to nobody else."""
    c = ctl(lease_s=5)
    grant(c, "a", 1, now=0)
    grant(c, "b", 1, now=0)
    assert c.renew("a", now=6) is True  # lease had lapsed at 5
    assert c.get("a").lease_deadline == 11  # type: ignore[union-attr]
    c.deliver("b", now=6, claim_deadline=20)
    assert c.tick(6) == []
    c._check_invariants()


def test_late_tick_reports_whichever_deadline_came_first() -> None:
    c = ctl(lease_s=5)
    grant(c, "lease_first", 1, now=0, deadline=8)
    grant(c, "deadline_first", 1, now=0, deadline=3)
    ev = ended(c.tick(100))
    assert ev["lease_first"].reason is EndReason.LEASE_EXPIRED
    assert ev["deadline_first"].reason is EndReason.DEADLINE


def test_queue_timeout() -> None:
    c = ctl(1)
    grant(c, "a", A, deadline=100)
    queue(c, "w1", 1, deadline=4)
    queue(c, "w2", 1, deadline=6)
    assert c.next_deadline() == 4
    ev = c.tick(4)
    assert list(ended(ev)) == ["w1"] and ended(ev)["w1"] == Ended("w1", "p", EndReason.QUEUE_TIMEOUT, S.QUEUED, 0)
    assert c.get("w2").state is S.QUEUED  # type: ignore[union-attr]
    assert ended(c.tick(6))["w2"].reason is EndReason.QUEUE_TIMEOUT
    assert c.snapshot().counters["ended_queue_timeout"] == 2


def test_admission_never_grants_a_waiter_whose_deadline_passed() -> None:
    c = ctl(1)
    grant(c, "a", A)
    c.deliver("a", now=0, claim_deadline=100)
    queue(c, "stale", 1, deadline=5)
    queue(c, "fresh", 1, deadline=50)
    ev = c.release("a", now=6)  # tick at 5 never ran
    assert ended(ev)["stale"].reason is EndReason.QUEUE_TIMEOUT
    assert granted(ev) == ["fresh"]
    c._check_invariants()


def test_deliver_stops_lease_and_hard_deadline_and_starts_claim_deadline() -> None:
    c = ctl(lease_s=5)
    grant(c, "a", 1, now=0, deadline=6)
    c.deliver("a", now=2, claim_deadline=20)
    v = c.get("a")
    assert v is not None and v.state is S.DELIVERED and v.claim_deadline == 20 and v.lease_deadline is None
    assert c.next_deadline() == 20
    assert c.tick(19.9) == []
    e = ended(c.tick(20))["a"]
    assert e == Ended("a", "p", EndReason.CLAIM_TIMEOUT, S.DELIVERED, A)


def test_claim_stops_every_deadline_until_release() -> None:
    c = ctl(1)
    grant(c, "a", A)
    c.deliver("a", now=1, claim_deadline=5)
    v = c.claim("a")
    assert v.claimed and v.claim_deadline is None and v.state is S.DELIVERED and v.offset == 0
    assert c.next_deadline() is None
    assert c.tick(1e9) == []
    queue(c, "w", 1, now=2, deadline=1e9 + 10)
    ev = c.release("a", now=1e9)
    assert ended(ev)["a"].reason is EndReason.RELEASED and granted(ev) == ["w"]


def test_next_deadline_skips_stale_entries_and_is_none_when_idle() -> None:
    c = ctl(lease_s=5)
    assert c.next_deadline() is None
    grant(c, "a", 1, now=0)
    for t in range(1, 50):
        c.renew("a", now=t)
    assert c.next_deadline() == 54
    c.abort("a", EndReason.ABORTED, now=50)
    assert c.next_deadline() is None
    assert c.tick(1000) == []


def test_renew_storm_keeps_the_deadline_heap_bounded() -> None:
    c = ctl(lease_s=5)
    grant(c, "a", 1, now=0, deadline=1e9)
    for i in range(10_000):
        c.renew("a", now=i * 0.001)
    assert len(c._heap) <= 2 * 1 + 64 + 1
    c._check_invariants()


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
