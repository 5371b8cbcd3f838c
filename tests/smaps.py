"""Read one field of this process's mapping that starts at an address (/proc/self/smaps)."""

from __future__ import annotations


def mapping_field(addr: int, name: str) -> list[str]:
    """The values of field `name` (e.g. "Rss", "VmFlags") of the mapping starting at `addr`."""
    found = False
    with open("/proc/self/smaps") as f:
        for line in f:
            head = line.split()[0]
            if "-" in head and not head.endswith(":"):
                found = int(head.split("-")[0], 16) == addr
            elif found and head == f"{name}:":
                return line.split()[1:]
    raise AssertionError(f"no mapping starts at {addr:#x} (or it has no {name})")
