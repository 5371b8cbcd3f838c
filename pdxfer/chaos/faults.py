"""What `pdxfer chaos` does to a running sender/receiver pair, and when (no I/O here).

Two families of fault:

* on the TCP data stream, applied by the relay the senders dial instead of the receiver
  (`ReceiverConfig.advertise_data` points them at it): flip one bit (`corrupt`), hold
  the stream still (`stall`), or cut the connection with a reset (`reset`);
* the same on the ZMQ control connections (`control-corrupt`, `control-stall`,
  `control-reset`), through a second relay the senders dial as the receiver's address;
* on processes, applied by the runner: freeze the receiver (`stop-receiver`, SIGSTOP
  then SIGCONT), kill it and start a new one on the same ports (`kill-receiver`), kill
  one sender process and start a fresh one (`kill-sender`).

`schedule` is seeded, so a run that found a bug can be replayed with the same seed, and
it leaves the last part of the run without faults: the system has to be seen serving
again after the last fault, not merely surviving it. `StreamTamper` is the relay's
byte-level decision maker, kept free of sockets so every fault is testable alone.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from enum import Enum


class Fault(str, Enum):
    CORRUPT = "corrupt"
    STALL = "stall"
    RESET = "reset"
    CONTROL_CORRUPT = "control-corrupt"
    CONTROL_STALL = "control-stall"
    CONTROL_RESET = "control-reset"
    STOP_RECEIVER = "stop-receiver"
    KILL_RECEIVER = "kill-receiver"
    KILL_SENDER = "kill-sender"


#: What a relay can do to the bytes it forwards.
STREAM_FAULTS = frozenset({Fault.CORRUPT, Fault.STALL, Fault.RESET})
#: Stream faults on the TCP data connections (NIXL data bypasses the relay).
DATA_FAULTS = STREAM_FAULTS
#: The same on the ZMQ control connections (both backends), as the stream fault each is.
CONTROL_FAULTS = {Fault.CONTROL_CORRUPT: Fault.CORRUPT, Fault.CONTROL_STALL: Fault.STALL,
                  Fault.CONTROL_RESET: Fault.RESET}


def parse_faults(text: str) -> tuple[Fault, ...]:
    """"corrupt,kill-sender" -> (Fault.CORRUPT, Fault.KILL_SENDER); "all": every fault."""
    if text.strip() == "all":
        return tuple(Fault)
    out = []
    for name in (t.strip() for t in text.split(",")):
        if not name:
            continue
        try:
            out.append(Fault(name))
        except ValueError:
            raise ValueError(f"unknown fault {name!r}; known: {', '.join(f.value for f in Fault)}, all") from None
    if not out:
        raise ValueError("no fault named (e.g. --faults corrupt,kill-sender, or all)")
    return tuple(dict.fromkeys(out))


@dataclass(frozen=True)
class Event:
    at_s: float  # seconds after the run started
    fault: Fault
    target: int = 0  # kill-sender: which sender process (index)
    hold_s: float = 0.0  # stall / stop-receiver: how long


def schedule(seed: int, duration_s: float, faults: tuple[Fault, ...], every_s: float, *,
             senders: int = 1, quiet_tail: float = 0.3, hold_s: tuple[float, float] = (0.2, 1.5)) -> list[Event]:
    """Fault events for one run: one every `every_s` (±30 %), the kinds in a shuffled
    round robin so each occurs as evenly as the run's length allows, none in the last
    `quiet_tail` fraction of the run."""
    if duration_s <= 0 or every_s <= 0:
        raise ValueError(f"duration and interval must be > 0, got {duration_s} and {every_s}")
    if not 0 <= quiet_tail < 1:
        raise ValueError(f"quiet_tail must be in [0, 1), got {quiet_tail}")
    rng = random.Random(seed)
    last = duration_s * (1 - quiet_tail)
    events: list[Event] = []
    order: list[Fault] = []
    t = every_s * rng.uniform(0.5, 1.0)
    while t < last and faults:
        if not order:
            order = list(faults)
            rng.shuffle(order)
        fault = order.pop()
        held = (Fault.STALL, Fault.CONTROL_STALL, Fault.STOP_RECEIVER)
        hold = round(rng.uniform(*hold_s), 3) if fault in held else 0.0
        target = rng.randrange(senders) if fault == Fault.KILL_SENDER else 0
        events.append(Event(round(t, 3), fault, target, hold))
        t += every_s * rng.uniform(0.7, 1.3)
    return events


@dataclass(frozen=True)
class Forward:
    data: bytes


@dataclass(frozen=True)
class Hold:
    seconds: float


@dataclass(frozen=True)
class Cut:
    """Reset the connection (both sides) instead of forwarding anything more."""


Action = Forward | Hold | Cut


class StreamTamper:
    """Decides what happens to the next bytes a relay forwards: armed with one stream
    fault at a time, it applies it to the first bytes that pass and disarms."""

    def __init__(self, seed: int = 0) -> None:
        self._rng = random.Random(seed)
        self._armed: tuple[Fault, float] | None = None
        self.applied: dict[str, int] = {f.value: 0 for f in STREAM_FAULTS}
        self.flipped_at: list[tuple[int, int]] = []  # (stream offset, bit) of each flip

    def arm(self, fault: Fault, hold_s: float = 0.0) -> None:
        if fault not in STREAM_FAULTS:
            raise ValueError(f"{fault.value} is not a stream fault")
        self._armed = (fault, hold_s)

    @property
    def armed(self) -> Fault | None:
        return self._armed[0] if self._armed else None

    def feed(self, data: bytes, stream_offset: int = 0) -> list[Action]:
        """What to do with `data` (read from the sender side at `stream_offset`)."""
        if not data or self._armed is None:
            return [Forward(data)] if data else []
        fault, hold = self._armed
        self._armed = None
        self.applied[fault.value] += 1
        if fault == Fault.RESET:
            return [Cut()]
        if fault == Fault.STALL:
            return [Hold(hold), Forward(data)]
        pos, bit = self._rng.randrange(len(data)), self._rng.randrange(8)
        out = bytearray(data)
        out[pos] ^= 1 << bit
        self.flipped_at.append((stream_offset + pos, bit))
        return [Forward(bytes(out))]
