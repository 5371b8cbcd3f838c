"""Paged KV blocks <-> contiguous buffers: CUDA kernels (csrc/, via CuPy) and a torch reference.

Names are imported lazily: torch is an optional dependency, and `pdxfer.pack.compile_check`
(the CI kernel compile) must run without it.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "Packer": "pdxfer.pack.api",
    "Backend": "pdxfer.pack.api",
    "pack_reference": "pdxfer.pack.reference",
    "unpack_reference": "pdxfer.pack.reference",
    "BoundCaches": "pdxfer.pack.views",
    "allocate": "pdxfer.pack.views",
    "bind": "pdxfer.pack.views",
    "plane_views": "pdxfer.pack.views",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'pdxfer.pack' has no attribute {name!r}")
