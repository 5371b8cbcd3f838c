"""csrc/devsum.cu compiled for the host, against the numpy reference of devsum64.

Runs the real kernel source and the real launch plan (descriptor table, grid, the
stride loop when the grid is smaller than the chunk) on CPU memory, at every byte
misalignment and tail length, several chunks per launch. The GPU test repeats this on a
device.
"""

from __future__ import annotations

import ctypes

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from host_build import build_host_kernel
from pdxfer.pack.devsum_cuda import KERNEL_FILE, plan
from pdxfer.protocol.devsum import devsum, finish, word_sum


SETTINGS = settings(max_examples=60, deadline=None,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])


@pytest.fixture(scope="module")
def host_devsum(tmp_path_factory: pytest.TempPathFactory):
    lib = build_host_kernel(KERNEL_FILE, "devsum_shim.cpp", tmp_path_factory.mktemp("hostdevsum"))
    fn = lib.pdx_host_devsum
    fn.restype = ctypes.c_int
    fn.argtypes = [ctypes.c_uint, ctypes.c_uint, ctypes.c_uint, ctypes.c_void_p]

    def run(buffers: list[np.ndarray], threads: int = 256, max_blocks_x: int = 1024) -> list[int]:
        acc = np.zeros(len(buffers), dtype=np.uint64)
        segs, (gx, gy), bx = plan([b.ctypes.data for b in buffers], [b.nbytes for b in buffers], acc.ctypes.data,
                                  threads=threads, max_blocks_x=max_blocks_x)
        fn(gx, gy, bx, segs.ctypes.data)
        return [finish(int(s), b.nbytes) for s, b in zip(acc, buffers)]

    return run


def _at(raw: np.ndarray, misalign: int, n: int) -> np.ndarray:
    """n bytes of `raw` starting `misalign` bytes past an 8-byte boundary."""
    skip = (-raw.ctypes.data % 8) + misalign
    return raw[skip : skip + n]


@SETTINGS
@given(st.data())
def test_host_kernel_matches_reference(host_devsum, data: st.DataObject) -> None:
    rng = np.random.default_rng(data.draw(st.integers(0, 2**32 - 1), label="seed"))
    sizes = data.draw(st.lists(st.integers(0, 40_000), min_size=1, max_size=4), label="sizes")
    threads = data.draw(st.sampled_from([1, 32, 256]), label="threads")
    max_blocks = data.draw(st.sampled_from([1, 3, 1024]), label="max_blocks_x")  # small grids: the stride loop
    bufs = []
    for n in sizes:
        raw = rng.integers(0, 256, n + 16, dtype=np.uint8)
        bufs.append(_at(raw, data.draw(st.integers(0, 7), label="misalign"), n))
    assert host_devsum(bufs, threads, max_blocks) == [devsum(b) for b in bufs]


def test_host_kernel_on_a_2mib_chunk(host_devsum) -> None:
    buf = np.random.default_rng(1).integers(0, 256, 2 << 20, dtype=np.uint8)
    assert host_devsum([buf]) == [devsum(buf)]
    assert word_sum(buf) != 0


def test_plan_refuses_what_one_launch_cannot_do() -> None:
    with pytest.raises(ValueError, match="1..65535 chunks"):
        plan([], [], 0)
    with pytest.raises(ValueError, match="addresses"):
        plan([1, 2], [3], 0)
    with pytest.raises(ValueError, match=">= 0"):
        plan([1], [-1], 0)
