"""`pdxfer bench spill`: streaming spilled chunks back from the disk tier, against a plain
sequential read of the same files, paired, in one run.

What is measured is the path a granted transfer takes when its chunks are on disk:
`ReadAhead` over `Restorer` (reads in the spill I/O threads into a bounded `RestorePool`,
each chunk verified against its checksum, `--ahead` chunks in flight), consumed in order
on a uvloop loop. The baseline reads the same spill files front to back with `readinto`
into `--ahead`+1 preallocated chunk buffers in turn, on one thread: no verification, no
threads, no loop.

`--cache cold` (default) drops the files from the page cache (fsync, then
POSIX_FADV_DONTNEED) before every run of either side, so both read from the device;
`--cache hot` leaves them cached, which measures the CPU cost of the tier path instead.
Runs alternate baseline/tier and tier/baseline, and the median of per-pair ratios is
reported, as in `bench transfer`.
"""

from __future__ import annotations

import argparse
import asyncio
import concurrent.futures
import json
import os
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import uvloop
from rich.console import Console
from rich.progress import Progress
from rich.table import Table

from pdxfer.bench import pattern
from pdxfer.protocol.checksum import chunk_checksum
from pdxfer.sendq.restore import ReadAhead, Restorer, RestorePool
from pdxfer.tiers import DiskTier, SpilledChunk, SpillStore
from pdxfer.units import format_size, parse_size

_CHUNK_TIMEOUT_S = 60.0  # a bench never hangs: one chunk's read-back this slow is a failure


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--chunk-size", type=parse_size, action="append", dest="chunk_sizes",
                   help="repeatable; default 2MiB and 16MiB")
    p.add_argument("--total", type=parse_size, default=parse_size("1GiB"), help="bytes spilled and streamed per run")
    p.add_argument("--pairs", type=int, default=5)
    p.add_argument("--cache", choices=["cold", "hot"], default="cold")
    p.add_argument("--ahead", type=int, default=4, help="chunks read ahead (SenderConfig.restore_ahead)")
    p.add_argument("--restore-buffer", type=parse_size, default=parse_size("64MiB"),
                   help="read-back pool bytes (SenderConfig.restore_buffer_bytes)")
    p.add_argument("--dir", default=None, help="spill directory (default: the system temp dir)")
    p.add_argument("--json", action="store_true", help="one JSON object per chunk size on stdout")


def _drop_cache(paths: list[Path]) -> None:
    for path in paths:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def _plain_read(paths: list[Path], bufs: list[memoryview]) -> float:
    """Each file into its own chunk-sized buffer, rotating over as many buffers as the tier
    path keeps in flight: the same bytes into the same memory footprint. (Re-reading into
    one small buffer would measure a cache-resident destination, ~2x faster on a hot page
    cache than any path that keeps the chunks it read.)"""
    t0 = time.perf_counter()
    for i, path in enumerate(paths):
        buf = bufs[i % len(bufs)]
        with open(path, "rb", buffering=0) as fh:
            pos = 0
            while got := fh.readinto(buf[pos:]):
                pos += got
    return time.perf_counter() - t0


async def _stream(store: SpillStore, chunks: list[SpilledChunk], io: concurrent.futures.Executor,
                  ahead: int, pool_bytes: int) -> float:
    restorer = Restorer(store, RestorePool(pool_bytes), io)
    reader = ReadAhead(restorer, ahead)
    t0 = time.perf_counter()
    for i, chunk in enumerate(chunks):
        upcoming = ((j, chunks[j], "bench") for j in range(i + 1, min(len(chunks), i + 1 + ahead)))
        try:
            restored = await asyncio.wait_for(reader.take(i, chunk, "bench", upcoming), _CHUNK_TIMEOUT_S)
        except asyncio.TimeoutError:
            raise SystemExit(f"chunk {i} was not read back within {_CHUNK_TIMEOUT_S}s") from None
        restorer.done_with(restored)  # "sent": the buffer goes back for the next read
    return time.perf_counter() - t0


def _spill(store: SpillStore, chunk: int, total: int) -> list[SpilledChunk]:
    out = []
    data = np.empty(chunk, dtype=np.uint8)
    for i in range(max(1, total // chunk)):
        pattern.fill(data, "bench-spill", i)
        view = memoryview(data)
        got = store.spill(view, chunk_checksum(view))
        if got is None:
            raise SystemExit(f"disk tier refused chunk {i}: is there {format_size(total)} free in {store.disk.root}?")
        out.append(got)
    return out


def run(args: argparse.Namespace) -> int:
    sizes = args.chunk_sizes or [parse_size("2MiB"), parse_size("16MiB")]
    if args.pairs < 1 or args.ahead < 1:
        raise SystemExit("--pairs and --ahead must be >= 1")
    for c in sizes:
        if c <= 0 or c > args.total:
            raise SystemExit(f"--chunk-size {format_size(c)} must be > 0 and <= --total {format_size(args.total)}")
    root = Path(args.dir) if args.dir else Path(tempfile.gettempdir()) / "pdxfer-bench-spill"
    console = Console(stderr=True)
    loop = uvloop.new_event_loop()
    io = concurrent.futures.ThreadPoolExecutor(2, thread_name_prefix="pdxfer-spill-io")
    results = []
    try:
        with Progress(console=console, transient=True) as progress:
            for chunk in sizes:
                store = SpillStore(None, DiskTier(root, args.total + chunk))
                try:
                    task = progress.add_task(f"spill {format_size(chunk)} chunks", total=args.pairs)
                    chunks = _spill(store, chunk, args.total)
                    paths = [c.disk.path for c in chunks]  # type: ignore[union-attr]
                    nbytes = sum(c.nbytes for c in chunks)
                    bufs = [memoryview(np.empty(chunk, dtype=np.uint8)) for _ in range(args.ahead + 1)]
                    base_t, tier_t, ratios = [], [], []
                    for pair in range(args.pairs):
                        order = ("base", "tier") if pair % 2 == 0 else ("tier", "base")
                        got = {}
                        for side in order:
                            if args.cache == "cold":
                                _drop_cache(paths)
                            if side == "base":
                                got[side] = _plain_read(paths, bufs)
                            else:
                                got[side] = loop.run_until_complete(
                                    _stream(store, chunks, io, args.ahead, args.restore_buffer))
                        base_t.append(got["base"])
                        tier_t.append(got["tier"])
                        ratios.append(got["base"] / got["tier"])
                        progress.advance(task)
                    usage = store.usage()
                    results.append({
                        "bench": "spill", "chunk_size": chunk, "total_bytes": nbytes, "cache": args.cache,
                        "ahead": args.ahead, "pairs": args.pairs,
                        "gbps": nbytes / statistics.median(tier_t) / 1e9,
                        "baseline": "sequential readinto of the same spill files into ahead+1 rotating chunk buffers,"
                                    " one thread, no verification",
                        "baseline_gbps": nbytes / statistics.median(base_t) / 1e9,
                        "ratio": statistics.median(ratios), "ratio_min": min(ratios), "ratio_max": max(ratios),
                        "restores_disk": usage["restores_disk"], "integrity_errors": usage["integrity_errors"],
                    })
                finally:
                    store.close()
    finally:
        io.shutdown()
        loop.close()
    if args.json:
        for r in results:
            print(json.dumps(r), flush=True)
    else:
        table = Table(title=f"pdxfer bench spill (disk tier, cache {args.cache}, median of {args.pairs} pairs)")
        for col in ("chunk", "total", "tier GB/s", "plain read GB/s", "ratio", "range"):
            table.add_column(col, justify="right")
        for r in results:
            table.add_row(format_size(r["chunk_size"]), format_size(r["total_bytes"]), f"{r['gbps']:.2f}",
                          f"{r['baseline_gbps']:.2f}", f"{r['ratio']:.3f}", f"{r['ratio_min']:.2f}-{r['ratio_max']:.2f}")
        Console().print(table)
    return 0
