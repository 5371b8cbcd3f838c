"""`OutboundHandle`: what the producer holds for one transfer while it hands chunks over.

It runs on the producer's thread (vLLM's engine thread, a bench loop), so it touches only
what is safe from there: the memory budget (thread-safe, bounded waits), the transfer's
GRANT event, and `LoopThread.call` to hand each chunk to the Sender's event loop, which
owns everything else.
"""

from __future__ import annotations

import concurrent.futures
import threading
from typing import TYPE_CHECKING, Any, Callable

from pdxfer.engine.config import SenderConfig
from pdxfer.engine.outctx import OutCtx, TransferResult
from pdxfer.errors import Backpressure, TransferAborted
from pdxfer.layout.buffers import ChunkBuffer, chunk_buffer, is_device_buffer
from pdxfer.protocol.checksum import chunk_checksum

if TYPE_CHECKING:
    from pdxfer.engine.sender import Sender


def chunk_for(cfg: SenderConfig, tid: str, index: int, buffer: Any) -> ChunkBuffer:
    """The chunk as it will travel; GPU memory is refused, naming the chunk, on a path
    that can only send host memory."""
    if is_device_buffer(buffer) and cfg.backend != "nixl":
        raise ValueError(f"transfer {tid}: chunk {index} is in GPU memory, and the {cfg.backend!r} data path "
                         "sends host memory only: use SenderConfig(backend='nixl') to WRITE it from VRAM")
    return chunk_buffer(buffer)


class OutboundHandle:
    """One transfer being produced: hand chunks over as they are ready."""

    def __init__(self, sender: "Sender", ctx: OutCtx) -> None:
        self._sender = sender
        self._ctx = ctx
        self.transfer_id = ctx.out.tid
        self.payload = ctx.out.payload
        self.future: concurrent.futures.Future[TransferResult] = ctx.future
        self._lock = threading.Lock()
        self._put: set[int] = set()

    def put(self, index: int, buffer: Any, *, timeout: float | None = None,
            on_release: Callable[[], None] | None = None) -> None:
        """Queue chunk `index`. The buffer is not copied: it must stay unchanged until the
        Sender lets go of it, which `on_release()` reports, once, on the Sender's thread:
        its bytes left (TCP: handed to the kernel; NIXL: the WRITE completed here), a spill
        tier copied it, or it was dropped unsent; at the latest when the future resolves.
        A caller that reuses buffers (a staging pool) can take each one back then, chunk by
        chunk, instead of holding a whole transfer's until its end. A put refused
        (Backpressure, bad input) takes nothing and never calls it.

        A buffer in GPU memory (CUDA tensor, `__cuda_array_interface__`) goes only over
        NIXL, WRITEn from VRAM, and is checked with devsum64 computed on its GPU; such a
        chunk must be complete when put (its producing stream synchronised: the WRITE does
        not wait on CUDA streams) and never spills (it waits for budget instead)."""
        view = chunk_for(self._sender.config, self.transfer_id, index, buffer)
        _, length = self.payload.chunk_range(index)
        if view.nbytes != length:
            raise ValueError(f"transfer {self.transfer_id}: chunk {index} has {view.nbytes} bytes, payload says {length}")
        with self._lock:
            if index in self._put:
                raise ValueError(f"transfer {self.transfer_id}: chunk {index} submitted twice")
            self._put.add(index)
        if self.future.done():
            exc = self.future.exception()
            raise exc if exc is not None else TransferAborted("transfer already finished", transfer_id=self.transfer_id)
        on_put = self._sender.config.checksum_on_put and isinstance(view, memoryview)
        checksum = chunk_checksum(view) if on_put else None
        budget = self._sender._budget
        try:
            budget.acquire(length, self._sender.config.submit_timeout_s if timeout is None else timeout,
                           transfer_id=self.transfer_id, granted=self._ctx.granted)
        except Backpressure as exc:
            with self._lock:  # not taken: the caller may put this chunk again later
                self._put.discard(index)
            spill = self._sender._spill
            if spill is not None:
                raise spill.exhausted(exc, self.transfer_id) from None
            raise
        if on_release is not None:
            self._sender._notices.watch(self.transfer_id, view, on_release)
        try:
            self._sender._rt.call(self._sender._on_chunk, self._ctx, index, view, checksum)
        except RuntimeError:  # loop closed under us
            budget.release(length)
            self._sender._notices.fire(view)
            raise TransferAborted("sender is closed", transfer_id=self.transfer_id) from None

    def abort(self, reason: str = "aborted by caller") -> None:
        self._sender._rt.call(self._sender._abort, self._ctx, reason)

    @property
    def granted(self) -> bool:
        """The receiver has reserved room for the whole transfer (or it ended): chunks put
        now drain on their own. Read from any thread."""
        return self._ctx.granted.is_set()

    def fits(self, nbytes: int) -> bool:
        """Would a chunk of `nbytes` find send budget now without waiting or spilling?
        Until the GRANT, this transfer's chunks may fill the budget to half only
        (`MemoryBudget.limit`): a caller that must not wait can check before it prepares
        a chunk (say, packs KV blocks) that could not be put."""
        return self._sender._budget.fits(nbytes, self._ctx.granted)

    def wait_granted(self, timeout: float) -> bool:
        """Block until `granted` (True) or `timeout` (False): a caller that would copy
        its chunks out of somewhere (packing KV blocks) can do so only once they can go."""
        return self._ctx.granted.wait(timeout)
