"""Fault in a host receive region for writing, in the background, without changing its bytes.

Why at all: a one-sided WRITE into a page the receiver never touched takes the page fault
inside the *sender's* copy (cma: process_vm_writev): 2 MiB into fresh pages cost ~1.4 ms
here instead of ~0.3 ms, and the receiver's allocator spreads transfers over the whole
region. RDMA registration pins (commits) the pages anyway; this does the same for shared
memory, once. Safe while transfers land in the region (contents are kept).

Why in the background: how long it takes depends on the host, not on us. On this
Firecracker VM, whose memory the host backs lazily, faulting in 512 MiB took 0.4 s once
and 6.0 s the next time (1 GiB: 4.1 and 6.6 s). Done inside the first NIXL HELLO, as it
was, that exceeded the sender's 5 s handshake timeout. A WRITE that lands before its
pages are in only pays the fault itself, as it would without prefaulting.
"""

from __future__ import annotations

import ctypes
import functools
import mmap
import threading
import time
from typing import Any

import structlog

log = structlog.get_logger("pdxfer.nixl")

_MADV_POPULATE_WRITE = 23  # Linux >= 5.14; not exported by Python 3.11's mmap module
# Per madvise call. The call holds the process's mmap lock (for reading) for the whole
# range, and any mmap/munmap in the process (a large malloc, UCX setting up a peer) waits
# behind it, and every page fault behind that: with 64 MiB steps a sender in the same
# process missed its 3 s deadline for loading NIXL metadata. One huge page per call
# keeps each wait to one page's fault; stop() is noticed within one step.
STEP = 2 << 20


def populate(addr: int, nbytes: int) -> bool:
    """Fault in every page of [addr, addr+nbytes) for writing now; False where the kernel
    lacks MADV_POPULATE_WRITE (or the range is not mapped)."""
    start = addr & ~(mmap.PAGESIZE - 1)
    return _madvise()(start, nbytes + (addr - start), _MADV_POPULATE_WRITE) == 0


@functools.lru_cache(maxsize=1)
def _madvise() -> Any:
    """libc's madvise, looked up once: a region is populated in many 2 MiB calls."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    return libc.madvise


class Prefaulter:
    """A daemon thread that populates [addr, addr+nbytes) step by step until done or stopped."""

    def __init__(self, addr: int, nbytes: int, name: str) -> None:
        self.addr, self.nbytes = addr, nbytes
        self.done_bytes = 0
        self.complete = False  # every page faulted in
        self.seconds: float | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"pdxfer-prefault-{name}", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        t0 = time.perf_counter()
        while self.done_bytes < self.nbytes and not self._stop.is_set():
            n = min(STEP, self.nbytes - self.done_bytes)
            if not populate(self.addr + self.done_bytes, n):
                log.info("receive_region_not_prefaulted", bytes=self.nbytes, done=self.done_bytes,
                         reason="madvise(MADV_POPULATE_WRITE) refused")
                break
            self.done_bytes += n
        self.seconds = time.perf_counter() - t0
        self.complete = self.done_bytes >= self.nbytes
        if self.complete:
            log.info("receive_region_prefaulted", bytes=self.nbytes, seconds=round(self.seconds, 3))

    def stop(self, timeout: float = 10.0) -> bool:
        """Stop after the current step; True once the thread has ended (then the region
        may be unmapped). Bounded: a step that hangs in the kernel is reported, not awaited."""
        self._stop.set()
        self._thread.join(timeout)
        if self._thread.is_alive():
            log.error("receive_region_prefault_stuck", timeout=timeout, done=self.done_bytes)
            return False
        return True
