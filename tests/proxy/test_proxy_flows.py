"""Flows, retries, deadlines, health, cancellation and shutdown against real aiohttp fake
workers (no model needed)."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import aiohttp
import pytest
from proxy_testlib import FakeWorker, fast_config, parse_sse, tokens_for, wait_until

pytestmark = pytest.mark.timeout(60)

W = dict[str, FakeWorker]


async def test_sequential_non_stream_completion(workers: W, start_proxy: Any) -> None:
    p1, d1 = workers["p1"], workers["d1"]
    px = await start_proxy(fast_config([p1.url], [d1.url]))
    body = {"model": "fake", "prompt": "hello", "max_tokens": 5, "temperature": 0, "min_tokens": 3}
    async with await px.post("/v1/completions", body) as r:
        assert r.status == 200
        data = await r.json()
        rid = r.headers["X-Request-Id"]
    assert data["choices"][0]["text"] == "".join(tokens_for("hello", 5))
    assert data["usage"] == {"prompt_tokens": 7, "completion_tokens": 5, "total_tokens": 12}
    (pre,) = p1.requests
    assert pre["body"]["max_tokens"] == 1 and pre["body"]["stream"] is False
    assert "min_tokens" not in pre["body"]
    assert pre["body"]["kv_transfer_params"]["do_remote_decode"] is True
    (dec,) = d1.requests
    assert dec["body"]["kv_transfer_params"]["remote_engine_id"] == "p1"  # what the prefill answered
    assert dec["body"]["max_tokens"] == 5 and dec["body"]["min_tokens"] == 3
    assert pre["headers"]["X-Request-Id"] == dec["headers"]["X-Request-Id"] == rid
    assert rid.startswith("pxr-")


async def test_client_request_id_is_propagated(workers: W, start_proxy: Any) -> None:
    p1, d1 = workers["p1"], workers["d1"]
    px = await start_proxy(fast_config([p1.url], [d1.url]))
    async with await px.post("/v1/completions", {"prompt": "x", "max_tokens": 2}, headers={"X-Request-Id": "client-42"}) as r:
        assert r.status == 200 and r.headers["X-Request-Id"] == "client-42"
    assert p1.requests[0]["headers"]["X-Request-Id"] == "client-42"
    assert d1.requests[0]["headers"]["X-Request-Id"] == "client-42"


async def test_client_kv_transfer_params_are_not_forwarded(workers: W, start_proxy: Any) -> None:
    p1, d1 = workers["p1"], workers["d1"]
    px = await start_proxy(fast_config([p1.url], [d1.url]))
    evil = {"remote_host": "10.0.0.66", "do_remote_prefill": True}
    async with await px.post("/v1/completions", {"prompt": "x", "max_tokens": 2, "kv_transfer_params": evil}) as r:
        assert r.status == 200
    assert p1.requests[0]["body"]["kv_transfer_params"]["remote_host"] is None
    assert d1.requests[0]["body"]["kv_transfer_params"]["remote_host"] == "127.0.0.1"


@pytest.mark.parametrize("include_usage", [True, False])
async def test_sequential_stream_chat_relays_events_and_usage(workers: W, start_proxy: Any, include_usage: bool) -> None:
    p1, d1 = workers["p1"], workers["d1"]
    px = await start_proxy(fast_config([p1.url], [d1.url]))
    msgs = [{"role": "user", "content": "hi"}]
    body = {"model": "fake", "messages": msgs, "max_completion_tokens": 4, "stream": True,
            "stream_options": {"include_usage": include_usage}}
    async with await px.post("/v1/chat/completions", body) as r:
        assert r.status == 200 and r.headers["Content-Type"].startswith("text/event-stream")
        events = parse_sse(await r.read())
    assert events[-1] == "[DONE]"
    text = "".join(e["choices"][0]["delta"]["content"] for e in events[:-1] if e["choices"])
    assert text == "".join(tokens_for(msgs, 4))
    usage = [e["usage"] for e in events[:-1] if e.get("usage")]
    assert usage == ([{"prompt_tokens": 7, "completion_tokens": 4, "total_tokens": 11}] if include_usage else [])
    pre = p1.requests[0]["body"]
    assert pre["max_completion_tokens"] == 1 and pre["max_tokens"] == 1 and "stream_options" not in pre
    assert p1.requests[0]["path"] == d1.requests[0]["path"] == "/v1/chat/completions"  # chat is not routed via completions
    assert d1.requests[0]["body"]["stream_options"] == {"include_usage": include_usage}


async def test_prefill_5xx_is_retried_on_another_prefill(workers: W, start_proxy: Any) -> None:
    p1, p2, d1 = workers["p1"], workers["p2"], workers["d1"]
    p1.fail_status = 500
    px = await start_proxy(fast_config([p1.url, p2.url], [d1.url]))
    async with await px.post("/v1/completions", {"prompt": "x", "max_tokens": 2}) as r:
        assert r.status == 200
    assert len(p1.requests) == 1 and len(p2.requests) == 1
    assert d1.requests[0]["body"]["kv_transfer_params"]["remote_engine_id"] == "p2"
    assert 'pdxfer_proxy_retries_total{role="prefill"} 1.0' in await px.metrics_text()


async def test_prefill_4xx_is_not_retried_and_reaches_client(workers: W, start_proxy: Any) -> None:
    p1, p2, d1 = workers["p1"], workers["p2"], workers["d1"]
    p1.fail_status = p2.fail_status = 400
    px = await start_proxy(fast_config([p1.url, p2.url], [d1.url]))
    async with await px.post("/v1/completions", {"prompt": "x", "max_tokens": 2}) as r:
        assert r.status == 400
        data = await r.json()
    assert data["error"]["message"].endswith("fails on purpose")
    assert len(p1.requests) + len(p2.requests) == 1 and not d1.requests
    assert 'pdxfer_proxy_errors_total{type="upstream_4xx"} 1.0' in await px.metrics_text()


async def test_dead_prefill_worker_retried_and_taken_out(workers: W, start_proxy: Any) -> None:
    p1, p2, d1 = workers["p1"], workers["p2"], workers["d1"]
    px = await start_proxy(fast_config([p1.url, p2.url], [d1.url], health_interval=30))
    await p1.stop()
    for _ in range(3):
        async with await px.post("/v1/completions", {"prompt": "x", "max_tokens": 2}) as r:
            assert r.status == 200
    assert len(p2.requests) == 3
    prefill_state = {b.url: b.health.state.value for b in px.state.prefill.backends}
    assert prefill_state == {p1.url: "down", p2.url: "up"}


async def test_no_healthy_worker_gives_503(workers: W, start_proxy: Any) -> None:
    p1, d1 = workers["p1"], workers["d1"]
    px = await start_proxy(fast_config([p1.url], [d1.url], unhealthy_after=1))
    p1.healthy = False
    await wait_until(lambda: not px.state.prefill.any_routable())
    async with await px.post("/v1/completions", {"prompt": "x"}) as r:
        assert r.status == 503
        assert (await r.json())["error"]["type"] == "service_unavailable"
    async with px.session.get(px.url + "/health") as r:
        assert r.status == 503
        h = await r.json()
        assert h["prefill"][0]["state"] == "down" and h["decode"][0]["state"] == "up"
    p1.healthy = True
    await wait_until(lambda: px.state.prefill.any_routable())
    async with await px.post("/v1/completions", {"prompt": "x", "max_tokens": 2}) as r:
        assert r.status == 200


async def test_decode_dies_mid_stream_clean_error_then_healthy_worker(workers: W, start_proxy: Any) -> None:
    p1, d1, d2 = workers["p1"], workers["d1"], workers["d2"]
    d1.die_after = 3
    d1.healthy = False  # a dead worker does not answer /health either
    px = await start_proxy(fast_config([p1.url], [d1.url, d2.url], health_interval=30))
    body = {"prompt": "x", "max_tokens": 10, "stream": True}
    async with await px.post("/v1/completions", body) as r:
        assert r.status == 200
        events = parse_sse(await r.read())
    assert len(events) == 4 and "[DONE]" not in events
    assert [e["worker"] for e in events[:3]] == ["d1"] * 3
    assert events[-1]["error"]["type"] == "upstream_error" and events[-1]["error"]["code"] == 502
    assert not px.state.decode.backends[0].routable
    for _ in range(4):
        async with await px.post("/v1/completions", body) as r:
            events = parse_sse(await r.read())
        assert events[-1] == "[DONE]" and {e["worker"] for e in events[:-1]} == {"d2"}
    assert 'pdxfer_proxy_errors_total{type="upstream_disconnect"} 1.0' in await px.metrics_text()


async def test_unreachable_decode_is_swapped_before_streaming(workers: W, start_proxy: Any) -> None:
    p1, d1, d2 = workers["p1"], workers["d1"], workers["d2"]
    px = await start_proxy(fast_config([p1.url], [d1.url, d2.url], health_interval=30))
    await d1.stop()
    async with await px.post("/v1/completions", {"prompt": "x", "max_tokens": 3, "stream": True}) as r:
        events = parse_sse(await r.read())
    assert events[-1] == "[DONE]" and len(d2.requests) == 1
    assert d2.requests[0]["body"]["kv_transfer_params"]["remote_engine_id"] == "p1"


async def test_first_token_deadline(workers: W, start_proxy: Any) -> None:
    p1, d1 = workers["p1"], workers["d1"]
    d1.first_delay = 3.0
    px = await start_proxy(fast_config([p1.url], [d1.url], first_token_timeout=0.5))
    async with await px.post("/v1/completions", {"prompt": "x", "max_tokens": 3, "stream": True}) as r:
        assert r.status == 504
        err = (await r.json())["error"]
    assert err["type"] == "timeout" and "first token" in err["message"]
    await wait_until(lambda: len(d1.cancelled) == 1)  # the worker saw the abort


async def test_read_deadline_mid_stream(workers: W, start_proxy: Any) -> None:
    p1, d1 = workers["p1"], workers["d1"]
    d1.token_delay = 2.0
    px = await start_proxy(fast_config([p1.url], [d1.url], read_timeout=0.3))
    async with await px.post("/v1/completions", {"prompt": "x", "max_tokens": 3, "stream": True}) as r:
        assert r.status == 200
        events = parse_sse(await r.read())
    assert events[-1]["error"]["type"] == "timeout" and events[-1]["error"]["code"] == 504
    await wait_until(lambda: len(d1.cancelled) == 1)


async def test_prefill_deadline(workers: W, start_proxy: Any) -> None:
    p1, d1 = workers["p1"], workers["d1"]
    p1.first_delay = 3.0
    px = await start_proxy(fast_config([p1.url], [d1.url], prefill_timeout=0.4, prefill_retries=0))
    async with await px.post("/v1/completions", {"prompt": "x", "max_tokens": 3}) as r:
        assert r.status == 504
    assert not d1.requests
    await wait_until(lambda: len(p1.cancelled) == 1)


async def test_client_disconnect_mid_stream_cancels_decode(workers: W, start_proxy: Any) -> None:
    p1, d1 = workers["p1"], workers["d1"]
    d1.token_delay = 0.2
    px = await start_proxy(fast_config([p1.url], [d1.url]))
    async with aiohttp.ClientSession() as s:
        r = await s.post(px.url + "/v1/completions", json={"prompt": "x", "max_tokens": 50, "stream": True})
        await r.content.readline()
        r.close()  # the client goes away
    await wait_until(lambda: len(d1.cancelled) == 1)
    await wait_until(lambda: px.state.in_flight == 0)
    b = px.state.decode.backends[0]
    assert (b.in_flight, b.outstanding_tokens) == (0, 0)
    assert 'pdxfer_proxy_errors_total{type="client_disconnect"} 1.0' in await px.metrics_text()


async def test_client_disconnect_during_prefill_cancels_prefill(workers: W, start_proxy: Any) -> None:
    p1, d1 = workers["p1"], workers["d1"]
    p1.first_delay = 5.0
    px = await start_proxy(fast_config([p1.url], [d1.url]))
    async with aiohttp.ClientSession() as s:
        task = asyncio.ensure_future(s.post(px.url + "/v1/completions", json={"prompt": "x", "max_tokens": 5}))
        await wait_until(lambda: len(p1.requests) == 1)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
    await wait_until(lambda: len(p1.cancelled) == 1)
    await asyncio.sleep(0.2)
    assert not d1.requests
    b = px.state.prefill.backends[0]
    assert (b.in_flight, b.outstanding_tokens) == (0, 0)


async def test_concurrent_flow_shares_a_transfer_id(workers: W, start_proxy: Any) -> None:
    p1, d1 = workers["p1"], workers["d1"]
    px = await start_proxy(fast_config([p1.url], [d1.url], flow="concurrent"))
    tids = set()
    for stream in (False, True):
        async with await px.post("/v1/completions", {"prompt": "x", "max_tokens": 3, "stream": stream}) as r:
            assert r.status == 200
            raw = await r.read()
        if stream:
            assert parse_sse(raw)[-1] == "[DONE]"
        else:
            assert json.loads(raw)["worker"] == "d1"
        await wait_until(lambda: len(p1.finished) == len(d1.finished))
        pre = p1.requests[-1]["body"]["kv_transfer_params"]
        dec = d1.requests[-1]["body"]["kv_transfer_params"]
        assert pre["transfer_id"] == dec["transfer_id"] and pre["transfer_id"].startswith("pxt-")
        assert pre["do_remote_decode"] and dec["do_remote_prefill"]
        assert pre["remote_decode_url"] == d1.url
        tids.add(pre["transfer_id"])
    assert len(tids) == 2


async def test_concurrent_prefill_failure_aborts_decode(workers: W, start_proxy: Any) -> None:
    p1, d1 = workers["p1"], workers["d1"]
    p1.fail_status = 400
    d1.first_delay = 5.0  # decode waits "for KV"
    px = await start_proxy(fast_config([p1.url], [d1.url], flow="concurrent"))
    async with await px.post("/v1/completions", {"prompt": "x", "max_tokens": 3, "stream": True}) as r:
        assert r.status == 400
    await wait_until(lambda: len(d1.cancelled) == 1)


async def test_concurrent_unreachable_prefill_retried_with_same_transfer_id(workers: W, start_proxy: Any) -> None:
    p1, p2, d1 = workers["p1"], workers["p2"], workers["d1"]
    px = await start_proxy(fast_config([p1.url, p2.url], [d1.url], flow="concurrent", health_interval=30))
    await p1.stop()
    async with await px.post("/v1/completions", {"prompt": "x", "max_tokens": 3}) as r:
        assert r.status == 200
    await wait_until(lambda: len(p2.finished) == 1)
    tid = p2.requests[0]["body"]["kv_transfer_params"]["transfer_id"]
    assert tid == d1.requests[0]["body"]["kv_transfer_params"]["transfer_id"]


async def test_concurrent_reached_prefill_failure_is_not_retried(workers: W, start_proxy: Any) -> None:
    p1, p2, d1 = workers["p1"], workers["p2"], workers["d1"]
    p1.fail_status = p2.fail_status = 500
    d1.first_delay = 5.0
    px = await start_proxy(fast_config([p1.url, p2.url], [d1.url], flow="concurrent"))
    async with await px.post("/v1/completions", {"prompt": "x", "max_tokens": 3}) as r:
        assert r.status == 502
    assert len(p1.requests) + len(p2.requests) == 1  # KV may have moved: no second prefill


async def test_least_outstanding_routes_around_a_busy_worker(workers: W, start_proxy: Any) -> None:
    p1, d1, d2 = workers["p1"], workers["d1"], workers["d2"]
    d1.token_delay = d2.token_delay = 0.05
    px = await start_proxy(fast_config([p1.url], [d1.url, d2.url], policy="least_outstanding"))
    long = asyncio.ensure_future(px.post("/v1/completions", {"prompt": "x", "max_tokens": 40, "stream": True}))
    await wait_until(lambda: len(d1.requests) + len(d2.requests) == 1)
    busy = "d1" if d1.requests else "d2"
    for _ in range(3):
        async with await px.post("/v1/completions", {"prompt": "y", "max_tokens": 2}) as r:
            assert (await r.json())["worker"] != busy
    async with await long as r:
        assert parse_sse(await r.read())[-1] == "[DONE]"


async def test_overload_is_rejected_with_503(workers: W, start_proxy: Any) -> None:
    p1, d1 = workers["p1"], workers["d1"]
    d1.first_delay = 1.0
    px = await start_proxy(fast_config([p1.url], [d1.url], max_in_flight=1))
    first = asyncio.ensure_future(px.post("/v1/completions", {"prompt": "x", "max_tokens": 2}))
    await wait_until(lambda: px.state.in_flight == 1)
    async with await px.post("/v1/completions", {"prompt": "x", "max_tokens": 2}) as r:
        assert r.status == 503 and (await r.json())["error"]["type"] == "overloaded_error"
    async with await first as r:
        assert r.status == 200


async def test_bad_requests_get_openai_errors(workers: W, start_proxy: Any) -> None:
    p1, d1 = workers["p1"], workers["d1"]
    px = await start_proxy(fast_config([p1.url], [d1.url]))
    s = px.session
    async with s.post(px.url + "/v1/completions", data=b"{not json") as r:
        assert r.status == 400 and (await r.json())["error"]["type"] == "invalid_request_error"
    async with s.post(px.url + "/v1/chat/completions", json={"messages": []}) as r:
        assert r.status == 400
    async with s.post(px.url + "/v1/completions", json={"prompt": "x", "stream": "yes"}) as r:
        assert r.status == 400
    async with s.get(px.url + "/v1/nothing") as r:
        assert r.status == 404 and "error" in await r.json()
    async with s.get(px.url + "/v1/completions") as r:
        assert r.status == 405 and "error" in await r.json()
    assert not p1.requests and not d1.requests


async def test_models_health_and_metrics(workers: W, start_proxy: Any) -> None:
    p1, d1 = workers["p1"], workers["d1"]
    px = await start_proxy(fast_config([p1.url], [d1.url]))
    s = px.session
    async with s.get(px.url + "/v1/models") as r:
        assert r.status == 200 and (await r.json())["data"][0]["owned_by"] == "d1"
    async with s.get(px.url + "/health") as r:
        h = await r.json()
        assert r.status == 200 and h["status"] == "ok" and h["flow"] == "sequential"
    async with await px.post("/v1/completions", {"prompt": "x", "max_tokens": 2, "stream": True}) as r:
        await r.read()
    text = await px.metrics_text()
    for needle in (
        'pdxfer_proxy_requests_total{endpoint="completions",status="200"} 1.0',
        'pdxfer_proxy_ttft_seconds_count{endpoint="completions"} 1.0',
        'pdxfer_proxy_request_duration_seconds_count{endpoint="completions"} 1.0',
        f'pdxfer_proxy_backend_in_flight{{backend="{d1.url}",role="decode"}} 0.0',
        f'pdxfer_proxy_backend_up{{backend="{p1.url}",role="prefill"}} 1.0',
        'pdxfer_proxy_leg_duration_seconds_count{role="prefill"} 1.0',
    ):
        assert needle in text, needle


async def test_two_proxies_in_one_process_have_separate_metrics(workers: W, start_proxy: Any) -> None:
    p1, d1 = workers["p1"], workers["d1"]
    a = await start_proxy(fast_config([p1.url], [d1.url]))
    b = await start_proxy(fast_config([p1.url], [d1.url]))
    async with await a.post("/v1/completions", {"prompt": "x", "max_tokens": 2}) as r:
        assert r.status == 200
    assert 'status="200"} 1.0' in await a.metrics_text()
    assert 'status="200"}' not in await b.metrics_text()


async def test_graceful_shutdown_drains_in_flight_streams(workers: W, start_proxy: Any) -> None:
    p1, d1 = workers["p1"], workers["d1"]
    d1.token_delay = 0.05
    px = await start_proxy(fast_config([p1.url], [d1.url], drain_timeout=10))
    async with aiohttp.ClientSession() as s:
        r = await s.post(px.url + "/v1/completions", json={"prompt": "x", "max_tokens": 20, "stream": True})
        assert r.status == 200
        await r.content.readline()
        stop = asyncio.ensure_future(px.server.stop())
        await wait_until(lambda: px.state.draining)
        with pytest.raises(aiohttp.ClientConnectionError):
            async with aiohttp.ClientSession() as s2:
                await s2.get(px.url + "/health")  # no longer listening
        events = parse_sse(await r.read())
        assert events[-1] == "[DONE]"  # the in-flight stream finished
        r.close()
        await asyncio.wait_for(stop, 10)
    assert d1.finished and not d1.cancelled


async def test_shutdown_cancels_streams_that_outlive_the_drain(workers: W, start_proxy: Any) -> None:
    p1, d1 = workers["p1"], workers["d1"]
    d1.token_delay = 0.5
    px = await start_proxy(fast_config([p1.url], [d1.url], drain_timeout=0.5))
    async with aiohttp.ClientSession() as s:
        r = await s.post(px.url + "/v1/completions", json={"prompt": "x", "max_tokens": 100, "stream": True})
        await r.content.readline()
        await asyncio.wait_for(px.server.stop(), 10)
        r.close()
    await wait_until(lambda: len(d1.cancelled) == 1)
