"""`group_writes`: which queued WRITEs share a NIXL request (pure, no agent needed)."""

from __future__ import annotations

import asyncio

from pdxfer.transport.nixl_batch import WritePost, group_writes

DRAM, VRAM = ("DRAM", 0), ("VRAM", 0)


def _post(loop, remote="r", nbytes=1 << 20, local_mem=DRAM, remote_mem=DRAM, tag=0) -> WritePost:
    return WritePost(loop, lambda s, e: None, tag, "t", 0, nbytes, remote, b"%d" % tag, local_mem, remote_mem)


def _tags(groups):
    return [[p.local for p in g] for g in groups]


def test_alike_neighbours_share_a_request_up_to_the_count_and_byte_caps():
    loop = asyncio.new_event_loop()
    try:
        posts = [_post(loop, tag=i) for i in range(7)]
        assert _tags(group_writes(posts, 3, 64 << 20)) == [[0, 1, 2], [3, 4, 5], [6]]
        assert _tags(group_writes(posts, 8, 2 << 20)) == [[0, 1], [2, 3], [4, 5], [6]]
        big = [_post(loop, nbytes=16 << 20, tag=9), _post(loop, tag=10)]
        assert _tags(group_writes(big, 8, 8 << 20)) == [[9], [10]]  # larger than the cap: alone, still sent
        assert group_writes([], 8, 8 << 20) == []
    finally:
        loop.close()


def test_a_change_of_peer_memory_kind_or_loop_starts_a_new_request_and_order_is_kept():
    a, b = asyncio.new_event_loop(), asyncio.new_event_loop()
    try:
        posts = [_post(a, tag=0), _post(a, tag=1), _post(a, remote="other", tag=2), _post(a, remote="other", tag=3),
                 _post(a, remote="other", local_mem=VRAM, tag=4), _post(a, remote="other", remote_mem=VRAM, tag=5),
                 _post(b, remote="other", tag=6), _post(a, tag=7)]
        assert _tags(group_writes(posts, 8, 64 << 20)) == [[0, 1], [2, 3], [4], [5], [6], [7]]
    finally:
        a.close()
        b.close()
