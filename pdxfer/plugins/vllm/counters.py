"""The connector worker's event counts, safe to bump from any thread."""

from __future__ import annotations

import threading


class Counters:
    """Event counts bumped from several threads at once (the engine's, the side channel's,
    the pool's, the Sender's loop). `d[k] += 1` on a dict is a read-modify-write: CPython
    3.11 happens not to switch threads inside it (not seen losing a count even with a 1 µs
    switch interval), but nothing promises that, and a free-threaded build would lose
    counts."""

    def __init__(self, *names: str) -> None:
        self._lock = threading.Lock()
        self._counts = dict.fromkeys(names, 0)

    def inc(self, name: str) -> None:
        with self._lock:
            self._counts[name] += 1

    def snapshot(self) -> dict[str, int]:
        with self._lock:
            return dict(self._counts)
