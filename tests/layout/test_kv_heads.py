"""Tensor-parallel head ranges: every decode head comes from exactly one prefill rank."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from pdxfer.layout.heads import HeadMap, tp_head_maps, tp_heads, tp_sources

POW2 = st.sampled_from([1, 2, 4, 8, 16])


def test_tp_heads_like_vllm() -> None:
    assert [tp_heads(8, 4, r) for r in range(4)] == [(0, 2), (2, 2), (4, 2), (6, 2)]
    assert [tp_heads(2, 8, r) for r in range(8)] == [(0, 1)] * 4 + [(1, 1)] * 4  # replicated
    with pytest.raises(ValueError):
        tp_heads(6, 4, 0)
    with pytest.raises(ValueError):
        tp_heads(8, 4, 4)


def test_maps_for_narrower_and_wider_decode() -> None:
    # P TP=2 (4 heads each) -> D TP=4 (2 heads each): P rank 0 sends heads 2-3 to D rank 1.
    assert tp_head_maps(8, 2, 0, 4, 1) == (HeadMap(2, 2), HeadMap(0, 2))
    # ... or sends all 4 and D rank 1 takes rows 2-3 of the 4-head rows.
    assert tp_head_maps(8, 2, 0, 4, 1, wide=True) == (HeadMap(0, 4), HeadMap(0, 2, 2, 4))
    # P TP=4 -> D TP=2: D rank 0 receives P rank 1's 2 heads into its heads 2-3.
    assert tp_head_maps(8, 4, 1, 2, 0) == (HeadMap(0, 2), HeadMap(2, 2))
    assert tp_head_maps(8, 4, 3, 2, 0) is None


@given(heads=st.sampled_from([1, 2, 4, 8]), p_tp=POW2, d_tp=POW2, wide=st.booleans())
def test_sources_cover_each_decode_head_once(heads: int, p_tp: int, d_tp: int, wide: bool) -> None:
    for d_rank in range(d_tp):
        d0, dn = tp_heads(heads, d_tp, d_rank)
        got: list[int] = []
        for src, smap, dmap in tp_sources(heads, p_tp, d_tp, d_rank, wide=wide):
            s0, sn = tp_heads(heads, p_tp, src)
            assert smap.cache_start + smap.count <= sn and smap.buf_start == 0
            assert dmap.width == smap.count  # the rows D reads are the rows P wrote
            # global heads P sends, in row order, and where D puts them
            sent = [s0 + smap.cache_start + i for i in range(smap.count)]
            for i in range(dmap.count):
                global_head = sent[dmap.buf_start + i]
                assert global_head == d0 + dmap.cache_start + i
                got.append(global_head)
        assert sorted(got) == list(range(d0, d0 + dn))


def test_replicated_heads_spread_over_holders() -> None:
    # 1 KV head, P TP=4 (all replicas), D TP=2: the two D ranks read different P ranks.
    srcs = [tp_sources(1, 4, 2, d)[0][0] for d in range(2)]
    assert len(set(srcs)) == 2
