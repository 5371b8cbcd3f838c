"""Stateful fuzzing of AdmissionController against a small, obviously-correct model.

The model re-implements the rules the slow way (a sorted list of extents with first fit,
a plain list as the FIFO, deadlines recomputed from scratch) and predicts every answer:
grants with their offsets, rejections with their reasons, and which reservations end
with which reason. After every step the controller's own invariant check runs and the
two are compared. Exactly-once ending is checked by counting every Ended event per
reservation; teardown shuts the controller down so every reservation must have ended.
"""

from __future__ import annotations

from dataclasses import dataclass

import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule

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
from pdxfer.errors import RejectReason

ALIGN = 16
CAPACITY = 8 * ALIGN + 5  # unaligned on purpose: the tail can never be handed out
LEASE = 5.0
MAX_QUEUE = 4
IDS = [f"t{i}" for i in range(8)]
PEERS = ["A", "B", "C"]
S = ReservationState


@dataclass
class M:
    """Model of one live reservation."""

    tid: str
    peer: str
    nbytes: int
    allocated: int
    deadline: float
    state: ReservationState = S.QUEUED
    offset: int | None = None
    lease: float | None = None
    claim_deadline: float | None = None
    claimed: bool = False
    incarnation: int = 0

    def due(self) -> tuple[float, EndReason] | None:
        if self.state is S.QUEUED:
            return self.deadline, EndReason.QUEUE_TIMEOUT
        if self.state is S.GRANTED:
            assert self.lease is not None
            if self.deadline <= self.lease:
                return self.deadline, EndReason.DEADLINE
            return self.lease, EndReason.LEASE_EXPIRED
        if self.state is S.DELIVERED and not self.claimed:
            assert self.claim_deadline is not None
            return self.claim_deadline, EndReason.CLAIM_TIMEOUT
        return None


def aligned(n: int) -> int:
    return -(-n // ALIGN) * ALIGN


class AdmissionMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.c = AdmissionController(CAPACITY, lease_s=LEASE, alignment=ALIGN, max_queue=MAX_QUEUE)
        self.now = 0.0
        self.live: dict[str, M] = {}
        self.fifo: list[str] = []
        self.shut = False
        self.incarnations = 0
        self.end_count: dict[int, int] = {}  # incarnation -> Ended events seen
        self.started: set[int] = set()
        self.ending: dict[str, int] = {}  # ids the model ended in this step -> incarnation
        self._before: dict[str, int] = {}

    # -- model helpers -----------------------------------------------------------------

    def first_fit(self, need: int) -> int | None:
        pos = 0
        for off, size in sorted((m.offset, m.allocated) for m in self.live.values() if m.offset is not None):
            if off - pos >= need:
                return pos
            pos = off + size
        usable = CAPACITY - CAPACITY % ALIGN
        return pos if usable - pos >= need else None

    def model_end(self, m: M, reason: EndReason) -> tuple:
        freed = m.allocated if m.offset is not None else 0
        if m.state is S.QUEUED:
            self.fifo.remove(m.tid)
        del self.live[m.tid]
        return (m.tid, m.peer, reason, m.state, freed)

    def model_grant(self, m: M, offset: int) -> Grant:
        m.state, m.offset, m.lease = S.GRANTED, offset, self.now + LEASE
        return Grant(m.tid, m.peer, offset, m.nbytes, m.lease)

    def model_admit(self) -> tuple[list[Grant], list[tuple]]:
        grants, ends = [], []
        while self.fifo:
            m = self.live[self.fifo[0]]
            if m.deadline <= self.now:
                ends.append(self.model_end(m, EndReason.QUEUE_TIMEOUT))
                continue
            off = self.first_fit(m.allocated)
            if off is None:
                break
            self.fifo.pop(0)
            grants.append(self.model_grant(m, off))
        return grants, ends

    def check_events(self, events: list, want_grants: list[Grant], want_ends: list[tuple]) -> None:
        """Grants must match in order (FIFO); ends as a set (tick ends them in deadline order)."""
        assert all(isinstance(e, (Granted, Ended)) for e in events)
        assert [e.grant for e in events if isinstance(e, Granted)] == want_grants
        got_ends = [e for e in events if isinstance(e, Ended)]

        def key(t: tuple) -> tuple:
            return (t[0], t[1], t[2].value, t[3].value, t[4])

        got = sorted(key((e.transfer_id, e.peer, e.reason, e.state, e.nbytes_freed)) for e in got_ends)
        assert got == sorted(key(t) for t in want_ends)
        self.count_ends(got_ends)

    def count_ends(self, ends: list[Ended]) -> None:
        # Incarnations were recorded by the model at the moment it ended them.
        for e in ends:
            inc = self.ending.pop(e.transfer_id)
            self.end_count[inc] = self.end_count.get(inc, 0) + 1
            assert self.end_count[inc] == 1, f"{e.transfer_id} ended twice"
        assert not self.ending, f"model ended {sorted(self.ending)} but controller did not"

    def snapshot_incarnations(self) -> None:
        """Remember which incarnation each id is, so ends can be attributed."""
        self.ending = {}
        self._before = {tid: m.incarnation for tid, m in self.live.items()}

    def note_model_ends(self, ends: list[tuple]) -> None:
        for t in ends:
            self.ending[t[0]] = self._before[t[0]]

    # -- rules ---------------------------------------------------------------------------

    @rule(
        tid=st.sampled_from(IDS),
        peer=st.sampled_from(PEERS),
        nbytes=st.one_of(st.integers(1, 3 * ALIGN), st.integers(-1, CAPACITY + ALIGN)),
        ddl=st.sampled_from([-1.0, 0.0, 0.5, 2.0, 5.0, 8.0, 20.0, 50.0]),  # 5.0 ties the lease
    )
    def reserve(self, tid: str, peer: str, nbytes: int, ddl: float) -> None:
        r = self.c.reserve(tid, peer, nbytes, now=self.now, deadline=self.now + ddl)
        if self.shut:
            want = RejectReason.SHUTTING_DOWN
        elif nbytes <= 0 or ddl <= 0:
            want = RejectReason.BAD_REQUEST
        elif tid in self.live:
            want = RejectReason.DUPLICATE
        elif aligned(nbytes) > CAPACITY:
            want = RejectReason.TOO_LARGE
        else:
            want = None
        if want is not None:
            assert isinstance(r, Rejected) and r.reason is want, (r, want)
            return
        self.incarnations += 1
        m = M(tid, peer, nbytes, aligned(nbytes), self.now + ddl, incarnation=self.incarnations)
        off = self.first_fit(m.allocated) if not self.fifo else None
        if off is not None:
            self.live[tid] = m
            assert r == self.model_grant(m, off)
        elif len(self.fifo) >= MAX_QUEUE:
            assert isinstance(r, Rejected) and r.reason is RejectReason.QUEUE_FULL, r
            return
        else:
            assert r == Queued(tid, len(self.fifo))
            self.live[tid] = m
            self.fifo.append(tid)
        self.started.add(m.incarnation)

    @rule(
        data=st.data(),
        peer=st.sampled_from(PEERS),
        nbytes=st.sampled_from([1, ALIGN, 2 * ALIGN + 1, 5 * ALIGN, 7 * ALIGN]),  # big heads block small ones
        ddl=st.sampled_from([5.0, 8.0, 20.0, 50.0]),
    )
    def reserve_fresh(self, data: st.DataObject, peer: str, nbytes: int, ddl: float) -> None:
        """A valid request under an unused id: keeps enough reservations alive to be interesting."""
        free = [t for t in IDS if t not in self.live]
        if free:
            self.reserve(data.draw(st.sampled_from(free), label="tid"), peer, nbytes, ddl)

    @rule(data=st.data())
    def deliver_and_claim(self, data: st.DataObject) -> None:
        """The common consumer path in one step, so claimed buffers show up often."""
        granted = [t for t, m in self.live.items() if m.state is S.GRANTED]
        if granted:
            tid = data.draw(st.sampled_from(granted), label="tid")
            self.c.deliver(tid, now=self.now, claim_deadline=self.now + 3.0)
            m = self.live[tid]
            m.state, m.lease, m.claim_deadline = S.DELIVERED, None, self.now + 3.0
            self.claim_id(tid)

    def pick(self, data: st.DataObject, *states: ReservationState) -> str:
        """Mostly an id in one of ``states`` (so the happy paths are reached), sometimes any id
        (so the refusals are exercised too)."""
        fits = [t for t, m in self.live.items() if m.state in states]
        if fits and data.draw(st.integers(0, 3), label="any_id") != 3:
            return data.draw(st.sampled_from(fits), label="tid")
        return data.draw(st.sampled_from(IDS), label="tid")

    @rule(data=st.data())
    def renew(self, data: st.DataObject) -> None:
        tid = self.pick(data, S.GRANTED)
        m = self.live.get(tid)
        ok = m is not None and m.state is S.GRANTED
        assert self.c.renew(tid, now=self.now) is ok
        if ok:
            assert m is not None and m.lease is not None
            m.lease = max(m.lease, self.now + LEASE)

    @rule(peer=st.sampled_from(PEERS))
    def renew_peer(self, peer: str) -> None:
        ms = [m for m in self.live.values() if m.peer == peer and m.state is S.GRANTED]
        assert self.c.renew_peer(peer, now=self.now) == len(ms)
        for m in ms:
            assert m.lease is not None
            m.lease = max(m.lease, self.now + LEASE)

    @rule(data=st.data(), claim=st.sampled_from([0.5, 3.0, 10.0]))
    def deliver(self, data: st.DataObject, claim: float) -> None:
        tid = self.pick(data, S.GRANTED)
        m = self.live.get(tid)
        if m is None or m.state is not S.GRANTED:
            with pytest.raises(AdmissionStateError):
                self.c.deliver(tid, now=self.now, claim_deadline=self.now + claim)
            return
        self.c.deliver(tid, now=self.now, claim_deadline=self.now + claim)
        m.state, m.lease, m.claim_deadline = S.DELIVERED, None, self.now + claim

    @rule(data=st.data())
    def claim(self, data: st.DataObject) -> None:
        self.claim_id(self.pick(data, S.DELIVERED))

    def claim_id(self, tid: str) -> None:
        m = self.live.get(tid)
        if m is None or m.state is not S.DELIVERED or m.claimed:
            with pytest.raises(AdmissionStateError):
                self.c.claim(tid)
            return
        v = self.c.claim(tid)
        m.claimed, m.claim_deadline = True, None
        assert v.claimed and v.offset == m.offset and v.allocated == m.allocated

    def _ending_call(self, call, model_ends: list[tuple]) -> None:  # type: ignore[no-untyped-def]
        self.note_model_ends(model_ends)
        grants, more = self.model_admit()
        self.note_model_ends(more)
        self.check_events(call(), grants, model_ends + more)

    @rule(data=st.data())
    def release(self, data: st.DataObject) -> None:
        tid = self.pick(data, S.DELIVERED)
        m = self.live.get(tid)
        if m is None or m.state is not S.DELIVERED:
            with pytest.raises(AdmissionStateError):
                self.c.release(tid, now=self.now)
            return
        self.snapshot_incarnations()
        self._ending_call(lambda: self.c.release(tid, now=self.now), [self.model_end(m, EndReason.RELEASED)])

    @rule(data=st.data(), reason=st.sampled_from([EndReason.ABORTED, EndReason.PEER_LOST]))
    def abort(self, data: st.DataObject, reason: EndReason) -> None:
        tid = self.pick(data, S.QUEUED, S.GRANTED, S.DELIVERED)
        m = self.live.get(tid)
        if m is None:
            with pytest.raises(AdmissionStateError):
                self.c.abort(tid, reason, now=self.now)
            return
        self.snapshot_incarnations()
        self._ending_call(lambda: self.c.abort(tid, reason, now=self.now), [self.model_end(m, reason)])

    @rule(peer=st.sampled_from(PEERS))
    def peer_lost(self, peer: str) -> None:
        self.snapshot_incarnations()
        doomed = [m for m in self.live.values() if m.peer == peer and m.state in (S.QUEUED, S.GRANTED)]
        ends = [self.model_end(m, EndReason.PEER_LOST) for m in doomed]
        self._ending_call(lambda: self.c.peer_lost(peer, now=self.now), ends)

    @rule(dt=st.sampled_from([0.0, 0.25, 1.0, 2.5, 5.0]))
    def advance_and_tick(self, dt: float) -> None:
        self._tick_at(self.now + dt)

    @rule(dt=st.sampled_from([0.5, 3.0, 6.0]))
    def advance_without_tick(self, dt: float) -> None:
        """The engine's timer is late: calls arrive after deadlines that no tick acted on yet."""
        self.now += dt

    @rule()
    def tick_at_next_deadline(self) -> None:
        """What the engine does: sleep until next_deadline(), then tick exactly then."""
        nd = self.c.next_deadline()
        if nd is not None:
            self._tick_at(max(self.now, nd))

    def _tick_at(self, now: float) -> None:
        self.now = now
        self.snapshot_incarnations()
        due = [(m, d) for m in list(self.live.values()) if (d := m.due()) is not None and d[0] <= self.now]
        ends = [self.model_end(m, reason) for m, (_, reason) in due]
        self._ending_call(lambda: self.c.tick(self.now), ends)

    @rule(go=st.integers(0, 24))
    def shutdown(self, go: int) -> None:
        if go:  # shut down only now and then, so most runs keep exercising the live rules
            return
        self.do_shutdown()

    def do_shutdown(self) -> None:
        self.snapshot_incarnations()
        ends = [self.model_end(m, EndReason.SHUTDOWN) for m in list(self.live.values())]
        self.note_model_ends(ends)
        got = self.c.shutdown(now=self.now)
        assert [e.transfer_id for e in got] == [t[0] for t in ends]  # creation order
        self.check_events(got, [], ends)
        self.shut = True

    # -- invariants --------------------------------------------------------------------

    @invariant()
    def matches_model(self) -> None:
        self.c._check_invariants()
        led = self.c.snapshot()
        holding = [m for m in self.live.values() if m.offset is not None]
        assert led.reserved_bytes == sum(m.allocated for m in holding) <= CAPACITY
        assert led.free_bytes + led.reserved_bytes == CAPACITY
        assert led.waiting_count == len(self.fifo)
        assert [v.transfer_id for v in led.reservations if v.state is S.QUEUED] == self.fifo
        for tid in IDS:
            v, m = self.c.get(tid), self.live.get(tid)
            if m is None:
                assert v is None
                continue
            assert v is not None
            assert (v.state, v.offset, v.lease_deadline, v.deadline, v.claim_deadline, v.claimed) == (
                m.state, m.offset, m.lease, m.deadline, m.claim_deadline, m.claimed,
            )
        dues = [d[0] for m in self.live.values() if (d := m.due()) is not None]
        assert self.c.next_deadline() == (min(dues) if dues else None)
        if self.fifo:  # no lost wake-up
            assert self.first_fit(self.live[self.fifo[0]].allocated) is None

    def teardown(self) -> None:
        if not self.shut:
            self.do_shutdown()
        self.c._check_invariants()
        assert self.c.snapshot().reserved_bytes == 0
        # every reservation that was ever accepted ended exactly once
        assert set(self.end_count) == self.started
        assert all(n == 1 for n in self.end_count.values())


AdmissionMachine.TestCase.settings = settings(max_examples=100, stateful_step_count=50, deadline=None)
TestAdmissionStateful = AdmissionMachine.TestCase
