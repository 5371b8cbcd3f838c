"""Readies a lane's next chunk for the wire, and gives back what it held afterwards.

Between the peer queue and the data path a chunk may need two things that must not stall
the lane's event loop: a spilled chunk is read back from its tier (`sendq.restore`,
`restore_ahead` chunks ahead, on the spill I/O threads), and a chunk put without a
checksum is hashed (`sendq.hashahead`, `hash_ahead` chunks ahead, on the hashing thread).
Whatever a chunk holds (budget, tier space, a read-back buffer) goes back exactly once:
`sent()` after its bytes left, `drop()` when it never will, or here when its transfer
ended while it was being readied.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
from typing import TYPE_CHECKING, Callable, NamedTuple

from pdxfer.errors import PdxferError, ProtocolError
from pdxfer.layout.buffers import DeviceChunk
from pdxfer.protocol.checksum import DEVSUM64, XXH3, chunk_checksum, host_checksum
from pdxfer.sendq import SendItem
from pdxfer.sendq.hashahead import HashAhead
from pdxfer.sendq.holdings import Holdings, is_spilled
from pdxfer.sendq.restore import ReadAhead, Restored, Restorer, RestorePool

if TYPE_CHECKING:
    from pdxfer.engine.config import SenderConfig

Peek = Callable[[int], "list[SendItem]"]
Fail = Callable[[str, PdxferError], None]  # (transfer id, why): fail that transfer only


class Ready(NamedTuple):
    item: SendItem
    payload: memoryview
    checksum: int
    restored: Restored | None  # a read-back buffer to return with sent()


class Outgoing:
    def __init__(self, cfg: "SenderConfig", holdings: Holdings, peek: Peek, fail: Fail,
                 io: concurrent.futures.Executor | None = None,
                 hash_pool: concurrent.futures.Executor | None = None) -> None:
        self.holdings = holdings
        self._peek = peek
        self._fail = fail
        store = holdings.store
        self._restorer = (Restorer(store, RestorePool(cfg.restore_buffer_bytes), io, wait_timeout_s=cfg.deadline_s)
                          if store is not None and io is not None else None)
        self._ahead = ReadAhead(self._restorer, cfg.restore_ahead) if self._restorer is not None else None
        self._restore_depth = cfg.restore_ahead
        self._hasher = (HashAhead(hash_pool, cfg.hash_ahead, max(1, cfg.hash_ahead_bytes))
                        if hash_pool is not None else None)
        self._hash_min = cfg.hash_ahead_min_bytes
        self.algorithm = XXH3  # the receiver's chunk checksum: the lane sets it from HELLO_OK

    async def ready(self, item: SendItem) -> Ready | None:
        """The chunk's bytes and checksum, or None when it will not be sent after all
        (its transfer failed or ended meanwhile; what it held is back already)."""
        t = item.transfer
        payload = item.buffer
        restored: Restored | None = None
        if is_spilled(payload):
            restored = await self._restore(item)
            if restored is None:
                return None
            payload = restored.view
        checksum = item.checksum if self.algorithm == XXH3 else None  # put-time hashes are xxh3
        if checksum is None:
            try:
                checksum = await self._checksum(item, payload)
            except PdxferError as exc:  # e.g. a GPU chunk for a receiver that checks xxh3
                self.sent(item, restored)
                self._fail(t.tid, exc)
                return None
            if t.terminal:  # ended while its hash ran
                self.sent(item, restored)
                return None
            t.record_checksum(item.index, checksum)
        return Ready(item, payload, checksum, restored)

    def sent(self, item: SendItem, restored: Restored | None) -> None:
        """The chunk's bytes left (or never will): give back its budget or tier space and
        its read-back buffer."""
        if restored is not None and self._restorer is not None:
            self._restorer.done_with(restored)
        self.holdings.release(item.buffer, item.nbytes)

    def drop(self, item: SendItem) -> None:
        """A queued chunk that will never be sent (its transfer ended, or the lane closed)."""
        task = self._ahead.drop((item.transfer.tid, item.index)) if self._ahead is not None else None
        if task is not None:
            self._abandon(item, task)
        else:
            self.holdings.release(item.buffer, item.nbytes)

    # ------------------------------------------------------------------ internals
    async def _checksum(self, item: SendItem, payload: "memoryview | DeviceChunk") -> int:
        """Computed ahead on the hashing thread when there is one and the chunk is large
        enough to be worth the hand-off (and the next chunks' hashes started), else here.
        A GPU chunk is summed on its GPU (devsum64); a host chunk for a devsum64 receiver
        with the host reference."""
        if isinstance(payload, DeviceChunk):
            if self.algorithm != DEVSUM64:
                raise ProtocolError(
                    f"chunk {item.index} is in GPU memory but the receiver checks chunks with {self.algorithm} "
                    "(a host region): give it ReceiverConfig(device='cuda') or checksum='devsum64'",
                    transfer_id=item.transfer.tid)
            from pdxfer.pack.devsum_cuda import device_checksums

            return device_checksums([payload.tensor])[0]
        if self.algorithm != XXH3:
            return host_checksum(self.algorithm, payload)
        if self._hasher is None or payload.nbytes < self._hash_min:
            return chunk_checksum(payload)
        upcoming = (((n.transfer.tid, n.index), n.buffer) for n in self._peek(self._hasher.depth)
                    if n.checksum is None and n.nbytes >= self._hash_min and not is_spilled(n.buffer)
                    and not n.transfer.terminal)
        got = self._hasher.take((item.transfer.tid, item.index), payload, upcoming)
        if isinstance(got, int):
            return got
        try:
            return await asyncio.wrap_future(got)
        except asyncio.CancelledError:  # lane closing: this chunk will never go out
            self.holdings.release(item.buffer, item.nbytes)
            raise

    async def _restore(self, item: SendItem) -> Restored | None:
        """Bring a spilled chunk back (started earlier by read-ahead, or now) and start the
        next ones."""
        assert self._ahead is not None
        t = item.transfer
        upcoming = (((n.transfer.tid, n.index), n.buffer, n.transfer.tid)
                    for n in self._peek(self._restore_depth)
                    if is_spilled(n.buffer) and not n.transfer.terminal)
        task = self._ahead.take((t.tid, item.index), item.buffer, t.tid, upcoming)
        try:
            restored = await asyncio.shield(task)
        except asyncio.CancelledError:
            self._abandon(item, task)  # lane closing: give back once the read has stopped
            raise
        except PdxferError as exc:  # damaged spill copy, or no read-back buffer in time
            self.holdings.release(item.buffer, item.nbytes)
            self._fail(t.tid, exc)  # this transfer only: the lane keeps serving the others
            return None
        if t.terminal:
            self.sent(item, restored)
            return None
        return restored

    def _abandon(self, item: SendItem, task: "asyncio.Task[Restored]") -> None:
        def done(t: "asyncio.Task[Restored]") -> None:
            if not t.cancelled() and t.exception() is None and self._restorer is not None:
                self._restorer.done_with(t.result())
            self.holdings.release(item.buffer, item.nbytes)

        task.add_done_callback(done)
