"""Routing policies and work estimates: pure logic, no I/O, no clock.

A policy sees a sequence of candidates (anything with ``url``, ``routable``,
``in_flight`` and ``outstanding_tokens``) and the urls to leave out (workers already tried
for this request), and names one candidate or ``None``.

* ``RoundRobin`` — rotates over the routable candidates.
* ``LeastOutstanding`` — the candidate with the fewest tokens of work in flight (the
  estimates below, minus what a stream has already produced); ties broken by fewer
  requests, then in rotation so equal workers share the load.
"""

from __future__ import annotations

import math
from collections.abc import Collection, Sequence
from typing import Any, Protocol

DEFAULT_MAX_TOKENS = 256  # what we assume when a request names no limit
CHARS_PER_TOKEN = 4  # prompt estimate when the prompt is text


class Candidate(Protocol):
    url: str

    @property
    def routable(self) -> bool: ...

    @property
    def in_flight(self) -> int: ...

    @property
    def outstanding_tokens(self) -> int: ...


class Policy:
    name = "policy"

    def pick(self, candidates: Sequence[Candidate], exclude: Collection[str] = ()) -> Candidate | None:
        raise NotImplementedError


def _eligible(candidates: Sequence[Candidate], exclude: Collection[str]) -> list[Candidate]:
    return [c for c in candidates if c.routable and c.url not in exclude]


class RoundRobin(Policy):
    name = "round_robin"

    def __init__(self) -> None:
        self._next = 0

    def pick(self, candidates: Sequence[Candidate], exclude: Collection[str] = ()) -> Candidate | None:
        eligible = _eligible(candidates, exclude)
        if not eligible:
            return None
        choice = eligible[self._next % len(eligible)]
        self._next += 1
        return choice


class LeastOutstanding(Policy):
    name = "least_outstanding"

    def __init__(self) -> None:
        self._next = 0

    def pick(self, candidates: Sequence[Candidate], exclude: Collection[str] = ()) -> Candidate | None:
        eligible = _eligible(candidates, exclude)
        if not eligible:
            return None
        best = min((c.outstanding_tokens, c.in_flight) for c in eligible)
        ties = [c for c in eligible if (c.outstanding_tokens, c.in_flight) == best]
        choice = ties[self._next % len(ties)]
        self._next += 1
        return choice


def make_policy(name: str) -> Policy:
    if name == "round_robin":
        return RoundRobin()
    if name == "least_outstanding":
        return LeastOutstanding()
    raise ValueError(f"unknown policy {name!r}")


# ---------------------------------------------------------------- work estimates


def _text_tokens(text: str) -> int:
    return math.ceil(len(text) / CHARS_PER_TOKEN)


def _content_tokens(content: Any) -> int:
    if isinstance(content, str):
        return _text_tokens(content)
    if isinstance(content, list):  # [{"type": "text", "text": ...}, ...]
        total = 0
        for part in content:
            if isinstance(part, dict) and isinstance(part.get("text"), str):
                total += _text_tokens(part["text"])
        return total
    return 0


def estimate_prompt_tokens(body: dict[str, Any]) -> int:
    """Rough prompt size in tokens for a completions or chat body (never below 1)."""
    total = 0
    if "messages" in body:
        messages = body.get("messages")
        if isinstance(messages, list):
            for m in messages:
                if isinstance(m, dict):
                    total += 4 + _content_tokens(m.get("content"))  # 4: role and separators
    else:
        prompt = body.get("prompt")
        if isinstance(prompt, str):
            total = _text_tokens(prompt)
        elif isinstance(prompt, list) and prompt:
            if all(isinstance(t, int) for t in prompt):
                total = len(prompt)
            else:
                for p in prompt:
                    if isinstance(p, str):
                        total += _text_tokens(p)
                    elif isinstance(p, list):
                        total += len(p)
    return max(1, total)


def requested_max_tokens(body: dict[str, Any]) -> int:
    for key in ("max_completion_tokens", "max_tokens"):
        value = body.get(key)
        if isinstance(value, int) and not isinstance(value, bool) and value > 0:
            return value
    return DEFAULT_MAX_TOKENS


def requested_choices(body: dict[str, Any]) -> int:
    n = body.get("n")
    return n if isinstance(n, int) and not isinstance(n, bool) and n > 0 else 1


def prefill_cost(body: dict[str, Any]) -> int:
    """Tokens of work a prefill worker takes on for this request."""
    return estimate_prompt_tokens(body)


def decode_cost(body: dict[str, Any]) -> int:
    """Tokens of work a decode worker takes on: its prompt's KV plus every token to generate."""
    return estimate_prompt_tokens(body) + requested_choices(body) * requested_max_tokens(body)
