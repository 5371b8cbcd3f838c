"""The prefill worker's side channel: a ZMQ ROUTER where decode workers ask for a push.

pdxfer moves bytes sender -> receiver (the receiver reserves first). In the sequential
flow only the decode knows where the KV must go and when its blocks are allocated, so it
sends one small request ({"op": "push", transfer id, its Receiver address, token range})
and the prefill worker answers once the transfer is opened (or with an error). "drop"
releases held blocks nobody will fetch. Every wait here is bounded.
"""

from __future__ import annotations

import concurrent.futures
import threading
import time
from typing import Any, Callable

import msgspec
import structlog
import zmq
from zmq.utils.monitor import recv_monitor_message

log = structlog.get_logger("pdxfer.vllm.side")

Handler = Callable[[dict[str, Any]], dict[str, Any]]


class SideChannelServer:
    """ROUTER socket on its own thread; each request is handled in a small pool."""

    def __init__(self, host: str, port: int, handler: Handler, workers: int = 4) -> None:
        self._ctx = zmq.Context()
        self._sock = self._ctx.socket(zmq.ROUTER)
        self._sock.setsockopt(zmq.LINGER, 0)
        self._sock.bind(f"tcp://{host}:{port}")
        self.address = f"{host}:{port}"
        self._handler = handler
        self._pool = concurrent.futures.ThreadPoolExecutor(workers, thread_name_prefix="pdxfer-side")
        self._replies: list[tuple[bytes, bytes]] = []
        self._lock = threading.Lock()
        self._wake_r = self._ctx.socket(zmq.PAIR)
        self._wake_r.bind(f"inproc://pdxfer-side-{id(self)}")
        self._wake_w = self._ctx.socket(zmq.PAIR)
        self._wake_w.connect(f"inproc://pdxfer-side-{id(self)}")
        self._wake_lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="pdxfer-side-channel", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        poller = zmq.Poller()
        poller.register(self._sock, zmq.POLLIN)
        poller.register(self._wake_r, zmq.POLLIN)
        while not self._stop.is_set():
            events = dict(poller.poll(200))
            if self._wake_r in events:
                while self._wake_r.poll(0):
                    self._wake_r.recv()
            with self._lock:
                replies, self._replies = self._replies, []
            for ident, body in replies:
                try:
                    self._sock.send_multipart([ident, b"", body])
                except zmq.ZMQError as exc:
                    log.warning("side_reply_failed", error=repr(exc))
            if self._sock in events:
                while self._sock.poll(0):
                    frames = self._sock.recv_multipart()
                    self._pool.submit(self._handle, frames[0], frames[-1])

    def _handle(self, ident: bytes, body: bytes) -> None:
        try:
            msg = msgspec.json.decode(body)
            if not isinstance(msg, dict):
                raise ValueError("request must be an object")
            reply = self._handler(msg)
        except Exception as exc:  # noqa: BLE001 - every failure becomes an error reply
            log.warning("side_request_failed", error=repr(exc))
            reply = {"ok": False, "error": f"{type(exc).__name__}: {exc}"}
        with self._lock:
            self._replies.append((ident, msgspec.json.encode(reply)))
        with self._wake_lock:
            try:
                self._wake_w.send(b"", zmq.NOBLOCK)
            except zmq.ZMQError:
                pass  # a wake-up is already queued (HWM) or the server is closing: the reply is queued either way

    def close(self) -> None:
        self._stop.set()
        self._thread.join(5)
        self._pool.shutdown(wait=False, cancel_futures=True)
        for s in (self._sock, self._wake_r, self._wake_w):
            s.close(0)
        self._ctx.term()


_WATCHED = (zmq.EVENT_HANDSHAKE_SUCCEEDED | zmq.EVENT_CONNECT_RETRIED | zmq.EVENT_DISCONNECTED)


def side_request(ctx: zmq.Context, host: str, port: int, msg: dict[str, Any], alive_timeout_s: float,
                 answer_timeout_s: float | None = None) -> dict[str, Any]:
    """One request/answer round trip, telling a dead prefill from a slow one.

    Liveness comes from ZMQ's I/O thread, which completes handshakes and answers
    heartbeats without Python's GIL: a prefill worker whose Python threads are starved
    for seconds (seen here under load) is slow, not dead, and gets `answer_timeout_s`
    (default: `alive_timeout_s`) to answer. Dead fails fast: a refused connection at once
    (`ConnectionRefusedError`), no handshake or an unanswered heartbeat within
    `alive_timeout_s` (a stopped process, an unreachable host: `TimeoutError` /
    `ConnectionError`), a dropped connection at once (`ConnectionError`)."""
    answer_timeout_s = alive_timeout_s if answer_timeout_s is None else answer_timeout_s
    where = f"prefill side channel {host}:{port}"
    sock = ctx.socket(zmq.REQ)
    sock.setsockopt(zmq.LINGER, 0)
    sock.setsockopt(zmq.HEARTBEAT_IVL, max(50, int(alive_timeout_s * 250)))  # 4 pings per alive timeout
    sock.setsockopt(zmq.HEARTBEAT_TIMEOUT, max(100, int(alive_timeout_s * 1000)))
    mon = sock.get_monitor_socket(_WATCHED)
    try:
        sock.connect(f"tcp://{host}:{port}")
        sock.send(msgspec.json.encode(msg))
        poller = zmq.Poller()
        poller.register(sock, zmq.POLLIN)
        poller.register(mon, zmq.POLLIN)
        start = time.monotonic()
        connected = False
        while True:
            until = start + (answer_timeout_s if connected else min(alive_timeout_s, answer_timeout_s))
            left = until - time.monotonic()
            if left <= 0:
                if connected:
                    raise TimeoutError(f"{where} did not answer within {answer_timeout_s}s")
                raise TimeoutError(f"{where} did not complete a handshake within {alive_timeout_s}s "
                                   "(process stopped or host unreachable)")
            ready = dict(poller.poll(max(1, int(left * 1000))))
            if sock in ready:
                reply = msgspec.json.decode(sock.recv())
                if not isinstance(reply, dict):
                    raise ValueError(f"{where} answered a non-object")
                return reply
            if mon in ready:
                event = recv_monitor_message(mon)["event"]
                if event == zmq.EVENT_HANDSHAKE_SUCCEEDED:
                    connected = True
                elif event == zmq.EVENT_CONNECT_RETRIED:
                    raise ConnectionRefusedError(f"{where} refused the connection (the prefill worker is gone)")
                elif event == zmq.EVENT_DISCONNECTED and connected:
                    raise ConnectionError(f"{where} dropped the connection before answering (the prefill "
                                          f"worker died, or left heartbeats unanswered for {alive_timeout_s}s)")
    finally:
        sock.disable_monitor()
        mon.close(0)
        sock.close(0)
