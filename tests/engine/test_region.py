"""The host receive region: private memory that asks for huge pages (see `engine.region`)."""

from __future__ import annotations

import os

import pytest

from pdxfer.engine.region import ReceiveRegion
from pdxfer.protocol.checksum import XXH3

pytestmark = pytest.mark.skipif(not os.path.exists("/proc/self/smaps"), reason="needs Linux /proc/self/smaps")


def _vm_flags(addr: int) -> list[str]:
    """VmFlags of the mapping that starts at `addr`."""
    found = False
    with open("/proc/self/smaps") as f:
        for line in f:
            head = line.split()[0]
            if "-" in head and not head.endswith(":"):
                found = int(head.split("-")[0], 16) == addr
            elif found and head == "VmFlags:":
                return line.split()[1:]
    raise AssertionError(f"no mapping starts at {addr:#x}")


def test_host_region_is_private_memory_advised_for_huge_pages():
    region = ReceiveRegion(8 << 20, None, XXH3)
    try:
        flags = _vm_flags(region.addr)
        assert "hg" in flags  # MADV_HUGEPAGE: THP may back it (shared anonymous memory never is, here)
        assert "sh" not in flags  # not a shared (shmem) mapping
        region.buffer[:4] = b"abcd"
        assert bytes(region.buffer[:4]) == b"abcd" and region.nbytes == 8 << 20
    finally:
        assert region.close()
