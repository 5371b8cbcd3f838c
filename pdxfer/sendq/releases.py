"""Telling a producer when the Sender is done with one chunk's buffer (`put(on_release=)`).

The memory budget says how many bytes the Sender holds; a producer that packs chunks into
buffers of its own (a registered staging pool, say) must also know *which* buffer it may
reuse, chunk by chunk: waiting for the whole transfer to end would make a transfer larger
than the pool impossible, and keep every packed copy of a long prompt alive until its
DONE. Every path that lets go of a producer's buffer fires its notice: its bytes left
(TCP: handed to the kernel; NIXL: the WRITE completed here), it was copied into a spill
tier, or it was dropped unsent. The transfer's end fires whatever is left, so each notice
fires exactly once. Notices run on the Sender's loop thread and must be quick.
"""

from __future__ import annotations

import threading
from typing import Any, Callable

import structlog

log = structlog.get_logger("pdxfer.sender")

Notice = Callable[[], None]


class ReleaseNotices:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._by_buf: dict[int, tuple[str, Notice]] = {}  # id(buffer as held) -> (transfer, notice)
        self._by_tid: dict[str, set[int]] = {}

    def __len__(self) -> int:
        return len(self._by_buf)

    def watch(self, tid: str, buf: Any, notice: Notice) -> None:
        """`buf`: the object the Sender holds for the chunk (kept alive, so its id is unique)."""
        with self._lock:
            self._by_buf[id(buf)] = (tid, notice)
            self._by_tid.setdefault(tid, set()).add(id(buf))

    def fire(self, buf: Any) -> None:
        """The Sender let go of `buf` (nothing happens if nobody asked to know)."""
        with self._lock:
            entry = self._by_buf.pop(id(buf), None)
            if entry is None:
                return
            ids = self._by_tid.get(entry[0])
            if ids is not None:
                ids.discard(id(buf))
                if not ids:
                    del self._by_tid[entry[0]]
        _run(entry[1])

    def end(self, tid: str) -> None:
        """Transfer `tid` ended: none of its buffers is read any more."""
        with self._lock:
            notices = [self._by_buf.pop(i)[1] for i in self._by_tid.pop(tid, ()) if i in self._by_buf]
        for n in notices:
            _run(n)


def _run(notice: Notice) -> None:
    try:
        notice()
    except Exception:  # a producer's bug must not stop the loop from releasing the rest
        log.exception("release_notice_failed")
