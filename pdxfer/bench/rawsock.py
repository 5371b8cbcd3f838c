"""Raw-socket baseline: blocking sendall / recv_into with preallocated buffers.

This is the ceiling a Python transfer engine can reach on loopback; pdxfer's bench
reports its throughput as a ratio to this, measured in the same run. It moves the same
bytes pdxfer moves: the sender walks a transfer-sized buffer chunk by chunk and the
receiver lands each chunk at its own offset of a transfer-sized buffer, as a real KV
receiver must. (Re-sending one cache-hot chunk buffer would measure the L2 cache, not
the path a KV cache takes: it ran ~2x cheaper in CPU per GB here.)

With `verify`, the same loop also does what any transfer that checks its bytes must: the
sender hashes each chunk (xxh3-64, pdxfer's own `chunk_checksum`) and sends the checksum
ahead of it in the same syscall, and the receiver compares. Its receiver lands each
chunk in pieces of `RECV_PIECE_BYTES` and hashes each piece while it is still in cache,
as pdxfer's does (hashing a whole landed 2 MiB chunk afterwards ran ~25% slower here),
with the same receive low-water mark (SO_RCVLOWAT = the piece: one wake-up per piece),
so it is the verified loop at its plainest *good*, not a strawman. The plain baseline
stays plain: defaults everywhere, as the issue defines it. `pdxfer bench
transfer --verified-baseline` reports pdxfer against it as well.
"""

from __future__ import annotations

import json
import socket
import struct
import sys
import threading
import time

import xxhash

from pdxfer.protocol.checksum import chunk_checksum
from pdxfer.protocol.frames import RECV_PIECE_BYTES

_HDR = struct.Struct("<QQQQ")  # total bytes, chunk size, transfer (buffer) size, flags
_VERIFY = 1
_CSUM = struct.Struct("<Q")


def _recv_exactly(conn: socket.socket, view: memoryview) -> bool:
    got = 0
    while got < view.nbytes:
        n = conn.recv_into(view[got:])
        if not n:
            return False
        got += n
    return True


def _serve_conn(conn: socket.socket) -> None:
    with conn:
        hdr = bytearray(_HDR.size)
        if not _recv_exactly(conn, memoryview(hdr)):
            return
        total, chunk, span, flags = _HDR.unpack(hdr)
        buf = memoryview(bytearray(span))
        left, pos = total, 0
        if flags & _VERIFY:
            # With a timeout Python polls before each recv: the kernel then wakes us once
            # `mark` bytes are queued and the recv takes them without sleeping. A blocking
            # recv that copied part of a piece and slept for the rest was never woken (the
            # wake-up compares the *uncopied* bytes with the mark).
            conn.settimeout(120)
            mark = _LowWater(conn)
            csum = bytearray(_CSUM.size)
            ok = True
            while left:
                if pos >= span:
                    pos = 0
                n = min(chunk, left, span - pos)
                mark.set(_CSUM.size)
                if not _recv_exactly(conn, memoryview(csum)):
                    return
                h = xxhash.xxh3_64()  # the same digest as chunk_checksum, piece by piece
                end = pos + n
                while pos < end:
                    piece = buf[pos : min(end, pos + RECV_PIECE_BYTES)]
                    mark.set(piece.nbytes)
                    got = conn.recv_into(piece)
                    if not got:
                        return
                    h.update(buf[pos : pos + got])  # while the piece is still in cache
                    pos += got
                ok &= h.intdigest() == _CSUM.unpack(csum)[0]
                left -= n
            conn.sendall(b"\x01" if ok else b"\x00")
            return
        while left:
            if pos >= span:
                pos = 0
            n = conn.recv_into(buf[pos : pos + min(chunk, left, span - pos)])
            if not n:
                return
            left -= n
            pos += n
        conn.sendall(b"\x01")


class _LowWater:
    """SO_RCVLOWAT set to what the next read waits for, as pdxfer's parser sets it. The
    kernel wakes a waiting reader only once that many bytes are queued, whatever the read
    asked for, so the mark must never exceed what the sender still owes (a fixed 1 MiB
    mark hung this loop on the last 256 KiB chunk of a stream)."""

    def __init__(self, conn: socket.socket) -> None:
        self._conn = conn
        self._value = 1

    def set(self, nbytes: int) -> None:
        if nbytes != self._value:
            self._conn.setsockopt(socket.SOL_SOCKET, socket.SO_RCVLOWAT, nbytes)
            self._value = nbytes


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


def _send_one(port: int, total: int, data: memoryview, chunk: int, timeout: float, verify: bool) -> None:
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        s.sendall(_HDR.pack(total, chunk, len(data), _VERIFY if verify else 0))
        left, pos = total, 0
        while left:
            if pos >= len(data):
                pos = 0
            n = min(chunk, left, len(data) - pos)
            piece = data[pos : pos + n]
            if verify:
                _sendmsg_all(s, [_CSUM.pack(chunk_checksum(piece)), piece])
            else:
                s.sendall(piece)
            left -= n
            pos += n
        ack = s.recv(1)
        if ack == b"\x00":
            raise ConnectionError("baseline receiver found a chunk whose checksum did not match")
        if ack != b"\x01":
            raise ConnectionError("baseline receiver did not acknowledge")


def _sendmsg_all(s: socket.socket, parts: list) -> None:
    """Checksum and chunk in one syscall, as pdxfer sends header and payload."""
    views = [memoryview(p).cast("B") for p in parts]
    while views:
        sent = s.sendmsg(views)
        while views and sent >= views[0].nbytes:
            sent -= views[0].nbytes
            views.pop(0)
        if views and sent:
            views[0] = views[0][sent:]


def run_baseline(port: int, total_bytes: int, data: memoryview, chunk: int, concurrency: int,
                 timeout: float = 120.0, *, verify: bool = False) -> float:
    """Seconds to push `total_bytes` of `data` (cycled, in `chunk` pieces) over `concurrency`
    connections; with `verify`, every chunk hashed on both ends and compared."""
    share = total_bytes // concurrency
    errors: list[BaseException] = []

    def worker() -> None:
        try:
            _send_one(port, share, data, chunk, timeout, verify)
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
