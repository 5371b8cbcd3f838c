"""ExtentAllocator: first fit, alignment, coalescing, and a model check against a bitmap."""

from __future__ import annotations

import itertools

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pdxfer.admission.allocator import ExtentAllocator

A = 4096


def test_rejects_bad_construction() -> None:
    for cap, al in [(0, A), (-1, A), (A, 0), (A, -4), (1.5, A), (True, A)]:
        with pytest.raises(ValueError):
            ExtentAllocator(cap, al)  # type: ignore[arg-type]


def test_sizes_round_up_to_alignment_and_offsets_are_aligned() -> None:
    a = ExtentAllocator(16 * A, A)
    assert a.aligned(1) == A and a.aligned(A) == A and a.aligned(A + 1) == 2 * A
    o1 = a.alloc(1)
    o2 = a.alloc(A + 1)
    o3 = a.alloc(A)
    assert (o1, o2, o3) == (0, A, 3 * A)
    assert a.size_of(o2) == 2 * A
    assert a.allocated_bytes == 4 * A and a.free_bytes == 12 * A
    a._check_invariants()


def test_alloc_zero_or_negative_is_an_error() -> None:
    a = ExtentAllocator(4 * A, A)
    with pytest.raises(ValueError):
        a.alloc(0)
    with pytest.raises(ValueError):
        a.alloc(-5)


def test_first_fit_picks_lowest_hole_that_fits() -> None:
    a = ExtentAllocator(10 * A, A)
    offs = [a.alloc(A) for _ in range(10)]
    assert offs == [i * A for i in range(10)]
    assert a.alloc(1) is None
    a.free(1 * A)  # hole of 1 page at 1
    a.free(4 * A)
    a.free(5 * A)  # hole of 2 pages at 4
    a.free(8 * A)  # hole of 1 page at 8
    assert a.largest_free == 2 * A
    assert a.alloc(2 * A) == 4 * A  # first hole big enough, not the first hole
    assert a.alloc(A) == 1 * A  # lowest hole
    assert a.alloc(A) == 8 * A
    assert a.alloc(A) is None
    a._check_invariants()


def test_unaligned_capacity_tail_is_never_handed_out() -> None:
    a = ExtentAllocator(3 * A + 100, A)
    assert a.fits_ever(3 * A) and not a.fits_ever(3 * A + 1)
    assert [a.alloc(A) for _ in range(3)] == [0, A, 2 * A]
    assert a.free_bytes == 100 and a.alloc(1) is None
    a._check_invariants()
    for o in (A, 0, 2 * A):
        a.free(o)
        a._check_invariants()
    assert a.free_extents() == [(0, 3 * A + 100)]


def test_double_free_and_bogus_free_raise() -> None:
    a = ExtentAllocator(4 * A, A)
    o = a.alloc(A)
    a.free(o)
    with pytest.raises(ValueError):
        a.free(o)
    with pytest.raises(ValueError):
        a.free(123)
    a._check_invariants()


@pytest.mark.parametrize("order", list(itertools.permutations(range(5))))
def test_freeing_in_any_order_coalesces_to_one_extent(order: tuple[int, ...]) -> None:
    a = ExtentAllocator(8 * A, A)
    sizes = [A, 2 * A, 1, A + 1, 3]
    offs = [a.alloc(n) for n in sizes]
    assert None not in offs
    for i in order:
        a.free(offs[i])  # type: ignore[arg-type]
        a._check_invariants()
    assert a.free_extents() == [(0, 8 * A)]
    assert a.largest_free == 8 * A == a.free_bytes


def test_largest_free_tracks_changes() -> None:
    a = ExtentAllocator(8 * A, A)
    x = a.alloc(3 * A)
    assert a.largest_free == 5 * A
    y = a.alloc(5 * A)
    assert a.largest_free == 0 and a.alloc(1) is None
    a.free(x)
    assert a.largest_free == 3 * A
    a.free(y)
    assert a.largest_free == 8 * A


def test_invariant_check_detects_corruption() -> None:
    a = ExtentAllocator(8 * A, A)
    a.alloc(A)
    a._used[A] = A  # an allocation overlapping the free extent
    with pytest.raises(AssertionError):
        a._check_invariants()


class _Bitmap:
    """The obviously-correct model: one bool per page, first fit by linear scan."""

    def __init__(self, pages: int) -> None:
        self.used = [False] * pages
        self.owner: dict[int, int] = {}

    def alloc(self, npages: int) -> int | None:
        run = 0
        for i, u in enumerate(self.used):
            run = 0 if u else run + 1
            if run == npages:
                start = i - npages + 1
                for j in range(start, i + 1):
                    self.used[j] = True
                self.owner[start] = npages
                return start
        return None

    def free(self, start: int) -> None:
        for j in range(start, start + self.owner.pop(start)):
            self.used[j] = False

    def largest(self) -> int:
        best = run = 0
        for u in self.used:
            run = 0 if u else run + 1
            best = max(best, run)
        return best


ops = st.lists(
    st.one_of(
        st.tuples(st.just("alloc"), st.integers(1, 9 * 512)),  # bytes, alignment 512
        st.tuples(st.just("free"), st.integers(0, 1000)),  # index into live allocations
    ),
    max_size=60,
)


@settings(max_examples=150, deadline=None)
@given(pages=st.integers(1, 40), ops=ops)
def test_random_sequences_match_bitmap_model(pages: int, ops: list[tuple[str, int]]) -> None:
    al = 512
    a = ExtentAllocator(pages * al, al)
    model = _Bitmap(pages)
    live: list[int] = []
    for op, arg in ops:
        if op == "alloc":
            got = a.alloc(arg)
            want = model.alloc(-(-arg // al))
            assert got == (None if want is None else want * al)
            if got is not None:
                live.append(got)
        elif live:
            off = live.pop(arg % len(live))
            model.free(off // al)
            assert a.free(off) % al == 0
        a._check_invariants()
        assert a.free_bytes == model.used.count(False) * al
        assert a.largest_free == model.largest() * al
    for off in live:
        a.free(off)
    assert a.free_extents() == [(0, pages * al)]
