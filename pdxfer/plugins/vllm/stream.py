"""Streaming prefill (concurrent flow): push each block's chunk right after the forward
step that computed it, while the prompt's later chunks are still being prefilled.

The scheduler side sends a `StreamSpec` per step (tokens done so far, block table); the
first one opens the transfer with the whole prompt's chunk sizes (known up front: one
chunk per block, `meta.chunk_ranges`), so the decode's Receiver reserves everything
before the first byte moves. Every chunk is packed out of the blocks during the step
that completed it, so by the time vLLM finishes the request nothing is left to copy
and its blocks are freed at once (no lease on the prefill side at all).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import structlog
import torch

from pdxfer.plugins.vllm.counters import Counters
from pdxfer.plugins.vllm.meta import StepMeta, StreamSpec, chunk_ranges

if TYPE_CHECKING:
    from pdxfer.pack import Packer

log = structlog.get_logger("pdxfer.vllm.stream")


@dataclass
class _Stream:
    handle: Any
    ranges: list[tuple[int, int]]
    next: int = 0


class StreamingMixin:
    """The prefill worker's streaming half; `WorkerSide` provides the state used here."""

    packer: "Packer | None"
    counters: Counters
    _streams: dict[str, _Stream]
    _in_flight: dict[str, tuple[Any, list[torch.Tensor]]]

    # provided by WorkerSide
    block_size: int

    def _round(self, t1: int) -> int: ...  # pragma: no cover

    def _open(self, tid: str, peer: str, sizes: list[int]) -> Any: ...  # pragma: no cover

    def after_forward(self, meta: StepMeta) -> None:
        """Concurrent flow: pack and put every chunk whose tokens this forward completed,
        while the prefill's later chunks are still to be computed."""
        for tid in meta.stream_aborts:
            st = self._streams.pop(tid, None)
            if st is not None:
                st.handle.abort("prefill request aborted")
        for s in meta.streams:
            try:
                self._stream_step(s)
            except Exception as exc:  # noqa: BLE001 - one request's failure must not stop the engine
                log.error("pdxfer_stream_failed", transfer_id=s.transfer_id, error=repr(exc))
                st = self._streams.pop(s.transfer_id, None)
                if st is not None:
                    st.handle.abort(f"stream failed: {exc}")

    def _stream_step(self, s: StreamSpec) -> None:
        assert self.packer is not None
        st = self._streams.get(s.transfer_id)
        if st is None:
            if s.transfer_id in self._in_flight:
                return  # already fully handed over
            ranges = chunk_ranges(0, self._round(s.total), self.block_size)
            handle = self._open(s.transfer_id, s.peer, [self.packer.packed_nbytes(a, b) for a, b in ranges])
            if isinstance(handle, str):
                raise RuntimeError(handle)
            st = self._streams[s.transfer_id] = _Stream(handle, ranges)
        tables = [list(g) for g in s.block_ids]
        ready = self._round(s.done) if s.done >= s.total else s.done
        while st.next < len(st.ranges) and st.ranges[st.next][1] <= ready:
            a, b = st.ranges[st.next]
            if s.done < s.total:
                self.counters.inc("streamed_early")  # packed while the prefill still runs
            c = self.packer.pack(tables, a, b)
            self._in_flight[s.transfer_id][1].append(c)
            st.handle.put(st.next, c.numpy())
            st.next += 1
        if st.next == len(st.ranges):
            del self._streams[s.transfer_id]

