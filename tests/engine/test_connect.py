"""Sender.connect: a lane set up before the first transfer, kept while idle."""

from __future__ import annotations

import os
import signal
import socket
import time

import pytest

from pdxfer.errors import PeerLost
from tests.engine.test_transfers import _eventually


def test_connect_sets_up_the_lane_and_keeps_it_while_idle(make_receiver, make_sender, backend):
    r = make_receiver()
    s = make_sender(backend=backend, lane_idle_s=0.2)
    s.connect(r.control_address).result(15)
    lane = s._lanes[r.control_address]
    assert lane.state == "ready" and not lane.transfers
    time.sleep(1.0)  # five idle periods: an unkept lane would have closed after the first
    assert s._lanes.get(r.control_address) is lane and lane.state == "ready"
    chunks = [os.urandom(70_000), os.urandom(1)]
    fut = s.submit(r.control_address, "after-connect", chunks)
    with r.wait("after-connect", timeout=10) as got:
        assert [bytes(got.chunk(i)) for i in range(2)] == chunks
    fut.result(10)
    assert s._lanes.get(r.control_address) is lane  # the transfer used the lane set up earlier


def test_connect_to_nothing_fails_with_peer_lost(make_sender):
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    s = make_sender(handshake_timeout_s=10.0)
    t0 = time.monotonic()
    with pytest.raises(PeerLost) as info:
        s.connect(f"tcp://127.0.0.1:{port}").result(15)
    assert info.value.waiting_for == "hello" and time.monotonic() - t0 < 10  # refused, not timed out


def test_a_kept_idle_lane_notices_a_hung_receiver_and_the_next_transfer_reconnects(receiver_proc, make_sender):
    rx = receiver_proc("--capacity", str(16 << 20))
    s = make_sender(heartbeat_s=0.1, peer_timeout_s=0.5, lane_idle_s=0.2)
    s.connect(rx.info["control"]).result(15)
    first = s._lanes[rx.info["control"]]
    rx.signal(signal.SIGSTOP)
    try:
        _eventually(lambda: first.state == "dead", timeout=10)  # idle heartbeats went unanswered
    finally:
        rx.signal(signal.SIGCONT)
    assert first.ready.done() and not first.ready.exception()  # it had been ready before it died
    fut = s.submit(rx.info["control"], "after-hang", [b"z" * 4096])
    assert fut.result(15).nbytes == 4096
    assert s._lanes[rx.info["control"]] is not first
