"""The receiver's one contiguous landing area, in host memory or in one GPU's memory.

Every transfer lands in a slice of it that admission reserved first. A host region is an
anonymous mmap (page-aligned, so NIXL registers it as is, and TCP `recv_into` writes
straight into it); a GPU region is one CUDA allocation that NIXL registers as VRAM, so a
prefill GPU WRITEs KV straight into decode-GPU memory (RDMA/NVLink where UCX has them).

`checksums()` computes the configured chunk checksum of landed slices where they are:
xxh3 or the devsum64 reference on the host, the devsum64 kernel on the GPU (one launch for
all the chunks of a notification).
"""

from __future__ import annotations

import mmap
from typing import Any, Sequence

from pdxfer.layout.buffers import DRAM, VRAM
from pdxfer.protocol.checksum import DEVSUM64, host_checksum


class ReceiveRegion:
    def __init__(self, capacity: int, device: str | int | None, algorithm: str) -> None:
        """`device`: None for host memory, else the CUDA device index."""
        self.nbytes = capacity
        self.algorithm = algorithm
        self._mmap: mmap.mmap | None = None
        if device is None:
            self._mmap = mmap.mmap(-1, capacity)
            self.buffer: Any = memoryview(self._mmap)
            from pdxfer.transport.nixl_regcache import buffer_address

            self.addr = buffer_address(self.buffer)
            self.mem, self.dev = DRAM, 0
        else:
            if algorithm != DEVSUM64:
                raise ValueError(f"a GPU receive region is checked with devsum64, not {algorithm!r}: "
                                 "xxh3 cannot run on the GPU")
            import torch

            if not torch.cuda.is_available() or int(device) >= torch.cuda.device_count():
                raise ValueError(f"receive region on cuda:{device}, but this process sees "
                                 f"{torch.cuda.device_count() if torch.cuda.is_available() else 0} CUDA devices")
            self.buffer = torch.empty(capacity, dtype=torch.uint8, device=f"cuda:{int(device)}")
            self.addr = int(self.buffer.data_ptr())
            self.mem, self.dev = VRAM, int(device)

    @property
    def on_gpu(self) -> bool:
        return self.mem == VRAM

    def checksums(self, views: Sequence[Any]) -> list[int]:
        """The region's chunk checksum of each landed slice (host views or CUDA tensors)."""
        if self.on_gpu:
            from pdxfer.pack.devsum_cuda import device_checksums

            return device_checksums(list(views))
        return [host_checksum(self.algorithm, v) for v in views]

    def close(self) -> bool:
        """Free the memory; False if a host view still exports it (then it is left to GC)."""
        if self._mmap is None:
            self.buffer = None
            return True
        try:
            self.buffer.release()
            self._mmap.close()
        except BufferError:
            return False
        return True
