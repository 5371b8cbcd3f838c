"""Chunk buffers: host memory as flat views, GPU memory recognised without CUDA."""

from __future__ import annotations

import numpy as np
import pytest

from pdxfer.layout.buffers import DRAM, as_bytes_view, chunk_buffer, is_device_buffer, mem_of, nbytes_of


class FakeCudaArray:
    """Stands in for a CuPy array on a host without a GPU: only its interface is looked at
    (tests/engine/test_vram_gpu.py sends real CUDA tensors)."""

    __cuda_array_interface__ = {"shape": (16,), "typestr": "|u1", "data": (0x1000, False), "version": 3}


def test_host_buffers_become_flat_byte_views():
    a = np.arange(12, dtype=np.uint16).reshape(3, 4)
    v = chunk_buffer(a)
    assert isinstance(v, memoryview) and v.format == "B" and v.nbytes == 24
    assert nbytes_of(v) == 24 and mem_of(v) == (DRAM, 0) and not is_device_buffer(a)
    with pytest.raises(ValueError, match="C-contiguous"):
        as_bytes_view(a[:, ::2])


def test_gpu_buffers_are_recognised_without_touching_cuda():
    assert is_device_buffer(FakeCudaArray())

    class CudaTensorLike:
        is_cuda = True

    assert is_device_buffer(CudaTensorLike())
