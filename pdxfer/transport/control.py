"""ZMQ control channel: ROUTER on the receiver, one DEALER per peer on the sender.

Both ends are message-framed and fully asynchronous: a sender may have thousands of
RESERVEs outstanding on one DEALER, replies are matched by correlation id in the
engine, and no lock is held across a round trip. ZMQ reconnects silently, so peer
death is detected above this layer (heartbeats, the TCP data connection's EOF).

The sockets are plain (blocking-API) pyzmq sockets driven straight from the event loop:
`loop.add_reader(sock.FD)` calls `_pump`, which receives with NOBLOCK until EAGAIN and
hands each message to the handler in that same callback. (zmq.asyncio resolved a future
per message and woke a task for it, an extra loop iteration or two on every hop of every
round trip; the control round trip is on the critical path of every transfer.)

ZMQ's FD is edge-triggered: it signals when the socket's command mailbox gets something,
and any operation on the socket (a send included) may consume that signal. So the pump
drains until EAGAIN (which leaves the FD re-armed), re-schedules itself when it stops
early to let other callbacks run, and a send made outside the pump checks ZMQ_EVENTS and
schedules a pump when input is already waiting.

Sends never block: NOBLOCK when the high-water mark allows, a bounded backlog otherwise
(per peer on the ROUTER), retried on the next pump and by a short backoff timer. A
backlog entry older than `_BACKLOG_TIMEOUT_S` or beyond `_BACKLOG_MAX` is dropped with a
warning: that peer has stopped reading for far longer than any lease, and the layers
above end its transfers on their own deadlines.
"""

from __future__ import annotations

import asyncio
from collections import deque
from typing import Callable

import structlog
import zmq
from zmq.utils.monitor import parse_monitor_message

from pdxfer.errors import ProtocolError
from pdxfer.protocol import messages as m

log = structlog.get_logger("pdxfer.control")

_HWM = 100_000
_BATCH = 256  # messages handled per reader callback before yielding to other callbacks
_BACKLOG_MAX = _HWM  # per peer, on top of ZMQ's own queue of _HWM
_BACKLOG_TIMEOUT_S = 30.0
_RETRY_MIN_S = 0.001
_RETRY_MAX_S = 0.1


def _configure(sock: zmq.Socket) -> None:
    sock.setsockopt(zmq.LINGER, 0)
    sock.setsockopt(zmq.MAXMSGSIZE, m.MAX_CONTROL_MESSAGE)  # oversized frames never reach us
    sock.setsockopt(zmq.SNDHWM, _HWM)
    sock.setsockopt(zmq.RCVHWM, _HWM)


class _Endpoint:
    """A plain ZMQ socket on the running loop: reader callback, backlog, clean close."""

    def __init__(self, ctx: zmq.Context, kind: int) -> None:
        # A plain socket whatever the context's class (a zmq.asyncio.Context works too),
        # made through the context so that its destroy() closes it.
        self._sock: zmq.Socket = ctx.socket(kind, socket_class=zmq.Socket)
        _configure(self._sock)
        try:
            self._loop: asyncio.AbstractEventLoop | None = asyncio.get_running_loop()
        except RuntimeError:
            self._loop = None  # ControlServer made off the loop: start() attaches it
        self._fd: int | None = None
        self._closed = False
        self._in_pump = False
        self._pump_pending = False
        self._retry: asyncio.TimerHandle | None = None
        self._retry_delay = _RETRY_MIN_S

    # ------------------------------------------------------------------ loop wiring
    def _attach(self) -> None:
        loop = asyncio.get_running_loop()
        self._loop = loop
        self._fd = self._sock.getsockopt(zmq.FD)
        loop.add_reader(self._fd, self._pump)
        self._kick()  # anything that arrived before the reader existed

    def _kick(self) -> None:
        """Run the pump soon: input is waiting that the FD will not signal again."""
        if not self._pump_pending and not self._closed and self._loop is not None:
            self._pump_pending = True
            self._loop.call_soon(self._pump)

    def _pump(self) -> int:
        """Receive and dispatch what is waiting (up to a batch); the count delivered."""
        self._pump_pending = False
        if self._closed or self._in_pump:
            return 0
        self._in_pump = True
        flushed = False
        n = 0
        try:
            sock = self._sock
            for _ in range(_BATCH):
                try:
                    frames = sock.recv_multipart(zmq.NOBLOCK)
                except zmq.Again:
                    break
                except zmq.ZMQError as exc:  # ETERM and the like: this socket is done for
                    if not self._closed:
                        log.warning("control_recv_failed", peer=self._peer_name(), error=str(exc))
                        self._shutdown()
                    return n
                n += 1
                self._dispatch(frames)
                if self._closed:  # a handler closed us
                    return n
            else:
                self._kick()  # batch used up: the rest on the next loop iteration
            flushed = self._has_backlog()
            if flushed:
                self._flush()
        finally:
            self._in_pump = False
        if flushed:
            self._after_send()
        return n

    def drain(self) -> int:
        """Deliver what already waits in the socket, now; the count delivered.

        For a deadline about to declare the peer silent: after this process itself stalled
        (GIL, CPU starvation), uvloop runs due timers before it polls for I/O, so replies
        that arrived during the stall are still unread when the deadline's callback runs."""
        return self._pump()

    def _after_send(self) -> None:
        """A send (or ZMQ_EVENTS itself) processes ZMQ's pending commands and so may consume
        the FD's signal for input that is now waiting, or for room that opened for the
        backlog: look at the socket's state now instead of waiting for a signal that will
        not come."""
        if self._in_pump or self._closed:
            return  # the pump drains to EAGAIN and looks again when it ends
        try:
            events = self._sock.getsockopt(zmq.EVENTS)
        except zmq.ZMQError:
            return
        if events & zmq.POLLIN or (events & zmq.POLLOUT and self._flush_on_pollout()):
            self._kick()

    def _flush_on_pollout(self) -> bool:
        """Whether POLLOUT means the backlog can move now (a DEALER's one pipe has room).
        A ROUTER always reports POLLOUT whatever each peer's pipe holds: its backlog
        moves on pumps and on the retry timer instead."""
        return False

    def _schedule_retry(self) -> None:
        if self._retry is None and not self._closed and self._loop is not None:
            self._retry = self._loop.call_later(self._retry_delay, self._on_retry)
            self._retry_delay = min(self._retry_delay * 2, _RETRY_MAX_S)

    def _on_retry(self) -> None:
        self._retry = None
        if self._closed:
            return
        if self._flush():
            self._retry_delay = _RETRY_MIN_S  # it moves: keep trying at the short interval
        if self._has_backlog():
            self._schedule_retry()
        else:
            self._retry_delay = _RETRY_MIN_S
        self._after_send()

    # ------------------------------------------------------------------ subclass hooks
    def _dispatch(self, frames: list[bytes]) -> None:
        raise NotImplementedError

    def _has_backlog(self) -> bool:
        raise NotImplementedError

    def _flush(self) -> bool:
        """Send what the backlog holds while the high-water mark allows; True if any went."""
        raise NotImplementedError

    def _drop_backlog(self) -> int:
        raise NotImplementedError

    def _peer_name(self) -> str:
        return "control"

    # ------------------------------------------------------------------ close
    def _shutdown(self) -> None:
        if self._closed:
            return
        self._closed = True
        if self._fd is not None and self._loop is not None and not self._loop.is_closed():
            self._loop.remove_reader(self._fd)  # before close(): the fd number may be reused
        self._fd = None
        if self._retry is not None:
            self._retry.cancel()
            self._retry = None
        dropped = self._drop_backlog()
        if dropped:
            log.debug("control_backlog_dropped", peer=self._peer_name(), messages=dropped)
        self._sock.close(linger=0)

    @property
    def closed(self) -> bool:
        return self._closed


class ControlServer(_Endpoint):
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
        self._backlog: dict[bytes, deque[tuple[float, bytes]]] = {}

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
            self._enqueue(identity, queued, body)
            return
        if self._send_now(identity, body) is False:
            self._enqueue(identity, self._backlog.setdefault(identity, deque()), body)
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

    def _enqueue(self, identity: bytes, q: deque[tuple[float, bytes]], body: bytes) -> None:
        assert self._loop is not None
        if len(q) >= _BACKLOG_MAX:
            log.warning("control_backlog_full", peer=identity.hex(), queued=len(q))
            return
        q.append((self._loop.time() + _BACKLOG_TIMEOUT_S, body))
        self._schedule_retry()

    def _has_backlog(self) -> bool:
        return bool(self._backlog)

    def _flush(self) -> bool:
        assert self._loop is not None
        now = self._loop.time()
        moved = False
        for identity in list(self._backlog):
            q = self._backlog[identity]
            while q:
                expires, body = q[0]
                if expires < now:
                    log.warning("control_backlog_expired", peer=identity.hex(), dropped=len(q))
                    q.clear()
                    break
                sent = self._send_now(identity, body)
                if sent is False:
                    break
                q.popleft()
                moved = True
                if sent is None:  # peer gone: the rest cannot be routed either
                    q.clear()
            if not q:
                del self._backlog[identity]
        return moved

    def _drop_backlog(self) -> int:
        n = sum(len(q) for q in self._backlog.values())
        self._backlog.clear()
        return n

    async def close(self) -> None:
        self._shutdown()


class ControlClient(_Endpoint):
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
        self._backlog: deque[tuple[float, bytes]] = deque()
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
        if len(self._backlog) >= _BACKLOG_MAX:
            log.warning("control_backlog_full", peer=self.address, queued=len(self._backlog))
            return
        self._backlog.append((self._loop.time() + _BACKLOG_TIMEOUT_S, body))
        self._schedule_retry()
        self._after_send()

    def _has_backlog(self) -> bool:
        return bool(self._backlog)

    def _flush(self) -> bool:
        assert self._loop is not None
        now = self._loop.time()
        q = self._backlog
        moved = False
        while q:
            expires, body = q[0]
            if expires < now:
                log.warning("control_backlog_expired", peer=self.address, dropped=len(q))
                q.clear()
                break
            try:
                self._sock.send(body, zmq.NOBLOCK)
            except zmq.Again:
                break
            except zmq.ZMQError as exc:
                log.warning("control_send_failed", to=self.address, error=str(exc), dropped=len(q))
                q.clear()
                break
            q.popleft()
            moved = True
        return moved

    def _flush_on_pollout(self) -> bool:
        return bool(self._backlog)

    def _drop_backlog(self) -> int:
        n = len(self._backlog)
        self._backlog.clear()
        return n

    def _shutdown(self) -> None:
        self._stop_monitor()
        super()._shutdown()

    async def close(self) -> None:
        self._shutdown()
