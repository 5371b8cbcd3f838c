"""WorkerSide end to end in one process: a prefill and a decode worker with caches in vLLM's
CPU-attention shape, real Sender/Receiver/side channel on loopback, no vLLM."""

from __future__ import annotations

import time
from types import SimpleNamespace
from typing import Any

import pytest

torch = pytest.importorskip("torch")

from pdxfer.layout.payload import Payload  # noqa: E402
from pdxfer.plugins.vllm.meta import PluginConfig, RecvSpec, SendSpec, StepMeta  # noqa: E402
from pdxfer.plugins.vllm.sidechannel import side_request  # noqa: E402
from pdxfer.plugins.vllm.worker import WorkerSide  # noqa: E402
from vllm_support.servers import free_port  # noqa: E402

BS, HEADS, DIM, BLOCKS = 32, 2, 32, 16
LAYERS = ("model.layers.0.self_attn.attn", "model.layers.1.self_attn.attn")


def kv_config() -> Any:
    return SimpleNamespace(kv_cache_groups=[SimpleNamespace(layer_names=list(LAYERS),
                                                            kv_cache_spec=SimpleNamespace(block_size=BS))])


def caches(seed: int | None) -> dict[str, Any]:
    g = torch.Generator().manual_seed(seed or 0)
    out = {}
    for name in LAYERS:
        t = torch.zeros(BLOCKS, HEADS, BS, 2 * DIM, dtype=torch.bfloat16)
        if seed is not None:
            t.copy_(torch.randn(t.shape, generator=g))
        out[name] = t
    return out


def wait_for(fn: Any, timeout: float = 10.0) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        r = fn()
        if r:
            return r
        time.sleep(0.01)
    raise TimeoutError


@pytest.fixture
def pair(request: pytest.FixtureRequest) -> Any:
    """A prefill and a decode worker; the prefill's data path is the test's param (tcp if none)."""
    p, d, pc, dc = _make_pair(getattr(request, "param", "tcp"))
    try:
        yield p, d, pc, dc
    finally:
        p.shutdown()
        d.shutdown()


def _make_pair(backend: str, recv_timeout_s: float = 5, **prefill: Any) -> tuple[WorkerSide, WorkerSide, Any, Any]:
    if backend == "nixl":
        pytest.importorskip("nixl")
    p = WorkerSide(PluginConfig(side_port=free_port(), lease_s=30, handshake_timeout_s=2, recv_timeout_s=recv_timeout_s,
                                backend=backend, **prefill), producer=True, consumer=False)
    d = WorkerSide(PluginConfig(side_port=free_port(), handshake_timeout_s=2, recv_timeout_s=recv_timeout_s),
                   producer=False, consumer=True)
    pc, dc = caches(1), caches(None)
    p.register(pc, kv_config())
    d.register(dc, kv_config())
    return p, d, pc, dc


def collect(w: WorkerSide, timeout: float = 10.0) -> tuple[set[str], set[str], set[str]]:
    acc: tuple[set[str], set[str], set[str]] = (set(), set(), set())

    def step() -> bool:
        s, r, f = w.get_finished()
        acc[0].update(s), acc[1].update(r), acc[2].update(f)
        return bool(r)
    wait_for(step, timeout)
    return acc


BOTH_BACKENDS = pytest.mark.parametrize("pair", ["tcp", "nixl"], indirect=True)


def _moved_over(p: WorkerSide) -> str:
    """The data path the prefill's bytes took, from what it reports over the side channel."""
    st = p.stats()
    return "nixl" if st["sender_nixl_write_requests"] > 0 else st["sender_backend"] + " (no NIXL WRITE)"


@BOTH_BACKENDS
def test_pull_moves_whole_blocks_and_frees_everything(pair: Any) -> None:
    p, d, pc, dc = pair
    src, dst = (3, 7, 1), (9, 2, 5)
    p.on_meta(StepMeta(sends=[SendSpec("preq", "T1", (src,), 70, time.time() + 30)]))
    d.on_meta(StepMeta(recvs=[RecvSpec("dreq", "T1", (dst,), 0, 70, p.cfg.side_host, p.cfg.side_port)]))
    _, recving, failed = collect(d)
    assert recving == {"dreq"} and not failed
    assert wait_for(lambda: p.get_finished()[0]) == {"preq"}
    for name in LAYERS:
        for s, t in zip(src, dst):
            assert torch.equal(pc[name][s], dc[name][t])
    assert wait_for(lambda: p.stats()["in_flight"] == 0)
    st = d.stats()
    assert st["receiver"]["reserved_bytes"] == 0 and st["receiving"] == 0
    assert p.stats()["held"] == 0
    if p.cfg.backend == "nixl":
        assert _moved_over(p) == "nixl"
        _assert_staged(p)
    else:
        assert p.stats()["sender_nixl_write_requests"] == 0


@BOTH_BACKENDS
def test_transfer_outcomes_reach_vllms_stats_path(pair: Any) -> None:
    """What get_kv_connector_stats hands vLLM: each side's completed transfer once, with
    its bytes and times, and a failed load by kind."""
    p, d, _, _ = pair
    p.take_stats(), d.take_stats()  # start-up gauge samples
    p.on_meta(StepMeta(sends=[SendSpec("preq", "T1", ((3, 7, 1),), 70, time.time() + 30)]))
    d.on_meta(StepMeta(recvs=[RecvSpec("dreq", "T1", ((9, 2, 5),), 0, 70, p.cfg.side_host, p.cfg.side_port)]))
    _, recving, failed = collect(d)
    assert recving == {"dreq"} and not failed
    assert wait_for(lambda: p.stats()["in_flight"] == 0)
    sent, got = p.take_stats(), d.take_stats()
    assert sent is not None and got is not None
    assert sent["send_bytes"] == got["recv_bytes"] and sent["send_bytes"][0] > 0
    assert len(sent["send_seconds"]) == 1 and 0 <= sent["grant_wait_seconds"][0] <= sent["send_seconds"][0]
    assert len(got["recv_seconds"]) == 1 and not sent["send_failed"] and not got["recv_failed"]
    assert p.take_stats() is None or not p.take_stats()["send_bytes"]  # reported once
    d.on_meta(StepMeta(recvs=[RecvSpec("dreq2", "nope", ((4, 5),), 32, 64, p.cfg.side_host, p.cfg.side_port)]))
    assert collect(d)[2] == {"dreq2"}
    failed_stats = d.take_stats()
    # the prefill has no such hold: it refuses, or its answer (it first waits a while for a
    # hold the engine may not have registered yet) outlasts the push request's timeout
    assert failed_stats is not None and sum(failed_stats["recv_failed"].values()) == 1
    assert set(failed_stats["recv_failed"]) <= {"prefill_refused", "push_failed", "TransferTimeout"}
    assert not failed_stats["recv_bytes"]


def test_unknown_transfer_fails_the_load_with_block_errors(pair: Any) -> None:
    p, d, _, _ = pair
    d.on_meta(StepMeta(recvs=[RecvSpec("dreq", "nope", ((4, 5),), 32, 64, p.cfg.side_host, p.cfg.side_port)]))
    _, recving, failed = collect(d)
    assert recving == failed == {"dreq"}
    assert d.take_load_errors() == {5}


def test_dead_prefill_fails_within_the_handshake_timeout(pair: Any) -> None:
    _, d, _, _ = pair
    t0 = time.monotonic()
    d.on_meta(StepMeta(recvs=[RecvSpec("dreq", "T", ((4,),), 0, 10, "127.0.0.1", free_port())]))
    _, recving, failed = collect(d)
    assert failed == {"dreq"} and time.monotonic() - t0 < 5


def test_drop_and_lease_expiry_free_held_blocks(pair: Any) -> None:
    p, d, _, _ = pair
    p.on_meta(StepMeta(sends=[SendSpec("a", "TA", ((1,),), 10, time.time() + 30),
                              SendSpec("b", "TB", ((2,),), 10, time.time() - 1)]))
    assert p.get_finished()[0] == {"b"}  # expired lease
    assert side_request(d._zctx, p.cfg.side_host, p.cfg.side_port, {"op": "drop", "transfer_id": "TA"}, 2)["held"]
    assert p.get_finished()[0] == {"a"}
    assert p.stats()["held"] == 0


def test_late_push_for_an_ended_hold_is_answered_with_why(pair: Any) -> None:
    """A push may wait for a hold not registered yet (the prefill's step can be seconds
    away under load), but one for a hold that already ended is answered at once."""
    p, d, _, _ = pair
    p.on_meta(StepMeta(sends=[SendSpec("a", "TA", ((1,),), 10, time.time() + 30),
                              SendSpec("b", "TB", ((2,),), 10, time.time() - 1)]))
    assert p.get_finished()[0] == {"b"}
    assert side_request(d._zctx, p.cfg.side_host, p.cfg.side_port, {"op": "drop", "transfer_id": "TA"}, 2)["held"]
    for tid, why in (("TA", "dropped"), ("TB", "expired")):
        push = {"op": "push", "transfer_id": tid, "receiver": "tcp://127.0.0.1:1", "t0": 0, "t1": 10}
        reply = side_request(d._zctx, p.cfg.side_host, p.cfg.side_port, push, 2, 30)
        assert not reply["ok"] and f"({why})" in reply["error"], reply


def test_cancel_reports_finished_without_failure(pair: Any) -> None:
    p, d, _, _ = pair
    d.on_meta(StepMeta(recvs=[RecvSpec("dreq", "TX", ((4,),), 0, 10, None, None)]))  # concurrent form: waits
    assert d.get_finished()[1] == set()
    d.on_meta(StepMeta(cancels=["dreq"]))
    assert d.get_finished() == (set(), {"dreq"}, set())


@BOTH_BACKENDS
def test_stream_pushes_chunks_as_prefill_progresses(pair: Any) -> None:
    """Concurrent flow: the prefill pushes block chunks step by step; the decode (with a
    local prefix hit on the first block) unpacks the rest once the transfer commits."""
    from pdxfer.plugins.vllm.meta import StreamSpec

    p, d, pc, dc = pair
    src, dst = (3, 7, 1, 4), (9, 2, 5, 6)
    assert d.receiver is not None
    d.on_meta(StepMeta(recvs=[RecvSpec("dreq", "S1", (dst,), BS, 100, None, None)]))
    for done in (40, 64, 90, 100):  # chunked prefill: 40, 24, 26 then 10 tokens per step
        p.after_forward(StepMeta(streams=[StreamSpec("preq", "S1", d.receiver.control_address, (src,), done, 100)]))
        if done < 100:
            assert d.get_finished()[1] == set()
    _, recving, failed = collect(d)
    assert recving == {"dreq"} and not failed
    for name in LAYERS:
        assert not dc[name][dst[0]].any()  # the local hit's block is left alone
        for s, t in zip(src[1:], dst[1:]):
            assert torch.equal(pc[name][s], dc[name][t])
    assert wait_for(lambda: p.stats()["in_flight"] == 0 and p.stats()["streaming"] == 0)
    assert d.stats()["receiver"]["reserved_bytes"] == 0
    assert p.stats()["counters"]["streamed_early"] == 2  # blocks 1 and 2 went before the prefill ended
    assert p.stats()["sender_backend"] == p.cfg.backend
    if p.cfg.backend == "nixl":
        assert _moved_over(p) == "nixl"
        _assert_staged(p)


def _assert_staged(p: WorkerSide) -> None:
    """NIXL prefill: every chunk was packed into the staging pool registered at start, so
    no WRITE needed a registration of its own; the pool is empty once the transfers ended."""
    assert p.sender is not None and p.staging is not None
    regs = p.sender.nixl_registrations
    assert regs["per_chunk"] == 0 and regs["pinned"] > 0, regs
    assert wait_for(lambda: p.staging.used == 0)


@BOTH_BACKENDS
def test_aborted_stream_fails_the_decode(pair: Any) -> None:
    from pdxfer.plugins.vllm.meta import StreamSpec

    p, d, _, _ = pair
    assert d.receiver is not None
    d.on_meta(StepMeta(recvs=[RecvSpec("dreq", "S2", ((9, 2, 5),), 0, 80, None, None)]))
    p.after_forward(StepMeta(streams=[StreamSpec("preq", "S2", d.receiver.control_address, ((3, 7, 1),), 40, 80)]))
    wait_for(lambda: d.stats()["receiver"]["granted_count"] == 1)  # the decode reserved, bytes are moving
    t0 = time.monotonic()
    p.after_forward(StepMeta(stream_aborts=["S2"]))
    _, recving, failed = collect(d, timeout=20)
    assert recving == failed == {"dreq"}
    assert time.monotonic() - t0 < 2  # the abort reaches the decode, no waiting for its timeout
    assert wait_for(lambda: p.stats()["in_flight"] == 0)
    assert wait_for(lambda: d.stats()["receiver"]["reserved_bytes"] == 0)


def test_spill_settings_reach_the_prefill_sender(tmp_path) -> None:
    w = WorkerSide(PluginConfig(side_port=free_port(), spill_host_bytes=1 << 20, spill_disk_bytes=4 << 20,
                                spill_dir=str(tmp_path), peer_timeout_s=12.5), producer=True, consumer=False)
    w.register(caches(1), kv_config())
    try:
        assert w.sender is not None and w.sender.config.peer_timeout_s == 12.5
        st = w.stats()
        assert set(st["sender_loop_stalls"]) == {"stalls", "worst_s"}
        spill = st["sender_spill"]
        assert spill["host_capacity"] == 1 << 20 and spill["disk_capacity"] == 4 << 20
        assert any(p.name.startswith("pdxfer-spill-") for p in tmp_path.iterdir())
    finally:
        w.shutdown()
    assert not any(tmp_path.iterdir())  # shutdown removed the spill directory


def test_timeouts_reach_the_decode_receiver() -> None:
    w = WorkerSide(PluginConfig(side_port=free_port(), receiver_lease_s=42.0), producer=False, consumer=True)
    w.register(caches(None), kv_config())
    try:
        assert w.receiver is not None and w.receiver.config.lease_s == 42.0
        assert set(w.stats()["receiver_loop_stalls"]) == {"stalls", "worst_s"}
    finally:
        w.shutdown()


def test_prefill_connects_to_configured_decode_receivers_at_start() -> None:
    """Concurrent flow: the lane to each `decode_receivers` entry is up before the first
    request, so a short prefill's blocks stream instead of waiting for HELLO round trips.
    A receiver that is not up yet is only logged: the first transfer connects then."""
    d = WorkerSide(PluginConfig(side_port=free_port()), producer=False, consumer=True)
    d.register(caches(None), kv_config())
    assert d.receiver is not None
    live = d.receiver.control_address
    nowhere = f"tcp://127.0.0.1:{free_port()}"
    p = WorkerSide(PluginConfig(side_port=free_port(), handshake_timeout_s=2,
                                decode_receivers={"http://d1:8001": live, "http://d2:8001": nowhere}),
                   producer=True, consumer=False)
    p.register(caches(1), kv_config())
    try:
        assert p.sender is not None
        lanes = p.sender._lanes
        wait_for(lambda: live in lanes and lanes[live].state == "ready")
        assert lanes[live].keep and not lanes[live].transfers  # set up with no request in sight
        wait_for(lambda: nowhere not in lanes)  # refused: that lane is gone, nothing raised
    finally:
        p.shutdown()
        d.shutdown()


def test_no_mixin_stub_shadows_an_implementation() -> None:
    """WorkerSide is built from mixins that declare what they use from each other as
    ``def f(...): ...`` stubs; a stub earlier in the MRO silently wins over the real
    method (seen: the streaming half's `_round` stub returned None to the receiving half)."""
    import ast
    import inspect
    import textwrap

    stubs = []
    for name, fn in inspect.getmembers(WorkerSide, inspect.isfunction):
        tree = ast.parse(textwrap.dedent(inspect.getsource(fn)))
        body = tree.body[0].body  # type: ignore[attr-defined]
        if len(body) == 1 and isinstance(body[0], ast.Expr) and body[0].value.value is Ellipsis:  # type: ignore[attr-defined]
            stubs.append(f"{name} resolves to the stub {fn.__qualname__}")
    assert not stubs, stubs


CHUNK = 2 * HEADS * BS * 2 * DIM * 2  # one whole block of both layers, bf16: a streamed chunk


def _streaming_pair(**prefill: Any) -> tuple[WorkerSide, WorkerSide, Any, Any]:
    """A prefill whose send budget holds one block chunk and a decode with room for one
    three-block transfer: the second streamed prompt must wait (QUEUED) for the first."""
    pc, dc = caches(1), caches(None)
    d = WorkerSide(PluginConfig(side_port=free_port(), recv_timeout_s=20, receiver_capacity=3 * CHUNK),
                   producer=False, consumer=True)
    d.register(dc, kv_config())
    p = WorkerSide(PluginConfig(side_port=free_port(), handshake_timeout_s=2, recv_timeout_s=20,
                                sender_memory=CHUNK + CHUNK // 2, **prefill), producer=True, consumer=False)
    p.register(pc, kv_config())
    assert p.packer is not None and p.packer.packed_nbytes(0, BS) == CHUNK
    return p, d, pc, dc


def _forward_in_thread(p: WorkerSide, meta: StepMeta) -> bool:
    """Run after_forward as vLLM's engine thread would; True if it returned within 5 s
    (the sender's submit timeout is 10 s: a put that waits for budget would still be waiting)."""
    import threading

    t = threading.Thread(target=p.after_forward, args=(meta,), daemon=True)
    t.start()
    t.join(5)
    return not t.is_alive()


def _step_until_both_arrived(p: WorkerSide, d: WorkerSide) -> None:
    """Step both engines (get_finished, as vLLM does every step) until the backlog's two
    prompts have been loaded by the decode and released by the prefill."""
    sent: set[str] = set()
    got: set[str] = set()

    def step() -> bool:
        sent.update(p.get_finished()[0])  # what the prefill engine's next steps call
        _, recving, failed = d.get_finished()
        assert not failed
        got.update(recving)
        return got == {"d0", "d1"} and sent == {"p0", "p1"}

    wait_for(step, timeout=20)


def _backlog(p: WorkerSide, d: WorkerSide) -> str:
    """Stream S0 (decode d0) takes the decode's whole capacity and stays unfinished (one
    block of three computed); then S1 (d1) streams a whole prompt while the decode has
    no room: queued there, its first chunk fills the send budget. Returns the decode's
    Receiver address."""
    from pdxfer.plugins.vllm.meta import StreamSpec

    assert d.receiver is not None
    addr = d.receiver.control_address
    d.on_meta(StepMeta(recvs=[RecvSpec("d0", "S0", ((1, 2, 3),), 0, 3 * BS, None, None),
                              RecvSpec("d1", "S1", ((4, 5, 6),), 0, 3 * BS, None, None)]))
    assert _forward_in_thread(p, StepMeta(streams=[StreamSpec("p0", "S0", addr, ((7, 8, 9),), BS, 3 * BS)]))
    wait_for(lambda: d.stats()["receiver"]["granted_count"] == 1)
    assert _forward_in_thread(p, StepMeta(streams=[StreamSpec("p1", "S1", addr, ((10, 11, 12),), 3 * BS, 3 * BS)]))
    return addr


def test_stream_with_no_send_budget_left_never_blocks_the_engine_thread() -> None:
    """Found by reading the streaming path: a chunk put on the engine thread waited up to
    the sender's submit timeout (10 s) for send budget while its decode had no room, and
    every other request on that prefill engine stalled with it. Now the engine thread
    never waits: the stream falls behind, keeps its blocks (the request finished with
    delay_free), and later steps pack the rest once the decode has room; the blocks are
    released only after that."""
    from pdxfer.plugins.vllm.meta import StreamSpec

    p, d, pc, dc = _streaming_pair()
    try:
        addr = _backlog(p, d)
        assert p.stats()["counters"]["send_failed"] == 0
        assert p.stats()["streams_behind"] >= 1 and p.stats()["counters"]["stream_deferred"] >= 1
        # vLLM finishes p1 (delay_free): its blocks are still needed, so it is not reported.
        assert _forward_in_thread(p, StepMeta(stream_finished=[("S1", "p1", ((10, 11, 12),))]))
        assert p.get_finished()[0] == set()
        # S0's last step, and vLLM finishes p0 too; every later step lets the streams still
        # behind catch up as the budget frees.
        assert _forward_in_thread(p, StepMeta(streams=[StreamSpec("p0", "S0", addr, ((7, 8, 9),), 3 * BS, 3 * BS)]))
        assert _forward_in_thread(p, StepMeta(stream_finished=[("S0", "p0", ((7, 8, 9),))]))
        _step_until_both_arrived(p, d)
        for name in LAYERS:
            for src, dst in zip((7, 8, 9, 10, 11, 12), (1, 2, 3, 4, 5, 6)):
                assert torch.equal(pc[name][src], dc[name][dst])
        assert wait_for(lambda: p.stats()["in_flight"] == 0 and p.stats()["sender_budget_used"] == 0)
        assert p.stats()["streaming"] == 0 and p.stats()["streams_behind"] == 0
        assert wait_for(lambda: d.stats()["receiver"]["reserved_bytes"] == 0)
    finally:
        p.shutdown()
        d.shutdown()


def test_stream_that_fails_is_not_reopened_and_its_blocks_are_released() -> None:
    """A stream whose transfer fails (here: rejected, larger than the decode's whole
    receive pool) ends; the StreamSpecs the scheduler still sends do not open it afresh,
    and its finish releases the blocks at once."""
    from pdxfer.plugins.vllm.meta import StreamSpec

    p, d, _, _ = _streaming_pair()
    try:
        assert d.receiver is not None
        addr = d.receiver.control_address
        big = tuple(range(1, 5))  # four blocks: more than the decode's pool of three
        assert _forward_in_thread(p, StepMeta(streams=[StreamSpec("p2", "S2", addr, (big,), BS, 4 * BS)]))
        assert wait_for(lambda: p.stats()["counters"]["send_failed"] == 1)
        for _ in range(2):  # the next steps of the same prefill
            assert _forward_in_thread(p, StepMeta(streams=[StreamSpec("p2", "S2", addr, (big,), 4 * BS, 4 * BS)]))
        assert p.stats()["counters"]["send_failed"] == 1 and p.stats()["in_flight"] == 0
        assert _forward_in_thread(p, StepMeta(stream_finished=[("S2", "p2", (big,))]))
        assert p.get_finished()[0] == {"p2"}
        assert p.stats()["streaming"] == 0 and p.stats()["sender_budget_used"] == 0
    finally:
        p.shutdown()
        d.shutdown()


def test_stream_backlog_spills_to_host_and_arrives_once_the_decode_has_room() -> None:
    """The same backlog with a host spill tier: the chunk that finds no send budget is
    copied out to the tier on the engine thread (bounded, no waiting) and goes once the
    decode has room; both prompts' KV arrive intact."""
    from pdxfer.plugins.vllm.meta import StreamSpec

    p, d, pc, dc = _streaming_pair(spill_host_bytes=4 * CHUNK)
    try:
        addr = _backlog(p, d)
        assert p.stats()["counters"]["stream_deferred"] == 0
        assert p.stats()["sender_spill"]["host_bytes"] > 0
        # S0's last step puts two chunks into a budget of 1.5 chunks: the second goes now
        # or, if the first is still on the wire, from a later step once vLLM has finished
        # p0 (the step after its last one), as in the test above.
        assert _forward_in_thread(p, StepMeta(streams=[StreamSpec("p0", "S0", addr, ((7, 8, 9),), 3 * BS, 3 * BS)]))
        assert _forward_in_thread(p, StepMeta(stream_finished=[("S0", "p0", ((7, 8, 9),)), ("S1", "p1", ((10, 11, 12),))]))
        _step_until_both_arrived(p, d)
        for name in LAYERS:
            for s, t in zip((7, 8, 9, 10, 11, 12), (1, 2, 3, 4, 5, 6)):
                assert torch.equal(pc[name][s], dc[name][t])
        assert wait_for(lambda: p.stats()["in_flight"] == 0 and p.stats()["sender_budget_used"] == 0)
        assert p.stats()["sender_spill"]["host_bytes"] == 0
        assert wait_for(lambda: d.stats()["receiver"]["reserved_bytes"] == 0)
    finally:
        p.shutdown()
        d.shutdown()


def test_stream_behind_packs_from_the_blocks_it_finished_with() -> None:
    """A running request's blocks can be preempted and reused between its steps, so a
    stream that is behind must not pack from an old block table in between: it catches
    up only from a fresh StreamSpec, or from the table the request finished with (those
    blocks are pinned until the worker reports it). Here the finish names other blocks
    than the last StreamSpec, as after a preemption and recompute; they are what arrives."""
    from pdxfer.plugins.vllm.meta import StreamSpec

    p, d, pc, dc = _streaming_pair()
    try:
        assert d.receiver is not None
        addr = d.receiver.control_address
        d.on_meta(StepMeta(recvs=[RecvSpec("d3", "S3", ((1, 2, 3),), 0, 3 * BS, None, None)]))
        assert _forward_in_thread(p, StepMeta(streams=[StreamSpec("p3", "S3", addr, ((4, 5, 6),), 3 * BS, 3 * BS)]))
        assert p.stats()["streams_behind"] == 1  # not granted yet: not even one chunk fits half the budget
        wait_for(lambda: d.stats()["receiver"]["granted_count"] == 1)
        for _ in range(5):  # steps without a StreamSpec for it (preempted, say): nothing is packed
            assert p.get_finished()[0] == set()
        assert p.stats()["streams_behind"] == 1 and p.stats()["sender_budget_used"] == 0
        assert _forward_in_thread(p, StepMeta(stream_finished=[("S3", "p3", ((13, 14, 15),))]))
        sent: set[str] = set()
        got: set[str] = set()

        def step() -> bool:
            sent.update(p.get_finished()[0])
            _, recving, failed = d.get_finished()
            assert not failed
            got.update(recving)
            return sent == {"p3"} and got == {"d3"}

        wait_for(step, timeout=20)
        for name in LAYERS:
            for src, dst in zip((13, 14, 15), (1, 2, 3)):
                assert torch.equal(pc[name][src], dc[name][dst])
    finally:
        p.shutdown()
        d.shutdown()


def test_nixl_pull_larger_than_the_staging_pool_gets_through() -> None:
    """The staging pool is `sender_memory` (1.5 chunks here) and the pull three chunks:
    each piece must come back as soon as its WRITE completed, not when the transfer ends
    (which it never could)."""
    p, d, pc, dc = _make_pair("nixl", recv_timeout_s=10, sender_memory=CHUNK + CHUNK // 2)
    try:
        assert p.staging is not None and p.staging.capacity < 3 * CHUNK
        p.on_meta(StepMeta(sends=[SendSpec("preq", "TB", ((4, 5, 6),), 3 * BS, time.time() + 30)]))
        d.on_meta(StepMeta(recvs=[RecvSpec("dreq", "TB", ((1, 2, 3),), 0, 3 * BS, p.cfg.side_host, p.cfg.side_port)]))
        _, recving, failed = collect(d, timeout=20)
        assert recving == {"dreq"} and not failed
        for name in LAYERS:
            for src, dst in zip((4, 5, 6), (1, 2, 3)):
                assert torch.equal(pc[name][src], dc[name][dst])
        assert wait_for(lambda: p.stats()["in_flight"] == 0 and p.stats()["packed_bytes"] == 0)
        _assert_staged(p)
    finally:
        p.shutdown()
        d.shutdown()


def test_pull_into_a_full_decode_ties_up_neither_the_side_channel_nor_memory() -> None:
    """Sequential flow, decode full: the push is answered at once (other decodes' pushes,
    drops and stats go on over the side channel), nothing is packed before the decode
    grants the transfer (then one chunk at a time, as the send budget takes it; it was all
    of them up front), and once the decode has room the KV arrives and the held blocks
    are released."""
    from pdxfer.engine import Sender, SenderConfig

    p, d, pc, dc = _streaming_pair()
    filler = Sender(SenderConfig(deadline_s=60)).start()
    try:
        assert d.receiver is not None
        room = filler.open(d.receiver.control_address, "room", Payload((3 * CHUNK,)))
        wait_for(lambda: d.stats()["receiver"]["granted_count"] == 1)
        p.on_meta(StepMeta(sends=[SendSpec("preq", "TP", ((4, 5, 6),), 3 * BS, time.time() + 30)]))
        push = {"op": "push", "transfer_id": "TP", "receiver": d.receiver.control_address, "t0": 0, "t1": 3 * BS}
        reply = side_request(d._zctx, p.cfg.side_host, p.cfg.side_port, push, 2, 5)
        assert reply == {"ok": True, "nbytes": 3 * CHUNK}
        assert wait_for(lambda: d.stats()["receiver"]["waiting_count"] == 1)
        for _ in range(3):  # the side channel still answers while the push waits for budget
            st = side_request(d._zctx, p.cfg.side_host, p.cfg.side_port, {"op": "stats"}, 2, 5)
            assert st["ok"] and st["in_flight"] == 1
            assert p.stats()["packed_bytes"] == 0 and p.stats()["sender_budget_used"] == 0  # none packed before GRANT
            assert p.get_finished()[0] == set()  # the blocks are still being read
        room.abort("room for the pull")
        d.on_meta(StepMeta(recvs=[RecvSpec("dreq", "TP", ((1, 2, 3),), 0, 3 * BS, None, None)]))
        _, recving, failed = collect(d, timeout=20)
        assert recving == {"dreq"} and not failed
        assert wait_for(lambda: p.get_finished()[0]) == {"preq"}
        for name in LAYERS:
            for src, dst in zip((4, 5, 6), (1, 2, 3)):
                assert torch.equal(pc[name][src], dc[name][dst])
        assert wait_for(lambda: p.stats()["in_flight"] == 0 and p.stats()["sender_budget_used"] == 0)
    finally:
        filler.close()
        p.shutdown()
        d.shutdown()
