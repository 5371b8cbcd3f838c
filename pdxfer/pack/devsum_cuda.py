"""devsum64 (`protocol.devsum`) of chunks in GPU memory, in one launch of csrc/devsum.cu.

The checksum a VRAM-resident chunk carries must be computed where the bytes are: the
kernel sums each chunk's position-keyed, mixed words with atomics, the host reads back
one 8-byte sum per chunk and applies the final mix with the length. One launch covers a
whole batch of chunks (`blockIdx.y` picks the chunk), so hashing a transfer's chunks
costs one launch and one small device-to-host copy, not one per chunk.

`plan()` (the descriptor table and the grid) is plain numpy, shared with the test that
runs the same kernel source compiled for the host.
"""

from __future__ import annotations

import threading
from typing import Any, Sequence

import numpy as np

from pdxfer.pack.cuda import import_cupy, kernel_source
from pdxfer.protocol.devsum import finish

KERNEL_FILE = "devsum.cu"
KERNEL = "pdx_devsum"
SEG_DTYPE = np.dtype([("addr", "<u8"), ("nbytes", "<u8"), ("out", "<u8")])
THREADS = 256
MAX_BLOCKS_X = 1024  # per chunk: enough to fill a GPU for one chunk; the kernel strides past it
MAX_CHUNKS = 65535  # gridDim.y limit: longer batches go in several launches


def plan(addrs: Sequence[int], sizes: Sequence[int], out_addr: int,
         threads: int = THREADS, max_blocks_x: int = MAX_BLOCKS_X) -> tuple[np.ndarray, tuple[int, int], int]:
    """(descriptor table, (grid x, grid y), threads per block) for one launch; chunk k's
    sum goes to the 8 bytes at out_addr + 8 k."""
    if len(addrs) != len(sizes):
        raise ValueError(f"{len(addrs)} addresses for {len(sizes)} sizes")
    if not 0 < len(sizes) <= MAX_CHUNKS:
        raise ValueError(f"one launch covers 1..{MAX_CHUNKS} chunks, got {len(sizes)}")
    if any(n < 0 for n in sizes):
        raise ValueError("chunk sizes must be >= 0")
    segs = np.zeros(len(sizes), dtype=SEG_DTYPE)
    segs["addr"] = addrs
    segs["nbytes"] = sizes
    segs["out"] = [out_addr + 8 * k for k in range(len(sizes))]
    words = (max(sizes) + 7) // 8
    grid_x = max(1, min(max_blocks_x, -(-words // threads)))
    return segs, (grid_x, len(sizes)), threads


_lock = threading.Lock()
_kernels: dict[int, Any] = {}


def _kernel(device_index: int) -> Any:
    with _lock:
        if device_index not in _kernels:
            cp = import_cupy()
            with cp.cuda.Device(device_index):
                module = cp.RawModule(code=kernel_source(KERNEL_FILE), options=("--std=c++17",))
                _kernels[device_index] = module.get_function(KERNEL)
        return _kernels[device_index]


def device_checksums(chunks: Sequence[Any]) -> list[int]:
    """devsum64 of each CUDA tensor in `chunks` (all on one device; each contiguous), on
    torch's current stream; returns when the sums are on the host."""
    import torch

    if not chunks:
        return []
    dev = chunks[0].device
    if dev.type != "cuda" or any(c.device != dev for c in chunks):
        raise ValueError(f"device_checksums needs CUDA tensors on one device, got {sorted({str(c.device) for c in chunks})}")
    if any(not c.is_contiguous() for c in chunks):
        raise ValueError("device_checksums needs contiguous tensors")
    cp = import_cupy()
    kernel = _kernel(dev.index or 0)
    sizes = [c.numel() * c.element_size() for c in chunks]
    out: list[int] = []
    stream = torch.cuda.current_stream(dev)
    for start in range(0, len(chunks), MAX_CHUNKS):
        part = chunks[start : start + MAX_CHUNKS]
        acc = torch.zeros(len(part), dtype=torch.int64, device=dev)
        segs, (gx, gy), threads = plan([c.data_ptr() for c in part], sizes[start : start + len(part)], acc.data_ptr())
        table = torch.from_numpy(segs.view(np.uint8)).pin_memory().to(dev, non_blocking=True)
        with cp.cuda.Device(dev.index or 0), cp.cuda.ExternalStream(stream.cuda_stream):
            kernel((gx, gy, 1), (threads, 1, 1), (np.uint64(table.data_ptr()),))
        sums = acc.cpu().numpy().view(np.uint64)  # waits for the kernel (and keeps `table` alive till then)
        out.extend(finish(int(s), n) for s, n in zip(sums, sizes[start : start + len(part)]))
    return out
