"""ZMQ control channel: ROUTER on the receiver, one DEALER per peer on the sender.

Both ends are message-framed and fully asynchronous: a sender may have thousands of
RESERVEs outstanding on one DEALER, replies are matched by correlation id in the
engine, and no lock is held across a round trip. ZMQ reconnects silently, so peer
death is detected above this layer (heartbeats, the TCP data connection's EOF).
"""

from __future__ import annotations

import asyncio
from typing import Callable

import structlog
import zmq
import zmq.asyncio

from pdxfer.errors import ProtocolError
from pdxfer.protocol import messages as m

log = structlog.get_logger("pdxfer.control")


def _configure(sock: zmq.Socket) -> None:
    sock.setsockopt(zmq.LINGER, 0)
    sock.setsockopt(zmq.MAXMSGSIZE, m.MAX_CONTROL_MESSAGE)  # oversized frames never reach us
    sock.setsockopt(zmq.SNDHWM, 100_000)
    sock.setsockopt(zmq.RCVHWM, 100_000)


def _log_send_failure(fut: asyncio.Future, what: str) -> None:
    if not fut.cancelled() and fut.exception() is not None:
        log.warning("control_send_failed", to=what, error=str(fut.exception()))


class ControlServer:
    """ROUTER socket; `handler(identity, message)` runs on the loop for every valid message."""

    def __init__(self, ctx: zmq.asyncio.Context, bind: str, handler: Callable[[bytes, m.Message], None]) -> None:
        self._sock = ctx.socket(zmq.ROUTER)
        _configure(self._sock)
        self._sock.setsockopt(zmq.ROUTER_MANDATORY, 1)  # unroutable replies raise, not vanish
        self._sock.bind(bind)
        self.address: str = self._sock.getsockopt_string(zmq.LAST_ENDPOINT)
        self._handler = handler
        self._task: asyncio.Task | None = None

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._read_loop(), name="pdxfer-control-server")

    async def _read_loop(self) -> None:
        while True:
            frames = await self._sock.recv_multipart()
            if len(frames) != 2:
                log.error("control_bad_envelope", frames=len(frames))
                continue
            identity, body = frames
            try:
                msg = m.decode(body)
            except ProtocolError as exc:
                log.error("control_malformed", peer=identity.hex(), error=str(exc))
                self.send(identity, m.Error(cid=0, error="protocol", detail=str(exc)))
                continue
            try:
                self._handler(identity, msg)
            except Exception:  # a bug in one handler must not kill the control loop
                log.exception("control_handler_failed", peer=identity.hex(), msg=type(msg).__name__)

    def send(self, identity: bytes, msg: m.Message) -> None:
        try:
            fut = self._sock.send_multipart([identity, m.encode(msg)], flags=zmq.NOBLOCK)
        except zmq.ZMQError as exc:
            log.warning("control_unroutable", peer=identity.hex(), error=str(exc))
            return
        fut.add_done_callback(lambda f: _log_send_failure(f, identity.hex()))

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        self._sock.close(linger=0)


class ControlClient:
    """DEALER to one receiver; every decoded message goes to `on_message`."""

    def __init__(self, ctx: zmq.asyncio.Context, address: str, identity: bytes,
                 on_message: Callable[[m.Message], None]) -> None:
        self._sock = ctx.socket(zmq.DEALER)
        _configure(self._sock)
        self._sock.setsockopt(zmq.IDENTITY, identity)
        self._sock.connect(address)
        self.address = address
        self._on_message = on_message
        self._task = asyncio.get_running_loop().create_task(self._read_loop(), name=f"pdxfer-control-{address}")

    async def _read_loop(self) -> None:
        while True:
            body = await self._sock.recv()
            try:
                msg = m.decode(body)
            except ProtocolError as exc:
                log.error("control_malformed", peer=self.address, error=str(exc))
                continue
            try:
                self._on_message(msg)
            except Exception:
                log.exception("control_handler_failed", peer=self.address, msg=type(msg).__name__)

    def send(self, msg: m.Message) -> None:
        fut = self._sock.send(m.encode(msg), flags=zmq.NOBLOCK)
        fut.add_done_callback(lambda f: _log_send_failure(f, self.address))

    async def close(self) -> None:
        self._task.cancel()
        await asyncio.gather(self._task, return_exceptions=True)
        self._sock.close(linger=0)
