"""Child process for the NIXL peer-death tests: a Sender in the middle of one big transfer.

Usage: python -m tests.transport.nixl_stream CONTROL_ADDRESS CHUNKS SIGNAL_AFTER GAP_S

Opens one transfer of CHUNKS x 2 MiB with backend "nixl" and puts its chunks GAP_S apart,
so that WRITEs are being posted for as long as the transfer lasts. Prints JSON lines:
{"ready": true}; {"streaming": true} once SIGNAL_AFTER chunks were written (the parent
kills a process then: mid-transfer, with more WRITEs coming); finally
{"error": name|null, "budget": bytes} and, after Sender.close(), {"closed": true,
"budget": bytes}. The parent checks the exit status: a NIXL/UCX teardown that crashes
(SIGABRT/SIGSEGV at exit) shows up there and nowhere else.
"""

from __future__ import annotations

import json
import sys
import time

import numpy as np

from pdxfer.engine import Sender, SenderConfig
from pdxfer.errors import PdxferError
from pdxfer.layout.payload import Payload
from pdxfer.logs import configure


def main() -> int:
    configure("warning")  # logs go to stderr: stdout carries only the JSON lines
    control, n, signal_after, gap = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), float(sys.argv[4])
    chunk = np.full(2 << 20, 7, dtype=np.uint8)
    payload = Payload.uniform(n * chunk.nbytes, chunk.nbytes)
    cfg = SenderConfig(backend="nixl", memory_budget=64 << 20, heartbeat_s=0.2, peer_timeout_s=2.0,
                       handshake_timeout_s=20.0)
    error = None
    with Sender(cfg) as s:
        print(json.dumps({"ready": True}), flush=True)
        h = s.open(control, "stream", payload, deadline_s=60)
        try:
            for i in range(n):
                h.put(i, chunk, timeout=10)
                if i + 1 == signal_after:
                    deadline = time.monotonic() + 30
                    while s.budget_used and time.monotonic() < deadline:
                        time.sleep(0.001)  # poll-ok: test child waits until its WRITEs landed
                    print(json.dumps({"streaming": True}), flush=True)
                time.sleep(gap)  # poll-ok: pacing, so the transfer is still running when the peer dies
            h.future.result(30)
        except PdxferError as exc:
            error = type(exc).__name__
        print(json.dumps({"error": error, "budget": s.budget_used}), flush=True)
    print(json.dumps({"closed": True, "budget": s.budget_used}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
