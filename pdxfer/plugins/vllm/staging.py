"""Packed KV chunks carved out of one buffer registered with NIXL once.

A NIXL WRITE reads registered memory only. Packing every chunk into a fresh tensor made
the Sender register it (and deregister it when its transfer ended): every chunk of every
request. Over UCX tcp/sm here that is ~13 µs per 2 MiB, but on RDMA each registration
pins pages, and for VRAM it is a GPUDirect registration, each far dearer than the WRITE
it serves. vLLM's NixlConnector registers its KV caches once, LMCache its buffer pool,
for the same reason. A prefill configured with backend "nixl" therefore packs into this
pool: `sender_memory` bytes on the packer's device, registered at start
(`Sender.register`), carved first fit (`admission.allocator.ExtentAllocator`), each
piece given back when its transfer has ended (a transfer resolves only after its WRITEs
completed locally, so NIXL is done reading it by then).

A full pool is answered like a full send budget: a streamed chunk is packed in a later
step, a pulled one waits (bounded by its caller's timeout).
"""

from __future__ import annotations

import threading
import time
from typing import Any

import torch

from pdxfer.admission.allocator import ExtentAllocator
from pdxfer.units import format_size

ALIGNMENT = 512  # bytes: every chunk starts cache-line and sector aligned


class StagingPool:
    def __init__(self, nbytes: int, device: Any = "cpu") -> None:
        self.buffer = torch.empty(nbytes, dtype=torch.uint8, device=device)
        self._base = self.buffer.data_ptr()
        self._alloc = ExtentAllocator(nbytes, ALIGNMENT)
        self._cond = threading.Condition()

    def registrable(self) -> Any:
        """The buffer as `Sender.register` takes it: a host array, or the CUDA tensor."""
        return self.buffer if self.buffer.is_cuda else self.buffer.numpy()

    @property
    def capacity(self) -> int:
        return self._alloc.capacity

    @property
    def used(self) -> int:
        return self._alloc.allocated_bytes

    def take(self, nbytes: int, timeout: float = 0.0) -> torch.Tensor | None:
        """A piece of `nbytes` (None if none came free within `timeout`)."""
        if not self._alloc.fits_ever(nbytes):
            raise ValueError(f"a packed chunk of {format_size(nbytes)} can never fit the "
                             f"{format_size(self.capacity)} send staging pool (sender_memory)")
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                off = self._alloc.alloc(nbytes)
                if off is not None:
                    return self.buffer[off:off + nbytes]
                left = deadline - time.monotonic()
                if left <= 0:
                    return None
                self._cond.wait(left)

    def give(self, piece: torch.Tensor) -> None:
        """Return a piece from `take` (once)."""
        off = piece.data_ptr() - self._base
        if not 0 <= off < self.capacity or piece.device != self.buffer.device:
            raise ValueError("give(): this tensor is not a piece of the staging pool")
        with self._cond:
            self._alloc.free(off)
            self._cond.notify_all()

    def owns(self, t: torch.Tensor) -> bool:
        return t.device == self.buffer.device and 0 <= t.data_ptr() - self._base < self.capacity
