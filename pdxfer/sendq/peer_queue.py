"""Sendable chunks for one peer: FIFO across transfers, strictly in order within one.

No I/O: the lane pops from here and writes to its data connection. A transfer's chunks
enter only once it is granted and only as a contiguous run from its next index, so a
chunk that is ready early never overtakes an earlier one of the same transfer, and a
queued (not yet granted) transfer never blocks a granted one behind it.
"""

from __future__ import annotations

from collections import deque
from typing import Any, NamedTuple

from pdxfer.protocol.outbound import OutboundTransfer
from pdxfer.sendq.budget import MemoryBudget


class SendItem(NamedTuple):
    transfer: OutboundTransfer
    index: int
    buffer: Any
    checksum: int | None  # None: hash right before sending, while the bytes are cache-hot


class PeerQueue:
    def __init__(self, budget: MemoryBudget) -> None:
        self._budget = budget
        self._items: deque[SendItem] = deque()
        self.queued_bytes = 0

    def __len__(self) -> int:
        return len(self._items)

    def push_ready(self, transfer: OutboundTransfer) -> int:
        n = 0
        for index, buf, csum in transfer.take_sendable():
            self._items.append(SendItem(transfer, index, buf, csum))
            self.queued_bytes += transfer.payload.chunk_sizes[index]
            n += 1
        return n

    def pop(self) -> SendItem | None:
        """Next item whose transfer is still live; dead transfers' items release budget."""
        while self._items:
            item = self._items.popleft()
            size = item.transfer.payload.chunk_sizes[item.index]
            self.queued_bytes -= size
            if item.transfer.terminal:
                self._budget.release(size)
                continue
            return item
        return None

    def drain(self) -> None:
        """Release every queued chunk's budget (lane shutdown)."""
        while self._items:
            item = self._items.popleft()
            size = item.transfer.payload.chunk_sizes[item.index]
            self.queued_bytes -= size
            self._budget.release(size)
