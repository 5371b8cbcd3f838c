"""Leases and pools (no I/O), and the real CLI process: uvloop, structlog lines carrying
the request id, SIGTERM drains."""

from __future__ import annotations

import asyncio
import os
import signal
import sys
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from proxy_testlib import FakeWorker, parse_sse

from pdxfer.proxy.errors import NoBackend
from pdxfer.proxy.metrics import ProxyMetrics
from pdxfer.proxy.pool import BackendPool
from pdxfer.proxy.routing import LeastOutstanding, RoundRobin
from vllm_support.servers import ProxyProcess


def _pool(urls: list[str], policy: Any = None) -> BackendPool:
    return BackendPool("decode", urls, policy or RoundRobin(), ProxyMetrics(), unhealthy_after=2)


def test_lease_accounting_is_exact_and_idempotent() -> None:
    pool = _pool(["http://a", "http://b"], LeastOutstanding())
    l1 = pool.acquire(100)
    l2 = pool.acquire(10)
    assert l1.url != l2.url
    a = l1.backend
    assert (a.in_flight, a.outstanding_tokens) == (1, 100)
    l1.progress(30)
    assert a.outstanding_tokens == 70
    l1.progress(1000)  # never below zero
    assert a.outstanding_tokens == 0
    with l1:
        pass
    l1.release()
    assert (a.in_flight, a.outstanding_tokens) == (0, 0)
    l2.release()
    assert all((b.in_flight, b.outstanding_tokens) == (0, 0) for b in pool.backends)
    text = pool.metrics.render()[0].decode()
    assert 'pdxfer_proxy_backend_in_flight{backend="http://a",role="decode"} 0.0' in text


def test_report_failure_takes_worker_out_and_acquire_routes_around() -> None:
    pool = _pool(["http://a", "http://b"])
    pool.report_failure(pool.backends[0], "connection refused")
    assert [pool.acquire(1).url for _ in range(3)] == ["http://b"] * 3
    pool.report_failure(pool.backends[1], "gone")
    with pytest.raises(NoBackend) as ei:
        pool.acquire(1)
    assert "http://a" in str(ei.value) and ei.value.status == 503
    assert not pool.any_routable()


@pytest.mark.timeout(60)
async def test_cli_process_logs_request_id_and_drains_on_sigterm(tmp_path: Path) -> None:
    p1, d1 = FakeWorker("p1"), FakeWorker("d1")
    await p1.start()
    await d1.start()
    d1.token_delay = 0.05
    proxy = ProxyProcess("proxy-cli", [p1.url], [d1.url], log_dir=tmp_path,
                         extra_args=["--log-level", "info", "--drain-timeout", "20"], python=sys.executable)
    try:
        proxy.start()
        await asyncio.to_thread(proxy.wait_ready, 30)
        async with aiohttp.ClientSession() as s:
            r = await s.post(proxy.url + "/v1/completions", json={"prompt": "x", "max_tokens": 30, "stream": True},
                             headers={"X-Request-Id": "cli-test-7"})
            assert r.status == 200
            await r.content.readline()
            os.kill(proxy.pid, signal.SIGTERM)  # graceful: the running stream must finish
            events = parse_sse(await r.read())
            r.close()
        assert events[-1] == "[DONE]" and len(events) >= 29
        rc = await asyncio.to_thread(proxy.proc.wait, 20)  # type: ignore[union-attr]
        assert rc == 0
        log = proxy.log_path.read_text()
        lines = [ln for ln in log.splitlines() if "cli-test-7" in ln]
        assert any("request_done" in ln for ln in lines), log[-2000:]
        assert "proxy_draining" in log and "proxy_stopped" in log
        assert d1.requests[0]["headers"]["X-Request-Id"] == "cli-test-7"
    finally:
        proxy.stop()
        await p1.stop()
        await d1.stop()
