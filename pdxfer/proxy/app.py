"""The aiohttp application: endpoints, the client-side sink, startup and shutdown.

Endpoints: ``POST /v1/completions``, ``POST /v1/chat/completions``, ``GET /v1/models``,
``GET /health``, ``GET /metrics``. Every error the client sees is an OpenAI-style error
body (``{"error": {"message", "type", "param", "code"}}``) with a matching HTTP status.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import msgspec
import structlog
from aiohttp import web
from prometheus_client import CollectorRegistry

from pdxfer.proxy.config import ProxyConfig
from pdxfer.proxy.errors import (
    BadRequest,
    ClientGone,
    Draining,
    NoBackend,
    NotFound,
    Overloaded,
    PayloadTooLarge,
    ProxyError,
    UpstreamConnectError,
    UpstreamError,
    error_for_exception,
    openai_error_body,
)
from pdxfer.proxy.flows import Flow, ProxyRequest, make_flow
from pdxfer.proxy.ids import REQUEST_ID_HEADER, accept_request_id
from pdxfer.proxy.metrics import ProxyMetrics
from pdxfer.proxy.pool import BackendPool
from pdxfer.proxy.routing import decode_cost, make_policy, prefill_cost
from pdxfer.proxy.sse import error_event
from pdxfer.proxy.upstream import Upstream

log = structlog.get_logger("pdxfer.proxy")
_FORWARD_HEADERS = ("Authorization",)


@dataclass
class ProxyState:
    cfg: ProxyConfig
    metrics: ProxyMetrics
    prefill: BackendPool
    decode: BackendPool
    flow: Flow | None = None
    upstream: Upstream | None = None
    in_flight: int = 0
    draining: bool = False
    tasks: list[asyncio.Task[Any]] = field(default_factory=list)


STATE = web.AppKey("pdxfer_proxy_state", ProxyState)


def json_response(status: int, body: Any, request_id: str | None = None) -> web.Response:
    headers = {REQUEST_ID_HEADER: request_id} if request_id else None
    data = body if isinstance(body, bytes) else msgspec.json.encode(body)
    return web.Response(status=status, body=data, content_type="application/json", headers=headers)


def error_response(err: ProxyError, request_id: str | None = None) -> web.Response:
    return json_response(err.status, err.body(), request_id)


class ClientSink:
    """The client end of one request: a JSON answer, or an SSE stream once started."""

    def __init__(self, request: web.Request, request_id: str) -> None:
        self.request = request
        self.request_id = request_id
        self.started = False
        self.status = 200
        self.response: web.StreamResponse | None = None

    async def start_stream(self) -> None:
        resp = web.StreamResponse(
            status=200,
            headers={
                "Content-Type": "text/event-stream",
                "Cache-Control": "no-cache",
                REQUEST_ID_HEADER: self.request_id,
            },
        )
        try:
            await resp.prepare(self.request)
        except ConnectionError as exc:
            raise ClientGone("client went away before the stream started") from exc
        self.response = resp
        self.started = True

    async def write(self, data: bytes) -> None:
        assert self.response is not None
        try:
            await self.response.write(data)
        except ConnectionError as exc:
            raise ClientGone("client went away mid-stream") from exc

    def set_json(self, status: int, body: bytes) -> None:
        self.status = status
        self.response = web.Response(
            status=status, body=body, content_type="application/json", headers={REQUEST_ID_HEADER: self.request_id}
        )


async def parse_request(
    request: web.Request, kind: str, request_id: str, started: float, logger: Any
) -> ProxyRequest:
    try:
        raw = await request.read()
    except web.HTTPRequestEntityTooLarge as exc:
        raise PayloadTooLarge(f"request body too large: {exc.text}") from None
    try:
        body = msgspec.json.decode(raw)
    except msgspec.DecodeError as exc:
        raise BadRequest(f"request body is not valid JSON: {exc}") from None
    if not isinstance(body, dict):
        raise BadRequest("request body must be a JSON object")
    if kind == "chat":
        if not isinstance(body.get("messages"), list) or not body["messages"]:
            raise BadRequest("'messages' must be a non-empty list")
    elif "prompt" not in body:
        raise BadRequest("'prompt' is required")
    stream = body.get("stream", False)
    if stream is None:
        stream = False
    if not isinstance(stream, bool):
        raise BadRequest("'stream' must be a boolean")
    fwd = {h: request.headers[h] for h in _FORWARD_HEADERS if h in request.headers}
    return ProxyRequest(
        kind=kind,
        path=request.path,
        body=body,
        stream=stream,
        request_id=request_id,
        started=started,
        prefill_cost=prefill_cost(body),
        decode_cost=decode_cost(body),
        forward_headers=fwd,
        log=logger,
    )


async def handle_generate(request: web.Request) -> web.StreamResponse:
    st = request.app[STATE]
    m = st.metrics
    kind = "chat" if request.path.endswith("/chat/completions") else "completions"
    rid = accept_request_id(request.headers.get(REQUEST_ID_HEADER))
    rlog = log.bind(request_id=rid, endpoint=kind)
    t0 = time.monotonic()
    sink = ClientSink(request, rid)
    status = 500
    st.in_flight += 1
    m.in_flight.inc()
    req: ProxyRequest | None = None
    try:
        if st.draining:
            raise Draining("proxy is shutting down")
        if st.in_flight > st.cfg.max_in_flight:
            raise Overloaded(f"proxy has {st.cfg.max_in_flight} requests in flight")
        req = await parse_request(request, kind, rid, t0, rlog)
        assert st.flow is not None
        await st.flow.run(req, sink)
        status = sink.status
        assert sink.response is not None
        return sink.response
    except asyncio.CancelledError:
        # the client went away (handler cancellation), or shutdown outlived the drain
        status = 499
        label = "shutdown_cancelled" if st.draining else ClientGone.label
        m.errors.labels(label).inc()
        rlog.info("request_cancelled", cause=label)
        raise
    except ClientGone:
        status = 499
        m.errors.labels(ClientGone.label).inc()
        rlog.info("request_cancelled", cause=ClientGone.label)
        return sink.response if sink.response is not None else web.Response(status=499)
    except Exception as exc:  # every failure becomes an OpenAI error for the client
        err = error_for_exception(exc)
        status = err.status
        m.errors.labels(err.label).inc()
        if type(err) is ProxyError:
            rlog.error("request_failed", error=str(exc), exc_info=exc)
        else:
            rlog.warning("request_failed", error=str(err), error_type=err.label, backend=err.backend)
        if sink.started:
            assert sink.response is not None
            try:
                await sink.response.write(error_event(err))
            except ConnectionError:
                pass  # the client is gone too: nobody is left to tell, and the error is logged above
            return sink.response
        return error_response(err, rid)
    finally:
        st.in_flight -= 1
        m.in_flight.dec()
        elapsed = time.monotonic() - t0
        m.requests.labels(kind, str(status)).inc()
        m.latency.labels(kind).observe(elapsed)
        ttft = None if req is None or req.first_event_at is None else round(req.first_event_at - t0, 4)
        rlog.info("request_done", status=status, stream=None if req is None else req.stream,
                  seconds=round(elapsed, 4), ttft=ttft)


async def handle_models(request: web.Request) -> web.Response:
    st = request.app[STATE]
    assert st.upstream is not None
    rid = accept_request_id(request.headers.get(REQUEST_ID_HEADER))
    headers = {REQUEST_ID_HEADER: rid, **{h: request.headers[h] for h in _FORWARD_HEADERS if h in request.headers}}
    candidates = [b for b in st.decode.backends + st.prefill.backends if b.routable]
    if not candidates:
        return error_response(NoBackend("no healthy worker to ask for models"), rid)
    last: ProxyError | None = None
    for b in candidates:
        try:
            status, body, _ = await st.upstream.get(b.url, "/v1/models", headers, st.cfg.misc_timeout, "models")
        except UpstreamError as exc:
            last = exc
            if isinstance(exc, UpstreamConnectError):
                (st.decode if b.role == "decode" else st.prefill).report_failure(b, str(exc))
            continue
        return json_response(status, body, rid)
    assert last is not None
    st.metrics.errors.labels(last.label).inc()
    return error_response(last, rid)


async def handle_health(request: web.Request) -> web.Response:
    st = request.app[STATE]
    ok = not st.draining and st.prefill.any_routable() and st.decode.any_routable()
    body = {
        "status": "draining" if st.draining else ("ok" if ok else "unavailable"),
        "flow": st.cfg.flow,
        "policy": st.cfg.policy,
        "in_flight": st.in_flight,
        "prefill": st.prefill.snapshot(),
        "decode": st.decode.snapshot(),
    }
    return json_response(200 if ok else 503, body)


async def handle_metrics(request: web.Request) -> web.Response:
    data, content_type = request.app[STATE].metrics.render()
    resp = web.Response(body=data)
    resp.headers["Content-Type"] = content_type
    return resp


@web.middleware
async def openai_errors(
    request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
) -> web.StreamResponse:
    """aiohttp's own HTTP errors (404, 405, 413...) in OpenAI's error shape."""
    try:
        return await handler(request)
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        err: ProxyError = NotFound(f"{request.method} {request.path}: {exc.reason}")
        err.status = exc.status
        request.app[STATE].metrics.errors.labels("http_" + str(exc.status)).inc()
        return json_response(exc.status, openai_error_body(err.message, err.error_type, exc.status))


async def _lifecycle(app: web.Application) -> AsyncIterator[None]:
    st = app[STATE]
    cfg = st.cfg
    connector = aiohttp.TCPConnector(
        limit=cfg.upstream_connections,
        limit_per_host=0,
        keepalive_timeout=3.0,  # below uvicorn's 5 s, so we never reuse a socket it closed
        enable_cleanup_closed=False,
    )
    session = aiohttp.ClientSession(connector=connector, auto_decompress=False, trust_env=False)
    st.upstream = Upstream(session)
    st.flow = make_flow(cfg, st.prefill, st.decode, st.upstream, st.metrics)
    for pool in (st.prefill, st.decode):
        st.tasks.append(asyncio.ensure_future(pool.run_health_checks(session, cfg.health_interval, cfg.health_timeout)))
    log.info("proxy_started", flow=cfg.flow, policy=cfg.policy, prefill=list(cfg.prefill), decode=list(cfg.decode))
    try:
        yield
    finally:
        for t in st.tasks:
            t.cancel()
        await asyncio.wait(st.tasks, timeout=5.0)
        await st.flow.aclose(timeout=min(cfg.drain_timeout, cfg.prefill_timeout))
        await session.close()
        log.info("proxy_stopped")


async def _on_shutdown(app: web.Application) -> None:
    app[STATE].draining = True


def create_app(cfg: ProxyConfig, *, registry: CollectorRegistry | None = None) -> web.Application:
    metrics = ProxyMetrics(registry)
    state = ProxyState(
        cfg=cfg,
        metrics=metrics,
        prefill=BackendPool("prefill", cfg.prefill, make_policy(cfg.policy), metrics,
                            unhealthy_after=cfg.unhealthy_after, healthy_after=cfg.healthy_after),
        decode=BackendPool("decode", cfg.decode, make_policy(cfg.policy), metrics,
                           unhealthy_after=cfg.unhealthy_after, healthy_after=cfg.healthy_after),
    )
    app = web.Application(client_max_size=cfg.max_body_bytes, middlewares=[openai_errors])
    app[STATE] = state
    app.router.add_post("/v1/completions", handle_generate)
    app.router.add_post("/v1/chat/completions", handle_generate)
    app.router.add_get("/v1/models", handle_models)
    app.router.add_get("/health", handle_health)
    app.router.add_get("/metrics", handle_metrics)
    app.cleanup_ctx.append(_lifecycle)
    app.on_shutdown.append(_on_shutdown)
    return app
