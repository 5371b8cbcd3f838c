"""`pdxfer demo`: the main job on one host, end to end.

A decode-side receiver runs in its own process with a receive pool smaller than the
work, so admission really queues; this process plays the prefill worker, streaming
each request's KV in chunks as if chunked prefill produced them. The receiver checks
every byte against an independent pattern; the demo prints throughput, the peak
reservation and the final ledger (which must be empty).
"""

from __future__ import annotations

import argparse
import time

from rich.console import Console
from rich.table import Table

from pdxfer.bench import pattern
from pdxfer.bench.procs import ChildProcess, receiver_argv
from pdxfer.engine import Sender
from pdxfer.layout.payload import Payload
from pdxfer.units import format_size, parse_size


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--requests", type=int, default=32, help="prefill requests to move")
    p.add_argument("--request-size", type=parse_size, default=parse_size("24MiB"), help="KV bytes per request")
    p.add_argument("--chunk-size", type=parse_size, default=parse_size("2MiB"), help="bytes per prefill chunk")
    p.add_argument("--capacity", type=parse_size, default=parse_size("96MiB"), help="decode-side receive pool")


def run(args: argparse.Namespace) -> int:
    console = Console()
    if args.request_size % 8 or args.chunk_size % 8:
        raise SystemExit("--request-size and --chunk-size must be multiples of 8 bytes")
    if args.request_size > args.capacity:
        console.print(f"note: a {format_size(args.request_size)} request can never fit {format_size(args.capacity)};"
                      " the receiver will reject it at once (that is the point of admission control)")
    payload = Payload.uniform(args.request_size, args.chunk_size)
    rx = ChildProcess(receiver_argv("--capacity", str(args.capacity), "--verify-pattern"))
    console.print(f"decode-side receiver pid {rx.pid}: control {rx.info['control']}, data {rx.info['data']},"
                  f" pool {format_size(args.capacity)}")
    ok = failed = 0
    try:
        with Sender(memory_budget=max(args.capacity, args.request_size) * 2) as sender:
            t0 = time.perf_counter()
            handles = []
            for r in range(args.requests):
                tid = f"demo-req-{r}"
                h = sender.open(rx.info["control"], tid, payload, deadline_s=60)
                for i, n in enumerate(payload.chunk_sizes):  # chunked prefill: one chunk at a time
                    h.put(i, pattern.make(n, tid, i), timeout=30)
                handles.append(h)
            for h in handles:
                try:
                    h.future.result(60)
                    ok += 1
                except Exception as exc:
                    failed += 1
                    console.print(f"[red]{h.transfer_id}: {exc}")
            dt = time.perf_counter() - t0
            peak_budget = sender.budget.peak
    finally:
        final = rx.stop()
    moved = ok * args.request_size
    table = Table(title="pdxfer demo: prefill -> decode over TCP, one host")
    table.add_column("what")
    table.add_column("value", justify="right")
    table.add_row("requests ok / failed", f"{ok} / {failed}")
    table.add_row("bytes moved", format_size(moved) if moved else "0")
    table.add_row("throughput", f"{moved / dt / 1e9:.2f} GB/s")
    table.add_row("sender peak queued bytes", format_size(peak_budget))
    if final:
        st, led = final["stats"], final["ledger"]
        table.add_row("verified by receiver (independent pattern)", f"{st['verified']} / {st['transfers']}")
        table.add_row("receiver: queued for room at least once", str(led["counters"].get("queued_total", "?")))
        table.add_row("receiver ledger reserved at exit", str(led["reserved_bytes"]))
    console.print(table)
    healthy = final is not None and failed == 0 and final["stats"]["mismatched"] == [] \
        and final["ledger"]["reserved_bytes"] == 0 and final["stats"]["verified"] == ok
    console.print("[green]OK: every byte verified, nothing leaked" if healthy else "[red]FAILED")
    return 0 if healthy else 1
