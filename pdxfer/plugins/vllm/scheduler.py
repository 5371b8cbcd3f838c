"""Scheduler-side half of PdxferConnector (runs inside vLLM's scheduler process).

It decides, per request, what the worker must do, and queues that into the next step's
metadata: on the prefill, hold a finished request's blocks for a pull (`SendSpec`); on
the decode, load the prompt's KV into freshly allocated blocks (`RecvSpec`), cancel a
receive whose request was aborted, or tell a prefill to drop blocks nobody will fetch.
Only plain attributes of vLLM's `Request` are read, so tests drive it with stand-ins.
"""

from __future__ import annotations

import time
from typing import Any, Callable, Mapping, Sequence

import structlog

from pdxfer.plugins.vllm.meta import Blocks, DropSpec, PluginConfig, RecvSpec, SendSpec, StepMeta, StreamSpec
from pdxfer.plugins.vllm.params import ParamsError, TransferParams, parse_params, prefill_answer

log = structlog.get_logger("pdxfer.vllm.scheduler")

# vLLM RequestStatus names after which a prefill's KV is complete and worth sending.
_SENDABLE = ("FINISHED_STOPPED", "FINISHED_LENGTH_CAPPED")


def _status_name(request: Any) -> str:
    s = getattr(request, "status", None)
    return getattr(s, "name", str(s))


def as_groups(block_ids: Any) -> Blocks:
    """Per-group block ids from vLLM's flat list (non-HMA) or tuple of lists (HMA)."""
    if block_ids and isinstance(block_ids[0], (list, tuple)):
        return tuple(tuple(int(b) for b in g) for g in block_ids)
    return (tuple(int(b) for b in block_ids),)


class SchedulerSide:
    def __init__(self, cfg: PluginConfig, engine_id: str, *, clock: Any = time.time) -> None:
        self.cfg = cfg
        self.engine_id = engine_id
        self._clock = clock
        self._meta = StepMeta()
        self._receiving: set[str] = set()  # decode req ids whose RecvSpec went to the worker
        # prefill req id -> [request, transfer id, decode Receiver address, tokens pushed so far]
        self._streams: dict[str, list[Any]] = {}

    # ------------------------------------------------------------------ helpers
    @staticmethod
    def params(request: Any) -> TransferParams | None:
        try:
            return parse_params(getattr(request, "kv_transfer_params", None))
        except ParamsError as exc:
            log.warning("bad_kv_transfer_params", request_id=request.request_id, error=str(exc))
            return None

    @staticmethod
    def _remote_tokens(request: Any, p: TransferParams) -> int:
        n = len(getattr(request, "prompt_token_ids", None) or ())
        if p.remote_num_tokens is not None:
            n = min(n, p.remote_num_tokens)
        return n

    # ------------------------------------------------------------------ vLLM hooks
    def get_num_new_matched_tokens(self, request: Any, num_computed_tokens: int) -> tuple[int, bool]:
        """Decode: every prompt token the prefill holds beyond the local hit, loaded async."""
        p = self.params(request)
        if p is None or not p.do_remote_prefill:
            return 0, False
        count = self._remote_tokens(request, p) - num_computed_tokens
        return (count, True) if count > 0 else (0, False)

    def push_target(self, p: TransferParams) -> str | None:
        """Concurrent flow: the decode's Receiver address, when this prefill knows it."""
        if not (p.do_remote_decode and p.transfer_id and p.remote_decode_url):
            return None
        peer = self.cfg.decode_receivers.get(p.remote_decode_url.rstrip("/"))
        if peer is None:
            log.warning("unknown_decode_url", url=p.remote_decode_url, transfer_id=p.transfer_id,
                        hint="add it to kv_connector_extra_config.decode_receivers; falling back to a pull")
        return peer

    def update_state_after_alloc(self, request: Any, block_ids: Sequence[Sequence[int]], num_external_tokens: int) -> None:
        p = self.params(request)
        if p is not None and p.do_remote_decode and request.request_id not in self._streams:
            peer = self.push_target(p)
            if peer is not None:
                self._streams[request.request_id] = [request, p.transfer_id, peer, 0]
            return
        if p is None or not p.do_remote_prefill:
            return
        raw = request.kv_transfer_params
        raw["do_remote_prefill"] = False  # one load per request, even after a preemption
        assert p.transfer_id is not None
        if num_external_tokens <= 0:  # full local prefix hit: nothing to load
            self._drop(p, request.request_id, "nothing to load")
            return
        t1 = self._remote_tokens(request, p)
        spec = RecvSpec(request.request_id, p.transfer_id, as_groups(block_ids), t1 - num_external_tokens, t1,
                        p.remote_host, p.remote_port)
        self._meta.recvs.append(spec)
        self._receiving.add(request.request_id)

    def request_finished(self, request: Any, block_ids: Any) -> tuple[bool, dict[str, Any] | None]:
        rid = request.request_id
        if rid in self._receiving:  # decode aborted mid-receive: the scheduler waits for
            self._meta.cancels.append(rid)  # finished_recving before it frees the blocks
            return False, None
        p = self.params(request)
        if p is None:
            return False, None
        if p.do_remote_prefill:  # decode request that never got blocks (aborted while waiting)
            request.kv_transfer_params["do_remote_prefill"] = False
            self._drop(p, rid, "finished before its blocks were allocated")
            return False, None
        if not p.do_remote_decode:
            return False, None
        stream = self._streams.pop(rid, None)
        if stream is not None:  # concurrent flow: usually every chunk was packed in the last forward
            _, tid, _, pushed = stream
            if _status_name(request) in _SENDABLE and pushed >= int(request.num_prompt_tokens):
                # delay_free: a stream that fell behind (no send budget) still packs out of
                # these blocks; the worker reports the request once it no longer does.
                self._meta.stream_finished.append((tid, rid, as_groups(block_ids) if block_ids else ((),)))
                return True, {"transfer_id": tid, "do_remote_prefill": True, "do_remote_decode": False,
                              "remote_num_tokens": pushed, "pdxfer": 1}
            self._meta.stream_aborts.append(tid)
            return False, None
        groups = as_groups(block_ids) if block_ids else ((),)
        if _status_name(request) not in _SENDABLE or not any(groups):
            return False, None  # aborted or errored prefill: free at once, nothing to send
        tid = p.transfer_id or f"{self.engine_id}-{rid}"
        num_tokens = int(request.num_computed_tokens)
        push_to = self.cfg.decode_receivers.get(p.remote_decode_url.rstrip("/")) if p.remote_decode_url else None
        self._meta.sends.append(SendSpec(rid, tid, groups, num_tokens, self._clock() + self.cfg.lease_s, push_to))
        answer = prefill_answer(transfer_id=tid, host=self.cfg.side_host, port=self.cfg.side_port,
                                engine_id=self.engine_id, request_id=rid, block_ids=groups, num_tokens=num_tokens)
        return True, answer

    def build_connector_meta(self, num_scheduled: Mapping[str, int] | None = None,
                             block_ids_of: Callable[[str], Sequence[Sequence[int]]] | None = None) -> StepMeta:
        """This step's instructions. `num_scheduled` (tokens per request this step) and
        `block_ids_of` drive streaming prefills; request counters are not yet advanced."""
        for rid, n in (num_scheduled or {}).items():
            st = self._streams.get(rid)
            if st is None or n <= 0 or block_ids_of is None:
                continue
            request, tid, peer, pushed = st
            total = int(request.num_prompt_tokens)
            if pushed >= total and int(request.num_computed_tokens) >= total:
                continue  # every chunk is handed over; later (decode) steps add nothing
            done = min(int(request.num_computed_tokens) + int(n), total)
            st[3] = done
            self._meta.streams.append(StreamSpec(rid, tid, peer, as_groups(block_ids_of(rid)), done, total))
        meta, self._meta = self._meta, StepMeta()
        return meta

    def on_finished_recving(self, req_ids: Sequence[str]) -> None:
        for rid in req_ids:
            self._receiving.discard(rid)

    def _drop(self, p: TransferParams, rid: str, why: str) -> None:
        if p.pull and p.transfer_id:
            log.info("pdxfer_drop_remote", request_id=rid, transfer_id=p.transfer_id, why=why)
            assert p.remote_host is not None and p.remote_port is not None
            self._meta.drops.append(DropSpec(p.transfer_id, p.remote_host, p.remote_port))
