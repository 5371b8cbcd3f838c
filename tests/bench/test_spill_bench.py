"""`pdxfer bench spill` runs end to end and prints the documented JSON keys; a chunk
size that cannot work is refused with a message naming it."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest


def test_bench_spill_json(tmp_path):
    out = subprocess.run(
        [sys.executable, "-m", "pdxfer", "--log-level", "warning", "bench", "spill", "--total", "8MiB",
         "--chunk-size", "1MiB", "--pairs", "2", "--dir", str(tmp_path), "--json"],
        capture_output=True, text=True, timeout=120,
    )
    assert out.returncode == 0, out.stderr
    rows = [json.loads(line) for line in out.stdout.splitlines() if line.startswith("{")]
    assert len(rows) == 1
    r = rows[0]
    for key in ("chunk_size", "total_bytes", "gbps", "baseline", "baseline_gbps", "ratio"):
        assert key in r
    assert r["chunk_size"] == 1 << 20 and r["total_bytes"] == 8 << 20
    assert r["gbps"] > 0 and r["baseline_gbps"] > 0 and r["ratio"] > 0
    assert r["restores_disk"] == 2 * 8 and r["integrity_errors"] == 0  # every chunk read back, verified
    assert [p for p in tmp_path.rglob("*") if p.is_file()] == []  # the bench cleans up after itself


@pytest.mark.parametrize("chunk", ["0", "16MiB"])
def test_bench_spill_refuses_bad_chunk_size(tmp_path, chunk):
    out = subprocess.run(
        [sys.executable, "-m", "pdxfer", "bench", "spill", "--total", "8MiB", "--chunk-size", chunk,
         "--dir", str(tmp_path)],
        capture_output=True, text=True, timeout=60,
    )
    assert out.returncode != 0 and "--chunk-size" in out.stderr
