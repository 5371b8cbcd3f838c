"""Spill tiers for the send queue: bounded host memory, then a bounded disk directory."""

from pdxfer.tiers.disk import DiskBlock, DiskTier, cleanup_orphans
from pdxfer.tiers.host import HostBlock, HostTier
from pdxfer.tiers.store import SpilledChunk, SpillStore

__all__ = ["HostTier", "HostBlock", "DiskTier", "DiskBlock", "cleanup_orphans", "SpillStore", "SpilledChunk"]
