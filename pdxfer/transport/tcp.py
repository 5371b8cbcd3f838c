"""TCP data path.

Receive: an `asyncio.BufferedProtocol` whose `get_buffer()` is the frame parser's
destination, i.e. a slice of the reserved receive buffer (at most `recv_piece` bytes at
a time), so the kernel copies each chunk straight into place (measured here: uvloop + BufferedProtocol ≈ a raw
`recv_into` loop; stream readers reach ~0.4× of it). Its receive low-water mark follows
the parser (`FrameParser.want`), so the loop is woken once per whole piece; see
`frames.RECV_PIECE_BYTES` for what that is worth.

Send: `loop.sock_sendall` on a non-blocking socket with the caller's memoryview; the
payload is never copied into a transport buffer. A pending 1-byte `sock_recv` turns the
peer's EOF/reset into an event, so a dead receiver is noticed without waiting for the
next write (the receiver never writes on this socket).
"""

from __future__ import annotations

import asyncio
import socket
from typing import Protocol

import structlog

from pdxfer.errors import PdxferError, PeerLost, ProtocolError, TransferTimeout
from pdxfer.protocol import frames as f

log = structlog.get_logger("pdxfer.tcp")

LOWAT_MIN_BYTES = 64 << 10  # a loopback/GSO segment's worth


class DataSink(Protocol):
    def resolve(self, conn: "DataServerProtocol", header: f.FrameHeader) -> memoryview | None: ...
    def on_frame(self, conn: "DataServerProtocol", event: f.FrameEvent) -> None: ...
    def on_lost(self, conn: "DataServerProtocol", error: Exception | None) -> None: ...


class DataServerProtocol(asyncio.BufferedProtocol):
    """One inbound data connection; frames and their payloads go to `sink`."""

    def __init__(self, sink: DataSink, recv_piece: int = f.RECV_PIECE_BYTES, *, hash_pieces: bool = True) -> None:
        self.sink = sink
        self.conn_token: int | None = None
        self.peer = "?"
        self.transport: asyncio.Transport | None = None
        self._parser = f.FrameParser(lambda h: sink.resolve(self, h), recv_piece, hash_pieces=hash_pieces)
        self._error: Exception | None = None
        self._sock: socket.socket | None = None  # set while the low-water mark follows the parser
        self._lowat = 1  # the kernel's default
        self.lowat_changes = 0

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        sock = transport.get_extra_info("socket")
        if sock is not None:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            self._sock = sock
            self._follow_want()
        self.peer = str(transport.get_extra_info("peername"))

    def _follow_want(self) -> None:
        """Wake the loop only once the piece the parser waits for is all there: at most
        one setsockopt per change (twice per large chunk: its payload, then the next
        header). Below LOWAT_MIN_BYTES the mark stays at 1: one segment brings that much
        at once anyway, so small frames cost no setsockopt at all."""
        want = self._parser.want
        mark = want if want >= LOWAT_MIN_BYTES else 1
        if mark == self._lowat or self._sock is None:
            return
        try:
            self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVLOWAT, mark)
            self._lowat = mark
            self.lowat_changes += 1
        except OSError as exc:  # a platform without it: receive as before, woken per segment
            log.info("rcvlowat_unavailable", peer=self.peer, error=str(exc))
            self._sock = None

    @property
    def rcvlowat(self) -> int:
        """The receive low-water mark this connection last set (1: the kernel's default)."""
        return self._lowat

    def get_buffer(self, sizehint: int) -> memoryview:
        return self._parser.get_buffer()

    def buffer_updated(self, nbytes: int) -> None:
        try:
            for event in self._parser.buffer_updated(nbytes):
                if isinstance(event, f.ConnectionHello):
                    self.conn_token = event.conn_token
                self.sink.on_frame(self, event)
        except PdxferError as exc:
            self.drop(exc)
            return
        self._follow_want()

    def drop(self, exc: Exception) -> None:
        """Close this connection because of a protocol violation; others keep serving."""
        if self._error is None:
            self._error = exc
            log.error("data_connection_dropped", peer=self.peer, conn_token=self.conn_token, error=str(exc))
        if self.transport is not None:
            self.transport.abort()

    def eof_received(self) -> bool:
        if self._parser.mid_frame and self._error is None:
            self._error = ProtocolError("connection closed in the middle of a frame (truncated)")
            log.error("data_truncated", peer=self.peer, conn_token=self.conn_token)
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        self.sink.on_lost(self, self._error or exc)


class DataClient:
    """The sender's end of one data connection to one receiver."""

    def __init__(self, sock: socket.socket, peer: str) -> None:
        self._sock = sock
        self.peer = peer
        loop = asyncio.get_running_loop()
        self.closed: asyncio.Future[Exception] = loop.create_future()
        self._watch = loop.create_task(self._watch_eof(), name=f"pdxfer-eof-{peer}")

    @classmethod
    async def connect(cls, host: str, port: int, conn_token: int, *, timeout: float, peer: str) -> "DataClient":
        loop = asyncio.get_running_loop()
        sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
        sock.setblocking(False)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        try:
            await asyncio.wait_for(loop.sock_connect(sock, (host, port)), timeout)
            await asyncio.wait_for(loop.sock_sendall(sock, f.pack_header(f.KIND_HELLO, 0, conn_token, 0, 0, 0)), timeout)
        except asyncio.TimeoutError:
            sock.close()
            raise TransferTimeout("data connection not established in time", peer=peer, waiting_for="tcp_connect") from None
        except OSError as exc:
            sock.close()
            raise PeerLost(f"data connection failed: {exc}", peer=peer, waiting_for="tcp_connect") from None
        return cls(sock, peer)

    async def _watch_eof(self) -> None:
        loop = asyncio.get_running_loop()
        try:
            data = await loop.sock_recv(self._sock, 1)
            err: Exception = PeerLost("receiver closed the data connection" if not data else "receiver wrote on the data connection", peer=self.peer)
        except OSError as exc:
            err = PeerLost(f"data connection broke: {exc}", peer=self.peer)
        if not self.closed.done():
            self.closed.set_result(err)

    async def send_chunk(self, slot: int, index: int, offset: int, payload: memoryview, checksum: int) -> None:
        """Header and payload in one scatter-gather `sendmsg` when the socket has room
        (one syscall, no 40-byte segment of its own); the rest via `sock_sendall`."""
        loop = asyncio.get_running_loop()
        header = f.pack_header(f.KIND_DATA, index, slot, offset, payload.nbytes, checksum)
        try:
            try:
                sent = self._sock.sendmsg([header, payload])
            except (BlockingIOError, InterruptedError):
                sent = 0
            if sent < len(header):
                await loop.sock_sendall(self._sock, header[sent:])
                sent = len(header)
            if sent - len(header) < payload.nbytes:
                await loop.sock_sendall(self._sock, payload[sent - len(header):])
        except OSError as exc:
            raise PeerLost(f"data send failed: {exc}", peer=self.peer, waiting_for="data_send") from None

    async def close(self) -> None:
        self._watch.cancel()
        await asyncio.gather(self._watch, return_exceptions=True)
        self._sock.close()
