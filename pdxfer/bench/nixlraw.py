"""Raw NIXL baseline: one-sided WRITEs of the same bytes, with nothing of pdxfer around them.

The NIXL counterpart of `rawsock`: the ceiling that `pdxfer bench transfer --backend nixl`
reports its throughput against, measured in the same run. A target process registers a
buffer once and exposes its agent metadata; the bench process registers its source
buffer (one transfer's bytes) once and WRITEs it chunk by chunk, each chunk to its own
offset, each WRITE with a small notification, keeping `concurrency` WRITEs in flight and
polling their states back to back on its own thread.

Where the bytes land (`ranges`): pdxfer's receiver gives each transfer in flight its own
range of its region, so with 4 transfers in flight the bench's WRITEs land over 4-5
transfer-sized ranges (first fit, 64 MiB transfers: offsets 0-256 MiB seen), not over one.
The destination span alone moves the bare loop: into one 64 MiB range it WRITEs
7.3-7.6 GB/s here, cycling over 256 MiB 6.4 (this host's 480 MiB L3 holds source and
target of the small span). So the baseline lands transfer `k` in range `k % ranges` of
the target, `ranges` = the transfers pdxfer keeps in flight: the same footprint pdxfer's
receiver needs at the least (it used one range more at 4 in flight, which only makes
the baseline a little more cache-friendly than pdxfer).

The target drains notifications with the same progress thread pdxfer's receiver uses, so
both sides of the comparison pay the same for being told that bytes landed.

With `verify`, the writer hashes each chunk (pdxfer's `chunk_checksum`) before its WRITE
and sends offset, length and checksum in the notification; the target hashes the landed
range when the notification arrives and counts mismatches (reported when it exits). That
is the floor for a verified one-sided transfer, measured the plainest way.
"""

from __future__ import annotations

import base64
import json
import struct
import sys
import threading
import time
from typing import Any

from pdxfer.engine.region import host_memory
from pdxfer.protocol.checksum import chunk_checksum

from pdxfer.transport.nixl_agent import NixlAgent
from pdxfer.transport.nixl_progress import NixlProgress
from pdxfer.transport.nixl_regcache import buffer_address
from pdxfer.transport.prefault import populate


def serve(size: int, device: str = "cpu") -> None:
    """Run the baseline target until stdin closes; prints {"md", "addr", "size", "ucx_tls"} first.
    `device` "cuda": the target buffer is GPU memory (VRAM), verified with devsum64 there."""
    agent = NixlAgent(f"nixlraw-target-{time.monotonic_ns()}")
    region: Any = None
    if device == "cpu":
        region = host_memory(size)  # the same kind of memory as pdxfer's receive region
        view: Any = memoryview(region)
        addr, mem = buffer_address(view), ("DRAM", 0)
        populate(addr, size)  # faulted in before any measured WRITE, as pdxfer's receiver prefaults its region
    else:
        import torch

        view = torch.empty(size, dtype=torch.uint8, device=device)
        addr, mem = int(view.data_ptr()), ("VRAM", view.device.index or 0)
    agent.register(addr, size, *mem)
    progress = NixlProgress(agent, "nixlraw-target")
    count = [0, 0, 0]  # notifications, verification mismatches, end of the highest verified chunk

    def on_notifs(notifs: dict[str, list[bytes]]) -> None:
        for msgs in notifs.values():
            for raw in msgs:
                count[0] += 1
                if len(raw) == _VERIFY_NOTIF.size:
                    _, off, n, csum = _VERIFY_NOTIF.unpack(raw)
                    count[1] += _checksum(view[off : off + n]) != csum
                    count[2] = max(count[2], off + n)

    loop = _NoLoop(on_notifs)
    progress.set_sink(loop, loop.sink)  # type: ignore[arg-type]
    progress.want_notifs(+1)  # always listening: a bench target has nothing else to do
    print(json.dumps({"md": base64.b64encode(agent.metadata()).decode(), "addr": addr, "size": size,
                      "mem": list(mem), "ucx_tls": agent.ucx_env.get("UCX_TLS")}), flush=True)
    sys.stdin.read()
    progress.stop()
    agent.close()
    if isinstance(view, memoryview):
        view.release()
    print(json.dumps({"notifications": count[0], "verify_mismatches": count[1], "verified_span": count[2]}),
          flush=True)


_VERIFY_NOTIF = struct.Struct("<QQQQ")  # sequence number, offset, length, checksum


def _checksum(chunk: Any) -> int:
    """What pdxfer's receiver would compute there: xxh3 on the host, devsum64 on a GPU."""
    if hasattr(chunk, "is_cuda"):
        from pdxfer.pack.devsum_cuda import device_checksums

        return device_checksums([chunk])[0]
    return chunk_checksum(chunk)


class _NoLoop:
    """Stands in for an event loop: the target runs the sink right on the progress thread."""

    def __init__(self, sink: Any) -> None:
        self.sink = sink

    def call_soon_threadsafe(self, fn: Any, *args: Any) -> None:
        fn(*args)


class RawWriter:
    """The bench process's side: its own agent, the source buffer registered once."""

    def __init__(self, target: dict[str, Any], data: Any) -> None:
        """`data`: a host buffer (memoryview) or a uint8 CUDA tensor (WRITEs from VRAM)."""
        self.agent = NixlAgent(f"nixlraw-writer-{time.monotonic_ns()}")
        self.remote = self.agent.add_remote(base64.b64decode(target["md"]))
        self.remote_addr = int(target["addr"])
        self.remote_mem = tuple(target.get("mem", ("DRAM", 0)))
        nbytes = int(data.numel()) if hasattr(data, "is_cuda") else data.nbytes
        self.span = min(int(target["size"]), nbytes)  # one transfer's bytes
        self.target_size = int(target["size"])
        self.data = data
        if hasattr(data, "is_cuda"):
            self.local_addr, self.local_mem = int(data.data_ptr()), ("VRAM", data.device.index or 0)
        else:
            self.local_addr, self.local_mem = buffer_address(data), ("DRAM", 0)
        self.agent.register(self.local_addr, nbytes, *self.local_mem)

    def run(self, total_bytes: int, chunk: int, concurrency: int, timeout: float = 120.0, *,
            verify: bool = False, start: int = 0, ranges: int = 1) -> float:
        """Seconds to WRITE `total_bytes` in `chunk` pieces with `concurrency` in flight,
        from offset `start` on, transfer `k` of them into range `k % ranges` of the target
        (see the module docstring); with `verify`, every chunk hashed before its WRITE and by
        the target on arrival."""
        inflight: list[Any] = []
        if ranges < 1 or ranges * self.span > self.target_size:
            raise ValueError(f"{ranges} landing ranges of {self.span} bytes do not fit the "
                             f"{self.target_size}-byte target")
        left, pos, seq, rng = total_bytes, start - start % chunk, 0, 0
        deadline = time.monotonic() + timeout
        t0 = time.perf_counter()
        while left or inflight:
            while left and len(inflight) < concurrency:
                if pos >= self.span:
                    pos, rng = 0, (rng + 1) % ranges
                dst = rng * self.span + pos
                n = min(chunk, left, self.span - pos)
                if verify:
                    notif = _VERIFY_NOTIF.pack(seq, dst, n, _checksum(self.data[pos : pos + n]))
                else:
                    notif = seq.to_bytes(8, "little")
                h, state, err = self.agent.post_write([(self.local_addr + pos, self.remote_addr + dst, n)], self.remote,
                                                      notif, self.local_mem, self.remote_mem)  # type: ignore[arg-type]
                if state == "ERR":
                    raise RuntimeError(f"baseline WRITE failed: {err}")
                if h is not None:
                    inflight.append(h)
                left -= n
                pos += n
                seq += 1
            if inflight:
                finished, _ = self.agent.poll(inflight, False)
                if any(state != "DONE" for _, state in finished):
                    raise RuntimeError("baseline WRITE completed with state ERR")
                done = {id(h) for h, _ in finished}
                inflight = [h for h in inflight if id(h) not in done]
                if time.monotonic() > deadline:
                    raise RuntimeError(f"baseline run did not finish within {timeout}s")
        return time.perf_counter() - t0

    def close(self) -> None:
        self.agent.close()


def run_parallel(writers: list[RawWriter], total_bytes: int, chunk: int, concurrency: int, *,
                 verify: bool = False, timeout: float = 120.0, ranges: int = 1) -> float:
    """Seconds for `writers` (each its own agent, on its own thread) to WRITE `total_bytes`
    between them, each starting at its own share of the buffer: the plain loop with the
    parallelism of pdxfer's NIXL workers, so a ratio to it compares like with like."""
    if len(writers) == 1:
        return writers[0].run(total_bytes, chunk, concurrency, timeout, verify=verify, ranges=ranges)
    share = -(-total_bytes // len(writers) // chunk) * chunk
    errors: list[BaseException] = []

    def one(i: int, w: RawWriter) -> None:
        try:
            w.run(min(share, max(0, total_bytes - i * share)), chunk, concurrency, timeout, verify=verify,
                  start=i * w.span // len(writers), ranges=ranges)
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=one, args=(i, w), name=f"nixlraw-writer-{i}") for i, w in enumerate(writers)]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    deadline = time.monotonic() + timeout + 10  # each run() gives up at `timeout` itself
    for t in threads:
        t.join(max(0.0, deadline - time.monotonic()))
    if any(t.is_alive() for t in threads):
        raise RuntimeError(f"parallel baseline writers still running after {timeout + 10:.0f}s")
    if errors:
        raise errors[0]
    return time.perf_counter() - t0


def main() -> None:
    from pdxfer.logs import configure

    configure("warning")
    serve(int(sys.argv[1]), sys.argv[2] if len(sys.argv) > 2 else "cpu")


if __name__ == "__main__":
    main()
