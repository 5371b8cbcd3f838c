"""The send queue's memory budget, shared by engine threads and the event loop.

Engine threads acquire bytes when they hand a chunk over; the loop releases them once
the chunk is on the wire (or its transfer failed). A full budget is backpressure: the
engine waits with a deadline, first giving the spill hook a chance to free room (the
spill tiers plug in there), and then gets a typed `Backpressure` error, never an
unbounded wait and never unbounded growth.
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

    def acquire(self, nbytes: int, timeout: float, *, transfer_id: str | None = None) -> None:
        if nbytes > self.capacity:
            raise ValueError(
                f"chunk of {nbytes} bytes can never fit the send budget of {self.capacity} bytes"
                + (f" (transfer {transfer_id})" if transfer_id else "")
            )
        deadline = time.monotonic() + timeout
        with self._cond:
            while self._used + nbytes > self.capacity:
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
                    raise Backpressure(
                        f"send budget full ({self._used}/{self.capacity} bytes) for {timeout:.3f}s",
                        transfer_id=transfer_id, waiting_for="send_budget",
                    )
                self._cond.wait(remaining)
            self._used += nbytes
            self.peak = max(self.peak, self._used)

    def poke(self) -> None:
        """Wake waiting acquirers without releasing bytes: spill-tier room came back, so
        the spill hook may now free budget that it could not before."""
        with self._cond:
            self._cond.notify_all()

    def release(self, nbytes: int) -> None:
        with self._cond:
            if nbytes > self._used:
                raise AssertionError(f"budget release of {nbytes} bytes but only {self._used} in use")
            self._used -= nbytes
            self._cond.notify_all()
