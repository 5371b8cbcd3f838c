"""Transfer scenarios against a real receiver over real sockets (in-process threads),
over both data paths (`backend`: TCP, and NIXL one-sided WRITEs where nixl is installed)."""

from __future__ import annotations

import concurrent.futures
import os
import random
import socket
import threading
import time

import pytest

from pdxfer.errors import AdmissionRejected, Backpressure, PeerLost, RejectReason, TransferAborted, TransferTimeout
from pdxfer.layout.payload import Payload


def test_bytes_arrive_intact_and_ledger_returns_to_zero(make_receiver, make_sender, backend):
    r, s = make_receiver(), make_sender(backend=backend)
    chunks = [os.urandom(n) for n in (1, 4096, 100_000, 1 << 20)]
    fut = s.submit(r.control_address, "t-intact", chunks)
    with r.wait("t-intact", timeout=10) as got:
        assert [bytes(got.chunk(i)) for i in range(4)] == chunks
    res = fut.result(10)
    assert res.nbytes == sum(map(len, chunks)) and res.chunks == 4
    _eventually(lambda: r.ledger().reserved_bytes == 0)
    assert s.budget_used == 0  # NIXL too: a transfer succeeds only after its WRITEs completed here


def _late_local_completions(monkeypatch, backend: str) -> None:
    """Make the progress thread's report that a WRITE completed here arrive 0.3 s late."""
    if backend == "nixl":
        from pdxfer.transport.nixl import NixlDataClient

        on_done = NixlDataClient._on_done

        def late(self, fut, state, err):
            self._loop.call_later(0.3, on_done, self, fut, state, err)

        monkeypatch.setattr(NixlDataClient, "_on_done", late)


def test_success_waits_for_the_last_writes_local_completion(make_receiver, make_sender, backend, monkeypatch):
    """Found in CI: the receiver's DONE (over ZMQ) overtook the progress thread's report that
    the last WRITEs completed here, so the future resolved with two chunks' budget still
    held and NIXL still holding buffers the caller was now free to reuse. The report is
    delayed here to make that order certain; the transfer must succeed only after it."""
    _late_local_completions(monkeypatch, backend)
    r, s = make_receiver(), make_sender(backend=backend)
    chunks = [os.urandom(256 << 10) for _ in range(4)]
    fut = s.submit(r.control_address, "t-local-completion", chunks)
    with r.wait("t-local-completion", timeout=10) as got:
        assert bytes(got.view) == b"".join(chunks)
    fut.result(10)
    assert s.budget_used == 0  # at resolution, not eventually


def test_failure_waits_for_the_writes_in_flight(make_receiver, make_sender, backend, monkeypatch):
    """Aborted with WRITEs still reading its chunks: the caller may free those chunks as
    soon as the future is done, so it must not be done before the WRITEs are."""
    _late_local_completions(monkeypatch, backend)
    r, s = make_receiver(), make_sender(backend=backend)
    chunks = [os.urandom(256 << 10) for _ in range(4)]
    h = s.open(r.control_address, "t-abort-in-flight", Payload.of(chunks))
    for i in range(3):  # the last chunk never comes: no DONE can end it first
        h.put(i, chunks[i])
    _eventually(lambda: s.budget_used < 3 * (256 << 10) if backend == "tcp" else s.nixl_write_requests > 0)
    h.abort("caller gave up")
    with pytest.raises(TransferAborted):
        h.future.result(10)
    assert s.budget_used == 0  # at resolution, not eventually
    _eventually(lambda: r.ledger().reserved_bytes == 0)


def test_chunks_put_out_of_order_are_sent_in_order(make_receiver, make_sender, backend):
    r, s = make_receiver(), make_sender(backend=backend)
    chunks = [bytes([i]) * 1000 for i in range(6)]
    h = s.open(r.control_address, "t-order", Payload.of(chunks))
    for i in (3, 0, 5, 1, 4, 2):
        h.put(i, chunks[i])
    with r.wait("t-order", timeout=10) as got:
        assert bytes(got.view) == b"".join(chunks)
    h.future.result(10)


def test_transfer_larger_than_capacity_is_rejected_at_once(make_receiver, make_sender, backend):
    r, s = make_receiver(capacity=1 << 20), make_sender(backend=backend)
    t0 = time.monotonic()
    fut = s.submit(r.control_address, "too-big", [bytes(2 << 20)], deadline_s=30)
    with pytest.raises(AdmissionRejected) as info:
        fut.result(10)
    assert info.value.reason is RejectReason.TOO_LARGE
    assert info.value.transfer_id == "too-big"
    assert time.monotonic() - t0 < 5  # "at once", i.e. not after the 30 s deadline
    assert s.budget_used == 0


def test_thousand_concurrent_transfers_at_five_percent_capacity(make_receiver, make_sender, backend):
    rng = random.Random(7)
    sizes = [rng.randint(16 << 10, 112 << 10) for _ in range(1000)]
    capacity = sum(sizes) // 20
    r = make_receiver(capacity=capacity, alignment=4096)
    s = make_sender(memory_budget=sum(sizes) + (1 << 20), backend=backend)
    blob = os.urandom(max(sizes))
    done = threading.Event()
    peaks: list[int] = []

    def sample():
        while not done.is_set():
            led = r.ledger()
            assert led.reserved_bytes <= led.capacity
            peaks.append(led.reserved_bytes)
            time.sleep(0.01)

    sampler = concurrent.futures.ThreadPoolExecutor(1).submit(sample)
    consumer_errors = []

    def consume(tid: str, size: int):
        try:
            with r.wait(tid, timeout=90) as got:
                assert got.payload.total_bytes == size and bytes(got.view) == blob[:size]
        except Exception as exc:  # surfaced below
            consumer_errors.append(exc)

    with concurrent.futures.ThreadPoolExecutor(32) as pool:
        consumers = [pool.submit(consume, f"c{i}", n) for i, n in enumerate(sizes)]
        futs = [s.submit(r.control_address, f"c{i}", [blob[:n]], deadline_s=90) for i, n in enumerate(sizes)]
        results = [f.result(120) for f in futs]
        for c in consumers:
            c.result(120)
    done.set()
    sampler.result(10)
    assert not consumer_errors
    assert len(results) == 1000
    assert max(peaks) <= capacity
    _eventually(lambda: r.ledger().reserved_bytes == 0)
    led = r.ledger()
    assert led.waiting_count == 0 and led.counters["ended_released"] == 1000
    assert led.counters["queued_total"] > 0  # the 5% capacity really made transfers wait


def test_deadline_while_queued_names_the_state_and_frees_everything(make_receiver, make_sender, backend):
    r, s = make_receiver(capacity=1 << 20), make_sender(backend=backend)
    s.submit(r.control_address, "holder", [bytes(1 << 20)]).result(10)
    held = r.wait("holder", timeout=10)  # claimed and not released: the pool is full
    fut = s.submit(r.control_address, "starved", [bytes(4096)], deadline_s=0.5)
    with pytest.raises(TransferTimeout) as info:
        fut.result(10)
    assert info.value.waiting_for == "queued" and info.value.transfer_id == "starved"
    _eventually(lambda: r.ledger().waiting_count == 0)
    held.release()
    _eventually(lambda: r.ledger().reserved_bytes == 0)
    _eventually(lambda: s.budget_used == 0)


@pytest.fixture
def hung_receiver():
    """An address that accepts TCP connections and then never says a word (a hung host)."""
    with socket.create_server(("127.0.0.1", 0)) as srv:
        yield f"tcp://127.0.0.1:{srv.getsockname()[1]}"


def test_unreachable_receiver_fails_with_peer_lost(make_sender, backend, hung_receiver):
    s = make_sender(handshake_timeout_s=0.3, backend=backend)
    fut = s.submit(hung_receiver, "nowhere", [b"x" * 100], deadline_s=10)
    with pytest.raises(PeerLost) as info:
        fut.result(10)
    assert info.value.waiting_for == "hello" and "no HELLO reply" in str(info.value)
    assert s.budget_used == 0


def test_refused_connection_fails_at_once_not_after_the_handshake_timeout(make_sender, backend):
    """Nothing listens there: the refusal itself ends the lane (ZMQ alone would retry
    silently until handshake_timeout_s, 60 s here)."""
    s = make_sender(handshake_timeout_s=60, backend=backend)
    fut = s.submit("tcp://127.0.0.1:9", "refused", [b"x" * 100], deadline_s=120)
    with pytest.raises(PeerLost, match="refused the connection") as info:
        fut.result(30)
    assert info.value.waiting_for == "hello" and info.value.peer == "tcp://127.0.0.1:9"
    _eventually(lambda: s.budget_used == 0)


def test_full_budget_is_backpressure_with_a_deadline(make_sender, hung_receiver):
    """Never granted: its chunks may fill half the budget, and then put() waits, with a
    deadline, for the GRANT (see MemoryBudget)."""
    s = make_sender(memory_budget=1 << 20, handshake_timeout_s=5)
    h = s.open(hung_receiver, "stuck", Payload((512 << 10, 512 << 10)))
    h.put(0, bytes(512 << 10))
    with pytest.raises(Backpressure, match="not granted this transfer yet") as info:
        h.put(1, bytes(512 << 10), timeout=0.2)
    assert info.value.waiting_for == "grant" and info.value.transfer_id == "stuck"
    assert s.budget_used == 512 << 10  # the refused chunk took nothing
    with pytest.raises(ValueError, match="never fit"):
        s.open(hung_receiver, "huge", Payload((2 << 20,))).put(0, bytes(2 << 20))


def test_queued_transfers_cannot_starve_the_granted_one(make_receiver, make_sender, backend):
    """The receiver has room for one transfer: A is granted, B queued behind it. B's
    producer puts first and would, without a cap, take the whole send budget; A's puts
    would then wait for budget that only A's completion (which makes room for B) could
    free, and both would fail at their deadlines. B's chunks may take half the budget
    until its GRANT, so A goes through and then B does."""
    r = make_receiver(capacity=3 << 20)
    s = make_sender(memory_budget=1 << 20, backend=backend)
    a_chunks = [os.urandom(256 << 10) for _ in range(8)]
    b_chunks = [os.urandom(512 << 10) for _ in range(4)]
    a = s.open(r.control_address, "granted-a", Payload.of(a_chunks))
    assert a.wait_granted(10)
    b = s.open(r.control_address, "queued-b", Payload.of(b_chunks))
    _eventually(lambda: r.ledger().waiting_count == 1)
    errors: list[BaseException] = []

    def produce_b() -> None:
        try:
            for i, c in enumerate(b_chunks):
                b.put(i, c, timeout=20)
        except BaseException as exc:  # noqa: BLE001 - reported by the assertion below
            errors.append(exc)

    t = threading.Thread(target=produce_b)
    t.start()
    try:
        _eventually(lambda: s.budget_used == 512 << 10)
        assert t.is_alive() and not b.granted  # B waits at half the budget, not at all of it
        for i, c in enumerate(a_chunks):
            a.put(i, c, timeout=5)
        with r.wait("granted-a", timeout=10) as got:
            assert bytes(got.view) == b"".join(a_chunks)
        a.future.result(10)
        with r.wait("queued-b", timeout=20) as got:
            assert bytes(got.view) == b"".join(b_chunks)
        b.future.result(10)
    finally:
        t.join(30)
    assert not t.is_alive() and not errors
    assert s.budget_used == 0


def test_chunk_refused_for_backpressure_can_be_put_again(make_receiver, make_sender, hung_receiver, backend):
    """A put that found no budget took nothing: the caller (vLLM's engine thread, which
    puts with timeout 0 and comes back a step later) may put that chunk again. It used to
    be remembered as submitted, and the retry failed with "submitted twice"."""
    r = make_receiver()
    s = make_sender(memory_budget=1 << 20, backend=backend)
    hog = s.open(hung_receiver, "hog", Payload((512 << 10,)))
    hog.put(0, bytes(512 << 10))  # half the budget (all an ungranted transfer may take), held for good
    data = os.urandom(1 << 20)
    h = s.open(r.control_address, "retried", Payload((1 << 20,)))
    assert h.wait_granted(10)
    assert not h.fits(1 << 20)
    with pytest.raises(Backpressure):
        h.put(0, data, timeout=0)
    hog.abort("make room")
    _eventually(lambda: s.budget_used == 0)
    assert h.fits(1 << 20)
    h.put(0, data, timeout=0)
    with r.wait("retried", timeout=10) as got:
        assert bytes(got.view) == data
    h.future.result(10)


def test_buffers_reused_on_release_arrive_intact(make_receiver, make_sender, backend):
    """A producer with two buffers sends eight chunks, refilling a buffer as soon as the
    Sender reports it released. Had a notice come while the Sender could still read the
    buffer (a WRITE in flight, a send not done), the refill would change bytes in flight:
    the receiver would get other bytes, or fail the chunk's checksum."""
    r, s = make_receiver(), make_sender(backend=backend)
    n, size = 8, 256 << 10
    want = [os.urandom(size) for _ in range(n)]
    free = [bytearray(size), bytearray(size)]
    lock = threading.Condition()
    released: list[int] = []
    h = s.open(r.control_address, "reused", Payload((size,) * n))
    for i in range(n):
        with lock:
            assert lock.wait_for(lambda: free, timeout=10), f"no buffer came back for chunk {i}"
            buf = free.pop()
        buf[:] = want[i]

        def back(i: int = i, buf: bytearray = buf) -> None:
            with lock:
                released.append(i)
                free.append(buf)
                lock.notify_all()

        h.put(i, buf, on_release=back)
    with r.wait("reused", timeout=10) as got:
        assert [bytes(got.chunk(i)) for i in range(n)] == want
    h.future.result(10)
    assert sorted(released) == list(range(n))  # each once, all by the time the future resolved


def test_release_notices_fire_for_chunks_never_sent(make_sender, hung_receiver):
    s = make_sender(memory_budget=4 << 20)
    released: list[int] = []
    h = s.open(hung_receiver, "never-sent", Payload((4096, 4096, 4096)))
    for i in range(2):
        h.put(i, bytes(4096), on_release=lambda i=i: released.append(i))
    assert released == []  # held: no GRANT, nothing sent
    h.abort("gave up")
    with pytest.raises(TransferAborted):
        h.future.result(10)
    _eventually(lambda: sorted(released) == [0, 1])
    assert len(s._notices) == 0  # nothing left registered


def test_wait_granted_returns_at_the_grant_or_at_the_end(make_receiver, make_sender, hung_receiver, backend):
    s = make_sender(backend=backend)
    stuck = s.open(hung_receiver, "stuck-grant", Payload((4096,)))
    assert not stuck.wait_granted(0.2) and not stuck.granted
    stuck.abort("gave up")
    assert stuck.wait_granted(5)  # ended: nobody should wait on it any more
    r = make_receiver()
    h = s.open(r.control_address, "gets-grant", Payload((4096,)))
    assert h.wait_granted(10) and h.granted and not h.future.done()  # granted before any chunk
    h.put(0, bytes(4096))
    h.future.result(10)


def test_bad_input_is_named(make_sender, hung_receiver):
    s = make_sender()
    h = s.open(hung_receiver, "bad", Payload((10, 10)))
    with pytest.raises(ValueError, match="chunk 0 has 3 bytes"):
        h.put(0, b"abc")
    with pytest.raises(IndexError, match="chunk index 5"):
        h.put(5, b"x" * 10)
    with pytest.raises(ValueError, match="already in flight"):
        s.open(hung_receiver, "bad", Payload((1,)))
    h.abort()


def _eventually(pred, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if pred():
            return
        time.sleep(0.02)
    assert pred()


def test_abort_before_reserve_wakes_the_decode_side_waiter(make_receiver, make_sender):
    r, s = make_receiver(), make_sender()
    waiter = r.wait_future("early-abort", timeout=30)
    h = s.open(r.control_address, "early-abort", Payload((4096,)))
    h.abort("client went away")  # posted right behind open(): the lane is still connecting
    with pytest.raises(TransferAborted) as info:
        waiter.result(10)  # well before the waiter's own 30 s timeout
    assert info.value.transfer_id == "early-abort"
    with pytest.raises(TransferAborted):
        h.future.result(5)


def test_only_the_handle_that_claimed_a_transfer_releases_it(make_receiver, make_sender):
    """A stale handle for the same id (its reservation ended, the id was reused) must not
    free the current transfer's buffer while its consumer still reads it."""
    from pdxfer.engine.receiver import ReceivedTransfer

    r, s = make_receiver(), make_sender()
    s.submit(r.control_address, "reused", [b"n" * 8192]).result(10)
    got = r.wait("reused", 5)
    stale = ReceivedTransfer(r, "reused", "someone", got.payload, memoryview(bytearray(8192)))
    stale.release()
    time.sleep(0.1)  # give the loop time to (wrongly) act on it
    assert r.ledger().reserved_bytes > 0 and bytes(got.view[:1]) == b"n"
    got.release()
    _eventually(lambda: r.ledger().reserved_bytes == 0)


def test_data_connection_wakes_per_piece_and_rests_on_a_header(make_receiver, make_sender):
    """The receive low-water mark follows the parser: it is set for a large payload's
    pieces, a frame's tail smaller than a piece still lands (nothing else follows it on
    the wire: COMMIT goes over ZMQ), and between transfers it is back at 1 (a header
    needs no mark)."""
    import socket as _socket

    r, s = make_receiver(recv_piece_bytes=64 << 10), make_sender()
    chunks = [os.urandom(n) for n in ((1 << 20) + 3, 5, (200 << 10) + 1)]
    fut = s.submit(r.control_address, "t-lowat", chunks)
    with r.wait("t-lowat", timeout=10) as got:
        assert [bytes(got.chunk(i)) for i in range(3)] == chunks
    fut.result(10)
    conns = [p.conn for p in r._core._by_token.values() if p.conn is not None]
    assert len(conns) == 1
    kernel = conns[0].transport.get_extra_info("socket").getsockopt(_socket.SOL_SOCKET, _socket.SO_RCVLOWAT)
    assert conns[0].rcvlowat == kernel == 1
    assert conns[0].lowat_changes >= 4  # set and reset around each of the two large payloads


def test_small_receive_pieces_still_land_every_byte_verified(make_receiver, make_sender):
    """TCP payloads land in pieces of at most recv_piece_bytes (hashed as each lands);
    a piece far smaller than a chunk changes nothing the caller can see."""
    r, s = make_receiver(recv_piece_bytes=4096), make_sender()
    chunks = [os.urandom(n) for n in (1, 4095, 4097, 3 << 20)]
    fut = s.submit(r.control_address, "t-pieces", chunks)
    with r.wait("t-pieces", timeout=10) as got:
        assert [bytes(got.chunk(i)) for i in range(4)] == chunks
    assert fut.result(10).nbytes == sum(map(len, chunks))
    _eventually(lambda: r.ledger().reserved_bytes == 0)
