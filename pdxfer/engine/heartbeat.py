"""The lane's heartbeat task: asks the receiver for a sign of life while it owes us one.

The rule for when the receiver counts as lost is `Liveness` (no I/O); this is the timer
around it. It runs for a lane's whole life and returns only with the `PeerLost` that
ends the lane.
"""

from __future__ import annotations

import asyncio
from typing import Callable

import structlog

from pdxfer.engine.liveness import Liveness
from pdxfer.errors import PeerLost

log = structlog.get_logger("pdxfer.sender")


async def heartbeat(alive: Liveness, *, period_s: float, peer: str, clock: Callable[[], float],
                    busy: Callable[[], bool], drain: Callable[[], bool], send: Callable[[], None]) -> PeerLost:
    """Every `period_s`, while `busy()` (transfers in flight, or a kept lane): `send()` a
    heartbeat, or return PeerLost once one went unanswered past `alive.timeout_s`.
    `drain()` reads replies already waiting (True if it found any) before blaming the peer."""
    while True:
        await asyncio.sleep(period_s)
        now = clock()
        if not busy():
            alive.idle()
            continue
        waited = alive.overdue(now)
        if waited is not None and drain():
            # The answer was waiting unread: uvloop runs due timers before it polls for
            # I/O, so after a stall of ours this check can run first.
            log.info("lane_reply_was_unread", peer=peer, waited_s=round(waited, 3))
            waited = alive.overdue(now)
        if waited is not None:
            return PeerLost(f"no reply from the receiver for {waited:.2f}s after a heartbeat "
                            f"(> {alive.timeout_s}s)", peer=peer, waiting_for="heartbeat_ack")
        send()
        alive.sent(now)
