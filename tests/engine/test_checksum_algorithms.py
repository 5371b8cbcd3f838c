"""The receiver names the chunk checksum (HELLO_OK `checksum`), and the sender computes
that one: xxh3 for host regions by default, devsum64 for GPU regions (and for a host
region configured with it, which is what runs here without a GPU)."""

from __future__ import annotations

import os

import msgspec
import pytest

from pdxfer.engine import ReceiverConfig
from pdxfer.errors import IntegrityError
from pdxfer.protocol import messages as m
from pdxfer.protocol.checksum import DEVSUM64, XXH3, host_checksum
from pdxfer.protocol.devsum import devsum

from tests.conftest import HAVE_NIXL
from tests.engine.test_transfers import _eventually


def test_a_devsum64_receiver_gets_devsum64_checksums_and_verified_bytes(make_receiver, make_sender, backend):
    r = make_receiver(checksum=DEVSUM64)
    s = make_sender(backend=backend)
    chunks = [os.urandom(n) for n in (1, 4095, 100_000, 1 << 20)]
    fut = s.submit(r.control_address, "t-devsum", chunks)
    with r.wait("t-devsum", timeout=20) as got:
        assert [bytes(got.chunk(i)) for i in range(4)] == chunks
    fut.result(20)
    _eventually(lambda: r.ledger().reserved_bytes == 0 and s.budget_used == 0)


def test_a_sender_that_sends_the_wrong_algorithm_is_caught(make_receiver, make_sender, backend, monkeypatch):
    """The receiver really recomputes devsum64: chunks checksummed with xxh3 fail."""
    import pdxfer.engine.outgoing as outgoing

    monkeypatch.setattr(outgoing, "host_checksum", lambda algo, data: host_checksum(XXH3, data))
    r = make_receiver(checksum=DEVSUM64)
    s = make_sender(backend=backend)
    fut = s.submit(r.control_address, "t-wrong-algo", [os.urandom(5000), os.urandom(7000)])
    with pytest.raises(IntegrityError):
        fut.result(20)
    _eventually(lambda: r.ledger().reserved_bytes == 0 and s.budget_used == 0)


def test_put_time_xxh3_is_not_trusted_by_a_devsum64_receiver(make_receiver, make_sender):
    """checksum_on_put hashes with xxh3 before the receiver is known: a devsum64 lane
    recomputes rather than sending a checksum the receiver would reject."""
    r = make_receiver(checksum=DEVSUM64)
    s = make_sender(checksum_on_put=True)
    chunks = [os.urandom(3000), os.urandom(9000)]
    s.submit(r.control_address, "t-onput", chunks).result(20)
    with r.wait("t-onput", timeout=20) as got:
        assert bytes(got.view) == b"".join(chunks)


def test_hello_ok_from_an_older_receiver_means_dram_and_xxh3():
    old = msgspec.msgpack.encode({"t": "hello_ok", "v": m.PROTOCOL_VERSION, "cid": 3, "receiver_id": "r", "capabilities": ["tcp"],
                                  "data_address": "127.0.0.1:1", "conn_token": 9, "lease_ms": 1000})
    msg = m.decode(m.seal(old))  # without the fields added since
    assert isinstance(msg, m.HelloOk)
    assert (msg.checksum, msg.nixl_mem, msg.nixl_dev) == (XXH3, "DRAM", 0)


@pytest.mark.parametrize("kw, match", [
    ({"device": "gpu"}, "device must be 'cpu', 'cuda' or 'cuda:N'"),
    ({"device": "cuda:x"}, "device must be"),
    ({"device": "cuda", "backends": ("tcp", "nixl")}, "needs backends=\\('nixl',\\)"),
    ({"device": "cuda:1"}, "tcp data path lands bytes in host memory"),
    ({"checksum": "md5"}, "checksum must be one of"),
])
def test_bad_device_or_checksum_settings_are_named(kw, match):
    with pytest.raises(ValueError, match=match):
        ReceiverConfig(capacity=1 << 20, **kw)


def test_default_checksum_follows_the_region():
    assert ReceiverConfig(capacity=1 << 20).checksum_algorithm == XXH3
    assert ReceiverConfig(capacity=1 << 20, device="cuda:0", backends=("nixl",)).checksum_algorithm == DEVSUM64
    assert ReceiverConfig(capacity=1 << 20, checksum=DEVSUM64).checksum_algorithm == DEVSUM64


def test_host_checksum_names_the_algorithms():
    assert host_checksum(DEVSUM64, b"abc") == devsum(b"abc")
    with pytest.raises(ValueError, match="unknown checksum algorithm 'crc'"):
        host_checksum("crc", b"abc")


def test_a_gpu_chunk_on_the_tcp_path_is_refused_by_name(make_receiver, make_sender):
    from tests.layout.test_buffers import FakeCudaArray

    r = make_receiver()
    s = make_sender()  # backend tcp
    with pytest.raises(ValueError, match=r"chunk 1 is in GPU memory.*backend='nixl'"):
        s.submit(r.control_address, "t-gpu-tcp", [b"x" * 16, FakeCudaArray()])
    from pdxfer.layout.payload import Payload

    h = s.open(r.control_address, "t-gpu-tcp-2", Payload.uniform(16, 16))
    with pytest.raises(ValueError, match="chunk 0 is in GPU memory"):
        h.put(0, FakeCudaArray())
    h.abort("test done")
    _eventually(lambda: r.ledger().reserved_bytes == 0 and s.budget_used == 0)


def test_a_gpu_region_without_a_gpu_is_a_clear_error():
    import torch

    from pdxfer.engine import Receiver

    if torch.cuda.is_available():
        pytest.skip("this host has a GPU")
    with pytest.raises(ValueError, match="cuda:0, but this process sees 0 CUDA devices"):
        Receiver(ReceiverConfig(capacity=1 << 20, device="cuda", backends=("nixl",)))


@pytest.mark.skipif(not HAVE_NIXL, reason="nixl is not installed")
def test_a_checksum_that_cannot_be_computed_fails_the_transfer_not_the_receiver(make_receiver, make_sender,
                                                                              monkeypatch):
    """If the region cannot checksum landed chunks (on a GPU: a failed kernel), their
    transfers fail with IntegrityError, their bytes are reclaimed, and the next transfer
    is served. On this host region the progress thread's early hashing fails too, so the
    loop falls back to the region's checksums, which fail."""
    from pdxfer.engine.landed_hashes import LandedHashes
    from pdxfer.engine.region import ReceiveRegion

    real = ReceiveRegion.checksums
    real_early = LandedHashes.__call__
    broken = {"on": True}

    def early(self, batch):
        if broken["on"]:
            raise RuntimeError("test: hashing on the progress thread failed")
        return real_early(self, batch)

    def checksums(self, views):
        if broken["on"]:
            raise RuntimeError("test: the checksum kernel failed")
        return real(self, views)

    monkeypatch.setattr(ReceiveRegion, "checksums", checksums)
    monkeypatch.setattr(LandedHashes, "__call__", early)
    r = make_receiver(backends=("nixl",))
    s = make_sender(backend="nixl")
    with pytest.raises(IntegrityError, match="checksumming landed chunks failed"):
        s.submit(r.control_address, "t-broken", [os.urandom(10_000)] * 3).result(20)
    _eventually(lambda: r.ledger().reserved_bytes == 0 and s.budget_used == 0)
    broken["on"] = False
    chunks = [os.urandom(10_000), os.urandom(3)]
    s.submit(r.control_address, "t-after", chunks).result(20)
    with r.wait("t-after", timeout=20) as got:
        assert bytes(got.view) == b"".join(chunks)
