"""`pdxfer chaos`: real sender and receiver processes under injected faults, then a verdict.

A run starts one receiver (`pdxfer receiver --verify-pattern`, a small region and short
lease, so admission queues and leases expire within the run), `--senders` worker
processes (`pdxfer.chaos.worker`) streaming pattern-filled transfers at it, and, for the
TCP data path, a relay (`pdxfer.chaos.relay`) the receiver advertises as its data
address, and another in front of its control port that the senders dial instead. It then applies a seeded schedule of faults (`pdxfer.chaos.faults`), lets the
last part of the run pass without any, stops everything and checks the three promises:

* **no corruption** -- the receiver found no delivered chunk whose bytes differ from the
  pattern (its own check, independent of pdxfer's checksums);
* **no hang** -- every transfer ended, delivered or with a typed error, within its
  deadline plus a grace, and every process exited when asked;
* **no leak** -- after the lease, the receiver holds no reservation, and every sender's
  memory budget is empty and its threads are gone after close;

plus **nothing lost** -- where no receiver was killed (so every delivery was counted),
senders were told of no more deliveries than the receiver made -- and **recovery**:
every sender delivered at least one transfer after the last fault.

The verdict is JSON (`--json`) or a table; the exit code is 1 when any check failed.
A receiver killed by the schedule cannot report what it delivered: the corruption
check covers the incarnations that exited cleanly (`audited_receivers` says how many).

    pdxfer chaos --duration 30 --faults all --seed 7
"""

from __future__ import annotations

import argparse
import json
import signal
import sys
import time
from dataclasses import asdict
from typing import Any

from pdxfer.bench.procs import ChildProcess, free_port, receiver_argv
from pdxfer.chaos.faults import CONTROL_FAULTS, DATA_FAULTS, Event, Fault, parse_faults, schedule
from pdxfer.chaos.worker import HANG_GRACE_S
from pdxfer.units import parse_size

STOP_TIMEOUT_S = 30.0  # a worker or receiver asked to stop must be gone by then


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--backend", choices=["tcp", "nixl"], default="tcp")
    p.add_argument("--duration", type=float, default=30.0, help="seconds of traffic (faults stop at 70%%)")
    p.add_argument("--senders", type=int, default=2, help="sender processes")
    p.add_argument("--faults", default="all", help="comma list of " + ", ".join(f.value for f in Fault) + ", or all")
    p.add_argument("--every", type=float, default=2.0, help="seconds between faults (jittered)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--deadline", type=float, default=6.0, help="each transfer's deadline (s)")
    p.add_argument("--lease", type=float, default=2.0, help="receiver lease (s): silent reservations are reclaimed")
    p.add_argument("--capacity", type=parse_size, default=parse_size("16MiB"), help="receiver region")
    p.add_argument("--max-chunk-bytes", type=parse_size, default=parse_size("256KiB"))
    p.add_argument("--json", action="store_true", help="print the verdict as one JSON object")


class ChaosRun:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        faults = parse_faults(args.faults)
        if args.backend == "nixl":  # NIXL WRITEs do not pass through the relay
            faults = tuple(f for f in faults if f not in DATA_FAULTS)
        if not faults:
            raise ValueError(f"no fault left to inject on the {args.backend} data path")
        if args.senders < 1 or args.duration <= 0 or args.deadline <= 0 or args.lease <= 0:
            raise ValueError("--senders, --duration, --deadline and --lease must be > 0")
        self.faults = faults
        self.events = schedule(args.seed, args.duration, faults, args.every, senders=args.senders)
        self.control_port, self.data_port = free_port(), free_port()
        self.relay: Any = None  # TCP data connections
        self.control_relay: Any = None  # ZMQ control connections; senders dial it as the receiver
        self.receiver: ChildProcess | None = None
        self.workers: list[ChildProcess | None] = [None] * args.senders
        self.applied: list[dict[str, Any]] = []
        self.receiver_reports: list[dict[str, Any] | None] = []
        self.receivers_started = 0
        self.workers_killed = 0
        self.worker_reports: list[dict[str, Any] | None] = []
        self.last_fault_wall = 0.0
        self.stray_output: dict[str, list[str]] = {}  # non-JSON lines children printed on stdout

    @property
    def control(self) -> str:
        return f"tcp://127.0.0.1:{self.control_relay.port}"

    # --------------------------------------------------------------- processes
    def _start_receiver(self, timeout: float = 20.0) -> None:
        argv = receiver_argv("--capacity", str(self.args.capacity), "--control-port", str(self.control_port),
                             "--data-port", str(self.data_port), "--lease", str(self.args.lease),
                             "--verify-pattern", "--backends", self.args.backend)
        if self.relay is not None:
            argv += ["--advertise-data", self.relay.address]
        if self.args.backend == "nixl":
            argv.append("--nixl-eager")  # a restarted receiver meets its reconnecting senders ready
        deadline = time.monotonic() + timeout
        while True:  # a killed receiver's ports can take a moment to be free again
            try:
                self.receiver = ChildProcess(argv, ready_timeout=60)
                break
            except (RuntimeError, TimeoutError):
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.2)  # poll-ok: bounded retry until the old incarnation's ports are released
        self.receivers_started += 1

    def _start_worker(self, index: int) -> None:
        argv = [sys.executable, "-m", "pdxfer.chaos.worker", "--control", self.control, "--index", str(index),
                "--seed", str(self.args.seed + 7919 * self.workers_killed), "--backend", self.args.backend,
                "--deadline", str(self.args.deadline), "--max-chunk-bytes", str(self.args.max_chunk_bytes)]
        self.workers[index] = ChildProcess(argv, ready_timeout=60)

    def _apply(self, ev: Event) -> None:
        self.applied.append({**asdict(ev), "fault": ev.fault.value})
        if ev.fault in DATA_FAULTS:
            self.relay.arm(ev.fault, ev.hold_s)
        elif ev.fault in CONTROL_FAULTS:
            self.control_relay.arm(CONTROL_FAULTS[ev.fault], ev.hold_s)
        elif ev.fault == Fault.STOP_RECEIVER:
            assert self.receiver is not None
            self.receiver.signal(signal.SIGSTOP)
            try:
                time.sleep(ev.hold_s)  # poll-ok: the fault is a freeze of exactly this long
            finally:
                self.receiver.signal(signal.SIGCONT)
        elif ev.fault == Fault.KILL_RECEIVER:
            assert self.receiver is not None
            self.receiver.kill()
            self.receiver_reports.append(None)  # what it delivered died with it
            for relay in (self.relay, self.control_relay):
                if relay is not None:
                    relay.cut_all()
            self._start_receiver()
        elif ev.fault == Fault.KILL_SENDER:
            w = self.workers[ev.target]
            if w is not None:
                w.kill()
            self.workers_killed += 1
            self._start_worker(ev.target)
        self.last_fault_wall = time.time()

    # --------------------------------------------------------------- the run
    def run(self) -> dict[str, Any]:
        t_start = time.monotonic()
        from pdxfer.chaos.relay import Relay

        try:
            self.control_relay = Relay("127.0.0.1", self.control_port, seed=self.args.seed + 1).start()
            if self.args.backend == "tcp":
                self.relay = Relay("127.0.0.1", self.data_port, seed=self.args.seed).start()
            self._start_receiver()
            for i in range(self.args.senders):
                self._start_worker(i)
            t0 = time.monotonic()
            for ev in self.events:
                time.sleep(max(0.0, t0 + ev.at_s - time.monotonic()))  # poll-ok: the schedule's own clock
                self._apply(ev)
            # The quiet tail lasts until `duration`, and at least until a transfer the last
            # fault caught (a lost GRANT waits out its deadline) has ended and a new one
            # could run: else "no recovery" would blame a sender for the clock.
            last = t0 + (self.events[-1].at_s + self.events[-1].hold_s if self.events else 0.0)
            end = max(t0 + self.args.duration, last + self.args.deadline + HANG_GRACE_S)
            time.sleep(max(0.0, end - time.monotonic()))  # poll-ok: the quiet tail
            for i, w in enumerate(self.workers):
                self.worker_reports.append(w.finish(STOP_TIMEOUT_S) if w is not None else None)
                if w is not None and w.stray:
                    self.stray_output[f"sender {i}"] = w.stray
                self.workers[i] = None
            time.sleep(self.args.lease + 1.0)  # poll-ok: killed senders' reservations expire by lease
            assert self.receiver is not None
            self.receiver_reports.append(self.receiver.stop(STOP_TIMEOUT_S))
            self.receiver = None
        finally:
            for w in self.workers:
                if w is not None:
                    w.kill()
            if self.receiver is not None:
                self.receiver.kill()
            relay_stats = self.relay.stats() if self.relay is not None else None
            control_stats = self.control_relay.stats() if self.control_relay is not None else None
            for relay in (self.relay, self.control_relay):
                if relay is not None:
                    relay.close()
        report = {
            "backend": self.args.backend, "seed": self.args.seed, "duration_s": self.args.duration,
            "senders": self.args.senders, "faults_scheduled": [f.value for f in self.faults],
            "faults_applied": self.applied, "last_fault_wall": self.last_fault_wall,
            "receivers_started": self.receivers_started, "senders_killed": self.workers_killed,
            "workers": self.worker_reports, "receivers": self.receiver_reports, "relay": relay_stats, "control_relay": control_stats,
            "elapsed_s": round(time.monotonic() - t_start, 1), "stray_output": self.stray_output,
        }
        report["violations"] = verdict(report)
        report["totals"] = totals(report)
        return report


def totals(report: dict[str, Any]) -> dict[str, Any]:
    outcomes: dict[str, int] = {}
    for w in report["workers"]:
        for k, v in ((w or {}).get("outcomes") or {}).items():
            outcomes[k] = outcomes.get(k, 0) + v
    audited = [r for r in report["receivers"] if r is not None]
    return {"outcomes": outcomes, "audited_receivers": len(audited),
            "all_receivers_audited": len(audited) == len(report["receivers"]),
            "verified_deliveries": sum(r["stats"]["verified"] for r in audited),
            "faults_applied": len(report["faults_applied"]),
            "bit_flips": (report.get("relay") or {}).get("flips", 0),
            "control_bit_flips": (report.get("control_relay") or {}).get("flips", 0)}


def verdict(report: dict[str, Any]) -> list[str]:
    """Every broken promise in a run's report, as a sentence; [] when all held."""
    out: list[str] = []
    for r in report["receivers"]:
        if r is not None and r["stats"]["mismatched"]:
            out.append(f"corruption: the receiver delivered chunks that differ from what was sent: "
                       f"{r['stats']['mismatched'][:5]}")
    final = report["receivers"][-1] if report["receivers"] else None
    if final is None:
        out.append("hang: the last receiver did not exit and report when asked to stop")
    else:
        led = final["ledger"]
        held = {k: led[k] for k in ("reserved_bytes", "granted_count", "delivered_count", "waiting_count") if led[k]}
        if held:
            out.append(f"leak: after the lease the receiver still holds {held}")
    t = totals(report)
    if t["all_receivers_audited"] and t["outcomes"].get("ok", 0) > t["verified_deliveries"]:
        out.append(f"lost: senders were told {t['outcomes']['ok']} transfers were delivered, the receiver "
                   f"delivered {t['verified_deliveries']}")
    for i, w in enumerate(report["workers"]):
        if w is None:
            out.append(f"hang: sender {i} did not exit and report when asked to stop")
            continue
        if w["hangs"]:
            out.append(f"hang: sender {i}: {len(w['hangs'])} transfers had no outcome within their deadline "
                       f"(first: {w['hangs'][0]})")
        if w["budget_used_after"]:
            out.append(f"leak: sender {i}'s memory budget still held {w['budget_used_after']} bytes at close")
        if w["threads_left"]:
            out.append(f"leak: sender {i} left {w['threads_left']} threads running after close")
        if report["faults_applied"] and w["last_ok_wall"] <= report["last_fault_wall"]:
            out.append(f"no recovery: sender {i} delivered nothing after the last fault")
    return out


def _print_table(report: dict[str, Any]) -> None:
    from rich.console import Console
    from rich.table import Table

    t = Table(title=f"pdxfer chaos --backend {report['backend']} --seed {report['seed']} "
                    f"({report['duration_s']:.0f} s, {report['senders']} senders)")
    t.add_column("what")
    t.add_column("count", justify="right")
    faults: dict[str, int] = {}
    for ev in report["faults_applied"]:
        faults[ev["fault"]] = faults.get(ev["fault"], 0) + 1
    for k, v in sorted(faults.items()):
        t.add_row(f"fault {k}", str(v))
    for k, v in sorted(report["totals"]["outcomes"].items()):
        t.add_row(f"transfers {k}", str(v))
    t.add_row("deliveries verified against the pattern", str(report["totals"]["verified_deliveries"]))
    t.add_row("bits flipped in the data stream", str(report["totals"]["bit_flips"]))
    t.add_row("bits flipped in the control stream", str(report["totals"]["control_bit_flips"]))
    t.add_row("receivers audited / started", f"{report['totals']['audited_receivers']} / {report['receivers_started']}")
    console = Console()
    console.print(t)
    if report["violations"]:
        for v in report["violations"]:
            console.print(f"[red]FAIL[/red] {v}")
    else:
        console.print("[green]no corruption, no hang, no leak; every sender recovered after the last fault[/green]")


def run(args: argparse.Namespace) -> int:
    try:
        chaos = ChaosRun(args)
    except ValueError as exc:
        print(f"pdxfer chaos: {exc}", file=sys.stderr)
        return 2
    report = chaos.run()
    if args.json:
        print(json.dumps(report))
    else:
        _print_table(report)
    return 1 if report["violations"] else 0
