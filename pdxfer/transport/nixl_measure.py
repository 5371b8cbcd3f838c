"""Measure the NIXL path's costs on this host: idle CPU, notification round trip, latency.

    python -m pdxfer.transport.nixl_measure [--spin-us 0] [--max-sleep-us 1000] [--samples 2000]

Prints one JSON object:

- `idle_cpu_pct`: CPU of a Sender (this process) + Receiver (child) pair, both with live
  NIXL agents and a loaded peer, over `--idle-s` seconds with no transfer. The progress
  threads are parked, so this should be ~0.
- `notif_rtt_us`: p50/p99 of a ping-pong through the real path on both sides: a 4 KiB
  WRITE with notification from here, the echo process's progress thread hands it to its
  event loop, which answers with a notification, which this side's progress thread hands to
  this event loop. Two processes, two progress threads, two loop hops per sample.
  `back_to_back`: the next ping leaves as soon as the pong arrived (chunks streaming: the
  backoff stays short); `gap_2ms`: 2 ms of quiet between pings, so both threads have
  backed off towards `--max-sleep-us` (the worst case while something is outstanding).
- `transfer_latency_us`: p50/p99 of a one-chunk 4 KiB pdxfer transfer, open() → DONE, per
  backend (includes RESERVE/GRANT and COMMIT/DONE on the control channel).
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import json
import os
import statistics
import sys
import time
from typing import Any

from pdxfer.transport.nixl_agent import NixlAgent, apply_ucx_env
from pdxfer.transport.nixl_progress import NixlProgress
from pdxfer.transport.nixl_regcache import buffer_address

_SIZE = 1 << 20


def _pct(values: list[float], q: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, int(q * len(values)))]


def _cpu_seconds(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as fh:
        fields = fh.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def echo(spin_s: float, max_sleep_s: float) -> None:
    """Child: answer every notification with one (it loads the pinger's metadata first)."""
    agent = NixlAgent(f"echo-{os.getpid()}")
    buf = bytearray(_SIZE)
    agent.register(buffer_address(memoryview(buf)), _SIZE)
    print(json.dumps({"md": base64.b64encode(agent.metadata()).decode(), "addr": buffer_address(memoryview(buf))}),
          flush=True)
    peer = agent.add_remote(base64.b64decode(sys.stdin.readline()))

    async def main() -> None:
        loop = asyncio.get_running_loop()
        progress = NixlProgress(agent, "echo", spin_s=spin_s, max_sleep_s=max_sleep_s)
        progress.set_sink(loop, lambda notifs: [agent.notify(peer, m) for ms in notifs.values() for m in ms])
        progress.want_notifs(+1)
        await loop.run_in_executor(None, sys.stdin.read)
        progress.stop()

    asyncio.run(main())
    agent.close()


async def _ping(samples: int, spin_s: float, max_sleep_s: float, gap_s: float) -> list[float]:
    from pdxfer.bench.procs import ChildProcess

    agent = NixlAgent(f"ping-{os.getpid()}")
    child = ChildProcess([sys.executable, "-m", "pdxfer.transport.nixl_measure", "--echo",
                          "--spin-us", str(spin_s * 1e6), "--max-sleep-us", str(max_sleep_s * 1e6)], ready_timeout=60)
    progress = NixlProgress(agent, "ping", spin_s=spin_s, max_sleep_s=max_sleep_s)
    try:
        remote = agent.add_remote(base64.b64decode(child.info["md"]))
        assert child.proc.stdin is not None
        child.proc.stdin.write(base64.b64encode(agent.metadata()).decode() + "\n")
        child.proc.stdin.flush()
        buf = bytearray(_SIZE)
        local = buffer_address(memoryview(buf))
        agent.register(local, _SIZE)
        loop = asyncio.get_running_loop()
        waiting: dict[bytes, asyncio.Future[float]] = {}

        def on_notifs(notifs: dict[str, list[bytes]]) -> None:
            now = time.perf_counter()
            for msgs in notifs.values():
                for m in msgs:
                    fut = waiting.pop(bytes(m), None)
                    if fut is not None and not fut.done():
                        fut.set_result(now)

        progress.set_sink(loop, on_notifs)
        progress.want_notifs(+1)
        rtts = []
        for i in range(samples + 50):
            tag = i.to_bytes(8, "little")
            fut: asyncio.Future[float] = loop.create_future()
            waiting[tag] = fut
            t0 = time.perf_counter()
            h, state, err = agent.post_write([(local, child.info["addr"], 4096)], remote, tag)
            if state == "PROC":
                progress.watch(h, loop, lambda _s, _e: None)
            elif state == "ERR":
                raise RuntimeError(err)
            t1 = await asyncio.wait_for(fut, 10)
            if i >= 50:  # the first round trips include connection wire-up
                rtts.append((t1 - t0) * 1e6)
            if gap_s:
                await asyncio.sleep(gap_s)  # poll-ok: quiet between samples, so both sides have backed off
        progress.want_notifs(-1)
        return rtts
    finally:
        progress.stop()
        child.kill()
        agent.close()


def _idle_and_latency(idle_s: float, samples: int, spin_s: float, max_sleep_s: float) -> dict[str, Any]:
    from pdxfer.bench.procs import ChildProcess, receiver_argv
    from pdxfer.engine import Sender, SenderConfig

    out: dict[str, Any] = {"transfer_latency_us": {}}
    rx = ChildProcess(receiver_argv("--capacity", str(64 << 20), "--nixl-spin-us", str(spin_s * 1e6),
                                    "--nixl-max-sleep-us", str(max_sleep_s * 1e6)))
    try:
        for backend in ("tcp", "nixl"):
            cfg = SenderConfig(backend=backend, nixl_spin_s=spin_s, nixl_max_sleep_s=max_sleep_s, heartbeat_s=1.0)
            with Sender(cfg) as s:
                lat = []
                for i in range(samples // 4 + 20):
                    t0 = time.perf_counter()
                    s.submit(rx.info["control"], f"{backend}-{i}", [b"x" * 4096]).result(30)
                    if i >= 20:
                        lat.append((time.perf_counter() - t0) * 1e6)
                out["transfer_latency_us"][backend] = {"p50": round(_pct(lat, 0.5)), "p99": round(_pct(lat, 0.99))}
                if backend == "nixl":  # both agents exist and know each other: now measure idling
                    c0, r0, t0 = time.process_time(), _cpu_seconds(rx.pid), time.monotonic()
                    time.sleep(idle_s)  # poll-ok: the measurement window itself
                    wall = time.monotonic() - t0
                    out["idle_cpu_pct"] = {"sender": round(100 * (time.process_time() - c0) / wall, 2),
                                           "receiver": round(100 * (_cpu_seconds(rx.pid) - r0) / wall, 2)}
    finally:
        rx.kill()
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--spin-us", type=float, default=0.0)
    p.add_argument("--max-sleep-us", type=float, default=1000.0)
    p.add_argument("--samples", type=int, default=2000)
    p.add_argument("--idle-s", type=float, default=5.0)
    p.add_argument("--echo", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    from pdxfer.logs import configure

    configure("warning")
    apply_ucx_env()
    spin, max_sleep = args.spin_us / 1e6, args.max_sleep_us / 1e6
    if args.echo:
        echo(spin, max_sleep)
        return 0
    result: dict[str, Any] = {"ucx_tls": os.environ.get("UCX_TLS"), "spin_us": args.spin_us,
                              "max_sleep_us": args.max_sleep_us, "notif_rtt_us": {}}
    for label, gap in (("back_to_back", 0.0), ("gap_2ms", 0.002)):
        rtts = asyncio.run(_ping(args.samples, spin, max_sleep, gap))
        result["notif_rtt_us"][label] = {"p50": round(statistics.median(rtts)), "p99": round(_pct(rtts, 0.99)),
                                         "n": len(rtts)}
    result.update(_idle_and_latency(args.idle_s, args.samples, spin, max_sleep))
    print(json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
