"""Typed errors shared by every layer.

Every error that can reach a user names the transfer, the peer and what was being
awaited, because "timeout" alone is what makes the hangs in other PD connectors so
hard to debug. Errors carry their fields as attributes so callers can branch on them
without parsing messages.
"""

from __future__ import annotations

from enum import Enum


class RejectReason(str, Enum):
    """Why a receiver refused a reservation; travels on the wire as its value."""

    TOO_LARGE = "too_large"  # can never fit: bigger than the whole pool
    QUEUE_TIMEOUT = "queue_timeout"  # waited for room until the deadline passed
    QUEUE_FULL = "queue_full"  # the wait queue itself is at its bound
    DUPLICATE = "duplicate"  # a transfer with this id is already known
    SHUTTING_DOWN = "shutting_down"
    BAD_REQUEST = "bad_request"  # sizes or counts that fail validation
    AUTH = "auth"  # HELLO carried a wrong token


class PdxferError(Exception):
    """Base class: every error pdxfer raises on purpose."""

    def __init__(
        self,
        message: str,
        *,
        transfer_id: str | None = None,
        peer: str | None = None,
        waiting_for: str | None = None,
    ) -> None:
        self.transfer_id = transfer_id
        self.peer = peer
        self.waiting_for = waiting_for
        self.message = message  # without the context fields, to build on
        parts = [message]
        if transfer_id is not None:
            parts.append(f"transfer={transfer_id}")
        if peer is not None:
            parts.append(f"peer={peer}")
        if waiting_for is not None:
            parts.append(f"waiting_for={waiting_for}")
        super().__init__(" ".join(parts))


class ProtocolError(PdxferError):
    """The peer sent something the protocol does not allow; the connection is dropped."""


class AdmissionRejected(PdxferError):
    """The receiver refused to reserve room for the transfer."""

    def __init__(self, message: str, *, reason: RejectReason, **kw: object) -> None:
        self.reason = reason
        super().__init__(f"{message} reason={reason.value}", **kw)  # type: ignore[arg-type]


class TransferTimeout(PdxferError):
    """A deadline passed; `waiting_for` says which step never finished."""


class PeerLost(PdxferError):
    """The peer closed, crashed or stopped answering heartbeats."""


class IntegrityError(PdxferError):
    """A checksum or digest did not match the bytes."""


class TransferAborted(PdxferError):
    """The transfer was aborted by either side, or by shutdown."""


class Backpressure(PdxferError):
    """The send queue's memory budget stayed full until the submit deadline."""


class SpillExhausted(Backpressure):
    """The memory budget stayed full and no spill tier had room for its held chunks."""


class LeaseExpired(PdxferError):
    """The receiver reclaimed a reservation whose sender went quiet."""
