"""Shared fixtures: real receivers and senders on loopback, with short deadlines."""

from __future__ import annotations

import pytest

from pdxfer.bench.procs import ChildProcess, receiver_argv
from pdxfer.engine import Receiver, ReceiverConfig, Sender, SenderConfig


@pytest.fixture
def make_receiver():
    made: list[Receiver] = []

    def make(**kw) -> Receiver:
        kw.setdefault("capacity", 64 << 20)
        kw.setdefault("lease_s", 5.0)
        r = Receiver(ReceiverConfig(**kw)).start()
        made.append(r)
        return r

    yield make
    for r in made:
        r.close()


@pytest.fixture
def make_sender():
    made: list[Sender] = []

    def make(**kw) -> Sender:
        kw.setdefault("memory_budget", 256 << 20)
        kw.setdefault("deadline_s", 30.0)
        kw.setdefault("heartbeat_s", 0.2)
        kw.setdefault("peer_timeout_s", 2.0)
        kw.setdefault("handshake_timeout_s", 3.0)
        s = Sender(SenderConfig(**kw)).start()
        made.append(s)
        return s

    yield make
    for s in made:
        s.close()


@pytest.fixture
def receiver_proc():
    """A receiver in its own process; every one started is killed by pid at teardown."""
    made: list[ChildProcess] = []

    def make(*extra: str) -> ChildProcess:
        p = ChildProcess(receiver_argv(*extra))
        made.append(p)
        return p

    yield make
    for p in made:
        p.kill()
