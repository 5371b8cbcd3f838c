"""HashAhead: the window of hashes started ahead of the wire, and what it forgets."""

from __future__ import annotations

import concurrent.futures
import threading

import pytest

from pdxfer.protocol.checksum import chunk_checksum
from pdxfer.sendq.hashahead import HashAhead


def _views(n: int) -> list[memoryview]:
    return [memoryview(bytes([i]) * 4096) for i in range(n)]


@pytest.fixture
def pool():
    ex = concurrent.futures.ThreadPoolExecutor(1)
    yield ex
    ex.shutdown(wait=True)


def _value(got) -> int:
    return got if isinstance(got, int) else got.result(5)


def test_checksums_match_and_the_window_runs_ahead(pool):
    views = _views(6)
    h = HashAhead(pool, depth=2)
    for i, v in enumerate(views):
        upcoming = [(j, views[j]) for j in range(i + 1, len(views))]
        assert _value(h.take(i, v, upcoming)) == chunk_checksum(v)
        assert len(h) == min(2, len(upcoming))
    assert h.inline == 1  # only the first chunk had nothing ahead of it
    assert h.started == 5


def test_hashes_of_chunks_no_longer_upcoming_are_dropped(pool):
    views = _views(5)
    h = HashAhead(pool, depth=3)
    h.take(0, views[0], [(1, views[1]), (2, views[2]), (3, views[3])])
    assert len(h) == 3
    # chunks 1 and 2 were dropped (their transfer ended): the window moves past them
    assert _value(h.take(3, views[3], [(4, views[4])])) == chunk_checksum(views[3])
    assert len(h) == 1
    h.drop(4)
    assert len(h) == 0


def test_a_slow_hash_is_awaited_not_recomputed(pool):
    gate = threading.Event()
    blocker = pool.submit(gate.wait, 5)  # the hashing thread is busy
    views = _views(2)
    h = HashAhead(pool, depth=1)
    h.take(0, views[0], [(1, views[1])])
    got = h.take(1, views[1], [])
    assert isinstance(got, concurrent.futures.Future) and not got.done()
    gate.set()
    assert got.result(5) == chunk_checksum(views[1])
    assert blocker.result(5)


def test_depth_must_be_positive(pool):
    with pytest.raises(ValueError, match="depth"):
        HashAhead(pool, depth=0)


def test_the_window_is_bounded_in_bytes_but_always_holds_one(pool):
    big = [memoryview(bytes([i]) * (1 << 20)) for i in range(5)]
    h = HashAhead(pool, depth=4, max_bytes=(2 << 20) + 1)
    h.take(0, big[0], [(j, big[j]) for j in range(1, 5)])
    assert len(h) == 2  # 4 allowed by depth, 2 MiB by bytes
    tiny = HashAhead(pool, depth=4, max_bytes=1)
    tiny.take(0, big[0], [(j, big[j]) for j in range(1, 5)])
    assert len(tiny) == 1  # a chunk larger than the byte bound is still hashed ahead
