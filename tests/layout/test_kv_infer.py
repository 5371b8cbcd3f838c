"""Layouts inferred from engine cache tensors, as vLLM's register_kv_caches hands them over."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from pdxfer.layout.kv import CacheKind, LayoutError
from pdxfer.layout.kv_infer import group_from_tensors, infer_kind, layout_from_vllm


def _t(*shape: int, dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
    return torch.empty(shape, dtype=dtype)


def test_infer_kinds() -> None:
    assert infer_kind(_t(2, 10, 16, 8, 128), 16) is CacheKind.KV_JOINT_NHD
    assert infer_kind(_t(2, 10, 8, 16, 128), 16) is CacheKind.KV_JOINT_HND
    assert infer_kind(_t(10, 2, 16, 8, 128), 16) is CacheKind.KV_BLOCK_JOINT_NHD
    assert infer_kind((_t(10, 16, 8, 128), _t(10, 16, 8, 128)), 16) is CacheKind.KV_SPLIT
    assert infer_kind(_t(10, 64, 576), 64) is CacheKind.MLA
    with pytest.raises(LayoutError, match="cannot tell"):
        infer_kind(_t(10, 32, 576), 64)


def test_group_geometry() -> None:
    g = group_from_tensors("g", {"a": _t(2, 10, 8, 16, 64, dtype=torch.float16)}, 16)
    assert (g.kind, g.block_size, g.num_kv_heads, g.head_dim, g.dtype) == (CacheKind.KV_JOINT_HND, 16, 8, 64, "float16")
    # explicit kind resolves the heads == block_size ambiguity
    g = group_from_tensors("g", {"a": _t(2, 10, 16, 16, 64)}, 16, kind=CacheKind.KV_JOINT_HND)
    assert g.kind is CacheKind.KV_JOINT_HND
    with pytest.raises(LayoutError, match="differs"):
        group_from_tensors("g", {"a": _t(2, 10, 16, 8, 64), "b": _t(2, 10, 16, 4, 64)}, 16)
    with pytest.raises(LayoutError, match="differ"):
        group_from_tensors("g", {"a": (_t(10, 16, 8, 64), _t(10, 16, 8, 32))}, 16)


def test_from_vllm_config_heterogeneous() -> None:
    """A DeepSeek-V3.2-like model: MLA attention (block 64) + fp8 indexer cache (block 64)."""
    kv = {f"model.layers.{i}.self_attn.attn": _t(20, 64, 576) for i in range(3)}
    kv |= {f"model.layers.{i}.indexer.k_cache": _t(20, 64, 132, dtype=torch.uint8) for i in range(3)}
    config = SimpleNamespace(kv_cache_groups=[
        SimpleNamespace(layer_names=[n for n in kv if "attn" in n], kv_cache_spec=SimpleNamespace(block_size=64)),
        SimpleNamespace(layer_names=[n for n in kv if "indexer" in n], kv_cache_spec=SimpleNamespace(block_size=64)),
    ])
    layout = layout_from_vllm(kv, config)
    assert [g.kind for g in layout.groups] == [CacheKind.MLA, CacheKind.MLA]
    assert [(g.head_dim, g.dtype) for g in layout.groups] == [(576, "bfloat16"), (132, "uint8")]
    assert layout.packed_nbytes(0, 64) == 3 * 64 * 1152 + 3 * 64 * 132


def test_shared_kv_layers_are_sent_once() -> None:
    base = _t(2, 10, 16, 8, 64)
    kv = {"l0": base, "l1": _t(2, 10, 16, 8, 64), "l2": base}  # l2 reuses l0's cache
    layout = layout_from_vllm(kv, groups=[(["l0", "l1", "l2", "missing"], 16)])
    assert layout.groups[0].layers == ("l0", "l1")
    with pytest.raises(LayoutError, match="no cache tensor of its own"):
        layout_from_vllm(kv, groups=[(["l0"], 16), (["l2"], 16)])
    with pytest.raises(LayoutError, match="kv_cache_config or explicit groups"):
        layout_from_vllm(kv)
