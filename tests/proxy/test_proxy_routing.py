"""Routing policies and work estimates: pure logic, no I/O."""

from __future__ import annotations

from dataclasses import dataclass

import pytest

from pdxfer.proxy.routing import (
    DEFAULT_MAX_TOKENS,
    LeastOutstanding,
    RoundRobin,
    decode_cost,
    estimate_prompt_tokens,
    make_policy,
    prefill_cost,
)


@dataclass
class W:
    url: str
    routable: bool = True
    in_flight: int = 0
    outstanding_tokens: int = 0


def test_round_robin_rotates_over_routable_only() -> None:
    ws = [W("a"), W("b", routable=False), W("c")]
    rr = RoundRobin()
    assert [rr.pick(ws).url for _ in range(4)] == ["a", "c", "a", "c"]  # type: ignore[union-attr]


def test_round_robin_exclude_and_none() -> None:
    ws = [W("a"), W("b")]
    rr = RoundRobin()
    assert rr.pick(ws, exclude={"a"}).url == "b"  # type: ignore[union-attr]
    assert rr.pick(ws, exclude={"a", "b"}) is None
    assert rr.pick([W("x", routable=False)]) is None
    assert rr.pick([]) is None


def test_least_outstanding_prefers_least_tokens_then_fewest_requests() -> None:
    lo = LeastOutstanding()
    ws = [W("a", outstanding_tokens=500, in_flight=1),
          W("b", outstanding_tokens=20, in_flight=3),
          W("c", outstanding_tokens=20, in_flight=2)]
    assert lo.pick(ws).url == "c"  # type: ignore[union-attr]
    ws[2].routable = False
    assert lo.pick(ws).url == "b"  # type: ignore[union-attr]
    assert lo.pick(ws, exclude={"b"}).url == "a"  # type: ignore[union-attr]


def test_least_outstanding_rotates_between_equal_workers() -> None:
    lo = LeastOutstanding()
    ws = [W("a"), W("b"), W("c")]
    assert {lo.pick(ws).url for _ in range(3)} == {"a", "b", "c"}  # type: ignore[union-attr]


def test_least_outstanding_balances_when_load_is_tracked() -> None:
    lo = LeastOutstanding()
    ws = [W("a"), W("b")]
    for cost in (100, 10, 10, 10, 10, 10, 10, 10, 10, 10):
        w = lo.pick(ws)
        assert w is not None
        w.outstanding_tokens += cost
    assert sorted(w.outstanding_tokens for w in ws) == [90, 100]


def test_make_policy() -> None:
    assert isinstance(make_policy("round_robin"), RoundRobin)
    assert isinstance(make_policy("least_outstanding"), LeastOutstanding)
    with pytest.raises(ValueError):
        make_policy("random")


@pytest.mark.parametrize(
    ("body", "tokens"),
    [
        ({"prompt": "abcdefgh"}, 2),
        ({"prompt": "abcdefghi"}, 3),
        ({"prompt": [1, 2, 3, 4, 5]}, 5),
        ({"prompt": ["abcd", "abcdefgh"]}, 3),
        ({"prompt": [[1, 2], [3]]}, 3),
        ({"prompt": ""}, 1),
        ({"messages": [{"role": "user", "content": "abcdefgh"}]}, 6),
        ({"messages": [{"role": "user", "content": [{"type": "text", "text": "abcd"}]}]}, 5),
        ({"messages": "junk"}, 1),
    ],
)
def test_estimate_prompt_tokens(body: dict, tokens: int) -> None:
    assert estimate_prompt_tokens(body) == tokens


def test_costs() -> None:
    assert prefill_cost({"prompt": "abcdefgh", "max_tokens": 10}) == 2
    assert decode_cost({"prompt": "abcdefgh", "max_tokens": 10}) == 12
    assert decode_cost({"prompt": "abcdefgh", "max_tokens": 10, "n": 3}) == 32
    assert decode_cost({"messages": [{"role": "user", "content": "abcd"}], "max_completion_tokens": 5, "max_tokens": 99}) == 10
    assert decode_cost({"prompt": "abcd"}) == 1 + DEFAULT_MAX_TOKENS
    assert decode_cost({"prompt": "abcd", "max_tokens": True}) == 1 + DEFAULT_MAX_TOKENS
