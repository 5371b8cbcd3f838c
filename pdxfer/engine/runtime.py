"""A uvloop event loop on its own thread, so engines with a synchronous main loop
(vLLM's scheduler and workers) never block on the network and never need asyncio."""

from __future__ import annotations

import asyncio
import concurrent.futures
import threading
from typing import Any, Awaitable, Callable, TypeVar

import structlog
import uvloop

T = TypeVar("T")
log = structlog.get_logger("pdxfer.runtime")

_WATCH_S = 0.5  # watchdog period: two wake-ups a second per loop, nothing else
STALL_WARN_S = 1.0  # a watchdog tick this late means the loop itself was stuck


class LoopThread:
    """The loop also watches itself: a tick every `_WATCH_S` that runs more than
    `STALL_WARN_S` late means this process's loop did not run (GIL held by the engine,
    CPU starvation, a blocking call on the loop). That is logged, counted in `stalls`,
    and lets deadlines tell "the peer was silent" from "we were not listening"."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.loop = uvloop.new_event_loop()
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._started = threading.Event()
        self.stalls = 0
        self.worst_stall_s = 0.0
        self.last_stall_end = float("-inf")  # loop.time() when the latest stall ended
        self._next_tick: float | None = None

    def start(self, timeout: float = 10.0) -> None:
        self._thread.start()
        if not self._started.wait(timeout):
            raise RuntimeError(f"event loop thread {self.name} did not start within {timeout}s")

    def _watch(self) -> None:
        now = self.loop.time()
        late = 0.0 if self._next_tick is None else now - self._next_tick
        if late > STALL_WARN_S:
            self.stalls += 1
            self.worst_stall_s = max(self.worst_stall_s, late)
            self.last_stall_end = now
            log.warning("event_loop_stalled", loop=self.name, seconds=round(late, 3))
        self._next_tick = now + _WATCH_S
        self.loop.call_at(self._next_tick, self._watch)

    def _run(self) -> None:
        asyncio.set_event_loop(self.loop)
        self.loop.call_soon(self._started.set)
        self.loop.call_soon(self._watch)
        try:
            self.loop.run_forever()
        finally:
            pending = [t for t in asyncio.all_tasks(self.loop) if not t.done()]
            for t in pending:
                t.cancel()
            if pending:
                self.loop.run_until_complete(asyncio.gather(*pending, return_exceptions=True))
            self.loop.run_until_complete(self.loop.shutdown_asyncgens())
            self.loop.close()

    def stall_report(self) -> dict[str, float]:
        return {"stalls": self.stalls, "worst_s": round(self.worst_stall_s, 3)}

    @property
    def in_loop_thread(self) -> bool:
        return threading.current_thread() is self._thread

    def submit(self, coro: Awaitable[T]) -> "concurrent.futures.Future[T]":
        return asyncio.run_coroutine_threadsafe(coro, self.loop)  # type: ignore[arg-type]

    def run(self, coro: Awaitable[T], timeout: float) -> T:
        """Run a coroutine on the loop and wait (bounded) for its result."""
        if self.in_loop_thread:
            raise RuntimeError("LoopThread.run() called from its own loop thread would deadlock")
        fut = self.submit(coro)
        try:
            return fut.result(timeout)
        except concurrent.futures.TimeoutError:
            fut.cancel()
            raise

    def call(self, fn: Callable[..., Any], *args: Any) -> None:
        self.loop.call_soon_threadsafe(fn, *args)

    def stop(self, timeout: float = 10.0) -> None:
        if self._thread.is_alive():
            self.loop.call_soon_threadsafe(self.loop.stop)
            self._thread.join(timeout)
            if self._thread.is_alive():
                log.error("loop_thread_stuck", name=self.name, timeout=timeout)
