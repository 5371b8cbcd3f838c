"""MemoryBudget: bounded waits, the cap on chunks of ungranted transfers, and its wake-ups."""

from __future__ import annotations

import threading

import pytest

from pdxfer.errors import Backpressure
from pdxfer.sendq.budget import MemoryBudget


def test_ungranted_chunks_fill_half_then_wait_for_the_grant():
    b = MemoryBudget(1000)
    granted = threading.Event()
    b.acquire(500, 0, granted=granted)
    assert not b.fits(1, granted) and b.fits(500)  # a granted (or unnamed) put still has the rest
    with pytest.raises(Backpressure, match="not granted this transfer yet") as info:
        b.acquire(1, 0, transfer_id="t1", granted=granted)
    assert info.value.waiting_for == "grant" and b.used == 500
    granted.set()
    assert b.fits(500, granted)
    b.acquire(500, 0, granted=granted)
    with pytest.raises(Backpressure, match="send budget full") as info:
        b.acquire(1, 0, granted=granted)
    assert info.value.waiting_for == "send_budget"


def test_grant_wakes_a_put_held_at_half_the_budget():
    """The waiter holds nothing and nobody releases bytes: only the GRANT's poke can
    wake it before its 60 s deadline."""
    b = MemoryBudget(1000)
    granted = threading.Event()
    done = threading.Event()

    def put() -> None:
        b.acquire(800, 60, granted=granted)  # more than half: must wait for the GRANT
        done.set()

    t = threading.Thread(target=put, daemon=True)
    t.start()
    assert not done.wait(0.2) and b.used == 0
    granted.set()
    b.poke()
    assert done.wait(10), "the poke at GRANT did not wake the waiting put"
    t.join(10)
    assert b.used == 800


def test_with_a_spill_hook_ungranted_chunks_are_not_capped():
    """A spill tier moves ungranted chunks out under pressure, so they need no cap."""
    b = MemoryBudget(1000)
    b.spill_hook = lambda needed: 0  # nothing to move out yet
    granted = threading.Event()
    b.acquire(900, 0, granted=granted)
    assert b.limit(granted) == 1000
    with pytest.raises(Backpressure) as info:
        b.acquire(200, 0, granted=granted)
    assert info.value.waiting_for == "send_budget"


def test_a_chunk_larger_than_the_budget_is_refused_by_name():
    with pytest.raises(ValueError, match="transfer t9"):
        MemoryBudget(1000).acquire(1001, 1, transfer_id="t9")
