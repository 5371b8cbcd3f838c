"""devsum64, the checksum for chunks in GPU memory: the reference's own properties.

(Its CUDA kernel is compared with this reference in tests/pack.)"""

from __future__ import annotations

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from pdxfer.protocol.devsum import GOLDEN, devsum, finish, fmix64, word_sum

MASK = (1 << 64) - 1


def _slow(b: bytes) -> int:
    """The specification, one word at a time in plain Python."""
    padded = b + bytes(-len(b) % 8)
    s = 0
    for i in range(len(padded) // 8):
        w = int.from_bytes(padded[8 * i : 8 * i + 8], "little")
        s = (s + fmix64(w ^ (((i + 1) * GOLDEN) & MASK))) & MASK
    return finish(s, len(b))


@settings(max_examples=200)
@given(st.binary(max_size=3000))
def test_numpy_reference_equals_the_specification(b: bytes) -> None:
    assert devsum(b) == _slow(b)


def test_pieces_of_the_numpy_pass_join_up(monkeypatch) -> None:
    """The reference works in bounded passes; position keys must continue across them."""
    import pdxfer.protocol.devsum as d

    b = np.random.default_rng(3).integers(0, 256, 8 * 37 + 5, dtype=np.uint8).tobytes()
    whole = word_sum(b)
    monkeypatch.setattr(d, "_PIECE_WORDS", 3)
    assert word_sum(b) == whole and devsum(b) == _slow(b)


@settings(max_examples=200)
@given(st.binary(min_size=1, max_size=2000), st.data())
def test_any_change_within_one_word_is_caught(b: bytes, data: st.DataObject) -> None:
    word = data.draw(st.integers(0, (len(b) - 1) // 8))
    lo, hi = 8 * word, min(len(b), 8 * word + 8)
    new = bytearray(b)
    for i in range(lo, hi):
        new[i] = data.draw(st.integers(0, 255))
    if bytes(new) != b:
        assert devsum(bytes(new)) != devsum(b)


def test_length_and_position_matter() -> None:
    assert devsum(b"abc") != devsum(b"abc\x00")  # zero padding is not the same as zero bytes
    assert devsum(bytes(16)) != devsum(bytes(8))
    a, c = b"A" * 8, b"C" * 8
    assert devsum(a + c) != devsum(c + a)  # swapped words
    assert devsum(b"") != 0  # nothing digests to 0: a zeroed checksum field never matches


def test_pinned_values() -> None:
    # The wire depends on these: a change of the algorithm must be a new algorithm id.
    assert devsum(b"") == finish(0, 0)
    assert devsum(b"pdxfer") == devsum(bytearray(b"pdxfer")) == devsum(memoryview(b"pdxfer"))
    assert f"{devsum(b'abc'):016x}" == PINNED_ABC


PINNED_ABC = "08313313e799eed8"
