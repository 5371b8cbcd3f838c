"""A from-scratch recount of the admission controller's bookkeeping.

For tests, after every step (the hypothesis state machine calls it after each rule);
O(n log n). Raises AssertionError rather than using ``assert``, so ``-O`` cannot skip it.
It reads the controller's private state on purpose: the point is to check the
incremental counters against what the records say.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from pdxfer.admission.ledger import ReservationState

if TYPE_CHECKING:
    from pdxfer.admission.controller import AdmissionController

Q, G, D = ReservationState.QUEUED, ReservationState.GRANTED, ReservationState.DELIVERED


def check_invariants(c: "AdmissionController") -> None:
    def check(ok: bool, msg: str) -> None:
        if not ok:
            raise AssertionError(f"admission: {msg}")

    a = c._alloc
    a._check_invariants()
    holding = [r for r in c._live.values() if r.state in (G, D)]
    check(c._reserved == sum(r.allocated for r in holding), "reserved_bytes != sum of allocated")
    check(c._reserved <= a.capacity, f"reserved {c._reserved} > capacity {a.capacity}")
    check(c._quarantined == sum(n for _, _, n, _ in c._quarantine.values()), "quarantined != sum of extents")
    check(a.free_bytes + c._reserved + c._quarantined == a.capacity,
          "allocator free + reserved + quarantined != capacity")
    extents = {r.offset: r.allocated for r in holding}
    extents.update({off: n for off, (_, _, n, _) in c._quarantine.items()})
    check(a.allocations() == extents, "allocator map != live + quarantined extents")
    for r in holding:
        assert r.offset is not None
        check(0 <= r.offset and r.offset + r.allocated <= a.capacity, f"{r.transfer_id} outside region")
        check(r.allocated == a.aligned(r.nbytes) >= r.nbytes, f"{r.transfer_id} allocated size wrong")
    queued = [r for r in c._live.values() if r.state is Q]
    check(set(c._queue) == {r.transfer_id for r in queued}, "queue != QUEUED records")
    check(all(r.offset is None for r in queued), "a queued record owns an offset")
    check(c._waiting_bytes == sum(r.allocated for r in queued), "waiting_bytes wrong")
    check(c._granted == sum(r.state is G for r in holding), "granted_count wrong")
    check(c._delivered == sum(r.state is D for r in holding), "delivered_count wrong")
    check(len(c._queue) <= c._max_queue, "queue over its bound")
    if c._queue:  # no lost wake-up: a head that fits would have been granted
        head = next(iter(c._queue.values()))
        check(not a.can_alloc(head.nbytes), f"queue head {head.transfer_id} fits but waits")
    check(
        {(p, t) for p, ids in c._by_peer.items() for t in ids} == {(r.peer, t) for t, r in c._live.items()},
        "peer index disagrees with live records",
    )
    check(all(c._by_peer.values()), "empty peer entry kept")
    entries = c._heap.entries()
    for tid, r in c._live.items():
        check(r.state is not ReservationState.ENDED, f"{tid} ENDED but still live")
        due = r.due()
        if due is None:
            check(r.armed is None, f"{tid} armed with nothing due")
        else:
            check(r.armed is not None and r.armed_at == due, f"{tid} armed at wrong time")
            check((due, r.armed, tid) in entries, f"{tid} armed entry missing from heap")
    if c._shut:
        check(not c._live, "live reservations after shutdown")
