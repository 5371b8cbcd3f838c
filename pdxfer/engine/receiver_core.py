"""The decode side's loop-thread logic: admission, control replies, data landing.

Runs only on the receiver's event loop, so it needs no locks. It is the one place where
the admission controller's events turn into wire messages and waiter wake-ups: a
GRANT for a waiter admitted later, a FAILED for a lease that expired, a typed error for
whoever waits on a transfer that ended badly.

Data arrives on TCP connections (`receiver_tcp`) or, for peers that said HELLO with
"nixl", as one-sided WRITEs announced by notifications (`receiver_nixl`).
A NIXL peer has no data connection whose loss would end its reservations; its leases
(renewed by heartbeats and by every notification) do that instead.
"""

from __future__ import annotations

import asyncio
import hmac
import os
from collections import OrderedDict
from typing import Any, Callable

import msgspec
import structlog

from pdxfer.admission import (
    AdmissionController, Ended, EndReason, Grant, Granted, Queued, Rejected,
)
from pdxfer.engine.config import ReceiverConfig
from pdxfer.engine.receiver_nixl import NixlInbound
from pdxfer.engine.receiver_records import END_ERRORS, Pending, PeerInfo, keep_recent
from pdxfer.engine.region import ReceiveRegion
from pdxfer.engine.receiver_tcp import TcpInbound
from pdxfer.errors import IntegrityError, PdxferError, ProtocolError, TransferAborted
from pdxfer.layout.payload import Payload
from pdxfer.protocol import messages as m
from pdxfer.protocol.inbound import InboundTransfer
from pdxfer.transport.control import ControlServer

log = structlog.get_logger("pdxfer.receiver")

class ReceiverCore:
    def __init__(self, cfg: ReceiverConfig, region: ReceiveRegion, make_received: Callable[..., Any]) -> None:
        self.cfg = cfg
        self.region = region
        self.admission = AdmissionController(cfg.capacity, lease_s=cfg.lease_s, alignment=cfg.alignment,
                                             max_queue=cfg.max_queue, quarantine_s=cfg.nixl_quarantine_s)
        self._make_received = make_received
        self.loop = asyncio.get_running_loop()
        self.peers: dict[str, PeerInfo] = {}  # key: control identity (decoded)
        self._by_token: dict[int, PeerInfo] = {}
        self.pending: dict[str, Pending] = {}  # queued reservations
        self.inbound: dict[int, InboundTransfer] = {}  # slot -> transfer
        self._slot_of: dict[str, int] = {}
        self._reply_to: dict[str, tuple[bytes, int]] = {}
        self._next_slot = 1
        self.delivered: dict[str, Any] = {}  # tid -> ReceivedTransfer not yet claimed
        self.handed: dict[str, Any] = {}  # tid -> ReceivedTransfer claimed by a consumer, not yet released
        self.waiters: dict[str, list[asyncio.Future]] = {}
        self.failures: OrderedDict[str, PdxferError] = OrderedDict()
        # Answers that a retransmitted request gets again: the GRANT of each open
        # transfer, and (bounded, like `failures`) which peer each recent DONE went to.
        self._grants: dict[str, m.Grant] = {}
        self._done: OrderedDict[str, str] = OrderedDict()
        self.on_transfer: Callable[[Any], None] | None = None
        self._timer: asyncio.TimerHandle | None = None
        self.control: ControlServer | None = None
        self.data_address = ""
        self.nixl: NixlInbound | None = NixlInbound(self, region) if "nixl" in cfg.backends else None
        self.tcp = TcpInbound(self)  # the DataSink of every inbound data connection

    @property
    def capabilities(self) -> list[str]:
        offered = [b for b in self.cfg.backends if b != "nixl"]
        if self.nixl is not None and not self.nixl.unavailable:
            offered.append("nixl")
        return offered

    # ------------------------------------------------------------------ control
    def on_control(self, identity: bytes, msg: m.Message) -> None:
        key = identity.decode(errors="replace")
        if isinstance(msg, m.Hello):
            self._on_hello(identity, key, msg)
            return
        peer = self.peers.get(key)
        if peer is None:
            self._send(identity, m.Error(cid=msg.cid, error="no_hello", detail="send HELLO first"))
            return
        now = self.loop.time()
        peer.last_seen = now
        if isinstance(msg, m.Heartbeat):
            self.admission.renew_peer(key, now=now)
            self._send(identity, m.HeartbeatAck(cid=msg.cid))
        elif isinstance(msg, m.Reserve):
            self._on_reserve(identity, key, msg, now)
        elif isinstance(msg, m.Commit):
            self._on_commit(identity, msg)
        elif isinstance(msg, m.Abort):
            # A sender's ABORT comes after its last WRITE finished (NIXL), so nothing of it
            # can land any more: no quarantine, and a quarantined extent is settled.
            if self.admission.get(msg.tid) is not None:
                if self._owner(msg.tid) == key:
                    self._handle(self.admission.abort(msg.tid, EndReason.ABORTED, now=now, writes_over=True))
            elif msg.tid in self.failures:
                self._handle(self.admission.settle(msg.tid, key, now=now))
            else:
                # Aborted before its RESERVE was sent: wake whoever waits for it now,
                # rather than at their own timeout.
                self._remember(msg.tid, TransferAborted(f"sender aborted before reserving: {msg.reason}",
                                                        transfer_id=msg.tid, peer=key))
        else:
            log.error("control_unexpected", peer=key, msg=type(msg).__name__)
        self._schedule()

    def _on_hello(self, identity: bytes, key: str, msg: m.Hello) -> None:
        if self.cfg.token is not None and not hmac.compare_digest((msg.token or "").encode(), self.cfg.token.encode()):
            log.warning("hello_bad_token", peer=key, sender=msg.sender_id)
            self._send(identity, m.Error(cid=msg.cid, error="auth", detail="bad or missing token"))
            return
        if self.nixl is not None:
            self.nixl.prune_idle_peers()
        if "nixl" in msg.capabilities:
            if self.nixl is None:
                self._send(identity, m.Error(cid=msg.cid, error="unsupported",
                                             detail=f"this receiver accepts {list(self.cfg.backends)}, not nixl"))
                return
            self.nixl.hello(identity, key, msg, lambda md: self._accept_hello(identity, key, msg, md))
            return
        self._accept_hello(identity, key, msg, None)

    def _accept_hello(self, identity: bytes, key: str, msg: m.Hello, nixl_md: bytes | None) -> None:
        token = int.from_bytes(os.urandom(8), "little")
        info = PeerInfo(msg.sender_id, identity, token, nixl_agent=msg.nixl_agent if nixl_md else None,
                        last_seen=self.loop.time())
        self.peers[key] = info
        self._by_token[token] = info
        self._send(identity, m.HelloOk(cid=msg.cid, receiver_id=self.cfg.receiver_id, capabilities=self.capabilities,
                                       data_address=self.data_address, conn_token=token,
                                       lease_ms=int(self.cfg.lease_s * 1000), nixl_md=nixl_md,
                                       nixl_mem=self.region.mem, nixl_dev=self.region.dev,
                                       checksum=self.region.algorithm))

    def _on_reserve(self, identity: bytes, key: str, msg: m.Reserve, now: float) -> None:
        payload = Payload(tuple(msg.chunk_sizes))
        if self._answer_again(identity, key, msg, payload):
            return
        peer = self.peers.get(key)
        res = self.admission.reserve(msg.tid, key, payload.total_bytes, now=now, deadline=now + msg.deadline_ms / 1000,
                                     one_sided=peer is not None and peer.nixl_agent is not None)
        self.failures.pop(msg.tid, None)
        if isinstance(res, Rejected):
            log.info("reserve_rejected", transfer_id=msg.tid, peer=key, reason=res.reason.value, detail=res.detail)
            self._send(identity, m.Reject(cid=msg.cid, tid=msg.tid, reason=res.reason.value, detail=res.detail))
            return
        self._reply_to[msg.tid] = (identity, msg.cid)
        if isinstance(res, Queued):
            self.pending[msg.tid] = Pending(identity, msg.cid, payload)
            self._send(identity, m.Queued(cid=msg.cid, tid=msg.tid, position=res.position))
        else:
            self._open(res, payload)

    def _answer_again(self, identity: bytes, key: str, msg: m.Reserve, payload: Payload) -> bool:
        """A RESERVE its sender sent again (no answer reached it: a reply lost with a
        control connection, or refused for a failed seal): answer where the transfer
        stands -- still queued, or the same GRANT -- instead of rejecting a duplicate."""
        view = self.admission.get(msg.tid)
        if view is None or view.peer != key:
            return False
        pend = self.pending.get(msg.tid)
        grant = self._grants.get(msg.tid)
        slot = self._slot_of.get(msg.tid)
        same = (pend.payload if pend is not None else
                self.inbound[slot].payload if slot is not None and slot in self.inbound else None)
        if same is None or same.chunk_sizes != payload.chunk_sizes:
            return False  # delivered already, or another transfer under a reused id: a real duplicate
        self._reply_to[msg.tid] = (identity, msg.cid)
        if pend is not None:
            self.pending[msg.tid] = Pending(identity, msg.cid, payload)
            self._send(identity, m.Queued(cid=msg.cid, tid=msg.tid, position=0))
        elif grant is not None:
            self._send(identity, msgspec.structs.replace(grant, cid=msg.cid))
        log.info("reserve_answered_again", transfer_id=msg.tid, peer=key, state=view.state.value)
        return True

    def _open(self, grant: Grant, payload: Payload) -> None:
        slot = self._next_slot
        self._next_slot += 1
        view = self.region.buffer[grant.offset : grant.offset + payload.total_bytes]
        self.inbound[slot] = InboundTransfer(grant.transfer_id, grant.peer, slot, payload, view)
        self._slot_of[grant.transfer_id] = slot
        identity, cid = self._reply_to[grant.transfer_id]
        info = self.peers.get(grant.peer)
        addr = None
        if info is not None and info.nixl_agent is not None and self.nixl is not None:
            addr = self.nixl.granted(slot, grant.offset, payload.total_bytes)
        reply = m.Grant(cid=cid, tid=grant.transfer_id, slot=slot, lease_ms=int(self.cfg.lease_s * 1000), addr=addr)
        self._grants[grant.transfer_id] = reply
        self._send(identity, reply)

    def _owner(self, tid: str) -> str | None:
        view = self.admission.get(tid)
        return view.peer if view is not None else None

    def _on_commit(self, identity: bytes, msg: m.Commit) -> None:
        slot = self._slot_of.get(msg.tid)
        t = self.inbound.get(slot) if slot is not None else None
        key = identity.decode(errors="replace")
        if t is None and self._done.get(msg.tid) == key:  # its DONE was lost: say it again
            self._send(identity, m.Done(cid=msg.cid, tid=msg.tid))
            return
        if t is not None and t.peer == key and t.committed is not None:
            if t.committed != msg.digest:
                self._fail_transfer(t, ProtocolError("COMMIT sent again with another digest", transfer_id=t.tid,
                                                     peer=key), "protocol")
            return  # sent again while we wait for its last bytes: the answer comes when they land
        if t is None or t.peer != key:
            err = self.failures.get(msg.tid)
            self._send(identity, m.Failed(cid=msg.cid, tid=msg.tid, error="aborted",
                                          detail=str(err) if err else "unknown or ended transfer"))
            return
        try:
            t.commit(msg.digest)
        except ProtocolError as exc:
            self._fail_transfer(t, exc, "protocol")
            return
        if t.ready_to_verify:
            self._verify(t)
        elif self.nixl is not None:
            self.nixl.commit_waiting(slot)  # type: ignore[arg-type]

    # ------------------------------------------------------------------ completion
    def _verify(self, t: InboundTransfer) -> None:
        try:
            t.verify()
        except IntegrityError as exc:
            self._fail_transfer(t, exc, "integrity")
            return
        now = self.loop.time()
        self.admission.deliver(t.tid, now=now, claim_deadline=now + self.cfg.claim_timeout_s)
        self._drop_inbound(t.tid)
        identity, cid = self._reply_to.pop(t.tid)
        self._send(identity, m.Done(cid=cid, tid=t.tid))
        keep_recent(self._done, t.tid, t.peer, self.cfg.remember_failures)
        received = self._make_received(t.tid, t.peer, t.payload, t.region)
        waiters = self.waiters.pop(t.tid, [])
        live = [w for w in waiters if not w.done()]
        if live or self.on_transfer is not None:
            self.admission.claim(t.tid)
            self.handed[t.tid] = received
            for w in live:
                w.set_result(received)
            if not live and self.on_transfer is not None:
                self.on_transfer(received)
        else:
            self.delivered[t.tid] = received
        self._schedule()

    def _fail_transfer(self, t: InboundTransfer, exc: PdxferError, error: str) -> None:
        log.error("transfer_failed", transfer_id=t.tid, peer=t.peer, error=str(exc))
        t.fail()
        reply = self._reply_to.get(t.tid)
        if reply is not None:
            self._send(reply[0], m.Failed(cid=reply[1], tid=t.tid, error=error, detail=str(exc)))
        self._remember(t.tid, exc)
        self._handle(self.admission.abort(t.tid, EndReason.ABORTED, now=self.loop.time()), notify=False)
        self._schedule()

    def _drop_inbound(self, tid: str) -> None:
        self._grants.pop(tid, None)
        slot = self._slot_of.pop(tid, None)
        if slot is not None:
            self.inbound.pop(slot, None)
            if self.nixl is not None:
                self.nixl.ended(slot)

    def _remember(self, tid: str, exc: PdxferError) -> None:
        keep_recent(self.failures, tid, exc, self.cfg.remember_failures)
        for w in self.waiters.pop(tid, []):
            if not w.done():
                w.set_exception(exc)

    def _handle(self, events: list, *, notify: bool = True) -> None:
        for ev in events:
            if isinstance(ev, Granted):
                p = self.pending.pop(ev.grant.transfer_id)
                self._open(ev.grant, p.payload)
            elif isinstance(ev, Ended):
                self._on_ended(ev, notify)

    def _on_ended(self, ev: Ended, notify: bool) -> None:
        tid = ev.transfer_id
        self.pending.pop(tid, None)
        slot = self._slot_of.get(tid)
        if slot is not None:
            self.inbound[slot].fail()
        self._drop_inbound(tid)
        for table in (self.delivered, self.handed):
            received = table.pop(tid, None)
            if received is not None:
                received._invalidate()
        reply = self._reply_to.pop(tid, None)
        if ev.reason == EndReason.RELEASED:
            return
        cls, code = END_ERRORS[ev.reason]
        err = cls(f"reservation ended: {ev.reason.value}", transfer_id=tid, peer=ev.peer, waiting_for=ev.state.value)
        log.warning("reservation_ended", transfer_id=tid, peer=ev.peer, reason=ev.reason.value, state=ev.state.value)
        if notify and reply is not None and ev.reason not in (EndReason.PEER_LOST, EndReason.ABORTED):
            if ev.reason == EndReason.QUEUE_TIMEOUT:
                self._send(reply[0], m.Reject(cid=reply[1], tid=tid, reason="queue_timeout", detail=str(err)))
            else:
                self._send(reply[0], m.Failed(cid=reply[1], tid=tid, error=code, detail=str(err)))
        if tid not in self.failures:
            self._remember(tid, err)

    # ------------------------------------------------------------------ consumer side
    def wait(self, tid: str) -> asyncio.Future:
        fut = self.loop.create_future()
        received = self.delivered.pop(tid, None)
        if received is not None:
            self.admission.claim(tid)
            self.handed[tid] = received
            fut.set_result(received)
        elif tid in self.failures:
            fut.set_exception(self.failures[tid])
        else:
            self.waiters.setdefault(tid, []).append(fut)
        return fut

    def release(self, tid: str, received: Any = None) -> None:
        """The consumer is done with `received`. Only that very handle releases: if its
        reservation already ended (shutdown, abort) and the id was reused since, a late
        release must not free the new transfer's buffer."""
        if received is not None and self.handed.get(tid) is not received:
            return
        self.handed.pop(tid, None)
        view = self.admission.get(tid)
        if view is None:
            return  # already ended: releasing twice is harmless
        self._handle(self.admission.release(tid, now=self.loop.time()))
        self._schedule()

    def shutdown(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
        for ev in self.admission.shutdown(now=self.loop.time()):
            self._on_ended(ev, notify=True)
        for tid, ws in list(self.waiters.items()):
            for w in ws:
                if not w.done():
                    w.set_exception(TransferAborted("receiver shut down", transfer_id=tid, waiting_for="delivery"))
        self.waiters.clear()

    # ------------------------------------------------------------------ timers / io
    def _schedule(self) -> None:
        nd = self.admission.next_deadline()
        if nd is None:
            return
        if self._timer is not None and not self._timer.cancelled() and self._timer.when() <= nd:
            return
        if self._timer is not None:
            self._timer.cancel()
        self._timer = self.loop.call_at(nd, self._tick, nd)

    def _tick(self, due: float) -> None:
        self._timer = None
        if self.control is not None:
            # Heartbeats that arrived while this process was stalled renew leases first:
            # uvloop runs due timers before it polls for I/O.
            self.control.drain()
        # call_at may fire up to one clock tick early; never tick before the due time
        self._handle(self.admission.tick(max(self.loop.time(), due)))
        self._schedule()

    def _send(self, identity: bytes, msg: m.Message) -> None:
        if self.control is not None:
            self.control.send(identity, msg)
