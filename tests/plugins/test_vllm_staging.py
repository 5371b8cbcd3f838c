"""The NIXL prefill's staging pool: pieces of one registered buffer, bounded, given back."""

from __future__ import annotations

import threading

import pytest

torch = pytest.importorskip("torch")

from pdxfer.plugins.vllm.staging import ALIGNMENT, StagingPool  # noqa: E402


def test_pieces_are_disjoint_views_of_the_one_buffer_and_come_back():
    pool = StagingPool(8 * ALIGNMENT)
    a, b = pool.take(3 * ALIGNMENT), pool.take(ALIGNMENT + 1)
    assert a is not None and b is not None and a.numel() == 3 * ALIGNMENT and b.numel() == ALIGNMENT + 1
    a.fill_(1), b.fill_(2)
    assert int(pool.buffer[:3 * ALIGNMENT].sum()) == 3 * ALIGNMENT  # a wrote into the pool itself
    assert pool.owns(a) and not pool.owns(torch.empty(4, dtype=torch.uint8))
    assert pool.used == 5 * ALIGNMENT  # aligned: b takes two units
    assert pool.take(4 * ALIGNMENT) is None  # 3 units left, no wait asked for
    pool.give(a), pool.give(b)
    assert pool.used == 0 and pool.take(8 * ALIGNMENT) is not None


def test_a_full_pool_waits_bounded_and_wakes_on_give():
    pool = StagingPool(2 * ALIGNMENT)
    held = pool.take(2 * ALIGNMENT)
    assert held is not None
    got: list = []
    t = threading.Thread(target=lambda: got.append(pool.take(ALIGNMENT, timeout=30)))
    t.start()
    t.join(0.2)
    assert t.is_alive()  # waiting for room
    pool.give(held)
    t.join(10)
    assert not t.is_alive() and got[0] is not None


def test_bad_use_is_named():
    pool = StagingPool(2 * ALIGNMENT)
    with pytest.raises(ValueError, match="can never fit the .* send staging pool"):
        pool.take(4 * ALIGNMENT)
    with pytest.raises(ValueError, match="not a piece of the staging pool"):
        pool.give(torch.empty(ALIGNMENT, dtype=torch.uint8))
