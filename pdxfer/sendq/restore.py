"""Bringing spilled chunks back for the wire, a few chunks ahead, in bounded memory.

A granted transfer whose chunks sit in a tier must stream out in order without first
loading the whole transfer back. Host-tier chunks are sent straight from the tier's
buffer after their checksum is checked. Disk-tier chunks are read, with large
sequential reads in a worker thread, into read-back buffers from a `RestorePool`, a few
chunks ahead of the one being sent, so reading overlaps sending. The pool is bounded in
bytes, so a lane streaming a 10 GiB transfer off disk holds only those few buffers.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
from collections import defaultdict
from dataclasses import dataclass
from typing import Hashable, Iterable

import numpy as np

from pdxfer.errors import TransferTimeout
from pdxfer.tiers.store import SpilledChunk, SpillStore


class RestorePool:
    """Reusable read-back buffers, bounded by `limit` bytes (allocated, in use or free).

    One buffer is always granted when none is out, so a chunk larger than the limit
    still makes progress (one at a time) instead of waiting forever.
    """

    def __init__(self, limit: int) -> None:
        if limit <= 0:
            raise ValueError(f"restore pool limit must be > 0 bytes, got {limit}")
        self.limit = limit
        self._free: dict[int, list[np.ndarray]] = defaultdict(list)
        self._free_bytes = 0
        self._out = 0  # buffers handed out
        self._out_bytes = 0
        self._changed: asyncio.Event | None = None

    @property
    def allocated_bytes(self) -> int:
        return self._free_bytes + self._out_bytes

    def try_acquire(self, nbytes: int) -> np.ndarray | None:
        free = self._free.get(nbytes)
        if free:
            buf = free.pop()
            self._free_bytes -= nbytes
        else:
            if self._out and self._out_bytes + nbytes > self.limit:
                return None
            self._evict(self._out_bytes + self._free_bytes + nbytes - self.limit)
            buf = np.empty(nbytes, dtype=np.uint8)
        self._out += 1
        self._out_bytes += nbytes
        return buf

    def _evict(self, excess: int) -> None:
        """Drop free buffers (of any size) until `excess` bytes are gone."""
        for size in list(self._free):
            while excess > 0 and self._free[size]:
                self._free[size].pop()
                self._free_bytes -= size
                excess -= size
            if not self._free[size]:
                del self._free[size]

    async def acquire(self, nbytes: int, timeout: float) -> np.ndarray:
        """Wait (event-driven, at most `timeout` seconds) for room."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while True:
            buf = self.try_acquire(nbytes)
            if buf is not None:
                return buf
            if self._changed is None:
                self._changed = asyncio.Event()
            self._changed.clear()
            try:
                await asyncio.wait_for(self._changed.wait(), max(0.0, deadline - loop.time()))
            except asyncio.TimeoutError:
                raise TransferTimeout(f"no read-back buffer of {nbytes} bytes within {timeout:.1f}s",
                                      waiting_for="restore_buffer") from None

    def release(self, buf: np.ndarray) -> None:
        n = buf.nbytes
        self._out -= 1
        self._out_bytes -= n
        if self._out_bytes + self._free_bytes + n <= self.limit:
            self._free[n].append(buf)
            self._free_bytes += n
        if self._changed is not None:
            self._changed.set()

    def clear(self) -> None:
        self._free.clear()
        self._free_bytes = 0


@dataclass
class Restored:
    """A spilled chunk ready to send: `view` to send from, and the pool buffer behind it
    (None when sending straight from the host tier) to give back once sent."""

    view: memoryview
    buffer: np.ndarray | None


class Restorer:
    def __init__(self, store: SpillStore, pool: RestorePool, io: concurrent.futures.Executor,
                 *, wait_timeout_s: float = 60.0) -> None:
        self.store = store
        self.pool = pool
        self._io = io
        self.wait_timeout_s = wait_timeout_s  # bound on waiting for a read-back buffer

    def start(self, chunk: SpilledChunk, transfer_id: str, *, wait: bool = True) -> "asyncio.Task[Restored] | None":
        """Begin restoring `chunk`. With wait=False (read-ahead), returns None instead of
        waiting when the pool has no room."""
        loop = asyncio.get_running_loop()
        if chunk.host is not None:
            return loop.create_task(self._host(loop, chunk, transfer_id))
        # Take the buffer now, not when the task first runs: read-ahead started right after
        # this call must not grab the room the head of the queue needs (deadlock).
        buf = self.pool.try_acquire(chunk.nbytes)
        if buf is None and not wait:
            return None
        return loop.create_task(self._disk(loop, chunk, transfer_id, buf))

    async def _host(self, loop: asyncio.AbstractEventLoop, chunk: SpilledChunk, tid: str) -> Restored:
        view = await loop.run_in_executor(self._io, lambda: self.store.host_view(chunk, transfer_id=tid))
        return Restored(view, None)

    async def _disk(self, loop: asyncio.AbstractEventLoop, chunk: SpilledChunk, tid: str,
                    buf: np.ndarray | None) -> Restored:
        if buf is None:
            try:
                buf = await self.pool.acquire(chunk.nbytes, self.wait_timeout_s)
            except TransferTimeout as exc:
                raise TransferTimeout(exc.message, transfer_id=tid, waiting_for="restore_buffer") from None
        view = memoryview(buf)
        read = loop.run_in_executor(self._io, lambda: self.store.read_into(chunk, view, transfer_id=tid))
        try:
            await asyncio.shield(read)
        except asyncio.CancelledError:
            # The worker thread may still be writing into the buffer: it goes back to the
            # pool only once the read has stopped.
            read.add_done_callback(lambda f: (f.cancelled() or f.exception(), self.pool.release(buf)))
            raise
        except BaseException:
            self.pool.release(buf)
            raise
        return Restored(view, buf)

    def done_with(self, restored: Restored) -> None:
        if restored.buffer is not None:
            self.pool.release(restored.buffer)
            restored.buffer = None


class ReadAhead:
    """Restores keyed by chunk: the one about to be sent, plus up to `depth` of the next
    spilled ones, started only while the pool has room. The started set is always a
    prefix of what comes next, so the chunk at the head never waits for a buffer held by
    a chunk behind it."""

    def __init__(self, restorer: Restorer, depth: int) -> None:
        self.restorer = restorer
        self.depth = depth
        self._tasks: dict[Hashable, asyncio.Task[Restored]] = {}

    def take(self, key: Hashable, chunk: SpilledChunk, transfer_id: str,
             upcoming: Iterable[tuple[Hashable, SpilledChunk, str]]) -> "asyncio.Task[Restored]":
        """The restore of the chunk at the head (started now if it was not yet), after
        starting read-ahead of `upcoming` (the next spilled chunks, in send order)."""
        task = self._tasks.pop(key, None)
        if task is None:
            task = self.restorer.start(chunk, transfer_id)
            assert task is not None
        started = 0
        for k, c, tid in upcoming:
            if started >= self.depth:
                break
            started += 1
            if k in self._tasks:
                continue
            t = self.restorer.start(c, tid, wait=False)
            if t is None:
                break
            self._tasks[k] = t
        return task

    def drop(self, key: Hashable) -> "asyncio.Task[Restored] | None":
        """Forget a read-ahead whose chunk will not be sent; the caller cleans up after it."""
        return self._tasks.pop(key, None)

    def __len__(self) -> int:
        return len(self._tasks)
