"""Receiver-side record of one granted transfer: where each chunk must land, which
chunks arrived intact, and whether the COMMIT digest matches. No I/O."""

from __future__ import annotations

from pdxfer.errors import IntegrityError, ProtocolError
from pdxfer.layout.payload import Payload
from pdxfer.protocol.checksum import chunk_checksum, transfer_digest
from pdxfer.protocol.frames import FrameHeader
from pdxfer.protocol.states import IN_TRANSITIONS, InEvent, InState, step


class InboundTransfer:
    def __init__(self, tid: str, peer: str, slot: int, payload: Payload, region: memoryview) -> None:
        if len(region) != payload.total_bytes:
            raise ValueError(f"region of {len(region)} bytes for a {payload.total_bytes}-byte payload")
        self.tid = tid
        self.peer = peer
        self.slot = slot
        self.payload = payload
        self.region = region
        self.state = InState.RECEIVING
        self._checksums: list[int | None] = [None] * payload.chunk_count
        self._in_flight: set[int] = set()
        self._missing = payload.chunk_count
        self._digest: int | None = None

    @property
    def complete(self) -> bool:
        return self._missing == 0

    def _step(self, event: InEvent) -> None:
        self.state = step(IN_TRANSITIONS, self.state, event, f"transfer {self.tid}")  # type: ignore[assignment]

    def destination(self, header: FrameHeader) -> memoryview:
        """Validate a DATA header against the reserved payload; return where it lands."""
        i = header.chunk_index
        if not 0 <= i < self.payload.chunk_count:
            raise ProtocolError(f"chunk index {i} outside 0..{self.payload.chunk_count - 1}", transfer_id=self.tid, peer=self.peer)
        offset, length = self.payload.chunk_range(i)
        if header.offset != offset or header.length != length:
            raise ProtocolError(
                f"chunk {i} at offset {header.offset} length {header.length}, reserved as offset {offset} length {length}",
                transfer_id=self.tid, peer=self.peer,
            )
        if self._checksums[i] is not None or i in self._in_flight:
            raise ProtocolError(f"chunk {i} sent twice", transfer_id=self.tid, peer=self.peer)
        self._step(InEvent.RECV_CHUNK)
        self._in_flight.add(i)
        return self.region[offset : offset + length]

    def chunk_arrived(self, header: FrameHeader, view: memoryview, actual: int | None = None) -> None:
        """Verify a landed chunk (`actual`: checksum the transport already computed
        while the bytes landed); IntegrityError on a mismatch."""
        i = header.chunk_index
        self._in_flight.discard(i)
        if actual is None:
            actual = chunk_checksum(view)
        if actual != header.checksum:
            raise IntegrityError(
                f"chunk {i} checksum {actual:#018x} != sent {header.checksum:#018x}",
                transfer_id=self.tid, peer=self.peer,
            )
        self._checksums[i] = actual
        self._missing -= 1

    def commit(self, digest: int) -> None:
        self._step(InEvent.RECV_COMMIT)
        self._digest = digest

    @property
    def committed(self) -> int | None:
        """The COMMIT's digest once one arrived (a second COMMIT is its sender retrying)."""
        return self._digest

    @property
    def ready_to_verify(self) -> bool:
        return self.state == InState.COMMIT_PENDING and self.complete

    def verify(self) -> None:
        """Check the COMMIT digest against the chunks received; IntegrityError if not equal."""
        assert self._digest is not None and self.complete
        actual = transfer_digest(self._checksums)  # type: ignore[arg-type]
        if actual != self._digest:
            self.fail()
            raise IntegrityError(
                f"digest {actual:#018x} != committed {self._digest:#018x}", transfer_id=self.tid, peer=self.peer
            )
        self._step(InEvent.VERIFIED)

    def fail(self) -> None:
        if self.state not in (InState.FAILED, InState.DELIVERED):
            self._step(InEvent.FAIL)
