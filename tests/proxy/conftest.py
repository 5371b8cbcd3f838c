"""Fixtures for the proxy tests (helpers live in ``proxy_testlib``)."""

from __future__ import annotations

import asyncio
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/ -> `import vllm_support`
sys.path.insert(0, str(Path(__file__).resolve().parent))  # `import proxy_testlib`, any import mode

from proxy_testlib import FakeWorker, RunningProxy  # noqa: E402

from pdxfer.proxy.config import ProxyConfig  # noqa: E402
from pdxfer.proxy.server import ProxyServer  # noqa: E402


@pytest.fixture
async def workers() -> AsyncIterator[dict[str, FakeWorker]]:
    ws = {name: FakeWorker(name) for name in ("p1", "p2", "d1", "d2")}
    for w in ws.values():
        await w.start()
    try:
        yield ws
    finally:
        for w in ws.values():
            await w.stop()


@pytest.fixture
async def start_proxy() -> AsyncIterator[Any]:
    started: list[RunningProxy] = []
    session = aiohttp.ClientSession()

    async def _start(cfg: ProxyConfig) -> RunningProxy:
        server = ProxyServer(cfg)
        await server.start()
        rp = RunningProxy(server, session)
        started.append(rp)
        return rp

    try:
        yield _start
    finally:
        await session.close()
        for rp in started:
            await asyncio.wait_for(rp.server.stop(), 15)




from vllm_support.fixtures import *  # noqa: E402,F403
from vllm_support.fixtures import TIMINGS  # noqa: E402


def pytest_terminal_summary(terminalreporter: Any) -> None:
    if TIMINGS:
        terminalreporter.section("vllm timings")
        for k, v in TIMINGS.items():
            terminalreporter.write_line(f"{k}: {v}")
