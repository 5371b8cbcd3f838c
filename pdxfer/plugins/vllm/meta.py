"""What the scheduler-side connector tells the worker-side one each step, and the
plugin's settings.

vLLM builds the metadata in the scheduler process and hands it to every worker (it may
be pickled across processes), so these are plain dataclasses of ints and strings. The
KVConnectorMetadata base class is mixed in by `connector.py`; nothing here imports vLLM.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Mapping

from pdxfer.engine.config import BACKENDS

Blocks = tuple[tuple[int, ...], ...]  # block ids per KV-cache group


@dataclass(frozen=True)
class SendSpec:
    """Prefill: blocks held for `transfer_id` until packed (or until `expires_at`)."""

    req_id: str
    transfer_id: str
    block_ids: Blocks
    num_tokens: int
    expires_at: float  # time.time() after which the blocks are freed unsent
    push_to: str | None = None  # concurrent flow: the decode Receiver's control address


@dataclass(frozen=True)
class RecvSpec:
    """Decode: load tokens [t0, t1) of `transfer_id` into `block_ids`."""

    req_id: str
    transfer_id: str
    block_ids: Blocks
    t0: int
    t1: int
    remote_host: str | None  # None: the prefill pushes without being asked
    remote_port: int | None


@dataclass(frozen=True)
class StreamSpec:
    """Prefill, concurrent flow: after this step's forward, tokens [0, done) of the request
    are computed; push every newly complete chunk of [0, total) to `peer`."""

    req_id: str
    transfer_id: str
    peer: str
    block_ids: Blocks
    done: int
    total: int


@dataclass(frozen=True)
class DropSpec:
    """Decode: tell a prefill its held blocks for `transfer_id` are not wanted."""

    transfer_id: str
    remote_host: str
    remote_port: int


@dataclass
class StepMeta:
    sends: list[SendSpec] = field(default_factory=list)
    recvs: list[RecvSpec] = field(default_factory=list)
    cancels: list[str] = field(default_factory=list)  # decode req ids aborted mid-receive
    drops: list[DropSpec] = field(default_factory=list)
    streams: list[StreamSpec] = field(default_factory=list)
    stream_aborts: list[str] = field(default_factory=list)  # transfer ids of aborted prefills
    # (transfer id, req id, its blocks now) of streamed prefills vLLM finished with
    # delay_free: report each in finished_sending once no chunk is left to pack out of them
    stream_finished: list[tuple[str, str, Blocks]] = field(default_factory=list)

    def empty(self) -> bool:
        return not (self.sends or self.recvs or self.cancels or self.drops or self.streams or self.stream_aborts
                    or self.stream_finished)


def chunk_ranges(t0: int, t1: int, block_size: int) -> list[tuple[int, int]]:
    """The wire format's chunking: one chunk per KV block touched by tokens [t0, t1).

    Both sides derive it from the token range alone, so a chunk can be packed as soon as
    its block is computed (streaming) and unpacked, or skipped, block by block.
    """
    if not 0 <= t0 < t1 or block_size <= 0:
        raise ValueError(f"bad token range [{t0}, {t1}) or block size {block_size}")
    first, last = t0 // block_size, -(-t1 // block_size)
    return [(max(t0, b * block_size), min(t1, (b + 1) * block_size)) for b in range(first, last)]


@dataclass(frozen=True)
class PluginConfig:
    """`kv_connector_extra_config` keys (all optional)."""

    side_host: str = "127.0.0.1"  # prefill worker's side channel (decode asks it to push)
    side_port: int = 14579  # + tp rank; defaults to KVTransferConfig.kv_port
    receiver_host: str = "127.0.0.1"
    receiver_port: int = 0  # decode Receiver's control port (0: any free port)
    receiver_capacity: int = 256 << 20
    sender_memory: int = 256 << 20
    lease_s: float = 120.0  # prefill holds finished blocks at most this long for a pull
    recv_timeout_s: float = 60.0  # decode: whole receive, ask to unpack-ready
    handshake_timeout_s: float = 5.0  # decode -> prefill "push" request round trip
    # Prefill: a decode receiver that leaves a heartbeat unanswered this long is lost. Long
    # on purpose: a dead decode is noticed at once (its data connection closes); this only
    # catches a hung one, and a live engine process on a loaded host can stall for seconds.
    peer_timeout_s: float = 15.0
    # Decode: a granted reservation whose prefill sends nothing (no bytes, no heartbeat)
    # this long is reclaimed. A dead prefill is noticed sooner (its connection closes).
    receiver_lease_s: float = 30.0
    decode_receivers: Mapping[str, str] = field(default_factory=dict)  # concurrent: URL -> address
    # Prefill: packed KV of requests whose decode has no room yet leaves `sender_memory`
    # for host memory, then files under spill_dir (SenderConfig's spill settings).
    spill_host_bytes: int = 0
    spill_disk_bytes: int = 0
    spill_dir: str | None = None
    spill_after_s: float | None = None
    # Prefill: the data path of its Sender ("tcp", or "nixl": one-sided WRITEs into the
    # decode's registered region). A decode Receiver accepts both, so only the prefill says.
    backend: str = "tcp"
    # UCX_* settings for NIXL (both roles; the process environment wins, see SenderConfig.ucx).
    ucx: Mapping[str, str] = field(default_factory=dict)

    @classmethod
    def from_extra(cls, extra: Mapping[str, Any] | None, *, kv_ip: str | None = None,
                   kv_port: int | None = None) -> "PluginConfig":
        extra = dict(extra or {})
        known = set(cls.__dataclass_fields__)
        unknown = sorted(k for k in extra if k not in known)
        if unknown:
            raise ValueError(f"unknown kv_connector_extra_config keys for PdxferConnector: {unknown}")
        if "side_host" not in extra and kv_ip:
            extra["side_host"] = kv_ip
        if "side_port" not in extra and kv_port:
            extra["side_port"] = int(kv_port)
        cfg = cls(**extra)
        for name in ("lease_s", "recv_timeout_s", "handshake_timeout_s", "peer_timeout_s", "receiver_lease_s"):
            if float(getattr(cfg, name)) <= 0:
                raise ValueError(f"{name} must be > 0")
        if cfg.receiver_capacity <= 0 or cfg.sender_memory <= 0:
            raise ValueError("receiver_capacity and sender_memory must be > 0")
        if cfg.spill_host_bytes < 0 or cfg.spill_disk_bytes < 0:
            raise ValueError("spill_host_bytes and spill_disk_bytes must be >= 0")
        if cfg.backend not in BACKENDS:
            raise ValueError(f"backend must be one of {', '.join(BACKENDS)}, got {cfg.backend!r}")
        if not isinstance(cfg.ucx, Mapping) or not all(
                isinstance(k, str) and k.startswith("UCX_") and isinstance(v, str) for k, v in cfg.ucx.items()):
            raise ValueError(f"ucx must map UCX_* names to strings, got {cfg.ucx!r}")
        return cfg
