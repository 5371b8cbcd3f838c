"""CPU time a bench run cost, on both ends, so a ratio can be read against the cores it had.

Why: on a small host both ends of a loopback transfer share the same cores, and a path
that checks every byte (a hash on each end) can be CPU-bound where the raw copy it is
compared with is not. Wall-clock throughput alone cannot tell "the engine is slow" from
"the engine does more work than the baseline on cores that are all busy"; CPU time per
GiB of both processes, measured around the same runs, can.

Own process: `time.process_time()`. Another process: its POSIX process CPU-time clock
(`clock_getcpuclockid`, nanoseconds), falling back to `/proc/<pid>/stat` ticks. Both
count every thread, including ones that exit during a run (the verified baseline's
writer threads here, a raw socket receiver's per-connection threads there): summing the
live threads' times instead went negative when one exited mid-run.
"""

from __future__ import annotations

import ctypes
import os
import statistics
import time
from typing import Callable, NamedTuple


def process_cpu_s(pid: int | None = None) -> float | None:
    """CPU seconds (user + system, all threads, including ones that have exited) used so
    far by `pid` (None: this process); None where the platform does not say, or the
    process is gone."""
    if pid is None or pid == os.getpid():
        return time.process_time()
    clock = _cpu_clock(pid)
    if clock is not None:
        try:
            return time.clock_gettime(clock)
        except OSError:  # exited since
            return None
    try:  # clock tick resolution (10 ms), but counts exited threads too
        with open(f"/proc/{pid}/stat") as fh:
            fields = fh.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError):
        return None


def _cpu_clock(pid: int) -> int | None:
    """The process CPU-time clock of `pid` (POSIX clock_getcpuclockid), or None."""
    if pid <= 0 or not hasattr(time, "clock_gettime"):
        return None
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        clock = ctypes.c_int()
        if libc.clock_getcpuclockid(ctypes.c_int(pid), ctypes.byref(clock)) != 0:
            return None
    except (OSError, AttributeError):  # no such libc function here
        return None
    return clock.value


def usable_cpus() -> int:
    """CPUs this process may run on (its affinity mask, where the platform has one): the
    cores both ends of a loopback bench share, which may be fewer than the host has."""
    try:
        return len(os.sched_getaffinity(0)) or 1
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


class Measured(NamedTuple):
    seconds: float  # what the run itself reported (its own wall clock)
    own_cpu_s: float | None  # this process (the sending end)
    peer_cpu_s: float | None  # the child at the other end


def measure(run: Callable[[], float], peer_pid: int) -> Measured:
    """Run `run` (which returns its own elapsed seconds) and the CPU both ends used meanwhile."""
    own0, peer0 = process_cpu_s(), process_cpu_s(peer_pid)
    seconds = run()
    own1, peer1 = process_cpu_s(), process_cpu_s(peer_pid)
    return Measured(seconds,
                    own1 - own0 if own0 is not None and own1 is not None else None,
                    peer1 - peer0 if peer0 is not None and peer1 is not None else None)


def ms_per_gib(cpu_s: list[float | None], nbytes: int) -> float | None:
    """Median CPU milliseconds per GiB moved over runs of `nbytes` each; None if unknown."""
    known = [c for c in cpu_s if c is not None]
    if not known or nbytes <= 0:
        return None
    return round(statistics.median(known) * 1000 / (nbytes / (1 << 30)), 1)


def busy(runs: list[Measured], cpus: int) -> float | None:
    """Median share of the host's `cpus` that both ends kept busy during a run."""
    shares = [(r.own_cpu_s + r.peer_cpu_s) / (r.seconds * cpus) for r in runs
              if r.own_cpu_s is not None and r.peer_cpu_s is not None and r.seconds > 0]
    return round(statistics.median(shares), 3) if shares else None


def summary(runs: list[Measured], nbytes: int, cpus: int) -> dict[str, float | None]:
    """Per-run-kind figures for a bench row: CPU ms per GiB at each end, and cores busy."""
    return {"sender_ms_per_gib": ms_per_gib([r.own_cpu_s for r in runs], nbytes),
            "receiver_ms_per_gib": ms_per_gib([r.peer_cpu_s for r in runs], nbytes),
            "busy": busy(runs, cpus)}
