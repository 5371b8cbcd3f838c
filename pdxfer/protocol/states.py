"""Transition tables for one transfer, as seen by each side.

Everything that decides whether a step is allowed lives here, as data. The tables do
not know about sockets, clocks or the admission controller; `outbound.py` and
`inbound.py` consult them and raise a typed error for any step they do not list.
"""

from __future__ import annotations

from enum import Enum


class OutState(str, Enum):
    """Sender side."""

    WAITING_PEER = "waiting_peer"  # lane handshake (HELLO) not finished yet
    RESERVING = "reserving"  # RESERVE sent, no answer yet
    QUEUED = "queued"  # receiver has no room yet; we wait in its FIFO
    GRANTED = "granted"  # room reserved; chunks stream as they become ready
    COMMITTING = "committing"  # every chunk sent, COMMIT sent, waiting for DONE
    DONE = "done"
    FAILED = "failed"


class OutEvent(str, Enum):
    SEND_RESERVE = "send_reserve"
    RECV_QUEUED = "recv_queued"
    RECV_GRANT = "recv_grant"
    RECV_REJECT = "recv_reject"
    SEND_COMMIT = "send_commit"
    RECV_DONE = "recv_done"
    RECV_FAILED = "recv_failed"
    FAIL = "fail"  # local: deadline, peer lost, abort, shutdown


_LIVE_OUT = (OutState.WAITING_PEER, OutState.RESERVING, OutState.QUEUED, OutState.GRANTED, OutState.COMMITTING)

OUT_TRANSITIONS: dict[tuple[OutState, OutEvent], OutState] = {
    (OutState.WAITING_PEER, OutEvent.SEND_RESERVE): OutState.RESERVING,
    (OutState.RESERVING, OutEvent.RECV_QUEUED): OutState.QUEUED,
    (OutState.RESERVING, OutEvent.RECV_GRANT): OutState.GRANTED,
    (OutState.QUEUED, OutEvent.RECV_GRANT): OutState.GRANTED,
    (OutState.RESERVING, OutEvent.RECV_REJECT): OutState.FAILED,
    (OutState.QUEUED, OutEvent.RECV_REJECT): OutState.FAILED,
    (OutState.GRANTED, OutEvent.SEND_COMMIT): OutState.COMMITTING,
    (OutState.COMMITTING, OutEvent.RECV_DONE): OutState.DONE,
    **{(s, OutEvent.RECV_FAILED): OutState.FAILED for s in _LIVE_OUT if s != OutState.WAITING_PEER},
    **{(s, OutEvent.FAIL): OutState.FAILED for s in _LIVE_OUT},
}


class InState(str, Enum):
    """Receiver side, from GRANT on (queuing is the admission controller's business)."""

    RECEIVING = "receiving"
    COMMIT_PENDING = "commit_pending"  # COMMIT overtook the last DATA frames (two channels)
    DELIVERED = "delivered"
    FAILED = "failed"


class InEvent(str, Enum):
    RECV_CHUNK = "recv_chunk"
    RECV_COMMIT = "recv_commit"
    LAST_CHUNK = "last_chunk"  # the final missing chunk arrived
    VERIFIED = "verified"
    FAIL = "fail"


IN_TRANSITIONS: dict[tuple[InState, InEvent], InState] = {
    (InState.RECEIVING, InEvent.RECV_CHUNK): InState.RECEIVING,
    (InState.COMMIT_PENDING, InEvent.RECV_CHUNK): InState.COMMIT_PENDING,
    (InState.RECEIVING, InEvent.RECV_COMMIT): InState.COMMIT_PENDING,
    (InState.COMMIT_PENDING, InEvent.VERIFIED): InState.DELIVERED,
    (InState.RECEIVING, InEvent.FAIL): InState.FAILED,
    (InState.COMMIT_PENDING, InEvent.FAIL): InState.FAILED,
}


def step(table: dict, state: Enum, event: Enum, what: str) -> Enum:
    """Next state, or a ProtocolError naming state and event if the table forbids it."""
    from pdxfer.errors import ProtocolError

    try:
        return table[(state, event)]
    except KeyError:
        raise ProtocolError(f"{what}: event {event.value} not allowed in state {state.value}") from None
