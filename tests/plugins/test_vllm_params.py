"""kv_transfer_params schema, plugin settings and the scheduler-side decisions, without vLLM."""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import Any

import pytest

from pdxfer.plugins.vllm.meta import PluginConfig
from pdxfer.plugins.vllm.params import ParamsError, normalize_block_ids, parse_params, prefill_answer
from pdxfer.plugins.vllm.scheduler import SchedulerSide, as_groups


def test_block_ids_flat_and_per_group() -> None:
    assert normalize_block_ids([1, 2, 3]) == ((1, 2, 3),)
    assert normalize_block_ids([[1, 2], [7]]) == ((1, 2), (7,))
    assert normalize_block_ids([]) == ((),)
    assert normalize_block_ids(None) is None
    for bad in ([1, [2]], "1,2", [[1, -1]], [True]):
        with pytest.raises(ParamsError):
            normalize_block_ids(bad)
    assert as_groups([4, 5]) == ((4, 5),)
    assert as_groups(([4, 5], [6])) == ((4, 5), (6,))


def test_parse_roles_and_validation() -> None:
    assert parse_params(None) is None
    assert parse_params({}) is None
    assert parse_params({"do_remote_decode": False, "do_remote_prefill": False}) is None
    p = parse_params({"do_remote_decode": True, "remote_engine_id": None, "remote_host": None})  # toy proxy's form
    assert p is not None and p.do_remote_decode and p.transfer_id is None
    with pytest.raises(ParamsError):
        parse_params({"do_remote_decode": True, "do_remote_prefill": True})
    with pytest.raises(ParamsError):
        parse_params({"do_remote_prefill": True})  # no transfer id
    with pytest.raises(ParamsError):
        parse_params({"do_remote_prefill": True, "transfer_id": "t", "remote_host": "h"})  # half an address
    with pytest.raises(ParamsError):
        parse_params({"do_remote_prefill": True, "transfer_id": "t", "remote_host": "h", "remote_port": 70000})
    conc = parse_params({"do_remote_prefill": True, "do_remote_decode": False, "transfer_id": "T", "request_id": "R"})
    assert conc is not None and not conc.pull


def test_prefill_answer_round_trips() -> None:
    ans = prefill_answer(transfer_id="T", host="127.0.0.1", port=5000, engine_id="E", request_id="R",
                         block_ids=((1, 2),), num_tokens=40)
    p = parse_params(ans)
    assert p is not None and p.do_remote_prefill and p.pull and p.transfer_id == "T"
    assert p.remote_block_ids == ((1, 2),) and p.remote_num_tokens == 40


def test_plugin_config() -> None:
    cfg = PluginConfig.from_extra({"lease_s": 3}, kv_port=4000)
    assert cfg.side_port == 4000 and cfg.lease_s == 3
    with pytest.raises(ValueError):
        PluginConfig.from_extra({"nope": 1})
    with pytest.raises(ValueError):
        PluginConfig.from_extra({"recv_timeout_s": 0})
    with pytest.raises(ValueError, match="peer_timeout_s"):
        PluginConfig.from_extra({"peer_timeout_s": -1})
    with pytest.raises(ValueError, match="spill"):
        PluginConfig.from_extra({"spill_disk_bytes": -1})
    spill = PluginConfig.from_extra({"spill_host_bytes": 1 << 20, "spill_disk_bytes": 1 << 30, "spill_after_s": 0.5})
    assert spill.spill_disk_bytes == 1 << 30 and spill.spill_after_s == 0.5
    nixl = PluginConfig.from_extra({"backend": "nixl", "ucx": {"UCX_TLS": "tcp,self,sm"}})
    assert nixl.backend == "nixl" and nixl.ucx == {"UCX_TLS": "tcp,self,sm"}
    assert PluginConfig.from_extra({}).backend == "tcp"
    with pytest.raises(ValueError, match="backend must be one of tcp, nixl, got 'rdma'"):
        PluginConfig.from_extra({"backend": "rdma"})
    with pytest.raises(ValueError, match="ucx must map UCX_"):
        PluginConfig.from_extra({"ucx": {"TLS": "tcp"}})
    with pytest.raises(ValueError, match="ucx must map UCX_"):
        PluginConfig.from_extra({"ucx": {"UCX_TLS": 1}})


class Status(enum.Enum):
    WAITING = 0
    FINISHED_STOPPED = 1
    FINISHED_LENGTH_CAPPED = 2
    FINISHED_ABORTED = 3


@dataclass
class Req:
    request_id: str
    kv_transfer_params: dict[str, Any] | None
    prompt_token_ids: list[int] = field(default_factory=lambda: list(range(100)))
    num_computed_tokens: int = 100
    status: Status = Status.FINISHED_LENGTH_CAPPED


def sched() -> SchedulerSide:
    return SchedulerSide(PluginConfig(side_port=5555, lease_s=30), "engine", clock=lambda: 1000.0)


def test_prefill_holds_finished_blocks_and_answers() -> None:
    s = sched()
    r = Req("r1", {"do_remote_decode": True})
    delay, ans = s.request_finished(r, [3, 4, 5, 6])
    assert delay is True and ans is not None
    assert ans["remote_port"] == 5555 and ans["remote_block_ids"] == [[3, 4, 5, 6]] and ans["remote_num_tokens"] == 100
    meta = s.build_connector_meta()
    assert [x.req_id for x in meta.sends] == ["r1"] and meta.sends[0].expires_at == 1030.0
    assert s.build_connector_meta().empty()
    # the concurrent form keeps the proxy's transfer id
    delay, ans = s.request_finished(Req("r2", {"do_remote_decode": True, "transfer_id": "T9"}), ([1],))
    assert delay and ans is not None and ans["transfer_id"] == "T9"


def test_prefill_aborted_or_empty_frees_at_once() -> None:
    s = sched()
    assert s.request_finished(Req("a", {"do_remote_decode": True}, status=Status.FINISHED_ABORTED), [1]) == (False, None)
    assert s.request_finished(Req("b", {"do_remote_decode": True}), []) == (False, None)
    assert s.request_finished(Req("c", None), [1]) == (False, None)
    assert s.build_connector_meta().empty()


def test_decode_loads_prompt_and_cancels_on_abort() -> None:
    s = sched()
    params = prefill_answer(transfer_id="T", host="h", port=1, engine_id="E", request_id="R", block_ids=((1,),),
                            num_tokens=100)
    r = Req("d1", dict(params), status=Status.WAITING)
    assert s.get_num_new_matched_tokens(r, 0) == (100, True)
    assert s.get_num_new_matched_tokens(r, 64) == (36, True)  # local prefix hit
    s.update_state_after_alloc(r, ([10, 11, 12, 13],), 36)
    assert r.kv_transfer_params is not None and r.kv_transfer_params["do_remote_prefill"] is False
    assert s.get_num_new_matched_tokens(r, 64) == (0, False)  # loads once, even after a preemption
    meta = s.build_connector_meta()
    (spec,) = meta.recvs
    assert (spec.t0, spec.t1, spec.block_ids, spec.remote_port) == (64, 100, ((10, 11, 12, 13),), 1)
    r.status = Status.FINISHED_ABORTED
    assert s.request_finished(r, [10]) == (False, None)
    assert s.build_connector_meta().cancels == ["d1"]
    s.on_finished_recving(["d1"])
    assert s.request_finished(r, [10]) == (False, None)
    assert s.build_connector_meta().empty()


def test_decode_full_local_hit_or_unscheduled_abort_drops_remote_blocks() -> None:
    s = sched()
    params = prefill_answer(transfer_id="T", host="h", port=1, engine_id="E", request_id="R", block_ids=((1,),),
                            num_tokens=100)
    r = Req("d2", dict(params), status=Status.WAITING)
    s.update_state_after_alloc(r, (), 0)
    assert [d.transfer_id for d in s.build_connector_meta().drops] == ["T"]
    r2 = Req("d3", dict(params), status=Status.FINISHED_ABORTED)
    assert s.request_finished(r2, []) == (False, None)
    assert [d.transfer_id for d in s.build_connector_meta().drops] == ["T"]


def test_bad_params_are_ignored_not_fatal() -> None:
    s = sched()
    r = Req("x", {"do_remote_prefill": True})  # no transfer id
    assert s.get_num_new_matched_tokens(r, 0) == (0, False)
    assert s.request_finished(r, [1]) == (False, None)


def test_streamed_prefill_finishes_with_delay_free_and_tells_the_worker() -> None:
    """Concurrent flow: a stream that fell behind still packs out of the request's blocks,
    so vLLM must keep them until the worker reports the request (stream_finished); an
    aborted stream's blocks are freed at once and the worker is told to stop instead."""
    s = SchedulerSide(PluginConfig(side_port=5555, decode_receivers={"http://d:1": "tcp://d:2"}), "engine")
    params = {"do_remote_decode": True, "transfer_id": "T1", "remote_decode_url": "http://d:1"}
    r = Req("p1", dict(params), num_computed_tokens=0, status=Status.WAITING)
    r.num_prompt_tokens = 100  # type: ignore[attr-defined]
    s.update_state_after_alloc(r, ([1, 2, 3, 4],), 0)
    meta = s.build_connector_meta({"p1": 100}, lambda rid: ([1, 2, 3, 4],))
    assert [(x.transfer_id, x.done, x.total) for x in meta.streams] == [("T1", 100, 100)]
    r.num_computed_tokens, r.status = 100, Status.FINISHED_LENGTH_CAPPED
    delay, ans = s.request_finished(r, [1, 2, 3, 4])
    assert delay is True and ans is not None and ans["transfer_id"] == "T1" and ans["remote_num_tokens"] == 100
    assert s.build_connector_meta().stream_finished == [("T1", "p1", ((1, 2, 3, 4),))]
    a = Req("p2", {**params, "transfer_id": "T2"}, num_computed_tokens=0, status=Status.WAITING)
    a.num_prompt_tokens = 100  # type: ignore[attr-defined]
    s.update_state_after_alloc(a, ([5],), 0)
    a.status = Status.FINISHED_ABORTED
    assert s.request_finished(a, [5]) == (False, None)
    meta = s.build_connector_meta()
    assert meta.stream_aborts == ["T2"] and meta.stream_finished == []
