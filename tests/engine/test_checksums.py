"""Where chunk checksums are computed (SenderConfig.checksum_on_put / hash_ahead), and
that every mode delivers verified bytes, including when transfers end mid-stream."""

from __future__ import annotations

import os

import pytest

from pdxfer.errors import IntegrityError, TransferAborted
from pdxfer.layout.payload import Payload

from tests.engine.test_transfers import _eventually

MODES = {
    "put": {"checksum_on_put": True},
    "ahead-1": {"hash_ahead": 1, "hash_ahead_min_bytes": 0},
    "ahead-3": {"hash_ahead": 3, "hash_ahead_min_bytes": 0},
    "default": {},  # hashed on the send loop (chunk 0 while the GRANT is awaited)
    "send-loop": {"hash_ahead": 0},
}


@pytest.mark.parametrize("mode", list(MODES))
def test_every_hashing_mode_delivers_verified_bytes(make_receiver, make_sender, backend, mode):
    r = make_receiver(capacity=8 << 20)
    s = make_sender(backend=backend, memory_budget=4 << 20, **MODES[mode])
    n_chunks, size = 12, 64 << 10
    data = {f"{mode}-{k}": [os.urandom(size) for _ in range(n_chunks)] for k in range(8)}
    handles = {tid: s.open(r.control_address, tid, Payload.uniform(n_chunks * size, size)) for tid in data}
    doomed = {f"{mode}-2", f"{mode}-5"}
    for i in range(n_chunks):
        for tid, chunks in data.items():
            if tid in doomed and i == n_chunks // 2:
                handles[tid].abort("test: ended mid-stream")
            if not handles[tid].future.done():
                handles[tid].put(i, chunks[i], timeout=30)
    for tid, chunks in data.items():
        if tid in doomed:
            with pytest.raises(TransferAborted):
                handles[tid].future.result(30)
            continue
        with r.wait(tid, timeout=30) as got:
            assert bytes(got.view) == b"".join(chunks), tid
        assert handles[tid].future.result(30).chunks == n_chunks
    _eventually(lambda: s.budget_used == 0 and r.ledger().reserved_bytes == 0)


def test_checksum_on_put_catches_a_buffer_changed_before_it_was_sent(make_receiver, make_sender):
    """The contract says a buffer stays unchanged until its transfer ends; hashing in put()
    is the mode that catches a caller breaking it (the others send what the buffer holds)."""
    r = make_receiver(capacity=64 << 10)
    s = make_sender(checksum_on_put=True)
    s.submit(r.control_address, "room", [b"r" * (64 << 10)]).result(10)
    room = r.wait("room", timeout=10)  # claimed and held: the next transfer must queue
    buf = bytearray(b"a" * 4096)
    h = s.open(r.control_address, "changed", Payload.uniform(4096, 4096))
    h.put(0, buf)
    _eventually(lambda: r.ledger().waiting_count == 1)
    buf[100] = ord("b")  # the caller breaks the contract while the chunk waits for room
    room.release()
    with pytest.raises(IntegrityError) as info:
        h.future.result(10)
    assert info.value.transfer_id == "changed"
    with pytest.raises(IntegrityError):
        r.wait("changed", timeout=5)  # the consumer learns why; it never gets the bytes
    _eventually(lambda: s.budget_used == 0 and r.ledger().reserved_bytes == 0)


def test_first_chunk_is_hashed_while_the_grant_is_awaited(make_receiver, make_sender, backend):
    """Chunk 0 is what the send waits for once the GRANT comes, so the loop hashes it
    while it waits; the bytes still arrive verified once room frees up."""
    r = make_receiver(capacity=1 << 20)
    s = make_sender(backend=backend)
    hog = s.open(r.control_address, "hog", Payload.uniform(1 << 20, 1 << 20), deadline_s=30)
    _eventually(lambda: r.ledger().reserved_bytes == 1 << 20)  # granted, never filled
    chunks = [os.urandom(300_000), os.urandom(200_000)]
    h = s.open(r.control_address, "waiter", Payload.of(chunks), deadline_s=30)
    h.put(0, chunks[0])
    _eventually(lambda: r.ledger().waiting_count == 1)
    _eventually(lambda: h._ctx.out._checksums[0] is not None)  # hashed before any GRANT
    # not granted (the QUEUED answer may still be on its way) and chunk 1 not put yet
    assert h._ctx.out.state.value in ("reserving", "queued") and h._ctx.out._checksums[1] is None
    h.put(1, chunks[1])
    hog.abort("make room")
    with r.wait("waiter", timeout=10) as got:
        assert [bytes(got.chunk(i)) for i in range(2)] == chunks
    h.future.result(10)
