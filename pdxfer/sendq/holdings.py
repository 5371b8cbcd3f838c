"""Where a handed-over chunk's bytes are held: the caller's buffer (counted against the
memory budget) or a spilled copy in a tier (counted by the tier, not the budget).

Every path that ends a chunk's life (sent, transfer failed, lane closed) goes through
`release()`, so a chunk gives back exactly what it holds, once, wherever it lives; a
producer's buffer going back also fires its release notice (`releases`).
"""

from __future__ import annotations

from typing import Any

from pdxfer.sendq.budget import MemoryBudget
from pdxfer.sendq.releases import ReleaseNotices
from pdxfer.tiers.store import SpilledChunk, SpillStore


def is_spilled(buf: Any) -> bool:
    return isinstance(buf, SpilledChunk)


class Holdings:
    def __init__(self, budget: MemoryBudget, store: SpillStore | None = None,
                 notices: ReleaseNotices | None = None) -> None:
        self.budget = budget
        self.store = store
        self.notices = notices if notices is not None else ReleaseNotices()

    def release(self, buf: Any, nbytes: int) -> None:
        if isinstance(buf, SpilledChunk):
            if self.store is None:
                raise AssertionError("a spilled chunk without a spill store")
            self.store.release(buf)
            # Tier room came back: a put() blocked on the budget may be able to spill now.
            self.budget.poke()
        else:
            self.budget.release(nbytes)
            self.notices.fire(buf)  # the producer's buffer is free now

    def swapped_out(self, original: Any, nbytes: int) -> None:
        """A chunk's bytes now live in a tier copy: its original buffer's budget, and the
        buffer itself, go back."""
        self.budget.release(nbytes)
        self.notices.fire(original)
