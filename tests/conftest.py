"""Shared fixtures: real receivers and senders on loopback, with short deadlines.

`backend` parametrizes a test over the sender's data path: "tcp", and "nixl" (one-sided
WRITEs through NIXL/UCX on host memory) where the nixl package is installed. A test that
takes it passes `backend=backend` to `make_sender`; receivers accept both by default.
"""

from __future__ import annotations

import importlib.util

import pytest

from pdxfer.bench.procs import ChildProcess, receiver_argv
from pdxfer.engine import Receiver, ReceiverConfig, Sender, SenderConfig


HAVE_NIXL = importlib.util.find_spec("nixl") is not None
BACKENDS = ["tcp", pytest.param("nixl", marks=pytest.mark.skipif(not HAVE_NIXL, reason="nixl is not installed"))]


@pytest.fixture(params=BACKENDS)
def backend(request) -> str:
    return request.param


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
