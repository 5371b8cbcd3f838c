"""Host then disk: where a spilled chunk lives, and the counters that say how often.

The send queue calls `spill()` when its memory budget is exceeded or a transfer waits
too long for a GRANT; the chunk goes to host memory if it fits, else to disk, else the
caller keeps it (and applies backpressure). `demote()` moves host-resident chunks to
disk to make host room for newer ones. Everything here is thread-safe and blocking.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field

from pdxfer.tiers.disk import DiskBlock, DiskTier
from pdxfer.tiers.host import HostBlock, HostTier


@dataclass(eq=False)
class SpilledChunk:
    nbytes: int
    checksum: int
    host: HostBlock | None = None
    disk: DiskBlock | None = None

    @property
    def tier(self) -> str:
        return "host" if self.host is not None else "disk" if self.disk is not None else "gone"


@dataclass
class TierCounters:
    spills_host: int = 0
    spills_disk: int = 0
    demotions: int = 0  # host -> disk
    restores_host: int = 0
    restores_disk: int = 0
    refused: int = 0  # no tier had room
    integrity_errors: int = 0
    extra: dict = field(default_factory=dict)


class SpillStore:
    def __init__(self, host: HostTier | None = None, disk: DiskTier | None = None) -> None:
        self.host = host
        self.disk = disk
        self.counters = TierCounters()
        self._lock = threading.Lock()

    def spill(self, data: memoryview, checksum: int) -> SpilledChunk | None:
        if self.host is not None:
            hb = self.host.put(data, checksum)
            if hb is not None:
                with self._lock:
                    self.counters.spills_host += 1
                return SpilledChunk(data.nbytes, checksum, host=hb)
        if self.disk is not None:
            db = self.disk.put(data, checksum)
            if db is not None:
                with self._lock:
                    self.counters.spills_disk += 1
                return SpilledChunk(data.nbytes, checksum, disk=db)
        with self._lock:
            self.counters.refused += 1
        return None

    def demote(self, chunk: SpilledChunk) -> bool:
        """Move a host-resident chunk to disk; False if it is not on host or disk is full."""
        if chunk.host is None or self.disk is None or self.host is None:
            return False
        db = self.disk.put(self.host.view(chunk.host), chunk.checksum)
        if db is None:
            return False
        self.host.free(chunk.host)
        chunk.host, chunk.disk = None, db
        with self._lock:
            self.counters.demotions += 1
        return True

    def host_view(self, chunk: SpilledChunk, *, transfer_id: str | None = None) -> memoryview:
        """A verified view of a host-resident chunk, to send from without copying it."""
        from pdxfer.errors import IntegrityError
        from pdxfer.protocol.checksum import chunk_checksum

        if chunk.host is None or self.host is None:
            raise ValueError("chunk is not in the host tier")
        view = self.host.view(chunk.host)
        if chunk_checksum(view) != chunk.checksum:
            with self._lock:
                self.counters.integrity_errors += 1
            raise IntegrityError("host-tier chunk changed while spilled", transfer_id=transfer_id,
                                 waiting_for="host_restore")
        with self._lock:
            self.counters.restores_host += 1
        return view

    def read_into(self, chunk: SpilledChunk, out: memoryview, *, transfer_id: str | None = None) -> None:
        """Copy a spilled chunk into `out`, verifying disk-resident bytes."""
        from pdxfer.errors import IntegrityError
        from pdxfer.protocol.checksum import chunk_checksum

        if chunk.host is not None:
            assert self.host is not None
            out[:] = self.host.view(chunk.host)
            if chunk_checksum(out) != chunk.checksum:
                with self._lock:
                    self.counters.integrity_errors += 1
                raise IntegrityError("host-tier chunk changed while spilled", transfer_id=transfer_id)
            with self._lock:
                self.counters.restores_host += 1
            return
        if chunk.disk is None or self.disk is None:
            raise ValueError("chunk was already released")
        try:
            self.disk.read_into(chunk.disk, out, transfer_id=transfer_id)
        except IntegrityError:
            with self._lock:
                self.counters.integrity_errors += 1
            raise
        with self._lock:
            self.counters.restores_disk += 1

    def release(self, chunk: SpilledChunk) -> None:
        if chunk.host is not None and self.host is not None:
            self.host.free(chunk.host)
        if chunk.disk is not None and self.disk is not None:
            self.disk.free(chunk.disk)
        chunk.host = chunk.disk = None

    def usage(self) -> dict[str, int]:
        c = self.counters
        return {
            "host_bytes": self.host.used if self.host is not None else 0,
            "host_capacity": self.host.capacity if self.host is not None else 0,
            "disk_bytes": self.disk.used if self.disk is not None else 0,
            "disk_capacity": self.disk.capacity if self.disk is not None else 0,
            "spills_host": c.spills_host, "spills_disk": c.spills_disk, "demotions": c.demotions,
            "restores_host": c.restores_host, "restores_disk": c.restores_disk,
            "refused": c.refused, "integrity_errors": c.integrity_errors,
        }

    def close(self) -> None:
        if self.disk is not None:
            self.disk.close()
