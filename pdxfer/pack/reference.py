"""Torch reference for pack / unpack: runs on any device, and defines the right answer.

The CUDA kernels are tested against this byte for byte. It works on uint8 views of
the caches (a head's row of `head_dim * itemsize` bytes), so no value is ever read as a
float: NaN payloads, fp8 and bf16 bit patterns all survive unchanged.
"""

from __future__ import annotations

from typing import Sequence

import torch

from pdxfer.layout.kv import SEGMENT_ALIGN, HeadSelection, LayoutError
from pdxfer.pack.plan import GroupRange, group_ranges
from pdxfer.pack.views import BoundCaches


def check_buffer(buf: torch.Tensor, nbytes: int, device: torch.device, what: str) -> None:
    """A packed buffer must be flat, contiguous uint8 on the caches' device, and big enough."""
    if buf.dtype != torch.uint8 or buf.dim() != 1 or not buf.is_contiguous():
        raise LayoutError(f"{what} buffer must be a contiguous 1-d uint8 tensor, got {buf.dtype} {tuple(buf.shape)}")
    if buf.device != device:
        raise LayoutError(f"{what} buffer is on {buf.device}, the caches on {device}")
    if buf.numel() < nbytes:
        raise LayoutError(f"{what} buffer holds {buf.numel()} bytes, the token range needs {nbytes}")


_WIDE = ((torch.int64, 8), (torch.int32, 4), (torch.int16, 2))


def _widen(a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The same rows of two uint8 tensors as the widest integer both allow.

    Torch's CPU gather costs per element, so 8-byte elements move rows ~8x faster than
    bytes. Bits are untouched: integers are never reinterpreted as floats.
    """
    for dtype, width in _WIDE:
        if a.shape[-1] % width == 0:
            try:
                return a.view(dtype), b.view(dtype)
            except RuntimeError:  # an offset or stride not divisible by `width`
                continue
    return a, b


def _slot_rows(plane: torch.Tensor) -> torch.Tensor | None:
    """[blocks * block_size, heads * row] view of a [blocks, block_size, heads, row] plane, if
    its blocks, slots and heads are laid out back to back (NHD, split, FlashInfer)."""
    nb, bs, h, row = plane.shape
    sb, ss, sh, _ = plane.stride()
    if bs == 1:  # the stride of a size-1 dim is arbitrary; a slot is then a block
        ss = sb
    if (sb != bs * ss and nb > 1) or (sh != row and h > 1):
        return None
    return plane.as_strided((nb * bs, h * row), (ss, 1), plane.storage_offset())


Index = tuple[torch.Tensor, torch.Tensor, torch.Tensor]  # block ids, offsets, block * block_size + offset


def _indices(bound: BoundCaches, ranges: list[GroupRange | None]) -> list[Index | None]:
    out: list[Index | None] = []
    for g, r in zip(bound.layout.groups, ranges):
        if r is None:
            out.append(None)
            continue
        blk, slot = r.slots(g.block_size)
        flat = blk * g.block_size + slot
        out.append(tuple(torch.from_numpy(a).to(bound.device) for a in (blk, slot, flat)))  # type: ignore[arg-type]
    return out


def _ranges(
    bound: BoundCaches, page_tables: Sequence[object], t0: int, t1: int, writing: bool
) -> list[GroupRange | None]:
    counts = [bound.num_blocks(i) for i in range(len(bound.layout.groups))]
    return group_ranges(bound.layout, page_tables, t0, t1, counts, writing=writing)


def pack_reference(
    bound: BoundCaches,
    page_tables: Sequence[object],
    t0: int,
    t1: int,
    *,
    out: torch.Tensor | None = None,
    heads: HeadSelection = None,
) -> torch.Tensor:
    """Gather tokens [t0, t1) of every layer into the packed format; returns the bytes.

    Rows wider than the heads packed (HeadMap.buf_width) keep their other heads as they
    were in `out`, so several packs can fill one buffer.
    """
    layout = bound.layout
    nbytes = layout.packed_nbytes(t0, t1, heads)
    if out is None:
        out = torch.empty(nbytes, dtype=torch.uint8, device=bound.device)
    check_buffer(out, nbytes, bound.device, "pack output")
    index = _indices(bound, _ranges(bound, page_tables, t0, t1, writing=False))
    for s in layout.segments(t0, t1, heads):
        g, hm, idx = layout.groups[s.group], s.heads, index[s.group]
        assert idx is not None
        plane, rows = _widen(
            bound.planes[s.group][s.layer][s.plane].view(torch.uint8)[:, :, hm.cache_start : hm.cache_start + hm.count],
            out[s.offset : s.offset + s.nbytes].view(-1, hm.width, g.row_bytes),
        )
        dst = rows[:, hm.buf_start : hm.buf_start + hm.count]
        flat = _slot_rows(plane)
        if flat is not None and hm.width == hm.count:  # gather straight into the buffer
            torch.index_select(flat, 0, idx[2], out=rows.view(rows.shape[0], -1))
        elif flat is not None:
            dst.copy_(flat.index_select(0, idx[2]).view(dst.shape))
        else:
            dst.copy_(plane[idx[0], idx[1]])
        out[s.offset + s.nbytes : s.offset + s.nbytes + (-s.nbytes % SEGMENT_ALIGN)] = 0
    return out[:nbytes]


def unpack_reference(
    bound: BoundCaches,
    page_tables: Sequence[object],
    t0: int,
    t1: int,
    buf: torch.Tensor,
    *,
    heads: HeadSelection = None,
) -> None:
    """Scatter a packed buffer of tokens [t0, t1) into the caches, in place."""
    layout = bound.layout
    check_buffer(buf, layout.packed_nbytes(t0, t1, heads), bound.device, "unpack input")
    index = _indices(bound, _ranges(bound, page_tables, t0, t1, writing=True))
    for s in layout.segments(t0, t1, heads):
        g, hm, idx = layout.groups[s.group], s.heads, index[s.group]
        assert idx is not None
        plane, rows = _widen(
            bound.planes[s.group][s.layer][s.plane].view(torch.uint8)[:, :, hm.cache_start : hm.cache_start + hm.count],
            buf[s.offset : s.offset + s.nbytes].view(-1, hm.width, g.row_bytes),
        )
        src = rows[:, hm.buf_start : hm.buf_start + hm.count]
        flat = _slot_rows(plane)
        if flat is not None:
            flat.index_copy_(0, idx[2], src.reshape(src.shape[0], -1))
        else:
            plane[idx[0], idx[1]] = src
