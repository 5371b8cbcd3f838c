"""The decode worker's receiving half of `WorkerSide`: a Receiver wait per request,
the push request for the sequential flow, and the unpack into the request's blocks.

`get_finished` (on the engine thread) polls each receive: a delivered transfer is
unpacked and released at once; a failed one is released when (if ever) it arrives and
its blocks are reported as load errors, so vLLM applies `kv_load_failure_policy`.
Nothing here blocks the engine thread: the push request runs in the worker's pool.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import structlog
import torch
import zmq

from pdxfer.plugins.vllm.counters import Counters
from pdxfer.plugins.vllm.meta import PluginConfig, RecvSpec, chunk_ranges
from pdxfer.plugins.vllm.sidechannel import side_request
from pdxfer.plugins.vllm.stats import Recorder

if TYPE_CHECKING:
    from pdxfer.engine import Receiver
    from pdxfer.pack import Packer

log = structlog.get_logger("pdxfer.vllm.worker")


@dataclass
class _RecvJob:
    spec: RecvSpec
    wait: "concurrent.futures.Future[Any]"
    ask: "concurrent.futures.Future[dict[str, Any]] | None"
    started: float = field(default_factory=time.monotonic)
    cancelled: bool = False


def _release_when_done(fut: "concurrent.futures.Future[Any]") -> None:
    """A receive nobody will unpack still owns reserved bytes: give them back on arrival."""
    def _cb(f: "concurrent.futures.Future[Any]") -> None:
        if not f.cancelled() and f.exception() is None:
            f.result().release()
    fut.add_done_callback(_cb)


class ReceivingMixin:
    """The decode worker's receiving half; `WorkerSide` provides the state used here."""

    cfg: PluginConfig
    packer: "Packer | None"
    receiver: "Receiver | None"
    counters: Counters
    telemetry: Recorder
    whole_blocks: bool
    _pool: concurrent.futures.ThreadPoolExecutor | None
    _zctx: zmq.Context | None
    _jobs: dict[str, _RecvJob]
    _load_errors: set[int]
    block_size: int

    def _round(self, t1: int) -> int: ...  # pragma: no cover

    def take_load_errors(self) -> set[int]:
        errs, self._load_errors = self._load_errors, set()
        return errs

    def _block_range(self, spec: RecvSpec) -> RecvSpec:
        """The token range widened to whole blocks when the cache layout needs it."""
        if not self.whole_blocks or self.packer is None:
            return spec
        bs = self.block_size
        t1 = min(self._round(spec.t1), len(spec.block_ids[0]) * bs)
        return dataclasses.replace(spec, t0=spec.t0 // bs * bs, t1=max(t1, spec.t1))

    def _start_recv(self, spec: RecvSpec) -> None:
        assert self.receiver is not None and self._pool is not None and self._zctx is not None
        spec = self._block_range(spec)
        wait = self.receiver.wait_future(spec.transfer_id, self.cfg.recv_timeout_s)
        ask = None
        if spec.remote_host is not None and spec.remote_port is not None:
            msg = {"op": "push", "transfer_id": spec.transfer_id, "receiver": self.receiver.control_address,
                   "t0": spec.t0, "t1": spec.t1}
            ask = self._pool.submit(side_request, self._zctx, spec.remote_host, spec.remote_port, msg,
                                    self.cfg.handshake_timeout_s, self.cfg.recv_timeout_s)
        self._jobs[spec.req_id] = _RecvJob(spec, wait, ask)

    def _poll(self, job: _RecvJob) -> str | None:
        """None while in progress; "" when loaded; an error text when it failed."""
        spec = job.spec
        error = kind = ""
        if job.ask is not None and job.ask.done():
            try:
                reply = job.ask.result()
                if not reply.get("ok"):
                    error, kind = f"prefill refused: {reply.get('error')}", "prefill_refused"
            except Exception as exc:  # noqa: BLE001
                error, kind = f"push request failed: {exc}", "push_failed"
            job.ask = None
        nbytes = 0
        if not error:
            if not job.wait.done():
                return None
            try:
                received = job.wait.result()
            except Exception as exc:  # noqa: BLE001
                error, kind = f"{type(exc).__name__}: {exc}", type(exc).__name__
            else:
                nbytes = received.payload.total_bytes
                error = self._unpack(spec, received)
                kind = error.split(":", 1)[0].replace(" ", "_")  # layout_mismatch, unpack_failed
        if error:
            _release_when_done(job.wait)
            log.error("pdxfer_recv_failed", request_id=spec.req_id, transfer_id=spec.transfer_id, error=error)
            self.counters.inc("recv_failed")
            self.telemetry.failed("recv", kind)
            self._mark_load_error(spec)
            return error
        self.counters.inc("received")
        self.telemetry.received(nbytes, time.monotonic() - job.started)
        return ""

    def _unpack(self, spec: RecvSpec, received: Any) -> str:
        """Scatter the chunks this request needs; a pushed stream starts at token 0, so
        chunks below a local prefix hit (spec.t0) are skipped."""
        assert self.packer is not None
        try:
            start = spec.t0 if spec.remote_host is not None else 0
            ranges = chunk_ranges(start, spec.t1, self.block_size)
            sizes = tuple(self.packer.packed_nbytes(a, b) for a, b in ranges)
            if received.payload.chunk_sizes != sizes:
                return (f"layout mismatch: got chunks {received.payload.chunk_sizes[:4]}... "
                        f"({received.payload.chunk_count}), tokens [{start},{spec.t1}) need {sizes[:4]}... ({len(sizes)})")
            tables = [list(g) for g in spec.block_ids]
            for i, (a, b) in enumerate(ranges):
                if a < spec.t0:
                    continue
                buf = torch.frombuffer(received.chunk(i), dtype=torch.uint8)
                self.packer.unpack(tables, a, b, buf)
                del buf
            return ""
        except Exception as exc:  # noqa: BLE001
            return f"unpack failed: {exc}"
        finally:
            received.release()

    def _mark_load_error(self, spec: RecvSpec) -> None:
        if len(spec.block_ids) != 1 or self.packer is None:
            return  # vLLM maps block-level errors back to requests only with one group
        bs = self.packer.layout.groups[0].block_size
        self._load_errors.update(spec.block_ids[0][spec.t0 // bs: -(-spec.t1 // bs)])
