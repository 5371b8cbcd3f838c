"""ZMQ control channel: ROUTER on the receiver, one DEALER per peer on the sender.

Both ends are message-framed and fully asynchronous: a sender may have thousands of
RESERVEs outstanding on one DEALER, replies are matched by correlation id in the
engine, and no lock is held across a round trip. ZMQ reconnects silently, so peer
death is detected above this layer (heartbeats, the TCP data connection's EOF).

The sockets are plain (blocking-API) pyzmq sockets driven straight from the event loop
(`transport.loopsocket`): each message reaches the handler in the reader callback that
received it.

Sends never block: NOBLOCK when the high-water mark allows, a bounded backlog otherwise
(per peer on the ROUTER), retried on the next pump and by a short backoff timer. A
backlog entry older than `_BACKLOG_TIMEOUT_S` or beyond `_BACKLOG_MAX` is dropped with a
warning: that peer has stopped reading for far longer than any lease, and the layers
above end its transfers on their own deadlines.
"""

from __future__ import annotations

from typing import Callable

import structlog
import zmq
from zmq.utils.monitor import parse_monitor_message

from pdxfer.errors import ProtocolError
from pdxfer.protocol import messages as m
from pdxfer.transport import loopsocket
from pdxfer.transport.backlog import Backlog
from pdxfer.transport.loopsocket import LoopSocket

log = structlog.get_logger("pdxfer.control")

_BACKLOG_MAX = loopsocket.HWM  # per peer, on top of ZMQ's own queue of HWM messages
_BACKLOG_TIMEOUT_S = 30.0


class ControlServer(LoopSocket):
    """ROUTER socket; `handler(identity, message)` runs on the loop for every valid message."""

    def __init__(self, ctx: zmq.Context, bind: str, handler: Callable[[bytes, m.Message], None]) -> None:
        super().__init__(ctx, zmq.ROUTER)
        try:
            self._sock.setsockopt(zmq.ROUTER_MANDATORY, 1)  # unroutable replies raise, not vanish
            self._sock.bind(bind)
        except zmq.ZMQError:
            self._sock.close(linger=0)  # an open socket would block the context's term() forever
            raise
        self.address: str = self._sock.getsockopt_string(zmq.LAST_ENDPOINT)
        self._handler = handler
        self._backlog: dict[bytes, Backlog] = {}

    def start(self) -> None:
        """Start serving on the running loop."""
        if self._fd is None and not self._closed:
            self._attach()

    def _dispatch(self, frames: list[bytes]) -> None:
        if len(frames) != 2:
            log.error("control_bad_envelope", frames=len(frames))
            return
        identity, body = frames
        try:
            msg = m.decode(body)
        except ProtocolError as exc:
            log.error("control_malformed", peer=identity.hex(), error=str(exc))
            self.send(identity, m.Error(cid=0, error="protocol", detail=str(exc)))
            return
        try:
            self._handler(identity, msg)
        except Exception:  # a bug in one handler must not kill the control loop
            log.exception("control_handler_failed", peer=identity.hex(), msg=type(msg).__name__)

    def send(self, identity: bytes, msg: m.Message) -> None:
        if self._closed:
            return
        body = m.encode(msg)
        queued = self._backlog.get(identity)
        if queued is not None:  # keep this peer's order: behind what is already waiting
            self._enqueue(queued, body)
            return
        if self._send_now(identity, body) is False:
            queued = self._backlog[identity] = Backlog(identity.hex(), _BACKLOG_MAX)
            self._enqueue(queued, body)
        self._after_send()

    def _send_now(self, identity: bytes, body: bytes) -> bool | None:
        """True: sent. False: high-water mark, try later. None: unroutable, dropped."""
        try:
            self._sock.send_multipart([identity, body], zmq.NOBLOCK)
            return True
        except zmq.Again:
            return False
        except zmq.ZMQError as exc:
            log.warning("control_unroutable", peer=identity.hex(), error=str(exc))
            return None

    def _enqueue(self, q: Backlog, body: bytes) -> None:
        assert self._loop is not None
        if q.push(body, self._loop.time() + _BACKLOG_TIMEOUT_S):
            self._schedule_retry()

    def _has_backlog(self) -> bool:
        return bool(self._backlog)

    def _flush(self) -> bool:
        assert self._loop is not None
        now = self._loop.time()
        moved = False
        for identity, q in list(self._backlog.items()):
            moved |= q.drain(lambda body, identity=identity: self._send_now(identity, body), now)
            if not q:
                del self._backlog[identity]
        return moved

    def _drop_backlog(self) -> int:
        n = sum(len(q) for q in self._backlog.values())
        self._backlog.clear()
        return n

    async def close(self) -> None:
        self._shutdown()


class ControlClient(LoopSocket):
    """DEALER to one receiver; every decoded message goes to `on_message`.

    `on_refused()`, if given, is called once when the first connection attempt is refused
    before any handshake succeeded: nothing listens at `address`, so waiting out a
    handshake timeout would only delay the inevitable. (ZMQ itself would keep retrying
    silently.) Learned from a ZMQ socket monitor, watched only until the first handshake."""

    def __init__(self, ctx: zmq.Context, address: str, identity: bytes,
                 on_message: Callable[[m.Message], None], on_refused: Callable[[], None] | None = None) -> None:
        super().__init__(ctx, zmq.DEALER)
        self._mon: zmq.Socket | None = None
        self._mon_fd: int | None = None
        self._on_refused = on_refused
        try:
            self._sock.setsockopt(zmq.IDENTITY, identity)
            if on_refused is not None:
                where = f"inproc://pdxfer-control-monitor-{id(self)}"
                self._sock.monitor(where, zmq.EVENT_CONNECT_RETRIED | zmq.EVENT_HANDSHAKE_SUCCEEDED)
                self._mon = ctx.socket(zmq.PAIR, socket_class=zmq.Socket)
                self._mon.setsockopt(zmq.LINGER, 0)
                self._mon.connect(where)
            self._sock.connect(address)
        except zmq.ZMQError:
            self._stop_monitor()
            self._sock.close(linger=0)
            raise
        self.address = address
        self._on_message = on_message
        self._backlog = Backlog(address, _BACKLOG_MAX)
        self._attach()
        if self._mon is not None:
            assert self._loop is not None
            self._mon_fd = self._mon.getsockopt(zmq.FD)
            self._loop.add_reader(self._mon_fd, self._pump_monitor)
            self._loop.call_soon(self._pump_monitor)  # events from before the reader existed

    def _pump_monitor(self) -> None:
        """Drain monitor events (to EAGAIN: the FD is edge-triggered like any ZMQ FD)."""
        mon = self._mon
        while mon is not None and not self._closed:
            try:
                frames = mon.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                return
            except zmq.ZMQError:
                self._stop_monitor()
                return
            try:
                event = parse_monitor_message(frames)["event"]
            except Exception:  # noqa: BLE001 - a malformed monitor frame is not worth a crash
                continue
            if event == zmq.EVENT_HANDSHAKE_SUCCEEDED:
                self._stop_monitor()  # connected: liveness is the layer above's job from here
            elif event == zmq.EVENT_CONNECT_RETRIED:
                callback, self._on_refused = self._on_refused, None
                self._stop_monitor()
                if callback is not None:
                    try:
                        callback()
                    except Exception:
                        log.exception("control_on_refused_failed", peer=self.address)
            mon = self._mon

    def _stop_monitor(self) -> None:
        if self._mon is None:
            return
        if self._mon_fd is not None and self._loop is not None and not self._loop.is_closed():
            self._loop.remove_reader(self._mon_fd)
        self._mon_fd = None
        try:
            self._sock.disable_monitor()
        except zmq.ZMQError:
            pass  # the socket is closing anyway
        self._mon.close(linger=0)
        self._mon = None

    def _peer_name(self) -> str:
        return self.address

    def _dispatch(self, frames: list[bytes]) -> None:
        if len(frames) != 1:
            log.error("control_bad_envelope", peer=self.address, frames=len(frames))
            return
        try:
            msg = m.decode(frames[0])
        except ProtocolError as exc:
            log.error("control_malformed", peer=self.address, error=str(exc))
            return
        try:
            self._on_message(msg)
        except Exception:
            log.exception("control_handler_failed", peer=self.address, msg=type(msg).__name__)

    def send(self, msg: m.Message) -> None:
        if self._closed:
            return
        body = m.encode(msg)
        if not self._backlog:
            try:
                self._sock.send(body, zmq.NOBLOCK)
            except zmq.Again:
                pass  # high-water mark: falls through to the backlog below
            except zmq.ZMQError as exc:
                log.warning("control_send_failed", to=self.address, error=str(exc))
                return
            else:
                self._after_send()
                return
        assert self._loop is not None
        if not self._backlog.push(body, self._loop.time() + _BACKLOG_TIMEOUT_S):
            return
        self._schedule_retry()
        self._after_send()

    def _has_backlog(self) -> bool:
        return bool(self._backlog)

    def _flush(self) -> bool:
        assert self._loop is not None
        return self._backlog.drain(self._send_queued, self._loop.time())

    def _send_queued(self, body: bytes) -> bool | None:
        try:
            self._sock.send(body, zmq.NOBLOCK)
            return True
        except zmq.Again:
            return False
        except zmq.ZMQError as exc:
            log.warning("control_send_failed", to=self.address, error=str(exc), dropped=len(self._backlog))
            return None

    def _flush_on_pollout(self) -> bool:
        return bool(self._backlog)

    def _drop_backlog(self) -> int:
        return self._backlog.clear()

    def _shutdown(self) -> None:
        self._stop_monitor()
        super()._shutdown()

    async def close(self) -> None:
        self._shutdown()
