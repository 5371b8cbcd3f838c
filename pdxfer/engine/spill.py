"""The Sender's spill side: moves held chunks of not-yet-granted transfers out of the
memory budget into the tiers (host, then disk), so a prefill engine keeps producing while
decode workers are full.

Two triggers:
- budget pressure: `put()` would wait for budget. The budget's spill hook runs on the
  caller's thread (never the event loop): it asks the loop for victims, copies them into
  a tier right there, and hands each copy back to the loop, which swaps it in and releases
  the chunk's budget. Victims are the newest ungranted transfers first, since the
  receiver grants in FIFO order and those will be sent last.
- waiting: a transfer with no GRANT `spill_after_s` after it was opened has its held
  chunks, and every chunk put after that, copied out by the I/O threads.

Chunk state changes only on the loop; copies run elsewhere. A chunk that got sent or
dropped while it was being copied keeps its original buffer, and the copy is freed.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import os
import tempfile
import threading
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterable

import structlog

from pdxfer.errors import PdxferError, SpillExhausted
from pdxfer.layout.buffers import DeviceChunk
from pdxfer.protocol.checksum import chunk_checksum
from pdxfer.protocol.states import OutState
from pdxfer.sendq import MemoryBudget
from pdxfer.sendq.holdings import Holdings, is_spilled
from pdxfer.sendq.releases import ReleaseNotices
from pdxfer.tiers import DiskTier, HostTier, SpilledChunk, SpillStore
from pdxfer.units import format_size

if TYPE_CHECKING:
    from pdxfer.engine.config import SenderConfig
    from pdxfer.engine.outctx import OutCtx
    from pdxfer.engine.runtime import LoopThread

log = structlog.get_logger("pdxfer.spill")

UNGRANTED = (OutState.WAITING_PEER, OutState.RESERVING, OutState.QUEUED)
Victim = tuple["OutCtx", int, Any, "int | None"]  # ctx, chunk index, buffer, checksum


def default_spill_dir() -> Path:
    return Path(tempfile.gettempdir()) / "pdxfer-spill"


class SpillCoordinator:
    def __init__(self, cfg: "SenderConfig", budget: MemoryBudget, rt: "LoopThread",
                 live: Callable[[], Iterable["OutCtx"]], notices: ReleaseNotices | None = None) -> None:
        self.cfg = cfg
        self.budget = budget
        self._rt = rt
        self._live = live
        host = HostTier(cfg.spill_host_bytes) if cfg.spill_host_bytes > 0 else None
        disk = None
        if cfg.spill_disk_bytes > 0:
            disk = DiskTier(Path(cfg.spill_dir) if cfg.spill_dir else default_spill_dir(), cfg.spill_disk_bytes)
        self.store = SpillStore(host, disk)
        self.holdings = Holdings(budget, self.store, notices)
        self.io = concurrent.futures.ThreadPoolExecutor(2, thread_name_prefix="pdxfer-spill-io")
        self._hook_lock = threading.Lock()
        self._claimed: set[tuple[str, int]] = set()  # loop only: chunks being copied out
        self.evictions = {"budget": 0, "waited": 0}  # chunks moved out of the budget, by cause
        self.closed = False
        budget.spill_hook = self._on_budget_full

    # ------------------------------------------------------------ budget pressure
    def _on_budget_full(self, needed: int) -> int:
        """Budget hook (put() caller's thread): free at least `needed` bytes if the tiers can."""
        if self.closed or self._rt.in_loop_thread:
            return 0
        with self._hook_lock:
            try:
                victims = self._rt.run(self._pick(needed), timeout=self.cfg.handshake_timeout_s)
            except (concurrent.futures.TimeoutError, RuntimeError):
                return 0  # loop busy or closed: plain backpressure
            return self._copy_out(victims, "budget")

    async def _pick(self, needed: int) -> list[Victim]:
        out: list[Victim] = []
        total = 0
        for ctx in sorted(self._live(), key=lambda c: c.started, reverse=True):
            if ctx.out.state not in UNGRANTED:
                continue
            for index, buf, csum in sorted(ctx.out.held_chunks(), key=lambda h: h[0], reverse=True):
                if is_spilled(buf) or isinstance(buf, DeviceChunk) or (ctx.out.tid, index) in self._claimed:
                    continue  # GPU chunks stay where they are: the tiers hold host copies
                self._claimed.add((ctx.out.tid, index))
                out.append((ctx, index, buf, csum))
                total += ctx.out.payload.chunk_sizes[index]
                if total >= needed:
                    return out
        return out

    # ------------------------------------------------------------ waited too long
    def arm(self, ctx: "OutCtx") -> None:
        """On the loop, when a transfer opens: spill it if no GRANT comes in time."""
        if self.cfg.spill_after_s is not None:
            loop = asyncio.get_running_loop()
            ctx.extra["spill_timer"] = loop.call_later(self.cfg.spill_after_s, self._waited, ctx)

    def _waited(self, ctx: "OutCtx") -> None:
        ctx.extra.pop("spill_timer", None)
        if ctx.out.terminal or ctx.out.state not in UNGRANTED:
            return
        ctx.extra["spill_all"] = True
        ctx.log.debug("spill_waited", after_s=self.cfg.spill_after_s)
        self.spill_now(ctx, [(i, b, c) for i, b, c in ctx.out.held_chunks()
                             if not is_spilled(b) and not isinstance(b, DeviceChunk)])

    def wants(self, ctx: "OutCtx") -> bool:
        """A chunk just put for this transfer should go straight to a tier."""
        return bool(ctx.extra.get("spill_all")) and ctx.out.state in UNGRANTED

    def spill_now(self, ctx: "OutCtx", chunks: list[tuple[int, Any, "int | None"]]) -> None:
        """On the loop: copy these chunks out on an I/O thread."""
        victims: list[Victim] = []
        for index, buf, csum in chunks:
            key = (ctx.out.tid, index)
            if key not in self._claimed:
                self._claimed.add(key)
                victims.append((ctx, index, buf, csum))
        if victims and not self.closed:
            self.io.submit(self._copy_out, victims, "waited")
        else:
            for ctx_, index, _, _ in victims:
                self._claimed.discard((ctx_.out.tid, index))

    # ------------------------------------------------------------ copy and swap
    def _copy_out(self, victims: list[Victim], cause: str) -> int:
        """Off the loop: copy each victim into a tier and hand it to the loop. Stops at the
        first chunk no tier has room for (those stay in memory). Returns bytes handed over."""
        freed = 0
        for i, (ctx, index, buf, csum) in enumerate(victims):
            chunk: SpilledChunk | None = None
            if not self.closed and not ctx.out.terminal:
                try:
                    view = memoryview(buf)
                    chunk = self.store.spill(view, csum if csum is not None else chunk_checksum(view))
                except OSError as exc:  # disk full or failing: the chunk stays in memory
                    log.error("spill_write_failed", transfer_id=ctx.out.tid, chunk=index, error=str(exc))
            if chunk is None:
                self._post(self._unclaim, [(c.out.tid, j) for c, j, _, _ in victims[i:]])
                break
            self._post(self._adopt, ctx, index, buf, chunk, cause)
            freed += chunk.nbytes
        return freed

    def _post(self, fn: Callable[..., None], *args: Any) -> None:
        try:
            self._rt.call(fn, *args)
        except RuntimeError:  # loop gone (closing): close() removes every tier's contents
            pass

    def _unclaim(self, keys: list[tuple[str, int]]) -> None:
        self._claimed.difference_update(keys)

    def _adopt(self, ctx: "OutCtx", index: int, original: Any, chunk: SpilledChunk, cause: str) -> None:
        """On the loop: the copy replaces the held buffer, whose budget is released, unless
        the chunk was sent or dropped meanwhile (then the copy is freed)."""
        self._claimed.discard((ctx.out.tid, index))
        if not ctx.out.terminal and ctx.out.swap_buffer(index, original, chunk, chunk.checksum):
            self.holdings.swapped_out(original, chunk.nbytes)
            self.evictions[cause] += 1
            ctx.log.debug("chunk_spilled", chunk=index, tier=chunk.tier, cause=cause)
        else:
            self.holdings.release(chunk, chunk.nbytes)

    # ------------------------------------------------------------ reporting, errors
    def usage(self) -> dict[str, int]:
        u = self.store.usage()
        u["evictions_budget"] = self.evictions["budget"]
        u["evictions_waited"] = self.evictions["waited"]
        return u

    def exhausted(self, cause: PdxferError, transfer_id: str) -> SpillExhausted:
        u = self.store.usage()
        return SpillExhausted(
            f"{cause.message}; spill tiers full too (host {format_size(u['host_bytes'])}/{format_size(u['host_capacity'])}, "
            f"disk {format_size(u['disk_bytes'])}/{format_size(u['disk_capacity'])})",
            transfer_id=transfer_id, waiting_for="send_budget",
        )

    def files(self) -> list[Path]:
        return self.store.disk.files() if self.store.disk is not None else []

    def close(self) -> None:
        """After every lane closed: stop the I/O threads, then remove every spill file."""
        self.closed = True
        self.budget.spill_hook = None
        self.io.shutdown(wait=True, cancel_futures=True)
        self.store.close()
        if self.store.disk is not None:
            log.debug("spill_dir_removed", directory=str(self.store.disk.dir), pid=os.getpid())
