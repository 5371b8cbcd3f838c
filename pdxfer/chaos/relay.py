"""A TCP relay between senders and a receiver's data port that applies stream faults.

It runs its own event loop on a thread of the chaos runner. Bytes from the sender side
go through one shared `StreamTamper` (a fault armed by the runner hits whichever data
connection carries bytes next); bytes back from the receiver pass untouched. A reset
sets SO_LINGER 0 on both sockets before closing them, so both peers see ECONNRESET, as
they would from a crashed middlebox, not a polite FIN.
"""

from __future__ import annotations

import asyncio
import socket
import struct
import threading
from typing import Any

from pdxfer.chaos.faults import Cut, Fault, Forward, Hold, StreamTamper

_READ = 256 << 10


class Relay:
    def __init__(self, target_host: str, target_port: int, *, seed: int = 0, host: str = "127.0.0.1") -> None:
        self.target = (target_host, target_port)
        self.host = host
        self.port = 0
        self.tamper = StreamTamper(seed)
        self.connections = 0
        self.bytes_up = 0
        self._generation = 0  # bumped by retarget/cut_all: a connection still being set up then is cut too
        self._loop = asyncio.new_event_loop()
        self._server: asyncio.AbstractServer | None = None
        self._conns: set[tuple[asyncio.StreamWriter, asyncio.StreamWriter]] = set()
        self._started = threading.Event()
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="pdxfer-chaos-relay", daemon=True)

    # ----------------------------------------------------------- runner's thread
    def start(self, timeout: float = 10.0) -> "Relay":
        self._thread.start()
        if not self._started.wait(timeout):
            raise TimeoutError(f"chaos relay did not start within {timeout}s")
        if self._error is not None:
            raise RuntimeError(f"chaos relay failed to start: {self._error}") from self._error
        return self

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"

    def retarget(self, host: str, port: int) -> None:
        """New connections go to a restarted receiver's data port; old ones are cut."""
        self._call(self._retarget, (host, port))

    def arm(self, fault: Fault, hold_s: float = 0.0) -> None:
        self._call(self.tamper.arm, fault, hold_s)

    def cut_all(self) -> None:
        self._call(self._cut_all)

    def stats(self) -> dict[str, Any]:
        return {"connections": self.connections, "bytes_up": self.bytes_up, "applied": dict(self.tamper.applied),
                "flips": len(self.tamper.flipped_at)}

    def close(self, timeout: float = 10.0) -> None:
        if self._loop.is_closed():
            return
        if self._thread.is_alive():
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(timeout)
        if self._thread.is_alive():
            raise RuntimeError(f"chaos relay thread still running after {timeout}s")
        self._loop.close()

    def _call(self, fn: Any, *args: Any, timeout: float = 10.0) -> Any:
        fut = asyncio.run_coroutine_threadsafe(_apply(fn, *args), self._loop)
        return fut.result(timeout)

    # ----------------------------------------------------------- relay's thread
    def _run(self) -> None:
        asyncio.set_event_loop(self._loop)
        try:
            self._server = self._loop.run_until_complete(
                asyncio.start_server(self._serve, self.host, 0, reuse_address=True))
            self.port = self._server.sockets[0].getsockname()[1]
        except BaseException as exc:  # reported by start()
            self._error = exc
            self._started.set()
            return
        self._started.set()
        try:
            self._loop.run_forever()
        finally:
            self._server.close()
            self._cut_all()
            pending = [t for t in asyncio.all_tasks(self._loop) if not t.done()]
            for t in pending:
                t.cancel()
            if pending:
                self._loop.run_until_complete(asyncio.wait(pending, timeout=5))

    def _retarget(self, target: tuple[str, int]) -> None:
        self.target = target
        self._cut_all()

    def _cut_all(self) -> None:
        self._generation += 1
        for pair in list(self._conns):
            _reset(*pair)
        self._conns.clear()

    async def _serve(self, down_r: asyncio.StreamReader, down_w: asyncio.StreamWriter) -> None:
        self.connections += 1
        generation = self._generation
        try:
            up_r, up_w = await asyncio.wait_for(asyncio.open_connection(*self.target), 10)
        except (OSError, asyncio.TimeoutError):
            _reset(down_w)
            return
        pair = (down_w, up_w)
        if generation != self._generation:  # cut while we were dialling
            _reset(*pair)
            return
        self._conns.add(pair)
        try:
            await asyncio.gather(self._pump_up(down_r, up_w, pair), _pump(up_r, down_w))
        except (OSError, asyncio.IncompleteReadError):
            pass  # the other side went away (or we cut it): the pair is reset below
        finally:
            if pair in self._conns:
                self._conns.discard(pair)
                _reset(*pair)

    async def _pump_up(self, r: asyncio.StreamReader, w: asyncio.StreamWriter,
                       pair: tuple[asyncio.StreamWriter, asyncio.StreamWriter]) -> None:
        offset = 0
        while True:
            data = await r.read(_READ)
            if not data:
                w.close()
                return
            for action in self.tamper.feed(data, offset):
                if isinstance(action, Cut):
                    self._conns.discard(pair)
                    _reset(*pair)
                    return
                if isinstance(action, Hold):
                    await asyncio.sleep(action.seconds)  # poll-ok: the fault is a stall of this long
                elif isinstance(action, Forward):
                    w.write(action.data)
                    await w.drain()
            offset += len(data)
            self.bytes_up += len(data)


async def _pump(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
    while True:
        data = await r.read(_READ)
        if not data:
            w.close()
            return
        w.write(data)
        await w.drain()


async def _apply(fn: Any, *args: Any) -> Any:
    return fn(*args)


def _reset(*writers: asyncio.StreamWriter) -> None:
    """Close with a reset (RST), not a FIN: SO_LINGER 0, then abort the transport."""
    for w in writers:
        if w.transport.is_closing():
            continue
        sock = w.get_extra_info("socket")
        try:
            if sock is not None:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        except OSError:
            pass  # the socket is already gone: abort() below is all that is left to do
        w.transport.abort()
