"""Paged KV cache layouts, as engines keep them, and the packed wire format.

An engine keeps its KV cache in fixed-size *blocks* scattered over GPU memory, one
tensor (or a K and a V tensor) per layer. Layers that share a block size and a page
table form a *group*; heterogeneous models (attention layers with 16-token blocks next
to compressor or indexer caches with 4- or 1-entry blocks) simply have several groups.

This module is pure data: no tensors, no I/O. It answers the questions asked before any
byte moves: where a token lives (block, offset), and exactly how many bytes a token
range occupies once packed, so a receiver can reserve that much up front.

Packed buffer format (``FORMAT_VERSION`` 1), for a token range ``[t0, t1)``::

    for each group g, in layout order:
        entries [e0, e1) = g.entry_range(t0, t1)      # == tokens unless compressed
        for each layer of g, in order:
            for each plane (K then V; MLA/latent caches have one plane):
                segment = e1 - e0 rows, each row `buf_width` heads x head_dim elements
                          (row-major: entry, head, element; raw dtype bytes)
                zero padding up to the next multiple of SEGMENT_ALIGN bytes

The format is token-major and independent of block size and memory order (NHD/HND),
which is what lets the decode side re-block (scatter into its own block size) and take
its own tensor-parallel head slice (see ``pdxfer.layout.heads``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum
from typing import Any, Sequence

import numpy as np

from pdxfer.layout.heads import HeadMap

FORMAT_VERSION = 1
SEGMENT_ALIGN = 16  # bytes: keeps every segment start ready for 16-byte vector access

# torch dtype name -> bytes per element; the layout must know sizes without importing torch.
DTYPE_ITEMSIZE: dict[str, int] = {
    "float64": 8,
    "float32": 4,
    "float16": 2,
    "bfloat16": 2,
    "int32": 4,
    "int16": 2,
    "int8": 1,
    "uint8": 1,
    "float8_e4m3fn": 1,
    "float8_e4m3fnuz": 1,
    "float8_e5m2": 1,
    "float8_e5m2fnuz": 1,
}
_DTYPE_ALIASES = {"half": "float16", "float": "float32", "double": "float64", "fp8": "uint8"}


class LayoutError(ValueError):
    """A layout, cache tensor or page table does not fit what was described."""


class CacheKind(str, Enum):
    """How one layer's cache tensor is shaped (logical shape, as the engine hands it over).

    Memory order does not matter: pack reads strides, so vLLM's HND-by-stride-order
    tensors (logical NHD shape, permuted strides) are plain ``KV_JOINT_NHD``.
    """

    KV_JOINT_NHD = "kv_joint_nhd"  # [2, num_blocks, block_size, heads, head_dim] (vLLM FlashAttention)
    KV_JOINT_HND = "kv_joint_hnd"  # [2, num_blocks, heads, block_size, head_dim]
    KV_BLOCK_JOINT_NHD = "kv_block_joint_nhd"  # [num_blocks, 2, block_size, heads, head_dim] (FlashInfer)
    KV_SPLIT = "kv_split"  # (K, V), each [num_blocks, block_size, heads, head_dim]
    MLA = "mla"  # [num_blocks, block_size, head_dim]: one latent plane, no heads

    @property
    def planes(self) -> int:
        """Planes per layer: K and V, or the single latent."""
        return 1 if self is CacheKind.MLA else 2


def dtype_name(dtype: object) -> str:
    """Canonical dtype name from a torch dtype, a numpy dtype or a string."""
    name = str(dtype).removeprefix("torch.")
    name = _DTYPE_ALIASES.get(name, name)
    if name not in DTYPE_ITEMSIZE:
        raise LayoutError(f"unsupported dtype {dtype!r}; known: {sorted(DTYPE_ITEMSIZE)}")
    return name


def _align(n: int) -> int:
    return -(-n // SEGMENT_ALIGN) * SEGMENT_ALIGN


def _positive(name: str, value: int) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
        raise LayoutError(f"{name} must be a positive int, got {value!r}")


@dataclass(frozen=True)
class LayerGroup:
    """Layers sharing one block size, one page table and one cache shape.

    ``compress_ratio`` r > 1 describes caches holding one entry per r tokens (compressor
    caches): entry e covers tokens [e*r, (e+1)*r) and belongs to the chunk in which its
    last token falls, so chunks that partition a request partition its entries too.
    ``block_size`` counts entries.
    """

    name: str
    kind: CacheKind
    block_size: int
    num_kv_heads: int
    head_dim: int
    dtype: str
    layers: tuple[str, ...]
    compress_ratio: int = 1

    def __post_init__(self) -> None:
        object.__setattr__(self, "kind", CacheKind(self.kind))
        object.__setattr__(self, "dtype", dtype_name(self.dtype))
        object.__setattr__(self, "layers", tuple(self.layers))
        for attr in ("block_size", "num_kv_heads", "head_dim", "compress_ratio"):
            _positive(f"group {self.name!r} {attr}", getattr(self, attr))
        if not self.layers:
            raise LayoutError(f"group {self.name!r} has no layers")
        if len(set(self.layers)) != len(self.layers):
            raise LayoutError(f"group {self.name!r} lists a layer twice")
        if self.kind is CacheKind.MLA and self.num_kv_heads != 1:
            raise LayoutError(f"MLA group {self.name!r} has one latent plane: num_kv_heads must be 1")

    @property
    def planes(self) -> int:
        return self.kind.planes

    @property
    def itemsize(self) -> int:
        return DTYPE_ITEMSIZE[self.dtype]

    @property
    def row_bytes(self) -> int:
        """Bytes of one head of one entry: the unit the kernels copy."""
        return self.head_dim * self.itemsize

    def entry_range(self, t0: int, t1: int) -> tuple[int, int]:
        """Cache entries [e0, e1) that token range [t0, t1) is responsible for."""
        if not 0 <= t0 <= t1:
            raise LayoutError(f"bad token range [{t0}, {t1})")
        return t0 // self.compress_ratio, t1 // self.compress_ratio

    def blocks_for(self, num_tokens: int) -> int:
        """Blocks a request of `num_tokens` tokens occupies in this group."""
        return -(-(num_tokens // self.compress_ratio) // self.block_size)

    def locate(self, token: int) -> tuple[int, int]:
        """(index into the page table, offset inside that block) of `token`'s entry."""
        if token < 0:
            raise LayoutError(f"negative token index {token}")
        return divmod(token // self.compress_ratio, self.block_size)

    def slots(self, t0: int, t1: int, page_table: Sequence[int] | np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Physical (block ids, offsets) of every entry of [t0, t1), in token order."""
        e0, e1 = self.entry_range(t0, t1)
        entries = np.arange(e0, e1, dtype=np.int64)
        table = np.asarray(page_table, dtype=np.int64).reshape(-1)
        need = -(-e1 // self.block_size)
        if e1 > e0 and table.shape[0] < need:
            raise LayoutError(
                f"group {self.name!r}: page table has {table.shape[0]} blocks, tokens [{t0}, {t1}) need {need}"
            )
        return table[entries // self.block_size], entries % self.block_size

    def cache_shape(self, num_blocks: int) -> tuple[int, ...]:
        """Shape of one layer's cache tensor (of each of K and V for KV_SPLIT)."""
        b, s, h, d = num_blocks, self.block_size, self.num_kv_heads, self.head_dim
        return {
            CacheKind.KV_JOINT_NHD: (2, b, s, h, d),
            CacheKind.KV_JOINT_HND: (2, b, h, s, d),
            CacheKind.KV_BLOCK_JOINT_NHD: (b, 2, s, h, d),
            CacheKind.KV_SPLIT: (b, s, h, d),
            CacheKind.MLA: (b, s, d),
        }[self.kind]

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "kind": self.kind.value,
            "block_size": self.block_size,
            "num_kv_heads": self.num_kv_heads,
            "head_dim": self.head_dim,
            "dtype": self.dtype,
            "layers": list(self.layers),
            "compress_ratio": self.compress_ratio,
        }


@dataclass(frozen=True)
class Segment:
    """One (group, layer, plane) run of the packed buffer; see the module docstring."""

    group: int
    layer: int
    plane: int
    offset: int  # bytes from the start of the packed buffer
    nbytes: int  # data bytes, without the padding that follows
    entries: tuple[int, int]  # [e0, e1)
    heads: HeadMap  # which cache heads, and where they sit inside buffer rows


HeadSelection = Sequence["HeadMap | None"] | None


@dataclass(frozen=True)
class KVLayout:
    """The KV cache of one engine rank: its layer groups, in packing order."""

    groups: tuple[LayerGroup, ...]
    _by_layer: dict[str, tuple[int, int]] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        groups = tuple(self.groups)
        if not groups:
            raise LayoutError("a layout needs at least one layer group")
        names = [g.name for g in groups]
        if len(set(names)) != len(names):
            raise LayoutError(f"duplicate group names in {names}")
        by_layer: dict[str, tuple[int, int]] = {}
        for gi, g in enumerate(groups):
            for li, layer in enumerate(g.layers):
                if layer in by_layer:
                    raise LayoutError(f"layer {layer!r} is in two groups")
                by_layer[layer] = (gi, li)
        object.__setattr__(self, "groups", groups)
        object.__setattr__(self, "_by_layer", by_layer)

    @property
    def num_layers(self) -> int:
        return len(self._by_layer)

    def layer_index(self, layer: str) -> tuple[int, int]:
        """(group index, index inside the group) of a layer name."""
        try:
            return self._by_layer[layer]
        except KeyError:
            raise LayoutError(f"unknown layer {layer!r}") from None

    def head_maps(self, heads: HeadSelection = None) -> tuple[HeadMap, ...]:
        """One validated HeadMap per group; `None` entries mean every head."""
        if heads is None:
            heads = [None] * len(self.groups)
        if len(heads) != len(self.groups):
            raise LayoutError(f"need one head map per group ({len(self.groups)}), got {len(heads)}")
        out = []
        for g, hm in zip(self.groups, heads):
            hm = HeadMap.full(g.num_kv_heads) if hm is None else hm
            if hm.cache_start + hm.count > g.num_kv_heads:
                raise LayoutError(f"group {g.name!r}: heads {hm} outside its {g.num_kv_heads} heads")
            out.append(hm)
        return tuple(out)

    def segments(self, t0: int, t1: int, heads: HeadSelection = None) -> tuple[Segment, ...]:
        """The packed buffer of [t0, t1), segment by segment (empty ones left out)."""
        maps = self.head_maps(heads)
        segs: list[Segment] = []
        offset = 0
        for gi, (g, hm) in enumerate(zip(self.groups, maps)):
            e0, e1 = g.entry_range(t0, t1)
            if e1 == e0:
                continue
            nbytes = (e1 - e0) * hm.width * g.row_bytes
            for li in range(len(g.layers)):
                for plane in range(g.planes):
                    segs.append(Segment(gi, li, plane, offset, nbytes, (e0, e1), hm))
                    offset += _align(nbytes)
        return tuple(segs)

    def packed_nbytes(self, t0: int, t1: int, heads: HeadSelection = None) -> int:
        """Bytes the packed buffer of [t0, t1) occupies: what a receiver must reserve."""
        segs = self.segments(t0, t1, heads)
        return segs[-1].offset + _align(segs[-1].nbytes) if segs else 0

    def locate(self, token: int, page_tables: Sequence[Sequence[int] | np.ndarray]) -> tuple[tuple[int, int], ...]:
        """Physical (block id, offset) of `token` in every group (same for all its layers)."""
        self._check_tables(page_tables)
        out = []
        for g, table in zip(self.groups, page_tables):
            index, off = g.locate(token)
            if index >= len(table):
                raise LayoutError(f"group {g.name!r}: token {token} is past its {len(table)}-block page table")
            out.append((int(table[index]), off))
        return tuple(out)

    def _check_tables(self, page_tables: Sequence[object]) -> None:
        if len(page_tables) != len(self.groups):
            raise LayoutError(f"need one page table per group ({len(self.groups)}), got {len(page_tables)}")

    def compatibility_problems(self, other: "KVLayout") -> list[str]:
        """Why a buffer packed with `self` cannot be unpacked into `other` (empty: it can).

        Block size, memory order (NHD/HND/joint/split) and head count may differ: the
        packed format is independent of them. Everything that shapes a row may not.
        """
        if len(self.groups) != len(other.groups):
            return [f"{len(self.groups)} groups vs {len(other.groups)}"]
        problems = []
        for a, b in zip(self.groups, other.groups):
            for attr in ("head_dim", "dtype", "compress_ratio", "planes"):
                if getattr(a, attr) != getattr(b, attr):
                    problems.append(f"group {a.name!r}/{b.name!r}: {attr} {getattr(a, attr)} vs {getattr(b, attr)}")
            if len(a.layers) != len(b.layers):
                problems.append(f"group {a.name!r}/{b.name!r}: {len(a.layers)} layers vs {len(b.layers)}")
        return problems

    def check_compatible(self, other: "KVLayout") -> None:
        problems = self.compatibility_problems(other)
        if problems:
            raise LayoutError("layouts are not transfer-compatible: " + "; ".join(problems))

    def to_dict(self) -> dict[str, Any]:
        """Plain data for the handshake, so each side can check the other's layout."""
        return {"format": FORMAT_VERSION, "groups": [g.to_dict() for g in self.groups]}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "KVLayout":
        if data.get("format") != FORMAT_VERSION:
            raise LayoutError(f"packed format {data.get('format')!r}, this build speaks {FORMAT_VERSION}")
        return cls(tuple(LayerGroup(**{**g, "layers": tuple(g["layers"])}) for g in data["groups"]))
