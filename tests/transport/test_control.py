"""The ZMQ control channel (pdxfer.transport.control) on its own, on asyncio's and uvloop's
loops: round trips, garbage, and close() at any moment (floods and vanishing peers:
test_control_peers.py). Every wait has a deadline; every test checks that nothing was
logged at error level or above and that the loop saw no unhandled exception."""

from __future__ import annotations

import asyncio
import threading
import time

import pytest
import zmq

from pdxfer.protocol import messages as m
from pdxfer.transport import loopsocket
from pdxfer.transport.control import ControlClient, ControlServer
from tests.transport.control_harness import (
    CONTEXTS,
    Inbox,
    RawDealer,
    _errors,
    _reader_registered,
    _reserve,
    echo_server,
)


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
