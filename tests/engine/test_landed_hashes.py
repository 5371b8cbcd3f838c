"""`LandedHashes`: what the receiver's progress thread may hash, and what it must leave to the loop."""

from __future__ import annotations

import os

from pdxfer.engine.landed_hashes import LandedHashes
from pdxfer.errors import ProtocolError
from pdxfer.protocol.checksum import XXH3, chunk_checksum
from pdxfer.transport.nixl import pack_notif


def _region(n: int = 1 << 16) -> tuple[memoryview, bytes]:
    data = os.urandom(n)
    return memoryview(bytearray(data)), data


def test_hashes_each_chunk_of_a_live_slot_where_its_grant_put_it():
    buf, data = _region()
    hashes = LandedHashes(buf, XXH3)
    hashes.open(7, 8192, 12288)  # slot 7 reserved [8192, 20480) of the region
    notif = pack_notif(7, 0, 0, 4096, 0) + pack_notif(7, 2, 8192, 4096, 0)
    sums = hashes({"agent": [notif]}).sums
    assert sums == {(7, 0, 0, 4096): chunk_checksum(data[8192:12288]),
                    (7, 2, 8192, 4096): chunk_checksum(data[16384:20480])}


def test_leaves_unknown_ended_and_out_of_range_chunks_to_the_loop():
    buf, _ = _region()
    hashes = LandedHashes(buf, XXH3)
    hashes.open(1, 0, 8192)
    hashes.open(2, 8192, 8192)
    hashes.close(2)  # ended: its range may already belong to someone else
    batch = {"a": [pack_notif(1, 1, 4096, 8192, 0),  # runs past slot 1's reservation
                   pack_notif(1, 0, 0, 0, 0),  # empty
                   pack_notif(2, 0, 0, 4096, 0),  # slot 2 ended
                   pack_notif(3, 0, 0, 4096, 0),  # never granted
                   b"not a header"],  # malformed: the loop logs it
             "b": [pack_notif(1, 0, 0, 4096, 0)]}
    done = hashes(batch)
    assert list(done.sums) == [(1, 0, 0, 4096)]
    assert hashes.live == 1
    # Every notification is parsed for the loop, in the batch's order, hashed or not;
    # the malformed one comes as its error, so the loop can log it without parsing again.
    assert len(done.headers) == 6
    assert [h.slot for h in done.headers[2]] == [2] and [h.chunk_index for h in done.headers[5]] == [0]
    assert isinstance(done.headers[4], ProtocolError) and "not 1.." in str(done.headers[4])
