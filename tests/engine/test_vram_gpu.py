"""VRAM→VRAM (and host→VRAM, VRAM→host) transfers over NIXL on a real GPU: the receive
region is one CUDA allocation registered as VRAM, GPU chunks are WRITEn from VRAM, and
every chunk is checked with devsum64 computed on the GPU. Skipped without CUDA, CuPy
(which compiles the checksum kernel) or nixl; run on the device machine."""

from __future__ import annotations

import os

import pytest
import torch

from pdxfer.errors import IntegrityError, ProtocolError
from pdxfer.layout.payload import Payload

from tests.conftest import HAVE_NIXL
from tests.engine.test_transfers import _eventually

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
    pytest.mark.skipif(not HAVE_NIXL, reason="nixl is not installed"),
]


@pytest.fixture(autouse=True, scope="module")
def _cupy() -> None:
    pytest.importorskip("cupy", reason="CuPy compiles the devsum kernel: install pdxfer[cuda12] or [cuda13]")


def _gpu_receiver(make_receiver, **kw):
    kw.setdefault("capacity", 256 << 20)
    return make_receiver(device="cuda:0", backends=("nixl",), **kw)


def _gpu_chunks(sizes, seed=0):
    g = torch.Generator(device="cuda").manual_seed(seed)
    return [torch.randint(0, 256, (n,), dtype=torch.uint8, device="cuda", generator=g) for n in sizes]


def test_vram_to_vram_lands_every_byte_on_the_gpu(make_receiver, make_sender):
    r = _gpu_receiver(make_receiver)
    s = make_sender(backend="nixl")
    chunks = _gpu_chunks([1, 4095, 100_000, 2 << 20, 16 << 20])
    fut = s.submit(r.control_address, "t-vram", chunks)
    with r.wait("t-vram", timeout=60) as got:
        for i, c in enumerate(chunks):
            landed = got.chunk(i)
            assert landed.is_cuda and torch.equal(landed, c)
    fut.result(60)
    _eventually(lambda: r.ledger().reserved_bytes == 0 and s.budget_used == 0)


def test_many_vram_transfers_at_small_capacity(make_receiver, make_sender):
    """Admission on a GPU region: 64 transfers of 4 MiB through 16 MiB of VRAM."""
    r = _gpu_receiver(make_receiver, capacity=16 << 20)
    s = make_sender(backend="nixl", memory_budget=1 << 30)
    data = {f"t-{k}": _gpu_chunks([1 << 20] * 4, seed=k) for k in range(64)}
    futs = {tid: s.submit(r.control_address, tid, chunks) for tid, chunks in data.items()}
    for tid, chunks in data.items():
        with r.wait(tid, timeout=120) as got:
            assert torch.equal(got.view, torch.cat(chunks)), tid
        futs[tid].result(120)
        assert r.ledger().reserved_bytes <= 16 << 20
    _eventually(lambda: r.ledger().reserved_bytes == 0 and s.budget_used == 0)


def test_host_chunks_into_vram_and_gpu_chunks_into_a_devsum_host_region(make_receiver, make_sender):
    r_gpu = _gpu_receiver(make_receiver)
    r_host = make_receiver(checksum="devsum64", backends=("nixl",))
    s = make_sender(backend="nixl")
    host = [os.urandom(n) for n in (3000, 1 << 20)]
    s.submit(r_gpu.control_address, "t-h2d", host).result(60)
    with r_gpu.wait("t-h2d", timeout=60) as got:
        assert [bytes(got.chunk(i).cpu().numpy()) for i in range(2)] == host
    gpu = _gpu_chunks([5000, 1 << 20], seed=7)
    s.submit(r_host.control_address, "t-d2h", gpu).result(60)
    with r_host.wait("t-d2h", timeout=60) as got:
        assert [bytes(got.chunk(i)) for i in range(2)] == [bytes(c.cpu().numpy()) for c in gpu]


def test_a_corrupted_gpu_checksum_fails_the_transfer(make_receiver, make_sender, monkeypatch):
    """The receiver recomputes devsum64 on its GPU: a sender whose checksum is off by one
    bit for one chunk is caught (only the sender's side is patched)."""
    import pdxfer.engine.outgoing as og

    real = og.Outgoing._checksum

    async def lying(self, item, payload):
        value = await real(self, item, payload)
        return value ^ 1 if payload.nbytes == 12345 else value

    monkeypatch.setattr(og.Outgoing, "_checksum", lying)
    r = _gpu_receiver(make_receiver)
    s = make_sender(backend="nixl")
    fut = s.submit(r.control_address, "t-bad", _gpu_chunks([12345, 1000]))
    with pytest.raises(IntegrityError):
        fut.result(60)
    _eventually(lambda: r.ledger().reserved_bytes == 0 and s.budget_used == 0)


def test_gpu_chunks_to_an_xxh3_host_receiver_fail_naming_the_fix(make_receiver, make_sender):
    r = make_receiver(backends=("nixl",))
    s = make_sender(backend="nixl")
    h = s.open(r.control_address, "t-xxh3", Payload.uniform(4096, 4096))
    h.put(0, _gpu_chunks([4096])[0])
    with pytest.raises(ProtocolError, match="device='cuda'"):
        h.future.result(60)
    _eventually(lambda: r.ledger().reserved_bytes == 0 and s.budget_used == 0)


def test_chunks_of_a_registered_gpu_buffer_write_from_its_one_registration(make_receiver, make_sender):
    r = _gpu_receiver(make_receiver)
    s = make_sender(backend="nixl")
    (pool,) = _gpu_chunks([8 << 20])  # e.g. a KV cache region, registered once
    s.register(pool)
    side = s._nixl.result()
    for t in range(2):
        chunks = [pool[i << 20:(i + 1) << 20] for i in range(8)]
        fut = s.submit(r.control_address, f"vram-pool-{t}", chunks)
        with r.wait(f"vram-pool-{t}", timeout=60) as got:
            assert all(torch.equal(got.chunk(i), c) for i, c in enumerate(chunks))
        fut.result(60)
    assert sum(p.cache.pinned_hits for p in side.progresses) == 16
    assert sum(p.cache.misses for p in side.progresses) == 0
    assert s.unregister(pool)
    _eventually(lambda: r.ledger().reserved_bytes == 0 and s.budget_used == 0)
