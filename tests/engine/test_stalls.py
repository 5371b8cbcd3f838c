"""This process stalled, not its peer: a deadline must not blame the peer for replies
that are already waiting unread.

After the event loop's own thread was held up (the engine holding the GIL, CPU
starvation), uvloop runs due timers before it polls for I/O, so a heartbeat check or a
lease tick runs while the peer's answers from the stall are still in the socket. Seen in
CI under load: a prefill lane declared a live decode worker "silent for 5.48s" and failed
two requests that were about to complete."""

from __future__ import annotations

import asyncio
import signal
import socket
import time

import pytest

from pdxfer.errors import PeerLost
from pdxfer.layout.payload import Payload
from pdxfer.protocol import messages as m

from tests.engine.test_failures import RawPeer
from tests.engine.test_transfers import _eventually


def _stall(rt, seconds: float) -> None:
    """Hold the loop thread inside an I/O callback: the worst place. I/O that arrives
    meanwhile is only polled for after the next pass over the timers, so every timer that
    fell due during the stall runs first (a GIL-starved loop thread that just returned
    from epoll is in exactly this spot)."""
    a, b = socket.socketpair()

    def stuck() -> None:
        rt.loop.remove_reader(a.fileno())
        a.recv(1)
        time.sleep(seconds)
        a.close()

    rt.call(rt.loop.add_reader, a.fileno(), stuck)
    b.send(b"x")
    b.close()


def test_sender_loop_stall_is_not_receiver_silence(make_receiver, make_sender):
    r = make_receiver(capacity=1 << 20, lease_s=30.0)
    hog = RawPeer(r.control_address)
    try:
        assert isinstance(hog.request(m.Hello(cid=1, sender_id="hog")), m.HelloOk)
        grant = hog.request(m.Reserve(cid=2, tid="hog-1", total_bytes=1 << 20, chunk_sizes=[1 << 20],
                                      deadline_ms=60_000))
        assert isinstance(grant, m.Grant)
        s = make_sender(heartbeat_s=0.1, peer_timeout_s=1.0)
        fut = s.submit(r.control_address, "patient", [b"q" * 4096], deadline_s=30)
        _eventually(lambda: r.ledger().waiting_count == 1)  # queued behind the hog, heartbeating
        for _ in range(2):
            _stall(s._rt, 2.0)  # the sender's own loop stops for twice the peer timeout
            _eventually(lambda: s._rt.stalls >= 1, timeout=10)
            time.sleep(0.5)
            assert not fut.done(), fut.exception()
        hog.sock.send(m.encode(m.Abort(cid=3, tid="hog-1", reason="done")))
        with r.wait("patient", timeout=15) as got:
            assert bytes(got.view) == b"q" * 4096
        assert fut.result(10).nbytes == 4096
        assert s._rt.worst_stall_s >= 1.5
    finally:
        hog.close()


def test_receiver_loop_stall_does_not_expire_a_heartbeating_lease(make_receiver, make_sender):
    r = make_receiver(capacity=1 << 20, lease_s=1.0)
    s = make_sender(heartbeat_s=0.1, peer_timeout_s=10.0)
    h = s.open(r.control_address, "held", Payload.uniform(8192, 4096), deadline_s=30)
    _eventually(lambda: r.ledger().reserved_bytes == 8192)  # granted; no bytes yet, only heartbeats
    for _ in range(2):
        _stall(r._rt, 2.0)  # twice the lease, with the sender's heartbeats piling up unread
        _eventually(lambda: r._rt.stalls >= 1, timeout=10)
        time.sleep(0.3)
        assert not h.future.done(), h.future.exception()
    h.put(0, b"a" * 4096)
    h.put(1, b"b" * 4096)
    with r.wait("held", timeout=15) as got:
        assert bytes(got.view) == b"a" * 4096 + b"b" * 4096
    h.future.result(10)
    led = r.ledger()
    assert led.counters.get("ended_lease_expired", 0) == 0
    _eventually(lambda: r.ledger().reserved_bytes == 0)


@pytest.mark.parametrize("who", ["sender", "receiver"])
def test_a_stall_is_logged_and_counted(make_receiver, make_sender, who):
    r = make_receiver()
    s = make_sender()
    rt = s._rt if who == "sender" else r._rt
    before = rt.stalls
    _stall(rt, 1.6)
    _eventually(lambda: rt.stalls == before + 1, timeout=10)
    assert 1.0 < rt.worst_stall_s < 10


def test_a_hung_receiver_is_still_declared_lost(receiver_proc, make_sender):
    """The other side of the same rule: a receiver that stops answering (SIGSTOP: its
    sockets stay open, so only the heartbeat can tell) fails the transfer with PeerLost
    about `peer_timeout_s` after the first unanswered heartbeat."""
    rx = receiver_proc("--capacity", str(64 << 20), "--lease", "60")
    s = make_sender(heartbeat_s=0.1, peer_timeout_s=1.0)
    h = s.open(rx.info["control"], "hung", Payload.uniform(8192, 4096), deadline_s=60)
    h.put(0, b"x" * 4096)
    _eventually(lambda: s.budget_used == 0)  # granted and the first chunk is out
    rx.signal(signal.SIGSTOP)
    try:
        t0 = time.monotonic()
        with pytest.raises(PeerLost) as info:
            h.future.result(30)
        waited = time.monotonic() - t0
        assert "heartbeat" in str(info.value) and info.value.peer == rx.info["control"]
        assert waited < 30  # not the 60 s deadline: the heartbeat rule fired
    finally:
        rx.signal(signal.SIGCONT)
    assert s.budget_used == 0


def test_a_long_transfer_does_not_hold_the_senders_loop(make_receiver, make_sender, backend, monkeypatch):
    """The send loop hands the event loop back every YIELD_AFTER_CHUNKS chunks at most.
    A NIXL post returns at once and a hash on the loop never suspends, so without that a
    whole transfer ran in one loop turn: GRANTs and DONEs of other lanes, heartbeats and
    WRITE completions all waited behind it. Probe: a callback queued on the loop when
    the first chunk goes out must run before the transfer's last chunk does."""
    from pdxfer.engine import lane as lane_mod
    from pdxfer.transport import tcp

    handed: list[int] = []
    probe_saw: list[int] = []

    def note(index: int) -> None:
        handed.append(index)
        if index == 0:
            asyncio.get_running_loop().call_soon(lambda: probe_saw.append(len(handed)))

    if backend == "nixl":
        from pdxfer.transport import nixl

        orig_nixl = nixl.NixlDataClient.send_chunk

        def nixl_send(self, **kw):
            note(kw["index"])
            return orig_nixl(self, **kw)

        monkeypatch.setattr(nixl.NixlDataClient, "send_chunk", nixl_send)
    else:
        orig_tcp = tcp.DataClient.send_chunk

        async def tcp_send(self, slot, index, offset, payload, checksum):
            note(index)
            await orig_tcp(self, slot, index, offset, payload, checksum)

        monkeypatch.setattr(tcp.DataClient, "send_chunk", tcp_send)
    n = 4 * lane_mod.YIELD_AFTER_CHUNKS
    r = make_receiver(capacity=64 << 20)
    s = make_sender(backend=backend)
    chunks = [bytes([i % 251]) * 16384 for i in range(n)]
    fut = s.submit(r.control_address, "long", chunks)
    with r.wait("long", timeout=20) as got:
        assert bytes(got.view) == b"".join(chunks)
    fut.result(10)
    assert handed == list(range(n))
    assert probe_saw and probe_saw[0] <= lane_mod.YIELD_AFTER_CHUNKS + 1, probe_saw
