"""Sendable chunks for one peer: FIFO across transfers, strictly in order within one.

No I/O: the lane pops from here and writes to its data connection. A transfer's chunks
enter only once it is granted and only as a contiguous run from its next index, so a
chunk that is ready early never overtakes an earlier one of the same transfer, and a
queued (not yet granted) transfer never blocks a granted one behind it.
"""

from __future__ import annotations

import itertools
from collections import deque
from typing import Any, Callable, NamedTuple

from pdxfer.protocol.outbound import OutboundTransfer


class SendItem(NamedTuple):
    transfer: OutboundTransfer
    index: int
    buffer: Any  # the caller's buffer, or a SpilledChunk (restored right before sending)
    checksum: int | None  # None: hash right before sending, while the bytes are cache-hot

    @property
    def nbytes(self) -> int:
        return self.transfer.payload.chunk_sizes[self.index]


class PeerQueue:
    def __init__(self, drop: Callable[[SendItem], None]) -> None:
        """`drop(item)` gives back what an item holds when it will never be sent."""
        self._drop = drop
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
        """Next item whose transfer is still live; dead transfers' items are dropped."""
        while self._items:
            item = self._items.popleft()
            self.queued_bytes -= item.nbytes
            if item.transfer.terminal:
                self._drop(item)
                continue
            return item
        return None

    def peek(self, n: int) -> list[SendItem]:
        """The next `n` items (read-ahead of spilled chunks), without removing them."""
        return list(itertools.islice(self._items, n))

    def drain(self) -> None:
        """Drop every queued item (lane shutdown)."""
        while self._items:
            item = self._items.popleft()
            self.queued_bytes -= item.nbytes
            self._drop(item)
