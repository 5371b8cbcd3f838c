"""The two ways one client request becomes a prefill leg and a decode leg.

**sequential** (vLLM NixlConnector): prefill with ``max_tokens=1`` and
``kv_transfer_params={"do_remote_decode": true, ...}``; then decode with the
``kv_transfer_params`` the prefill answered (the decode worker pulls the KV). Any prefill
failure happens before KV moved, so it is retried on another prefill worker. A decode
worker that cannot be reached is swapped for another one (same params).

**concurrent** (PdxferConnector): both legs start at once and share a fresh, globally
unique transfer id. The contract with the connector (``kv_transfer_params``)::

    prefill leg: {"do_remote_decode": true, "do_remote_prefill": false,
                  "transfer_id": T, "remote_decode_url": <decode worker base URL>,
                  "request_id": R}
    decode leg:  {"do_remote_prefill": true, "do_remote_decode": false,
                  "transfer_id": T, "request_id": R}

Here only a prefill that provably never reached its worker is retried (same transfer id),
since otherwise KV may already be on the wire. A prefill failure before the decode leg
produced its first event aborts the decode leg; after that, the decode leg has its KV and
the prefill's fate is only logged.

Both flows: the client's answer comes from the decode leg, relayed unchanged (``usage``
included, ``stream_options`` honoured by the worker itself). Streams are answered with
HTTP 200 only once the first event is in hand, so failures before the first token reach
the client as an OpenAI error body with the right status; later failures arrive as an
SSE ``{"error": ...}`` event (which OpenAI clients raise as ``APIError``), never as a
silently truncated stream. Cancelling the flow (client gone) closes both upstream
connections, which is how vLLM learns to abort the request and free its KV.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field
from typing import Any, Protocol

import aiohttp
import msgspec

from pdxfer.proxy.config import ProxyConfig
from pdxfer.proxy.errors import (
    BadUpstreamResponse,
    NoBackend,
    UpstreamConnectError,
    UpstreamDisconnected,
    UpstreamError,
    UpstreamTimeout,
)
from pdxfer.proxy.ids import new_transfer_id
from pdxfer.proxy.metrics import ProxyMetrics
from pdxfer.proxy.pool import BackendPool, Lease
from pdxfer.proxy.sse import SSEEvent, SSEParser
from pdxfer.proxy.upstream import Upstream, json_headers, read_all, read_chunk

_STRIP_FROM_CLIENT = ("kv_transfer_params",)


@dataclass
class ProxyRequest:
    kind: str  # "completions" | "chat"
    path: str  # upstream path, same as the client's
    body: dict[str, Any]
    stream: bool
    request_id: str
    started: float  # time.monotonic() at arrival
    prefill_cost: int
    decode_cost: int
    forward_headers: dict[str, str] = field(default_factory=dict)
    log: Any = None
    first_event_at: float | None = None


class Sink(Protocol):
    """Where the answer goes (the aiohttp handler implements it)."""

    started: bool

    async def start_stream(self) -> None: ...

    async def write(self, data: bytes) -> None: ...

    def set_json(self, status: int, body: bytes) -> None: ...


def prefill_payload(req: ProxyRequest, kv_params: dict[str, Any]) -> bytes:
    p = {k: v for k, v in req.body.items() if k not in _STRIP_FROM_CLIENT}
    p["max_tokens"] = 1
    if req.kind == "chat" or "max_completion_tokens" in p:
        p["max_completion_tokens"] = 1
    p["stream"] = False
    for key in ("stream_options", "min_tokens"):
        p.pop(key, None)
    if "n" in p:
        p["n"] = 1
    p["kv_transfer_params"] = kv_params
    return msgspec.json.encode(p)


def decode_payload(req: ProxyRequest, kv_params: dict[str, Any] | None) -> bytes:
    p = {k: v for k, v in req.body.items() if k not in _STRIP_FROM_CLIENT}
    if kv_params is not None:
        p["kv_transfer_params"] = kv_params
    return msgspec.json.encode(p)


SEQUENTIAL_PREFILL_PARAMS: dict[str, Any] = {
    "do_remote_decode": True,
    "do_remote_prefill": False,
    "remote_engine_id": None,
    "remote_block_ids": None,
    "remote_host": None,
    "remote_port": None,
}


class Flow:
    name = "flow"

    def __init__(
        self,
        cfg: ProxyConfig,
        prefill: BackendPool,
        decode: BackendPool,
        upstream: Upstream,
        metrics: ProxyMetrics,
    ) -> None:
        self.cfg = cfg
        self.prefill_pool = prefill
        self.decode_pool = decode
        self.upstream = upstream
        self.metrics = metrics
        self._background: set[asyncio.Future[Any]] = set()

    async def run(self, req: ProxyRequest, sink: Sink) -> None:
        raise NotImplementedError

    async def aclose(self, timeout: float) -> None:
        """Let background legs finish (bounded), then cancel what is left."""
        if not self._background:
            return
        _, pending = await asyncio.wait(set(self._background), timeout=timeout)
        for t in pending:
            t.cancel()
        if pending:
            await asyncio.wait(pending, timeout=1.0)

    # ------------------------------------------------------------ shared pieces
    def _headers(self, req: ProxyRequest) -> dict[str, str]:
        return json_headers(req.request_id, req.forward_headers)

    def _passive(self, pool: BackendPool, lease: Lease, exc: UpstreamError) -> None:
        if isinstance(exc, (UpstreamConnectError, UpstreamDisconnected)):
            pool.report_failure(lease.backend, str(exc))

    async def _prefill(self, req: ProxyRequest, kv_params: dict[str, Any], *, retry_reached: bool) -> dict[str, Any] | None:
        """Run the prefill leg with retries; return the ``kv_transfer_params`` it answered."""
        payload = prefill_payload(req, kv_params)
        timeout = aiohttp.ClientTimeout(
            total=self.cfg.prefill_timeout, sock_connect=self.cfg.connect_timeout
        )
        tried: list[str] = []
        last: UpstreamError | None = None
        for _attempt in range(1 + max(0, self.cfg.prefill_retries)):
            try:
                lease = self.prefill_pool.acquire(req.prefill_cost, exclude=tried)
            except NoBackend:
                if last is not None:
                    raise last from None
                raise
            tried.append(lease.url)
            t0 = time.monotonic()
            with lease:
                try:
                    body = await self.upstream.post_json(
                        lease.url, req.path, payload, self._headers(req), timeout, "prefill"
                    )
                except UpstreamError as exc:
                    self._passive(self.prefill_pool, lease, exc)
                    retry = exc.retryable and (retry_reached or not exc.reached)
                    req.log.warning("prefill_failed", backend=lease.url, error=str(exc), retry=retry)
                    if not retry:
                        raise
                    last = exc
                    self.metrics.retries.labels("prefill").inc()
                    continue
            self.metrics.leg_latency.labels("prefill").observe(time.monotonic() - t0)
            try:
                data = msgspec.json.decode(body)
            except msgspec.DecodeError:
                raise BadUpstreamResponse("prefill answered something that is not JSON", backend=lease.url) from None
            if not isinstance(data, dict):
                raise BadUpstreamResponse("prefill answered JSON that is not an object", backend=lease.url)
            req.log.debug("prefill_done", backend=lease.url, seconds=round(time.monotonic() - t0, 4))
            params = data.get("kv_transfer_params")
            return params if isinstance(params, dict) else None
        assert last is not None
        raise last

    async def _decode_leg(self, req: ProxyRequest, lease: Lease, payload: bytes, sink: Sink) -> None:
        """One decode attempt on ``lease``'s worker, relayed to ``sink``."""
        url = lease.url
        t0 = time.monotonic()
        timeout = aiohttp.ClientTimeout(total=self.cfg.decode_timeout, sock_connect=self.cfg.connect_timeout)
        deadline = req.started + self.cfg.first_token_timeout
        headers_timeout = deadline - time.monotonic() if req.stream else None
        async with self.upstream.open(
            url, req.path, payload, self._headers(req), timeout,
            "decode first token" if req.stream else "decode", headers_timeout,
        ) as resp:
            if not req.stream:
                body = await read_all(resp, url, "decode")
                self.metrics.leg_latency.labels("decode").observe(time.monotonic() - t0)
                lease.progress(lease.remaining)
                sink.set_json(resp.status, body)
                return
            parser = SSEParser()
            events: list[SSEEvent] = []
            while not events:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise UpstreamTimeout(
                        f"no first token within {self.cfg.first_token_timeout}s",
                        backend=url,
                        waiting_for="first token",
                    )
                chunk = await read_chunk(resp, remaining, url, "decode first token")
                if not chunk:
                    raise UpstreamDisconnected("decode stream ended before its first event", backend=url)
                events = parser.feed(chunk)
            now = time.monotonic()
            self.metrics.leg_latency.labels("decode").observe(now - t0)
            await sink.start_stream()
            req.first_event_at = now
            self.metrics.ttft.labels(req.kind).observe(now - req.started)
            while not await self._forward(req, events, sink, lease):
                chunk = await read_chunk(resp, self.cfg.read_timeout, url, "decode stream")
                if not chunk:
                    raise UpstreamDisconnected("decode stream ended before [DONE]", backend=url)
                events = parser.feed(chunk)

    async def _forward(self, req: ProxyRequest, events: list[SSEEvent], sink: Sink, lease: Lease) -> bool:
        """Write whole events to the client; True once ``[DONE]`` went out."""
        out: list[bytes] = []
        done = False
        tokens = 0
        for ev in events:
            out.append(ev.raw)
            if ev.is_done:
                done = True
                break
            if ev.is_error:
                self.metrics.errors.labels("upstream_stream_error").inc()
                req.log.warning("upstream_stream_error", backend=lease.url, data=ev.data[:300].decode("utf-8", "replace"))
            else:
                tokens += 1
        lease.progress(tokens)
        await sink.write(b"".join(out))
        return done

    async def _decode_with_retries(self, req: ProxyRequest, kv_params: dict[str, Any] | None, sink: Sink) -> None:
        payload = decode_payload(req, kv_params)
        tried: list[str] = []
        last: UpstreamError | None = None
        for _attempt in range(1 + max(0, self.cfg.decode_retries)):
            try:
                lease = self.decode_pool.acquire(req.decode_cost, exclude=tried)
            except NoBackend:
                if last is not None:
                    raise last from None
                raise
            tried.append(lease.url)
            with lease:
                try:
                    await self._decode_leg(req, lease, payload, sink)
                    return
                except UpstreamError as exc:
                    self._passive(self.decode_pool, lease, exc)
                    retry = not exc.reached and not sink.started
                    req.log.warning("decode_failed", backend=lease.url, error=str(exc), retry=retry)
                    if not retry:
                        raise
                    last = exc
                    self.metrics.retries.labels("decode").inc()
        assert last is not None
        raise last


class SequentialFlow(Flow):
    name = "sequential"

    async def run(self, req: ProxyRequest, sink: Sink) -> None:
        kv = await self._prefill(req, dict(SEQUENTIAL_PREFILL_PARAMS), retry_reached=True)
        await self._decode_with_retries(req, kv, sink)


class ConcurrentFlow(Flow):
    name = "concurrent"

    async def run(self, req: ProxyRequest, sink: Sink) -> None:
        tid = new_transfer_id()
        req.log = req.log.bind(transfer_id=tid)
        d_lease = self.decode_pool.acquire(req.decode_cost)
        decode_kv = {"do_remote_prefill": True, "do_remote_decode": False, "transfer_id": tid, "request_id": req.request_id}
        prefill_kv = {
            "do_remote_decode": True,
            "do_remote_prefill": False,
            "transfer_id": tid,
            "remote_decode_url": d_lease.url,
            "request_id": req.request_id,
        }
        prefill_task = asyncio.ensure_future(self._prefill(req, prefill_kv, retry_reached=False))
        decode_task = asyncio.ensure_future(self._decode_leg(req, d_lease, decode_payload(req, decode_kv), sink))
        ok = False
        try:
            with d_lease:
                try:
                    await asyncio.wait({prefill_task, decode_task}, return_when=asyncio.FIRST_COMPLETED)
                    p_exc = prefill_task.exception() if prefill_task.done() else None
                    if p_exc is not None and not decode_task.done() and not sink.started:
                        decode_task.cancel()
                        await asyncio.wait({decode_task})
                        raise p_exc
                    await decode_task
                except UpstreamError as exc:
                    if decode_task.done() and not decode_task.cancelled() and decode_task.exception() is exc:
                        self._passive(self.decode_pool, d_lease, exc)
                    raise
            ok = True
        finally:
            for t in (decode_task, prefill_task):
                if t.done():
                    if not t.cancelled() and t.exception() is not None and ok:
                        req.log.warning("prefill_failed_after_decode", error=str(t.exception()))
                    continue
                if t is decode_task or not ok:
                    t.cancel()
                self._track(req, t)

    def _track(self, req: ProxyRequest, task: asyncio.Future[Any]) -> None:
        """Keep a leg that outlives its request (a prefill finishing after the answer went
        out, or a cancelled leg unwinding) owned, so shutdown can wait for it."""
        self._background.add(task)

        def done(t: asyncio.Future[Any]) -> None:
            self._background.discard(t)
            if not t.cancelled() and t.exception() is not None:
                req.log.warning("leg_failed_after_answer", error=str(t.exception()))

        task.add_done_callback(done)


def make_flow(cfg: ProxyConfig, prefill: BackendPool, decode: BackendPool, upstream: Upstream, metrics: ProxyMetrics) -> Flow:
    cls = SequentialFlow if cfg.flow == "sequential" else ConcurrentFlow
    return cls(cfg, prefill, decode, upstream, metrics)
