"""What the receiver core remembers about its peers and queued reservations, and which
typed error each way a reservation can end is reported with.

Plain records without behaviour, kept apart from `receiver_core` so the core reads as
the logic it is: admission events turned into wire messages and waiter wake-ups.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

from pdxfer.admission import EndReason
from pdxfer.errors import LeaseExpired, PdxferError, PeerLost, TransferAborted, TransferTimeout
from pdxfer.layout.payload import Payload
from pdxfer.transport.tcp import DataServerProtocol

END_ERRORS: dict[EndReason, tuple[type[PdxferError], str]] = {
    EndReason.LEASE_EXPIRED: (LeaseExpired, "lease_expired"),
    EndReason.DEADLINE: (TransferTimeout, "deadline"),
    EndReason.QUEUE_TIMEOUT: (TransferTimeout, "queue_timeout"),
    EndReason.PEER_LOST: (PeerLost, "peer_lost"),
    EndReason.ABORTED: (TransferAborted, "aborted"),
    EndReason.SHUTDOWN: (TransferAborted, "shutdown"),
    EndReason.CLAIM_TIMEOUT: (TransferTimeout, "claim_timeout"),
}


@dataclass
class PeerInfo:
    sender_id: str
    identity: bytes
    conn_token: int
    conn: DataServerProtocol | None = None
    nixl_agent: str | None = None  # set for peers that move data with NIXL
    last_seen: float = 0.0


@dataclass
class Pending:
    identity: bytes
    cid: int
    payload: Payload


def keep_recent(recent: OrderedDict, key: str, value: Any, limit: int) -> None:
    """Remember `key` among the last `limit` outcomes (late waiters, repeated requests)."""
    recent[key] = value
    while len(recent) > limit:
        recent.popitem(last=False)
