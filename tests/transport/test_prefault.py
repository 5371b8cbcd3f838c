"""Prefaulting a host receive region in the background (`transport.prefault`)."""

from __future__ import annotations

import mmap
import os
import sys
import threading
import time

import pytest

from pdxfer.transport import prefault
from pdxfer.transport.nixl_regcache import buffer_address
from tests.conftest import HAVE_NIXL
from tests.smaps import mapping_field

pytestmark = [pytest.mark.skipif(not sys.platform.startswith("linux"), reason="MADV_POPULATE_WRITE is Linux's"),
              pytest.mark.timeout(60)]


def _rss_kib(addr: int) -> int:
    return int(mapping_field(addr, "Rss")[0])


def _wait(pred, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and not pred():
        time.sleep(0.01)  # poll-ok: test helper
    assert pred()


def test_faults_in_every_page_and_keeps_the_bytes():
    n = (64 << 20) + (1 << 20)  # many steps and a partial one
    region = mmap.mmap(-1, n, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    view = memoryview(region)
    try:
        view[:5] = b"hello"
        view[n - 5:] = b"world"
        addr = buffer_address(view)
        assert _rss_kib(addr) * 1024 < n // 4  # only the two touched pages (and whatever VMA merged with it)
        p = prefault.Prefaulter(addr, n, "t")
        _wait(lambda: p.seconds is not None)
        assert p.complete and p.done_bytes == n and p.stop()
        assert _rss_kib(addr) * 1024 >= n
        assert bytes(view[:5]) == b"hello" and bytes(view[n - 5:]) == b"world"
    finally:
        view.release()
        region.close()


def test_stop_ends_after_the_current_step_and_a_refusal_ends_it_too(monkeypatch):
    entered, release = threading.Event(), threading.Event()
    calls: list[tuple[int, int]] = []

    def slow(addr: int, nbytes: int) -> bool:
        calls.append((addr, nbytes))
        entered.set()
        release.wait(10)
        return True

    monkeypatch.setattr(prefault, "populate", slow)
    p = prefault.Prefaulter(4096, 10 * prefault.STEP, "t-stop")
    assert entered.wait(10)
    stopper = threading.Thread(target=p.stop)
    stopper.start()
    time.sleep(0.05)  # poll-ok: stop() is now waiting for the step in progress
    release.set()
    stopper.join(10)
    assert not stopper.is_alive() and calls == [(4096, prefault.STEP)]
    assert not p.complete and p.done_bytes == prefault.STEP

    monkeypatch.setattr(prefault, "populate", lambda addr, nbytes: False)
    refused = prefault.Prefaulter(4096, 2 * prefault.STEP, "t-refused")
    _wait(lambda: refused.seconds is not None)
    assert not refused.complete and refused.done_bytes == 0 and refused.stop()


@pytest.mark.skipif(not HAVE_NIXL, reason="nixl is not installed")
def test_first_nixl_transfer_does_not_wait_for_the_region_to_be_faulted_in(make_receiver, make_sender, monkeypatch):
    """Prefaulting once ran inside the first NIXL HELLO, and on this VM it took up to 6 s
    for 512 MiB: longer than the sender's 5 s handshake timeout. Now a transfer completes
    while the prefault is still stuck in its first step."""
    release = threading.Event()
    stuck: list[int] = []

    def blocked(addr: int, nbytes: int) -> bool:
        stuck.append(nbytes)
        release.wait(30)
        return True

    monkeypatch.setattr(prefault, "populate", blocked)
    r = make_receiver(capacity=8 << 20)
    s = make_sender(backend="nixl", handshake_timeout_s=3.0)
    try:
        chunks = [os.urandom(100_000), os.urandom(5)]
        s.submit(r.control_address, "while-prefaulting", chunks, deadline_s=20).result(20)
        with r.wait("while-prefaulting", timeout=20) as got:
            assert bytes(got.view) == b"".join(chunks)
        side = r._core.nixl.side
        assert stuck and side.prefault is not None and not side.prefault.complete
    finally:
        release.set()
