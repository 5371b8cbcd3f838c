"""What a chunk buffer may be: host memory (any C-contiguous buffer) or GPU memory.

Host chunks travel as flat byte `memoryview`s, on either data path. A chunk in GPU memory
(a CUDA torch tensor, or anything with `__cuda_array_interface__`, e.g. a CuPy array)
becomes a `DeviceChunk`: it can only leave by a one-sided NIXL WRITE from VRAM (the TCP
path would need a host copy per chunk, which is the staging pdxfer exists to avoid), and
its checksum is computed on its own GPU (devsum64, `pdxfer.pack.devsum_cuda`), so its
bytes never cross PCIe just to be hashed.

Device-ness is decided without importing torch or touching CUDA, so a host-only process
can still refuse a GPU chunk with a clear error.
"""

from __future__ import annotations

from typing import Any, Union

DRAM = "DRAM"
VRAM = "VRAM"


def as_bytes_view(buf: Any) -> memoryview:
    """A flat byte view of any C-contiguous host buffer (bytes, numpy, torch CPU via .numpy())."""
    mv = memoryview(buf)
    if mv.format == "B" and mv.ndim == 1:
        return mv
    if not mv.c_contiguous:
        raise ValueError("chunk buffers must be C-contiguous")
    return mv.cast("B")


def is_device_buffer(buf: Any) -> bool:
    """True for GPU memory: a CUDA tensor, a `__cuda_array_interface__` object, a DeviceChunk."""
    if isinstance(buf, DeviceChunk):
        return True
    return bool(getattr(buf, "is_cuda", False)) or hasattr(buf, "__cuda_array_interface__")


class DeviceChunk:
    """The bytes of one contiguous GPU buffer: a flat uint8 CUDA tensor, its address and
    device. Holding it keeps the memory alive (the caller's tensor may be a view)."""

    __slots__ = ("tensor", "addr", "nbytes", "device")

    def __init__(self, buf: Any) -> None:
        import torch

        t = buf if isinstance(buf, torch.Tensor) else torch.as_tensor(buf, device="cuda")
        if t.device.type != "cuda":
            raise ValueError(f"DeviceChunk needs GPU memory, got a tensor on {t.device}")
        if not t.is_contiguous():
            raise ValueError("chunk buffers must be contiguous (a GPU chunk too)")
        self.tensor = t.reshape(-1).view(torch.uint8)
        self.addr = int(self.tensor.data_ptr())
        self.nbytes = int(self.tensor.numel())
        self.device = int(t.device.index or 0)

    def __repr__(self) -> str:
        return f"DeviceChunk(cuda:{self.device}, {self.nbytes} bytes at {self.addr:#x})"


ChunkBuffer = Union[memoryview, DeviceChunk]


def chunk_buffer(buf: Any) -> ChunkBuffer:
    """The form a chunk travels in: a DeviceChunk for GPU memory, else a flat host view."""
    if is_device_buffer(buf):
        return buf if isinstance(buf, DeviceChunk) else DeviceChunk(buf)
    return as_bytes_view(buf)


def nbytes_of(buf: Any) -> int:
    if isinstance(buf, DeviceChunk):
        return buf.nbytes
    return memoryview(buf).nbytes


def mem_of(buf: Any) -> tuple[str, int]:
    """NIXL memory kind and device id of a chunk buffer."""
    if isinstance(buf, DeviceChunk):
        return VRAM, buf.device
    return DRAM, 0
