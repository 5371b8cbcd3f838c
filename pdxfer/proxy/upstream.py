"""Calls to workers, each under a deadline, with every failure turned into a typed error.

aiohttp raises a zoo of exceptions; the flows only see ``UpstreamConnectError`` (never
reached the worker), ``UpstreamTimeout``, ``UpstreamDisconnected`` (connection dropped
mid-response) and ``UpstreamHTTPError`` (non-2xx answer).
"""

from __future__ import annotations

import asyncio
import sys
from collections.abc import AsyncIterator, Awaitable, Mapping
from contextlib import asynccontextmanager
from typing import TypeVar
import aiohttp

from pdxfer.proxy.errors import (
    ProxyError,
    UpstreamConnectError,
    UpstreamDisconnected,
    UpstreamError,
    UpstreamHTTPError,
    UpstreamTimeout,
)

_ConnTimeout = getattr(aiohttp, "ConnectionTimeoutError", None)
MAX_ERROR_BODY = 64 * 1024
T = TypeVar("T")


async def bounded(aw: Awaitable[T], timeout: float) -> T:
    """``await aw`` for at most ``timeout`` s (raises ``TimeoutError``). Unlike
    ``asyncio.wait_for`` on Python 3.11, it never swallows a cancellation that races
    with the awaited result."""
    if sys.version_info >= (3, 11):
        async with asyncio.timeout(timeout):
            return await aw
    return await asyncio.wait_for(aw, timeout)  # pragma: no cover - Python 3.10


def map_client_exception(exc: BaseException, backend: str, what: str) -> ProxyError:
    """aiohttp / asyncio exception -> our typed error, naming the worker and the step."""
    if isinstance(exc, ProxyError):
        return exc
    if _ConnTimeout is not None and isinstance(exc, _ConnTimeout):
        return UpstreamConnectError(f"connect to worker timed out during {what}", backend=backend)
    if isinstance(exc, aiohttp.ClientConnectorError):
        return UpstreamConnectError(f"cannot connect to worker during {what}: {exc.os_error}", backend=backend)
    if isinstance(exc, asyncio.TimeoutError):
        return UpstreamTimeout(f"worker did not answer in time during {what}", backend=backend, waiting_for=what)
    if isinstance(exc, (aiohttp.ServerDisconnectedError, aiohttp.ClientPayloadError, aiohttp.ClientOSError)):
        return UpstreamDisconnected(f"worker dropped the connection during {what}: {type(exc).__name__}", backend=backend)
    if isinstance(exc, aiohttp.ClientError):
        return UpstreamError(f"upstream failure during {what}: {type(exc).__name__}: {exc}", backend=backend)
    raise exc  # not ours to translate (e.g. CancelledError)


def json_headers(request_id: str, extra: Mapping[str, str] | None = None) -> dict[str, str]:
    h = {"Content-Type": "application/json", "X-Request-Id": request_id}
    if extra:
        h.update(extra)
    return h


class Upstream:
    def __init__(self, session: aiohttp.ClientSession) -> None:
        self.session = session

    async def post_json(
        self,
        backend: str,
        path: str,
        payload: bytes,
        headers: Mapping[str, str],
        timeout: aiohttp.ClientTimeout,
        what: str,
    ) -> bytes:
        """POST and read the whole answer; a non-2xx answer raises ``UpstreamHTTPError``."""
        try:
            async with self.session.post(backend + path, data=payload, headers=headers, timeout=timeout) as resp:
                body = await resp.read()
                if resp.status // 100 != 2:
                    raise UpstreamHTTPError(resp.status, body[:MAX_ERROR_BODY], backend=backend)
                return body
        except (aiohttp.ClientError, asyncio.TimeoutError) as exc:
            raise map_client_exception(exc, backend, what) from exc

    async def get(self, backend: str, path: str, headers: Mapping[str, str], timeout: float, what: str) -> tuple[int, bytes, str]:
        try:
            async with self.session.get(
                backend + path, headers=headers, timeout=aiohttp.ClientTimeout(total=timeout)
            ) as resp:
                return resp.status, await resp.read(), resp.headers.get("Content-Type", "application/json")
        except (aiohttp.ClientError, asyncio.TimeoutError) as exc:
            raise map_client_exception(exc, backend, what) from exc

    @asynccontextmanager
    async def open(
        self,
        backend: str,
        path: str,
        payload: bytes,
        headers: Mapping[str, str],
        timeout: aiohttp.ClientTimeout,
        what: str,
        headers_timeout: float | None = None,
    ) -> AsyncIterator[aiohttp.ClientResponse]:
        """POST and hand back the open 2xx response; it is closed (not drained) on exit, so a
        worker sees an abandoned request as a disconnect and frees its KV.
        ``headers_timeout`` bounds the wait for the response headers."""
        try:
            post = self.session.post(backend + path, data=payload, headers=headers, timeout=timeout)
            if headers_timeout is None:
                resp = await post
            else:
                resp = await bounded(post, max(headers_timeout, 0.001))
        except (aiohttp.ClientError, asyncio.TimeoutError) as exc:
            raise map_client_exception(exc, backend, what) from exc
        try:
            if resp.status // 100 != 2:
                try:
                    body = await resp.content.read(MAX_ERROR_BODY)
                except (aiohttp.ClientError, asyncio.TimeoutError) as exc:
                    raise map_client_exception(exc, backend, what) from exc
                raise UpstreamHTTPError(resp.status, body, backend=backend)
            yield resp
        finally:
            if resp.content.at_eof():
                resp.release()
            else:
                resp.close()


async def read_all(resp: aiohttp.ClientResponse, backend: str, what: str) -> bytes:
    """The rest of a response body; bounded by the request's own total timeout."""
    try:
        return await resp.read()
    except (aiohttp.ClientError, asyncio.TimeoutError) as exc:
        raise map_client_exception(exc, backend, what) from exc


async def read_chunk(resp: aiohttp.ClientResponse, timeout: float, backend: str, what: str) -> bytes:
    """One chunk of a response body (b"" at EOF), waiting at most ``timeout`` seconds."""
    try:
        return await bounded(resp.content.readany(), timeout)
    except (aiohttp.ClientError, asyncio.TimeoutError) as exc:
        raise map_client_exception(exc, backend, what) from exc


__all__ = ["Upstream", "bounded", "read_all", "read_chunk", "json_headers", "map_client_exception", "UpstreamError"]
