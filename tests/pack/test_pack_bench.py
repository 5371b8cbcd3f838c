"""`pdxfer bench pack` (CPU): one JSON object per line with the agreed keys, or a table."""

from __future__ import annotations

import argparse
import json

import pytest

from pdxfer.pack import bench


def _args(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    bench.add_arguments(parser)
    return parser.parse_args(list(argv))


def test_json_lines(capsys: pytest.CaptureFixture[str]) -> None:
    assert bench.run(_args("--json", "--device", "cpu", "--tokens", "16", "--repeat", "1",
                           "--layouts", "llama8b-hnd,hetero")) == 0
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [(r["layout"], r["op"]) for r in rows] == [
        ("llama8b-hnd", "pack"), ("llama8b-hnd", "unpack"), ("hetero", "pack"), ("hetero", "unpack")]
    for r in rows:
        assert set(bench.KEYS) <= set(r)
        assert r["device"] == "cpu" and r["tokens"] == 16
        assert r["gbps"] > 0 and r["copy_gbps"] > 0 and r["torch_gbps"] > 0
        assert r["ratio_to_copy"] == pytest.approx(r["gbps"] / r["copy_gbps"], rel=0.02)
        assert r["speedup_vs_torch"] == pytest.approx(r["gbps"] / r["torch_gbps"], rel=0.02)
    assert rows[0]["bytes"] == 32 * 2 * 16 * 8 * 128 * 2


def test_table(capsys: pytest.CaptureFixture[str]) -> None:
    assert bench.run(_args("--device", "cpu", "--tokens", "8", "--repeat", "1", "--layouts", "deepseek-mla")) == 0
    out = capsys.readouterr().out
    assert "deepseek-mla" in out and "unpack" in out


def test_unknown_layout() -> None:
    with pytest.raises(SystemExit, match="unknown layouts"):
        bench.run(_args("--layouts", "nope", "--device", "cpu"))
