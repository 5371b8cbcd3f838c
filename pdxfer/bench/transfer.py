"""`pdxfer bench transfer`: pdxfer vs a raw baseline of the same data path, paired, in one run.

Loopback throughput here swings up to 2x between runs, so a ratio of two separately
measured medians is noise. We alternate baseline and pdxfer runs (A B A B …) over the
same bytes and report the median of the per-pair ratios.

Baselines: `--backend tcp` against blocking `sendall`/`recv_into` on raw sockets
(`rawsock`); `--backend nixl` against raw NIXL WRITEs of the same chunks between the bench
process and a bare target process (`nixlraw`), with the same UCX settings (the UCX_TLS
in use is printed with the results).

Every row also gives the CPU time both ends spent per GiB, and how many of the host's
cores they kept busy, for pdxfer and for each baseline (`cputime`): on a host where both
ends share two cores, a path that hashes every byte at both ends can be CPU-bound where
the raw copy is not, and only these columns tell that apart from a slow engine.

`--verified-baseline` adds a third run to each pair: the same raw loop, but hashing every
chunk on both ends and comparing, as any transfer that verifies its bytes must. The
ratio to it (`ratio_vs_verified`) separates what pdxfer's engine costs from what
checking every byte costs on this machine (here, over a 64 MiB working set, xxh3 reads
at 9-17 GB/s against 3-5 GB/s of loopback, so verification alone is worth ~15%). On
NIXL it runs one writer thread (own agent) per pdxfer NIXL worker (`--nixl-workers`):
over shared memory each thread copies on its own core, as pdxfer's workers do. The plain
raw baseline stays the one-thread loop.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import os
import statistics
import sys
import time
import uuid
from typing import Any

import numpy as np
from rich.console import Console
from rich.progress import Progress
from rich.table import Table

from pdxfer.bench import cputime, rawsock
from pdxfer.bench.procs import ChildProcess, receiver_argv
from pdxfer.engine import Sender, SenderConfig
from pdxfer.layout.payload import Payload
from pdxfer.units import format_size, parse_size


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--backend", choices=["tcp", "nixl"], default="tcp")
    p.add_argument("--chunk-size", type=parse_size, action="append", dest="chunk_sizes",
                   help="repeatable; default 256KiB, 2MiB, 16MiB")
    p.add_argument("--concurrency", type=int, action="append", dest="concurrencies",
                   help="transfers in flight (repeatable; default 1 and 4)")
    p.add_argument("--total", type=parse_size, default=parse_size("1GiB"), help="bytes per measured run")
    p.add_argument("--transfer-size", type=parse_size, default=parse_size("64MiB"))
    p.add_argument("--pairs", type=int, default=5, help="baseline/pdxfer run pairs per configuration")
    p.add_argument("--json", action="store_true", help="one JSON object per configuration on stdout")
    p.add_argument("--checksum-on-put", action="store_true",
                   help="hash chunks in put(), on the producer's thread (SenderConfig.checksum_on_put)")
    p.add_argument("--hash-ahead", type=int, default=SenderConfig.hash_ahead,
                   help="chunks hashed ahead of the wire on the hashing thread; 0: on the send loop")
    p.add_argument("--device", default="cpu",
                   help="nixl: where both ends keep the bytes: cpu (DRAM) or cuda / cuda:N (VRAM to VRAM)")
    p.add_argument("--nixl-workers", type=int, default=SenderConfig.nixl_workers,
                   help="nixl: sender workers posting chunks round-robin (SenderConfig.nixl_workers)")
    p.add_argument("--verified-baseline", action="store_true",
                   help="also run the raw baseline with every chunk hashed on both ends (ratio_vs_verified)")
    p.add_argument("--register", action="store_true",
                   help="nixl: register the source buffer once (Sender.register), as the raw baseline does, "
                        "instead of each chunk in every transfer")


def _pdxfer_run(sender: Sender, peer: str, buf: Any, chunk: int, total: int, concurrency: int) -> float:
    """`buf`: a host array, or a uint8 CUDA tensor (its chunks are put as tensor slices)."""
    payload = Payload.uniform(len(buf), chunk)
    whole = buf if hasattr(buf, "is_cuda") else memoryview(buf)
    views = [whole[o : o + n] for o, n in zip(payload.offsets, payload.chunk_sizes)]
    n_transfers = max(1, total // len(buf))
    inflight: set[concurrent.futures.Future] = set()
    t0 = time.perf_counter()
    for _ in range(n_transfers):
        while len(inflight) >= concurrency:
            done, inflight = concurrent.futures.wait(inflight, timeout=120, return_when=concurrent.futures.FIRST_COMPLETED)
            for f in done:
                f.result()
        h = sender.open(peer, uuid.uuid4().hex, payload, deadline_s=120)
        for i, v in enumerate(views):
            h.put(i, v, timeout=120)
        inflight.add(h.future)
    for f in concurrent.futures.as_completed(inflight, timeout=120):
        f.result()
    return time.perf_counter() - t0


def _cpu_table(rows: list[dict[str, Any]], cpus: int) -> Table:
    """CPU ms per GiB at each end and cores kept busy, per run kind (medians)."""
    kinds = [k for k in ("pdxfer", "baseline", "verified_baseline") if rows and k in rows[0]["cpu"]]
    table = Table(title=f"CPU ms per GiB at the sending (tx) and receiving (rx) end, and cores busy "
                        f"(of the {cpus} both ends share); pdx: pdxfer, raw: baseline, ver: verified baseline")
    short = {"pdxfer": "pdx", "baseline": "raw", "verified_baseline": "ver"}
    for col in ["chunk", "conc", *[f"{short[k]} {what}" for k in kinds for what in ("tx", "rx", "cores")]]:
        table.add_column(col, justify="right")

    def cell(v: float | None, fmt: str) -> str:
        return "?" if v is None else format(v, fmt)

    for r in rows:
        cells = [format_size(r["chunk_size"]), str(r["concurrency"])]
        for k in kinds:
            c = r["cpu"][k]
            cells += [cell(c["sender_ms_per_gib"], ".0f"), cell(c["receiver_ms_per_gib"], ".0f"),
                      cell(None if c["busy"] is None else c["busy"] * cpus, ".2f")]
        table.add_row(*cells)
    return table


def run(args: argparse.Namespace) -> int:
    chunks = args.chunk_sizes or [parse_size(s) for s in ("256KiB", "2MiB", "16MiB")]
    concs = args.concurrencies or [1, 4]
    if args.pairs < 1 or args.nixl_workers < 1 or any(c < 1 for c in concs):
        raise SystemExit("--pairs, --nixl-workers and --concurrency must be >= 1")
    console = Console(stderr=True)
    tsize = args.transfer_size
    for c in chunks:
        if c > tsize:
            raise SystemExit(f"--chunk-size {format_size(c)} is larger than --transfer-size {format_size(tsize)}")
    capacity = max(2 * max(concs) * tsize, 256 << 20)
    gpu = args.device != "cpu"
    if gpu and args.backend != "nixl":
        raise SystemExit(f"--device {args.device} needs --backend nixl (the tcp path sends host memory only)")
    ucx_tls = ""
    if args.backend == "nixl":
        from pdxfer.transport.nixl_agent import apply_ucx_env

        ucx_tls = apply_ucx_env().get("UCX_TLS", "")  # before the children start: all three use the same
        console.print(f"UCX_TLS={ucx_tls} UCX_NET_DEVICES={os.environ.get('UCX_NET_DEVICES', '')}")
    buf: Any = np.random.default_rng(0).integers(0, 255, tsize, dtype=np.uint8)
    rx_args = ["--capacity", str(capacity)]
    if args.backend == "nixl":
        rx_args.append("--nixl-eager")  # its region is prefaulted while the baseline's target is set up
    if gpu:
        import torch

        buf = torch.from_numpy(buf).to(args.device)
        rx_args += ["--device", args.device, "--backends", "nixl"]
    rx = ChildProcess(receiver_argv(*rx_args))
    base: ChildProcess | None = None
    writer = None
    extra_writers: list[Any] = []
    baseline_name = "raw_nixl_write" if args.backend == "nixl" else "raw_socket_sendall_recv_into"

    def baseline(total: int, chunk: int, conc: int, verify: bool = False) -> float:
        assert base is not None
        if writer is not None:
            if verify:  # as many writer threads as pdxfer has NIXL workers
                return nixlraw.run_parallel([writer, *extra_writers], total, chunk, conc, verify=True, ranges=conc)
            return writer.run(total, chunk, conc, ranges=conc)  # lands where `conc` transfers would
        return rawsock.run_baseline(base.info["port"], total, memoryview(buf), chunk, conc, verify=verify)

    verified = args.verified_baseline
    cpus = cputime.usable_cpus()

    rows = []
    try:
        if args.backend == "nixl":
            from pdxfer.bench import nixlraw

            # room for `conc` transfers side by side, as pdxfer's receiver lands them (nixlraw)
            base = ChildProcess([sys.executable, "-m", "pdxfer.bench.nixlraw", str(tsize * max(concs)), args.device],
                                ready_timeout=60)
            writer = nixlraw.RawWriter(base.info, buf if gpu else memoryview(buf))
            if args.verified_baseline:
                extra_writers = [nixlraw.RawWriter(base.info, buf if gpu else memoryview(buf))
                                 for _ in range(args.nixl_workers - 1)]
        else:
            base = ChildProcess([sys.executable, "-m", "pdxfer.bench.rawsock"])
        cfg = SenderConfig(memory_budget=max(concs) * tsize + tsize, checksum_on_put=args.checksum_on_put,
                           hash_ahead=args.hash_ahead, nixl_workers=args.nixl_workers,
                           backend=args.backend)
        with Sender(cfg) as sender, \
                Progress(console=console, transient=True) as prog:
            if args.register:
                sender.register(buf)
            task = prog.add_task("bench", total=len(chunks) * len(concs) * args.pairs)
            for chunk in chunks:
                for conc in concs:
                    total = max(tsize, args.total // tsize * tsize)
                    _pdxfer_run(sender, rx.info["control"], buf, chunk, tsize * conc, conc)  # warm-up
                    baseline(tsize, chunk, 1)
                    if verified:
                        baseline(tsize, chunk, 1, verify=True)
                    assert base is not None
                    b_runs: list[cputime.Measured] = []
                    v_runs: list[cputime.Measured] = []
                    p_runs: list[cputime.Measured] = []
                    for _ in range(args.pairs):
                        prog.update(task, description=f"{args.backend} chunk={format_size(chunk)} conc={conc}")
                        b_runs.append(cputime.measure(lambda: baseline(total, chunk, conc), base.pid))
                        if verified:
                            v_runs.append(cputime.measure(lambda: baseline(total, chunk, conc, verify=True), base.pid))
                        p_runs.append(cputime.measure(
                            lambda: _pdxfer_run(sender, rx.info["control"], buf, chunk, total, conc), rx.pid))
                        prog.advance(task)
                    b_rates, v_rates, p_rates = ([total / r.seconds / 1e9 for r in runs] for runs in (b_runs, v_runs, p_runs))
                    ratios = [p / b for p, b in zip(p_rates, b_rates)]
                    row = {
                        "backend": args.backend, "device": args.device, "chunk_size": chunk, "total_bytes": total, "concurrency": conc,
                        "gbps": round(statistics.median(p_rates), 3), "baseline": baseline_name,
                        "baseline_gbps": round(statistics.median(b_rates), 3), "ratio": round(statistics.median(ratios), 3),
                        "ratio_min": round(min(ratios), 3), "ratio_max": round(max(ratios), 3), "pairs": args.pairs,
                        "registered_source": bool(args.register and args.backend == "nixl"),  # TCP registers nothing
                        "host_cpus": cpus,  # both ends share them: see pdxfer.bench.cputime
                        "cpu": {"pdxfer": cputime.summary(p_runs, total, cpus),
                                "baseline": cputime.summary(b_runs, total, cpus)},
                    }
                    if writer is not None:  # NIXL: the target span the baseline's WRITEs cycled over
                        row["baseline_landing_bytes"] = tsize * conc
                    if verified:
                        v_ratios = [p / v for p, v in zip(p_rates, v_rates)]
                        row.update({
                            "verified_baseline": baseline_name + "_verified",
                            "verified_writers": 1 + len(extra_writers),
                            "verified_baseline_gbps": round(statistics.median(v_rates), 3),
                            "ratio_vs_verified": round(statistics.median(v_ratios), 3),
                            "ratio_vs_verified_min": round(min(v_ratios), 3),
                            "ratio_vs_verified_max": round(max(v_ratios), 3),
                        })
                        row["cpu"]["verified_baseline"] = cputime.summary(v_runs, total, cpus)
                    rows.append(row)
                    if args.json:
                        print(json.dumps(rows[-1]), flush=True)
    finally:
        for w in [writer, *extra_writers]:
            if w is not None:
                w.close()
        final_target = None
        if base is not None:
            final_target = base.finish() if writer is not None else None
            base.kill()
        final = rx.stop()
    if verified and writer is not None and (final_target is None or final_target.get("verify_mismatches") != 0):
        console.print(f"[red]raw NIXL target did not confirm the verified baseline's chunks: {final_target}")
        return 1
    if final and final["ledger"]["reserved_bytes"] != 0:
        console.print(f"[red]receiver ledger not empty after the bench: {final['ledger']['reserved_bytes']} bytes")
        return 1
    if not args.json:
        title = f"pdxfer bench transfer --backend {args.backend} (median of {args.pairs} paired runs)"
        if ucx_tls:
            title += f", UCX_TLS={ucx_tls}"
        if gpu:
            title += f", {args.device} to {args.device}"
        table = Table(title=title)
        cols = ["chunk", "conc", "pdxfer GB/s", f"{baseline_name} GB/s", "ratio", "ratio range"]
        if verified:
            cols += [f"verified ×{1 + len(extra_writers)} GB/s", "ratio vs verified", "range"]
        for col in cols:
            table.add_column(col, justify="right")
        for r in rows:
            cells = [format_size(r["chunk_size"]), str(r["concurrency"]), f"{r['gbps']:.2f}",
                     f"{r['baseline_gbps']:.2f}", f"{r['ratio']:.3f}", f"{r['ratio_min']:.2f}–{r['ratio_max']:.2f}"]
            if verified:
                cells += [f"{r['verified_baseline_gbps']:.2f}", f"{r['ratio_vs_verified']:.3f}",
                          f"{r['ratio_vs_verified_min']:.2f}–{r['ratio_vs_verified_max']:.2f}"]
            table.add_row(*cells)
        Console().print(table)
        Console().print(_cpu_table(rows, cpus))
    return 0
