"""The torch reference: the packed format byte for byte, and bit-exact round trips.

Covers every cache kind (joint NHD / HND, FlashInfer block-major, split K/V, MLA),
heterogeneous groups (block sizes, compressed caches), re-blocking and memory-order
changes between P and D, chunked transfers, and tensor-parallel head slicing.
"""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pdxfer.layout.heads import HeadMap, tp_heads, tp_sources
from pdxfer.layout.kv import CacheKind, KVLayout, LayerGroup, LayoutError
from pdxfer.pack import Packer, allocate, bind, pack_reference, plane_views, unpack_reference
from pdxfer.pack.testing import (
    blocks_needed,
    expected_packed,
    layouts,
    page_tables,
    peer_layouts,
    token_ranges,
    token_row,
)

SETTINGS = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def _gen(data: st.DataObject) -> torch.Generator:
    return torch.Generator().manual_seed(data.draw(st.integers(0, 2**31 - 1), label="seed"))


@SETTINGS
@given(st.data())
def test_pack_writes_the_documented_format(data: st.DataObject) -> None:
    layout = data.draw(layouts())
    t0, t1 = data.draw(token_ranges())
    gen = _gen(data)
    nb = blocks_needed(layout, t1)
    caches = allocate(layout, nb, generator=gen)
    tables = page_tables(layout, t1, nb, gen)
    out = torch.full((layout.packed_nbytes(t0, t1) + 7,), 0xFF, dtype=torch.uint8)  # dirty, oversized
    buf = pack_reference(bind(layout, caches), tables, t0, t1, out=out)
    assert buf.numel() == layout.packed_nbytes(t0, t1)
    assert buf.numpy().tobytes() == expected_packed(layout, caches, tables, t0, t1)


def _written_mask(layout: KVLayout, tables: list[list[int]], num_tokens: int, nb: list[int]) -> list[torch.Tensor]:
    masks = []
    for g, table, n in zip(layout.groups, tables, nb):
        m = torch.zeros(n, g.block_size, dtype=torch.bool)
        for e in range(num_tokens // g.compress_ratio):
            m[table[e // g.block_size], e % g.block_size] = True
        masks.append(m)
    return masks


@SETTINGS
@given(st.data())
def test_chunked_round_trip_reblocks_bit_exact(data: st.DataObject) -> None:
    src = data.draw(layouts(), label="prefill layout")
    dst = data.draw(peer_layouts(src), label="decode layout")
    total = data.draw(st.integers(0, 72), label="tokens")
    cuts = sorted(data.draw(st.lists(st.integers(0, total), max_size=3), label="chunk cuts"))
    bounds = [0, *cuts, total]
    gen = _gen(data)
    snb, dnb = blocks_needed(src, total), blocks_needed(dst, total, spare=2)
    scaches, dcaches = allocate(src, snb, generator=gen), allocate(dst, dnb, generator=gen)
    before = {n: tuple(p.clone() for p in plane_views(g, dcaches[n])) for g in dst.groups for n in g.layers}
    stables, dtables = page_tables(src, total, snb, gen), page_tables(dst, total, dnb, gen)
    p, d = Packer(src, scaches), Packer(dst, dcaches)
    for t0, t1 in zip(bounds, bounds[1:]):
        buf = p.pack(stables, t0, t1)
        assert buf.numel() == dst.packed_nbytes(t0, t1)
        d.unpack(dtables, t0, t1, buf.clone())
    # Every entry arrived, bit for bit, at the decode side's own block and offset ...
    for sg, dg, stab, dtab in zip(src.groups, dst.groups, stables, dtables):
        for sn, dn in zip(sg.layers, dg.layers):
            for e in range(total // sg.compress_ratio):
                for plane in range(sg.planes):
                    for h in range(sg.num_kv_heads):
                        want = token_row(sg, scaches[sn], plane, stab[e // sg.block_size], e % sg.block_size, h)
                        got = token_row(dg, dcaches[dn], plane, dtab[e // dg.block_size], e % dg.block_size, h)
                        assert got == want, (sg.name, sn, e, plane, h)
    # ... and nothing else in the decode cache changed.
    for dg, mask in zip(dst.groups, _written_mask(dst, dtables, total, dnb)):
        for n in dg.layers:
            for now, old in zip(plane_views(dg, dcaches[n]), before[n]):
                keep = ~mask
                assert torch.equal(now.view(torch.uint8)[keep], old.view(torch.uint8)[keep])
    # Packing the whole range back on D gives P's bytes.
    assert torch.equal(d.pack(dtables, 0, total), p.pack(stables, 0, total))


@SETTINGS
@given(st.data())
def test_packed_size_depends_on_rows_not_on_blocks(data: st.DataObject) -> None:
    src = data.draw(layouts())
    dst = data.draw(peer_layouts(src))
    t0, t1 = data.draw(token_ranges())
    assert src.packed_nbytes(t0, t1) == dst.packed_nbytes(t0, t1)
    assert src.packed_nbytes(t0, t1) % 16 == 0


def _tp_layout(base: KVLayout, heads: int) -> KVLayout:
    """`base` with every attention group at `heads` heads, joint NHD (MLA groups stay)."""
    return KVLayout(tuple(
        g if g.kind is CacheKind.MLA else replace(g, kind=CacheKind.KV_JOINT_NHD, num_kv_heads=heads)
        for g in base.groups
    ))


@SETTINGS
@given(st.data())
def test_tensor_parallel_head_slicing_round_trip(data: st.DataObject) -> None:
    total_heads = data.draw(st.sampled_from([1, 2, 4, 8]), label="kv heads")
    p_tp = data.draw(st.sampled_from([1, 2, 4, 8]), label="prefill TP")
    d_tp = data.draw(st.sampled_from([1, 2, 4, 8]), label="decode TP")
    wide = data.draw(st.booleans(), label="wide buffers")
    base = _tp_layout(data.draw(layouts(max_groups=2, max_heads=1)), total_heads)
    total = data.draw(st.integers(1, 40), label="tokens")
    gen = _gen(data)
    nb = blocks_needed(base, total)
    truth = allocate(base, nb, generator=gen)  # the unsharded model's cache
    tables = page_tables(base, total, nb, gen)
    prefill = []
    for r in range(p_tp):
        h0, hn = tp_heads(total_heads, p_tp, r)
        local = _tp_layout(base, hn)
        caches = {n: (truth[n] if g.kind is CacheKind.MLA else truth[n][:, :, :, h0 : h0 + hn].clone())
                  for g in base.groups for n in g.layers}
        prefill.append(Packer(local, caches))
    for dr in range(d_tp):
        d0, dn = tp_heads(total_heads, d_tp, dr)
        dlayout = data.draw(peer_layouts(base, heads=[1 if g.kind is CacheKind.MLA else dn for g in base.groups]))
        dnb = blocks_needed(dlayout, total)
        dcaches = allocate(dlayout, dnb, generator=gen)
        dtables = page_tables(dlayout, total, dnb, gen)
        dec = Packer(dlayout, dcaches)
        sources = tp_sources(total_heads, p_tp, d_tp, dr, wide=wide)
        assert sum(m.count for _, _, m in sources) == dn  # every decode head from exactly one rank
        for i, (src, smap, dmap) in enumerate(sources):
            attn = [g.kind is not CacheKind.MLA for g in base.groups]
            if i > 0 and not any(attn):
                break  # latent-only model: one source is enough
            sheads = [smap if a else None for a in attn]
            dheads = [dmap if a else None for a in attn]
            buf = prefill[src].pack(tables, 0, total, heads=sheads)
            assert buf.numel() == prefill[src].packed_nbytes(0, total, heads=sheads)
            dec.unpack(dtables, 0, total, buf, heads=dheads)
        for g, dg, table, dtable in zip(base.groups, dlayout.groups, tables, dtables):
            for n in g.layers:
                for e in range(total // g.compress_ratio):
                    for plane in range(g.planes):
                        for h in range(dg.num_kv_heads):
                            gh = 0 if g.kind is CacheKind.MLA else d0 + h
                            want = token_row(g, truth[n], plane, table[e // g.block_size], e % g.block_size, gh)
                            got = token_row(dg, dcaches[n], plane, dtable[e // dg.block_size], e % dg.block_size, h)
                            assert got == want, (n, e, plane, h)


ATTN = LayerGroup("attn", CacheKind.KV_JOINT_NHD, 4, 2, 8, "float16", ("a0", "a1"))


def _small() -> tuple[KVLayout, Packer]:
    layout = KVLayout((ATTN,))
    return layout, Packer(layout, allocate(layout, 6, generator=torch.Generator().manual_seed(1)))


def test_page_table_too_short_is_refused() -> None:
    _, p = _small()
    with pytest.raises(LayoutError, match="page table has 2 blocks"):
        p.pack([[0, 1]], 0, 9)


def test_block_id_outside_cache_is_refused() -> None:
    _, p = _small()
    with pytest.raises(LayoutError, match="outside the cache"):
        p.pack([[0, 6]], 0, 8)
    with pytest.raises(LayoutError, match="outside the cache"):
        p.pack([[-1, 2]], 0, 8)


def test_duplicate_block_refused_for_unpack_only() -> None:
    layout, p = _small()
    buf = p.pack([[3, 3]], 0, 8)  # reading one block twice is harmless
    half = 4 * ATTN.num_kv_heads * ATTN.row_bytes  # tokens 0-3 and 4-7 both come from block 3
    assert torch.equal(buf[:half], buf[half : 2 * half])
    with pytest.raises(LayoutError, match="appears twice"):
        p.unpack([[3, 3]], 0, 8, buf)


def test_buffer_checks() -> None:
    layout, p = _small()
    n = layout.packed_nbytes(0, 8)
    with pytest.raises(LayoutError, match="holds"):
        p.pack([[0, 1]], 0, 8, out=torch.empty(n - 1, dtype=torch.uint8))
    with pytest.raises(LayoutError, match="uint8"):
        p.unpack([[0, 1]], 0, 8, torch.empty(n, dtype=torch.int8))
    with pytest.raises(LayoutError, match="contiguous"):
        p.unpack([[0, 1]], 0, 8, torch.empty(2 * n, dtype=torch.uint8)[::2])


def test_unpack_writes_through_to_engine_tensors() -> None:
    layout = KVLayout((ATTN,))
    src = allocate(layout, 6, generator=torch.Generator().manual_seed(2))
    dst = allocate(layout, 6, fill="zero")
    buf = pack_reference(bind(layout, src), [[4, 0]], 0, 8)
    unpack_reference(bind(layout, dst), [[1, 5]], 0, 8, buf)
    for n in ATTN.layers:
        assert torch.equal(dst[n][:, 1].view(torch.int16), src[n][:, 4].view(torch.int16))
        assert torch.equal(dst[n][:, 5].view(torch.int16), src[n][:, 0].view(torch.int16))
        assert not dst[n][:, [0, 2, 3, 4]].view(torch.int16).any()


def test_empty_range_packs_nothing() -> None:
    layout, p = _small()
    assert p.pack([[0]], 3, 3).numel() == 0
    p.unpack([[0]], 3, 3, torch.empty(0, dtype=torch.uint8))


def test_head_map_outside_group_is_refused() -> None:
    layout, p = _small()
    with pytest.raises(LayoutError, match="outside"):
        p.pack([[0, 1]], 0, 8, heads=[HeadMap(1, 2)])
    with pytest.raises(LayoutError, match="one head map per group"):
        p.pack([[0, 1]], 0, 8, heads=[None, None])


def test_bind_rejects_mismatched_tensors() -> None:
    layout = KVLayout((ATTN,))
    good = allocate(layout, 3)
    with pytest.raises(LayoutError, match="no cache tensor"):
        bind(layout, {"a0": good["a0"]})
    with pytest.raises(LayoutError, match="dtype"):
        bind(layout, {**good, "a1": good["a1"].to(torch.bfloat16)})
    with pytest.raises(LayoutError, match="plane shape"):
        bind(layout, {**good, "a1": torch.zeros(2, 3, 4, 2, 9, dtype=torch.float16)})
    with pytest.raises(LayoutError, match="contiguous"):
        bind(layout, {**good, "a1": torch.zeros(2, 3, 4, 8, 2, dtype=torch.float16).transpose(3, 4)})
