"""KV head selection for prefill and decode ranks with different tensor-parallel sizes.

With TP size p on the prefill side and d on the decode side, a rank holds a contiguous
range of the model's KV heads (or, when TP exceeds the head count, one replicated head).
A transfer therefore moves, per group, `count` heads starting at `cache_start` in the
local cache, to or from position `buf_start` of packed rows that are `buf_width` heads
wide. The same map serves pack (cache -> rows) and unpack (rows -> cache), so P can
send exactly what a D rank needs, or send its whole slice once and let each D rank
unpack its part from the wider buffer.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class HeadMap:
    """Heads moved for one layer group; see the module docstring."""

    cache_start: int
    count: int
    buf_start: int = 0
    buf_width: int | None = None  # heads per packed row; None: exactly `count`

    def __post_init__(self) -> None:
        width = self.count if self.buf_width is None else self.buf_width
        if self.cache_start < 0 or self.buf_start < 0 or self.count <= 0:
            raise ValueError(f"bad head map {self}")
        if self.buf_start + self.count > width:
            raise ValueError(f"head map {self}: heads run past the {width}-head buffer row")

    @property
    def width(self) -> int:
        """Heads per packed row."""
        return self.count if self.buf_width is None else self.buf_width

    @classmethod
    def full(cls, num_heads: int) -> "HeadMap":
        return cls(0, num_heads)


def tp_heads(total_heads: int, tp_size: int, rank: int) -> tuple[int, int]:
    """Global (first head, count) of KV heads that rank `rank` of `tp_size` holds.

    Follows vLLM: heads are split evenly; when TP exceeds the head count each head is
    replicated on tp_size // total_heads consecutive ranks.
    """
    if not 0 <= rank < tp_size:
        raise ValueError(f"rank {rank} outside TP size {tp_size}")
    if tp_size <= total_heads:
        if total_heads % tp_size:
            raise ValueError(f"{total_heads} KV heads do not split over TP {tp_size}")
        count = total_heads // tp_size
        return rank * count, count
    if tp_size % total_heads:
        raise ValueError(f"TP {tp_size} is not a multiple of {total_heads} KV heads")
    return rank * total_heads // tp_size, 1


def tp_head_maps(
    total_heads: int, src_tp: int, src_rank: int, dst_tp: int, dst_rank: int, *, wide: bool = False
) -> tuple[HeadMap, HeadMap] | None:
    """(pack map on the source rank, unpack map on the destination rank), or None.

    None when the two ranks share no head. With `wide`, the source packs all its heads
    and the destination takes its part out of the wider rows.
    """
    s0, sn = tp_heads(total_heads, src_tp, src_rank)
    d0, dn = tp_heads(total_heads, dst_tp, dst_rank)
    lo, hi = max(s0, d0), min(s0 + sn, d0 + dn)
    if lo >= hi:
        return None
    if wide:
        return HeadMap(0, sn), HeadMap(lo - d0, hi - lo, lo - s0, sn)
    return HeadMap(lo - s0, hi - lo), HeadMap(lo - d0, hi - lo)


def tp_sources(
    total_heads: int, src_tp: int, dst_tp: int, dst_rank: int, *, wide: bool = False
) -> list[tuple[int, HeadMap, HeadMap]]:
    """Which source ranks a destination rank pulls from: (src rank, src map, dst map).

    Every destination head comes from exactly one source rank. Replicated heads (source
    TP above the head count) are taken from one of their holders, spread by `dst_rank`
    so that destination ranks do not all read the same source.
    """
    by_range: dict[tuple[int, int], list[int]] = {}
    for r in range(src_tp):
        by_range.setdefault(tp_heads(total_heads, src_tp, r), []).append(r)
    out = []
    for holders in by_range.values():
        src = holders[dst_rank % len(holders)]
        maps = tp_head_maps(total_heads, src_tp, src, dst_tp, dst_rank, wide=wide)
        if maps is not None:
            out.append((src, maps[0], maps[1]))
    return out
