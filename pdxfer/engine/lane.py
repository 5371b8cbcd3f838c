"""One sender-side lane per receiver: control DEALER, data connection, ordered send loop.

Lanes never wait on each other, so a slow or dead decode worker cannot stall transfers
to another. Inside a lane, RESERVEs are all outstanding at once (matched by correlation
id); only the data connection is serial, and it carries granted chunks only.

Liveness: the data connection's EOF is an immediate death signal; heartbeats on the
control channel catch a peer that hangs (SIGSTOP, a wedged process) with its sockets
still open. Either way every transfer on the lane fails with `PeerLost` and its queued
memory goes back to the budget.

Backends: a "tcp" lane writes each chunk on its data connection and is done with it when
the bytes are in the socket. A "nixl" lane has no data connection: it hands each chunk to
the NIXL progress thread, which WRITEs it (one-sided, with a notification) into the address
the GRANT named; the lane keeps going meanwhile, sends COMMIT once every WRITE is handed
over, and returns a chunk's budget when its WRITE completed; a transfer succeeds only once
the receiver's DONE and all its local completions are in. The first failed WRITE (NIXL's
remote-disconnect error) ends the lane like a TCP EOF does.

What each chunk needs before it can go (spilled ones read back, all of them hashed) is
done off the loop, a few chunks ahead, by `engine.outgoing`.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import functools
import itertools
import os
import time
from typing import TYPE_CHECKING, Any, Awaitable, Callable

import structlog
import zmq.asyncio

from pdxfer.errors import PdxferError, PeerLost, ProtocolError, TransferAborted, TransferTimeout
from pdxfer.protocol import messages as m
from pdxfer.protocol.states import OutEvent, OutState
from pdxfer.engine.heartbeat import heartbeat
from pdxfer.engine.lane_data import nixl_side, open_data
from pdxfer.engine.lane_resend import Resender, answered_before
from pdxfer.engine.lane_writes import NixlWrites
from pdxfer.engine.liveness import Liveness
from pdxfer.engine.outctx import OutCtx, TransferResult
from pdxfer.engine.outgoing import Outgoing
from pdxfer.engine.replies import failure_error, hello_error, rejection_error
from pdxfer.protocol.outbound import OutboundTransfer
from pdxfer.sendq import MemoryBudget, PeerQueue
from pdxfer.sendq.holdings import Holdings
from pdxfer.transport.control import ControlClient
from pdxfer.transport.tcp import DataClient

if TYPE_CHECKING:
    from pdxfer.engine.config import SenderConfig
    from pdxfer.transport.nixl import NixlDataClient, NixlSendSide

log = structlog.get_logger("pdxfer.sender")

# The send loop hands the event loop back at least this often. A chunk whose hash runs on
# the loop (the default) and whose send never has to wait (NIXL posts return at once; a
# TCP socket with room takes the whole chunk) never suspends the loop: without this, one
# large transfer held the loop for its whole length (32 × 2 MiB: 12 ms measured; 1 GiB
# would be ~150 ms), delaying every other lane's GRANTs and DONEs, the
# heartbeats, and the WRITE completions that give budget back to put().
YIELD_AFTER_S = 1e-3
YIELD_AFTER_CHUNKS = 64


class Lane:
    def __init__(self, address: str, cfg: "SenderConfig", budget: MemoryBudget,
                 ctx: zmq.asyncio.Context, on_closed: Any,
                 nixl_side: "Callable[[], Awaitable[NixlSendSide]] | None" = None,
                 holdings: Holdings | None = None, io: concurrent.futures.Executor | None = None,
                 hash_pool: concurrent.futures.Executor | None = None) -> None:
        self.address = address
        self.cfg = cfg
        self.budget = budget
        self.holdings = holdings if holdings is not None else Holdings(budget)
        # Spilled chunks are read back and chunks hashed there, a few ahead of the wire.
        self.out = Outgoing(cfg, self.holdings, lambda n: self.queue.peek(n), self._fail_tid, io, hash_pool)
        self._writes = NixlWrites(self._send_abort, self.out.sent)
        self._loop = asyncio.get_running_loop()
        self._resends = Resender(self._loop, cfg.resend_after_s, cfg.resend_max_s, self._ask_again)
        self.state = "connecting"
        self.transfers: dict[str, OutCtx] = {}
        self._by_cid: dict[int, OutCtx] = {}
        self._cids = itertools.count(1)
        self.queue = PeerQueue(self.out.drop)
        self._wake = asyncio.Event()
        self._hello_cid = next(self._cids)
        # Transfers aborted before the handshake finished: the receiver has never heard of
        # them, but a decode-side waiter may be waiting for that id. Tell it once connected.
        self._early_aborts: list[tuple[str, str]] = []
        self._hello: asyncio.Future[m.HelloOk] = self._loop.create_future()
        self._hello.add_done_callback(lambda f: f.cancelled() or f.exception())  # retrieved even if unawaited
        self._liveness = Liveness(cfg.peer_timeout_s)
        # Set when the receiver answers as if it had never heard of this lane: it restarted
        # on the same address (ZMQ reconnects under us without a word) or forgot the peer.
        self._forgotten: asyncio.Future[Exception] = self._loop.create_future()
        # Resolved once HELLO and the data path are up; fails with the reason the lane died.
        self.ready: asyncio.Future[None] = self._loop.create_future()
        self.ready.add_done_callback(lambda f: f.cancelled() or f.exception())
        # Kept (Sender.connect): never closed for being idle, and heartbeating while idle so
        # a receiver that dies or hangs is noticed before a transfer depends on it.
        self.keep = False
        self.data: DataClient | NixlDataClient | None = None
        self.backend = cfg.backend
        self._nixl_side = nixl_side
        self._on_closed = on_closed
        identity = f"{cfg.sender_id}/{os.urandom(6).hex()}".encode()
        self.control = ControlClient(ctx, address, identity, self._on_message, on_refused=self._refused)
        self._task = self._loop.create_task(self._run(), name=f"pdxfer-lane-{address}")

    # ----------------------------------------------------------------- lifecycle
    async def _run(self) -> None:
        err: Exception | None = None
        try:
            await self._connect()
            sender = self._loop.create_task(self._send_loop())
            beat = self._loop.create_task(heartbeat(
                self._liveness, period_s=self.cfg.heartbeat_s, peer=self.address, clock=self._loop.time,
                busy=lambda: bool(self.transfers) or self.keep, drain=self.control.drain,
                send=lambda: self.control.send(m.Heartbeat(cid=next(self._cids)))))
            assert self.data is not None
            try:
                done, _ = await asyncio.wait({sender, beat, self.data.closed, self._forgotten},
                                             return_when=asyncio.FIRST_COMPLETED)
                first = done.pop()
                err = first.result()  # PeerLost from the EOF watcher or heartbeat; None when idle
            finally:
                for t in (sender, beat):
                    t.cancel()
                await asyncio.gather(sender, beat, return_exceptions=True)
        except PdxferError as exc:
            err = exc
        except asyncio.CancelledError:
            err = TransferAborted("sender is shutting down", peer=self.address)
        except Exception as exc:  # a bug must still fail the transfers, never strand them
            log.exception("lane_crashed", peer=self.address)
            err = PeerLost(f"lane crashed: {exc!r}", peer=self.address)
        await self._close(err)

    async def _connect(self) -> None:
        nixl = await nixl_side(self._nixl_side, self.cfg, self.address) if self.backend == "nixl" else None
        self.control.send(m.Hello(cid=self._hello_cid, sender_id=self.cfg.sender_id,
                                  capabilities=[self.backend], token=self.cfg.token,
                                  nixl_agent=nixl.name if nixl is not None else None,
                                  nixl_workers=nixl.names[1:] if nixl is not None else []))
        try:
            ok = await asyncio.wait_for(asyncio.shield(self._hello), self.cfg.handshake_timeout_s)
        except asyncio.TimeoutError:
            raise PeerLost(f"no HELLO reply within {self.cfg.handshake_timeout_s}s",
                           peer=self.address, waiting_for="hello") from None
        refused = hello_error(ok, backend=self.backend, peer=self.address)
        if refused is not None:
            raise refused
        self.out.algorithm = ok.checksum  # every chunk of this lane is checksummed the receiver's way
        self.data = await open_data(ok, nixl, self.cfg, self.address)
        self.state = "ready"
        if not self.ready.done():
            self.ready.set_result(None)
        log.debug("lane_ready", peer=self.address, receiver=ok.receiver_id, backend=self.backend)
        for tid, reason in self._early_aborts:
            self.control.send(m.Abort(cid=0, tid=tid, reason=reason))
        self._early_aborts.clear()
        for ctx in list(self.transfers.values()):
            self._send_reserve(ctx)

    async def _send_loop(self) -> Exception | None:
        assert self.data is not None
        slice_start, in_slice = time.monotonic(), 0
        while True:
            if in_slice >= YIELD_AFTER_CHUNKS or (in_slice and time.monotonic() - slice_start >= YIELD_AFTER_S):
                await asyncio.sleep(0)  # a turn for everything else on the loop (see YIELD_AFTER_S)
                slice_start, in_slice = time.monotonic(), 0
            item = self.queue.pop()
            if item is None:
                self._wake.clear()
                try:
                    await asyncio.wait_for(self._wake.wait(), self.cfg.lane_idle_s)
                except asyncio.TimeoutError:
                    if not self.transfers and not self.keep:
                        return None  # idle lane: close it, a later submit opens a fresh one
                slice_start, in_slice = time.monotonic(), 0  # the loop ran while we waited
                continue
            ready = await self.out.ready(item)
            if ready is None:
                continue  # failed (integrity) or ended while it was read back or hashed
            _, payload, checksum, restored = ready
            t = item.transfer
            offset, _ = t.payload.chunk_range(item.index)
            if isinstance(self.data, DataClient):
                if t.sent_chunks + 1 == t.payload.chunk_count:
                    self._commit(t)  # its trip overlaps the last chunk's bytes: the receiver takes either order
                try:
                    await self.data.send_chunk(t.slot, item.index, offset, payload, checksum)  # type: ignore[arg-type]
                finally:
                    self.out.sent(item, restored)
            else:
                # NIXL: the progress thread registers and copies (overlapping with the next
                # hash here); the budget comes back when the WRITE completed. COMMIT may go
                # out before that: the receiver verifies only once every chunk's notification
                # arrived (COMMIT_PENDING), and a WRITE that fails ends the lane, so DONE can
                # never cover a chunk that did not land.
                ctx = self.transfers[t.tid]  # pop() skips ended transfers, so it is still live
                self._writes.post(self.data, ctx, item, offset, payload, checksum, restored)  # type: ignore[arg-type]
            self._chunk_sent(t)
            in_slice += 1

    def _send_abort(self, ctx: OutCtx, reason: str) -> None:
        """ABORT tells the receiver that no WRITE of ours can land any more (NIXL): it frees
        the transfer's extent at once instead of quarantining it."""
        if self.state == "ready":
            self.control.send(m.Abort(cid=ctx.out.cid or 0, tid=ctx.out.tid, reason=reason))

    def _fail_tid(self, tid: str, exc: PdxferError) -> None:
        ctx = self.transfers.get(tid)
        if ctx is not None:
            self.fail(ctx, exc)

    def _chunk_sent(self, t: OutboundTransfer) -> None:
        t.sent_chunks += 1
        if t.all_sent:
            self._commit(t)

    def _commit(self, t: OutboundTransfer) -> None:
        if t.state is OutState.GRANTED:  # not yet committed, not ended
            t.on(OutEvent.SEND_COMMIT)
            self.control.send(m.Commit(cid=t.cid, tid=t.tid, digest=t.digest()))  # type: ignore[arg-type]
            ctx = self.transfers.get(t.tid)
            if ctx is not None:
                self._resends.arm(ctx)

    async def _close(self, err: Exception | None) -> None:
        self.state = "dead"
        self._on_closed(self)
        cause = err or TransferAborted("lane closed", peer=self.address)
        if not self.ready.done():
            self.ready.set_exception(cause if isinstance(cause, PdxferError) else PeerLost(str(cause), peer=self.address))
        if self.data is not None:
            # NIXL: WRITEs still in flight finish or fail first (bounded), so every chunk's
            # budget is back before its transfer's future fails.
            await self.data.close()
        for ctx in list(self.transfers.values()):
            self.fail(ctx, cause if isinstance(cause, PdxferError) else PeerLost(str(cause), peer=self.address),
                      notify_peer=False)
        self.queue.drain()
        if err is not None and not isinstance(err, TransferAborted):
            log.warning("lane_closed", peer=self.address, error=str(err))
        else:
            log.debug("lane_closed", peer=self.address, reason=str(cause))
        await self.control.close()

    async def close(self) -> None:
        if self.state != "dead":  # already closing on its own: let _close finish, do not cut it short
            self._task.cancel()
        await asyncio.gather(self._task, return_exceptions=True)

    # ----------------------------------------------------------------- transfers
    def add(self, ctx: OutCtx) -> None:
        self.transfers[ctx.out.tid] = ctx
        if self.state == "ready":
            self._send_reserve(ctx)

    def _send_reserve(self, ctx: OutCtx) -> None:
        out = ctx.out
        out.cid = next(self._cids)
        self._by_cid[out.cid] = ctx
        out.on(OutEvent.SEND_RESERVE)
        self.control.send(self._reserve_msg(ctx))
        self._resends.arm(ctx)

    def _reserve_msg(self, ctx: OutCtx) -> m.Reserve:
        out = ctx.out
        remaining_ms = max(1, int((ctx.deadline - self._loop.time()) * 1000))
        return m.Reserve(cid=out.cid, tid=out.tid, total_bytes=out.payload.total_bytes,  # type: ignore[arg-type]
                         chunk_sizes=list(out.payload.chunk_sizes), deadline_ms=remaining_ms)

    def chunks_ready(self, ctx: OutCtx) -> None:
        if self.queue.push_ready(ctx.out):
            self._wake.set()

    def _refused(self) -> None:
        """Nothing listens at the receiver's address: fail now, not after handshake_timeout_s."""
        if not self._hello.done():
            self._hello.set_exception(PeerLost("receiver refused the connection (nothing listens there)",
                                               peer=self.address, waiting_for="hello"))

    def _on_message(self, msg: m.Message) -> None:
        self._liveness.heard()
        if isinstance(msg, m.HelloOk):
            if msg.cid == self._hello_cid and not self._hello.done():
                self._hello.set_result(msg)
            return
        if isinstance(msg, m.Error):
            if msg.cid == self._hello_cid and not self._hello.done():
                self._hello.set_exception(ProtocolError(f"receiver refused HELLO: {msg.error} {msg.detail}",
                                                        peer=self.address, waiting_for="hello"))
            elif msg.error == "no_hello" and self._hello.done():
                # Nothing this lane sends can succeed now (its reservations, if any, died
                # with the old incarnation): end it, so its transfers fail with PeerLost at
                # once instead of at their deadlines, and the next open() says HELLO afresh.
                if not self._forgotten.done():
                    self._forgotten.set_result(PeerLost("the receiver no longer knows this sender "
                                                        "(restarted, or dropped the peer)", peer=self.address,
                                                        waiting_for=f"reply to cid {msg.cid}"))
            else:
                log.error("receiver_error", peer=self.address, error=msg.error, detail=msg.detail)
            return
        if isinstance(msg, m.HeartbeatAck):
            return
        ctx = self._by_cid.get(msg.cid)
        if ctx is None or ctx.out.tid != getattr(msg, "tid", None):
            log.debug("late_reply", peer=self.address, msg=type(msg).__name__, cid=msg.cid)
            return
        try:
            self._on_transfer_message(ctx, msg)
        except ProtocolError as exc:
            self.fail(ctx, exc)

    def _on_transfer_message(self, ctx: OutCtx, msg: m.Message) -> None:
        out = ctx.out
        if answered_before(out, msg):
            return
        if isinstance(msg, m.Queued):
            out.on(OutEvent.RECV_QUEUED)
            ctx.log.debug("queued", position=msg.position)
        elif isinstance(msg, m.Grant):
            if self.backend == "nixl" and msg.addr is None:
                raise ProtocolError("GRANT without addr on a nixl lane", transfer_id=out.tid, peer=self.address)
            out.slot = msg.slot
            ctx.extra["addr"] = msg.addr
            out.on(OutEvent.RECV_GRANT)
            ctx.granted_at = time.perf_counter()
            ctx.granted.set()
            self.budget.poke()  # its puts held at half the budget may take the rest now
            self.chunks_ready(ctx)
        elif isinstance(msg, m.Reject):
            self.fail(ctx, rejection_error(msg, tid=out.tid, state=out.state.value, peer=self.address),
                      notify_peer=False)
        elif isinstance(msg, m.Done):
            out.on(OutEvent.RECV_DONE)
            self._finish(ctx)
        elif isinstance(msg, m.Failed):
            self.fail(ctx, failure_error(msg, tid=out.tid, peer=self.address), notify_peer=False)

    def _ask_again(self, ctx: OutCtx) -> bool:
        """Send the request `ctx` waits on again (lane_resend); False once it waits on none."""
        out = ctx.out
        if out.terminal or self.state != "ready" or self.transfers.get(out.tid) is not ctx:
            return False
        if out.state in (OutState.RESERVING, OutState.QUEUED):
            self.control.send(self._reserve_msg(ctx))  # the same cid: its answer finds this transfer
        elif out.state is OutState.COMMITTING:
            self.control.send(m.Commit(cid=out.cid, tid=out.tid, digest=out.digest()))  # type: ignore[arg-type]
        return True

    def _forget(self, ctx: OutCtx) -> None:
        self.transfers.pop(ctx.out.tid, None)
        if self.data is not None and not isinstance(self.data, DataClient):
            self.data.transfer_ended(ctx.out.tid)  # its chunk buffers may be freed now: deregister them
        if ctx.out.cid is not None:
            self._by_cid.pop(ctx.out.cid, None)
        if ctx.timer is not None:
            ctx.timer.cancel()
        self._resends.cancel(ctx)
        spill_timer = ctx.extra.get("spill_timer")
        if spill_timer is not None:
            spill_timer.cancel()

    def _finish(self, ctx: OutCtx) -> None:
        self._forget(ctx)
        self._writes.when_quiet(ctx, functools.partial(self._succeed, ctx))  # NIXL: see lane_writes

    def _succeed(self, ctx: OutCtx) -> None:
        now = time.perf_counter()
        res = TransferResult(ctx.out.tid, self.address, ctx.out.payload.total_bytes, ctx.out.payload.chunk_count,
                             now - ctx.opened, (ctx.granted_at or now) - ctx.opened)
        ctx.log.debug("transfer_done", seconds=round(res.seconds, 6))
        if not ctx.future.done():
            ctx.future.set_result(res)

    def fail(self, ctx: OutCtx, err: PdxferError, *, notify_peer: bool = True) -> None:
        out = ctx.out
        if out.terminal:
            return
        was = out.state
        out.on(OutEvent.FAIL)
        self._forget(ctx)
        for buf, nbytes in out.drop_buffers():
            self.holdings.release(buf, nbytes)
        wrote = self.backend == "nixl" and was in (OutState.GRANTED, OutState.COMMITTING)
        if notify_peer and was == OutState.WAITING_PEER and self.state == "connecting":
            self._early_aborts.append((out.tid, type(err).__name__))
        elif (notify_peer or wrote) and self.state == "ready":
            # NIXL: only once our WRITEs into its range are over, so the receiver may reuse
            # the range at once; sent even when the receiver ended it (it quarantined it).
            self._writes.abort(ctx, type(err).__name__)
        ctx.log.warning("transfer_failed", state=was.value, error=str(err))
        # NIXL: the caller may free the chunks once the future is done, so not while a WRITE
        # still reads them (bounded: a lane that closes fails its WRITEs still in flight).
        self._writes.when_quiet(ctx, functools.partial(_set_exception, ctx.future, err))

    def on_deadline(self, ctx: OutCtx) -> None:
        self.fail(ctx, TransferTimeout(f"deadline passed in state {ctx.out.state.value}",
                                       transfer_id=ctx.out.tid, peer=self.address,
                                       waiting_for=ctx.out.state.value))


def _set_exception(fut: "concurrent.futures.Future[Any]", err: BaseException) -> None:
    if not fut.done():
        fut.set_exception(err)
