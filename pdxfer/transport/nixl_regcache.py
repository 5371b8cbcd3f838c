"""NIXL registrations of the sender's chunk buffers: register in place, never stage.

A chunk buffer is arbitrary caller memory, and NIXL can only WRITE from registered
memory. Measured here (UCX tcp,self,sm, DRAM): registering a 2 MiB buffer costs ~13 µs
and deregistering ~1 µs, while copying it into a registered staging pool costs ~230 µs
(16 MiB: 43 µs vs 2 ms). The copy would also be a second full pass over the bytes on the
core that does the WRITE, so registering in place wins by more than 10x on CPU. (With
RDMA, registration pins pages and costs more; the cache below then saves the repeat.)

Entries are keyed by (address, nbytes) and hold a memoryview of the buffer, so the
address cannot be freed or reused while it is registered. An entry lives while a WRITE
from it is in flight, and stays cached (idle) only while a transfer that used it is still
live: a caller may free or reuse a buffer once its transfer's future resolves, so every
entry of a transfer is deregistered when that transfer ends. Idle entries are bounded
(LRU by count and bytes).

Pinned buffers (`pin`, from `Sender.register`) are the exception: a long-lived buffer the
caller keeps its chunks in (a KV cache, a send buffer pool) is registered once, and every
chunk that lies inside it WRITEs from that one registration, transfer after transfer. On
RDMA that is the difference between pinning pages per chunk per transfer and never; vLLM's
own NIXL connector registers its KV caches once for the same reason. `unpin` deregisters
it once no WRITE from it is in flight.
"""

from __future__ import annotations

import bisect
import ctypes
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from pdxfer.layout.buffers import DRAM, VRAM, DeviceChunk
from pdxfer.transport.nixl_agent import NixlAgent

Key = tuple[int, ...]  # (address, nbytes); a pinned buffer's is (address, nbytes, 1)


def _describe(view: "memoryview | DeviceChunk") -> tuple[int, "DeviceChunk | None", str, int]:
    """(address, what keeps GPU memory alive, NIXL memory kind, device) of a chunk buffer."""
    if isinstance(view, DeviceChunk):
        return view.addr, view, VRAM, view.device
    return buffer_address(view), None, DRAM, 0


def buffer_address(view: memoryview) -> int:
    """Address of a C-contiguous buffer's first byte (read-only buffers included).

    Called for every chunk a NIXL worker posts, with the GIL held: ctypes reads a
    writable buffer's address in ~0.2 µs, numpy (which also takes read-only ones) in ~2 µs."""
    if view.readonly:
        return _numpy_address(view)
    try:
        return ctypes.addressof(ctypes.c_char.from_buffer(view))
    except (TypeError, ValueError, BufferError):  # e.g. a non-contiguous export
        return _numpy_address(view)  # which raises the error that names the problem


def _numpy_address(view: memoryview) -> int:
    return int(np.frombuffer(view, dtype=np.uint8).ctypes.data)


@dataclass
class _Entry:
    reg: Any
    view: "memoryview | DeviceChunk"  # pins the buffer (its address stays valid) while registered
    refs: int = 0  # WRITEs in flight from this entry
    owners: set[str] = field(default_factory=set)  # live transfers that used it
    mem: tuple[str, int] = (DRAM, 0)
    unpinned: bool = False  # a pinned entry whose owner let go: dropped once refs reach 0


class RegistrationCache:
    def __init__(self, agent: NixlAgent, *, max_idle: int = 256, max_idle_bytes: int = 1 << 30) -> None:
        self._agent = agent
        self.max_idle = max_idle
        self.max_idle_bytes = max_idle_bytes
        self._entries: dict[Key, _Entry] = {}
        self._idle: OrderedDict[Key, None] = OrderedDict()  # refs == 0, oldest first
        self._idle_bytes = 0
        self._by_owner: dict[str, set[Key]] = {}
        self._pins: dict[Key, _Entry] = {}  # pinned buffers, by (address, nbytes, 1)
        # Live pins sorted by address (they never overlap): a chunk finds its pin by bisection,
        # since a caller may register many buffers (e.g. one KV cache tensor per layer).
        self._pin_index: list[Key] = []
        self.hits = 0
        self.misses = 0
        self.pinned_hits = 0

    def __len__(self) -> int:
        return len(self._entries)

    @property
    def registered_bytes(self) -> int:
        return sum(k[1] for k in self._entries)

    @property
    def pinned(self) -> int:
        return len(self._pin_index)  # live pins only: unpinned ones leave the index at once

    def pin(self, view: "memoryview | DeviceChunk") -> Key:
        """Register `view` until `unpin`: chunks inside it need no registration of their own."""
        addr, keep, mem, dev = _describe(view)
        end = addr + view.nbytes
        if view.nbytes <= 0:
            raise ValueError("cannot register an empty buffer")
        i = bisect.bisect_left(self._pin_index, (addr,))
        for a, n, _ in self._pin_index[max(0, i - 1):i + 1]:  # only neighbours can overlap
            if a < end and addr < a + n:
                raise ValueError(f"buffer [{addr:#x}, {end:#x}) overlaps one registered already "
                                 f"[{a:#x}, {a + n:#x}): unregister that one first")
        key = (addr, view.nbytes, 1)
        stale = self._pins.get(key)
        if stale is not None:  # unpinned, its last WRITE still in flight: the same memory, kept alive by it
            stale.unpinned = False
        else:
            self._pins[key] = _Entry(self._agent.register(addr, view.nbytes, mem, dev),
                                     keep if keep is not None else memoryview(view), mem=(mem, dev))
        bisect.insort(self._pin_index, key)
        return key

    def unpin(self, view: "memoryview | DeviceChunk") -> bool:
        """Let go of a pinned buffer: deregistered now, or when its last WRITE finishes.
        False if `view` was not pinned."""
        addr, _, _, _ = _describe(view)
        entry = self._pins.get((addr, view.nbytes, 1))
        if entry is None or entry.unpinned:
            return False
        entry.unpinned = True
        self._pin_index.remove((addr, view.nbytes, 1))
        if entry.refs == 0:
            self._drop_pin((addr, view.nbytes, 1))
        return True

    def _pinned_for(self, addr: int, nbytes: int, mem: tuple[str, int]) -> Key | None:
        i = bisect.bisect_right(self._pin_index, (addr, float("inf"))) - 1
        if i < 0:
            return None
        key = self._pin_index[i]
        if addr + nbytes <= key[0] + key[1] and self._pins[key].mem == mem:
            return key
        return None

    def acquire(self, view: "memoryview | DeviceChunk", owner: str) -> tuple[Key, int]:
        """Registration for `view` (a pinned buffer's if it lies inside one, else its own,
        registered now if not cached); returns (key, address). Host and GPU addresses share
        one (unified) address space, so keys cannot collide."""
        addr, pin, mem, dev = _describe(view)
        if self._pin_index:
            pinned = self._pinned_for(addr, view.nbytes, (mem, dev))
            if pinned is not None:
                self._pins[pinned].refs += 1
                self.pinned_hits += 1
                return pinned, addr
        key = (addr, view.nbytes)
        entry = self._entries.get(key)
        if entry is None:
            self.misses += 1
            entry = _Entry(self._agent.register(addr, view.nbytes, mem, dev),
                           pin if pin is not None else memoryview(view))  # host: our own export
            self._entries[key] = entry
        else:
            self.hits += 1
            if entry.refs == 0:
                self._idle.pop(key, None)
                self._idle_bytes -= key[1]
        entry.refs += 1
        if owner not in entry.owners:
            entry.owners.add(owner)
            self._by_owner.setdefault(owner, set()).add(key)
        return key, addr

    def release(self, key: Key) -> None:
        """A WRITE from `key` finished (or failed)."""
        pinned = self._pins.get(key) if len(key) > 2 else None
        if pinned is not None:
            pinned.refs -= 1
            if pinned.refs <= 0 and pinned.unpinned:
                self._drop_pin(key)
            return
        entry = self._entries.get(key)
        if entry is None:
            return
        entry.refs -= 1
        if entry.refs > 0:
            return
        if not entry.owners:
            self._drop(key)
            return
        self._idle[key] = None
        self._idle_bytes += key[1]
        while self._idle and (len(self._idle) > self.max_idle or self._idle_bytes > self.max_idle_bytes):
            self._drop(next(iter(self._idle)))

    def end_owner(self, owner: str) -> None:
        """Transfer `owner` ended: its buffers may be freed now, so forget what only it used."""
        for key in self._by_owner.pop(owner, ()):
            entry = self._entries.get(key)
            if entry is None:
                continue
            entry.owners.discard(owner)
            if not entry.owners and entry.refs == 0:
                self._drop(key)

    def clear(self) -> None:
        for key in list(self._entries):
            self._drop(key)
        self._by_owner.clear()
        for key in list(self._pins):
            self._drop_pin(key)
        self._pin_index.clear()

    def _drop_pin(self, key: Key) -> None:
        entry = self._pins.pop(key)
        self._agent.deregister(entry.reg)
        if isinstance(entry.view, memoryview):
            entry.view.release()

    def _drop(self, key: Key) -> None:
        entry = self._entries.pop(key)
        if key in self._idle:
            del self._idle[key]
            self._idle_bytes -= key[1]
        for owner in entry.owners:
            keys = self._by_owner.get(owner)
            if keys is not None:
                keys.discard(key)
        self._agent.deregister(entry.reg)
        if isinstance(entry.view, memoryview):
            entry.view.release()  # our own view only: the caller's view stays usable
