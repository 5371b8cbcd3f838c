"""Read-back of spilled chunks: bounded buffers, verification, and no buffer lost on
failure or cancellation."""

from __future__ import annotations

import asyncio
import concurrent.futures

import numpy as np
import pytest

from pdxfer.errors import IntegrityError, TransferTimeout
from pdxfer.protocol.checksum import chunk_checksum
from pdxfer.sendq.holdings import Holdings
from pdxfer.sendq.budget import MemoryBudget
from pdxfer.sendq.restore import RestorePool, Restorer
from pdxfer.tiers import DiskTier, HostTier, SpillStore


def _data(n: int, seed: int) -> memoryview:
    return memoryview(np.random.default_rng(seed).integers(0, 255, n, dtype=np.uint8))


def test_pool_is_bounded_but_always_grants_one():
    pool = RestorePool(3000)
    a = pool.try_acquire(2000)
    assert a is not None and pool.try_acquire(2000) is None  # would exceed the bound
    b = pool.try_acquire(1000)
    assert b is not None and pool.allocated_bytes == 3000
    pool.release(a)
    assert pool.try_acquire(2000) is a  # reused, not reallocated
    pool.release(a)
    pool.release(b)
    big = pool.try_acquire(10_000)  # larger than the bound, but nothing is out: granted
    assert big is not None and big.nbytes == 10_000
    assert pool.try_acquire(1) is None
    pool.release(big)
    assert pool.allocated_bytes <= 3000  # the oversized buffer was not kept


def test_pool_acquire_waits_for_a_release():
    async def main() -> None:
        pool = RestorePool(1000)
        a = pool.try_acquire(1000)
        waiter = asyncio.ensure_future(pool.acquire(1000, 5))
        await asyncio.sleep(0.01)
        assert not waiter.done()
        pool.release(a)
        got = await asyncio.wait_for(waiter, 5)
        assert got.nbytes == 1000
        with pytest.raises(TransferTimeout) as ei:  # nothing comes back: a typed error, not a hang
            await pool.acquire(1000, 0.05)
        assert ei.value.waiting_for == "restore_buffer"

    asyncio.run(main())


@pytest.fixture
def store(tmp_path):
    s = SpillStore(HostTier(10_000, pinned=False), DiskTier(tmp_path, 1 << 20))
    yield s
    s.close()


def test_restorer_reads_host_and_disk_chunks_verified(store):
    host_data, disk_data = _data(8000, 1), _data(50_000, 2)
    host = store.spill(host_data, chunk_checksum(host_data))
    disk = store.spill(disk_data, chunk_checksum(disk_data))
    assert host.tier == "host" and disk.tier == "disk"
    io = concurrent.futures.ThreadPoolExecutor(1)

    async def main() -> None:
        pool = RestorePool(1 << 20)
        r = Restorer(store, pool, io)
        got_host = await r.start(host, "t")
        got_disk = await r.start(disk, "t")
        assert bytes(got_host.view) == bytes(host_data) and got_host.buffer is None  # sent in place
        assert bytes(got_disk.view) == bytes(disk_data) and got_disk.buffer is not None
        r.done_with(got_disk)
        assert pool._out == 0
        assert r.start(disk, "t", wait=False) is not None  # room again

    asyncio.run(main())
    io.shutdown()


@pytest.mark.parametrize("tier", ["host", "disk"])
def test_corrupted_chunk_is_integrity_error_and_buffer_returns(store, tier):
    data = _data(8000 if tier == "host" else 50_000, 3)
    chunk = store.spill(data, chunk_checksum(data))
    assert chunk.tier == tier
    if tier == "host":
        chunk.host.buf[17] ^= 0xFF
    else:
        raw = bytearray(chunk.disk.path.read_bytes())
        raw[-1] ^= 0xFF
        chunk.disk.path.write_bytes(raw)
    io = concurrent.futures.ThreadPoolExecutor(1)

    async def main() -> None:
        pool = RestorePool(1 << 20)
        with pytest.raises(IntegrityError) as ei:
            await Restorer(store, pool, io).start(chunk, "t-corrupt")
        assert ei.value.transfer_id == "t-corrupt"
        assert pool._out == 0

    asyncio.run(main())
    io.shutdown()
    assert store.counters.integrity_errors == 1


def test_cancelled_read_returns_its_buffer_only_after_the_read_stopped(store):
    data = _data(200_000, 4)
    store.host = None  # straight to disk
    chunk = store.spill(data, chunk_checksum(data))
    io = concurrent.futures.ThreadPoolExecutor(1)
    gate = concurrent.futures.Future()
    io.submit(gate.result, 5)  # the I/O thread is busy: the read is queued behind this

    async def main() -> None:
        pool = RestorePool(1 << 20)
        task = Restorer(store, pool, io).start(chunk, "t")
        await asyncio.sleep(0.01)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert pool._out == 1  # the read has not run yet: the buffer is still its
        gate.set_result(None)
        for _ in range(500):
            if pool._out == 0:
                break
            await asyncio.sleep(0.01)
        assert pool._out == 0

    asyncio.run(main())
    io.shutdown()


def test_holdings_release_goes_to_budget_or_tier(store):
    budget = MemoryBudget(1 << 20)
    budget.acquire(4096, 1)
    h = Holdings(budget, store)
    h.release(memoryview(bytearray(4096)), 4096)
    assert budget.used == 0
    d = _data(5000, 5)
    chunk = store.spill(d, chunk_checksum(d))
    h.release(chunk, chunk.nbytes)
    assert store.usage()["host_bytes"] == 0 and budget.used == 0


def test_read_ahead_never_starves_the_head_when_the_pool_fits_exactly_depth_chunks(tmp_path):
    """Pool = depth x chunk: the read-aheads fill it, and the head (started first) must
    already hold its buffer, or the stream deadlocks."""
    from pdxfer.sendq.restore import ReadAhead

    store = SpillStore(None, DiskTier(tmp_path, 64 << 20))
    data = [_data(1 << 20, 10 + i) for i in range(12)]
    chunks = [store.spill(d, chunk_checksum(d)) for d in data]
    io = concurrent.futures.ThreadPoolExecutor(2)

    async def main() -> None:
        restorer = Restorer(store, RestorePool(4 << 20), io)
        reader = ReadAhead(restorer, 4)
        for i, c in enumerate(chunks):
            upcoming = ((j, chunks[j], "t") for j in range(i + 1, min(len(chunks), i + 5)))
            got = await asyncio.wait_for(reader.take(i, c, "t", upcoming), 10)
            assert bytes(got.view) == bytes(data[i])
            restorer.done_with(got)
        assert len(reader) == 0 and restorer.pool._out == 0

    asyncio.run(main())
    io.shutdown()
    store.close()
