"""Shared by the control-channel tests: a fresh loop per test (asyncio's and uvloop's,
each tracking its readers so a leaked one fails the test), an echo server, a raw DEALER
that speaks garbage or stops reading, and small helpers."""

from __future__ import annotations

import asyncio
from typing import Awaitable, Callable

import pytest
import structlog
import uvloop
import zmq
import zmq.asyncio

from pdxfer.protocol import messages as m
from pdxfer.transport.control import ControlServer

pytestmark = pytest.mark.timeout(60)

class _TrackReaders:
    """Loop mixin: which fds have a reader that was added through the public API."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.readers: set[int] = set()

    def add_reader(self, fd, callback, *args):
        self.readers.add(fd)
        return super().add_reader(fd, callback, *args)

    def remove_reader(self, fd):
        self.readers.discard(fd)
        return super().remove_reader(fd)


class _AsyncioLoop(_TrackReaders, asyncio.SelectorEventLoop):
    pass


class _UvLoop(_TrackReaders, uvloop.Loop):
    pass


LOOPS = {"asyncio": _AsyncioLoop, "uvloop": _UvLoop}
CONTEXTS = {"zmq": zmq.Context, "zmq.asyncio": zmq.asyncio.Context}


@pytest.fixture(params=sorted(LOOPS))
def run(request):
    """Run `fn(ctx)` on a fresh loop of the parametrized kind; returns (result, logs, loop
    errors). Fails if a reader that the test added is still registered at the end."""

    def runner(fn: Callable[[zmq.Context], Awaitable], ctx_kind: str = "zmq", timeout: float = 20.0):
        loop_errors: list[dict] = []
        ctx = CONTEXTS[ctx_kind]()

        async def main():
            asyncio.get_running_loop().set_exception_handler(lambda _l, c: loop_errors.append(c))
            return await asyncio.wait_for(fn(ctx), timeout)

        try:
            with structlog.testing.capture_logs() as logs, asyncio.Runner(loop_factory=LOOPS[request.param]) as r:
                result = r.run(main())
                leaked = set(r.get_loop().readers)
        finally:
            ctx.destroy(linger=0)
        assert not leaked, f"readers left on the loop: {leaked}"
        return result, logs, loop_errors

    return runner


def _errors(logs: list[dict]) -> list[dict]:
    return [e for e in logs if e["log_level"] in ("error", "critical", "exception")]


class Inbox:
    """Messages a client received, with an awaitable 'at least n' and a deadline."""

    def __init__(self) -> None:
        self.msgs: list[m.Message] = []
        self._changed = asyncio.Event()

    def __call__(self, msg: m.Message) -> None:
        self.msgs.append(msg)
        self._changed.set()

    async def wait_for(self, n: int, timeout: float = 10.0) -> list[m.Message]:
        deadline = asyncio.get_running_loop().time() + timeout
        while len(self.msgs) < n:
            left = deadline - asyncio.get_running_loop().time()
            if left <= 0:
                raise TimeoutError(f"got {len(self.msgs)} of {n} messages")
            self._changed.clear()
            try:
                await asyncio.wait_for(self._changed.wait(), left)
            except asyncio.TimeoutError:
                pass
        return self.msgs


def echo_server(ctx: zmq.Context, calls: list | None = None, bind: str = "tcp://127.0.0.1:0") -> ControlServer:
    """Answers HEARTBEAT with HEARTBEAT_ACK and RESERVE with GRANT, echoing the cid."""
    server: ControlServer

    def handler(identity: bytes, msg: m.Message) -> None:
        if calls is not None:
            calls.append((identity, msg))
        if isinstance(msg, m.Heartbeat):
            server.send(identity, m.HeartbeatAck(cid=msg.cid))
        elif isinstance(msg, m.Reserve):
            server.send(identity, m.Grant(cid=msg.cid, tid=msg.tid, slot=msg.cid, lease_ms=1000))

    server = ControlServer(ctx, bind, handler)
    server.start()
    return server


def _reserve(cid: int) -> m.Reserve:
    return m.Reserve(cid=cid, tid=f"t{cid}", total_bytes=64, chunk_sizes=[64], deadline_ms=1000)


def _reader_registered(loop: asyncio.AbstractEventLoop, fd: int) -> bool:
    return fd in loop.readers  # type: ignore[attr-defined]


class RawDealer:
    """A blocking pyzmq DEALER driven from a worker thread, to send what a ControlClient never would."""

    def __init__(self, address: str, identity: bytes) -> None:
        self.ctx = zmq.Context()
        self.sock = self.ctx.socket(zmq.DEALER)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.setsockopt(zmq.IDENTITY, identity)
        self.sock.connect(address)

    def send_multipart(self, frames: list[bytes]) -> None:
        self.sock.send_multipart(frames)

    def recv(self, timeout: float = 5.0) -> m.Message:
        if not self.sock.poll(int(timeout * 1000)):
            raise TimeoutError("no reply")
        return m.decode(self.sock.recv())

    def close(self) -> None:
        self.sock.close(0)
        self.ctx.term()
