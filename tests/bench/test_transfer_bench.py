"""`pdxfer bench transfer` end to end on both backends, and its baselines' own checks.

The bench's numbers are not judged here (no wall-clock assertions in tests); what is
checked: the documented JSON keys, one row per configuration, sane values, an empty
receiver ledger at the end (the command exits 1 otherwise), a refused bad chunk size, and
that the verified baselines really verify (a wrong checksum is caught on both paths).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from pdxfer.bench import rawsock
from pdxfer.bench.procs import ChildProcess
from tests.conftest import HAVE_NIXL

KEYS = ("backend", "chunk_size", "total_bytes", "concurrency", "gbps", "baseline", "baseline_gbps", "ratio",
        "verified_baseline", "verified_baseline_gbps", "ratio_vs_verified")


def _bench(*args: str, columns: int | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, "COLUMNS": str(columns)} if columns else None  # rich wraps at 80 off a terminal
    return subprocess.run(
        [sys.executable, "-m", "pdxfer", "--log-level", "warning", "bench", "transfer", *args],
        capture_output=True, text=True, timeout=300, env=env,
    )


_NIXL = pytest.mark.skipif(not HAVE_NIXL, reason="nixl is not installed")


@pytest.mark.parametrize("backend,register", [("tcp", False), pytest.param("nixl", False, marks=_NIXL),
                                              pytest.param("nixl", True, marks=_NIXL)])
def test_bench_transfer_json(backend, register):
    out = _bench("--backend", backend, "--chunk-size", "1MiB", "--concurrency", "1", "--concurrency", "2",
                 "--total", "8MiB", "--transfer-size", "4MiB", "--pairs", "1", "--verified-baseline", "--json",
                 *(["--register"] if register else []))
    assert out.returncode == 0, out.stderr
    rows = [json.loads(line) for line in out.stdout.splitlines() if line.startswith("{")]
    assert [r["concurrency"] for r in rows] == [1, 2]
    for r in rows:
        assert all(k in r for k in KEYS), r
        assert r["backend"] == backend and r["chunk_size"] == 1 << 20 and r["total_bytes"] == 8 << 20
        assert r["gbps"] > 0 and r["baseline_gbps"] > 0 and r["verified_baseline_gbps"] > 0
        assert r["ratio"] > 0 and r["ratio_vs_verified"] > 0
        assert r["verified_baseline"] == r["baseline"] + "_verified"
        assert r["verified_writers"] == (2 if backend == "nixl" else 1)  # one per NIXL worker (default 2)
        assert r["registered_source"] is register
        assert r["host_cpus"] >= 1
        for kind in ("pdxfer", "baseline", "verified_baseline"):  # CPU of both ends, per run kind
            cpu = r["cpu"][kind]
            assert cpu["sender_ms_per_gib"] > 0 and cpu["receiver_ms_per_gib"] > 0, (kind, cpu)
            assert 0 < cpu["busy"] <= 1.05, (kind, cpu)  # a share of the host's cores (tick rounding)
        if backend == "nixl":  # the baseline lands `concurrency` transfers side by side
            assert r["baseline_landing_bytes"] == r["concurrency"] * (4 << 20)


@pytest.mark.gpu
@pytest.mark.skipif(not HAVE_NIXL, reason="nixl is not installed")
def test_bench_transfer_vram_to_vram_json():
    """Needs a GPU (and CuPy for the devsum kernel): the device session's check."""
    torch = pytest.importorskip("torch")
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    pytest.importorskip("cupy")
    out = _bench("--backend", "nixl", "--device", "cuda", "--chunk-size", "2MiB", "--concurrency", "1",
                 "--total", "64MiB", "--transfer-size", "16MiB", "--pairs", "1", "--verified-baseline", "--json")
    assert out.returncode == 0, out.stderr
    rows = [json.loads(line) for line in out.stdout.splitlines() if line.startswith("{")]
    assert len(rows) == 1 and rows[0]["device"] == "cuda" and rows[0]["gbps"] > 0


def test_bench_transfer_refuses_a_chunk_larger_than_the_transfer():
    out = _bench("--chunk-size", "8MiB", "--transfer-size", "4MiB")
    assert out.returncode != 0 and "--chunk-size" in out.stderr


def test_verified_socket_baseline_catches_a_wrong_checksum(monkeypatch):
    base = ChildProcess([sys.executable, "-m", "pdxfer.bench.rawsock"])
    try:
        data = memoryview(np.arange(4 << 20, dtype=np.uint8))
        port = base.info["port"]
        rawsock.run_baseline(port, 8 << 20, data, 1 << 20, 2, verify=True)  # honest: passes
        monkeypatch.setattr(rawsock, "chunk_checksum", lambda view: 12345)
        with pytest.raises(RuntimeError, match="checksum did not match"):
            rawsock.run_baseline(port, 8 << 20, data, 1 << 20, 1, verify=True, timeout=30)
    finally:
        base.kill()


@pytest.mark.parametrize("chunk, conc", [(256 << 10, 1), (100_000, 2), (3 << 20, 1)])
def test_verified_socket_baseline_never_waits_for_bytes_that_are_not_coming(chunk, conc):
    """Its receiver sets SO_RCVLOWAT: chunks smaller than a piece, a stream that ends
    off a piece boundary, and reads that land part of a piece must all finish (a fixed
    1 MiB mark, and a blocking recv with a mark, both hung here)."""
    base = ChildProcess([sys.executable, "-m", "pdxfer.bench.rawsock"])
    try:
        data = memoryview(np.arange(8 << 20, dtype=np.uint8))
        for _ in range(5):
            rawsock.run_baseline(base.info["port"], (16 << 20) + 12345, data, chunk, conc, verify=True, timeout=30)
    finally:
        base.kill()


@pytest.mark.skipif(not HAVE_NIXL, reason="nixl is not installed")
@pytest.mark.parametrize("writers", [1, 2])
@pytest.mark.parametrize("lie", [False, True])
def test_verified_nixl_baseline_counts_wrong_checksums(monkeypatch, lie, writers):
    from pdxfer.bench import nixlraw
    from pdxfer.transport.nixl_agent import apply_ucx_env

    apply_ucx_env()
    size = 4 << 20
    target = ChildProcess([sys.executable, "-m", "pdxfer.bench.nixlraw", str(size)], ready_timeout=60)
    pool: list = []
    try:
        data = memoryview(np.arange(size, dtype=np.uint8))
        pool = [nixlraw.RawWriter(target.info, data) for _ in range(writers)]
        if lie:
            monkeypatch.setattr(nixlraw, "chunk_checksum", lambda view: 12345)
        nixlraw.run_parallel(pool, 8 << 20, 1 << 20, 2, verify=True)  # 8 chunks between them
        for w in pool:
            w.close()
        pool = []
        final = target.finish(timeout=30)
    finally:
        for w in pool:
            w.close()
        target.kill()
    assert final is not None and final["notifications"] == 8
    assert final["verify_mismatches"] == (8 if lie else 0)


@pytest.mark.skipif(not HAVE_NIXL, reason="nixl is not installed")
@pytest.mark.parametrize("ranges", [1, 3])
def test_nixl_baseline_lands_transfers_side_by_side(ranges):
    """With `ranges` transfers in flight pdxfer's receiver lands each in its own range, so
    the baseline does too: transfer k goes to range k % ranges, every chunk verified where
    the notification says it landed, and the WRITEs cover exactly ranges x transfer."""
    from pdxfer.bench import nixlraw
    from pdxfer.transport.nixl_agent import apply_ucx_env

    apply_ucx_env()
    size = 4 << 20
    target = ChildProcess([sys.executable, "-m", "pdxfer.bench.nixlraw", str(3 * size)], ready_timeout=60)
    writer = None
    try:
        writer = nixlraw.RawWriter(target.info, memoryview(np.arange(size, dtype=np.uint8)))
        with pytest.raises(ValueError, match="4 landing ranges"):
            writer.run(size, 1 << 20, 1, ranges=4)  # 4 x 4 MiB do not fit the 12 MiB target
        writer.run(6 * size, 1 << 20, 2, verify=True, ranges=ranges)  # 6 transfers' worth
        writer.close()
        writer = None
        final = target.finish(timeout=30)
    finally:
        if writer is not None:
            writer.close()
        target.kill()
    assert final is not None and final["notifications"] == 24 and final["verify_mismatches"] == 0
    assert final["verified_span"] == ranges * size


@pytest.mark.parametrize("verified", [False, True])
def test_bench_transfer_tables_without_json(verified):
    """The human-readable run prints both tables (throughput, then CPU per GiB), with or
    without the verified baseline, and a CPU figure for every run kind it made."""
    out = _bench("--backend", "tcp", "--chunk-size", "1MiB", "--concurrency", "1", "--total", "4MiB",
                 "--transfer-size", "4MiB", "--pairs", "1", *(["--verified-baseline"] if verified else []), columns=200)
    assert out.returncode == 0, out.stderr
    assert "pdxfer bench transfer --backend tcp" in out.stdout
    assert "CPU ms per GiB" in out.stdout
    cpu_table = out.stdout[out.stdout.index("CPU ms per GiB"):]
    assert ("ver tx" in cpu_table) is verified and "raw tx" in cpu_table and "pdx cores" in cpu_table
    assert "?" not in cpu_table.split("1MiB", 1)[1]  # every figure known on Linux
