"""Disk spill tier: one file per chunk under a per-process directory, bounded in bytes.

Files are written to a temporary name and renamed only when complete, so a crash or an
I/O error never leaves a half-written chunk that looks valid; every read is verified
against the chunk's checksum. Each process holds an exclusive `flock` on a lock file in
its own directory for its whole life: at start-up, any sibling directory whose lock can
be taken belongs to a dead process and is removed, so spill files of a crashed worker
never accumulate. A directory gets its spill name only by a rename after its lock is
held: made under its final name, it would sit unlocked for a moment, and a worker
starting beside it would take it for a dead one and delete it under its owner.
All methods do blocking I/O and are meant for a worker thread.
"""

from __future__ import annotations

import fcntl
import itertools
import os
import shutil
import threading
from dataclasses import dataclass
from pathlib import Path

import structlog
import xxhash

from pdxfer.errors import IntegrityError

log = structlog.get_logger("pdxfer.tiers")
_PREFIX = "pdxfer-spill-"
# Where a directory is made and locked before it is renamed to its _PREFIX name; only the
# owner's pid tells a dead one from one being set up, so one is removed when that is gone.
_STAGING = ".pdxfer-staging-"
_IO_BLOCK = 8 << 20  # large sequential writes
# Reads go in 1 MiB pieces, each hashed right after it lands while it is still in cache:
# hashing the whole chunk afterwards was a second pass from DRAM (a 16 MiB chunk read from
# the page cache went at 0.32x a plain read that way).
_READ_PIECE = 1 << 20


@dataclass(eq=False)
class DiskBlock:
    key: int
    nbytes: int
    checksum: int
    path: Path


def cleanup_orphans(root: Path) -> int:
    """Remove spill directories of processes that no longer hold their lock."""
    removed = 0
    if not root.is_dir():
        return 0
    for d in root.iterdir():
        if d.name.startswith(_STAGING) and d.is_dir():
            removed += _remove_dead_staging(d)
            continue
        if not d.name.startswith(_PREFIX) or not d.is_dir():
            continue
        lock = d / "owner.lock"
        try:
            fd = os.open(lock, os.O_RDWR)
        except FileNotFoundError:
            fd = None  # made by a version that created it unlocked, owner died at start-up
        except OSError:
            continue
        try:
            if fd is not None:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except BlockingIOError:
                    continue  # a live process owns it
            shutil.rmtree(d, ignore_errors=True)
            removed += 1
            log.info("spill_orphans_removed", directory=str(d))
        finally:
            if fd is not None:
                os.close(fd)
    return removed


def _remove_dead_staging(d: Path) -> int:
    try:
        pid = int(d.name[len(_STAGING):].split("-", 1)[0])
    except ValueError:
        return 0  # not ours
    if _alive(pid):
        return 0
    shutil.rmtree(d, ignore_errors=True)
    log.info("spill_orphans_removed", directory=str(d))
    return 1


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # exists, another user's
    return True


def _make_locked_dir(root: Path) -> tuple[Path, int]:
    """A new spill directory whose lock is already held when it first bears the spill name."""
    tag = f"{os.getpid()}-{os.urandom(4).hex()}"
    staging = root / f"{_STAGING}{tag}"
    staging.mkdir()
    fd = -1
    try:
        fd = os.open(staging / "owner.lock", os.O_RDWR | os.O_CREAT, 0o600)
        fcntl.flock(fd, fcntl.LOCK_EX)  # an flock belongs to the open file: kept over the rename
        final = root / f"{_PREFIX}{tag}"
        os.rename(staging, final)
    except BaseException:
        if fd >= 0:
            os.close(fd)
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return final, fd


class DiskTier:
    def __init__(self, root: str | os.PathLike, capacity: int) -> None:
        if capacity < 0:
            raise ValueError(f"disk tier capacity must be >= 0, got {capacity}")
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self.capacity = capacity
        self.orphans_removed = cleanup_orphans(self.root)
        self.dir, self._lock_fd = _make_locked_dir(self.root)
        self._used = 0
        self._mutex = threading.Lock()
        self._keys = itertools.count(1)
        self._blocks: dict[int, DiskBlock] = {}

    @property
    def used(self) -> int:
        return self._used

    def put(self, data: memoryview, checksum: int) -> DiskBlock | None:
        """Write `data` to its own file; None when the tier has no room left."""
        n = data.nbytes
        with self._mutex:
            if self._used + n > self.capacity:
                return None
            self._used += n
        key = next(self._keys)
        path = self.dir / f"{key}.chunk"
        tmp = self.dir / f"{key}.tmp"
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            try:
                view = data.cast("B") if data.format != "B" else data
                pos = 0
                while pos < n:
                    pos += os.write(fd, view[pos : pos + _IO_BLOCK])
            finally:
                os.close(fd)
            os.rename(tmp, path)
        except BaseException:
            tmp.unlink(missing_ok=True)
            with self._mutex:
                self._used -= n
            raise
        block = DiskBlock(key, n, checksum, path)
        with self._mutex:
            self._blocks[key] = block
        return block

    def read_into(self, block: DiskBlock, out: memoryview, *, transfer_id: str | None = None) -> None:
        """Read a chunk back into `out` and verify it; IntegrityError if the file changed."""
        if out.nbytes != block.nbytes:
            raise ValueError(f"read buffer of {out.nbytes} bytes for a {block.nbytes}-byte chunk")
        hasher = xxhash.xxh3_64()  # streaming xxh3 equals chunk_checksum() of the whole
        try:
            with open(block.path, "rb", buffering=0) as fh:
                pos = 0
                while pos < block.nbytes:
                    piece = out[pos : pos + _READ_PIECE]
                    got = fh.readinto(piece)
                    if not got:
                        break
                    hasher.update(piece[:got])
                    pos += got
                extra = fh.read(1)
        except FileNotFoundError:
            raise IntegrityError(f"spill file {block.path.name} is missing", transfer_id=transfer_id) from None
        if pos != block.nbytes or extra:
            raise IntegrityError(f"spill file {block.path.name} has the wrong size", transfer_id=transfer_id)
        actual = hasher.intdigest()
        if actual != block.checksum:
            raise IntegrityError(
                f"spill file {block.path.name} checksum {actual:#018x} != {block.checksum:#018x}",
                transfer_id=transfer_id, waiting_for="disk_restore",
            )

    def free(self, block: DiskBlock) -> None:
        with self._mutex:
            if self._blocks.pop(block.key, None) is None:
                raise ValueError(f"disk block {block.key} freed twice or unknown")
            self._used -= block.nbytes
        block.path.unlink(missing_ok=True)

    def files(self) -> list[Path]:
        return sorted(p for p in self.dir.iterdir() if p.name != "owner.lock")

    def close(self) -> None:
        """Remove every spill file and this process's directory."""
        with self._mutex:
            self._blocks.clear()
            self._used = 0
        shutil.rmtree(self.dir, ignore_errors=True)
        os.close(self._lock_fd)

    def __len__(self) -> int:
        return len(self._blocks)
