"""What a KV transfer looks like: payload chunking and paged KV-cache layouts."""

from pdxfer.layout.heads import HeadMap, tp_head_maps, tp_heads, tp_sources
from pdxfer.layout.kv import FORMAT_VERSION, SEGMENT_ALIGN, CacheKind, KVLayout, LayerGroup, LayoutError, Segment
from pdxfer.layout.kv_infer import layout_from_vllm
from pdxfer.layout.payload import Payload

__all__ = [
    "Payload", "FORMAT_VERSION", "SEGMENT_ALIGN", "CacheKind", "KVLayout", "LayerGroup", "LayoutError", "Segment",
    "HeadMap", "tp_heads", "tp_head_maps", "tp_sources", "layout_from_vllm",
]
