"""When a receiver counts as lost: the heartbeat rule, without I/O (time is passed in).

The receiver is lost when a heartbeat stays unanswered (no message at all comes back) for
`timeout_s`. Counting from the first unanswered heartbeat, not from the last reply, keeps
a stall of this process (engine holding the GIL, CPU starvation) from being blamed on the
peer: nothing was asked of it meanwhile. A lane that asks nothing (no transfer in flight,
not kept by Sender.connect) can never be declared lost.
"""

from __future__ import annotations


class Liveness:
    def __init__(self, timeout_s: float) -> None:
        if timeout_s <= 0:
            raise ValueError(f"peer timeout must be > 0 s, got {timeout_s}")
        self.timeout_s = timeout_s
        self.unanswered_since: float | None = None  # first heartbeat sent since the last reply

    def heard(self) -> None:
        """Any message from the peer answers every heartbeat sent before it."""
        self.unanswered_since = None

    def idle(self) -> None:
        """Nothing in flight: stop counting (nothing is owed to us)."""
        self.unanswered_since = None

    def overdue(self, now: float) -> float | None:
        """Seconds a heartbeat has gone unanswered, if that is past the timeout."""
        since = self.unanswered_since
        if since is not None and now - since > self.timeout_s:
            return now - since
        return None

    def sent(self, now: float) -> None:
        """A heartbeat went out at `now`."""
        if self.unanswered_since is None:
            self.unanswered_since = now
