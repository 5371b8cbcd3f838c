"""The host receive region: private memory that asks for huge pages (see `engine.region`)."""

from __future__ import annotations

import os

import pytest

from pdxfer.engine.region import ReceiveRegion
from pdxfer.protocol.checksum import XXH3
from tests.smaps import mapping_field

pytestmark = pytest.mark.skipif(not os.path.exists("/proc/self/smaps"), reason="needs Linux /proc/self/smaps")


def test_host_region_is_private_memory_advised_for_huge_pages():
    region = ReceiveRegion(8 << 20, None, XXH3)
    try:
        flags = mapping_field(region.addr, "VmFlags")
        assert "hg" in flags  # MADV_HUGEPAGE: THP may back it (shared anonymous memory never is, here)
        assert "sh" not in flags  # not a shared (shmem) mapping
        region.buffer[:4] = b"abcd"
        assert bytes(region.buffer[:4]) == b"abcd" and region.nbytes == 8 << 20
    finally:
        assert region.close()
