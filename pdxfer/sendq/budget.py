"""The send queue's memory budget, shared by engine threads and the event loop.

Engine threads acquire bytes when they hand a chunk over; the loop releases them once
the chunk is on the wire (or its transfer failed). A full budget is backpressure: the
engine waits with a deadline, first giving the spill hook a chance to free room (the
spill tiers plug in there), and then gets a typed `Backpressure` error, never an
unbounded wait and never unbounded growth.

Chunks of a transfer the receiver has not granted yet may fill the budget to half its
capacity at most (unless a spill hook can move them out). Without that cap, puts for
transfers queued at a full receiver could take the whole budget, and the granted
transfer whose completion is what makes room at the receiver could then not put its
next chunk: both wait until their deadlines, and both fail. With it, granted transfers
always find at least half the budget, and a queued transfer's put waits (with its
deadline) until either bytes come back or its GRANT arrives (`poke`).
"""

from __future__ import annotations

import threading
import time
from typing import Callable

from pdxfer.errors import Backpressure

SpillHook = Callable[[int], int]  # (bytes needed) -> bytes on their way back (see acquire)

# The spill hook copies chunks out and hands each copy to the event loop, which swaps it
# in and releases the original's budget a callback later. A caller whose timeout is 0
# (vLLM's engine thread, which must not wait on the network) still waits that long:
# local work, not the network. Bounded all the same.
ADOPT_WAIT_S = 2.0


class MemoryBudget:
    def __init__(self, capacity: int) -> None:
        if capacity <= 0:
            raise ValueError(f"memory budget must be > 0 bytes, got {capacity}")
        self.capacity = capacity
        self._used = 0
        self.peak = 0
        self._cond = threading.Condition()
        self.spill_hook: SpillHook | None = None

    @property
    def used(self) -> int:
        return self._used

    def limit(self, granted: threading.Event | None = None) -> int:
        """The most bytes in use a put may bring the budget to: `capacity`, or half of it
        for a transfer whose `granted` event is not set yet when no spill hook could move
        its chunks out (see the module docstring)."""
        if granted is None or self.spill_hook is not None or granted.is_set():
            return self.capacity
        return self.capacity // 2

    def fits(self, nbytes: int, granted: threading.Event | None = None) -> bool:
        """Would `acquire(nbytes)` succeed now without waiting or spilling? (A check for a
        caller that must not wait and would rather not prepare a chunk that cannot go.)"""
        return self._used + nbytes <= self.limit(granted)

    def acquire(self, nbytes: int, timeout: float, *, transfer_id: str | None = None,
                granted: threading.Event | None = None) -> None:
        """Take `nbytes`, waiting at most `timeout` (then `Backpressure`). `granted`: the
        transfer's GRANT event, for the cap on chunks of ungranted transfers."""
        if nbytes > self.capacity:
            raise ValueError(
                f"chunk of {nbytes} bytes can never fit the send budget of {self.capacity} bytes"
                + (f" (transfer {transfer_id})" if transfer_id else "")
            )
        deadline = time.monotonic() + timeout
        with self._cond:
            while self._used + nbytes > self.limit(granted):
                hook = self.spill_hook
                if hook is not None:
                    self._cond.release()
                    try:
                        freed = hook(self._used + nbytes - self.capacity)
                    finally:
                        self._cond.acquire()
                    if freed > 0:
                        wait = max(deadline - time.monotonic(), ADOPT_WAIT_S)
                        if self._cond.wait_for(lambda: self._used + nbytes <= self.capacity, wait):
                            break
                    if self._used + nbytes <= self.capacity:
                        break
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    limit = self.limit(granted)
                    if limit < self.capacity:
                        raise Backpressure(
                            f"send budget over half full ({self._used}/{self.capacity} bytes) for {timeout:.3f}s "
                            f"and the receiver has not granted this transfer yet: until its GRANT, its chunks may "
                            f"use {limit} bytes of the budget (a spill tier would take them instead)",
                            transfer_id=transfer_id, waiting_for="grant",
                        )
                    raise Backpressure(
                        f"send budget full ({self._used}/{self.capacity} bytes) for {timeout:.3f}s",
                        transfer_id=transfer_id, waiting_for="send_budget",
                    )
                self._cond.wait(remaining)
            self._used += nbytes
            self.peak = max(self.peak, self._used)

    def poke(self) -> None:
        """Wake waiting acquirers without releasing bytes: spill-tier room came back (the
        spill hook may now free budget that it could not before), or a transfer was
        granted (its chunks may now use the whole budget)."""
        with self._cond:
            self._cond.notify_all()

    def release(self, nbytes: int) -> None:
        with self._cond:
            if nbytes > self._used:
                raise AssertionError(f"budget release of {nbytes} bytes but only {self._used} in use")
            self._used -= nbytes
            self._cond.notify_all()
