"""When the receiver's NIXL half comes up: at the first NIXL HELLO, or with the receiver
(`ReceiverConfig.nixl_eager`), and what a failed or unfinished setup leaves behind."""

from __future__ import annotations

import threading

import pytest

from pdxfer.protocol import messages as m
import pdxfer.engine.receiver_nixl as receiver_nixl

from tests.engine.test_failures import RawPeer
from tests.engine.test_transfers import _eventually

pytest.importorskip("nixl")


def _nixl(r):
    return r._core.nixl


def _nixl_hello(r, cid: int = 1) -> m.Message:
    peer = RawPeer(r.control_address)
    try:
        return peer.request(m.Hello(cid=cid, sender_id=f"raw-{cid}", capabilities=["nixl"],
                                    nixl_agent=f"raw-agent-{cid}"), 30)
    finally:
        peer.close()


def test_lazy_receiver_sets_nixl_up_only_at_the_first_nixl_hello(make_receiver):
    r = make_receiver()
    assert _nixl(r).side is None and _nixl(r)._setup is None  # nothing imported, nothing registered
    ok = _nixl_hello(r)
    assert isinstance(ok, m.HelloOk) and "nixl" in ok.capabilities and ok.nixl_md
    assert _nixl(r).side is not None


def test_eager_receiver_is_ready_before_any_hello(make_receiver):
    r = make_receiver(nixl_eager=True)
    _eventually(lambda: _nixl(r).side is not None, timeout=30)
    side = _nixl(r).side
    ok = _nixl_hello(r)
    assert isinstance(ok, m.HelloOk) and ok.nixl_md == side.metadata
    assert _nixl(r).side is side  # the HELLO used the agent made at start, no second one


def test_failed_eager_setup_keeps_tcp_and_a_nixl_hello_tries_again(make_receiver, make_sender, monkeypatch):
    real = receiver_nixl.NixlRecvSide
    attempts: list[int] = []

    def flaky(*args, **kw):
        attempts.append(1)
        if len(attempts) == 1:
            raise RuntimeError("no UCX transport here (simulated)")
        return real(*args, **kw)

    monkeypatch.setattr(receiver_nixl, "NixlRecvSide", flaky)
    r = make_receiver(nixl_eager=True)
    _eventually(lambda: _nixl(r).unavailable != "", timeout=30)
    assert "simulated" in _nixl(r).unavailable and "nixl" not in r._core.capabilities
    s = make_sender(backend="tcp")
    assert s.submit(r.control_address, "tcp-still-works", [b"t" * 4096], deadline_s=20).result(30).nbytes == 4096
    ok = _nixl_hello(r)  # the next NIXL HELLO sets up afresh, and this time it works
    assert isinstance(ok, m.HelloOk) and "nixl" in ok.capabilities and ok.nixl_md
    assert len(attempts) == 2 and _nixl(r).unavailable == ""


def test_close_during_eager_setup_closes_the_agent_it_made(make_receiver, monkeypatch):
    real = receiver_nixl.NixlRecvSide
    entered, release = threading.Event(), threading.Event()
    made: list = []

    def slow(*args, **kw):
        entered.set()
        assert release.wait(30)
        side = real(*args, **kw)
        closed = side.close

        def close() -> None:
            made.append("closed")
            closed()

        side.close = close
        made.append(side)
        return side

    monkeypatch.setattr(receiver_nixl, "NixlRecvSide", slow)
    r = make_receiver(nixl_eager=True)
    assert entered.wait(30)
    closer = threading.Thread(target=r.close)
    closer.start()
    release.set()  # the setup finishes while close() waits for it
    closer.join(60)
    assert not closer.is_alive()
    assert len(made) == 2 and made[1] == "closed"
