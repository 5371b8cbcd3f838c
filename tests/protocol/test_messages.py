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
    with pytest.raises(ProtocolError, match="fails its xxh3 seal"):
        m.decode(b"\xc1\x00garbage")
    with pytest.raises(ProtocolError, match="undecodable"):
        m.decode(m.seal(b"\xc1\x00garbage"))
    with pytest.raises(ProtocolError, match="undecodable"):
        m.decode(m.seal(msgspec.msgpack.encode({"t": "nope", "cid": 1})))
    with pytest.raises(ProtocolError, match="too short to carry its seal"):
        m.decode(b"\x01" * 8)
    with pytest.raises(ProtocolError, match="exceeds"):
        m.decode(b"\x00" * (m.MAX_CONTROL_MESSAGE + 9))


def test_every_single_bit_flip_of_a_sealed_body_is_refused():
    """What `pdxfer chaos --faults control-corrupt` does to a GRANT, at every bit."""
    wire = m.encode(m.Grant(cid=7, tid="t-1", slot=3, lease_ms=5000, addr=0x7F00_0000_1000))
    for i in range(len(wire) * 8):
        bad = bytearray(wire)
        bad[i // 8] ^= 1 << (i % 8)
        with pytest.raises(ProtocolError):
            m.decode(bytes(bad))
    assert m.decode(wire) == m.Grant(cid=7, tid="t-1", slot=3, lease_ms=5000, addr=0x7F00_0000_1000)


def test_a_protocol_1_peer_is_named_as_unsealed():
    v1 = msgspec.msgpack.encode({"t": "heartbeat", "v": 1, "cid": 4})
    with pytest.raises(ProtocolError, match="unsealed: it reads whole as a protocol version 1 message"):
        m.decode(v1)
