"""What a receiver's answers mean for the sender: whether its HELLO_OK is one this lane
can work with, and REJECT or FAILED as the typed error the transfer's future fails
with. No I/O: the lane looks the answer up here and acts on it."""

from __future__ import annotations

from pdxfer.errors import (
    AdmissionRejected, IntegrityError, LeaseExpired, PdxferError, ProtocolError, RejectReason,
    TransferAborted, TransferTimeout,
)
from pdxfer.protocol import messages as m
from pdxfer.protocol.checksum import ALGORITHMS

_RECEIVER_ERRORS: dict[str, type[PdxferError]] = {
    "integrity": IntegrityError,
    "lease_expired": LeaseExpired,
    "deadline": TransferTimeout,
    "protocol": ProtocolError,
}


def hello_error(ok: m.HelloOk, *, backend: str, peer: str) -> ProtocolError | None:
    """Why this HELLO_OK cannot serve a lane of `backend`, or None: the data path must be
    offered (with NIXL metadata for nixl), and the chunk checksum one we can compute."""
    if backend not in ok.capabilities:
        return ProtocolError(f"receiver does not accept backend {backend!r} (it offers {ok.capabilities})",
                             peer=peer, waiting_for="hello")
    if ok.checksum not in ALGORITHMS:
        return ProtocolError(f"receiver checks chunks with {ok.checksum!r}, which this sender does not know "
                             f"({', '.join(ALGORITHMS)})", peer=peer, waiting_for="hello")
    if backend == "nixl" and not ok.nixl_md:
        return ProtocolError("receiver offered nixl without agent metadata", peer=peer, waiting_for="hello")
    return None


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
