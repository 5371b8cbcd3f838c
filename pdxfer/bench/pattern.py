"""Position-unique test bytes: every 8-byte word depends on (transfer, chunk, position),
so a misplaced, duplicated or stale chunk is caught by a second process that only
knows the transfer id, independently of pdxfer's own checksums."""

from __future__ import annotations

import numpy as np
import xxhash

_MUL = np.uint64(0x9E3779B97F4A7C15)


def _seed(transfer_id: str, index: int) -> np.uint64:
    return np.uint64(xxhash.xxh3_64_intdigest(f"{transfer_id}/{index}".encode()))


def fill(buf: np.ndarray, transfer_id: str, index: int) -> np.ndarray:
    """Fill a uint8 array (length multiple of 8) with the pattern for this chunk."""
    words = buf.view(np.uint64)
    np.add(np.arange(words.size, dtype=np.uint64), _seed(transfer_id, index), out=words)
    np.multiply(words, _MUL, out=words)
    return buf


def make(nbytes: int, transfer_id: str, index: int) -> np.ndarray:
    if nbytes % 8:
        raise ValueError(f"pattern chunks must be a multiple of 8 bytes, got {nbytes}")
    return fill(np.empty(nbytes, dtype=np.uint8), transfer_id, index)


def check(view: object, transfer_id: str, index: int) -> bool:
    """`view`: host bytes, or a uint8 CUDA tensor (a GPU receiver's chunk; copied back)."""
    if hasattr(view, "is_cuda"):
        view = view.cpu().numpy()  # type: ignore[attr-defined]
    got = np.frombuffer(view, dtype=np.uint8)  # type: ignore[call-overload]
    if got.size % 8:
        return False
    return bool(np.array_equal(got, make(got.size, transfer_id, index)))
