"""The control channel's backlog, without sockets: order, both bounds, unreachable peers."""

from __future__ import annotations

from structlog.testing import capture_logs

from pdxfer.transport.backlog import Backlog


def test_drains_in_order_until_the_socket_refuses():
    b = Backlog("peer", max_len=10)
    for i in range(5):
        assert b.push(b"%d" % i, drop_after=100)
    taken: list[bytes] = []
    room = [3]

    def send(body: bytes) -> bool:
        if not room[0]:
            return False
        room[0] -= 1
        taken.append(body)
        return True

    assert b.drain(send, now=0) and taken == [b"0", b"1", b"2"] and len(b) == 2
    assert not b.drain(send, now=0)  # no room: nothing moved, nothing lost
    room[0] = 10
    assert b.drain(send, now=0) and taken == [b"0", b"1", b"2", b"3", b"4"] and not b


def test_full_backlog_refuses_with_a_warning():
    b = Backlog("peer-x", max_len=2)
    with capture_logs() as logs:
        assert b.push(b"a", 100) and b.push(b"b", 100)
        assert not b.push(b"c", 100)
    assert len(b) == 2
    assert [(e["event"], e["peer"]) for e in logs] == [("control_backlog_full", "peer-x")]


def test_expired_messages_are_dropped_with_a_warning():
    b = Backlog("peer-y", max_len=10)
    b.push(b"old", drop_after=5)
    b.push(b"new", drop_after=50)
    sent: list[bytes] = []
    with capture_logs() as logs:
        assert not b.drain(lambda body: sent.append(body) or True, now=10)
    assert sent == [] and not b  # the head expired: it and everything behind it go
    assert logs[0]["event"] == "control_backlog_expired" and logs[0]["dropped"] == 2


def test_unreachable_peer_drops_the_rest():
    b = Backlog("gone", max_len=10)
    for i in range(4):
        b.push(b"%d" % i, 100)
    calls: list[bytes] = []
    assert b.drain(lambda body: calls.append(body) and None, now=0)
    assert calls == [b"0"] and not b
    assert b.clear() == 0
