"""KV layouts: token -> (block, offset), packed byte sizes, validation, wire form."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest

from pdxfer.layout.heads import HeadMap
from pdxfer.layout.kv import (
    DTYPE_ITEMSIZE,
    SEGMENT_ALIGN,
    CacheKind,
    KVLayout,
    LayerGroup,
    LayoutError,
    dtype_name,
)

LLAMA8B = LayerGroup(
    "attn", CacheKind.KV_JOINT_NHD, 16, 8, 128, "bfloat16", tuple(f"model.layers.{i}" for i in range(32))
)


def test_llama_8b_sizes() -> None:
    layout = KVLayout((LLAMA8B,))
    # 32 layers x (K, V) x 8 heads x 128 x 2 bytes = 128 KiB per token, as everyone quotes.
    assert layout.packed_nbytes(0, 1) == 131072
    assert layout.packed_nbytes(100, 1124) == 1024 * 131072
    segs = layout.segments(0, 3)
    assert len(segs) == 64
    assert [(s.layer, s.plane) for s in segs[:3]] == [(0, 0), (0, 1), (1, 0)]
    assert [s.offset for s in segs[:3]] == [0, 3 * 2048, 6 * 2048]  # 8 heads x 128 x 2 bytes per plane


def test_heterogeneous_model_sizes_and_locations() -> None:
    """Attention at 16-token blocks, a 4x compressor cache at 4-entry blocks, an indexer at 1."""
    attn = LayerGroup("attn", CacheKind.MLA, 16, 1, 576, "bfloat16", ("a0", "a1"))
    comp = LayerGroup("comp", CacheKind.MLA, 4, 1, 512, "bfloat16", ("c0",), compress_ratio=4)
    idx = LayerGroup("idx", CacheKind.MLA, 1, 1, 132, "uint8", ("i0",))
    layout = KVLayout((attn, comp, idx))
    # tokens [5, 23): 18 attention entries, compressor entries [1, 5), 18 indexer entries
    assert comp.entry_range(5, 23) == (1, 5)
    expected = 2 * 18 * 1152 + 4 * 1024 + (-(-18 * 132 // SEGMENT_ALIGN) * SEGMENT_ALIGN)
    assert layout.packed_nbytes(5, 23) == expected
    tables = [[10, 11], [20, 21], list(range(100, 130))]
    assert layout.locate(17, tables) == ((11, 1), (21, 0), (117, 0))
    blk, off = comp.slots(0, 40, tables[1] + [22, 23])
    assert blk.tolist() == [20] * 4 + [21] * 4 + [22, 22]
    assert off.tolist() == [0, 1, 2, 3] * 2 + [0, 1]


def test_compressed_entries_partition_over_chunks() -> None:
    g = LayerGroup("c", CacheKind.MLA, 4, 1, 8, "uint8", ("c0",), compress_ratio=4)
    cuts = [0, 3, 9, 10, 17, 30]
    ranges = [g.entry_range(a, b) for a, b in zip(cuts, cuts[1:])]
    covered = [e for a, b in ranges for e in range(a, b)]
    assert covered == list(range(30 // 4))


def test_segment_offsets_are_aligned_and_disjoint() -> None:
    odd = LayerGroup("odd", CacheKind.MLA, 3, 1, 3, "uint8", ("o0", "o1"))
    layout = KVLayout((odd, replace(LLAMA8B, layers=("x",))))
    segs = layout.segments(0, 5)
    assert all(s.offset % SEGMENT_ALIGN == 0 for s in segs)
    assert [s.offset for s in segs] == [0, 16, 32, 32 + 5 * 8 * 256]
    assert all(a.offset + a.nbytes <= b.offset for a, b in zip(segs, segs[1:]))
    assert layout.packed_nbytes(0, 5) == 32 + 2 * 5 * 8 * 256


def test_head_maps_shrink_or_widen_rows() -> None:
    layout = KVLayout((LLAMA8B,))
    quarter = layout.packed_nbytes(0, 10, [HeadMap(2, 2)])
    assert quarter * 4 == layout.packed_nbytes(0, 10)
    wide = layout.packed_nbytes(0, 10, [HeadMap(0, 2, buf_start=4, buf_width=8)])
    assert wide == layout.packed_nbytes(0, 10)
    with pytest.raises(LayoutError):
        layout.packed_nbytes(0, 10, [HeadMap(7, 2)])
    with pytest.raises(ValueError):
        HeadMap(0, 3, buf_start=1, buf_width=3)


def test_empty_ranges() -> None:
    layout = KVLayout((LLAMA8B, LayerGroup("c", CacheKind.MLA, 4, 1, 8, "uint8", ("c0",), compress_ratio=8)))
    assert layout.packed_nbytes(7, 7) == 0
    assert [s.group for s in layout.segments(1, 7)] == [0] * 64  # no compressed entry completes
    with pytest.raises(LayoutError):
        layout.segments(5, 4)


def test_validation() -> None:
    with pytest.raises(LayoutError, match="num_kv_heads must be 1"):
        LayerGroup("m", CacheKind.MLA, 16, 2, 576, "bfloat16", ("a",))
    with pytest.raises(LayoutError, match="block_size"):
        LayerGroup("m", CacheKind.MLA, 0, 1, 576, "bfloat16", ("a",))
    with pytest.raises(LayoutError, match="unsupported dtype"):
        LayerGroup("m", CacheKind.MLA, 16, 1, 576, "complex64", ("a",))
    with pytest.raises(LayoutError, match="two groups"):
        KVLayout((LLAMA8B, replace(LLAMA8B, name="other")))
    with pytest.raises(LayoutError, match="duplicate group"):
        KVLayout((LLAMA8B, replace(LLAMA8B, layers=("z",))))
    with pytest.raises(LayoutError, match="at least one"):
        KVLayout(())
    with pytest.raises(LayoutError, match="page table"):
        KVLayout((LLAMA8B,)).locate(40, [[1, 2]])


def test_dtype_names() -> None:
    import torch

    for t in (torch.bfloat16, torch.float16, torch.float8_e4m3fn, torch.uint8, torch.float32):
        name = dtype_name(t)
        assert DTYPE_ITEMSIZE[name] == torch.empty(0, dtype=t).element_size()
    assert dtype_name("torch.half") == "float16"
    assert dtype_name(np.dtype("float16")) == "float16"


def test_wire_form_round_trips_and_checks_version() -> None:
    layout = KVLayout((LLAMA8B, LayerGroup("c", CacheKind.MLA, 4, 1, 8, "uint8", ("c0",), compress_ratio=4)))
    assert KVLayout.from_dict(layout.to_dict()) == layout
    with pytest.raises(LayoutError, match="format"):
        KVLayout.from_dict({**layout.to_dict(), "format": 99})


def test_compatibility() -> None:
    a = KVLayout((LLAMA8B,))
    other = replace(LLAMA8B, kind=CacheKind.KV_SPLIT, block_size=32, num_kv_heads=2)
    assert a.compatibility_problems(KVLayout((other,))) == []
    b = KVLayout((replace(LLAMA8B, head_dim=64, dtype="float16"),))
    problems = a.compatibility_problems(b)
    assert len(problems) == 2 and "head_dim" in problems[0] and "dtype" in problems[1]
    with pytest.raises(LayoutError, match="not transfer-compatible"):
        a.check_compatible(KVLayout((replace(LLAMA8B, layers=("x",)),)))


def test_cache_shapes() -> None:
    g = replace(LLAMA8B, layers=("x",))
    assert g.cache_shape(100) == (2, 100, 16, 8, 128)
    assert replace(g, kind=CacheKind.KV_JOINT_HND).cache_shape(100) == (2, 100, 8, 16, 128)
    assert replace(g, kind=CacheKind.KV_BLOCK_JOINT_NHD).cache_shape(100) == (100, 2, 16, 8, 128)
    assert g.blocks_for(33) == 3 and g.blocks_for(32) == 2 and g.blocks_for(0) == 0
