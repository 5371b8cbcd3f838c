"""CPU accounting of bench runs: it must see work done by another process's threads and
by this process's short-lived threads, and say "unknown" rather than guess."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time

import pytest

from pdxfer.bench import cputime

# Spins 0.3 s of CPU only once told to (a line on stdin), so the measured window holds all of it.
_SPIN = ("import sys,time\nprint('started', flush=True)\nsys.stdin.readline()\n"
         "t=time.process_time()\nwhile time.process_time()-t<0.3: pass\nprint('done', flush=True)\nsys.stdin.read()")


class GatedChild:
    """A child running `code`, which prints 'started', waits for a line on stdin, does its
    work and prints 'done': `go()` is a run for `cputime.measure` that holds all the work."""

    def __init__(self, code: str) -> None:
        self.proc = subprocess.Popen([sys.executable, "-c", code], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, text=True)
        self.pid = self.proc.pid
        assert self.proc.stdout is not None and self.proc.stdin is not None
        assert self.proc.stdout.readline().strip() == "started"

    def go(self) -> float:
        assert self.proc.stdout is not None and self.proc.stdin is not None
        self.proc.stdin.write("go\n")
        self.proc.stdin.flush()
        assert self.proc.stdout.readline().strip() == "done"
        return 0.3

    def end(self) -> None:
        self.proc.kill()
        self.proc.wait(10)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads another process's CPU clock (Linux)")
def test_measure_counts_a_busy_child_and_an_idle_one():
    child = GatedChild(_SPIN)
    try:
        busy = cputime.measure(child.go, child.pid)
        assert busy.peer_cpu_s is not None and busy.peer_cpu_s >= 0.25  # the child burned >= 0.3 s itself
        idle = cputime.measure(lambda: (time.sleep(0.2), 0.2)[1], child.pid)
        assert idle.peer_cpu_s is not None and idle.peer_cpu_s < 0.1  # blocked on stdin: no CPU
        assert idle.own_cpu_s is not None and idle.own_cpu_s < 0.15
    finally:
        child.end()
    assert cputime.process_cpu_s(child.pid) is None  # gone: unknown, not zero


def test_own_cpu_includes_threads_that_exited():
    def spin() -> None:
        t = time.thread_time()
        while time.thread_time() - t < 0.2:
            pass

    def run() -> float:
        th = threading.Thread(target=spin)
        th.start()
        th.join(10)
        return 0.2

    m = cputime.measure(run, -1)  # no such peer: its figure is unknown
    assert m.own_cpu_s is not None and m.own_cpu_s >= 0.18
    assert m.peer_cpu_s is None


def test_summary_medians_and_unknowns():
    runs = [cputime.Measured(1.0, 0.5, 0.25), cputime.Measured(1.0, 1.5, 0.75), cputime.Measured(2.0, None, 1.0)]
    s = cputime.summary(runs, 1 << 30, cpus=2)
    assert s["sender_ms_per_gib"] == 1000.0  # median of 500 and 1500 (the unknown one is left out)
    assert s["receiver_ms_per_gib"] == 750.0
    assert s["busy"] == pytest.approx(0.75)  # (0.375 + 1.125) / 2 over the two fully known runs
    assert cputime.summary([], 1 << 30, cpus=2) == {"sender_ms_per_gib": None, "receiver_ms_per_gib": None,
                                                   "busy": None}


def test_usable_cpus_is_what_this_process_may_run_on():
    n = cputime.usable_cpus()
    assert 1 <= n <= (os.cpu_count() or n)


_THREAD_THEN_WAIT = ("import sys,threading,time\n"
                     "def f():\n t=time.thread_time()\n while time.thread_time()-t<0.3: pass\n"
                     "print('started', flush=True)\nsys.stdin.readline()\n"
                     "th=threading.Thread(target=f); th.start(); th.join()\nprint('done', flush=True)\nsys.stdin.read()")


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads the process CPU clock")
def test_a_child_thread_that_exits_mid_run_still_counts():
    """A raw socket receiver serves each connection on a thread that ends with it: its CPU
    must count, not vanish (a sum over live threads went negative)."""
    child = GatedChild(_THREAD_THEN_WAIT)
    try:
        m = cputime.measure(child.go, child.pid)
        assert m.peer_cpu_s is not None and m.peer_cpu_s >= 0.25
    finally:
        child.end()
