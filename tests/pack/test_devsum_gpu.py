"""devsum64 of CUDA tensors (csrc/devsum.cu through CuPy) against the numpy reference.
Needs a GPU; skipped without CUDA or without CuPy."""

from __future__ import annotations

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pdxfer.pack.devsum_cuda import device_checksums
from pdxfer.protocol.devsum import devsum

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]


@pytest.fixture(autouse=True, scope="module")
def _cupy() -> None:
    pytest.importorskip("cupy", reason="CuPy compiles the kernel: install pdxfer[cuda12] or [cuda13]")


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.tuples(st.integers(0, 300_000), st.integers(0, 7)), min_size=1, max_size=6), st.integers(0, 2**31))
def test_device_sums_match_the_reference(chunks, seed) -> None:
    g = torch.Generator().manual_seed(seed)
    host = [torch.randint(0, 256, (n + 8,), dtype=torch.uint8, generator=g)[off : off + n] for n, off in chunks]
    dev_raw = [torch.randint(0, 256, (n + 8,), dtype=torch.uint8, generator=g) for n, _ in chunks]
    dev = []
    for h, raw, (n, off) in zip(host, dev_raw, chunks):
        d = raw.cuda()[off : off + n]  # misaligned on purpose: byte-wise loads on the device
        d.copy_(h)
        dev.append(d)
    assert device_checksums(dev) == [devsum(h.numpy()) for h in host]


def test_engine_sized_chunks_on_a_side_stream() -> None:
    chunks = [torch.randint(0, 256, (n,), dtype=torch.uint8, device="cuda") for n in (2 << 20, 16 << 20, 5)]
    want = [devsum(c.cpu().numpy()) for c in chunks]
    s = torch.cuda.Stream()
    with torch.cuda.stream(s):
        assert device_checksums(chunks) == want
    flipped = chunks[1].clone()
    flipped[12345] ^= 1
    assert device_checksums([flipped])[0] != want[1]


def test_refuses_host_tensors() -> None:
    with pytest.raises(ValueError, match="CUDA tensors"):
        device_checksums([torch.zeros(8, dtype=torch.uint8)])
