"""A lane's requests sent again: RESERVE and COMMIT left unanswered, and the repeated
answers that come back.

A reply lost with a control connection (ZMQ drops what was in flight when it reconnects)
or refused for a failed seal would otherwise cost its transfer the whole deadline. So a
RESERVE (while reserving or queued) or COMMIT (while committing) with no answer after
`SenderConfig.resend_after_s` goes out again with the same cid, then after twice as long,
up to `resend_max_s`. The receiver answers a repeat where the transfer stands, so asking
twice is harmless; what arrives twice here is recognised by `answered_before`.
"""

from __future__ import annotations

import asyncio
from typing import Callable

import structlog

from pdxfer.engine.outctx import OutCtx
from pdxfer.errors import ProtocolError
from pdxfer.protocol import messages as m
from pdxfer.protocol.outbound import OutboundTransfer
from pdxfer.protocol.states import OutState

log = structlog.get_logger("pdxfer.sender")


def answered_before(out: OutboundTransfer, msg: m.Message) -> bool:
    """A reply to a request sent again that the first answer already moved past: a QUEUED
    after the GRANT, or the same GRANT twice (one naming another slot is a protocol error)."""
    if isinstance(msg, m.Queued):
        return out.state in (OutState.QUEUED, OutState.GRANTED, OutState.COMMITTING)
    if isinstance(msg, m.Grant) and out.state in (OutState.GRANTED, OutState.COMMITTING):
        if msg.slot != out.slot:
            raise ProtocolError(f"a second GRANT names slot {msg.slot}, the first {out.slot}", transfer_id=out.tid)
        return True
    return False


class Resender:
    def __init__(self, loop: asyncio.AbstractEventLoop, first_s: float, max_s: float,
                 ask: Callable[[OutCtx], bool]) -> None:
        """`ask(ctx)` sends the transfer's current request again; False if it is no longer live."""
        self._loop = loop
        self._first_s = first_s
        self._max_s = max_s
        self._ask = ask

    def arm(self, ctx: OutCtx, after: float | None = None) -> None:
        """(Re)start the wait for an answer to the request just sent."""
        self.cancel(ctx)
        after = self._first_s if after is None else after
        if ctx.deadline - self._loop.time() > after:
            ctx.extra["resend"] = self._loop.call_later(after, self._fire, ctx, after)

    def cancel(self, ctx: OutCtx) -> None:
        handle = ctx.extra.pop("resend", None)
        if handle is not None:
            handle.cancel()

    def _fire(self, ctx: OutCtx, after: float) -> None:
        ctx.extra.pop("resend", None)
        if not self._ask(ctx):
            return
        if ctx.out.state is not OutState.GRANTED:  # while granted the data path is busy: nothing was asked
            ctx.log.info("request_sent_again", state=ctx.out.state.value, after_s=round(after, 3))
        self.arm(ctx, min(after * 2, self._max_s))
