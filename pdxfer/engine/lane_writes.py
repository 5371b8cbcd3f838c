"""A NIXL lane's WRITEs in flight, per transfer, and the ABORT that must wait for them.

A NIXL lane hands each chunk to the progress thread and goes on; the chunk's budget (and
its read-back buffer, if it was spilled) comes back when its WRITE completed, whatever
the outcome. Two things therefore wait for a transfer's last WRITE to finish here:

- ABORT, which tells the receiver that none of our WRITEs can land in the transfer's range
  any more, so it may give that range to the next transfer at once (rather than
  quarantining it);
- the transfer's success. The receiver's DONE travels over ZMQ and can overtake the
  progress thread's report that the last WRITEs completed locally; resolving the future
  then would hand the caller back its buffers (to free or refill) while NIXL still holds
  them, with their budget not yet returned.
"""

from __future__ import annotations

import asyncio
import functools
from typing import TYPE_CHECKING, Callable

from pdxfer.engine.outctx import OutCtx
from pdxfer.sendq import SendItem
from pdxfer.sendq.restore import Restored

if TYPE_CHECKING:
    from pdxfer.transport.nixl import NixlDataClient

SendAbort = Callable[[OutCtx, str], None]
Release = Callable[[SendItem, "Restored | None"], None]


class NixlWrites:
    def __init__(self, send_abort: SendAbort, release: Release) -> None:
        self._send_abort = send_abort
        self._release = release

    def post(self, data: "NixlDataClient", ctx: OutCtx, item: SendItem, offset: int, payload: memoryview,
             checksum: int, restored: Restored | None) -> None:
        t = ctx.out
        fut = data.send_chunk(tid=t.tid, slot=t.slot, index=item.index, offset=offset,  # type: ignore[arg-type]
                              payload=payload, checksum=checksum, base_addr=ctx.extra["addr"])
        ctx.extra["writes"] = ctx.extra.get("writes", 0) + 1
        fut.add_done_callback(functools.partial(self._done, item=item, restored=restored, ctx=ctx))

    def _done(self, fut: asyncio.Future, *, item: SendItem, restored: Restored | None, ctx: OutCtx) -> None:
        self._release(item, restored)
        if not fut.cancelled():
            fut.exception()  # failures end the lane through the data client's `closed` future
        ctx.extra["writes"] -= 1
        if ctx.extra["writes"] == 0:
            for fn in ctx.extra.pop("when_quiet", ()):
                fn()

    def when_quiet(self, ctx: OutCtx, fn: Callable[[], None]) -> None:
        """Run `fn` now, or once the transfer's last WRITE in flight finished (whatever its
        outcome: a lane that closes fails its WRITEs still in flight, bounded, so this runs)."""
        if ctx.extra.get("writes", 0) > 0:
            ctx.extra.setdefault("when_quiet", []).append(fn)
        else:
            fn()

    def abort(self, ctx: OutCtx, reason: str) -> None:
        """ABORT now, or once the transfer's last WRITE in flight finished."""
        self.when_quiet(ctx, functools.partial(self._send_abort, ctx, reason))
