"""The decode's requests to a prefill's side channel: a dead prefill fails fast, a slow one
(Python threads starved, as seen under load in CI) gets its answer through.

The server runs in its own process so that it can be stopped (SIGSTOP) and killed; its
handler sleeps `delay` seconds before answering, like a prefill whose engine step that
registers the hold is still seconds away."""

from __future__ import annotations

import json
import signal
import sys
import threading
import time
from typing import Iterator

import pytest
import zmq

from pdxfer.bench.procs import ChildProcess, free_port
from pdxfer.plugins.vllm.sidechannel import side_request

_SERVER = """
import json, sys, time
from pdxfer.plugins.vllm.sidechannel import SideChannelServer

def handler(msg):
    time.sleep(float(msg.get("delay", 0)))
    return {"ok": True, "echo": msg.get("n")}

srv = SideChannelServer("127.0.0.1", int(sys.argv[1]), handler)
print(json.dumps({"port": int(srv.address.rpartition(":")[2])}), flush=True)
sys.stdin.read()  # until the test closes our stdin or kills us
srv.close()
"""


@pytest.fixture
def zctx() -> Iterator[zmq.Context]:
    ctx = zmq.Context()
    yield ctx
    ctx.term()


@pytest.fixture
def server() -> Iterator[ChildProcess]:
    port = free_port()
    p = ChildProcess([sys.executable, "-c", _SERVER, str(port)])
    try:
        yield p
    finally:
        p.kill()


def test_answer_round_trip(zctx, server):
    assert side_request(zctx, "127.0.0.1", server.info["port"], {"n": 7}, 2.0) == {"ok": True, "echo": 7}


def test_slow_answer_beyond_the_alive_timeout_still_arrives(zctx, server):
    t0 = time.monotonic()
    reply = side_request(zctx, "127.0.0.1", server.info["port"], {"n": 1, "delay": 2.5}, 1.0, 20.0)
    assert reply == {"ok": True, "echo": 1} and time.monotonic() - t0 >= 2.5


def test_slow_answer_is_bounded_by_the_answer_timeout(zctx, server):
    with pytest.raises(TimeoutError, match="did not answer within 1.0s"):
        side_request(zctx, "127.0.0.1", server.info["port"], {"delay": 5}, 0.5, 1.0)


def test_nothing_listening_is_refused_at_once(zctx):
    t0 = time.monotonic()
    with pytest.raises(ConnectionRefusedError, match="refused"):
        side_request(zctx, "127.0.0.1", free_port(), {"n": 1}, 30.0, 60.0)
    assert time.monotonic() - t0 < 30  # not the alive timeout: the refusal itself


def test_stopped_prefill_fails_the_handshake(zctx, server):
    server.signal(signal.SIGSTOP)
    try:
        with pytest.raises(TimeoutError, match="handshake"):
            side_request(zctx, "127.0.0.1", server.info["port"], {"n": 1}, 1.0, 60.0)
    finally:
        server.signal(signal.SIGCONT)


def test_prefill_stopped_after_the_handshake_is_lost_by_heartbeat(zctx, server):
    ask = {"n": 1, "delay": 30}
    with pytest.raises(ConnectionError, match="dropped the connection"):
        threading.Timer(1.0, server.signal, (signal.SIGSTOP,)).start()
        try:
            side_request(zctx, "127.0.0.1", server.info["port"], ask, 1.0, 60.0)
        finally:
            server.signal(signal.SIGCONT)


def test_prefill_killed_while_answering_fails_at_once(zctx, server):
    threading.Timer(1.0, server.signal, (signal.SIGKILL,)).start()
    t0 = time.monotonic()
    with pytest.raises(ConnectionError):
        side_request(zctx, "127.0.0.1", server.info["port"], {"delay": 30}, 30.0, 60.0)
    assert time.monotonic() - t0 < 30  # the drop, not a timeout


def test_json_reply_is_required(zctx):
    """A peer that answers garbage is an error naming the side channel, not a crash."""
    rep = zctx.socket(zmq.REP)
    rep.setsockopt(zmq.LINGER, 0)
    port = rep.bind_to_random_port("tcp://127.0.0.1")
    def answer() -> None:
        if rep.poll(5000):
            rep.recv()
            rep.send(json.dumps([1, 2]).encode())

    t = threading.Thread(target=answer)
    t.start()
    try:
        with pytest.raises(ValueError, match=f"127.0.0.1:{port} answered a non-object"):
            side_request(zctx, "127.0.0.1", port, {"n": 1}, 2.0)
    finally:
        t.join(10)
        rep.close(0)
