"""Child process: the exact sequence that aborted NIXL processes at exit on this host.

    python -m tests.transport.nixl_raw_peer initiator

The initiator starts a target child (a bare NIXL agent with a registered buffer), loads its
metadata, WRITEs into it, SIGKILLs it and *immediately* posts the next WRITE: that post
races UCX's own disconnect detection and fails inside `postXferReq`, which leaves the
endpoint with queued work. Destroying the agent then, without one more worker progress,
aborted the process in UCX (`arbiter.c:36 ucs_arbiter_group_is_empty`, SIGABRT, 5/5 runs
with UCX_TLS=tcp,self,sm). `NixlAgent.close()` must make this exit 0. Prints one JSON line.
"""

from __future__ import annotations

import base64
import json
import mmap
import subprocess
import sys
import threading
import time

from pdxfer.transport.nixl_agent import NixlAgent
from pdxfer.transport.nixl_regcache import buffer_address

SIZE, CHUNK = 16 << 20, 2 << 20


def target() -> int:
    agent = NixlAgent("raw-target")
    buf = mmap.mmap(-1, SIZE)
    addr = buffer_address(memoryview(buf))
    agent.register(addr, SIZE)
    print(json.dumps({"md": base64.b64encode(agent.metadata()).decode(), "addr": addr}), flush=True)
    done = threading.Event()
    threading.Thread(target=lambda: (sys.stdin.read(), done.set()), daemon=True).start()
    while not done.wait(0.001):  # poll-ok: a bare target must progress UCX for WRITEs over tcp to complete
        agent.poll([], True)
    agent.close()
    return 0


def initiator() -> int:
    agent = NixlAgent("raw-initiator")
    buf = mmap.mmap(-1, SIZE)
    local = buffer_address(memoryview(buf))
    agent.register(local, SIZE)
    child = subprocess.Popen([sys.executable, "-m", "tests.transport.nixl_raw_peer", "target"],
                             stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        info = json.loads(child.stdout.readline())  # type: ignore[union-attr]
        remote = agent.add_remote(base64.b64decode(info["md"]))
        states = []
        for i in range(50):  # until the endpoint is fully wired (cma lanes up, WRITEs complete in the post)
            off = (i % (SIZE // CHUNK)) * CHUNK
            h, state, _ = agent.post_write([(local + off, info["addr"] + off, CHUNK)], remote, b"n")
            deadline = time.monotonic() + 10
            while state == "PROC" and time.monotonic() < deadline:
                finished, _ = agent.poll([h], False)
                state = finished[0][1] if finished else "PROC"
            states.append(state)
        child.kill()
        child.wait(10)
        t0 = time.monotonic()
        err = ""
        while time.monotonic() - t0 < 10:
            h, state, err = agent.post_write([(local, info["addr"], CHUNK)], remote, b"n")
            if state == "PROC":
                agent.release(h)
            if state == "ERR":
                break
        after_kill = state
    finally:
        if child.poll() is None:
            child.kill()
            child.wait(10)
    agent.close()
    print(json.dumps({"before_kill": sorted(set(states)), "after_kill": after_kill, "error": err}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(target() if sys.argv[1] == "target" else initiator())
