"""Spill tiers wired into the send queue (issue 5): a full receiver never blocks the
producer beyond its budget, spilled chunks come back verified and in order, and every
tier byte and spill file is gone once its transfer ends, by any path.

The receiver is kept full either by a delivered transfer nobody has claimed yet (its
reservation stays until released), or, across processes, by SIGSTOP.
"""

from __future__ import annotations

import signal
import threading

import pytest

from pdxfer.bench import pattern
from pdxfer.errors import IntegrityError, SpillExhausted, TransferAborted, TransferTimeout
from pdxfer.layout import Payload

from tests.engine.test_transfers import _eventually

MiB = 1 << 20


def _chunks(tid: str, n: int, size: int = MiB) -> list:
    return [pattern.make(size, tid, i) for i in range(n)]


def _fill_receiver(sender, rx, tid: str = "holder", n: int = 16) -> None:
    """Deliver a transfer that fills the receiver and leave it unclaimed: later transfers
    queue behind it until `_free_receiver`."""
    sender.submit(rx.control_address, tid, _chunks(tid, n)).result(15)


def _free_receiver(rx, tid: str = "holder") -> None:
    with rx.wait(tid, 5):
        pass


def _assert_verified(rx, tid: str, n: int) -> None:
    with rx.wait(tid, 15) as got:
        bad = [i for i in range(n) if not pattern.check(got.chunk(i), tid, i)]
    assert bad == [], f"{tid}: chunks {bad} arrived wrong"


def _assert_clean(sender) -> None:
    """Nothing held anywhere: budget, host tier, disk tier, files."""
    _eventually(lambda: sender.budget_used == 0, 10)
    u = sender.spill_usage()
    assert u["host_bytes"] == 0 and u["disk_bytes"] == 0, u
    assert sender.spill_files == []


def test_budget_pressure_spills_to_host_then_disk_and_every_byte_arrives(make_receiver, make_sender, backend, tmp_path):
    rx = make_receiver(capacity=16 * MiB)
    # A read-back pool of exactly restore_ahead chunks: the tightest that must still stream.
    tx = make_sender(backend=backend, memory_budget=4 * MiB, spill_host_bytes=4 * MiB,
                     spill_disk_bytes=64 * MiB, spill_dir=str(tmp_path), restore_buffer_bytes=4 * MiB, restore_ahead=4)
    _fill_receiver(tx, rx)
    _eventually(lambda: tx.budget_used == 0)
    peak_before = tx.budget.peak
    u0 = tx.spill_usage()  # the holder may have spilled while its lane connected, and lost the race to its GRANT
    futs = [tx.submit(rx.control_address, f"t{k}", _chunks(f"t{k}", 16), submit_timeout_s=10) for k in range(3)]
    # 48 MiB handed over against a 4 MiB budget while the receiver has no room at all.
    u = tx.spill_usage()
    assert u["spills_host"] > 0 and u["spills_disk"] > 0, u
    # every copy replaces its chunk (the last swaps may still be on their way to the loop)
    spilled = u["spills_host"] + u["spills_disk"] - u0["spills_host"] - u0["spills_disk"]
    _eventually(lambda: tx.spill_usage()["evictions_budget"] - u0["evictions_budget"] == spilled)
    assert tx.budget.peak <= 4 * MiB and peak_before <= 4 * MiB
    assert all(not f.done() for f in futs)
    _free_receiver(rx)
    for k, f in enumerate(futs):
        f.result(30)
        _assert_verified(rx, f"t{k}", 16)
    u = tx.spill_usage()
    evicted = u["evictions_budget"] - u0["evictions_budget"]
    restored = u["restores_host"] + u["restores_disk"] - u0["restores_host"] - u0["restores_disk"]
    assert restored == evicted, u  # every chunk that left memory came back once
    assert u["integrity_errors"] == 0 and u["refused"] == 0
    _assert_clean(tx)


def test_transfer_waiting_for_grant_spills_after_threshold(make_receiver, make_sender, tmp_path):
    rx = make_receiver(capacity=16 * MiB)
    tx = make_sender(memory_budget=256 * MiB, spill_host_bytes=8 * MiB, spill_disk_bytes=64 * MiB,
                     spill_dir=str(tmp_path), spill_after_s=0.05)
    _fill_receiver(tx, rx)  # granted at once: never spilled
    assert tx.spill_usage()["evictions_waited"] == 0
    h = tx.open(rx.control_address, "late", Payload.uniform(16 * MiB, MiB))
    data = _chunks("late", 16)
    for i in range(8):
        h.put(i, data[i])
    # No budget pressure at all: the wait alone moves its chunks out of memory...
    _eventually(lambda: tx.budget_used == 0 and tx.spill_usage()["evictions_waited"] == 8)
    for i in range(8, 16):  # ...and chunks put after that go straight to a tier
        h.put(i, data[i])
    _eventually(lambda: tx.budget_used == 0 and tx.spill_usage()["evictions_waited"] == 16)
    assert tx.spill_usage()["spills_disk"] == 8  # host tier took 8 MiB, the rest went to disk
    _free_receiver(rx)
    h.future.result(30)
    _assert_verified(rx, "late", 16)
    _assert_clean(tx)


def test_corrupted_spill_file_fails_only_its_transfer(make_receiver, make_sender, tmp_path):
    rx = make_receiver(capacity=8 * MiB)
    tx = make_sender(memory_budget=256 * MiB, spill_disk_bytes=64 * MiB, spill_dir=str(tmp_path),
                     spill_after_s=0.0)
    _fill_receiver(tx, rx, n=8)
    bad = tx.submit(rx.control_address, "bad", _chunks("bad", 8))
    _eventually(lambda: len(tx.spill_files) == 8)
    victim = tx.spill_files[5]
    raw = bytearray(victim.read_bytes())
    raw[1000] ^= 0x01
    victim.write_bytes(raw)
    good = tx.submit(rx.control_address, "good", _chunks("good", 8))
    _eventually(lambda: len(tx.spill_files) == 16)
    _free_receiver(rx)
    with pytest.raises(IntegrityError) as ei:
        bad.result(30)
    assert ei.value.transfer_id == "bad" and "checksum" in str(ei.value)
    good.result(30)
    _assert_verified(rx, "good", 8)
    assert tx.spill_usage()["integrity_errors"] == 1
    _assert_clean(tx)
    _eventually(lambda: rx.ledger().reserved_bytes == 0)


def test_every_tier_full_is_a_typed_error_and_leaves_nothing_behind(make_receiver, make_sender, tmp_path):
    rx = make_receiver(capacity=16 * MiB)
    tx = make_sender(memory_budget=2 * MiB, spill_host_bytes=1 * MiB, spill_disk_bytes=2 * MiB,
                     spill_dir=str(tmp_path))
    _fill_receiver(tx, rx)
    with pytest.raises(SpillExhausted) as ei:
        tx.submit(rx.control_address, "too-much", _chunks("too-much", 16), submit_timeout_s=0.5)
    err = ei.value
    assert err.transfer_id == "too-much" and err.waiting_for == "send_budget"
    assert "spill tiers full" in str(err) and "host 1MiB/1MiB, disk 2MiB/2MiB" in str(err)
    assert list(tmp_path.rglob("*.tmp")) == []  # nothing half-written
    # submit() aborted the transfer: its budget and tier bytes are back, its files gone.
    _assert_clean(tx)
    _free_receiver(rx)
    # The sender is still healthy.
    tx.submit(rx.control_address, "after", _chunks("after", 4)).result(15)
    _assert_verified(rx, "after", 4)


def test_abort_and_deadline_release_spilled_chunks(make_receiver, make_sender, tmp_path):
    rx = make_receiver(capacity=8 * MiB)
    tx = make_sender(memory_budget=256 * MiB, spill_host_bytes=2 * MiB, spill_disk_bytes=64 * MiB,
                     spill_dir=str(tmp_path), spill_after_s=0.0)
    _fill_receiver(tx, rx, n=8)
    before = tx.spill_usage()["evictions_waited"]  # spill_after_s=0: the holder may have spilled too
    aborted = tx.open(rx.control_address, "aborted", Payload.uniform(8 * MiB, MiB))
    for i, c in enumerate(_chunks("aborted", 8)):
        aborted.put(i, c)
    timed = tx.submit(rx.control_address, "timed", _chunks("timed", 8), deadline_s=1.0)
    _eventually(lambda: tx.spill_usage()["evictions_waited"] == before + 16)
    aborted.abort("caller gave up")
    with pytest.raises(TransferAborted):
        aborted.future.result(10)
    with pytest.raises(TransferTimeout):
        timed.result(10)
    _assert_clean(tx)


def test_receiver_paused_sender_stays_in_budget_and_completes_after_resume(receiver_proc, make_sender, backend, tmp_path):
    """The issue's scenario: SIGSTOP the receiver process while the sender keeps submitting."""
    rp = receiver_proc("--capacity", "64MiB", "--verify-pattern", "--lease", "60")
    peer = rp.info["control"]
    budget = 8 * MiB
    tx = make_sender(backend=backend, memory_budget=budget, spill_host_bytes=16 * MiB, spill_disk_bytes=256 * MiB,
                     spill_dir=str(tmp_path), peer_timeout_s=60.0, deadline_s=120.0)
    tx.submit(peer, "warm", _chunks("warm", 2)).result(30)  # lane connected before the pause
    rp.signal(signal.SIGSTOP)
    try:
        futs = []
        done = threading.Event()

        def produce() -> None:
            for k in range(12):
                futs.append(tx.submit(peer, f"p{k}", _chunks(f"p{k}", 8), submit_timeout_s=30))
            done.set()

        producer = threading.Thread(target=produce, daemon=True)
        producer.start()
        # 96 MiB handed over against an 8 MiB budget: the producer finishes while the
        # receiver is still stopped, because chunks move down the tiers.
        assert done.wait(60), "the producer was blocked although the tiers had room"
        u = tx.spill_usage()
        assert u["spills_host"] > 0 and u["spills_disk"] > 0, u
        assert tx.budget.peak <= budget
        assert all(not f.done() for f in futs)
    finally:
        rp.signal(signal.SIGCONT)
    for f in futs:
        f.result(60)
    stats = rp.stop()
    assert stats is not None
    assert stats["stats"]["mismatched"] == [] and stats["stats"]["verified"] == 13
    assert stats["ledger"]["reserved_bytes"] == 0
    assert tx.budget.peak <= budget
    _assert_clean(tx)


def test_a_spilled_chunk_releases_its_buffer_at_once(make_receiver, make_sender, tmp_path):
    """Spilling is what frees the producer's memory while the decode is full: the
    buffer's release notice fires when the tier copy takes its place, long before the
    transfer can end, and nothing fires twice when the copy is sent later."""
    rx = make_receiver(capacity=16 * MiB)
    tx = make_sender(memory_budget=2 * MiB, spill_host_bytes=8 * MiB, spill_dir=str(tmp_path))
    _fill_receiver(tx, rx)
    _eventually(lambda: tx.budget_used == 0)
    released: list[int] = []
    chunks = _chunks("sp", 4)
    h = tx.open(rx.control_address, "sp", Payload.of(chunks))
    for i, c in enumerate(chunks):  # 4 MiB into a 2 MiB budget: the first ones must spill
        h.put(i, c, timeout=10, on_release=lambda i=i: released.append(i))
    _eventually(lambda: len(released) >= 2)
    assert not h.future.done() and tx.spill_usage()["spills_host"] >= 2
    _free_receiver(rx)
    h.future.result(30)
    _assert_verified(rx, "sp", 4)
    assert sorted(released) == [0, 1, 2, 3]
