"""Raw-socket baseline: blocking sendall / recv_into with preallocated buffers.

This is the ceiling a Python transfer engine can reach on loopback; pdxfer's bench
reports its throughput as a ratio to this, measured in the same run. It moves the same
bytes pdxfer moves: the sender walks a transfer-sized buffer chunk by chunk and the
receiver lands each chunk at its own offset of a transfer-sized buffer, as a real KV
receiver must. (Re-sending one cache-hot chunk buffer would measure the L2 cache, not
the path a KV cache takes: it ran ~2x cheaper in CPU per GB here.)
"""

from __future__ import annotations

import json
import socket
import struct
import sys
import threading
import time

_HDR = struct.Struct("<QQQ")  # total bytes, chunk size, transfer (buffer) size


def _serve_conn(conn: socket.socket) -> None:
    with conn:
        hdr = bytearray(_HDR.size)
        view = memoryview(hdr)
        got = 0
        while got < _HDR.size:
            n = conn.recv_into(view[got:])
            if not n:
                return
            got += n
        total, chunk, span = _HDR.unpack(hdr)
        buf = memoryview(bytearray(span))
        left, pos = total, 0
        while left:
            if pos >= span:
                pos = 0
            n = conn.recv_into(buf[pos : pos + min(chunk, left, span - pos)])
            if not n:
                return
            left -= n
            pos += n
        conn.sendall(b"\x01")


def serve(host: str = "127.0.0.1") -> None:
    """Run the baseline receiver until stdin closes; prints {"port": N} first."""
    srv = socket.create_server((host, 0), backlog=64)
    print(json.dumps({"port": srv.getsockname()[1]}), flush=True)
    threading.Thread(target=lambda: (sys.stdin.read(), srv.close()), daemon=True).start()
    while True:
        try:
            conn, _ = srv.accept()
        except OSError:
            return
        conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        threading.Thread(target=_serve_conn, args=(conn,), daemon=True).start()


def _send_one(port: int, total: int, data: memoryview, chunk: int, timeout: float) -> None:
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        s.sendall(_HDR.pack(total, chunk, len(data)))
        left, pos = total, 0
        while left:
            if pos >= len(data):
                pos = 0
            n = min(chunk, left, len(data) - pos)
            s.sendall(data[pos : pos + n])
            left -= n
            pos += n
        if s.recv(1) != b"\x01":
            raise ConnectionError("baseline receiver did not acknowledge")


def run_baseline(port: int, total_bytes: int, data: memoryview, chunk: int, concurrency: int,
                 timeout: float = 120.0) -> float:
    """Seconds to push `total_bytes` of `data` (cycled, in `chunk` pieces) over `concurrency` connections."""
    share = total_bytes // concurrency
    errors: list[BaseException] = []

    def worker() -> None:
        try:
            _send_one(port, share, data, chunk, timeout)
        except BaseException as exc:  # reported below
            errors.append(exc)

    threads = [threading.Thread(target=worker) for _ in range(concurrency)]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout)
    dt = time.perf_counter() - t0
    if errors or any(t.is_alive() for t in threads):
        raise RuntimeError(f"baseline run failed: {errors or 'timeout'}")
    return dt


if __name__ == "__main__":
    serve()
