"""Chunk checksums computed a few chunks ahead of the wire, on a hashing thread.

Hashing in `put()` reads every chunk once more from cold memory on the engine's thread,
long before the send reads it again. Hashing on the send loop right before the bytes go
out keeps them cache-hot for the send, but puts the hash on the loop's critical path.
This does both: while the loop writes chunk i, the hashing thread hashes chunk i+1 (and a
few more, up to `depth`), which also pulls it into the cache the send will read from.
xxhash releases the GIL, so the hash really runs beside the loop.

Sans-loop: futures are plain `concurrent.futures` ones; the lane awaits them. A chunk
whose transfer ended keeps its hash running (it only reads the buffer, which the future's
reference keeps alive) and the result is dropped.
"""

from __future__ import annotations

import concurrent.futures
import itertools
from collections import OrderedDict
from typing import Hashable, Iterable

from pdxfer.protocol.checksum import chunk_checksum

Key = Hashable


class HashAhead:
    def __init__(self, executor: concurrent.futures.Executor, depth: int, max_bytes: int = 1 << 62) -> None:
        """At most `depth` chunks and (beyond the first) `max_bytes` hashed ahead: what was
        hashed should still be in the cache when the send reads it."""
        if depth < 1:
            raise ValueError(f"hash-ahead depth must be >= 1, got {depth}")
        if max_bytes < 1:
            raise ValueError(f"hash-ahead max_bytes must be >= 1, got {max_bytes}")
        self._executor = executor
        self.depth = depth
        self.max_bytes = max_bytes
        self._pending: OrderedDict[Key, concurrent.futures.Future[int]] = OrderedDict()
        self.started = 0
        self.inline = 0  # chunks hashed on the caller's thread: nothing was ahead of them

    def take(self, key: Key, view: memoryview,
             upcoming: Iterable[tuple[Key, memoryview]]) -> "int | concurrent.futures.Future[int]":
        """The checksum of `view` (a future if its hash is still running), after starting
        the hashes of the next chunks in `upcoming` (in send order; at most `depth` used).
        Hashes started for chunks no longer upcoming (their transfer ended) are dropped."""
        fut = self._pending.pop(key, None)
        window = []
        nbytes = 0
        for k, v in itertools.islice(upcoming, self.depth):
            if window and nbytes + v.nbytes > self.max_bytes:
                break
            window.append((k, v))
            nbytes += v.nbytes
        keep = {k for k, _ in window}
        for k in [k for k in self._pending if k not in keep]:
            self._pending.pop(k).cancel()
        for k, v in window:
            if k not in self._pending:
                self._pending[k] = self._executor.submit(chunk_checksum, v)
                self.started += 1
        if fut is None:
            self.inline += 1
            return chunk_checksum(view)  # first of a run: nothing to overlap with yet
        if fut.done():
            return fut.result()
        return fut

    def drop(self, key: Key) -> None:
        """A chunk that will not be sent: forget its hash."""
        fut = self._pending.pop(key, None)
        if fut is not None:
            fut.cancel()

    def clear(self) -> None:
        for fut in self._pending.values():
            fut.cancel()
        self._pending.clear()

    def __len__(self) -> int:
        return len(self._pending)
