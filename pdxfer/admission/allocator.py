"""First-fit extent allocator over one contiguous byte region.

Why this exists: the receiver registers ONE region with NIXL (registration is expensive
and pins memory), so every transfer must land in a contiguous sub-range of it. This
module only hands out and takes back ``[offset, offset + size)`` ranges; it knows nothing
about transfers, deadlines or fairness (that is the controller's job).

Rules of the file:

* Offsets are multiples of ``alignment`` and sizes are rounded up to it, so every chunk
  lands on a page boundary (DMA engines and ``O_DIRECT`` spill both like that).
* ``capacity`` need not be a multiple of ``alignment``: the tail piece stays in the free
  list (so ``free_bytes + allocated_bytes == capacity`` holds exactly) but can never be
  handed out, because an aligned size never fits in it.
* Free extents are kept sorted and fully coalesced, so freeing everything in any order
  always gives back the single extent ``[0, capacity)``.
* First fit: the lowest-addressed extent that is big enough wins. It keeps allocations
  packed at low addresses and leaves the largest hole at the top, which suits the
  head-of-line queue in front of it (big requests wait for one big hole).
"""

from __future__ import annotations

from bisect import bisect_left


class ExtentAllocator:
    """Sorted, coalesced free list of ``(start, size)`` extents inside ``[0, capacity)``."""

    __slots__ = ("_capacity", "_alignment", "_starts", "_free", "_used", "_free_total", "_largest")

    def __init__(self, capacity: int, alignment: int = 4096) -> None:
        if not isinstance(capacity, int) or isinstance(capacity, bool) or capacity <= 0:
            raise ValueError(f"capacity must be a positive int, got {capacity!r}")
        if not isinstance(alignment, int) or isinstance(alignment, bool) or alignment <= 0:
            raise ValueError(f"alignment must be a positive int, got {alignment!r}")
        self._capacity = capacity
        self._alignment = alignment
        self._starts: list[int] = [0]  # sorted starts of free extents
        self._free: dict[int, int] = {0: capacity}  # free start -> size
        self._used: dict[int, int] = {}  # allocated offset -> allocated size
        self._free_total = capacity
        self._largest: int | None = capacity  # cache; None means "recompute"

    # -- queries -----------------------------------------------------------------

    @property
    def capacity(self) -> int:
        return self._capacity

    @property
    def alignment(self) -> int:
        return self._alignment

    @property
    def free_bytes(self) -> int:
        return self._free_total

    @property
    def allocated_bytes(self) -> int:
        return self._capacity - self._free_total

    @property
    def largest_free(self) -> int:
        """Size of the largest free extent (cached, recomputed lazily after changes)."""
        if self._largest is None:
            self._largest = max(self._free.values(), default=0)
        return self._largest

    def aligned(self, nbytes: int) -> int:
        """``nbytes`` rounded up to the alignment: what an allocation of it really takes."""
        a = self._alignment
        return -(-nbytes // a) * a

    def fits_ever(self, nbytes: int) -> bool:
        """Whether ``nbytes`` could be allocated in an empty region."""
        return 0 < self.aligned(nbytes) <= self._capacity

    def can_alloc(self, nbytes: int) -> bool:
        """Whether ``alloc(nbytes)`` would succeed now (no side effects)."""
        return 0 < self.aligned(nbytes) <= self.largest_free

    def free_extents(self) -> list[tuple[int, int]]:
        """Free ``(start, size)`` extents in address order (a copy)."""
        return [(s, self._free[s]) for s in self._starts]

    def allocations(self) -> dict[int, int]:
        """Allocated ``offset -> size`` (a copy)."""
        return dict(self._used)

    def size_of(self, offset: int) -> int:
        """Allocated size at ``offset``; KeyError if nothing is allocated there."""
        return self._used[offset]

    # -- mutations ---------------------------------------------------------------

    def alloc(self, nbytes: int) -> int | None:
        """Reserve ``aligned(nbytes)`` contiguous bytes; return the offset, or None if no hole fits.

        O(number of free extents); the largest-extent cache makes the common "does not
        fit" answer (a blocked queue head re-checked on every release) O(1).
        """
        if nbytes <= 0:
            raise ValueError(f"allocation size must be > 0, got {nbytes}")
        need = self.aligned(nbytes)
        if need > self.largest_free:
            return None
        for i, start in enumerate(self._starts):
            size = self._free[start]
            if size >= need:
                del self._free[start]
                rest = size - need
                if rest:
                    self._starts[i] = start + need  # order is kept: still below the next start
                    self._free[start + need] = rest
                else:
                    del self._starts[i]
                if size == self._largest:
                    self._largest = None
                self._used[start] = need
                self._free_total -= need
                return start
        raise AssertionError("largest_free cache said an extent fits but none did")  # pragma: no cover

    def free(self, offset: int) -> int:
        """Return the allocation at ``offset`` to the free list, coalescing with neighbours.

        Returns the number of bytes freed. Freeing an offset that is not allocated raises
        ValueError: a double free here would silently hand the same bytes to two transfers.
        """
        size = self._used.pop(offset, None)
        if size is None:
            raise ValueError(f"free of offset {offset} which is not allocated")
        self._free_total += size
        start, end = offset, offset + size
        i = bisect_left(self._starts, offset)
        # merge with the following extent
        if i < len(self._starts) and self._starts[i] == end:
            end += self._free.pop(end)
            del self._starts[i]
        # merge with the preceding extent
        if i > 0:
            prev = self._starts[i - 1]
            if prev + self._free[prev] == start:
                self._free[prev] = end - prev
                start = prev
            else:
                self._starts.insert(i, start)
                self._free[start] = end - start
        else:
            self._starts.insert(i, start)
            self._free[start] = end - start
        merged = end - start
        if self._largest is not None and merged > self._largest:
            self._largest = merged
        return size

    # -- self check --------------------------------------------------------------

    def _check_invariants(self) -> None:
        """Raise AssertionError if the free list or allocation map is inconsistent.

        Used by tests after every step; O(n). Not an ``assert`` so ``-O`` cannot skip it.
        """

        def fail(msg: str) -> None:
            raise AssertionError(f"allocator: {msg}")

        if self._starts != sorted(self._free):
            fail(f"starts {self._starts} disagree with free map {sorted(self._free)}")
        pieces = [(s, n, "free") for s, n in self._free.items()]
        pieces += [(s, n, "used") for s, n in self._used.items()]
        pieces.sort()
        pos = 0
        prev_kind = None
        for s, n, kind in pieces:
            if n <= 0:
                fail(f"{kind} extent at {s} has size {n}")
            if s != pos:
                fail(f"{kind} extent at {s} but previous piece ended at {pos} (gap or overlap)")
            if s % self._alignment:
                fail(f"{kind} extent at {s} not aligned to {self._alignment}")
            if kind == "used" and n % self._alignment:
                fail(f"allocation at {s} of {n} bytes not a multiple of the alignment")
            if kind == "free" and prev_kind == "free":
                fail(f"free extent at {s} not coalesced with its predecessor")
            pos = s + n
            prev_kind = kind
        if pos != self._capacity:
            fail(f"pieces end at {pos}, capacity is {self._capacity}")
        if self._free_total != sum(self._free.values()):
            fail(f"free_total {self._free_total} != sum of free extents {sum(self._free.values())}")
        real_largest = max(self._free.values(), default=0)
        if self._largest is not None and self._largest != real_largest:
            fail(f"largest cache {self._largest} != real largest {real_largest}")
