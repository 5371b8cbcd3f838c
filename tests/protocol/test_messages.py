import msgspec
import pytest

from pdxfer.errors import ProtocolError
from pdxfer.protocol import messages as m


def test_round_trip_keeps_version_and_correlation_id():
    msg = m.Reserve(cid=42, tid="t", total_bytes=6, chunk_sizes=[2, 4], deadline_ms=100)
    back = m.decode(m.encode(msg))
    assert back == msg and back.cid == 42 and back.v == m.PROTOCOL_VERSION


@pytest.mark.parametrize("msg, match", [
    (m.Reserve(cid=1, tid="t", total_bytes=7, chunk_sizes=[2, 4], deadline_ms=100), "total_bytes"),
    (m.Reserve(cid=1, tid="t", total_bytes=0, chunk_sizes=[], deadline_ms=100), "chunk count"),
    (m.Reserve(cid=1, tid="t", total_bytes=-1, chunk_sizes=[-1], deadline_ms=100), "chunk size"),
    (m.Reserve(cid=1, tid="t", total_bytes=1, chunk_sizes=[1], deadline_ms=0), "deadline"),
    (m.Reserve(cid=1, tid="", total_bytes=1, chunk_sizes=[1], deadline_ms=5), "transfer id"),
    (m.Hello(cid=1, sender_id=""), "sender_id"),
    (m.Hello(cid=1, sender_id="s", nixl_workers=["w1"]), "only with nixl_agent"),
    (m.Hello(cid=1, sender_id="s", nixl_agent="a", nixl_workers=[f"w{i}" for i in range(16)]), "at most 15"),
    (m.Hello(cid=1, sender_id="s", nixl_agent="a", nixl_workers=[""]), "nixl_workers name length"),
    (m.Heartbeat(cid=1, v=9), "version"),
])
def test_invalid_messages_are_rejected_with_a_reason(msg, match):
    with pytest.raises(ProtocolError, match=match):
        m.decode(m.encode(msg))


def test_garbage_and_oversize_are_protocol_errors():
    with pytest.raises(ProtocolError, match="undecodable"):
        m.decode(b"\xc1\x00garbage")
    with pytest.raises(ProtocolError, match="undecodable"):
        m.decode(msgspec.msgpack.encode({"t": "nope", "cid": 1}))
    with pytest.raises(ProtocolError, match="exceeds"):
        m.decode(b"\x00" * (m.MAX_CONTROL_MESSAGE + 1))
