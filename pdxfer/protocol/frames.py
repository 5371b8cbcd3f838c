"""Binary framing of the TCP data path, and a sans-IO parser that receives in place.

A data frame is a fixed 40-byte little-endian header followed by `length` payload bytes:

    magic "PX" | version u8 | kind u8 | chunk_index u32 | slot u64 | offset u64 | length u64 | checksum u64

`slot` is the handle the receiver issued in GRANT (never reused, so a late frame for an
ended transfer can be recognised and discarded rather than written into someone else's
buffer). The first frame on a connection is kind HELLO with `slot` = the `conn_token`
from HelloOk and no payload; it binds the connection to a control-channel peer.

`FrameParser` never copies payload bytes: it asks a resolver for the exact destination
(a slice of the reserved receive buffer) and hands that memoryview to the transport's
`get_buffer()`, so `recv_into` writes straight into the reservation.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import Callable, Union

import xxhash

from pdxfer.errors import ProtocolError
from pdxfer.layout.payload import MAX_CHUNK_BYTES

HEADER = struct.Struct("<2sBBIQQQQ")
HEADER_SIZE = HEADER.size
MAGIC = b"PX"
DATA_VERSION = 1
KIND_DATA = 1
KIND_HELLO = 2
_DISCARD_BYTES = 1 << 20
# Largest piece a payload is received (and hashed) in. The data connection also sets its
# receive low-water mark (SO_RCVLOWAT) to the piece the parser waits for (`want`), so
# the receiver wakes once per whole piece instead of once per few segments, and every
# wake-up it is spared is an IPI the *sender's* core no longer pays. Measured here (2
# vCPUs, loopback, 2 MiB chunks, one transfer in flight, pdxfer/raw bench ratio): 256 KiB
# pieces 0.76-0.84 without the mark and 0.82-0.90 with it; with it, 1 MiB pieces gave
# 0.97-0.99 (2 MiB: 1.00-1.01, but a whole 2 MiB piece no longer fits L2 to be hashed
# hot) while 1 MiB without the mark gave 0.75-0.77.
RECV_PIECE_BYTES = 1 << 20


@dataclass(frozen=True, slots=True)
class FrameHeader:
    kind: int
    chunk_index: int
    slot: int
    offset: int
    length: int
    checksum: int


def pack_header(kind: int, chunk_index: int, slot: int, offset: int, length: int, checksum: int) -> bytes:
    return HEADER.pack(MAGIC, DATA_VERSION, kind, chunk_index, slot, offset, length, checksum)


def parse_header(raw: bytes | bytearray | memoryview) -> FrameHeader:
    magic, version, kind, index, slot, offset, length, checksum = HEADER.unpack(raw)
    if magic != MAGIC:
        raise ProtocolError(f"bad frame magic {bytes(magic)!r}")
    if version != DATA_VERSION:
        raise ProtocolError(f"data frame version {version} not supported")
    if kind not in (KIND_DATA, KIND_HELLO):
        raise ProtocolError(f"unknown frame kind {kind}")
    if kind == KIND_HELLO and length != 0:
        raise ProtocolError("hello frame must have no payload")
    if kind == KIND_DATA and not 0 < length <= MAX_CHUNK_BYTES:
        raise ProtocolError(f"frame length {length} outside 1..{MAX_CHUNK_BYTES}")
    return FrameHeader(kind, index, slot, offset, length, checksum)


@dataclass(frozen=True, slots=True)
class ConnectionHello:
    conn_token: int


@dataclass(frozen=True, slots=True)
class ChunkReceived:
    """All payload bytes of a frame have landed in the buffer the resolver gave.

    `checksum` is the xxh3-64 of those bytes, computed piece by piece (at most
    `max_piece` bytes each) as each `recv_into` completed, while the piece was still in
    L1/L2 cache: re-reading a 2 MiB chunk afterwards cost the receiver ~30% more CPU per
    GB here. None when the parser was told not to hash (another algorithm checks it)."""

    header: FrameHeader
    view: memoryview
    checksum: int | None


@dataclass(frozen=True, slots=True)
class ChunkDiscarded:
    """A frame for a transfer that ended meanwhile was read and thrown away."""

    header: FrameHeader


FrameEvent = Union[ConnectionHello, ChunkReceived, ChunkDiscarded]

# The resolver maps a validated header to its destination, or None to discard the
# payload (stale slot); it raises ProtocolError when the frame is not allowed at all.
Resolver = Callable[[FrameHeader], Union[memoryview, None]]


class FrameParser:
    """Per-connection receive state: header → payload → header …, with no copies."""

    def __init__(self, resolve: Resolver, max_piece: int = RECV_PIECE_BYTES, *, hash_pieces: bool = True) -> None:
        """`hash_pieces`: xxh3 each piece as it lands (ChunkReceived.checksum); False when
        the receiver checks chunks with another algorithm (then checksum is None)."""
        if max_piece < 1:
            raise ValueError(f"max_piece must be >= 1 byte, got {max_piece}")
        self._resolve = resolve
        self._max_piece = max_piece
        self._hdr = bytearray(HEADER_SIZE)
        self._hdr_view = memoryview(self._hdr)
        self._filled = 0
        self._header: FrameHeader | None = None
        self._target: memoryview | None = None  # None while reading a header
        self._discard: memoryview | None = None
        self._remaining = 0  # bytes of payload still to discard
        self._hello_seen = False
        self._hasher = xxhash.xxh3_64() if hash_pieces else None

    @property
    def mid_frame(self) -> bool:
        """True if the stream stopped inside a frame (EOF now means truncation)."""
        return self._filled > 0 or self._target is not None or self._remaining > 0

    @property
    def want(self) -> int:
        """Bytes the next `get_buffer()` asks for: a receive low-water mark may be set to
        this and never stall, because the frame in progress still owes at least that many
        (the rest of a header, of a piece, or of a payload being discarded)."""
        if self._target is not None:
            return min(len(self._target) - self._filled, self._max_piece)
        if self._remaining:
            return min(self._remaining, _DISCARD_BYTES)
        return HEADER_SIZE - self._filled

    def get_buffer(self) -> memoryview:
        if self._target is not None:
            return self._target[self._filled : self._filled + self._max_piece]
        if self._remaining:
            if self._discard is None:
                self._discard = memoryview(bytearray(_DISCARD_BYTES))
            return self._discard[: min(self._remaining, _DISCARD_BYTES)]
        return self._hdr_view[self._filled:]

    def buffer_updated(self, nbytes: int) -> list[FrameEvent]:
        """Account for `nbytes` written into the last `get_buffer()`; return completed frames."""
        if nbytes <= 0:
            return []
        if self._target is not None:
            if self._hasher is not None:
                self._hasher.update(self._target[self._filled : self._filled + nbytes])
            self._filled += nbytes
            if self._filled < len(self._target):
                return []
            assert self._header is not None
            digest = self._hasher.intdigest() if self._hasher is not None else None
            event: FrameEvent = ChunkReceived(self._header, self._target, digest)
            self._target, self._header, self._filled = None, None, 0
            return [event]
        if self._remaining:
            self._remaining -= nbytes
            if self._remaining:
                return []
            assert self._header is not None
            done: FrameEvent = ChunkDiscarded(self._header)
            self._header = None
            return [done]
        self._filled += nbytes
        if self._filled < HEADER_SIZE:
            return []
        self._filled = 0
        return self._on_header(parse_header(self._hdr))

    def _on_header(self, header: FrameHeader) -> list[FrameEvent]:
        if header.kind == KIND_HELLO:
            if self._hello_seen:
                raise ProtocolError("second hello frame on one connection")
            self._hello_seen = True
            return [ConnectionHello(header.slot)]
        if not self._hello_seen:
            raise ProtocolError("data frame before hello frame")
        target = self._resolve(header)
        self._header = header
        if target is None:
            self._remaining = header.length
            return []
        if len(target) != header.length:
            raise ProtocolError(
                f"resolver gave {len(target)} bytes for a {header.length}-byte frame"
            )
        self._target = target
        if self._hasher is not None:
            self._hasher.reset()
        return []
