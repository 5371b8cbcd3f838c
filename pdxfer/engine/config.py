"""Sender and receiver settings, with the defaults a production deployment wants.

Every wait has a bound here; tests shrink them to milliseconds instead of sleeping.
"""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass, field

from pdxfer.protocol.checksum import ALGORITHMS, DEVSUM64, XXH3
from pdxfer.protocol.frames import RECV_PIECE_BYTES
from pdxfer.protocol.messages import MAX_NIXL_WORKERS

BACKENDS = ("tcp", "nixl")


def _default_id(prefix: str) -> str:
    return f"{prefix}-{socket.gethostname()}-{os.getpid()}-{os.urandom(3).hex()}"


@dataclass(frozen=True)
class SenderConfig:
    memory_budget: int = 1 << 30  # bytes of chunks held for sending
    sender_id: str = field(default_factory=lambda: _default_id("send"))
    token: str | None = None  # shared secret checked by the receiver's HELLO
    deadline_s: float = 60.0  # whole transfer, submit to DONE
    submit_timeout_s: float = 10.0  # how long put() may wait for budget (backpressure)
    handshake_timeout_s: float = 5.0
    heartbeat_s: float = 1.0
    peer_timeout_s: float = 5.0  # no reply at all for this long while transfers are active
    # A RESERVE (or COMMIT) with no answer this long is sent again, then after twice as
    # long, up to resend_max_s: a reply lost with a control connection would otherwise
    # cost the transfer its deadline. The receiver answers a repeat where the transfer stands.
    resend_after_s: float = 1.0
    resend_max_s: float = 8.0
    lane_idle_s: float = 30.0  # close a peer's sockets after this long with nothing to do
    # False (default): each chunk is hashed by the lane's send loop right before its
    # bytes go out (xxhash releases the GIL; the engine's thread never hashes), which also
    # leaves the chunk in L2 for the send. hash_ahead > 0 (TCP lanes) hands the hashes to a
    # hashing thread, that many chunks ahead of the wire (sendq.hashahead): worth it only
    # where a core is spare. On this 2-vCPU host, with the receiver landing 256 KiB pieces,
    # 2 MiB ratios were c1 0.80/0.82 and c4 0.83/0.84 with hash_ahead=4 against c1
    # 0.85/0.86 and c4 0.95/0.98 with 0 (interleaved bench runs). True: hash in put(), on
    # the caller's thread: one more pass over cold memory, but it also catches a caller
    # that breaks the contract and changes a buffer before its transfer ended.
    checksum_on_put: bool = False
    hash_ahead: int = 0  # chunks; and at most hash_ahead_bytes beyond the first (cache-sized)
    hash_ahead_bytes: int = 16 << 20
    # Smaller chunks are hashed on the send loop: a 256 KiB hash takes ~10 µs, less than
    # the hand-off to the hashing thread and back (measured: 256 KiB ratios 0.74-0.93 with
    # hash-ahead, 0.93-1.18 without).
    hash_ahead_min_bytes: int = 1 << 20
    # Data path of every lane: "tcp" (one TCP connection per receiver) or "nixl" (one-sided
    # WRITEs into the receiver's registered region; UCX picks RDMA, shared memory or TCP).
    backend: str = "tcp"
    # UCX_* settings for the NIXL agent. The process environment wins over these, and these
    # win over pdxfer's loopback defaults (pdxfer.transport.nixl_agent.UCX_DEFAULTS).
    ucx: dict[str, str] = field(default_factory=dict, hash=False)
    nixl_spin_s: float = 0.0  # progress thread: poll back to back this long after an event,
    nixl_max_sleep_s: float = 1e-3  # then back off up to this; parked (0 CPU) when nothing is in flight
    # NIXL workers (agent + progress thread each) that post a lane's chunks round-robin.
    # Over shared memory each WRITE is a CPU copy on the posting thread, so 2 can copy on
    # two cores (figures in transport.nixl.NixlSendSide); idle workers are parked threads.
    nixl_workers: int = 2
    # NIXL progress threads (the workers' copies) run this many nice steps below the rest
    # of the process (Linux; 0: same priority). They are bulk work: when they preempt the
    # send loop, the loop's next chunk, COMMIT and replies wait, and so does the
    # pipeline. 2 vCPUs here, 2 MiB chunks, 4 transfers in flight, interleaved bench
    # rounds with both ends at 10 against 0: ratio 0.832 against 0.760 (8 rounds, 7
    # better; 3.58 against 3.10 GB/s), then 0.841 against 0.815 (6 rounds, 3 better);
    # one in flight unchanged (0.665/0.663, 0.677/0.690). In a serving process it also
    # keeps the copies from taking cores from the engine.
    nixl_nice: int = 10
    # Spill tiers (issue 5). Chunks of transfers that have no GRANT yet move out of the
    # memory budget into host memory (pinned where CUDA exists), then into files under
    # `spill_dir`, when put() would otherwise wait for budget, or once their transfer has
    # waited `spill_after_s` for a GRANT. 0 bytes disables a tier; both 0: no spilling.
    spill_host_bytes: int = 0
    spill_disk_bytes: int = 0
    spill_dir: str | None = None  # default: <tempdir>/pdxfer-spill (stale files of dead processes are removed)
    spill_after_s: float | None = None  # None: spill only under budget pressure
    restore_buffer_bytes: int = 64 << 20  # per lane: disk-tier chunks read back ahead of the wire
    restore_ahead: int = 4  # chunks read back ahead of the one being sent

    @property
    def spill_enabled(self) -> bool:
        return self.spill_host_bytes > 0 or self.spill_disk_bytes > 0

    def __post_init__(self) -> None:
        for name in ("deadline_s", "submit_timeout_s", "handshake_timeout_s", "heartbeat_s", "peer_timeout_s",
                     "lane_idle_s", "nixl_max_sleep_s", "restore_buffer_bytes", "restore_ahead", "resend_after_s"):
            if getattr(self, name) <= 0:
                raise ValueError(f"SenderConfig.{name} must be > 0, got {getattr(self, name)}")
        if self.resend_max_s < self.resend_after_s:
            raise ValueError(f"SenderConfig.resend_max_s ({self.resend_max_s}) must be >= resend_after_s "
                             f"({self.resend_after_s})")
        if self.memory_budget <= 0:
            raise ValueError(f"SenderConfig.memory_budget must be > 0, got {self.memory_budget}")
        for name in ("spill_host_bytes", "spill_disk_bytes", "hash_ahead", "hash_ahead_bytes", "hash_ahead_min_bytes"):
            if getattr(self, name) < 0:
                raise ValueError(f"SenderConfig.{name} must be >= 0, got {getattr(self, name)}")
        if self.spill_after_s is not None and self.spill_after_s < 0:
            raise ValueError(f"SenderConfig.spill_after_s must be >= 0 or None, got {self.spill_after_s}")
        if self.backend not in BACKENDS:
            raise ValueError(f"SenderConfig.backend must be one of {BACKENDS}, got {self.backend!r}")
        if not 1 <= self.nixl_workers <= MAX_NIXL_WORKERS:
            raise ValueError(f"SenderConfig.nixl_workers must be in 1..{MAX_NIXL_WORKERS}, got {self.nixl_workers}")
        _check_nice("SenderConfig", self.nixl_nice)
        _check_ucx("SenderConfig", self.ucx)


@dataclass(frozen=True)
class ReceiverConfig:
    capacity: int = 1 << 30  # bytes of receive buffer; every reservation lives inside it
    host: str = "127.0.0.1"
    control_port: int = 0  # 0: pick a free port
    data_port: int = 0
    receiver_id: str = field(default_factory=lambda: _default_id("recv"))
    token: str | None = None
    lease_s: float = 10.0  # a granted transfer with no traffic/heartbeat for this long is reclaimed
    claim_timeout_s: float = 60.0  # a delivered transfer nobody waits for is reclaimed after this
    alignment: int = 4096
    # TCP: a chunk's payload is received, and hashed, in pieces of at most this many bytes
    # (pdxfer.protocol.frames.RECV_PIECE_BYTES says why 1 MiB).
    recv_piece_bytes: int = RECV_PIECE_BYTES
    max_queue: int = 100_000
    remember_failures: int = 10_000  # late waiters still learn why a transfer failed
    # Data paths this receiver accepts. "nixl" costs nothing until a NIXL sender says HELLO:
    # then the agent is created (importing nixl, ~1.5 s once) and the region registered; a
    # host where nixl does not import answers such a HELLO with an error, TCP keeps working.
    backends: tuple[str, ...] = BACKENDS
    ucx: dict[str, str] = field(default_factory=dict, hash=False)  # as SenderConfig.ucx
    nixl_setup_timeout_s: float = 30.0  # first NIXL HELLO: agent creation + region registration
    # True: create the NIXL agent and register the region as the receiver starts (in the
    # background; the receiver serves at once) instead of at the first NIXL HELLO. A
    # receiver that restarts then meets its reconnecting senders ready, rather than making
    # each wait seconds for nixl's import and agent (seen under load: the first transfer
    # after a restart missed a 3 s deadline), and a host region's prefault starts early.
    nixl_eager: bool = False
    nixl_spin_s: float = 0.0
    nixl_max_sleep_s: float = 1e-3
    nixl_nice: int = 10  # the progress thread (it hashes landed chunks), as SenderConfig.nixl_nice
    nixl_peer_idle_s: float = 300.0  # forget a NIXL peer silent this long with nothing reserved
    # A NIXL sender WRITEs into its extent itself, so when a granted NIXL transfer ends
    # abnormally (lease, deadline, peer lost, failed check) a late WRITE could still land
    # there: the extent is kept out of the pool until the sender says its WRITEs are over
    # (its ABORT, sent once they finished) or for this long.
    nixl_quarantine_s: float = 30.0
    # Where the receive region lives: "cpu" (host memory), or "cuda" / "cuda:N" (one GPU's
    # memory, registered with NIXL as VRAM: a GPU sender WRITEs into it directly). A GPU
    # region takes NIXL only: TCP lands bytes with recv_into, which needs host memory.
    device: str = "cpu"
    # Chunk checksum the region is checked with (pdxfer.protocol.checksum); None: "xxh3"
    # on the host, "devsum64" on a GPU (computed there by a kernel).
    checksum: str | None = None
    # "host:port" senders dial for TCP data, where that is not the listening address: a
    # container port mapping, a NAT, or `pdxfer chaos`'s fault-injecting relay. "": the
    # address the data listener is bound to.
    advertise_data: str = ""

    def __post_init__(self) -> None:
        if self.capacity <= 0:
            raise ValueError(f"ReceiverConfig.capacity must be > 0, got {self.capacity}")
        if self.advertise_data:
            host, sep, port = self.advertise_data.rpartition(":")
            if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
                raise ValueError(f"ReceiverConfig.advertise_data must be 'host:port' (port 1-65535), "
                                 f"got {self.advertise_data!r}")
        cuda_index(self.device)  # raises on anything but cpu / cuda / cuda:N
        if self.device != "cpu" and "tcp" in self.backends:
            raise ValueError(f"ReceiverConfig.device={self.device!r} needs backends=('nixl',): the tcp data path "
                             f"lands bytes in host memory only (got backends={tuple(self.backends)})")
        if self.checksum is not None and self.checksum not in ALGORITHMS:
            raise ValueError(f"ReceiverConfig.checksum must be one of {ALGORITHMS} or None, got {self.checksum!r}")
        if self.nixl_quarantine_s < 0:
            raise ValueError(f"ReceiverConfig.nixl_quarantine_s must be >= 0, got {self.nixl_quarantine_s}")
        if self.recv_piece_bytes < 4096:
            raise ValueError(f"ReceiverConfig.recv_piece_bytes must be >= 4096, got {self.recv_piece_bytes}")
        for name in ("lease_s", "claim_timeout_s", "nixl_setup_timeout_s", "nixl_max_sleep_s", "nixl_peer_idle_s"):
            if getattr(self, name) <= 0:
                raise ValueError(f"ReceiverConfig.{name} must be > 0, got {getattr(self, name)}")
        object.__setattr__(self, "backends", tuple(self.backends))
        bad = [b for b in self.backends if b not in BACKENDS]
        if bad or not self.backends:
            raise ValueError(f"ReceiverConfig.backends must be a non-empty subset of {BACKENDS}, got {self.backends}")
        _check_nice("ReceiverConfig", self.nixl_nice)
        _check_ucx("ReceiverConfig", self.ucx)


    @property
    def checksum_algorithm(self) -> str:
        if self.checksum is not None:
            return self.checksum
        return XXH3 if self.device == "cpu" else DEVSUM64


def cuda_index(device: str) -> int | None:
    """None for "cpu", the GPU index for "cuda" (0) or "cuda:N"; ValueError otherwise."""
    if device == "cpu":
        return None
    if device == "cuda":
        return 0
    head, _, index = device.partition(":")
    if head == "cuda" and index.isdigit():
        return int(index)
    raise ValueError(f"ReceiverConfig.device must be 'cpu', 'cuda' or 'cuda:N', got {device!r}")


def _check_nice(owner: str, nice: int) -> None:
    if isinstance(nice, bool) or not isinstance(nice, int) or not 0 <= nice <= 19:
        raise ValueError(f"{owner}.nixl_nice must be an int in 0..19 (nice steps below the process), got {nice!r}")


def _check_ucx(owner: str, ucx: dict[str, str]) -> None:
    bad = [k for k in ucx if not k.startswith("UCX_")]
    if bad:
        raise ValueError(f"{owner}.ucx keys must be UCX_* settings, got {bad}")
