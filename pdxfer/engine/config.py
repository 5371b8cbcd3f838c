"""Sender and receiver settings, with the defaults a production deployment wants.

Every wait has a bound here; tests shrink them to milliseconds instead of sleeping.
"""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass, field


def _default_id(prefix: str) -> str:
    return f"{prefix}-{socket.gethostname()}-{os.getpid()}-{os.urandom(3).hex()}"


@dataclass(frozen=True)
class SenderConfig:
    memory_budget: int = 1 << 30  # bytes of chunks held for sending
    sender_id: str = field(default_factory=lambda: _default_id("send"))
    token: str | None = None  # shared secret checked by the receiver's HELLO
    deadline_s: float = 60.0  # whole transfer, submit to DONE
    submit_timeout_s: float = 10.0  # how long put() may wait for budget (backpressure)
    handshake_timeout_s: float = 5.0
    heartbeat_s: float = 1.0
    peer_timeout_s: float = 5.0  # no reply at all for this long while transfers are active
    lane_idle_s: float = 30.0  # close a peer's sockets after this long with nothing to do
    # True: hash each chunk in put(), on the caller's thread. That also catches a caller
    # that reuses a buffer before it was sent, at the cost of one extra pass over cold
    # memory. False: hash on the send thread right before the bytes go out, cache-hot.
    checksum_on_put: bool = True

    def __post_init__(self) -> None:
        for name in ("deadline_s", "submit_timeout_s", "handshake_timeout_s", "heartbeat_s", "peer_timeout_s", "lane_idle_s"):
            if getattr(self, name) <= 0:
                raise ValueError(f"SenderConfig.{name} must be > 0, got {getattr(self, name)}")
        if self.memory_budget <= 0:
            raise ValueError(f"SenderConfig.memory_budget must be > 0, got {self.memory_budget}")


@dataclass(frozen=True)
class ReceiverConfig:
    capacity: int = 1 << 30  # bytes of receive buffer; every reservation lives inside it
    host: str = "127.0.0.1"
    control_port: int = 0  # 0: pick a free port
    data_port: int = 0
    receiver_id: str = field(default_factory=lambda: _default_id("recv"))
    token: str | None = None
    lease_s: float = 10.0  # a granted transfer with no traffic/heartbeat for this long is reclaimed
    claim_timeout_s: float = 60.0  # a delivered transfer nobody waits for is reclaimed after this
    alignment: int = 4096
    max_queue: int = 100_000
    remember_failures: int = 10_000  # late waiters still learn why a transfer failed

    def __post_init__(self) -> None:
        if self.capacity <= 0:
            raise ValueError(f"ReceiverConfig.capacity must be > 0, got {self.capacity}")
        for name in ("lease_s", "claim_timeout_s"):
            if getattr(self, name) <= 0:
                raise ValueError(f"ReceiverConfig.{name} must be > 0, got {getattr(self, name)}")
