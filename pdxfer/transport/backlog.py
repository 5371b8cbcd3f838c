"""A control socket's bounded queue of messages ZMQ would not take yet (sans-IO).

When a peer stops reading, ZMQ's own queue fills to its high-water mark and a NOBLOCK send
fails; the message then waits here, in order, until ZMQ takes it again. Both ends of the
control channel keep one (the ROUTER one per peer). It is bounded twice: by length (a
message beyond `max_len` is dropped at once) and by age (messages past their deadline are
dropped at the next drain), each with a warning naming the peer: a peer that has not read
for that long is dead to the layers above, which end its transfers on their own deadlines.
"""

from __future__ import annotations

from collections import deque
from typing import Callable

import structlog

log = structlog.get_logger("pdxfer.control")

# True: sent. False: not now (high-water mark), keep it. None: this peer cannot be
# reached at all (unroutable, socket error): drop it and everything behind it.
Send = Callable[[bytes], "bool | None"]


class Backlog:
    def __init__(self, peer: str, max_len: int) -> None:
        self.peer = peer
        self.max_len = max_len
        self._q: deque[tuple[float, bytes]] = deque()  # (drop after, body)

    def __len__(self) -> int:
        return len(self._q)

    def push(self, body: bytes, drop_after: float) -> bool:
        """Queue `body` behind what waits; False (and a warning) when the backlog is full."""
        if len(self._q) >= self.max_len:
            log.warning("control_backlog_full", peer=self.peer, queued=len(self._q))
            return False
        self._q.append((drop_after, body))
        return True

    def drain(self, send: Send, now: float) -> bool:
        """Send from the front while `send` takes messages; True if any went (or was
        dropped as unreachable), i.e. the backlog moved."""
        q = self._q
        moved = False
        while q:
            drop_after, body = q[0]
            if drop_after < now:
                log.warning("control_backlog_expired", peer=self.peer, dropped=len(q))
                q.clear()
                break
            sent = send(body)
            if sent is False:
                break
            q.popleft()
            moved = True
            if sent is None:
                q.clear()
        return moved

    def clear(self) -> int:
        n = len(self._q)
        self._q.clear()
        return n
