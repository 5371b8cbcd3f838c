"""The lane's heartbeat task around the `Liveness` rule: a fake clock, real asyncio sleeps
of a few milliseconds, and every wait bounded."""

from __future__ import annotations

import asyncio

import pytest

from pdxfer.engine.heartbeat import heartbeat
from pdxfer.engine.liveness import Liveness
from pdxfer.errors import PeerLost


class Peer:
    """Counts heartbeats; answers them (`alive.heard()`) while `answering`."""

    def __init__(self, alive: Liveness) -> None:
        self.alive = alive
        self.now = 0.0
        self.sent = 0
        self.answering = True
        self.unread = False  # a reply sits in the socket, unread until drain()
        self.busy = True

    def clock(self) -> float:
        self.now += 1.0  # each beat is one second later
        return self.now

    def send(self) -> None:
        self.sent += 1
        if self.answering:
            self.alive.heard()

    def drain(self) -> bool:
        if self.unread:
            self.unread = False
            self.alive.heard()
            return True
        return False


def _run(peer: Peer, alive: Liveness):
    return heartbeat(alive, period_s=0.002, peer="tcp://x", clock=peer.clock, busy=lambda: peer.busy,
                     drain=peer.drain, send=peer.send)


async def test_an_answering_peer_is_never_lost():
    alive = Liveness(2.5)
    peer = Peer(alive)
    task = asyncio.ensure_future(_run(peer, alive))
    try:
        for _ in range(500):  # bounded: ~1 s at most
            if peer.sent >= 20:
                break
            await asyncio.sleep(0.002)
        assert peer.sent >= 20 and not task.done()
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)


async def test_a_silent_peer_is_lost_after_the_timeout_and_not_before():
    alive = Liveness(2.5)
    peer = Peer(alive)
    peer.answering = False
    err = await asyncio.wait_for(_run(peer, alive), 5)
    assert isinstance(err, PeerLost) and err.waiting_for == "heartbeat_ack"
    # sent at t=1, 2, 3; at t=4 it has waited 3 s > 2.5 s: lost without a fourth heartbeat
    assert peer.sent == 3 and peer.now == 4.0


async def test_a_reply_waiting_unread_saves_the_lane():
    alive = Liveness(2.5)
    peer = Peer(alive)
    peer.answering = False
    peer.unread = True  # the answer came but the loop had not read it when the timer fired
    err = await asyncio.wait_for(_run(peer, alive), 5)
    # Without the drain it was lost at t=4. With it, the reply found at t=4 counts, the
    # count restarts with the heartbeat sent then, and only t=7 (3 s later) is lost.
    assert isinstance(err, PeerLost)
    assert peer.unread is False and peer.now == 7.0 and peer.sent == 6


@pytest.mark.parametrize("silent", [False, True])
async def test_an_idle_lane_sends_nothing_and_is_never_lost(silent):
    alive = Liveness(0.5)
    peer = Peer(alive)
    peer.busy = False
    peer.answering = not silent
    task = asyncio.ensure_future(_run(peer, alive))
    try:
        for _ in range(500):
            if peer.now >= 10.0:
                break
            await asyncio.sleep(0.002)
        assert peer.now >= 10.0 and peer.sent == 0 and not task.done()
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
