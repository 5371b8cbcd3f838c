"""`Sender.register`: a long-lived buffer registered once, its chunks WRITEn from it."""

from __future__ import annotations

import os

import numpy as np
import pytest

from tests.conftest import HAVE_NIXL
from tests.engine.test_transfers import _eventually

pytestmark = pytest.mark.timeout(90)

needs_nixl = pytest.mark.skipif(not HAVE_NIXL, reason="nixl is not installed")


@needs_nixl
def test_chunks_of_a_registered_buffer_are_never_registered_per_transfer(make_receiver, make_sender):
    r = make_receiver(capacity=16 << 20)
    s = make_sender(backend="nixl")
    pool = np.frombuffer(bytearray(os.urandom(1 << 20)), dtype=np.uint8)  # e.g. a pinned send pool
    s.register(pool)
    side = s._nixl.result()
    assert [p.cache.pinned for p in side.progresses] == [1] * len(side.progresses)
    for t in range(3):  # transfer after transfer, from the same memory
        chunks = [pool[i * (64 << 10):(i + 1) * (64 << 10)] for i in range(8)]
        fut = s.submit(r.control_address, f"pooled-{t}", chunks, deadline_s=30)
        with r.wait(f"pooled-{t}", timeout=30) as got:
            assert bytes(got.view) == pool[: 8 << 16].tobytes()
        fut.result(30)
    assert sum(p.cache.pinned_hits for p in side.progresses) == 24
    assert sum(p.cache.misses for p in side.progresses) == 0  # no chunk was registered on its own
    assert s.unregister(pool) and not s.unregister(pool)
    _eventually(lambda: all(p.cache.pinned == 0 for p in side.progresses))
    # Unregistered: its chunks still go, each registered for its transfer as before.
    fut = s.submit(r.control_address, "after", [pool[:4096]], deadline_s=30)
    with r.wait("after", timeout=30) as got:
        assert bytes(got.view) == pool[:4096].tobytes()
    fut.result(30)
    assert sum(p.cache.misses for p in side.progresses) == 1
    _eventually(lambda: r.ledger().reserved_bytes == 0 and s.budget_used == 0)


@needs_nixl
def test_overlapping_registrations_are_refused_by_name(make_sender):
    s = make_sender(backend="nixl")
    pool = np.zeros(1 << 16, dtype=np.uint8)
    s.register(pool)
    with pytest.raises(ValueError, match="overlaps one registered already"):
        s.register(pool[4096:8192])
    side = s._nixl.result()
    assert all(p.cache.pinned == 1 for p in side.progresses)  # the refused one left nothing behind


def test_register_checks_the_buffer_and_is_a_no_op_on_tcp(make_sender):
    s = make_sender(backend="tcp")
    s.register(bytearray(4096))  # nothing to register for TCP
    assert s._nixl is None and not s.unregister(bytearray(4096))
    with pytest.raises(ValueError, match="C-contiguous"):
        s.register(np.zeros((64, 64), dtype=np.uint8)[:, ::2])
    with pytest.raises(ValueError, match="empty"):
        s.register(b"")
