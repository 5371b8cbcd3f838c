"""The prefill worker's packed chunks, from where they are packed to their transfer's end.

Shared by both prefill flows (the pull in `worker.py`, the stream in `stream.py`): where a
chunk is packed (a piece of the NIXL staging pool, or a fresh tensor), how it is handed
to `put()` (host array, VRAM chunk, or host copy for TCP), and that what it holds comes
back exactly once, as soon as the Sender lets go of it (`put(on_release=)`). The
transfer's outcome is counted here too, before its entry goes (so "nothing in flight"
means "every outcome counted").
"""

from __future__ import annotations

import concurrent.futures
import threading
from typing import TYPE_CHECKING, Any

import structlog
import torch

from pdxfer.layout.payload import Payload
from pdxfer.plugins.vllm.counters import Counters
from pdxfer.plugins.vllm.meta import PluginConfig
from pdxfer.plugins.vllm.staging import StagingPool
from pdxfer.plugins.vllm.stats import Recorder

if TYPE_CHECKING:
    from pdxfer.engine import Sender

log = structlog.get_logger("pdxfer.vllm.worker")


class SendingMixin:
    """`WorkerSide` provides the state used here."""

    cfg: PluginConfig
    sender: "Sender | None"
    staging: StagingPool | None
    counters: Counters
    telemetry: Recorder
    _packed_lock: threading.Lock
    packed_bytes: int  # packed chunks the Sender still holds (see _put_packed)
    _in_flight: dict[str, Any]  # transfer id -> its OutboundHandle, until it ends

    def _stage(self, nbytes: int, timeout: float = 0.0) -> "torch.Tensor | None | bool":
        """Where to pack a chunk of `nbytes`: a staging-pool piece, None (a fresh tensor:
        no pool on this path), or False (the pool stayed full for `timeout`)."""
        if self.staging is None:
            return None
        piece = self.staging.take(nbytes, timeout)
        return False if piece is None else piece

    def _wire(self, c: "torch.Tensor") -> Any:
        """A packed chunk as put() takes it. Host memory: an array over it. A CUDA chunk
        (the packer runs on the KV cache's device) goes as itself over NIXL, WRITEn from
        VRAM once its pack kernel has finished (put() does not wait on CUDA streams), and
        is copied to the host for the TCP path, which sends host memory only."""
        if not c.is_cuda:
            return c.numpy()
        if self.cfg.backend == "nixl":
            torch.cuda.current_stream(c.device).synchronize()
            return c
        return c.cpu().numpy()  # the array keeps its host copy alive until the Sender is done

    def _put_packed(self, handle: Any, index: int, c: "torch.Tensor", timeout: float | None = None) -> None:
        """put() a packed chunk. What it holds (its bytes in `packed_bytes`, a staging piece)
        comes back when the Sender lets go of it (`on_release`: sent, spilled, or its
        transfer ended), or at once if put() refuses it; so packed copies never outlive
        their use, and a transfer larger than the staging pool still gets through."""
        nbytes = c.numel()
        piece = c if self.staging is not None and self.staging.owns(c) else None
        done = [False]

        def back() -> None:  # once: the Sender's loop, or here when put() raises
            if done[0]:
                return
            done[0] = True
            with self._packed_lock:
                self.packed_bytes -= nbytes
            if piece is not None and self.staging is not None:
                self.staging.give(piece)

        with self._packed_lock:
            self.packed_bytes += nbytes
        try:
            handle.put(index, self._wire(c), timeout=timeout, on_release=back)
        except BaseException:
            back()
            raise

    def _give_back(self, c: "torch.Tensor") -> None:
        """A packed chunk that will not be put after all."""
        if self.staging is not None and self.staging.owns(c):
            self.staging.give(c)

    def _open(self, tid: str, peer: str, sizes: list[int]) -> Any:
        """Open a transfer (an error text when that fails); its buffers live until it ends."""
        assert self.sender is not None
        try:
            handle = self.sender.open(peer, tid, Payload(tuple(sizes)))
        except Exception as exc:  # noqa: BLE001
            self.counters.inc("send_failed")
            return f"open failed: {exc}"
        self._in_flight[tid] = handle
        handle.future.add_done_callback(lambda f: self._sent(tid, f))
        return handle

    def _sent(self, tid: str, fut: "concurrent.futures.Future[Any]") -> None:
        exc = fut.exception()
        if exc is None:
            self.counters.inc("sent")
            res = fut.result()
            self.telemetry.sent(res.nbytes, res.seconds, res.granted_after)
        else:
            self.counters.inc("send_failed")
            self.telemetry.failed("send", type(exc).__name__)
            log.warning("pdxfer_send_failed", transfer_id=tid, error=repr(exc))
        self._in_flight.pop(tid, None)  # last: in_flight 0 means every outcome is counted
