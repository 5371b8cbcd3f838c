"""Transfer telemetry for vLLM's connector-stats path, as plain dicts (no vLLM import).

vLLM asks every worker's connector for what happened since its last step
(`get_kv_connector_stats`), merges the answers of the tensor-parallel workers in the
scheduler, and hands the merged dict to the front end, where its periodic "KV Transfer
metrics" log line (`summary`) and its Prometheus exporter (`prom.PromSink`) read it. So
the payload must pickle, merge by plain addition (workers, and successive steps within
one log interval), and cost nothing on a step where nothing happened: `Recorder.take`
returns None then, and vLLM sends nothing.

Layout of a payload:
- `send_seconds`, `grant_wait_seconds`, `send_bytes`: one entry per transfer this prefill
  worker completed (open to DONE, open to GRANT, bytes);
- `recv_seconds`, `recv_bytes`: one entry per KV load this decode worker completed
  (request seen to KV unpacked into its blocks, bytes);
- `send_failed`, `recv_failed`: {error kind: count} (`TransferTimeout`, `PeerLost`,
  `IntegrityError`, `prefill_refused`, `unpack_failed`, ...);
- `gauges`: {worker rank (str): {name: value}} as last sampled (at most once per
  `GAUGE_PERIOD_S`): send budget in use, spilled bytes per tier, streams behind,
  receiver bytes reserved and transfers waiting. A later sample of a rank replaces an
  earlier one; Prometheus shows the sum over ranks.
"""

from __future__ import annotations

import copy
import statistics
import threading
import time
from typing import Any, Callable

LISTS = ("send_seconds", "grant_wait_seconds", "send_bytes", "recv_seconds", "recv_bytes")
COUNTS = ("send_failed", "recv_failed")
GAUGE_PERIOD_S = 1.0  # sampling the Receiver's ledger is a round trip to its loop: not every step

Stats = dict[str, Any]


def empty() -> Stats:
    return {**{k: [] for k in LISTS}, **{k: {} for k in COUNTS}, "gauges": {}}


def merge(into: Stats, other: Stats) -> Stats:
    """Add `other` to `into` (in place; returns it). Either may come from an older or newer
    pdxfer (a rolling upgrade across processes): unknown keys are ignored, missing ones
    count as empty."""
    for k in LISTS:
        into.setdefault(k, []).extend(other.get(k, ()))
    for k in COUNTS:
        mine = into.setdefault(k, {})
        for kind, n in other.get(k, {}).items():
            mine[kind] = mine.get(kind, 0) + int(n)
    into.setdefault("gauges", {}).update(copy.deepcopy(other.get("gauges", {})))
    return into


def is_empty(data: Stats) -> bool:
    return not any(data.get(k) for k in (*LISTS, *COUNTS, "gauges"))


def summary(data: Stats) -> dict[str, int | float]:
    """One interval in a few numbers, for vLLM's log line; only what happened is named."""
    out: dict[str, int | float] = {}
    for side, label in (("send", "sent"), ("recv", "received")):
        secs, nbytes = data.get(f"{side}_seconds", []), data.get(f"{side}_bytes", [])
        failed = sum(data.get(f"{side}_failed", {}).values())
        if secs:
            total_s = sum(secs)
            out[f"KV {label}"] = len(secs)
            out[f"{label} MB"] = round(sum(nbytes) / 2**20, 3)
            out[f"{label} p50 ms"] = round(statistics.median(secs) * 1e3, 3)
            out[f"{label} max ms"] = round(max(secs) * 1e3, 3)
            if total_s > 0:
                out[f"{label} MB/s per transfer"] = round(sum(nbytes) / 2**20 / total_s, 1)
        if failed:
            out[f"{label} failed"] = failed
    waits = data.get("grant_wait_seconds", [])
    if waits:
        out["grant wait p50 ms"] = round(statistics.median(waits) * 1e3, 3)
    return out


class Recorder:
    """What one worker saw since vLLM last asked. Written from several threads (the
    Sender's loop reports transfer outcomes, the engine thread finishes receives), read
    and emptied on the engine thread."""

    def __init__(self, rank: int = 0, sample: Callable[[], dict[str, float]] | None = None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        """`sample`: reads the gauges (`GAUGE_PERIOD_S` apart at most)."""
        self.rank = rank
        self._sample = sample
        self._clock = clock
        self._lock = threading.Lock()
        self._data = empty()
        self._next_sample = 0.0
        self._last_gauges: dict[str, float] | None = None

    def sent(self, nbytes: int, seconds: float, grant_wait: float) -> None:
        with self._lock:
            self._data["send_bytes"].append(int(nbytes))
            self._data["send_seconds"].append(float(seconds))
            self._data["grant_wait_seconds"].append(float(grant_wait))

    def received(self, nbytes: int, seconds: float) -> None:
        with self._lock:
            self._data["recv_bytes"].append(int(nbytes))
            self._data["recv_seconds"].append(float(seconds))

    def failed(self, side: str, kind: str) -> None:
        """`side`: "send" or "recv"; `kind`: the error's class name or a short reason."""
        key = f"{side}_failed"
        if key not in COUNTS:
            raise ValueError(f"failed(): side must be 'send' or 'recv', got {side!r}")
        with self._lock:
            counts = self._data[key]
            counts[kind] = counts.get(kind, 0) + 1

    def take(self) -> Stats | None:
        """Everything since the last call, or None if nothing happened (gauges count as
        happening only when a sample differs from the last one sent)."""
        gauges = self._gauges_due()
        with self._lock:
            if gauges is not None:
                self._data["gauges"] = {str(self.rank): gauges}  # str: msgpack map keys travel as-is either way
            if is_empty(self._data):
                return None
            data, self._data = self._data, empty()
        return data

    def _gauges_due(self) -> dict[str, float] | None:
        now = self._clock()
        if self._sample is None or now < self._next_sample:
            return None
        self._next_sample = now + GAUGE_PERIOD_S
        values = self._sample()
        if values == self._last_gauges:
            return None
        self._last_gauges = values
        return values
