"""A plain ZMQ socket driven straight from the running event loop.

The base of both ends of the control channel (`transport.control`): a reader callback on
the socket's FD that receives with NOBLOCK until EAGAIN, the backlog retry timer, and a
close that leaves no reader or timer behind. (zmq.asyncio resolved a future per message
and woke a task for it, an extra loop iteration or two on every hop of every round trip;
the control round trip is on the critical path of every transfer.)

ZMQ's FD is edge-triggered: it signals when the socket's command mailbox gets something,
and any operation on the socket (a send included) may consume that signal. So the pump
drains until EAGAIN (which leaves the FD re-armed), re-schedules itself when it stops
early to let other callbacks run, and a send made outside the pump checks ZMQ_EVENTS and
schedules a pump when input is already waiting.
"""

from __future__ import annotations

import asyncio

import structlog
import zmq

from pdxfer.protocol import messages as m

log = structlog.get_logger("pdxfer.control")

HWM = 100_000
_BATCH = 256  # messages handled per reader callback before yielding to other callbacks
_RETRY_MIN_S = 0.001
_RETRY_MAX_S = 0.1


def configure(sock: zmq.Socket) -> None:
    sock.setsockopt(zmq.LINGER, 0)
    sock.setsockopt(zmq.MAXMSGSIZE, m.MAX_CONTROL_MESSAGE)  # oversized frames never reach us
    sock.setsockopt(zmq.SNDHWM, HWM)
    sock.setsockopt(zmq.RCVHWM, HWM)


class LoopSocket:
    """A plain ZMQ socket on the running loop: reader callback, backlog, clean close."""

    def __init__(self, ctx: zmq.Context, kind: int) -> None:
        # A plain socket whatever the context's class (a zmq.asyncio.Context works too),
        # made through the context so that its destroy() closes it.
        self._sock: zmq.Socket = ctx.socket(kind, socket_class=zmq.Socket)
        configure(self._sock)
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
