"""SSE parsing: whole events only, raw bytes preserved, any chunking."""

from __future__ import annotations

import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pdxfer.proxy.errors import UpstreamDisconnected
from pdxfer.proxy.sse import DONE_EVENT, SSEError, SSEParser, encode_event, error_event

STREAM = (
    b'data: {"id":"1","choices":[{"text":"a"}]}\n\n'
    b": keep-alive comment\n\n"
    b'data: {"id":"1","choices":[{"text":"b\\n"}]}\n\n'
    b"event: ping\ndata: x\ndata: y\n\n"
    b'data: {"id":"1","choices":[],"usage":{"prompt_tokens":3}}\r\n\r\n'
    b"data: [DONE]\n\n"
)


def _collect(chunks: list[bytes]) -> tuple[list, SSEParser]:
    p = SSEParser()
    out = []
    for c in chunks:
        out.extend(p.feed(c))
    return out, p


def test_whole_stream_at_once() -> None:
    events, p = _collect([STREAM])
    assert [e.data for e in events] == [
        b'{"id":"1","choices":[{"text":"a"}]}',
        b'{"id":"1","choices":[{"text":"b\\n"}]}',
        b"x\ny",
        b'{"id":"1","choices":[],"usage":{"prompt_tokens":3}}',
        b"[DONE]",
    ]
    assert events[2].event == "ping"
    assert events[-1].is_done and not events[0].is_done
    assert events[3].json()["usage"] == {"prompt_tokens": 3}
    assert p.pending == 0
    # raw bytes of the forwarded events + the dropped comment == the input
    assert b"".join(e.raw for e in events) == STREAM.replace(b": keep-alive comment\n\n", b"")


@settings(max_examples=200, deadline=None)
@given(st.lists(st.integers(min_value=0, max_value=len(STREAM)), max_size=12))
def test_any_chunking_gives_the_same_events(cuts: list[int]) -> None:
    bounds = sorted(set([0, len(STREAM), *cuts]))
    chunks = [STREAM[a:b] for a, b in zip(bounds, bounds[1:], strict=False)]
    one, _ = _collect([STREAM])
    many, p = _collect(chunks)
    assert many == one
    assert p.pending == 0


def test_byte_by_byte_terminator_straddles() -> None:
    events, p = _collect([bytes([b]) for b in STREAM])
    assert len(events) == 5 and p.pending == 0


def test_partial_event_is_held_back() -> None:
    p = SSEParser()
    assert p.feed(b'data: {"a":') == []
    assert p.pending > 0
    (ev,) = p.feed(b"1}\n\n")
    assert ev.json() == {"a": 1}


def test_error_event_detection() -> None:
    (ev,) = SSEParser().feed(b'data: {"error": {"message": "boom"}}\n\n')
    assert ev.is_error
    (ev,) = SSEParser().feed(b'data: {"choices": []}\n\n')
    assert not ev.is_error


def test_oversized_event_is_rejected() -> None:
    p = SSEParser(max_event_bytes=64)
    with pytest.raises(SSEError):
        p.feed(b"data: " + b"x" * 100)


def test_encoders() -> None:
    assert DONE_EVENT == b"data: [DONE]\n\n"
    assert encode_event({"a": 1}) == b'data: {"a":1}\n\n'
    err = UpstreamDisconnected("worker died", backend="http://w")
    raw = error_event(err)
    (ev,) = SSEParser().feed(raw)
    body = json.loads(ev.data)
    assert body["error"]["type"] == "upstream_error"
    assert body["error"]["code"] == 502
    assert "worker died" in body["error"]["message"]
    assert ev.is_error
