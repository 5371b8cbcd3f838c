"""`Sender`: the prefill side's handle on pdxfer.

The engine thread calls `open()` / `put()` / `submit()`; they return at once (put()
waits only when the memory budget is full, with a deadline; before its transfer's GRANT,
when it is half full: see `MemoryBudget`); hashing each chunk and
everything that touches the network runs on the sender's own uvloop thread (see
SenderConfig.checksum_on_put / hash_ahead for the alternatives). Results come back as
`concurrent.futures.Future`s: `.result(timeout)` from sync code, `await
asyncio.wrap_future(f)` from asyncio code.

With `backend="nixl"` the Sender creates one NIXL agent (and its progress thread) on the
first lane that needs it, off the event loop, and tears it down in `close()` after every
lane has finished or failed its WRITEs.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import os
import threading
from typing import TYPE_CHECKING, Any, Sequence

import structlog
import zmq.asyncio

from pdxfer.engine.config import SenderConfig
from pdxfer.engine.handle import OutboundHandle, chunk_for
from pdxfer.engine.lane import Lane
from pdxfer.engine.outctx import OutCtx, TransferResult
from pdxfer.engine.runtime import LoopThread
from pdxfer.errors import PdxferError, TransferAborted
from pdxfer.layout.buffers import chunk_buffer
from pdxfer.layout.payload import Payload
from pdxfer.protocol.checksum import XXH3, chunk_checksum
from pdxfer.protocol.outbound import OutboundTransfer
from pdxfer.protocol.states import OutState
from pdxfer.sendq import MemoryBudget
from pdxfer.sendq.holdings import Holdings
from pdxfer.sendq.releases import ReleaseNotices

if TYPE_CHECKING:
    from pdxfer.engine.spill import SpillCoordinator
    from pdxfer.transport.nixl import NixlSendSide

log = structlog.get_logger("pdxfer.sender")

__all__ = ["Sender", "OutboundHandle", "TransferResult"]  # OutboundHandle: engine.handle

_BEFORE_GRANT = (OutState.WAITING_PEER, OutState.RESERVING, OutState.QUEUED)


class Sender:
    def __init__(self, config: SenderConfig | None = None, **overrides: Any) -> None:
        if config is None:
            config = SenderConfig(**overrides)
        elif overrides:
            raise TypeError("pass either a SenderConfig or keyword overrides, not both")
        self.config = config
        self._budget = MemoryBudget(config.memory_budget)
        self._notices = ReleaseNotices()  # put(on_release=): which buffers the Sender let go of
        self._holdings = Holdings(self._budget, notices=self._notices)  # replaced by the spill tier's
        self._rt = LoopThread(f"pdxfer-sender-{config.sender_id}")
        self._lanes: dict[str, Lane] = {}
        self._zctx: zmq.asyncio.Context | None = None
        self._closed = False
        self._started = False
        self._ids_lock = threading.Lock()
        self._live_ids: set[str] = set()
        self._nixl: "asyncio.Future[NixlSendSide] | None" = None
        self._nixl_made: "NixlSendSide | None" = None  # for the counters only (any thread reads it)
        self._spill: "SpillCoordinator | None" = None
        # One hashing thread for every TCP lane (sendq.hashahead); xxhash releases the GIL.
        # NIXL lanes hash on their loop: the progress thread does the copy there, so the
        # loop's hash already overlaps it, and a third busy thread only competed for the
        # cores (2 MiB ratios 0.63-0.64 c1 / 0.73-0.77 c4 with it, 0.71-0.72 / 0.82-0.86 without).
        self._hash_pool = (concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="pdxfer-hash")
                           if not config.checksum_on_put and config.hash_ahead > 0 and config.backend == "tcp"
                           else None)

    # ------------------------------------------------------------------ lifecycle
    def start(self) -> "Sender":
        if not self._started:
            if self.config.spill_enabled:
                from pdxfer.engine.spill import SpillCoordinator

                self._spill = SpillCoordinator(self.config, self._budget, self._rt, self._live_transfers,
                                               self._notices)
                self._holdings = self._spill.holdings
            self._rt.start()
            self._zctx = self._rt.run(self._make_ctx(), timeout=10)
            self._started = True
        return self

    async def _make_ctx(self) -> zmq.asyncio.Context:
        return zmq.asyncio.Context()

    def __enter__(self) -> "Sender":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self, timeout: float = 10.0) -> None:
        """Fail every live transfer with TransferAborted, close sockets, stop the loop."""
        if self._closed or not self._started:
            self._closed = True
            return
        self._closed = True
        try:
            self._rt.run(self._aclose(), timeout)
        except (concurrent.futures.TimeoutError, RuntimeError) as exc:
            log.error("sender_close_incomplete", error=repr(exc))
        self._rt.stop(timeout)
        if self._spill is not None:
            self._spill.close()
        if self._hash_pool is not None:
            self._hash_pool.shutdown(wait=True, cancel_futures=True)  # hashes only read: they end in µs

    async def _aclose(self) -> None:
        await asyncio.gather(*(lane.close() for lane in list(self._lanes.values())), return_exceptions=True)
        if self._nixl is not None:
            fut, self._nixl = self._nixl, None
            try:
                side = await asyncio.wait_for(asyncio.shield(fut), 30)
            except Exception as exc:  # never created: nothing to tear down
                log.debug("nixl_side_never_started", error=repr(exc))
            else:
                await asyncio.get_running_loop().run_in_executor(None, side.close)
        if self._zctx is not None:
            self._zctx.term()

    async def _nixl_side(self) -> "NixlSendSide":
        """The Sender's NIXL side, created on first use in a worker thread (~0.5 s, plus
        ~1.5 s for the first `import nixl` in the process)."""
        if self._nixl is None:
            self._nixl = asyncio.get_running_loop().run_in_executor(None, self._make_nixl)
        fut = self._nixl
        try:
            return await asyncio.shield(fut)
        except Exception:
            if self._nixl is fut:
                self._nixl = None  # let a later lane try again
            raise

    def _make_nixl(self) -> "NixlSendSide":
        from pdxfer.transport.nixl import NixlSendSide

        try:
            side = NixlSendSide(f"{self.config.sender_id}-{os.urandom(3).hex()}", self.config.ucx,
                                workers=self.config.nixl_workers, nice=self.config.nixl_nice)
        except Exception as exc:
            raise TransferAborted(f"NIXL data path unavailable: {exc}", waiting_for="nixl_agent") from None
        side.tune(spin_s=self.config.nixl_spin_s, max_sleep_s=self.config.nixl_max_sleep_s)
        self._nixl_made = side
        return side

    def _live_transfers(self) -> list[OutCtx]:
        return [ctx for lane in list(self._lanes.values()) for ctx in list(lane.transfers.values())]

    def spill_usage(self) -> dict[str, int]:
        """Bytes per tier and counters (spills, restores, demotions, evictions by cause,
        refusals, integrity errors); all zeros without spill tiers."""
        if self._spill is None:
            return {}
        return self._spill.usage()

    @property
    def spill_files(self) -> list:
        """Spill files on disk right now (empty once every transfer has ended)."""
        return self._spill.files() if self._spill is not None else []

    @property
    def loop_stalls(self) -> dict[str, float]:
        """How often, and how long at worst, this sender's event loop was held up (see
        LoopThread): a number to read first when a peer is reported silent."""
        return self._rt.stall_report()

    @property
    def nixl_write_requests(self) -> int:
        """NIXL WRITE requests posted so far (a batch of chunks counts once), over all
        workers; 0 until the first NIXL lane: what shows that a sender configured for
        NIXL really moved its bytes that way."""
        side = self._nixl_made
        return 0 if side is None else sum(p.stats.posts for p in side.progresses)

    @property
    def nixl_registrations(self) -> dict[str, int]:
        """How NIXL WRITEs found registered memory, over all workers: `per_chunk` buffers
        registered for a chunk (a cache miss: on RDMA, pages pinned), `cached` reuses of
        one, `pinned` WRITEs from a buffer given to `register` (no registration at all)."""
        side = self._nixl_made
        progs = [] if side is None else side.progresses
        return {"per_chunk": sum(p.cache.misses for p in progs), "cached": sum(p.cache.hits for p in progs),
                "pinned": sum(p.cache.pinned_hits for p in progs)}

    @property
    def budget_used(self) -> int:
        return self._budget.used

    @property
    def budget(self) -> MemoryBudget:
        return self._budget

    # ------------------------------------------------------------------ API
    def register(self, buffer: Any, *, timeout: float = 30.0) -> None:
        """Register a long-lived buffer that chunks will be put from (a KV cache, a pinned
        send pool): on a NIXL sender, every chunk that lies inside it is WRITEn from this one
        registration, instead of being registered and deregistered in every transfer (on
        RDMA, pinning pages each time). Host or GPU memory; the buffer must stay valid
        until `unregister` (or `close`). Blocking: creates the NIXL agents on first use.
        On a TCP sender there is nothing to register, and this only checks the buffer."""
        view = chunk_buffer(buffer)
        if view.nbytes == 0:
            raise ValueError("cannot register an empty buffer")
        if self.config.backend != "nixl":
            return
        side = self._side_now(timeout)
        side.register(view, timeout)

    def unregister(self, buffer: Any, *, timeout: float = 30.0) -> bool:
        """Undo `register`: WRITEs already in flight from it finish first, later chunks from
        it are registered per transfer again. False if it was not registered."""
        view = chunk_buffer(buffer)
        if self.config.backend != "nixl" or self._nixl is None:
            return False
        return self._side_now(timeout).unregister(view, timeout)

    def _side_now(self, timeout: float) -> "NixlSendSide":
        if self._closed or not self._started:
            raise TransferAborted("sender is not running")
        return self._rt.run(self._nixl_side(), timeout)

    def open(self, peer: str, transfer_id: str, payload: Payload, *, deadline_s: float | None = None) -> OutboundHandle:
        """Start a transfer of `payload` to the receiver at `peer` (its control address)."""
        if self._closed or not self._started:
            raise TransferAborted("sender is not running", transfer_id=transfer_id, peer=peer)
        if not transfer_id or len(transfer_id) > 256:
            raise ValueError(f"transfer id must be 1..256 characters, got {len(transfer_id)}")
        with self._ids_lock:
            if transfer_id in self._live_ids:
                raise ValueError(f"transfer {transfer_id} is already in flight on this sender")
            self._live_ids.add(transfer_id)
        fut: concurrent.futures.Future[TransferResult] = concurrent.futures.Future()
        fut.add_done_callback(lambda _f: self._forget_id(transfer_id))
        ctx = OutCtx(OutboundTransfer(transfer_id, peer, payload), fut, deadline=0.0, started=0.0,
                     log=log.bind(transfer_id=transfer_id, peer=peer))
        def ended(_f: object) -> None:  # nobody waits for a GRANT any more
            ctx.granted.set()
            self._budget.poke()  # a put held back until the GRANT wakes and finds the transfer over
            self._notices.end(transfer_id)  # no buffer of it is read any more (NIXL: WRITEs are over)

        fut.add_done_callback(ended)
        self._rt.call(self._begin, ctx, self.config.deadline_s if deadline_s is None else deadline_s)
        return OutboundHandle(self, ctx)

    def connect(self, peer: str, *, keep: bool = True) -> "concurrent.futures.Future[None]":
        """Set up the lane to `peer` now (HELLO, data connection, NIXL metadata) rather than
        at the first `open()`, whose transfer would otherwise wait for those round trips.
        With `keep`, the lane is not closed for being idle and heartbeats while idle, until
        `close()` or until the peer is lost (a later `open()` then connects afresh). The
        future resolves once the lane is ready, or fails with why it could not be set up."""
        if self._closed or not self._started:
            raise TransferAborted("sender is not running", peer=peer)
        fut: concurrent.futures.Future[None] = concurrent.futures.Future()

        def start() -> None:
            lane = self._lane(peer)
            lane.keep = lane.keep or keep

            def relay(f: "asyncio.Future[None]") -> None:
                if fut.done():
                    return
                if f.cancelled():
                    fut.set_exception(TransferAborted("sender is shutting down", peer=peer))
                elif f.exception() is not None:
                    fut.set_exception(f.exception())  # type: ignore[arg-type]
                else:
                    fut.set_result(None)

            lane.ready.add_done_callback(relay)

        self._rt.call(start)
        return fut

    def submit(self, peer: str, transfer_id: str, chunks: Sequence[Any], *, deadline_s: float | None = None,
               submit_timeout_s: float | None = None) -> "concurrent.futures.Future[TransferResult]":
        """Send a whole list of chunk buffers as one transfer."""
        views = [chunk_for(self.config, transfer_id, i, c) for i, c in enumerate(chunks)]
        handle = self.open(peer, transfer_id, Payload(tuple(v.nbytes for v in views)), deadline_s=deadline_s)
        try:
            for i, v in enumerate(views):
                handle.put(i, v, timeout=submit_timeout_s)
        except PdxferError as exc:
            handle.abort(str(exc))
            raise
        return handle.future

    def _forget_id(self, tid: str) -> None:
        with self._ids_lock:
            self._live_ids.discard(tid)

    # ------------------------------------------------------------------ loop side
    def _lane(self, peer: str) -> Lane:
        lane = self._lanes.get(peer)
        if lane is None or lane.state == "dead":
            assert self._zctx is not None
            spill = self._spill
            lane = Lane(peer, self.config, self._budget, self._zctx, self._lane_closed, self._nixl_side,
                        holdings=self._holdings,
                        io=spill.io if spill is not None else None, hash_pool=self._hash_pool)
            self._lanes[peer] = lane
        return lane

    def _lane_closed(self, lane: Lane) -> None:
        if self._lanes.get(lane.address) is lane:
            del self._lanes[lane.address]

    def _begin(self, ctx: OutCtx, deadline_s: float) -> None:
        loop = asyncio.get_running_loop()
        ctx.started = loop.time()
        ctx.deadline = ctx.started + deadline_s
        if ctx.future.done():  # aborted before the loop saw it
            return
        lane = self._lane(ctx.out.peer)
        ctx.extra["lane"] = lane
        ctx.timer = loop.call_at(ctx.deadline, lane.on_deadline, ctx)
        lane.add(ctx)
        if self._spill is not None:
            self._spill.arm(ctx)

    def _on_chunk(self, ctx: OutCtx, index: int, view: memoryview, checksum: int | None) -> None:
        lane: Lane | None = ctx.extra.get("lane")
        if ctx.out.terminal or lane is None:
            self._holdings.release(view, view.nbytes)
            return
        if (checksum is None and index == 0 and ctx.out.state in _BEFORE_GRANT and isinstance(view, memoryview)
                and lane.out.algorithm == XXH3):  # xxh3 until the receiver says otherwise
            # The first chunk is what the send waits for once the GRANT arrives: hash it
            # now, while the loop has nothing to do but wait for that GRANT (~0.2 ms per
            # 2 MiB taken off every transfer's start).
            checksum = chunk_checksum(view)
        try:
            ctx.out.add_chunk(index, view, checksum)
        except ValueError as exc:
            self._holdings.release(view, view.nbytes)
            lane.fail(ctx, TransferAborted(str(exc), transfer_id=ctx.out.tid, peer=ctx.out.peer))
            return
        if self._spill is not None and isinstance(view, memoryview) and self._spill.wants(ctx):
            self._spill.spill_now(ctx, [(index, view, checksum)])
            return
        lane.chunks_ready(ctx)

    def _abort(self, ctx: OutCtx, reason: str) -> None:
        lane: Lane | None = ctx.extra.get("lane")
        err = TransferAborted(reason, transfer_id=ctx.out.tid, peer=ctx.out.peer)
        if lane is not None:
            lane.fail(ctx, err)
        elif not ctx.future.done():
            ctx.future.set_exception(err)
