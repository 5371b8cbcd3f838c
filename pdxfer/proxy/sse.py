"""Server-sent events: an incremental parser that keeps each event's raw bytes, and the
few events the proxy writes itself.

The relay forwards upstream events byte for byte, but only *whole* events: when a worker
dies in the middle of one, the client never sees half an event followed by our error.
Event boundaries are blank lines (``\\n\\n`` or ``\\r\\n\\r\\n``); lone-``\\r`` line endings
are not supported (no OpenAI server emits them).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import msgspec

from pdxfer.proxy.errors import BadUpstreamResponse, ProxyError

DONE_EVENT = b"data: [DONE]\n\n"
MAX_EVENT_BYTES = 8 * 1024 * 1024  # bounded buffering: a bigger event is a broken upstream


class SSEError(BadUpstreamResponse):
    """The upstream stream broke the SSE rules the relay relies on (e.g. an event too big)."""


@dataclass(frozen=True)
class SSEEvent:
    raw: bytes  # the event as received, terminator included
    data: bytes  # the data lines joined by b"\n", without the "data:" prefixes
    event: str | None = None

    @property
    def is_done(self) -> bool:
        return self.data.strip() == b"[DONE]"

    @property
    def is_error(self) -> bool:
        return self.data.lstrip().startswith(b'{"error"') or self.event == "error"

    def json(self) -> Any:
        return msgspec.json.decode(self.data)


def _parse_fields(block: bytes) -> tuple[bytes, str | None]:
    data: list[bytes] = []
    event: str | None = None
    for line in block.splitlines():
        if not line or line.startswith(b":"):
            continue
        name, sep, value = line.partition(b":")
        if sep and value.startswith(b" "):
            value = value[1:]
        if name == b"data":
            data.append(value)
        elif name == b"event":
            event = value.decode("utf-8", "replace")
    return b"\n".join(data), event


class SSEParser:
    """Feed bytes, get whole events. ``pending`` is what waits for its terminator."""

    def __init__(self, max_event_bytes: int = MAX_EVENT_BYTES) -> None:
        self._buf = bytearray()
        self._scan_from = 0
        self.max_event_bytes = max_event_bytes

    @property
    def pending(self) -> int:
        return len(self._buf)

    def feed(self, chunk: bytes) -> list[SSEEvent]:
        if not chunk:
            return []
        self._buf += chunk
        events: list[SSEEvent] = []
        start = 0
        buf = self._buf
        # A terminator may straddle the previous chunk's end: rescan its last 3 bytes.
        pos = max(0, self._scan_from - 3)
        while True:
            i = buf.find(b"\n\n", pos)
            j = buf.find(b"\r\n\r\n", pos)
            if i < 0 and j < 0:
                break
            if j >= 0 and (i < 0 or j <= i):
                end = j + 4
            else:
                end = i + 2
            raw = bytes(buf[start:end])
            data, event = _parse_fields(raw)
            if data or event is not None:
                events.append(SSEEvent(raw=raw, data=data, event=event))
            start = pos = end
        if start:
            del self._buf[:start]
        self._scan_from = len(self._buf)
        if len(self._buf) > self.max_event_bytes:
            raise SSEError(f"an SSE event exceeded {self.max_event_bytes} bytes")
        return events


def encode_event(obj: Any) -> bytes:
    return b"data: " + msgspec.json.encode(obj) + b"\n\n"


def error_event(err: ProxyError) -> bytes:
    """The event an OpenAI client turns into an ``APIError`` mid-stream."""
    return encode_event(err.body())
