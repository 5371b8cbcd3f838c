"""One sender process of a chaos run: transfers pattern bytes to the receiver until told to stop.

Each transfer has a seeded random shape (1-8 chunks of 8 bytes to `--max-chunk-bytes`)
and pattern bytes (`pdxfer.bench.pattern`) the receiver checks on its own, so a chunk
that lands corrupted, misplaced or stale is caught independently of pdxfer's checksums.

Every transfer must end -- delivered or failed with a typed error -- within its deadline
plus `HANG_GRACE_S`; one that does not is counted as a hang (and aborted). At the end
(stdin closed or SIGTERM) the worker closes its Sender and prints one JSON line: outcome
counts by error type, hangs, what its memory budget still holds, and the threads still
alive after close.

    python -m pdxfer.chaos.worker --control tcp://127.0.0.1:PORT --index 0 --seed 1
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import sys
import threading
import time
from collections import Counter
from typing import Any

from pdxfer.bench import pattern
from pdxfer.engine import Sender, SenderConfig
from pdxfer.errors import PdxferError
from pdxfer.layout.payload import Payload

HANG_GRACE_S = 5.0  # beyond the transfer's own deadline: engine teardown, one heartbeat period


def _shape(rng: random.Random, max_chunks: int, max_chunk: int) -> tuple[int, ...]:
    return tuple(8 * rng.randint(1, max_chunk // 8) for _ in range(rng.randint(1, max_chunks)))


def run_worker(control: str, *, index: int, seed: int, backend: str, deadline_s: float,
               max_chunks: int, max_chunk: int, stop: threading.Event) -> dict[str, Any]:
    rng = random.Random(seed * 1000 + index)
    outcomes: Counter[str] = Counter()
    hangs: list[str] = []
    first_error: dict[str, str] = {}  # what each kind of failure said, the first time
    last_ok = 0.0
    cfg = SenderConfig(backend=backend, deadline_s=deadline_s, peer_timeout_s=min(2.0, deadline_s),
                       memory_budget=4 * max_chunks * max_chunk, nixl_workers=1)
    threads_before = threading.active_count()
    sender = Sender(cfg).start()
    n = 0
    try:
        while not stop.is_set():
            n += 1
            tid = f"chaos-{os.getpid()}-{index}-{n}"
            sizes = _shape(rng, max_chunks, max_chunk)
            t0 = time.monotonic()
            failed = True
            try:
                handle = sender.open(control, tid, Payload(sizes), deadline_s=deadline_s)
                for i, size in enumerate(sizes):
                    handle.put(i, pattern.make(size, tid, i), timeout=deadline_s)
                handle.future.result(deadline_s + HANG_GRACE_S - (time.monotonic() - t0))
                outcomes["ok"] += 1
                last_ok, failed = time.time(), False
            except PdxferError as exc:
                outcomes[type(exc).__name__] += 1
                first_error.setdefault(type(exc).__name__, str(exc)[:300])
            except TimeoutError:  # concurrent.futures.TimeoutError is TimeoutError since 3.11
                hangs.append(tid)
                handle.abort("chaos: no outcome within the deadline")
            if failed and time.monotonic() - t0 < 0.05:
                stop.wait(0.05)  # a receiver that is down refuses at once: do not spin on it
    finally:
        # A failed transfer's chunk budget may come back a moment after its future (a NIXL
        # WRITE to a frozen peer completes later): only what close() leaves is a leak.
        budget_before_close = sender.budget_used
        sender.close(timeout=15)
        budget_left = sender.budget_used
    time.sleep(0.2)  # poll-ok: threads that close() joined may take a moment to unregister
    return {"index": index, "pid": os.getpid(), "transfers": n, "outcomes": dict(outcomes), "first_error": first_error, "hangs": hangs,
            "last_ok_wall": last_ok, "budget_used_before_close": budget_before_close,
            "budget_used_after": budget_left,
            "threads_left": max(0, threading.active_count() - threads_before)}


def main(argv: list[str] | None = None) -> int:
    from pdxfer.logs import configure

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--control", required=True)
    p.add_argument("--index", type=int, default=0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--backend", choices=["tcp", "nixl"], default="tcp")
    p.add_argument("--deadline", type=float, default=8.0)
    p.add_argument("--max-chunks", type=int, default=8)
    p.add_argument("--max-chunk-bytes", type=int, default=256 << 10)
    p.add_argument("--log-level", default="error")
    args = p.parse_args(argv)
    configure(args.log_level)
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    threading.Thread(target=lambda: (sys.stdin.read(), stop.set()), daemon=True).start()
    print(json.dumps({"pid": os.getpid(), "index": args.index}), flush=True)
    report = run_worker(args.control, index=args.index, seed=args.seed, backend=args.backend,
                        deadline_s=args.deadline, max_chunks=args.max_chunks, max_chunk=args.max_chunk_bytes,
                        stop=stop)
    print(json.dumps(report), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
