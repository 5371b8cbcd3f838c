"""The NIXL progress thread and registration cache, with real agents on host memory."""

from __future__ import annotations

import asyncio
import os
import time

import pytest

from tests.conftest import HAVE_NIXL

pytestmark = [pytest.mark.skipif(not HAVE_NIXL, reason="nixl is not installed"), pytest.mark.timeout(60)]

SIZE = 1 << 20


@pytest.fixture
def pair():
    """Two agents in this process: `dst` registers a region, `src` has loaded its metadata."""
    from pdxfer.transport.nixl_agent import NixlAgent
    from pdxfer.transport.nixl_regcache import buffer_address

    tag = os.urandom(3).hex()
    src, dst = NixlAgent(f"test-src-{tag}"), NixlAgent(f"test-dst-{tag}")
    region = bytearray(SIZE)
    dst.register(buffer_address(memoryview(region)), SIZE)
    remote = src.add_remote(dst.metadata())
    yield src, dst, remote, region
    src.close()
    dst.close()


def _eventually(pred, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and not pred():
        time.sleep(0.005)  # poll-ok: test helper
    assert pred()


def test_write_with_notification_completes_and_threads_park_when_idle(pair):
    from pdxfer.transport.nixl_progress import NixlProgress
    from pdxfer.transport.nixl_regcache import buffer_address

    src, dst, remote, region = pair
    sender, receiver = NixlProgress(src, "t-send"), NixlProgress(dst, "t-recv")
    try:
        async def main() -> tuple[str, list[bytes]]:
            loop = asyncio.get_running_loop()
            got: asyncio.Future[list[bytes]] = loop.create_future()
            receiver.set_sink(loop, lambda n: got.done() or got.set_result([m for ms in n.values() for m in ms]))
            receiver.want_notifs(+1)
            done: asyncio.Future[str] = loop.create_future()
            payload = memoryview(bytearray(b"abc" * 1000))
            sender.post(loop, lambda state, err: done.set_result(state), payload,
                        buffer_address(memoryview(region)) + 4096, payload.nbytes, remote, b"hello", owner="t1")
            state = await asyncio.wait_for(done, 10)
            notifs = await asyncio.wait_for(got, 10)
            receiver.want_notifs(-1)
            sender.end_owner("t1")
            return state, notifs

        state, notifs = asyncio.run(main())
        assert state == "DONE" and notifs == [b"hello"]
        assert bytes(region[4096:4096 + 3000]) == b"abc" * 1000
        _eventually(lambda: len(sender.cache) == 0)  # the buffer was deregistered when its transfer ended
        # Nothing outstanding: both threads park on their Event and stop polling altogether.
        _eventually(lambda: sender.in_flight == 0 and receiver.interest == 0)
        time.sleep(0.05)  # poll-ok: let both threads reach their park
        polls = (sender.stats.polls, receiver.stats.polls)
        time.sleep(0.3)  # poll-ok: an idle window in which a polling thread would poll hundreds of times
        assert (sender.stats.polls, receiver.stats.polls) == polls
        assert sender.stats.idle_waits >= 1 and receiver.stats.idle_waits >= 1
    finally:
        assert sender.stop() == [] and receiver.stop() == []


def test_consecutive_writes_are_batched_into_one_request_with_all_notifications(pair):
    from pdxfer.transport.nixl_progress import NixlProgress
    from pdxfer.transport.nixl_regcache import buffer_address

    src, dst, remote, region = pair
    sender, receiver = NixlProgress(src, "b-send"), NixlProgress(dst, "b-recv")
    base = buffer_address(memoryview(region))
    chunks = [bytes([i]) * 8192 for i in range(6)]
    expected = b"".join(b"n%d" % i for i in range(6))
    try:
        async def main() -> list[bytes]:
            loop = asyncio.get_running_loop()
            seen: list[bytes] = []
            all_in: asyncio.Future[None] = loop.create_future()

            def sink(n: dict) -> None:
                seen.extend(m for ms in n.values() for m in ms)
                if sum(len(m) for m in seen) == len(expected) and not all_in.done():
                    all_in.set_result(None)

            receiver.set_sink(loop, sink)
            receiver.want_notifs(+1)
            states: list[str] = []
            with src.lock:  # hold the agent: the poster blocks on its first post, the rest queue up
                for i, c in enumerate(chunks):
                    sender.post(loop, lambda s, e: states.append(s), memoryview(c), base + i * 8192, 8192, remote,
                                b"n%d" % i, owner="b")
            await asyncio.wait_for(all_in, 10)
            while len(states) < 6:
                await asyncio.sleep(0.001)  # poll-ok: test waits for the loop callbacks
            receiver.want_notifs(-1)
            sender.end_owner("b")
            assert states == ["DONE"] * 6
            return seen

        seen = asyncio.run(main())
        assert b"".join(seen) == expected  # in order; one notification per request, bodies concatenated
        assert sender.stats.posts < 6  # at least some WRITEs shared a request
        assert [bytes(region[i * 8192:(i + 1) * 8192]) for i in range(6)] == chunks
    finally:
        sender.stop()
        receiver.stop()


def test_posts_wake_a_waiting_progress_thread_but_not_a_busy_one(pair):
    """Setting the thread's Event for every chunk cost the posting event loop a futex call
    per chunk; a busy thread picks new posts up at the top of its next round anyway."""
    from pdxfer.transport.nixl_progress import NixlProgress
    from pdxfer.transport.nixl_regcache import buffer_address

    src, dst, remote, region = pair
    sender, receiver = NixlProgress(src, "w-send"), NixlProgress(dst, "w-recv")
    receiver.want_notifs(+1)  # the target's worker must progress for the WRITEs to complete
    base = buffer_address(memoryview(region))
    sets: list[int] = []
    real_set = sender._wake.set
    sender._wake.set = lambda: sets.append(1) or real_set()  # type: ignore[method-assign]
    try:
        async def main() -> list[str]:
            loop = asyncio.get_running_loop()
            states: list[str] = []
            _eventually(lambda: sender._waiting)  # parked: nothing outstanding
            with src.lock:  # the woken thread blocks in its first WRITE: busy from then on
                sender.post(loop, lambda s, e: states.append(s), memoryview(bytes(4096)), base, 4096, remote, b"0",
                            owner="w")
                assert sets == [1]
                _eventually(lambda: not sender._waiting)
                for i in range(1, 6):
                    sender.post(loop, lambda s, e: states.append(s), memoryview(bytes([i]) * 4096), base + i * 4096,
                                4096, remote, b"%d" % i, owner="w")
                assert sets == [1]  # queued for the busy thread without waking it
            deadline = loop.time() + 10
            while len(states) < 6 and loop.time() < deadline:
                await asyncio.sleep(0.001)  # poll-ok: test waits for the loop callbacks
            sender.end_owner("w")
            return states

        assert asyncio.run(main()) == ["DONE"] * 6
        assert [bytes(region[i * 4096:(i + 1) * 4096]) for i in range(1, 6)] == [bytes([i]) * 4096 for i in range(1, 6)]
    finally:
        receiver.want_notifs(-1)
        assert sender.stop() == [] and receiver.stop() == []


def test_a_pinned_buffer_is_registered_once_for_every_chunk_inside_it(pair):
    """Chunks inside a pinned buffer WRITE from its one registration, transfer after
    transfer; a chunk outside it gets its own; unpinning waits for the last WRITE."""
    from pdxfer.transport.nixl_regcache import RegistrationCache, buffer_address

    src, _, _, _ = pair
    calls: list[str] = []
    real_reg, real_dereg = src.register, src.deregister
    src.register = lambda *a: calls.append("reg") or real_reg(*a)  # type: ignore[method-assign]
    src.deregister = lambda reg: calls.append("dereg") or real_dereg(reg)  # type: ignore[method-assign]
    cache = RegistrationCache(src)
    pool = bytearray(1 << 20)
    whole = memoryview(pool)
    key = cache.pin(whole)
    assert calls == ["reg"] and cache.pinned == 1
    keys = []
    for owner in ("t1", "t2"):  # two transfers, four chunks each, all from the pool
        for i in range(4):
            k, addr = cache.acquire(whole[i * 4096:(i + 1) * 4096], owner)
            assert k == key and addr == buffer_address(whole) + i * 4096
            cache.release(key)
            keys.append(k)
        cache.end_owner(owner)
    assert calls == ["reg"] and cache.misses == 0 and cache.pinned_hits == 8
    with pytest.raises(ValueError, match="overlaps one registered already"):
        cache.pin(whole[4096:8192])
    other = bytearray(8192)
    k_other, _ = cache.acquire(memoryview(other), "t3")  # not inside the pool: its own registration
    assert k_other != key and calls == ["reg", "reg"]
    cache.release(k_other)
    cache.end_owner("t3")
    assert calls == ["reg", "reg", "dereg"]
    # A WRITE in flight keeps the registration after unpin; the last release drops it.
    k, _ = cache.acquire(whole[:4096], "t4")
    assert cache.unpin(whole) and cache.pinned == 0
    assert calls.count("dereg") == 1
    k5, _ = cache.acquire(whole[:4096], "t5")
    assert k5 != key and calls.count("reg") == 3  # unpinned: chunks register on their own again
    cache.release(k)
    assert calls.count("dereg") == 2  # the pool's registration, at its last release
    cache.release(k5)
    assert not cache.unpin(whole)  # not pinned any more
    cache.clear()
    assert calls.count("reg") == calls.count("dereg") == 3


def test_buffer_address_of_writable_and_read_only_views():
    import numpy as np

    from pdxfer.transport.nixl_regcache import buffer_address

    a = np.arange(256, dtype=np.uint8)
    assert buffer_address(memoryview(a)[16:32]) == a.ctypes.data + 16
    ro = bytes(range(64))
    assert buffer_address(memoryview(ro)[5:]) == np.frombuffer(ro, dtype=np.uint8).ctypes.data + 5
    with pytest.raises((ValueError, BufferError)):
        buffer_address(memoryview(a)[::2])  # not contiguous: no address NIXL could WRITE from


def test_registration_cache_shares_live_entries_and_deregisters_when_transfers_end(pair):
    from pdxfer.transport.nixl_regcache import RegistrationCache

    src, _, _, _ = pair
    cache = RegistrationCache(src, max_idle=1)
    a, b = memoryview(bytearray(4096)), memoryview(bytearray(4096))
    k1, _ = cache.acquire(a, "t1")
    k2, _ = cache.acquire(a, "t2")  # same buffer in a concurrent transfer: one registration
    assert k1 == k2 and len(cache) == 1 and cache.hits == 1
    cache.release(k1)
    cache.release(k2)
    assert len(cache) == 1  # idle, but t1 and t2 are live: kept for reuse
    cache.end_owner("t1")
    assert len(cache) == 1
    cache.end_owner("t2")
    assert len(cache) == 0  # its transfers ended: the caller may free the buffer now
    kb, _ = cache.acquire(b, "t3")
    ka, _ = cache.acquire(a, "t3")
    cache.release(kb)
    cache.release(ka)
    assert len(cache) == 1  # bounded: max_idle=1 evicted the older idle entry
    owner = a.obj
    cache.clear()
    a.release()
    owner.extend(b"x")  # the cache left no export behind: the caller's buffer is resizable again


def test_prepare_runs_on_the_progress_thread_and_a_failing_one_loses_no_notification(pair):
    import threading

    from pdxfer.transport.nixl_progress import NixlProgress

    from pdxfer.transport.nixl_regcache import buffer_address

    src, dst, remote, region = pair
    sender, receiver = NixlProgress(src, "t-prep-send"), NixlProgress(dst, "t-prep")
    threads: list[str] = []
    calls = [0]

    def prepare(notifs):
        threads.append(threading.current_thread().name)
        calls[0] += 1
        if calls[0] == 1:
            raise RuntimeError("boom")
        return sum(len(v) for v in notifs.values())

    try:
        async def main() -> list[tuple[list[bytes], object]]:
            loop = asyncio.get_running_loop()
            got: list[tuple[list[bytes], object]] = []
            arrived = asyncio.Event()

            def sink(prepared):
                notifs, extra = prepared
                got.append(([m for ms in notifs.values() for m in ms], extra))
                arrived.set()

            receiver.set_sink(loop, sink, prepare)
            receiver.want_notifs(+1)
            payload = memoryview(bytearray(b"x" * 4096))
            for body in (b"first", b"second"):
                arrived.clear()
                done: asyncio.Future[str] = loop.create_future()
                sender.post(loop, lambda state, err, d=done: d.set_result(state), payload,
                            buffer_address(memoryview(region)), payload.nbytes, remote, body, owner="t")
                assert await asyncio.wait_for(done, 10) == "DONE"
                await asyncio.wait_for(arrived.wait(), 10)
            receiver.want_notifs(-1)
            sender.end_owner("t")
            return got

        got = asyncio.run(main())
        assert got == [([b"first"], None), ([b"second"], 1)]
        assert threads == ["pdxfer-nixl-progress-t-prep"] * 2
    finally:
        assert sender.stop() == [] and receiver.stop() == []


@pytest.mark.skipif(not __import__("sys").platform.startswith("linux"), reason="per-thread nice is Linux's")
def test_progress_thread_runs_the_given_nice_steps_below_its_creator(pair):
    from pdxfer.transport.nixl_progress import NixlProgress

    src, _, _, _ = pair
    base = os.getpriority(os.PRIO_PROCESS, 0)
    lowered, same = NixlProgress(src, "t-nice", nice=3), NixlProgress(src, "t-nice0")
    try:
        _eventually(lambda: lowered.niceness is not None and same.niceness is not None)
        assert lowered.niceness == min(19, base + 3) == os.getpriority(os.PRIO_PROCESS, lowered._thread.native_id)
        assert same.niceness == base  # nice=0 leaves the thread alone
        assert os.getpriority(os.PRIO_PROCESS, 0) == base  # the creating thread keeps its priority
    finally:
        assert lowered.stop() == [] and same.stop() == []
