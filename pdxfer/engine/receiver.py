"""`Receiver`: the decode side's handle on pdxfer.

It owns one contiguous receive region (`engine.region`: an anonymous mmap, or one GPU's
memory with `device="cuda:N"`; the NIXL transport registers it once, on the first NIXL
HELLO, and deregisters it in `close()` before it is freed). Every transfer lands in a slice of it that
the admission controller reserved before the first byte moved. A delivered transfer
stays reserved until the consumer calls `release()` (after unpacking it into the KV
cache); one that nobody claims is reclaimed after `claim_timeout_s`.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
from typing import Any, Callable

import structlog
import zmq.asyncio

from pdxfer.admission import Ledger
from pdxfer.engine.config import ReceiverConfig, cuda_index
from pdxfer.engine.receiver_core import ReceiverCore
from pdxfer.engine.region import ReceiveRegion
from pdxfer.protocol.checksum import XXH3
from pdxfer.engine.runtime import LoopThread
from pdxfer.errors import TransferAborted, TransferTimeout
from pdxfer.layout.payload import Payload
from pdxfer.transport.control import ControlServer
from pdxfer.transport.tcp import DataServerProtocol

log = structlog.get_logger("pdxfer.receiver")

__all__ = ["Receiver", "ReceivedTransfer"]


class ReceivedTransfer:
    """A verified transfer's bytes, valid until `release()`: memoryviews of host memory,
    or uint8 CUDA tensors (views, no copy) when the receiver's region is on a GPU."""

    def __init__(self, receiver: "Receiver", tid: str, peer: str, payload: Payload, view: memoryview) -> None:
        self._receiver = receiver
        self.transfer_id = tid
        self.peer = peer
        self.payload = payload
        self._view: memoryview | None = view
        self._released = False

    @property
    def view(self) -> memoryview:
        if self._view is None:
            raise TransferAborted("buffer was released or reclaimed", transfer_id=self.transfer_id)
        return self._view

    def chunk(self, index: int) -> memoryview:
        offset, length = self.payload.chunk_range(index)
        return self.view[offset : offset + length]

    def release(self) -> None:
        """Give the reserved bytes back; the views must not be used afterwards."""
        if self._released:
            return
        self._released = True
        self._view = None
        self._receiver._rt.call(self._receiver._core_release, self.transfer_id, self)

    def _invalidate(self) -> None:
        self._released = True
        self._view = None

    def __enter__(self) -> "ReceivedTransfer":
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


class Receiver:
    def __init__(self, config: ReceiverConfig | None = None, **overrides: Any) -> None:
        if config is None:
            config = ReceiverConfig(**overrides)
        elif overrides:
            raise TypeError("pass either a ReceiverConfig or keyword overrides, not both")
        self.config = config
        self._region = ReceiveRegion(config.capacity, cuda_index(config.device), config.checksum_algorithm)
        self.region = self._region.buffer  # a memoryview, or a uint8 CUDA tensor
        self._rt = LoopThread(f"pdxfer-receiver-{config.receiver_id}")
        self._core: ReceiverCore | None = None
        self._server: asyncio.AbstractServer | None = None
        self._conns: set[DataServerProtocol] = set()
        self._zctx: zmq.asyncio.Context | None = None
        self.control_address = ""
        self.data_address = ""
        self._started = False
        self._closed = False

    def start(self) -> "Receiver":
        if not self._started:
            self._rt.start()
            self._rt.run(self._astart(), timeout=10)
            self._started = True
        return self

    async def _astart(self) -> None:
        loop = asyncio.get_running_loop()
        core = ReceiverCore(self.config, self._region, self._make_received)
        self._core = core
        outer = self

        class _Sink:
            def resolve(self, conn, header):  # noqa: ANN001
                return core.tcp.resolve(conn, header)

            def on_frame(self, conn, event):  # noqa: ANN001
                core.tcp.on_frame(conn, event)

            def on_lost(self, conn, error):  # noqa: ANN001
                outer._conns.discard(conn)
                core.tcp.on_lost(conn, error)

        sink = _Sink()

        def factory() -> DataServerProtocol:
            # xxh3 is computed piece by piece as bytes land; another algorithm over the chunk
            p = DataServerProtocol(sink, self.config.recv_piece_bytes, hash_pieces=self._region.algorithm == XXH3)
            self._conns.add(p)
            return p

        self._server = await loop.create_server(factory, self.config.host, self.config.data_port, backlog=1024)
        host, port = self._server.sockets[0].getsockname()[:2]
        self.data_address = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
        core.data_address = self.config.advertise_data or self.data_address  # what HELLO_OK tells senders
        self._zctx = zmq.asyncio.Context()
        host_part = f"[{self.config.host}]" if ":" in self.config.host else self.config.host
        bind = f"tcp://{host_part}:{self.config.control_port or '*'}"
        if not self.config.control_port:
            bind = f"tcp://{host_part}:0"
        core.control = ControlServer(self._zctx, bind, core.on_control)
        core.control.start()
        if self.config.nixl_eager and core.nixl is not None:
            core.nixl.begin_setup()  # in a worker thread; a failure is logged, and a HELLO tries again
        self.control_address = core.control.address
        log.info("receiver_started", control=self.control_address, data=self.data_address,
                 capacity=self.config.capacity)

    def _make_received(self, tid: str, peer: str, payload: Payload, view: memoryview) -> ReceivedTransfer:
        return ReceivedTransfer(self, tid, peer, payload, view)

    def _core_release(self, tid: str, received: ReceivedTransfer) -> None:
        if self._core is not None:
            self._core.release(tid, received)

    def __enter__(self) -> "Receiver":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self, timeout: float = 10.0) -> None:
        """End every reservation (SHUTDOWN), close sockets, stop the loop, unmap the region."""
        if self._closed:
            return
        self._closed = True
        if self._started:
            try:
                self._rt.run(self._aclose(), timeout)
            except (concurrent.futures.TimeoutError, RuntimeError) as exc:
                log.error("receiver_close_incomplete", error=repr(exc))
            self._rt.stop(timeout)
        self.region = None
        if not self._region.close():
            log.warning("receiver_region_still_exported", hint="a ReceivedTransfer view outlived close()")

    async def _aclose(self) -> None:
        if self._core is not None:
            self._core.shutdown()
            if self._core.nixl is not None:  # deregister the region before it is unmapped below
                await self._core.nixl.close()
        if self._server is not None:
            self._server.close()
        for c in list(self._conns):
            if c.transport is not None:
                c.transport.abort()
        if self._core is not None and self._core.control is not None:
            await self._core.control.close()
        if self._zctx is not None:
            self._zctx.term()

    # ------------------------------------------------------------------ API
    def on_transfer(self, callback: Callable[[ReceivedTransfer], None] | None) -> None:
        """Call `callback(received)` on the loop thread for every delivered transfer that
        has no waiter; the callback owns it and must release it (quickly, or hand it off)."""
        def _set() -> None:
            assert self._core is not None
            self._core.on_transfer = callback
        self._rt.run(self._async(_set), timeout=10)

    @staticmethod
    async def _async(fn: Callable[[], Any]) -> Any:
        return fn()

    def wait_future(self, transfer_id: str, timeout: float) -> "concurrent.futures.Future[ReceivedTransfer]":
        return self._rt.submit(self._await(transfer_id, timeout))

    def wait(self, transfer_id: str, timeout: float) -> ReceivedTransfer:
        """Block until the transfer is delivered (or failed); the caller must release it."""
        return self.wait_future(transfer_id, timeout).result(timeout + 5)

    async def wait_async(self, transfer_id: str, timeout: float) -> ReceivedTransfer:
        return await asyncio.wrap_future(self.wait_future(transfer_id, timeout))

    async def _await(self, tid: str, timeout: float) -> ReceivedTransfer:
        assert self._core is not None
        fut = self._core.wait(tid)
        try:
            return await asyncio.wait_for(fut, timeout)
        except asyncio.TimeoutError:
            raise TransferTimeout(f"not delivered within {timeout}s", transfer_id=tid, waiting_for="delivery") from None
        finally:
            ws = self._core.waiters.get(tid)
            if ws and fut in ws:
                ws.remove(fut)
                if not ws:
                    del self._core.waiters[tid]

    @property
    def loop_stalls(self) -> dict[str, float]:
        """How often, and how long at worst, this receiver's event loop was held up."""
        return self._rt.stall_report()

    def ledger(self, timeout: float = 10.0) -> Ledger:
        assert self._core is not None
        core = self._core
        return self._rt.run(self._async(core.admission.snapshot), timeout)
