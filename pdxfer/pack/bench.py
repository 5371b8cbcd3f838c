"""`pdxfer bench pack`: GB/s of pack and unpack next to the baselines that bound them.

Each figure is measured in the same run as two baselines on the same bytes: a plain
device-to-device copy (`dst.copy_(src)`, the ceiling a gather can approach) and a naive
torch gather (one `index_select` / `index_copy_` per layer and plane, what a connector
without kernels would do). Ratios to those, not absolute GB/s, are what compare across
machines. On CPU the torch reference is measured; on CUDA the csrc/ kernels.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from typing import Any, Callable

import torch

from pdxfer.layout.kv import CacheKind, KVLayout, LayerGroup
from pdxfer.pack.api import Packer
from pdxfer.pack.plan import group_ranges
from pdxfer.pack.views import allocate


def _layers(prefix: str, n: int) -> tuple[str, ...]:
    return tuple(f"{prefix}{i}" for i in range(n))


def _llama8b(kind: CacheKind) -> KVLayout:
    return KVLayout((LayerGroup("attn", kind, 16, 8, 128, "bfloat16", _layers("l", 32)),))


LAYOUTS: dict[str, Callable[[], KVLayout]] = {
    "llama8b-nhd": lambda: _llama8b(CacheKind.KV_JOINT_NHD),
    "llama8b-hnd": lambda: _llama8b(CacheKind.KV_JOINT_HND),
    "deepseek-mla": lambda: KVLayout((LayerGroup("mla", CacheKind.MLA, 64, 1, 576, "bfloat16", _layers("l", 61)),)),
    "hetero": lambda: KVLayout((
        LayerGroup("attn", CacheKind.MLA, 64, 1, 576, "bfloat16", _layers("a", 16)),
        LayerGroup("comp", CacheKind.MLA, 4, 1, 512, "bfloat16", _layers("c", 16), compress_ratio=4),
        LayerGroup("idx", CacheKind.MLA, 1, 1, 132, "uint8", _layers("i", 16)),
    )),
}
KEYS = (
    "device", "layout", "op", "tokens", "bytes", "gbps", "copy_gbps", "torch_gbps", "ratio_to_copy", "speedup_vs_torch",
)  # fmt: skip


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--layouts", default=",".join(LAYOUTS), help=f"comma list of {', '.join(LAYOUTS)}")
    parser.add_argument("--tokens", type=int, default=None, help="tokens per pack (default 256 on CPU, 8192 on CUDA)")
    parser.add_argument(
        "--repeat", type=int, default=None, help="timed runs per figure (median; default 3 CPU, 20 CUDA)"
    )
    parser.add_argument("--device", default=None, help="cpu or cuda[:n] (default: cuda when available)")
    parser.add_argument("--json", action="store_true", help="one JSON object per line instead of a table")


def _timer(device: torch.device, repeat: int) -> Callable[[Callable[[], object]], float]:
    """Median seconds of fn() over `repeat` runs after one warm-up (CUDA events on GPUs)."""

    def measure(fn: Callable[[], object]) -> float:
        fn()
        times = []
        for _ in range(repeat):
            if device.type == "cuda":
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                fn()
                end.record()
                end.synchronize()
                times.append(start.elapsed_time(end) / 1e3)
            else:
                t = time.perf_counter()
                fn()
                times.append(time.perf_counter() - t)
        return statistics.median(times)

    return measure


Plane = tuple[Any, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]


def _gather_parts(planes: list[Plane]) -> list[torch.Tensor]:
    return [rows.index_select(0, idx) if rows is not None else u8[b, s] for rows, u8, idx, b, s in planes]


def _naive(packer: Packer, tables: list[list[int]], tokens: int) -> tuple[Callable[[], object], Callable[[], object]]:
    """Per-layer, per-plane index_select gather (+ cat) and index_copy_ scatter.

    Contiguous planes are flattened to [slots, row bytes] and indexed by slot; others
    (HND) fall back to advanced indexing on (block, offset).
    """
    bound, layout = packer.bound, packer.layout
    counts = [bound.num_blocks(i) for i in range(len(layout.groups))]
    planes: list[Plane] = []
    for gi, (g, r) in enumerate(zip(layout.groups, group_ranges(layout, tables, 0, tokens, counts, writing=True))):
        if r is None:
            continue
        blk, slot = r.slots(g.block_size)
        idx = torch.from_numpy(blk * g.block_size + slot).to(bound.device)
        b, s = torch.from_numpy(blk).to(bound.device), torch.from_numpy(slot).to(bound.device)
        for layer in bound.planes[gi]:
            for p in layer:
                u8 = p.view(torch.uint8)
                rows = u8.reshape(-1, g.num_kv_heads * g.row_bytes) if u8.is_contiguous() else None
                planes.append((rows, u8, idx, b, s))
    gathered = _gather_parts(planes)

    def gather() -> object:
        return torch.cat([t.reshape(-1) for t in _gather_parts(planes)])

    def scatter() -> object:
        for (rows, u8, idx, b, s), src in zip(planes, gathered):
            if rows is not None:
                rows.index_copy_(0, idx, src)
            else:
                u8[b, s] = src
        return None

    return gather, scatter


def _sig(x: float) -> float:
    return float(f"{x:.4g}")


def bench_layout(name: str, layout: KVLayout, device: torch.device, tokens: int, repeat: int) -> list[dict[str, Any]]:
    gen = torch.Generator().manual_seed(0)
    need = [g.blocks_for(tokens) for g in layout.groups]
    nb = [n * 2 + 1 for n in need]
    packer = Packer(layout, allocate(layout, nb, device=device, generator=gen))
    tables = [torch.randperm(n, generator=gen)[:k].tolist() for n, k in zip(nb, need)]
    nbytes = packer.packed_nbytes(0, tokens)
    out = torch.empty(nbytes, dtype=torch.uint8, device=device)
    copy_dst = torch.empty_like(out)
    measure = _timer(device, repeat)
    packer.pack(tables, 0, tokens, out=out)
    t_pack = measure(lambda: packer.pack(tables, 0, tokens, out=out))
    t_unpack = measure(lambda: packer.unpack(tables, 0, tokens, out))
    t_copy = measure(lambda: copy_dst.copy_(out))
    gather, scatter = _naive(packer, tables, tokens)
    t_gather, t_scatter = measure(gather), measure(scatter)
    rows = []
    for op, t, t_torch in (("pack", t_pack, t_gather), ("unpack", t_unpack, t_scatter)):
        gbps, copy_gbps, torch_gbps = nbytes / t / 1e9, nbytes / t_copy / 1e9, nbytes / t_torch / 1e9
        rows.append({
            "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
            "layout": name, "op": op, "tokens": tokens, "bytes": nbytes, "backend": packer.backend,
            "gbps": _sig(gbps), "copy_gbps": _sig(copy_gbps), "torch_gbps": _sig(torch_gbps),
            "ratio_to_copy": _sig(gbps / copy_gbps), "speedup_vs_torch": _sig(gbps / torch_gbps),
        })  # fmt: skip
    return rows


def run(args: argparse.Namespace) -> int:
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    tokens = args.tokens or (8192 if device.type == "cuda" else 256)
    repeat = args.repeat or (20 if device.type == "cuda" else 3)
    names = [n.strip() for n in args.layouts.split(",") if n.strip()]
    unknown = [n for n in names if n not in LAYOUTS]
    if unknown:
        raise SystemExit(f"unknown layouts {unknown}; known: {', '.join(LAYOUTS)}")
    results = []
    for name in names:
        for row in bench_layout(name, LAYOUTS[name](), device, tokens, repeat):
            results.append(row)
            if args.json:
                print(json.dumps(row), flush=True)
    if not args.json:
        _table(results)
    return 0


def _table(results: list[dict[str, Any]]) -> None:
    from rich.console import Console
    from rich.table import Table

    if not results:
        return
    first = results[0]
    table = Table(title=f"pack / unpack GB/s: {first['device']}, {first['backend']}, {first['tokens']} tokens")
    for col in ("layout", "op", "MiB", "GB/s", "copy", "torch", "x copy", "x torch"):
        table.add_column(col, justify="left" if col in ("layout", "op") else "right", no_wrap=True)
    for r in results:
        table.add_row(r["layout"], r["op"], f"{r['bytes'] / 2**20:.1f}", f"{r['gbps']:.3g}", f"{r['copy_gbps']:.3g}",
                      f"{r['torch_gbps']:.3g}", f"{r['ratio_to_copy']:.2f}", f"{r['speedup_vs_torch']:.2f}")
    Console().print(table)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="pdxfer bench pack", description=__doc__.splitlines()[0])
    add_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    raise SystemExit(main())
