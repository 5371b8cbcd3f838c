"""Host-memory spill tier: bounded, page-locked when CUDA is present.

Pinned memory is what lets a GPU engine copy KV out at full PCIe speed and lets NIXL or
the TCP path send from it without another bounce; without CUDA it is plain memory.
"""

from __future__ import annotations

import itertools
import threading
from dataclasses import dataclass
from typing import Any

import numpy as np


def _cuda_available() -> bool:
    try:
        import torch
    except ImportError:
        return False
    return bool(torch.cuda.is_available())


@dataclass(eq=False)
class HostBlock:
    key: int
    nbytes: int
    checksum: int
    buf: Any  # numpy array or pinned torch tensor


class HostTier:
    def __init__(self, capacity: int, *, pinned: bool | None = None) -> None:
        if capacity < 0:
            raise ValueError(f"host tier capacity must be >= 0, got {capacity}")
        self.capacity = capacity
        self.pinned = _cuda_available() if pinned is None else pinned
        self._used = 0
        self._lock = threading.Lock()
        self._keys = itertools.count(1)
        self._blocks: dict[int, HostBlock] = {}

    @property
    def used(self) -> int:
        return self._used

    def _alloc(self, nbytes: int) -> Any:
        if self.pinned:
            import torch

            return torch.empty(nbytes, dtype=torch.uint8, pin_memory=True).numpy()
        return np.empty(nbytes, dtype=np.uint8)

    def put(self, data: memoryview, checksum: int) -> HostBlock | None:
        """Copy `data` in, or return None when it does not fit (the caller goes down a tier)."""
        n = data.nbytes
        with self._lock:
            if self._used + n > self.capacity:
                return None
            self._used += n
        try:
            buf = self._alloc(n)
            buf[:] = np.frombuffer(data, dtype=np.uint8)
        except BaseException:
            with self._lock:
                self._used -= n
            raise
        block = HostBlock(next(self._keys), n, checksum, buf)
        with self._lock:
            self._blocks[block.key] = block
        return block

    def view(self, block: HostBlock) -> memoryview:
        return memoryview(block.buf)

    def free(self, block: HostBlock) -> None:
        with self._lock:
            if self._blocks.pop(block.key, None) is None:
                raise ValueError(f"host block {block.key} freed twice or unknown")
            self._used -= block.nbytes
        block.buf = None

    def __len__(self) -> int:
        return len(self._blocks)
