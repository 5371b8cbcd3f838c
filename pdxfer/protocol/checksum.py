"""Chunk checksums and transfer digests.

xxh3-64 is as fast as memory can be read: on the 2-vCPU VM this was first measured on,
39 GB/s over a cache-hot 2 MiB buffer but 17 GB/s over a 64 MiB working set and 12 GB/s
over 256 MiB (a plain numpy sum reads at the same rates). Against 3-5 GB/s of loopback
TCP, a cold hash is ~20% of a chunk's send time there, so the engine hashes where bytes
are hot when it can (the receiver hashes each landed piece at once). The binding's
version matters only for hot bytes: on a later host (AVX-512), xxhash 4.1.0 hashed a hot
1 MiB buffer at 89 GB/s against 33 GB/s for 3.8.2 and 4.0.0, and a 64 MiB one at ~30 GB/s
with all three; the TCP bench (2 MiB chunks) did not measurably change with it (3
alternating runs of 3.8.2 and 4.1.0).

The digest is the hash of the ordered chunk checksums: it proves the receiver saw every
chunk, in the sender's order, without hashing the payload a second time.

Two chunk checksums exist; the *receiver* names the one its region is checked with
(HELLO_OK `checksum`), because it must compute it where the bytes land: "xxh3" for a
host region (the default), "devsum64" (`protocol.devsum`) for a GPU region, where a
sequential hash cannot run in parallel. The digest is xxh3 over the list either way.
"""

from __future__ import annotations

import struct
from typing import Sequence

import xxhash


XXH3 = "xxh3"
DEVSUM64 = "devsum64"
ALGORITHMS = (XXH3, DEVSUM64)


def chunk_checksum(data: object) -> int:
    return xxhash.xxh3_64_intdigest(data)  # type: ignore[arg-type]


def transfer_digest(checksums: Sequence[int]) -> int:
    return xxhash.xxh3_64_intdigest(struct.pack(f"<{len(checksums)}Q", *checksums))


def host_checksum(algorithm: str, data: object) -> int:
    """`algorithm`'s checksum of host bytes (devsum64 here is the numpy reference: ~17x
    slower than xxh3, for a host chunk bound for a GPU receiver, or a host receiver
    configured to check with it)."""
    if algorithm == XXH3:
        return chunk_checksum(data)
    if algorithm == DEVSUM64:
        from pdxfer.protocol.devsum import devsum

        return devsum(data)
    raise ValueError(f"unknown checksum algorithm {algorithm!r} (known: {', '.join(ALGORITHMS)})")
