"""`pdxfer receiver`: a standalone receiver process for demos, benches and tests.

It prints one JSON line with its addresses, serves until SIGTERM/SIGINT (or stdin EOF
with --exit-on-stdin-eof, so a parent that dies takes it along), releases every
delivered transfer after optional pattern verification, and prints a final JSON line
with counts and the admission ledger.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import threading

from pdxfer.bench import pattern
from pdxfer.engine import ReceivedTransfer, Receiver, ReceiverConfig
from pdxfer.units import parse_size


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--capacity", type=parse_size, default=parse_size("1GiB"), help="receive buffer bytes (e.g. 512MiB)")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--control-port", type=int, default=0)
    p.add_argument("--data-port", type=int, default=0)
    p.add_argument("--lease", type=float, default=10.0, help="seconds a silent sender keeps its reservation")
    p.add_argument("--token", default=None)
    p.add_argument("--verify-pattern", action="store_true", help="check bytes against pdxfer.bench.pattern")
    p.add_argument("--exit-on-stdin-eof", action="store_true")
    p.add_argument("--backends", default="tcp,nixl",
                   help="data paths to accept, comma-separated (nixl: only where the nixl package imports)")
    p.add_argument("--device", default="cpu",
                   help="where the receive region lives: cpu, or cuda / cuda:N (GPU memory; needs --backends nixl)")
    p.add_argument("--checksum", choices=["xxh3", "devsum64"], default=None,
                   help="chunk checksum the region is checked with (default: xxh3 on cpu, devsum64 on a GPU)")
    p.add_argument("--recv-piece", type=parse_size, default=None,
                   help="TCP: receive and hash payloads in pieces of at most this size (default 1MiB)")
    p.add_argument("--advertise-data", default="",
                   help="host:port senders dial for TCP data, if not the listening address (NAT, a relay)")
    p.add_argument("--nixl-spin-us", type=float, default=None, help="NIXL progress: back-to-back polling after an event")
    p.add_argument("--nixl-max-sleep-us", type=float, default=None, help="NIXL progress: longest backoff sleep")
    p.add_argument("--nixl-eager", action="store_true",
                   help="set NIXL up as the receiver starts, not at the first NIXL HELLO (ReceiverConfig.nixl_eager)")
    p.add_argument("--nixl-nice", type=int, default=None,
                   help="NIXL progress thread: nice steps below the receiver's loop (ReceiverConfig.nixl_nice)")


def run(args: argparse.Namespace) -> int:
    nixl_tuning = {}
    if args.nixl_spin_us is not None:
        nixl_tuning["nixl_spin_s"] = args.nixl_spin_us / 1e6
    if args.nixl_max_sleep_us is not None:
        nixl_tuning["nixl_max_sleep_s"] = args.nixl_max_sleep_us / 1e6
    if args.nixl_nice is not None:
        nixl_tuning["nixl_nice"] = args.nixl_nice
    if args.nixl_eager:
        nixl_tuning["nixl_eager"] = True
    if args.recv_piece is not None:
        nixl_tuning["recv_piece_bytes"] = args.recv_piece
    try:
        cfg = ReceiverConfig(capacity=args.capacity, host=args.host, control_port=args.control_port,
                             data_port=args.data_port, lease_s=args.lease, token=args.token,
                             backends=tuple(b.strip() for b in args.backends.split(",") if b.strip()),
                             device=args.device, checksum=args.checksum, advertise_data=args.advertise_data,
                             **nixl_tuning)
        receiver = Receiver(cfg)  # a GPU region is allocated here: no such device is a ValueError too
    except ValueError as exc:  # a setting out of range: say which, no traceback
        print(f"pdxfer receiver: {exc}", file=sys.stderr)
        return 2
    stats = {"transfers": 0, "bytes": 0, "verified": 0, "mismatched": []}
    stop = threading.Event()

    def on_transfer(rx: ReceivedTransfer) -> None:
        try:
            if args.verify_pattern:
                for i in range(rx.payload.chunk_count):
                    if not pattern.check(rx.chunk(i), rx.transfer_id, i):
                        stats["mismatched"].append(f"{rx.transfer_id}/{i}")
                        break
                else:
                    stats["verified"] += 1
            stats["transfers"] += 1
            stats["bytes"] += rx.payload.total_bytes
        finally:
            rx.release()

    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    with receiver as rx:
        rx.on_transfer(on_transfer)
        print(json.dumps({"control": rx.control_address, "data": rx.data_address, "pid": os.getpid()}), flush=True)
        if args.exit_on_stdin_eof:
            threading.Thread(target=lambda: (sys.stdin.read(), stop.set()), daemon=True).start()
        while not stop.wait(3600):
            pass
        ledger = rx.ledger().to_dict()
    print(json.dumps({"stats": stats, "ledger": ledger}), flush=True)
    return 0
