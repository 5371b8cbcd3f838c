"""The sender's background send queue: memory budget with backpressure, per-peer ordering."""

from pdxfer.sendq.budget import MemoryBudget
from pdxfer.sendq.peer_queue import PeerQueue, SendItem

__all__ = ["MemoryBudget", "PeerQueue", "SendItem"]
