"""The prefill worker on a GPU KV cache: blocks are packed on the GPU, then WRITEn from
VRAM over NIXL (from the registered staging pool) or copied to the host for TCP. The
decode here keeps a host cache, so only the prefill's GPU path is under test. Skipped
without CUDA (and, for the kernels, CuPy); run on the device machine."""

from __future__ import annotations

import time
from typing import Any

import pytest

torch = pytest.importorskip("torch")

from pdxfer.plugins.vllm.meta import PluginConfig, RecvSpec, SendSpec, StepMeta  # noqa: E402
from pdxfer.plugins.vllm.worker import WorkerSide  # noqa: E402
from tests.conftest import HAVE_NIXL  # noqa: E402
from tests.plugins.test_vllm_worker import LAYERS, caches, collect, kv_config, wait_for  # noqa: E402
from vllm_support.servers import free_port  # noqa: E402

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]


@pytest.fixture(autouse=True, scope="module")
def _cupy() -> None:
    pytest.importorskip("cupy", reason="CuPy compiles the pack kernels: install pdxfer[cuda12] or [cuda13]")


@pytest.mark.parametrize("backend", ["tcp", pytest.param("nixl", marks=pytest.mark.skipif(
    not HAVE_NIXL, reason="nixl is not installed"))])
def test_gpu_prefill_pull_arrives_intact(backend: str) -> None:
    p = WorkerSide(PluginConfig(side_port=free_port(), lease_s=30, handshake_timeout_s=5, recv_timeout_s=20,
                                backend=backend), producer=True, consumer=False)
    d = WorkerSide(PluginConfig(side_port=free_port(), handshake_timeout_s=5, recv_timeout_s=20),
                   producer=False, consumer=True)
    pc = {k: v.cuda() for k, v in caches(1).items()}
    dc = caches(None)
    p.register(pc, kv_config())
    d.register(dc, kv_config())
    try:
        src, dst = (3, 7, 1), (9, 2, 5)
        p.on_meta(StepMeta(sends=[SendSpec("preq", "T1", (src,), 70, time.time() + 30)]))
        d.on_meta(StepMeta(recvs=[RecvSpec("dreq", "T1", (dst,), 0, 70, p.cfg.side_host, p.cfg.side_port)]))
        _, recving, failed = collect(d, timeout=30)
        assert recving == {"dreq"} and not failed
        for name in LAYERS:
            for s, t in zip(src, dst):
                assert torch.equal(pc[name][s].cpu(), dc[name][t])
        assert wait_for(lambda: p.stats()["in_flight"] == 0)
        if backend == "nixl":
            assert p.staging is not None and p.staging.buffer.is_cuda
            regs: dict[str, Any] = p.sender.nixl_registrations  # type: ignore[union-attr]
            assert regs["per_chunk"] == 0 and regs["pinned"] > 0, regs
            assert wait_for(lambda: p.staging.used == 0)
    finally:
        p.shutdown()
        d.shutdown()
