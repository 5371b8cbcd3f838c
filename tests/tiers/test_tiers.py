import fcntl
import os
import signal
import subprocess
import sys

import numpy as np
import pytest

from pdxfer.errors import IntegrityError
from pdxfer.protocol.checksum import chunk_checksum
from pdxfer.tiers import DiskTier, HostTier, SpillStore, cleanup_orphans
from pdxfer.tiers import disk as disk_module


def _chunk(n: int, seed: int) -> memoryview:
    return memoryview(np.random.default_rng(seed).integers(0, 255, n, dtype=np.uint8))


def test_host_tier_is_bounded_and_accounts_exactly():
    host = HostTier(10_000, pinned=False)
    a = host.put(_chunk(6000, 1), 1)
    assert a is not None and host.used == 6000
    assert host.put(_chunk(5000, 2), 2) is None  # does not fit: caller goes down a tier
    host.free(a)
    assert host.used == 0
    with pytest.raises(ValueError, match="twice"):
        host.free(a)


def test_store_spills_host_then_disk_and_reads_back_verified(tmp_path):
    store = SpillStore(HostTier(3000, pinned=False), DiskTier(tmp_path, 6000))
    data = [_chunk(2000, i) for i in range(4)]
    spilled = [store.spill(d, chunk_checksum(d)) for d in data]
    assert [s.tier for s in spilled] == ["host", "disk", "disk", "disk"]
    assert store.spill(_chunk(5000, 9), 0) is None  # every tier full
    assert store.demote(spilled[0]) is False  # disk is full too
    store.release(spilled[3])
    assert store.demote(spilled[0]) is True and spilled[0].tier == "disk"
    for s, d in zip(spilled[:3], data):
        out = memoryview(bytearray(s.nbytes))
        store.read_into(s, out)
        assert bytes(out) == bytes(d)
        store.release(s)
    u = store.usage()
    assert u["host_bytes"] == 0 and u["disk_bytes"] == 0 and u["refused"] == 1 and u["demotions"] == 1
    assert store.disk.files() == []
    store.close()
    assert not store.disk.dir.exists()


@pytest.mark.parametrize("damage", ["flip", "truncate", "delete"])
def test_corrupted_spill_file_is_a_typed_integrity_error(tmp_path, damage):
    disk = DiskTier(tmp_path, 1 << 20)
    d = _chunk(100_000, 3)
    block = disk.put(d, chunk_checksum(d))
    raw = bytearray(block.path.read_bytes())
    if damage == "flip":
        raw[12345] ^= 0x40
        block.path.write_bytes(raw)
    elif damage == "truncate":
        block.path.write_bytes(raw[:-10])
    else:
        block.path.unlink()
    with pytest.raises(IntegrityError) as info:
        disk.read_into(block, memoryview(bytearray(block.nbytes)), transfer_id="t-corrupt")
    assert info.value.transfer_id == "t-corrupt"
    disk.free(block)
    disk.close()


def test_failed_write_leaves_no_partial_file_and_no_usage(tmp_path, monkeypatch):
    disk = DiskTier(tmp_path, 64 << 20)
    real_write = os.write
    calls = {"n": 0}

    def failing_write(fd, data):
        calls["n"] += 1
        if calls["n"] == 2:
            raise OSError(28, "No space left on device")
        return real_write(fd, data)

    monkeypatch.setattr(os, "write", failing_write)
    with pytest.raises(OSError, match="No space"):
        disk.put(_chunk(20 << 20, 4), 0)
    monkeypatch.undo()
    assert disk.used == 0 and disk.files() == []
    disk.close()


def test_orphans_of_a_killed_process_are_removed_but_live_ones_kept(tmp_path):
    code = ("import sys,time; from pdxfer.tiers import DiskTier; import numpy as np;"
            "d=DiskTier(sys.argv[1], 1<<20); d.put(memoryview(np.ones(4096,np.uint8)), 1);"
            "print(d.dir, flush=True); time.sleep(60)")
    dead = subprocess.Popen([sys.executable, "-c", code, str(tmp_path)], stdout=subprocess.PIPE, text=True)
    live = subprocess.Popen([sys.executable, "-c", code, str(tmp_path)], stdout=subprocess.PIPE, text=True)
    try:
        dead_dir = dead.stdout.readline().strip()
        live_dir = live.stdout.readline().strip()
        assert os.path.isdir(dead_dir) and os.listdir(dead_dir)
        dead.send_signal(signal.SIGKILL)
        dead.wait(10)
        mine = DiskTier(tmp_path, 1 << 20)  # start-up cleanup happens here
        assert mine.orphans_removed == 1
        assert not os.path.exists(dead_dir) and os.path.isdir(live_dir)
        assert cleanup_orphans(tmp_path) == 0
        mine.close()
    finally:
        for p in (dead, live):
            if p.poll() is None:
                p.kill()
            p.wait(10)
            p.stdout.close()


def test_a_worker_starting_beside_another_never_deletes_its_directory(tmp_path, monkeypatch):
    """The other worker's clean-up runs at the worst moment: before the new lock is taken."""
    real_flock = fcntl.flock
    swept: list[int] = []

    def flock_after_a_sweep(fd, op):
        if op == fcntl.LOCK_EX and not swept:
            swept.append(cleanup_orphans(tmp_path))
        return real_flock(fd, op)

    monkeypatch.setattr(disk_module.fcntl, "flock", flock_after_a_sweep)
    tier = DiskTier(tmp_path, 1 << 20)
    assert swept == [0]  # the sweep saw the directory being set up and left it
    assert tier.put(_chunk(4096, 3), 1) is not None
    assert cleanup_orphans(tmp_path) == 0 and len(tier.files()) == 1
    tier.close()
    assert os.listdir(tmp_path) == []


def test_staging_directories_of_dead_processes_are_removed(tmp_path):
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait(10)  # reaped: its pid names no process now
    dead = tmp_path / f".pdxfer-staging-{child.pid}-00000000"
    live = tmp_path / f".pdxfer-staging-{os.getpid()}-00000000"
    foreign = tmp_path / ".pdxfer-staging-notapid"
    for d in (dead, live, foreign):
        d.mkdir()
        (d / "owner.lock").touch()
    assert cleanup_orphans(tmp_path) == 1
    assert not dead.exists() and live.is_dir() and foreign.is_dir()


def test_many_workers_starting_at_once_each_keep_their_directory(tmp_path):
    code = ("import sys; from pdxfer.tiers import DiskTier; import numpy as np;"
            "d=DiskTier(sys.argv[1], 1<<20); d.put(memoryview(np.ones(4096,np.uint8)), 1);"
            "print(len(d.files()), flush=True); sys.stdin.read(); d.close()")
    procs = [subprocess.Popen([sys.executable, "-c", code, str(tmp_path)], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(8)]
    try:
        outs = [p.communicate("", timeout=60) for p in procs]
        assert [(p.returncode, o.strip()) for p, (o, _) in zip(procs, outs)] == [(0, "1")] * 8, outs
        assert os.listdir(tmp_path) == []
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
            p.wait(10)
