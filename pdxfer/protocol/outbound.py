"""Sender-side record of one transfer: its state, which chunks are ready, which went
out, and the digest to commit. No I/O: the lane asks it what to send next."""

from __future__ import annotations

from typing import Any

from pdxfer.layout.payload import Payload
from pdxfer.layout.buffers import nbytes_of
from pdxfer.protocol.checksum import transfer_digest
from pdxfer.protocol.states import OUT_TRANSITIONS, OutEvent, OutState, step


class OutboundTransfer:
    def __init__(self, tid: str, peer: str, payload: Payload) -> None:
        self.tid = tid
        self.peer = peer
        self.payload = payload
        self.state = OutState.WAITING_PEER
        self.slot: int | None = None
        self.cid: int | None = None
        self._ready: dict[int, tuple[Any, int | None]] = {}  # index -> (buffer, checksum or None: hash at send)
        self._seen: set[int] = set()
        self._next_to_queue = 0  # chunks are released to the wire strictly in order
        self._checksums: list[int | None] = [None] * payload.chunk_count
        self.sent_chunks = 0

    def on(self, event: OutEvent) -> OutState:
        self.state = step(OUT_TRANSITIONS, self.state, event, f"transfer {self.tid}")  # type: ignore[assignment]
        return self.state

    @property
    def terminal(self) -> bool:
        return self.state in (OutState.DONE, OutState.FAILED)

    def add_chunk(self, index: int, buffer: Any, checksum: int | None) -> None:
        offset, length = self.payload.chunk_range(index)
        nbytes = nbytes_of(buffer)
        if nbytes != length:
            raise ValueError(f"transfer {self.tid}: chunk {index} has {nbytes} bytes, payload says {length}")
        if index in self._seen:
            raise ValueError(f"transfer {self.tid}: chunk {index} submitted twice")
        self._seen.add(index)
        self._ready[index] = (buffer, checksum)
        self._checksums[index] = checksum

    def record_checksum(self, index: int, checksum: int) -> None:
        """Checksum computed at send time (the chunk was handed over without one)."""
        self._checksums[index] = checksum

    def take_sendable(self) -> list[tuple[int, Any, int | None]]:
        """Chunks that may go on the wire now: granted, and contiguous from the next index."""
        out = []
        if self.state != OutState.GRANTED:
            return out
        while self._next_to_queue in self._ready:
            buf, csum = self._ready.pop(self._next_to_queue)
            out.append((self._next_to_queue, buf, csum))
            self._next_to_queue += 1
        return out

    def held_chunks(self) -> list[tuple[int, Any, int | None]]:
        """Chunks handed over but not yet released to the wire (spill candidates)."""
        return [(i, buf, csum) for i, (buf, csum) in self._ready.items()]

    def swap_buffer(self, index: int, expected: Any, replacement: Any, checksum: int) -> bool:
        """Replace a held chunk's buffer (a spilled copy for the original). False when the
        chunk is no longer held as `expected` (sent or dropped meanwhile): the caller then
        keeps ownership of `replacement`."""
        held = self._ready.get(index)
        if held is None or held[0] is not expected:
            return False
        self._ready[index] = (replacement, checksum)
        self._checksums[index] = checksum
        return True

    def drop_buffers(self) -> list[tuple[Any, int]]:
        """Forget held buffers (failure path); returns (buffer, nbytes) so whatever holds
        their bytes (the memory budget or a spill tier) is released."""
        sizes = self.payload.chunk_sizes
        bufs = [(b, sizes[i]) for i, (b, _) in self._ready.items()]
        self._ready.clear()
        return bufs

    @property
    def all_sent(self) -> bool:
        return self.sent_chunks == self.payload.chunk_count

    def digest(self) -> int:
        assert all(c is not None for c in self._checksums)
        return transfer_digest(self._checksums)  # type: ignore[arg-type]
