"""Index planning shared by the torch reference and the CUDA kernels.

`group_ranges` turns (token range, page tables) into the physical blocks each group
touches, validated: an out-of-range block id would make a kernel read or write foreign
memory, so it is refused here. `build_launch` turns that into the flat descriptor table
the kernels in csrc/kv_pack.cu read (one 16-field int64 row per (group, layer, plane)
segment). It is plain numpy over raw addresses, so it is tested on CPU by running the
kernel source compiled for the host (tests/pack/test_pack_host_kernel.py).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np

from pdxfer.layout.kv import SEGMENT_ALIGN, HeadSelection, KVLayout, LayoutError

# Field order of `struct PdxSeg` in csrc/kv_pack.cu; keep the two in step.
SEG_FIELDS = (
    "cache_base", "buf_offset", "stride_block", "stride_slot", "stride_head", "table_offset",
    "first_slot", "block_size", "n_entries", "n_heads", "cache_head_start", "buf_heads",
    "buf_head_start", "row_bytes", "vec", "pad_bytes",
)  # fmt: skip
F = {name: i for i, name in enumerate(SEG_FIELDS)}
MAX_SEGMENTS = 65535  # gridDim.y
THREADS = 256
TARGET_BLOCKS = 4096  # enough CTAs to fill any current GPU, few enough to keep rows long


@dataclass(frozen=True)
class GroupRange:
    """The entries [e0, e1) of one group and the physical blocks that hold them."""

    e0: int
    e1: int
    blocks: np.ndarray  # physical ids of logical blocks e0 // bs .. (e1 - 1) // bs
    first_slot: int  # e0 % block_size

    def slots(self, block_size: int) -> tuple[np.ndarray, np.ndarray]:
        """(block id, offset in block) of every entry, in order."""
        j = self.first_slot + np.arange(self.e1 - self.e0, dtype=np.int64)
        return self.blocks[j // block_size], j % block_size


def _as_table(t: object) -> np.ndarray:
    if hasattr(t, "detach"):  # torch tensor, possibly on a GPU
        t = t.detach().cpu().numpy()  # type: ignore[attr-defined]
    return np.asarray(t, dtype=np.int64).reshape(-1)


def group_ranges(
    layout: KVLayout,
    page_tables: Sequence[object],
    t0: int,
    t1: int,
    num_blocks: Sequence[int],
    *,
    writing: bool,
) -> list[GroupRange | None]:
    """Validated block ranges per group (None for groups with no entry in [t0, t1)).

    `writing` also refuses a block listed twice: two entries scattered into one slot
    would race in the kernel and silently keep one of them.
    """
    if len(page_tables) != len(layout.groups):
        raise LayoutError(f"need one page table per group ({len(layout.groups)}), got {len(page_tables)}")
    out: list[GroupRange | None] = []
    for g, table, nb in zip(layout.groups, page_tables, num_blocks):
        e0, e1 = g.entry_range(t0, t1)
        if e1 == e0:
            out.append(None)
            continue
        ids = _as_table(table)
        first, last = e0 // g.block_size, (e1 - 1) // g.block_size
        if ids.shape[0] <= last:
            raise LayoutError(
                f"group {g.name!r}: page table has {ids.shape[0]} blocks, tokens [{t0}, {t1}) need {last + 1}"
            )
        blocks = ids[first : last + 1]
        if blocks.min() < 0 or blocks.max() >= nb:
            raise LayoutError(f"group {g.name!r}: block id outside the cache's {nb} blocks in {blocks.tolist()}")
        if writing and np.unique(blocks).shape[0] != blocks.shape[0]:
            raise LayoutError(f"group {g.name!r}: a block appears twice in {blocks.tolist()}")
        out.append(GroupRange(e0, e1, blocks, e0 % g.block_size))
    return out


@dataclass(frozen=True)
class PlaneGeometry:
    """Address and byte strides of one plane view [blocks, block_size, heads, dim]."""

    base: int
    stride_block: int
    stride_slot: int
    stride_head: int

    @classmethod
    def of(cls, plane: Any) -> "PlaneGeometry":
        """From a torch plane view (duck-typed: data_ptr, stride, element_size)."""
        size = plane.element_size()
        sb, ss, sh, _ = plane.stride()
        return cls(plane.data_ptr(), sb * size, ss * size, sh * size)


def geometry_of(planes: Sequence[Sequence[Sequence[Any]]]) -> list[list[list[PlaneGeometry]]]:
    """PlaneGeometry of every plane of BoundCaches.planes (computed once per binding)."""
    return [[[PlaneGeometry.of(p) for p in layer] for layer in group] for group in planes]


@dataclass(frozen=True)
class LaunchPlan:
    """Everything one kernel launch needs, as host arrays."""

    segs: np.ndarray  # int64 [n, len(SEG_FIELDS)]
    tables: np.ndarray  # int32 block ids of all groups, concatenated
    nbytes: int  # packed bytes of the range
    grid: tuple[int, int, int]
    block: tuple[int, int, int]

    def blob(self) -> np.ndarray:
        """Descriptors then block table in one byte array: one host-to-device copy."""
        return np.concatenate([self.segs.reshape(-1).view(np.uint8), self.tables.view(np.uint8)])

    @property
    def tables_offset(self) -> int:
        return self.segs.nbytes


def _vec_width(*values: int) -> int:
    """Widest access (16, 8, 4, 2 or 1 bytes) that every address and stride allows."""
    acc = 0
    for v in values:
        acc |= v
    for width in (16, 8, 4, 2):
        if acc % width == 0:
            return width
    return 1


def build_launch(
    layout: KVLayout,
    geometry: Sequence[Sequence[Sequence[PlaneGeometry]]],
    ranges: Sequence[GroupRange | None],
    buf_ptr: int,
    t0: int,
    t1: int,
    heads: HeadSelection = None,
) -> LaunchPlan:
    """Descriptor rows for every non-empty segment of [t0, t1) (see csrc/kv_pack.cu)."""
    segments = layout.segments(t0, t1, heads)
    if len(segments) > MAX_SEGMENTS:
        raise LayoutError(f"{len(segments)} segments exceed one launch's {MAX_SEGMENTS}")
    table_parts: list[np.ndarray] = []
    table_offset: dict[int, int] = {}
    pos = 0
    for gi, r in enumerate(ranges):
        if r is not None:
            if r.blocks.max(initial=0) > np.iinfo(np.int32).max:
                raise LayoutError("block ids must fit in int32")
            table_offset[gi] = pos
            table_parts.append(r.blocks.astype(np.int32))
            pos += r.blocks.shape[0]
    tables = np.concatenate(table_parts) if table_parts else np.zeros(1, np.int32)
    segs = np.zeros((len(segments), len(SEG_FIELDS)), dtype=np.int64)
    max_vecs = 1
    for row, s in zip(segs, segments):
        g, r, hm = layout.groups[s.group], ranges[s.group], s.heads
        assert r is not None
        geo = geometry[s.group][s.layer][s.plane]
        stride_head = geo.stride_head if g.num_kv_heads > 1 else 0
        n = r.e1 - r.e0
        vec = _vec_width(geo.base, geo.stride_block, geo.stride_slot, stride_head, buf_ptr + s.offset, g.row_bytes)
        vecs = n * hm.count * (g.row_bytes // vec)
        if vecs >= 2**31:
            raise LayoutError(f"segment of {s.nbytes} bytes is too large for one launch; pack fewer tokens")
        max_vecs = max(max_vecs, vecs)
        row[F["cache_base"]] = geo.base
        row[F["buf_offset"]] = s.offset
        row[F["stride_block"]] = geo.stride_block
        row[F["stride_slot"]] = geo.stride_slot
        row[F["stride_head"]] = stride_head
        row[F["table_offset"]] = table_offset[s.group]
        row[F["first_slot"]] = r.first_slot
        row[F["block_size"]] = g.block_size
        row[F["n_entries"]] = n
        row[F["n_heads"]] = hm.count
        row[F["cache_head_start"]] = hm.cache_start
        row[F["buf_heads"]] = hm.width
        row[F["buf_head_start"]] = hm.buf_start
        row[F["row_bytes"]] = g.row_bytes
        row[F["vec"]] = vec
        row[F["pad_bytes"]] = -s.nbytes % SEGMENT_ALIGN
    last = segments[-1] if segments else None
    nbytes = last.offset + last.nbytes + (-last.nbytes % SEGMENT_ALIGN) if last else 0
    gx = max(1, min(-(-max_vecs // THREADS), -(-TARGET_BLOCKS // max(1, len(segments)))))
    return LaunchPlan(segs, tables, nbytes, (gx, max(1, len(segments)), 1), (THREADS, 1, 1))
