"""`devsum64`: the chunk checksum for bytes that live in GPU memory.

xxh3 (`protocol.checksum`) is sequential over a buffer's 1 KiB blocks, so a GPU cannot
compute it in parallel, and copying VRAM to the host to hash it would cost a PCIe
round trip per chunk. A VRAM→VRAM transfer therefore checks its chunks with this sum
instead, which every GPU thread can compute over its own words and add up in any order:

    words    w_i: the bytes as little-endian uint64 (the last one zero-padded), i = 0..m-1
    term_i = fmix64(w_i ^ ((i + 1) * GOLDEN))          # position-keyed, then mixed
    sum    = (term_0 + ... + term_{m-1}) mod 2**64      # order-free: atomics, any grid
    devsum = fmix64(sum ^ (n * GOLDEN) ^ SEED)          # n: the length in bytes

fmix64 (MurmurHash3's 64-bit finalizer) is a bijection, so changing any one word changes
exactly one term and always changes the sum: every corruption confined to one 8-byte
word is caught, and so is any change of the length. Changes spread over several words go
unnoticed only if their term deltas cancel mod 2**64, which for corruption that is not
crafted to do so is a 2**-64 chance. It is an integrity check against faults (bad DMA,
a stale or torn buffer, a WRITE into the wrong range), not a MAC.

This module is the reference: numpy, on host memory, in bounded pieces. The CUDA kernel
(`csrc/devsum.cu`, launched by `pdxfer.pack.devsum_cuda`) must give the same value for
every input; tests compare the two, on the host through the kernel compiled for the
CPU, and on a GPU where one is present.
"""

from __future__ import annotations

import numpy as np

GOLDEN = 0x9E3779B97F4A7C15
C1 = 0xFF51AFD7ED558CCD
C2 = 0xC4CEB9FE1A85EC53
SEED = 0x7064786665723634  # "pdxfer64": so no input, not even an empty one, digests to 0
_MASK = (1 << 64) - 1
_PIECE_WORDS = 1 << 17  # 1 MiB of words per numpy pass: temporaries stay bounded

_G = np.uint64(GOLDEN)
_C1 = np.uint64(C1)
_C2 = np.uint64(C2)
_S33 = np.uint64(33)


def fmix64(x: int) -> int:
    x &= _MASK
    x ^= x >> 33
    x = (x * C1) & _MASK
    x ^= x >> 33
    x = (x * C2) & _MASK
    x ^= x >> 33
    return x


def finish(word_sum: int, nbytes: int) -> int:
    """The digest from the sum of the terms (what the kernel accumulates) and the length."""
    return fmix64((word_sum & _MASK) ^ ((nbytes * GOLDEN) & _MASK) ^ SEED)


def _terms_sum(words: np.ndarray, first_index: int) -> int:
    idx = np.arange(first_index + 1, first_index + 1 + words.size, dtype=np.uint64)
    x = words ^ (idx * _G)  # uint64 arithmetic wraps, as on the GPU
    x ^= x >> _S33
    x *= _C1
    x ^= x >> _S33
    x *= _C2
    x ^= x >> _S33
    return int(x.sum(dtype=np.uint64))


def word_sum(data: object) -> int:
    """Sum of the terms mod 2**64 (the kernel's accumulator, before `finish`)."""
    b = np.frombuffer(memoryview(data).cast("B"), dtype=np.uint8)  # type: ignore[arg-type]
    full = b.size // 8
    words = b[: full * 8].view("<u8")
    total = 0
    with np.errstate(over="ignore"):
        for start in range(0, full, _PIECE_WORDS):
            total += _terms_sum(words[start : start + _PIECE_WORDS], start)
        tail = b[full * 8 :]
        if tail.size:
            last = np.zeros(8, dtype=np.uint8)
            last[: tail.size] = tail
            total += _terms_sum(last.view("<u8"), full)
    return total & _MASK


def devsum(data: object) -> int:
    """devsum64 of a bytes-like object in host memory."""
    n = memoryview(data).nbytes  # type: ignore[arg-type]
    return finish(word_sum(data), n)
