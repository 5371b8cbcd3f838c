"""What the sender keeps per transfer between `open()` and its end, and what it reports.

Shared by the Sender façade (which creates a context per `open()`), the lane that drives
it, and the spill coordinator that may move its chunks; none of them owns it alone.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import threading
import time
from dataclasses import dataclass, field
from typing import Any

from pdxfer.protocol.outbound import OutboundTransfer


@dataclass(frozen=True)
class TransferResult:
    transfer_id: str
    peer: str
    nbytes: int
    chunks: int
    seconds: float  # submit to DONE
    granted_after: float  # submit to GRANT: time spent waiting for receiver room


@dataclass
class OutCtx:
    out: OutboundTransfer
    future: "concurrent.futures.Future[TransferResult]"
    deadline: float
    started: float
    log: Any
    timer: asyncio.TimerHandle | None = None
    # perf_counter stamps for TransferResult (the loop clock, which deadlines use, ticks
    # in whole milliseconds on uvloop): opened in open() on the caller's thread
    opened: float = field(default_factory=time.perf_counter)
    granted_at: float | None = None  # perf_counter at GRANT
    extra: dict = field(default_factory=dict)
    # set once the receiver granted the transfer, or it ended (threads may wait on it)
    granted: threading.Event = field(default_factory=threading.Event)
