"""The receiver core's TCP half: data connections → the transfers they carry.

The `DataSink` of every inbound data connection (`transport.tcp.DataServerProtocol`),
on the receiver's event loop like `ReceiverCore`, which owns it. A frame's payload lands
straight in its transfer's reserved range (`resolve` names it, after checking that the
slot was granted to the peer that owns this connection); a connection's loss is its
peer's death, which ends that peer's reservations at once.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import structlog

from pdxfer.admission import Ended
from pdxfer.errors import IntegrityError, ProtocolError
from pdxfer.protocol import frames as f
from pdxfer.transport.tcp import DataServerProtocol

if TYPE_CHECKING:
    from pdxfer.engine.receiver_core import ReceiverCore

log = structlog.get_logger("pdxfer.receiver")


class TcpInbound:
    def __init__(self, core: "ReceiverCore") -> None:
        self.core = core

    def resolve(self, conn: DataServerProtocol, header: f.FrameHeader) -> memoryview | None:
        core = self.core
        if core.region.on_gpu:  # HELLO_OK never offers tcp then; a client that tries anyway
            raise ProtocolError("this receiver's region is in GPU memory: it takes NIXL WRITEs, not TCP data")
        t = core.inbound.get(header.slot)
        if t is None:
            if header.slot < core._next_slot:
                return None  # the transfer ended meanwhile: read and discard
            raise ProtocolError(f"data frame for slot {header.slot} that was never granted")
        info = core._by_token.get(conn.conn_token or -1)
        if info is None or info.identity.decode(errors="replace") != t.peer:
            raise ProtocolError(f"slot {header.slot} belongs to another peer", transfer_id=t.tid)
        core.admission.renew(t.tid, now=core.loop.time())
        return t.destination(header)

    def on_frame(self, conn: DataServerProtocol, event: f.FrameEvent) -> None:
        core = self.core
        if isinstance(event, f.ConnectionHello):
            info = core._by_token.get(event.conn_token)
            if info is None:
                raise ProtocolError("data connection with an unknown token")
            if info.conn is not None:
                raise ProtocolError("second data connection for one peer")
            info.conn = conn
        elif isinstance(event, f.ChunkReceived):
            t = core.inbound.get(event.header.slot)
            if t is None:
                return
            actual = event.checksum  # xxh3, computed piece by piece as the bytes landed
            if actual is None:  # the region checks another algorithm: over the whole chunk
                actual = core.region.checksums([event.view])[0]
            try:
                t.chunk_arrived(event.header, event.view, actual)
            except IntegrityError as exc:
                core._fail_transfer(t, exc, "integrity")
                return
            if t.ready_to_verify:
                core._verify(t)

    def on_lost(self, conn: DataServerProtocol, error: Exception | None) -> None:
        core = self.core
        info = core._by_token.get(conn.conn_token or -1)
        if info is None or info.conn is not conn:
            return
        key = info.identity.decode(errors="replace")
        core.peers.pop(key, None)
        core._by_token.pop(info.conn_token, None)
        events = core.admission.peer_lost(key, now=core.loop.time())
        if events or error is not None:
            log.warning("peer_lost", peer=key, sender=info.sender_id, error=str(error) if error else "closed",
                        reservations_ended=sum(isinstance(e, Ended) for e in events))
        else:
            log.info("peer_disconnected", peer=key, sender=info.sender_id)
        core._handle(events)
        core._schedule()
