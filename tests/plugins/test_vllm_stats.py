"""The connector's telemetry payloads and their Prometheus series (no vLLM needed)."""

from __future__ import annotations

import functools

import pytest
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from pdxfer.plugins.vllm import stats
from pdxfer.plugins.vllm.prom import PromSink


class _Clock:
    def __init__(self) -> None:
        self.t = 100.0

    def __call__(self) -> float:
        return self.t


def test_nothing_happened_means_no_payload():
    assert stats.Recorder().take() is None


def test_take_returns_what_happened_once():
    r = stats.Recorder(rank=0)
    r.sent(4096, 0.02, 0.001)
    r.received(8192, 0.5)
    r.failed("send", "PeerLost")
    r.failed("send", "PeerLost")
    r.failed("recv", "TransferTimeout")
    got = r.take()
    assert got is not None
    assert got["send_bytes"] == [4096] and got["send_seconds"] == [0.02] and got["grant_wait_seconds"] == [0.001]
    assert got["recv_bytes"] == [8192] and got["recv_seconds"] == [0.5]
    assert got["send_failed"] == {"PeerLost": 2} and got["recv_failed"] == {"TransferTimeout": 1}
    assert r.take() is None  # reported once, not again


def test_bad_side_is_named():
    with pytest.raises(ValueError, match="'send' or 'recv'"):
        stats.Recorder().failed("both", "x")


def test_gauges_are_sampled_at_most_once_a_period_and_only_sent_when_changed():
    level = {"send_budget_used_bytes": 0.0}
    calls = []

    def sample() -> dict[str, float]:
        calls.append(1)
        return dict(level)

    clock = _Clock()
    r = stats.Recorder(rank=3, sample=sample, clock=clock)
    assert r.take() == {**stats.empty(), "gauges": {"3": {"send_budget_used_bytes": 0.0}}}  # the first sample
    level["send_budget_used_bytes"] = 1024.0
    assert r.take() is None and len(calls) == 1  # within the period: not sampled
    clock.t += stats.GAUGE_PERIOD_S
    assert r.take()["gauges"] == {"3": {"send_budget_used_bytes": 1024.0}}
    clock.t += stats.GAUGE_PERIOD_S
    assert r.take() is None and len(calls) == 3  # sampled, unchanged: nothing to say


def test_merge_adds_and_tolerates_other_versions():
    a = stats.empty()
    a["send_bytes"] = [1]
    a["send_failed"] = {"PeerLost": 1}
    a["gauges"] = {"0": {"receiver_waiting": 2.0}}
    b = {"send_bytes": [2, 3], "send_failed": {"PeerLost": 2, "IntegrityError": 1},
         "gauges": {"1": {"receiver_waiting": 5.0}}, "from_a_newer_pdxfer": [9]}  # no recv_* keys at all
    out = stats.merge(a, b)
    assert out is a and out["send_bytes"] == [1, 2, 3] and out["recv_bytes"] == []
    assert out["send_failed"] == {"PeerLost": 3, "IntegrityError": 1}
    assert out["gauges"] == {"0": {"receiver_waiting": 2.0}, "1": {"receiver_waiting": 5.0}}
    assert stats.is_empty(stats.empty()) and not stats.is_empty(out)


def test_summary_names_only_what_happened():
    data = stats.empty()
    assert stats.summary(data) == {}
    data["send_seconds"] = [0.01, 0.03, 0.02]
    data["send_bytes"] = [2**20] * 3
    data["grant_wait_seconds"] = [0.001, 0.002, 0.003]
    data["recv_failed"] = {"TransferTimeout": 2}
    s = stats.summary(data)
    assert s["KV sent"] == 3 and s["sent MB"] == 3.0 and s["sent p50 ms"] == 20.0 and s["sent max ms"] == 30.0
    assert s["sent MB/s per transfer"] == 50.0 and s["grant wait p50 ms"] == 2.0
    assert s["received failed"] == 2 and "KV received" not in s


def _sink(engines: dict[int, list[object]]) -> tuple[PromSink, CollectorRegistry]:
    reg = CollectorRegistry()
    types = {cls: functools.partial(cls, registry=reg) for cls in (Counter, Gauge, Histogram)}
    return PromSink(types, ["engine"], engines), reg


def test_prometheus_series_follow_the_payloads():
    sink, reg = _sink({0: ["0"], 1: ["1"]})
    first = stats.empty()
    first.update(send_seconds=[0.002, 0.2], send_bytes=[100, 300], grant_wait_seconds=[0.0005, 0.001],
                 send_failed={"PeerLost": 1}, gauges={"0": {"send_budget_used_bytes": 10.0, "spill_host_bytes": 4.0}})
    sink.observe(first, 0)
    second = stats.empty()
    second.update(recv_seconds=[1.5], recv_bytes=[4096], recv_failed={"IntegrityError": 2},
                  gauges={"1": {"send_budget_used_bytes": 5.0}})
    sink.observe(second, 0)
    sink.observe({**stats.empty(), "send_seconds": [0.01], "send_bytes": [7]}, 1)
    v = reg.get_sample_value
    assert v("vllm:pdxfer_transfers_sent_total", {"engine": "0"}) == 2
    assert v("vllm:pdxfer_sent_bytes_total", {"engine": "0"}) == 400
    assert v("vllm:pdxfer_send_seconds_count", {"engine": "0"}) == 2
    assert v("vllm:pdxfer_send_seconds_bucket", {"engine": "0", "le": "0.0025"}) == 1
    assert v("vllm:pdxfer_grant_wait_seconds_count", {"engine": "0"}) == 2
    assert v("vllm:pdxfer_send_failures_total", {"engine": "0", "kind": "PeerLost"}) == 1
    assert v("vllm:pdxfer_transfers_received_total", {"engine": "0"}) == 1
    assert v("vllm:pdxfer_received_bytes_total", {"engine": "0"}) == 4096
    assert v("vllm:pdxfer_recv_seconds_sum", {"engine": "0"}) == 1.5
    assert v("vllm:pdxfer_recv_failures_total", {"engine": "0", "kind": "IntegrityError"}) == 2
    # gauges: the sum of every rank's latest sample, though each payload carried one rank
    assert v("vllm:pdxfer_send_budget_used_bytes", {"engine": "0"}) == 15.0
    assert v("vllm:pdxfer_spill_host_bytes", {"engine": "0"}) == 4.0
    assert v("vllm:pdxfer_transfers_sent_total", {"engine": "1"}) == 1  # engines apart
    assert v("vllm:pdxfer_sent_bytes_total", {"engine": "1"}) == 7
