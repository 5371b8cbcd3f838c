"""The receiver's admission controller: whole-transfer reservations, FIFO wait, leases.

Sans-IO on purpose: no clock, no sockets, no threads. Time comes in as ``now``
(monotonic seconds) and the engine calls :meth:`AdmissionController.tick` at
:meth:`AdmissionController.next_deadline`. That makes every interleaving of
release / expiry / peer death testable in microseconds, and deterministic.

Rules of the file:

* **Reserve before you move.** A transfer is granted only when its whole (aligned)
  size fits in one contiguous extent. A size that could never fit is rejected at once.
* **Strict FIFO.** Only the head of the queue is ever granted; a small request behind a
  big one waits. That is what guarantees no starvation for big transfers; the price
  (a blocked head holds up everyone behind it) is bounded by the head's own deadline.
* **No lost wake-ups.** Every call that frees bytes or removes a waiter re-runs
  admission before returning, so after any call either the queue is empty or its head
  does not fit.
* **Exactly-once end.** Every reservation ends in exactly one :class:`Ended` event; its
  record is then forgotten (ids can be reused).
* **A tick that runs first wins.** Deadlines are acted on only by ``tick`` (and by
  admission, which never grants a waiter whose deadline has passed). A ``renew`` or
  ``deliver`` that arrives after a deadline but before the tick still succeeds: the bytes
  were not handed to anyone else yet, and the engine cannot order the two anyway.

Deadline bookkeeping: each live record has at most one *armed* entry in a lazily
deleted heap, at its earliest applicable deadline (`admission.deadlines`).
"""

from __future__ import annotations

from collections import OrderedDict

from pdxfer.admission.allocator import ExtentAllocator
from pdxfer.admission.deadlines import DeadlineHeap
from pdxfer.admission.invariants import check_invariants
from pdxfer.admission.ledger import (
    ALLOWED,
    EXPIRY_REASON,
    PEER_LOST_ENDS,
    AdmissionStateError,
    Ended,
    EndReason,
    Grant,
    Granted,
    Ledger,
    Queued,
    Rejected,
    ReservationState,
    Record,
    ReservationView,
    finite,
    zero_counters,
)
from pdxfer.errors import RejectReason

Q, G, D = ReservationState.QUEUED, ReservationState.GRANTED, ReservationState.DELIVERED
Event = Granted | Ended


class AdmissionController:
    """Reserved-receive-buffer admission for one contiguous region of ``capacity`` bytes."""

    def __init__(self, capacity: int, *, lease_s: float = 10.0, alignment: int = 4096, max_queue: int = 100_000,
                 quarantine_s: float = 30.0) -> None:
        if not finite(lease_s) or lease_s <= 0:
            raise ValueError(f"lease_s must be a positive finite number, got {lease_s!r}")
        if not finite(quarantine_s) or quarantine_s < 0:
            raise ValueError(f"quarantine_s must be a finite number >= 0, got {quarantine_s!r}")
        self._quarantine_s = float(quarantine_s)
        # offset -> (transfer_id, peer, allocated bytes, until): extents held back after a one-sided
        # reservation ended abnormally, because its sender's WRITEs may still land there.
        self._quarantine: dict[int, tuple[str, int, float]] = {}
        self._quarantined = 0
        if not isinstance(max_queue, int) or max_queue < 0:
            raise ValueError(f"max_queue must be an int >= 0, got {max_queue!r}")
        self._alloc = ExtentAllocator(capacity, alignment)
        self._lease_s = float(lease_s)
        self._max_queue = max_queue
        self._live: dict[str, Record] = {}  # every non-ended reservation, in creation order
        self._queue: OrderedDict[str, Record] = OrderedDict()  # FIFO of QUEUED
        self._by_peer: dict[str, dict[str, None]] = {}  # peer -> ordered set of ids
        self._heap = DeadlineHeap()
        self._reserved = 0
        self._waiting_bytes = 0
        self._granted = 0
        self._delivered = 0
        self._shut = False
        self._counters = zero_counters()

    # -- reserve ----------------------------------------------------------------

    def reserve(self, transfer_id: str, peer: str, nbytes: int, *, now: float, deadline: float,
                one_sided: bool = False) -> Grant | Queued | Rejected:
        """Grant the whole buffer now, queue behind earlier waiters, or reject with a reason.

        ``one_sided``: the sender writes into the extent itself (NIXL WRITE), so when such a
        reservation ends abnormally while GRANTED its extent is quarantined, not reused."""
        bad = self._validate(transfer_id, peer, nbytes, now, deadline)
        if bad is not None:
            return self._reject(transfer_id, *bad)
        need = self._alloc.aligned(nbytes)
        rec = Record(transfer_id, peer, nbytes, need, deadline, one_sided)
        if not self._queue:
            offset = self._alloc.alloc(nbytes)
            if offset is not None:
                self._add(rec)
                return self._grant(rec, offset, now)
        if len(self._queue) >= self._max_queue:
            return self._reject(transfer_id, RejectReason.QUEUE_FULL, f"{len(self._queue)} waiters, bound {self._max_queue}")
        self._add(rec)
        position = len(self._queue)
        self._queue[transfer_id] = rec
        self._waiting_bytes += need
        self._counters["queued_total"] += 1
        self._arm(rec)
        return Queued(transfer_id, position)

    def _validate(self, tid: str, peer: str, nbytes: int, now: float, deadline: float) -> tuple[RejectReason, str] | None:
        if self._shut:
            return RejectReason.SHUTTING_DOWN, "controller is shut down"
        if not isinstance(tid, str) or not tid or not isinstance(peer, str):
            return RejectReason.BAD_REQUEST, "transfer_id must be a non-empty str and peer a str"
        if not isinstance(nbytes, int) or isinstance(nbytes, bool) or nbytes <= 0:
            return RejectReason.BAD_REQUEST, f"nbytes must be a positive int, got {nbytes!r}"
        if not finite(deadline) or not finite(now) or deadline <= now:
            return RejectReason.BAD_REQUEST, f"deadline {deadline!r} must be finite and after now {now!r}"
        if tid in self._live:
            return RejectReason.DUPLICATE, f"already {self._live[tid].state.name}"
        if not self._alloc.fits_ever(nbytes):
            return RejectReason.TOO_LARGE, f"{self._alloc.aligned(nbytes)} aligned bytes > capacity {self._alloc.capacity}"
        return None

    def _reject(self, tid: str, reason: RejectReason, detail: str) -> Rejected:
        self._counters["rejected_total"] += 1
        self._counters[f"rejected_{reason.value}"] += 1
        return Rejected(tid, reason, detail)

    # -- per-transfer calls ----------------------------------------------------------

    def renew(self, transfer_id: str, *, now: float) -> bool:
        """Traffic on a GRANTED transfer extends its lease to ``now + lease_s``; False otherwise."""
        rec = self._live.get(transfer_id)
        if rec is None or rec.state not in ALLOWED["renew"]:
            return False
        self._extend(rec, now)
        return True

    def renew_peer(self, peer: str, *, now: float) -> int:
        """Heartbeat from ``peer``: renew every GRANTED reservation of it; returns how many."""
        n = 0
        for tid in self._by_peer.get(peer, ()):
            rec = self._live[tid]
            if rec.state in ALLOWED["renew"]:
                self._extend(rec, now)
                n += 1
        return n

    def _extend(self, rec: Record, now: float) -> None:
        assert rec.lease_deadline is not None
        before = rec.due()
        rec.lease_deadline = max(rec.lease_deadline, now + self._lease_s)  # never shortens
        if rec.due() != before:  # past the hard deadline the lease no longer matters
            self._arm(rec)

    def deliver(self, transfer_id: str, *, now: float, claim_deadline: float) -> None:
        """Commit verified: GRANTED -> DELIVERED. Lease and hard deadline stop; claim_deadline starts."""
        if not finite(claim_deadline):
            raise ValueError(f"claim_deadline must be finite, got {claim_deadline!r}")
        rec = self._require(transfer_id, "deliver")
        rec.state = D
        rec.lease_deadline = None
        rec.claim_deadline = claim_deadline
        self._granted -= 1
        self._delivered += 1
        self._arm(rec)

    def claim(self, transfer_id: str) -> ReservationView:
        """The consumer took the buffer: no deadline applies any more until release or shutdown."""
        rec = self._require(transfer_id, "claim")
        if rec.claimed:
            raise AdmissionStateError(transfer_id, rec.state, "claim", "already claimed")
        rec.claimed = True
        rec.claim_deadline = None
        self._arm(rec)
        return rec.view()

    def release(self, transfer_id: str, *, now: float) -> list[Event]:
        """DELIVERED -> ENDED(RELEASED): frees the bytes and admits waiters."""
        rec = self._require(transfer_id, "release")
        events: list[Event] = [self._end(rec, EndReason.RELEASED)]
        self._admit(now, events)
        return events

    def abort(self, transfer_id: str, reason: EndReason, *, now: float, writes_over: bool = False) -> list[Event]:
        """End a reservation in any non-ended state with ``reason``; admits waiters.

        ``writes_over``: the sender has said none of its WRITEs can still land (its own
        ABORT, sent after its WRITEs finished); otherwise a one-sided GRANTED extent is
        quarantined."""
        reason = EndReason(reason)
        rec = self._require(transfer_id, "abort")
        events: list[Event] = [self._end(rec, reason, None if writes_over else now)]
        self._admit(now, events)
        return events

    def settle(self, transfer_id: str, peer: str, *, now: float) -> list[Event]:
        """The sender of an ended one-sided reservation says its WRITEs are over: its
        quarantined extent returns to the pool now; admits waiters."""
        events: list[Event] = []
        for offset, (tid, owner, _, _) in list(self._quarantine.items()):
            if tid == transfer_id and owner == peer:
                self._unquarantine(offset)
                self._counters["quarantine_settled"] += 1
        self._admit(now, events)
        return events

    def _unquarantine(self, offset: int) -> None:
        _, _, allocated, _ = self._quarantine.pop(offset)
        freed = self._alloc.free(offset)
        assert freed == allocated
        self._quarantined -= allocated

    def _require(self, transfer_id: str, method: str) -> Record:
        rec = self._live.get(transfer_id)
        if rec is None:
            raise AdmissionStateError(transfer_id, None, method)
        if rec.state not in ALLOWED[method]:
            raise AdmissionStateError(transfer_id, rec.state, method)
        return rec

    # -- whole-controller calls ------------------------------------------------------

    def peer_lost(self, peer: str, *, now: float) -> list[Event]:
        """End the QUEUED and GRANTED reservations of ``peer``; DELIVERED data is kept."""
        events: list[Event] = []
        for tid in list(self._by_peer.get(peer, ())):
            rec = self._live[tid]
            if rec.state in PEER_LOST_ENDS:
                events.append(self._end(rec, EndReason.PEER_LOST, now))
        self._admit(now, events)
        return events

    def tick(self, now: float) -> list[Event]:
        """Act on every deadline at or before ``now`` (in deadline order), then admit waiters."""
        events: list[Event] = []
        for offset, (_, _, _, until) in list(self._quarantine.items()):
            if until <= now:
                self._unquarantine(offset)
                self._counters["quarantine_expired"] += 1
        for rec in self._heap.pop_due(now, self._live):
            reason = EXPIRY_REASON[rec.state]
            if rec.state is G and rec.deadline <= rec.lease_deadline:  # type: ignore[operator]
                reason = EndReason.DEADLINE
            events.append(self._end(rec, reason, now))
        self._admit(now, events)
        return events

    def next_deadline(self) -> float | None:
        """Earliest time at which ``tick`` would end or free something; None if nothing is pending."""
        first = self._heap.first(self._live)
        if self._quarantine:
            q = min(until for _, _, _, until in self._quarantine.values())
            first = q if first is None else min(first, q)
        return first

    def shutdown(self, *, now: float) -> list[Ended]:
        """End everything (SHUTDOWN) in creation order; later reserves are refused."""
        self._shut = True
        ended = [self._end(rec, EndReason.SHUTDOWN) for rec in list(self._live.values())]
        for offset in list(self._quarantine):  # the region itself goes away: nothing to protect
            self._unquarantine(offset)
        return ended

    def get(self, transfer_id: str) -> ReservationView | None:
        rec = self._live.get(transfer_id)
        return None if rec is None else rec.view()

    def snapshot(self) -> Ledger:
        return Ledger(
            capacity=self._alloc.capacity,
            reserved_bytes=self._reserved,
            free_bytes=self._alloc.free_bytes,
            largest_free_extent=self._alloc.largest_free,
            waiting_count=len(self._queue),
            waiting_bytes=self._waiting_bytes,
            granted_count=self._granted,
            delivered_count=self._delivered,
            reservations=tuple(r.view() for r in self._live.values()),
            counters=dict(self._counters),
            quarantined_bytes=self._quarantined,
            quarantined_count=len(self._quarantine),
        )

    # -- internals -----------------------------------------------------------------

    def _add(self, rec: Record) -> None:
        self._live[rec.transfer_id] = rec
        self._by_peer.setdefault(rec.peer, {})[rec.transfer_id] = None

    def _grant(self, rec: Record, offset: int, now: float) -> Grant:
        rec.state = G
        rec.offset = offset
        rec.lease_deadline = now + self._lease_s
        self._reserved += rec.allocated
        self._granted += 1
        self._counters["granted_total"] += 1
        self._arm(rec)
        return Grant(rec.transfer_id, rec.peer, offset, rec.nbytes, rec.lease_deadline)

    def _admit(self, now: float, events: list[Event]) -> None:
        """Grant queue heads while they fit (strict FIFO). A head whose deadline has passed
        is ended (QUEUE_TIMEOUT) rather than granted: it could only expire right away."""
        queue = self._queue
        while queue:
            rec = next(iter(queue.values()))
            if rec.deadline <= now:
                events.append(self._end(rec, EndReason.QUEUE_TIMEOUT))
                continue
            offset = self._alloc.alloc(rec.nbytes)
            if offset is None:
                return  # head-of-line: nobody behind it may jump
            del queue[rec.transfer_id]
            self._waiting_bytes -= rec.allocated
            events.append(Granted(self._grant(rec, offset, now)))

    def _end(self, rec: Record, reason: EndReason, quarantine_from: float | None = None) -> Ended:
        """The one place a reservation ends: returns bytes, forgets the record, counts it.

        A one-sided GRANTED reservation ending abnormally (``quarantine_from`` is the time)
        keeps its extent out of the pool until settled or ``quarantine_s`` later."""
        state = rec.state
        freed = 0
        quarantined = False
        if state is Q:
            del self._queue[rec.transfer_id]
            self._waiting_bytes -= rec.allocated
        else:
            assert rec.offset is not None
            if state is G and rec.one_sided and quarantine_from is not None and reason is not EndReason.SHUTDOWN:
                self._quarantine[rec.offset] = (rec.transfer_id, rec.peer, rec.allocated,
                                                quarantine_from + self._quarantine_s)
                self._quarantined += rec.allocated
                self._reserved -= rec.allocated
                self._counters["quarantined_total"] += 1
                quarantined = True
            else:
                freed = self._alloc.free(rec.offset)
                self._reserved -= freed
            if state is G:
                self._granted -= 1
            else:
                self._delivered -= 1
        del self._live[rec.transfer_id]
        peer_ids = self._by_peer[rec.peer]
        del peer_ids[rec.transfer_id]
        if not peer_ids:
            del self._by_peer[rec.peer]
        rec.state = ReservationState.ENDED
        rec.armed = None
        self._counters["ended_total"] += 1
        self._counters[f"ended_{reason.value}"] += 1
        return Ended(rec.transfer_id, rec.peer, reason, state, freed, quarantined)

    def _arm(self, rec: Record) -> None:
        self._heap.arm(rec, self._live)

    def _check_invariants(self) -> None:
        """Raise AssertionError if any bookkeeping disagrees with a from-scratch recount
        (for tests, after every step; see `admission.invariants`)."""
        check_invariants(self)
