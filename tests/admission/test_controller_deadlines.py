"""AdmissionController deadlines: leases, hard deadlines, queue and claim timeouts, and the
deadline heap. Time is a plain float passed in; no test looks at the wall clock."""

from __future__ import annotations

from pdxfer.admission import Ended, EndReason
from tests.admission.controller_support import A, S, ctl, ended, grant, granted, queue


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
