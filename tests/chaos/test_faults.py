"""The chaos schedule and the stream tamper: seeded, complete, and each fault does one thing."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pdxfer.chaos.faults import (
    STREAM_FAULTS, Cut, Fault, Forward, Hold, StreamTamper, parse_faults, schedule,
)


def test_parse_faults_names_the_unknown_one() -> None:
    assert parse_faults("corrupt, kill-sender,corrupt") == (Fault.CORRUPT, Fault.KILL_SENDER)
    assert parse_faults("all") == tuple(Fault)
    with pytest.raises(ValueError, match="unknown fault 'bitrot'"):
        parse_faults("corrupt,bitrot")
    with pytest.raises(ValueError, match="no fault named"):
        parse_faults(" , ")


def test_schedule_is_seeded_covers_every_fault_and_leaves_a_quiet_tail() -> None:
    a = schedule(5, 30.0, tuple(Fault), 1.0, senders=3)
    assert a == schedule(5, 30.0, tuple(Fault), 1.0, senders=3)
    assert a != schedule(6, 30.0, tuple(Fault), 1.0, senders=3)
    assert {e.fault for e in a} == set(Fault)
    assert all(e.at_s < 30.0 * 0.7 for e in a)
    assert [e.at_s for e in a] == sorted(e.at_s for e in a)
    assert {e.target for e in a if e.fault == Fault.KILL_SENDER} <= {0, 1, 2}
    assert all(e.hold_s > 0 for e in a if e.fault in (Fault.STALL, Fault.STOP_RECEIVER))


@settings(max_examples=50, deadline=None)
@given(st.integers(0, 2**32), st.floats(0.5, 120), st.floats(0.1, 10))
def test_schedule_round_robin_keeps_kinds_within_one_of_each_other(seed: int, duration: float, every: float) -> None:
    events = schedule(seed, duration, tuple(Fault), every)
    counts = [sum(e.fault == f for e in events) for f in Fault]
    assert max(counts) - min(counts) <= 1


def test_schedule_rejects_nonsense() -> None:
    with pytest.raises(ValueError, match="must be > 0"):
        schedule(0, 0, tuple(Fault), 1.0)
    with pytest.raises(ValueError, match="quiet_tail"):
        schedule(0, 10, tuple(Fault), 1.0, quiet_tail=1.0)


def test_tamper_passes_bytes_through_until_armed_and_applies_a_fault_once() -> None:
    t = StreamTamper(seed=1)
    assert t.feed(b"abc") == [Forward(b"abc")]
    assert t.feed(b"") == []
    t.arm(Fault.CORRUPT)
    data = bytes(range(256)) * 4
    (out,) = t.feed(data, stream_offset=1000)
    assert isinstance(out, Forward) and len(out.data) == len(data)
    diff = [i for i, (x, y) in enumerate(zip(data, out.data)) if x != y]
    assert len(diff) == 1 and bin(data[diff[0]] ^ out.data[diff[0]]).count("1") == 1  # exactly one bit
    assert t.flipped_at == [(1000 + diff[0], (data[diff[0]] ^ out.data[diff[0]]).bit_length() - 1)]
    assert t.feed(data) == [Forward(data)]  # disarmed after one use
    t.arm(Fault.STALL, 0.25)
    assert t.feed(b"x") == [Hold(0.25), Forward(b"x")]
    t.arm(Fault.RESET)
    assert t.feed(b"x") == [Cut()]
    assert t.applied == {"corrupt": 1, "stall": 1, "reset": 1}


def test_tamper_refuses_process_faults() -> None:
    for f in set(Fault) - STREAM_FAULTS:
        with pytest.raises(ValueError, match="not a stream fault"):
            StreamTamper().arm(f)
