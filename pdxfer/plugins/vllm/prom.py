"""pdxfer's series in vLLM's Prometheus endpoint, fed from `stats` payloads.

vLLM's front end creates this through `PdxferConnector.build_prom_metrics`, passing the
metric classes to use (prometheus_client's, or its Ray wrappers) and one label set per
engine; it then calls `observe` with each merged stats payload and that engine's index.
Counters and histograms add what the payload holds; gauges are set to the sum of every
worker rank's latest sample (a payload carries only the ranks that sampled that step).
"""

from __future__ import annotations

from typing import Any

from prometheus_client import Counter, Gauge, Histogram

from pdxfer.plugins.vllm.stats import Stats

# open->DONE and request->KV loaded: a 64 KiB prompt on loopback takes ~1 ms, a large one
# behind a full decode waits up to the transfer deadline
SECONDS_BUCKETS = [0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0]
GAUGES = {  # stats gauge name -> (series, help)
    "send_budget_used_bytes": ("vllm:pdxfer_send_budget_used_bytes",
                               "Bytes of KV chunks held in the prefill's send budget."),
    "spill_host_bytes": ("vllm:pdxfer_spill_host_bytes", "Bytes of KV chunks spilled to the host tier."),
    "spill_disk_bytes": ("vllm:pdxfer_spill_disk_bytes", "Bytes of KV chunks spilled to the disk tier."),
    "streams_behind": ("vllm:pdxfer_streams_behind",
                       "Streamed prefills waiting for send budget to pack their next chunk."),
    "receiver_reserved_bytes": ("vllm:pdxfer_receiver_reserved_bytes",
                                "Bytes of the decode's receive region reserved for transfers."),
    "receiver_waiting": ("vllm:pdxfer_receiver_waiting_transfers",
                         "Transfers queued at the decode's receiver for room."),
}


class PromSink:
    def __init__(self, metric_types: dict[type, type], labelnames: list[str],
                 per_engine_labelvalues: dict[int, list[object]]) -> None:
        counter, gauge, histogram = metric_types[Counter], metric_types[Gauge], metric_types[Histogram]
        self._engines = per_engine_labelvalues
        names = list(labelnames)

        def hist(name: str, doc: str) -> dict[int, Any]:
            return self._per_engine(histogram(name=name, documentation=doc, buckets=SECONDS_BUCKETS, labelnames=names))

        def count(name: str, doc: str) -> dict[int, Any]:
            return self._per_engine(counter(name=name, documentation=doc, labelnames=names))

        self.send_seconds = hist("vllm:pdxfer_send_seconds",
                                 "Prefill side: KV transfer open to DONE (received and verified by the decode).")
        self.grant_wait = hist("vllm:pdxfer_grant_wait_seconds",
                               "Prefill side: KV transfer open to GRANT (the decode reserved its room).")
        self.recv_seconds = hist("vllm:pdxfer_recv_seconds",
                                 "Decode side: request scheduled to its KV unpacked into its blocks.")
        self.sent = count("vllm:pdxfer_transfers_sent", "KV transfers this prefill completed.")
        self.sent_bytes = count("vllm:pdxfer_sent_bytes", "KV bytes this prefill delivered.")
        self.received = count("vllm:pdxfer_transfers_received", "KV loads this decode completed.")
        self.received_bytes = count("vllm:pdxfer_received_bytes", "KV bytes this decode loaded.")
        self._failures = {
            side: counter(name=f"vllm:pdxfer_{side}_failures", labelnames=[*names, "kind"],
                          documentation=f"KV transfers that failed on the {role} side, by kind of error.")
            for side, role in (("send", "prefill"), ("recv", "decode"))
        }
        self._latest: dict[int, dict[Any, dict[str, float]]] = {}  # engine -> rank -> last sample
        self._gauges = {key: self._per_engine(gauge(name=series, documentation=doc, labelnames=names,
                                                    multiprocess_mode="mostrecent"))
                        for key, (series, doc) in GAUGES.items()}

    def _per_engine(self, metric: Any) -> dict[int, Any]:
        return {idx: metric.labels(*values) for idx, values in self._engines.items()}

    def observe(self, data: Stats, engine_idx: int = 0) -> None:
        for series, key in ((self.send_seconds, "send_seconds"), (self.grant_wait, "grant_wait_seconds"),
                            (self.recv_seconds, "recv_seconds")):
            for v in data.get(key, ()):
                series[engine_idx].observe(v)
        for series, key in ((self.sent_bytes, "send_bytes"), (self.received_bytes, "recv_bytes")):
            if data.get(key):
                series[engine_idx].inc(sum(data[key]))
        for series, key in ((self.sent, "send_seconds"), (self.received, "recv_seconds")):
            if data.get(key):
                series[engine_idx].inc(len(data[key]))
        for side, metric in self._failures.items():
            for kind, n in data.get(f"{side}_failed", {}).items():
                metric.labels(*self._engines[engine_idx], kind).inc(n)
        if data.get("gauges"):
            latest = self._latest.setdefault(engine_idx, {})  # a payload holds only the ranks that sampled
            latest.update(data["gauges"])
            for key, series in self._gauges.items():
                series[engine_idx].set(sum(float(g.get(key, 0)) for g in latest.values()))
