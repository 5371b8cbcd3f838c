"""PdxferConnector: the vLLM v1 KV connector class (vLLM 0.32 `KVConnectorBase_V1` API).

vLLM builds one instance in the scheduler process (role SCHEDULER) and one per worker
(role WORKER); each delegates to `SchedulerSide` or `WorkerSide`, which hold all logic
and import nothing from vLLM. Roles come from `kv_role`: kv_producer (prefill),
kv_consumer (decode) or kv_both. Transfer telemetry takes vLLM's connector-stats path
(`stats`, `prom`): its "KV Transfer metrics" log line and `vllm:pdxfer_*` in /metrics.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from vllm.distributed.kv_transfer.kv_connector.v1.base import (
    KVConnectorBase_V1,
    KVConnectorMetadata,
    KVConnectorRole,
    KVConnectorTransferResults,
)

from vllm.distributed.kv_transfer.kv_connector.v1.metrics import KVConnectorPromMetrics, KVConnectorStats

from pdxfer.plugins.vllm import stats
from pdxfer.plugins.vllm.meta import PluginConfig, StepMeta
from pdxfer.plugins.vllm.prom import PromSink
from pdxfer.plugins.vllm.scheduler import SchedulerSide
from pdxfer.plugins.vllm.worker import WorkerSide

if TYPE_CHECKING:
    import torch
    from vllm.config import VllmConfig
    from vllm.forward_context import ForwardContext
    from vllm.v1.attention.backend import AttentionMetadata
    from vllm.v1.core.kv_cache_manager import KVCacheBlocks
    from vllm.v1.core.sched.output import SchedulerOutput
    from vllm.v1.kv_cache_interface import KVCacheConfig
    from vllm.v1.outputs import KVConnectorOutput
    from vllm.v1.request import Request


class PdxferConnectorMetadata(KVConnectorMetadata):
    """One step's instructions, scheduler -> workers."""

    def __init__(self, step: StepMeta) -> None:
        self.step = step


class PdxferKVConnectorStats(KVConnectorStats):
    """vLLM's container around a `stats` payload (merged across workers and steps)."""

    def __post_init__(self) -> None:
        if not self.data:
            self.reset()

    def reset(self) -> None:
        self.data = stats.empty()

    def aggregate(self, other: KVConnectorStats) -> KVConnectorStats:
        stats.merge(self.data, other.data)
        return self

    def reduce(self) -> dict[str, int | float]:
        return stats.summary(self.data)

    def is_empty(self) -> bool:
        return stats.is_empty(self.data)


class PdxferPromMetrics(KVConnectorPromMetrics):
    """pdxfer's series in vLLM's /metrics (`prom.PromSink`)."""

    def __init__(self, vllm_config: "VllmConfig", metric_types: dict[type, type], labelnames: list[str],
                 per_engine_labelvalues: dict[int, list[object]]) -> None:
        super().__init__(vllm_config, metric_types, labelnames, per_engine_labelvalues)
        self._sink = PromSink(metric_types, labelnames, per_engine_labelvalues)

    def observe(self, transfer_stats_data: dict[str, Any], engine_idx: int = 0) -> None:
        self._sink.observe(transfer_stats_data, engine_idx)


def _tp_rank() -> int:
    try:
        from vllm.distributed.parallel_state import get_tensor_model_parallel_rank

        return int(get_tensor_model_parallel_rank())
    except Exception:  # noqa: BLE001 - not initialised (tests, single process)
        return 0


class PdxferConnector(KVConnectorBase_V1):
    def __init__(self, vllm_config: "VllmConfig", role: KVConnectorRole, kv_cache_config: "KVCacheConfig") -> None:
        super().__init__(vllm_config=vllm_config, role=role, kv_cache_config=kv_cache_config)
        ktc = self._kv_transfer_config
        self._cfg = PluginConfig.from_extra(ktc.kv_connector_extra_config, kv_ip=getattr(ktc, "kv_ip", None), kv_port=ktc.kv_port)
        self._sched: SchedulerSide | None = None
        self._worker: WorkerSide | None = None
        if role == KVConnectorRole.SCHEDULER:
            self._sched = SchedulerSide(self._cfg, str(ktc.engine_id))
        else:
            self._worker = WorkerSide(self._cfg, producer=bool(ktc.is_kv_producer),
                                      consumer=bool(ktc.is_kv_consumer), rank=_tp_rank())

    # ==================================================================== worker side
    def register_kv_caches(self, kv_caches: dict[str, "torch.Tensor"]) -> None:
        assert self._worker is not None
        self._worker.register(kv_caches, self._kv_cache_config)

    def start_load_kv(self, forward_context: "ForwardContext", **kwargs: Any) -> None:
        assert self._worker is not None
        meta = self._get_connector_metadata()
        assert isinstance(meta, PdxferConnectorMetadata)
        if not meta.step.empty():
            self._worker.on_meta(meta.step)

    def wait_for_layer_load(self, layer_name: str) -> None:
        return  # loads complete between steps (async), never inside a forward

    def save_kv_layer(self, layer_name: str, kv_layer: "torch.Tensor", attn_metadata: "AttentionMetadata",
                      **kwargs: Any) -> None:
        return  # blocks are packed when a decode asks for them, not per layer

    def wait_for_save(self) -> None:
        """After the forward: pack the chunks that streaming prefills just completed."""
        if self._worker is None or not self.has_connector_metadata():
            return
        meta = self._get_connector_metadata()
        if isinstance(meta, PdxferConnectorMetadata) and (meta.step.streams or meta.step.stream_aborts
                                                                  or meta.step.stream_finished):
            self._worker.after_forward(meta.step)

    def get_finished(self, finished_req_ids: set[str]) -> tuple[set[str] | None, set[str] | None]:
        r = self.get_transfer_results(finished_req_ids)
        return r.finished_sending or None, r.finished_recving or None

    def get_transfer_results(self, finished_req_ids: set[str]) -> KVConnectorTransferResults:
        assert self._worker is not None
        sending, recving, failed = self._worker.get_finished()
        return KVConnectorTransferResults(finished_sending=sending, finished_recving=recving, failed_recving=failed)

    def get_block_ids_with_load_errors(self) -> set[int]:
        return self._worker.take_load_errors() if self._worker is not None else set()

    def shutdown(self) -> None:
        if self._worker is not None:
            self._worker.shutdown()

    def get_kv_connector_stats(self) -> KVConnectorStats | None:
        """After every step: what this worker's transfers did since the last one (None if
        nothing: vLLM then sends nothing)."""
        data = self._worker.take_stats() if self._worker is not None else None
        return None if data is None else PdxferKVConnectorStats(data=data)

    @classmethod
    def build_kv_connector_stats(cls, data: dict[str, Any] | None = None) -> KVConnectorStats | None:
        return PdxferKVConnectorStats(data=data if data is not None else stats.empty())

    @classmethod
    def build_prom_metrics(cls, vllm_config: "VllmConfig", metric_types: dict[type, type], labelnames: list[str],
                           per_engine_labelvalues: dict[int, list[object]]) -> KVConnectorPromMetrics | None:
        return PdxferPromMetrics(vllm_config, metric_types, labelnames, per_engine_labelvalues)

    # ==================================================================== scheduler side
    def get_num_new_matched_tokens(self, request: "Request", num_computed_tokens: int) -> tuple[int | None, bool]:
        assert self._sched is not None
        return self._sched.get_num_new_matched_tokens(request, num_computed_tokens)

    def get_loaded_kv_cache_group_ids(self, request: "Request") -> tuple[int, ...]:
        return tuple(range(len(self._kv_cache_config.kv_cache_groups)))  # the request's own blocks, every group

    def update_state_after_alloc(self, request: "Request", blocks: "KVCacheBlocks", num_external_tokens: int) -> None:
        assert self._sched is not None
        if num_external_tokens > 0:
            self._sched.update_state_after_alloc(request, blocks.get_block_ids(), num_external_tokens)
        else:
            self._sched.update_state_after_alloc(request, (), 0)

    def build_connector_meta(self, scheduler_output: "SchedulerOutput") -> KVConnectorMetadata:
        assert self._sched is not None
        mgr = self._kv_cache_manager
        block_ids_of = mgr.get_block_ids if mgr is not None else None
        return PdxferConnectorMetadata(
            self._sched.build_connector_meta(scheduler_output.num_scheduled_tokens, block_ids_of))

    def update_connector_output(self, connector_output: "KVConnectorOutput") -> None:
        assert self._sched is not None
        self._sched.on_finished_recving(list(connector_output.finished_recving or ()))

    def request_finished(self, request: "Request", block_ids: list[int]) -> tuple[bool, dict[str, Any] | None]:
        assert self._sched is not None
        return self._sched.request_finished(request, block_ids)
