"""The admission controller's deadline index: one valid heap entry per live reservation.

A reservation's due time moves on every lease renewal, and renewals come with traffic
(thousands per second per transfer). Removing an entry from a heap is O(n), so changes
push a fresh entry under a new sequence number instead and the record remembers which
one is valid (`Record.armed`); older entries are stale and skipped when they surface
(lazy deletion). The heap is rebuilt from the live records when stale entries outnumber
live ones, so its memory stays bounded however often leases are renewed.
"""

from __future__ import annotations

import heapq
from collections.abc import Iterator, Mapping

from pdxfer.admission.ledger import Record


class DeadlineHeap:
    def __init__(self) -> None:
        self._heap: list[tuple[float, int, str]] = []  # (due, seq, transfer_id)
        self._seq = 0

    def __len__(self) -> int:
        return len(self._heap)

    def arm(self, rec: Record, live: Mapping[str, Record]) -> None:
        """Point the record's single valid entry at its current due time (or at none)."""
        due = rec.due()
        if due is None:
            rec.armed = None
            return
        if rec.armed is not None and rec.armed_at == due:
            return
        self._seq += 1
        rec.armed = self._seq
        rec.armed_at = due
        heapq.heappush(self._heap, (due, self._seq, rec.transfer_id))
        if len(self._heap) > 2 * len(live) + 64:
            self._heap = [(r.armed_at, r.armed, tid) for tid, r in live.items() if r.armed is not None]
            heapq.heapify(self._heap)

    def pop_due(self, now: float, live: Mapping[str, Record]) -> Iterator[Record]:
        """Live records due at or before ``now``, earliest first, each disarmed as it is
        yielded. Records ended while iterating are skipped (their entries are stale)."""
        heap = self._heap
        while heap and heap[0][0] <= now:
            _, seq, tid = heapq.heappop(heap)
            rec = live.get(tid)
            if rec is None or rec.armed != seq:
                continue
            rec.armed = None
            yield rec

    def first(self, live: Mapping[str, Record]) -> float | None:
        """The earliest valid due time (stale entries on top are dropped on the way)."""
        heap = self._heap
        while heap:
            _, seq, tid = heap[0]
            rec = live.get(tid)
            if rec is not None and rec.armed == seq:
                return heap[0][0]
            heapq.heappop(heap)
        return None

    def entries(self) -> set[tuple[float, int, str]]:
        return set(self._heap)
