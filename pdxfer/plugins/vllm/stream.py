"""Streaming prefill (concurrent flow): push each block's chunk right after the forward
step that computed it, while the prompt's later chunks are still being prefilled.

The scheduler side sends a `StreamSpec` per step (tokens done so far, block table); the
first one opens the transfer with the whole prompt's chunk sizes (known up front: one
chunk per block, `meta.chunk_ranges`), so the decode's Receiver reserves everything
before the first byte moves. Every chunk is packed out of the blocks during the step
that completed it, so usually nothing is left to copy by the time vLLM finishes the
request.

All of this runs on vLLM's engine thread, which must never wait on the network, so a
chunk is put without waiting for send budget (a spill tier, if configured, takes what
the budget cannot). A chunk that finds no room is not packed yet: the stream falls
*behind*, and its remaining chunks are packed and put later, as the budget frees: from
the request's next StreamSpec while it still prefills (that step's block table: between
steps a running request's blocks may be preempted and reused), and once it finished,
from every step's `get_finished` (vLLM calls it every step, forward or not). The
scheduler finishes a streamed request with delay_free and names it, with its block table,
in `stream_finished`; those blocks stay allocated until the worker reports the request
in finished_sending, once every chunk is out of them. Chunks of a transfer the decode
has not granted yet may take half the budget at most (the Sender's `MemoryBudget` rule), so
they cannot starve the granted transfers whose completion makes room at the decode. Backpressure thus becomes KV-block pressure, which vLLM's
scheduler already handles by admitting fewer new prompts; nothing fails, nothing waits,
and memory stays bounded by the budget. A stream whose decode never makes room ends at
its transfer's deadline (recv_timeout_s) like any other transfer.
"""

from __future__ import annotations

import collections
import functools
import threading
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable

import structlog
import torch

from pdxfer.errors import Backpressure
from pdxfer.plugins.vllm.counters import Counters
from pdxfer.plugins.vllm.meta import StepMeta, StreamSpec, chunk_ranges

if TYPE_CHECKING:
    from pdxfer.engine import Sender
    from pdxfer.pack import Packer

log = structlog.get_logger("pdxfer.vllm.stream")

_ENDED_REMEMBERED = 4096  # ended streams remembered, so late StreamSpecs do not reopen them


@dataclass
class _Stream:
    handle: Any
    req_id: str
    ranges: list[tuple[int, int]]
    next: int = 0
    tables: list[list[int]] | None = None  # the latest block table the scheduler sent
    ready: int = 0  # tokens whose chunks may be packed
    behind: bool = False  # a ready chunk could not go yet: later steps pack the rest
    deferred: bool = False  # it fell behind at least once (counted once)
    finished: bool = False  # the scheduler finished the request (its blocks wait for us)


class StreamingMixin:
    """The prefill worker's streaming half; `WorkerSide` provides the state used here."""

    packer: "Packer | None"
    counters: Counters
    _lock: threading.Condition
    _done_sending: set[str]
    _streams: dict[str, _Stream]
    _ended_streams: "collections.OrderedDict[str, str]"  # tid -> why it ended
    _in_flight: dict[str, Any]

    # provided by WorkerSide
    block_size: int
    _spills: bool  # the sender has a spill tier
    sender: "Sender | None"

    def _round(self, t1: int) -> int: ...  # pragma: no cover

    def _open(self, tid: str, peer: str, sizes: list[int]) -> Any: ...  # pragma: no cover

    def after_forward(self, meta: StepMeta) -> None:
        """Concurrent flow: pack and put every chunk whose tokens this forward completed,
        while the prefill's later chunks are still to be computed."""
        for tid in meta.stream_aborts:  # the scheduler freed the blocks already: never pack again
            self._end_stream(tid, "prefill request aborted")
        for s in meta.streams:
            self._guarded(s.transfer_id, functools.partial(self._stream_step, s))
        for tid, req_id, blocks in meta.stream_finished:
            self._stream_finished(tid, req_id, blocks)

    def _stage(self, nbytes: int, timeout: float = 0.0) -> "torch.Tensor | None | bool": ...  # pragma: no cover
    def _put_packed(self, handle: Any, index: int, c: "torch.Tensor", timeout: float | None = None) -> None: ...  # pragma: no cover
    def _give_back(self, c: "torch.Tensor") -> None: ...  # pragma: no cover

    @property
    def streams_behind(self) -> int:
        """Streams waiting for send budget to pack their next chunk."""
        return sum(1 for s in list(self._streams.values()) if s.behind)

    def catch_up(self) -> None:
        """Every step (from get_finished): put what finished streams that fell behind can
        put now. Only finished ones: their blocks are pinned (delay_free) and their block
        table came with the finish. A running request's blocks may be preempted and
        reused between its steps, so a stream still prefilling catches up only from its
        next StreamSpec, whose table is that step's."""
        for tid in [t for t, st in self._streams.items() if st.behind and st.finished]:
            self._guarded(tid, functools.partial(self._advance, tid))

    def _guarded(self, tid: str, step: Callable[[], None]) -> None:
        try:
            step()
        except Exception as exc:  # noqa: BLE001 - one request's failure must not stop the engine
            log.error("pdxfer_stream_failed", transfer_id=tid, error=repr(exc))
            self._end_stream(tid, f"stream failed: {exc}")

    def _stream_finished(self, tid: str, req_id: str, blocks: Any) -> None:
        """The scheduler finished the request with delay_free: free its blocks once no
        chunk is left to pack: now, unless the stream is behind (or never seen: nothing
        of ours reads those blocks then, and holding them would leak them)."""
        st = self._streams.get(tid)
        if st is not None:
            st.finished = True
            if any(blocks):
                st.tables = [list(g) for g in blocks]  # what the blocks are now, pinned until we report
            return
        with self._lock:
            self._done_sending.add(req_id)

    def _end_stream(self, tid: str, why: str | None) -> None:
        """No more chunks for `tid`: abort its transfer unless `why` is None (every chunk
        was handed over), and remember (bounded) that it ended, so the StreamSpecs the
        scheduler still sends for it do not open it afresh, and its finish frees blocks."""
        st = self._streams.pop(tid, None)
        if st is not None and why is not None:
            st.handle.abort(why)
        if tid not in self._ended_streams:
            self._ended_streams[tid] = why or "handed over"
        if st is not None and st.finished:
            with self._lock:
                self._done_sending.add(st.req_id)
        while len(self._ended_streams) > _ENDED_REMEMBERED:
            self._ended_streams.popitem(last=False)

    def _fall_behind(self, tid: str, st: _Stream, why: str) -> None:
        st.behind = True
        if not st.deferred:
            st.deferred = True
            self.counters.inc("stream_deferred")
            log.info("pdxfer_stream_behind", transfer_id=tid, chunk=st.next, of=len(st.ranges), why=why,
                     hint="later steps pack the rest; the request's blocks stay held until then")

    def _stream_step(self, s: StreamSpec) -> None:
        assert self.packer is not None
        if s.transfer_id in self._ended_streams:
            return  # handed over already, or failed: its decode knows
        st = self._streams.get(s.transfer_id)
        if st is None:
            ranges = chunk_ranges(0, self._round(s.total), self.block_size)
            handle = self._open(s.transfer_id, s.peer, [self.packer.packed_nbytes(a, b) for a, b in ranges])
            if isinstance(handle, str):
                raise RuntimeError(handle)
            st = self._streams[s.transfer_id] = _Stream(handle, s.req_id, ranges)
        st.tables = [list(g) for g in s.block_ids]
        st.ready = self._round(s.done) if s.done >= s.total else s.done
        self._advance(s.transfer_id, early=s.done < s.total)

    def _advance(self, tid: str, *, early: bool = False) -> None:
        """Pack and put the stream's ready chunks in order, until one finds no budget."""
        assert self.packer is not None
        st = self._streams[tid]
        if st.handle.future.done():  # failed on its own (decode lost, deadline): no more packing
            exc = st.handle.future.exception()
            raise exc if exc is not None else RuntimeError("transfer ended before its last chunk")
        assert st.tables is not None and self.sender is not None
        while st.next < len(st.ranges) and st.ranges[st.next][1] <= st.ready:
            a, b = st.ranges[st.next]
            if not self._spills and not st.handle.fits(self.packer.packed_nbytes(a, b)):
                # No room: do not pack a copy that put() would refuse. (Until the decode
                # grants it, a transfer's chunks may fill half the budget only, so they
                # cannot starve the granted transfers whose completion makes room there.)
                self._fall_behind(tid, st, "send budget full" if st.handle.granted
                                  else "send budget half full, transfer not granted yet")
                return
            out = self._stage(self.packer.packed_nbytes(a, b))
            if out is False:
                self._fall_behind(tid, st, "send staging pool full")
                return
            c = self.packer.pack(st.tables, a, b, out=out)
            if tid not in self._in_flight:  # the transfer ended just now (its future's callback ran)
                self._give_back(c)
                raise RuntimeError("transfer ended before its last chunk")
            try:
                self._put_packed(st.handle, st.next, c, timeout=0)  # never wait on the engine thread
            except Backpressure:  # SpillExhausted too: no tier had room either
                self._fall_behind(tid, st, "send budget full")  # the packed copy went back: packed again later
                return
            if early:
                self.counters.inc("streamed_early")  # packed while the prefill still runs
            st.next += 1
        st.behind = False
        if st.next == len(st.ranges):
            self._end_stream(tid, None)
