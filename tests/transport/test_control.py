"""The ZMQ control channel (pdxfer.transport.control) on its own, on asyncio's and uvloop's
loops: round trips, garbage, floods past the high-water mark, close() at any moment, and
peers that vanish. Every wait has a deadline; every test checks that nothing was logged
at error level or above and that the loop saw no unhandled exception."""

from __future__ import annotations

import asyncio
import socket
import threading
import time
from typing import Awaitable, Callable

import pytest
import structlog
import uvloop
import zmq
import zmq.asyncio

from pdxfer.protocol import messages as m
from pdxfer.transport import control, loopsocket
from pdxfer.transport.control import ControlClient, ControlServer

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


# ---------------------------------------------------------------------------- round trips
@pytest.mark.parametrize("ctx_kind", sorted(CONTEXTS))
def test_round_trip_matches_cids(run, ctx_kind):
    async def body(ctx):
        server = echo_server(ctx)
        inbox = Inbox()
        client = ControlClient(ctx, server.address, b"peer-1", inbox)
        # strictly one at a time: every reply must arrive without a later message to nudge it
        for cid in range(1, 301):
            client.send(_reserve(cid) if cid % 2 else m.Heartbeat(cid=cid))
            await inbox.wait_for(cid, timeout=5)
        await client.close()
        await server.close()
        return inbox.msgs

    msgs, logs, loop_errors = run(body, ctx_kind)
    assert [x.cid for x in msgs] == list(range(1, 301))
    assert all(isinstance(x, m.Grant if x.cid % 2 else m.HeartbeatAck) for x in msgs)
    assert all(x.tid == f"t{x.cid}" for x in msgs if isinstance(x, m.Grant))
    assert not _errors(logs) and not loop_errors


def test_round_trip_with_replies_sent_from_outside_the_reader(run):
    """Replies sent from a timer callback (like GRANTs after an admission tick, or DONE
    after the last data frame): the send may eat the FD's edge for waiting input."""

    async def body(ctx):
        loop = asyncio.get_running_loop()
        server: ControlServer

        def handler(identity, msg):
            loop.call_soon(server.send, identity, m.HeartbeatAck(cid=msg.cid))

        server = ControlServer(ctx, "tcp://127.0.0.1:0", handler)
        server.start()
        inboxes = [Inbox() for _ in range(3)]
        clients = [ControlClient(ctx, server.address, f"p{i}".encode(), ib) for i, ib in enumerate(inboxes)]
        for cid in range(1, 201):
            for c in clients:  # three peers interleaved: replies to one race requests of another
                c.send(m.Heartbeat(cid=cid))
            for ib in inboxes:
                await ib.wait_for(cid, timeout=5)
        for c in clients:
            await c.close()
        await server.close()
        return [[x.cid for x in ib.msgs] for ib in inboxes]

    got, logs, loop_errors = run(body)
    assert got == [list(range(1, 201))] * 3
    assert not _errors(logs) and not loop_errors


class EchoThread:
    """A ROUTER echo on its own thread, so that it answers while the test blocks its loop."""

    def __init__(self) -> None:
        self.ctx = zmq.Context()
        self.sock = self.ctx.socket(zmq.ROUTER)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.address = f"tcp://127.0.0.1:{self.sock.bind_to_random_port('tcp://127.0.0.1')}"
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            if self.sock.poll(20):
                ident, body = self.sock.recv_multipart()
                msg = m.decode(body)
                self.sock.send_multipart([ident, m.encode(m.HeartbeatAck(cid=msg.cid))])

    def close(self) -> None:
        self._stop.set()
        self._thread.join(5)
        self.sock.close(0)
        self.ctx.term()


def test_send_that_eats_the_fd_signal_does_not_strand_a_reply(run):
    """A reply lands while the loop is busy; the next send processes ZMQ's commands and so
    consumes the FD's edge for that reply. The client must notice the waiting input."""

    async def body(ctx):
        echo = EchoThread()
        inbox = Inbox()
        client = ControlClient(ctx, echo.address, b"p", inbox)
        try:
            client.send(m.Heartbeat(cid=0))
            await inbox.wait_for(1)
            for k in range(1, 21):
                client.send(m.Heartbeat(cid=2 * k - 1))
                time.sleep(0.005)  # block the loop: the reply arrives and signals the FD
                client.send(m.Heartbeat(cid=2 * k))  # >1 ms later: this send processes commands
                await inbox.wait_for(2 * k + 1, timeout=2)
        finally:
            await client.close()
            echo.close()
        return [x.cid for x in inbox.msgs]

    cids, logs, loop_errors = run(body)
    assert cids == list(range(41))
    assert not _errors(logs) and not loop_errors


# ---------------------------------------------------------------------------- garbage
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


def test_malformed_body_gets_error_reply_and_the_server_keeps_serving(run):
    async def body(ctx):
        calls: list = []
        server = echo_server(ctx, calls)
        raw = RawDealer(server.address, b"raw")
        loop = asyncio.get_running_loop()
        try:
            replies = []
            for bad in (b"\xc1garbage", m.encode(m.Heartbeat(cid=5))[:-2], b""):
                await loop.run_in_executor(None, raw.send_multipart, [bad])
                replies.append(await loop.run_in_executor(None, raw.recv))
            await loop.run_in_executor(None, raw.send_multipart, [b"two", b"frames"])  # bad envelope: no reply
            await loop.run_in_executor(None, raw.send_multipart, [m.encode(m.Heartbeat(cid=7))])
            replies.append(await loop.run_in_executor(None, raw.recv))
        finally:
            raw.close()
        await server.close()
        return replies, calls

    (replies, calls), logs, loop_errors = run(body)
    assert [type(r) for r in replies] == [m.Error, m.Error, m.Error, m.HeartbeatAck]
    assert all(r.error == "protocol" and r.cid == 0 for r in replies[:3])
    assert replies[3].cid == 7
    assert [type(msg) for _, msg in calls] == [m.Heartbeat]  # garbage never reached the handler
    events = [e["event"] for e in logs]
    assert events.count("control_malformed") == 3 and events.count("control_bad_envelope") == 1
    assert not loop_errors


def test_handler_exception_is_logged_and_the_loop_keeps_serving(run):
    async def body(ctx):
        server: ControlServer

        def handler(identity, msg):
            if msg.cid == 2:
                raise RuntimeError("bug in a handler")
            server.send(identity, m.HeartbeatAck(cid=msg.cid))

        server = ControlServer(ctx, "tcp://127.0.0.1:0", handler)
        server.start()
        inbox = Inbox()
        client = ControlClient(ctx, server.address, b"p", inbox)
        for cid in (1, 2, 3):
            client.send(m.Heartbeat(cid=cid))
        await inbox.wait_for(2)
        await client.close()
        await server.close()
        return [x.cid for x in inbox.msgs]

    cids, logs, loop_errors = run(body)
    assert cids == [1, 3]
    assert [e["event"] for e in _errors(logs)] == ["control_handler_failed"]
    assert not loop_errors


def test_client_drops_garbage_from_the_server_and_keeps_reading(run):
    async def body(ctx):
        router = ctx.socket(zmq.ROUTER)  # a hand-driven "receiver"
        router.setsockopt(zmq.LINGER, 0)
        port = router.bind_to_random_port("tcp://127.0.0.1")
        inbox = Inbox()
        client = ControlClient(ctx, f"tcp://127.0.0.1:{port}", b"p", inbox)
        client.send(m.Heartbeat(cid=1))
        loop = asyncio.get_running_loop()
        deadline = loop.time() + 5
        while not router.poll(0):
            assert loop.time() < deadline, "no HEARTBEAT at the router"
            await asyncio.sleep(0.002)
        ident, _ = router.recv_multipart()
        router.send_multipart([ident, b"\xc1not msgpack"])
        router.send_multipart([ident, b"a", b"b"])
        router.send_multipart([ident, m.encode(m.HeartbeatAck(cid=1))])
        await inbox.wait_for(1)
        await client.close()
        router.close(0)
        return [x.cid for x in inbox.msgs]

    cids, logs, loop_errors = run(body)
    assert cids == [1]
    assert sorted(e["event"] for e in _errors(logs)) == ["control_bad_envelope", "control_malformed"]
    assert not loop_errors


# ---------------------------------------------------------------------------- floods
@pytest.mark.parametrize("hwm", [None, 64])
def test_many_outstanding_messages_arrive_in_order(run, monkeypatch, hwm):
    """20 000 requests without waiting, on two peers; with a tiny high-water mark both the
    client's and the server's sends spill into their backlogs and must keep order."""
    if hwm is not None:
        monkeypatch.setattr(loopsocket, "HWM", hwm)
    n = 20_000

    async def body(ctx):
        # The clients connect before anything listens, so nothing drains their queues
        # during the burst: with the small high-water mark both must spill into their
        # backlogs, whatever the kernel's loopback buffers would have absorbed.
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            address = "tcp://127.0.0.1:%d" % probe.getsockname()[1]
        inboxes = [Inbox(), Inbox()]
        clients = [ControlClient(ctx, address, f"p{i}".encode(), ib) for i, ib in enumerate(inboxes)]
        for cid in range(1, n + 1):  # one burst: the loop never runs in between
            for c in clients:
                c.send(_reserve(cid))
        backlogged = [len(c._backlog) for c in clients]
        server = echo_server(ctx, bind=address)
        for ib in inboxes:
            await ib.wait_for(n, timeout=15)
        for c in clients:
            await c.close()
        await server.close()
        return [[x.cid for x in ib.msgs] for ib in inboxes], backlogged

    (got, backlogged), logs, loop_errors = run(body)
    assert got == [list(range(1, n + 1))] * 2
    if hwm is not None:
        assert all(b > 0 for b in backlogged), "the high-water mark was never reached: the test proves nothing"
    assert not [e for e in logs if e["log_level"] != "debug"] and not loop_errors


# ---------------------------------------------------------------------------- close
def test_close_while_idle_releases_the_reader(run):
    async def body(ctx):
        loop = asyncio.get_running_loop()
        server = echo_server(ctx)
        inbox = Inbox()
        client = ControlClient(ctx, server.address, b"p", inbox)
        client.send(m.Heartbeat(cid=1))
        await inbox.wait_for(1)
        fds = [server._fd, client._fd]
        await client.close()
        await server.close()
        await client.close()  # idempotent
        await server.close()
        client.send(m.Heartbeat(cid=2))  # after close: dropped quietly
        server.send(b"p", m.HeartbeatAck(cid=2))
        await asyncio.sleep(0.05)
        return [_reader_registered(loop, fd) for fd in fds], client.closed and server.closed

    (registered, closed), logs, loop_errors = run(body)
    assert registered == [False, False] and closed
    assert not [e for e in logs if e["log_level"] != "debug"] and not loop_errors


def test_server_closed_before_start_and_client_closed_at_once(run):
    async def body(ctx):
        server = ControlServer(ctx, "tcp://127.0.0.1:0", lambda i, msg: None)
        await server.close()
        server.start()  # after close: no reader
        client = ControlClient(ctx, "tcp://127.0.0.1:9", b"p", lambda msg: None)  # nobody there
        client.send(m.Heartbeat(cid=1))
        fd = client._fd
        await client.close()
        return server._fd, _reader_registered(asyncio.get_running_loop(), fd)

    (server_fd, registered), logs, loop_errors = run(body)
    assert server_fd is None and not registered
    assert not [e for e in logs if e["log_level"] != "debug"] and not loop_errors


def test_close_while_busy(run, monkeypatch):
    """Both ends closed mid-flood (the server from inside its own handler, the client with
    a backlog and a pending retry): no reader or timer fires afterwards, nothing is logged."""
    monkeypatch.setattr(loopsocket, "HWM", 64)

    async def body(ctx):
        loop = asyncio.get_running_loop()
        calls: list = []
        server: ControlServer

        def handler(identity, msg):
            calls.append(msg.cid)
            server.send(identity, m.HeartbeatAck(cid=msg.cid))
            if len(calls) == 500:
                server._shutdown()  # what close() does, from inside the reader callback

        server = echo_server(ctx)
        server._handler = handler
        inbox = Inbox()
        client = ControlClient(ctx, server.address, b"p", inbox)
        cid = 0
        while not client._backlog:  # flood until the high-water mark is hit: a retry timer is pending
            assert cid < 500_000, "the high-water mark was never reached"
            for _ in range(1000):
                cid += 1
                client.send(m.Heartbeat(cid=cid))
        deadline = loop.time() + 10
        while len(calls) < 500:
            assert loop.time() < deadline, f"server handled only {len(calls)}"
            await asyncio.sleep(0.001)
        fds = [server._fd, client._fd]
        await server.close()
        await asyncio.sleep(0.05)
        handled = len(calls)
        await client.close()  # with a backlog and replies in flight
        await asyncio.sleep(0.2)  # longer than the retry backoff: a leaked timer would fire here
        return handled, len(calls), fds, [_reader_registered(loop, fd) for fd in fds if fd is not None]

    (handled, handled_later, fds, registered), logs, loop_errors = run(body)
    assert handled == handled_later == 500
    assert fds[0] is None  # the server's reader was removed in its handler
    assert registered == [False]
    assert not [e for e in logs if e["log_level"] != "debug"] and not loop_errors


# ---------------------------------------------------------------------------- peers that vanish
def test_reply_to_a_vanished_peer_is_dropped_and_others_are_served(run):
    async def body(ctx):
        loop = asyncio.get_running_loop()
        held: list = []

        def handler(identity, msg):
            if identity == b"gone":
                held.append(identity)  # reply later, after the peer went away
            else:
                server.send(identity, m.HeartbeatAck(cid=msg.cid))

        server = ControlServer(ctx, "tcp://127.0.0.1:0", handler)
        server.start()
        gone = ControlClient(ctx, server.address, b"gone", lambda msg: None)
        gone.send(m.Heartbeat(cid=1))
        deadline = loop.time() + 5
        while not held:
            assert loop.time() < deadline
            await asyncio.sleep(0.002)
        await gone.close()
        # ZMQ notices the disconnect asynchronously: retry until the send is refused
        with structlog.testing.capture_logs() as inner:
            deadline = loop.time() + 5
            while not any(e["event"] == "control_unroutable" for e in inner):
                assert loop.time() < deadline, "reply to a closed peer was never refused"
                server.send(b"gone", m.HeartbeatAck(cid=1))
                await asyncio.sleep(0.01)
        inbox = Inbox()
        alive = ControlClient(ctx, server.address, b"alive", inbox)
        alive.send(m.Heartbeat(cid=2))
        await inbox.wait_for(1)
        await alive.close()
        await server.close()
        return [x.cid for x in inbox.msgs], server._backlog

    (cids, backlog), logs, loop_errors = run(body)
    assert cids == [2] and backlog == {}
    assert not _errors(logs) and not loop_errors


def test_server_that_vanishes_and_comes_back(run):
    """ZMQ reconnects silently: messages sent while the receiver is gone are not an error,
    and a new receiver on the same address is reached without a new client."""

    async def body(ctx):
        server = echo_server(ctx)
        address = server.address
        inbox = Inbox()
        client = ControlClient(ctx, address, b"p", inbox)
        client.send(m.Heartbeat(cid=1))
        await inbox.wait_for(1)
        await server.close()
        for cid in range(2, 50):
            client.send(m.Heartbeat(cid=cid))  # queued by ZMQ for the reconnect
        await asyncio.sleep(0.05)
        server2 = ControlServer(ctx, address, lambda i, msg: server2.send(i, m.HeartbeatAck(cid=msg.cid)))
        server2.start()
        client.send(m.Heartbeat(cid=50))
        loop = asyncio.get_running_loop()
        deadline = loop.time() + 15  # ZMQ's reconnect interval starts at 100 ms
        while not any(x.cid == 50 for x in inbox.msgs):
            await inbox.wait_for(len(inbox.msgs) + 1, timeout=deadline - loop.time())
        await client.close()
        await server2.close()
        return [x.cid for x in inbox.msgs]

    cids, logs, loop_errors = run(body)
    assert cids[0] == 1 and 50 in cids  # what was queued before the reconnect may or may not survive
    assert cids == sorted(cids)
    assert not _errors(logs) and not loop_errors


def test_backlog_entries_expire(run, monkeypatch):
    """A peer that stops reading: its backlog is dropped after _BACKLOG_TIMEOUT_S, with a warning."""
    monkeypatch.setattr(loopsocket, "HWM", 16)
    monkeypatch.setattr(control, "_BACKLOG_TIMEOUT_S", 0.2)
    configure = loopsocket.configure

    def small_buffers(sock):  # so that kernel socket buffers do not soak up the flood
        configure(sock)
        sock.setsockopt(zmq.SNDBUF, 4096)

    monkeypatch.setattr(loopsocket, "configure", small_buffers)

    async def body(ctx):
        server = echo_server(ctx)
        stuck = RawDealer(server.address, b"stuck")  # never reads its replies
        stuck.sock.setsockopt(zmq.RCVHWM, 16)
        stuck.sock.setsockopt(zmq.RCVBUF, 4096)
        loop = asyncio.get_running_loop()
        try:
            await loop.run_in_executor(None, stuck.send_multipart, [m.encode(m.Heartbeat(cid=1))])
            deadline = loop.time() + 5
            while server._backlog.get(b"stuck") is None:  # flood replies at it until they back up
                assert loop.time() < deadline, "the backlog never formed"
                for cid in range(2000):
                    server.send(b"stuck", m.HeartbeatAck(cid=cid))
                await asyncio.sleep(0.01)
            assert server._retry is not None  # retries do not depend on the stuck peer sending anything
            deadline = loop.time() + 5
            while b"stuck" in server._backlog:
                assert loop.time() < deadline, "the backlog never expired"
                await asyncio.sleep(0.02)
        finally:
            stuck.close()
        await server.close()

    _, logs, loop_errors = run(body)
    assert "control_backlog_expired" in [e["event"] for e in logs]
    assert not _errors(logs) and not loop_errors


def test_bind_or_connect_failure_leaves_no_socket_open(run):
    """A socket left open would make the context's term() (Sender/Receiver close) hang forever."""

    async def body(_ctx):
        ctx = zmq.Context()
        first = ControlServer(ctx, "tcp://127.0.0.1:0", lambda i, msg: None)
        with pytest.raises(zmq.ZMQError):
            ControlServer(ctx, first.address, lambda i, msg: None)  # address in use
        with pytest.raises(zmq.ZMQError):
            ControlClient(ctx, "no-such-transport://x", b"p", lambda msg: None)
        await first.close()
        term = threading.Thread(target=ctx.term, daemon=True)
        term.start()
        term.join(5)
        return term.is_alive()

    hung, logs, loop_errors = run(body)
    assert not hung
    assert not _errors(logs) and not loop_errors


def test_refused_connection_is_reported_once_and_the_monitor_goes_away(run):
    async def body(ctx):
        loop = asyncio.get_running_loop()
        refused = loop.create_future()
        client = ControlClient(ctx, "tcp://127.0.0.1:9", b"p", lambda msg: None,
                               on_refused=lambda: refused.set_result(True))  # nobody there
        await asyncio.wait_for(refused, 10)
        await asyncio.sleep(0.3)  # ZMQ keeps retrying: the callback must not run again
        mon_fd_gone = client._mon is None and client._mon_fd is None
        await client.close()
        return mon_fd_gone

    gone, logs, loop_errors = run(body)
    assert gone and not _errors(logs) and not loop_errors


def test_connected_client_stops_watching_and_never_reports_refusal(run):
    async def body(ctx):
        got: asyncio.Queue = asyncio.Queue()
        server = ControlServer(ctx, "tcp://127.0.0.1:0", lambda ident, msg: server.send(ident, m.HeartbeatAck(cid=msg.cid)))
        server.start()
        called = []
        client = ControlClient(ctx, server.address, b"p", got.put_nowait, on_refused=lambda: called.append(1))
        client.send(m.Heartbeat(cid=7))
        reply = await asyncio.wait_for(got.get(), 10)
        for _ in range(200):  # the handshake event may trail the first reply slightly
            if client._mon is None:
                break
            await asyncio.sleep(0.01)
        watching = client._mon is not None
        await server.close()  # the peer goes away after connecting: not a refusal to report
        await asyncio.sleep(0.5)
        await client.close()
        return reply, watching, called

    (reply, watching, called), logs, loop_errors = run(body)
    assert isinstance(reply, m.HeartbeatAck) and reply.cid == 7
    assert not watching and not called and not _errors(logs) and not loop_errors
