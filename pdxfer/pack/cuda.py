"""Run the csrc/ kernels on torch CUDA tensors, compiled at run time through CuPy.

CuPy compiles csrc/kv_pack.cu with NVRTC on first use (and caches the binary), so
users install `pdxfer[cuda12]` or `pdxfer[cuda13]` and need no build step. Tensors stay
torch tensors: the kernels receive their raw device addresses and run on torch's
current stream, so nothing is copied besides the bytes the kernel moves and one small
descriptor upload per launch.
"""

from __future__ import annotations

import os
import threading
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from pdxfer.layout.kv import HeadSelection
from pdxfer.pack.plan import build_launch, geometry_of, group_ranges
from pdxfer.pack.reference import check_buffer
from pdxfer.pack.views import BoundCaches

KERNEL_FILE = "kv_pack.cu"
PACK_KERNEL = "pdx_pack_kv"
UNPACK_KERNEL = "pdx_unpack_kv"
NVRTC_OPTIONS = ("--std=c++17",)


class CupyMissing(ImportError):
    """CUDA tensors were given but CuPy, which compiles the kernels, is not installed."""


def kernel_dirs() -> list[Path]:
    """Where kernel sources are looked for: $PDXFER_CSRC, package data, the source tree."""
    dirs = [Path(os.environ["PDXFER_CSRC"])] if os.environ.get("PDXFER_CSRC") else []
    here = Path(__file__).resolve().parent
    return dirs + [here / "csrc", here.parents[1] / "csrc"]


def kernel_source(name: str = KERNEL_FILE) -> str:
    for d in kernel_dirs():
        if (d / name).is_file():
            return (d / name).read_text()
    raise FileNotFoundError(f"kernel source {name} not found in {[str(d) for d in kernel_dirs()]}")


def import_cupy() -> Any:
    """CuPy, imported only when a CUDA pack is first asked for."""
    try:
        import cupy  # type: ignore[import-not-found]
    except ImportError as e:
        raise CupyMissing(
            "packing CUDA tensors needs CuPy to compile the kernels at run time: "
            "pip install 'pdxfer[cuda12]' (CUDA 12) or 'pdxfer[cuda13]' (CUDA 13), "
            "or use Packer(..., backend='torch')"
        ) from e
    return cupy


_lock = threading.Lock()
_kernels: dict[int, tuple[Any, Any]] = {}


def load_kernels(device_index: int) -> tuple[Any, Any]:
    """(pack, unpack) RawKernels compiled for one device (compiled once per process)."""
    with _lock:
        if device_index not in _kernels:
            cp = import_cupy()
            with cp.cuda.Device(device_index):
                module = cp.RawModule(code=kernel_source(), options=NVRTC_OPTIONS)
                _kernels[device_index] = (module.get_function(PACK_KERNEL), module.get_function(UNPACK_KERNEL))
        return _kernels[device_index]


class CudaLauncher:
    """Pack / unpack one BoundCaches with the CUDA kernels; plane geometry is computed once.

    `kernels` (pack, unpack) defaults to the NVRTC-compiled ones; the device-specific
    steps are `_upload` and `_launch`, so tests can drive everything else on the host.
    """

    def __init__(self, bound: BoundCaches, kernels: tuple[Any, Any] | None = None) -> None:
        if kernels is None:
            if bound.device.type != "cuda":
                raise ValueError(f"CUDA launcher needs CUDA caches, got {bound.device}")
            kernels = load_kernels(bound.device.index or 0)
        self.bound = bound
        self.geometry = geometry_of(bound.planes)
        self._counts = [bound.num_blocks(i) for i in range(len(bound.layout.groups))]
        self._kernels = kernels

    def run(
        self,
        pack: bool,
        page_tables: Sequence[object],
        t0: int,
        t1: int,
        buf: torch.Tensor,
        heads: HeadSelection = None,
    ) -> None:
        layout, device = self.bound.layout, self.bound.device
        check_buffer(buf, layout.packed_nbytes(t0, t1, heads), device, "pack output" if pack else "unpack input")
        ranges = group_ranges(layout, page_tables, t0, t1, self._counts, writing=not pack)
        plan = build_launch(layout, self.geometry, ranges, buf.data_ptr(), t0, t1, heads)
        if plan.nbytes == 0:
            return
        blob = self._upload(plan.blob())
        segs_ptr = blob.data_ptr()
        args = (np.uint64(segs_ptr), np.uint64(segs_ptr + plan.tables_offset), np.uint64(buf.data_ptr()))
        self._launch(self._kernels[0 if pack else 1], plan.grid, plan.block, args)
        # `blob` may be freed now: the caching allocator reuses it only in stream order.

    def _upload(self, host: np.ndarray) -> torch.Tensor:
        """Descriptors to the device. Pinned + non_blocking: queued on the stream with no
        host sync; torch's host allocator keeps the pinned block until the copy has run."""
        return torch.from_numpy(host).pin_memory().to(self.bound.device, non_blocking=True)

    def _launch(self, kernel: Any, grid: tuple[int, ...], block: tuple[int, ...], args: tuple[Any, ...]) -> None:
        """Launch on torch's current stream, so ordering with the engine's work holds."""
        cp = import_cupy()
        device = self.bound.device
        stream = torch.cuda.current_stream(device)
        with cp.cuda.Device(device.index or 0), cp.cuda.ExternalStream(stream.cuda_stream):
            kernel(grid, block, args)
