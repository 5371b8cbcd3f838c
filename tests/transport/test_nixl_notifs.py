"""A hand-driven NIXL peer against a real Receiver: what the receiver accepts as a landed
chunk, and what it refuses (the NIXL counterparts of the TCP frame tests)."""

from __future__ import annotations

import os
import time

import pytest

from pdxfer.errors import ProtocolError
from pdxfer.protocol import messages as m
from pdxfer.protocol.checksum import chunk_checksum, transfer_digest
from tests.conftest import HAVE_NIXL
from tests.engine.test_failures import RawPeer
from tests.engine.test_transfers import _eventually

pytestmark = [pytest.mark.skipif(not HAVE_NIXL, reason="nixl is not installed"), pytest.mark.timeout(90)]


class NixlPeer:
    """ZMQ control like a Sender's lane, plus a bare NIXL agent that WRITEs what we say."""

    def __init__(self, address: str, name: str | None = None) -> None:
        from pdxfer.transport.nixl_agent import NixlAgent

        self.agent = NixlAgent(name or f"raw-{os.urandom(4).hex()}")
        self.ctl = RawPeer(address)
        ok = self.ctl.request(m.Hello(cid=1, sender_id="raw", capabilities=["nixl"], nixl_agent=self.agent.name), 30)
        assert isinstance(ok, m.HelloOk) and ok.nixl_md, ok
        self.receiver_md = ok.nixl_md
        self.remote = self.agent.add_remote(ok.nixl_md)
        self.src = bytearray(1 << 20)
        from pdxfer.transport.nixl_regcache import buffer_address

        self.src_addr = buffer_address(memoryview(self.src))
        self.agent.register(self.src_addr, len(self.src))
        self._cid = 10

    def reserve(self, tid: str, sizes: list[int]) -> m.Grant:
        self._cid += 1
        g = self.ctl.request(m.Reserve(cid=self._cid, tid=tid, total_bytes=sum(sizes), chunk_sizes=sizes,
                                       deadline_ms=30_000))
        assert isinstance(g, m.Grant) and g.addr is not None, g
        return g

    def write(self, grant: m.Grant, offset: int, data: bytes, notif: bytes, *, wait: bool = True) -> None:
        """WRITE and (by default) wait until it completed. Completion needs the receiver to be
        polling, which it does only while it has a live NIXL grant."""
        self.src[: len(data)] = data
        h, state, err = self.agent.post_write([(self.src_addr, grant.addr + offset, len(data))], self.remote, notif)
        if not wait:
            self.pending = h
            return
        deadline = time.monotonic() + 10
        while state == "PROC" and time.monotonic() < deadline:
            finished, _ = self.agent.poll([h], False)
            state = finished[0][1] if finished else "PROC"
        assert state == "DONE", err

    def close(self) -> None:
        self.ctl.close()
        self.agent.close()


def _hdr(grant: m.Grant, index: int, offset: int, length: int, checksum: int) -> bytes:
    from pdxfer.transport.nixl import pack_notif

    return pack_notif(grant.slot, index, offset, length, checksum)


@pytest.fixture
def peer_and_receiver(make_receiver):
    r = make_receiver(capacity=8 << 20, lease_s=5.0)
    p = NixlPeer(r.control_address)
    yield p, r
    p.close()


def test_chunks_land_commit_verifies_and_done_comes_back(peer_and_receiver):
    p, r = peer_and_receiver
    a, b = os.urandom(5000), os.urandom(3000)
    g = p.reserve("ok", [5000, 3000])
    p.write(g, 5000, b, _hdr(g, 1, 5000, 3000, chunk_checksum(b)))  # out of order is fine
    p.write(g, 0, a, _hdr(g, 0, 0, 5000, chunk_checksum(a)))
    p.ctl.sock.send(m.encode(m.Commit(cid=g.cid, tid="ok", digest=transfer_digest([chunk_checksum(a), chunk_checksum(b)]))))
    assert isinstance(p.ctl.recv(10), m.Done)
    with r.wait("ok", timeout=10) as got:
        assert bytes(got.view) == a + b
    _eventually(lambda: r.ledger().reserved_bytes == 0)


def test_bad_checksum_fails_the_transfer_with_integrity(peer_and_receiver):
    p, r = peer_and_receiver
    data = os.urandom(4096)
    g = p.reserve("bad-sum", [4096])
    p.write(g, 0, data, _hdr(g, 0, 0, 4096, chunk_checksum(data) ^ 1))
    failed = p.ctl.recv(10)
    assert isinstance(failed, m.Failed) and failed.error == "integrity" and failed.tid == "bad-sum"
    _eventually(lambda: r.ledger().reserved_bytes == 0)


def test_wrong_offset_or_duplicate_chunk_is_a_protocol_failure(peer_and_receiver):
    p, r = peer_and_receiver
    data = os.urandom(4096)
    g = p.reserve("bad-off", [4096, 4096])
    p.write(g, 0, data, _hdr(g, 1, 0, 4096, chunk_checksum(data)))  # chunk 1 claims chunk 0's offset
    failed = p.ctl.recv(10)
    assert isinstance(failed, m.Failed) and failed.error == "protocol"
    g2 = p.reserve("dup", [4096, 4096])
    hdr = _hdr(g2, 0, 0, 4096, chunk_checksum(data))
    p.write(g2, 0, data, hdr)
    p.write(g2, 0, data, hdr)  # the same chunk announced twice
    failed = p.ctl.recv(10)
    assert isinstance(failed, m.Failed) and failed.error == "protocol" and failed.tid == "dup"
    _eventually(lambda: r.ledger().reserved_bytes == 0)


def test_foreign_malformed_and_stale_notifications_are_ignored(peer_and_receiver):
    p, r = peer_and_receiver
    data = os.urandom(4096)
    g = p.reserve("mine", [4096])
    # Another agent (never said HELLO as this slot's owner) announces the chunk: ignored.
    from pdxfer.transport.nixl_agent import NixlAgent

    intruder = NixlAgent(f"intruder-{os.urandom(3).hex()}")
    try:
        remote = intruder.add_remote(p.receiver_md)
        intruder.notify(remote, _hdr(g, 0, 0, 4096, chunk_checksum(data)))
        p.write(g, 0, data, b"not a header")  # malformed: logged and dropped
        time.sleep(0.3)  # poll-ok: give the receiver time to (wrongly) act on them
        assert r.ledger().reserved_bytes > 0  # still waiting for the real chunk
        p.write(g, 0, data, _hdr(g, 0, 0, 4096, chunk_checksum(data)))
        p.ctl.sock.send(m.encode(m.Commit(cid=g.cid, tid="mine", digest=transfer_digest([chunk_checksum(data)]))))
        assert isinstance(p.ctl.recv(10), m.Done)
        with r.wait("mine", timeout=10) as got:
            assert bytes(got.view) == data
        # A late WRITE+notification for a slot that ended: the receiver drains it with the
        # next grant's notifications and drops it; the next transfer is unaffected.
        p.write(g, 0, data, _hdr(g, 0, 0, 4096, chunk_checksum(data)), wait=False)
        other = os.urandom(4096)
        g2 = p.reserve("next", [4096])
        p.write(g2, 0, other, _hdr(g2, 0, 0, 4096, chunk_checksum(other)))
        p.ctl.sock.send(m.encode(m.Commit(cid=g2.cid, tid="next", digest=transfer_digest([chunk_checksum(other)]))))
        assert isinstance(p.ctl.recv(10), m.Done)
        with r.wait("next", timeout=10) as got:
            assert bytes(got.view) == other
        _eventually(lambda: r.ledger().reserved_bytes == 0)
    finally:
        intruder.close()


def test_receiver_without_nixl_refuses_a_nixl_sender_by_name(make_receiver, make_sender):
    r = make_receiver(backends=("tcp",))
    s = make_sender(backend="nixl")
    fut = s.submit(r.control_address, "no-nixl", [b"x" * 100], deadline_s=20)
    with pytest.raises(ProtocolError, match="nixl"):
        fut.result(30)
    assert s.budget_used == 0


def test_every_worker_writes_and_the_receiver_takes_each_ones_notifications(make_receiver, make_sender):
    """Three sender workers post a lane's chunks round-robin: each WRITEs some, each one's
    notifications (under its own agent name, announced in HELLO) are accepted, and the
    bytes verify end to end. A name left out of HELLO would be dropped as a foreign peer
    (test above), so this also checks the receiver learnt all three."""
    r = make_receiver(capacity=16 << 20)
    s = make_sender(backend="nixl", nixl_workers=3)
    chunks = [os.urandom(64 << 10) for _ in range(9)]
    fut = s.submit(r.control_address, "three-workers", chunks, deadline_s=30)
    with r.wait("three-workers", timeout=30) as got:
        assert bytes(got.view) == b"".join(chunks)
    fut.result(30)
    side = s._nixl.result()
    assert len(side.names) == len(set(side.names)) == 3
    assert all(p.stats.posts > 0 for p in side.progresses), [p.stats for p in side.progresses]
    # Both ends' progress threads run below the loops by the configured nice (default 10).
    base = os.getpriority(os.PRIO_PROCESS, 0)
    assert [p.niceness for p in side.progresses] == [min(19, base + 10)] * 3
    assert r._core.nixl.side.progress.niceness == min(19, base + 10)
    _eventually(lambda: r.ledger().reserved_bytes == 0 and s.budget_used == 0)


def test_host_chunks_are_hashed_on_the_progress_thread_and_still_checked(peer_and_receiver, monkeypatch):
    """The loop never hashes a DRAM chunk itself: the progress thread did it on arrival
    (LandedHashes), and a chunk whose bytes differ from its header still fails."""
    from pdxfer.engine.landed_hashes import LandedHashes

    p, r = peer_and_receiver
    core = r._core
    assert isinstance(core.nixl.early, LandedHashes)
    on_loop: list[int] = []
    real = core.region.checksums
    monkeypatch.setattr(core.region, "checksums", lambda views: on_loop.append(len(views)) or real(views))
    early: list[int] = []
    real_call = LandedHashes.__call__
    monkeypatch.setattr(LandedHashes, "__call__", lambda self, batch: early.append(1) or real_call(self, batch))
    import pdxfer.engine.receiver_nixl as receiver_nixl

    parsed_on_loop: list[int] = []  # the thread parsed each notification already: the loop must not again
    real_parse = receiver_nixl.parse_notif
    monkeypatch.setattr(receiver_nixl, "parse_notif", lambda raw: parsed_on_loop.append(1) or real_parse(raw))
    a, b = os.urandom(6000), os.urandom(2000)
    g = p.reserve("early", [6000, 2000])
    p.write(g, 0, a, _hdr(g, 0, 0, 6000, chunk_checksum(a)))
    p.write(g, 6000, b, _hdr(g, 1, 6000, 2000, chunk_checksum(b)))
    p.ctl.sock.send(m.encode(m.Commit(cid=g.cid, tid="early", digest=transfer_digest([chunk_checksum(a), chunk_checksum(b)]))))
    assert isinstance(p.ctl.recv(10), m.Done)
    with r.wait("early", timeout=10) as got:
        assert bytes(got.view) == a + b
    g2 = p.reserve("early-bad", [4096])
    data = os.urandom(4096)
    p.write(g2, 0, data, _hdr(g2, 0, 0, 4096, chunk_checksum(data) ^ 1))
    failed = p.ctl.recv(10)
    assert isinstance(failed, m.Failed) and failed.error == "integrity" and failed.tid == "early-bad"
    assert early and on_loop == [] and parsed_on_loop == []
    # Both slots end (the failed one just after its FAILED went out): nothing left to hash into.
    _eventually(lambda: core.nixl.early.live == 0 and r.ledger().reserved_bytes == 0)
