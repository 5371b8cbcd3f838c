"""Bind an engine's cache tensors to a layout as uniform per-plane views.

Whatever the engine's shape (joint NHD/HND, FlashInfer block-major, split K/V, MLA),
every plane (K, V or latent) of every layer becomes a view with logical shape
[num_blocks, block_size, heads, head_dim] over the engine's own memory. Views never
copy, so unpack writes land in the engine's cache, and both the torch reference and the
CUDA kernels (which read the views' strides) handle any memory order alike.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping

import torch

from pdxfer.layout.kv import CacheKind, KVLayout, LayerGroup, LayoutError, dtype_name

CacheTensors = torch.Tensor | tuple[torch.Tensor, torch.Tensor]


def plane_views(group: LayerGroup, cache: Any) -> tuple[torch.Tensor, ...]:
    """The K/V (or latent) planes of one layer's cache as [blocks, block_size, heads, dim] views."""
    kind = group.kind
    if kind is CacheKind.KV_SPLIT:
        if not isinstance(cache, (tuple, list)) or len(cache) != 2:
            raise LayoutError(f"group {group.name!r} is KV_SPLIT: pass a (K, V) pair per layer")
        planes = tuple(cache)
    else:
        if not isinstance(cache, torch.Tensor):
            raise LayoutError(f"group {group.name!r} is {kind.value}: pass one tensor per layer")
        expected_ndim = 3 if kind is CacheKind.MLA else 5
        if cache.dim() != expected_ndim:
            raise LayoutError(
                f"group {group.name!r}: {kind.value} needs a {expected_ndim}-d tensor, got {tuple(cache.shape)}"
            )
        if kind is CacheKind.KV_JOINT_NHD:
            planes = (cache[0], cache[1])
        elif kind is CacheKind.KV_JOINT_HND:
            planes = (cache[0].transpose(1, 2), cache[1].transpose(1, 2))
        elif kind is CacheKind.KV_BLOCK_JOINT_NHD:
            planes = (cache[:, 0], cache[:, 1])
        else:
            planes = (cache.unsqueeze(2),)
    for p in planes:
        _check_plane(group, p)
    if len({p.shape[0] for p in planes}) != 1 or len({p.device for p in planes}) != 1:
        raise LayoutError(f"group {group.name!r}: planes of one layer differ in block count or device")
    return planes


def _check_plane(group: LayerGroup, p: torch.Tensor) -> None:
    if dtype_name(p.dtype) != group.dtype:
        raise LayoutError(f"group {group.name!r}: cache dtype {p.dtype}, layout says {group.dtype}")
    want = (group.block_size, group.num_kv_heads, group.head_dim)
    if p.dim() != 4 or tuple(p.shape[1:]) != want:
        raise LayoutError(
            f"group {group.name!r}: plane shape {tuple(p.shape)}, want [blocks, {', '.join(map(str, want))}]"
        )
    if p.stride(3) != 1 and group.head_dim > 1:
        raise LayoutError(f"group {group.name!r}: head_dim must be contiguous (stride {p.stride(3)})")


@dataclass(frozen=True)
class BoundCaches:
    """A layout with its plane views: planes[group][layer][plane]."""

    layout: KVLayout
    planes: tuple[tuple[tuple[torch.Tensor, ...], ...], ...]

    @property
    def device(self) -> torch.device:
        return self.planes[0][0][0].device

    def num_blocks(self, group: int) -> int:
        return min(p.shape[0] for layer in self.planes[group] for p in layer)


def bind(layout: KVLayout, caches: Mapping[str, CacheTensors]) -> BoundCaches:
    """Views for every layer of `layout` from a layer name -> tensor (or (K, V)) mapping."""
    missing = [n for g in layout.groups for n in g.layers if n not in caches]
    if missing:
        raise LayoutError(f"no cache tensor for layers {missing[:5]}{'...' if len(missing) > 5 else ''}")
    planes = tuple(tuple(plane_views(g, caches[n]) for n in g.layers) for g in layout.groups)
    devices = {p.device for grp in planes for layer in grp for p in layer}
    if len(devices) != 1:
        raise LayoutError(f"cache tensors live on several devices: {sorted(map(str, devices))}")
    return BoundCaches(layout, planes)


def allocate(layout: KVLayout, num_blocks: int | list[int], *, device: str | torch.device = "cpu",
             fill: str = "random", generator: torch.Generator | None = None) -> dict[str, CacheTensors]:
    """Cache tensors shaped as the engine would allocate them (tests and benchmarks).

    `fill="random"` writes random bytes (every bit pattern, NaNs included, which is what
    bit-exactness must survive); `"zero"` zero-fills.
    """
    counts = [num_blocks] * len(layout.groups) if isinstance(num_blocks, int) else list(num_blocks)
    out: dict[str, CacheTensors] = {}
    for g, nb in zip(layout.groups, counts):
        dtype = getattr(torch, g.dtype)
        for name in g.layers:
            n = 2 if g.kind is CacheKind.KV_SPLIT else 1
            ts = []
            for _ in range(n):
                shape = g.cache_shape(nb)
                raw = torch.empty(shape + (g.itemsize,), dtype=torch.uint8, device=device)
                if fill == "random":
                    raw.copy_(torch.randint(0, 256, raw.shape, dtype=torch.uint8, generator=generator))
                else:
                    raw.zero_()
                ts.append(raw.view(dtype).reshape(shape))
            out[name] = (ts[0], ts[1]) if n == 2 else ts[0]
    return out
