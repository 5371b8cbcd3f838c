"""Worker-side half of PdxferConnector (runs in each vLLM worker process, next to the KV).

Prefill, sequential flow: blocks of a finished request are held (a `SendSpec` with a
lease) until a decode asks, over the side channel, for a push to its Receiver; the worker
opens the transfer and answers, then (in its pool) packs the token range out of the paged
cache one chunk per block (`meta.chunk_ranges`), each as the send budget takes it, and
reports the request as `finished_sending` once the last chunk is out of the blocks (vLLM
may reuse them then: the bytes live in the packed buffers, which the Sender keeps until
the transfer ends; with backend "nixl" those are pieces of the registered staging pool,
`staging.py`). Concurrent flow: see `stream.py`.

Decode: each `RecvSpec` starts a Receiver wait and (sequential flow) the push request;
the engine thread polls them in `get_finished`, which reports delivered and failed ones.
Nothing blocks the engine thread: side-channel round trips run in a small pool.
"""

from __future__ import annotations

import collections
import concurrent.futures
import functools
import threading
import time
from typing import Any, Mapping

import structlog
import zmq

from pdxfer.engine import Receiver, ReceiverConfig, Sender, SenderConfig
from pdxfer.pack import Packer
from pdxfer.plugins.vllm.counters import Counters
from pdxfer.plugins.vllm.cpu_layout import cpu_attn_views
from pdxfer.plugins.vllm.meta import PluginConfig, SendSpec, StepMeta, chunk_ranges
from pdxfer.plugins.vllm.sidechannel import SideChannelServer, side_request
from pdxfer.plugins.vllm.receiving import ReceivingMixin, _RecvJob, _release_when_done
from pdxfer.plugins.vllm.sending import SendingMixin
from pdxfer.plugins.vllm.staging import StagingPool
from pdxfer.plugins.vllm.stats import Recorder, Stats
from pdxfer.plugins.vllm.stream import StreamingMixin, _Stream

log = structlog.get_logger("pdxfer.vllm.worker")

_GONE_REMEMBERED = 4096  # ended holds remembered for late pushes
_SEND_THREADS = 16  # pulled transfers packed at once (each mostly waits: for its GRANT, or budget)


def _preconnected(url: str, address: str, fut: "concurrent.futures.Future[None]") -> None:
    """A decode receiver that is not up yet is no error: the first transfer to it connects."""
    exc = fut.exception()
    if exc is not None:
        log.warning("pdxfer_preconnect_failed", decode=url, receiver=address, error=repr(exc))


class WorkerSide(SendingMixin, StreamingMixin, ReceivingMixin):
    def __init__(self, cfg: PluginConfig, *, producer: bool, consumer: bool, rank: int = 0) -> None:
        self.cfg = cfg
        self.producer, self.consumer, self.rank = producer, consumer, rank
        self.packer: Packer | None = None
        self.sender: Sender | None = None
        self.receiver: Receiver | None = None
        self.side: SideChannelServer | None = None
        self._zctx: zmq.Context | None = None
        self._pool: concurrent.futures.ThreadPoolExecutor | None = None
        self._send_pool: concurrent.futures.ThreadPoolExecutor | None = None
        self._lock = threading.Condition()
        self._held: dict[str, SendSpec] = {}  # transfer id -> blocks held for a pull
        self._gone: collections.OrderedDict[str, str] = collections.OrderedDict()  # recently ended holds -> why
        self._done_sending: set[str] = set()  # req ids whose blocks vLLM may free
        self._in_flight: dict[str, Any] = {}  # tid -> its OutboundHandle, until the transfer ends
        self._packed_lock = threading.Lock()
        self.packed_bytes = 0  # packed chunks the Sender still holds (sending._put_packed)
        self.staging: StagingPool | None = None  # NIXL prefill: packed chunks live here (staging.py)
        self._streams: dict[str, _Stream] = {}  # tid -> streaming prefill being pushed
        self._ended_streams: collections.OrderedDict[str, str] = collections.OrderedDict()  # tid -> why
        self._jobs: dict[str, _RecvJob] = {}  # decode req id -> receive
        self._load_errors: set[int] = set()
        self.whole_blocks = False
        self._spills = False  # the sender has a spill tier (set in register)
        self.counters = Counters("sent", "send_failed", "expired", "dropped", "received", "recv_failed",
                                 "streamed_early", "stream_deferred")
        self.telemetry = Recorder(rank, self._sample_gauges)  # what vLLM's stats path reports

    # ------------------------------------------------------------------ lifecycle
    def register(self, kv_caches: Mapping[str, Any], kv_cache_config: Any) -> None:
        views, kinds = cpu_attn_views(kv_caches, kv_cache_config)
        self.packer = Packer.from_vllm(views, kv_cache_config, kinds=kinds)
        # CPU attention stores K/V inside a block in an ISA-specific order, so a token's
        # bytes are not where the (K, V) views say: move whole blocks, which is exact.
        self.whole_blocks = any(k is not None for k in kinds)
        self._pool = concurrent.futures.ThreadPoolExecutor(4, thread_name_prefix="pdxfer-vllm")
        # Pulled transfers waiting for their GRANT or for budget each hold a thread here,
        # apart from the pool the side-channel round trips use.
        self._send_pool = concurrent.futures.ThreadPoolExecutor(_SEND_THREADS, thread_name_prefix="pdxfer-vllm-send")
        self._zctx = zmq.Context()
        if self.producer:
            self.sender = Sender(SenderConfig(memory_budget=self.cfg.sender_memory, deadline_s=self.cfg.recv_timeout_s,
                                              peer_timeout_s=self.cfg.peer_timeout_s,
                                              spill_host_bytes=self.cfg.spill_host_bytes,
                                              spill_disk_bytes=self.cfg.spill_disk_bytes, spill_dir=self.cfg.spill_dir,
                                              spill_after_s=self.cfg.spill_after_s,
                                              backend=self.cfg.backend, ucx=dict(self.cfg.ucx))).start()
        if self.consumer:
            self.receiver = Receiver(ReceiverConfig(capacity=self.cfg.receiver_capacity, host=self.cfg.receiver_host,
                                                    control_port=self.cfg.receiver_port,
                                                    lease_s=self.cfg.receiver_lease_s,
                                                    ucx=dict(self.cfg.ucx))).start()
        self._spills = self.cfg.spill_host_bytes > 0 or self.cfg.spill_disk_bytes > 0
        if self.sender is not None and self.cfg.backend == "nixl":
            self.staging = StagingPool(self.cfg.sender_memory, self.packer.bound.device)
            self.sender.register(self.staging.registrable())  # once: no chunk needs a registration of its own
        if self.sender is not None:
            # Concurrent flow: lanes to the configured decode receivers are set up now, so
            # the first streamed prefill does not wait for HELLO round trips (under load
            # those outlasted a short prefill, and its blocks went out only after it ended).
            for url, address in self.cfg.decode_receivers.items():
                self.sender.connect(address).add_done_callback(functools.partial(_preconnected, url, address))
        # Both roles listen: the prefill for push/drop requests, either for "stats".
        self.side = SideChannelServer(self.cfg.side_host, self.cfg.side_port + self.rank, self._on_side)
        log.info("pdxfer_vllm_worker_ready", producer=self.producer, consumer=self.consumer,
                 side=self.side.address if self.side else None,
                 receiver=self.receiver.control_address if self.receiver else None,
                 groups=[(g.kind.value, g.block_size, g.num_kv_heads, g.head_dim, g.dtype)
                         for g in self.packer.layout.groups])

    def shutdown(self) -> None:
        if self.side is not None:
            self.side.close()
        for pool in (self._pool, self._send_pool):
            if pool is not None:
                pool.shutdown(wait=False, cancel_futures=True)
        for job in self._jobs.values():
            _release_when_done(job.wait)
        if self.sender is not None:
            self.sender.close()
        if self.receiver is not None:
            self.receiver.close()
        if self._zctx is not None:
            self._zctx.term()

    # ------------------------------------------------------------------ per step
    def on_meta(self, meta: StepMeta) -> None:
        with self._lock:
            for s in meta.sends:
                self._held[s.transfer_id] = s
            self._lock.notify_all()
        for s in meta.sends:
            if s.push_to:  # concurrent flow: the decode is waiting already
                assert self._pool is not None
                self._pool.submit(self._push_quietly, s.transfer_id, s.push_to, 0, s.num_tokens)
        for r in meta.recvs:
            self._start_recv(r)
        for rid in meta.cancels:
            job = self._jobs.get(rid)
            if job is not None:
                job.cancelled = True
        for d in meta.drops:
            assert self._pool is not None and self._zctx is not None
            self._pool.submit(self._drop_quietly, d.remote_host, d.remote_port, d.transfer_id)

    def get_finished(self) -> tuple[set[str], set[str], set[str]]:
        """(finished_sending, finished_recving, failed_recving) since the last call."""
        self.catch_up()  # every step, forward or not: streams behind put what they can now
        now = time.time()
        with self._lock:
            for tid, s in list(self._held.items()):
                if s.expires_at < now:
                    log.warning("pdxfer_hold_expired", transfer_id=tid, request_id=s.req_id)
                    del self._held[tid]
                    self._forget(tid, "expired")
                    self._done_sending.add(s.req_id)
                    self.counters.inc("expired")
            sending, self._done_sending = self._done_sending, set()
        recving: set[str] = set()
        failed: set[str] = set()
        for rid, job in list(self._jobs.items()):
            if job.cancelled:  # request aborted: vLLM frees the blocks once we say so
                del self._jobs[rid]
                _release_when_done(job.wait)
                recving.add(rid)
                continue
            outcome = self._poll(job)
            if outcome is None:
                continue
            del self._jobs[rid]
            recving.add(rid)
            if outcome:
                failed.add(rid)
        return sending, recving, failed

    # ------------------------------------------------------------------ block geometry (both halves)
    @property
    def block_size(self) -> int:
        assert self.packer is not None
        return self.packer.layout.groups[0].block_size

    def _round(self, t1: int) -> int:
        """End of a token range as it travels: whole blocks when the layout needs them."""
        bs = self.block_size
        return -(-t1 // bs) * bs if self.whole_blocks else t1

    # ------------------------------------------------------------------ prefill
    def _on_side(self, msg: dict[str, Any]) -> dict[str, Any]:
        op = msg.get("op")
        if op == "stats":
            return {"ok": True, **self.stats()}
        tid = msg.get("transfer_id")
        if not isinstance(tid, str):
            return {"ok": False, "error": "transfer_id missing"}
        if op == "drop":
            with self._lock:
                s = self._held.pop(tid, None)
                if s is not None:
                    self._forget(tid, "dropped")
                    self._done_sending.add(s.req_id)
                    self.counters.inc("dropped")
            return {"ok": True, "held": s is not None}
        if op == "push":
            return self._push(tid, str(msg.get("receiver")), int(msg.get("t0", 0)), msg.get("t1"))
        return {"ok": False, "error": f"unknown op {op!r}"}

    def _push_quietly(self, tid: str, peer: str, t0: int, t1: int) -> None:
        reply = self._push(tid, peer, t0, t1)
        if not reply.get("ok"):
            log.error("pdxfer_push_failed", transfer_id=tid, error=reply.get("error"))

    def _drop_quietly(self, host: str, port: int, tid: str) -> None:
        assert self._zctx is not None
        try:
            side_request(self._zctx, host, port, {"op": "drop", "transfer_id": tid}, self.cfg.handshake_timeout_s)
        except Exception as exc:  # noqa: BLE001 - the prefill's lease frees them anyway
            log.warning("pdxfer_drop_failed", transfer_id=tid, error=repr(exc))

    def _forget(self, tid: str, why: str) -> None:
        """Remember (bounded) why a hold ended, so a late push is answered at once. Holds the lock."""
        self._gone[tid] = why
        while len(self._gone) > _GONE_REMEMBERED:
            self._gone.popitem(last=False)
        self._lock.notify_all()

    def _push(self, tid: str, peer: str, t0: int, t1: Any) -> dict[str, Any]:
        assert self.packer is not None and self.sender is not None
        with self._lock:
            # The decode may ask before this engine's step registered the hold, and under
            # load that step can be seconds away: wait as long as the decode will (its
            # recv_timeout_s), but answer at once for a hold that already ended.
            self._lock.wait_for(lambda: tid in self._held or tid in self._gone, timeout=self.cfg.recv_timeout_s)
            spec = self._held.pop(tid, None)
            if spec is not None:
                self._forget(tid, "taken by an earlier push")
            else:
                why = self._gone.get(tid, f"unknown after {self.cfg.recv_timeout_s}s")
        if spec is None:
            return {"ok": False, "error": f"transfer {tid} is not held here ({why})"}
        handed_over = False
        try:
            t1 = spec.num_tokens if t1 is None else int(t1)
            limit = spec.num_tokens
            if self.whole_blocks:
                limit = max(limit, len(spec.block_ids[0]) * self.packer.layout.groups[0].block_size)
            if not 0 <= t0 < t1 <= limit:
                return {"ok": False, "error": f"tokens [{t0},{t1}) outside the {limit} held"}
            ranges = chunk_ranges(t0, t1, self.block_size)
            sizes = [self.packer.packed_nbytes(a, b) for a, b in ranges]
            handle = self._open(tid, peer, sizes)
            if isinstance(handle, str):
                return {"ok": False, "error": handle}
            assert self._send_pool is not None
            self._send_pool.submit(self._pack_and_put, spec, handle, ranges)
            handed_over = True
        except Exception as exc:  # noqa: BLE001
            self.counters.inc("send_failed")
            return {"ok": False, "error": f"push failed: {exc}"}
        finally:
            if not handed_over:
                with self._lock:  # no byte will be read from the blocks: free them
                    self._done_sending.add(spec.req_id)
        return {"ok": True, "nbytes": sum(sizes)}

    def _pack_and_put(self, spec: SendSpec, handle: Any, ranges: list[tuple[int, int]]) -> None:
        """In the worker's send pool, after the decode got its answer: once the decode
        granted the transfer, pack one chunk at a time and put it, waiting (bounded) for
        send budget. So the packed copies of a request never exceed the budget by more than
        one chunk, and a decode with no room ties up neither the side channel (other
        decodes' pushes, drops, stats) nor memory. The blocks are freed once the last chunk
        is out of them, whatever happened."""
        assert self.packer is not None
        tables = [list(g) for g in spec.block_ids]
        try:
            # Reserve before you copy: chunks of a transfer the decode has not granted would
            # sit in the send budget and starve the granted transfers to other decodes.
            # The blocks are held by the lease meanwhile; the transfer's deadline bounds it.
            if not handle.wait_granted(self.cfg.recv_timeout_s + 1.0):
                handle.abort(f"no GRANT within {self.cfg.recv_timeout_s + 1.0}s")  # its deadline should have ended it
                return
            for i, (a, b) in enumerate(ranges):
                if handle.future.done():  # failed meanwhile (decode lost, deadline): stop packing
                    return
                out = self._stage(self.packer.packed_nbytes(a, b), self.cfg.recv_timeout_s)
                if out is False:
                    handle.abort(f"no room in the send staging pool for {self.cfg.recv_timeout_s}s")
                    return
                c = self.packer.pack(tables, a, b, out=out)
                self._put_packed(handle, i, c)
        except Exception as exc:  # noqa: BLE001 - the transfer fails, the decode is told by ABORT
            log.warning("pdxfer_push_put_failed", transfer_id=spec.transfer_id, error=repr(exc))
            handle.abort(f"submit failed: {exc}")
        finally:
            with self._lock:  # bytes are out of the blocks (or never will be): free them
                self._done_sending.add(spec.req_id)

    # ------------------------------------------------------------------ observability
    def take_stats(self) -> Stats | None:
        """What happened since vLLM last asked (`stats.Recorder.take`); engine thread."""
        return self.telemetry.take()

    def _sample_gauges(self) -> dict[str, float]:
        """Engine thread, once a second at most: levels worth a Prometheus gauge. The
        receiver's ledger is a round trip to its loop, bounded short: a stuck loop costs
        a gauge sample, not the step."""
        out: dict[str, float] = {}
        if self.sender is not None:
            spill = self.sender.spill_usage()
            out.update(send_budget_used_bytes=self.sender.budget_used, streams_behind=self.streams_behind,
                       spill_host_bytes=spill.get("host_bytes", 0), spill_disk_bytes=spill.get("disk_bytes", 0))
        if self.receiver is not None:
            try:
                led = self.receiver.ledger(timeout=0.2)
            except Exception:  # noqa: BLE001 - no sample this time; the loop's own watchdog reports stalls
                return out
            out.update(receiver_reserved_bytes=led.reserved_bytes, receiver_waiting=led.waiting_count)
        return out

    def stats(self) -> dict[str, Any]:
        """Everything this worker holds: the leak check reads it over the side channel."""
        with self._lock:
            held = len(self._held)
        out: dict[str, Any] = {"held": held, "in_flight": len(self._in_flight), "receiving": len(self._jobs),
                               "packed_bytes": self.packed_bytes,
                               "streaming": len(self._streams),
                               "streams_behind": self.streams_behind,
                               "counters": self.counters.snapshot()}
        if self.sender is not None:
            out["sender_budget_used"] = self.sender.budget_used
            out["sender_spill"] = self.sender.spill_usage()
            out["sender_loop_stalls"] = self.sender.loop_stalls
            out["sender_backend"] = self.sender.config.backend
            out["sender_nixl_write_requests"] = self.sender.nixl_write_requests
        if self.receiver is not None:
            led = self.receiver.ledger()
            out["receiver"] = {"capacity": led.capacity, "reserved_bytes": led.reserved_bytes,
                               "waiting_count": led.waiting_count,
                               "granted_count": led.granted_count, "delivered_count": led.delivered_count,
                               "address": self.receiver.control_address}
            out["receiver_loop_stalls"] = self.receiver.loop_stalls
        return out
