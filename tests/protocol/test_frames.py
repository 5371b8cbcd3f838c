import pytest
from hypothesis import given, strategies as st

from pdxfer.errors import ProtocolError
from pdxfer.protocol import frames as f
from pdxfer.protocol.checksum import chunk_checksum


def _stream(frames: list[tuple[int, int, bytes]], token: int = 7) -> bytes:
    out = [f.pack_header(f.KIND_HELLO, 0, token, 0, 0, 0)]
    for slot, index, payload in frames:
        out.append(f.pack_header(f.KIND_DATA, index, slot, 0, len(payload), chunk_checksum(payload)))
        out.append(payload)
    return b"".join(out)


def _feed(parser: f.FrameParser, data: bytes, cuts: list[int]) -> list:
    events, pos = [], 0
    for cut in sorted(set(cuts)) + [len(data)]:
        while pos < cut:
            buf = parser.get_buffer()
            n = min(len(buf), cut - pos)
            buf[:n] = data[pos : pos + n]
            events += parser.buffer_updated(n)
            pos += n
    return events


@given(payloads=st.lists(st.binary(min_size=1, max_size=300), min_size=1, max_size=5),
       cuts=st.lists(st.integers(min_value=0, max_value=2000), max_size=20))
def test_parser_lands_payload_in_resolved_buffer_for_any_split(payloads, cuts):
    dests = {i: bytearray(len(p)) for i, p in enumerate(payloads)}
    parser = f.FrameParser(lambda h: memoryview(dests[h.chunk_index]))
    data = _stream([(1, i, p) for i, p in enumerate(payloads)])
    events = _feed(parser, data, [c for c in cuts if c < len(data)])
    assert isinstance(events[0], f.ConnectionHello) and events[0].conn_token == 7
    got = [e for e in events if isinstance(e, f.ChunkReceived)]
    assert [e.header.chunk_index for e in got] == list(range(len(payloads)))
    for e, p in zip(got, payloads):
        assert bytes(dests[e.header.chunk_index]) == p
        assert e.checksum == chunk_checksum(p) == e.header.checksum
    assert not parser.mid_frame


def test_stale_slot_payload_is_discarded_and_stream_continues():
    keep = bytearray(3)
    parser = f.FrameParser(lambda h: None if h.slot == 1 else memoryview(keep))
    events = _feed(parser, _stream([(1, 0, b"x" * 5000), (2, 0, b"abc")]), [])
    assert isinstance(events[1], f.ChunkDiscarded) and events[1].header.slot == 1
    assert isinstance(events[2], f.ChunkReceived) and bytes(keep) == b"abc"


@pytest.mark.parametrize("mutate, message", [
    (lambda h: b"XX" + h[2:], "magic"),
    (lambda h: h[:2] + b"\x09" + h[3:], "version"),
    (lambda h: h[:3] + b"\x07" + h[4:], "kind"),
])
def test_bad_headers_raise(mutate, message):
    parser = f.FrameParser(lambda h: memoryview(bytearray(h.length)))
    with pytest.raises(ProtocolError, match=message):
        _feed(parser, mutate(f.pack_header(f.KIND_HELLO, 0, 1, 0, 0, 0)), [])


def test_oversized_and_out_of_order_frames_raise():
    parser = f.FrameParser(lambda h: memoryview(bytearray(h.length)))
    with pytest.raises(ProtocolError, match="before hello"):
        _feed(parser, f.pack_header(f.KIND_DATA, 0, 1, 0, 4, 0), [])
    parser = f.FrameParser(lambda h: memoryview(bytearray(h.length)))
    with pytest.raises(ProtocolError, match="length"):
        _feed(parser, f.pack_header(f.KIND_HELLO, 0, 1, 0, 0, 0) + f.pack_header(f.KIND_DATA, 0, 1, 0, 1 << 40, 0), [])


def test_resolver_size_mismatch_is_a_protocol_error():
    parser = f.FrameParser(lambda h: memoryview(bytearray(h.length + 1)))
    with pytest.raises(ProtocolError, match="resolver"):
        _feed(parser, _stream([(1, 0, b"abcd")]), [])


def test_mid_frame_reports_truncation():
    parser = f.FrameParser(lambda h: memoryview(bytearray(h.length)))
    data = _stream([(1, 0, b"abcdef")])
    _feed(parser, data[:-2], [])
    assert parser.mid_frame


@given(payloads=st.lists(st.binary(min_size=1, max_size=3000), min_size=1, max_size=4),
       piece=st.integers(min_value=1, max_value=700))
def test_payload_is_handed_out_in_pieces_of_at_most_max_piece(payloads, piece):
    """The receive side lands (and hashes) a payload in bounded pieces, so each piece is
    still in cache when it is hashed; the bytes and checksums are the same as unbounded."""
    dests = {i: bytearray(len(p)) for i, p in enumerate(payloads)}
    parser = f.FrameParser(lambda h: memoryview(dests[h.chunk_index]), max_piece=piece)
    data = _stream([(1, i, p) for i, p in enumerate(payloads)])
    events, pos, sizes = [], 0, []
    while pos < len(data):
        buf = parser.get_buffer()
        if parser._target is not None:
            sizes.append(len(buf))
        n = min(len(buf), len(data) - pos)
        buf[:n] = data[pos:pos + n]
        events += parser.buffer_updated(n)
        pos += n
    assert sizes and max(sizes) <= piece
    got = [e for e in events if isinstance(e, f.ChunkReceived)]
    assert [bytes(dests[e.header.chunk_index]) for e in got] == payloads
    assert all(e.checksum == chunk_checksum(p) == e.header.checksum for e, p in zip(got, payloads))


def test_max_piece_must_be_positive():
    with pytest.raises(ValueError, match="max_piece"):
        f.FrameParser(lambda h: None, max_piece=0)


@given(sizes=st.lists(st.integers(min_value=1, max_value=5000), min_size=1, max_size=5),
       stale=st.lists(st.booleans(), min_size=5, max_size=5),
       piece=st.integers(min_value=1, max_value=3000),
       cuts=st.lists(st.integers(min_value=1, max_value=4000), max_size=20))
def test_want_never_asks_for_more_than_the_frames_still_owe(sizes, stale, piece, cuts):
    """The TCP receiver sets its low-water mark to `want`: a mark above what the sender is
    bound to send would leave a complete stream unread forever. However the bytes arrive,
    `want` is what the next buffer takes and at most what the stream still holds, and
    between frames it is exactly one header."""
    payloads = [bytes([i]) * n for i, n in enumerate(sizes)]
    dests = {i: bytearray(n) for i, n in enumerate(sizes)}
    parser = f.FrameParser(lambda h: None if stale[h.chunk_index] else memoryview(dests[h.chunk_index]),
                           max_piece=piece)
    data = _stream([(1, i, p) for i, p in enumerate(payloads)])
    assert parser.want == f.HEADER_SIZE
    pos, events = 0, []
    for step in range(10 * len(data)):  # bounded: every step moves at least one byte
        if pos == len(data):
            break
        want = parser.want
        assert want == len(parser.get_buffer())
        assert 1 <= want <= len(data) - pos
        n = min(want, cuts[step % len(cuts)] if cuts else want)
        parser.get_buffer()[:n] = data[pos:pos + n]
        events += parser.buffer_updated(n)
        pos += n
    assert pos == len(data) and parser.want == f.HEADER_SIZE and not parser.mid_frame
    landed = [e.header.chunk_index for e in events if isinstance(e, f.ChunkReceived)]
    assert landed == [i for i in range(len(sizes)) if not stale[i]]


def test_a_parser_told_not_to_hash_lands_the_bytes_and_reports_no_checksum():
    """A receiver that checks another algorithm (devsum64) computes it over the whole
    chunk itself: the parser then spends nothing on xxh3."""
    dest = bytearray(5000)
    parser = f.FrameParser(lambda h: memoryview(dest), max_piece=1000, hash_pieces=False)
    payload = bytes(range(256)) * 19 + b"x" * 136
    events = _feed(parser, _stream([(1, 0, payload)]), [7, 2500])
    got = [e for e in events if isinstance(e, f.ChunkReceived)]
    assert len(got) == 1 and got[0].checksum is None and bytes(dest) == payload
