"""Fixtures for pack tests: the CUDA kernel source compiled for the host (see host_shim.cpp)."""

from __future__ import annotations

import ctypes
from typing import Callable, Sequence

import numpy as np
import pytest
import torch

from pdxfer.layout.kv import HeadSelection
from host_build import build_host_kernel
from pdxfer.pack.cuda import KERNEL_FILE
from pdxfer.pack.plan import LaunchPlan, build_launch, geometry_of, group_ranges
from pdxfer.pack.views import BoundCaches

HostRun = Callable[..., LaunchPlan]


@pytest.fixture(scope="session")
def host_kernel(tmp_path_factory: pytest.TempPathFactory) -> HostRun:
    """run(bound, pack, tables, t0, t1, buf, heads) through the kernel compiled with g++."""
    lib = build_host_kernel(KERNEL_FILE, "host_shim.cpp", tmp_path_factory.mktemp("hostkernel"))
    fn = lib.pdx_host_launch
    fn.restype = ctypes.c_int
    fn.argtypes = [ctypes.c_int, ctypes.c_uint, ctypes.c_uint, ctypes.c_uint,
                   ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p]

    def run(bound: BoundCaches, pack: bool, tables: Sequence[object], t0: int, t1: int,
            buf: torch.Tensor, heads: HeadSelection = None) -> LaunchPlan:
        layout = bound.layout
        assert buf.numel() >= layout.packed_nbytes(t0, t1, heads)
        counts = [bound.num_blocks(i) for i in range(len(layout.groups))]
        ranges = group_ranges(layout, tables, t0, t1, counts, writing=not pack)
        plan = build_launch(layout, geometry_of(bound.planes), ranges, buf.data_ptr(), t0, t1, heads)
        if plan.nbytes:
            segs = np.ascontiguousarray(plan.segs)
            tabs = np.ascontiguousarray(plan.tables)
            fn(int(pack), plan.grid[0], plan.grid[1], plan.block[0], segs.ctypes.data, tabs.ctypes.data,
               buf.data_ptr())
        return plan

    run.lib = lib  # type: ignore[attr-defined]
    return run
