"""Quarantine of one-sided (NIXL) extents: after a GRANTED one-sided reservation ends
abnormally, a late WRITE from its sender could still land in its extent, so that extent
must not be granted to anyone else until the sender says its WRITEs are over (settle) or
the quarantine times out."""

from __future__ import annotations

import hypothesis.strategies as st
from hypothesis import settings
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule

from pdxfer.admission import AdmissionController
from pdxfer.admission.ledger import EndReason, Grant, Granted, Queued

MiB = 1 << 20


def _ctl(**kw) -> AdmissionController:
    kw.setdefault("lease_s", 1.0)
    kw.setdefault("quarantine_s", 5.0)
    return AdmissionController(4 * MiB, **kw)


def test_lease_expiry_of_one_sided_grant_quarantines_its_extent_until_timeout():
    c = _ctl()
    g = c.reserve("a", "p", 4 * MiB, now=0, deadline=100, one_sided=True)
    assert isinstance(g, Grant)
    assert isinstance(c.reserve("b", "p", 4 * MiB, now=0, deadline=100), Queued)
    ends = c.tick(1.0)  # a's lease expires
    assert [(e.transfer_id, e.reason, e.quarantined, e.nbytes_freed) for e in ends] == [
        ("a", EndReason.LEASE_EXPIRED, True, 0)]
    snap = c.snapshot()
    assert snap.quarantined_bytes == 4 * MiB and snap.reserved_bytes == 0 and snap.waiting_count == 1
    assert c.next_deadline() == 6.0  # the quarantine's end is a deadline too
    assert c.tick(5.9) == []
    ev = c.tick(6.0)
    assert [type(e) for e in ev] == [Granted] and ev[0].grant.transfer_id == "b"
    assert c.snapshot().quarantined_bytes == 0 and c.snapshot().counters["quarantine_expired"] == 1
    c._check_invariants()


def test_settle_returns_the_extent_at_once():
    c = _ctl()
    c.reserve("a", "p", 4 * MiB, now=0, deadline=100, one_sided=True)
    c.reserve("b", "p", 4 * MiB, now=0, deadline=100)
    ends = c.abort("a", EndReason.ABORTED, now=0.1)  # receiver-side failure: WRITEs may be in flight
    assert ends[0].quarantined and c.snapshot().quarantined_bytes == 4 * MiB
    assert c.settle("a", "someone-else", now=0.2) == [] and c.snapshot().quarantined_bytes == 4 * MiB
    ev = c.settle("a", "p", now=0.2)
    assert [e.grant.transfer_id for e in ev if isinstance(e, Granted)] == ["b"]
    assert c.snapshot().counters["quarantine_settled"] == 1
    c._check_invariants()


def test_sender_abort_after_its_writes_and_two_sided_and_delivered_are_not_quarantined():
    c = _ctl()
    c.reserve("a", "p", MiB, now=0, deadline=100, one_sided=True)
    assert not c.abort("a", EndReason.ABORTED, now=0, writes_over=True)[0].quarantined
    c.reserve("b", "p", MiB, now=0, deadline=100)  # TCP: the receiver decides where bytes go
    assert not c.abort("b", EndReason.ABORTED, now=0)[0].quarantined
    c.reserve("c", "p", MiB, now=0, deadline=100, one_sided=True)
    c.deliver("c", now=0, claim_deadline=10)  # every chunk landed and was verified
    assert not c.abort("c", EndReason.ABORTED, now=0)[0].quarantined
    assert c.snapshot().quarantined_bytes == 0 and c.snapshot().free_bytes == 4 * MiB


def test_peer_lost_quarantines_and_shutdown_frees_everything():
    c = _ctl()
    c.reserve("a", "p", 2 * MiB, now=0, deadline=100, one_sided=True)
    ends = c.peer_lost("p", now=0)
    assert ends[0].quarantined and c.snapshot().quarantined_bytes == 2 * MiB
    c.shutdown(now=0)
    assert c.snapshot().quarantined_bytes == 0 and c.snapshot().free_bytes == 4 * MiB
    c._check_invariants()


class QuarantineMachine(RuleBasedStateMachine):
    """Random interleavings: invariants hold, no grant ever overlaps a quarantined extent,
    and everything comes back once quarantines settle or expire."""

    def __init__(self) -> None:
        super().__init__()
        self.c = _ctl(lease_s=1.0, quarantine_s=2.0)
        self.now = 0.0
        self.n = 0

    def _grants(self, events) -> None:  # type: ignore[no-untyped-def]
        for e in events:
            if isinstance(e, Granted):
                self._check_clear(e.grant)

    def _check_clear(self, g: Grant) -> None:
        for off, (_, _, n, _) in self.c._quarantine.items():
            assert g.offset + g.nbytes <= off or off + n <= g.offset, "granted over a quarantined extent"

    @rule(size=st.sampled_from([MiB // 2, MiB, 2 * MiB]), one_sided=st.booleans())
    def reserve(self, size: int, one_sided: bool) -> None:
        self.n += 1
        r = self.c.reserve(f"t{self.n}", f"p{self.n % 2}", size, now=self.now, deadline=self.now + 10,
                           one_sided=one_sided)
        if isinstance(r, Grant):
            self._check_clear(r)

    def _live(self, *states: str) -> list[str]:
        return [v.transfer_id for v in self.c.snapshot().reservations if v.state.value in states]

    @rule(data=st.data(), writes_over=st.booleans())
    def abort(self, data: st.DataObject, writes_over: bool) -> None:
        live = self._live("queued", "granted", "delivered")
        if live:
            tid = data.draw(st.sampled_from(live))
            self._grants(self.c.abort(tid, EndReason.ABORTED, now=self.now, writes_over=writes_over))

    @rule(data=st.data())
    def settle(self, data: st.DataObject) -> None:
        q = sorted({(tid, peer) for tid, peer, _, _ in self.c._quarantine.values()})
        if q:
            tid, peer = data.draw(st.sampled_from(q))
            self._grants(self.c.settle(tid, peer, now=self.now))

    @rule(data=st.data())
    def deliver_release(self, data: st.DataObject) -> None:
        granted = self._live("granted")
        if granted:
            tid = data.draw(st.sampled_from(granted))
            self.c.deliver(tid, now=self.now, claim_deadline=self.now + 5)
            self._grants(self.c.release(tid, now=self.now))

    @rule(peer=st.sampled_from(["p0", "p1"]))
    def peer_lost(self, peer: str) -> None:
        self._grants(self.c.peer_lost(peer, now=self.now))

    @rule(dt=st.sampled_from([0.1, 0.5, 1.0, 2.5]))
    def advance(self, dt: float) -> None:
        self.now += dt
        self._grants(self.c.tick(self.now))

    @invariant()
    def consistent(self) -> None:
        self.c._check_invariants()

    def teardown(self) -> None:
        # Past every deadline and quarantine, nothing is held.
        self.now += 100
        self.c.tick(self.now)
        for tid in self._live("delivered"):
            self.c.release(tid, now=self.now)
        self.c.tick(self.now + 100)
        snap = self.c.snapshot()
        assert snap.quarantined_bytes == 0 and snap.free_bytes == snap.capacity, snap


TestQuarantineMachine = QuarantineMachine.TestCase
TestQuarantineMachine.settings = settings(max_examples=150, stateful_step_count=40, deadline=None)
