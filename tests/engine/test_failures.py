"""Peers that go silent, die, or send garbage: nothing hangs, leaks or corrupts.

Scenarios that do not depend on TCP framing run over both data paths (`backend`); the
frame-level garbage tests are TCP-only (NIXL's equivalents: tests/transport/test_nixl_*)."""

from __future__ import annotations

import signal
import socket
import time

import numpy as np
import pytest
import structlog

from pdxfer.bench.procs import free_port
from pdxfer.errors import PeerLost
from pdxfer.layout.payload import Payload
from pdxfer.protocol import frames as f
from pdxfer.protocol import messages as m

from tests.engine.test_transfers import _eventually
from tests.transport.control_harness import RawDealer


def _closed_by_peer(c: socket.socket) -> bool:
    """True once the receiver dropped the connection (FIN or RST both count)."""
    c.settimeout(5)
    try:
        return c.recv(1) == b""
    except (ConnectionResetError, BrokenPipeError):
        return True


class RawPeer(RawDealer):
    """A hand-driven protocol peer, to misbehave in ways a real Sender never would."""

    def __init__(self, address: str) -> None:
        super().__init__(address, b"raw-peer")

    def request(self, msg: m.Message, timeout: float = 5.0) -> m.Message:
        self.sock.send(m.encode(msg))
        return self.recv(timeout)


def test_silent_sender_lease_expires_and_waiter_is_admitted(make_receiver, make_sender, backend):
    """TCP: the expired extent is reused at once (late bytes of the silent sender can only
    arrive on its own connection, which resolves them to nothing). NIXL: the silent sender
    could still WRITE into its extent, so the extent is quarantined until the sender says
    its WRITEs are over (its ABORT) or the quarantine times out."""
    r = make_receiver(capacity=1 << 20, lease_s=0.4, nixl_quarantine_s=60.0)
    peer = RawPeer(r.control_address)
    data = None
    try:
        if backend == "tcp":
            ok = peer.request(m.Hello(cid=1, sender_id="silent"))
            host, _, port = ok.data_address.rpartition(":")
            data = socket.create_connection((host, int(port)), timeout=5)
            data.sendall(f.pack_header(f.KIND_HELLO, 0, ok.conn_token, 0, 0, 0))
        else:  # a NIXL peer has no data connection at all: only its lease can end its reservation
            ok = peer.request(m.Hello(cid=1, sender_id="silent", capabilities=["nixl"], nixl_agent="silent-agent"), 30)
            assert isinstance(ok, m.HelloOk) and "nixl" in ok.capabilities and ok.nixl_md
        grant = peer.request(m.Reserve(cid=2, tid="silent-1", total_bytes=1 << 20, chunk_sizes=[1 << 20], deadline_ms=60_000))
        assert isinstance(grant, m.Grant)
        assert (grant.addr is not None) == (backend == "nixl")
        # The whole pool is now held by a sender that will never send a byte.
        s = make_sender(backend=backend)
        fut = s.submit(r.control_address, "patient", [b"p" * 4096], deadline_s=20)
        failed = peer.recv(5)  # the receiver tells the silent sender why it lost its room
        assert isinstance(failed, m.Failed) and failed.error == "lease_expired" and failed.tid == "silent-1"
        if backend == "nixl":
            led = r.ledger()
            assert led.quarantined_bytes == 1 << 20 and led.counters["quarantined_total"] == 1
            assert led.waiting_count == 1 and not fut.done()  # not granted over a range that may still be written
            peer.sock.send(m.encode(m.Abort(cid=2, tid="silent-1", reason="writes_over")))
        with r.wait("patient", timeout=15) as got:
            assert bytes(got.view) == b"p" * 4096
        fut.result(10)
        led = r.ledger()
        assert led.counters["ended_lease_expired"] == 1
        assert led.counters["quarantine_settled"] == (1 if backend == "nixl" else 0)
        _eventually(lambda: r.ledger().reserved_bytes == 0 and r.ledger().quarantined_bytes == 0)
    finally:
        if data is not None:
            data.close()
        peer.close()


def test_nixl_quarantine_times_out_without_the_senders_word(make_receiver, make_sender):
    pytest.importorskip("nixl")
    r = make_receiver(capacity=1 << 20, lease_s=0.3, nixl_quarantine_s=0.5)
    peer = RawPeer(r.control_address)
    try:
        ok = peer.request(m.Hello(cid=1, sender_id="silent", capabilities=["nixl"], nixl_agent="silent-agent"), 30)
        assert isinstance(ok, m.HelloOk)
        assert isinstance(peer.request(m.Reserve(cid=2, tid="q-1", total_bytes=1 << 20, chunk_sizes=[1 << 20],
                                                 deadline_ms=60_000)), m.Grant)
        s = make_sender()
        fut = s.submit(r.control_address, "after-quarantine", [b"q" * 4096], deadline_s=20)
        with r.wait("after-quarantine", timeout=15):
            pass
        fut.result(10)
        led = r.ledger()
        assert led.counters["quarantined_total"] == 1 and led.counters["quarantine_expired"] == 1
        assert led.quarantined_bytes == 0
    finally:
        peer.close()


def test_receiver_killed_mid_transfer_fails_sender_with_peer_lost(receiver_proc, make_sender, backend):
    rx = receiver_proc("--capacity", str(64 << 20))
    s = make_sender(peer_timeout_s=2.0, heartbeat_s=0.2, backend=backend)
    payload = Payload.uniform(32 << 20, 1 << 20)
    h = s.open(rx.info["control"], "doomed", payload, deadline_s=20)
    chunk = np.ones(1 << 20, dtype=np.uint8)
    for i in range(4):
        h.put(i, chunk)
    _eventually(lambda: s.budget_used == 0)  # the first chunks went out: we are mid-transfer
    rx.signal(signal.SIGKILL)
    rx.proc.wait(10)
    t0 = time.monotonic()
    with pytest.raises(PeerLost) as info:
        h.future.result(20)
    assert time.monotonic() - t0 < 20
    assert info.value.peer == rx.info["control"]
    with pytest.raises(PeerLost):
        h.put(4, chunk)  # the engine learns at once that producing more is pointless
    assert s.budget_used == 0


def test_receiver_restarted_on_the_same_address_is_told_apart_from_the_old_one(receiver_proc, make_sender, backend):
    """Found by `pdxfer chaos`: a receiver killed and restarted on the same control port
    while a NIXL lane sat idle. ZMQ reconnected the lane to the new process without a
    word (NIXL has no data connection whose EOF would tell), the new receiver answered
    every RESERVE with "send HELLO first", and each transfer waited out its deadline. Now
    the first transfer fails at once with PeerLost naming why, and the next one runs on
    a fresh lane that says HELLO to the new receiver."""
    port = str(free_port())
    rx = receiver_proc("--capacity", str(16 << 20), "--control-port", port)
    s = make_sender(backend=backend)  # an idle lane sends no heartbeats: nothing else notices
    payload = Payload.uniform(1 << 20, 256 << 10)
    chunk = np.ones(256 << 10, dtype=np.uint8)

    def transfer(tid: str) -> None:
        h = s.open(rx.info["control"], tid, payload, deadline_s=30)
        for i in range(payload.chunk_count):
            h.put(i, chunk)
        h.future.result(35)

    transfer("before")
    rx.signal(signal.SIGKILL)
    rx.proc.wait(10)
    rx = receiver_proc("--capacity", str(16 << 20), "--control-port", port)
    try:
        transfer("first-after")  # TCP: the old lane has mostly seen its data connection close
    except PeerLost as exc:  # not TransferTimeout: the old lane is told apart at the first reply
        assert backend == "tcp" or "no longer knows this sender" in str(exc), exc
    transfer("second-after")
    assert s.budget_used == 0


def test_malformed_truncated_and_oversized_frames_drop_only_that_connection(make_receiver, make_sender):
    r = make_receiver()
    s = make_sender()
    host, _, port = r.data_address.rpartition(":")
    bad_inputs = [
        b"GARBAGE" * 10,  # bad magic
        f.pack_header(f.KIND_DATA, 0, 1, 0, 10, 0),  # data before hello
        f.pack_header(f.KIND_HELLO, 0, 12345, 0, 0, 0),  # unknown conn token
        f.pack_header(f.KIND_HELLO, 0, 1, 0, 0, 0)[:17],  # truncated header, then EOF
    ]
    with structlog.testing.capture_logs() as logs:
        for raw in bad_inputs:
            c = socket.create_connection((host, int(port)), timeout=5)
            try:
                c.sendall(raw)
                c.shutdown(socket.SHUT_WR)
            except OSError:  # the receiver already reset it (a race under load): that is the point
                pass
            assert _closed_by_peer(c)
            c.close()
        peer = RawPeer(r.control_address)
        try:
            peer.sock.send(b"\x93not msgpack at all")
            assert isinstance(peer.recv(), m.Error)
            peer.sock.send(b"x" * (m.MAX_CONTROL_MESSAGE + 10))  # oversized: zmq drops the peer
        finally:
            peer.close()
        # ... and a well-behaved transfer still works afterwards.
        fut = s.submit(r.control_address, "after-garbage", [b"ok" * 1000])
        with r.wait("after-garbage", timeout=10) as got:
            assert bytes(got.view) == b"ok" * 1000
        fut.result(10)
    events = {e["event"] for e in logs}
    assert {"data_connection_dropped", "data_truncated", "control_malformed"} <= events
    _eventually(lambda: r.ledger().reserved_bytes == 0)


def test_frame_for_another_peers_slot_or_wrong_size_drops_connection(make_receiver):
    r = make_receiver()
    peer = RawPeer(r.control_address)
    try:
        ok = peer.request(m.Hello(cid=1, sender_id="evil"))
        g = peer.request(m.Reserve(cid=2, tid="x", total_bytes=8192, chunk_sizes=[4096, 4096], deadline_ms=10_000))
        assert isinstance(g, m.Grant)
        host, _, port = ok.data_address.rpartition(":")
        c = socket.create_connection((host, int(port)), timeout=5)
        c.sendall(f.pack_header(f.KIND_HELLO, 0, ok.conn_token, 0, 0, 0))
        c.sendall(f.pack_header(f.KIND_DATA, 1, g.slot, 0, 4096, 0))  # chunk 1 claims chunk 0's offset
        assert _closed_by_peer(c)
        c.close()
        # The connection loss ended this peer's reservation: nothing is left reserved.
        _eventually(lambda: r.ledger().reserved_bytes == 0)
    finally:
        peer.close()


@pytest.mark.slow
def test_one_gib_between_two_processes_every_byte_verified(receiver_proc, make_sender, backend):
    from pdxfer.bench import pattern

    rx = receiver_proc("--capacity", str(256 << 20), "--verify-pattern")
    s = make_sender(memory_budget=256 << 20, backend=backend)
    tsize, chunk, n = 64 << 20, 2 << 20, 16  # 1 GiB in 512 chunks
    payload = Payload.uniform(tsize, chunk)
    futures = []
    for t in range(n):
        tid = f"gib-{t}"
        h = s.open(rx.info["control"], tid, payload, deadline_s=120)
        for i in range(payload.chunk_count):
            h.put(i, pattern.make(chunk, tid, i), timeout=60)
        futures.append(h.future)
    total = sum(f.result(120).nbytes for f in futures)
    assert total == 1 << 30
    final = rx.stop()
    assert final is not None
    assert final["stats"]["mismatched"] == []
    assert final["stats"]["verified"] == n and final["stats"]["bytes"] == 1 << 30
    assert final["ledger"]["reserved_bytes"] == 0
    assert s.budget_used == 0  # NIXL too: a transfer succeeds only after its WRITEs completed here


def test_nixl_sender_abort_after_its_writes_frees_the_range_without_waiting_out_the_quarantine(make_receiver, make_sender):
    """A NIXL transfer that times out half-written: the sender's ABORT (sent once its
    WRITEs completed) settles the receiver's quarantine long before it would expire."""
    pytest.importorskip("nixl")
    from pdxfer.errors import TransferTimeout

    r = make_receiver(capacity=8 << 20, nixl_quarantine_s=60.0)
    s = make_sender(backend="nixl")
    h = s.open(r.control_address, "half", Payload.uniform(4 << 20, 1 << 20), deadline_s=2.0)
    chunk = np.ones(1 << 20, dtype=np.uint8)
    h.put(0, chunk)
    h.put(1, chunk)
    with pytest.raises(TransferTimeout):
        h.future.result(15)
    _eventually(lambda: r.ledger().reserved_bytes == 0 and r.ledger().quarantined_bytes == 0, 10)
    led = r.ledger()
    assert led.counters["quarantine_expired"] == 0  # the sender's word, not the timeout, freed it
    # and the receiver serves the next transfer into that range
    s.submit(r.control_address, "next", [np.full(1 << 20, 7, dtype=np.uint8)]).result(15)
    with r.wait("next", 5) as got:
        assert bytes(got.view[:4]) == b"\x07" * 4
