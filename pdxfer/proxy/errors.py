"""Errors the proxy raises on purpose, and how each reaches the client.

Each error knows its HTTP status, the OpenAI error ``type`` the client sees, and the
label it is counted under in ``pdxfer_proxy_errors_total``. Upstream errors also say
whether the request ever reached the worker (``reached``): a request that never reached
a prefill worker moved no KV, so it may be retried on another one.
"""

from __future__ import annotations

import json
from typing import Any

from pdxfer.errors import PdxferError


class ProxyError(PdxferError):
    status: int = 500
    error_type: str = "server_error"
    label: str = "internal"
    retryable: bool = False

    def __init__(self, message: str, *, backend: str | None = None, **kw: Any) -> None:
        self.backend = backend
        self.message = message
        super().__init__(message, peer=backend, **kw)

    def body(self) -> dict[str, Any]:
        return openai_error_body(self.message, self.error_type, self.status)


class BadRequest(ProxyError):
    status = 400
    error_type = "invalid_request_error"
    label = "bad_request"


class NotFound(ProxyError):
    status = 404
    error_type = "invalid_request_error"
    label = "not_found"


class Overloaded(ProxyError):
    status = 503
    error_type = "overloaded_error"
    label = "overloaded"


class Draining(ProxyError):
    status = 503
    error_type = "service_unavailable"
    label = "draining"


class NoBackend(ProxyError):
    status = 503
    error_type = "service_unavailable"
    label = "no_backend"


class UpstreamError(ProxyError):
    """Base of everything that went wrong talking to a worker."""

    status = 502
    error_type = "upstream_error"
    label = "upstream_error"
    #: False when the request provably never reached the worker (connect failed).
    reached: bool = True


class UpstreamConnectError(UpstreamError):
    label = "upstream_connect"
    reached = False
    retryable = True


class UpstreamTimeout(UpstreamError):
    status = 504
    error_type = "timeout"
    label = "upstream_timeout"
    retryable = True


class UpstreamDisconnected(UpstreamError):
    """The worker closed the connection or died before the response was complete."""

    label = "upstream_disconnect"
    retryable = True


class UpstreamHTTPError(UpstreamError):
    """The worker answered with a non-2xx status; 4xx bodies go to the client verbatim."""

    def __init__(self, status: int, raw_body: bytes, *, backend: str | None = None) -> None:
        self.upstream_status = status
        self.raw_body = raw_body
        parsed = _parse_error(raw_body)
        msg = parsed or raw_body[:500].decode("utf-8", "replace") or f"HTTP {status}"
        if 400 <= status < 500:
            self.status = status
            self.error_type = "invalid_request_error"
            self.label = "upstream_4xx"
            self.retryable = False
        else:
            self.status = 502
            self.label = "upstream_5xx"
            self.retryable = True
        super().__init__(f"worker answered HTTP {status}: {msg}", backend=backend)

    def body(self) -> dict[str, Any]:
        if 400 <= self.upstream_status < 500:
            try:
                data = json.loads(self.raw_body)
                if isinstance(data, dict) and isinstance(data.get("error"), dict):
                    return data
            except ValueError:
                pass  # not JSON: fall back to our own error body, which names the upstream status
        return super().body()


class BadUpstreamResponse(UpstreamError):
    label = "upstream_bad_response"


def _parse_error(raw: bytes) -> str | None:
    try:
        data = json.loads(raw)
    except ValueError:
        return None
    if isinstance(data, dict):
        err = data.get("error", data)
        if isinstance(err, dict) and isinstance(err.get("message"), str):
            return str(err["message"])
        if isinstance(data.get("message"), str):
            return str(data["message"])
    return None


def openai_error_body(message: str, error_type: str, code: int | str | None) -> dict[str, Any]:
    return {"error": {"message": message, "type": error_type, "param": None, "code": code}}


def error_for_exception(exc: BaseException) -> ProxyError:
    """Any exception -> the ProxyError the client gets (unknown ones become a 500)."""
    if isinstance(exc, ProxyError):
        return exc
    return ProxyError(f"internal proxy error: {type(exc).__name__}: {exc}")


class PayloadTooLarge(BadRequest):
    status = 413
    label = "payload_too_large"


class ClientGone(ProxyError):
    """The client went away; nothing can be told to it any more."""

    status = 499
    error_type = "client_closed_request"
    label = "client_disconnect"
