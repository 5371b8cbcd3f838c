"""States, transition tables, events and read-only views of the admission controller.

Everything that decides *which call is allowed in which state* lives in the tables at the
top of this file (in the manner of h11's ``_state.py``); the controller only looks them
up. A call the tables do not allow raises :class:`AdmissionStateError` naming the
transfer, its state and the call, so an engine bug shows up as one clear line instead
of a leaked or double-freed buffer.

The life of one reservation::

    reserve ──▶ QUEUED ──(room frees, head of line)──▶ GRANTED ──deliver──▶ DELIVERED
                  │                                      │                    │ claim (no deadline after)
                  ▼                                      ▼                    ▼
                ENDED ◀──────────── abort / peer_lost / deadlines / shutdown / release

Every reservation reaches ENDED exactly once, and that moment is reported as exactly
one :class:`Ended` event. Ended reservations are forgotten, so their ids may be reused.
"""

from __future__ import annotations

import enum
import math
from dataclasses import asdict, dataclass, field
from typing import Any

from pdxfer.errors import PdxferError, RejectReason


class ReservationState(enum.Enum):
    QUEUED = "queued"  # waiting in the FIFO; owns no bytes
    GRANTED = "granted"  # owns an extent; the sender may write; lease + hard deadline apply
    DELIVERED = "delivered"  # commit verified; complete data waits for the consumer
    ENDED = "ended"  # bytes returned; never leaves this state


class EndReason(str, enum.Enum):
    RELEASED = "released"  # consumer released a delivered (committed) buffer
    ABORTED = "aborted"  # either side aborted
    LEASE_EXPIRED = "lease_expired"  # granted, sender went quiet past the lease
    DEADLINE = "deadline"  # the transfer's own hard deadline passed while granted
    QUEUE_TIMEOUT = "queue_timeout"  # still queued at its deadline
    CLAIM_TIMEOUT = "claim_timeout"  # delivered but nobody claimed it before claim_deadline
    PEER_LOST = "peer_lost"
    SHUTDOWN = "shutdown"


Q, G, D = ReservationState.QUEUED, ReservationState.GRANTED, ReservationState.DELIVERED

# Which states each per-transfer call accepts. Anything else raises AdmissionStateError.
# (``renew`` is the exception: traffic racing an expiry is normal, so it answers False.)
ALLOWED: dict[str, frozenset[ReservationState]] = {
    "renew": frozenset({G}),
    "deliver": frozenset({G}),
    "claim": frozenset({D}),  # and not yet claimed
    "release": frozenset({D}),
    "abort": frozenset({Q, G, D}),
}

# States a lost peer takes down. DELIVERED data is complete and verified: the consumer
# (local) still wants it even though the sender (remote) is gone.
PEER_LOST_ENDS: frozenset[ReservationState] = frozenset({Q, G})

# What a passed deadline means in each state (GRANTED has two deadlines; see controller).
EXPIRY_REASON: dict[ReservationState, EndReason] = {
    Q: EndReason.QUEUE_TIMEOUT,
    G: EndReason.LEASE_EXPIRED,  # or DEADLINE when the hard deadline came first
    D: EndReason.CLAIM_TIMEOUT,
}


class AdmissionStateError(PdxferError):
    """A call that the transition tables do not allow for this transfer's state.

    ``state`` is None when the id is unknown (never reserved, or already ended).
    """

    def __init__(self, transfer_id: str, state: ReservationState | None, method: str, detail: str = "") -> None:
        self.state = state
        self.method = method
        shown = state.name if state is not None else "UNKNOWN (never reserved or already ended)"
        msg = f"{method}() not allowed in state {shown}"
        if detail:
            msg += f" ({detail})"
        super().__init__(msg, transfer_id=transfer_id, waiting_for=None)


# -- answers to reserve() --------------------------------------------------------


@dataclass(frozen=True)
class Grant:
    """The sender may now write ``nbytes`` at ``offset`` of the receiver's region."""

    transfer_id: str
    peer: str
    offset: int
    nbytes: int  # requested bytes (the allocation may be larger; see ReservationView)
    lease_deadline: float


@dataclass(frozen=True)
class Queued:
    transfer_id: str
    position: int  # 0-based position in the FIFO when queued


@dataclass(frozen=True)
class Rejected:
    transfer_id: str
    reason: RejectReason
    detail: str


# -- events returned by calls that change other reservations -----------------------


@dataclass(frozen=True)
class Granted:
    """A queued waiter got admitted (the engine must now tell its sender)."""

    grant: Grant


@dataclass(frozen=True)
class Ended:
    """A reservation reached ENDED; reported exactly once per reservation."""

    transfer_id: str
    peer: str
    reason: EndReason
    state: ReservationState  # the state it ended from
    nbytes_freed: int  # allocated bytes returned to the pool; 0 for a queued or quarantined one
    quarantined: bool = False  # its extent stays out of the pool until settled or timed out


# -- read-only views ------------------------------------------------------------------


@dataclass(frozen=True)
class ReservationView:
    """Snapshot of one live reservation. A deadline field is None while it does not apply."""

    transfer_id: str
    peer: str
    state: ReservationState
    nbytes: int  # requested
    allocated: int  # aligned size taken (or to be taken, while queued) from the region
    offset: int | None  # None while queued
    lease_deadline: float | None  # GRANTED only
    deadline: float  # the transfer's hard deadline (applies while QUEUED and GRANTED)
    claim_deadline: float | None  # DELIVERED and not yet claimed only
    claimed: bool

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["state"] = self.state.value
        return d


@dataclass(frozen=True)
class Ledger:
    """Where every byte of the region is, at one moment: for tests, the CLI and metrics."""

    capacity: int
    reserved_bytes: int  # allocated bytes of GRANTED + DELIVERED
    free_bytes: int
    largest_free_extent: int
    waiting_count: int
    waiting_bytes: int  # aligned bytes the waiters will need
    granted_count: int
    delivered_count: int
    reservations: tuple[ReservationView, ...]
    counters: dict[str, int] = field(default_factory=dict)
    # Extents of ended one-sided (NIXL) reservations that a late WRITE could still land in:
    # out of the pool until the sender says its WRITEs are over, or the quarantine times out.
    quarantined_bytes: int = 0
    quarantined_count: int = 0

    def to_dict(self) -> dict[str, Any]:
        """JSON-able form (enums as their values)."""
        return {
            "capacity": self.capacity,
            "reserved_bytes": self.reserved_bytes,
            "free_bytes": self.free_bytes,
            "largest_free_extent": self.largest_free_extent,
            "waiting_count": self.waiting_count,
            "waiting_bytes": self.waiting_bytes,
            "granted_count": self.granted_count,
            "delivered_count": self.delivered_count,
            "reservations": [r.to_dict() for r in self.reservations],
            "counters": dict(self.counters),
            "quarantined_bytes": self.quarantined_bytes,
            "quarantined_count": self.quarantined_count,
        }


def zero_counters() -> dict[str, int]:
    """Every counter key present from the start, so metrics see a stable set of series."""
    c = {"granted_total": 0, "queued_total": 0, "rejected_total": 0, "ended_total": 0,
         "quarantined_total": 0, "quarantine_settled": 0, "quarantine_expired": 0}
    c.update({f"rejected_{r.value}": 0 for r in RejectReason})
    c.update({f"ended_{r.value}": 0 for r in EndReason})
    return c


class Record:
    """Mutable record of one live reservation (internal to the controller; views are what leave)."""

    __slots__ = (
        "transfer_id", "peer", "nbytes", "allocated", "state", "offset",
        "lease_deadline", "deadline", "claim_deadline", "claimed", "armed", "armed_at", "one_sided",
    )

    def __init__(self, transfer_id: str, peer: str, nbytes: int, allocated: int, deadline: float,
                 one_sided: bool = False) -> None:
        self.one_sided = one_sided  # the sender WRITEs into the extent itself (NIXL)
        self.transfer_id = transfer_id
        self.peer = peer
        self.nbytes = nbytes
        self.allocated = allocated
        self.state = Q
        self.offset: int | None = None
        self.lease_deadline: float | None = None
        self.deadline = deadline
        self.claim_deadline: float | None = None
        self.claimed = False
        self.armed: int | None = None  # sequence number of the valid heap entry
        self.armed_at = 0.0

    def due(self) -> float | None:
        """Earliest deadline that applies in the current state, or None."""
        if self.state is Q:
            return self.deadline
        if self.state is G:
            assert self.lease_deadline is not None
            return min(self.lease_deadline, self.deadline)
        if self.state is D and not self.claimed:
            return self.claim_deadline
        return None

    def view(self) -> ReservationView:
        return ReservationView(
            self.transfer_id, self.peer, self.state, self.nbytes, self.allocated, self.offset,
            self.lease_deadline, self.deadline, self.claim_deadline, self.claimed,
        )


def finite(x: object) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)
