"""Control-channel messages (ZMQ bodies), encoded with msgspec msgpack.

Every message carries the protocol version `v` and a correlation id `cid` so that many
requests to one peer can be outstanding at once and nothing ever holds a per-peer lock
across a round trip. Replies echo the request's `cid`. A RESERVE may be answered twice
(QUEUED, later GRANT or REJECT); both carry the RESERVE's `cid`.

Optional fields added later (all default to None, so older peers still decode) carry the
NIXL data path: HELLO names the sender's NIXL agent, HELLO_OK carries the receiver's agent
metadata (which includes its registered receive region), and a GRANT to a NIXL peer carries
the absolute address of the reserved range inside that region.

Deadlines travel as *remaining milliseconds*, never as absolute times: the two hosts'
clocks are unrelated, and each side turns the budget into its own monotonic deadline.

Every body is sealed: the msgpack bytes and then their xxh3-64, 8 bytes little-endian
(protocol version 2; version 1 had no seal). A flipped bit that TCP's 16-bit checksum
let through would otherwise be read as a valid message with a wrong value: `pdxfer chaos
--faults control-corrupt` delivered bodies claiming protocol version 17 and missing
fields, and a flip inside a GRANT's `addr` would have sent a NIXL WRITE into someone
else's reservation. Such a body is now refused whole, like any malformed one.
"""

from __future__ import annotations

import struct
from typing import Union

import msgspec
import xxhash

from pdxfer.errors import ProtocolError
from pdxfer.layout.payload import MAX_CHUNK_BYTES, MAX_CHUNKS, MAX_TRANSFER_BYTES

PROTOCOL_VERSION = 2
MAX_CONTROL_MESSAGE = 16 << 20  # a RESERVE with MAX_CHUNKS sizes fits comfortably
_SEAL = struct.Struct("<Q")  # xxh3-64 of the msgpack body, after it
MAX_ID_LEN = 256
MAX_NIXL_WORKERS = 16  # a sender's NIXL agents, the one in nixl_agent included


class _Msg(msgspec.Struct, tag_field="t", kw_only=True, frozen=True):
    v: int = PROTOCOL_VERSION
    cid: int


class Hello(_Msg, tag="hello"):
    sender_id: str
    capabilities: list[str] = []  # data paths this lane wants: "tcp" or "nixl"
    token: str | None = None
    nixl_agent: str | None = None  # the sender's NIXL agent name; notifications arrive under it
    nixl_workers: list[str] = []  # its other agents' names (transport.nixl.NixlSendSide): theirs too


class HelloOk(_Msg, tag="hello_ok"):
    receiver_id: str
    capabilities: list[str]
    data_address: str  # "host:port" of the TCP data listener
    conn_token: int  # the sender opens its data connection with this token
    lease_ms: int
    nixl_md: bytes | None = None  # receiver's NIXL agent metadata, when the sender asked for "nixl"
    # What its region is and how it checks chunks (protocol.checksum): the sender WRITEs
    # with these memory descriptors and computes this checksum for every chunk.
    nixl_mem: str = "DRAM"  # "DRAM" | "VRAM"
    nixl_dev: int = 0  # GPU index of a VRAM region
    checksum: str = "xxh3"  # "xxh3" | "devsum64"


class Reserve(_Msg, tag="reserve"):
    tid: str
    total_bytes: int
    chunk_sizes: list[int]
    deadline_ms: int


class Grant(_Msg, tag="grant"):
    tid: str
    slot: int  # receiver-issued handle that DATA frames carry; never reused
    lease_ms: int
    addr: int | None = None  # NIXL peers: absolute address of the reserved range to WRITE into


class Queued(_Msg, tag="queued"):
    tid: str
    position: int


class Reject(_Msg, tag="reject"):
    tid: str
    reason: str
    detail: str = ""


class Commit(_Msg, tag="commit"):
    tid: str
    digest: int


class Done(_Msg, tag="done"):
    tid: str


class Failed(_Msg, tag="failed"):
    tid: str
    error: str  # "integrity" | "lease_expired" | "deadline" | "aborted" | "protocol" | "shutdown"
    detail: str = ""


class Abort(_Msg, tag="abort"):
    tid: str
    reason: str = ""


class Heartbeat(_Msg, tag="heartbeat"):
    pass


class HeartbeatAck(_Msg, tag="heartbeat_ack"):
    pass


class Error(_Msg, tag="error"):
    """Reply to a request the receiver could not even parse or accept (bad HELLO)."""

    error: str
    detail: str = ""


Message = Union[
    Hello, HelloOk, Reserve, Grant, Queued, Reject, Commit, Done, Failed, Abort,
    Heartbeat, HeartbeatAck, Error,
]

_encoder = msgspec.msgpack.Encoder()
_decoder = msgspec.msgpack.Decoder(Message)


def seal(body: bytes) -> bytes:
    """A msgpack body as it travels: followed by its xxh3-64."""
    return body + _SEAL.pack(xxhash.xxh3_64_intdigest(body))


def encode(msg: Message) -> bytes:
    return seal(_encoder.encode(msg))


def decode(data: bytes | memoryview) -> Message:
    """Check the seal, decode and validate one control body; raises ProtocolError naming the defect."""
    if len(data) > MAX_CONTROL_MESSAGE + _SEAL.size:
        raise ProtocolError(f"control message of {len(data)} bytes exceeds {MAX_CONTROL_MESSAGE}")
    if len(data) <= _SEAL.size:
        raise ProtocolError(f"control message of {len(data)} bytes is too short to carry its seal")
    body = bytes(data[: -_SEAL.size])
    (want,) = _SEAL.unpack(data[-_SEAL.size :])
    if xxhash.xxh3_64_intdigest(body) != want:
        raise ProtocolError(f"control message of {len(data)} bytes fails its xxh3 seal: corrupted in transit"
                            f"{_unsealed_hint(data)}")
    try:
        msg = _decoder.decode(body)
    except msgspec.DecodeError as exc:
        raise ProtocolError(f"undecodable control message: {exc}") from None
    if msg.v != PROTOCOL_VERSION:
        raise ProtocolError(f"protocol version {msg.v} not supported (want {PROTOCOL_VERSION})")
    _validate(msg)
    return msg


def _unsealed_hint(data: bytes | memoryview) -> str:
    """A peer of protocol version 1 sends bodies with no seal: say so rather than 'corrupted'."""
    try:
        old = _decoder.decode(data)
    except msgspec.DecodeError:
        return ""
    return f" (or unsealed: it reads whole as a protocol version {old.v} message; this peer speaks {PROTOCOL_VERSION})"


def _validate(msg: Message) -> None:
    tid = getattr(msg, "tid", None)
    if tid is not None and not 0 < len(tid) <= MAX_ID_LEN:
        raise ProtocolError(f"transfer id length {len(tid)} outside 1..{MAX_ID_LEN}")
    if isinstance(msg, Reserve):
        n = len(msg.chunk_sizes)
        if not 0 < n <= MAX_CHUNKS:
            raise ProtocolError(f"reserve {msg.tid}: chunk count {n} outside 1..{MAX_CHUNKS}")
        if any(s <= 0 or s > MAX_CHUNK_BYTES for s in msg.chunk_sizes):
            raise ProtocolError(f"reserve {msg.tid}: a chunk size is outside 1..{MAX_CHUNK_BYTES}")
        if sum(msg.chunk_sizes) != msg.total_bytes or msg.total_bytes > MAX_TRANSFER_BYTES:
            raise ProtocolError(
                f"reserve {msg.tid}: total_bytes {msg.total_bytes} != sum of chunk sizes"
                f" {sum(msg.chunk_sizes)} (or above {MAX_TRANSFER_BYTES})"
            )
        if msg.deadline_ms <= 0:
            raise ProtocolError(f"reserve {msg.tid}: deadline_ms {msg.deadline_ms} must be > 0")
    elif isinstance(msg, Hello):
        if not 0 < len(msg.sender_id) <= MAX_ID_LEN:
            raise ProtocolError(f"hello: sender_id length {len(msg.sender_id)} outside 1..{MAX_ID_LEN}")
        if msg.nixl_agent is not None and not 0 < len(msg.nixl_agent) <= MAX_ID_LEN:
            raise ProtocolError(f"hello: nixl_agent length {len(msg.nixl_agent)} outside 1..{MAX_ID_LEN}")
        if len(msg.nixl_workers) > MAX_NIXL_WORKERS - 1 or (msg.nixl_workers and msg.nixl_agent is None):
            raise ProtocolError(f"hello: {len(msg.nixl_workers)} nixl_workers (at most {MAX_NIXL_WORKERS - 1},"
                                " and only with nixl_agent)")
        if any(not 0 < len(w) <= MAX_ID_LEN for w in msg.nixl_workers):
            raise ProtocolError(f"hello: a nixl_workers name length is outside 1..{MAX_ID_LEN}")
    elif isinstance(msg, Grant) and msg.addr is not None and msg.addr < 0:
        raise ProtocolError(f"grant {msg.tid}: negative addr {msg.addr}")
