"""What a transfer carries: an ordered list of chunks with byte sizes.

The receiver reserves `total_bytes` in one contiguous range, and chunk `i` lands at
`offsets[i]` inside it. Keeping this a pure value (no buffers) lets the protocol
validate every offset/length that arrives from the wire against it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

# Bounds that make a malicious or corrupted RESERVE harmless before any allocation.
MAX_CHUNKS = 1 << 20
MAX_CHUNK_BYTES = 1 << 34  # 16 GiB: bigger than any single KV chunk we expect
MAX_TRANSFER_BYTES = 1 << 40


@dataclass(frozen=True)
class Payload:
    """Sizes of the chunks of one transfer, in send order."""

    chunk_sizes: tuple[int, ...]
    offsets: tuple[int, ...] = field(init=False, repr=False)
    total_bytes: int = field(init=False)

    def __post_init__(self) -> None:
        sizes = tuple(self.chunk_sizes)
        if not sizes:
            raise ValueError("payload needs at least one chunk")
        if len(sizes) > MAX_CHUNKS:
            raise ValueError(f"payload has {len(sizes)} chunks, more than {MAX_CHUNKS}")
        offsets = []
        pos = 0
        for i, n in enumerate(sizes):
            if not isinstance(n, int) or isinstance(n, bool):
                raise TypeError(f"chunk {i} size must be int, got {type(n).__name__}")
            if n <= 0 or n > MAX_CHUNK_BYTES:
                raise ValueError(f"chunk {i} size {n} outside 1..{MAX_CHUNK_BYTES}")
            offsets.append(pos)
            pos += n
        if pos > MAX_TRANSFER_BYTES:
            raise ValueError(f"payload of {pos} bytes exceeds {MAX_TRANSFER_BYTES}")
        object.__setattr__(self, "chunk_sizes", sizes)
        object.__setattr__(self, "offsets", tuple(offsets))
        object.__setattr__(self, "total_bytes", pos)

    @classmethod
    def uniform(cls, total_bytes: int, chunk_size: int) -> "Payload":
        """Split `total_bytes` into `chunk_size` pieces (the last may be shorter)."""
        if total_bytes <= 0 or chunk_size <= 0:
            raise ValueError(f"total_bytes={total_bytes} and chunk_size={chunk_size} must be > 0")
        full, rest = divmod(total_bytes, chunk_size)
        return cls(tuple([chunk_size] * full + ([rest] if rest else [])))

    @classmethod
    def of(cls, buffers: Sequence[object]) -> "Payload":
        """Payload describing a list of buffers (anything with the buffer protocol)."""
        return cls(tuple(memoryview(b).nbytes for b in buffers))  # type: ignore[arg-type]

    @property
    def chunk_count(self) -> int:
        return len(self.chunk_sizes)

    def chunk_range(self, index: int) -> tuple[int, int]:
        """(offset, length) of chunk `index`; raises IndexError naming the index."""
        if not 0 <= index < len(self.chunk_sizes):
            raise IndexError(f"chunk index {index} outside 0..{len(self.chunk_sizes) - 1}")
        return self.offsets[index], self.chunk_sizes[index]
