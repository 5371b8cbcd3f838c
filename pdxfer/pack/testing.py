"""Hypothesis strategies and an independent oracle for pack tests (CPU, host-kernel, GPU).

Kept in the package so the CPU suite, the host-compiled kernel tests and the GPU tests
draw from the same shapes. Needs hypothesis (a test dependency).

The oracle (`token_row`) reads one head of one entry straight from the engine-shaped
cache tensor by plain indexing, without plane views, plans or page-table helpers, so a
bug shared by the reference and the kernels' planning cannot hide behind itself.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import torch
from hypothesis import strategies as st

from pdxfer.layout.kv import CacheKind, KVLayout, LayerGroup

DTYPES = ("bfloat16", "float16", "float32", "float8_e4m3fn", "uint8")
BLOCK_SIZES = (1, 2, 3, 4, 5, 8, 16)
JOINT_KINDS = (CacheKind.KV_JOINT_NHD, CacheKind.KV_JOINT_HND, CacheKind.KV_BLOCK_JOINT_NHD, CacheKind.KV_SPLIT)
MAX_TOKENS = 72


@st.composite
def layer_groups(draw: st.DrawFn, index: int, max_heads: int = 4) -> LayerGroup:
    kind = draw(st.sampled_from(JOINT_KINDS + (CacheKind.MLA,)))
    heads = 1 if kind is CacheKind.MLA else draw(st.integers(1, max_heads))
    return LayerGroup(
        name=f"g{index}",
        kind=kind,
        block_size=draw(st.sampled_from(BLOCK_SIZES)),
        num_kv_heads=heads,
        head_dim=draw(st.sampled_from((1, 2, 3, 8, 16, 33, 64))),
        dtype=draw(st.sampled_from(DTYPES)),
        layers=tuple(f"g{index}.l{i}" for i in range(draw(st.integers(1, 3)))),
        compress_ratio=draw(st.sampled_from((1, 1, 1, 2, 4))),
    )


@st.composite
def layouts(draw: st.DrawFn, max_groups: int = 3, max_heads: int = 4) -> KVLayout:
    n = draw(st.integers(1, max_groups))
    return KVLayout(tuple(draw(layer_groups(i, max_heads)) for i in range(n)))


@st.composite
def peer_layouts(draw: st.DrawFn, layout: KVLayout, heads: list[int] | None = None) -> KVLayout:
    """A transfer-compatible layout: other block sizes and memory orders (and head counts)."""
    groups = []
    for i, g in enumerate(layout.groups):
        kind = g.kind if g.kind is CacheKind.MLA else draw(st.sampled_from(JOINT_KINDS))
        groups.append(
            replace(
                g,
                kind=kind,
                block_size=draw(st.sampled_from(BLOCK_SIZES)),
                num_kv_heads=g.num_kv_heads if heads is None else heads[i],
            )
        )
    return KVLayout(tuple(groups))


@st.composite
def token_ranges(draw: st.DrawFn, max_tokens: int = MAX_TOKENS) -> tuple[int, int]:
    t0 = draw(st.integers(0, max_tokens))
    return t0, draw(st.integers(t0, max_tokens))


def page_tables(layout: KVLayout, num_tokens: int, num_blocks: list[int], gen: torch.Generator) -> list[list[int]]:
    """Random distinct block ids per group, enough for `num_tokens` tokens."""
    out = []
    for g, nb in zip(layout.groups, num_blocks):
        need = g.blocks_for(num_tokens)
        assert need <= nb, (need, nb)
        out.append(torch.randperm(nb, generator=gen)[:need].tolist())
    return out


def blocks_needed(layout: KVLayout, num_tokens: int, spare: int = 3) -> list[int]:
    return [g.blocks_for(num_tokens) + spare for g in layout.groups]


def token_row(group: LayerGroup, cache: Any, plane: int, block: int, offset: int, head: int) -> bytes:
    """Bytes of one head of one cache entry, read by plain engine-shape indexing."""
    k = group.kind
    if k is CacheKind.KV_SPLIT:
        t = cache[plane][block, offset, head]
    elif k is CacheKind.KV_JOINT_NHD:
        t = cache[plane, block, offset, head]
    elif k is CacheKind.KV_JOINT_HND:
        t = cache[plane, block, head, offset]
    elif k is CacheKind.KV_BLOCK_JOINT_NHD:
        t = cache[block, plane, offset, head]
    else:
        assert head == 0 and plane == 0
        t = cache[block, offset]
    return t.contiguous().view(torch.uint8).cpu().numpy().tobytes()


def expected_packed(layout: KVLayout, caches: dict[str, Any], tables: list[list[int]], t0: int, t1: int) -> bytes:
    """The packed buffer of [t0, t1) written out from the format's definition, entry by entry."""
    out = bytearray()
    for g, table in zip(layout.groups, tables):
        e0, e1 = t0 // g.compress_ratio, t1 // g.compress_ratio
        for name in g.layers:
            for plane in range(g.planes):
                start = len(out)
                for e in range(e0, e1):
                    block, off = table[e // g.block_size], e % g.block_size
                    for h in range(g.num_kv_heads):
                        out += token_row(g, caches[name], plane, block, off, h)
                out += bytes(-(len(out) - start) % 16)
    return bytes(out)
