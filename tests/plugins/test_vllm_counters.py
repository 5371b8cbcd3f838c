"""The worker's counters: bumped from several threads at once, read as a snapshot."""

import threading

import pytest

from pdxfer.plugins.vllm.counters import Counters


def test_concurrent_increments_are_all_counted():
    c = Counters("sent", "received")
    n, threads = 20_000, 4

    def bump() -> None:
        for _ in range(n):
            c.inc("sent")

    ts = [threading.Thread(target=bump) for _ in range(threads)]
    for t in ts:
        t.start()
    for t in ts:
        t.join(30)
    assert c.snapshot() == {"sent": n * threads, "received": 0}


def test_unknown_counter_is_a_key_error():
    with pytest.raises(KeyError):
        Counters("sent").inc("snet")
