"""Requests sent again: a RESERVE or COMMIT whose answer never came (lost with a control
connection, or refused for a failed seal) is asked again, and the receiver answers a
repeat where the transfer stands, so nothing waits out its deadline and nothing fails
as a duplicate. Found with `pdxfer chaos --faults control-corrupt,control-reset`."""

from __future__ import annotations

import pytest

from pdxfer.engine.receiver_core import ReceiverCore
from pdxfer.protocol import messages as m

from tests.engine.test_failures import RawPeer
from tests.engine.test_transfers import _eventually


@pytest.fixture
def lossy(monkeypatch):
    """Drop the first control message of each named kind, in either direction, at the
    receiver (as a reset control connection or a failed seal would); counts what went by."""
    drop: set[type] = set()
    seen: dict[str, int] = {}
    on_control, send = ReceiverCore.on_control, ReceiverCore._send

    def take(msg: m.Message) -> bool:
        seen[type(msg).__name__] = seen.get(type(msg).__name__, 0) + 1
        if type(msg) in drop:
            drop.discard(type(msg))
            return False
        return True

    monkeypatch.setattr(ReceiverCore, "on_control", lambda self, ident, msg: take(msg) and on_control(self, ident, msg))
    monkeypatch.setattr(ReceiverCore, "_send", lambda self, ident, msg: take(msg) and send(self, ident, msg))
    return drop, seen


@pytest.mark.parametrize("lost", [m.Reserve, m.Grant, m.Commit, m.Done])
def test_a_lost_request_or_answer_is_asked_again_and_the_transfer_completes(make_receiver, make_sender, backend,
                                                                              lossy, lost):
    drop, seen = lossy
    r = make_receiver()
    s = make_sender(backend=backend, resend_after_s=0.2)
    s.submit(r.control_address, "warm", [b"w" * 4096]).result(20)  # HELLO done: only the transfer's messages drop
    drop.add(lost)
    chunks = [bytes([i]) * 65536 for i in range(3)]
    s.submit(r.control_address, "asked-twice", chunks, deadline_s=20).result(25)  # TransferTimeout without resends
    with r.wait("asked-twice", timeout=5) as got:
        assert bytes(got.view) == b"".join(chunks)
    asked = "Reserve" if lost in (m.Reserve, m.Grant) else "Commit"
    assert seen[asked] >= 3, seen  # warm-up's, the lost or unanswered one, and the one sent again
    assert not drop
    assert s.budget_used == 0  # NIXL too: a transfer succeeds only after its WRITEs completed here
    assert r.ledger().granted_count == 0


def test_a_repeated_reserve_is_answered_where_it_stands_not_rejected(make_receiver):
    r = make_receiver(capacity=1 << 20)
    peer = RawPeer(r.control_address)
    try:
        assert isinstance(peer.request(m.Hello(cid=1, sender_id="twice")), m.HelloOk)
        ask = m.Reserve(cid=2, tid="t-1", total_bytes=4096, chunk_sizes=[4096], deadline_ms=60_000)
        first = peer.request(ask)
        again = peer.request(ask)
        assert isinstance(first, m.Grant) and again == first  # the same slot, the same cid
        assert r.ledger().granted_count == 1
        other = peer.request(m.Reserve(cid=3, tid="t-1", total_bytes=8192, chunk_sizes=[8192], deadline_ms=60_000))
        assert isinstance(other, m.Reject) and other.reason == "duplicate"  # another payload under that id
        big = m.Reserve(cid=4, tid="t-2", total_bytes=1 << 20, chunk_sizes=[1 << 20], deadline_ms=60_000)
        assert isinstance(peer.request(big), m.Queued)
        assert isinstance(peer.request(big), m.Queued)  # still waiting: said again, not rejected
        assert r.ledger().waiting_count == 1
        peer.sock.send(m.encode(m.Abort(cid=2, tid="t-1", reason="room for t-2")))
        grant = peer.recv(5)
        assert isinstance(grant, m.Grant) and grant.tid == "t-2"
        assert peer.request(big) == grant  # asked once more after the GRANT: the same GRANT
    finally:
        peer.close()


def test_resend_settings_are_validated():
    from pdxfer.engine import SenderConfig

    with pytest.raises(ValueError, match="resend_after_s must be > 0"):
        SenderConfig(resend_after_s=0)
    with pytest.raises(ValueError, match="resend_max_s .* must be >= resend_after_s"):
        SenderConfig(resend_after_s=2, resend_max_s=1)
