"""Build a KVLayout from the cache tensors an engine hands over (vLLM's `kv_caches`).

Engines register their KV caches as a name -> tensor mapping plus a description of the
layer groups (vLLM: `KVCacheConfig.kv_cache_groups`, each with `layer_names` and a spec
holding `block_size`). Shapes alone say the rest (heads, head dim, joint/split/MLA), so
the connector need not repeat backend knowledge here. Only `.shape` and `.dtype` are
read, so this stays importable without torch.
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence

from pdxfer.layout.kv import CacheKind, KVLayout, LayerGroup, LayoutError, dtype_name


def _shape(t: Any) -> tuple[int, ...]:
    return tuple(int(s) for s in t.shape)


def infer_kind(cache: Any, block_size: int) -> CacheKind:
    """Guess the kind of one layer's cache from its logical shape.

    vLLM's convention wins ties: a 5-d tensor with 2 leading and the block size third is
    KV_JOINT_NHD (FlashAttention). Pass `kind` explicitly when a backend is ambiguous.
    """
    if isinstance(cache, (tuple, list)):
        if len(cache) == 2 and all(len(_shape(t)) == 4 for t in cache):
            return CacheKind.KV_SPLIT
        raise LayoutError("a (K, V) pair needs two 4-d tensors [num_blocks, block_size, heads, head_dim]")
    shape = _shape(cache)
    if len(shape) == 3 and shape[1] == block_size:
        return CacheKind.MLA
    if len(shape) == 5:
        if shape[0] == 2 and shape[2] == block_size:
            return CacheKind.KV_JOINT_NHD
        if shape[0] == 2 and shape[3] == block_size:
            return CacheKind.KV_JOINT_HND
        if shape[1] == 2 and shape[2] == block_size:
            return CacheKind.KV_BLOCK_JOINT_NHD
    raise LayoutError(f"cannot tell the KV layout of a cache shaped {shape} with block size {block_size}")


def _geometry(kind: CacheKind, cache: Any) -> tuple[int, int, int, str]:
    """(block_size, heads, head_dim, dtype) of one layer's cache of `kind`."""
    if kind is CacheKind.KV_SPLIT:
        k, v = cache
        if _shape(k) != _shape(v) or str(k.dtype) != str(v.dtype):
            raise LayoutError(f"K {_shape(k)} {k.dtype} and V {_shape(v)} {v.dtype} differ")
        _, bs, h, d = _shape(k)
        return bs, h, d, dtype_name(k.dtype)
    shape = _shape(cache)
    dims = {
        CacheKind.KV_JOINT_NHD: lambda s: (s[2], s[3], s[4]),
        CacheKind.KV_JOINT_HND: lambda s: (s[3], s[2], s[4]),
        CacheKind.KV_BLOCK_JOINT_NHD: lambda s: (s[2], s[3], s[4]),
        CacheKind.MLA: lambda s: (s[1], 1, s[2]),
    }[kind]
    expected_ndim = 3 if kind is CacheKind.MLA else 5
    if len(shape) != expected_ndim:
        raise LayoutError(f"{kind.value} cache must be {expected_ndim}-d, got shape {shape}")
    bs, h, d = dims(shape)
    return bs, h, d, dtype_name(cache.dtype)


def group_from_tensors(
    name: str,
    caches: Mapping[str, Any],
    block_size: int,
    *,
    kind: CacheKind | None = None,
    compress_ratio: int = 1,
) -> LayerGroup:
    """One LayerGroup from its layers' cache tensors (all must agree on geometry)."""
    if not caches:
        raise LayoutError(f"group {name!r} has no layers")
    geometry = None
    for layer, cache in caches.items():
        k = kind or infer_kind(cache, block_size)
        if kind is None:
            kind = k
        g = _geometry(k, cache)
        if g[0] != block_size:
            raise LayoutError(f"layer {layer!r}: block size {g[0]} in the tensor, {block_size} in the spec")
        if geometry is not None and g != geometry:
            raise LayoutError(f"layer {layer!r}: geometry {g} differs from the group's {geometry}")
        geometry = g
    assert geometry is not None and kind is not None
    bs, heads, head_dim, dtype = geometry
    return LayerGroup(name, kind, bs, heads, head_dim, dtype, tuple(caches), compress_ratio)


def _same_storage(a: Any, b: Any) -> bool:
    ptr = getattr(a, "data_ptr", None)
    return ptr is not None and ptr() == b.data_ptr() and _shape(a) == _shape(b)


def layout_from_vllm(
    kv_caches: Mapping[str, Any],
    kv_cache_config: Any = None,
    *,
    groups: Sequence[tuple[Sequence[str], int]] | None = None,
    kinds: Sequence[CacheKind | None] | None = None,
    compress_ratios: Sequence[int] | None = None,
) -> KVLayout:
    """KVLayout of a vLLM worker, from `register_kv_caches(kv_caches)` and its config.

    Groups come from `kv_cache_config.kv_cache_groups` (duck-typed: `.layer_names` and
    `.kv_cache_spec.block_size`) or explicitly as (layer names, block size) pairs.
    Layers that share another layer's storage (vLLM KV sharing) are sent once, under the
    first name. Layers missing from `kv_caches` are skipped (they own no cache); a group
    left with no layer is an error, since group indices must match the page tables.
    """
    if groups is None:
        if kv_cache_config is None:
            raise LayoutError("need kv_cache_config or explicit groups")
        groups = [(tuple(g.layer_names), int(g.kv_cache_spec.block_size)) for g in kv_cache_config.kv_cache_groups]
    kinds = list(kinds) if kinds is not None else [None] * len(groups)
    ratios = list(compress_ratios) if compress_ratios is not None else [1] * len(groups)
    if not len(kinds) == len(ratios) == len(groups):
        raise LayoutError("kinds / compress_ratios need one entry per group")
    seen: list[Any] = []
    out = []
    for gi, ((names, block_size), kind, ratio) in enumerate(zip(groups, kinds, ratios)):
        caches: dict[str, Any] = {}
        for n in names:
            t = kv_caches.get(n)
            if t is None or (
                not isinstance(t, (tuple, list))
                and any(_same_storage(t, s) for s in seen if not isinstance(s, (tuple, list)))
            ):
                continue
            seen.append(t)
            caches[n] = t
        if not caches:  # dropping it would shift every later group's page table index
            raise LayoutError(f"kv cache group {gi} has no cache tensor of its own")
        out.append(group_from_tensors(f"g{gi}", caches, block_size, kind=kind, compress_ratio=ratio))
    return KVLayout(tuple(out))
