"""`Packer`: the one object an engine connector holds to pack and unpack its KV cache.

Built once when the engine registers its caches; each call then moves one token range
of one request (all groups, all layers) between the paged caches and a contiguous
buffer in the format of `pdxfer.layout.kv`. CUDA tensors go through the csrc/ kernels,
anything else through the torch reference.
"""

from __future__ import annotations

from typing import Any, Literal, Mapping, Sequence

import torch

from pdxfer.layout.kv import CacheKind, HeadSelection, KVLayout
from pdxfer.layout.kv_infer import layout_from_vllm
from pdxfer.pack.reference import pack_reference, unpack_reference
from pdxfer.pack.views import BoundCaches, CacheTensors, bind

Backend = Literal["auto", "torch", "cuda"]


class Packer:
    """Pack / unpack token ranges of one rank's paged KV cache.

    `page_tables[g]` lists a request's block ids in group g (block i holds the request's
    entries [i * block_size, (i + 1) * block_size)), as vLLM's `block_ids` tuple does.
    Pass them as lists or numpy arrays: they are validated on the host before any launch.
    """

    def __init__(self, layout: KVLayout, caches: Mapping[str, CacheTensors], *, backend: Backend = "auto") -> None:
        self.bound: BoundCaches = bind(layout, caches)
        if backend == "auto":
            backend = "cuda" if self.bound.device.type == "cuda" else "torch"
        if backend not in ("torch", "cuda"):
            raise ValueError(f"unknown backend {backend!r}")
        self.backend = backend
        self._cuda: Any = None
        if backend == "cuda":
            from pdxfer.pack.cuda import CudaLauncher

            self._cuda = CudaLauncher(self.bound)

    @classmethod
    def from_vllm(
        cls,
        kv_caches: Mapping[str, Any],
        kv_cache_config: Any = None,
        *,
        groups: Sequence[tuple[Sequence[str], int]] | None = None,
        kinds: Sequence[CacheKind | None] | None = None,
        compress_ratios: Sequence[int] | None = None,
        backend: Backend = "auto",
    ) -> "Packer":
        """From vLLM's `register_kv_caches(kv_caches)` and its KVCacheConfig."""
        layout = layout_from_vllm(
            kv_caches, kv_cache_config, groups=groups, kinds=kinds, compress_ratios=compress_ratios
        )
        return cls(layout, {n: kv_caches[n] for g in layout.groups for n in g.layers}, backend=backend)

    @property
    def layout(self) -> KVLayout:
        return self.bound.layout

    def packed_nbytes(self, t0: int, t1: int, heads: HeadSelection = None) -> int:
        return self.layout.packed_nbytes(t0, t1, heads)

    def pack(
        self,
        page_tables: Sequence[object],
        t0: int,
        t1: int,
        *,
        out: torch.Tensor | None = None,
        heads: HeadSelection = None,
    ) -> torch.Tensor:
        """Tokens [t0, t1) of every layer into `out` (or a new buffer); returns the packed bytes.

        On CUDA the kernel is queued on torch's current stream; synchronise (or record an
        event) before another stream or the host reads the bytes.
        """
        if self._cuda is None:
            return pack_reference(self.bound, page_tables, t0, t1, out=out, heads=heads)
        nbytes = self.packed_nbytes(t0, t1, heads)
        if out is None:
            out = torch.empty(nbytes, dtype=torch.uint8, device=self.bound.device)
        self._cuda.run(True, page_tables, t0, t1, out, heads)
        return out[:nbytes]

    def unpack(
        self,
        page_tables: Sequence[object],
        t0: int,
        t1: int,
        buf: torch.Tensor,
        *,
        heads: HeadSelection = None,
    ) -> None:
        """Scatter packed tokens [t0, t1) into this rank's caches, in place."""
        if self._cuda is None:
            unpack_reference(self.bound, page_tables, t0, t1, buf, heads=heads)
        else:
            self._cuda.run(False, page_tables, t0, t1, buf, heads)
