"""Error mapping, request ids, and config parsing."""

from __future__ import annotations

import argparse
import asyncio
import json

import aiohttp
import pytest

from pdxfer.proxy import cli
from pdxfer.proxy.config import ProxyConfig, normalize_policy, normalize_url
from pdxfer.proxy.errors import (
    BadRequest,
    NoBackend,
    ProxyError,
    UpstreamConnectError,
    UpstreamDisconnected,
    UpstreamHTTPError,
    UpstreamTimeout,
    error_for_exception,
)
from pdxfer.proxy.ids import accept_request_id, new_request_id, new_transfer_id
from pdxfer.proxy.upstream import map_client_exception


def test_error_status_and_shape() -> None:
    cases = [
        (BadRequest("bad"), 400, "invalid_request_error"),
        (NoBackend("none"), 503, "service_unavailable"),
        (UpstreamTimeout("slow"), 504, "timeout"),
        (UpstreamDisconnected("gone"), 502, "upstream_error"),
        (UpstreamConnectError("refused"), 502, "upstream_error"),
    ]
    for err, status, typ in cases:
        assert err.status == status
        body = err.body()
        assert set(body["error"]) == {"message", "type", "param", "code"}
        assert body["error"]["type"] == typ and body["error"]["code"] == status


def test_upstream_http_error_4xx_passes_body_through() -> None:
    err_body = {"message": "max_tokens too big", "type": "BadRequestError", "param": "max_tokens", "code": 400}
    raw = json.dumps({"error": err_body}).encode()
    err = UpstreamHTTPError(400, raw, backend="http://w")
    assert err.status == 400 and not err.retryable and err.label == "upstream_4xx"
    assert err.body()["error"]["param"] == "max_tokens"
    assert "max_tokens too big" in str(err)


def test_upstream_http_error_5xx_becomes_502_and_retryable() -> None:
    err = UpstreamHTTPError(500, b"Internal Server Error", backend="http://w")
    assert err.status == 502 and err.retryable and err.label == "upstream_5xx"
    assert err.body()["error"]["code"] == 502
    assert "Internal Server Error" in err.body()["error"]["message"]


def test_reached_flags() -> None:
    assert not UpstreamConnectError("x").reached
    assert UpstreamDisconnected("x").reached
    assert UpstreamTimeout("x").reached


def test_unknown_exception_becomes_500() -> None:
    err = error_for_exception(RuntimeError("oops"))
    assert type(err) is ProxyError and err.status == 500 and "oops" in err.message


def test_map_client_exceptions() -> None:
    conn = aiohttp.ClientConnectorError(
        connection_key=None, os_error=ConnectionRefusedError(111, "refused")  # type: ignore[arg-type]
    )
    assert isinstance(map_client_exception(conn, "http://w", "prefill"), UpstreamConnectError)
    assert isinstance(map_client_exception(asyncio.TimeoutError(), "http://w", "prefill"), UpstreamTimeout)
    assert isinstance(map_client_exception(aiohttp.ServerDisconnectedError(), "http://w", "decode"), UpstreamDisconnected)
    assert isinstance(map_client_exception(aiohttp.ClientPayloadError("cut"), "http://w", "decode"), UpstreamDisconnected)
    t = map_client_exception(asyncio.TimeoutError(), "http://w", "decode first token")
    assert t.peer == "http://w" and t.waiting_for == "decode first token"
    with pytest.raises(asyncio.CancelledError):
        map_client_exception(asyncio.CancelledError(), "http://w", "x")


def test_request_ids_are_unique_and_client_ids_are_sanitised() -> None:
    ids = {new_request_id() for _ in range(10_000)}
    assert len(ids) == 10_000
    assert all(i.startswith("pxr-") and len(i) == 36 for i in list(ids)[:10])
    assert new_transfer_id() != new_transfer_id()
    assert accept_request_id("client-abc_123") == "client-abc_123"
    assert accept_request_id(None).startswith("pxr-")
    assert accept_request_id("bad id with spaces").startswith("pxr-")
    assert accept_request_id("x" * 200).startswith("pxr-")
    assert accept_request_id("evil\r\nX-Injected: 1").startswith("pxr-")


def test_config_from_cli_args() -> None:
    p = argparse.ArgumentParser()
    cli.add_arguments(p)
    args = p.parse_args(["--prefill", "127.0.0.1:1", "http://h:2/", "--decode", "h:3",
                         "--policy", "least-outstanding", "--flow", "concurrent", "--port", "0"])
    cfg = ProxyConfig.from_args(args)
    assert cfg.prefill == ("http://127.0.0.1:1", "http://h:2")
    assert cfg.decode == ("http://h:3",)
    assert cfg.policy == "least_outstanding" and cfg.flow == "concurrent" and cfg.port == 0
    assert cfg.connect_timeout > 0 and cfg.decode_timeout > 0


def test_config_validation() -> None:
    with pytest.raises(ValueError):
        ProxyConfig(prefill=(), decode=("http://d",))
    with pytest.raises(ValueError):
        ProxyConfig(prefill=("http://p",), decode=("http://d",), read_timeout=0)
    with pytest.raises(ValueError):
        normalize_policy("fastest")
    with pytest.raises(ValueError):
        normalize_url("ftp://x")
    assert normalize_policy("rr") == "round_robin"


def test_cli_run_rejects_bad_config(capsys: pytest.CaptureFixture[str]) -> None:
    p = argparse.ArgumentParser()
    cli.add_arguments(p)
    args = p.parse_args(["--prefill", "h:1", "--decode", "h:2", "--policy", "nope"])
    assert cli.run(args) == 2
    assert "unknown policy" in capsys.readouterr().err
