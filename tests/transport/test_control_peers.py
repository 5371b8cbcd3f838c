"""The control channel under floods past the high-water mark, and with peers that stop
reading, vanish, come back, or were never there. Same harness and checks as
test_control.py."""

from __future__ import annotations

import asyncio
import socket
import threading

import pytest
import structlog
import zmq

from pdxfer.protocol import messages as m
from pdxfer.transport import control, loopsocket
from pdxfer.transport.control import ControlClient, ControlServer
from tests.transport.control_harness import (
    Inbox,
    RawDealer,
    _errors,
    _reserve,
    echo_server,
)


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
