"""What a receiver's REJECT or FAILED means for the sender, as the typed error the
transfer's future fails with. No I/O: the lane looks the answer up here and fails the
transfer with it."""

from __future__ import annotations

from pdxfer.errors import (
    AdmissionRejected, IntegrityError, LeaseExpired, PdxferError, ProtocolError, RejectReason,
    TransferAborted, TransferTimeout,
)
from pdxfer.protocol import messages as m

_RECEIVER_ERRORS: dict[str, type[PdxferError]] = {
    "integrity": IntegrityError,
    "lease_expired": LeaseExpired,
    "deadline": TransferTimeout,
    "protocol": ProtocolError,
}


def rejection_error(msg: m.Reject, *, tid: str, state: str, peer: str) -> PdxferError:
    """REJECT of our RESERVE. A queue timeout is our own deadline, which the receiver saw
    pass first; an unknown reason (a newer receiver) reads as a bad request."""
    try:
        reason = RejectReason(msg.reason)
    except ValueError:
        reason = RejectReason.BAD_REQUEST
    if reason is RejectReason.QUEUE_TIMEOUT:
        return TransferTimeout(f"deadline passed in state {state} (receiver: {msg.detail})",
                               transfer_id=tid, peer=peer, waiting_for=state)
    return AdmissionRejected(f"receiver rejected: {msg.detail}", reason=reason, transfer_id=tid, peer=peer)


def failure_error(msg: m.Failed, *, tid: str, peer: str) -> PdxferError:
    """FAILED of a granted transfer; an unknown cause reads as an abort."""
    cls = _RECEIVER_ERRORS.get(msg.error, TransferAborted)
    return cls(f"receiver failed the transfer ({msg.error}): {msg.detail}", transfer_id=tid, peer=peer)
