"""Control-channel latency: where does a tiny transfer's time go?

Not a test. Runs a receiver in its own process (pdxfer.bench.receiver_proc) and times,
from the caller's thread of a Sender:

  * open() -> GRANT (TransferResult.granted_after, perf_counter from open()) and open() -> DONE
    (caller's wall clock, future.result()) for 1-chunk 64-byte transfers, one at a time;
  * the same for 64 MiB transfers in 2 MiB chunks (the bench's concurrency-1 case);
  * floors: a blocking pyzmq DEALER ping-pong against a ROUTER echo process, and the
    same through zmq.asyncio on a uvloop thread, to separate ZMQ from pdxfer.

    .venv/bin/python bench/control_rtt.py [--n 2000] [--big 40]
"""

from __future__ import annotations

import argparse
import asyncio
import concurrent.futures
import statistics
import subprocess
import sys
import threading
import time
import uuid

import numpy as np
import zmq

from pdxfer.bench.procs import ChildProcess, receiver_argv
from pdxfer.engine import lane as lane_mod
from pdxfer.protocol import messages as m
from pdxfer.engine import Sender, SenderConfig
from pdxfer.layout.payload import Payload

ECHO = r"""
import json, sys, zmq
ctx = zmq.Context()
s = ctx.socket(zmq.ROUTER)
s.bind("tcp://127.0.0.1:0")
print(json.dumps({"addr": s.getsockopt_string(zmq.LAST_ENDPOINT)}), flush=True)
while True:
    s.send_multipart(s.recv_multipart())
"""


def pct(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(q * len(xs)))]


def show(name: str, xs: list[float]) -> None:
    us = [x * 1e6 for x in xs]
    print(f"{name:<42} n={len(us):5d}  p50={statistics.median(us):8.1f} us  p90={pct(us, .9):8.1f}  "
          f"p99={pct(us, .99):8.1f}  min={min(us):7.1f}")


def zmq_floor(n: int) -> None:
    echo = ChildProcess([sys.executable, "-c", ECHO])
    try:
        addr = echo.info["addr"]
        ctx = zmq.Context()
        s = ctx.socket(zmq.DEALER)
        s.connect(addr)
        body = b"x" * 120
        for _ in range(200):
            s.send(body)
            s.recv()
        lat = []
        for _ in range(n):
            t0 = time.perf_counter()
            s.send(body)
            s.recv()
            lat.append(time.perf_counter() - t0)
        show("raw pyzmq blocking DEALER rtt", lat)
        s.close(0)

        # zmq.asyncio on a uvloop thread, caller waits through a concurrent future
        import uvloop
        import zmq.asyncio as zasync

        loop = uvloop.new_event_loop()
        t = threading.Thread(target=loop.run_forever, daemon=True)
        t.start()
        actx = zasync.Context()

        async def mk():
            d = actx.socket(zmq.DEALER)
            d.connect(addr)
            return d

        d = asyncio.run_coroutine_threadsafe(mk(), loop).result()

        async def one():
            await d.send(body)
            await d.recv()

        for _ in range(200):
            asyncio.run_coroutine_threadsafe(one(), loop).result()
        lat = []
        for _ in range(n):
            t0 = time.perf_counter()
            asyncio.run_coroutine_threadsafe(one(), loop).result()
            lat.append(time.perf_counter() - t0)
        show("zmq.asyncio on uvloop thread rtt (x-thread)", lat)

        async def inloop(k):
            out = []
            for _ in range(k):
                t0 = time.perf_counter()
                await d.send(body)
                await d.recv()
                out.append(time.perf_counter() - t0)
            return out

        show("zmq.asyncio in-loop rtt", asyncio.run_coroutine_threadsafe(inloop(n), loop).result())
        d.close(0)
        loop.call_soon_threadsafe(loop.stop)
        t.join(5)
    finally:
        echo.kill()


GRANTED: dict[str, float] = {}
_orig = lane_mod.Lane._on_transfer_message


def _spy(self, ctx, msg):  # perf_counter at GRANT (uvloop's loop.time() is in whole ms)
    if isinstance(msg, m.Grant):
        GRANTED[msg.tid] = time.perf_counter()
    return _orig(self, ctx, msg)


lane_mod.Lane._on_transfer_message = _spy


def transfers(sender: Sender, peer: str, size: int, chunk: int, n: int, label: str) -> None:
    buf = np.random.default_rng(0).integers(0, 255, size, dtype=np.uint8)
    payload = Payload.uniform(size, chunk)
    views = [memoryview(buf)[o : o + k] for o, k in zip(payload.offsets, payload.chunk_sizes)]
    grant, done, loop_total, put_t = [], [], [], []
    for i in range(n + 20):
        t0 = time.perf_counter()
        tid = uuid.uuid4().hex
        h = sender.open(peer, tid, payload, deadline_s=60)
        for j, v in enumerate(views):
            h.put(j, v, timeout=60)
        t1 = time.perf_counter()
        res = h.future.result(60)
        t2 = time.perf_counter()
        if i >= 20:
            grant.append(GRANTED.pop(tid) - t0)
            done.append(t2 - t0)
            loop_total.append(res.seconds)
            put_t.append(t1 - t0)
    show(f"{label}: open->GRANT", grant)
    show(f"{label}: open+puts (caller)", put_t)
    show(f"{label}: open->DONE (TransferResult.seconds)", loop_total)
    show(f"{label}: open->result() (caller)", done)


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=2000)
    ap.add_argument("--big", type=int, default=40)
    ap.add_argument("--skip-floor", action="store_true")
    a = ap.parse_args()
    from pdxfer.logs import configure

    configure("info")  # as the pdxfer command does
    print(subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip())
    if not a.skip_floor:
        zmq_floor(a.n)
    rx = ChildProcess(receiver_argv("--capacity", str(256 << 20)))
    try:
        with Sender(SenderConfig(memory_budget=256 << 20)) as sender:
            peer = rx.info["control"]
            transfers(sender, peer, 64, 64, a.n, "64 B x1")
            if a.big:
                transfers(sender, peer, 64 << 20, 2 << 20, a.big, "64 MiB / 2 MiB")
    finally:
        rx.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
